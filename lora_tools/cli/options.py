"""What every command's interface shares: the common options, the progress bar and the BLAS
thread policy.

A command takes its options from here, so that the same option is spelled, documented and
parsed the same way everywhere (and, where the two overlap, the way the ``hf`` CLI spells it).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from lora_tools.constants import DTYPE_ALIASES

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

#: huggingface_hub reads this when it is imported; -q sets it for downloads and uploads.
_HUB_BARS_OFF = "HF_HUB_DISABLE_PROGRESS_BARS"


def output_option(required: bool = True) -> Decorator:
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
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document (docs/json.md)."
)


def _hub_bars(ctx: click.Context, param: click.Parameter, quiet: bool) -> bool:
    """-q also silences huggingface_hub's download and upload bars, for this command only."""
    if not quiet:
        return quiet
    previous = os.environ.get(_HUB_BARS_OFF)
    os.environ[_HUB_BARS_OFF] = "1"
    hub = sys.modules.get("huggingface_hub.utils")
    was_on = hub is not None and not hub.are_progress_bars_disabled()
    if was_on:
        hub.disable_progress_bars()

    def restore() -> None:
        if previous is None:
            os.environ.pop(_HUB_BARS_OFF, None)
        else:
            os.environ[_HUB_BARS_OFF] = previous
        if was_on:
            hub.enable_progress_bars()

    ctx.call_on_close(restore)
    return quiet


quiet_option = click.option(
    "-q",
    "--quiet",
    is_flag=True,
    callback=_hub_bars,
    help="No progress bar (loratool's, or the Hub's while downloading or uploading). Everything "
    "else is printed as without it.",
)


class DtypeType(click.ParamType):
    """A float dtype in any of its usual spellings, returned as ``bf16``, ``fp16`` or ``fp32``
    (or ``keep``, where the command offers it)."""

    name = "dtype"

    def __init__(self, keep: bool) -> None:
        self.keep = keep

    def spellings(self) -> str:
        names = "bf16|bfloat16, fp16|float16|half, fp32|float32|float"
        return f"keep, {names}" if self.keep else names

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[keep|bf16|fp16|fp32]" if self.keep else "[bf16|fp16|fp32]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        if self.keep and text == "keep":
            return text
        if text in DTYPE_ALIASES:
            return DTYPE_ALIASES[text]
        self.fail(f"{value!r} is not a dtype: use {self.spellings()}", param, ctx)


def dtype_option(keep: bool, help: str) -> Decorator:
    kind = DtypeType(keep)
    return click.option(
        "--dtype",
        type=kind,
        default="keep" if keep else None,
        show_default=keep,
        help=f"{help} Spellings (any case): {kind.spellings()}.",
    )


def _csv_floats(ctx: click.Context, param: click.Parameter, text: str | None) -> list[float]:
    if text is None:
        return []
    return parse_floats(text, param.opts[0])


def weights_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--weight W`` (repeated) and ``--weights W1,W2,...``: two spellings of one list, read
    with :func:`weights_from`."""
    fn = click.option(
        "--weights",
        "weights_list",
        metavar="W1,W2,...",
        callback=_csv_floats,
        help="The same as a comma-separated list, e.g. 1,-0.5.",
    )(fn)
    return click.option(
        "--weight",
        "weight",
        type=float,
        multiple=True,
        metavar="W",
        help="Weight of each input, repeated in input order (default 1; negative subtracts).",
    )(fn)


def weights_from(weight: tuple[float, ...], weights_list: list[float]) -> list[float] | None:
    """The weights given with either spelling of :func:`weights_options`, None if neither."""
    if weight and weights_list:
        raise click.UsageError("give the weights once: repeated or comma-separated, not both")
    if weight or weights_list:
        return [*weight, *weights_list]
    return None


def parse_floats(text: str, option: str) -> list[float]:
    """``"1,0.5,-1"`` -> ``[1.0, 0.5, -1.0]``, or a click usage error naming the option.

    The weights are positional, so an empty item (``1,,2``, ``1,``) is refused, not skipped:
    skipping it would give the next input the missing weight.
    """
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated numbers, got {text!r}", param_hint=option
        ) from None


# ----------------------------------------------------------------------------- the progress bar


class Bar:
    """The one progress bar: what is done of the total (a count, or bytes with their rate),
    an optional count of finished items, and the time left.

    Callers feed it whichever way their operation reports: called as ``bar(done, total)`` (the
    algebra operations' ``progress`` callback), ``start(total)`` / ``advance(n)`` (validate's
    Progress), ``set_total(total, items_total)`` / ``advance(n, items)`` (merge).
    """

    def __init__(self, progress: Any, task: Any) -> None:
        self.progress = progress
        self.task = task
        self.items = 0

    def __call__(self, done: int, total: int) -> None:
        self.progress.update(self.task, completed=done, total=total)

    def set_total(self, total: int, items_total: int | None = None) -> None:
        """The total to reach (``items_total``, merge's tensor count, is shown as it grows)."""
        self.progress.update(self.task, total=total)

    start = set_total

    def advance(self, amount: int, items: int = 0) -> None:
        self.items += items
        self.progress.update(self.task, advance=amount, items=self.items)


def _columns(unit: str, items: str | None) -> list[Any]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    from lora_tools.ops.inspect import human_size

    class Size(ProgressColumn):
        def render(self, task: Any) -> Text:
            total = "?" if task.total is None else human_size(int(task.total))
            return Text(f"{human_size(int(task.completed))}/{total}", style="progress.download")

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            text = "?" if speed is None else f"{human_size(int(speed))}/s"
            return Text(text, style="progress.data.speed")

    columns: list[Any] = ["[progress.description]{task.description}", BarColumn()]
    columns += [Size(), Rate()] if unit == "bytes" else [MofNCompleteColumn()]
    if items is not None:
        columns.append(TextColumn(f"{{task.fields[items]}} {items}"))
    columns.append(TimeRemainingColumn())
    return columns


@contextlib.contextmanager
def progress_bar(
    label: str, quiet: bool, *, unit: str = "count", items: str | None = None
) -> Iterator[Bar | None]:
    """The progress bar on stderr, or None when quiet or stderr is not a terminal.

    Args:
        label: what is running, shown first.
        quiet: the command's -q.
        unit: ``count`` (done/total, e.g. modules) or ``bytes`` (sizes and a rate).
        items: with bytes, also count the items :meth:`Bar.advance` reports (``"tensors"``).
    """
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    stderr = Console(stderr=True, highlight=False, soft_wrap=False)
    with Progress(*_columns(unit, items), console=stderr, transient=True) as progress:
        yield Bar(progress, progress.add_task(label, total=None, items=0))


# ----------------------------------------------------------------------------- BLAS threads


def blas_threads(dense: bool = False) -> None:
    """The CLI's BLAS thread policy: one thread, unless the work is dense matrices.

    Every command that computes calls it before numpy is imported (BLAS reads its thread count
    when it loads). One thread for:

    - validate: its only BLAS work is ``r x r`` Gram matrices, which one thread computes
      fastest; and pre-commit runs one validate process per CPU, so threaded BLAS would
      oversubscribe the machine (measured: 10-30x slower on a loaded 2-core box,
      docs/benchmarks.md).
    - merge: the numpy engine runs one worker per core and holds each to one BLAS thread itself
      (threadpoolctl); asking before numpy loads also keeps OpenBLAS from starting its own
      threads at all (the 1.67 GB merge measured 0.2-0.3 s less user time). It also pins torch
      to one thread for --exact, which measured no slower on 2 cores; bytes are the same.
    - rescale, resize, combine (concat, svd), convert, inspect --stats: factor-space algebra on
      ``d x r`` and ``r x r`` matrices, too small for threads to pay their start-up.

    ``dense=True`` (combine's ties / dare, which form each module's full update) leaves BLAS its
    default of one thread per core. A user's own setting of the variables always wins.
    """
    if dense or "numpy" in sys.modules:
        return
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
