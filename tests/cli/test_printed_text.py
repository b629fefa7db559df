"""What loratool prints is safe to print: strict JSON, no raw control characters, no tokens
(issue 10, items 20 and 24)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "fixtures"
EVIL = "bad\nloratool: error: fake\x1b[31mred\u202e"


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lora_tools", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **env},
    )


def _reject(constant: str) -> None:
    raise ValueError(f"not strict JSON: {constant}")


def strict_loads(text: str):
    return json.loads(text, parse_constant=_reject)


def test_printable_escapes_every_control_character() -> None:
    from lora_tools.errors import printable

    assert printable(EVIL) == "bad\\nloratool: error: fake\\x1b[31mred\\u202e"
    assert printable("tab\there\r\x00\x7f\x9b") == "tab\\there\\r\\x00\\x7f\\x9b"
    assert printable("a lone \udcff surrogate") == "a lone \\udcff surrogate"
    assert printable("plain ümlaut/path.safetensors") == "plain ümlaut/path.safetensors"


def test_redact_hides_bearer_values_hf_tokens_and_the_session_token(monkeypatch) -> None:
    from lora_tools.errors import redact, safe_text

    monkeypatch.setenv("HF_TOKEN", "s3cret-session-token")
    text = redact(
        "got Authorization: Bearer abc.def and authorization=xyz, "
        "hf_" + "A1" * 17 + " and s3cret-session-token"
    )
    assert text == "got Authorization: Bearer *** and authorization=***, hf_*** and ***"
    assert "s3cret" not in safe_text("x s3cret-session-token\n")


def test_error_line_is_one_line_for_a_path_with_newline_and_escape(tmp_path: Path) -> None:
    result = run_cli("inspect", str(tmp_path / EVIL))
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1 and "\x1b" not in result.stderr
    assert "bad\\nloratool: error: fake\\x1b[31mred\\u202e: no such file" in result.stderr


def test_validate_text_and_github_outputs_escape_names(tmp_path: Path) -> None:
    evil = tmp_path / ("x\x1b[2J" + "\x07.safetensors")
    evil.write_bytes((FIX / "kohya/sd-lora.safetensors").read_bytes()[:-4])  # truncated
    for fmt in ("text", "github"):
        result = run_cli("validate", str(evil), "--output-format", fmt)
        assert result.returncode == 1, result.stdout
        assert "\x1b" not in result.stdout and "\x07" not in result.stdout, fmt
        assert "x\\x1b[2J\\x07.safetensors" in result.stdout, result.stdout
    result = run_cli("validate", str(tmp_path / EVIL), "--output-format", "github")
    assert len(result.stdout.strip().splitlines()) == 1  # one annotation, not a forged second


def test_json_safe_maps_non_finite_floats_to_strings() -> None:
    from lora_tools.cli._common import json_safe

    doc = {"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": (0.0, "NaN")}
    assert json_safe(doc) == {"a": "NaN", "b": ["Infinity", "-Infinity", 1.5], "c": [0.0, "NaN"]}


def test_inspect_json_is_strict_json_with_a_nan_in_the_config(tmp_path: Path) -> None:
    adapter = tmp_path / "lora"
    shutil.copytree(FIX / "peft/llama-lora", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(
        json.dumps(config | {"lora_dropout": float("nan"), "extra": float("inf")})
    )
    result = run_cli("inspect", str(adapter), "--json")
    assert result.returncode == 0, result.stderr
    report = strict_loads(result.stdout)
    assert report["config"]["lora_dropout"] == "NaN"
    assert report["config"]["extra"] == "Infinity"


@pytest.mark.parametrize("fmt", ["json", "sarif"])
def test_validate_json_outputs_are_strict(tmp_path: Path, fmt: str) -> None:
    adapter = tmp_path / "lora"
    shutil.copytree(FIX / "peft/llama-lora", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"lora_dropout": 1e999}))
    result = run_cli("validate", str(adapter), "--output-format", fmt)
    strict_loads(result.stdout)
