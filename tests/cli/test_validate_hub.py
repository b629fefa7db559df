"""`loratool validate user/name[@rev]`: Hub ids as adapter paths, through the test Hub server."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from lora_tools.cli import cli
from tests.hub_server import HubServer

pytest_plugins = ["tests.conftest_hub"]


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_validate_hub_ids(hub_server: HubServer, fixtures_dir) -> None:
    hub_server.add_repo("tester/good-lora", files=_files(fixtures_dir / "peft/llama-lora"))
    hub_server.add_repo("tester/nan-lora", files=_files(fixtures_dir / "broken/nan-weights"))
    runner = CliRunner()

    good = runner.invoke(cli, ["validate", "tester/good-lora", "--output-format", "json", "-q"])
    assert good.exit_code == 0, good.output
    bad = runner.invoke(cli, ["validate", "tester/nan-lora", "--output-format", "json", "-q"])
    assert bad.exit_code == 1, bad.output
    rules = {f["rule"] for entry in json.loads(bad.stdout)["files"] for f in entry["findings"]}
    assert "LT201" in rules  # NaN / Inf
    fetched = {path for method, path, status in hub_server.log if "/resolve/" in path}
    assert any(p.endswith("adapter_model.safetensors") for p in fetched)
    assert not any(p.endswith(".gitattributes") for p in fetched)


def test_missing_hub_repo_is_a_one_line_error(hub_server: HubServer) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lora_tools", "validate", "tester/nope", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no Hub repo 'tester/nope'" in lines[0]
