"""PEFT adapters for the deployment-profile tests, made with real PEFT on a tiny Llama.

:func:`make` saves ``get_peft_model(LlamaForCausalLM(config), LoraConfig(**kwargs))`` with
``save_pretrained``: the folder a server is given. The model is a random tiny Llama (hidden 64,
2 layers, vocab 128 unless told), built once per set of model arguments.
"""

from __future__ import annotations

import functools
from pathlib import Path

#: LoRA arguments of every adapter the tests use, by name. ``clean`` and ``all-linear`` load in
#: every server profile as PEFT serves them (rank 8 fits vLLM's default --max-lora-rank 16).
ADAPTERS: dict[str, dict] = {
    "clean": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "all-linear": dict(r=8, lora_alpha=8, target_modules="all-linear"),
    "rank32": dict(r=32, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
    "dora": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True),
    "modules-to-save": dict(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]
    ),
    "lora-bias": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_bias=True),
    "patterns": dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "o_proj"],
        rank_pattern={"q_proj": 4},
        alpha_pattern={"o_proj": 4},
    ),
    # a rank_pattern that keeps every scale: r 8 alpha 16 and q_proj r 4 alpha 8 -> all 2
    "patterns-same-scale": dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"q_proj": 4},
        alpha_pattern={"q_proj": 8},
    ),
    "rslora": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "embedding": dict(r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj"]),
    "pissa": dict(
        r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"
    ),
    "mlp": dict(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "one-layer": dict(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], layers_to_transform=[0]
    ),
    # v_proj of layer 1 alone at rank 4: one layer type with two ranks
    "layer-rank": dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"layers.1.self_attn.v_proj": 4},
    ),
    "lm-head": dict(r=8, lora_alpha=16, target_modules=["q_proj", "lm_head"]),
    # PEFT 0.15's trainable tokens: rows of embed_tokens trained beside the LoRA
    "trainable-tokens": dict(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], trainable_token_indices=[1, 2]
    ),
}


@functools.cache
def _model(vocab_size: int, tied: bool = False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def make(folder: Path, name: str, *, vocab_size: int = 128) -> Path:
    """Save the PEFT adapter ``ADAPTERS[name]`` into ``folder / name``; return that folder."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(_model(vocab_size))
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(**ADAPTERS[name]))
    with torch.no_grad():  # non-zero factors everywhere (PEFT starts lora_B at zero)
        for param_name, param in peft_model.named_parameters():
            if "lora_" in param_name:
                param.normal_(0.0, 0.1)
    out = folder / name
    peft_model.save_pretrained(out)
    return out


def save_base(folder: Path, *, vocab_size: int = 128, tied: bool = False) -> Path:
    """The tiny Llama itself, as a transformers folder (a ``--base`` for validate)."""
    out = folder / (f"base-{vocab_size}" + ("-tied" if tied else ""))
    _model(vocab_size, tied).save_pretrained(out)
    return out


def save_moved_base(base: Path, rows: list[int], shift: float) -> Path:
    """A copy of the base folder ``base`` whose input embedding has ``rows`` moved by ``shift``
    (``base`` + ``-moved``): a base on which an embedding LoRA's saved copy differs."""
    import shutil

    from safetensors.numpy import load_file, save_file

    out = base.with_name(base.name + "-moved")
    shutil.copytree(base, out)
    path = out / "model.safetensors"
    tensors = {k: v.copy() for k, v in load_file(path).items()}
    tensors["model.embed_tokens.weight"][rows] += shift
    save_file(tensors, path, metadata={"format": "pt"})
    return out
