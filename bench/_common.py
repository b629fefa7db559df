"""Helpers shared by the benchmark scripts: synthetic files, timing, markdown output."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

WORK = Path(__file__).resolve().parent / "_work"

#: Llama-7B linear layers: name -> (out, in).
LLAMA7B_LINEARS = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}


def llama_adapter(
    path: Path,
    rank: int,
    *,
    layers: int = 32,
    dtype: str = "F32",
    kohya: bool = False,
    fill: str = "zeros",
    seed: int = 0,
    alpha: float | None = None,
    up_decay: np.ndarray | None = None,
) -> Path:
    """Write a Llama-7B-shaped LoRA (7 linears x ``layers``) in PEFT or kohya naming.

    ``fill="zeros"`` is fast (header-only benchmarks); ``"random"`` draws seeded normal factors
    scaled by 0.01, the up factor's columns multiplied by ``up_decay`` when given (trained LoRA
    spectra decay; a flat one makes the top-k subspace ill-defined). ``alpha`` defaults to
    ``2 * rank``. Returns the adapter folder (PEFT) or file (kohya).
    """
    from lora_tools.io.safetensors import SafetensorsWriter, TensorSpec, numpy_dtype

    alpha = 2.0 * rank if alpha is None else alpha
    rng = np.random.default_rng(seed)
    specs, values, ups = [], {}, set()
    for layer in range(layers):
        for name, (out_f, in_f) in LLAMA7B_LINEARS.items():
            if kohya:
                stem = f"lora_unet_layers_{layer}_{name.replace('.', '_')}"
                down, up = f"{stem}.lora_down.weight", f"{stem}.lora_up.weight"
                specs.append(TensorSpec(f"{stem}.alpha", "F32", ()))
                values[f"{stem}.alpha"] = np.array(alpha, np.float32)
            else:
                stem = f"base_model.model.model.layers.{layer}.{name}"
                down, up = f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"
            specs += [TensorSpec(down, dtype, (rank, in_f)), TensorSpec(up, dtype, (out_f, rank))]
            ups.add(up)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = path if kohya else path / "adapter_model.safetensors"
    if not kohya:
        path.mkdir(exist_ok=True)
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": [name.split(".")[-1] for name in LLAMA7B_LINEARS],
        }
        (path / "adapter_config.json").write_text(json.dumps(config))
    np_dtype = numpy_dtype(dtype)
    with SafetensorsWriter(weights, specs, {"format": "pt"}) as writer:
        for spec in writer.order:
            if spec.name in values:
                writer.write(spec.name, values[spec.name])
            elif fill == "zeros":
                writer.write(spec.name, np.zeros(spec.shape, np_dtype))
            else:
                factor = rng.standard_normal(spec.shape, np.float32) * np.float32(0.01)
                if up_decay is not None and spec.name in ups:
                    factor *= up_decay
                writer.write(spec.name, factor.astype(np_dtype))
    return path


def median_time(fn: Callable[[], object], runs: int = 7) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_command(cmd: list[str], runs: int = 7) -> float:
    """Median wall time of a command in a fresh process (includes interpreter start-up)."""
    return median_time(lambda: subprocess.run(cmd, check=True, capture_output=True), runs)


def machine() -> str:
    import platform

    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
        f"numpy {np.__version__}"
    )


def prefault(gib: float) -> None:
    """Touch ``gib`` GiB in a child process that exits at once (to push the base out of
    the page cache; bench_merge.py's docstring explains why)."""
    if gib > 0:
        code = f"import numpy; numpy.ones({int(gib * (1 << 30))}, numpy.uint8)"
        subprocess.run([sys.executable, "-c", code], check=True)


def timed(cmd: list[str], prefault_gib: float = 0) -> tuple[float, float, float]:
    """(wall seconds, peak RSS MB, CPU seconds) of one child process."""
    os.sync()  # earlier runs' dirty pages are not this run's cost
    time.sleep(1)
    prefault(prefault_gib)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        err = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err}")
    return wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
