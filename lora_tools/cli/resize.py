"""``loratool resize ADAPTER -o OUT (--rank R | --energy E | --sv-ratio X | --sv-cumulative X)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from lora_tools.cli._algebra import load_input, warn
from lora_tools.cli._common import column_room, command_hints, console, fit_names, print_json
from lora_tools.cli.options import (
    blas_threads,
    force_option,
    json_option,
    output_option,
    progress_bar,
    quiet_option,
)


@click.command("resize")
@click.argument("adapter")
@output_option(required=False)
@click.option("--rank", type=int, help="Fixed rank; modules already at or below it are kept.")
@click.option(
    "--energy",
    type=float,
    help="Smallest rank keeping this fraction (0-1] of ||dW||_F^2 (sd-scripts sv_fro = sqrt).",
)
@click.option("--sv-ratio", type=float, help="Keep singular values >= largest / X (X >= 1).")
@click.option(
    "--sv-cumulative",
    type=float,
    help="Smallest rank whose singular values sum to this fraction (0-1] of their total.",
)
@click.option("--min-rank", type=int, help="Lower bound for the dynamic rules.")
@click.option("--max-rank", type=int, help="Upper bound for the dynamic rules.")
@click.option(
    "--distribute",
    type=click.Choice(["sqrt", "up"]),
    default="sqrt",
    show_default=True,
    help="sqrt: sqrt(S) in both factors; up: S in the up factor, down orthonormal (sd-scripts).",
)
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing (-o not needed).")
@click.option(
    "--base",
    metavar="BASE",
    help="Base checkpoint (file, folder or Hub id): for modules of other adapter types whose "
    "update reads the base weight (dora_scale, OFT...), and the kernel of LoHa convolutions.",
)
@force_option
@json_option
@quiet_option
@command_hints({"needs-base": "pass --base with the base checkpoint the adapter was trained on"})
def command(
    adapter: str,
    output: Path | None,
    rank: int | None,
    energy: float | None,
    sv_ratio: float | None,
    sv_cumulative: float | None,
    min_rank: int | None,
    max_rank: int | None,
    distribute: str,
    dry_run: bool,
    base: str | None,
    force: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Re-rank an adapter by SVD truncation of each module's update, in factor space.

    Each module gets the optimal rank-k approximation of its update (Eckart-Young), computed
    from the factors without forming the dense matrix. Per-module ranks that differ are written
    as rank_pattern / alpha_pattern (PEFT) or per-module alpha (kohya); each module keeps its
    scale. Prints per module the chosen rank, retained energy and relative error.

    Modules of other types (LoHa, LoKr, Tucker LoCon, full, DoRA-weighted with --base) become
    the optimal plain LoRA of the chosen rank, as `convert --to lora` writes them.

    \b
    Examples:
      loratool resize fixtures/peft/llama-all-linear -o out/r4 --rank 4
      loratool resize fixtures/kohya/sd-locon.safetensors -o out/e.safetensors --energy 0.9
      loratool resize fixtures/peft/llama-lora --sv-ratio 4 --min-rank 2 --dry-run
    """
    blas_threads()
    from lora_tools.errors import UsageError
    from lora_tools.ops._algebra import input_paths, write_adapter
    from lora_tools.ops.resize import check_rule, resize_adapter

    rule = {
        "rank": rank,
        "energy": energy,
        "sv_ratio": sv_ratio,
        "sv_cumulative": sv_cumulative,
        "min_rank": min_rank,
        "max_rank": max_rank,
    }
    check_rule(**rule)  # before loading anything: a bad rule is a usage error
    if output is None and not dry_run:
        raise UsageError("give -o OUTPUT (or --dry-run to only see the plan)")
    source = load_input(adapter)
    base_path = None
    if base is not None:
        from lora_tools.io.hub import resolve_input

        base_path = resolve_input(base, role="base")
    with progress_bar("resize", quiet) as progress:
        result = resize_adapter(
            source,
            **rule,
            distribute=distribute,
            dry_run=dry_run,
            base=base_path,
            progress=progress,
        )
    for note in result.notes:
        warn(note)
    written = None
    if not dry_run:
        assert result.adapter is not None and output is not None
        inputs = [*input_paths(source, adapter), *([base_path] if base_path else [])]
        written = write_adapter(result.adapter, output, inputs, force=force)
    summary = result.summary(source)
    if as_json:
        print_json(result.with_output(output if written else None).to_json())
        return
    render(result.modules, summary, written, dry_run)


def render(rows: list[Any], summary: dict[str, Any], written: Path | None, dry_run: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    from lora_tools.errors import printable

    out = console()
    table = Table(title="resize plan" if dry_run else "resize", title_justify="left")
    for col in ("module", "kind", "rank", "energy kept", "rel. error"):
        table.add_column(
            col,
            justify="left" if col in ("module", "kind") else "right",
            overflow="fold" if col == "module" else "ellipsis",
        )
    cells = [
        [
            row.kind,
            f"{row.old_rank} -> {row.new_rank}" if row.changed else f"{row.old_rank} (kept)",
            f"{row.retained_energy:.4f}",
            f"{row.relative_error:.2e}",
        ]
        for row in rows
    ]
    headers = ("kind", "rank", "energy kept", "rel. error")
    names = fit_names([row.key for row in rows], column_room(out.width, headers, cells))
    for name, row_cells in zip(names, cells, strict=True):
        table.add_row(escape(printable(name)), *row_cells)
    out.print(table)
    hist = ", ".join(f"{k} x{v}" for k, v in summary["ranks_after"].items())
    lines = [
        f"{summary['changed']} of {summary['modules']} modules re-ranked; ranks now {hist}",
        f"LoRA parameters {summary['lora_parameters_before']:,} -> "
        f"{summary['lora_parameters_after']:,}",
        f"min energy kept {summary['min_retained_energy']:.4f}, max relative error "
        f"{summary['max_relative_error']:.2e}, overall {summary['overall_relative_error']:.2e}",
    ]
    if summary["changed"] == 0:
        lines.append(
            "nothing to truncate: every module is already at or below the chosen rank"
            + ("" if dry_run else "; the output is an unchanged copy")
        )
    if written is not None:
        lines.append(f"wrote {written}")
    for line in lines:
        click.echo(line)
