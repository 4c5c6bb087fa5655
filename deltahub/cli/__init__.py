"""The ``deltahub`` command line: a thin layer over the Python API.

Subcommands load lazily (``deltahub --help`` imports neither torch nor triton), and one error boundary
turns every :class:`~deltahub.errors.DeltaHubError` into ``Error: <message>`` on stderr and exit 1,
without a traceback. click itself exits 2 on usage errors.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

import click

from deltahub.errors import DeltaHubError

# name -> "module:attribute"; one line per command, grouped by the module that owns it
COMMANDS = {
    "codecs": "deltahub.cli.core:codecs",
    "compress": "deltahub.cli.core:compress",
    "inspect": "deltahub.cli.core:inspect",
    "apply": "deltahub.cli.core:apply",
    "card": "deltahub.cli.core:card",
    "export": "deltahub.cli.export_cmd:export",
    "merge": "deltahub.cli.merge_cmd:merge",
    "vllm-args": "deltahub.cli.vllm_cmd:vllm_args",
    "push": "deltahub.cli.registry_cmds:push",
    "pull": "deltahub.cli.registry_cmds:pull",
    "ls": "deltahub.cli.registry_cmds:ls",
    "verify": "deltahub.cli.registry_cmds:verify",
    "gc": "deltahub.cli.registry_cmds:gc",
}

SHORT_HELP = {
    "codecs": "List installed codecs, or show one codec's options.",
    "compress": "Compress a fine-tuned model (or re-encode an artifact) into an artifact.",
    "inspect": "Show an artifact's codec, size, error, base and tensors.",
    "apply": "Write base + delta as a merged model folder.",
    "card": "Print an artifact's Hugging Face model card.",
    "export": "Write an expert as a PEFT LoRA folder.",
    "merge": "Merge experts of one base (TIES, DARE, task arithmetic), recipe recorded.",
    "vllm-args": "Print the command that serves registry experts on vLLM.",
    "push": "Store an artifact in a registry (local by default).",
    "pull": "Fetch an artifact into the local registry (and a folder).",
    "ls": "List artifacts in a registry.",
    "verify": "Check sizes and hashes of stored artifacts.",
    "gc": "Delete blobs no ref needs.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [c for c in COMMANDS if _available(c)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS or not _available(name):
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(import_module(module), attr)

    def invoke(self, ctx: click.Context) -> Any:
        """The single error boundary: a DeltaHubError becomes one line on stderr and exit 1."""
        try:
            return super().invoke(ctx)
        except DeltaHubError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(1)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, SHORT_HELP.get(n, "")) for n in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _available(name: str) -> bool:
    from importlib.util import find_spec

    return find_spec(COMMANDS[name].split(":")[0]) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deltahub")
def cli() -> None:
    """deltahub: store fine-tuned experts as small compressed deltas against a base model.

    \b
    Examples:
      deltahub compress ./finetuned --base ./base --codec compeft -p density=0.1 -o ./expert
      deltahub inspect ./expert
      deltahub push ./expert && deltahub pull expert
      deltahub apply expert -o ./merged
    """


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``deltahub``); click handles usage errors (exit 2) and Ctrl-C."""
    cli.main(args=argv, prog_name="deltahub")
