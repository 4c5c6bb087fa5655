"""``auto``: choose, per tensor, the codec and setting that fits a size or fidelity target.

deltahub's own method (no paper chooses codecs per tensor). Candidates are every installed codec's
``auto_grid`` settings that accept the tensor (the built-ins: dense fp16/bf16/exact, compeft, dare, darex,
bitdelta, binary; a third-party codec joins by declaring a grid). ``fit`` encodes each tensor with each
candidate once, measures (stored bits, distortion) and keeps the payloads it may choose, so ``encode``
writes a cached payload instead of encoding twice. Distortion and allocation: :mod:`deltahub.selection`.

Targets (give one; none means ``max_bits_per_param=1``):

- ``max_bits_per_param=B``: least total distortion within B bits per parameter (Lagrangian allocation:
  each tensor minimises D + λ·bits, λ bisected to meet the budget);
- ``max_kl=K`` / ``min_agreement=A`` (need ``--calibration``): the smallest allocation whose *measured*
  end-to-end figure on the calibration texts meets the target. The Fisher prediction (KL ≈ ΣD / 2·outputs)
  gives the first λ, then each step applies the chosen errors to the fine-tuned model, reruns the texts and
  moves λ by bisection on the measured figure (at most ``max_checks`` runs);
- ``max_error=ε``: per tensor, the fewest bits with ‖Δ − Δ̂‖/‖Δ‖ ≤ ε (weight space; kept for scripts).

``objective``: ``fisher`` with calibration (output sensitivity, :mod:`deltahub.sensitivity`), else
``heuristic`` (noise-aware weight error), or ``weight``. With calibration the final allocation is always
checked end to end and the figure recorded. What was chosen is in each tensor's meta (``auto.codec``,
``auto.params``, ``auto.version``); the target, objective and measured figures are in ``fit_stats``.
Budgets count the payload before the artifact's zstd stage, so the stored size is at most the budget.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from deltahub import selection as sel
from deltahub.calibration import Calibration
from deltahub.codecs import Codec, CodecConfig, DeltaSource, Encoded, get_codec
from deltahub.errors import CodecConfigError, CodecVersionError

DEFAULT_BITS = 1.0


class AutoConfig(CodecConfig):
    """Options of ``auto`` (at most one target)."""

    max_bits_per_param: float | None = Field(None, gt=0)
    """Size budget over all tensors, in bits per parameter (the default target: 1)."""
    max_kl: float | None = Field(None, gt=0)
    """Fidelity budget: mean KL(expert ‖ compressed) per output on the calibration texts, in nats."""
    min_agreement: float | None = Field(None, gt=0, le=1)
    """Fidelity budget: fraction of calibration outputs whose argmax matches the expert's."""
    max_error: float | None = Field(None, gt=0)
    """Per-tensor bound on the relative weight error ‖Δ − Δ̂‖/‖Δ‖."""
    objective: Literal["auto", "fisher", "heuristic", "weight"] = "auto"
    """Distortion: fisher (calibrated output sensitivity), heuristic (noise-aware weight error), weight."""
    max_checks: int = Field(10, ge=1, le=50)
    """End-to-end runs of the calibration texts per searched allocation (a fidelity target searches two)."""

    @model_validator(mode="after")
    def _one_target(self) -> AutoConfig:
        if len(self.targets()) > 1:
            raise ValueError("give at most one of max_bits_per_param, max_kl, min_agreement, max_error")
        return self

    def targets(self) -> dict[str, float]:
        names = ("max_bits_per_param", "max_kl", "min_agreement", "max_error")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


class AutoCodec(Codec):
    name = "auto"
    version = 2
    pretty_name = "auto (per-tensor codec choice)"
    reference_url = None
    Config = AutoConfig

    def __init__(self) -> None:
        self._cache: tuple[str, dict[str, Encoded]] = ("", {})  # the last fit's chosen payloads, by tensor

    def accepts(self, name: str, shape: tuple[int, ...], config: CodecConfig) -> bool:
        return True

    def fit(self, deltas: DeltaSource, config: AutoConfig, *, calibration: Any = None) -> dict[str, Any]:
        """Measure every candidate on every tensor, then choose per tensor for the target (module docstring).

        Raises:
            CodecConfigError: a fidelity target or the fisher objective without calibration with a model.
        """
        target = config.targets() or {"max_bits_per_param": DEFAULT_BITS}
        (kind, value), = target.items()
        sens = _sensitivity(config, kind, calibration)
        objective = "weight" if kind == "max_error" else "fisher" if sens is not None else (
            "heuristic" if config.objective == "auto" else config.objective)
        scorer = (lambda n, d, errs: sens.scores(n, errs)) if objective == "fisher" else None
        table, kept, numel, norms = {}, {}, 0, {}
        for name, d in deltas:
            numel += d.numel()
            norms[name] = float(d.double().pow(2).sum())
            table[name] = sel.measure(name, d, objective=objective, scorer=scorer, prune=kind != "max_error")
            if kind == "max_error":  # decided per tensor: keep only the chosen payload
                table[name] = [table[name][_cheapest_within(table[name], value * value * norms[name])]]
            if sens is not None:
                kept[name] = d
        if objective == "fisher" and not any(sens.covers(n) for n in table):
            raise CodecConfigError("auto: the calibration model has none of the delta's tensors; calibrate with "
                                   "the fine-tuned model folder, or drop --calibration.")
        stats: dict[str, Any] = {"objective": objective, "target": target, "candidates": len(sel.grid())}
        if kind == "max_error":
            choice = dict.fromkeys(table, 0)
        elif kind == "max_bits_per_param":
            stats["lambda"], choice = sel.fit_bits(table, value * numel)
            if objective == "fisher":  # the Fisher allocation is second order: check it against the heuristic's
                choice = _better_measured(sens, table, kept, [choice, sel.fit_bits(table, value * numel, "alt")[1]],
                                          ["fisher", "heuristic"], stats)
        else:
            choice = self._search(table, kept, sens, kind, value, config.max_checks, stats)
        if sens is not None:
            stats.setdefault("measured", _measure(sens, table, kept, choice))
            stats["predicted_kl"] = sel.total(table, choice, "score") / (2 * sens.outputs)
            stats["calibration_outputs"] = sens.outputs
        stats["bits_per_param"] = sel.total(table, choice) / max(numel, 1)
        stats["choice"] = {n: table[n][i].label for n, i in choice.items()}
        stats["run"] = uuid.uuid4().hex
        self._cache = (stats["run"], {n: table[n][i].enc for n, i in choice.items() if table[n][i].enc is not None})
        return stats

    def _search(self, table: dict[str, list[sel.Trial]], kept: dict[str, torch.Tensor], sens: Any, kind: str,
                value: float, max_checks: int, stats: dict[str, Any]) -> dict[str, int]:
        """The fewest bits whose measured figure meets the target. Two bisections on log λ, each checked end to
        end: the Fisher allocation (started at the λ its prediction says meets the target) and the heuristic
        one (started at the Fisher result's size); the smaller allocation that meets the target wins."""
        def meets(m: dict[str, float]) -> bool:
            return m["kl"] <= value if kind == "max_kl" else m["agreement"] >= value

        guess = sel.lambda_for_score(table, 2 * sens.outputs * (value if kind == "max_kl" else 1e-3))
        fisher, f_steps = _bisect(sens, table, kept, meets, "score", guess, max_checks)
        size = fisher[0] if fisher else sel.total(table, sel.allocate(table, guess))
        heur, h_steps = _bisect(sens, table, kept, meets, "alt", sel.fit_bits(table, size, "alt")[0], max_checks)
        found = [(b, n) for b, n in ((fisher, "fisher"), (heur, "heuristic")) if b is not None]
        if found:
            best, stats["allocation"] = min(found, key=lambda f: f[0][0])
        else:  # nothing tried met it: the most faithful allocation (exact tensors: KL 0)
            choice = sel.allocate(table, 0.0)
            best, stats["allocation"] = (sel.total(table, choice), choice, _measure(sens, table, kept, choice)), "exact"
        stats["search"] = {"fisher": f_steps, "heuristic": h_steps}
        stats["measured"], stats["met"] = best[2], meets(best[2])
        return best[1]

    def encode(self, delta: torch.Tensor, config: AutoConfig, stats: Mapping[str, Any] | None = None, *,
               name: str = "") -> Encoded:
        if not stats or name not in stats.get("choice", {}):
            stats = self.fit_one(name, delta, config)
        run, cached = self._cache
        enc = cached.pop(name, None) if run == stats.get("run") else None
        lab = stats["choice"][name]
        found = [(c, cfg) for c, cfg, lb in sel.candidates(name, tuple(delta.shape)) if lb == lab]
        if not found:
            raise CodecConfigError(f"auto chose {lab!r} for {name!r}, which no installed codec offers now; "
                                   "compress again (the fit and the encode must see the same codecs).")
        codec, cfg = found[0]
        if enc is None:  # not cached (another process, or fit over a different source): encode again
            enc = sel.encode_with(codec, cfg, delta, name)
        meta = {**enc.meta, "auto.codec": codec.name, "auto.version": str(codec.version),
                "auto.params": json.dumps(cfg.model_dump(mode="json", exclude_unset=True), sort_keys=True)}
        return Encoded(enc.tensors, meta)

    @staticmethod
    def _inner(enc: Encoded) -> tuple[Codec, Encoded]:
        try:
            codec = get_codec(enc.meta["auto.codec"])
            version = int(enc.meta["auto.version"])
        except (KeyError, ValueError):
            raise ValueError("auto payload does not name its codec") from None
        if version > codec.version:
            raise CodecVersionError(f"This auto payload was encoded with codec {codec.name} v{version}; the installed one "
                                    f"is v{codec.version}. Upgrade the plugin that provides it (`deltahub codecs`).")
        inner_meta = {k: v for k, v in enc.meta.items() if not k.startswith("auto.")}
        return codec, Encoded(enc.tensors, inner_meta)

    def decode(self, enc: Encoded, shape: tuple[int, ...]) -> torch.Tensor:
        codec, inner = self._inner(enc)
        return codec.decode(inner, shape).to(torch.float32) if codec.name != "dense" else codec.decode(inner, shape)

    def sparse(self, enc: Encoded, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        codec, inner = self._inner(enc)
        return codec.sparse(inner, shape)

    def to_resident(self, enc: Encoded, shape: tuple[int, ...], *, device: Any = "cpu") -> Any:
        codec, inner = self._inner(enc)
        return codec.to_resident(inner, shape, device=device)


def _sensitivity(config: AutoConfig, kind: str, calibration: Any) -> Any:
    """The calibration's Sensitivity when the objective or target needs it (or calibration is given)."""
    needs = kind in ("max_kl", "min_agreement") or config.objective == "fisher"
    usable = isinstance(calibration, Calibration) and calibration.model is not None and kind != "max_error"
    if needs and not usable:
        raise CodecConfigError(f"auto with {kind if kind in ('max_kl', 'min_agreement') else 'objective=fisher'} "
                               "needs calibration texts and the fine-tuned model: pass --calibration FILE.")
    if not usable or config.objective in ("heuristic", "weight"):
        return None
    return calibration.sensitivity()


def _bisect(sens: Any, table: dict[str, list[sel.Trial]], kept: dict[str, torch.Tensor], meets: Any, key: str,
            lam: float, max_checks: int) -> tuple[tuple[float, dict[str, int], dict[str, float]] | None, list[dict]]:
    """Bisection on log λ of the allocation by ``key`` for the fewest bits whose measured figure ``meets``:
    ×16 steps until the target is bracketed, then halving the bracket (in log λ) to a 1.25 ratio."""
    lo = hi = best = None
    steps: list[dict] = []
    for _ in range(max_checks):
        choice = sel.allocate(table, lam, key)
        m = _measure(sens, table, kept, choice)
        bits = sel.total(table, choice)
        steps.append({"lambda": lam, "bits": bits, **m})
        if meets(m):
            lo = lam
            if best is None or bits < best[0]:
                best = (bits, choice, m)
        else:
            hi = lam
        if lo is not None and hi is not None and hi / lo < 1.25:
            break
        lam = lam * 16 if hi is None else lam / 16 if lo is None else math.sqrt(lo * hi)
    return best, steps


def _better_measured(sens: Any, table: dict[str, list[sel.Trial]], kept: dict[str, torch.Tensor],
                     choices: list[dict[str, int]], names: list[str], stats: dict[str, Any]) -> dict[str, int]:
    """The allocation with the lowest measured KL (agreement breaks ties); each one's figures go in ``stats``."""
    figures = [_measure(sens, table, kept, c) for c in choices]
    stats["search"] = [{"allocation": n, "bits": sel.total(table, c), **m} for n, c, m in zip(names, choices, figures)]
    best = min(range(len(choices)), key=lambda i: (figures[i]["kl"], -figures[i]["agreement"]))
    stats["allocation"], stats["measured"] = names[best], figures[best]
    return choices[best]


def _cheapest_within(trials: list[sel.Trial], max_err2: float) -> int:
    ok = [i for i, t in enumerate(trials) if t.err2 <= max_err2]
    return min(ok, key=lambda i: trials[i].bits) if ok else max(range(len(trials)), key=lambda i: trials[i].bits)


def _measure(sens: Any, table: dict[str, list[sel.Trial]], kept: dict[str, torch.Tensor],
             choice: dict[str, int]) -> dict[str, float]:
    """End-to-end figures of ``choice``: its errors added to the fine-tuned model, the texts rerun."""
    errors = {}
    for n, i in choice.items():
        t = table[n][i]
        if t.err2 > 0 and t.enc is not None:
            codec = get_codec(t.label.split(" ", 1)[0])
            errors[n] = codec.decode(t.enc, tuple(kept[n].shape)).float() - kept[n].float()
    return sens.evaluate(errors)
