"""Run in vLLM's interpreter by tests/test_vllm.py: resolve experts with deltahub's resolver, generate greedily.

    python tests/vllm_runner.py SPEC.json OUT.json

SPEC: {"model": folder, "max_lora_rank": 8, "steps": 6, "prompts": [...], "experts": [name or null, ...]}.
OUT: per expert, the resolved folder (or null when the resolver refused) and per prompt the greedy tokens
and their logprobs. The resolver runs exactly as vLLM's OpenAI server calls it (``resolve_lora``).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    from vllm import LLM, SamplingParams
    from vllm.lora.resolver import LoRAResolverRegistry

    llm = LLM(model=spec["model"], enable_lora=True, max_lora_rank=spec["max_lora_rank"], max_model_len=128,
              enforce_eager=True, dtype="float32", max_loras=2, seed=0)
    resolver = LoRAResolverRegistry.get_resolver("deltahub")  # registered by the vllm.general_plugins entry point
    params = SamplingParams(temperature=0.0, max_tokens=spec["steps"], logprobs=1, ignore_eos=True)
    out = []
    for i, name in enumerate(spec["experts"]):
        req = None
        if name is not None:
            req = asyncio.run(resolver.resolve_lora(spec["model"], name))
            if req is None:
                out.append({"name": name, "folder": None})
                continue
            req.lora_int_id = i + 1
        gens = llm.generate(spec["prompts"], params, lora_request=req, use_tqdm=False)
        rows = []
        for g in gens:
            c = g.outputs[0]
            rows.append({"tokens": list(c.token_ids),
                         "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]})
        out.append({"name": name, "folder": req.lora_path if req else None, "outputs": rows})
    Path(sys.argv[2]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
