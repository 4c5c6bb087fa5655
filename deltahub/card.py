"""Hugging Face model cards for artifacts (DESIGN §2.7), built with ``huggingface_hub.ModelCard``."""

from __future__ import annotations

import re
from typing import Any

from deltahub.manifest import Manifest

PAPERS = {
    "compeft": ("ComPEFT", "https://arxiv.org/abs/2311.13171"),
    "dare": ("DARE", "https://arxiv.org/abs/2311.03099"),
    "darex": ("DAREx", "https://arxiv.org/abs/2410.09344"),
    "bitdelta": ("BitDelta", "https://arxiv.org/abs/2402.10193"),
    "binary": ("1-bit adapters (Bi-LoRA)", "https://arxiv.org/abs/2309.04896"),
    "dense": ("lossless dense delta", None),
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def is_hub_repo_id(value: str | None) -> bool:
    """True for ``org/name`` strings (not paths) that the Hub accepts as ``base_model``."""
    return bool(value) and _REPO_ID.match(value or "") is not None and not value.startswith((".", "/"))


def card_data(manifest: Manifest, *, repo_id: str | None = None) -> dict[str, Any]:
    codec = manifest.stats.get("codec", "dense")
    data: dict[str, Any] = {"library_name": "deltahub", "tags": ["deltahub", codec, "task-delta"]}
    hub_base = manifest.base.location.get("repo")  # names are hints; only a recorded Hub location is claimed
    if is_hub_repo_id(hub_base):
        data["base_model"] = hub_base
    return data


def render_card(manifest: Manifest, *, repo_id: str | None = None) -> str:
    """The README.md of an artifact: YAML metadata, figures, and the exact pull / apply commands."""
    from huggingface_hub import ModelCard, ModelCardData

    s = manifest.stats
    codec = s.get("codec", "dense")
    paper, url = PAPERS.get(codec, (codec, None))
    ref = f"hf://{repo_id}" if repo_id else manifest.name
    codec_line = f"[{paper}]({url})" if url else paper
    ratio = s.get("ratio_vs_fp16")
    body = f"""
# {manifest.name}

A fine-tuned expert stored as a compressed task delta with [deltahub](https://pypi.org/project/deltahub/).

| | |
|---|---|
| codec | `{codec}` — {codec_line} |
| codec options | `{s.get('codec_params', {})}` |
| bits per parameter | {s.get('bits_per_param')} |
| ratio vs dense fp16 delta | {f'{ratio}×' if ratio else 'n/a'} |
| relative reconstruction error | {s.get('rel_error')} |
| tensors (matched / new / replaced / unchanged) | {s.get('matched')} / {s.get('new')} / {s.get('replaced')} / {s.get('unchanged')} |
| base | `{manifest.base.name}` |
| base fingerprint | `{manifest.base.fingerprint}` |
{_fidelity_row(s)}
## Use it

```bash
pip install deltahub
deltahub pull {ref}
deltahub apply {manifest.name} --base BASE_MODEL_DIR -o merged/
```

```python
import deltahub

art = deltahub.load("path/to/{manifest.name}")
merged = deltahub.apply(art, "BASE_MODEL_DIR", out="merged/")
```

The base is checked by fingerprint before anything is applied: a different base is refused.
"""
    card = ModelCard.from_template(ModelCardData(**card_data(manifest, repo_id=repo_id)), template_str="---\n{{ card_data }}\n---\n" + body)
    return str(card)


def _fidelity_row(stats: dict[str, Any]) -> str:
    fid = stats.get("fidelity")
    if not fid:
        return ""
    return "| fidelity | " + ", ".join(f"{k}: {v}" for k, v in fid.items()) + " |\n"
