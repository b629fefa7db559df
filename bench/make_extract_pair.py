"""Write a deterministic Llama-shaped bf16 (base, fine-tune) pair for the extract benchmark.

Usage (from the repository root):

    .venv/bin/python bench/make_extract_pair.py OUT_DIR [--size 1b|8b|8b-4l|tiny]

writes ``OUT_DIR/base`` and ``OUT_DIR/finetuned``: HF folders (``config.json`` for
``LlamaForCausalLM``, safetensors shards and ``model.safetensors.index.json``), streamed tensor
by tensor in row blocks, so memory stays a few blocks whatever the size.

What the fine-tune is, per tensor (all drawn in float32 from seeded generators, one per tensor
name, then rounded to bf16 once, so the files are the same on every run):

- attention / MLP weights (the 7 linears of each layer): ``W_ft = W_base + U diag(s) V^T + E``
  with ``U``, ``V`` orthonormal (QR of Gaussians), ``s_i = s0 exp(-i / 8)`` for ``i < 24``
  (a rank-24 update with a decaying spectrum) and ``E`` Gaussian noise of standard deviation
  ``1e-4`` (full rank: the spectrum has a knee at 24 where the noise floor takes over).
  ``s0 = 4.7e-4 sqrt(out * in)`` gives the update an element RMS of about 1e-3 whatever the
  shape (the base weights are N(0, 0.02^2));
- the RMSNorm weights (``input_layernorm``, ``post_attention_layernorm``, ``model.norm``):
  ``1 + N(0, 0.02^2)``, the fine-tune adds N(0, 0.01^2) (a change that survives bf16, whose
  step at 1.0 is 2^-7);
- ``model.embed_tokens`` and ``lm_head``: bit-equal in both (unchanged).

The true difference is then ``bf16(W_ft) - bf16(W_base)``: the update, the noise and the bf16
rounding of both, which is what an extractor sees and what the benchmark's exact optimum is
computed from.
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other bench scripts
from bench_merge import llama_tensors  # the Llama tensor list, shared with bench_merge

SHAPES = {
    # 1.67 GB per checkpoint (836 M parameters), bench_merge.py's "1b"
    "1b": dict(hidden=2048, layers=16, inter=5632, vocab=32000, heads=32, kv=4),
    # 16.06 GB per checkpoint (8.03 G parameters), Llama-3-8B's shapes
    "8b": dict(hidden=4096, layers=32, inter=14336, vocab=128256, heads=32, kv=8),
    # Llama-3-8B's shapes, 4 of its 32 layers: the same largest tensors (so the same peak
    # memory for a streaming extractor), 3.85 GB per checkpoint
    "8b-4l": dict(hidden=4096, layers=4, inter=14336, vocab=128256, heads=32, kv=8),
    # for tests: a few MB
    "tiny": dict(hidden=128, layers=2, inter=320, vocab=512, heads=4, kv=2),
}
#: Shard size like HF's defaults: 5 GB for 8b, 512 MiB for the 1b (several shards, as a real
#: checkpoint has), 256 KiB for tiny.
MAX_SHARD_BYTES = {"1b": 1 << 29, "8b": 5 * 10**9, "8b-4l": 5 * 10**9, "tiny": 1 << 18}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRUE_RANK = 24
DECAY = 8.0
NOISE = 1e-4
UPDATE_RMS = 4.7e-4  # s0 = UPDATE_RMS * sqrt(out * in)
BASE_STD = 0.02
ROWS = 1024  # row block: the streaming unit (fixed: the random streams depend on it)


def kind(name: str) -> str:
    """ "linear" (low-rank update + noise), "norm" (small change) or "same" (unchanged)."""
    if any(name.endswith(f"{t}.weight") for t in LINEARS):
        return "linear"
    return "norm" if name.endswith("norm.weight") else "same"


def spectrum(shape: tuple[int, int]) -> np.ndarray:
    """The singular values of the planted rank-24 update of a weight of this shape."""
    s0 = UPDATE_RMS * np.sqrt(shape[0] * shape[1])
    return s0 * np.exp(-np.arange(TRUE_RANK) / DECAY)


def _rng(name: str, stream: int) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(name.encode()), stream])


def planted_update(name: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(U * s, V): the planted update is ``(U * s) @ V.T``, float64, orthonormal U and V."""
    rng = _rng(name, 2)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], TRUE_RANK)))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], TRUE_RANK)))
    return u * spectrum(shape), v


def blocks(name: str, shape: tuple[int, ...]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(base, finetuned) float32 row blocks of one tensor, in order."""
    k = kind(name)
    base_rng, noise_rng = _rng(name, 0), _rng(name, 1)
    if len(shape) == 1:
        base = np.float32(1) + base_rng.standard_normal(shape, np.float32) * np.float32(BASE_STD)
        ft = base + noise_rng.standard_normal(shape, np.float32) * np.float32(0.01)
        yield base, ft
        return
    us, v = planted_update(name, shape) if k == "linear" else (None, None)
    vt = None if v is None else np.ascontiguousarray(v.T.astype(np.float32))
    for start in range(0, shape[0], ROWS):
        rows = min(ROWS, shape[0] - start)
        base = base_rng.standard_normal((rows, shape[1]), np.float32)
        base *= np.float32(BASE_STD)
        if k == "same":
            yield base, base
            continue
        ft = noise_rng.standard_normal((rows, shape[1]), np.float32)
        ft *= np.float32(NOISE)
        ft += us[start : start + rows].astype(np.float32) @ vt
        ft += base
        yield base, ft


def _shards(s: dict, max_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in llama_tensors(s):
        nbytes = int(np.prod(shape)) * 2
        if size + nbytes > max_bytes and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def config(s: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s["hidden"],
        "intermediate_size": s["inter"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv"],
        "head_dim": s["hidden"] // s["heads"],
        "vocab_size": s["vocab"],
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


def make_pair(out: Path, size: str = "1b") -> tuple[Path, Path]:
    """Write ``out/base`` and ``out/finetuned``; returns both folders."""
    import ml_dtypes

    from lora_tools.io.safetensors import SafetensorsWriter, TensorSpec

    s = SHAPES[size]
    folders = out / "base", out / "finetuned"
    shards = _shards(s, MAX_SHARD_BYTES[size])
    weight_map, total = {}, 0
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=False)
    bf16 = ml_dtypes.bfloat16
    for n, tensors in enumerate(shards, 1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        specs = [TensorSpec(name, "BF16", shape) for name, shape in tensors]
        with (
            SafetensorsWriter(
                folders[0] / fname, specs, {"format": "pt"}, keep_order=True, durable=False
            ) as wb,
            SafetensorsWriter(
                folders[1] / fname, specs, {"format": "pt"}, keep_order=True, durable=False
            ) as wf,
        ):
            for name, shape in tensors:
                for base, ft in blocks(name, shape):
                    b16 = base.astype(bf16)
                    wb.write(name, b16)
                    wf.write(name, b16 if ft is base else ft.astype(bf16))
                weight_map[name] = fname
                total += int(np.prod(shape)) * 2
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    for folder in folders:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (folder / "config.json").write_text(json.dumps(config(s), indent=2))
    return folders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", choices=SHAPES, default="1b")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    make_pair(args.out, args.size)


if __name__ == "__main__":
    main()
