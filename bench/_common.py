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
) -> Path:
    """Write a Llama-7B-shaped LoRA (7 linears x ``layers``) in PEFT or kohya naming.

    ``fill="zeros"`` is fast (header-only benchmarks); ``"random"`` gives real spectra.
    """
    from lora_tools.io.safetensors import SafetensorsWriter, TensorSpec, numpy_dtype

    rng = np.random.default_rng(seed)
    specs, values = [], {}
    for layer in range(layers):
        for name, (out_f, in_f) in LLAMA7B_LINEARS.items():
            if kohya:
                stem = f"lora_unet_layers_{layer}_{name.replace('.', '_')}"
                down, up = f"{stem}.lora_down.weight", f"{stem}.lora_up.weight"
                specs.append(TensorSpec(f"{stem}.alpha", "F32", ()))
                values[f"{stem}.alpha"] = np.array(rank / 2, np.float32)
            else:
                stem = f"base_model.model.model.layers.{layer}.{name}"
                down, up = f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"
            specs += [TensorSpec(down, dtype, (rank, in_f)), TensorSpec(up, dtype, (out_f, rank))]
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = path / "adapter_model.safetensors" if not kohya else path
    if not kohya:
        path.mkdir(exist_ok=True)
        (path / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "r": rank,
                    "lora_alpha": rank * 2,
                    "target_modules": [
                        "q_proj",
                        "k_proj",
                        "v_proj",
                        "o_proj",
                        "gate_proj",
                        "up_proj",
                        "down_proj",
                    ],
                }
            )
        )
    np_dtype = numpy_dtype(dtype)
    with SafetensorsWriter(weights, specs, {"format": "pt"}) as writer:
        for spec in writer.order:
            if spec.name in values:
                writer.write(spec.name, values[spec.name])
            elif fill == "zeros":
                writer.write(spec.name, np.zeros(spec.shape, np_dtype))
            else:
                writer.write(spec.name, (rng.standard_normal(spec.shape) * 0.02).astype(np_dtype))
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


def drop_page_cache_hint() -> str:
    return "warm page cache (files were just written; the machine has RAM to spare)"


def machine() -> str:
    import platform

    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
        f"numpy {np.__version__}"
    )
