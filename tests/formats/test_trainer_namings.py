"""The LoRA namings real trainers write: detection, modules, inspect, validate, round trips.

Synthetic files spell keys exactly as the named source writes or reads them; the ``lycoris_``
files under tests/data/lycoris were written by lycoris-lora 4.1.3 itself
(make_lycoris_prefix_files.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from lora_tools import api
from lora_tools.errors import UsageError
from lora_tools.formats import get_format, load_adapter, save_adapter
from lora_tools.io.safetensors import read_header, save_tensors

DATA = Path(__file__).resolve().parents[1] / "data" / "lycoris"
RANK = 2


def _factors(rng, stem, out, inn, down="lora_down.weight", up="lora_up.weight", alpha=None):
    tensors = {
        f"{stem}.{down}": rng.standard_normal((RANK, inn)).astype(np.float32),
        f"{stem}.{up}": rng.standard_normal((out, RANK)).astype(np.float32),
    }
    if alpha is not None:
        tensors[f"{stem}.alpha"] = np.array(alpha, np.float32)
    return tensors


def _write(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    from lora_tools.io.safetensors import ArrayTensor

    save_tensors(path, {k: ArrayTensor(v, "F32") for k, v in tensors.items()}, None)
    return path


def _raw(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    header = read_header(path)
    with safe_open(path, "np") as f:
        keys = list(f.keys())
    out = {}
    with open(path, "rb") as fh:
        for key in keys:
            info = header.tensors[key]
            fh.seek(header.data_start + info.begin)
            out[key] = (info.dtype, tuple(info.shape), fh.read(info.nbytes))
    return out


def _codes(path: Path) -> set[str]:
    return {f.rule.code for f in api.validate(path).findings}


def _round_trip(path: Path, tmp_path: Path) -> None:
    adapter = load_adapter(path)
    out = save_adapter(adapter, tmp_path / f"again-{path.name}")
    assert _raw(out) == _raw(path)
    assert load_adapter(out).format == adapter.format


# -- LyCORIS / SimpleTuner: lycoris_<flattened path> ---------------------------------------------


@pytest.mark.parametrize(
    ("name", "component", "count"),
    [("lycoris-prefix-unet", "unet", 32), ("lycoris-prefix-flux", "transformer", 11)],
)
def test_lycoris_prefix_files_written_by_lycoris_read_as_kohya_names_of_the_denoiser(
    name, component, count, tmp_path
):
    path = DATA / f"{name}.safetensors"
    adapter = load_adapter(path)
    assert adapter.format == "kohya"
    assert len(adapter.modules) == count and not adapter.passthrough and not adapter.foreign
    assert {m.component for m in adapter.modules.values()} == {component}
    assert all(m.key.startswith("lycoris_") and m.alpha == 1.0 for m in adapter.modules.values())
    assert {m.target_name for m in adapter.modules.values()} >= {"to_q", "to_k", "to_v"}
    assert not _codes(path) & {"LT101", "LT110", "LT112", "LT113", "LT114"}
    info = api.inspect(path).to_json()
    assert info["format"] == "kohya" and len(info["modules"]) == count
    _round_trip(path, tmp_path)


# -- OneTrainer -----------------------------------------------------------------------------------


def test_onetrainer_mixture_names_and_bundled_embeddings(tmp_path):
    # OneTrainer modules/util/convert_lora_util.py convert_to_mixture: transformer ->
    # lora_transformer, text_encoder -> lora_te1, text_encoder_2 -> lora_te2, flattened;
    # modules/modelSaver/flux/FluxLoRASaver.py: bundle_emb.<placeholder>.clip_l / .t5.
    rng = np.random.default_rng(0)
    path = _write(
        tmp_path / "onetrainer.safetensors",
        {
            **_factors(rng, "lora_transformer_transformer_blocks_0_attn_to_q", 8, 8, alpha=1),
            **_factors(rng, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 8, 8, alpha=1),
            **_factors(rng, "lora_te2_encoder_block_0_layer_0_SelfAttention_q", 8, 8, alpha=1),
            "bundle_emb.<tok>.clip_l": rng.standard_normal((1, 8)).astype(np.float32),
            "bundle_emb.<tok>.t5": rng.standard_normal((1, 8)).astype(np.float32),
        },
    )
    adapter = load_adapter(path)
    assert adapter.format == "kohya"
    assert sorted(m.component for m in adapter.modules.values()) == [
        "text_encoder",
        "text_encoder_2",
        "transformer",
    ]
    assert sorted(adapter.passthrough) == ["bundle_emb.<tok>.clip_l", "bundle_emb.<tok>.t5"]
    assert not _codes(path) & {"LT112", "LT113", "LT114"}
    _round_trip(path, tmp_path)


def test_onetrainer_comfy_output_reads_alpha_under_lora_a_b(tmp_path):
    # OneTrainer LoRASaverMixin._save_comfy: diffusion_model. prefix, lora_A / lora_B, alpha kept.
    rng = np.random.default_rng(1)
    stem = "diffusion_model.double_blocks.0.img_attn.qkv"
    path = _write(
        tmp_path / "ot-comfy.safetensors",
        _factors(rng, stem, 24, 8, "lora_A.weight", "lora_B.weight", alpha=1),
    )
    adapter = load_adapter(path)
    assert adapter.format == "comfyui"
    (module,) = adapter.modules.values()
    assert (module.component, module.path) == ("transformer", "double_blocks.0.img_attn.qkv")
    assert module.scale == 0.5  # the alpha tensor, which a PEFT reading would have dropped
    assert not _codes(path) & {"LT112", "LT113", "LT114"}
    _round_trip(path, tmp_path)


# -- musubi-tuner: lora_unet_<native path> ------------------------------------------------------


@pytest.mark.parametrize(
    ("stem", "out"),
    [
        ("lora_unet_blocks_0_self_attn_q", 8),  # Wan (musubi-tuner networks/lora_wan.py)
        ("lora_unet_double_blocks_0_img_attn_qkv", 24),  # HunyuanVideo (networks/lora.py)
    ],
)
def test_musubi_tuner_names_are_kohya_names_of_the_transformer(stem, out, tmp_path):
    rng = np.random.default_rng(2)
    path = _write(tmp_path / "musubi.safetensors", _factors(rng, stem, out, 8, alpha=1))
    adapter = load_adapter(path)
    (module,) = adapter.modules.values()
    assert (adapter.format, module.component, module.path) == ("kohya", "transformer", None)
    _round_trip(path, tmp_path)


# -- XLabs x-flux ---------------------------------------------------------------------------------


def _xlabs(tmp_path: Path, prefix: str = "") -> Path:
    # x-flux src/flux/modules/layers.py DoubleStreamBlockLoraProcessor (qkv_lora1, proj_lora1,
    # qkv_lora2, proj_lora2) and SingleStreamBlockLoraProcessor (qkv_lora: dim -> 3 dim,
    # proj_lora: 15360 = 5 dim -> dim), as diffusers' _convert_xlabs_flux_lora_to_diffusers
    # reads them; hidden 8 here.
    rng = np.random.default_rng(3)
    double = [
        (f"double_blocks.0.processor.{kind}_lora{stream}", 24 if kind == "qkv" else 8, 8)
        for kind in ("qkv", "proj")
        for stream in (1, 2)
    ]
    single = [("single_blocks.1.processor.qkv_lora", 24, 8)]
    single.append(("single_blocks.1.processor.proj_lora", 8, 40))
    tensors = {}
    for stem, out, inn in double + single:
        tensors.update(_factors(rng, prefix + stem, out, inn, "down.weight", "up.weight"))
    return _write(tmp_path / "xlabs.safetensors", tensors)


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_xlabs_processors_map_to_their_bfl_modules_at_scale_1(prefix, tmp_path):
    path = _xlabs(tmp_path, prefix)
    adapter = load_adapter(path)
    assert adapter.format == "xlabs"
    got = {m.key.removeprefix(prefix): (m.path, m.rows) for m in adapter.modules.values()}
    assert got == {
        "double_blocks.0.processor.qkv_lora1": ("double_blocks.0.img_attn.qkv", None),
        "double_blocks.0.processor.proj_lora1": ("double_blocks.0.img_attn.proj", None),
        "double_blocks.0.processor.qkv_lora2": ("double_blocks.0.txt_attn.qkv", None),
        "double_blocks.0.processor.proj_lora2": ("double_blocks.0.txt_attn.proj", None),
        # q, k, v rows of the fused linear1; its mlp rows get no update
        "single_blocks.1.processor.qkv_lora": ("single_blocks.1.linear1", (0, 24)),
        "single_blocks.1.processor.proj_lora": ("single_blocks.1.linear2", None),
    }
    assert {m.component for m in adapter.modules.values()} == {"transformer"}
    assert {m.scale for m in adapter.modules.values()} == {1.0}
    assert not _codes(path) & {"LT105", "LT112", "LT113", "LT114"}
    assert api.inspect(path).to_json()["format"] == "xlabs"
    _round_trip(path, tmp_path)


def test_xlabs_writer_names_bfl_modules_and_refuses_what_it_cannot_hold(tmp_path):
    adapter = load_adapter(_xlabs(tmp_path))
    for m in adapter.modules.values():
        m.keys = {}
    out = get_format("xlabs").write(adapter, tmp_path / "renamed.safetensors")
    assert _raw(out) == _raw(tmp_path / "xlabs.safetensors")
    module = next(iter(adapter.modules.values()))
    module.alpha = 1.0  # scale 0.5: x-flux files store no alpha
    with pytest.raises(UsageError, match="store no alpha"):
        get_format("xlabs").tensors_for(adapter)
    module.alpha, module.path = None, "double_blocks.0.img_mod.lin"
    with pytest.raises(UsageError, match="no module an x-flux processor"):
        get_format("xlabs").tensors_for(adapter)


# -- ComfyUI: diffusion_model. / text_encoders., diff_b -----------------------------------------


def _comfy(tmp_path: Path) -> Path:
    # ComfyUI comfy/lora.py load_lora: <stem>.lora_up.weight / .lora_down.weight, .alpha,
    # .diff (full weight difference) and .diff_b (bias difference) per model key.
    rng = np.random.default_rng(4)
    qkv = "diffusion_model.double_blocks.0.img_attn.qkv"
    clip = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    norm = "diffusion_model.double_blocks.0.img_attn.norm.query_norm"
    return _write(
        tmp_path / "comfy.safetensors",
        {
            **_factors(rng, qkv, 24, 8, alpha=4),
            f"{qkv}.diff_b": rng.standard_normal(24).astype(np.float32),
            **_factors(rng, clip, 8, 8, alpha=2),
            f"{norm}.diff": rng.standard_normal(4).astype(np.float32),
            f"{norm}.diff_b": rng.standard_normal(4).astype(np.float32),
        },
    )


def test_comfyui_diff_b_beside_lora_factors_is_a_bias_difference_not_a_full_diff(tmp_path):
    path = _comfy(tmp_path)
    adapter = load_adapter(path)
    assert adapter.format == "comfyui"
    qkv = adapter.modules["diffusion_model.double_blocks.0.img_attn.qkv"]
    assert (qkv.component, qkv.path, qkv.scale) == (
        "transformer",
        "double_blocks.0.img_attn.qkv",
        2,
    )
    assert qkv.bias_diff is not None and qkv.bias_diff.shape == (24,)
    assert qkv.keys["bias_diff"] == "diffusion_model.double_blocks.0.img_attn.qkv.diff_b"
    clip = adapter.modules[
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    ]
    assert (clip.component, clip.path) == (
        "text_encoder",
        "text_model.encoder.layers.0.self_attn.q_proj",
    )
    # a stem with .diff and no factors stays a full diff, its .diff_b with it
    assert adapter.foreign == {
        "full diff": ["diffusion_model.double_blocks.0.img_attn.norm.query_norm"]
    }
    assert "bias diff" in adapter.variants
    codes = _codes(path)
    assert "LT112" not in codes and "LT101" not in codes
    findings = [f for f in api.validate(path).findings if f.rule.code == "LT111"]
    assert findings and "full diff (1 modules)" in findings[0].message
    _round_trip(path, tmp_path)


def test_comfyui_lone_factors_with_diff_b_and_writers_without_bias_diff(tmp_path):
    adapter = load_adapter(_comfy(tmp_path))
    with pytest.raises(UsageError, match="bias difference"):
        get_format("peft").tensors_for(adapter)
    # the kohya writer keeps it as .diff_b, as sd-scripts-named files carry it
    qkv = adapter.modules["diffusion_model.double_blocks.0.img_attn.qkv"]
    qkv.keys, qkv.key = {}, "lora_unet_double_blocks_0_img_attn_qkv"
    assert "lora_unet_double_blocks_0_img_attn_qkv.diff_b" in get_format("kohya").tensors_for(
        adapter
    )


def test_kohya_names_with_diff_b_read_the_bias_difference(tmp_path):
    rng = np.random.default_rng(5)
    stem = "lora_unet_blocks_0_self_attn_q"
    path = _write(
        tmp_path / "wan.safetensors",
        {**_factors(rng, stem, 8, 8, alpha=1), f"{stem}.diff_b": np.ones(8, np.float32)},
    )
    adapter = load_adapter(path)
    assert adapter.modules[stem].bias_diff is not None and not adapter.foreign
    assert not _codes(path) & {"LT110", "LT111", "LT112"}
    _round_trip(path, tmp_path)


# -- fal Kontext / BFL Control (PEFT-style keys on BFL paths) -----------------------------------


def test_fal_kontext_peft_keys_on_bfl_paths_are_the_transformer_at_scale_1(tmp_path):
    # diffusers _convert_fal_kontext_lora_to_diffusers: base_model.model.double_blocks.N...,
    # loaded with no alphas (scale 1).
    rng = np.random.default_rng(6)
    path = _write(
        tmp_path / "fal.safetensors",
        _factors(
            rng,
            "base_model.model.double_blocks.0.img_attn.qkv",
            24,
            8,
            "lora_A.weight",
            "lora_B.weight",
        ),
    )
    adapter = load_adapter(path)
    (module,) = adapter.modules.values()
    assert (adapter.format, module.component, module.path) == (
        "peft",
        "transformer",
        "double_blocks.0.img_attn.qkv",
    )
    assert module.alpha_unknown is None and module.scale == 1.0
    _round_trip(path, tmp_path)


def test_bfl_control_lora_norm_scales_are_named_full_norm_weights(tmp_path):
    # diffusers _convert_bfl_flux_control_lora_to_diffusers: <BFL path>.lora_A / lora_B
    # (+ lora_B.bias) and full RMS-norm scales double_blocks.N.img_attn.norm.query_norm.scale.
    rng = np.random.default_rng(7)
    path = _write(
        tmp_path / "control.safetensors",
        {
            **_factors(rng, "img_in", 8, 16, "lora_A.weight", "lora_B.weight"),
            "img_in.lora_B.bias": np.zeros(8, np.float32),
            **_factors(
                rng, "double_blocks.0.img_attn.qkv", 24, 8, "lora_A.weight", "lora_B.weight"
            ),
            "double_blocks.0.img_attn.norm.query_norm.scale": np.ones(4, np.float32),
            "double_blocks.0.img_attn.norm.key_norm.scale": np.ones(4, np.float32),
        },
    )
    adapter = load_adapter(path)
    assert {m.component for m in adapter.modules.values()} == {"transformer"}
    assert {m.scale for m in adapter.modules.values()} == {1.0}
    assert adapter.modules["img_in"].bias is not None
    assert adapter.foreign == {"full norm weights": ["double_blocks.0.img_attn.norm"]}
    assert "LT112" not in _codes(path)
    _round_trip(path, tmp_path)
