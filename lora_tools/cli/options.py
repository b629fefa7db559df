"""What every command's interface shares: the common options, the progress bar and the BLAS
thread policy.

A command takes its options from here, so that the same option is spelled, documented and
parsed the same way everywhere.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from lora_tools.cli._common import console


def output_option(required: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "-o",
        "--output",
        "output",
        required=required,
        type=click.Path(dir_okay=True, file_okay=True, path_type=Path),
        help="Output: a folder (PEFT, diffusers) or a .safetensors file (kohya, or any format "
        "whose scale fits in the file).",
    )


force_option = click.option(
    "--force",
    is_flag=True,
    help="Replace an existing output file, or a folder loratool wrote (never an input, never a "
    "folder holding anything else).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")


@contextlib.contextmanager
def progress_bar(label: str, quiet: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on stderr, or None when quiet or stderr is not a terminal."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def parse_floats(text: str, option: str) -> list[float]:
    """``"1,0.5,-1"`` -> ``[1.0, 0.5, -1.0]``, or a click usage error naming the option."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated numbers, got {text!r}", param_hint=option
        ) from None


def single_threaded_blas() -> None:
    """Ask BLAS for one thread, if numpy is not loaded yet.

    validate's only BLAS work is ``r x r`` Gram matrices, which one thread computes fastest; and
    pre-commit runs one validate process per CPU, so threaded BLAS would oversubscribe the
    machine (measured: 10-30x slower on a loaded 2-core box, docs/benchmarks.md).
    """
    if "numpy" in sys.modules:
        return
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
