"""Known reliability faults (issue 14 item 2), each fixed with a pinned test."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from deltahub import constants
from deltahub.errors import LockTimeoutError
from deltahub.registry.backends import LocalBackend


def test_a_lock_held_past_the_limit_is_a_typed_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = LocalBackend(tmp_path)
    lock = tmp_path / "locks" / "gc.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom filelock import FileLock\n"
        f"with FileLock({str(lock)!r}):\n    print('held', flush=True)\n    time.sleep(30)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(constants, "LOCK_TIMEOUT_S", 0.2)
        t0 = time.monotonic()
        with pytest.raises(LockTimeoutError) as e, backend.lock("gc"):
            pass
        assert time.monotonic() - t0 < 10
        assert str(e.value) == (f"Waited 0.2 s for the lock {lock} that another process holds; if no deltahub "
                                "process is running, delete that file and retry (or set DELTAHUB_NO_LOCKS=1).")
        assert isinstance(e.value, TimeoutError)
        monkeypatch.setenv("DELTAHUB_NO_LOCKS", "1")
        with backend.lock("gc"):  # locks off: no wait at all
            pass
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.delenv("DELTAHUB_NO_LOCKS")
    with backend.lock("gc"):  # released by the holder's death: taken at once
        pass


def test_no_locks_is_read_in_constants_only() -> None:
    root = Path(__file__).resolve().parents[1] / "deltahub"
    readers = [p.relative_to(root).as_posix() for p in root.rglob("*.py") if '"DELTAHUB_NO_LOCKS"' in p.read_text()]
    assert readers == ["constants.py"]


@pytest.mark.parametrize("drop", ["q", "r", "signs", "scale"])
def test_a_compeft_payload_missing_a_tensor_is_the_contracts_error(drop: str) -> None:
    import torch

    from deltahub.codecs import Encoded, get_codec

    codec = get_codec("compeft")
    enc = codec.encode(torch.randn(32, 16), codec.Config(density=0.2), None, name="w")
    hurt = Encoded(tensors={k: v for k, v in enc.tensors.items() if k != drop}, meta=enc.meta)
    for op in (codec.decode, codec.to_resident):
        with pytest.raises(ValueError, match=rf"^compeft payload lacks tensors \['{drop}'\]$"):
            op(hurt, (32, 16))


@pytest.mark.parametrize("doc", ["[" * 100_000 + "]" * 100_000,
                                 '{"format_version": 1, "x": ' + "[" * 50_000 + "]" * 50_000 + "}"])
def test_a_deeply_nested_manifest_is_a_typed_error(tmp_path: Path, doc: str) -> None:
    import deltahub
    from deltahub.errors import ManifestError

    (tmp_path / "deltahub.json").write_text(doc)
    with pytest.raises(ManifestError, match=r"^deltahub.json nests JSON too deeply to be a deltahub manifest; "):
        deltahub.load(tmp_path)


def test_an_auto_payload_from_a_newer_inner_codec_says_upgrade(tmp_path: Path) -> None:
    import json

    import torch

    import deltahub
    from deltahub.errors import CodecVersionError

    torch.manual_seed(0)
    base = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    ft = {k: v + 0.01 * torch.randn(v.shape) for k, v in base.items()}
    art = deltahub.compress(ft, base=base, codec="auto", out=tmp_path / "a", name="a",
                             max_bits_per_param=4)
    manifest = json.loads((tmp_path / "a" / "deltahub.json").read_text())
    entry = next(e for e in manifest["tensors"] if e["codec"] == "auto")
    inner = entry["meta"]["auto.codec"]
    entry["meta"]["auto.version"] = "99"
    (tmp_path / "a" / "deltahub.json").write_text(json.dumps(manifest))
    art = deltahub.load(tmp_path / "a")
    e = next(x for x in art.manifest.tensors if x.codec == "auto")
    for op in (art.decode_tensor, art.resident):
        with pytest.raises(CodecVersionError, match=rf"^This auto payload was encoded with codec {inner} v99; the "
                                                    r"installed one is v\d+. Upgrade the plugin that provides it"):
            op(e)
