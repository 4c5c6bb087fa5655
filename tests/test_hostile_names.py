"""R11: hostile names from manifests, remotes and the command line never write outside the registry or folder.

Names are checked by the two gates (``check_relpath`` for files an artifact lists, ``check_name`` for
artifact names and tags), then driven through real sinks: an artifact folder, a ``file://`` registry whose
manifest or ref folders carry the name, and ``deltahub push --name``. A snapshot of the whole test folder
before and after shows nothing was written outside the registry roots. (Hub listings: tests/test_hub.py.)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
from _registry_fixtures import cli

import deltahub
from deltahub.errors import DeltaHubError, RegistryError, UnsafePathError
from deltahub.manifest import check_relpath
from deltahub.registry import Registry
from deltahub.registry.refs import check_name, is_valid_name
from deltahub.testing import pico_pair

HOSTILE = [
    "..", ".", "", "../x", "../../etc/passwd", "a/../../x", "x/..", "./x", "x/", "x//y", "/abs", "/etc/passwd",
    "C:\\x", "C:x", "c:/x", "\\\\host\\share\\x", "//host/share/x", "x\\..\\y", "nul\0byte", "tab\tname",
    "del\x7fname", "CON", "con.safetensors", "NUL", "aux.json", "COM1", "lpt9.txt", "CONIN$", "x:stream",
    "name.", "name ", "a" * 300, "a/" * 600 + "a", "．．/x", "‥/x", "x／y", "x∕y", "x⁄y", "\u202eexe.txt",
    "zero\u200bwidth", "café", "~/.ssh/id_rsa", "$HOME", "*", "x?y", 'x"y', "x<y", "x>y", "x|y",
]


def outside(tmp: Path, roots: list[Path]) -> set[str]:
    """Every path under ``tmp`` that is not inside one of ``roots``."""
    return {str(p) for p in tmp.rglob("*") if not any(p == r or r in p.parents for r in roots)}


def test_the_list_is_long_enough():
    assert len(set(HOSTILE)) == len(HOSTILE) >= 30


@pytest.mark.parametrize("name", HOSTILE)
def test_file_names_are_refused(name):
    with pytest.raises(UnsafePathError):
        check_relpath(name)


@pytest.mark.parametrize("name", HOSTILE)
def test_artifact_names_and_tags_are_refused(name):
    with pytest.raises((UnsafePathError, RegistryError)):
        check_name(name)
    with pytest.raises((UnsafePathError, RegistryError)):
        check_name(name, "tag")
    assert not is_valid_name(name)


def test_names_that_read_as_options_are_refused():
    with pytest.raises(RegistryError):
        check_name("-rf")


def test_portable_names_pass():
    for ok in ("payload-00001.safetensors", "model_config.json", "README.md", "sub/dir/file.bin", ".gitattributes",
               "console.json", "nullable", "com10", "a" * 255):
        assert check_relpath(ok) == ok
    for ok in ("expert", "my-expert_v2.1", "v2", "a" * 128, "console"):
        assert check_name(ok) == ok


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("names")
    base, ft = pico_pair(tmp / "models")
    return deltahub.compress(str(ft), base=str(base), codec="dense", out=tmp / "expert")


@pytest.mark.parametrize("name", HOSTILE)
def test_a_manifest_naming_a_hostile_file(artifact, tmp_path, name):
    """The folder, and a file:// registry serving that manifest: refused before any file is read or written."""
    folder = tmp_path / "art"
    shutil.copytree(artifact.folder, folder)
    m = json.loads((folder / "deltahub.json").read_text())
    m["files"][0]["path"] = name
    for t in m["tensors"]:
        t["file"] = name
    raw = json.dumps(m).encode()
    (folder / "deltahub.json").write_bytes(raw)
    remote = tmp_path / "remote"
    Registry(f"file://{remote}").push(artifact.folder, name="expert")
    new_id = hashlib.sha256(raw).hexdigest()  # the registry's manifest blob, and a ref pointing at it
    (remote / "blobs" / "sha256" / new_id).write_bytes(raw)
    (ref,) = (remote / "refs" / "expert" / "latest").iterdir()
    (ref.parent / f"{time.time_ns() + 10**12:020d}-{new_id}").write_bytes(ref.read_bytes())
    home = tmp_path / "home"
    before = outside(tmp_path, [home])
    with pytest.raises(UnsafePathError):
        deltahub.Artifact.load(folder)
    with pytest.raises(UnsafePathError):
        Registry(f"file://{remote}").pull(f"file://{remote}/expert")
    assert outside(tmp_path, [home]) == before
    assert Registry().ls() == []


@pytest.mark.parametrize("name", [n for n in HOSTILE if n and "\0" not in n and "/" not in n and n not in (".", "..")
                                  and len(n.encode()) <= 255])
def test_hostile_ref_folders_in_a_remote(artifact, tmp_path, name):
    """A remote whose refs/ holds a folder of that name: ls skips it, a pull of it is a typed error."""
    remote = tmp_path / "remote"
    Registry(f"file://{remote}").push(artifact.folder, name="expert")
    good = remote / "refs" / "expert"
    shutil.copytree(good, remote / "refs" / name)
    home = tmp_path / "home"
    before = outside(tmp_path, [home])
    assert [r.name for r in Registry(f"file://{remote}").ls()] == ["expert"]
    with pytest.raises(DeltaHubError):
        Registry().pull(f"file://{remote}/{name}")
    assert outside(tmp_path, [home]) == before
    assert Registry().ls() == []


@pytest.mark.parametrize("name", ["../x", "/abs", "CON", "name.", "．．", "a" * 300, "x:y"])
def test_push_with_a_hostile_name_exits_1(artifact, tmp_path, monkeypatch, name):
    monkeypatch.setenv("DELTAHUB_HOME", str(tmp_path / "home"))
    before = outside(tmp_path, [tmp_path / "home"])
    res = cli(["push", str(artifact.folder), "--name", name])
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = cli(["push", str(artifact.folder), "--tag", name])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert outside(tmp_path, [tmp_path / "home"]) == before
