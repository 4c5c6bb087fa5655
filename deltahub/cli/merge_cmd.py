"""``deltahub merge``: one expert from several experts of one base, with the recipe recorded."""

from __future__ import annotations

import json
from pathlib import Path

import click

from deltahub.errors import MergeError

METHODS = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune"]


@click.command()
@click.argument("artifacts", nargs=-1)
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--method", type=click.Choice(METHODS), help="Merge method (required unless --recipe).")
@click.option("--weights", help="One weight per expert, comma-separated (default 1 each).")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Method option: density=D (kept fraction), majority_sign_method=total|frequency, seed=S.")
@click.option("--codec", default="dense", show_default=True, help="Codec that stores the merged deltas.")
@click.option("-c", "--codec-param", "codec_params", multiple=True, metavar="KEY=VALUE", help="Codec option.")
@click.option("--name", help="Artifact name (default: the output folder's name).")
@click.option("--drop-new", is_flag=True, help="Leave out tensors the experts replace whole (task heads).")
@click.option("--form", type=click.Choice(["auto", "delta", "lora"]), default="auto", show_default=True,
              help="auto: LoRA experts merged by task_arithmetic stay LoRA (rank = sum of ranks); delta: always "
                   "a weight delta.")
@click.option("--recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Make again the artifact this deltahub.json describes (inputs by id from the registry, "
                   "or the ARTIFACTS given).")
def merge(artifacts: tuple[str, ...], out: Path, method: str | None, weights: str | None, params: tuple[str, ...],
          codec: str, codec_params: tuple[str, ...], name: str | None, drop_new: bool, form: str,
          recipe: Path | None) -> None:
    """Merge ARTIFACTS (folders or registry refs, all of one base) into the expert OUT.

    \b
    Examples:
      deltahub merge polarity subjectivity -o both --method ties -p density=0.2
      deltahub merge a b c -o abc --method dare_ties --weights 1,0.5,0.5 -p density=0.3 -p seed=1
      deltahub merge a b -o ab --method task_arithmetic --codec compeft -c density=0.1
      deltahub merge lora1 lora2 -o both --method task_arithmetic  # stays LoRA (rank r1 + r2)
      deltahub merge --recipe ab/deltahub.json -o ab-again         # the same bytes
    """
    from deltahub.cli.core import open_artifact
    from deltahub.codecs import _parse_kv
    from deltahub.merging import merge as run

    opts = _parse_kv(params)
    copts = _parse_kv(codec_params)
    if recipe is not None:
        manifest = _read(recipe)
        r = manifest["provenance"]["merge"]
        refs = list(artifacts) or r["inputs"]
        method, w, name = r["method"], r["weights"], name or manifest["name"]
        opts = {k: r[k] for k in ("density", "majority_sign_method", "seed") if k in r}
        codec, copts = manifest["stats"]["codec"], manifest["stats"].get("codec_params") or {}
        drop_new, form = r.get("new") == "drop", r.get("form", "delta")
    else:
        if method is None:
            raise MergeError("Pass --method (one of " + ", ".join(METHODS) + ") or --recipe FILE.")
        refs, w = list(artifacts), _weights(weights)
    arts = [open_artifact(ref) for ref in refs]
    if recipe is not None and [a.id for a in arts] != r["inputs"]:
        raise MergeError("These experts are not the recipe's inputs (their ids differ); give the experts it names, "
                         "in its order, or none to look them up in the registry by id.")
    art = run(arts, method=method, weights=w, codec=codec, out=out, name=name, new="drop" if drop_new else "error",
              form=form, **opts,
              **{f"codec_{k}": v for k, v in copts.items()})
    s = art.manifest.stats
    kind = f", {art.manifest.kind} rank {'/'.join(map(str, s['ranks']))}" if "ranks" in s else ""
    click.echo(f"merged {len(arts)} experts ({method}{kind}) -> {art.folder}  id {art.id[:12]}  "
               f"{s['payload_bytes']:,} payload bytes ({codec})")


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise MergeError(f"--weights takes numbers separated by commas (1,0.5,0.5), got {text!r}.") from None


def _read(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
        manifest["provenance"]["merge"]["inputs"]
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        raise MergeError(f"{path} is not the deltahub.json of a merged artifact; give OUT/deltahub.json of a "
                         "`deltahub merge` output.") from None
