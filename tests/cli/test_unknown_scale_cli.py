"""The command line with an unknown alpha: inspect says so, every computing command refuses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.errors import UnknownScaleError, UsageError

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
NO_CONFIG = FIXTURES / "broken" / "no-config"
LLAMA = FIXTURES / "peft" / "llama-lora"


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_inspect_says_alpha_unknown() -> None:
    result = invoke("inspect", NO_CONFIG)
    assert result.exit_code == 0, result.output
    lines = {
        line.split(None, 1)[0]: line.split(None, 1)[1].strip()
        for line in result.output.splitlines()
        if line.strip() and not line.startswith(" ")
    }
    assert lines["alpha"] == "unknown: no adapter_config.json"
    assert lines["scale"] == "unknown"
    doc = json.loads(invoke("inspect", NO_CONFIG, "--json").output)
    assert doc["alpha"]["unknown"] == "no adapter_config.json"
    assert doc["scale"]["histogram"] == {"unknown": 8}
    stats = invoke("inspect", NO_CONFIG, "--stats")
    assert stats.exit_code == 0 and "||dW||_F unknown" in stats.output


def test_commands_that_need_the_scale_refuse_in_one_line(tmp_path: Path) -> None:
    lone = tmp_path / "lora.safetensors"
    shutil.copyfile(LLAMA / "adapter_model.safetensors", lone)
    out = tmp_path / "out"
    for adapter in (NO_CONFIG, lone):
        for args in (
            ["merge", FIXTURES / "bases" / "tiny-llama", adapter, "-o", out, "--device", "cpu"],
            ["rescale", adapter, "-o", out, "--alpha", "16"],
            ["rescale", adapter, "-o", out, "--factor", "0.5"],
            ["resize", adapter, "-o", out, "--rank", "2"],
            ["resize", adapter, "--rank", "2", "--dry-run"],
            ["combine", adapter, LLAMA, "-o", out],
            ["convert", adapter, "--to", "kohya", "-o", tmp_path / "k.safetensors"],
            ["convert", adapter, "--to", "peft", "-o", out],
        ):
            result = invoke(*args)
            error = result.exception
            assert isinstance(error, UnknownScaleError), (args, result.output)
            assert error.exit_code == 3 and "\n" not in str(error)
            assert "alpha unknown: no adapter_config.json" in str(error)
            assert f"; {args[0]} " in str(error) and "needs every module's scale" in str(error)
            assert not out.exists() and not (tmp_path / "k.safetensors").exists()


def test_merge_exit_code_and_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lora_tools", "merge", str(FIXTURES / "bases" / "tiny-llama"),
         str(NO_CONFIG), "-o", str(tmp_path / "out"), "--device", "cpu"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1
    assert "alpha unknown: no adapter_config.json; merge needs" in proc.stderr
    assert "(hint: add the adapter's adapter_config.json" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_validate_flags_a_lone_renamed_peft_file(tmp_path: Path) -> None:
    lone = tmp_path / "lora.safetensors"
    shutil.copyfile(LLAMA / "adapter_model.safetensors", lone)
    result = invoke("validate", lone, "--output-format", "json")
    assert result.exit_code == 1, result.output
    rules = {f["rule"] for f in json.loads(result.output)["files"][0]["findings"]}
    assert "LT301" in rules
    assert invoke("validate", LLAMA, "--fail-on", "warning").exit_code == 0


def test_peft_outputs_keep_their_config(tmp_path: Path) -> None:
    """`-o x.safetensors` for a PEFT adapter used to write the tensors alone, dropping
    lora_alpha 8 / r 4 (scale 2), which then read back at scale 1."""
    for args in (
        ["convert", LLAMA, "--to", "peft", "-o", tmp_path / "x.safetensors"],
        ["rescale", LLAMA, "-o", tmp_path / "x.safetensors", "--factor", "2"],
    ):
        error = invoke(*args).exception
        assert isinstance(error, UsageError) and error.exit_code == 2, args
        assert "give a folder as the output path" in str(error)
        assert not (tmp_path / "x.safetensors").exists()
    result = invoke("rescale", LLAMA, "-o", tmp_path / "folder", "--factor", "2")
    assert result.exit_code == 0, result.output
    doc = json.loads(invoke("inspect", tmp_path / "folder", "--json").output)
    assert doc["alpha"]["unknown"] is None and doc["scale"]["histogram"] == {"2": 8}
