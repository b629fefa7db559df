"""``loratool merge BASE ADAPTER [ADAPTER ...] -o OUT``."""

from __future__ import annotations

from typing import Any

import click

from lora_tools.cli._common import command_hints, console, print_json
from lora_tools.cli.options import (
    blas_threads,
    dtype_option,
    force_option,
    json_option,
    progress_bar,
    quiet_option,
    weights_from,
    weights_options,
)


@click.command("merge")
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    metavar="PATH",
    help="Output folder for a folder base. For a single-file base: NAME.safetensors, or a "
    "folder (ending in / or existing) to write it into under the base's file name.",
)
@weights_options
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
@dtype_option(
    keep=True,
    help="dtype of the float tensors written. On an fp8 base (plain, ComfyUI scaled, HF block, "
    "compressed-tensors) keep requantizes each merged weight with a fresh scale, keeping the "
    "scheme; bf16 / fp16 / fp32 dequantizes every fp8 weight and drops the scales.",
)
@force_option
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
@json_option
@quiet_option
@command_hints(
    {
        "unknown-format": "merge takes BASE first, then the ADAPTER(s): "
        "is a base model in an adapter's place?",
        "unmatched": "check the base model, or pass --allow-unmatched to skip them",
        "weights": "give one --weight per adapter (or --weights W1,W2,...), or one for all",
        "weight-not-finite": "give each --weight as a finite number such as 0.8 or -0.5",
    }
)
def command(
    base: str,
    adapters: tuple[str, ...],
    out: str,
    weight: tuple[float, ...],
    weights_list: list[float],
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
          --weights 0.8,-0.3 -o merged.safetensors
    """
    blas_threads()
    from lora_tools.errors import UsageError
    from lora_tools.ops.merge import merge

    if exact:
        if device not in ("auto", "cpu"):
            raise UsageError(
                f"--exact reproduces PEFT's CPU merge and cannot run on --device {device}",
                hint="drop --device, or drop --exact",
            )
        device = "torch-cpu"
    with progress_bar("merging", quiet, unit="bytes", items="tensors") as bar:
        summary = merge(
            base,
            list(adapters),
            out,
            weights=weights_from(weight, weights_list),
            device=device,
            dtype=dtype,
            force=force,
            fsync=fsync,
            allow_unmatched=allow_unmatched,
            progress=bar.advance if bar is not None else None,
            on_plan=bar.set_total if bar is not None else None,
        )
    unmatched = summary.unmatched
    if unmatched:
        click.echo(
            f"loratool: warning: {unmatched} adapter modules or full tensors matched no base "
            "tensor and were skipped (--allow-unmatched)",
            err=True,
        )
    for item in summary.skipped_files:
        click.echo(
            f"loratool: warning: did not copy {item['path']} from the base folder: "
            f"{item['reason']}",
            err=True,
        )
    if as_json:
        print_json(summary.to_json())
    else:
        _render(summary)


def _render(summary: Any) -> None:
    from lora_tools.ops.inspect import human_size

    out = console()
    t = summary.tensors
    files = len(summary.files)
    out.print(
        f"wrote {summary.output}  ({files} weight file{'' if files == 1 else 's'}, "
        f"{human_size(summary.bytes_written)}, {summary.seconds:.2f} s, "
        f"engine {summary.engine})"
    )
    cast = f", {t['cast']} cast to {summary.dtype}" if t.get("cast") else ""
    out.print(
        f"tensors: {t['merged']} merged, {t['replaced']} replaced, {t['copied']} copied{cast}"
    )
    q = summary.quantization
    if q:
        kept = (
            f"kept, {q['scales_rewritten']} scales recomputed"
            if q["output"] == "kept"
            else f"dequantized to {q['output']}, {q['tensors_dropped']} scale tensors dropped"
        )
        out.print(f"base quantization: {q['description']}: {kept}")
    for a in summary.adapters:
        n = a["counts"]
        extra = f", {n['modules_unmatched']} unmatched" if n["modules_unmatched"] else ""
        out.print(
            f"  {a['spec']}: weight {a['weight']:g}, {n['modules_merged']}/{n['modules']} "
            f"modules{extra}"
        )
