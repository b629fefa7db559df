"""``loratool combine A B ... -o OUT [--weights ...] [--method concat|svd|ties|dare] [--rank R]``."""

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
    progress_bar,
    quiet_option,
    weights_from,
    weights_options,
)


@click.command("combine")
@click.argument("adapters", nargs=-1, required=True)
@output_option()
@weights_options
@click.option(
    "--method",
    type=click.Choice(["concat", "svd", "ties", "dare"]),
    default="concat",
    show_default=True,
    help="concat: exact, rank = sum; svd: optimal rank-R of the exact sum; ties / dare: the "
    "task-arithmetic methods on dense per-module updates, truncated to rank R.",
)
@click.option(
    "--rank", type=int, help="Output rank for svd / ties / dare (default: largest input rank)."
)
@click.option("--density", type=float, help="ties / dare: fraction (0-1] of entries kept.")
@click.option("--seed", type=int, default=0, show_default=True, help="dare: random seed.")
@click.option(
    "--distribute",
    type=click.Choice(["sqrt", "up"]),
    default="sqrt",
    show_default=True,
    help="How singular values are split between the factors (svd / ties / dare).",
)
@click.option(
    "--base",
    metavar="BASE",
    help="Base checkpoint (file, folder or Hub id): for inputs of other adapter types whose "
    "update reads the base weight (dora_scale, OFT...), and the kernel of LoHa / LoKr "
    "convolutions.",
)
@force_option
@json_option
@quiet_option
@command_hints(
    {
        "unknown-format": "combine takes adapters only; to fold one into a base model: "
        "`loratool merge BASE ADAPTER -o OUT`",
        "needs-base": "pass --base with the base checkpoint the adapters were trained on",
    }
)
def command(
    adapters: tuple[str, ...],
    output: Path,
    weight: tuple[float, ...],
    weights_list: list[float],
    method: str,
    rank: int | None,
    density: float | None,
    seed: int,
    distribute: str,
    base: str | None,
    force: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Combine adapters: per module, the update is sum_i w_i * dW_i.

    Inputs may differ in format, rank and alpha; modules are matched by layer, and a module in
    only some inputs sums those. The output has the first input's format and names, scale 1.

    \b
    Examples:
      loratool combine a/ b/ -o out/ab                          # exact sum (concat)
      loratool combine a/ b/ -o out/a-b --weights 1,-1          # difference
      loratool combine a/ b/ -o out/ab8 --method svd --rank 8
      loratool combine a/ b/ c/ -o out/t --method ties --density 0.2 --rank 16
    """
    blas_threads(dense=method in ("ties", "dare"))
    from lora_tools.ops._algebra import input_paths, write_adapter
    from lora_tools.ops.combine import combine_adapters

    parsed = weights_from(weight, weights_list)
    sources = [load_input(spec) for spec in adapters]
    base_path = None
    if base is not None:
        from lora_tools.io.hub import resolve_input

        base_path = resolve_input(base, role="base")
    with progress_bar(f"combine ({method})", quiet) as progress:
        result = combine_adapters(
            sources,
            weights=parsed,
            method=method,
            rank=rank,
            density=density,
            seed=seed,
            distribute=distribute,
            base=base_path,
            progress=progress,
        )
    for note in result.notes:
        warn(note)
    inputs = [p for spec, a in zip(adapters, sources, strict=True) for p in input_paths(a, spec)]
    inputs += [base_path] if base_path else []
    written = write_adapter(result.adapter, output, inputs, force=force)
    if as_json:
        print_json(result.with_output(output).to_json())
        return
    rows = result.modules
    ranks: dict[int, int] = {}
    for row in rows:
        ranks[row.rank] = ranks.get(row.rank, 0) + 1
    partial = sum(1 for row in rows if len(row.inputs) < len(sources))
    click.echo(
        f"wrote {written} ({result.adapter.format}, {method}): {len(rows)} modules, ranks "
        + ", ".join(f"{k} x{v}" for k, v in sorted(ranks.items()))
    )
    if partial:
        click.echo(f"{partial} modules are in only some of the inputs (summed over those)")
    if method != "concat" and rows:
        worst = max(rows, key=lambda r: r.relative_error)
        click.echo(
            f"truncation: min energy kept {min(r.retained_energy for r in rows):.4f}, "
            f"max relative error {worst.relative_error:.2e} ({worst.key})"
        )
