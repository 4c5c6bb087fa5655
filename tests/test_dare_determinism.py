"""DARE payloads are byte-identical across processes, thread counts and tensor order (issue 3, item 1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHILD = r"""
import hashlib, json, sys
import torch
from safetensors.torch import load_file
from deltahub.codecs import get_codec

path, threads, order = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(threads)
tensors = load_file(path)
names = sorted(tensors, reverse=(order == "reverse"))
out = {}
for codec, params in (("dare", {"p": 0.9, "seed": 3}), ("dare", {"p": 0.3}), ("darex", {"p": 0.99, "q": 0.05})):
    c = get_codec(codec)
    cfg = c.parse_config(params)
    for name in names:
        enc = c.encode(tensors[name], cfg, None, name=name)
        h = hashlib.sha256(json.dumps(dict(enc.meta), sort_keys=True).encode())
        for key in sorted(enc.tensors):
            t = enc.tensors[key].contiguous()
            h.update(key.encode() + str(t.dtype).encode() + t.view(torch.uint8).numpy().tobytes())
        out[f"{codec}{params}:{name}"] = h.hexdigest()
print(json.dumps({"threads": torch.get_num_threads(), "digests": out}))
"""


@pytest.mark.slow
def test_dare_payloads_identical_across_processes(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"encoder.layer.0.weight": torch.randn(64, 48, generator=g) * 0.01,
               "encoder.layer.1.weight": torch.randn(2100, 2100, generator=g) * 0.01,  # > one 4M-word Philox chunk
               "head.weight": torch.randn(3, 5, 7, generator=g)}
    save_file(tensors, str(tmp_path / "deltas.safetensors"))
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    def run(threads: int, order: str) -> dict:
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / "deltas.safetensors"), str(threads), order],
                              capture_output=True, text=True, timeout=120, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    a, b = run(1, "forward"), run(3, "reverse")
    assert (a["threads"], b["threads"]) == (1, 3)
    assert len(a["digests"]) == 9
    assert a["digests"] == b["digests"]
