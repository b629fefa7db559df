"""The shared output rules of lora_tools.io.atomic and lora_tools.io.folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from lora_tools.constants import ADAPTER_WEIGHT_NAMES
from lora_tools.errors import OutputError
from lora_tools.io.atomic import (
    atomic_dir,
    atomic_file,
    check_output,
    check_replaceable,
    foreign_entries,
    sizes,
)
from lora_tools.io.folder import skip_reason
from lora_tools.io.safetensors import save_tensors

W = {"w": np.zeros((1, 1), np.float32)}


def test_sizes_read_differently_when_they_differ() -> None:
    assert sizes(2 * 10**9, 10**6) == ("2.00 GB", "1.00 MB")
    assert sizes(12_345_678, 8_190_000) == ("12.3 MB", "8.19 MB")
    assert sizes(999, 10) == ("999 bytes", "10 bytes")
    needed, free = sizes(10_000_001, 10_000_000)  # the old "0.01 GB, 0.01 GB" case
    assert needed != free
    a, b = sizes(10**12 + 1, 10**12)
    assert a != b and a.endswith("bytes")
    assert sizes(1500, 1500) == ("1.50 kB", "1.50 kB")


def test_what_force_may_replace(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    check_replaceable(empty)
    check_replaceable(tmp_path / "nothing-here")
    (tmp_path / "file.bin").write_bytes(b"x")
    check_replaceable(tmp_path / "file.bin")  # a file is always replaceable

    merged = tmp_path / "merged"
    (merged / "sub").mkdir(parents=True)
    (merged / "sub" / "a.json").write_text("{}")
    (merged / "config.json").write_text("{}")
    record = {"tool": "loratool", "files": ["config.json", "sub/a.json"]}
    (merged / "loratool_merge.json").write_text(json.dumps(record))
    check_replaceable(merged)
    (merged / "sub" / "b.txt").write_text("mine")
    assert foreign_entries(merged) == ["sub/b.txt"]
    (merged / "sub" / "b.txt").unlink()
    (merged / "notes").mkdir()
    assert foreign_entries(merged) == ["notes/"]
    (merged / "notes").rmdir()
    os.symlink("config.json", merged / "link.json")
    assert foreign_entries(merged) == ["link.json"]
    (merged / "link.json").unlink()
    (merged / "loratool_merge.json").write_text(json.dumps({"tool": "loratool"}))  # no list
    assert foreign_entries(merged) == ["config.json", "loratool_merge.json", "sub/"]

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_tensors(adapter / "adapter_model.safetensors", W, {"loratool_history": "[]"})
    (adapter / "adapter_config.json").write_text("{}")
    check_replaceable(adapter)
    (adapter / "README.md").write_text("mine")
    with pytest.raises(OutputError, match=r"did not write \(README\.md\)"):
        check_replaceable(adapter)
    (adapter / "README.md").unlink()
    save_tensors(adapter / "adapter_model.safetensors", W, {"format": "pt"})  # not loratool's
    assert foreign_entries(adapter) == ["adapter_config.json", "adapter_model.safetensors"]


def test_atomic_dir_never_replaces_a_foreign_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "my-notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="my-notes.txt"), atomic_dir(out, force=True) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "my-notes.txt").read_text() == "mine"

    with atomic_dir(tmp_path / "late", durable=False) as tmp:
        (tmp / "loratool_merge.json").write_text(json.dumps({"tool": "loratool", "files": []}))
    late = atomic_dir(tmp_path / "late", force=True, durable=False)
    with pytest.raises(OutputError, match="late-notes"), late:  # added while it was written
        (tmp_path / "late" / "late-notes.txt").write_text("mine")
    assert (tmp_path / "late" / "late-notes.txt").read_text() == "mine"


def test_atomic_file_never_replaces_a_folder(tmp_path: Path) -> None:
    (tmp_path / "x.safetensors").mkdir()
    with pytest.raises(OutputError, match="is a folder"), atomic_file(tmp_path / "x.safetensors"):
        pass
    assert (tmp_path / "x.safetensors").is_dir()


def test_errors_name_the_output_not_the_temporary(tmp_path: Path) -> None:
    import errno

    out = tmp_path / "out"
    with pytest.raises(OutputError) as err, atomic_dir(out, durable=False) as tmp:
        raise OutputError("cannot write the output", path=tmp / "model.safetensors")
    assert err.value.path == str(out / "model.safetensors")
    with pytest.raises(OutputError) as err, atomic_dir(out, durable=False) as tmp:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "tokenizer.json"))
    assert err.value.path == str(out / "tokenizer.json") and "free some space" in err.value.hint
    with pytest.raises(OSError) as os_err, atomic_dir(out, durable=False) as tmp:
        raise OSError(errno.EIO, "Input/output error", str(tmp / "a"))
    assert os_err.value.filename == str(out / "a")
    assert list(tmp_path.iterdir()) == []


def test_check_output_resolves_before_comparing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = tmp_path / "in"
    (inputs / "lora").mkdir(parents=True)
    weights = inputs / "lora" / "adapter_model.safetensors"
    weights.write_bytes(b"x")
    monkeypatch.chdir(inputs / "lora")
    for out, needle in [
        (".", "is the same path"),
        ("..", "holds the input"),
        ("../lora/../..", "holds the input"),
        ("sub", "inside the input folder"),
    ]:
        with pytest.raises(OutputError, match=needle):
            check_output(out, [inputs / "lora"], force=True)
    os.link(weights, tmp_path / "hard.safetensors")
    with pytest.raises(OutputError, match="hard link"):
        check_output(tmp_path / "hard.safetensors", [inputs / "lora"], force=True)
    shutil.copyfile(weights, tmp_path / "copy.safetensors")
    assert check_output(tmp_path / "copy.safetensors", [inputs / "lora"], force=True) == (
        tmp_path / "copy.safetensors"
    )


def test_skip_reason(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_text("a")
    os.symlink("a.txt", root / "in.txt")
    os.symlink(tmp_path, root / "up")
    os.symlink("../root/a.txt", root / "around.txt")  # leaves and comes back: inside
    os.mkfifo(root / "fifo")
    (tmp_path / "outside.txt").write_text("x")
    os.symlink(tmp_path / "outside.txt", root / "out.txt")
    assert skip_reason(root, root / "a.txt") is None
    assert skip_reason(root, root / "in.txt") is None
    assert skip_reason(root, root / "around.txt") is None
    assert "outside the folder" in skip_reason(root, root / "out.txt")
    assert "outside the folder" in skip_reason(root, root / "up")
    assert skip_reason(root, root / "fifo") == "a FIFO (named pipe)"
    os.symlink("/dev/null", root / "null")
    assert "outside" in skip_reason(root, root / "null")
    # a Hub cache snapshot: links into the repository's blobs/ are its files; other repos' not
    snap = tmp_path / "models--a--b" / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (tmp_path / "models--a--b" / "blobs").mkdir()
    (tmp_path / "models--a--b" / "blobs" / "1234").write_text("{}")
    (tmp_path / "models--c--d" / "blobs").mkdir(parents=True)
    (tmp_path / "models--c--d" / "blobs" / "5678").write_text("{}")
    os.symlink("../../blobs/1234", snap / "config.json")
    os.symlink("../../../models--c--d/blobs/5678", snap / "other.json")
    assert skip_reason(snap, snap / "config.json") is None
    assert "outside the folder" in skip_reason(snap, snap / "other.json")


def test_a_link_loop_as_output_is_an_output_error(tmp_path: Path) -> None:
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    with pytest.raises(OutputError, match="loop of symbolic links"):
        check_output(tmp_path / "a", [tmp_path / "in.safetensors"], force=True)


def test_the_adapter_folders_loratool_writes_use_the_shared_names() -> None:
    from lora_tools.formats.diffusers import DiffusersFormat
    from lora_tools.formats.diffusers_old import DiffusersOldFormat
    from lora_tools.formats.mlx import MlxFormat
    from lora_tools.formats.peft import PeftFormat

    writers = {PeftFormat.default_filename, DiffusersFormat.default_filename}
    writers |= {MlxFormat.default_filename}
    assert writers | {DiffusersOldFormat.default_filename} == set(ADAPTER_WEIGHT_NAMES)


def test_shared_file_names_and_keys_are_spelled_only_in_constants() -> None:
    """Every file name / metadata key two modules need comes from lora_tools.constants."""
    import ast

    import lora_tools
    from lora_tools import constants

    values = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)}
    root = Path(lora_tools.__file__).parent
    spelled = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "constants.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and node.value in values
                and id(node) not in docstrings
            ):
                spelled.append(f"{path.relative_to(root)}:{node.lineno}: {node.value!r}")
    assert not spelled, spelled
