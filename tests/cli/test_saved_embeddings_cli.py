"""What a user sees when an adapter's saved base embedding (PEFT ``embed_tokens.base_layer.
weight``) differs from the base: ``validate --base`` (LT591 info, LT508... under ``--profile``),
``convert --for`` and ``convert --to gguf`` (one line, exit 3, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.console import run_console
from tests.ops import profile_adapters

COPY = "base_model.model.model.embed_tokens.base_layer.weight"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("saved-embeddings-cli")
    profile_adapters.make(root, "embedding")
    base = profile_adapters.save_base(root)
    profile_adapters.save_moved_base(base, [5, 9], 0.5)
    return root


def test_validate_same_base_passes(root):
    result = run_console("validate", root / "embedding", "--base", root / "base-128")
    assert result.exit_code == 0
    assert "no findings" in result.stdout


def test_validate_moved_base_is_an_info_and_a_profile_error(root):
    args = ("validate", root / "embedding", "--base", root / "base-128-moved")
    result = run_console(*args)
    assert result.exit_code == 0  # infos never fail
    assert "info    LT591 saved-embedding-differs" in result.stdout
    assert COPY in result.stdout and "2 of 128 rows differ, max |diff| 0.5" in result.stdout
    served = run_console(*args, "--profile", "vllm")
    assert served.exit_code == 1
    assert "error   LT508 vllm-saved-embedding-skipped" in served.stdout
    doc = json.loads(run_console(*args, "--output-format", "json").stdout)
    (finding,) = doc["files"][0]["findings"]
    assert (finding["rule"], finding["severity"], finding["module"]) == ("LT591", "info", COPY)
    assert finding["found"] == "2 of 128 rows differ, max |diff| 0.5, first at row 5"


@pytest.mark.parametrize("target", ["vllm", "sglang", "llamacpp"])
def test_convert_for_refuses_in_one_line(root, tmp_path, target):
    out = tmp_path / "out"
    result = run_console(
        "convert", root / "embedding", "--for", target, "--base", root / "base-128-moved",
        "-o", out,
    )  # fmt: skip
    assert result.exit_code == 3
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("loratool: error:") and COPY in line
    assert "model.embed_tokens.weight" in line and "2 of 128 rows differ" in line
    assert "`loratool merge BASE ADAPTER -o OUT`" in line
    assert not out.exists()


def test_convert_to_gguf_refuses_in_one_line(root, tmp_path):
    pytest.importorskip("gguf")
    out = tmp_path / "a.gguf"
    result = run_console(
        "convert", root / "embedding", "--to", "gguf", "--base", root / "base-128-moved",
        "-o", out,
    )  # fmt: skip
    assert result.exit_code == 3
    (line,) = result.stderr.strip().splitlines()
    assert COPY in line and "2 of 128 rows differ" in line
    assert not out.exists()
    same = run_console(
        "convert", root / "embedding", "--to", "gguf", "--base", root / "base-128", "-o", out
    )
    assert same.exit_code == 0 and out.is_file()
