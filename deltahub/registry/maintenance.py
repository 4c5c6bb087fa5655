"""Upkeep of a store: ``verify`` re-hashes what is stored, ``gc`` deletes what no ref needs.

gc never deletes a blob that a ref entry still in use, or a young intent (a push in flight), names; it
spares every unreferenced blob younger than the grace period; and if any kept ref's manifest cannot be
read it deletes no blob at all. Marking is repeated until two listings of refs and intents agree, and a
candidate's age is re-read just before it is deleted, so a push that lands mid-gc is seen (the pusher
also re-checks its blobs after writing its ref: see ``Store._post_check``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from deltahub.errors import ArtifactNotFoundError, DeltaHubError
from deltahub.manifest import MAX_MANIFEST_BYTES
from deltahub.registry.refs import GcReport, RefEntry, is_hex_id, newest, parse_intent_path
from deltahub.registry.store import Store, blob_rel

MAX_MARK_ROUNDS = 3


def verify(store: Store, ref: str | None = None, extra_ids: Iterable[str] = ()) -> list[str]:
    """Problems found (empty = OK): bad ref names, unreadable manifests, missing/short/corrupt blobs.

    With ``ref``, only that artifact's blobs are re-hashed; without, every blob in the store is.
    """
    entries = store.entries()
    problems = list(store.problems)
    ids = {store.lookup(ref, extra_ids)[0]} if ref else {e.id for e in entries} | set(extra_ids)
    needed: dict[str, int] = {}
    done: set[str] = set()  # manifest blobs already checked by read_manifest
    for id_ in sorted(ids):
        try:
            raw, m = store.read_manifest(id_)
        except DeltaHubError as exc:
            problems.append(f"artifact {id_[:12]}: {exc}")
            done.add(id_)
            continue
        done.add(id_)
        needed.update({f.sha256: f.size for f in m.files})
    stored = store.backend.walk("blobs/sha256")
    for h, size in sorted(needed.items()):
        info = stored.get(blob_rel(h))
        if info is None:
            problems.append(f"{blob_rel(h)}: missing; push or pull the artifact again")
        elif info.size != size:
            problems.append(f"{blob_rel(h)}: {info.size} bytes, expected {size} (truncated); push or pull again")
            done.add(h)
    scope = sorted(stored) if ref is None else [blob_rel(h) for h in needed if blob_rel(h) in stored]
    for rel in scope:
        h = rel.rsplit("/", 1)[-1]
        if not is_hex_id(h):
            problems.append(f"{rel!r}: not a blob name (ignored); remove it")
        elif h not in done:
            try:
                if store.hash_blob(h)[1] != h:
                    problems.append(f"{rel}: sha256 mismatch (corrupted); push or pull the artifact again")
            except FileNotFoundError:
                if h in needed:
                    problems.append(f"{rel}: missing; push or pull the artifact again")
    return problems


def gc(store: Store, *, grace_seconds: float = 86400, dry_run: bool = False,
       extra_roots: Iterable[str] = (), before_delete: Callable[[str], None] | None = None) -> GcReport:
    """Delete blobs no ref or young intent needs and that are older than ``grace_seconds``.

    ``before_delete(hex)`` runs before each blob is deleted (the local registry drops the folder built
    from a manifest blob first, so a crash between the two never leaves a folder without its manifest).

    Also drops superseded ref entries, old intents and temp debris past the grace period. If any kept
    ref's manifest cannot be read, no blob is deleted (a ref might still need it).
    """
    report = GcReport(dry_run=dry_run)
    with store.backend.lock("gc"):
        cutoff = store.clock() - grace_seconds
        blobs = store.backend.walk("blobs/sha256")  # listed first: a blob stored after this is never a candidate
        keep, stale, old_intents = _mark_stable(store, cutoff, extra_roots, report)
        for rel, info in sorted(blobs.items()):
            if rel.rsplit("/", 1)[-1] in keep:
                report.kept_blobs += 1
            elif info.mtime is None or info.mtime >= cutoff or report.problems:
                report.spared_young += 1
            else:
                now = store.backend.info(rel)  # re-check: a push may have refreshed it since the listing
                if now is not None and (now.mtime is None or now.mtime >= cutoff):
                    report.spared_young += 1
                    continue
                report.deleted_blobs.append(rel)
                report.freed_bytes += info.size
                if not dry_run:
                    if before_delete is not None:
                        before_delete(rel.rsplit("/", 1)[-1])
                    store.backend.delete(rel)
        report.deleted_refs = [e.path for e in stale]
        debris = [r for r, i in store.backend.walk("tmp").items()  # top level only: folders are in use by their owner
                  if r.count("/") == 1 and i.mtime is not None and i.mtime < cutoff]
        report.deleted_other = old_intents + debris
        if not dry_run:
            for rel in report.deleted_refs + report.deleted_other:
                store.backend.delete(rel)
    return report


def _mark_stable(store: Store, cutoff: float, extra: Iterable[str],
                 report: GcReport) -> tuple[set[str], list[RefEntry], list[str]]:
    """Mark until two listings of refs and intents agree (a push landing mid-mark is then seen)."""
    seen = None
    for _ in range(MAX_MARK_ROUNDS):
        entries = store.entries()
        intents = store.backend.walk("intents")
        snapshot = (frozenset(e.path for e in entries), frozenset(intents))
        if snapshot == seen:
            break
        seen = snapshot
        report.problems = []
        keep, stale, old_intents = _mark(store, entries, intents, cutoff, extra, report)
    else:
        report.problems.append("refs kept changing during gc (pushes in flight); no blob was deleted, run gc later")
    return keep, stale, old_intents


def _mark(store: Store, entries: list[RefEntry], intents: dict[str, Any], cutoff: float, extra: Iterable[str],
          report: GcReport) -> tuple[set[str], list[RefEntry], list[str]]:
    best = set(newest(entries).values())
    live = [e for e in entries if e in best or e.time_ns / 1e9 >= cutoff]
    stale = [e for e in entries if e not in best and e.time_ns / 1e9 < cutoff]
    keep = {e.id for e in live} | set(extra)
    old_intents = []
    for rel, info in intents.items():
        born = parse_intent_path(rel)
        if (born / 1e9 if born is not None else (info.mtime or 0)) < cutoff:
            old_intents.append(rel)
            continue
        try:
            body = json.loads(store.backend.read(rel, MAX_MANIFEST_BYTES))
            keep |= {h for h in body.get("blobs", []) if is_hex_id(h)}
        except (ValueError, AttributeError, FileNotFoundError, DeltaHubError):
            pass  # unreadable or already removed by its pusher: it protects nothing more
    for id_ in sorted({e.id for e in live} | set(extra)):
        try:
            keep |= {f.sha256 for f in store.read_manifest(id_)[1].files}
        except ArtifactNotFoundError:
            continue  # a dangling ref needs nothing that exists
        except DeltaHubError as exc:
            report.problems.append(f"artifact {id_[:12]}: {exc}")
    return keep, stale, old_intents
