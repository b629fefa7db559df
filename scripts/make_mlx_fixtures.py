"""Write tests/data/mlx/ with mlx-lm itself: a tiny Llama, LoRA and DoRA adapters as
``mlx_lm.lora`` saves them, and each adapter fused by mlx-lm's own ``fuse`` (the oracle of
tests/formats/test_mlx.py).

Run with a Python that has mlx and mlx-lm (``pip install "mlx[cpu]" mlx-lm`` works on Linux):
    python scripts/make_mlx_fixtures.py tests/data/mlx
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters
from mlx_lm.utils import load_model, save_config

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def write_base(folder: Path) -> None:
    rng = np.random.default_rng(0)
    h, i, v = LLAMA["hidden_size"], LLAMA["intermediate_size"], LLAMA["vocab_size"]
    weights = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for n in range(LLAMA["num_hidden_layers"]):
        p = f"model.layers.{n}."
        for proj in ("q", "k", "v", "o"):
            weights[f"{p}self_attn.{proj}_proj.weight"] = (h, h)
        weights[f"{p}mlp.gate_proj.weight"] = (i, h)
        weights[f"{p}mlp.up_proj.weight"] = (i, h)
        weights[f"{p}mlp.down_proj.weight"] = (h, i)
        weights[f"{p}input_layernorm.weight"] = (h,)
        weights[f"{p}post_attention_layernorm.weight"] = (h,)
    arrays = {
        k: mx.array(rng.standard_normal(s).astype(np.float32) * 0.2) for k, s in weights.items()
    }
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), arrays, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(LLAMA, indent=2) + "\n")


def train_like(base: Path, out: Path, fine_tune_type: str, seed: int) -> None:
    """An adapter as mlx_lm.lora saves one, with random (non-zero) factors for a visible update."""
    mx.random.seed(seed)
    model, _ = load_model(base)
    model.freeze()
    params = {
        "rank": 4,
        "scale": 2.5 if fine_tune_type == "lora" else 1.75,
        "dropout": 0.0,
        "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "model.embed_tokens"]
        if fine_tune_type == "lora"
        else ["self_attn.q_proj", "mlp.up_proj"],
    }
    linear_to_lora_layers(model, 1, params, use_dora=fine_tune_type == "dora")
    trainable = dict(tree_flatten(model.trainable_parameters()))
    updated = {}
    for name, value in trainable.items():
        if name.endswith(".lora_b"):
            value = mx.random.normal(value.shape) * 0.3
        elif name.endswith(".m"):
            value = value * (1 + 0.1 * mx.random.normal(value.shape))
        updated[name] = value
    model.update(tree_unflatten(list(updated.items())))
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(
        str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters()))
    )
    config = {
        "adapter_path": str(out.name),
        "batch_size": 4,
        "fine_tune_type": fine_tune_type,
        "iters": 10,
        "learning_rate": 1e-5,
        "lora_parameters": params,
        "model": "tiny-llama",
        "num_layers": 1,
        "seed": seed,
    }
    save_config(config, out / "adapter_config.json")


def fuse(base: Path, adapter: Path, out: Path) -> None:
    """What ``mlx_lm.fuse`` does: load the adapter, fuse every layer that can, save weights."""
    model, _ = load_model(base)
    load_adapters(model, str(adapter))
    fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    mx.save_safetensors(
        str(out), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"}
    )


def main(target: str) -> None:
    root = Path(target)
    write_base(root / "base")
    for kind, seed in (("lora", 1), ("dora", 2)):
        train_like(root / "base", root / kind, kind, seed)
        fuse(root / "base", root / kind, root / f"{kind}-fused.safetensors")


if __name__ == "__main__":
    main(sys.argv[1])
