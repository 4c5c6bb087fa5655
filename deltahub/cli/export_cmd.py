"""``deltahub export``: an expert as another library's folder (PEFT LoRA)."""

from __future__ import annotations

from pathlib import Path

import click

from deltahub.errors import CodecConfigError

OPTIONS = {"rank": 16}


@click.command()
@click.argument("artifact")
@click.option("--format", "fmt", type=click.Choice(["peft"]), default="peft", show_default=True,
              help="Folder format to write.")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="rank=R: LoRA rank for full-delta experts (default 16).")
def export(artifact: str, fmt: str, out: Path, params: tuple[str, ...]) -> None:
    """Write ARTIFACT as a PEFT LoRA folder that `PeftModel.from_pretrained(base, OUT)` loads.

    LoRA experts export their factors as stored (bit for bit with the dense codec); full-delta experts
    export by truncated SVD at rank R, and the relative error is printed and written to
    OUT/deltahub_export.json.

    \b
    Examples:
      deltahub export ./lora-expert --format peft -o ./peft-adapter
      deltahub export ./expert --format peft -p rank=32 -o ./expert-as-lora
      deltahub export expert:latest -o ./peft-adapter      # from the local registry
    """
    from deltahub.cli.core import open_artifact
    from deltahub.codecs import _parse_kv
    from deltahub.exporting import export as run

    opts = {**OPTIONS, **_parse_kv(params)}
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise CodecConfigError(f"Export has no option '{unknown[0]}'. Options: {', '.join(OPTIONS)}.")
    art = open_artifact(artifact)
    report = run(art, out, format=fmt, rank=opts["rank"])
    how = "LoRA factors as stored" if report.rank is None else f"truncated SVD at rank {report.rank}"
    click.echo(f"exported {art.name} as {fmt} ({how}; rel. error of ΔW {report.rel_error:.4f}) -> {report.path}")
    if report.dropped:
        click.echo(f"not representable as LoRA, left out: {len(report.dropped)} tensors "
                   f"({', '.join(report.dropped[:3])}{', …' if len(report.dropped) > 3 else ''})")
