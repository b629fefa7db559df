"""Base checkpoints: single files, sharded HF folders, diffusers pipelines."""

from __future__ import annotations

import json
import shutil

import pytest

from lora_tools.errors import FormatError, UnsafeFileError
from lora_tools.io.checkpoint import open_checkpoint


def test_single_file(fixtures_dir):
    ckpt = open_checkpoint(fixtures_dir / "bases/tiny-flux.safetensors")
    assert ckpt.kind == "file" and list(ckpt.components) == [""]
    assert ckpt.components[""].info("double_blocks.0.img_attn.qkv.weight").dtype == "BF16"


def test_sharded_folder_answers_from_index_without_opening_shards(fixtures_dir):
    ckpt = open_checkpoint(fixtures_dir / "bases/tiny-llama-sharded")
    comp = ckpt.components[""]
    index = json.loads(
        (fixtures_dir / "bases/tiny-llama-sharded/model.safetensors.index.json").read_text()
    )
    assert len(comp.files) == 3 and comp.index_path is not None
    key = "model.layers.1.mlp.down_proj.weight"
    assert comp.file_for(key).name == index["weight_map"][key]
    assert comp._open == {}  # lookup by name opened no shard
    assert comp.info(key).shape == (32, 64)
    assert list(comp._open) == [comp.file_for(key)]  # exactly the one shard needed
    assert comp.model_type == "llama"


def test_diffusers_folder_components(fixtures_dir):
    ckpt = open_checkpoint(fixtures_dir / "bases/tiny-sd")
    assert ckpt.kind == "diffusers"
    assert set(ckpt.components) == {"unet", "text_encoder", "vae"}
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in ckpt.components["text_encoder"]


def test_missing_shard_is_named(fixtures_dir, tmp_path):
    dst = tmp_path / "base"
    shutil.copytree(fixtures_dir / "bases/tiny-llama-sharded", dst)
    (dst / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FormatError, match="model-00002-of-00003.safetensors"):
        open_checkpoint(dst)


def test_pickle_checkpoint_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UnsafeFileError):
        open_checkpoint(tmp_path)
    with pytest.raises(FormatError, match="no such file"):
        open_checkpoint(tmp_path / "nope")
