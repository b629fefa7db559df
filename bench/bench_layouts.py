"""Benchmark resolving LoRAs across checkpoint layouts on a Flux.1-dev-shaped base; print a
markdown table.

Usage (from the repository root):

    .venv/bin/python bench/bench_layouts.py            # 5 runs
    .venv/bin/python bench/bench_layouts.py --runs 3

The base is a BFL single file with Flux.1-dev's tensor names and shapes (19 double blocks,
38 single blocks, hidden 3072, bf16, 23.8 GB): a sparse file (the header is real, the data
holes), since resolving reads headers only. Two rank-16 LoRAs on every block linear: kohya in BFL
names (resolved by name, no layout needed) and diffusers-named (every to_q / to_k / to_v /
proj_mlp resolved through the Flux layout onto rows of qkv / linear1). Reported, median of
``--runs``: in-process ``resolve`` (layout detection included) and ``loratool validate --base``
end to end (interpreter start, imports, both headers).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import machine, median_time, time_command  # noqa: E402

H, MLP, DOUBLE, SINGLE = 3072, 12288, 19, 38


def _flux_shapes() -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {
        "img_in.weight": (H, 64),
        "txt_in.weight": (H, 4096),
        "time_in.in_layer.weight": (H, 256),
        "time_in.out_layer.weight": (H, H),
        "vector_in.in_layer.weight": (H, 768),
        "vector_in.out_layer.weight": (H, H),
        "guidance_in.in_layer.weight": (H, 256),
        "guidance_in.out_layer.weight": (H, H),
        "final_layer.linear.weight": (64, H),
        "final_layer.adaLN_modulation.1.weight": (2 * H, H),
    }
    for n in range(DOUBLE):
        for side in ("img", "txt"):
            b = f"double_blocks.{n}.{side}"
            s[f"{b}_mod.lin.weight"] = (6 * H, H)
            s[f"{b}_attn.qkv.weight"] = (3 * H, H)
            s[f"{b}_attn.proj.weight"] = (H, H)
            s[f"{b}_attn.norm.query_norm.scale"] = (128,)
            s[f"{b}_attn.norm.key_norm.scale"] = (128,)
            s[f"{b}_mlp.0.weight"] = (4 * H, H)
            s[f"{b}_mlp.2.weight"] = (H, 4 * H)
    for n in range(SINGLE):
        b = f"single_blocks.{n}"
        s[f"{b}.linear1.weight"] = (3 * H + MLP, H)
        s[f"{b}.linear2.weight"] = (H, H + MLP)
        s[f"{b}.modulation.lin.weight"] = (3 * H, H)
        s[f"{b}.norm.query_norm.scale"] = (128,)
        s[f"{b}.norm.key_norm.scale"] = (128,)
    # biases, as the released file has them
    for key, shape in list(s.items()):
        if key.endswith(".weight"):
            s[key.removesuffix(".weight") + ".bias"] = (shape[0],)
    return s


def _sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    header, offset = {}, 0
    for key, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        header[key] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)


def _loras(folder: Path) -> tuple[Path, Path]:
    from safetensors.numpy import save_file

    rank = 16
    kohya, diffusers = {}, {}
    zeros = {}

    def factors(out: int, inp: int) -> tuple[np.ndarray, np.ndarray]:
        key = (out, inp)
        if key not in zeros:
            zeros[key] = (np.zeros((rank, inp), np.float16), np.zeros((out, rank), np.float16))
        return zeros[key]

    for n in range(DOUBLE):
        for side, add in (("img", ""), ("txt", "add_")):
            stem = f"lora_unet_double_blocks_{n}_{side}_attn_qkv"
            down, up = factors(3 * H, H)
            kohya[f"{stem}.lora_down.weight"], kohya[f"{stem}.lora_up.weight"] = down, up
            kohya[f"{stem}.alpha"] = np.array(16.0, np.float16)
            names = (
                ("to_q", "to_k", "to_v") if not add else ("add_q_proj", "add_k_proj", "add_v_proj")
            )
            for name in names:
                d, u = factors(H, H)
                p = f"transformer.transformer_blocks.{n}.attn.{name}"
                diffusers[f"{p}.lora_A.weight"], diffusers[f"{p}.lora_B.weight"] = d, u
    for n in range(SINGLE):
        stem = f"lora_unet_single_blocks_{n}_linear1"
        down, up = factors(3 * H + MLP, H)
        kohya[f"{stem}.lora_down.weight"], kohya[f"{stem}.lora_up.weight"] = down, up
        kohya[f"{stem}.alpha"] = np.array(16.0, np.float16)
        for name, rows in (("attn.to_q", H), ("attn.to_k", H), ("attn.to_v", H), ("proj_mlp", MLP)):
            d, u = factors(rows, H)
            p = f"transformer.single_transformer_blocks.{n}.{name}"
            diffusers[f"{p}.lora_A.weight"], diffusers[f"{p}.lora_B.weight"] = d, u
    save_file(kohya, folder / "kohya-bfl.safetensors")
    save_file(diffusers, folder / "diffusers.safetensors")
    return folder / "kohya-bfl.safetensors", folder / "diffusers.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from lora_tools.formats import load_adapter
    from lora_tools.io.checkpoint import open_checkpoint
    from lora_tools.resolve import resolve

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = folder / "flux1-dev.safetensors"
        _sparse_safetensors(base, _flux_shapes())
        loras = _loras(folder)
        rows = []
        for lora in loras:
            adapter = load_adapter(lora)

            def run(adapter=adapter) -> None:
                with open_checkpoint(base) as ckpt:
                    res = resolve(adapter, ckpt)
                assert not res.unmatched and not res.shape_errors

            in_process = median_time(run, args.runs)
            cli = time_command(
                [sys.executable, "-m", "lora_tools", "validate", str(lora), "--base", str(base),
                 "--ignore", "LT2", "-q"],
                args.runs,
            )  # fmt: skip
            fused = sum(
                1 for m in resolve(adapter, open_checkpoint(base)).matches.values() if m.parts
            )
            rows.append((lora.name, len(adapter.modules), fused, in_process, cli))
    print(f"Machine: {machine()}; base: Flux.1-dev-shaped BFL file ({len(_flux_shapes())} tensors)")
    print()
    print(
        "| LoRA | modules | placed on fused rows | resolve (in-process) | validate --base (CLI) |"
    )
    print("|---|---|---|---|---|")
    for name, modules, fused, t_in, t_cli in rows:
        print(f"| {name} | {modules} | {fused} | {t_in * 1000:.0f} ms | {t_cli * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
