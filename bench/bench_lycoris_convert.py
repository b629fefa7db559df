"""Benchmark: `convert --to lora` of an SDXL-shaped LoKr, in factor space, against the dense SVD
route (what a user would otherwise script: numpy's dense kron per module and its SVD).

One command, prints a markdown table (paste it into docs/benchmarks.md):

    .venv/bin/python bench/bench_lycoris_convert.py [--runs 3] [--rank 32] [--dense-sample 1]

- Adapter: a kohya-named LoKr on SDXL's UNet transformer layers (70 transformer blocks: 10 of
  width 640, 60 of width 1280; attn1 / attn2 q k v out, ff.net.0.proj, ff.net.2, and each
  transformer's proj_in / proj_out: 722 modules), LyCORIS' factor 8 split with both factors
  whole (``lokr_w1 [8, 8]``, ``lokr_w2 [out / 8, in / 8]``, the "full matrix" recipe), random
  fp16 factors, written to a temporary folder. Each update has rank 8 * min(out, in) / 8: full.
- loratool: ``convert_to_lora(load_adapter(src), rank=R)`` + ``save_adapter``: reading the
  file, the two factor SVDs per module, writing the LoRA. Median of --runs runs after a warm-up.
- dense route: per sampled module, ``np.kron(w1, w2)`` in float32 and
  ``np.linalg.svd(full_matrices=False)``, truncated to R; timed per module shape and
  extrapolated to the file's module count of each shape.
- Agreement: on the sampled modules, relative Frobenius difference between loratool's LoRA
  (float64, before the cast to fp16) and the dense float64 truncated SVD.
- Both sides run with one BLAS thread, the CLI's policy for convert (``cli.options.
  blas_threads``): on a shared 2-core machine threaded BLAS oversubscribes (a 1280 x 5120
  LoKr module measured 3.8 s with two threads under load, 0.03 s with one).
"""

from __future__ import annotations

import argparse
import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy loads (see the docstring)
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_tools.deltas.factors import to_lora  # noqa: E402
from lora_tools.formats import load_adapter, save_adapter  # noqa: E402
from lora_tools.io.safetensors import save_tensors  # noqa: E402
from lora_tools.ops.convert import convert_to_lora  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

FACTOR = 8
#: SDXL UNet (SGM names): spatial transformer -> (width, depth).
TRANSFORMERS = {
    "input_blocks_4_1": (640, 2),
    "input_blocks_5_1": (640, 2),
    "input_blocks_7_1": (1280, 10),
    "input_blocks_8_1": (1280, 10),
    "middle_block_1": (1280, 10),
    "output_blocks_0_1": (1280, 10),
    "output_blocks_1_1": (1280, 10),
    "output_blocks_2_1": (1280, 10),
    "output_blocks_3_1": (640, 2),
    "output_blocks_4_1": (640, 2),
    "output_blocks_5_1": (640, 2),
}
CONTEXT = 2048


def layers() -> dict[str, tuple[int, int]]:
    """kohya module name -> (out, in) of every targeted linear."""
    out: dict[str, tuple[int, int]] = {}
    for prefix, (d, depth) in TRANSFORMERS.items():
        out[f"lora_unet_{prefix}_proj_in"] = (d, d)
        out[f"lora_unet_{prefix}_proj_out"] = (d, d)
        for b in range(depth):
            block = f"lora_unet_{prefix}_transformer_blocks_{b}"
            for attn in ("attn1", "attn2"):
                k_in = d if attn == "attn1" else CONTEXT
                out[f"{block}_{attn}_to_q"] = (d, d)
                out[f"{block}_{attn}_to_k"] = (d, k_in)
                out[f"{block}_{attn}_to_v"] = (d, k_in)
                out[f"{block}_{attn}_to_out_0"] = (d, d)
            out[f"{block}_ff_net_0_proj"] = (8 * d, d)  # GEGLU: two halves of 4d
            out[f"{block}_ff_net_2"] = (d, 4 * d)
    return out


def make_lokr(path: Path, seed: int = 0) -> dict[str, tuple[int, int]]:
    rng = np.random.default_rng(seed)
    shapes = layers()
    tensors: dict[str, np.ndarray] = {}
    for stem, (o, i) in shapes.items():
        tensors[f"{stem}.lokr_w1"] = rng.normal(size=(FACTOR, FACTOR)).astype(np.float16)
        w2 = rng.normal(scale=0.01, size=(o // FACTOR, i // FACTOR))
        tensors[f"{stem}.lokr_w2"] = w2.astype(np.float16)
        tensors[f"{stem}.alpha"] = np.array(1.0, np.float16)
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "lokr"}'}
    save_tensors(path, tensors, meta)
    return shapes


def time_loratool(src: Path, work: Path, runs: int, rank: int) -> list[float]:
    times = []
    for n in range(runs + 1):
        start = time.perf_counter()
        result = convert_to_lora(load_adapter(src), rank=rank)
        save_adapter(result.adapter, work / f"out{n}.safetensors", force=True)
        if n:  # the first run warms the page cache and BLAS
            times.append(time.perf_counter() - start)
    return times


def dense_route(w1: np.ndarray, w2: np.ndarray, rank: int) -> np.ndarray:
    """What a script without the Kronecker algebra does: the dense update, its SVD, truncated."""
    dense = np.kron(w1.astype(np.float32), w2.astype(np.float32))
    u, s, vh = np.linalg.svd(dense, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--dense-sample", type=int, default=1, help="modules per shape")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = work / "sdxl-lokr.safetensors"
        shapes = make_lokr(src)
        size_mb = src.stat().st_size / 1e6
        times = time_loratool(src, work, args.runs, args.rank)
        ours = statistics.median(times)
        adapter = load_adapter(src)
        count = Counter(shapes.values())
        dense: dict[tuple[int, int], float] = {}
        worst = 0.0
        for shape in sorted(count):
            stems = [s for s, sh in shapes.items() if sh == shape][: args.dense_sample]
            per = []
            for stem in stems:
                m = adapter.deltas[stem]
                w1, w2 = m.array("lokr_w1"), m.array("lokr_w2")
                start = time.perf_counter()
                dense_route(w1, w2, args.rank)
                per.append(time.perf_counter() - start)
                u, s, vh = np.linalg.svd(np.kron(w1, w2), full_matrices=False)
                ref = (u[:, : args.rank] * s[: args.rank]) @ vh[: args.rank]
                lora = to_lora(m, {"rank": args.rank})
                worst = max(
                    worst, float(np.linalg.norm(lora.up @ lora.down - ref) / np.linalg.norm(ref))
                )
            dense[shape] = statistics.median(per)
        dense_total = sum(dense[shape] * n for shape, n in count.items())
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {machine()}; load average at the end {load}")
    print(
        f"adapter: {len(shapes)} LoKr modules (factor {FACTOR}, both factors whole), fp16, "
        f"{size_mb:.0f} MB; --rank {args.rank}"
    )
    print()
    print("| task | loratool (factor space) | dense SVD route (numpy kron + SVD) | ratio |")
    print("|---|---|---|---|")
    print(
        f"| convert --to lora, {len(shapes)} modules, load + write | {ours:.2f} s (median of "
        f"{len(times)}; runs {', '.join(f'{t:.2f}' for t in times)}) | {dense_total:.0f} s "
        f"(extrapolated) | {dense_total / ours:.0f}x |"
    )
    for shape in sorted(count):
        print(
            f"| dense route, one {shape[0]}x{shape[1]} module (x{count[shape]}) | | "
            f"{dense[shape]:.2f} s | |"
        )
    print(f"| max relative difference vs dense truncated SVD (sampled modules) | {worst:.1e} | | |")


if __name__ == "__main__":
    main()
