"""``validate --base`` and ``merge`` accept and refuse the same sharded bases.

Both open the base through :func:`lora_tools.io.checkpoint.open_checkpoint`, which checks every
shard's header and that the index agrees with the shards. Each damaged base below must make both
commands exit 3 with one line naming the problem, and leave no output behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from lora_tools.cli import cli
from lora_tools.errors import FormatError, LoraToolError, UnsafeFileError
from lora_tools.io.checkpoint import open_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SHARDED = ROOT / "fixtures" / "bases" / "tiny-llama-sharded"
ADAPTER = ROOT / "fixtures" / "peft" / "llama-lora"
INDEX = "model.safetensors.index.json"


def loratool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lora_tools", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )


def _clone(tmp_path: Path) -> tuple[Path, dict]:
    base = tmp_path / "base"
    shutil.copytree(SHARDED, base)
    return base, json.loads((base / INDEX).read_text())


def _write_index(base: Path, index: dict) -> None:
    (base / INDEX).write_text(json.dumps(index, indent=2))


def config_as_shard(tmp_path: Path) -> Path:
    base, index = _clone(tmp_path)
    index["weight_map"]["lm_head.weight"] = "config.json"
    _write_index(base, index)
    return base


def text_as_shard(tmp_path: Path) -> Path:
    base, index = _clone(tmp_path)
    (base / "notes.txt").write_text("not weights\n")
    index["weight_map"]["lm_head.weight"] = "notes.txt"
    _write_index(base, index)
    return base


def pickle_as_shard(tmp_path: Path) -> Path:
    base, index = _clone(tmp_path)
    (base / "extra.bin").write_bytes(b"\x80\x04N.")
    index["weight_map"]["lm_head.weight"] = "extra.bin"
    _write_index(base, index)
    return base


def tensor_in_two_shards(tmp_path: Path) -> Path:
    base, index = _clone(tmp_path)
    first = base / index["weight_map"]["model.embed_tokens.weight"]
    other = base / index["weight_map"]["lm_head.weight"]
    tensors = load_file(first)
    tensors["lm_head.weight"] = load_file(other)["lm_head.weight"] * np.float32(2)
    save_file(tensors, first, metadata={"format": "pt"})
    return base


def duplicate_index_key(tmp_path: Path) -> Path:
    base, index = _clone(tmp_path)
    text = json.dumps(index, indent=2)
    line = f'"lm_head.weight": "{index["weight_map"]["lm_head.weight"]}",'
    assert line in text
    first_shard = index["weight_map"]["model.embed_tokens.weight"]
    (base / INDEX).write_text(text.replace(line, f'{line}\n"lm_head.weight": "{first_shard}",'))
    return base


def index_names_wrong_shard(tmp_path: Path) -> Path:
    base, index = _clone(tmp_path)
    index["weight_map"]["lm_head.weight"] = index["weight_map"]["model.embed_tokens.weight"]
    _write_index(base, index)
    return base


def unlisted_tensor(tmp_path: Path) -> Path:
    base, index = _clone(tmp_path)
    del index["weight_map"]["lm_head.weight"]
    _write_index(base, index)
    return base


CASES = {
    "config-as-shard": (config_as_shard, "config.json"),
    "text-as-shard": (text_as_shard, "notes.txt"),
    "pickle-as-shard": (pickle_as_shard, "extra.bin"),
    "tensor-in-two-shards": (tensor_in_two_shards, "'lm_head.weight' is in both"),
    "duplicate-index-key": (duplicate_index_key, "lists 'lm_head.weight' twice"),
    "index-names-wrong-shard": (index_names_wrong_shard, "'lm_head.weight'"),
    "unlisted-tensor": (unlisted_tensor, "does not list"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_open_checkpoint_refuses(case, tmp_path):
    make, needle = CASES[case]
    base = make(tmp_path)
    expected = UnsafeFileError if case == "pickle-as-shard" else FormatError
    with pytest.raises(expected) as info:
        open_checkpoint(base)
    assert needle in str(info.value)


def _args(command: str, base: Path, out: Path) -> list[str]:
    if command == "validate":
        return ["validate", str(ADAPTER), "--base", str(base)]
    return ["merge", str(base), str(ADAPTER), "-o", str(out)]


@pytest.mark.parametrize("command", ["validate", "merge"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_and_merge_both_refuse(case, command, tmp_path):
    make, needle = CASES[case]
    base = make(tmp_path)
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, _args(command, base, out))
    error = result.exception
    assert isinstance(error, LoraToolError), result.output
    assert error.exit_code == 3
    assert needle in str(error) and "\n" not in str(error)
    assert not out.exists()


@pytest.mark.parametrize("command", ["validate", "merge"])
def test_the_cli_prints_one_line_and_exits_3(command, tmp_path):
    base = tensor_in_two_shards(tmp_path)
    result = loratool(*_args(command, base, tmp_path / "merged"))
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("loratool: error:"), result.stderr
    assert "is in both" in lines[0]


def test_intact_sharded_base_still_passes_both(tmp_path):
    base, _ = _clone(tmp_path)
    runner = CliRunner()
    result = runner.invoke(cli, _args("validate", base, tmp_path / "m"), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, _args("merge", base, tmp_path / "m"), catch_exceptions=False)
    assert result.exit_code == 0, result.output
