"""``loratool convert ADAPTER --to peft|kohya|diffusers|mlx|comfyui -o OUT [--base BASE]``."""

from __future__ import annotations

from pathlib import Path

import click

from lora_tools.cli._algebra import load_input, warn
from lora_tools.cli._common import command_hints, print_json
from lora_tools.cli.options import (
    blas_threads,
    force_option,
    json_option,
    output_option,
    quiet_option,
)


@click.command("convert")
@click.argument("adapter")
@click.option(
    "--to",
    "to",
    required=True,
    type=click.Choice(["peft", "kohya", "diffusers", "mlx", "comfyui"]),
    help="Target naming scheme.",
)
@output_option()
@click.option(
    "--base",
    metavar="BASE",
    help="Base checkpoint (file, HF folder, diffusers pipeline folder or Hub id "
    "user/name[@rev]): needed to recover "
    "module paths from kohya names and to re-lay modules out between the base's native and "
    "diffusers layouts (split / fuse qkv); also checks every module fits the base.",
)
@click.option(
    "--component",
    help="Pipeline component (unet, transformer, text_encoder...): the one to keep when "
    "converting a multi-component file to PEFT, or the one a plain PEFT adapter belongs to.",
)
@force_option
@json_option
@quiet_option
@command_hints(
    {
        "unknown-format": "convert takes an adapter as ADAPTER; give a base model with --base",
    }
)
def command(
    adapter: str,
    to: str,
    output: Path,
    base: str | None,
    component: str | None,
    force: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Convert between PEFT, kohya, diffusers and mlx-lm naming, carrying every module's scale.

    Factors are copied unchanged; scale moves to alpha_pattern (PEFT), lora_adapter_metadata
    (diffusers), per-module alpha tensors (kohya; rsLoRA expressed as alpha) or mlx-lm's one
    lora_parameters.scale (mlx stores the factors transposed).

    \b
    Examples:
      loratool convert fixtures/kohya/sd-lora.safetensors --to diffusers -o out/sd \\
          --base fixtures/bases/tiny-sd
      loratool convert fixtures/peft/sd-unet-conv --to kohya -o out/unet.safetensors
      loratool convert fixtures/diffusers/sd-lora --to peft --component unet -o out/unet
    """
    blas_threads()
    from lora_tools.ops._algebra import input_paths, write_adapter
    from lora_tools.ops.convert import convert_adapter

    source = load_input(adapter)
    base_path = None
    if base is not None:
        from lora_tools.io.hub import resolve_input

        base_path = resolve_input(base, role="base")
    result = convert_adapter(source, to, base=base_path, component=component)
    inputs = [*input_paths(source, adapter), *([base_path] if base_path is not None else [])]
    written = write_adapter(result.adapter, output, inputs, force=force)
    if result.dropped:
        warn(
            f"{len(result.dropped)} modules of other components left out "
            f"(e.g. {result.dropped[0]!r}); convert them with another --component"
        )
    if as_json:
        print_json(result.with_output(output).to_json())
        return
    click.echo(
        f"wrote {written}: {source.format} -> {to}, {len(result.adapter.modules)} modules"
        + (f" ({result.resolved} paths resolved against the base)" if result.resolved else "")
    )
