"""Adapter modules resolve to exactly one base weight, for every naming scheme."""

from __future__ import annotations

import numpy as np
import pytest

from lora_tools.adapter import LoraModule
from lora_tools.errors import ResolveError, ShapeError
from lora_tools.formats import load_adapter
from lora_tools.io.checkpoint import open_checkpoint
from lora_tools.io.safetensors import ArrayTensor, TensorInfo
from lora_tools.resolve import fit, resolve

PAIRS = [
    ("peft/llama-lora", "bases/tiny-llama", 8),
    ("peft/llama-all-linear", "bases/tiny-llama-sharded", 14),
    ("peft/llama-embedding", "bases/tiny-llama", 3),
    ("peft/gpt2-lora", "bases/tiny-gpt2", 8),
    ("peft/sd-unet-conv", "bases/tiny-sd", 52),
    ("diffusers/sd-lora", "bases/tiny-sd", 40),
    ("kohya/sd-lora.safetensors", "bases/tiny-sd", 60),
    ("kohya/sd-locon.safetensors", "bases/tiny-sd", 91),
    ("kohya/sdxl-lora.safetensors", "bases/tiny-sdxl.safetensors", 9),
    ("kohya/flux-lora.safetensors", "bases/tiny-flux.safetensors", 6),
    ("diffusers-old/sd-attn-procs.safetensors", "bases/tiny-sd", 40),
]


@pytest.mark.parametrize(("adapter", "base", "count"), PAIRS)
def test_every_module_resolves(fixtures_dir, adapter, base, count):
    ad = load_adapter(fixtures_dir / adapter)
    res = resolve(ad, open_checkpoint(fixtures_dir / base))
    assert (len(res.matches), res.unmatched, res.ambiguous, res.shape_errors) == (count, [], {}, {})
    res.raise_for_problems(ad)


def test_kohya_names_resolve_to_the_flattened_base_key(fixtures_dir):
    ad = load_adapter(fixtures_dir / "kohya/sd-lora.safetensors")
    res = resolve(ad, open_checkpoint(fixtures_dir / "bases/tiny-sd"))
    m = res.matches["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    assert (m.target.component, m.target.key) == (
        "text_encoder",
        "text_model.encoder.layers.0.self_attn.q_proj.weight",
    )
    sdxl = load_adapter(fixtures_dir / "kohya/sdxl-lora.safetensors")
    res = resolve(sdxl, open_checkpoint(fixtures_dir / "bases/tiny-sdxl.safetensors"))
    keys = {m.target.key for m in res.matches.values()}
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight" in keys
    assert (
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
        in keys
    )


def test_gpt2_conv1d_is_transposed_and_peft_passthrough_replaces_base(fixtures_dir):
    res = resolve(
        load_adapter(fixtures_dir / "peft/gpt2-lora"),
        open_checkpoint(fixtures_dir / "bases/tiny-gpt2"),
    )
    assert all(m.transpose for m in res.matches.values())
    mts = load_adapter(fixtures_dir / "peft/llama-modules-to-save")
    res = resolve(mts, open_checkpoint(fixtures_dir / "bases/tiny-llama"))
    assert {t.key for t in res.replacements.values()} == {"lm_head.weight"}


def test_wrong_base_fails_loudly(fixtures_dir):
    ad = load_adapter(fixtures_dir / "broken/wrong-base")
    res = resolve(ad, open_checkpoint(fixtures_dir / "bases/tiny-llama"))
    with pytest.raises(ResolveError, match="0 of 8 modules match this base"):
        res.raise_for_problems(ad, allow_unmatched=True)


def test_partial_match_needs_allow_unmatched(fixtures_dir):
    ad = load_adapter(fixtures_dir / "peft/llama-lora")
    ckpt = open_checkpoint(fixtures_dir / "bases/tiny-llama")
    stray = next(iter(ad.modules.values()))
    ad.modules["extra"] = LoraModule(
        key="extra", down=stray.down, up=stray.up, alpha=8.0, kind="linear", path="model.nowhere"
    )
    res = resolve(ad, ckpt)
    assert res.unmatched == ["extra"]
    with pytest.raises(ResolveError, match="1 of 9 modules match no base weight: 'extra'"):
        res.raise_for_problems(ad)
    res.raise_for_problems(ad, allow_unmatched=True)


def test_lora_bias_needs_a_base_bias(fixtures_dir):
    ad = load_adapter(fixtures_dir / "peft/llama-bias")
    res = resolve(ad, open_checkpoint(fixtures_dir / "bases/tiny-llama"))
    with pytest.raises(ShapeError, match="lora_B.bias but the base has no"):
        res.raise_for_problems(ad)


def _module(kind, down, up):
    return LoraModule(
        "m",
        ArrayTensor(np.zeros(down, np.float32)),
        ArrayTensor(np.zeros(up, np.float32)),
        1.0,
        kind,
    )


@pytest.mark.parametrize(
    ("kind", "down", "up", "base", "expected"),
    [
        ("linear", (2, 3), (5, 2), (5, 3), (False, False)),
        ("linear", (2, 3), (5, 2), (3, 5), (True, False)),  # Conv1D stores [in, out]
        ("linear", (2, 3), (5, 2), (5, 3, 1, 1), (False, True)),  # 1x1 conv base
        ("conv", (2, 3, 3, 3), (5, 2, 1, 1), (5, 3, 3, 3), (False, False)),
        ("conv", (2, 3, 1, 1), (5, 2, 1, 1), (5, 3), (False, True)),
        ("embedding", (2, 10), (4, 2), (10, 4), (False, False)),
    ],
)
def test_fit(kind, down, up, base, expected):
    assert fit(_module(kind, down, up), TensorInfo("w", "F32", base, 0, 0)) == expected


def test_fit_square_conv1d_needs_architecture():
    m = _module("linear", (2, 4), (4, 2))
    info = TensorInfo("w", "F32", (4, 4), 0, 0)
    assert fit(m, info, "gpt2", "transformer.h.0.attn.c_proj") == (True, False)
    assert fit(m, info, "llama", "model.layers.0.self_attn.o_proj") == (False, False)
    with pytest.raises(ShapeError, match="does not fit"):
        fit(m, TensorInfo("w", "F32", (4, 5), 0, 0))


def test_kohya_names_of_a_plain_model_keep_its_model_prefix(fixtures_dir, tmp_path):
    """PEFT -> kohya on an LLM writes lora_unet_model_layers_...: it must resolve back."""
    from lora_tools.formats import save_adapter

    peft = load_adapter(fixtures_dir / "peft/llama-lora")
    for m in peft.modules.values():
        m.keys = {}
    out = save_adapter(peft, tmp_path / "k.safetensors", format="kohya")
    kohya = load_adapter(out)
    assert next(iter(kohya.modules)).startswith("lora_unet_model_layers_0_")
    res = resolve(kohya, open_checkpoint(fixtures_dir / "bases/tiny-llama"))
    assert (len(res.matches), res.unmatched, res.ambiguous) == (8, [], {})
    assert {m.target.key for m in res.matches.values()} == {
        f"{m.path}.weight" for m in peft.modules.values()
    }
    # convert takes the module path and component from here: the PEFT path, no component
    assert {(m.component, m.path) for m in res.matches.values()} == {
        ("", m.path) for m in peft.modules.values()
    }
    sdxl = resolve(
        load_adapter(fixtures_dir / "kohya/sdxl-lora.safetensors"),
        open_checkpoint(fixtures_dir / "bases/tiny-sdxl.safetensors"),
    )
    assert ("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q") in {
        (m.component, m.path) for m in sdxl.matches.values()
    }
