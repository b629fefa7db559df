"""The ``loratool`` command line: a Click group whose subcommands load only when invoked.

Each command lives in its own module (``lora_tools.cli.<name>``) exposing ``command``; the map
below is all the group knows until a command runs, so ``loratool --help`` imports no numpy.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from lora_tools import __version__

#: command name -> "module:attribute"
COMMANDS = {
    "inspect": "lora_tools.cli.inspect:command",
    "rescale": "lora_tools.cli.rescale:command",
    "resize": "lora_tools.cli.resize:command",
    "combine": "lora_tools.cli.combine:command",
    "convert": "lora_tools.cli.convert:command",
    "validate": "lora_tools.cli.validate:command",
    "merge": "lora_tools.cli.merge:command",
    "extract": "lora_tools.cli.extract:command",
    "push": "lora_tools.cli.push:command",
    "hf-extension": "lora_tools.cli.hf_extension:command",
}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when that subcommand is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loratool")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Inspect, validate, rescale, resize, combine, convert, merge and publish LoRA adapters.

    Exit codes: 0 ok, 1 findings (validate), 2 usage error, 3 input or runtime error,
    130 interrupted (Ctrl-C).
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main() -> None:
    """Console-script entry point (``loratool`` and ``hf-lora``)."""
    from lora_tools.cli._common import run

    run(cli, prog_name=prog_name(sys.argv[0]))


def prog_name(argv0: str) -> str | None:
    """``hf lora`` when the hf CLI runs us as its extension (through ``hf-lora``), so that
    usage lines and hints show the command the user typed; else None (click's own name)."""
    name = os.path.basename(argv0).lower().removesuffix(".exe")
    return "hf lora" if name == "hf-lora" else None
