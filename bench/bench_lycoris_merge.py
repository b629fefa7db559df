"""Benchmark ``loratool merge`` of LyCORIS LoHa / LoKr files against the same-size LoRA merge.

Usage (from the repository root; prints a markdown table for docs/benchmarks.md):

    .venv/bin/python bench/bench_lycoris_merge.py                   # SDXL-shaped, 5 runs
    .venv/bin/python bench/bench_lycoris_merge.py --runs 7 --blocks 0.25 --prefault-gb 4

Everything is generated under bench/_work/lycoris/ (gitignored): an SDXL-shaped fp16 single
file (``model.diffusion_model.`` SGM names) holding the UNet's transformer layers, the ones
LyCORIS' default preset targets: every attention projection, feed-forward and ``proj_in`` /
``proj_out`` of SDXL's 70 transformer blocks at their real shapes (640 and 1280 channels,
cross-attention from 2048), with their biases; ``--blocks F`` keeps a fraction F of the
blocks. The adapters are kohya-named (SGM names, as sd-scripts / LyCORIS write SDXL files),
fp16, on every one of those layers:

- LoRA rank 16 (``lora_down`` / ``lora_up``, alpha 8): the reference;
- LoHa rank 8: ``2 * 8 * (out + in)`` numbers per layer, as many as the rank-16 LoRA;
- LoKr factor 8, ``w2`` of rank 16 (``lokr_w1`` [8, 8], ``lokr_w2_a`` / ``lokr_w2_b``):
  rank-comparable (the update has rank 8 * 16), an eighth of the LoRA's numbers;
- LoKr factor 16, ``w2`` whole (``lokr_w1`` [16, 16], ``lokr_w2`` [out / 16, in / 16]):
  LyCORIS' "full matrix" LoKr, the update of full rank.

Each merge runs as a child process (``python -m lora_tools merge BASE ADAPTER -o OUT --device
cpu -q``); wall time around it, peak RSS and CPU time from ``os.wait4``; ``sync`` before each
run; the page cache holds the base; the contenders take turns in each round.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import timed

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work" / "lycoris"
#: SDXL's UNet transformers, SGM names: (block prefix, channels, transformer layers).
SDXL_TRANSFORMERS = [
    *((f"input_blocks.{i}.1", 640, 2) for i in (4, 5)),
    *((f"input_blocks.{i}.1", 1280, 10) for i in (7, 8)),
    ("middle_block.1", 1280, 10),
    *((f"output_blocks.{i}.1", 1280, 10) for i in (0, 1, 2)),
    *((f"output_blocks.{i}.1", 640, 2) for i in (3, 4, 5)),
]
CONTEXT = 2048


def sdxl_layers(blocks: float) -> list[tuple[str, tuple[int, int], bool]]:
    """``(module path, (out, in), has bias)`` of the transformer layers, SGM names."""
    out = []
    for prefix, d, layers in SDXL_TRANSFORMERS:
        keep = max(1, round(layers * blocks))
        out += [(f"{prefix}.proj_in", (d, d), True), (f"{prefix}.proj_out", (d, d), True)]
        for n in range(keep):
            p = f"{prefix}.transformer_blocks.{n}."
            for attn in ("attn1", "attn2"):
                kv = d if attn == "attn1" else CONTEXT
                out += [
                    (p + f"{attn}.to_q", (d, d), False),
                    (p + f"{attn}.to_k", (d, kv), False),
                    (p + f"{attn}.to_v", (d, kv), False),
                    (p + f"{attn}.to_out.0", (d, d), True),
                ]
            out += [(p + "ff.net.0.proj", (8 * d, d), True), (p + "ff.net.2", (d, 4 * d), True)]
    return out


def random_f16(rng: np.random.Generator, count: int) -> np.ndarray:
    """Random fp16 values of magnitude ~0.01 (sign, exponent 2^-7 .. 2^-6, random mantissa)."""
    bits = rng.integers(0, 1 << 16, size=count, dtype=np.uint16)
    return ((bits & np.uint16(0x83FF)) | np.uint16(0x2000)).view(np.float16)


def make_base(path: Path, layers: list) -> None:
    from lora_tools.io.safetensors import SafetensorsWriter, TensorSpec

    rng = np.random.default_rng(0)
    specs = []
    for module, (o, i), bias in layers:
        specs.append(TensorSpec(f"model.diffusion_model.{module}.weight", "F16", (o, i)))
        if bias:
            specs.append(TensorSpec(f"model.diffusion_model.{module}.bias", "F16", (o,)))
    with SafetensorsWriter(path, specs, {"format": "pt"}, keep_order=True) as writer:
        for spec in specs:
            writer.write(spec.name, random_f16(rng, int(np.prod(spec.shape))).reshape(spec.shape))


def adapter_tensors(kind: str, layers: list, seed: int) -> dict[str, np.ndarray]:
    """One adapter's tensors (fp16), kohya names of the layers."""
    rng = np.random.default_rng(seed)

    def f16(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, np.float32) * np.float32(0.05)).astype(np.float16)

    out = {}
    for module, (o, i), _ in layers:
        stem = "lora_unet_" + module.replace(".", "_")
        if kind == "LoRA r16":
            out |= {f"{stem}.lora_down.weight": f16(16, i), f"{stem}.lora_up.weight": f16(o, 16)}
            alpha = 8.0
        elif kind == "LoHa r8":
            for h in (1, 2):
                out |= {f"{stem}.hada_w{h}_a": f16(o, 8), f"{stem}.hada_w{h}_b": f16(8, i)}
            alpha = 4.0
        elif kind == "LoKr f8 w2 r16":
            out |= {f"{stem}.lokr_w1": f16(8, 8)}
            out |= {f"{stem}.lokr_w2_a": f16(o // 8, 16), f"{stem}.lokr_w2_b": f16(16, i // 8)}
            alpha = 8.0
        else:  # "LoKr f16 full"
            out |= {f"{stem}.lokr_w1": f16(16, 16), f"{stem}.lokr_w2": f16(o // 16, i // 16)}
            alpha = 16.0  # ignored: both factors whole (scale 1)
        out[f"{stem}.alpha"] = np.array(alpha, np.float16)
    return out


KINDS = ["LoRA r16", "LoHa r8", "LoKr f8 w2 r16", "LoKr f16 full"]


def generate(work: Path, blocks: float) -> None:
    from lora_tools.io.safetensors import save_tensors

    work.mkdir(parents=True, exist_ok=True)
    layers = sdxl_layers(blocks)
    make_base(work / "base.safetensors", layers)
    for seed, kind in enumerate(KINDS, 1):
        name = kind.replace(" ", "-")
        save_tensors(work / f"{name}.safetensors", adapter_tensors(kind, layers, seed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--blocks", type=float, default=1.0, help="fraction of SDXL's blocks kept")
    ap.add_argument("--device", default="cpu", help="loratool --device")
    ap.add_argument("--keep", action="store_true", help="keep bench/_work/lycoris afterwards")
    ap.add_argument("--prefault-gb", type=float, default=0, help="GiB to touch before each run")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = WORK / f"blocks-{args.blocks:g}"
    if args.generate_only:
        shutil.rmtree(work, ignore_errors=True)
        generate(work, args.blocks)
        return
    if not (work / "base.safetensors").exists():
        t = time.perf_counter()
        cmd = [sys.executable, __file__, "--blocks", str(args.blocks), "--generate-only"]
        subprocess.run(cmd, check=True)
        print(f"generated in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    base = work / "base.safetensors"
    subprocess.run(["cat", str(base)], stdout=subprocess.DEVNULL)  # into the page cache

    sys.path.insert(0, str(ROOT))
    from lora_tools.formats import load_adapter

    contenders, params = {}, {}
    for kind in KINDS:
        adapter = work / f"{kind.replace(' ', '-')}.safetensors"
        a = load_adapter(adapter)
        params[kind] = sum(m.parameter_count for m in a.modules.values()) + sum(
            m.parameters for m in a.deltas.values()
        )
        out = work / f"out-{kind.replace(' ', '-')}.safetensors"
        cmd = [sys.executable, "-m", "lora_tools", "merge", str(base), str(adapter)]
        contenders[kind] = ([*cmd, "-o", str(out), "--device", args.device, "-q", "--force"], out)
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in contenders}
    loads = [os.getloadavg()[0]]
    for _ in range(args.runs):
        for kind, (cmd, out) in contenders.items():
            out.unlink(missing_ok=True)
            results[kind].append(timed(cmd, args.prefault_gb))
            loads.append(os.getloadavg()[0])
            out.unlink(missing_ok=True)

    layers = sdxl_layers(args.blocks)
    size_gb = base.stat().st_size / 1e9
    print(
        f"\nSDXL-shaped fp16 single file, {size_gb:.2f} GB, {len(layers)} targeted layers; "
        f"median of {args.runs} runs; {platform.node()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, numpy {np.__version__}; 1-min load average during the "
        f"runs {min(loads):.2f}..{max(loads):.2f}; prefault {args.prefault_gb:g} GiB\n"
    )
    lora = statistics.median(r[0] for r in results["LoRA r16"])
    lora_cpu = statistics.median(r[2] for r in results["LoRA r16"])
    print("| adapter | parameters | wall (s) | runs (s) | CPU (s) | x LoRA (wall) | x LoRA (CPU) "
          "| peak RSS (MB) |")  # fmt: skip
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for kind, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[2] for r in runs)
        each = ", ".join(f"{r[0]:.2f}" for r in runs)
        print(
            f"| {kind} | {params[kind] / 1e6:.1f} M | {wall:.2f} | {each} | {cpu:.2f} | "
            f"{wall / lora:.2f} | {cpu / lora_cpu:.2f} | {max(r[1] for r in runs):.0f} |"
        )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
