"""Calibration activations for codecs whose ``fit`` needs them (``darex`` with ``q=auto``, ``bitdelta`` with
``distill=true``).

What it is. For every linear layer ℓ of the *fine-tuned* model, the inputs X_ℓ (tokens × in_features) the
layer sees when that model runs on a few calibration texts. A weight error E_ℓ (same layout as the weight,
(out, in)) changes the layer's outputs on those inputs by ‖X_ℓ E_ℓᵀ‖²_F = tr(E_ℓ G_ℓ E_ℓᵀ) with the Gram
matrix G_ℓ = X_ℓᵀ X_ℓ. The codecs only ever need inner products ⟨X Aᵀ, X Bᵀ⟩ = tr(A G Bᵀ) (:meth:`inner`),
so each layer keeps whichever is smaller: the rows X (tokens ≤ in) or G (:meth:`products`).

Where it comes from (DESIGN §2.3). ``--calibration FILE`` is a JSONL file: one text per line, as a JSON
string or an object with a ``"text"`` field (blank lines skipped; the first ``max_texts`` used). The texts are
tokenized with the model folder's tokenizer (truncated to ``max_length`` tokens) and run one at a time
(batch 1: no padding rows among the activations) through the fine-tuned model, loaded with transformers
as the class named in its ``config.json`` (``architectures[0]``, else ``AutoModel``) in fp32. Inputs are
captured with forward pre-hooks on ``nn.Linear`` modules and on transformers' ``Conv1D`` (GPT-2 style,
weight stored (in, out)). Codecs that need a forward pass therefore need model folders (config.json +
tokenizer + safetensors), not bare tensor files::

    cal = Calibration.from_jsonl("calib.jsonl", "models/my-finetune")
    deltahub.compress("models/my-finetune", base="models/base", codec="darex", q="auto", calibration=cal)

Tensor names are matched to module names by dropping ``.weight``; when a checkpoint and the loaded model
disagree on a prefix (``bert.`` of a classifier checkpoint vs a bare encoder), the unique longest
dot-boundary suffix match is used. Biases, norms, embeddings and unmatched tensors have no activations.
Memory: for a 7B model keep texts few and short (rows ≤ in_features are stored as rows).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from deltahub.errors import CodecConfigError


def read_texts(path: str | os.PathLike[str], max_texts: int = 32) -> list[str]:
    """The first ``max_texts`` texts of a calibration JSONL file.

    Raises:
        CodecConfigError: the file is missing, a line is not JSON, or it holds no text.
    """
    p = Path(path)
    if not p.is_file():
        raise CodecConfigError(f"Calibration file {p} does not exist: give a JSONL file of texts.")
    texts: list[str] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise CodecConfigError(f"{p}:{lineno} is not JSON: write one JSON string or "
                                       '{"text": ...} object per line.') from None
            text = item.get("text") if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise CodecConfigError(f'{p}:{lineno} has no text: write a JSON string or {{"text": "..."}}.')
            if text.strip():
                texts.append(text)
            if len(texts) >= max_texts:
                break
    if not texts:
        raise CodecConfigError(f"Calibration file {p} holds no texts.")
    return texts


class Calibration:
    """Per-layer input activations of the fine-tuned model (see the module docstring).

    Args:
        acts: module name -> its inputs X, (tokens, in_features) (any leading dims are flattened).
        transposed: module names whose weight is stored (in, out) (transformers ``Conv1D``).
    """

    def __init__(self, acts: Mapping[str, torch.Tensor] | None = None, transposed: Iterable[str] = ()):
        self._rows: dict[str, torch.Tensor] = {}
        self._gram: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, int] = {}
        self.transposed = set(transposed)
        self.model: torch.nn.Module | None = None  # kept by from_model for ``sensitivity`` (``auto``)
        self.batches: list[Mapping[str, torch.Tensor]] = []
        self._sensitivity: Any = None
        for name, x in (acts or {}).items():
            self.add(name, x)

    # ----------------------------------------------------------------------------------------- build
    def add(self, module: str, x: torch.Tensor) -> None:
        """Append input rows for ``module`` (switches to the Gram matrix once rows outnumber features)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64, copy=True)
        self._tokens[module] = self._tokens.get(module, 0) + x.shape[0]
        if module in self._gram:
            self._gram[module] += x.T @ x
            return
        rows = torch.cat([self._rows[module], x]) if module in self._rows else x
        if rows.shape[0] > rows.shape[1]:
            self._rows.pop(module, None)
            self._gram[module] = rows.T @ rows
        else:
            self._rows[module] = rows

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: torch.nn.Module, inputs: Iterable[Mapping[str, torch.Tensor]]) -> Calibration:
        """Run ``model(**batch)`` for each batch and record every Linear/Conv1D input (use batch 1)."""
        cal = cls()
        hooks = []
        for mname, mod in model.named_modules():
            is_conv1d = type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None
            if isinstance(mod, torch.nn.Linear) or is_conv1d:
                if is_conv1d:
                    cal.transposed.add(mname)
                hooks.append(mod.register_forward_pre_hook(lambda m, args, n=mname: cal.add(n, args[0])))
        cal.model, cal.batches = model, list(inputs)
        try:
            model.eval()
            for batch in cal.batches:
                model(**batch)
        finally:
            for h in hooks:
                h.remove()
        return cal

    def sensitivity(self) -> Any:
        """The model's Fisher sensitivity and end-to-end check on these texts (:mod:`deltahub.sensitivity`),
        built once on first use (one backward pass per text).

        Raises:
            CodecConfigError: the calibration was built from activations alone, without a model.
        """
        if self._sensitivity is None:
            if self.model is None or not self.batches:
                raise CodecConfigError("This calibration holds activations but no model: build it with "
                                       "Calibration.from_jsonl or Calibration.from_model.")
            from deltahub.sensitivity import Sensitivity

            with torch.enable_grad():
                self._sensitivity = Sensitivity(self.model, self.batches)
        return self._sensitivity

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike[str], model_dir: str | os.PathLike[str], *,
                   tokenizer_dir: str | os.PathLike[str] | None = None, max_texts: int = 32,
                   max_length: int = 128) -> Calibration:
        """Activations of the fine-tuned model folder ``model_dir`` on the texts of a JSONL file.

        Raises:
            CodecConfigError: no texts, not a model folder, or transformers is missing.
        """
        texts = read_texts(path, max_texts)
        folder = Path(model_dir)
        if not (folder / "config.json").is_file():
            raise CodecConfigError(f"Calibration needs the fine-tuned model as a folder with config.json and a "
                                   f"tokenizer; {folder} is not one.")
        try:
            import transformers
        except ImportError:
            raise CodecConfigError("Calibration needs transformers: pip install 'deltahub[demo]'.") from None
        cfg = transformers.AutoConfig.from_pretrained(str(folder))
        arch = (getattr(cfg, "architectures", None) or [None])[0]
        model_cls = getattr(transformers, arch, None) if arch else None
        model = (model_cls or transformers.AutoModel).from_pretrained(str(folder)).float()
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir or folder))
        except (OSError, ValueError) as exc:
            raise CodecConfigError(f"No tokenizer in {tokenizer_dir or folder} ({type(exc).__name__}); "
                                   "save it with the model or pass the base model's folder.") from None
        batches = (dict(tok(t, return_tensors="pt", truncation=True, max_length=max_length)) for t in texts)
        return cls.from_model(model, batches)

    # ----------------------------------------------------------------------------------------- query
    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def modules(self) -> list[str]:
        return sorted(self._tokens)

    def tokens(self, module: str) -> int:
        return self._tokens.get(module, 0)

    def resolve(self, tensor_name: str) -> str | None:
        """The module holding activations for weight ``tensor_name`` (exact, else unique suffix match)."""
        if not tensor_name.endswith(".weight"):
            return None
        mod = tensor_name[: -len(".weight")]
        if mod in self._tokens:
            return mod
        hits = [k for k in self._tokens if k.endswith("." + mod) or mod.endswith("." + k)]
        if not hits:
            return None
        best = max(len(k) for k in hits)
        hits = [k for k in hits if len(k) == best]
        return hits[0] if len(hits) == 1 else None

    def products(self, tensor_name: str, *mats: torch.Tensor) -> torch.Tensor | None:
        """P[i, j] = ⟨X M_iᵀ, X M_jᵀ⟩ = tr(M_i G M_jᵀ) (fp64, k × k) for tensors shaped like weight
        ``tensor_name``; one matmul per tensor. None without activations, or when the shapes do not fit
        the recorded in_features (not a linear weight).
        """
        mod = self.resolve(tensor_name)
        if mod is None or not mats or any(m.dim() != 2 or m.shape != mats[0].shape for m in mats):
            return None
        ms = [(m.T if mod in self.transposed else m).to(torch.float64) for m in mats]
        if mod in self._gram:
            g = self._gram[mod]
            if g.shape[0] != ms[0].shape[1]:
                return None
            left, right = [m @ g for m in ms], ms  # tr(M_i G M_jᵀ) = Σ (M_i G) ⊙ M_j
        else:
            x = self._rows[mod]
            if x.shape[1] != ms[0].shape[1]:
                return None
            left = right = [x @ m.T for m in ms]  # the layer's output changes X M_iᵀ
        k = len(ms)
        return torch.tensor([[float((left[i] * right[j]).sum()) for j in range(k)] for i in range(k)],
                            dtype=torch.float64)

    def inner(self, tensor_name: str, a: torch.Tensor, b: torch.Tensor) -> float | None:
        """⟨X Aᵀ, X Bᵀ⟩ = tr(A G Bᵀ); None as for :meth:`products`."""
        p = self.products(tensor_name, a, b)
        return None if p is None else float(p[0, 1])


def require(calibration: Any, codec: str, option: str) -> Calibration:
    """``calibration`` as a :class:`Calibration`, or a CodecConfigError saying how to provide it."""
    if isinstance(calibration, Calibration) and len(calibration):
        return calibration
    if calibration is None:
        raise CodecConfigError(f"Codec '{codec}' with {option} needs calibration inputs: pass --calibration FILE "
                               "(a JSONL file of texts) with a fine-tuned model folder, or drop that option.")
    raise CodecConfigError(f"Codec '{codec}' with {option} needs a deltahub.calibration.Calibration with "
                           f"activations, got {type(calibration).__name__}.")
