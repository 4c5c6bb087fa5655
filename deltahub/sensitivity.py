"""How much a weight error changes a model's *outputs*: a Fisher estimate per tensor, and the end-to-end check.

Why. Weight-space error does not predict task accuracy across codec families: on the demo task DARE at
p = 0.99 has relative error 9.9 and loses 0.7 points, ComPEFT at d = 0.2 has 0.64 and loses as much. What
matters is the change of the output distribution, KL(p_ft ‖ p_compressed). For a small weight error e,

    KL ≈ ½ eᵀ F e,   F = E_x E_{y~p(·|x)} [∇_θ log p(y|x) ∇_θ log p(y|x)ᵀ]   (the Fisher information),

so with one label ŷ_s sampled from the model's own prediction on each calibration text s and the per-text
score g_s = ∇_θ log p(ŷ_s|x_s), eᵀ F e is estimated without bias by (1/S) Σ_s ⟨e, g_s⟩² — the *full*
quadratic form, cross terms included. That is the point: DARE's error is independent zero-mean noise whose
terms cancel inside ⟨e, g_s⟩, while a deterministic error (trimmed entries, a shared sign scale) does not.

How, without storing per-text gradients (S × model size). For a linear layer y = W x the score of text s
factors over its tokens t: g_s = Σ_t δ_t x_tᵀ with δ_t the gradient at the layer's output, so
⟨e, g_s⟩ = Σ_t δ_tᵀ e x_t, from the layer's inputs and output gradients (tokens × (in + out) numbers). An
embedding row lookup is the same with a one-hot x (δ_t · e[id_t]); a bias is x = 1; a LayerNorm weight
multiplies the normalised input x̂, so ⟨e, g_s⟩ = Σ_t (δ_t ⊙ x̂_t) · e. Other parameters fall back to the
diagonal of F (Σ_s g_s²), which ignores cross terms. Outputs: ``logits`` (classification per text, causal
LM per position; KL per output), else the first output tensor with a Gaussian probe (E‖uᵀδh‖² = ‖δh‖²).

The end-to-end check (:meth:`Sensitivity.evaluate`) adds the actual errors to the fine-tuned weights, runs the
calibration texts again and reports the mean KL per output and the agreement of argmax predictions.
Memory: the calibration model plus one saved copy of each perturbed parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

_GRAD_STACK = 1 << 26  # per-text gradients of one weight kept at once: at most 256 MB of fp32


def _outputs(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)
    return logits.double()  # KL of nearby models cancels to ~1e-8: fp32 rounding would swamp it


def _flat(z: torch.Tensor) -> torch.Tensor:
    """(outputs, classes): one row per text for a classifier, per position for an LM."""
    return z.reshape(-1, z.shape[-1])


class Sensitivity:
    """Per-tensor output sensitivity of the fine-tuned ``model`` on calibration ``batches`` (module docstring)."""

    def __init__(self, model: torch.nn.Module, batches: list[Mapping[str, torch.Tensor]], *, seed: int = 0):
        self.model, self.batches = model, batches
        self.has_logits = getattr(model(**batches[0]), "logits", None) is not None if batches else False
        self.reference = [self._run(b) for b in batches]
        self.outputs = sum(r.shape[0] for r in self.reference)
        self.params = dict(model.named_parameters())
        self._kind: dict[str, tuple[str, str]] = {}  # param name -> (kind, module name)
        self._x: dict[str, Any] = {}
        self._g: dict[str, Any] = {}
        self._diag: dict[str, torch.Tensor] = {}
        self._capture(seed)

    # ---------------------------------------------------------------------------------------- capture
    @torch.no_grad()
    def _run(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.model.eval()
        return _flat(_outputs(self.model(**batch)))

    def _modules(self) -> dict[str, torch.nn.Module]:
        mods = {}
        for mname, mod in self.model.named_modules():
            conv1d = type(mod).__name__ == "Conv1D"
            kind = ("linear" if isinstance(mod, torch.nn.Linear) else "conv1d" if conv1d else
                    "embedding" if isinstance(mod, torch.nn.Embedding) else
                    "layernorm" if isinstance(mod, torch.nn.LayerNorm) else None)
            if kind is None:
                continue
            mods[mname] = mod
            for pname, _ in mod.named_parameters(recurse=False):
                full = f"{mname}.{pname}" if mname else pname
                self._kind[full] = (kind if pname == "weight" else "bias", mname)
        return mods

    def _capture(self, seed: int) -> None:
        """One forward/backward per text with a sampled label; records (inputs, output grads) per module."""
        mods = self._modules()
        inputs: dict[str, torch.Tensor] = {}
        hooks = []
        for mname, mod in mods.items():
            def pre(m: torch.nn.Module, args: tuple, n: str = mname) -> None:
                inputs[n] = args[0].detach()

            def post(m: torch.nn.Module, args: tuple, out: torch.Tensor, n: str = mname) -> None:
                if out.requires_grad:
                    out.register_hook(lambda g, n=n: self._record(n, inputs[n], g))
            hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        gen = torch.Generator().manual_seed(seed)
        self.model.eval()
        try:
            for batch in self.batches:
                self.model.zero_grad(set_to_none=True)
                z = _flat(_outputs(self.model(**batch)))
                if self.has_logits:
                    y = torch.multinomial(z.detach().float().softmax(-1), 1, generator=gen).reshape(-1)
                    score = z.log_softmax(-1).gather(1, y[:, None]).sum()
                else:
                    score = (z * torch.randn(z.shape, generator=gen)).sum()
                score.backward()
                for name, p in self.params.items():
                    if name not in self._kind and p.grad is not None:
                        self._diag[name] = self._diag.get(name, 0) + p.grad.detach().float() ** 2
        finally:
            for h in hooks:
                h.remove()
            self.model.zero_grad(set_to_none=True)
        # one (tokens, ·) matrix per module and the text each token came from: one matmul per error
        self._seg = {m: torch.cat([torch.full((g.shape[0],), i) for i, g in enumerate(gs)]) for m, gs in self._g.items()}
        self._x = {m: torch.cat(xs) for m, xs in self._x.items()}
        self._g = {m: torch.cat(gs) for m, gs in self._g.items()}

    def _record(self, mname: str, x: torch.Tensor, g: torch.Tensor) -> None:
        x = x.detach()
        self._x.setdefault(mname, []).append(x.reshape(-1, x.shape[-1]).float() if x.is_floating_point()
                                             else x.reshape(-1))
        self._g.setdefault(mname, []).append(g.detach().float().reshape(-1, g.shape[-1]))

    # ------------------------------------------------------------------------------------------ query
    def resolve(self, tensor_name: str) -> str | None:
        """The model parameter for checkpoint tensor ``tensor_name`` (exact, else unique longest suffix match)."""
        if tensor_name in self.params:
            return tensor_name
        hits = [k for k in self.params if k.endswith("." + tensor_name) or tensor_name.endswith("." + k)]
        best = max((len(k) for k in hits), default=0)
        hits = [k for k in hits if len(k) == best]
        return hits[0] if len(hits) == 1 else None

    def covers(self, tensor_name: str) -> bool:
        p = self.resolve(tensor_name)
        return p is not None and (p in self._kind and self._kind[p][1] in self._g or p in self._diag)

    @torch.no_grad()
    def scores(self, tensor_name: str, errors: list[torch.Tensor]) -> list[float] | None:
        """Σ_s ⟨e, g_s⟩² for each error e (shaped like the tensor); ≈ 2 · outputs · KL. None if not covered."""
        pname = self.resolve(tensor_name)
        if pname is None:
            return None
        shape = self.params[pname].shape
        if any(e.shape != shape for e in errors):
            return None
        if pname in self._diag:
            return [float((self._diag[pname] * e.float() ** 2).sum()) for e in errors]
        kind, mname = self._kind.get(pname, (None, ""))
        if mname not in self._g:
            return None
        mod, x, g, seg = self.model.get_submodule(mname), self._x[mname], self._g[mname], self._seg[mname]
        if kind in ("linear", "conv1d") and len(self.batches) * shape.numel() <= _GRAD_STACK:
            grads = self._text_gradients(kind, x, g, seg)  # (texts, numel): one GEMM scores every error
            return [float(v) for v in (torch.stack([e.float().reshape(-1) for e in errors]) @ grads.T)
                    .double().pow(2).sum(1)]
        out = []
        for e in errors:
            v = self._token_products(kind, mod, e.float(), x, g)
            per_text = torch.zeros(len(self.batches), dtype=torch.float64).index_add_(0, seg, v.double())
            out.append(float(per_text.pow(2).sum()))  # a text's tokens add before squaring: cross terms kept
        return out

    def _text_gradients(self, kind: str, x: torch.Tensor, g: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        """g_s = Σ_t δ_t x_tᵀ per text, flattened like the weight: with S texts ≪ T tokens, scoring C errors costs
        C·S·numel instead of C·T·numel multiply-adds (T ≈ 5 S on short calibration texts)."""
        rows = []
        for s in range(len(self.batches)):
            at = seg == s
            gs = g[at].T @ x[at] if kind == "linear" else x[at].T @ g[at]
            rows.append(gs.reshape(-1))
        return torch.stack(rows)

    @staticmethod
    def _token_products(kind: str | None, mod: torch.nn.Module, e: torch.Tensor, x: torch.Tensor,
                        g: torch.Tensor) -> torch.Tensor:
        """δ_tᵀ e x_t per token for the parameter kinds of the module docstring."""
        if kind == "linear":
            return ((g @ e) * x).sum(-1)
        if kind == "conv1d":  # weight stored (in, out): y = x W
            return ((x @ e) * g).sum(-1)
        if kind == "embedding":
            return (g * e[x.long()]).sum(-1)
        if kind == "layernorm":
            xh = torch.nn.functional.layer_norm(x, mod.normalized_shape, eps=mod.eps)
            return ((g * xh) @ e.reshape(-1))
        return g @ e.reshape(-1)  # bias

    @torch.no_grad()
    def evaluate(self, errors: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Add each error to its fine-tuned parameter, rerun the texts, restore. Returns ``kl`` (mean per output,
        nats; for a model without logits the relative output change ‖δh‖²/‖h‖²) and ``agreement``."""
        saved = {}
        try:
            for name, e in errors.items():
                pname = self.resolve(name)
                if pname is None or self.params[pname].shape != e.shape:
                    continue
                p = self.params[pname]
                saved[pname] = p.detach().clone()
                p.add_(e.to(p.dtype))
            kl = agree = num = den = 0.0
            for batch, ref in zip(self.batches, self.reference):
                z = self._run(batch)
                if self.has_logits:
                    kl += float(torch.nn.functional.kl_div(z.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                                           reduction="sum"))
                agree += float((z.argmax(-1) == ref.argmax(-1)).sum())
                num, den = num + float((z - ref).pow(2).sum()), den + float(ref.pow(2).sum())
        finally:
            for pname, v in saved.items():
                self.params[pname].copy_(v)
        return {"kl": kl / self.outputs if self.has_logits else num / max(den, 1e-30),
                "agreement": agree / self.outputs}
