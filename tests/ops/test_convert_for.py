"""``convert --for vllm|sglang|llamacpp``: the served update equals the trained one.

Two oracles:

- the engines' own scale rule, applied to the written files read raw (safetensors + JSON, no
  loratool reader): vLLM ``lora_alpha / r`` from the config for every module (vllm/lora/
  peft_helper.py), SGLang the same (python/sglang/srt/lora/lora.py), llama.cpp one alpha over
  each tensor's own rank (src/llama-adapter.h ``get_scale``); the served update
  ``scale * B' @ A'`` must equal each module's intended update ``s * B @ A`` (float64, within the
  rounding of the output dtype);
- real PEFT: ``PeftModel.from_pretrained`` + ``merge_and_unload`` on the output gives the same
  weights as on the input.

Inputs are PEFT's own files (fixtures/peft, made by make_fixtures.py with PEFT on the tiny
Llama) and adapters PEFT makes here (rsLoRA with rank and alpha patterns).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from lora_tools.errors import UnsupportedAdapterError, UsageError
from lora_tools.formats import load_adapter, save_adapter
from lora_tools.ops.convert import convert_adapter
from lora_tools.ops.deploy import TARGETS, convert_for

LLAMA = "bases/tiny-llama"


def served(folder: Path, target: str) -> dict[str, np.ndarray]:
    """Each module's update as ``target`` computes it from the files (module path -> matrix in
    the layout of ``B @ A``)."""
    from safetensors.torch import load_file as load_torch

    config = json.loads((folder / "adapter_config.json").read_text())
    weights = load_torch(folder / "adapter_model.safetensors")
    tensors = {k: v.double().numpy() for k, v in weights.items()}
    out = {}
    for key, a in tensors.items():
        for suffix_a, suffix_b in (
            (".lora_A.weight", ".lora_B.weight"),
            (".lora_embedding_A", ".lora_embedding_B"),
        ):
            if key.endswith(suffix_a):
                stem = key.removesuffix(suffix_a)
                b = tensors[stem + suffix_b]
                if target == "llamacpp":
                    scale = config["lora_alpha"] / b.shape[1]
                elif target == "vllm" and config.get("use_rslora"):
                    scale = config["lora_alpha"] / math.sqrt(config["r"])
                else:
                    scale = config["lora_alpha"] / config["r"]
                out[stem.removeprefix("base_model.model.")] = scale * (b @ a)
    return out


def intended(adapter_dir: Path) -> dict[str, np.ndarray]:
    """Each module's own update ``s * B @ A`` as PEFT scales it (loratool's reader: PEFT's
    rank / alpha pattern rules)."""
    adapter = load_adapter(adapter_dir)
    out = {}
    for m in adapter.modules.values():
        up, down = m.factors()
        out[m.path] = m.scale * (up @ down)
    return out


def assert_served_equal(out: Path, source: Path, target: str, dtype_eps: float) -> None:
    want = intended(source)
    got = served(out, target)
    assert sorted(got) == sorted(want)
    for path, update in want.items():
        scale = np.abs(update).max()
        # one rounding of each baked factor in the output dtype, through a sum over the rank
        assert np.abs(got[path] - update).max() <= 8 * dtype_eps * scale, path


def write(result, folder: Path) -> Path:
    save_adapter(result.adapter, folder)
    return folder


def peft_adapter(tmp_path: Path, fixtures_dir: Path, name: str, **cfg) -> Path:
    """An adapter PEFT itself makes on the tiny Llama (random B: init_lora_weights=False)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(fixtures_dir / LLAMA, local_files_only=True)
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **cfg))
    pm.save_pretrained(tmp_path / name)
    return tmp_path / name


def peft_merged(fixtures_dir: Path, adapter_dir: Path) -> dict[str, np.ndarray]:
    from tests.consumers import peft_consume

    consumed = peft_consume(fixtures_dir / LLAMA, adapter_dir)
    assert not consumed.messages, consumed.messages
    return consumed.merged


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ["llama-patterns", "llama-rslora", "llama-all-linear"])
def test_served_update_is_each_modules_own(fixtures_dir, tmp_path, name, target):
    source = fixtures_dir / "peft" / name
    result = convert_for(load_adapter(source), target)
    out = write(result, tmp_path / "out")
    assert_served_equal(out, source, target, float(np.finfo(np.float32).eps))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert config["use_rslora"] is False and config["modules_to_save"] is None
    # one rank for every module: SGLang stacks q / k / v along the rank axis
    tensors = load_file(out / "adapter_model.safetensors")
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")} == {config["r"]}


def test_patterns_are_padded_to_the_largest_rank_and_baked_to_scale_one(fixtures_dir, tmp_path):
    source = load_adapter(fixtures_dir / "peft" / "llama-patterns")
    result = convert_for(source, "vllm")
    assert result.rank == 6
    assert {m.scale for m in result.adapter.modules.values()} == {1.0}
    rows = {m.module: m for m in result.modules}
    q = rows["model.layers.0.self_attn.q_proj"]
    assert (q.source_rank, q.rank, q.scale, q.padded) == (2, 6, 4.0, True)
    assert result.padded == 7 and result.rescaled == 8
    m = result.adapter.modules["base_model.model.model.layers.0.self_attn.q_proj"]
    up, down = m.factors()
    # the padding is zeros: nothing is added to B @ A
    assert not up[:, 2:].any() and not down[2:].any()
    assert result.server == {"max_lora_rank": 8}
    assert any("rank_pattern, alpha_pattern removed" in n for n in result.notes)


def test_uniform_adapter_keeps_its_factors_byte_for_byte(fixtures_dir, tmp_path):
    source = fixtures_dir / "peft" / "llama-lora"
    result = convert_for(load_adapter(source), "vllm")
    assert result.rescaled == 0 and result.padded == 0
    out = write(result, tmp_path / "out")
    before = load_file(source / "adapter_model.safetensors")
    after = load_file(out / "adapter_model.safetensors")
    assert sorted(before) == sorted(after)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)


def test_bf16_adapter_stays_bf16_within_one_rounding(fixtures_dir, tmp_path):
    pytest.importorskip("torch")
    from lora_tools.ops._algebra import cast_like

    bf16 = load_adapter(fixtures_dir / "peft" / "llama-lora-bf16")
    like = next(iter(bf16.modules.values())).up
    adapter = load_adapter(fixtures_dir / "peft" / "llama-patterns")
    for m in adapter.modules.values():
        m.up = cast_like(m.up.numpy().astype(np.float64), like)
        m.down = cast_like(m.down.numpy().astype(np.float64), like)
    save_adapter(adapter, tmp_path / "bf16")
    result = convert_for(load_adapter(tmp_path / "bf16"), "sglang")
    out = write(result, tmp_path / "out")
    assert {m.up.dtype for m in load_adapter(out).modules.values()} == {"BF16"}
    assert_served_equal(out, tmp_path / "bf16", "sglang", 2.0**-8)


@pytest.mark.parametrize("target", TARGETS)
def test_rslora_with_rank_and_alpha_patterns_loads_in_peft_as_the_input(
    fixtures_dir, tmp_path, target
):
    src = peft_adapter(
        tmp_path,
        fixtures_dir,
        "mixed",
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 8},
        alpha_pattern={"o_proj": 3, "k_proj": 16},
    )
    result = convert_for(load_adapter(src), target)
    assert result.rank == 8
    out = write(result, tmp_path / target)
    assert_served_equal(out, src, target, float(np.finfo(np.float32).eps))
    want = peft_merged(fixtures_dir, src)
    got = peft_merged(fixtures_dir, out)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-6, err_msg=key)


def test_embedding_lora_drops_the_saved_base_copy_and_serves_the_same(fixtures_dir, tmp_path):
    source = fixtures_dir / "peft" / "llama-embedding"
    result = convert_for(load_adapter(source), "vllm")
    out = write(result, tmp_path / "out")
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert not any(k.endswith("base_layer.weight") for k in keys)
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    assert any("copies of base embedding weights left out" in n for n in result.notes)
    want = peft_merged(fixtures_dir, source)
    got = peft_merged(fixtures_dir, out)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-6, err_msg=key)


def test_kohya_llm_lora_converts_with_its_base(fixtures_dir, tmp_path):
    source = fixtures_dir / "peft" / "llama-patterns"
    kohya = tmp_path / "llama-kohya.safetensors"
    save_adapter(convert_adapter(load_adapter(source), "kohya").adapter, kohya)
    with pytest.raises(UsageError, match="kohya names"):
        convert_for(load_adapter(kohya), "vllm")
    result = convert_for(load_adapter(kohya), "vllm", base=fixtures_dir / LLAMA)
    out = write(result, tmp_path / "out")
    assert_served_equal(out, source, "vllm", float(np.finfo(np.float32).eps))
    assert any(ref["role"] == "base" for ref in result.inputs())


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("llama-dora", "is DoRA; vLLM does not serve DoRA"),
        ("llama-modules-to-save", r"1 full tensors .*'base_model.model.lm_head.weight'"),
        ("llama-bias", "has a lora_B bias"),
    ],
)
def test_what_the_engine_cannot_serve_is_refused_by_name(fixtures_dir, name, match):
    with pytest.raises(UnsupportedAdapterError, match=match) as err:
        convert_for(load_adapter(fixtures_dir / "peft" / name), "vllm")
    assert "loratool merge" in err.value.hint


def test_rank_above_the_servers_max_is_refused(fixtures_dir):
    adapter = load_adapter(fixtures_dir / "peft" / "llama-all-linear")  # rank 8
    with pytest.raises(UnsupportedAdapterError, match="rank is 8, above --max-lora-rank 1") as err:
        convert_for(adapter, "vllm", max_lora_rank=1)
    assert "loratool resize ADAPTER --rank 1" in err.value.hint
    with pytest.raises(UnsupportedAdapterError, match="above --max-lora-rank 4"):
        convert_for(adapter, "sglang", max_lora_rank=4)
    assert convert_for(adapter, "vllm", max_lora_rank=8).server == {"max_lora_rank": 8}
    with pytest.raises(UsageError, match="one of vLLM's sizes"):
        convert_for(adapter, "vllm", max_lora_rank=12)
    with pytest.raises(UsageError, match="llama.cpp has none"):
        convert_for(adapter, "llamacpp", max_lora_rank=8)


def test_rank_above_vllms_default_says_which_server_setting(fixtures_dir, tmp_path):
    src = peft_adapter(
        tmp_path, fixtures_dir, "r20", r=20, lora_alpha=20, target_modules=["q_proj"]
    )
    result = convert_for(load_adapter(src), "vllm")
    assert result.server == {"max_lora_rank": 32}
    assert any("start vLLM with --max-lora-rank 32" in n for n in result.notes)


def test_sglang_refuses_a_module_it_has_no_layer_for(fixtures_dir, tmp_path):
    gpt2 = load_adapter(fixtures_dir / "peft" / "gpt2-lora")
    with pytest.raises(UnsupportedAdapterError, match="SGLang has no LoRA layer for"):
        convert_for(gpt2, "sglang")


def test_sglang_gets_a_target_modules_list(fixtures_dir, tmp_path):
    adapter = load_adapter(fixtures_dir / "peft" / "llama-lora")
    adapter.config = {**adapter.config, "target_modules": r".*\.(q|k|v|o)_proj"}
    result = convert_for(adapter, "sglang")
    targets = result.adapter.config["target_modules"]
    assert isinstance(targets, list) and len(targets) == len(result.adapter.modules)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"init_lora_weights": "pissa_niter_4"}, "also changed the base weights"),
        ({"layer_replication": [[0, 2]]}, "uses layer_replication"),
        ({"use_qalora": True}, "uses use_qalora"),
        ({"bias": "all"}, "bias is 'all'"),
    ],
)
def test_config_features_the_engines_refuse_are_named(fixtures_dir, change, match):
    adapter = load_adapter(fixtures_dir / "peft" / "llama-patterns")
    adapter.config = {**adapter.config, **change}
    with pytest.raises(UnsupportedAdapterError, match=match):
        convert_for(adapter, "vllm")


def test_a_training_only_init_name_is_written_as_true(fixtures_dir):
    adapter = load_adapter(fixtures_dir / "peft" / "llama-patterns")
    adapter.config = {**adapter.config, "init_lora_weights": "gaussian"}
    assert convert_for(adapter, "vllm").adapter.config["init_lora_weights"] is True


def test_sglang_gets_the_zero_parts_it_stacks_from_the_base(fixtures_dir, tmp_path):
    # SGLang builds qkv_proj from q_proj (k_proj zero-filled) and gate_up_proj from gate_proj:
    # a v_proj / up_proj LoRA alone would be skipped
    src = peft_adapter(
        tmp_path, fixtures_dir, "v-up", r=4, lora_alpha=8, target_modules=["v_proj", "up_proj"]
    )
    with pytest.raises(
        UnsupportedAdapterError, match=r"has no '(q|gate)_proj' LoRA beside it \(4 such parts"
    ) as err:
        convert_for(load_adapter(src), "sglang")
    assert "--base" in err.value.hint
    result = convert_for(load_adapter(src), "sglang", base=fixtures_dir / LLAMA)
    added = sorted(m.module for m in result.modules if m.added)
    assert added == [
        f"model.layers.{i}.{name}" for i in (0, 1) for name in ("mlp.gate_proj", "self_attn.q_proj")
    ]
    out = write(result, tmp_path / "out")
    got = served(out, "sglang")
    for path in added:
        assert got[path].shape == (32 if "q_proj" in path else 64, 32) and not got[path].any()
    want = intended(src)
    for path, update in want.items():
        np.testing.assert_allclose(got[path], update, rtol=0, atol=1e-6 * np.abs(update).max())
    assert convert_for(load_adapter(src), "vllm").padded == 0  # vLLM needs no such parts
    merged_in, merged_out = peft_merged(fixtures_dir, src), peft_merged(fixtures_dir, out)
    for key, value in merged_in.items():
        np.testing.assert_allclose(merged_out[key], value, rtol=0, atol=1e-6, err_msg=key)
    # loratool's own output passes validate with no warning: the added modules are listed as
    # zero on purpose, so the zero-factor rule (LT203) leaves them out
    from lora_tools.constants import ZERO_MODULES_KEY
    from lora_tools.ops.validate import validate

    report = validate([out], base=fixtures_dir / LLAMA, profiles="sglang")
    assert [f.rule.code for f in report.findings] == []
    with safe_open(out / "adapter_model.safetensors", "np") as f:
        listed = json.loads(f.metadata()[ZERO_MODULES_KEY])
    assert listed == sorted(f"base_model.model.{path}" for path in added)
    # converting the output again keeps the list (nothing more to add)
    again = convert_for(load_adapter(out), "sglang", base=fixtures_dir / LLAMA)
    assert not any(m.added for m in again.modules)
    assert json.loads(again.adapter.metadata[ZERO_MODULES_KEY]) == listed


def test_zero_modules_not_listed_are_still_reported(fixtures_dir, tmp_path):
    # the list names modules, it does not switch LT203 off: a zero module that loratool did not
    # add is reported, on the same file
    from lora_tools.constants import ZERO_MODULES_KEY
    from lora_tools.ops.validate import validate

    src = peft_adapter(
        tmp_path, fixtures_dir, "v-up", r=4, lora_alpha=8, target_modules=["v_proj", "up_proj"]
    )
    out = write(convert_for(load_adapter(src), "sglang", base=fixtures_dir / LLAMA), tmp_path / "o")
    weights = out / "adapter_model.safetensors"
    with safe_open(weights, "np") as f:
        metadata = f.metadata()
    tensors = load_file(weights)
    victim = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    tensors[victim] = np.zeros_like(tensors[victim])
    save_file(tensors, weights, metadata=metadata)
    report = validate([out])
    assert [(f.rule.code, f.module) for f in report.findings] == [
        ("LT203", "base_model.model.model.layers.0.self_attn.v_proj")
    ]
    metadata[ZERO_MODULES_KEY] = "not json"  # a malformed list marks nothing
    save_file(tensors, weights, metadata=metadata)
    assert len([f for f in validate([out]).findings if f.rule.code == "LT203"]) == 5
