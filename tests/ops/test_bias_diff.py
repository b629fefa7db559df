"""A LoRA module with a bias difference (ComfyUI / LyCORIS ``.diff_b``) through the algebra
commands: rescale scales it with the update's gain, combine refuses it (no place for it in new
factors), merge adds ``weight * diff_b`` to the base bias (tests/ops/test_flux_lora_layouts.py)."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lora_tools.errors import UnsupportedAdapterError
from lora_tools.formats import load_adapter, save_adapter
from lora_tools.ops.combine import combine_adapters
from lora_tools.ops.rescale import rescale_adapter


@pytest.fixture
def with_diff_b(tmp_path):
    rng = np.random.default_rng(0)
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tensors = {
        f"{stem}.lora_down.weight": rng.standard_normal((2, 8), np.float32),
        f"{stem}.lora_up.weight": rng.standard_normal((4, 2), np.float32),
        f"{stem}.alpha": np.array(1.0, np.float32),
        f"{stem}.diff_b": rng.standard_normal(4, np.float32),
    }
    save_file(tensors, tmp_path / "lora.safetensors")
    return tmp_path / "lora.safetensors", stem, tensors


def test_rescale_by_a_factor_scales_the_bias_difference(with_diff_b, tmp_path):
    path, stem, tensors = with_diff_b
    res = rescale_adapter(load_adapter(path), factor=2.0)
    save_adapter(res.adapter, tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    np.testing.assert_array_equal(out[f"{stem}.diff_b"], 2.0 * tensors[f"{stem}.diff_b"])


def test_rescale_to_a_new_alpha_keeps_the_bias_difference(with_diff_b, tmp_path):
    path, stem, tensors = with_diff_b
    res = rescale_adapter(load_adapter(path), alpha=4.0)
    save_adapter(res.adapter, tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    np.testing.assert_array_equal(out[f"{stem}.diff_b"], tensors[f"{stem}.diff_b"])


def test_combine_refuses_a_bias_difference(with_diff_b):
    path, _, _ = with_diff_b
    with pytest.raises(UnsupportedAdapterError, match="diff_b"):
        combine_adapters([load_adapter(path), load_adapter(path)], weights=[1.0, 1.0])


@pytest.mark.parametrize("to", ["peft", "diffusers", "mlx"])
def test_convert_refuses_a_bias_difference_where_the_target_has_no_place_for_it(
    with_diff_b, tmp_path, to
):
    """PEFT / diffusers scale lora_B.bias by alpha / r, mlx-lm has no bias: refused before
    anything is written (exit 3), never dropped (mlx wrote the factors alone)."""
    import dataclasses
    import subprocess
    import sys

    from lora_tools.ops.convert import convert_adapter

    path, stem, _ = with_diff_b
    adapter = load_adapter(path)
    module = adapter.modules[stem]
    adapter.modules[stem] = dataclasses.replace(module, path="blocks.0.proj_in", component=None)
    with pytest.raises(UnsupportedAdapterError, match=r"\.diff_b"):
        convert_adapter(adapter, to)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "lora_tools", "convert", path, "--to", to, "-o", out],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and ".diff_b" in lines[0] and not out.exists()
