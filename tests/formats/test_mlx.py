"""MLX-LM adapters: read, validate, merge and convert, against mlx-lm's own fuse and PEFT.

tests/data/mlx/ was written by mlx-lm itself (scripts/make_mlx_fixtures.py): a tiny Llama,
a LoRA adapter (with an embedding module) and a DoRA adapter as ``mlx_lm.lora`` saves them,
and each adapter fused into the base by mlx-lm's ``fuse`` (``*-fused.safetensors``): the oracle.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lora_tools.errors import LoraToolError, UnsupportedAdapterError, UsageError
from lora_tools.formats import load_adapter, save_adapter
from lora_tools.formats.mlx import TransposedTensor, alpha_for, mlx_keys
from lora_tools.ops.convert import convert_adapter
from lora_tools.ops.merge import merge
from lora_tools.ops.validate import validate

DATA = Path(__file__).resolve().parents[1] / "data" / "mlx"
BASE = DATA / "base"
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def _merged(tmp_path: Path, adapter: Path | str, name: str) -> dict[str, np.ndarray]:
    out = tmp_path / name
    merge(BASE, [str(adapter)], out)
    return load_file(out / "model.safetensors")


def _convert(source: Path | str, to: str, out: Path) -> Path:
    result = convert_adapter(load_adapter(source), to)
    save_adapter(result.adapter, out)
    return out


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merge_equals_mlx_lm_fuse(tmp_path: Path, kind: str) -> None:
    merged = _merged(tmp_path, DATA / kind, "merged")
    fused = load_file(DATA / f"{kind}-fused.safetensors")
    base = load_file(BASE / "model.safetensors")
    assert set(merged) == set(fused)
    changed = {k for k in fused if not np.array_equal(fused[k], base[k])}
    assert changed == {k for k in merged if not np.array_equal(merged[k], base[k])}
    assert len(changed) == (4 if kind == "lora" else 2)
    for key in fused:
        # float32 results of two matmul orders: within a few ulps of |W| ~ 1
        np.testing.assert_allclose(merged[key], fused[key], rtol=0, atol=3e-7, err_msg=key)


def test_reads_mlx_lm_files_as_transposed_views() -> None:
    adapter = load_adapter(DATA / "lora")
    assert adapter.format == "mlx"
    assert sorted(adapter.modules) == [
        "model.embed_tokens",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    down = adapter.modules["model.layers.1.mlp.down_proj"]
    assert (down.kind, down.rank, down.scale, down.alpha) == ("linear", 4, 2.5, 10.0)
    assert down.delta_shape == (16, 32)  # [out, in] of down_proj
    assert isinstance(down.down, TransposedTensor) and down.down.shape == (4, 32)
    view = down.down.numpy()
    assert view.flags.f_contiguous and not view.flags.c_contiguous  # a view, no copy
    emb = adapter.modules["model.embed_tokens"]
    assert emb.kind == "embedding" and emb.delta_shape == (64, 16)
    dora = load_adapter(DATA / "dora")
    assert all(m.dora for m in dora.modules.values()) and dora.variants == ["LoRA", "DoRA"]


def test_weights_file_found_beside_mlx_lm_checkpoints(tmp_path: Path) -> None:
    folder = tmp_path / "adapters"
    shutil.copytree(DATA / "lora", folder)
    shutil.copy(folder / "adapters.safetensors", folder / "0000100_adapters.safetensors")
    assert load_adapter(folder).source == folder / "adapters.safetensors"
    lone = load_adapter(folder / "adapters.safetensors")
    assert lone.config_source == folder / "adapter_config.json"
    assert lone.modules["model.embed_tokens"].scale == 2.5


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_mlx_to_peft_merges_like_peft(tmp_path: Path, kind: str) -> None:
    torch = pytest.importorskip("torch")
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    peft_dir = _convert(DATA / kind, "peft", tmp_path / "peft")
    model = LlamaForCausalLM.from_pretrained(BASE, torch_dtype=torch.float32)
    merged_peft = PeftModel.from_pretrained(model, peft_dir).merge_and_unload()
    ours = _merged(tmp_path, DATA / kind, "ours")
    for key, value in merged_peft.state_dict().items():
        np.testing.assert_allclose(ours[key], value.numpy(), rtol=0, atol=3e-7, err_msg=key)
    assert not np.array_equal(
        ours["model.layers.1.self_attn.q_proj.weight"],
        load_file(BASE / "model.safetensors")["model.layers.1.self_attn.q_proj.weight"],
    )


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_round_trip_mlx_peft_mlx_is_bit_exact(tmp_path: Path, kind: str) -> None:
    peft_dir = _convert(DATA / kind, "peft", tmp_path / "peft")
    back = _convert(peft_dir, "mlx", tmp_path / "back")
    original = load_file(DATA / kind / "adapters.safetensors")
    again = load_file(back / "adapters.safetensors")
    assert set(original) == set(again)
    for key, value in original.items():
        assert again[key].tobytes() == value.tobytes() and again[key].shape == value.shape, key
    peft = load_file(peft_dir / "adapter_model.safetensors")
    a = original["model.layers.1.self_attn.q_proj.lora_a"]
    assert np.array_equal(
        peft["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"], a.T
    )
    old = json.loads((DATA / kind / "adapter_config.json").read_text())["lora_parameters"]
    new = json.loads((back / "adapter_config.json").read_text())
    assert new["fine_tune_type"] == kind and new["num_layers"] == -1
    assert (new["lora_parameters"]["rank"], new["lora_parameters"]["scale"]) == (
        old["rank"],
        old["scale"],
    )
    assert sorted(new["lora_parameters"]["keys"]) == sorted(old["keys"])


@pytest.mark.parametrize("fixture", ["llama-lora", "llama-dora", "llama-all-linear"])
def test_round_trip_peft_mlx_peft_is_bit_exact(tmp_path: Path, fixture: str) -> None:
    source = FIXTURES / "peft" / fixture
    mlx_dir = _convert(source, "mlx", tmp_path / "mlx")
    back = _convert(mlx_dir, "peft", tmp_path / "back")
    original = load_file(source / "adapter_model.safetensors")
    again = load_file(back / "adapter_model.safetensors")
    assert set(original) == set(again)
    for key, value in original.items():
        assert again[key].tobytes() == value.tobytes(), key
    before, after = load_adapter(source), load_adapter(back)
    for key, m in before.modules.items():
        assert after.modules[key].scale == m.scale


def test_validate_passes_mlx_lm_files_and_names_unknown_keys(tmp_path: Path) -> None:
    report = validate([DATA / "lora", DATA / "dora"])
    assert [f.format for f in report.files] == ["mlx", "mlx"]
    assert not [f for r in report.files for f in r.findings]
    folder = tmp_path / "extra"
    shutil.copytree(DATA / "lora", folder)
    tensors = load_file(folder / "adapters.safetensors")
    tensors["model.layers.1.self_attn.q_proj.extra"] = np.zeros(2, np.float32)
    save_file(tensors, folder / "adapters.safetensors")
    codes = [(f.rule.code, f.module) for r in validate([folder]).files for f in r.findings]
    assert ("LT112", "model.layers.1.self_attn.q_proj.extra") in codes


def _with_config(tmp_path: Path, kind: str, **changes: object) -> Path:
    folder = tmp_path / f"{kind}-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(DATA / kind, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    for key, value in changes.items():
        if key == "rank":
            config["lora_parameters"]["rank"] = value
        else:
            config[key] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _findings(path: Path) -> list[tuple[str, str]]:
    return [(f.rule.code, f.message) for r in validate([path]).files for f in r.findings]


def test_validate_checks_the_mlx_config_against_the_tensors(tmp_path: Path) -> None:
    assert [c for c, _ in _findings(_with_config(tmp_path, "lora", rank=8))] == ["LT304"]
    plain = _findings(_with_config(tmp_path, "dora", fine_tune_type="lora"))
    assert [c for c, _ in plain] == ["LT308"]
    # a DoRA adapter without its magnitudes: mlx-lm starts them at ||W||, no plain LoRA merge
    folder = _with_config(tmp_path, "lora", fine_tune_type="dora")
    lost = _findings(folder)
    assert lost and "no magnitude vector" in lost[0][1]
    with pytest.raises(LoraToolError, match="no magnitude vector"):
        load_adapter(folder)
    (folder / "adapter_config.json").unlink()
    lone = folder / "adapters.safetensors"
    assert "LT301" in [c for c, _ in _findings(lone)]


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedAdapterError, match="one rank and one scale"):
        convert_adapter(load_adapter(FIXTURES / "peft" / "llama-patterns"), "mlx")
    with pytest.raises(UnsupportedAdapterError, match="mlx-lm adapters cannot hold"):
        convert_adapter(load_adapter(FIXTURES / "peft" / "llama-embedding"), "mlx")
    with pytest.raises(UsageError, match="is a folder"):
        save_adapter(load_adapter(DATA / "lora"), tmp_path / "x.safetensors")
    with pytest.raises(UsageError, match="this mlx adapter does not say which pipeline component"):
        convert_adapter(load_adapter(DATA / "lora"), "diffusers")
    full = tmp_path / "full"
    shutil.copytree(DATA / "lora", full)
    config = json.loads((full / "adapter_config.json").read_text())
    (full / "adapter_config.json").write_text(json.dumps({**config, "fine_tune_type": "full"}))
    with pytest.raises(LoraToolError, match="fine_tune_type is 'full'"):
        load_adapter(full)


def test_alpha_for_divides_back_to_the_scale() -> None:
    for scale in (2.5, 20.0, 1.75, 0.125):
        for rank in (1, 3, 7, 8, 12, 48):
            assert alpha_for(scale, rank) / rank == scale
    rng = np.random.default_rng(0)
    exact = 0
    for scale in map(float, rng.uniform(0.01, 100, 200)):
        for rank in (3, 7, 12):
            quotient = alpha_for(scale, rank) / rank
            assert abs(quotient - scale) <= np.spacing(scale)
            exact += quotient == scale
    assert exact > 0.8 * 600


def test_mlx_keys_are_block_relative() -> None:
    assert mlx_keys(
        ["model.layers.0.self_attn.q_proj", "model.layers.9.mlp.up_proj", "lm_head"]
    ) == ["lm_head", "mlp.up_proj", "self_attn.q_proj"]


def test_rescaled_mlx_adapter_keeps_its_update(tmp_path: Path) -> None:
    from lora_tools.ops.rescale import rescale_adapter

    result = rescale_adapter(load_adapter(DATA / "lora"), alpha=16)
    save_adapter(result.adapter, tmp_path / "a16")
    config = json.loads((tmp_path / "a16" / "adapter_config.json").read_text())
    assert config["lora_parameters"]["scale"] == 4 and config["num_layers"] == -1
    before = _merged(tmp_path, DATA / "lora", "before")
    after = _merged(tmp_path, tmp_path / "a16", "after")
    for key, value in before.items():
        np.testing.assert_allclose(after[key], value, rtol=0, atol=3e-7, err_msg=key)


def test_inspect_names_the_base_and_moe_modules_are_detected_not_merged(tmp_path: Path) -> None:
    from lora_tools.ops.inspect import inspect_adapter

    report = inspect_adapter(DATA / "lora")
    assert report.format == "mlx" and report.base_model == {
        "name": "tiny-llama",
        "source": "adapter_config.json model",
    }
    folder = tmp_path / "moe"
    shutil.copytree(DATA / "lora", folder)
    tensors = load_file(folder / "adapters.safetensors")
    stem = "model.layers.1.mlp.switch_mlp.up_proj"
    tensors[f"{stem}.lora_a"] = np.ones((2, 4, 16), np.float32)  # LoRASwitchLinear: [E, r, in]
    tensors[f"{stem}.lora_b"] = np.ones((2, 32, 4), np.float32)  # [E, out, r]
    save_file(tensors, folder / "adapters.safetensors")
    adapter = load_adapter(folder)
    assert adapter.foreign == {"MLX SwitchLinear LoRA": [stem]} and len(adapter.modules) == 4
    with pytest.raises(UnsupportedAdapterError, match="MLX SwitchLinear LoRA"):
        merge(BASE, [str(folder)], tmp_path / "merged")
    assert [c for c, _ in _findings(folder)] == ["LT111"]  # LoRA mixed with another type
