"""Registry CLI verbs: push, pull, ls, verify, gc (thin wrappers over :class:`deltahub.Registry`).

Heavy imports (torch through the artifact module, fsspec, s3fs) happen inside the commands, so
``deltahub push --help`` stays fast. Errors are :class:`~deltahub.errors.DeltaHubError` subclasses and
reach the group's single boundary (``Error: ...``, exit 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def _registry(url: str | None) -> Any:
    from deltahub.registry import Registry

    return Registry(url)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


@click.command()
@click.argument("src")
@click.option("--to", "to", metavar="URL",
              help="Target registry (default: the local registry), e.g. s3://bucket/prefix.")
@click.option("--tag", help="Tag to point at the artifact (default: latest, or the tag given to compress --name).")
@click.option("--name", help="Name to store it under (default: the artifact's name).")
@click.option("--private", is_flag=True, help="For hf:// targets: create the repo private.")
def push(src: str, to: str | None, tag: str | None, name: str | None, private: bool) -> None:
    """Store the artifact SRC in a registry and point NAME:TAG at it.

    SRC is an artifact folder, or (with --to) a name[:tag] or id of the local registry.
    Blobs already in the target are not uploaded again; the tag moves only after every blob is stored.

    \b
    Examples:
      deltahub push ./expert                                # into the local registry as expert:latest
      deltahub push ./expert --tag v2
      deltahub push expert:v2 --to s3://team-bucket/deltas  # local ref to a shared bucket
      deltahub push ./expert --to file:///mnt/shared/registry
      deltahub push expert --to hf://my-org/expert --private
    """
    if private and not (to or "").startswith("hf://"):
        raise click.UsageError("--private applies to hf:// targets (--to hf://org/repo).")
    from deltahub.registry import Registry

    reg = Registry(to, private=True) if private else _registry(to)
    info = reg.push(src, name=name, tag=tag)
    where = to or "the local registry"
    click.echo(f"pushed {info.name}:{info.tag} ({info.id[:12]}, {_size(info.size)}) to {where}")


@click.command()
@click.argument("ref")
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), help="Also write the artifact to this folder.")
@click.option("--with-base", is_flag=True, help="Also fetch, verify and register the base model it was made from.")
def pull(ref: str, out: Path | None, with_base: bool) -> None:
    """Fetch REF into the local registry, verifying every byte (and optionally write it to a folder).

    REF is a remote ref (s3://bucket/prefix/NAME[:TAG], file:///path/NAME[:TAG], hf://org/repo) or a
    name[:tag] / id already in the local registry.

    \b
    Examples:
      deltahub pull s3://team-bucket/deltas/expert:v2
      deltahub pull s3://team-bucket/deltas/expert -o ./expert --with-base
      deltahub pull file:///mnt/shared/registry/expert
      deltahub pull expert -o ./expert-copy                 # local registry to a folder
    """
    from deltahub.registry import Registry

    reg = Registry()
    art = reg.pull(ref, out=out, with_base=with_base)
    msg = f"pulled {art.name} ({art.id[:12]}) -> {art.folder}"
    if with_base:
        base = reg.find_base(art.manifest.base)
        msg += f"; base {base}"
    click.echo(msg)


@click.command()
@click.argument("url", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list for scripts.")
def ls(url: str | None, as_json: bool) -> None:
    """List the artifacts of a registry (default: the local one): name, tag, id, created, size, codec.

    \b
    Examples:
      deltahub ls
      deltahub ls s3://team-bucket/deltas
      deltahub ls --json | jq '.[].id'
    """
    refs = _registry(url).ls()
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in refs], indent=1))
        return
    if not refs:
        click.echo(f"no artifacts in {url or 'the local registry'}")
        return
    rows = [("NAME", "TAG", "ID", "CREATED", "SIZE", "CODEC", "BITS/PARAM")]
    for r in refs:
        bpp = "-" if r.bits_per_param is None else f"{r.bits_per_param:.3f}"
        created = r.created.strftime("%Y-%m-%d %H:%M:%S")
        rows.append((r.name, r.tag, r.id[:12], created, _size(r.size), r.codec or "-", bpp))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


@click.command()
@click.argument("ref", required=False)
@click.option("--registry", "url", metavar="URL", help="Registry to check (default: the local registry).")
def verify(ref: str | None, url: str | None) -> None:
    """Re-hash stored blobs (all, or those of REF) and check that every ref resolves.

    Prints each problem; exits 1 if there is any.

    \b
    Examples:
      deltahub verify
      deltahub verify expert:v2
      deltahub verify --registry s3://team-bucket/deltas
    """
    from deltahub.errors import IntegrityError

    problems = _registry(url).verify(ref)
    where = url or "the local registry"
    if problems:
        for p in problems:
            click.echo(p)
        raise IntegrityError(f"{len(problems)} problem(s) in {where}; re-push or re-pull the affected artifacts.")
    click.echo(f"{ref or where}: OK")


@click.command()
@click.option("--registry", "url", metavar="URL", help="Registry to clean (default: the local registry).")
@click.option("--grace", default=86400.0, show_default=True, type=click.FloatRange(min=0),
              help="Spare unreferenced blobs younger than this many seconds (pushes in flight).")
@click.option("--dry-run", is_flag=True, help="Only report what would be deleted.")
def gc(url: str | None, grace: float, dry_run: bool) -> None:
    """Delete blobs that no ref needs and superseded ref entries, older than the grace period.

    \b
    Examples:
      deltahub gc --dry-run
      deltahub gc
      deltahub gc --registry s3://team-bucket/deltas --grace 172800
    """
    report = _registry(url).gc(grace_seconds=grace, dry_run=dry_run)
    click.echo(str(report))
    for p in report.problems:
        click.echo(f"kept everything: {p}")
