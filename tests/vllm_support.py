"""Helpers for the vLLM tests: a tiny Llama that vLLM starts fast, and where vLLM's interpreter is.

vLLM pins its own transformers and numpy, so it lives in its own virtual environment (``.venv-vllm``,
made by ``.ci/run``; or ``DELTAHUB_VLLM_PYTHON``). The tests build models and experts here, run vLLM there
(``tests/vllm_runner.py``), and compare what comes back with PEFT here.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ("the quick brown fox jumps over the lazy dog. a delta is what fine-tuning adds to a base model. "
          "experts are stored once and served many times. ") * 20


def vllm_python() -> str | None:
    """The interpreter that imports vllm, or None."""
    cand = os.environ.get("DELTAHUB_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    if not Path(cand).is_file():
        return None
    ok = subprocess.run([cand, "-c", "import vllm, deltahub.integrations.vllm"], capture_output=True, timeout=300,
                        check=False)
    return cand if ok.returncode == 0 else None


def tiny_llama(folder: Path, *, seed: int = 0) -> Path:
    """A random 2-layer Llama (hidden 128, head dim 32) with a byte-level BPE tokenizer, saved for vLLM."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=384, special_tokens=["<s>", "</s>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the init's 0.02 so greedy tokens depend on them
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(str(folder))
    fast.save_pretrained(str(folder))
    return folder


def peft_lora(base: Path, folder: Path, *, seed: int = 1, r: int = 8, targets: tuple[str, ...] = ("q_proj", "v_proj",
              "o_proj", "down_proj"), scale: float = 0.15) -> Path:
    """A PEFT LoRA of ``base`` with random factors (large enough to change greedy tokens), saved."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    pm.save_pretrained(str(folder))
    return folder


def lowrank_finetune(base: Path, out: Path) -> Path:
    """base + a rank-4 change of every attention and MLP matrix (what fine-tunes mostly are) + small noise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                u, v = torch.randn(p.shape[0], 4, generator=g), torch.randn(4, p.shape[1], generator=g)
                p.add_(0.06 * u @ v / 4 + 0.002 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(out))
    return out


def peft_greedy(base: Path, adapter: Path | None, prompts: list[str], steps: int) -> list[dict]:
    """Greedy tokens and their logprobs from transformers (+ PEFT adapter), in fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        toks, lps = [], []
        with torch.no_grad():
            for _ in range(steps):
                logp = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
                nxt = int(logp.argmax())
                toks.append(nxt)
                lps.append(float(logp[nxt]))
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        out.append({"tokens": toks, "logprobs": lps})
    return out


def vllm_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment vLLM needs on a CPU machine, with deltahub's settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_LOOPBACK_IP": "127.0.0.1",
                "HF_HUB_OFFLINE": "1", "DELTAHUB_HOME": str(home), "DELTAHUB_NO_PROGRESS": "1",
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "TOKENIZERS_PARALLELISM": "false", **extra})
    return env
