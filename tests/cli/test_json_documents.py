"""Every command's ``--json`` document has the envelope and validates against its JSON Schema
(``lora_tools/schemas/``, docs/json.md); the same thing has the same name in all of them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.results import COMMANDS, ENVELOPE_FIELDS, SCHEMA_VERSION, Result, json_schema
from tests.hub_server import TEST_USER, HubServer

jsonschema = pytest.importorskip("jsonschema")

pytest_plugins = ["tests.conftest_hub"]

FIX = Path(__file__).resolve().parents[2] / "fixtures"


def run_json(*args: Any) -> dict[str, Any]:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)


def documents(tmp: Path) -> dict[str, list[dict[str, Any]]]:
    """One or more documents per command, from the fixtures."""
    llama, kohya = FIX / "peft/llama-lora", FIX / "kohya/sd-lora.safetensors"
    return {
        "inspect": [
            run_json("inspect", llama, "--json"),
            run_json("inspect", FIX / "peft/llama-patterns", "--json", "--stats"),
            run_json("inspect", kohya, "--json"),
        ],
        "validate": [
            run_json("validate", llama, FIX / "broken/nan-weights", "--output-format", "json"),
            run_json(
                "validate", llama, "--base", FIX / "bases/tiny-llama", "--output-format", "json"
            ),
        ],
        "rescale": [
            run_json("rescale", kohya, "-o", tmp / "r.safetensors", "--factor", "2", "--json")
        ],
        "resize": [
            run_json("resize", llama, "-o", tmp / "rs", "--rank", "2", "--json"),
            run_json("resize", llama, "--rank", "2", "--dry-run", "--json"),
        ],
        "combine": [
            run_json("combine", llama, llama, "-o", tmp / "c", "--weights", "1,-0.5", "--json")
        ],
        "convert": [
            run_json(
                "convert",
                kohya,
                "--to",
                "diffusers",
                "-o",
                tmp / "cv",
                "--base",
                FIX / "bases/tiny-sd",
                "--json",
            )
        ],
        "merge": [
            run_json("merge", FIX / "bases/tiny-llama", llama, "-o", tmp / "m", "--json"),
            run_json(
                "merge",
                FIX / "bases/tiny-flux.safetensors",
                FIX / "kohya/flux-lora.safetensors",
                "-o",
                tmp / "m.safetensors",
                "--json",
            ),
        ],
        "push": [run_json("push", llama, f"{TEST_USER}/x", "--dry-run", "--json")],
        "extract": [
            run_json(
                "extract",
                FIX / "bases/tiny-llama",
                FIX / "finetuned/tiny-llama-ft",
                "-o",
                tmp / "x",
                "--rank",
                "2",
                "--keep-diffs",
                "--json",
            )
        ],
    }


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    return documents(tmp_path_factory.mktemp("json"))


def validator(name: str) -> Any:
    schema = json_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_schemas_are_valid_and_require_every_envelope_field() -> None:
    envelope = json_schema("envelope")
    jsonschema.Draft202012Validator.check_schema(envelope)
    assert envelope["required"] == list(ENVELOPE_FIELDS)
    assert envelope["properties"]["schema_version"] == {"const": SCHEMA_VERSION}
    for command in COMMANDS:
        schema = json_schema(command)
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        own = schema["$defs"]["envelope"]
        # the copy in each command's schema is the envelope, with its own command name
        assert own["required"] == list(ENVELOPE_FIELDS)
        assert own["properties"] == {**envelope["properties"], "command": {"const": command}}
        assert schema["allOf"][0] == {"$ref": "#/$defs/envelope"}


@pytest.mark.parametrize("field", ENVELOPE_FIELDS)
def test_a_document_without_an_envelope_field_is_rejected(docs, field: str) -> None:
    for command in COMMANDS:
        doc = dict(docs[command][0])
        del doc[field]
        assert not validator(command).is_valid(doc), (command, field)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_document_validates_against_its_schema(docs, command: str) -> None:
    check = validator(command)
    for doc in docs[command]:
        errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in check.iter_errors(doc)]
        assert errors == [], errors
        assert list(doc)[: len(ENVELOPE_FIELDS)] == list(ENVELOPE_FIELDS)
        assert doc["command"] == command and doc["schema_version"] == SCHEMA_VERSION


def names(value: Any, where: str = "") -> list[tuple[str, str, Any]]:
    """Every ``(path, key, value)`` in a document, depth first (metadata and config excluded:
    they are the files' own text)."""
    found = []
    if isinstance(value, dict):
        for k, v in value.items():
            if where == "" and k in ("metadata", "config", "rule"):
                continue
            found.append((where, k, v))
            found += names(v, f"{where}/{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += names(v, f"{where}/{i}")
    return found


def check_names(doc: dict[str, Any]) -> None:
    """A module is ``module`` (never ``key``); ``modules`` is a list of per-module objects;
    ``counts`` holds integers; every output says whether it is a file or a folder."""
    for where, key, value in names(doc):
        assert key != "key", f"{where}: a module id is spelled 'module'"
        if key == "modules" and not where.endswith("/counts"):
            assert isinstance(value, list), f"{where}/modules is a {type(value).__name__}"
            assert all(isinstance(m, dict) and isinstance(m["module"], str) for m in value), where
        if key == "counts":
            assert all(type(n) is int for n in value.values()), f"{where}/counts: {value}"
    for out in doc["outputs"]:
        assert out["kind"] == ("folder" if Path(out["path"]).is_dir() else "file")


def test_same_names_for_the_same_things(docs) -> None:
    for command in COMMANDS:
        for doc in docs[command]:
            check_names(doc)
    merged = docs["merge"][0]
    assert (
        merged["outputs"][0]["kind"] == "folder"
        and docs["merge"][1]["outputs"][0]["kind"] == "file"
    )
    assert docs["rescale"][0]["outputs"][0]["kind"] == "file"
    assert docs["resize"][1]["outputs"] == [] and docs["validate"][0]["outputs"] == []
    # merge --json names an adapter as loratool_merge.json does
    record = json.loads(Path(merged["outputs"][0]["path"], "loratool_merge.json").read_text())
    for ours, theirs in zip(merged["adapters"], record["adapters"], strict=True):
        assert (ours["spec"], ours["weights_file"]) == (theirs["spec"], theirs["weights_file"])
        assert ours["counts"]["modules_merged"] == theirs["modules_merged"]
        assert ours["counts"]["modules_unmatched"] == theirs["modules_unmatched"]
        # a per-adapter count of tensors is spelled as the document's own count of them
        tensor_counts = {k for k in ours["counts"] if not k.startswith("modules")}
        assert tensor_counts and tensor_counts <= set(merged["counts"]), ours["counts"]


def test_docs_json_spells_each_command_with_json() -> None:
    text = (FIX.parent / "docs/json.md").read_text()
    shown = {}
    for command in COMMANDS:
        section = text.split(f"\n## {command}\n")[1].split("\n## ")[0]
        for line in section.splitlines():
            if line.startswith("`loratool"):
                shown[command] = line
    assert "validate" in shown and "inspect" in shown, shown
    assert all(" --json" in line for line in shown.values()), shown


def test_merge_dtype_is_printed_as_docs_json_says(tmp_path: Path) -> None:
    row = next(
        line
        for line in (FIX.parent / "docs/json.md").read_text().split("## merge")[1].splitlines()
        if line.startswith("| `dtype` |")
    )
    base, lora = FIX / "bases/tiny-llama", FIX / "peft/llama-lora"
    for dtype in ("keep", "bfloat16", "fp16", "float32"):
        doc = run_json("merge", base, lora, "-o", tmp_path / dtype, "--dtype", dtype, "--json")
        assert f"`{doc['dtype']}`" in row, (doc["dtype"], row)


@pytest.mark.parametrize(
    "bad",
    [
        {"modules": {"count": 8}},
        {"modules": 8},
        {"modules": [{"key": "a.b", "module": "a.b"}]},
        {"counts": {"modules": 1.5}},
    ],
)
def test_the_name_check_catches_a_stray_spelling(docs, bad: dict[str, Any]) -> None:
    doc = {**docs["inspect"][0], **bad}
    with pytest.raises(AssertionError):
        check_names(doc)


def test_a_module_spelled_key_fails_the_schema(docs) -> None:
    doc = json.loads(json.dumps(docs["resize"][0]))
    doc["modules"][0]["key"] = doc["modules"][0].pop("module")
    assert not validator("resize").is_valid(doc)
    doc = json.loads(json.dumps(docs["inspect"][0]))
    doc["modules"] = {"count": len(doc["modules"])}
    assert not validator("inspect").is_valid(doc)


def test_a_real_push_validates(hub_server: HubServer) -> None:
    doc = run_json("push", FIX / "peft/llama-lora", f"{TEST_USER}/llama", "--json")
    errors = [e.message for e in validator("push").iter_errors(doc)]
    assert errors == [] and doc["dry_run"] is False and doc["changed"] is True
    assert doc["url"] == doc["commit_url"] and doc["inputs"][0]["role"] == "adapter"
    check_names(doc)


def test_every_result_is_a_frozen_dataclass() -> None:
    from lora_tools.ops.combine import CombineResult
    from lora_tools.ops.convert import ConvertResult
    from lora_tools.ops.extract import ExtractResult
    from lora_tools.ops.inspect import InspectResult
    from lora_tools.ops.push import PushPlan, PushResult
    from lora_tools.ops.rescale import RescaleResult
    from lora_tools.ops.resize import ResizeResult
    from lora_tools.ops.validate import Report
    from lora_tools.results import MergeResult

    classes = [
        InspectResult, Report, RescaleResult, ResizeResult, CombineResult, ConvertResult,
        MergeResult, PushPlan, PushResult, ExtractResult,
    ]  # fmt: skip
    assert {c.command for c in classes} == set(COMMANDS)
    for cls in classes:
        assert issubclass(cls, Result) and dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen, cls  # type: ignore[attr-defined]
