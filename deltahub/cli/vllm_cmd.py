"""``deltahub vllm-args``: the one line that starts vLLM serving experts from a deltahub registry."""

from __future__ import annotations

import shlex

import click

RANKS = ["1", "8", "16", "32", "64", "128", "256", "320", "512"]  # vLLM's accepted --max-lora-rank values


@click.command("vllm-args")
@click.option("--model", required=True, help="The base model folder (or cached Hub repo) vLLM serves.")
@click.option("--registry", "registry", help="Registry URL experts come from (default: the local registry).")
@click.option("--max-lora-rank", type=click.Choice(RANKS), default="16", show_default=True,
              help="vLLM's --max-lora-rank; full-delta experts are exported by SVD at this rank.")
@click.option("--max-loras", type=int, default=4, show_default=True, help="Adapters vLLM keeps on the device.")
@click.option("--port", type=int, default=8000, show_default=True)
def vllm_args(model: str, registry: str | None, max_lora_rank: str, max_loras: int, port: int) -> None:
    """Print the environment and `vllm serve` command that serve deltahub experts by name.

    Requests then name an expert as the model (`"model": "polarity:latest"`); the deltahub resolver
    (installed with `pip install 'deltahub[vllm]'`) pulls it, checks it against MODEL's weights,
    exports it as a PEFT folder and hands it to vLLM.

    \b
    Examples:
      deltahub vllm-args --model ./SmolLM2-135M-Instruct
      deltahub vllm-args --model ./base --registry s3://team-bucket/experts --max-lora-rank 32
    """
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "DELTAHUB_VLLM_MAX_LORA_RANK": max_lora_rank}
    if registry:
        env["DELTAHUB_VLLM_REGISTRY"] = registry
    args = ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--enable-lora",
            "--max-lora-rank", max_lora_rank, "--max-loras", str(max_loras), "--port", str(port)]
    click.echo(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " \\\n  " + shlex.join(args))
