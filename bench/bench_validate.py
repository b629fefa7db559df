"""Benchmark ``loratool validate`` on a synthetic ~1 GB PEFT adapter; print a markdown table.

Usage (from the repository root):

    .venv/bin/python bench/bench_validate.py                 # 1 GB, 5 runs
    .venv/bin/python bench/bench_validate.py --size-gb 0.25 --runs 3

The adapter has LLaMA-7B shapes (32 layers x q/k/v/o/gate/up/down, hidden 4096, MLP 11008) in
F32 with the rank chosen to reach the size. Every measurement runs on a warm page cache (the file
is read once first) and reports the median of ``--runs``:

- structural validation (``--ignore LT2``: headers only), in-process and as the CLI end to end
  (interpreter start and imports included);
- full validation (all rules: one pass over the data), against two references on the same file:
  plain sequential reading (``readinto`` in 8 MiB chunks, no checks) and the safetensors
  reference reader loading every tensor and checking ``np.isfinite``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

# As the CLI does (lora_tools/cli/validate.py): validate's BLAS work is r x r Gram matrices, and
# threaded BLAS on a busy machine is 10-30x slower for them. Set before numpy loads.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_tools.ops.validate import validate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LLAMA7B_LINEARS, llama_adapter, median_time  # noqa: E402

LAYERS = 32


def make_adapter(folder: Path, size_bytes: int) -> Path:
    """A Llama-7B-shaped PEFT adapter of about ``size_bytes``, random F32 factors."""
    per_rank = LAYERS * sum(i + o for o, i in LLAMA7B_LINEARS.values()) * 4
    rank = max(1, round(size_bytes / per_rank))
    return llama_adapter(folder, rank, fill="random") / "adapter_model.safetensors"


def plain_read(path: Path) -> None:
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(view):
            pass


def reference_read(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open objects are not iterable
            assert np.isfinite(f.get_tensor(key)).all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the adapter")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp) / "adapter"
        path = make_adapter(folder, int(args.size_gb * 1e9))
        size = path.stat().st_size
        plain_read(path)  # warm the page cache

        structural = median_time(lambda: validate([folder], ignore=["LT2"]), args.runs)
        cli = median_time(
            lambda: subprocess.run(
                [sys.executable, "-m", "lora_tools", "validate", "--ignore", "LT2", str(folder)],
                check=True,
                capture_output=True,
                cwd=ROOT,
            ),
            args.runs,
        )
        report = validate([folder])
        assert not report.findings, [f.message for f in report.findings]
        full = median_time(lambda: validate([folder]), args.runs)
        no_norms = median_time(lambda: validate([folder], ignore=["LT204"]), args.runs)
        plain = median_time(lambda: plain_read(path), args.runs)
        reference = median_time(lambda: reference_read(path), args.runs)
        assert "torch" not in sys.modules

    gb = size / 1e9
    print(
        f"Adapter: {gb:.2f} GB ({size:,} bytes), {LAYERS * len(LLAMA7B_LINEARS)} modules, F32; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, numpy {np.__version__}; median of {args.runs} runs, "
        "warm page cache.\n"
    )
    print("| measurement | time (s) | throughput | vs plain read |")
    print("|---|---:|---:|---:|")
    print(f"| validate, structural (`--ignore LT2`), in-process | {structural:.3f} | - | - |")
    print(f"| `loratool validate --ignore LT2` (CLI, incl. start-up) | {cli:.3f} | - | - |")
    print(
        f"| validate, all rules (one pass over the data) | {full:.3f} | {gb / full:.2f} GB/s | "
        f"{plain / full:.2f}x |"
    )
    print(
        f"| validate, all rules but LT204 (no Gram matrices) | {no_norms:.3f} | "
        f"{gb / no_norms:.2f} GB/s | {plain / no_norms:.2f}x |"
    )
    print(
        f"| plain sequential read, 8 MiB chunks (reference) | {plain:.3f} | {gb / plain:.2f} GB/s "
        "| 1.00x |"
    )
    print(
        f"| safetensors `safe_open` + `get_tensor` + `np.isfinite` (reference) | {reference:.3f} "
        f"| {gb / reference:.2f} GB/s | {plain / reference:.2f}x |"
    )


if __name__ == "__main__":
    main()
