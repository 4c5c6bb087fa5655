"""R1 of the reliability battery: a corpus of hostile artifact folders, each a named mutation of a valid one.

Every case keeps the manifest's file sizes and sha256 consistent with the mutated bytes (an attacker can
always do that), so each one reaches the parsers and codecs behind the hash check. Opening a case runs
what a user runs: ``Artifact.load``, then ``decode_tensor`` and ``resident`` for every entry, then
``deltahub.apply`` onto the base. Each must end in a :class:`~deltahub.errors.DeltaHubError`.

    python tests/hostile_corpus.py            # the results table (RELIABILITY.md), peak RSS and times

(``tests/test_hostile_files.py`` runs the same corpus in a fresh process and asserts on it.)
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PAYLOAD = "payload-00001.safetensors"
TB = 1 << 40

Case = tuple[str, str, Callable[[Path], None]]  # (name, group, mutate the folder in place)


# ----------------------------------------------------------------------------------------------- writing
def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "deltahub.json").read_text())


def _rehash(folder: Path, m: dict[str, Any]) -> None:
    for f in m["files"]:
        try:
            data = (folder / f["path"]).read_bytes() if ".." not in f["path"] else None
        except (OSError, ValueError):  # a hostile name that this OS cannot even stat
            data = None
        if data is not None:
            f["size"], f["sha256"] = len(data), hashlib.sha256(data).hexdigest()


def _save(folder: Path, m: dict[str, Any], text: str | None = None) -> None:
    _rehash(folder, m)
    (folder / "deltahub.json").write_text(json.dumps(m) if text is None else text)


def _entry(m: dict[str, Any], codec: str) -> dict[str, Any]:
    return next(t for t in m["tensors"] if t["codec"] == codec and t["op"] == "add")


def edit_manifest(fn: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        m = _manifest(folder)
        fn(m)
        _save(folder, m)
    return mutate


def raw_manifest(text: str | Callable[[str], str]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        old = (folder / "deltahub.json").read_text()
        (folder / "deltahub.json").write_text(text(old) if callable(text) else text)
    return mutate


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict[str, Any] | bytes, body: bytes) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def edit_payload(fn: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        p = folder / PAYLOAD
        p.write_bytes(fn(p.read_bytes()))
        _save(folder, _manifest(folder))
    return mutate


def edit_header(fn: Callable[[dict[str, Any]], Any]) -> Callable[[bytes], bytes]:
    def go(data: bytes) -> bytes:
        header, body = _split(data)
        fn(header)
        return _join(header, body)
    return go


def _key(header: dict[str, Any], suffix: str) -> str:
    return next(k for k in header if k.endswith(suffix))


def set_tensor(codec: str, role: str, values: Any, dtype: str | None = None) -> Callable[[Path], None]:
    """Rewrite one payload tensor (and its manifest record) with new contents: valid safetensors, hostile values."""
    def mutate(folder: Path) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        m = _manifest(folder)
        e = _entry(m, codec)
        pk = e["payload"][role]
        tensors = load_file(str(folder / e["file"]))
        t = torch.as_tensor(values, dtype=getattr(torch, dtype or pk["dtype"]))
        tensors[pk["key"]] = t
        save_file(tensors, str(folder / e["file"]))
        nbytes = t.numel() * t.element_size()
        pk.update(dtype=dtype or pk["dtype"], shape=list(t.shape), nbytes=nbytes, stored=nbytes)
        _save(folder, m)
    return mutate


def zstd_stage(codec: str, role: str, make: Callable[[bytes], bytes], nbytes: Callable[[int], int] | None = None):
    """Store one payload tensor through a (hostile) zstd stage."""
    def mutate(folder: Path) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        m = _manifest(folder)
        e = _entry(m, codec)
        pk = e["payload"][role]
        tensors = load_file(str(folder / e["file"]))
        raw = tensors[pk["key"]].contiguous().view(torch.uint8).numpy().tobytes()
        packed = make(raw)
        tensors[pk["key"]] = torch.frombuffer(bytearray(packed), dtype=torch.uint8) if packed else torch.empty(0, dtype=torch.uint8)
        save_file(tensors, str(folder / e["file"]))
        pk.update(stage="zstd", stored=len(packed), nbytes=nbytes(len(raw)) if nbytes else len(raw))
        _save(folder, m)
    return mutate


def _zstd(data: bytes, **kw: Any) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(**kw).compress(data)


def set_meta(codec: str, **meta: str) -> Callable[[Path], None]:
    return edit_manifest(lambda m: _entry(m, codec)["meta"].update(meta))


def set_shape(codec: str, shape: list[int]) -> Callable[[Path], None]:
    return edit_manifest(lambda m: _entry(m, codec).update(shape=shape))


def _nested(depth: int) -> str:
    return '{"format_version": 1, "x": ' + "[" * depth + "]" * depth + "}"


def _after_hash(old: str, fn: Callable[[dict[str, Any]], Any]) -> str:
    """Edit the manifest text after the hashes were fixed (for cases that lie about the files themselves)."""
    m = json.loads(old)
    fn(m)
    return json.dumps(m)


def _dup_files(old: str) -> str:
    m = json.loads(old)
    body = json.dumps(m)
    return body[:-1] + ', "files": []}'  # the same key twice: json keeps the last one silently


def _files(path: str) -> Callable[[Path], None]:
    return edit_manifest(lambda m: m["files"][0].update(path=path))


def _swap(a: str, b: str) -> Callable[[dict[str, Any]], None]:
    def go(h: dict[str, Any]) -> None:
        ka, kb = _key(h, a), _key(h, b)
        h[ka]["data_offsets"], h[kb]["data_offsets"] = h[kb]["data_offsets"], h[ka]["data_offsets"]
    return go


def _overlap(h: dict[str, Any]) -> None:
    keys = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    h[keys[1]]["data_offsets"] = [h[keys[0]]["data_offsets"][0], h[keys[0]]["data_offsets"][0] +
                                  h[keys[1]]["data_offsets"][1] - h[keys[1]]["data_offsets"][0]]


def _offsets(key: str, begin: int, end: int) -> Callable[[dict[str, Any]], None]:
    return lambda h: h[_key(h, key)].update(data_offsets=[begin, end])


def _hdr(key: str, **kv: Any) -> Callable[[dict[str, Any]], None]:
    return lambda h: h[_key(h, key)].update(kv)


def _dup_st_key(data: bytes) -> bytes:
    header, body = _split(data)
    text = json.dumps(header)
    k = next(k for k in header if k != "__metadata__")
    extra = json.dumps({k: header[k]})[1:-1]
    return _join((text[:-1] + ", " + extra + "}").encode(), body)


def _no_fcs(data: bytes) -> bytes:
    import zstandard

    out = bytearray()
    w = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    out += w.compress(data) + w.flush()
    return bytes(out)


def _bad_checksum(data: bytes) -> bytes:
    packed = bytearray(_zstd(data, write_checksum=True))
    packed[-1] ^= 0xFF
    return bytes(packed)


CASES: list[tuple[str, str, str, Callable[[Path], None]]] = [
    # --- safetensors container (the payload file), hashes kept consistent
    ("header length u64 max", "safetensors", "compeft", edit_payload(lambda d: struct.pack("<Q", 2**64 - 1) + d[8:])),
    ("header length beyond the file", "safetensors", "compeft", edit_payload(lambda d: struct.pack("<Q", len(d)) + d[8:])),
    ("header length zero", "safetensors", "compeft", edit_payload(lambda d: struct.pack("<Q", 0) + d[8:])),
    ("header length 100 MB + 1", "safetensors", "compeft", edit_payload(lambda d: struct.pack("<Q", 100_000_001) + d[8:])),
    ("empty payload file", "safetensors", "compeft", edit_payload(lambda d: b"")),
    ("7-byte payload file", "safetensors", "compeft", edit_payload(lambda d: d[:7])),
    ("header not JSON", "safetensors", "compeft", edit_payload(lambda d: _join(b"{not json" + b" " * 8, _split(d)[1]))),
    ("header not UTF-8", "safetensors", "compeft", edit_payload(lambda d: _join(b'{"\xff\xfe": 1}', _split(d)[1]))),
    ("header a JSON list", "safetensors", "compeft", edit_payload(lambda d: _join(b"[1, 2, 3]", _split(d)[1]))),
    ("header nested 10^5 deep", "safetensors", "compeft", edit_payload(lambda d: _join(b"[" * 100_000 + b"]" * 100_000, _split(d)[1]))),
    ("negative data offset", "safetensors", "compeft", edit_payload(edit_header(_offsets("::q", -8, 8)))),
    ("offset past the end of the file", "safetensors", "compeft", edit_payload(edit_header(_offsets("::q", 0, 10**9)))),
    ("end before begin", "safetensors", "compeft", edit_payload(edit_header(_offsets("::q", 40, 8)))),
    ("overlapping tensors", "safetensors", "compeft", edit_payload(edit_header(_overlap))),
    ("two tensors swap offsets", "safetensors", "compeft", edit_payload(edit_header(_swap("::q", "::r")))),
    ("dtype F64 over uint8 bytes", "safetensors", "compeft", edit_payload(edit_header(_hdr("::q", dtype="F64")))),
    ("unknown dtype", "safetensors", "compeft", edit_payload(edit_header(_hdr("::q", dtype="Q7")))),
    ("shape product overflows u64", "safetensors", "compeft", edit_payload(edit_header(_hdr("::q", shape=[2**40, 2**40])))),
    ("shape of terabytes", "safetensors", "compeft", edit_payload(edit_header(_hdr("::q", shape=[TB])))),
    ("negative shape", "safetensors", "compeft", edit_payload(edit_header(_hdr("::q", shape=[-1])))),
    ("duplicate tensor key", "safetensors", "compeft", edit_payload(_dup_st_key)),
    ("trailing bytes after the data", "safetensors", "compeft", edit_payload(lambda d: d + b"PK\x03\x04polyglot")),
    ("body truncated by 1 byte", "safetensors", "compeft", edit_payload(lambda d: d[:-1])),
    ("payload key missing", "safetensors", "compeft", edit_payload(edit_header(lambda h: h.pop(_key(h, "::signs"))))),
    ("payload key renamed", "safetensors", "compeft",
     edit_payload(edit_header(lambda h: h.__setitem__("other::q", h.pop(_key(h, "::q")))))),
    # --- manifest
    ("manifest not JSON", "manifest", "compeft", raw_manifest("{format_version: 1")),
    ("manifest empty", "manifest", "compeft", raw_manifest("")),
    ("manifest nested 10^5 arrays", "manifest", "compeft", raw_manifest(_nested(100_000))),
    ("manifest nested 10^4 objects", "manifest", "compeft", raw_manifest('{"a":' * 10_000 + "1" + "}" * 10_000)),
    ("manifest 10^5-digit integer", "manifest", "compeft", raw_manifest('{"format_version": ' + "9" * 100_000 + "}")),
    ("manifest of 80 MB", "manifest", "compeft", raw_manifest(lambda old: old[:-1] + ', "pad": "' + "x" * (80 << 20) + '"}')),
    ("manifest duplicate key", "manifest", "compeft", raw_manifest(_dup_files)),
    ("format_version from the future", "manifest", "compeft", edit_manifest(lambda m: m.update(format_version=999))),
    ("format_version a string", "manifest", "compeft", edit_manifest(lambda m: m.update(format_version="1"))),
    ("file path ../escape", "manifest", "compeft", _files("../escape.safetensors")),
    ("file path absolute", "manifest", "compeft", _files("/etc/passwd")),
    ("file path UNC", "manifest", "compeft", _files("\\\\server\\share\\x")),
    ("file path drive", "manifest", "compeft", _files("C:x.safetensors")),
    ("file path with NUL", "manifest", "compeft", _files("payload\x00.safetensors")),
    ("file path Windows device name", "manifest", "compeft", _files("CON.safetensors")),
    ("file path NTFS stream", "manifest", "compeft", _files("payload-00001.safetensors:evil")),
    ("file path of 10,000 characters", "manifest", "compeft", _files("a" * 10_000)),
    ("file size negative", "manifest", "compeft", raw_manifest(lambda old: _after_hash(old, lambda m: m["files"][0].update(size=-1)))),
    ("file size above the file's", "manifest", "compeft", raw_manifest(lambda old: _after_hash(old, lambda m: m["files"][0].update(size=10**12)))),
    ("file sha256 not hex", "manifest", "compeft", raw_manifest(lambda old: _after_hash(old, lambda m: m["files"][0].update(sha256="z" * 64)))),
    ("tensor file not listed", "manifest", "compeft", edit_manifest(lambda m: _entry(m, "compeft").update(file="other.safetensors"))),
    ("tensor shape negative", "manifest", "compeft", set_shape("compeft", [-48, 40])),
    ("tensor shape of terabytes", "manifest", "compeft", set_shape("compeft", [TB, TB])),
    ("tensor shape not the base's", "manifest", "compeft", set_shape("compeft", [40, 48])),
    ("unknown codec", "manifest", "compeft", edit_manifest(lambda m: _entry(m, "compeft").update(codec="evil"))),
    ("codec version from the future", "manifest", "compeft", edit_manifest(lambda m: _entry(m, "compeft").update(codec_version=99))),
    ("unknown op", "manifest", "compeft", edit_manifest(lambda m: _entry(m, "compeft").update(op="exec"))),
    ("payload dtype differs from the file", "manifest", "compeft",
     edit_manifest(lambda m: _entry(m, "compeft")["payload"]["q"].update(dtype="float32"))),
    ("payload nbytes of terabytes", "manifest", "compeft",
     edit_manifest(lambda m: _entry(m, "compeft")["payload"]["q"].update(nbytes=TB))),
    # --- zstd stage
    ("zstd stage over raw bytes", "zstd", "dense", zstd_stage("dense", "values", lambda raw: raw)),
    ("zstd bomb: 256 MiB of zeros, small nbytes", "zstd", "dense",
     zstd_stage("dense", "values", lambda raw: _zstd(b"\0" * (256 << 20)))),
    ("zstd without frame content size", "zstd", "dense", zstd_stage("dense", "values", _no_fcs, lambda n: n + 4)),
    ("zstd trailing garbage", "zstd", "dense", zstd_stage("dense", "values", lambda raw: _zstd(raw) + b"garbage")),
    ("zstd two frames", "zstd", "dense", zstd_stage("dense", "values", lambda raw: _zstd(raw[:64]) + _zstd(raw[64:]))),
    ("zstd checksum mismatch", "zstd", "dense", zstd_stage("dense", "values", _bad_checksum)),
    ("zstd truncated frame", "zstd", "dense", zstd_stage("dense", "values", lambda raw: _zstd(raw)[:-3])),
    ("zstd empty", "zstd", "dense", zstd_stage("dense", "values", lambda raw: b"")),
    # --- codec payloads: valid containers, hostile values
    ("compeft scale NaN", "codec", "compeft", set_tensor("compeft", "scale", [float("nan")])),
    ("compeft scale +Inf", "codec", "compeft", set_tensor("compeft", "scale", [float("inf")])),
    ("compeft count above numel", "codec", "compeft", set_meta("compeft", count="99999999")),
    ("compeft count negative", "codec", "compeft", set_meta("compeft", count="-5")),
    ("compeft Rice k = 255", "codec", "compeft", set_meta("compeft", k="255")),
    ("compeft Rice k negative", "codec", "compeft", set_meta("compeft", k="-1")),
    ("compeft numel not the shape's", "codec", "compeft", set_meta("compeft", numel="7")),
    ("compeft position stream all ones", "codec", "compeft", set_tensor("compeft", "q", [255] * 43)),
    ("compeft signs too short", "codec", "compeft", set_tensor("compeft", "signs", [0])),
    ("dare coded mode unknown", "codec", "dare", set_meta("dare", coded="evil")),
    ("dare count above numel", "codec", "dare", set_meta("dare", count="99999")),
    ("dare values +Inf", "codec", "dare", set_tensor("dare", "values", [float("inf")] * 170)),
    ("dare values too few", "codec", "dare", set_tensor("dare", "values", [0.5] * 3)),
    ("bitdelta scale NaN", "codec", "bitdelta", set_tensor("bitdelta", "scale", [float("nan")])),
    ("bitdelta scale -Inf", "codec", "bitdelta", set_tensor("bitdelta", "scale", [float("-inf")])),
    ("bitdelta signs too short", "codec", "bitdelta", set_tensor("bitdelta", "signs", [1] * 10)),
    ("bitdelta signs too long", "codec", "bitdelta", set_tensor("bitdelta", "signs", [1] * 999)),
    ("binary bits = 0", "codec", "binary", set_meta("binary", bits="0")),
    ("binary bits = 9", "codec", "binary", set_meta("binary", bits="9")),
    ("binary bits = 255", "codec", "binary", set_meta("binary", bits="255")),
    ("binary sigma NaN", "codec", "binary", set_tensor("binary", "sigma", [float("nan")])),
    ("binary codes too short", "codec", "binary", set_tensor("binary", "codes", [0] * 7)),
    ("dense values NaN", "codec", "dense", set_tensor("dense", "values", [float("nan")] * 48)),
    ("dense values of the wrong length", "codec", "dense", set_tensor("dense", "values", [0.0] * 47)),
    ("auto inner codec unknown", "codec", "auto", edit_manifest(lambda m: m["tensors"][0]["meta"].update(
        {"auto.codec": "evil"}))),
    ("auto inner version not a number", "codec", "auto", edit_manifest(lambda m: m["tensors"][0]["meta"].update(
        {"auto.version": "one"}))),
    ("auto inner codec auto (recursion)", "codec", "auto", edit_manifest(lambda m: m["tensors"][0]["meta"].update(
        {"auto.codec": "auto"}))),
]

SOURCES = {"dense": {}, "compeft": {}, "dare": {}, "bitdelta": {}, "binary": {}, "auto": {"max_bits_per_param": 2}}


def make_sources(tmp: Path) -> tuple[Path, dict[str, Path]]:
    """The tiny base and one valid artifact per codec that the cases start from."""
    import deltahub
    from deltahub.testing import pico_pair

    base, ft = pico_pair(tmp / "models")
    arts = {c: deltahub.compress(str(ft), base=str(base), codec=c, out=tmp / "src" / c, **p).folder
            for c, p in SOURCES.items()}
    return base, arts


def probe(folder: Path, base: Path, out: Path) -> None:
    """What a user does with an artifact: open it, decode every tensor, build residents, apply it."""
    import deltahub
    from deltahub.artifact import Artifact

    art = Artifact.load(folder)
    for entry in art.manifest.tensors:
        art.decode_tensor(entry)
        if entry.op == "add":
            art.resident(entry)
    deltahub.apply(art, str(base), out=out)


def build(tmp: Path) -> dict[str, Any]:
    """The base, the valid sources and one folder per case under ``tmp/cases`` (plus an index)."""
    base, sources = make_sources(tmp)
    index = []
    for i, (name, group, src, mutate) in enumerate(CASES):
        folder = tmp / "cases" / f"{i:03d}"
        shutil.copytree(sources[src], folder)
        mutate(folder)
        index.append({"case": name, "group": group, "folder": str(folder)})
    spec = {"base": str(base), "sources": {k: str(v) for k, v in sources.items()}, "cases": index}
    (tmp / "corpus.json").write_text(json.dumps(spec))
    return spec


def run_case(folder: Path, base: Path, out: Path) -> dict[str, Any]:
    from deltahub.errors import DeltaHubError

    t0 = time.perf_counter()
    try:
        probe(folder, base, out)
        outcome, error = "accepted", ""
    except DeltaHubError as exc:
        outcome, error = type(exc).__name__, str(exc)
    except Exception as exc:  # noqa: BLE001 - the point: anything else is a finding
        outcome, error = f"untyped {type(exc).__name__}", str(exc)[:200]
    seconds = time.perf_counter() - t0
    written = out.exists()
    if written:
        shutil.rmtree(out)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {"outcome": outcome, "error": error.splitlines()[0][:300] if error else "", "seconds": seconds,
            "input_bytes": size, "wrote_output": written}


def probe_all(tmp: Path) -> dict[str, Any]:
    """Every built case, in this process (run it fresh): results, and peak RSS against the warm baseline."""
    spec = json.loads((tmp / "corpus.json").read_text())
    base = Path(spec["base"])
    for folder in spec["sources"].values():  # warm: imports, codec plugins, kernels, allocator pools
        probe(Path(folder), base, tmp / "warm")
        shutil.rmtree(tmp / "warm")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    results = [{**c, **run_case(Path(c["folder"]), base, tmp / "out")} for c in spec["cases"]]
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    return {"results": results, "rss_before": before, "rss_peak": after,
            "max_input": max(r["input_bytes"] for r in results)}


def run_fresh(tmp: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Build the corpus here, probe it in a fresh interpreter (so the builders' memory is not counted)."""
    import os
    import subprocess

    build(tmp)
    proc = subprocess.run([sys.executable, __file__, "--probe", str(tmp)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.splitlines()[-1])


def table(report: dict[str, Any]) -> str:
    rows = ["| case | group | outcome | s |", "|---|---|---|---|"]
    for r in report["results"]:
        rows.append(f"| {r['case']} | {r['group']} | {r['outcome']} | {r['seconds']:.3f} |")
    grow = (report["rss_peak"] - report["rss_before"]) / (1 << 20)
    return "\n".join(rows) + f"\n\npeak RSS growth over the corpus: {grow:.1f} MiB (largest input {report['max_input'] / (1 << 20):.1f} MiB)"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if sys.argv[1:2] == ["--probe"]:
        print(json.dumps(probe_all(Path(sys.argv[2]))))
    else:
        with tempfile.TemporaryDirectory() as d:
            print(table(run_fresh(Path(d))))
