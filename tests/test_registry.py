"""The registry API on the local default, memory:// and file:// registries, with real (tiny) artifacts."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import pytest
import torch

import deltahub
from deltahub.errors import (
    ArtifactNotFoundError, BaseMismatchError, BaseNotFoundError, IntegrityError, RegistryError, UnsafePathError,
)
from deltahub.registry import Registry, split_ref
from deltahub.registry import backends
from deltahub.registry.backends import LocalBackend
from deltahub.registry.local import default_root

from _registry_fixtures import blob_path, flip_byte, local_blobs_ok, make_artifact, truncate

DAY = 86400


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTAHUB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DELTAHUB_LOAD_PLUGINS", "")
    monkeypatch.setenv("DELTAHUB_NO_PROGRESS", "1")
    monkeypatch.delenv("DELTAHUB_NO_LOCKS", raising=False)
    monkeypatch.setattr(backends, "BACKOFF", 0.001)


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    """Two artifacts of the same name (different fine-tunes) and one of another name, made once."""
    d = tmp_path_factory.mktemp("arts")
    return {"a": make_artifact(d, "expert", 1), "b": make_artifact(d, "expert", 2), "c": make_artifact(d, "other", 3)}


@pytest.fixture
def mem_url():
    return f"memory://reg-{uuid.uuid4().hex[:8]}"


def local_root() -> Path:
    return default_root()


def ref_files(root: Path, name: str, tag: str = "latest") -> list[Path]:
    return sorted((root / "refs" / name / tag).iterdir())


# ------------------------------------------------------------------------------------------ local basics
def test_push_ls_resolve_local(arts):
    reg = Registry()
    info = reg.push(arts["a"].folder)
    assert (info.name, info.tag, info.id, info.url) == ("expert", "latest", arts["a"].id, "")
    [row] = reg.ls()
    assert row.ref == "expert:latest" and row.id == arts["a"].id and row.codec == "dense"
    assert row.bits_per_param == arts["a"].manifest.stats["bits_per_param"]
    assert row.size == sum(f.size for f in arts["a"].manifest.files) + len(arts["a"].manifest.canonical_bytes())
    for ref in ("expert", "expert:latest", arts["a"].id, arts["a"].id[:8], "sha256:" + arts["a"].id):
        art = reg.resolve(ref)
        assert art.id == arts["a"].id and art.folder.is_relative_to(local_root())
    got, want = reg.resolve("expert").decode(), arts["a"].decode()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the manifest blob's hash is the artifact id, and every listed file is a blob
    assert hashlib.sha256(blob_path(local_root(), info.id).read_bytes()).hexdigest() == info.id
    for f in arts["a"].manifest.files:
        assert blob_path(local_root(), f.sha256).stat().st_size == f.size
    assert reg.verify() == []


def test_second_push_stores_nothing_new(arts, monkeypatch):
    reg = Registry()
    reg.push(arts["a"])
    installs = []
    real = LocalBackend.install
    def counting(self, tmp, rel, **kw):
        installs.append(rel)
        return real(self, tmp, rel, **kw)

    monkeypatch.setattr(LocalBackend, "install", counting)
    again = reg.push(arts["a"])
    assert again.id == arts["a"].id
    assert [r for r in installs if r.startswith(("blobs/", "refs/"))] == []
    assert len(ref_files(local_root(), "expert")) == 1


def test_tag_moves_newest_wins(arts):
    reg = Registry()
    reg.push(arts["a"])
    reg.push(arts["b"])
    assert reg.resolve("expert").id == arts["b"].id
    reg.push(arts["a"])
    assert reg.resolve("expert").id == arts["a"].id
    assert [r.id for r in reg.ls()] == [arts["a"].id]
    assert len(ref_files(local_root(), "expert")) == 3  # create-only entries: a tag move never rewrites one
    reg.push(arts["b"], tag="v2")
    assert {(r.tag, r.id) for r in reg.ls()} == {("latest", arts["a"].id), ("v2", arts["b"].id)}


def test_tag_move_wins_even_if_clock_goes_back(arts):
    t = [time.time()]
    reg = Registry(clock=lambda: t[0])
    reg.push(arts["a"])
    t[0] -= 3600  # a skewed or reset clock must not let an older entry win over our own newer one
    reg.push(arts["b"])
    assert reg.resolve("expert").id == arts["b"].id


def test_resolve_errors(arts):
    reg = Registry()
    reg.push(arts["a"])
    with pytest.raises(ArtifactNotFoundError, match="deltahub ls"):
        reg.resolve("nope")
    with pytest.raises(ArtifactNotFoundError):
        reg.resolve("expert:v9")
    with pytest.raises(ArtifactNotFoundError):
        reg.resolve("0" * 12)
    ids = ["abcdef" + "0" * 58, "abcdef" + "1" * 58]
    with pytest.raises(RegistryError, match="matches 2"):
        reg.local.store.lookup("abcdef", ids)
    assert reg.local.store.lookup("abcdef1", ids)[0] == ids[1]


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/b", "a\x00b", "..", "x\\y", "C:evil", " lead", "a" * 200])
def test_hostile_names_refused(arts, bad):
    reg = Registry()
    with pytest.raises((UnsafePathError, RegistryError)):
        reg.push(arts["a"], name=bad)
    with pytest.raises((UnsafePathError, RegistryError)):
        reg.push(arts["a"], tag=bad)
    with pytest.raises((UnsafePathError, RegistryError, ArtifactNotFoundError)):
        reg.resolve(bad)
    assert not (local_root() / "refs").exists() or not any(local_root().joinpath("refs").rglob("*-*"))


def test_name_defaults_and_recorded_tag(arts, tmp_path):
    from deltahub.artifact import Artifact

    m = arts["c"].manifest.model_copy(update={"provenance": {**arts["c"].manifest.provenance, "tag": "v7"}})
    folder = Artifact(m, arts["c"].folder).save(tmp_path / "tagged")
    info = Registry().push(folder)
    assert (info.name, info.tag) == ("other", "v7")  # compress --name other:v7 records the tag


# ------------------------------------------------------------------------------------------ corruption
def test_corrupted_blob_found_by_verify_and_refused(arts):
    reg = Registry()
    reg.push(arts["a"])
    payload = arts["a"].manifest.files[0]
    flip_byte(blob_path(local_root(), payload.sha256))
    problems = reg.verify()
    assert any(payload.sha256 in p and "corrupted" in p for p in problems)
    assert reg.verify("expert") != []
    import shutil

    shutil.rmtree(local_root() / "artifacts")  # force a rebuild from the (damaged) blobs
    with pytest.raises(IntegrityError):
        reg.resolve("expert")


def test_truncated_blob_found_by_verify(arts):
    reg = Registry()
    reg.push(arts["a"])
    payload = arts["a"].manifest.files[0]
    truncate(blob_path(local_root(), payload.sha256))
    assert any("truncated" in p for p in reg.verify())


def test_repush_repairs_damaged_local_blob(arts):
    reg = Registry()
    reg.push(arts["a"])
    flip_byte(blob_path(local_root(), arts["a"].manifest.files[0].sha256))
    reg.push(arts["a"])  # local presence checks hash, so the good copy replaces the bad one
    assert reg.verify() == [] and reg.resolve("expert").id == arts["a"].id


def test_pull_refuses_corrupted_remote_blob(arts, tmp_path):
    url = (tmp_path / "shared").as_uri()
    remote = Registry(url)
    remote.push(arts["a"])
    bad = arts["a"].manifest.files[0].sha256
    flip_byte(blob_path(tmp_path / "shared", bad))
    assert any(bad in p for p in remote.verify())
    with pytest.raises(IntegrityError, match="nothing was stored"):
        Registry().pull(f"{url}/expert")
    assert not blob_path(local_root(), bad).exists()
    assert local_blobs_ok(local_root())
    assert Registry().ls() == []


def test_pull_refuses_truncated_remote_blob_memory(arts, mem_url):
    remote = Registry(mem_url)
    remote.push(arts["a"])
    fs = remote._remote.store.backend.fs
    root = remote._remote.store.backend.root
    bad = arts["a"].manifest.files[0].sha256
    path = f"{root}/blobs/sha256/{bad}"
    fs.pipe_file(path, fs.cat_file(path)[:-7])
    assert any("truncated" in p for p in remote.verify())
    with pytest.raises(IntegrityError, match="bytes"):
        Registry().pull(f"{mem_url}/expert")
    assert local_blobs_ok(local_root()) and not blob_path(local_root(), bad).exists()


def test_hostile_entries_in_remote_listing_are_ignored(arts, mem_url):
    remote = Registry(mem_url)
    remote.push(arts["a"])
    store = remote._remote.store
    fs, root = store.backend.fs, store.backend.root
    entry = f"{time.time_ns():020d}-{arts['a'].id}"
    for key in (f"refs/../evil/latest/{entry}", f"refs/a\x00b/latest/{entry}", f"refs/ok/latest/../../{entry}",
                "refs/ok/latest/not-an-entry", f"refs/ok/latest/{entry}/deeper"):
        fs.store[f"{root}/{key}"] = fs.store[f"{root}/blobs/sha256/{arts['a'].id}"]  # raw injection, no normalization
    assert [r.name for r in remote.ls()] == ["expert"]
    assert len([p for p in remote.verify() if "not a valid ref entry" in p]) == 5
    with pytest.raises(UnsafePathError):
        Registry().pull(f"{mem_url}/..")


def test_hostile_file_names_in_remote_manifest(arts, mem_url):
    """A manifest whose file list escapes the artifact folder is refused before anything is written."""
    remote = Registry(mem_url)
    store = remote._remote.store
    data = json.loads(arts["a"].manifest.canonical_bytes())
    data["files"][0]["path"] = "../../escape.safetensors"
    raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    id_ = hashlib.sha256(raw).hexdigest()
    store.backend.put_bytes(f"blobs/sha256/{id_}", raw, create_only=True)
    store.backend.put_bytes(f"refs/evil/latest/{time.time_ns():020d}-{id_}", b"{}", create_only=True)
    with pytest.raises(UnsafePathError):
        Registry().pull(f"{mem_url}/evil")
    assert not list(local_root().parent.rglob("escape.safetensors"))


# ------------------------------------------------------------------------------------------ gc
def test_gc_keeps_referenced_and_young_deletes_old_unreferenced(arts):
    now = [time.time()]
    reg = Registry(clock=lambda: now[0])
    reg.push(arts["a"])
    reg.push(arts["b"])  # moves expert:latest; a's blobs are now unreferenced (after the grace period)
    a_only = {f.sha256 for f in arts["a"].manifest.files} | {arts["a"].id}
    b_all = {f.sha256 for f in arts["b"].manifest.files} | {arts["b"].id}
    young = reg.gc()
    assert young.deleted_blobs == [] and young.deleted_refs == []  # the superseded entry is still young
    now[0] += 2 * DAY
    dry = reg.gc(dry_run=True)
    assert {p.rsplit("/", 1)[-1] for p in dry.deleted_blobs} == a_only
    assert all(blob_path(local_root(), h).exists() for h in a_only)  # dry run deletes nothing
    report = reg.gc()
    assert {p.rsplit("/", 1)[-1] for p in report.deleted_blobs} == a_only
    assert report.freed_bytes > 0 and len(report.deleted_refs) == 1
    assert all(blob_path(local_root(), h).exists() for h in b_all)
    assert not any(blob_path(local_root(), h).exists() for h in a_only)
    assert not (local_root() / "artifacts" / arts["a"].id).exists()
    assert reg.resolve("expert").id == arts["b"].id and reg.verify() == []


def test_gc_uses_file_mtimes(arts):
    """Fake old mtimes: an old orphan goes, a young orphan and every referenced blob stay."""
    reg = Registry()
    reg.push(arts["a"])
    old, young = b"old orphan", b"young orphan"
    root = local_root()
    for data in (old, young):
        p = blob_path(root, hashlib.sha256(data).hexdigest())
        p.write_bytes(data)
    old_time = time.time() - 3 * DAY
    os.utime(blob_path(root, hashlib.sha256(old).hexdigest()), (old_time, old_time))
    for f in arts["a"].manifest.files:  # referenced blobs are old too, and must stay
        os.utime(blob_path(root, f.sha256), (old_time, old_time))
    report = reg.gc()
    assert [p.rsplit("/", 1)[-1] for p in report.deleted_blobs] == [hashlib.sha256(old).hexdigest()]
    assert blob_path(root, hashlib.sha256(young).hexdigest()).exists()
    assert reg.verify() == []


def test_gc_spares_blobs_of_an_in_flight_push(arts):
    now = [time.time()]
    reg = Registry(clock=lambda: now[0])
    orphan = b"being pushed right now"
    h = hashlib.sha256(orphan).hexdigest()
    reg.local.backend.put_bytes(f"blobs/sha256/{h}", orphan, create_only=False)
    now[0] += 2 * DAY
    intent = reg.local.store.begin_intent([h])  # a push that started (at "now") and has not written its ref yet
    assert reg.gc().deleted_blobs == []
    reg.local.store.end_intent(intent)
    assert [p.rsplit("/", 1)[-1] for p in reg.gc().deleted_blobs] == [h]


def test_gc_keeps_everything_if_a_ref_is_unreadable(arts):
    now = [time.time()]
    reg = Registry(clock=lambda: now[0])
    reg.push(arts["a"])
    reg.push(arts["c"])
    orphan = b"orphan"
    reg.local.backend.put_bytes(f"blobs/sha256/{hashlib.sha256(orphan).hexdigest()}", orphan, create_only=False)
    flip_byte(blob_path(local_root(), arts["c"].id))  # c's manifest can no longer tell which blobs it needs
    now[0] += 2 * DAY
    report = reg.gc()
    assert report.deleted_blobs == [] and report.problems


# ------------------------------------------------------------------------------------------ remotes
@pytest.mark.parametrize("kind", ["memory", "file"])
def test_remote_push_pull_ls_verify_gc(arts, kind, mem_url, tmp_path):
    url = mem_url if kind == "memory" else (tmp_path / "team registry").as_uri()
    remote = Registry(url)
    info = remote.push(arts["a"])
    remote.push(arts["c"], tag="v1")
    assert info.url == url and {r.ref for r in remote.ls()} == {"expert:latest", "other:v1"}
    assert Registry().ls() == []  # pushing a folder to a remote does not touch the local registry
    art = Registry().pull(f"{url}/expert", out=tmp_path / "copy")
    assert art.id == arts["a"].id and art.folder == tmp_path / "copy"
    assert Registry().resolve("expert").id == arts["a"].id  # pulled into the local registry too
    assert remote.resolve("other:v1").id == arts["c"].id
    assert Registry(url).pull("other:v1").id == arts["c"].id  # a ref relative to Registry(url)
    assert remote.verify() == [] and Registry().verify() == []
    remote.push(arts["b"])
    assert remote.gc(grace_seconds=3600).deleted_blobs == []
    report = remote.gc(grace_seconds=0)
    assert arts["a"].id in {p.rsplit("/", 1)[-1] for p in report.deleted_blobs}
    assert remote.verify() == [] and remote.resolve("expert").id == arts["b"].id


def test_remote_second_push_and_pull_transfer_nothing(arts, mem_url, monkeypatch):
    remote = Registry(mem_url)
    remote.push(arts["a"])
    Registry().pull(f"{mem_url}/expert")
    backend = type(remote._remote.store.backend)
    calls = []
    for meth in ("upload", "put_bytes", "download"):
        real = getattr(backend, meth)
        def counting(self, rel, *a, _m=meth, _r=real, **k):
            calls.append((_m, rel))
            return _r(self, rel, *a, **k)

        monkeypatch.setattr(backend, meth, counting)
    Registry(mem_url).push(arts["a"])
    Registry().pull(f"{mem_url}/expert")
    assert [c for c in calls if c[1].startswith(("blobs/", "refs/"))] == []  # only the push's intent record
    assert {c[1].split("/")[0] for c in calls} <= {"intents"}


def test_push_local_ref_to_remote(arts, mem_url):
    Registry().push(arts["a"], tag="v1")
    info = Registry(mem_url).push("expert:v1")
    assert (info.name, info.tag, info.id) == ("expert", "latest", arts["a"].id)
    with pytest.raises(ArtifactNotFoundError):
        Registry(mem_url).push("missing")


def test_pull_by_id_gets_its_own_tag(arts, mem_url):
    Registry(mem_url).push(arts["a"])
    art = Registry().pull(f"{mem_url}/{arts['a'].id[:10]}")
    assert art.id == arts["a"].id
    assert [r.ref for r in Registry().ls()] == [f"expert:{arts['a'].id[:12]}"]


def test_split_ref_and_bad_urls():
    assert split_ref("s3://bucket/prefix/name:tag") == ("s3://bucket/prefix", "name:tag")
    assert split_ref("file:///srv/reg/x") == ("file:///srv/reg", "x")
    assert split_ref("memory://root/x:v1") == ("memory://root", "x:v1")
    for bad in ("s3://name", "memory://", "file:///x"):
        with pytest.raises(RegistryError):
            split_ref(bad)
    with pytest.raises(RegistryError, match="file:///abs"):
        Registry("file://host/path")
    with pytest.raises(RegistryError):
        Registry("nosuchscheme://x/y")


def test_missing_backend_says_what_to_install(monkeypatch):
    import fsspec

    def no_s3(*_a, **_k):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", no_s3)
    with pytest.raises(RegistryError, match=r"pip install 'deltahub\[s3\]'"):
        Registry("s3://bucket/prefix")


def test_transient_errors_are_retried_then_typed(mem_url, monkeypatch):
    from deltahub.errors import RemoteError

    remote = Registry(mem_url)
    backend = remote._remote.store.backend
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert backend.call("op", flaky) == "ok" and calls["n"] == 3
    with pytest.raises(RemoteError, match="after 4 tries"):
        backend.call("op", lambda: (_ for _ in ()).throw(OSError(5, "InternalError")))
    from deltahub.errors import AuthError

    with pytest.raises(AuthError):
        backend.call("op", lambda: (_ for _ in ()).throw(PermissionError("denied")))


# ------------------------------------------------------------------------------------------ bases
def test_push_registers_base_and_apply_finds_it(arts, tmp_path):
    reg = Registry()
    reg.push(arts["a"])
    art = reg.resolve("expert")
    base = Path(art.manifest.base.location["path"])
    assert reg.find_base(art.manifest.base) == base
    out = deltahub.apply(art, reg.find_base(art.manifest.base), out=tmp_path / "merged")
    assert Path(out).exists()
    from _registry_fixtures import cli

    res = cli(["apply", "expert", "-o", str(tmp_path / "merged-cli")])
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    ft = load_file(str(base.parent / "ft-1.safetensors"))
    merged = load_file(str(tmp_path / "merged-cli" / "model.safetensors"))
    assert all(torch.equal(ft[k], merged[k]) for k in ft)  # dense is lossless


def test_find_base_by_full_registration_after_base_moved(arts, tmp_path):
    import shutil

    base_dir = tmp_path / "moved"
    base_dir.mkdir()
    src = Path(arts["a"].manifest.base.location["path"])
    shutil.copyfile(src, base_dir / "model.safetensors")
    reg = Registry()
    fp = reg.register_base(base_dir)
    assert len(fp) == 64 and (local_root() / "bases" / f"{fp}.json").is_file()
    # a manifest whose recorded path no longer exists is still matched, by tensor hashes
    gone = arts["a"].manifest.base.model_copy(update={"location": {"type": "path", "path": str(tmp_path / "nowhere")}})
    assert reg.find_base(gone) == base_dir
    assert (local_root() / "bases" / f"{gone.fingerprint}.json").is_file()  # filed for the next lookup
    other = gone.model_copy(update={"tensors": [t.model_copy(update={"sha256": "0" * 64}) for t in gone.tensors]})
    assert reg.find_base(other) is None


def test_pull_with_base(arts, mem_url, tmp_path):
    remote = Registry(mem_url)
    remote.push(arts["a"])
    art = Registry().pull(f"{mem_url}/expert", with_base=True)
    assert Registry().find_base(art.manifest.base) == Path(art.manifest.base.location["path"])


def _with_location(art, tmp_path: Path, location: dict, name: str) -> Path:
    from deltahub.artifact import Artifact

    base = art.manifest.base.model_copy(update={"location": location})
    return Artifact(art.manifest.model_copy(update={"base": base}), art.folder).save(tmp_path / name)


def test_pull_with_base_missing_or_mismatched(arts, mem_url, tmp_path):
    remote = Registry(mem_url)
    missing = _with_location(arts["a"], tmp_path, {"type": "path", "path": str(tmp_path / "gone.safetensors")}, "m1")
    remote.push(missing, name="missing")
    with pytest.raises(BaseNotFoundError):
        Registry().pull(f"{mem_url}/missing", with_base=True)
    from safetensors.torch import save_file

    zeros = {"layer.0.weight": torch.zeros(16, 8), "layer.0.bias": torch.zeros(16),
             "layer.1.weight": torch.zeros(4, 16)}
    save_file(zeros, str(tmp_path / "zeros.safetensors"))
    mism = _with_location(arts["a"], tmp_path, {"type": "path", "path": str(tmp_path / "zeros.safetensors")}, "m2")
    remote.push(mism, name="mismatch")
    with pytest.raises(BaseMismatchError):
        Registry().pull(f"{mem_url}/mismatch", with_base=True)
    nowhere = _with_location(arts["a"], tmp_path, {}, "m3")
    remote.push(nowhere, name="nowhere")
    with pytest.raises(BaseNotFoundError):
        Registry().pull(f"{mem_url}/nowhere", with_base=True)


def test_pull_with_hub_base(arts, mem_url, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    snap = tmp_path / "hf-snapshot"
    snap.mkdir()
    shutil.copyfile(arts["a"].manifest.base.location["path"], snap / "model.safetensors")
    seen = {}

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        seen.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    hub = _with_location(arts["a"], tmp_path, {"type": "hub", "repo": "org/base", "revision": "abc123"}, "h")
    Registry(mem_url).push(hub, name="hubbed")
    art = Registry().pull(f"{mem_url}/hubbed", with_base=True)
    assert seen["repo_id"] == "org/base" and seen["revision"] == "abc123"
    assert "*.safetensors" in seen["allow_patterns"] and not any("bin" in p for p in seen["allow_patterns"])
    assert Registry().find_base(art.manifest.base) == snap


def test_gc_sees_a_push_that_lands_while_it_marks(arts, monkeypatch):
    """A push whose intent appears after gc's first listing is seen by the second one: its blob stays."""
    from deltahub.registry import maintenance

    now = [time.time()]
    reg = Registry(clock=lambda: now[0])
    data = b"reused by a push that starts mid-gc"
    h = hashlib.sha256(data).hexdigest()
    reg.local.backend.put_bytes(f"blobs/sha256/{h}", data, create_only=False)
    now[0] += 2 * DAY
    real, calls = maintenance._mark, []

    def racing_mark(store, *a, **k):
        if not calls:
            store.begin_intent([h])  # the push starts right after gc listed refs and intents
        calls.append(1)
        return real(store, *a, **k)

    monkeypatch.setattr(maintenance, "_mark", racing_mark)
    report = reg.gc()
    assert len(calls) == 2 and report.deleted_blobs == [] and blob_path(local_root(), h).exists()


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_push_restores_a_blob_deleted_by_a_racing_gc(arts, monkeypatch, kind, mem_url):
    reg = Registry() if kind == "local" else Registry(mem_url)
    store = reg.local.store if kind == "local" else reg._remote.store
    reg.push(arts["a"])
    payload = arts["a"].manifest.files[0].sha256
    real = type(store).write_ref

    def gc_strikes_first(self, *a, **k):
        self.backend.delete(f"blobs/sha256/{payload}")  # deleted after our existence check, before our ref
        return real(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(type(store), "write_ref", gc_strikes_first)
        reg.push(arts["a"], tag="again")
    assert store.has_blob(payload, arts["a"].manifest.files[0].size) and reg.verify() == []
