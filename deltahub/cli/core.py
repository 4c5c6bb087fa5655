"""Core CLI verbs: codecs, compress, inspect, apply, card."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from deltahub.errors import BaseNotFoundError, CodecConfigError


def open_artifact(ref: str) -> Any:
    """An artifact folder path, or a registry ref (``name[:tag]``, an id, or a remote URL)."""
    from deltahub.artifact import Artifact
    from deltahub.manifest import MANIFEST_NAME

    if "://" not in ref and (Path(ref).exists() or "/" in ref or (Path(ref) / MANIFEST_NAME).is_file()):
        return Artifact.load(ref)  # a path; names and remote URLs go to the registry
    from deltahub.registry import Registry

    if "://" in ref:
        return Registry().pull(ref)
    return Registry().resolve(ref)


def _split_name(value: str | None) -> tuple[str | None, str | None]:
    if not value:
        return None, None
    name, _, tag = value.partition(":")
    return name, tag or None


# ------------------------------------------------------------------------------------------- codecs
@click.command()
@click.argument("name", required=False)
def codecs(name: str | None) -> None:
    """List installed codecs and adapter kinds, or show the options of codec NAME.

    \b
    Examples:
      deltahub codecs
      deltahub codecs compeft
      deltahub codecs lora
    """
    from deltahub.codecs import discover_codecs, get_codec

    from deltahub.adapter import available_adapters, discover_adapters, get_adapter

    if name and name in available_adapters() and name not in _codec_names():
        kind = get_adapter(name)
        click.echo(f"{kind.name} v{kind.version}: {kind.pretty_name} (adapter kind)")
        if kind.reference_url:
            click.echo(f"paper: {kind.reference_url}")
        return
    if name:
        codec = get_codec(name)
        click.echo(f"{codec.name} v{codec.version}: {codec.pretty_name}")
        if codec.reference_url:
            click.echo(f"paper: {codec.reference_url}")
        click.echo("options (-p KEY=VALUE):")
        for field, info in codec.Config.model_fields.items():
            default = info.default
            click.echo(f"  {field:<18} default {default!r:<10} {info.description or ''}")
        return
    rows = [("NAME", "KIND", "VERSION", "DISTRIBUTION", "STATUS")]
    for kind, infos in (("codec", discover_codecs()), ("adapter", discover_adapters())):
        for info in sorted(infos, key=lambda i: i.name):
            rows.append((info.name, kind, str(info.version or "-"), info.distribution,
                         "ok" if info.error is None else f"broken: {info.error}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])


def _codec_names() -> list[str]:
    from deltahub.codecs import available_codecs

    return available_codecs()


# ------------------------------------------------------------------------------------------- compress
@click.command()
@click.argument("src")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Output artifact folder.")
@click.option("--base", help="Base model folder or .safetensors file (needed unless SRC is an artifact, or an "
                             "adapter whose config names a local or registered base).")
@click.option("--codec", default=None, help="Codec name; see `deltahub codecs` (default: compeft; dense for adapters).")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="Codec option; repeatable.")
@click.option("--name", help="Artifact name[:tag] (default: the output folder's name, tag latest).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSONL file of texts for codecs that calibrate (darex q=auto, bitdelta distill=true, auto).")
@click.option("--fallback-dtype", type=click.Choice(["float16", "bfloat16", "exact"]), default=None,
              help="Storage of the deltas a lossy codec leaves to dense (biases, norms) [default: float16; exact "
                   "for dense].")
def compress(src: str, out: Path, base: str | None, codec: str | None, params: tuple[str, ...], name: str | None,
             calibration: Path | None, fallback_dtype: str | None) -> None:
    """Compress a fine-tuned checkpoint or a PEFT LoRA folder SRC against --base (or re-encode an artifact SRC).

    \b
    Examples:
      deltahub compress ./finetuned --base ./base --codec compeft -p density=0.1 -o ./expert
      deltahub compress ./finetuned --base ./base --codec dense -o ./expert-lossless
      deltahub compress ./expert-lossless --codec compeft -p density=0.05 -o ./expert-small
      deltahub compress ./my-lora --base ./base -o ./lora-expert              # a PEFT adapter folder
      deltahub compress ./my-lora --base ./base --codec binary -o ./lora-1bit  # its factors at 1 bit
    """
    import deltahub
    from deltahub.codecs import get_codec

    adapter = (Path(src) / "adapter_config.json").is_file()
    codec = codec or ("dense" if adapter else "compeft")
    if adapter and base is None:
        base = _adapter_base(Path(src))
    codec_obj = get_codec(codec)
    config = codec_obj.parse_config(params)  # validate before any heavy work
    art_name, tag = _split_name(name)
    calib = _load_calibration(calibration, src) if calibration else None
    provenance = {"source": str(Path(src).resolve()) if Path(src).exists() else src,
                  "command": "deltahub " + " ".join(sys.argv[1:]) if sys.argv else ""}
    if tag:
        provenance["tag"] = tag
    art = deltahub.compress(src, base=base, codec=codec, out=out, name=art_name, calibration=calib,
                            provenance=provenance, fallback_dtype=fallback_dtype,
                            **config.model_dump(exclude_unset=True))
    _print_summary(art)


def _adapter_base(folder: Path) -> str | None:
    """The base a PEFT folder names, when it is a local folder or a registered base; else None (core says why)."""
    try:
        hint = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if not hint or Path(hint).expanduser().exists():
        return None
    from deltahub.registry import Registry

    found = Registry().find_base_named(hint)
    return str(found) if found is not None else None


def _load_calibration(path: Path, src: str) -> Any:
    try:
        from deltahub.calibration import Calibration
    except ImportError:
        raise CodecConfigError("This deltahub has no calibration support; drop --calibration.") from None
    return Calibration.from_jsonl(path, model_dir=src)


def _print_summary(art: Any) -> None:
    s = art.manifest.stats
    if art.manifest.adapter is not None:
        click.echo(f"{art.name}  id {art.id[:12]}  {s.get('adapter')} adapter, {s.get('targets')} targets, ranks "
                   f"{s.get('ranks')}  codec {s.get('codec')}  {s.get('payload_bytes', 0) / 1e6:.3f} MB  "
                   f"rel. error of ΔW {s.get('rel_error'):.4f}  -> {art.folder}")
        return
    click.echo(f"{art.name}  id {art.id[:12]}  codec {s.get('codec')}  "
               f"{s.get('bits_per_param'):.4f} bits/param  {s.get('ratio_vs_fp16')}x vs fp16  "
               f"rel. error {s.get('rel_error'):.4f}")
    click.echo(f"tensors: {s.get('matched')} matched ({s.get('unchanged')} unchanged), {s.get('new')} new, "
               f"{s.get('replaced')} replaced, {s.get('kept_from_base')} kept from base  -> {art.folder}")


# ------------------------------------------------------------------------------------------- inspect
@click.command()
@click.argument("artifact")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest stats as JSON for scripts.")
def inspect(artifact: str, as_json: bool) -> None:
    """Show codec, bits per parameter, ratio, error, base fingerprint and tensors of ARTIFACT.

    \b
    Examples:
      deltahub inspect ./expert
      deltahub inspect expert:latest --json | jq .stats.bits_per_param
    """
    from deltahub.artifact import describe

    art = open_artifact(artifact)
    info = describe(art.manifest)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    s, b = info["stats"], info["base"]
    click.echo(f"name          {info['name']}\nid            {info['id']}\nformat        v{info['format_version']}")
    click.echo(f"codec         {s.get('codec')} {s.get('codec_params')}")
    if art.manifest.adapter is not None:
        click.echo(f"size          {s.get('payload_bytes', 0) / 1e6:.3f} MB for {s.get('params')} adapter params "
                   f"({s.get('bits_per_param'):.4f} bits each): {s.get('ratio_vs_fp16_delta')}x smaller than the "
                   f"dense fp16 ΔW of its {s.get('delta_params')} weights")
    else:
        click.echo(f"size          {s.get('payload_bytes', 0) / 1e6:.3f} MB delta for {s.get('params')} params: "
                   f"{s.get('bits_per_param'):.4f} bits/param, {s.get('ratio_vs_fp16')}x vs dense fp16")
    click.echo(f"rel. error    {s.get('rel_error')}")
    if "choice" in (fit := info.get("fit_stats") or {}):  # auto: what it aimed at and what it measured
        target = ", ".join(f"{k}={v}" for k, v in (fit.get("target") or {}).items())
        click.echo(f"auto          {target}, objective {fit.get('objective')}, {fit.get('candidates')} candidates")
        if isinstance(m := fit.get("measured"), dict):
            click.echo(f"measured      KL {m['kl']:.4g} nats, agreement {m['agreement']:.4f} on "
                       f"{fit.get('calibration_outputs')} calibration outputs"
                       f"{'' if fit.get('met', True) else '  (target NOT met: the most faithful choice)'}")
    if (disk := _disk_bytes(art)) is not None:
        click.echo(f"on disk       {disk / 1e6:.3f} MB (payload, manifest, card): "
                   f"{8 * disk / max(s.get('params') or 1, 1):.4f} bits/param")
    click.echo(f"tensors       {s.get('matched')} matched ({s.get('unchanged')} unchanged), {s.get('new')} new, "
               f"{s.get('replaced')} replaced, {s.get('kept_from_base')} kept from base")
    if art.manifest.adapter is not None:
        _inspect_adapter(art)
    click.echo(f"base          {b['name']}  fingerprint {b['fingerprint'][:16]}  ({b['tensors']} tensors)")
    if b["location"]:
        click.echo(f"base location {b['location']}")
    click.echo("")
    click.echo(f"{'tensor':<60} {'op':<8} {'codec':<9} {'shape':<16} {'bytes':>10} {'rel.err':>8}")
    for t in info["tensors"]:
        err = "" if t["rel_error"] is None else f"{t['rel_error']:.4f}"
        codec = t["codec"]
        if "auto.codec" in t["meta"]:  # show what `auto` chose, with its settings
            codec = f"auto:{t['meta']['auto.codec']} {t['meta'].get('auto.params', '')}"
        click.echo(f"{t['name'][:60]:<60} {t['op']:<8} {codec:<9} {str(t['shape']):<16} {t['stored_bytes']:>10} {err:>8}")


def _disk_bytes(art: Any) -> int | None:
    """Bytes of the artifact folder's files (None for an artifact not held as a folder)."""
    folder = getattr(art, "folder", None)
    if folder is None or not Path(folder).is_dir():
        return None
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _inspect_adapter(art: Any) -> None:
    cfg, s = art.manifest.adapter.config, art.manifest.stats
    modules = cfg.get("modules", {})
    peft = cfg.get("peft_config", {})
    if not peft:  # a native kind (mos, flora, compacter): its own options
        opts = ", ".join(f"{k}={v}" for k, v in sorted(cfg.items()) if k not in ("modules", "types"))
        ranks = f", ranks {s['ranks']}" if s.get("ranks") else ""
        click.echo(f"adapter       {art.manifest.adapter.kind} v{art.manifest.adapter.version}: {len(modules)} target "
                   f"modules{ranks}"
                   f"{f'; {opts}' if opts else ''}")
        return
    click.echo(f"adapter       {art.manifest.adapter.kind} v{art.manifest.adapter.version}: {len(modules)} target "
               f"modules, ranks {s.get('ranks')}, alpha {peft.get('lora_alpha')}"
               f"{', rsLoRA' if peft.get('use_rslora') else ''}; target_modules {peft.get('target_modules')}")
    click.echo(f"              modules_to_save {peft.get('modules_to_save')}")


# ------------------------------------------------------------------------------------------- apply
@click.command()
@click.argument("artifact")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Output model folder.")
@click.option("--base", help="Base model folder or file (default: the registered base with a matching fingerprint).")
@click.option("--alpha", default=1.0, show_default=True, type=float, help="Scale of the delta.")
def apply(artifact: str, out: Path, base: str | None, alpha: float) -> None:
    """Write base + alpha * delta of ARTIFACT as a merged model in the base's layout and dtype.

    \b
    Examples:
      deltahub apply ./expert --base ./base -o ./merged
      deltahub apply expert -o ./merged          # base found by fingerprint in the registry
    """
    import deltahub

    art = open_artifact(artifact)
    if base is None:
        base = _find_base(art)
    result = deltahub.apply(art, base, alpha=alpha, out=out)
    click.echo(f"merged {art.name} (alpha={alpha}) into {base} -> {result}")


def _find_base(art: Any) -> str:
    from deltahub.registry import Registry

    found = Registry().find_base(art.manifest.base)
    if found is None:
        hint = art.manifest.base.location.get("path") or art.manifest.base.name or "?"
        raise BaseNotFoundError(
            f"No registered base matches {art.name!r} (fingerprint {art.manifest.base.fingerprint[:12]}, "
            f"made from {hint}); pass --base BASE or `deltahub pull {art.name} --with-base`."
        )
    return str(found)


# ------------------------------------------------------------------------------------------- card
@click.command()
@click.argument("artifact")
@click.option("--repo-id", help="Hub repo id to use in the pull commands of the card.")
def card(artifact: str, repo_id: str | None) -> None:
    """Print the Hugging Face model card (README.md) of ARTIFACT.

    \b
    Examples:
      deltahub card ./expert > README.md
      deltahub card expert --repo-id my-org/expert
      deltahub card hf://my-org/expert                # pulls it, then renders with that repo id
    """
    from deltahub.card import render_card

    if repo_id is None and artifact.startswith("hf://"):  # the card's commands should name where it lives
        from deltahub.registry.hf import parse_hub_url

        repo_id = parse_hub_url(artifact).repo_id
    click.echo(render_card(open_artifact(artifact).manifest, repo_id=repo_id), nl=False)
