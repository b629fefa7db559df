"""``loratool extract BASE FINETUNED -o OUT (--rank R | --energy E)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from lora_tools.cli._common import column_room, command_hints, console, fit_names, print_json
from lora_tools.cli.options import (
    DtypeType,
    blas_threads,
    force_option,
    json_option,
    output_option,
    progress_bar,
    quiet_option,
)


@click.command("extract")
@click.argument("base")
@click.argument("finetuned")
@output_option()
@click.option("--rank", type=int, help="Rank of every module (the optimal one, Eckart-Young).")
@click.option(
    "--energy",
    type=float,
    help="Per module, the smallest rank keeping this fraction (0-1] of ||dW||_F^2.",
)
@click.option("--min-rank", type=int, help="Lower bound of the rank --energy picks.")
@click.option("--max-rank", type=int, help="Upper bound of the rank --energy picks.")
@click.option(
    "--modules",
    metavar="REGEX",
    help="Only weights whose name this regex finds (re.search) become LoRA modules; other "
    "changed tensors are listed (stored with --keep-diffs).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["peft", "kohya", "diffusers"]),
    help="Output naming. Default: peft for a transformers folder, kohya for a single file, "
    "diffusers for a diffusers pipeline.",
)
@click.option(
    "--keep-diffs",
    is_flag=True,
    help="Store changed tensors that are no LoRA module (norms, biases, weights --modules "
    "leaves out): PEFT modules_to_save / lora_B.bias, kohya .diff / .diff_b.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where the SVDs run: auto (a GPU when torch sees one), cpu (numpy), cuda or cuda:N.",
)
@click.option(
    "--dtype",
    type=DtypeType(keep=False),
    help="Dtype of the factors written. Default: each fine-tuned weight's. Spellings (any "
    "case): bf16|bfloat16, fp16|float16|half, fp32|float32|float.",
)
@click.option("--exact", is_flag=True, help="Dense SVDs only (slow); no randomized sketch.")
@force_option
@json_option
@quiet_option
@command_hints(
    {
        "extract-naming": "use --format peft",
        "extract-empty": "check the two checkpoints, or widen --modules",
    }
)
def command(
    base: str,
    finetuned: str,
    output: Path,
    rank: int | None,
    energy: float | None,
    min_rank: int | None,
    max_rank: int | None,
    modules: str | None,
    fmt: str | None,
    keep_diffs: bool,
    device: str,
    dtype: str | None,
    exact: bool,
    force: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Extract a LoRA from a base checkpoint and its fine-tune.

    Each changed weight becomes the optimal rank-R approximation of W_ft - W_base
    (Eckart-Young; convolutions flattened), from a randomized SVD whose error is certified to
    be within 1e-3 (relative) of the optimum, or the exact SVD where it cannot be. Bit-equal
    tensors are skipped. Every module has alpha = rank (scale 1): up = U sqrt(S),
    down = sqrt(S) Vh. Prints per module the rank, retained energy and relative error.

    \b
    Examples:
      loratool extract fixtures/bases/tiny-llama fixtures/finetuned/tiny-llama-ft -o out/x --rank 4
      loratool extract fixtures/bases/tiny-flux.safetensors \\
          fixtures/finetuned/tiny-flux-ft.safetensors -o out/x.safetensors --energy 0.99
    """
    blas_threads()  # one BLAS thread per worker; the workers use every core
    from lora_tools.io.hub import resolve_input
    from lora_tools.ops._algebra import write_adapter
    from lora_tools.ops.extract import check_rule, extract

    check_rule(rank, energy, min_rank, max_rank)  # before reading anything
    base_path = resolve_input(base, role="base")
    ft_path = resolve_input(finetuned, role="base")
    with progress_bar("extract", quiet, unit="bytes") as progress:
        result = extract(
            base_path,
            ft_path,
            rank=rank,
            energy=energy,
            min_rank=min_rank,
            max_rank=max_rank,
            modules=modules,
            format=fmt,
            keep_diffs=keep_diffs,
            device=device,
            dtype=dtype,
            exact=exact,
            progress=progress,
            base_spec=base,
        )
    for note in result.notes:
        from lora_tools.cli._common import error_line

        error_line(note, "note")
    written = write_adapter(result.adapter, output, [Path(base_path), Path(ft_path)], force=force)
    if as_json:
        print_json(result.with_output(output).to_json())
        return
    render(result, written)


def render(result: Any, written: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    from lora_tools.errors import printable

    out = console()
    table = Table(title="extract", title_justify="left")
    headers = ("rank", "method", "energy kept", "rel. error")
    for col in ("module", *headers):
        table.add_column(
            col,
            justify="left" if col in ("module", "method") else "right",
            overflow="fold" if col == "module" else "ellipsis",
        )
    cells = [
        [str(r.rank), r.method, f"{r.retained_energy:.6f}", f"{r.relative_error:.2e}"]
        for r in result.modules
    ]
    names = fit_names([r.module for r in result.modules], column_room(out.width, headers, cells))
    for name, row in zip(names, cells, strict=True):
        table.add_row(escape(printable(name)), *row)
    out.print(table)
    for row in result.tensors:
        click.echo(f"{row.status}: {printable(row.tensor)} {list(row.shape)}: {row.reason}")
    s, c = result.summary(), result.counts()
    click.echo(
        f"{c['modules']} LoRA modules from {c['tensors']} tensors ({c['unchanged']} unchanged, "
        f"{c['stored']} stored whole, {c['listed']} listed, {c['resized']} resized)"
    )
    click.echo(
        f"overall relative error {s['overall_relative_error']:.3e} (as written), max "
        f"{s['max_relative_error']:.3e}, min energy kept {s['min_retained_energy']:.6f}; "
        f"SVDs certified within {s['max_excess_bound']:.1e} of the optimum; "
        f"{s['lora_parameters']:,} LoRA parameters"
    )
    click.echo(f"wrote {written}")
