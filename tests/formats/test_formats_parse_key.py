"""AdapterFormat.parse_key: the key grammar each built-in format reads with, and validate checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_tools.adapter import EMBEDDING
from lora_tools.formats import get_format, load_adapter, registry
from lora_tools.formats.base import AdapterFormat, ParsedKey, classify_foreign
from lora_tools.io.safetensors import read_header

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"

CASES = [
    (
        "peft",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        ("base_model.model.model.layers.0.self_attn.q_proj", "down", False),
    ),
    ("peft", "base_model.model.q.lora_B.weight", ("base_model.model.q", "up", False)),
    ("peft", "base_model.model.q.lora_B.bias", ("base_model.model.q", "bias", False)),
    (
        "peft",
        "base_model.model.q.lora_magnitude_vector",
        ("base_model.model.q", "magnitude", False),
    ),
    (
        "peft",
        "base_model.model.q.lora_magnitude_vector.weight",
        ("base_model.model.q", "magnitude", False),
    ),
    ("peft", "base_model.model.embed.lora_embedding_A", ("base_model.model.embed", "down", True)),
    ("peft", "base_model.model.embed.lora_embedding_B", ("base_model.model.embed", "up", True)),
    ("peft", "base_model.model.lm_head.weight", None),  # modules_to_save: a full tensor
    ("peft", "base_model.model.q.lora_A.default.weight", None),  # adapter name left in: not PEFT's
    ("peft", "lora_A.weight", None),  # no stem
    (
        "diffusers",
        "unet.mid_block.attn.to_q.lora_A.weight",
        ("unet.mid_block.attn.to_q", "down", False),
    ),
    (
        "kohya",
        "lora_unet_mid_block_attn_to_q.lora_down.weight",
        ("lora_unet_mid_block_attn_to_q", "down", False),
    ),
    (
        "kohya",
        "lora_te1_text_model_q_proj.lora_up.weight",
        ("lora_te1_text_model_q_proj", "up", False),
    ),
    ("kohya", "lora_unet_x.alpha", ("lora_unet_x", "alpha", False)),
    ("kohya", "lora_unet_x.hada_w1_a", None),  # LoHa: foreign, not a LoRA tensor
    ("kohya", "lora_unet.x.lora_down.weight", None),  # kohya names hold no dots
    (
        "diffusers-old",
        "mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight",
        ("mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora", "up", False),
    ),
    (
        "diffusers-old",
        "text_encoder.q_proj.lora_linear_layer.down.weight",
        ("text_encoder.q_proj.lora_linear_layer", "down", False),
    ),
    ("diffusers-old", "conv_in.lora.up.weight", ("conv_in.lora", "up", False)),
    ("diffusers-old", "conv_in.lora.alpha", None),
]


@pytest.mark.parametrize(("fmt", "key", "expected"), CASES)
def test_parse_key_splits_stem_and_role(fmt: str, key: str, expected: tuple | None) -> None:
    parsed = get_format(fmt).parse_key(key)
    if expected is None:
        assert parsed is None
    else:
        assert parsed == ParsedKey(*expected)
        assert (parsed.stem, parsed.role, parsed.embedding) == expected


def test_formats_without_a_grammar_parse_nothing() -> None:
    class Plugin(AdapterFormat):
        name = "plugin"

    assert Plugin().parse_key("base_model.model.q.lora_A.weight") is None


ADAPTERS = sorted(
    [
        *(FIXTURES / "peft").iterdir(),
        *(FIXTURES / "kohya").iterdir(),
        FIXTURES / "diffusers" / "sd-lora",
        FIXTURES / "diffusers-old" / "sd-attn-procs.safetensors",
    ]
)


@pytest.mark.parametrize("path", ADAPTERS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_readers_group_tensors_exactly_as_parse_key_does(path: Path) -> None:
    """Every tensor the reader puts in a module parses to that module's stem and role, and every
    key that parses (and is not a LyCORIS tensor) ends up in a module of that stem."""
    adapter = load_adapter(path)
    fmt = registry()[adapter.format]
    assert adapter.source is not None
    keys = list(read_header(adapter.source).tensors)
    in_modules = {}
    for stem, module in adapter.modules.items():
        for role, key in module.keys.items():
            parsed = fmt.parse_key(key)
            assert parsed is not None and (parsed.stem, parsed.role) == (stem, role), key
            in_modules[key] = stem
        down = fmt.parse_key(module.keys["down"])
        assert down is not None and down.embedding == (module.kind == EMBEDDING)
    foreign_stems = {s for stems in adapter.foreign.values() for s in stems}
    parsed_keys = {
        k: p for k in keys if (p := fmt.parse_key(k)) is not None and classify_foreign(k) is None
    }
    assert parsed_keys, "the fixture has LoRA tensors"
    for key, parsed in parsed_keys.items():
        if parsed.stem in foreign_stems:
            assert key in adapter.passthrough  # a LyCORIS module's alpha stays with it
        else:
            assert in_modules.get(key) == parsed.stem, key
