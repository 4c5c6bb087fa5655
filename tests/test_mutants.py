"""R2: truncations and bit flips of every file of an artifact are caught before anything parses them.

Three levels, as a user meets them:

* an artifact folder: every truncation and every single-bit flip of its payload file (exhaustive,
  about 10^4 mutants) fails the size/sha256 check of ``Artifact.load``;
* the same mutants with the hash check bypassed (``verify=False``), sampled by hypothesis: the parsers
  and codecs end in a typed error or a valid tensor, never another exception;
* a ``file://`` registry: a truncated or flipped manifest, payload or card blob is refused by ``pull``,
  and nothing of it reaches the local registry.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deltahub
from deltahub.artifact import Artifact
from deltahub.errors import DeltaHubError, IntegrityError
from deltahub.registry import Registry
from deltahub.testing import pico_pair

PAYLOAD = "payload-00001.safetensors"
FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mutants")
    base, ft = pico_pair(tmp / "models")
    return deltahub.compress(str(ft), base=str(base), codec="compeft", density=0.5, out=tmp / "expert")


def mutants(data: bytes):
    """Every strict prefix, then every single-bit flip, of ``data``."""
    for n in range(len(data)):
        yield f"truncated to {n}", data[:n]
    for i in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[i // 8] ^= 1 << (i % 8)
        yield f"bit {i} flipped", bytes(flipped)


def draw_mutant(data, good: bytes) -> bytes:
    """One strict prefix or one single-bit flip of ``good``, drawn by hypothesis."""
    if data.draw(st.booleans(), label="truncate"):
        return good[: data.draw(st.integers(0, len(good) - 1), label="keep")]
    bit = data.draw(st.integers(0, len(good) * 8 - 1), label="bit")
    flipped = bytearray(good)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


def test_every_payload_mutant_fails_the_hash_check(artifact, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(artifact.folder, folder)
    good = (folder / PAYLOAD).read_bytes()
    tried = missed = 0
    for what, data in mutants(good):
        (folder / PAYLOAD).write_bytes(data)
        tried += 1
        try:
            Artifact.load(folder)
            missed += 1
        except IntegrityError:
            pass
    assert tried == len(good) * 9 and tried >= 9_000
    assert missed == 0


def _decode_all(folder: Path) -> None:
    art = Artifact.load(folder, verify=False)
    for entry in art.manifest.tensors:
        art.decode_tensor(entry)
        if entry.op == "add":
            art.resident(entry)


@FAST
@given(data=st.data())
def test_payload_mutants_past_the_hash_end_in_typed_errors(artifact, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("bypass")
    shutil.copytree(artifact.folder, folder, dirs_exist_ok=True)
    good = (folder / PAYLOAD).read_bytes()
    mutant = draw_mutant(data, good)
    (folder / PAYLOAD).write_bytes(mutant)
    try:
        _decode_all(folder)
    except DeltaHubError:
        pass  # a typed refusal; a flip inside a value may also decode to another valid tensor


@FAST
@given(data=st.data())
def test_manifest_mutants_end_in_typed_errors(artifact, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("manifest")
    shutil.copytree(artifact.folder, folder, dirs_exist_ok=True)
    good = (folder / "deltahub.json").read_bytes()
    mutant = draw_mutant(data, good)
    (folder / "deltahub.json").write_bytes(mutant)
    try:
        _decode_all(folder)
    except DeltaHubError:
        pass


@pytest.fixture(scope="module")
def remote(artifact, tmp_path_factory):
    """A file:// registry holding the artifact, and the paths of its blobs (manifest, payload, card)."""
    root = tmp_path_factory.mktemp("remote") / "reg"
    Registry(f"file://{root}").push(artifact.folder, name="expert")
    blobs = sorted((root / "blobs").rglob("*"))
    return root, [b for b in blobs if b.is_file()]


@FAST
@given(data=st.data())
def test_a_damaged_remote_blob_is_refused_and_nothing_is_stored(remote, tmp_path_factory, monkeypatch, data):
    root, blobs = remote
    work = tmp_path_factory.mktemp("pull")
    copy = work / "reg"
    shutil.copytree(root, copy)
    victim = copy / blobs[data.draw(st.integers(0, len(blobs) - 1), label="blob")].relative_to(root)
    good = victim.read_bytes()
    mutant = draw_mutant(data, good)
    victim.chmod(0o644)
    victim.write_bytes(mutant)
    monkeypatch.setenv("DELTAHUB_HOME", str(work / "home"))
    with pytest.raises(IntegrityError):
        Registry().pull(f"file://{copy}/expert")
    local = Registry()
    assert local.ls() == []
    assert local.verify() == []  # nothing damaged was installed


@FAST
@given(data=st.data())
def test_a_damaged_ref_entry_never_yields_another_artifact(remote, artifact, tmp_path_factory, monkeypatch, data):
    """Ref entries carry a summary beside the id (in the file name): damage there is refused or harmless."""
    root, _ = remote
    work = tmp_path_factory.mktemp("ref")
    copy = work / "reg"
    shutil.copytree(root, copy)
    (victim,) = [p for p in (copy / "refs").rglob("*") if p.is_file()]
    good = victim.read_bytes()
    mutant = draw_mutant(data, good)
    victim.chmod(0o644)
    victim.write_bytes(mutant)
    monkeypatch.setenv("DELTAHUB_HOME", str(work / "home"))
    try:
        got = Registry().pull(f"file://{copy}/expert")
    except DeltaHubError:
        return
    assert got.id == artifact.id
