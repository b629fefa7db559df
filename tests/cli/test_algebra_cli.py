"""rescale / resize / combine / convert on the command line: outputs, JSON, exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.formats import load_adapter


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_rescale_writes_and_reports(fixtures_dir, tmp_path):
    src = fixtures_dir / "kohya/sd-lora.safetensors"
    out = tmp_path / "half.safetensors"
    result = invoke("rescale", src, "-o", out, "--factor", "0.5", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["format"] == "kohya" and doc["counts"] == {"modules": 60, "changed": 60}
    assert len(doc["modules"]) == 60 and all(row["changed"] for row in doc["modules"])
    assert doc["outputs"] == [{"path": str(out), "kind": "file"}]
    a, b = load_adapter(src), load_adapter(out)
    key = next(iter(a.modules))
    np.testing.assert_allclose(
        b.modules[key].delta(), 0.5 * a.modules[key].delta(), rtol=2e-3, atol=1e-6
    )


def test_resize_table_and_dry_run(fixtures_dir, tmp_path):
    src = fixtures_dir / "peft/llama-all-linear"
    result = invoke("resize", src, "--energy", "0.9", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "energy kept" in result.output and "re-ranked" in result.output
    assert list(tmp_path.iterdir()) == []
    result = invoke("resize", src, "-o", tmp_path / "r", "--rank", "2", "--json")
    doc = json.loads(result.output)
    assert doc["summary"]["ranks_after"] == {"2": 14}
    assert {row["new_rank"] for row in doc["modules"]} == {2}
    assert load_adapter(tmp_path / "r").ranks == {2: 14}


def test_resize_nothing_to_do_says_so(fixtures_dir, tmp_path):
    result = invoke("resize", fixtures_dir / "peft/llama-lora", "-o", tmp_path / "r", "--rank", "8")
    assert result.exit_code == 0, result.output
    assert "nothing to truncate" in result.output


def test_combine_and_convert(fixtures_dir, tmp_path):
    a, b = fixtures_dir / "peft/llama-lora", fixtures_dir / "peft/llama-patterns"
    result = invoke(
        "combine",
        a,
        b,
        "-o",
        tmp_path / "c",
        "--weights",
        "1,-1",
        "--method",
        "svd",
        "--rank",
        "3",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert {row["rank"] for row in json.loads(result.output)["modules"]} == {3}
    result = invoke(
        "convert",
        fixtures_dir / "kohya/sd-lora.safetensors",
        "--to",
        "diffusers",
        "-o",
        tmp_path / "d",
        "--base",
        fixtures_dir / "bases/tiny-sd",
    )
    assert result.exit_code == 0, result.output
    assert "60 paths resolved" in result.output
    assert load_adapter(tmp_path / "d").format == "diffusers"


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["rescale", "{src}", "-o", "{tmp}/x"], 2, "exactly one"),
        (["rescale", "{src}", "-o", "{tmp}/x", "--alpha", "0"], 2, "--alpha"),
        (["resize", "{src}", "--rank", "2"], 2, "-o"),
        (["resize", "{src}", "-o", "{tmp}/x", "--rank", "2", "--min-rank", "1"], 2, "dynamic"),
        (["combine", "{src}", "{src}", "-o", "{tmp}/x", "--weights", "1"], 2, "weights"),
        (["combine", "{src}", "-o", "{tmp}/x", "--method", "ties"], 2, "--density"),
        (["convert", "{kohya}", "--to", "peft", "-o", "{tmp}/x"], 2, "--base"),
        (["rescale", "{dora}", "-o", "{tmp}/x.safetensors", "--factor", "2"], 3, "dora_scale"),
        (["rescale", "{src}", "-o", "{src}", "--factor", "2"], 3, "input"),
        (
            ["convert", "{kohya}", "--to", "diffusers", "-o", "{tmp}/x", "--base", "{llama}"],
            3,
            "match",
        ),
    ],
)
def test_errors_are_one_line_with_exit_codes(fixtures_dir, tmp_path, args, code, needle):
    import subprocess
    import sys

    values = {
        "src": fixtures_dir / "peft/llama-lora",
        "kohya": fixtures_dir / "kohya/sd-lora.safetensors",
        "dora": fixtures_dir / "kohya/sd-dora.safetensors",
        "llama": fixtures_dir / "bases/tiny-llama",
        "tmp": tmp_path,
    }
    argv = [a.format(**values) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "lora_tools", *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert needle in lines[0]
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.safetensors").exists()


def test_existing_output_needs_force(fixtures_dir, tmp_path):
    src = fixtures_dir / "peft/llama-lora"
    assert invoke("rescale", src, "-o", tmp_path / "o", "--normalize").exit_code == 0
    again = invoke("rescale", src, "-o", tmp_path / "o", "--alpha", "2")
    assert again.exit_code != 0
    assert invoke("rescale", src, "-o", tmp_path / "o", "--alpha", "2", "--force").exit_code == 0
    assert {m.alpha for m in load_adapter(tmp_path / "o").modules.values()} == {2.0}


def test_help_lists_every_option(fixtures_dir):
    for cmd, options in {
        "rescale": ["--alpha", "--factor", "--normalize", "--force", "--json"],
        "resize": [
            "--rank",
            "--energy",
            "--sv-ratio",
            "--sv-cumulative",
            "--min-rank",
            "--max-rank",
            "--distribute",
            "--dry-run",
        ],
        "combine": ["--weights", "--method", "--rank", "--density", "--seed", "--distribute"],
        "convert": ["--to", "--base", "--component"],
    }.items():
        result = invoke(cmd, "--help")
        assert result.exit_code == 0
        for option in options:
            assert option in result.output, (cmd, option)


@pytest.mark.parametrize(
    "args",
    [
        ["resize", "broken/nan-weights", "--rank", "2"],
        ["rescale", "broken/nan-weights", "--factor", "2"],
        ["combine", "broken/nan-weights", "peft/llama-lora", "--method", "svd", "--rank", "4"],
        ["combine", "broken/nan-weights", "peft/llama-lora"],
    ],
)
def test_non_finite_factors_are_refused(fixtures_dir, tmp_path, args):
    """NaN / Inf in a factor: one error naming the file and module; nothing written."""
    from lora_tools.errors import AdapterError

    cmd = [a if "/" not in a else str(fixtures_dir / a) for a in args]
    result = CliRunner().invoke(cli, [*cmd, "-o", str(tmp_path / "out")])
    assert isinstance(result.exception, AdapterError), result.output
    assert result.exception.kind == "non-finite"
    assert "layers.0.self_attn.q_proj" in str(result.exception)
    assert "nan-weights" in str(result.exception)
    assert list(tmp_path.iterdir()) == []
