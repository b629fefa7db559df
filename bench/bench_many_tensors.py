"""Header-only work on adapters with very many tensors: must grow linearly with the count.

Writes synthetic files under bench/_work/ (zero-size or tiny tensors, so the header is all there
is) and times, in a fresh process per measurement, ``read_header``, ``load_adapter``,
``inspect_adapter`` and ``validate`` (all rules). Three shapes, each a superlinear case once:

- PEFT, 2 tensors per module (the 1,000,000-tensor header of issue 10);
- LyCORIS LoHa, 5 tensors per module (detected, kept as pass-through);
- kohya LoCon, every module a 3x3 convolution (with ss_network metadata).

Run: .venv/bin/python bench/bench_many_tensors.py [--tree DIR] [--peft N] [--loha N] [--locon N]
``--tree`` imports lora_tools from another checkout (e.g. an older commit, for "before").
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from _common import WORK, machine

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import sys, time
sys.path.insert(0, {tree!r})
from lora_tools.formats import load_adapter
from lora_tools.io.safetensors import read_header
from lora_tools.ops.inspect import inspect_adapter
from lora_tools.ops.validate import validate
run = {{
    "read_header": lambda: read_header({weights!r}),
    "load_adapter": lambda: load_adapter({path!r}),
    "inspect": lambda: inspect_adapter({path!r}),
    "validate": lambda: validate([{path!r}]),
}}[{what!r}]
t0 = time.perf_counter()
run()
print(time.perf_counter() - t0)
"""


def _write(path: Path, entries: list[str], metadata: dict[str, str] | None = None) -> None:
    if metadata:
        entries = [f'"__metadata__":{json.dumps(metadata)}', *entries]
    raw = ("{" + ",".join(entries) + "}").encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)


def _empty(name: str, shape: str) -> str:
    return f'"{name}":{{"dtype":"F32","shape":{shape},"data_offsets":[0,0]}}'


def peft(modules: int) -> Path:
    folder = WORK / f"many-peft-{modules}"
    if not (folder / "adapter_model.safetensors").exists():
        entries = [
            _empty(f"base_model.model.m{i}.lora_{ab}.weight", shape)
            for i in range(modules)
            for ab, shape in (("A", "[1,0]"), ("B", "[0,1]"))
        ]
        _write(folder / "adapter_model.safetensors", entries)
        config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["m"]}
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def loha(modules: int) -> Path:
    path = WORK / f"many-loha-{modules}.safetensors"
    if not path.exists():
        roles = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        entries = []
        for i in range(modules):
            entries += [_empty(f"lora_unet_m{i}.{r}", "[1,0]") for r in roles]
            entries.append(_empty(f"lora_unet_m{i}.alpha", "[0]"))
        _write(path, entries)
    return path


def locon(modules: int) -> Path:
    path = WORK / f"many-locon-{modules}.safetensors"
    if not path.exists():
        entries = []
        for i in range(modules):
            entries.append(_empty(f"lora_unet_m{i}.lora_down.weight", "[1,0,3,3]"))
            entries.append(_empty(f"lora_unet_m{i}.lora_up.weight", "[0,1,1,1]"))
        meta = {"ss_network_dim": "1", "ss_network_alpha": "1", "ss_network_args": "{}"}
        _write(path, entries, meta)
    return path


def seconds(tree: str, what: str, path: Path) -> float:
    weights = path / "adapter_model.safetensors" if path.is_dir() else path
    code = _PROBE.format(tree=tree, what=what, path=str(path), weights=str(weights))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", default=str(ROOT), help="checkout whose lora_tools to time")
    parser.add_argument("--peft", type=int, nargs="*", default=[125_000, 500_000])
    parser.add_argument("--loha", type=int, nargs="*", default=[10_000, 20_000])
    parser.add_argument("--locon", type=int, nargs="*", default=[2_500, 5_000])
    args = parser.parse_args()
    print(f"Machine: {machine()}; lora_tools from {args.tree}; one fresh process per cell.\n")
    print("| file | tensors | read_header | load_adapter | inspect_adapter | validate |")
    print("|---|---:|---:|---:|---:|---:|")
    cases = [("PEFT", peft, n, 2 * n) for n in args.peft]
    cases += [("LoHa", loha, n, 5 * n) for n in args.loha]
    cases += [("kohya LoCon 3x3", locon, n, 2 * n) for n in args.locon]
    for label, make, modules, tensors in cases:
        path = make(modules)
        cells = [
            f"{seconds(args.tree, w, path):.2f} s"
            for w in ("read_header", "load_adapter", "inspect", "validate")
        ]
        print(f"| {label}, {modules:,} modules | {tensors:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
