"""inspect on a ~1 GB adapter: header-only, no torch, against the reference reader.

Run: .venv/bin/python bench/bench_inspect.py   (prints a markdown table for docs/benchmarks.md)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from _common import WORK, llama_adapter, machine, median_time, time_command

PY = sys.executable


def main() -> None:
    peft_dir = WORK / "inspect-peft-r104"
    kohya_file = WORK / "inspect-kohya-r104.safetensors"
    if not (peft_dir / "adapter_model.safetensors").exists():
        llama_adapter(peft_dir, rank=104)
    if not kohya_file.exists():
        llama_adapter(kohya_file, rank=104, kohya=True)
    size = (peft_dir / "adapter_model.safetensors").stat().st_size

    from safetensors import safe_open

    from lora_tools.ops.inspect import inspect_adapter

    rows = []
    for label, target in (("PEFT", peft_dir), ("kohya (224 alpha tensors)", kohya_file)):
        weights = target / "adapter_model.safetensors" if target.is_dir() else target
        cli = time_command([PY, "-m", "lora_tools", "inspect", str(target), "--json"])
        lib = median_time(lambda t=target: inspect_adapter(t))

        def ref_header(w: Path = weights) -> None:
            with safe_open(w, "np") as f:
                f.keys()

        ref = median_time(ref_header)
        full = median_time(lambda w=weights: Path(w).read_bytes(), runs=3)
        rows.append((label, cli, lib, ref, full))

    # torch is never imported by inspect
    probe = subprocess.run(
        [
            PY,
            "-c",
            f"import sys; from lora_tools.ops.inspect import inspect_adapter; "
            f"inspect_adapter({str(peft_dir)!r}); print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()

    print(
        f"Machine: {machine()}; adapter: Llama-7B shapes, 224 modules, rank 104, F32, "
        f"{size / 1e9:.2f} GB; median of 7 runs (full read: 3), warm page cache.\n"
    )
    print(
        "| adapter | `loratool inspect --json` (new process) | `inspect_adapter()` in process | "
        "reference: `safe_open` + keys | reading the whole file |"
    )
    print("|---|---|---|---|---|")
    for label, cli, lib, ref, full in rows:
        print(
            f"| {label} | {cli * 1000:.0f} ms | {lib * 1000:.1f} ms | {ref * 1000:.1f} ms | "
            f"{full * 1000:.0f} ms ({full / cli:.1f}x the CLI) |"
        )
    bare = time_command([PY, "-c", "pass"])
    deps = time_command([PY, "-c", "import numpy, ml_dtypes, click, rich"])
    print(
        f"\nStart-up alone: `python -c pass` {bare * 1000:.0f} ms; importing numpy, ml_dtypes, "
        f"click and rich {deps * 1000:.0f} ms. torch imported by inspect: {probe}."
    )


if __name__ == "__main__":
    main()
