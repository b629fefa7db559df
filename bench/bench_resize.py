"""Benchmark: resize a Llama-7B-shaped adapter (224 modules, rank 64 -> 16) in factor space, and
compare with the dense-SVD approach sd-scripts' resize_lora.py uses, on a sample of modules.

One command, prints a markdown table (paste it into docs/benchmarks.md):

    .venv/bin/python bench/bench_resize.py [--runs 5] [--dense-sample 2]

- Adapter: real Llama-7B shapes, 32 layers x (q, k, v, o: 4096 x 4096; gate, up: 11008 x 4096;
  down: 4096 x 11008), rank 64, alpha 128, float32 PEFT file written to a temporary folder.
- loratool: the whole `resize_adapter(load_adapter(...), rank=16)` + `save_adapter`, median of
  --runs runs (file in the page cache; first run discarded as warm-up).
- dense reference: per sampled module, what resize_lora.py does: form `up @ down * scale` in
  float32 and run `torch.linalg.svd` (full_matrices=True, as it calls it), keep 16. Timed per
  module shape, extrapolated to the 224 modules (32 x 4 square, 32 x 3 rectangular).
- Agreement: on the sampled modules, relative Frobenius difference between loratool's update
  and the dense truncated SVD (float64).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_tools.formats import load_adapter, save_adapter
from lora_tools.ops.resize import resize_adapter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import llama_adapter

SQUARE = ("q_proj", "k_proj", "v_proj", "o_proj")
SHAPES = {
    **{name: (4096, 4096) for name in SQUARE},
    "gate_proj": (11008, 4096),
    "up_proj": (11008, 4096),
    "down_proj": (4096, 11008),
}
LAYERS, RANK, NEW_RANK, ALPHA = 32, 64, 16, 128
DECAY = np.exp(-np.arange(RANK) / 12).astype(np.float32)


def module_path(layer: int, name: str) -> str:
    block = "self_attn" if name in SQUARE else "mlp"
    return f"model.layers.{layer}.{block}.{name}"


def make_adapter(folder: Path) -> None:
    """A PEFT folder of the real shapes, random float32 factors (lora_B not zero) whose up
    columns decay like exp(-i / 12), as trained LoRA spectra do."""
    llama_adapter(folder, RANK, layers=LAYERS, fill="random", alpha=ALPHA, up_decay=DECAY)


def time_loratool(src: Path, work: Path, runs: int) -> tuple[list[float], object]:
    times = []
    result = None
    for i in range(runs + 1):
        out = work / f"out{i}"
        start = time.perf_counter()
        result = resize_adapter(load_adapter(src), rank=NEW_RANK)
        save_adapter(result.adapter, out)
        elapsed = time.perf_counter() - start
        if i:  # the first run warms the page cache and BLAS
            times.append(elapsed)
    return times, result


def dense_resize(up: np.ndarray, down: np.ndarray, scale: float):
    """resize_lora.py's per-module work: dense product, full SVD (torch, float32), truncate."""
    import torch

    weight = torch.from_numpy(up) @ torch.from_numpy(down) * scale
    U, S, Vh = torch.linalg.svd(weight)
    return (U[:, :NEW_RANK] * S[:NEW_RANK]) @ Vh[:NEW_RANK]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dense-sample", type=int, default=1, help="modules per shape")
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = work / "llama7b-r64"
        make_adapter(src)
        size_mb = (src / "adapter_model.safetensors").stat().st_size / 1e6
        times, result = time_loratool(src, work, args.runs)
        ours = statistics.median(times)

        adapter = load_adapter(src)
        new = load_adapter(work / "out1")
        dense_per_shape: dict[str, float] = {}
        worst = 0.0
        for name, shape_name in (
            ("q_proj", "4096x4096"),
            ("gate_proj", "11008x4096"),
            ("down_proj", "4096x11008"),
        ):
            per = []
            for layer in range(args.dense_sample):
                key = "base_model.model." + module_path(layer, name)
                m = adapter.modules[key]
                up, down = (x.astype(np.float32) for x in m.factors(np.float32))
                start = time.perf_counter()
                ref = dense_resize(up, down, m.scale)
                per.append(time.perf_counter() - start)
                U, V = new.modules[key].factors()
                got = new.modules[key].scale * U @ V
                ref64 = ref.double().numpy()
                worst = max(worst, float(np.linalg.norm(got - ref64) / np.linalg.norm(ref64)))
            dense_per_shape[shape_name] = statistics.median(per)
        dense_total = LAYERS * (
            4 * dense_per_shape["4096x4096"]
            + 2 * dense_per_shape["11008x4096"]
            + dense_per_shape["4096x11008"]
        )
    summary = result.summary(adapter)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average at the end: {load} (1, 5, 15 min; other processes share the CPUs)")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"numpy {np.__version__}, torch {torch.__version__} (threads {torch.get_num_threads()})"
    )
    print(
        f"adapter: 224 modules, rank {RANK} -> {NEW_RANK}, float32, {size_mb:.0f} MB; "
        f"overall relative error {summary['overall_relative_error']:.3f}"
    )
    print()
    print("| task | loratool (factor space) | dense SVD (resize_lora.py way) | ratio |")
    print("|---|---|---|---|")
    print(
        f"| resize 224 modules, load + write | {ours:.2f} s (median of {len(times)}; "
        f"runs {', '.join(f'{t:.2f}' for t in times)}) | {dense_total:.0f} s (extrapolated) | "
        f"{dense_total / ours:.0f}x |"
    )
    for shape, t in dense_per_shape.items():
        print(f"| dense SVD, one {shape} module | | {t:.2f} s | |")
    print(f"| max relative difference vs dense truncated SVD (sampled modules) | {worst:.1e} | | |")


if __name__ == "__main__":
    main()
