"""Every writing command: ``-o`` never destroys an input or a file loratool did not write.

``--force`` replaces a file, an empty folder or a folder loratool wrote (its provenance record
accounts for every entry); OUT equal to, inside or above an input is refused with or without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.errors import OutputError

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"

#: command -> (inputs copied into models/, arguments after the inputs); every output is a folder
COMMANDS = {
    "merge": ({"base": "bases/tiny-llama", "lora": "peft/llama-lora"}, ["--device", "cpu"]),
    "rescale": ({"lora": "peft/llama-lora"}, ["--alpha", "2"]),
    "resize": ({"lora": "peft/llama-all-linear"}, ["--rank", "2"]),
    "combine": ({"lora": "peft/llama-lora", "other": "peft/llama-patterns"}, []),
    "convert": ({"lora": "diffusers/sd-lora"}, ["--to", "peft", "--component", "unet"]),
}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _setup(tmp_path: Path, command: str) -> tuple[Path, list[str]]:
    """models/ holding copies of the command's inputs; returns it and the argv before -o."""
    models = tmp_path / "models"
    names, extra = COMMANDS[command]
    for name, fixture in names.items():
        shutil.copytree(FIXTURES / fixture, models / name)
    return models, [command, *(str(models / name) for name in names), *extra]


def _invoke(argv: list[str]):
    return CliRunner().invoke(cli, [str(a) for a in argv])


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_output_above_or_equal_to_an_input_is_refused_even_with_force(
    tmp_path: Path, command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    space = tmp_path / "space"  # the widest OUT tried; even the old code only touched this
    models, argv = _setup(space, command)
    (models / "my-notes.txt").write_text("mine")
    before = _snapshot(models)
    os.symlink(models / "lora", space / "link-to-lora")
    monkeypatch.chdir(models)
    outs = [
        models,  # the folder holding the inputs
        "../models",  # the same, relative to the current folder
        ".",  # the current folder
        models / "lora" / "..",
        models / "lora",  # an input itself
        space / "link-to-lora",  # an input through a symbolic link
        space,  # two levels above
    ]
    for out in outs:
        result = _invoke([*argv, "-o", out, "--force"])
        assert isinstance(result.exception, OutputError), (out, result.output, result.exception)
        assert "input" in str(result.exception), out
    assert _snapshot(models) == before


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_force_replaces_only_what_loratool_wrote(tmp_path: Path, command: str) -> None:
    _models, argv = _setup(tmp_path, command)
    out = tmp_path / "out"
    assert _invoke([*argv, "-o", out]).exit_code == 0
    again = _invoke([*argv, "-o", out])
    assert isinstance(again.exception, OutputError) and "already exists" in str(again.exception)
    assert _invoke([*argv, "-o", out, "--force"]).exit_code == 0  # its own earlier output

    (out / "my-notes.txt").write_text("mine")  # now the folder holds a file loratool did not write
    before = _snapshot(out)
    for flags in ([], ["--force"]):
        result = _invoke([*argv, "-o", out, *flags])
        assert isinstance(result.exception, OutputError), result.output
        assert "my-notes.txt" in str(result.exception) and "did not write" in str(result.exception)
    assert _snapshot(out) == before

    unrelated = tmp_path / "work"
    (unrelated / "sub").mkdir(parents=True)
    (unrelated / "sub" / "data.bin").write_bytes(b"\0\1")
    result = _invoke([*argv, "-o", unrelated, "--force"])
    assert isinstance(result.exception, OutputError) and "sub/" in str(result.exception)
    assert (unrelated / "sub" / "data.bin").read_bytes() == b"\0\1"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert _invoke([*argv, "-o", empty, "--force"]).exit_code == 0  # an empty folder loses nothing


def test_a_merged_folder_with_a_replaced_record_is_not_loratools(tmp_path: Path) -> None:
    _models, argv = _setup(tmp_path, "merge")
    out = tmp_path / "out"
    assert _invoke([*argv, "-o", out]).exit_code == 0
    (out / "extra.json").write_text("{}")
    result = _invoke([*argv, "-o", out, "--force"])
    assert isinstance(result.exception, OutputError) and "extra.json" in str(result.exception)
    assert (out / "extra.json").read_text() == "{}"


def test_a_hard_link_to_an_input_is_the_input(tmp_path: Path) -> None:
    src = tmp_path / "sd-lora.safetensors"
    shutil.copyfile(FIXTURES / "kohya" / "sd-lora.safetensors", src)
    data = src.read_bytes()
    os.link(src, tmp_path / "alias.safetensors")
    result = _invoke(
        ["rescale", src, "-o", tmp_path / "alias.safetensors", "--factor", "0.5", "--force"]
    )
    assert isinstance(result.exception, OutputError) and "hard link" in str(result.exception)
    assert src.read_bytes() == data and os.stat(src).st_nlink == 2


def test_dot_as_output_is_one_error_line(tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(FIXTURES / "bases" / "tiny-llama", work / "base")
    shutil.copytree(FIXTURES / "peft" / "llama-lora", work / "lora")
    (work / "my-notes.txt").write_text("mine")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for out in (".", "../work"):
        proc = subprocess.run(
            [sys.executable, "-m", "lora_tools", "merge", "base", "lora", "-o", out, "--force"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 3, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "internal error" not in lines[0], proc.stderr
        assert lines[0].startswith(f"loratool: error: {out}: the output is a folder that holds")
    assert (work / "my-notes.txt").read_text() == "mine"
    assert (work / "base" / "model.safetensors").is_file()


def test_convert_never_replaces_its_base(tmp_path: Path) -> None:
    base = tmp_path / "sdxl.safetensors"
    shutil.copyfile(FIXTURES / "bases" / "tiny-sdxl.safetensors", base)
    data = base.read_bytes()
    adapter = FIXTURES / "kohya" / "sdxl-lora.safetensors"
    argv = ["convert", adapter, "--to", "kohya", "--base", base, "--force"]
    for out in (base, tmp_path):
        result = _invoke([*argv, "-o", out])
        assert isinstance(result.exception, OutputError), result.output
        assert f"input {base}" in str(result.exception)
    assert base.read_bytes() == data
