"""``loratool inspect PATH [--json] [--stats] [--consumers] [-q]``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from lora_tools.cli._common import column_room, command_hints, console, fit_names, print_json
from lora_tools.cli.options import blas_threads, json_option, quiet_option
from lora_tools.naming import PEFT_PREFIX


@click.command("inspect")
@click.argument("path")
@json_option
@click.option(
    "--stats",
    is_flag=True,
    help="Per module: ||dW||_F, largest singular value, effective rank (reads the data).",
)
@click.option(
    "--consumers",
    "show_consumers",
    is_flag=True,
    help="Per module: the scale PEFT, diffusers, ComfyUI, vLLM, SGLang, TGI and llama.cpp "
    "apply, beside loratool's; disagreements marked (header only).",
)
@quiet_option
@command_hints(
    {
        "unknown-format": "inspect reads LoRA adapters, not base models; "
        "`loratool validate ADAPTER --base BASE` checks an adapter against a base",
    }
)
def command(path: str, as_json: bool, stats: bool, show_consumers: bool, quiet: bool) -> None:
    """Show what an adapter file or folder holds (PATH may be a Hub id user/name[@rev], or a
    llama.cpp LoRA GGUF: needs the gguf extra).

    \b
    Example:
      loratool inspect fixtures/peft/llama-lora
      loratool inspect adapter.safetensors --stats --json
      loratool inspect fixtures/peft/llama-patterns --consumers
    """
    blas_threads()
    from lora_tools.io.hub import resolve_input
    from lora_tools.ops.inspect import inspect_adapter

    report = inspect_adapter(
        resolve_input(path, role="adapter"), stats=stats, consumers=show_consumers
    )
    if as_json:
        print_json(report.to_json())
    else:
        render(report.to_json())


def _short(key: str) -> str:
    """A histogram key for people: floats to 4 significant digits (JSON keeps them whole)."""
    try:
        return f"{float(key):.4g}"
    except ValueError:
        return key


def _hist(hist: dict[str, int]) -> str:
    if len(hist) == 1:
        return _short(next(iter(hist)))
    return ", ".join(f"{_short(k)} x{v}" for k, v in hist.items())


def _alpha(report: dict[str, Any]) -> str:
    """The alpha line; an unknown alpha says why instead of a number."""
    hist = report["alpha"]["histogram"]
    reason = report["alpha"].get("unknown")
    if reason:
        known = {k: v for k, v in hist.items() if k != "unknown"}
        text = f"[yellow]unknown: {reason}[/yellow]"
        return f"{_hist(known)}; {text} ({hist['unknown']} modules)" if known else text
    return _hist(hist) or "-"


def _architecture(arch: dict[str, Any] | None) -> str:
    """``sd1  (metadata modelspec.architecture: stable-diffusion-v1/lora)``."""
    if not arch:
        return "not recorded"
    if arch["recorded"] is None:
        return f"{_safe(arch['name'])}  [dim](guessed from the {arch['source']})[/dim]"
    return f"{_safe(arch['name'])}  [dim]({arch['source']}: {_safe(arch['recorded'])})[/dim]"


def _ranges(indices: list[int]) -> str:
    if not indices:
        return ""
    out, start, prev = [], indices[0], indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def _safe(value: Any) -> str:
    """A name or value from the file, for a rich table: no markup, no control characters."""
    from rich.markup import escape

    from lora_tools.errors import printable

    return escape(printable(str(value)))


def _modules(report: dict[str, Any]) -> str:
    """``80  (linear 3, LoHa 77)``: LoRA modules by kind, then the other types' modules."""
    kinds = [f"{k} {v}" for k, v in report["by_kind"].items()]
    kinds += [f"{_safe(k)} {v}" for k, v in report["by_type"].items()]
    total = report["counts"]["modules"] + sum(report["by_type"].values())
    return f"{total}  ({', '.join(kinds)})"


def _with_types(report: dict[str, Any], lora: str, field: str) -> str:
    """A rank / alpha / scale line: the LoRA modules' histogram, then each other type's
    (``-`` where neither has one)."""
    parts = [lora] if lora and lora != "-" else []
    by_type: dict[str, list[Any]] = {}
    for row in report["delta_modules"]:
        if row[field] is not None:
            by_type.setdefault(row["type"], []).append(row[field])
    for kind, values in by_type.items():
        counts: dict[str, int] = {}
        for value in values:
            counts[str(value)] = counts.get(str(value), 0) + 1
        parts.append(f"{_safe(kind)} {_hist(counts)}")
    return "; ".join(parts) or "-"


def _parameters(report: dict[str, Any]) -> str:
    """``0 LoRA + 10,288 LoHa (5,144 as LoRAs of their ranks) + 77 pass-through``."""
    params = report["parameters"]
    text = f"{params['lora']:,} LoRA"
    if report["delta_modules"]:
        types = ", ".join(dict.fromkeys(_safe(r["type"]) for r in report["delta_modules"]))
        text += f" + {params['deltas']:,} {types}"
        if params["deltas_as_lora"]:
            text += f" ({params['deltas_as_lora']:,} as LoRAs of their ranks)"
    if params["other_passthrough"]:
        text += f" + {params['other_passthrough']:,} pass-through"
    return text


def _lora_stats(out: Any, rows: list[dict[str, Any]]) -> None:
    """The ``--stats`` table of the LoRA modules."""
    from rich.table import Table

    out.print()
    t = Table(title="per-module update (scaled, from the factors)", title_justify="left")
    t.add_column("module", overflow="fold")
    headers = ("rank", "scale", "||dW||_F", "sigma_max", "eff. rank")
    for col in headers:
        t.add_column(col, justify="right")
    cells = [
        [
            str(row["rank"]),
            "unknown" if row["scale"] is None else f"{row['scale']:.4g}",
            "non-finite"
            if not row["finite"]
            else ("unknown" if row["frobenius"] is None else f"{row['frobenius']:.4g}"),
            "" if row["spectral"] is None else f"{row['spectral']:.4g}",
            "" if row["effective_rank"] is None else f"{row['effective_rank']:.2f}",
        ]
        for row in rows
    ]
    _stats_rows(out, t, headers, rows, cells)


def _delta_stats(out: Any, rows: list[dict[str, Any]]) -> None:
    """The ``--stats`` table of the other types' modules."""
    from rich.table import Table

    out.print()
    t = Table(title="per-module update of other types (from the factors)", title_justify="left")
    t.add_column("module", overflow="fold")
    headers = ("type", "rank", "scale", "||dW||_F", "sigma_max", "eff. rank")
    for col in headers:
        t.add_column(col, justify="right")
    cells = [
        [
            _safe(row["type"]),
            "-" if row["rank"] is None else str(row["rank"]),
            f"{row['scale']:.4g}",
            "non-finite"
            if not row["finite"]
            else (_safe(row["note"]) if row["frobenius"] is None else f"{row['frobenius']:.4g}"),
            "" if row["spectral"] is None else f"{row['spectral']:.4g}",
            "" if row["effective_rank"] is None else f"{row['effective_rank']:.2f}",
        ]
        for row in rows
    ]
    _stats_rows(out, t, headers, rows, cells)


def _structure_table(
    out: Any, title: str, rows: list[dict[str, Any]], extra: dict[str, Callable[[Any], str]]
) -> None:
    """A table of modules with their type and structure line, plus ``extra`` columns
    (header -> cell of a row), right-aligned."""
    from rich.table import Table

    out.print()
    t = Table(title=title, title_justify="left")
    t.add_column("module", overflow="fold")
    t.add_column("type")
    t.add_column("structure", overflow="fold")
    for header in extra:
        t.add_column(header, justify="right")
    for row in rows:
        t.add_row(
            _safe(row["module"].removeprefix(PEFT_PREFIX)),
            _safe(row["type"]),
            _safe(row["structure"]),
            *(cell(row) for cell in extra.values()),
        )
    out.print(t)


def _stats_rows(
    out: Any, table: Any, headers: tuple[str, ...], rows: list[dict[str, Any]], cells: list[Any]
) -> None:
    """Fill and print a ``--stats`` table: module names fitted to the room the cells leave,
    outliers and non-finite modules in red."""
    from rich.markup import escape

    from lora_tools.errors import printable

    names = fit_names(
        [printable(row["module"].removeprefix(PEFT_PREFIX)) for row in rows],
        column_room(out.width, headers, cells),
    )
    for name, row, row_cells in zip(names, rows, cells, strict=True):
        style = "red" if row["outlier"] or not row["finite"] else None
        table.add_row(escape(name), *row_cells, style=style)
    out.print(table)


def render(report: dict[str, Any]) -> None:
    from rich.table import Table

    from lora_tools.ops.inspect import NOTABLE_CONFIG, NOTABLE_METADATA, human_size

    out = console()
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    base = report["base_model"]
    arch = report["architecture"]
    rows = [
        ("file", ", ".join(_safe(f["path"]) for f in report["inputs"])),
        ("size", human_size(report["file_size_bytes"])),
        ("format", f"{report['format']} ({', '.join(report['variants']) or 'no LoRA modules'})"),
        ("architecture", _architecture(arch)),
        (
            "base model",
            f"{_safe(base['name'])}  [dim]({base['source']})[/dim]" if base else "not recorded",
        ),
        ("modules", _modules(report)),
        ("components", ", ".join(f"{k} {v}" for k, v in report["by_component"].items())),
        ("targets", ", ".join(f"{_safe(k)} x{v}" for k, v in report["targets"].items())),
        (
            "blocks",
            "; ".join(
                f"{fam} {_ranges(idx)}" if idx else fam for fam, idx in report["blocks"].items()
            )
            or "-",
        ),
        ("rank", _with_types(report, _hist(report["rank"]["histogram"]), "rank")),
        ("alpha", _with_types(report, _alpha(report), "alpha")),
        ("scale", _with_types(report, _hist(report["scale"]["histogram"]), "scale")),
        ("dtypes", ", ".join(f"{k} x{v}" for k, v in report["dtypes"].items())),
        ("parameters", _parameters(report)),
    ]
    if report["passthrough_tensors"]:
        names = report["passthrough_tensors"]
        rows.append(("pass-through", f"{len(names)} tensors, e.g. {_safe(names[0])}"))
    if report["unsupported"]:
        rows.append(
            (
                "unsupported",
                "[yellow]"
                + ", ".join(f"{k} ({v} modules)" for k, v in report["unsupported"].items())
                + "[/yellow]  (detected; math operations refuse them)",
            )
        )
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)

    if report["delta_modules"]:
        _structure_table(
            out,
            "modules of other types (structure from the tensors)",
            report["delta_modules"],
            {
                "parameters": lambda row: f"{row['parameters']:,}",
                "LoRA of that rank": lambda row: (
                    "-" if row["lora_parameters"] is None else f"{row['lora_parameters']:,}"
                ),
            },
        )

    if report["foreign_modules"]:
        _structure_table(
            out, "unsupported modules (structure from the tensors)", report["foreign_modules"], {}
        )
        for name, shape in report["shared_tensors"].items():
            out.print(f"shared  {_safe(name)}  [{', '.join(map(str, shape))}]")

    config = report["config"] or {}

    notable = [(k, config[k]) for k in NOTABLE_CONFIG if config.get(k) not in (None, {}, [], "")]
    meta = report["metadata"]
    notable += [(k, meta[k]) for k in NOTABLE_METADATA if meta.get(k)]
    if notable:
        out.print()
        t = Table(title="config and metadata", title_justify="left", show_header=False, box=None)
        t.add_column(style="cyan")
        t.add_column(overflow="fold")
        for key, value in notable:
            text = str(value)
            t.add_row(key, _safe(text if len(text) <= 200 else text[:197] + "..."))
        out.print(t)

    stats = report["stats"]
    if stats:
        if stats["modules"]:
            _lora_stats(out, stats["modules"])
        if stats["delta_modules"]:
            _delta_stats(out, stats["delta_modules"])
        summary = f"median ||dW||_F {stats['frobenius_median']:.4g}"
        if report["alpha"].get("unknown"):
            summary = "||dW||_F unknown: the scale is unknown"
        elif not stats["modules"] and not stats["delta_modules"]:
            summary = "no module whose update loratool computes"
        elif not stats["modules"] and all(
            r["note"] == "needs the base" for r in stats["delta_modules"]
        ):
            summary = (
                "||dW||_F unknown: the update needs the base weight, which inspect never reads"
            )
        if stats["outliers"]:
            summary += f"; outliers: {', '.join(map(_safe, stats['outliers']))}"
        if stats["non_finite"]:
            summary += f"; NaN/Inf in: {', '.join(map(_safe, stats['non_finite']))}"
        if stats["zero"]:
            summary += f"; zero update: {len(stats['zero'])} modules"
        out.print(summary)

    if report["consumers"] is not None:
        _consumers(out, report["consumers"])


def _scale(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _consumers(out: Any, table: dict[str, Any]) -> None:
    """The ``--consumers`` table: loratool's scale, then each loading consumer's, a
    disagreeing cell in red with ``!``; the consumers that do not load the file, and why."""
    from rich.markup import escape
    from rich.table import Table

    from lora_tools.errors import printable

    loading = [c for c in table["consumers"] if c["loads"]]
    out.print()
    if not table["modules"]:
        out.print("consumers: no LoRA modules to scale")
        return
    t = Table(title="scale per consumer (! differs from loratool's)", title_justify="left")
    t.add_column("module", overflow="fold")
    headers = ("rank", "loratool", *(c["title"] for c in loading))
    for col in headers:
        t.add_column(col, justify="right")
    cells = []
    for row in table["modules"]:
        line = [str(row["rank"]), _scale(row["intended"])]
        for c in loading:
            value = row["scales"].get(c["name"])
            text = "skipped" if value is None and c["name"] in row["skipped"] else _scale(value)
            line.append(f"[red]{text} ![/red]" if c["name"] in row["differ"] else text)
        cells.append(line)
    names = fit_names(
        [printable(row["module"].removeprefix(PEFT_PREFIX)) for row in table["modules"]],
        column_room(out.width, headers, [[_plain(c) for c in line] for line in cells]),
    )
    for name, line in zip(names, cells, strict=True):
        t.add_row(escape(name), *line)
    out.print(t)
    for c in loading:
        out.print(f"[bold]{escape(c['title'])}[/bold]: {_safe(c['rule'])}")
    for c in table["consumers"]:
        if not c["loads"]:
            out.print(f"[dim]{escape(c['title'])}: does not load it ({_safe(c['reason'])})[/dim]")
    count = table["disagreements"]
    if count:
        out.print(
            f"[yellow]{count} of {len(table['modules'])} modules are scaled differently[/yellow]"
        )
    else:
        out.print("every consumer that loads it applies loratool's scale to every module")


def _plain(cell: str) -> str:
    """A cell without its markup, for measuring."""
    return cell.replace("[red]", "").replace("[/red]", "")
