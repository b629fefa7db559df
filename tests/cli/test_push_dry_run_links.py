"""``push --dry-run`` lists only what would go up: no link leaving the folder, no FIFO."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from click.testing import CliRunner

from lora_tools.cli import cli

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def test_dry_run_lists_no_escaping_link_and_no_fifo(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("hf_secret_token_value")
    adapter = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "peft" / "llama-lora", adapter)
    os.symlink(secret, adapter / "notes.txt")
    os.mkfifo(adapter / "fifo")
    args = ["push", str(adapter), "me/adapter", "--dry-run", "--no-validate"]
    listing = CliRunner().invoke(cli, args)
    assert listing.exit_code == 0, listing.output
    table = listing.stdout.split("README.md:")[0]
    assert "notes.txt" not in table and "fifo" not in table
    assert "skipped notes.txt (a symbolic link to" in listing.stderr
    assert "skipped fifo (a FIFO" in listing.stderr
    doc = json.loads(CliRunner().invoke(cli, [*args, "--json"]).stdout)
    assert [f["path"] for f in doc["files"]] == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
    ]
    assert "hf_secret_token_value" not in json.dumps(doc)
