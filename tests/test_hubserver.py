"""The real huggingface_hub client against tests/hubserver.py, on 127.0.0.1 only."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

import huggingface_hub  # noqa: E402
from huggingface_hub import HfApi, hf_hub_download, snapshot_download  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hubserver import HubServer, run_hub_server  # noqa: E402  (tests/ is on the import path, as conftest.py is)

REPO = "alice/delta"
HOSTILE_NAMES = ["../x", "a/../../x", "/abs", "C:\\x", "C:x", "\\\\host\\share\\x", "nul\0byte"]


def make_folder(root: Path, weights: bytes = b"\x01\x02" * 40_000) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a delta\n")
    (root / "manifest.json").write_text(json.dumps({"format": "deltahub", "files": 2}))
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "delta.safetensors").write_bytes(weights)
    return root


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".cache" not in p.relative_to(root).parts}


def upload(api: HfApi, folder: Path, repo_id: str = REPO, private: bool | None = None, **kwargs):
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(repo_id=repo_id, folder_path=folder, **kwargs)


def raw(hub: HubServer, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    req = urllib.request.Request(hub.url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_env_is_patched_after_import(hub):
    from huggingface_hub import constants
    from huggingface_hub.hf_api import api

    assert constants.ENDPOINT == hub.url == api.endpoint
    assert constants.HF_HUB_DISABLE_XET and not constants.HF_HUB_OFFLINE
    assert os.environ["HF_ENDPOINT"] == hub.url
    huggingface_hub.create_repo("alice/m", exist_ok=True)  # module-level helpers use hf_api.api
    assert huggingface_hub.list_repo_files("alice/m") == [".gitattributes"]


def test_loopback_guard_catches_other_hosts(hub, loopback_only):
    with pytest.raises(Exception):
        HfApi(endpoint="https://huggingface.co").repo_info("alice/m")
    assert loopback_only and "huggingface.co" in loopback_only[0]
    loopback_only.clear()


def test_upload_folder_snapshot_roundtrip(hub, tmp_path):
    folder = make_folder(tmp_path / "src")
    info = upload(HfApi(), folder, commit_message="first")
    assert hub.count("lfs_upload", "PUT") == 1 and hub.count("lfs_verify") == 1 and hub.count("commit") == 1
    assert info.oid == hub.head(REPO)
    api = HfApi()
    expected = [".gitattributes", "README.md", "manifest.json", "sub/delta.safetensors"]
    assert sorted(api.list_repo_files(REPO)) == expected
    weights = (folder / "sub" / "delta.safetensors").read_bytes()
    [lfs_entry] = [e for e in api.list_repo_tree(REPO, recursive=True) if e.path == "sub/delta.safetensors"]
    assert lfs_entry.lfs.sha256 == hashlib.sha256(weights).hexdigest() and lfs_entry.size == len(weights)
    readme = [e for e in api.list_repo_tree(REPO) if e.path == "README.md"][0]
    assert readme.lfs is None and {e.path for e in api.list_repo_tree(REPO)} >= {"sub", "README.md"}
    meta = api.repo_info(REPO, files_metadata=True)
    assert meta.sha == info.oid and meta.private is False
    assert {s.rfilename: s.lfs is not None for s in meta.siblings}["sub/delta.safetensors"]
    out = snapshot_download(REPO, revision="main", local_dir=tmp_path / "dst")
    assert tree_bytes(Path(out)) == {".gitattributes": hub.file_bytes(REPO, ".gitattributes"), **tree_bytes(folder)}
    cached = hf_hub_download(REPO, "sub/delta.safetensors")
    assert Path(cached).read_bytes() == weights and "snapshots" in cached
    assert snapshot_download(REPO).endswith(info.oid)
    assert [r for r in hub.requests if r.status >= 400] == []


def test_create_commit_bytes_lfs_delete_and_parent_guard(hub):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    api = HfApi()
    api.create_repo(REPO)
    big = os.urandom(50_000)
    ops = [CommitOperationAdd("a.bin", big), CommitOperationAdd("notes/x.txt", b"x"), CommitOperationAdd("e.pt", b"")]
    first = api.create_commit(REPO, ops, commit_message="add").oid
    files = hub.repos[REPO].commits[first].files
    assert files["a.bin"].lfs and not files["notes/x.txt"].lfs and not files["e.pt"].lfs  # empty => regular
    assert hub.file_bytes(REPO, "a.bin") == big and hub.count("lfs_upload") == 1
    api.create_commit(REPO, [CommitOperationDelete("notes/"), CommitOperationDelete("e.pt")], commit_message="rm")
    assert api.list_repo_files(REPO) == [".gitattributes", "a.bin"]
    with pytest.raises(HfHubHTTPError) as stale:
        api.create_commit(REPO, [CommitOperationAdd("y.txt", b"y")], commit_message="late", parent_commit=first)
    assert stale.value.response.status_code == 412
    with pytest.raises(EntryNotFoundError):
        api.create_commit(REPO, [CommitOperationDelete("missing.txt")], commit_message="rm missing")


def test_offline_mode_uses_the_cache(hub, monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    hub.create_repo(REPO)
    hub.commit_files(REPO, {"a.txt": b"hello"})
    folder = snapshot_download(REPO)
    n = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the env var alone is read only at import
    assert snapshot_download(REPO) == folder and Path(hf_hub_download(REPO, "a.txt")).read_bytes() == b"hello"
    assert len(hub.requests) == n
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download("alice/never-downloaded")


def test_preupload_lfs_rule(hub):
    hub.create_repo(REPO)
    files = [{"path": "big.txt", "size": 10 * 2**20 + 1, "sample": ""},
             {"path": "small.txt", "size": 10, "sample": ""}, {"path": "w.safetensors", "size": 10, "sample": ""}]
    status, _, body = raw(hub, "POST", f"/api/models/{REPO}/preupload/main", json.dumps({"files": files}).encode(),
                          {"Content-Type": "application/json"})
    assert status == 200
    assert [f["uploadMode"] for f in json.loads(body)["files"]] == ["lfs", "regular", "lfs"]


def test_second_upload_is_idempotent(hub, tmp_path):
    folder = make_folder(tmp_path / "src")
    first = upload(HfApi(), folder)
    second = upload(HfApi(), folder)
    assert second.oid == first.oid == hub.head(REPO)  # nothing changed => no commit
    assert hub.count("lfs_upload") == 1 and hub.count("commit") == 1 and hub.count("lfs_batch") == 2
    (folder / "README.md").write_text("# changed\n")
    third = upload(HfApi(), folder)
    assert third.oid != first.oid and hub.count("lfs_upload") == 1  # LFS object already stored => not re-sent


def test_lfs_upload_enforces_oid(hub):
    hub.create_repo(REPO)
    oid = hashlib.sha256(b"right").hexdigest()
    batch = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": 5}]}
    _, _, body = raw(hub, "POST", f"/{REPO}.git/info/lfs/objects/batch", json.dumps(batch).encode())
    href = json.loads(body)["objects"][0]["actions"]["upload"]["href"][len(hub.url):]
    assert raw(hub, "PUT", href, b"wrong")[0] == 400
    assert raw(hub, "PUT", href.split("?")[0] + "?nonce=forged", b"right")[0] == 403
    assert raw(hub, "PUT", href, b"right")[0] == 200


def test_private_repo_and_tokens(auth_hub, tmp_path, monkeypatch):
    api = HfApi()
    upload(api, make_folder(tmp_path / "src"), private=True)
    assert api.repo_info(REPO).private is True
    with pytest.raises(RepositoryNotFoundError) as anonymous:
        api.repo_info(REPO, token=False)
    assert anonymous.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as wrong:
        HfApi(token="hf_wrong").list_repo_files(REPO)
    assert wrong.value.response.status_code == 401 and not isinstance(wrong.value, RepositoryNotFoundError)
    with pytest.raises(RepositoryNotFoundError) as missing:
        api.repo_info("alice/missing")
    assert missing.value.response.status_code == 404
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(REPO, local_dir=tmp_path / "dst")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "README.md")
    with pytest.raises(HfHubHTTPError) as write:
        HfApi().upload_folder(repo_id=REPO, folder_path=tmp_path / "src")
    assert write.value.response.status_code == 401


def test_missing_repo_revision_file(hub, tmp_path):
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("alice/nope")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("alice/nope", local_dir=tmp_path / "x")
    hub.create_repo(REPO)
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(REPO, revision="v9")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="v9")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, ".gitattributes", revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "nope.txt")
    assert not api.file_exists(REPO, "nope.txt") and api.file_exists(REPO, ".gitattributes")


def test_revision_pinning_by_commit_sha(hub, tmp_path):
    folder = make_folder(tmp_path / "src", weights=b"v1" * 100)
    v1 = upload(HfApi(), folder).oid
    (folder / "sub" / "delta.safetensors").write_bytes(b"v2" * 100)
    v2 = upload(HfApi(), folder).oid
    assert v1 != v2 and hub.head(REPO) == v2
    api = HfApi()
    assert api.repo_info(REPO, revision=v1).sha == v1
    assert Path(hf_hub_download(REPO, "sub/delta.safetensors", revision=v1)).read_bytes() == b"v1" * 100
    pinned = snapshot_download(REPO, revision=v1, local_dir=tmp_path / "pinned")
    assert (Path(pinned) / "sub" / "delta.safetensors").read_bytes() == b"v1" * 100
    assert Path(hf_hub_download(REPO, "sub/delta.safetensors")).read_bytes() == b"v2" * 100
    hub.create_branch(REPO, "stable", revision=v1)
    assert api.repo_info(REPO, revision="stable").sha == v1


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_listed_and_refused_by_client(hub, tmp_path, name):
    hub.create_repo(REPO)
    hub.inject_file(REPO, name)
    api = HfApi()
    assert name in api.list_repo_files(REPO)
    assert name in [s.rfilename for s in api.repo_info(REPO).siblings]
    for kwargs in ({"local_dir": tmp_path / "dst"}, {}):  # local_dir mode, then cache mode
        with pytest.raises(ValueError):
            snapshot_download(REPO, **kwargs)
    # Nothing lands outside the cache's blobs/ (a NUL name is only refused by the OS, after its blob was fetched).
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == b"hostile\n"]
    assert [p for p in written if p.parent.name != "blobs"] == [] and len(written) == ("\0" in name)
    assert not Path("/abs").exists() and not (tmp_path.parent / "x").exists()


def test_corrupted_bytes_pass_the_client(hub, tmp_path):
    weights = bytes(range(256)) * 8
    hub.create_repo(REPO)
    hub.commit_files(REPO, {"w.safetensors": weights})
    hub.corrupt(REPO, "w.safetensors", offset=100)
    got = Path(hf_hub_download(REPO, "w.safetensors", local_dir=tmp_path / "d")).read_bytes()
    # huggingface_hub checks only the size at download time: the flipped byte is silently accepted.
    assert len(got) == len(weights) and sum(a != b for a, b in zip(got, weights)) == 1
    assert hashlib.sha256(got).hexdigest() != HfApi().repo_info(REPO, files_metadata=True).siblings[-1].lfs.sha256


def test_fault_injection_and_retries(hub):
    hub.create_repo(REPO)
    hub.commit_files(REPO, {"a.txt": b"hello"})
    hub.fail_next("tree")  # list_repo_files uses http_backoff: retried (after 1 s)
    assert "a.txt" in HfApi().list_repo_files(REPO)
    assert [r.status for r in hub.requests if r.route == "tree"] == [500, 200]
    hub.fail_next("repo_info", n=1, status=503)  # repo_info does not retry
    with pytest.raises(HfHubHTTPError) as err:
        HfApi().repo_info(REPO)
    assert err.value.response.status_code == 503
    hub.fail_next("resolve", method="HEAD")  # hf_hub_download retries a failed HEAD when nothing is cached
    assert Path(hf_hub_download(REPO, "a.txt")).read_bytes() == b"hello"
    hub.fail_next("resolve", method="GET")  # ... but not a failed GET
    with pytest.raises(HfHubHTTPError):
        hf_hub_download(REPO, "a.txt", force_download=True)


def test_resolve_headers_and_range(hub):
    hub.create_repo(REPO)
    data = os.urandom(3000)
    hub.commit_files(REPO, {"w.safetensors": data, "c.json": b"{}"})
    status, h, _ = raw(hub, "HEAD", f"/{REPO}/resolve/main/w.safetensors")
    assert status == 200 and h["X-Repo-Commit"] == hub.head(REPO) and h["Content-Length"] == "3000"
    assert h["X-Linked-Etag"].strip('"') == hashlib.sha256(data).hexdigest() and h["X-Linked-Size"] == "3000"
    status, h, _ = raw(hub, "HEAD", f"/{REPO}/resolve/main/c.json")
    assert "X-Linked-Etag" not in h and h["ETag"].strip('"') == hashlib.sha1(b"blob 2\0{}").hexdigest()
    status, h, body = raw(hub, "GET", f"/{REPO}/resolve/main/w.safetensors", headers={"Range": "bytes=1000-"})
    assert status == 206 and body == data[1000:] and h["Content-Range"] == "bytes 1000-2999/3000"
    assert raw(hub, "GET", f"/{REPO}/resolve/main/w.safetensors", headers={"Range": "bytes=5000-"})[0] == 416
    hub.ignore_range = True
    status, _, body = raw(hub, "GET", f"/{REPO}/resolve/main/w.safetensors", headers={"Range": "bytes=1000-"})
    assert status == 200 and body == data


def test_tree_pagination(hub):
    hub.create_repo(REPO)
    hub.commit_files(REPO, {f"d/f{i:02d}.txt": b"%d" % i for i in range(25)})
    hub.page_size = 10
    assert len(HfApi().list_repo_files(REPO)) == 26
    assert hub.count("tree") == 3


def test_unknown_route_fails_loudly():
    with run_hub_server() as hub:
        status, _, body = raw(hub, "GET", f"/api/models/{REPO}/refs")
        assert status == 501 and f"GET /api/models/{REPO}/refs" in body.decode()
        assert hub.unhandled == [f"route GET /api/models/{REPO}/refs"]
