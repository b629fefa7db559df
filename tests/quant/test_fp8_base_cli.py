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
