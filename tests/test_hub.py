"""The Hub remote (deltahub/registry/hf.py) through the real huggingface_hub client against tests/hubserver.py on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

import deltahub  # noqa: E402
from deltahub import Registry  # noqa: E402
from deltahub.card import check_card  # noqa: E402
from deltahub.errors import (  # noqa: E402
    ArtifactNotFoundError, AuthError, IntegrityError, RegistryError, RemoteError, UnsafePathError,
)
from deltahub.registry import backends  # noqa: E402
from deltahub.registry.hf import HubRemote, parse_hub_url  # noqa: E402
from deltahub.testing import pico_pair  # noqa: E402

from hubserver import HubServer  # noqa: E402  (tests/ is on the import path, as conftest.py is)

REPO = "alice/expert"
URL = f"hf://{REPO}"
HOSTILE_NAMES = ["../x", "a/../../x", "/abs", "C:\\x", "C:x", "\\\\host\\share\\x", "nul\0byte"]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(backends, "BACKOFF", 0.001)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Two real artifacts of one tiny pair: ``dense`` (lossless) and ``compeft``; plus one with a model config."""
    root = tmp_path_factory.mktemp("arts")
    base, ft = pico_pair(root / "pair")
    out = {codec: deltahub.compress(ft, base=base, codec=codec, out=root / codec, name="expert")
           for codec in ("dense", "compeft")}
    folder = root / "ft_folder"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(ft.read_bytes())
    (folder / "config.json").write_text(json.dumps({"model_type": "pico", "hidden_size": 48}))
    out["with_config"] = deltahub.compress(folder, base=base, codec="dense", out=root / "with_config", name="expert")
    return out


def repo_files(hub: HubServer, repo: str = REPO, revision: str = "main") -> dict[str, bytes]:
    commit = hub.repos[repo].commits[hub.head(repo, revision)]
    return {p: e.data for p, e in commit.files.items()}


def snapshot(*roots: Path) -> dict[str, bytes]:
    """Every file (and symlink) under ``roots``, with contents."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_symlink() or p.is_file():
                out[str(p)] = p.read_bytes() if p.is_file() else b"<symlink>"
    return out


def home() -> Path:
    return Path(os.environ["DELTAHUB_HOME"])


def local_blobs() -> list[Path]:
    blobs = home() / "registry" / "blobs"
    return [p for p in blobs.rglob("*") if p.is_file()] if blobs.exists() else []


def import_dirs() -> list[Path]:
    tmp = home() / "registry" / "tmp"
    return list(tmp.iterdir()) if tmp.exists() else []


def gets(hub: HubServer, path: str) -> list[int]:
    return [r.status for r in hub.requests if r.route == "resolve" and r.method == "GET" and r.path.endswith("/" + path)]


# ------------------------------------------------------------------------------------------ push / pull
@pytest.mark.parametrize("codec", ["dense", "compeft"])
def test_push_then_pull_roundtrip(hub, artifacts, codec, tmp_path):
    art = artifacts[codec]
    info = Registry(URL).push(art)
    head = hub.head(REPO)
    assert info.url == f"{URL}@{head}" and info.id == art.id and (info.name, info.tag) == ("expert", "latest")
    assert info.codec == codec and info.size == sum(f.size for f in art.manifest.files) + len(art.manifest.canonical_bytes())
    assert hub.count("create_repo") == 1 and hub.count("commit") == 1  # one commit: manifest, payloads and card
    files = repo_files(hub)
    assert set(files) == {".gitattributes", "README.md", "deltahub.json", *(f.path for f in art.manifest.files)}
    assert all(files[f.path] == (art.folder / f.path).read_bytes() for f in art.manifest.files)
    assert hub.repos[REPO].commits[head].title == f"deltahub push expert:latest ({codec}, id {art.id[:12]})"
    assert hub.repos[REPO].private is False

    pulled = Registry().pull(URL)
    assert pulled.id == art.id and pulled.folder.is_relative_to(home())
    for name, tensor in art.decode().items():
        assert pulled.decode()[name].equal(tensor)
    [ref] = Registry().ls()
    assert (ref.name, ref.tag, ref.id) == ("expert", "latest", art.id)
    assert Registry().resolve("expert").id == art.id
    # downloads went into the registry's tmp/ (local_dir mode): nothing in the Hub cache, no import folder left
    assert [p for p in (tmp_path / "hf_home").rglob("*") if p.is_file()] == []
    assert import_dirs() == []
    assert [r for r in hub.requests if r.status >= 400 and r.route != "create_repo"] == []


def test_pull_downloads_the_manifest_first_and_only_listed_files(hub, artifacts):
    art = artifacts["compeft"]
    HubRemote(URL).push_artifact(art, name="expert", tag="latest")
    hub.commit_files(REPO, {"notes/extra.bin": b"\0" * 5000, "unrelated.txt": b"hi"})
    n = len(hub.requests)
    Registry().pull(URL)
    fetched = [r.path.rsplit("/", 1)[-1] for r in hub.requests[n:] if r.route == "resolve" and r.method == "GET"]
    assert fetched == ["deltahub.json", *(f.path for f in art.manifest.files)]
    assert [r.route for r in hub.requests[n:]][:2] == ["repo_info", "tree"]  # listed (and checked) before any download


def test_pull_artifact_into_a_folder_returns_refinfo(hub, artifacts, tmp_path):
    art = artifacts["with_config"]
    remote = HubRemote(URL)
    remote.push_artifact(art, name="expert", tag="latest")
    info = remote.pull_artifact("", tmp_path / "dest")
    assert (info.name, info.tag, info.id, info.url) == ("expert", "latest", art.id, f"{URL}@{hub.head(REPO)}")
    listed = sorted(["deltahub.json", *(f.path for f in art.manifest.files)])
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == listed  # no .cache, no card, nothing else
    assert "model_config.json" in listed and deltahub.load(tmp_path / "dest").id == art.id


def test_second_push_uploads_nothing(hub, artifacts):
    art = artifacts["compeft"]
    first = HubRemote(URL).push_artifact(art, name="expert", tag="latest")
    uploads, commits, head = hub.count("lfs_upload"), hub.count("commit"), hub.head(REPO)
    assert uploads == len(art.manifest.files) and commits == 1
    second = HubRemote(URL).push_artifact(art, name="expert", tag="latest")
    assert hub.count("lfs_upload") == uploads and hub.count("commit") == commits and hub.head(REPO) == head
    assert second.url == first.url == f"{URL}@{head}"
    # a different artifact: a new commit; stored LFS objects are not sent again, stale payloads are deleted
    HubRemote(URL).push_artifact(artifacts["with_config"], name="expert", tag="latest")
    assert hub.count("commit") == commits + 1 and "model_config.json" in repo_files(hub)
    HubRemote(URL).push_artifact(art, name="expert", tag="latest")
    assert set(repo_files(hub)) == {".gitattributes", "README.md", "deltahub.json", *(f.path for f in art.manifest.files)}
    assert hub.count("lfs_upload") == uploads + 1  # only the dense payload was ever new


def test_pin_revision_by_commit_sha(hub, artifacts):
    v1 = HubRemote(URL).push_artifact(artifacts["compeft"], name="expert", tag="latest").url.split("@")[1]
    v2 = HubRemote(URL).push_artifact(artifacts["dense"], name="expert", tag="latest").url.split("@")[1]
    assert v1 != v2 and hub.head(REPO) == v2
    old = Registry().pull(f"{URL}@{v1}")
    assert old.id == artifacts["compeft"].id
    assert Registry().pull(URL).id == artifacts["dense"].id
    tags = {(r.name, r.tag): r.id for r in Registry().ls()}
    assert tags == {("expert", v1[:12]): artifacts["compeft"].id, ("expert", "latest"): artifacts["dense"].id}
    hub.create_branch(REPO, "stable", revision=v1)
    assert Registry().pull(f"{URL}@stable").id == artifacts["compeft"].id
    assert ("expert", "stable") in {(r.name, r.tag) for r in Registry().ls()}
    [listed] = Registry(f"{URL}@stable").ls()
    assert (listed.name, listed.tag, listed.id, listed.url) == ("expert", "stable", artifacts["compeft"].id, f"{URL}@{v1}")


def test_push_to_a_branch_and_refuse_a_commit(hub, artifacts):
    v1 = HubRemote(URL).push_artifact(artifacts["compeft"], name="expert", tag="latest").url.split("@")[1]
    hub.create_branch(REPO, "dev")
    info = HubRemote(f"{URL}@dev").push_artifact(artifacts["dense"], name="expert", tag="latest")
    assert hub.head(REPO, "main") == v1 and info.url == f"{URL}@{hub.head(REPO, 'dev')}"
    assert "deltahub pull hf://alice/expert@dev" in repo_files(hub, revision="dev")["README.md"].decode()
    with pytest.raises(RegistryError, match=re.escape(f"Cannot push to a commit ({URL}@{v1}); push to a branch")):
        HubRemote(f"{URL}@{v1}").push_artifact(artifacts["dense"], name="expert", tag="latest")
    with pytest.raises(ArtifactNotFoundError, match="alice/expert has no revision 'nope' on the Hub"):
        HubRemote(f"{URL}@nope").push_artifact(artifacts["dense"], name="expert", tag="latest")


# ------------------------------------------------------------------------------------------ auth
def test_private_repo_with_and_without_token(auth_hub, artifacts, monkeypatch):
    art = artifacts["compeft"]
    HubRemote(URL, private=True).push_artifact(art, name="expert", tag="latest")
    assert auth_hub.repos[REPO].private is True
    assert all(r.token_sent for r in auth_hub.requests if r.route != "lfs_upload")
    assert Registry().pull(URL).id == art.id  # HF_TOKEN from the environment

    monkeypatch.delenv("HF_TOKEN")
    n = len(auth_hub.requests)
    with pytest.raises(ArtifactNotFoundError) as missing:
        Registry().pull(URL)
    assert str(missing.value) == ("hf://alice/expert was not found, or it is private and no Hub token is set: check the "
                                  "name, or set HF_TOKEN or run `hf auth login`.")
    assert [(r.route, r.status) for r in auth_hub.requests[n:]] == [("repo_info", 401)]  # not retried
    with pytest.raises(AuthError) as push:
        HubRemote(URL).push_artifact(art, name="expert", tag="latest")
    assert str(push.value) == ("Pushing to hf://alice/expert needs a Hub token with write access: set HF_TOKEN or "
                               "run `hf auth login`.")

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    for call in (lambda: Registry().pull(URL), lambda: HubRemote(URL).push_artifact(art, name="e", tag="t")):
        with pytest.raises(AuthError) as wrong:
            call()
        assert str(wrong.value) == ("The Hub refused the token for hf://alice/expert (401): set a valid HF_TOKEN or run "
                                    "`hf auth login`.")


def test_missing_repo_revision_and_manifest(hub, artifacts):
    with pytest.raises(ArtifactNotFoundError) as repo:
        Registry().pull("hf://alice/nope")
    assert "hf://alice/nope was not found" in str(repo.value) and "HF_TOKEN" in str(repo.value)
    HubRemote(URL).push_artifact(artifacts["compeft"], name="expert", tag="latest")
    with pytest.raises(ArtifactNotFoundError) as rev:
        Registry().pull(f"{URL}@v9")
    assert str(rev.value) == ("alice/expert has no revision 'v9' on the Hub: check the branch or commit "
                              "(`deltahub ls hf://alice/expert`).")
    hub.create_repo("alice/empty")
    with pytest.raises(ArtifactNotFoundError) as empty:
        Registry().pull("hf://alice/empty")
    assert str(empty.value) == ("hf://alice/empty holds no deltahub.json: it is not a deltahub artifact. Push one with "
                                "`deltahub push NAME --to hf://alice/empty`.")
    assert Registry("hf://alice/empty").ls() == [] and Registry().ls() == []


def test_bad_urls():
    assert parse_hub_url("hf://org/repo@v1.2").revision == "v1.2"
    assert HubRemote.split_ref("hf://org/repo@abc") == ("hf://org/repo", "@abc")
    assert HubRemote.split_ref("hf://org/repo") == ("hf://org/repo", "")
    for bad in ("hf://org", "hf://org/repo/extra", "hf://../x", "hf://org/re po", "hf://org/repo@", "hf://a/b@x\0y",
                "hf://datasets/org/x", "s3://org/repo"):
        with pytest.raises(RegistryError):
            parse_hub_url(bad)


# ------------------------------------------------------------------------------------------ hostile servers
@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_refused_before_any_download(hub, artifacts, tmp_path, name):
    HubRemote(URL).push_artifact(artifacts["compeft"], name="expert", tag="latest")
    hub.inject_file(REPO, name)
    before = snapshot(tmp_path, home())
    n = len(hub.requests)
    with pytest.raises(UnsafePathError) as err:
        Registry().pull(URL)
    assert str(err.value) == (f"hf://alice/expert holds a file named {name!r} that could escape the download folder; "
                              "refusing to pull anything from it.")
    assert [r.route for r in hub.requests[n:]] == ["repo_info", "tree"]  # nothing downloaded
    assert snapshot(tmp_path, home()) == before  # nothing written anywhere, inside or outside
    assert local_blobs() == [] and import_dirs() == [] and Registry().ls() == []
    assert not Path("/abs").exists() and not (tmp_path.parent / "x").exists()
    with pytest.raises(UnsafePathError):
        HubRemote(URL).pull_artifact("", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_manifest_with_reserved_or_missing_files(hub, artifacts):
    art = artifacts["compeft"]
    HubRemote(URL).push_artifact(art, name="expert", tag="latest")
    manifest = json.loads(hub.file_bytes(REPO, "deltahub.json"))
    manifest["files"].append({"path": "missing.safetensors", "size": 3, "sha256": "0" * 64})
    hub.commit_files(REPO, {"deltahub.json": json.dumps(manifest).encode()})
    with pytest.raises(IntegrityError, match=re.escape("hf://alice/expert lacks 'missing.safetensors', which its "
                                                       "deltahub.json lists: the artifact on the Hub is incomplete.")):
        Registry().pull(URL)
    manifest["files"][-1] = {"path": ".cache/huggingface/download/x.metadata", "size": 3, "sha256": "0" * 64}
    hub.commit_files(REPO, {"deltahub.json": json.dumps(manifest).encode()})
    with pytest.raises(UnsafePathError, match="a reserved name"):
        Registry().pull(URL)
    assert local_blobs() == [] and import_dirs() == []


def test_flipped_byte_is_refused_and_nothing_is_stored(hub, artifacts):
    art = artifacts["compeft"]
    HubRemote(URL).push_artifact(art, name="expert", tag="latest")
    payload = art.manifest.files[0].path
    hub.corrupt(REPO, payload, offset=200)
    with pytest.raises(IntegrityError) as err:
        Registry().pull(URL)
    assert str(err.value) == (f"hf://alice/expert: {payload} does not match its sha256 in the manifest: it is corrupted. "
                              "Pull again.")
    assert gets(hub, payload) == [200] * backends.ATTEMPTS  # fetched again each try, always 200 with a bad byte
    assert local_blobs() == [] and import_dirs() == [] and Registry().ls() == []
    hub.uncorrupt(REPO, payload)
    assert Registry().pull(URL).id == art.id


@pytest.mark.parametrize("times", [1, None], ids=["once", "always"])
def test_a_stall_mid_body_is_healed_or_typed(hub, artifacts, monkeypatch, times):
    """The Hub goes silent half-way through a payload: the read timeout fires; a retry heals a one-off."""
    import time

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.3)
    art = artifacts["compeft"]
    HubRemote(URL).push_artifact(art, name="expert", tag="latest")
    payload = art.manifest.files[0].path
    hub.slow_body(REPO, payload, "stall", times=times, after_bytes=100, delay=5.0)
    t0 = time.monotonic()
    if times is None:
        with pytest.raises(RemoteError):
            Registry().pull(URL)
        assert local_blobs() == [] and Registry().ls() == []
    else:
        assert Registry().pull(URL).id == art.id
    # bounded, never a hang: each of our tries lets huggingface_hub resume up to 5 times, 0.3 s timeout each
    assert time.monotonic() - t0 < 60
    assert gets(hub, payload)[0] == 200


def test_a_slow_drip_arrives_complete(hub, artifacts):
    art = artifacts["compeft"]
    HubRemote(URL).push_artifact(art, name="expert", tag="latest")
    payload = art.manifest.files[0].path
    hub.slow_body(REPO, payload, "drip", times=None, after_bytes=64, delay=0.002)
    got = Registry().pull(URL)
    assert got.id == art.id
    got.verify_files()


def test_flipped_byte_in_transit_once_is_healed(hub, artifacts, monkeypatch):
    art = artifacts["compeft"]
    HubRemote(URL).push_artifact(art, name="expert", tag="latest")
    payload = art.manifest.files[0].path
    hub.corrupt(REPO, payload)
    orig = HubRemote._download

    def download(self, api, sha, filename, dest, box):
        if box[0] == 1:
            hub.uncorrupt(REPO, payload)  # the second try gets good bytes
        return orig(self, api, sha, filename, dest, box)

    monkeypatch.setattr(HubRemote, "_download", download)
    assert Registry().pull(URL).id == art.id and gets(hub, payload) == [200, 200]


def test_corrupt_manifest_in_transit(hub, artifacts):
    HubRemote(URL).push_artifact(artifacts["compeft"], name="expert", tag="latest")
    hub.corrupt(REPO, "deltahub.json", offset=5)
    with pytest.raises(IntegrityError, match="the downloaded deltahub.json does not match the Hub's hash of it"):
        Registry().pull(URL)
    assert local_blobs() == []


def test_5xx_are_retried(hub, artifacts):
    art = artifacts["compeft"]
    hub.fail_next("create_repo", status=503)
    hub.fail_next("repo_info", status=502)  # the client does not retry these; we do
    HubRemote(URL).push_artifact(art, name="expert", tag="latest")
    hub.fail_next("repo_info", status=500)
    hub.fail_next("resolve", method="GET")  # the client does not retry a failed GET either
    assert Registry().pull(URL).id == art.id
    assert [r.status for r in hub.requests if r.route == "resolve" and r.method == "GET"][:2] == [500, 200]
    hub.fail_next("resolve", method="GET", n=backends.ATTEMPTS, status=503)
    with pytest.raises(RemoteError) as err:
        HubRemote(URL).pull_artifact("", Path(os.environ["DELTAHUB_HOME"]) / "dest")
    assert str(err.value) == (f"Download hf://alice/expert@{hub.head(REPO)} failed after {backends.ATTEMPTS} tries "
                              "(HTTP 503); the Hub or the network is having trouble, retry later.")
    assert not (home() / "dest").exists()


@pytest.mark.parametrize("kinds", [["reset"], ["flip"], ["truncate", "ignore_range"]], ids="+".join)
def test_network_faults_mid_body_through_a_proxy(hub, artifacts, monkeypatch, tmp_path, kinds):
    """A connection reset or a short body mid-download, one flipped byte, a Range ignored: retried, then verified."""
    try:
        from s3server import run_fault_proxy
    except ImportError:
        from s3server import run_fault_proxy  # type: ignore[no-redef]
    from hubserver import patch_hf_env

    art = artifacts["compeft"]
    HubRemote(URL).push_artifact(art, name="expert", tag="latest")
    payload = art.manifest.files[0].path
    with run_fault_proxy(hub.url) as proxy:
        patch_hf_env(monkeypatch, proxy.endpoint_url, tmp_path / "hf_home_proxy")
        faults = [proxy.add_fault(kind, match=f"/resolve/{hub.head(REPO)}/{payload}", after_bytes=100) for kind in kinds]
        pulled = Registry().pull(URL)
        assert pulled.id == art.id and pulled.decode().keys() == art.decode().keys()
        assert [f.hits for f in faults] == [1] * len(kinds)
        # a short body is fetched again by the client (maybe with a Range, maybe answered whole), a flipped byte by
        # us: two GETs either way
        assert len(proxy.requests("GET", match=payload)) == 2
    assert local_blobs() and import_dirs() == []


def test_client_errors_are_not_retried(hub, artifacts):
    HubRemote(URL).push_artifact(artifacts["compeft"], name="expert", tag="latest")
    hub.fail_next("repo_info", status=400)
    with pytest.raises(RemoteError, match=r"^The Hub refused to read hf://alice/expert \(HTTP 400: hubserver: injected fault"):
        Registry().pull(URL)
    assert [r.status for r in hub.requests if r.route == "repo_info"][-1] == 400 and hub.count("resolve", "GET") == 0


def test_concurrent_push_412_is_retried_on_the_new_head(hub, artifacts):
    HubRemote(URL).push_artifact(artifacts["compeft"], name="expert", tag="latest")
    hub.fail_next("commit", status=412)  # another push moved the branch between our listing and our commit
    info = HubRemote(URL).push_artifact(artifacts["dense"], name="expert", tag="latest")
    assert [r.status for r in hub.requests if r.route == "commit"] == [200, 412, 200]
    assert info.url == f"{URL}@{hub.head(REPO)}" and Registry().pull(URL).id == artifacts["dense"].id


def test_offline_mode_is_not_retried(hub, artifacts, monkeypatch):
    from huggingface_hub import constants

    HubRemote(URL).push_artifact(artifacts["compeft"], name="expert", tag="latest")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(hub.requests)
    with pytest.raises(RemoteError, match=re.escape("Cannot reach the Hub for hf://alice/expert: HF_HUB_OFFLINE is set")):
        Registry().pull(URL)
    assert len(hub.requests) == n


def test_remote_protocol_ls_and_verify(hub, artifacts):
    from deltahub.registry import Remote, open_remote

    remote = open_remote(URL)
    assert isinstance(remote, HubRemote) and isinstance(remote, Remote) and remote.url == URL
    remote.push_artifact(artifacts["compeft"], name="expert", tag="latest")
    [info] = remote.ls()
    assert (info.name, info.tag, info.id, info.codec) == ("expert", "latest", artifacts["compeft"].id, "compeft")
    assert remote.verify() == []
    hub.corrupt(REPO, artifacts["compeft"].manifest.files[0].path)
    assert remote.verify() == [f"hf://alice/expert: {artifacts['compeft'].manifest.files[0].path} does not match its "
                               "sha256 in the manifest: it is corrupted. Pull again."]


# ------------------------------------------------------------------------------------------ card
def test_card_of_pushed_artifact(hub, artifacts, tmp_path):
    from huggingface_hub import ModelCard

    art = artifacts["compeft"]
    HubRemote(URL).push_artifact(art, name="expert", tag="latest")
    text = hub.file_bytes(REPO, "README.md").decode()
    card = ModelCard(text)
    assert check_card(text) == []
    (tmp_path / "README.md").write_text(text)
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.to_dict() == card.data.to_dict()
    data = card.data.to_dict()
    assert data["library_name"] == "deltahub" and {"deltahub", "compeft"} <= set(data["tags"])
    assert "base_model" not in data  # the base was a local file: never claimed as a Hub repo
    s = art.manifest.stats
    meta = data["deltahub"]
    assert (meta["id"], meta["repo"], meta["bits_per_param"], meta["ratio_vs_fp16"], meta["rel_error"]) == (
        art.id, REPO, s["bits_per_param"], s["ratio_vs_fp16"], s["rel_error"])
    for shown in ("deltahub pull hf://alice/expert\n", "deltahub apply expert --base BASE_MODEL_DIR -o merged/",
                  'Registry().pull("hf://alice/expert")', "https://arxiv.org/abs/2311.13171",
                  f"| bits per parameter | {s['bits_per_param']:.4g} |", f"{s['ratio_vs_fp16']:.4g}×",
                  f"| relative reconstruction error | {s['rel_error']:.4g} |", art.manifest.base.fingerprint):
        assert shown in card.text
    # the pulled folder is the manifest and its payloads only; `deltahub card` renders from the verified manifest
    pulled = Registry().pull(URL)
    assert not (pulled.folder / "README.md").exists() or check_card((pulled.folder / "README.md").read_text()) == []


# ------------------------------------------------------------------------------------------ CLI
def run_cli(*args: str):
    from click.testing import CliRunner

    from deltahub.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_cli_push_pull_ls_card(hub, artifacts, tmp_path):
    art = artifacts["compeft"]
    result = run_cli("push", str(art.folder), "--to", URL)
    assert result.exit_code == 0, result.output
    assert f"pushed expert:latest ({art.id[:12]}" in result.output and URL in result.output
    first = hub.head(REPO)
    assert run_cli("push", str(artifacts["dense"].folder), "--to", URL).exit_code == 0

    result = run_cli("pull", f"{URL}@{first}", "-o", str(tmp_path / "copy"))
    assert result.exit_code == 0, result.output
    assert f"pulled expert ({art.id[:12]})" in result.output and deltahub.load(tmp_path / "copy").id == art.id
    result = run_cli("pull", URL)
    assert result.exit_code == 0 and f"pulled expert ({artifacts['dense'].id[:12]})" in result.output

    result = run_cli("ls", URL, "--json")
    assert result.exit_code == 0 and json.loads(result.output)[0]["id"] == artifacts["dense"].id
    listed = run_cli("ls").output
    assert "expert" in listed and first[:12] in listed and "latest" in listed

    result = run_cli("card", URL)  # the repo id comes from the ref
    assert result.exit_code == 0 and check_card(result.output) == [] and "deltahub pull hf://alice/expert" in result.output


def test_cli_push_private(auth_hub, artifacts, monkeypatch):
    result = run_cli("push", str(artifacts["dense"].folder), "--to", URL, "--private")
    assert result.exit_code == 0, result.output
    assert auth_hub.repos[REPO].private is True
    monkeypatch.delenv("HF_TOKEN")
    result = run_cli("pull", URL)
    assert result.exit_code == 1 and "it is private and no Hub token is set" in result.output
    assert run_cli("push", str(artifacts["dense"].folder), "--private").exit_code == 2  # local target


def test_cli_errors_are_one_line(auth_hub, artifacts, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result = run_cli("push", str(artifacts["dense"].folder), "--to", URL)
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: Pushing to hf://alice/expert needs a Hub token with write access: set "
                                     "HF_TOKEN or run `hf auth login`.")
    result = run_cli("pull", "hf://alice/missing@v1")
    assert result.exit_code == 1 and result.output.startswith("Error: hf://alice/missing@v1 was not found")
    result = run_cli("pull", "hf://alice")
    assert result.exit_code == 1 and "does not name a Hub repo" in result.output
