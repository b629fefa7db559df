"""detect_scheme on the header layouts each tool writes (FORMATS.md section 6), and refusals that
name the scheme found."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lora_tools.quant.schemes import GGUF, detect_scheme, is_gguf

F8 = ("F8_E4M3", (256, 200))
HF_CONFIG = {
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
}


def _ct_config(strategy="channel", fmt="float-quantized", wtype="float", bits=8):
    weights = {"num_bits": bits, "type": wtype, "strategy": strategy, "symmetric": True}
    return {
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "format": fmt,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
            "ignore": ["lm_head"],
        }
    }


def test_float_checkpoint_is_float():
    assert detect_scheme({"a.weight": ("BF16", (2, 2))}).name == "float"


@pytest.mark.parametrize("dtype", ["F8_E4M3", "F8_E5M2"])
def test_plain_fp8(dtype):
    scheme = detect_scheme({"a.weight": (dtype, (2, 2)), "a.bias": ("BF16", (2,))})
    assert (scheme.name, scheme.fp8_dtype, scheme.weight_scale_name("a.weight")) == (
        "plain-fp8",
        dtype,
        None,
    )


def test_hf_block_fp8_from_config_with_scale_in_another_shard():
    # the caller passes all shards' headers together: model.layers.0's scale sits elsewhere
    headers = {
        "m.l.weight": F8,
        "m.l.weight_scale_inv": ("F32", (2, 2)),
        "m.n.weight": ("BF16", (8,)),
    }
    scheme = detect_scheme(headers, config=HF_CONFIG)
    assert scheme.name == "hf-block-fp8" and scheme.block_size == (128, 128)
    assert scheme.weight_scale_name("m.l.weight") == "m.l.weight_scale_inv"
    assert scheme.describe() == "hf-block-fp8 (F8_E4M3, 128x128 blocks)"
    ue8m0 = {"quantization_config": {**HF_CONFIG["quantization_config"], "scale_fmt": "ue8m0"}}
    assert detect_scheme(headers, config=ue8m0).scale_fmt == "ue8m0"


def test_hf_block_fp8_without_config_defaults_to_128_blocks():
    scheme = detect_scheme({"l.weight": F8, "l.weight_scale_inv": ("F32", (2, 2))})
    assert (scheme.name, scheme.block_size) == ("hf-block-fp8", (128, 128))


def test_hf_fp8_config_without_weight_block_size_means_128_blocks_and_null_per_tensor():
    """transformers' FineGrainedFP8Config: weight_block_size defaults to (128, 128); an
    explicit null is per-tensor quantization."""
    headers = {"l.weight": F8, "l.weight_scale_inv": ("F32", ())}
    absent = {"quantization_config": {"quant_method": "fp8"}}
    assert detect_scheme(headers, config=absent).block_size == (128, 128)
    null = {"quantization_config": {"quant_method": "fp8", "weight_block_size": None}}
    scheme = detect_scheme(headers, config=null)
    assert (scheme.granularity, scheme.block_size) == ("tensor", None)


@pytest.mark.parametrize(
    ("config", "scale", "named"),
    [
        (HF_CONFIG, "weight_scale_inv", "Hugging Face fp8 with F8_E5M2"),
        (_ct_config("tensor"), "weight_scale", "compressed-tensors fp8 with F8_E5M2"),
    ],
)
def test_e5m2_weights_are_refused_where_the_quantizer_writes_e4m3_only(config, scale, named):
    headers = {"l.weight": ("F8_E5M2", (256, 200)), f"l.{scale}": ("F32", (2, 2))}
    assert named in detect_scheme(headers, config=config).describe()


UE8M0_CONFIG = {
    "model_type": "deepseek_v4",
    "quantization_config": {**HF_CONFIG["quantization_config"], "scale_fmt": "ue8m0"},
}


def test_hf_fp8_scales_named_scale_are_read_under_their_own_name():
    """DeepSeek-V4-Flash: ``<layer>.scale`` F8_E8M0 grids beside F8_E4M3 weights (transformers
    renames them to ``weight_scale_inv``); its FP4 experts (I8) have ``.scale`` too."""
    headers = {
        "layers.0.attn.wq_a.weight": F8,
        "layers.0.attn.wq_a.scale": ("F8_E8M0", (2, 2)),
        "layers.0.ffn.experts.0.w1.weight": ("I8", (256, 100)),
        "layers.0.ffn.experts.0.w1.scale": ("F8_E8M0", (256, 7)),
        "layers.0.attn_norm.weight": ("BF16", (200,)),
    }
    scheme = detect_scheme(headers, config=UE8M0_CONFIG)
    assert (scheme.name, scheme.block_size, scheme.scale_fmt) == (
        "hf-block-fp8",
        (128, 128),
        "ue8m0",
    )
    assert scheme.weight_scale_name("layers.0.attn.wq_a.weight") == "layers.0.attn.wq_a.scale"
    assert scheme.input_scale_suffix == "activation_scale"
    assert scheme.describe() == (
        "hf-block-fp8 (F8_E4M3, 128x128 blocks, ue8m0 scales, scales as <layer>.scale)"
    )


def test_hf_fp8_scales_named_qscale_weight_carry_qscale_act_beside_them():
    """Mistral's own format: ``<layer>.qscale_weight`` (transformers: ``weight_scale_inv``),
    ``<layer>.qscale_act`` the static activation scale (vLLM: ``input_scale``)."""
    headers = {
        "layers.0.attention.wq.weight": F8,
        "layers.0.attention.wq.qscale_weight": ("F32", (2, 2)),
        "layers.0.attention.wq.qscale_act": ("F32", ()),
    }
    scheme = detect_scheme(headers, config=HF_CONFIG)
    assert scheme.scale_names("layers.0.attention.wq.weight") == (
        "layers.0.attention.wq.qscale_weight",
        "layers.0.attention.wq.qscale_act",
    )
    per_tensor = {"quantization_config": {"quant_method": "fp8", "weight_block_size": None}}
    headers["layers.0.attention.wq.qscale_weight"] = ("F32", ())
    scheme = detect_scheme(headers, config=per_tensor)
    assert (scheme.granularity, scheme.weight_scale_suffix) == ("tensor", "qscale_weight")


def test_a_norm_scale_beside_no_weight_leaves_plain_fp8_plain():
    """Flux's ``query_norm.scale`` sits beside no ``.weight``: no scale of an fp8 weight."""
    headers = {"b.norm.query_norm.scale": ("BF16", (8,)), "b.qkv.weight": F8}
    assert detect_scheme(headers).name == "plain-fp8"


def test_an_inkling2_scale_is_a_norm_not_a_weight_scale():
    """transformers leaves Inkling2's ``.scale`` tensors alone (its ``q_norm.scale``)."""
    headers = {"l.weight": F8, "l.weight_scale_inv": ("F32", (2, 2)), "l.scale": ("BF16", (8,))}
    config = {**HF_CONFIG, "model_type": "inkling2"}
    assert detect_scheme(headers, config=config).weight_scale_suffix == "weight_scale_inv"
    assert not detect_scheme(headers, config=HF_CONFIG).supported  # elsewhere: two spellings


@pytest.mark.parametrize(
    ("scale", "config", "named"),
    [
        (("l.weight_scale_inv", "U8"), UE8M0_CONFIG, "U8 scale 'l.weight_scale_inv' (MXFP8"),
        (("l.scale", "F8_E8M0"), HF_CONFIG, "F8_E8M0 scale 'l.scale' without scale_fmt 'ue8m0'"),
        (("l.qscale_weight", "I32"), HF_CONFIG, "I32 scale 'l.qscale_weight' (loratool reads"),
        (("l.weight_scale_inv", "F8_E4M3"), HF_CONFIG, "F8_E4M3 scale"),
    ],
)
def test_hf_fp8_scales_of_a_dtype_loratool_would_misread_are_refused(scale, config, named):
    headers = {"l.weight": F8, scale[0]: (scale[1], (2, 2))}
    assert named in detect_scheme(headers, config=config).describe()


def test_hf_fp8_scales_spelled_two_ways_are_refused_naming_both():
    headers = {
        "a.weight": F8,
        "a.weight_scale_inv": ("F32", (2, 2)),
        "b.weight": F8,
        "b.qscale_weight": ("F32", (2, 2)),
    }
    described = detect_scheme(headers, config=HF_CONFIG).describe()
    assert "scales spelled two ways ('a.weight_scale_inv' and 'b.qscale_weight')" in described


@pytest.mark.parametrize(
    ("scheme", "weight", "scale", "fits"),
    [
        (("block", (128, 128)), (300, 256), (3, 2), True),  # partial edge block
        (("block", (128, 128)), (300, 256), (2, 2), False),
        (("block", (128, 128)), (4, 300, 256), (4, 3, 2), True),  # stacked experts
        (("channel", None), (300, 256), (300, 1), True),
        (("channel", None), (300, 256), (1,), False),
        (("tensor", None), (300, 256), (1,), True),
        (("tensor", None), (300, 256), (), True),
        (("tensor", None), (300, 256), (300, 1), False),
    ],
)
def test_scale_mismatch_names_the_shape_expected(scheme, weight, scale, fits):
    from lora_tools.quant.schemes import Scheme

    granularity, block = scheme
    s = Scheme("hf-block-fp8", "F8_E4M3", granularity, block, "weight_scale_inv")
    found = s.scale_mismatch(weight, scale)
    assert (found is None) == fits, found


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_compressed_tensors_fp8(strategy):
    headers = {
        "l.weight": F8,
        "l.weight_scale": ("BF16", (256, 1)),
        "l.input_scale": ("BF16", (1,)),
    }
    scheme = detect_scheme(headers, config=_ct_config(strategy))
    assert (scheme.name, scheme.granularity) == ("compressed-tensors-fp8", strategy)
    assert scheme.scale_names("l.weight") == ("l.weight_scale", "l.input_scale")


def test_comfy_legacy_scaled_fp8():
    headers = {
        "scaled_fp8": ("F8_E4M3", (0,)),
        "model.diffusion_model.l.weight": F8,
        "model.diffusion_model.l.scale_weight": ("F32", ()),
        "model.diffusion_model.l.scale_input": ("F32", ()),
    }
    scheme = detect_scheme(headers)
    assert (scheme.name, scheme.marker) == ("comfyui-scaled-fp8", "scaled_fp8")
    assert scheme.weight_scale_name("model.diffusion_model.l.weight").endswith("l.scale_weight")
    assert scheme.is_scale("scaled_fp8") and scheme.is_scale("model.diffusion_model.l.scale_input")


def test_comfy_current_quantization_metadata():
    meta = {"_quantization_metadata": json.dumps({"layers": {"l": {"format": "float8_e4m3fn"}}})}
    headers = {"l.weight": F8, "l.weight_scale": ("F32", ())}
    scheme = detect_scheme(headers, metadata=meta)
    assert (scheme.name, scheme.weight_scale_name("l.weight")) == ("comfyui-fp8", "l.weight_scale")


@pytest.mark.parametrize(
    ("headers", "metadata", "config", "named"),
    [
        ({"l.qweight": ("I32", (8, 8)), "l.scales": ("F16", (1, 8))}, None, None, "GPTQ/AWQ int4"),
        ({}, None, {"quantization_config": {"quant_method": "gptq", "bits": 4}}, "GPTQ"),
        ({}, None, {"quantization_config": {"quant_method": "awq"}}, "AWQ"),
        (
            {},
            None,
            {
                "quantization_config": {
                    "quant_method": "bitsandbytes",
                    "load_in_4bit": True,
                    "bnb_4bit_quant_type": "nf4",
                }
            },
            "bitsandbytes NF4",
        ),
        ({"l.weight.absmax": ("F32", (4,))}, None, None, "bitsandbytes 4-bit"),
        ({"l.weight_packed": ("I32", (8, 1))}, None, None, "compressed-tensors pack-quantized"),
        (
            {},
            None,
            _ct_config(wtype="int", bits=4, fmt="pack-quantized"),
            "compressed-tensors int 4-bit",
        ),
        ({}, None, _ct_config(strategy="block"), "strategy 'block'"),
        (
            {},
            {"_quantization_metadata": json.dumps({"layers": {"l": {"format": "nvfp4"}}})},
            None,
            "ComfyUI nvfp4",
        ),
        ({"l.weight": ("F8_E4M3FNUZ", (2, 2))}, None, None, "F8_E4M3FNUZ"),
        ({"l.weight": F8, "l.weight_scale": ("F32", ())}, None, None, "no config"),
        ({"l.weight": F8, "l.scale": ("F8_E8M0", (2, 2))}, None, None, "no config"),
        ({"l.weight": F8, "l.qscale_weight": ("F32", ())}, None, None, "no config"),
    ],
)
def test_refusals_name_the_scheme(headers, metadata, config, named):
    scheme = detect_scheme(headers, metadata=metadata, config=config)
    assert not scheme.supported and not scheme.quantized
    assert named in scheme.describe() and scheme.describe().startswith("unsupported: ")


def test_gguf_magic():
    assert is_gguf(b"GGUF\x03\x00") and not is_gguf(b"\x08\x00\x00\x00")
    assert GGUF.describe() == "unsupported: GGUF"


def test_detection_imports_neither_torch_nor_ml_dtypes():
    code = (
        "import sys, lora_tools.quant as q; q.detect_scheme({'a.weight': ('F8_E4M3', (2, 2))});"
        "bad = [m for m in ('torch', 'ml_dtypes') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
