"""`loratool inspect` end to end: output, exit codes, one-line errors, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli

ROOT_CMD = [sys.executable, "-m", "lora_tools"]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*ROOT_CMD, *args], capture_output=True, text=True, env=env, timeout=120)


def test_json_output_is_one_document(fixtures_dir):
    result = CliRunner().invoke(cli, ["inspect", str(fixtures_dir / "peft/llama-lora"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["schema_version"] == 2 and doc["command"] == "inspect" and doc["outputs"] == []
    assert (doc["format"], doc["counts"]["modules"], doc["rank"]["max"]) == ("peft", 8, 4)
    assert len(doc["modules"]) == 8 and all("module" in row for row in doc["modules"])


def test_human_view_names_the_essentials(fixtures_dir):
    result = CliRunner().invoke(cli, ["inspect", str(fixtures_dir / "kohya/sd-locon.safetensors")])
    assert result.exit_code == 0, result.output
    for text in (
        "kohya (LoRA, LoCon)",
        "unet 79",
        "text_encoder 12",
        "ss_network_module",
        "networks.lora",
    ):
        assert text in result.output


def test_architecture_and_base_model_are_two_lines(fixtures_dir):
    """The modelspec architecture is the architecture, the checkpoint name the base model."""
    result = CliRunner().invoke(cli, ["inspect", str(fixtures_dir / "kohya/sd-lora.safetensors")])
    assert result.exit_code == 0, result.output
    lines = {line.split("  ", 1)[0]: " ".join(line.split()) for line in result.output.splitlines()}
    assert lines["architecture"] == (
        "architecture sd1 (metadata modelspec.architecture: stable-diffusion-v1/lora)"
    )
    assert lines["base model"] == "base model tiny-sd (metadata ss_sd_model_name)"
    result = CliRunner().invoke(cli, ["inspect", str(fixtures_dir / "peft/llama-lora")])
    assert "architecture  llm  (guessed from the module names)" in result.output


def test_stats_view(fixtures_dir):
    result = CliRunner().invoke(cli, ["inspect", str(fixtures_dir / "peft/llama-lora"), "--stats"])
    assert result.exit_code == 0, result.output
    assert "||dW||_F" in result.output and "median ||dW||_F" in result.output


@pytest.mark.parametrize(
    ("target", "code", "needle"),
    [
        ("broken/truncated.safetensors", 3, "truncated"),
        ("broken/bad-header.safetensors", 3, "not valid JSON"),
        ("broken/pickle", 3, "never unpickles"),
        ("bases/tiny-llama/model.safetensors", 3, "match no known LoRA naming scheme"),
        ("does/not/exist", 3, "no such file or folder"),
    ],
)
def test_bad_input_is_one_line_with_exit_3(fixtures_dir, target, code, needle):
    proc = run_cli("inspect", str(fixtures_dir / target))
    _one_line_error(proc, code, needle)


def test_stats_of_a_module_whose_factors_do_not_fit_is_one_line_with_exit_3(fixtures_dir):
    # without --stats the broken file is shown; its update cannot be computed
    assert run_cli("inspect", str(fixtures_dir / "broken/rank-mismatch")).returncode == 0
    proc = run_cli("inspect", str(fixtures_dir / "broken/rank-mismatch"), "--stats")
    _one_line_error(proc, 3, "'base_model.model.model.layers.0.self_attn.k_proj': up [16, 3]")


def _one_line_error(proc, code, needle):
    assert proc.returncode == code
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("loratool: error: ") and needle in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["inspect"], "Missing argument 'PATH'. (hint: see 'python -m lora_tools inspect --help')"),
        (["inspect", "x", "--bogus"], "No such option '--bogus'"),
        (
            ["no-such-command"],
            "No such command 'no-such-command'. (hint: see 'python -m lora_tools --help')",
        ),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(args, needle):
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr


def test_bare_command_prints_help():
    proc = run_cli()
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: ")


def test_debug_shows_traceback(fixtures_dir):
    proc = run_cli("--debug", "inspect", str(fixtures_dir / "broken/truncated.safetensors"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_inspect_runs_with_torch_absent(fixtures_dir, tmp_path):
    """Block torch entirely: inspect (without --stats and with it) must not need it."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        textwrap.dedent(
            """
            import sys
            class _NoTorch:
                def find_spec(self, name, path=None, target=None):
                    if name == "torch" or name.startswith("torch."):
                        raise ImportError("torch is blocked in this test")
                    return None
            sys.meta_path.insert(0, _NoTorch())
            """
        )
    )
    import os

    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for args in (["--json"], ["--stats"]):
        proc = run_cli("inspect", str(fixtures_dir / "kohya/sd-lora.safetensors"), *args, env=env)
        assert proc.returncode == 0, proc.stderr
    check = subprocess.run(
        [sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True
    )
    assert check.returncode != 0 and "blocked" in check.stderr  # the blocker really works


def test_help_is_light():
    code = (
        "import sys; from lora_tools.cli import cli; "
        "import contextlib, io; "
        "f = io.StringIO();\n"
        "with contextlib.redirect_stdout(f):\n"
        "    try: cli.main(['--help'], standalone_mode=False)\n"
        "    except SystemExit: pass\n"
        "print(sorted(m for m in ('numpy', 'torch', 'rich') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_python_dash_m_and_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and "loratool" in proc.stdout
