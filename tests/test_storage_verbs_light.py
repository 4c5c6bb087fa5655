"""push, pull, ls, verify and gc move and hash bytes: they run without importing torch (issue 14, item 4).

Each verb runs in a fresh interpreter through the real console entry point; the artifacts are compressed
with every built-in codec family so no codec plugin is imported on the way (cards name built-ins from a table).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import deltahub
from deltahub.testing import pico_pair

PROBE = """
import json, sys
from deltahub.cli import main
code = 0
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code or 0
heavy = sorted(m for m in ("torch", "triton", "numpy", "safetensors.torch") if m in sys.modules)
print("PROBE" + json.dumps({"code": code, "heavy": heavy}))
"""


def verb(args: list[str], home) -> dict:
    env = {**os.environ, "DELTAHUB_HOME": str(home), "DELTAHUB_NO_PROGRESS": "1"}
    res = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=120, check=False)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("PROBE")]
    assert line, f"{args}: {res.stdout}{res.stderr}"
    return json.loads(line[-1][5:])


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("light")
    base, ft = pico_pair(tmp)
    out = []
    for codec, params in (("dense", {}), ("compeft", {}), ("bitdelta", {}), ("auto", {"max_bits_per_param": 2})):
        out.append(deltahub.compress(str(ft), base=str(base), codec=codec, out=tmp / f"exp-{codec}",
                                     name=f"exp-{codec}", **params))
    return out


@pytest.mark.slow
def test_storage_verbs_leave_torch_unimported(experts, tmp_path):
    home, remote = tmp_path / "home", f"file://{tmp_path / 'remote'}"
    runs = []
    for art in experts:
        runs += [["push", str(art.folder)], ["push", art.name, "--to", remote]]
    runs += [["ls"], ["ls", remote], ["verify"], ["verify", "--registry", remote], ["gc", "--grace", "0"],
             ["gc", "--registry", remote, "--grace", "0"]]
    for art in experts:
        runs += [["pull", f"{remote}/{art.name}"], ["pull", art.name, "-o", str(tmp_path / "out" / art.name)]]
    for args in runs:
        got = verb(args, home)
        assert got == {"code": 0, "heavy": []}, args
    fresh = tmp_path / "fresh-home"  # a pull into an empty registry builds its folders (and cards) from blobs
    assert verb(["pull", f"{remote}/{experts[1].name}"], fresh) == {"code": 0, "heavy": []}
    assert (tmp_path / "out" / experts[1].name / "README.md").is_file()


def test_push_notes_the_base_that_find_base_then_verifies(experts, tmp_path, monkeypatch):
    """push files the base's recorded path without hashing it; finding the base still checks its bytes."""
    from deltahub.registry import Registry

    monkeypatch.setenv("DELTAHUB_HOME", str(tmp_path / "home"))
    art = experts[0]
    reg = Registry()
    reg.push(art.folder)
    (record,) = (reg.local.root / "bases").rglob("*.json")
    assert json.loads(record.read_text())["fingerprint"] == art.manifest.base.fingerprint
    assert reg.find_base(art.manifest.base) is not None
    decoy = tmp_path / "decoy"  # a base of the same layout with other weights, filed under this fingerprint
    other, _ = pico_pair(tmp_path / "other", seed=7)
    other.rename(decoy)
    record.write_text(json.dumps({**json.loads(record.read_text()), "path": str(decoy)}))
    nowhere = art.manifest.base.model_copy(update={"location": {}})
    assert reg.find_base(nowhere) is None  # the record is only a candidate: the decoy's bytes are refused
    found = reg.find_base(art.manifest.base)  # the recorded location still holds the real base
    assert found is not None and found.resolve() == Path(art.manifest.base.location["path"]).resolve()
