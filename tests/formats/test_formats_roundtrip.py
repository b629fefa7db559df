"""Every reader against the fixtures; read-then-write in the same format is lossless."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from safetensors import safe_open

from lora_tools.errors import AdapterError, UnknownFormatError, UnsafeFileError, UsageError
from lora_tools.formats import (
    AdapterFormat,
    get_format,
    load_adapter,
    register,
    registry,
    save_adapter,
)
from lora_tools.io.safetensors import read_header, save_tensors
from lora_tools.naming import pattern_key

ADAPTERS = {
    "peft/llama-lora": "peft",
    "peft/llama-all-linear": "peft",
    "peft/llama-patterns": "peft",
    "peft/llama-rslora": "peft",
    "peft/llama-dora": "peft",
    "peft/llama-embedding": "peft",
    "peft/llama-bias": "peft",
    "peft/llama-modules-to-save": "peft",
    "peft/gpt2-lora": "peft",
    "peft/gpt2-bias": "peft",
    "peft/llama-lora-bf16": "peft",
    "peft/sd-unet-conv": "peft",
    "diffusers/sd-lora": "diffusers",
    "kohya/sd-lora.safetensors": "kohya",
    "kohya/sd-lora-noalpha.safetensors": "kohya",
    "kohya/sd-locon.safetensors": "kohya",
    "kohya/sdxl-lora.safetensors": "kohya",
    "kohya/flux-lora.safetensors": "kohya",
    "kohya/sd-loha.safetensors": "kohya",
    "kohya/sd-dora.safetensors": "kohya",
    "diffusers-old/sd-attn-procs.safetensors": "diffusers-old",
}


def _tensors(path):
    """key -> (dtype, shape, raw bytes), and the metadata, as the reference reader lists them."""
    header = read_header(path)
    with safe_open(path, "np") as f:
        keys, metadata = list(f.keys()), f.metadata()
    out = {}
    with open(path, "rb") as fh:
        for key in keys:
            info = header.tensors[key]
            fh.seek(header.data_start + info.begin)
            out[key] = (info.dtype, info.shape, fh.read(info.nbytes))
    return out, metadata


@pytest.mark.parametrize(("name", "fmt"), ADAPTERS.items())
def test_detects_format(fixtures_dir, name, fmt):
    assert load_adapter(fixtures_dir / name).format == fmt


@pytest.mark.parametrize("name", ADAPTERS)
def test_round_trip_is_lossless(fixtures_dir, tmp_path, name):
    src = fixtures_dir / name
    adapter = load_adapter(src)
    out = tmp_path / ("out.safetensors" if src.suffix == ".safetensors" else "out")
    written = save_adapter(adapter, out)
    src_file = adapter.source
    before, meta_before = _tensors(src_file)
    after, meta_after = _tensors(written)
    assert before == after  # same keys, dtypes, shapes and bytes
    assert meta_before == meta_after
    if adapter.config_source is not None:
        assert json.loads((out / "adapter_config.json").read_text()) == adapter.config
    # The reference writer's layout: the whole file is identical.
    assert written.read_bytes() == src_file.read_bytes()


def test_peft_scales_follow_pattern_rule(fixtures_dir):
    adapter = load_adapter(fixtures_dir / "peft/llama-patterns")
    by_path = {m.path: m for m in adapter.modules.values()}
    assert by_path["model.layers.0.self_attn.q_proj"].rank == 2
    assert by_path["model.layers.1.self_attn.v_proj"].rank == 6
    assert by_path["model.layers.0.self_attn.o_proj"].scale == pytest.approx(3 / 4)
    assert by_path["model.layers.1.self_attn.v_proj"].scale == pytest.approx(8 / 6)


def test_pattern_key_is_first_match_by_peft_rule():
    patterns = {"q_proj": 1, "layers.1.self_attn.q_proj": 2}
    assert pattern_key(patterns, "model.layers.1.self_attn.q_proj") == "q_proj"
    assert pattern_key({"layers.1.self_attn.q_proj": 2}, "model.layers.11.self_attn.q_proj") is None
    assert pattern_key({"proj": 1}, "model.q_proj") is None  # suffix must start at a dot


def test_rslora_dora_embedding_bias_variants(fixtures_dir):
    rs = load_adapter(fixtures_dir / "peft/llama-rslora")
    assert all(m.rslora and m.scale == pytest.approx(8 / math.sqrt(4)) for m in rs.modules.values())
    dora = load_adapter(fixtures_dir / "peft/llama-dora")
    assert all(
        m.magnitude is not None and m.magnitude.shape == (m.out_features,)
        for m in dora.modules.values()
    )
    emb = load_adapter(fixtures_dir / "peft/llama-embedding")
    (e,) = [m for m in emb.modules.values() if m.kind == "embedding"]
    assert e.delta_shape == (128, 32)
    bias = load_adapter(fixtures_dir / "peft/gpt2-bias")
    assert all(m.bias is not None for m in bias.modules.values())


def test_kohya_alpha_rules(fixtures_dir):
    sd = load_adapter(fixtures_dir / "kohya/sd-lora.safetensors")
    assert {m.scale for m in sd.modules.values()} == {0.5}
    noalpha = load_adapter(fixtures_dir / "kohya/sd-lora-noalpha.safetensors")
    assert {(m.alpha, m.scale) for m in noalpha.modules.values()} == {(None, 1.0)}
    sdxl = load_adapter(fixtures_dir / "kohya/sdxl-lora.safetensors")
    assert {m.alpha_tensor.dtype for m in sdxl.modules.values()} == {"I64"}
    locon = load_adapter(fixtures_dir / "kohya/sd-locon.safetensors")
    conv3 = [m for m in locon.modules.values() if m.kernel == (3, 3)]
    assert conv3 and all(m.rank == 2 and m.scale == 2.0 for m in conv3)
    assert "LoCon" in locon.variants


@pytest.mark.parametrize(
    ("name", "kind"),
    [("kohya/sd-loha.safetensors", "LoHa"), ("kohya/sd-dora.safetensors", "kohya DoRA")],
)
def test_lycoris_types_are_detected_and_refused_for_math(fixtures_dir, name, kind):
    adapter = load_adapter(fixtures_dir / name)
    assert kind in adapter.foreign
    with pytest.raises(AdapterError, match="unsupported adapter type"):
        adapter.require_plain_lora("resize")


def test_unknown_keys_error_shows_samples(tmp_path):
    path = tmp_path / "model.safetensors"
    save_tensors(path, {"encoder.weight": np.zeros(2, np.float32)})
    with pytest.raises(UnknownFormatError, match="encoder.weight"):
        load_adapter(path)


def test_pickle_only_folder_is_refused(fixtures_dir):
    with pytest.raises(UnsafeFileError):
        load_adapter(fixtures_dir / "broken/pickle")


def test_converting_kohya_without_paths_asks_for_base(fixtures_dir, tmp_path):
    adapter = load_adapter(fixtures_dir / "kohya/sd-lora.safetensors")
    for m in adapter.modules.values():
        m.keys = {}
    with pytest.raises(UsageError, match="--base"):
        save_adapter(adapter, tmp_path / "out", format="peft")


def test_entry_point_style_registration(tmp_path):
    class Upper(AdapterFormat):
        name = "upper-test"

        def claims(self, key):
            return key.endswith(".UP")

    register(Upper)
    assert isinstance(get_format("upper-test"), Upper)
    assert "upper-test" in registry()
    with pytest.raises(UsageError, match="unknown format"):
        get_format("nope")
