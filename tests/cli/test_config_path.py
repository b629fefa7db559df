"""``adapter_config.json`` as an adapter PATH means its folder, for every command (issue 10.14).

Each command runs twice, on the folder and on its config file, and must give the same result;
before, inspect, merge and the algebra commands read the JSON as a safetensors file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.io.safetensors import SafetensorsFile


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.stdout


def tensors(path: Path) -> dict[str, bytes]:
    with SafetensorsFile(path) as f:
        return {name: f.read_bytes(name) for name in f.header.tensors}


@pytest.fixture
def adapter(fixtures_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "llama-lora"
    shutil.copytree(fixtures_dir / "peft/llama-lora", folder)
    return folder


def test_adapter_path_maps_only_an_existing_config_file(adapter: Path, tmp_path: Path) -> None:
    from lora_tools.formats import adapter_path, find_adapter_files

    assert adapter_path(adapter / "adapter_config.json") == adapter
    assert adapter_path(adapter) == adapter
    assert adapter_path(tmp_path / "adapter_config.json") == tmp_path / "adapter_config.json"
    weights, config = find_adapter_files(adapter / "adapter_config.json")
    assert (weights, config) == (
        adapter / "adapter_model.safetensors",
        adapter / "adapter_config.json",
    )


def test_inspect(adapter: Path) -> None:
    by_folder = json.loads(invoke("inspect", str(adapter), "--json"))
    by_config = json.loads(invoke("inspect", str(adapter / "adapter_config.json"), "--json"))
    assert by_config == by_folder
    # the config was read as the config (alpha 8), not as a weights file
    assert by_config["alpha"] == {"histogram": {"8": 8}, "unknown": None}
    assert [(i["path"], i["role"]) for i in by_config["inputs"]] == [
        (str(adapter / "adapter_model.safetensors"), "adapter"),
        (str(adapter / "adapter_config.json"), "config"),
    ]


def test_validate(adapter: Path) -> None:
    by_folder = json.loads(invoke("validate", str(adapter), "--output-format", "json"))
    by_config = json.loads(
        invoke("validate", str(adapter / "adapter_config.json"), "--output-format", "json")
    )
    assert [f["path"] for f in by_config["files"]] == [f["path"] for f in by_folder["files"]]
    assert by_config["counts"] == by_folder["counts"] == {
        "files": 1, "error": 0, "warning": 0, "info": 0,
    }  # fmt: skip


@pytest.mark.parametrize(
    "command",
    [
        ["rescale", "--factor", "0.5"],
        ["resize", "--rank", "2"],
        ["convert", "--to", "diffusers", "--component", "transformer"],
    ],
    ids=lambda c: c[0],
)
def test_algebra_commands(adapter: Path, tmp_path: Path, command: list[str]) -> None:
    name, *options = command
    invoke(name, str(adapter), "-o", str(tmp_path / "a"), *options)
    invoke(name, str(adapter / "adapter_config.json"), "-o", str(tmp_path / "b"), *options)
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    weights = next(n for n in files_a if n.endswith(".safetensors"))
    assert tensors(tmp_path / "a" / weights) == tensors(tmp_path / "b" / weights)


def test_combine(adapter: Path, fixtures_dir: Path, tmp_path: Path) -> None:
    other = fixtures_dir / "peft/llama-patterns"
    invoke("combine", str(adapter), str(other), "-o", str(tmp_path / "a"))
    invoke(
        "combine",
        str(adapter / "adapter_config.json"),
        str(other / "adapter_config.json"),
        "-o",
        str(tmp_path / "b"),
    )
    weights = "adapter_model.safetensors"
    assert tensors(tmp_path / "a" / weights) == tensors(tmp_path / "b" / weights)


def test_merge(adapter: Path, fixtures_dir: Path, tmp_path: Path) -> None:
    base = fixtures_dir / "bases/tiny-llama"
    a = json.loads(invoke("merge", str(base), str(adapter), "-o", str(tmp_path / "a"), "--json"))
    b = json.loads(
        invoke(
            "merge", str(base), str(adapter / "adapter_config.json"), "-o", str(tmp_path / "b"),
            "--json",
        )
    )  # fmt: skip
    assert a["counts"] == b["counts"] and a["counts"]["tensors_merged"] == 8
    assert tensors(tmp_path / "a/model.safetensors") == tensors(tmp_path / "b/model.safetensors")


def test_push_dry_run_uploads_the_folder(adapter: Path) -> None:
    (adapter / "notes.txt").write_text("kept with the adapter\n")
    by_folder = json.loads(invoke("push", str(adapter), "me/llama-lora", "--dry-run", "--json"))
    by_config = json.loads(
        invoke("push", str(adapter / "adapter_config.json"), "me/llama-lora", "--dry-run", "--json")
    )
    assert by_config["files"] == by_folder["files"]
    assert "notes.txt" in {f["path"] for f in by_config["files"]}


def test_the_folder_stays_an_input(adapter: Path, fixtures_dir: Path) -> None:
    """-o the folder itself, with --force, is refused whichever way the adapter was named."""
    before = tensors(adapter / "adapter_model.safetensors")
    config = str(adapter / "adapter_config.json")
    for args in (
        ["rescale", config, "-o", str(adapter), "--factor", "2", "--force"],
        ["merge", str(fixtures_dir / "bases/tiny-llama"), config, "-o", str(adapter), "--force"],
    ):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code != 0, args
    assert tensors(adapter / "adapter_model.safetensors") == before
