"""The old diffusers spelling writes a folder through the same atomic writer as the others."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_tools.errors import OutputError
from lora_tools.formats import load_adapter, save_adapter
from lora_tools.io.safetensors import read_header

FIX = Path(__file__).resolve().parents[2] / "fixtures"
SRC = FIX / "diffusers-old/sd-attn-procs.safetensors"


def test_folder_output_appears_whole(tmp_path: Path) -> None:
    adapter = load_adapter(SRC)
    written = save_adapter(adapter, tmp_path / "out")
    assert written == tmp_path / "out/pytorch_lora_weights.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left
    assert sorted(read_header(written).tensors) == sorted(read_header(SRC).tensors)


def test_folder_holding_other_files_is_never_written_into(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt"):
        save_adapter(load_adapter(SRC), out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
