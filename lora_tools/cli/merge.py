"""``loratool merge BASE ADAPTER [ADAPTER ...] -o OUT``."""

from __future__ import annotations

import sys
from typing import Any

import click

from lora_tools.cli._common import command_hints, console, print_json
from lora_tools.cli.options import single_threaded_blas


@click.command("merge")
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    help="Output folder for a folder base. For a single-file base: NAME.safetensors, or a "
    "folder (ending in / or existing) to write it into under the base's file name.",
)
@click.option(
    "--weight",
    "weights",
    type=float,
    multiple=True,
    help="Weight of each adapter, in order (default 1; negative subtracts). Once for all.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA when torch sees a GPU, else cpu) | cpu (numpy, never imports torch) | "
    "cuda | cuda:N.",
)
@click.option(
    "--exact",
    is_flag=True,
    help="Merge on the CPU with torch's own matmul: bit-identical to PEFT's merge_and_unload "
    "for every rank (needs the torch extra; slower start-up). Without it the cpu engine matches "
    "PEFT except for the last bit of a few elements at larger ranks.",
)
@click.option(
    "--dtype",
    type=click.Choice(["keep", "bf16", "fp16", "fp32"]),
    default="keep",
    show_default=True,
    help="dtype of the float tensors written.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace OUT if it is a file or a folder loratool wrote (never an input, never a "
    "folder holding anything else).",
)
@click.option(
    "--fsync",
    is_flag=True,
    help="Flush every output file to the disk before OUT appears, so that it survives a power "
    "loss too (slower). Without it OUT still appears whole or not at all if loratool fails or "
    "is stopped, and the disk gets the data later, as after cp.",
)
@click.option(
    "--allow-unmatched",
    is_flag=True,
    help="Skip adapter modules that match no base weight (warn and count) instead of failing.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@command_hints(
    {
        "unknown-format": "merge takes BASE first, then the ADAPTER(s): "
        "is a base model in an adapter's place?",
        "unmatched": "check the base model, or pass --allow-unmatched to skip them",
    }
)
def command(
    base: str,
    adapters: tuple[str, ...],
    out: str,
    weights: tuple[float, ...],
    device: str,
    exact: bool,
    dtype: str,
    force: bool,
    fsync: bool,
    allow_unmatched: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Fold LoRA adapters into a base checkpoint, streaming shard by shard.

    BASE is a .safetensors file, an HF folder (single or sharded), a diffusers pipeline
    folder, or a Hub id user/name[@rev]. The output mirrors the base: same files, sharding,
    index, tensor order and dtypes, plus loratool_merge.json (provenance).

    \b
    Example:
      loratool merge fixtures/bases/tiny-llama fixtures/peft/llama-lora -o merged/
      loratool merge sd.safetensors style.safetensors detail.safetensors \\
          --weight 0.8 --weight -0.3 -o merged.safetensors
    """
    # The numpy engine holds BLAS to one thread per worker itself (threadpoolctl), but asking
    # before numpy loads also keeps OpenBLAS from starting its own threads at all: without it
    # the 1.67 GB merge measured 0.2-0.3 s more user time. (It also pins torch to one thread
    # for --exact, which measured no slower on 2 cores; bytes are the same either way.)
    single_threaded_blas()
    from lora_tools.errors import UsageError
    from lora_tools.ops.merge import merge

    if exact:
        if device not in ("auto", "cpu"):
            raise UsageError(
                f"--exact reproduces PEFT's CPU merge and cannot run on --device {device}",
                hint="drop --device, or drop --exact",
            )
        device = "torch-cpu"
    if weights and len(weights) not in (1, len(adapters)):
        raise UsageError(
            f"{len(weights)} --weight values for {len(adapters)} adapters",
            hint="give one --weight per adapter, or one for all",
        )
    show = not quiet and sys.stderr.isatty()
    bar = _progress(show)
    with bar as progress:
        summary = merge(
            base,
            list(adapters),
            out,
            weights=list(weights),
            device=device,
            dtype=dtype,
            force=force,
            fsync=fsync,
            allow_unmatched=allow_unmatched,
            progress=progress,
            on_plan=bar.set_total,
        )
    unmatched = sum(len(a["unmatched"]) for a in summary["adapters"])
    if unmatched:
        click.echo(
            f"loratool: warning: {unmatched} adapter modules matched no base weight and were "
            "skipped (--allow-unmatched)",
            err=True,
        )
    for item in summary["skipped_files"]:
        click.echo(
            f"loratool: warning: did not copy {item['path']} from the base folder: "
            f"{item['reason']}",
            err=True,
        )
    if as_json:
        print_json(summary)
    elif not quiet:
        _render(summary)


class _progress:
    """A rich progress bar on stderr (bytes and tensors, rate, ETA), or a no-op."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self.bar: Any = None
        self.task: Any = None
        self.tensors = 0

    def __enter__(self):
        if not self.show:
            return None
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.bar = Progress(
            TextColumn("merging"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[tensors]} tensors"),
            TimeRemainingColumn(),
            console=console(stderr=True),
            transient=True,
        )
        self.bar.__enter__()
        self.task = self.bar.add_task("merge", total=None, tensors=0)
        return self.update

    def set_total(self, total_bytes: int, total_tensors: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, total=total_bytes)

    def update(self, nbytes: int, tensors: int) -> None:
        self.tensors += tensors
        self.bar.update(self.task, advance=nbytes, tensors=self.tensors)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def _render(summary: dict[str, Any]) -> None:
    out = console()
    t = summary["tensors"]
    out.print(
        f"wrote {summary['output']}  ({len(summary['files'])} weight files, "
        f"{summary['bytes_written'] / 1e6:.1f} MB, {summary['seconds']:.2f} s, "
        f"engine {summary['engine']})"
    )
    out.print(f"tensors: {t['merged']} merged, {t['replaced']} replaced, {t['copied']} copied")
    for a in summary["adapters"]:
        extra = f", {len(a['unmatched'])} unmatched" if a["unmatched"] else ""
        out.print(
            f"  {a['path']}: weight {a['weight']:g}, {a['merged']}/{a['modules']} modules{extra}"
        )
