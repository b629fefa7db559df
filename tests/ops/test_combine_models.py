"""combine describes every module it writes (issue 10 item 2) and refuses adapters of different
models (item 3)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from lora_tools.errors import ShapeError, UsageError
from lora_tools.formats import load_adapter, save_adapter
from lora_tools.io.safetensors import ArrayTensor
from lora_tools.ops.combine import combine_adapters


def covered(targets: list[str], path: str) -> bool:
    """PEFT's list rule: an entry matches by exact name or by ``.``-suffix."""
    return any(path == t or path.endswith("." + t) for t in targets)


def test_peft_config_targets_every_module_of_both_inputs(fixtures_dir, tmp_path):
    a = load_adapter(fixtures_dir / "peft/llama-lora")  # attention only
    b = load_adapter(fixtures_dir / "peft/llama-all-linear")  # attention + MLP
    save_adapter(combine_adapters([a, b], weights=[1.0, 0.5]).adapter, tmp_path / "c")
    config = json.loads((tmp_path / "c/adapter_config.json").read_text())
    paths = [m.path for m in load_adapter(tmp_path / "c").modules.values()]
    assert len(paths) == 14
    assert [p for p in paths if not covered(config["target_modules"], p)] == []
    # and no entry names a layer the file has no tensors for (PEFT would create it empty)
    assert all(any(covered([t], p) for p in paths) for t in config["target_modules"])
    for field in ("exclude_modules", "layers_to_transform", "layers_pattern"):
        assert config.get(field) is None


def test_one_shared_config_is_kept(fixtures_dir, tmp_path):
    a = load_adapter(fixtures_dir / "peft/llama-lora")
    save_adapter(combine_adapters([a, a], weights=[1.0, 0.5]).adapter, tmp_path / "c")
    config = json.loads((tmp_path / "c/adapter_config.json").read_text())
    assert config["target_modules"] == a.config["target_modules"]


def test_diffusers_metadata_targets_every_module(fixtures_dir, tmp_path):
    """A diffusers first input: each component's lora_adapter_metadata covers the modules the
    other (PEFT UNet) input adds, the 3x3 convs and proj_in among them."""
    diff = load_adapter(fixtures_dir / "diffusers/sd-lora")
    unet = load_adapter(fixtures_dir / "peft/sd-unet-conv")
    out = save_adapter(combine_adapters([diff, unet]).adapter, tmp_path / "c")
    back = load_adapter(out)
    meta = json.loads(back.metadata["lora_adapter_metadata"])
    for component in ("unet", "text_encoder"):
        paths = [m.path for m in back.modules.values() if m.component == component]
        targets = meta[f"{component}.target_modules"]
        assert [p for p in paths if not covered(targets, p)] == [], component
    assert any(p.endswith("conv1") for p in meta["unet.target_modules"])


@pytest.mark.oracle
def test_peft_creates_every_combined_layer(fixtures_dir, tmp_path):
    """The issue's case: PEFT created 8 of 14 layers and dropped every MLP module."""
    pytest.importorskip("peft")
    from tests import consumers

    a = load_adapter(fixtures_dir / "peft/llama-lora")
    b = load_adapter(fixtures_dir / "peft/llama-all-linear")
    save_adapter(combine_adapters([a, b]).adapter, tmp_path / "c")
    got = consumers.peft_consume(fixtures_dir / "bases/tiny-llama", tmp_path / "c")
    assert got.problems(14) == []


def test_adapters_of_different_models_are_refused_naming_both(fixtures_dir):
    llama = load_adapter(fixtures_dir / "peft/llama-lora")
    for other in ("peft/gpt2-lora", "kohya/sd-lora.safetensors"):
        second = load_adapter(fixtures_dir / other)
        for pair in ([llama, second], [second, llama]):
            with pytest.raises(ShapeError, match="share no layer") as info:
                combine_adapters(pair)
            assert str(llama.source) in str(info.value) and str(second.source) in str(info.value)


def _only(adapter, word):
    return dataclasses.replace(
        adapter, modules={k: m for k, m in adapter.modules.items() if word in k}
    )


def test_attention_and_mlp_adapters_of_one_model_combine(fixtures_dir):
    """Sharing no module is fine when the modules share blocks and widths (one model)."""
    every = load_adapter(fixtures_dir / "peft/llama-all-linear")
    attn, mlp = _only(every, "self_attn"), _only(every, ".mlp.")
    result = combine_adapters([attn, mlp])
    assert len(result.adapter.modules) == 14


def test_same_block_names_with_other_widths_are_refused(fixtures_dir):
    """An MLP adapter named like tiny-llama's but for a model 4x as wide."""
    attn = _only(load_adapter(fixtures_dir / "peft/llama-all-linear"), "self_attn")
    wide = {}
    for layer in (0, 1):
        path = f"model.layers.{layer}.mlp.up_proj"
        m = next(iter(attn.modules.values()))
        wide[path] = dataclasses.replace(
            m,
            key="base_model.model." + path,
            path=path,
            down=ArrayTensor(np.ones((4, 128), np.float32)),
            up=ArrayTensor(np.ones((512, 4), np.float32)),
            keys={},
        )
    other = dataclasses.replace(attn, modules=wide)
    with pytest.raises(ShapeError, match="different models"):
        combine_adapters([attn, other])


def test_a_peft_output_holds_one_component(fixtures_dir):
    """A plain PEFT first input matched to the UNet cannot also take text-encoder modules."""
    unet = load_adapter(fixtures_dir / "peft/sd-unet-conv")
    diff = load_adapter(fixtures_dir / "diffusers/sd-lora")
    with pytest.raises(UsageError, match="2 pipeline components"):
        combine_adapters([unet, diff])
    only_unet = dataclasses.replace(
        diff, modules={k: m for k, m in diff.modules.items() if m.component == "unet"}
    )
    out = combine_adapters([unet, only_unet]).adapter
    assert {m.component for m in out.modules.values()} == {None}
    assert len(out.modules) == len(unet.modules)


def test_adapters_for_different_layers_of_one_model_combine(fixtures_dir):
    every = load_adapter(fixtures_dir / "peft/llama-all-linear")
    first, second = _only(every, "layers.0."), _only(every, "layers.1.")
    assert len(combine_adapters([first, second]).adapter.modules) == 14
