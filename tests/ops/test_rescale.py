"""rescale: alpha / normalize leave every update unchanged; factor multiplies it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lora_tools.errors import UnsupportedAdapterError, UsageError
from lora_tools.formats import load_adapter, save_adapter
from lora_tools.formats.kohya import read_scalar
from lora_tools.ops.rescale import rescale_adapter


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


#: Relative error a rescale may add: one rounding of the factors to their dtype.
TOL = {"F32": 1e-6, "F16": 2e-3, "BF16": 1e-2}

CASES = [
    "peft/llama-patterns",  # rank and alpha patterns
    "peft/llama-rslora",
    "peft/llama-embedding",
    "peft/sd-unet-conv",
    "kohya/sd-locon.safetensors",  # fp16, per-module alpha tensors
    "kohya/sdxl-lora.safetensors",  # int64 alpha tensors
    "diffusers/sd-lora",
]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize(
    "kwargs", [{"alpha": 1.0}, {"alpha": 64.0}, {"normalize": True}, {"factor": -0.75}]
)
def test_updates_after_rescale(fixtures_dir, tmp_path, name, kwargs):
    adapter = load_adapter(fixtures_dir / name)
    result = rescale_adapter(adapter, **kwargs)
    out = save_adapter(
        result.adapter,
        tmp_path / ("out.safetensors" if adapter.format == "kohya" else "out"),
        refresh_hashes=True,
    )
    back = load_adapter(out if adapter.format == "kohya" else tmp_path / "out")
    gain = kwargs.get("factor", 1.0)
    for key, old in adapter.modules.items():
        new = back.modules[key]
        assert rel(new.delta(), gain * old.delta()) < TOL[old.up.dtype], key
        assert new.rank == old.rank and new.rslora == old.rslora
        if "alpha" in kwargs:
            assert new.effective_alpha == kwargs["alpha"]
        if kwargs.get("normalize"):
            assert new.scale == pytest.approx(1.0)
        if "factor" in kwargs:
            assert new.effective_alpha == old.effective_alpha


def test_peft_config_and_kohya_metadata(fixtures_dir, tmp_path):
    peft = rescale_adapter(load_adapter(fixtures_dir / "peft/llama-patterns"), alpha=16.0)
    save_adapter(peft.adapter, tmp_path / "p")
    config = json.loads((tmp_path / "p/adapter_config.json").read_text())
    assert config["lora_alpha"] == 16 and config["alpha_pattern"] == {}
    assert config["r"] == 4 and sorted(config["rank_pattern"].values()) == [2, 2, 6]

    kohya = rescale_adapter(load_adapter(fixtures_dir / "kohya/sd-lora.safetensors"), alpha=8.0)
    out = save_adapter(kohya.adapter, tmp_path / "k.safetensors", refresh_hashes=True)
    back = load_adapter(out)
    assert back.metadata["ss_network_alpha"] == "8"
    assert {read_scalar(m.alpha_tensor) for m in back.modules.values()} == {8.0}
    assert json.loads(back.metadata["loratool_history"])[-1] == {
        "op": "rescale",
        "alpha": 8.0,
        "version": json.loads(back.metadata["loratool_history"])[-1]["version"],
    }


def test_rslora_normalize_sets_sqrt_rank(fixtures_dir):
    result = rescale_adapter(load_adapter(fixtures_dir / "peft/llama-rslora"), normalize=True)
    for m in result.adapter.modules.values():
        assert m.rslora and m.alpha == pytest.approx(np.sqrt(m.rank)) and m.scale == 1.0


def test_unchanged_modules_keep_their_tensors(fixtures_dir):
    adapter = load_adapter(fixtures_dir / "kohya/sd-lora-noalpha.safetensors")
    result = rescale_adapter(adapter, normalize=True)  # already scale 1
    assert result.changed == ()
    for key, m in adapter.modules.items():
        new = result.adapter.modules[key]
        assert new.up is m.up and new.down is m.down and new.alpha is None


def test_lora_bias_scales_with_the_update(fixtures_dir):
    adapter = load_adapter(fixtures_dir / "peft/llama-bias")
    for kwargs, gain in (({"factor": 2.5}, 2.5), ({"alpha": 2.0}, 1.0)):
        result = rescale_adapter(adapter, **kwargs)
        for key, old in adapter.modules.items():
            new = result.adapter.modules[key]
            np.testing.assert_allclose(
                new.bias.numpy() * new.scale, gain * old.bias.numpy() * old.scale, rtol=1e-6
            )


def test_dora_alpha_allowed_factor_refused(fixtures_dir):
    adapter = load_adapter(fixtures_dir / "peft/llama-dora")
    result = rescale_adapter(adapter, alpha=2.0)
    for key, old in adapter.modules.items():
        new = result.adapter.modules[key]
        assert rel(new.delta(), old.delta()) < 1e-6
        assert new.magnitude is old.magnitude  # W' = m (W + dW) / ||W + dW|| is unchanged
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        rescale_adapter(adapter, factor=2.0)


def test_factor_warns_about_full_tensors(fixtures_dir):
    result = rescale_adapter(load_adapter(fixtures_dir / "peft/llama-modules-to-save"), factor=0.5)
    assert result.notes and "lm_head" in result.notes[0]
    assert rescale_adapter(load_adapter(fixtures_dir / "peft/llama-lora"), factor=0.5).notes == ()


def test_refuses_factor_on_a_weight_decomposition(fixtures_dir):
    """A kohya DoRA renormalises W + F dW: --factor would not be F times its update."""
    with pytest.raises(UnsupportedAdapterError, match="dora_scale"):
        rescale_adapter(load_adapter(fixtures_dir / "kohya/sd-dora.safetensors"), factor=0.5)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"alpha": 1.0, "factor": 2.0}, {"alpha": 0.0}, {"alpha": -1.0}, {"factor": float("nan")}],
)
def test_usage_errors(fixtures_dir, kwargs):
    with pytest.raises(UsageError):
        rescale_adapter(load_adapter(fixtures_dir / "peft/llama-lora"), **kwargs)


def test_input_is_not_modified(fixtures_dir):
    adapter = load_adapter(fixtures_dir / "peft/llama-lora")
    before = {k: (m.alpha, m.up.numpy().copy()) for k, m in adapter.modules.items()}
    meta = dict(adapter.metadata)
    rescale_adapter(adapter, factor=3.0)
    assert adapter.metadata == meta
    for k, m in adapter.modules.items():
        assert m.alpha == before[k][0]
        np.testing.assert_array_equal(m.up.numpy(), before[k][1])
