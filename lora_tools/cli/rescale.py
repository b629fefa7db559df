"""``loratool rescale ADAPTER -o OUT (--alpha A | --factor F | --normalize)``."""

from __future__ import annotations

from pathlib import Path

import click

from lora_tools.cli._algebra import load_input, warn
from lora_tools.cli._common import print_json
from lora_tools.cli.options import (
    blas_threads,
    force_option,
    json_option,
    output_option,
    progress_bar,
    quiet_option,
)


@click.command("rescale")
@click.argument("adapter")
@output_option()
@click.option("--alpha", type=float, help="Set every module's alpha to A; the update is unchanged.")
@click.option(
    "--factor", type=float, help="Multiply every update by F (may be negative); alpha unchanged."
)
@click.option(
    "--normalize",
    is_flag=True,
    help="Make every scale 1 (alpha = r; rsLoRA: alpha = sqrt(r)); the update is unchanged.",
)
@force_option
@json_option
@quiet_option
def command(
    adapter: str,
    output: Path,
    alpha: float | None,
    factor: float | None,
    normalize: bool,
    force: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Change alpha without changing what the adapter does, or change its strength.

    The output has the input's format (PEFT config r / lora_alpha / patterns, kohya alpha
    tensors and ss_network_alpha updated; kohya hashes recomputed).

    \b
    Examples:
      loratool rescale fixtures/peft/llama-lora -o out/llama-a16 --alpha 16
      loratool rescale fixtures/kohya/sd-lora.safetensors -o out/half.safetensors --factor 0.5
      loratool rescale fixtures/peft/llama-patterns -o out/norm --normalize
    """
    blas_threads()
    from lora_tools.ops._algebra import input_paths, write_adapter
    from lora_tools.ops.rescale import rescale_adapter

    source = load_input(adapter)
    with progress_bar("rescale", quiet) as progress:
        result = rescale_adapter(
            source, alpha=alpha, factor=factor, normalize=normalize, progress=progress
        )
    written = write_adapter(result.adapter, output, input_paths(source, adapter), force=force)
    for note in result.notes:
        warn(note)
    if as_json:
        print_json(result.with_output(output).to_json())
        return
    new_alphas = sorted({a for a in result.new_alphas.values() if not isinstance(a, str)})
    shown = ", ".join(f"{a:g}" for a in new_alphas[:6]) + (" ..." if len(new_alphas) > 6 else "")
    click.echo(
        f"wrote {written} ({result.adapter.format}): {len(result.changed)} of "
        f"{len(result.new_alphas)} modules changed; alpha now {shown or 'none'}"
    )
