"""A LoRA checked against an fp8 base resolves like one checked against the float base; merge
merges into it keeping its scheme, and refuses an fp8 scheme it does not know in one line naming
the tensor, its dtype and the scheme."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from lora_tools.io.checkpoint import open_checkpoint
from lora_tools.io.safetensors import SafetensorsFile
from lora_tools.quant.numeric import quantize
from lora_tools.quant.schemes import Scheme, detect_scheme

ROOT = Path(__file__).resolve().parents[2]
FLOAT_BASE = ROOT / "fixtures" / "bases" / "tiny-llama-sharded"
ADAPTER = ROOT / "fixtures" / "peft" / "llama-lora"
INDEX = "model.safetensors.index.json"
SCHEME = Scheme("hf-block-fp8", "F8_E4M3", "block", (24, 24), "weight_scale_inv")


def loratool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lora_tools", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
        check=False,
    )


@pytest.fixture(scope="module")
def fp8_base(tmp_path_factory) -> Path:
    """The tiny Llama in block FP8 (24x24 blocks: partial edge blocks), each projection's
    ``weight_scale_inv`` written to the next shard, as the index allows."""
    base = tmp_path_factory.mktemp("fp8") / "base"
    shutil.copytree(FLOAT_BASE, base)
    index = json.loads((base / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    tensors = {s: load_file(base / s) for s in shards}
    for name, shard in list(index["weight_map"].items()):
        if "_proj." in name:
            q, inv = quantize(SCHEME, tensors[shard][name])
            tensors[shard][name] = q
            other = shards[(shards.index(shard) + 1) % len(shards)]
            tensors[other][name + "_scale_inv"] = inv
            index["weight_map"][name + "_scale_inv"] = other
    for shard, content in tensors.items():
        save_file(content, base / shard)
    index["metadata"]["total_size"] = sum(a.nbytes for t in tensors.values() for a in t.values())
    (base / INDEX).write_text(json.dumps(index))
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [24, 24],
    }
    (base / "config.json").write_text(json.dumps(config))
    return base


def test_the_built_base_is_detected_with_scales_across_shards(fp8_base):
    config = json.loads((fp8_base / "config.json").read_text())
    with open_checkpoint(fp8_base) as checkpoint:
        component = checkpoint.components[""]
        headers = {name: component.info(name) for name in component}
    scheme = detect_scheme(headers, config=config)
    assert scheme.describe() == "hf-block-fp8 (F8_E4M3, 24x24 blocks)"
    weight_map = json.loads((fp8_base / INDEX).read_text())["weight_map"]
    name = "model.layers.0.self_attn.q_proj.weight"
    assert weight_map[scheme.weight_scale_name(name)] != weight_map[name]
    scale = headers[scheme.weight_scale_name(name)]
    assert (scale.dtype, scale.shape) == ("F32", (2, 2))


def _findings(result: subprocess.CompletedProcess) -> list[tuple[str, str | None]]:
    doc = json.loads(result.stdout)
    return [(f["rule"], f["module"]) for file in doc["files"] for f in file["findings"]]


def test_validate_resolves_against_an_fp8_base_as_against_the_float_one(fp8_base):
    on_fp8 = loratool("validate", ADAPTER, "--base", fp8_base, "--json")
    on_float = loratool("validate", ADAPTER, "--base", FLOAT_BASE, "--json")
    assert on_fp8.returncode == on_float.returncode == 0, on_fp8.stderr
    # the only difference: the dtype note (LT405), since the base's weights are F8_E4M3
    assert [f for f in _findings(on_fp8) if f[0] != "LT405"] == _findings(on_float)
    assert ("LT405", None) in _findings(on_fp8)


def test_merge_into_the_fp8_base_keeps_its_scheme(fp8_base, tmp_path):
    out = tmp_path / "out"
    result = loratool("merge", fp8_base, ADAPTER, "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["quantization"]["scheme"] == "hf-block-fp8"
    assert doc["quantization"]["scales_rewritten"] == doc["counts"]["tensors_merged"] == 8
    assert (out / "config.json").read_bytes() == (fp8_base / "config.json").read_bytes()
    assert (out / INDEX).read_bytes() == (fp8_base / INDEX).read_bytes()


def test_merge_refuses_an_unsupported_fp8_scheme_in_one_line_naming_it(fp8_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(fp8_base, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "block"},
            }
        },
    }
    (base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = loratool("merge", base, ADAPTER, "-o", out)
    assert result.returncode == 3 and not out.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.json" not in lines[0]
    assert "quantized as compressed-tensors fp8 strategy 'block'" in lines[0], lines[0]


@pytest.fixture(scope="module")
def scale_base(fp8_base, tmp_path_factory) -> Path:
    """``fp8_base`` with its scales named ``<layer>.scale`` (DeepSeek-V4's spelling, which
    transformers reads as ``weight_scale_inv``), and a packed FP4 expert (I8, two e2m1 values
    a byte) with its F8_E8M0 ``.scale``, as DeepSeek-V4-Flash ships its routed experts."""
    base = tmp_path_factory.mktemp("scale") / "base"
    shutil.copytree(fp8_base, base)
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    index = json.loads((base / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    for shard in shards:
        content = {
            n.replace(".weight_scale_inv", ".scale"): t for n, t in load_torch(base / shard).items()
        }
        if shard == shards[0]:
            content[EXPERT] = torch.arange(48 * 12).reshape(48, 12).to(torch.int8)
            content[EXPERT_SCALE] = torch.ones(48, 1).to(torch.float8_e8m0fnu)
        save_torch(content, base / shard)
    weight_map = {
        n.replace(".weight_scale_inv", ".scale"): s for n, s in index["weight_map"].items()
    }
    weight_map[EXPERT] = weight_map[EXPERT_SCALE] = shards[0]
    index["weight_map"] = dict(sorted(weight_map.items()))
    index["metadata"]["total_size"] += 48 * 12 + 48
    (base / INDEX).write_text(json.dumps(index))
    return base


EXPERT = "model.layers.0.mlp.experts.0.w1.weight"
EXPERT_SCALE = "model.layers.0.mlp.experts.0.w1.scale"


def test_validate_resolves_against_a_base_with_scales_named_scale(scale_base):
    on_scale = loratool("validate", ADAPTER, "--base", scale_base, "--json")
    on_float = loratool("validate", ADAPTER, "--base", FLOAT_BASE, "--json")
    assert on_scale.returncode == on_float.returncode == 0, on_scale.stderr
    assert [f for f in _findings(on_scale) if f[0] != "LT405"] == _findings(on_float)
    notes = [
        f["message"]
        for file in json.loads(on_scale.stdout)["files"]
        for f in file["findings"]
        if f["rule"] == "LT405"
    ]
    assert notes and "with its 'scale'" in notes[0] and "scales as <layer>.scale" in notes[0]


def test_merge_into_a_base_with_scales_named_scale_keeps_their_names(scale_base, tmp_path):
    out = tmp_path / "out"
    result = loratool("merge", scale_base, ADAPTER, "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["quantization"]["scales_rewritten"] == doc["counts"]["tensors_merged"] == 8
    assert (out / INDEX).read_bytes() == (scale_base / INDEX).read_bytes()
    shard = sorted(set(json.loads((out / INDEX).read_text())["weight_map"].values()))[0]
    with open_checkpoint(out) as merged, open_checkpoint(scale_base) as base:
        ours, theirs = merged.components[""], base.components[""]
        assert {n: (ours.info(n).dtype, ours.info(n).shape) for n in ours} == {
            n: (theirs.info(n).dtype, theirs.info(n).shape) for n in theirs
        }
    # the packed expert and its scale are copied as they are
    with SafetensorsFile(out / shard) as after, SafetensorsFile(scale_base / shard) as before:
        for name in (EXPERT, EXPERT_SCALE):
            assert after.read_bytes(name) == before.read_bytes(name), name


def test_merge_dtype_refuses_a_base_with_packed_fp4_experts_in_one_line(scale_base, tmp_path):
    out = tmp_path / "out"
    result = loratool("merge", scale_base, ADAPTER, "-o", out, "--dtype", "bf16")
    assert result.returncode == 3 and not out.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"{EXPERT!r} is I8 with its scale {EXPERT_SCALE!r}" in lines[0], lines[0]
    assert "which --dtype cannot dequantize" in lines[0] and "leave out --dtype" in lines[0]


def test_merge_refuses_e8m0_scales_without_ue8m0_in_one_line(scale_base, tmp_path):
    """An F8_E8M0 grid holds powers of two only; without ``scale_fmt: ue8m0`` the recomputed
    float scales would not fit it: refused, naming the scale."""
    base = tmp_path / "base"
    shutil.copytree(scale_base, base)
    index = json.loads((base / INDEX).read_text())
    shard = index["weight_map"][SCALED]
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    content = load_torch(base / shard)
    content[SCALED] = content[SCALED].to(torch.float8_e8m0fnu)
    save_torch(content, base / shard)
    out = tmp_path / "out"
    result = loratool("merge", base, ADAPTER, "-o", out)
    assert result.returncode == 3 and not out.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"F8_E8M0 scale {SCALED!r} without scale_fmt 'ue8m0'" in lines[0], lines[0]


SCALED = "model.layers.0.self_attn.q_proj.scale"
