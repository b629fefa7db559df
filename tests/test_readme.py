"""The README's Python examples run as written (from a folder holding fixtures/)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_example_runs(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), namespace)
    if index == 1:
        assert namespace["summary"].tensors["merged"] == 8  # type: ignore[attr-defined]
        assert sorted(os.listdir("out")) == ["llama-lora-r2", "merged"]


#: The command headings of the README (``### `loratool CMD SYNOPSIS` ``), except those that
#: end in ``[options]`` and list the rest below.
HEADINGS = [
    (command, synopsis)
    for command, synopsis in re.findall(
        r"^#{3,4} `loratool ([\w-]+) ([^`]*)`", (ROOT / "README.md").read_text(), re.M
    )
    if "[options]" not in synopsis
]


def test_readme_has_command_headings() -> None:
    assert {c for c, _ in HEADINGS} >= {"inspect", "validate", "rescale", "convert", "merge"}


@pytest.mark.parametrize(("command", "synopsis"), HEADINGS)
def test_a_command_heading_names_every_option(command: str, synopsis: str) -> None:
    from click.testing import CliRunner

    from lora_tools.cli import cli

    text = CliRunner().invoke(cli, [command, "--help"]).output.split("Options:")[1]
    missing = [
        long
        for short, long in re.findall(r"^\s+(?:(-\w), )?(--[\w-]+)", text, re.M)
        if long != "--help"
        and not re.search(rf"(^|[\s\[(|]){re.escape(long)}([\s\])|]|$)", synopsis)
        and not (short and re.search(rf"(^|[\s\[(|]){re.escape(short)}([\s\])|]|$)", synopsis))
    ]
    assert not missing, f"README heading of {command} lacks {missing}: {synopsis}"
