"""Time to first token of a deltahub expert on vLLM's OpenAI server: cold (pull + check + export + vLLM load) and warm.

    python benchmarks/bench_vllm.py [--vllm-python .venv-vllm/bin/python] [--experts 3]

The model is the tests' tiny Llama (2 layers, hidden 128; vLLM on CPU), so the figures are deltahub's and
vLLM's fixed costs, not the model's compute. Experts (PEFT LoRA r = 8 on q/v/o/down, and one full-delta
expert served through its SVD export) sit in a ``file://`` registry; each is named once cold, then three
times warm; every request asks for one token. The ``resolve`` column is the resolver's own work for a cold
expert (pull, base check, PEFT export), timed in this process on a fresh home.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
warnings.filterwarnings("ignore")
os.environ.setdefault("DELTAHUB_NO_PROGRESS", "1")

from _common import header, median, table


def _post(port: int, model: str) -> float:
    body = json.dumps({"model": model, "prompt": "the quick brown", "max_tokens": 1, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()
    return time.perf_counter() - t0


def _serve(py: str, base: Path, env: dict) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), "--enable-lora", "--max-lora-rank",
           "8", "--max-loras", "2", "--max-model-len", "128", "--enforce-eager", "--dtype", "float32", "--host",
           "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while True:
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit("vLLM did not start; run tests/test_vllm.py to see why")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return proc, port
        except OSError:
            time.sleep(1)


def main() -> None:
    import torch
    from vllm_support import lowrank_finetune, peft_lora, tiny_llama, vllm_env

    import deltahub
    from deltahub.integrations.vllm import resolve_folder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", default=os.environ.get("DELTAHUB_VLLM_PYTHON") or str(ROOT / ".venv-vllm/bin/python"))
    ap.add_argument("--experts", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="deltahub-bench-") as tmp_s:
        tmp = Path(tmp_s)
        os.environ["DELTAHUB_HOME"] = str(tmp / "home")
        remote = (tmp / "remote").as_uri()
        base = tiny_llama(tmp / "base")
        names = []
        for i in range(args.experts):
            art = deltahub.compress(peft_lora(base, tmp / f"peft{i}", seed=10 + i), base=base, out=tmp / f"e{i}",
                                    name=f"lora-{i}")
            deltahub.Registry(remote).push(art)
            names.append(art.name)
        full = deltahub.compress(lowrank_finetune(base, tmp / "ft"), base=base, codec="compeft", out=tmp / "full",
                                 name="full-delta")
        deltahub.Registry(remote).push(full)
        resolve = []
        for i, name in enumerate(names):  # the resolver's own work, cold, on a fresh home each time
            os.environ["DELTAHUB_HOME"] = str(tmp / f"cold{i}")
            os.environ["DELTAHUB_VLLM_REGISTRY"], os.environ["DELTAHUB_VLLM_MAX_LORA_RANK"] = remote, "8"
            t0 = time.perf_counter()
            assert resolve_folder(str(base), name) is not None
            resolve.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert resolve_folder(str(base), "full-delta") is not None
        resolve_full = time.perf_counter() - t0
        proc, port = _serve(args.vllm_python, base, vllm_env(tmp / "server-home", DELTAHUB_VLLM_REGISTRY=remote,
                                                             DELTAHUB_VLLM_MAX_LORA_RANK="8"))
        try:
            base_t = [_post(port, str(base)) for _ in range(5)]
            cold, warm = [], []
            for name in names:
                cold.append(_post(port, name))
                warm += [_post(port, name) for _ in range(3)]
            full_cold = _post(port, "full-delta")
            full_warm = [_post(port, "full-delta") for _ in range(3)]
        finally:
            proc.terminate()
            proc.wait(60)
    def ms(xs: list[float]) -> str:
        return f"{1000 * median(xs):,.0f}"

    version = subprocess.run([args.vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                             text=True, check=False).stdout.strip()
    note = (f"vllm {version}; tiny Llama on vLLM (CPU, fp32, eager); {args.experts} LoRA r=8 experts and one ComPEFT full-delta "
            "expert (SVD export at rank 8) from a file:// registry; medians; one token per request")
    print(header("Machine", [note]))
    print()
    print(table(["request", "ms (median)", "vs the base model's request"], [
        ["base model", ms(base_t), "1.0×"],
        ["expert, cold (pull + check + export + vLLM load)", ms(cold), f"{median(cold) / median(base_t):.1f}×"],
        ["expert, warm", ms(warm), f"{median(warm) / median(base_t):.1f}×"],
        ["full-delta expert, cold (… + SVD export)", ms([full_cold]), f"{full_cold / median(base_t):.1f}×"],
        ["full-delta expert, warm", ms(full_warm), f"{median(full_warm) / median(base_t):.1f}×"],
        ["resolver's own work, cold LoRA (in-process)", ms(resolve), "—"],
        ["resolver's own work, cold full delta (in-process)", ms([resolve_full]), "—"]]))


if __name__ == "__main__":
    main()
