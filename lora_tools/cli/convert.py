"""``loratool convert ADAPTER --to peft|kohya|diffusers|mlx|comfyui|lora|gguf -o OUT
[--base BASE] [--rank R | --energy E] [--outtype T]``, or ``--for vllm|sglang|llamacpp
[--max-lora-rank N]``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    required=False,
    type=click.Choice(["peft", "kohya", "diffusers", "mlx", "comfyui", "lora", "gguf"]),
    help="Target naming scheme, or lora: every LoHa / LoKr / Tucker LoCon / full / DoRA-"
    "weighted module as a plain LoRA in the input's naming, or gguf: llama.cpp's LoRA GGUF "
    "(needs the gguf extra and the base model's config.json).",
)
@click.option(
    "--for",
    "target",
    type=click.Choice(["vllm", "sglang", "llamacpp"]),
    help="Instead of --to: the PEFT adapter this serving engine loads and serves at each "
    "module's own strength (scales baked into the factors, one rank, one alpha; what it "
    "cannot serve is refused by name).",
)
@click.option(
    "--max-lora-rank",
    type=int,
    metavar="N",
    help="--for vllm / sglang: the server's --max-lora-rank; a larger adapter rank is refused.",
)
@output_option()
@click.option(
    "--base",
    metavar="BASE",
    help="Base checkpoint (file, HF folder, diffusers pipeline folder or Hub id "
    "user/name[@rev]): needed to recover "
    "module paths from kohya names and to re-lay modules out between the base's native and "
    "diffusers layouts (split / fuse qkv); also checks every module fits the base. With "
    "--to lora: the base weights that modules of base-dependent types (dora_scale, OFT...) "
    "read, and each module's kernel shape. With --to gguf: the base model folder (its "
    "config.json: architecture, layer and head counts; default: the adapter's "
    "base_model_name_or_path when that is a local folder). With --to gguf (when the folder "
    "holds the weights) and --for: PEFT's saved base embedding (embed_tokens.base_layer."
    "weight), which the engines skip, is compared with the base's; one that differs is "
    "refused.",
)
@click.option(
    "--rank",
    type=int,
    help="--to lora: the rank of every converted module (the optimal one, Eckart-Young; "
    "capped at the module's exact rank). Default: the exact rank (lossless).",
)
@click.option(
    "--energy",
    type=float,
    help="--to lora: per module, the smallest rank keeping this fraction of ||dW||_F^2, in "
    "(0, 1]. Not with --rank.",
)
@click.option(
    "--outtype",
    type=click.Choice(["f32", "f16", "bf16", "q8_0"]),
    help="--to gguf: the tensors' GGML type (default f32, as convert_lora_to_gguf.py).",
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
        "needs-base": "pass --base with the base checkpoint the adapter was trained on",
    }
)
def command(
    adapter: str,
    to: str | None,
    target: str | None,
    max_lora_rank: int | None,
    output: Path,
    base: str | None,
    component: str | None,
    rank: int | None,
    energy: float | None,
    outtype: str | None,
    force: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Convert between PEFT, kohya, diffusers and mlx-lm naming, carrying every module's scale.

    Factors are copied unchanged; scale moves to alpha_pattern (PEFT), lora_adapter_metadata
    (diffusers), per-module alpha tensors (kohya; rsLoRA expressed as alpha) or mlx-lm's one
    lora_parameters.scale (mlx stores the factors transposed).

    --to lora writes every module of another adapter type (LoHa, LoKr, Tucker LoCon, full,
    DoRA-weighted) as a plain LoRA module in the input's naming, exactly by default, or the
    optimal LoRA of --rank R / --energy E; each module's error is reported.

    \b
    Examples:
      loratool convert fixtures/kohya/sd-lora.safetensors --to diffusers -o out/sd \\
          --base fixtures/bases/tiny-sd
      loratool convert fixtures/peft/sd-unet-conv --to kohya -o out/unet.safetensors
      loratool convert fixtures/diffusers/sd-lora --to peft --component unet -o out/unet
      loratool convert fixtures/kohya/sd-loha.safetensors --to lora -o out/loha-lora.safetensors \\
          --base fixtures/bases/tiny-sd
      loratool convert fixtures/peft/llama-patterns --to gguf -o out/llama-patterns.gguf \\
          --base fixtures/bases/tiny-llama
    """
    blas_threads()
    if (to is None) == (target is None):
        raise click.UsageError("give one of --to and --for")
    if outtype is not None and to != "gguf":
        raise click.UsageError("--outtype applies to --to gguf only")
    if to == "gguf":
        if max_lora_rank is not None:
            raise click.UsageError("--max-lora-rank applies to --for vllm / sglang")
        convert_gguf(adapter, output, base, outtype or "f32", force, as_json, quiet)
        return
    from lora_tools.ops._algebra import input_paths, write_adapter
    from lora_tools.ops.convert import convert_adapter, lora_rule

    if target is not None:
        render_for(adapter, target, output, base, component, max_lora_rank, force, as_json, quiet)
        return
    if max_lora_rank is not None:
        raise click.UsageError("--max-lora-rank applies to --for vllm / sglang")
    if to == "lora":
        lora_rule(rank, energy)  # before loading anything: a bad rule is a usage error
    source = load_input(adapter)
    base_path = None
    if base is not None:
        from lora_tools.io.hub import resolve_input

        base_path = resolve_input(base, role="base")
    result = convert_adapter(
        source, to, base=base_path, component=component, rank=rank, energy=energy
    )
    inputs = [*input_paths(source, adapter), *([base_path] if base_path is not None else [])]
    written = write_adapter(result.adapter, output, inputs, force=force)
    if to == "lora":
        for note in result.notes:
            warn(note)
        if as_json:
            print_json(result.with_output(output).to_json())
        elif not quiet:
            render_lora(result, written)
        return
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


def render_for(
    adapter: str,
    target: str,
    output: Path,
    base: str | None,
    component: str | None,
    max_lora_rank: int | None,
    force: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """``--for``: write the adapter the serving engine loads; say what changed."""
    from lora_tools.ops._algebra import input_paths, write_adapter
    from lora_tools.ops.deploy import check_max_lora_rank, convert_for

    check_max_lora_rank(target, max_lora_rank)  # before loading anything
    source = load_input(adapter)
    base_path = None
    if base is not None:
        from lora_tools.io.hub import resolve_input

        base_path = resolve_input(base, role="base")
    result = convert_for(
        source, target, base=base_path, component=component, max_lora_rank=max_lora_rank
    )
    inputs = [*input_paths(source, adapter), *([base_path] if base_path is not None else [])]
    written = write_adapter(result.adapter, output, inputs, force=force)
    if as_json:
        print_json(result.with_output(output).to_json())
        return
    if quiet:
        return
    click.echo(
        f"wrote {written}: {source.format} -> peft for {target}, {len(result.modules)} modules "
        f"at rank {result.rank}, "
        + ("factors kept byte for byte" if not result.rescaled else "every scale in the factors")
    )
    for note in result.notes:
        click.echo(f"  {note}")


def convert_gguf(
    adapter: str,
    output: Path,
    base: str | None,
    outtype: str,
    force: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """``--to gguf``: the llama.cpp LoRA GGUF, with every module's scale baked in."""
    from lora_tools.io.atomic import check_output
    from lora_tools.ops._algebra import input_paths
    from lora_tools.ops.to_gguf import convert_to_gguf

    source = load_input(adapter)
    inputs = [*input_paths(source, adapter), *([Path(base)] if base is not None else [])]
    check_output(output, list(inputs), force=force)
    result = convert_to_gguf(source, output, base=base, outtype=outtype)
    if as_json:
        print_json(result.to_json())
        return
    if quiet:
        return
    plan = result.plan
    assert plan is not None
    baked = (
        f"; {len(plan.baked)} modules' scales baked into lora_b (one alpha {plan.alpha:g} / r "
        "in llama.cpp)"
        if plan.baked
        else ""
    )
    click.echo(
        f"wrote {output}: {source.format} -> gguf ({plan.arch}, {outtype}), "
        f"{len(plan.modules)} modules{baked}"
    )


def render_lora(result: Any, written: Path) -> None:
    """One row per converted module: its type, rank and error; then the totals."""
    from rich.markup import escape
    from rich.table import Table

    from lora_tools.cli._common import column_room, console, fit_names
    from lora_tools.errors import printable

    out = console()
    table = Table(title="convert --to lora", title_justify="left")
    headers = ("type", "rank", "method", "energy kept", "rel. error")
    for col in ("module", *headers):
        table.add_column(
            col,
            justify="left" if col in ("module", "type", "method") else "right",
            overflow="fold" if col == "module" else "ellipsis",
        )
    cells = [
        [
            row.type,
            str(row.rank)
            if row.exact_rank in (None, row.rank)
            else f"{row.rank} of {row.exact_rank}",
            row.method,
            f"{row.retained_energy:.6f}",
            f"{row.relative_error:.2e}",
        ]
        for row in result.modules
    ]
    names = fit_names([row.key for row in result.modules], column_room(out.width, headers, cells))
    for name, row_cells in zip(names, cells, strict=True):
        table.add_row(escape(printable(name)), *row_cells)
    out.print(table)
    worst = max((row.relative_error for row in result.modules), default=0.0)
    kept = f", {result.kept} LoRA modules kept" if result.kept else ""
    click.echo(
        f"{len(result.modules)} modules converted to LoRA{kept}; "
        + ("exact (float64 rounding)" if result.exact else f"max relative error {worst:.2e}")
    )
    click.echo(f"wrote {written}")
