"""Hugging Face model cards for artifacts (DESIGN §2.7), built with ``huggingface_hub.ModelCard``.

:func:`render_card` writes the README.md of an artifact: YAML metadata (``library_name: deltahub``, tags with
the codec, ``base_model`` only when the base's recorded location is a Hub repo, and a ``deltahub:`` block with
the figures for tools), then the figures, the base fingerprint and the exact pull / apply commands.

:func:`check_card` checks a card locally (``ModelCard.validate`` calls the Hub, so it is never used): the card
parses, its YAML metadata round-trips, the required keys are there, and ``base_model`` is a Hub repo id.
"""

from __future__ import annotations

import math
import re
from typing import Any

from deltahub.manifest import Manifest

# The built-in codecs' pretty_name and reference_url, so a card renders without importing them (and torch):
# push and pull write cards and stay torch-free. tests/test_card.py pins this table to the classes.
PAPERS = {
    "compeft": ("ComPEFT (sparse ternary)", "https://arxiv.org/abs/2311.13171"),
    "dare": ("DARE (drop and rescale)", "https://arxiv.org/abs/2311.03099"),
    "darex": ("DAREx-q (drop, tuned rescale)", "https://arxiv.org/abs/2410.09344"),
    "bitdelta": ("BitDelta (sign bit + per-matrix scale)", "https://arxiv.org/abs/2402.10193"),
    "binary": ("1-bit adapters (b-bit Gaussian codebook)", "https://arxiv.org/abs/2307.16867"),
    "dense": ("Dense (lossless)", None),
    "auto": ("auto (per-tensor codec choice)", None),
}
LIBRARY_NAME = "deltahub"
REQUIRED_KEYS = ("library_name", "tags", "deltahub")
REQUIRED_DELTAHUB_KEYS = ("id", "name", "kind", "codec", "bits_per_param", "ratio_vs_fp16", "rel_error", "base_fingerprint")
RELATIONS = ("adapter", "merge", "quantized", "finetune")
def codec_reference(name: str) -> tuple[str, str | None]:
    """(display name, paper URL) of a codec: built-ins from the table, others from their installed plugin.

    A built-in's name cannot be taken by a plugin (discovery reports such a plugin as shadowed).
    """
    if name in PAPERS:
        return PAPERS[name]
    try:
        from deltahub.codecs import get_codec

        cls = get_codec(name)
        return getattr(cls, "pretty_name", "") or name, getattr(cls, "reference_url", None)
    except Exception:  # noqa: BLE001 - a card of an artifact whose codec is not installed still renders
        return name, None


def codecs_used(manifest: Manifest) -> dict[str, int]:
    """Tensors per codec actually used (what ``auto`` chose counts as the chosen codec), most used first."""
    counts: dict[str, int] = {}
    for t in manifest.tensors:
        name = t.meta.get("auto.codec") or t.codec
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def is_hub_repo_id(value: Any) -> bool:
    """True for ``org/name`` strings (not paths, not URLs) that the Hub accepts as ``base_model``."""
    return (isinstance(value, str) and _REPO_ID.match(value) is not None and ".." not in value
            and not value.endswith((".", "-")))


def hub_base(manifest: Manifest) -> str | None:
    """The base's Hub repo id, only when its recorded location is ``{"type": "hub", "repo": ...}``.

    Base names are hints (a local folder may be called ``org/name``), so nothing else is claimed as ``base_model``.
    """
    loc = manifest.base.location
    repo = loc.get("repo")
    return repo if loc.get("type") == "hub" and is_hub_repo_id(repo) else None


def _num(value: Any) -> float | int | None:
    """A finite number for YAML (None for anything else: the card must round-trip)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _scalar(value: Any) -> Any:
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, (int, float)):
        return _num(value)
    return str(value)


def _fidelity(stats: dict[str, Any]) -> dict[str, Any] | None:
    """``stats["fidelity"]`` flattened to ``{metric: number-or-text}`` (nested dicts become ``a.b`` keys)."""
    fid = stats.get("fidelity")
    if fid is None or fid == {}:
        return None
    if not isinstance(fid, dict):
        return {"value": _scalar(fid)}
    flat: dict[str, Any] = {}

    def walk(prefix: str, d: dict[str, Any]) -> None:
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(key + ".", v)
            else:
                flat[key] = _scalar(v)

    walk("", fid)
    return flat


def card_data(manifest: Manifest, *, repo_id: str | None = None) -> dict[str, Any]:
    """The YAML metadata of the card, as a plain dict (the keyword arguments of ``ModelCardData``)."""
    s = manifest.stats
    codec = str(s.get("codec") or "dense")
    chosen = [c for c in codecs_used(manifest) if c != "dense"]  # e.g. what `auto` picked; dense biases are no news
    tags = ["deltahub", codec, *chosen, "task-delta" if manifest.kind == "delta" else manifest.kind]
    data: dict[str, Any] = {"library_name": LIBRARY_NAME, "tags": list(dict.fromkeys(tags))}
    if (base := hub_base(manifest)) is not None:
        data["base_model"] = base
        # No "delta" relation exists on the Hub; a full-model delta describes a fine-tune of the base.
        data["base_model_relation"] = "finetune" if manifest.kind == "delta" else "adapter"
    meta: dict[str, Any] = {
        "id": manifest.id, "name": manifest.name, "kind": manifest.kind, "format_version": manifest.format_version,
        "codec": codec, "bits_per_param": _num(s.get("bits_per_param")), "ratio_vs_fp16": _num(s.get("ratio_vs_fp16")),
        "rel_error": _num(s.get("rel_error")), "base_fingerprint": manifest.base.fingerprint,
    }
    if manifest.adapter is not None:
        peft = manifest.adapter.config.get("peft_config", {})
        meta["adapter"] = {"kind": manifest.adapter.kind, "targets": _num(s.get("targets")),
                           "ranks": [int(r) for r in s.get("ranks") or []], "lora_alpha": _num(peft.get("lora_alpha")),
                           "ratio_vs_fp16_delta": _num(s.get("ratio_vs_fp16_delta"))}
    if (fid := _fidelity(s)) is not None:
        meta["fidelity"] = fid
    if repo_id:
        meta["repo"] = repo_id
    data["deltahub"] = meta
    return data


def _fmt(value: Any, spec: str = ".4g", suffix: str = "") -> str:
    n = _num(value)
    return "n/a" if n is None else f"{n:{spec}}{suffix}"


def _shell_quote(value: str) -> str:
    return value if re.fullmatch(r"[\w./:@=+-]+", value) else "'" + value.replace("'", "'\\''") + "'"


def render_card(manifest: Manifest, *, repo_id: str | None = None, revision: str | None = None) -> str:
    """The README.md of an artifact: YAML metadata, figures, and the exact pull / apply commands.

    Args:
        manifest: the artifact's manifest (its figures and base go into the card).
        repo_id: the Hub repo the artifact lives in (``org/name``); without it the commands use the local folder.
        revision: a branch or commit to pin in the pull command (default: the repo's main branch).
    """
    from huggingface_hub import ModelCard, ModelCardData

    s = manifest.stats
    data = card_data(manifest, repo_id=repo_id)
    meta = data["deltahub"]
    codec = meta["codec"]
    paper, url = codec_reference(codec)
    codec_line = f"[{paper}]({url})" if url else paper
    used = []
    for name, n in codecs_used(manifest).items():
        pretty, link = codec_reference(name)
        used.append(f"`{name}` ×{n}" + (f" ([paper]({link}))" if link else ""))
    used_line = ", ".join(used) or "none"
    name = manifest.name
    base = hub_base(manifest)
    base_rev = manifest.base.location.get("revision") if base else None
    if base:
        base_desc = f"[`{base}`](/{base})" + (f" @ `{base_rev}`" if base_rev else "")
    else:
        base_desc = f"`{manifest.base.name or 'unnamed'}`"
    fidelity = meta.get("fidelity")
    fid_row = ""
    if fidelity:
        shown = (f"{k}: {_fmt(v) if _num(v) is not None else v}" for k, v in fidelity.items())
        fid_row = "| fidelity | " + ", ".join(shown) + " |\n"
    options = ", ".join(f"{k}={v}" for k, v in sorted((s.get("codec_params") or {}).items())) or "defaults"
    counts = " / ".join(str(s.get(k, "n/a")) for k in ("matched", "new", "replaced", "unchanged"))

    base_dir = "BASE_MODEL_DIR"
    if base:
        get_base = (f"hf download {base}" + (f" --revision {_shell_quote(base_rev)}" if base_rev else "")
                    + f" --local-dir {base_dir}\n")
    else:
        get_base = f"# {base_dir}: the base model this delta was made from ({manifest.base.name or 'see its fingerprint'})\n"
    if repo_id:
        url_ref = f"hf://{repo_id}" + (f"@{revision}" if revision else "")
        fetch = f"deltahub pull {_shell_quote(url_ref)}\n"
        target = name
        py_open = (f'from deltahub import Registry\n\n'
                   f'art = Registry().pull("{url_ref}")  # downloads, verifies every sha256, stores locally')
    else:
        fetch = ""
        target = f"./{name}"
        py_open = f'\nart = deltahub.load("{name}")  # verifies every file\'s size and sha256'

    intro, adapter_rows, export_cmd = _adapter_parts(manifest, target)
    body = f"""
# {name}

{intro}

| | |
|---|---|
| codec | `{codec}` — {codec_line} |
| tensors per codec | {used_line} |
| codec options | `{options}` |
| bits per {'adapter ' if manifest.adapter else ''}parameter | {_fmt(s.get('bits_per_param'))} |
| ratio vs dense fp16 {'factors' if manifest.adapter else 'delta'} | {_fmt(s.get('ratio_vs_fp16'), suffix='×')} |
| relative reconstruction error | {_fmt(s.get('rel_error'))} |
{adapter_rows}{fid_row}| tensors (matched / new / replaced / unchanged) | {counts} |
| base | {base_desc} |
| base fingerprint | `{manifest.base.fingerprint}` |
| artifact id | `{manifest.id}` |

## Use it

```bash
pip install deltahub
{fetch}{get_base}deltahub apply {_shell_quote(target)} --base {base_dir} -o merged/
{export_cmd}```

```python
import deltahub
{py_open}
deltahub.apply(art, "{base_dir}", out="merged/")  # refuses a base with another fingerprint
```

The base is checked by its fingerprint before anything is applied: a different base is refused.
Every payload's size and sha256 are listed in `deltahub.json` and checked before it is parsed.
{_recipe_section(manifest)}"""
    # Not ModelCard.from_template: that renders the body with jinja2, and names must never be template code.
    return str(ModelCard("---\n" + ModelCardData(**data).to_yaml() + "\n---\n" + body))


def _md_safe(text: str) -> str:
    """Text for a table cell or inline code: no pipes, backticks or line breaks from a hostile name."""
    return text.replace("|", "/").replace("`", "'").replace("\n", " ").replace("\r", " ")[:200]


def _recipe_section(manifest: Manifest) -> str:
    """How a merged artifact was made (``deltahub merge``), from the recipe its manifest records."""
    r = manifest.provenance.get("merge")
    if not isinstance(r, dict):
        return ""
    rows = "".join(f"| `{_md_safe(str(n))}` | `{str(i)[:16]}` | {w} |\n"
                   for n, i, w in zip(r.get("input_names", []), r.get("inputs", []), r.get("weights", [])))
    opts = ", ".join(f"{k}={r[k]}" for k in ("density", "majority_sign_method", "seed") if k in r) or "none"
    return (f"\n## Recipe\n\nMerged by `deltahub merge` with method `{_md_safe(str(r.get('method')))}` "
            f"(options: {_md_safe(opts)}) from:\n\n| expert | artifact id | weight |\n|---|---|---|\n{rows}\n"
            "`deltahub merge --recipe deltahub.json -o OUT` makes it again, byte for byte, from those experts.\n")


def _adapter_parts(manifest: Manifest, target: str) -> tuple[str, str, str]:
    """(intro sentence, extra table rows, export command) of the card: adapters get their own."""
    if manifest.adapter is None:
        return ("A fine-tuned model stored as a compressed task delta against its base with\n"
                "[deltahub](https://pypi.org/project/deltahub/): `base + delta` rebuilds the fine-tuned weights.",
                "", "")
    s, ad = manifest.stats, manifest.adapter
    peft = ad.config.get("peft_config", {})
    intro = (f"A `{ad.kind}` adapter stored with [deltahub](https://pypi.org/project/deltahub/), bound to its base "
             "by fingerprint: merge it into the base, serve it beside the base, or export it back to PEFT.")
    rows = (f"| adapter | `{ad.kind}` v{ad.version}: {s.get('targets', 'n/a')} target weights, ranks "
            f"{s.get('ranks')}, alpha {peft.get('lora_alpha', 'n/a')}{', rsLoRA' if peft.get('use_rslora') else ''} |\n"
            f"| target modules | `{peft.get('target_modules')}` |\n"
            f"| size vs the dense fp16 weight delta | {_fmt(s.get('ratio_vs_fp16_delta'), suffix='× smaller')} |\n")
    export = f"deltahub export {_shell_quote(target)} --format peft -o peft-adapter/   # PeftModel.from_pretrained\n"
    return intro, rows, export


def check_card(text: str) -> list[str]:
    """Local checks of a deltahub model card; returns the problems found (empty: the card is fine).

    The card parses with ``huggingface_hub.ModelCard``, its YAML metadata round-trips through ``ModelCardData``
    (to YAML and back, unchanged), ``library_name`` is ``deltahub``, the tags include ``deltahub`` and the codec,
    the ``deltahub`` block has its figures, and ``base_model`` (when present) is a Hub repo id. Never calls the Hub.
    """
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    problems: list[str] = []
    if not text.lstrip().startswith("---"):
        return ["the card has no YAML metadata block (it must start with '---')"]
    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except Exception as exc:  # yaml errors, "metadata block should be a dict", ...
        return [f"the card does not parse with huggingface_hub.ModelCard: {type(exc).__name__}: {exc}".splitlines()[0]]
    data = card.data.to_dict()
    if not data:
        return ["the card's YAML metadata block is empty or missing"]
    try:
        again = ModelCardData(**yaml.safe_load(card.data.to_yaml())).to_dict()
    except Exception as exc:
        problems.append(f"the YAML metadata does not round-trip: {type(exc).__name__}: {exc}".splitlines()[0])
    else:
        if again != data:
            problems.append("the YAML metadata changes when written and read again (ModelCardData -> to_yaml -> parse)")
    match = re.match(r"^\s*---\s*\n(.*?)\n---\s*\n", text, re.DOTALL)
    raw = yaml.safe_load(match.group(1)) if match else None
    if raw != data:
        problems.append("the YAML block of the card differs from what ModelCard parsed")
    for key in REQUIRED_KEYS:
        if key not in data:
            problems.append(f"required metadata key {key!r} is missing")
    if "library_name" in data and data["library_name"] != LIBRARY_NAME:
        problems.append(f"library_name is {data['library_name']!r}, expected {LIBRARY_NAME!r}")
    tags = data.get("tags")
    meta = data.get("deltahub")
    if "tags" in data and (not isinstance(tags, list) or "deltahub" not in tags):
        problems.append("tags must be a list that includes 'deltahub'")
    if "deltahub" in data:
        if not isinstance(meta, dict):
            problems.append("the 'deltahub' metadata must be a mapping")
        else:
            for key in REQUIRED_DELTAHUB_KEYS:
                if key not in meta:
                    problems.append(f"required metadata key 'deltahub.{key}' is missing")
            if isinstance(tags, list) and meta.get("codec") and meta["codec"] not in tags:
                problems.append(f"tags must include the codec {meta['codec']!r}")
            for key in ("id", "base_fingerprint"):
                if key in meta and not (isinstance(meta[key], str) and re.fullmatch(r"[0-9a-f]{64}", meta[key])):
                    problems.append(f"deltahub.{key} must be a sha256 hex digest")
    if "base_model" in data:
        bases = data["base_model"] if isinstance(data["base_model"], list) else [data["base_model"]]
        for b in bases:
            if not is_hub_repo_id(b):
                problems.append(f"base_model {b!r} is not a Hub repo id (org/name); leave it out for local bases")
    if "base_model_relation" in data:
        if "base_model" not in data:
            problems.append("base_model_relation is set without base_model")
        if data["base_model_relation"] not in RELATIONS:
            problems.append(f"base_model_relation must be one of {', '.join(RELATIONS)}")
    return problems
