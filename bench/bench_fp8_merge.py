"""Benchmark ``loratool merge`` into a block-FP8 base against the same merge into the bf16 base
and against ``cp -r`` of each folder, at two model sizes (peak RSS must not grow with size).

Usage (from the repository root; prints markdown tables for docs/benchmarks.md):

    .venv/bin/python bench/bench_fp8_merge.py                      # 8 and 16 layers, 3 runs
    .venv/bin/python bench/bench_fp8_merge.py --layers 16 --runs 5 --prefault-gb 4
    .venv/bin/python bench/bench_fp8_merge.py --work /tmp/fp8-bench  # big files elsewhere
    git worktree add /tmp/old COMMIT && \
      .venv/bin/python bench/bench_fp8_merge.py --compare-with /tmp/old  # before / after

Generated under ``--work`` (default bench/_work/, gitignored), per size:

- ``bf16/``: bench_merge.py's Llama-shaped bf16 checkpoint (hidden 2048, intermediate 5632,
  vocab 32000, 32 heads / 4 KV heads; ``--layers`` decoder layers, 16 = bench_merge's "1b",
  1.67 GB), sharded at 512 MiB with an index;
- ``fp8/``: the same model quantized as transformers' ``Fp8Quantize`` does
  (:func:`lora_tools.quant.numeric.quantize`, bit-exact with it): each projection F8_E4M3 with
  a F32 ``weight_scale_inv`` per 128x128 block (k/v_proj are 256 x 2048, down_proj's 5632
  columns are 44 blocks), norms, embeddings and lm_head BF16; config ``quantization_config``
  ``{quant_method: fp8, fmt: e4m3, activation_scheme: dynamic, weight_block_size: [128, 128]}``;
  sharded at 512 MiB with an index, so some scales sit in the shard after their weight's;
- ``adapter/``: bench_merge.py's rank-16 fp32 PEFT LoRA on q, k, v, o, gate, up, down.

Each contender runs as a child process, as in bench_merge.py: wall time around it, peak RSS and
CPU time (user + system) from ``os.wait4``; the page cache holds both bases (read before timing);
``sync`` before each run; the contenders take turns in each round; ``--prefault-gb`` as there.
A contender whose command fails (a loratool that refuses fp8 bases) is reported as such.
``--compare-with DIR`` adds the two fp8 merges run from another checkout of loratool (``python
-m lora_tools`` with DIR as the working directory, this interpreter), in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import timed
from bench_merge import SHAPES, llama_tensors, make_adapter, make_base

ROOT = Path(__file__).resolve().parent.parent
MAX_SHARD_BYTES = 1 << 29
BLOCK = (128, 128)
QUANT_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": list(BLOCK),
}
LINEARS = ("_proj.weight",)


def _quantized(name: str) -> bool:
    return name.endswith(LINEARS)


def fp8_tensors(s: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of the block-FP8 checkpoint: each projection's weight, then its
    scale grid; everything else BF16."""
    out = []
    for name, shape in llama_tensors(s):
        if not _quantized(name):
            out.append((name, "BF16", shape))
            continue
        grid = tuple(-(-n // b) for n, b in zip(shape, BLOCK, strict=True))
        out += [(name, "F8_E4M3", shape), (name + "_scale_inv", "F32", grid)]
    return out


def make_fp8_base(folder: Path, bf16: Path, s: dict) -> None:
    """``bf16`` quantized to block FP8 (transformers' Fp8Quantize), written shard by shard."""
    import ml_dtypes

    from lora_tools.io.checkpoint import open_checkpoint
    from lora_tools.io.safetensors import SafetensorsWriter, TensorSpec
    from lora_tools.quant.numeric import quantize
    from lora_tools.quant.schemes import Scheme

    scheme = Scheme("hf-block-fp8", "F8_E4M3", "block", BLOCK, "weight_scale_inv")
    sizes = {"BF16": 2, "F8_E4M3": 1, "F32": 4}
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dtype, shape in fp8_tensors(s):
        nbytes = int(np.prod(shape)) * sizes[dtype]
        if size + nbytes > MAX_SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((name, dtype, shape))
        size += nbytes
    folder.mkdir(parents=True)
    weight_map, total = {}, 0
    pending: dict[str, np.ndarray] = {}  # a scale whose weight was quantized in the last shard
    with open_checkpoint(bf16) as ckpt:
        comp = ckpt.components[""]
        for n, tensors in enumerate(shards, 1):
            fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            specs = [TensorSpec(name, dtype, shape) for name, dtype, shape in tensors]
            with SafetensorsWriter(folder / fname, specs, {"format": "pt"}, keep_order=True) as w:
                for name, dtype, shape in tensors:
                    if name in pending:
                        value = pending.pop(name)
                    elif dtype == "F8_E4M3":
                        weight = comp.open(comp.file_for(name)).read(name)
                        value, pending[name + "_scale_inv"] = quantize(scheme, weight)
                    else:
                        value = comp.open(comp.file_for(name)).read(name)
                    if dtype == "F8_E4M3":
                        assert value.dtype == ml_dtypes.float8_e4m3fn
                    w.write(name, value)
                    weight_map[name] = fname
                    total += int(np.prod(shape)) * sizes[dtype]
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((bf16 / "config.json").read_text())
    config["quantization_config"] = QUANT_CONFIG
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def generate(work: Path, layers: int) -> None:
    s = {**SHAPES["1b"], "layers": layers}
    shutil.rmtree(work, ignore_errors=True)
    make_base(work / "bf16", s, MAX_SHARD_BYTES)
    make_fp8_base(work / "fp8", work / "bf16", s)
    make_adapter(work / "adapter", s)


def _gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e9


def _scales_elsewhere(folder: Path) -> int:
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return sum(
        1
        for name, shard in weight_map.items()
        if name.endswith("_scale_inv") and weight_map[name.removesuffix("_scale_inv")] != shard
    )


def bench_size(args: argparse.Namespace, layers: int) -> None:
    work = Path(args.work) / f"fp8-{layers}L"
    if not (work / "adapter").exists():
        # in a child process: the parent stays small (its children report their own peak RSS)
        t = time.perf_counter()
        cmd = [sys.executable, __file__, "--generate-only", str(layers), "--work", args.work]
        subprocess.run(cmd, check=True)
        print(f"generated {layers} layers in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    bases = {"bf16": work / "bf16", "fp8": work / "fp8"}
    for base in bases.values():
        subprocess.run(["cat", *map(str, base.glob("*.safetensors"))], stdout=subprocess.DEVNULL)
    py = sys.executable
    contenders: dict[str, tuple[list[str], Path]] = {}
    for kind, base in bases.items():
        out = work / f"out-cp-{kind}"
        contenders[f"cp -r ({kind} base)"] = (["cp", "-r", str(base), str(out)], out)
    for kind, base in bases.items():
        out = work / f"out-merge-{kind}"
        cmd = [py, "-m", "lora_tools", "merge", str(base), str(work / "adapter"), "-o", str(out)]
        contenders[f"loratool merge ({kind} base)"] = ([*cmd, "--quiet"], out)
    out = work / "out-merge-fp8-to-bf16"
    cmd = [
        py,
        "-m",
        "lora_tools",
        "merge",
        str(bases["fp8"]),
        str(work / "adapter"),
        "-o",
        str(out),
    ]
    contenders["loratool merge (fp8 base) --dtype bf16"] = (
        [*cmd, "--dtype", "bf16", "--quiet"],
        out,
    )
    if args.compare_with:
        other = Path(args.compare_with).resolve()
        for extra in ([], ["--dtype", "bf16"]):
            out = work / f"out-other{'-to-bf16' if extra else ''}"
            merge = [py, "-m", "lora_tools", "merge", str(bases["fp8"]), str(work / "adapter")]
            line = shlex.join([*merge, "-o", str(out), *extra, "--quiet"])
            name = f"loratool merge (fp8 base) {' '.join(extra)} [{other.name}]".replace("  ", " ")
            contenders[name] = (["sh", "-c", f"cd {shlex.quote(str(other))} && exec {line}"], out)
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in contenders}
    failed: dict[str, str] = {}
    loads = [os.getloadavg()[0]]
    for _ in range(args.runs):
        for name, (cmd, out) in contenders.items():
            if name in failed:
                continue
            shutil.rmtree(out, ignore_errors=True)
            try:
                results[name].append(timed(cmd, args.prefault_gb))
            except SystemExit as exc:
                failed[name] = str(exc).strip().splitlines()[-1][:200]
            loads.append(os.getloadavg()[0])
            shutil.rmtree(out, ignore_errors=True)
    env = env_line(loads, args)
    print(
        f"\n{layers} layers: bf16 base {_gb(bases['bf16']):.2f} GB in "
        f"{len(list(bases['bf16'].glob('*.safetensors')))} shards; block-FP8 base "
        f"{_gb(bases['fp8']):.2f} GB in {len(list(bases['fp8'].glob('*.safetensors')))} shards "
        f"({_scales_elsewhere(bases['fp8'])} scales in another shard than their weight); "
        f"rank-16 adapter on q, k, v, o, gate, up, down; median of {args.runs} runs; {env}\n"
    )
    print("| command | wall (s) | runs (s) | CPU (s) | x cp of its base | x merge (bf16 base) "
          "| peak RSS (MB) |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|")
    wall = {n: statistics.median(r[0] for r in runs) for n, runs in results.items() if runs}
    for name, runs in results.items():
        if name in failed:
            print(f"| {name} | failed: {failed[name]} | | | | | |")
            continue
        cp = wall["cp -r (fp8 base)" if "(fp8 base)" in name else "cp -r (bf16 base)"]
        bf16_merge = wall.get("loratool merge (bf16 base)")
        vs_merge = f"{wall[name] / bf16_merge:.2f}" if bf16_merge else "-"
        each = ", ".join(f"{r[0]:.2f}" for r in runs)
        cpu = statistics.median(r[2] for r in runs)
        rss = max(r[1] for r in runs)
        print(
            f"| {name} | {wall[name]:.2f} | {each} | {cpu:.2f} | {wall[name] / cp:.2f} | "
            f"{vs_merge} | {rss:.0f} |"
        )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def env_line(loads: list[float], args: argparse.Namespace) -> str:
    return (
        f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"1-min load average during the runs {min(loads):.2f}..{max(loads):.2f}; "
        f"prefault {args.prefault_gb:g} GiB"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="8,16", help="decoder layer counts, comma-separated")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", default=str(ROOT / "bench" / "_work"))
    ap.add_argument("--keep", action="store_true", help="keep the generated files afterwards")
    ap.add_argument(
        "--prefault-gb", type=float, default=0, help="GiB to touch before each run (bench_merge)"
    )
    ap.add_argument(
        "--compare-with", metavar="DIR", help="also run the fp8 merges from this checkout"
    )
    ap.add_argument("--generate-only", type=int, metavar="LAYERS", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.generate_only:
        generate(Path(args.work) / f"fp8-{args.generate_only}L", args.generate_only)
        return
    for layers in map(int, args.layers.split(",")):
        bench_size(args, layers)


if __name__ == "__main__":
    main()
