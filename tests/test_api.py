"""The Python API (``from lora_tools import ...``): names, inputs, the overwrite rule, reprs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from huggingface_hub import constants

from lora_tools import (
    combine,
    convert,
    inspect,
    load_adapter,
    merge,
    push,
    rescale,
    resize,
    save_adapter,
    validate,
)
from lora_tools.errors import FormatError, OutputError, UsageError
from lora_tools.formats import load_adapter as load_local
from tests.hub_server import TEST_USER, HubServer

pytest_plugins = ["tests.conftest_hub"]

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"


# -- reprs ---------------------------------------------------------------------------------------


def test_adapter_repr_is_short_and_says_what_it_holds() -> None:
    sizes = {}
    for path in (FIX / "kohya/sd-locon.safetensors", FIX / "kohya/sd-lora.safetensors"):
        adapter = load_local(path)
        text = repr(adapter)
        sizes[path.name] = len(text)
        assert len(text) < 300, text
        lo, hi = min(adapter.ranks), max(adapter.ranks)
        rank = f"{lo}..{hi}" if lo != hi else f"{lo}"
        assert text == (
            f"Adapter(format='kohya', modules={len(adapter.modules)}, "
            f"rank={rank}, source={str(path)!r})"
        )
    assert sizes["sd-locon.safetensors"] < 300  # the biggest fixture: 91 modules


def test_result_reprs_are_a_line_not_every_module(tmp_path: Path) -> None:
    # the dataclass reprs listed every module (inspect of sd-locon: 17 KB, resize: 20 KB)
    locon = FIX / "kohya/sd-locon.safetensors"
    results = [
        inspect(locon),
        validate(locon),
        rescale(locon, factor=0.5),
        resize(locon, rank=2, output=tmp_path / "r.safetensors"),
        combine([locon, locon]),
        convert(FIX / "peft/sd-unet-conv", to="kohya"),
        merge(FIX / "bases/tiny-sd", locon, tmp_path / "m"),
        push(FIX / "peft/llama-lora", "me/x", dry_run=True),
    ]
    for result in results:
        text = repr(result)
        assert len(text) < 400 and "\n" not in text, text
        paths = [ref["path"] for ref in result.to_json()["inputs"]]
        assert text.startswith(f"{type(result).__name__}(inputs={paths!r}"), text
        if "counts" in result.to_json():
            assert f"counts={result.to_json()['counts']!r}" in text
    assert f"outputs=[{str(tmp_path / 'r.safetensors')!r}]" in repr(results[3])


def test_module_repr_names_shapes_and_alpha_never_values() -> None:
    adapter = load_local(FIX / "peft/llama-dora")
    key, module = next(iter(adapter.modules.items()))
    text = repr(module)
    assert text == (
        f"LoraModule({key!r}, kind='linear', rank=4, down={tuple(module.down.shape)}, "
        f"up={tuple(module.up.shape)}, alpha={module.alpha!r}, dora)"
    )
    assert "array" not in text and "[" not in text


def test_module_repr_says_an_unknown_alpha() -> None:
    adapter = load_local(FIX / "broken/no-config")
    module = next(iter(adapter.modules.values()))
    assert "alpha=unknown" in repr(module)


# -- names and start-up ----------------------------------------------------------------------------

API = [
    "load_adapter",
    "save_adapter",
    "inspect",
    "validate",
    "rescale",
    "resize",
    "combine",
    "convert",
    "merge",
    "push",
]
HEAVY = ("numpy", "torch", "ml_dtypes", "click")


def test_every_command_has_a_function_and_importing_them_is_cheap() -> None:
    probe = (
        "import sys, lora_tools\n"
        f"from lora_tools import {', '.join(API)}, inspect_adapter, Adapter\n"
        "import json; print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))\n"
    ).replace("{heavy!r}", repr(HEAVY))
    bare = f"import sys, json, lora_tools; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    for code, allowed in ((bare, []), (probe, ["numpy"])):  # Adapter's module needs numpy
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == allowed, code


def test_names_are_the_api_functions() -> None:
    import lora_tools
    from lora_tools import api, formats
    from lora_tools.ops import merge as merge_op

    homes = {"save_adapter": formats, "merge": merge_op}
    for name in API:
        assert getattr(lora_tools, name) is getattr(homes.get(name, api), name)
        assert name in lora_tools.__all__ and name in dir(lora_tools)
    from lora_tools.ops.inspect import inspect_adapter

    assert lora_tools.inspect_adapter is inspect_adapter  # the old name keeps working
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lora_tools.nope  # noqa: B018


# -- inputs: paths, Hub ids and Adapters alike -----------------------------------------------------

HUB_ADAPTER = f"{TEST_USER}/llama-lora"


def seed(server: HubServer, repo_id: str = HUB_ADAPTER, src: str = "peft/llama-lora") -> None:
    folder = FIX / src
    server.add_repo(repo_id, files={p.name: p.read_bytes() for p in folder.iterdir()})


def test_load_adapter_takes_hub_ids_as_the_cli_does(hub_server: HubServer) -> None:
    seed(hub_server)
    adapter = load_adapter(f"{HUB_ADAPTER}@main")
    local = load_local(FIX / "peft/llama-lora")
    assert adapter.source is not None and adapter.source.is_relative_to(constants.HF_HUB_CACHE)
    assert adapter.config == local.config and list(adapter.modules) == list(local.modules)
    assert load_adapter(adapter) is adapter
    with pytest.raises(FormatError, match="no such file or folder"):
        load_adapter("./no/such-adapter")


def test_load_adapter_a_local_path_wins(
    hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(hub_server)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(FIX / "peft/llama-patterns", tmp_path / HUB_ADAPTER)
    adapter = load_adapter(HUB_ADAPTER)
    assert max(adapter.ranks) == 6  # llama-patterns, not the Hub's llama-lora
    assert hub_server.log == []


def test_operations_take_paths_hub_ids_and_adapters_alike(hub_server: HubServer) -> None:
    seed(hub_server)
    path = FIX / "peft/llama-lora"
    given = [str(path), path, HUB_ADAPTER, load_local(path)]
    alphas = [rescale(item, alpha=16).new_alphas for item in given]
    assert all(a == alphas[0] for a in alphas) and set(alphas[0].values()) == {16.0}
    reports = [inspect(item) for item in given]
    assert {r.rank["max"] for r in reports} == {4}
    assert {len(resize(item, rank=2).adapter.modules) for item in given} == {8}
    combined = combine([given[2], given[3]], weights=[1, -1])
    assert max(combined.adapter.ranks) == 8
    assert convert(given[2], "peft").adapter.format == "peft"


def test_validate_checks_an_adapter_in_memory_as_it_would_be_written() -> None:
    assert validate(FIX / "broken/zero-b").failed("error")
    assert validate(load_local(FIX / "broken/zero-b")).failed("error")
    report = validate([FIX / "peft/llama-lora", load_local(FIX / "kohya/sd-lora.safetensors")])
    assert not report.failed("error") and len(report.files) == 2


# -- the overwrite rule: refuse an existing output, force replaces ours, never an input ----------


def writers(src: Path):
    """Every API writer, as ``write(output, force)`` (save_adapter writes a rescaled adapter:
    a lossless copy carries no loratool history, so its folder is not one loratool wrote)."""
    return {
        "save_adapter": lambda out, force: save_adapter(
            rescale(src, factor=0.5).adapter, out, force=force
        ),
        "rescale": lambda out, force: rescale(src, factor=0.5, output=out, force=force),
        "resize": lambda out, force: resize(src, rank=2, output=out, force=force),
        "combine": lambda out, force: combine([src, src], output=out, force=force),
        "convert": lambda out, force: convert(src, "peft", output=out, force=force),
    }


@pytest.mark.parametrize("name", list(writers(FIX)))
def test_writers_refuse_an_existing_output_and_force_replaces_ours(
    name: str, tmp_path: Path
) -> None:
    write = writers(FIX / "peft/llama-lora")[name]
    out = tmp_path / "out"
    write(out, False)
    first = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputError, match="output already exists"):
        write(out, False)
    assert (out / "adapter_model.safetensors").read_bytes() == first
    write(out, True)  # a folder loratool wrote
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt"):
        write(out, True)
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("name", list(writers(FIX)))
def test_writers_never_replace_an_input(name: str, tmp_path: Path) -> None:
    src = tmp_path / "in"
    shutil.copytree(FIX / "peft/llama-lora", src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    write = writers(src)[name]
    for out in (src, src / "adapter_model.safetensors", src / "adapter_config.json", tmp_path):
        with pytest.raises(OutputError, match="input"):
            write(out, True)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_save_adapter_refuses_its_own_file_even_with_force(tmp_path: Path) -> None:
    src = tmp_path / "k.safetensors"
    shutil.copy(FIX / "kohya/sd-lora.safetensors", src)
    before = src.read_bytes()
    adapter = load_adapter(src)
    with pytest.raises(OutputError, match="same path as the input"):
        save_adapter(adapter, src, force=True)
    link = tmp_path / "hard.safetensors"
    os.link(src, link)
    with pytest.raises(OutputError, match="hard link"):
        save_adapter(adapter, link, force=True)
    assert src.read_bytes() == before
    copy = tmp_path / "copy"
    save_adapter(load_adapter(FIX / "peft/llama-lora"), copy)
    with pytest.raises(OutputError, match="did not write"):  # a lossless copy: no history
        save_adapter(load_adapter(FIX / "peft/llama-lora"), copy, force=True)
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"old")
    assert save_adapter(adapter, other, force=True) == other  # a file is replaced with force
    assert load_adapter(other).ranks == adapter.ranks


def test_an_output_is_checked_before_the_work(tmp_path: Path, monkeypatch) -> None:
    from lora_tools.ops import resize as resize_op

    def fail(*args, **kwargs):
        raise AssertionError("resized before the output was checked")

    monkeypatch.setattr(resize_op, "resize_adapter", fail)
    (tmp_path / "out").mkdir()
    (tmp_path / "out/x").write_text("x")
    with pytest.raises(OutputError):
        resize(FIX / "peft/llama-lora", rank=2, output=tmp_path / "out")


@pytest.mark.parametrize("name", ["rescale", "resize", "combine", "convert"])
def test_a_written_result_names_its_output_as_the_cli_does(name: str, tmp_path: Path) -> None:
    # the results of the writers said "outputs": [] although they wrote OUT
    kohya = FIX / "kohya/sd-lora.safetensors"
    out = tmp_path / "out.safetensors"
    calls = {
        "rescale": lambda: rescale(kohya, factor=2, output=out),
        "resize": lambda: resize(kohya, rank=2, output=out),
        "combine": lambda: combine([kohya, kohya], output=out),
        "convert": lambda: convert(FIX / "peft/sd-unet-conv", to="kohya", output=out),
    }
    result = calls[name]()
    assert result.output == str(out)
    assert result.to_json()["outputs"] == [{"path": str(out), "kind": "file"}]


def test_resize_dry_run_writes_nothing(tmp_path: Path) -> None:
    result = resize(FIX / "peft/llama-lora", rank=2, dry_run=True)
    assert result.adapter is None and result.modules
    with pytest.raises(UsageError, match="dry run"):
        resize(FIX / "peft/llama-lora", rank=2, dry_run=True, output=tmp_path / "o")


# -- merge and push forward to their operations ---------------------------------------------------


def test_merge_forwards_and_keeps_the_overwrite_rule(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    summary = merge(FIX / "bases/tiny-llama", [FIX / "peft/llama-lora"], out, weights=[0.5])
    assert summary.tensors["merged"] == 8
    with pytest.raises(OutputError, match="output already exists"):
        merge(FIX / "bases/tiny-llama", [FIX / "peft/llama-lora"], out)
    merge(FIX / "bases/tiny-llama", [FIX / "peft/llama-lora"], out, force=True)
    with pytest.raises(OutputError, match="input"):
        merge(FIX / "bases/tiny-llama", [FIX / "peft/llama-lora"], FIX / "bases", force=True)


def test_merge_takes_an_adapter_in_memory(tmp_path: Path) -> None:
    adapter = rescale(FIX / "peft/llama-lora", factor=0.5).adapter
    summary = merge(FIX / "bases/tiny-llama", [adapter], tmp_path / "merged")
    assert summary.tensors["merged"] == 8


def test_merge_takes_one_adapter_without_a_list_and_the_cli_dtype_spellings(
    tmp_path: Path,
) -> None:
    # a lone path used to be iterated character by character ("f: no such file or folder")
    one = merge(FIX / "bases/tiny-llama", str(FIX / "peft/llama-lora"), tmp_path / "a")
    assert [a["weights_file"] for a in one.adapters] == [
        str(FIX / "peft/llama-lora/adapter_model.safetensors")
    ]
    # --dtype bfloat16 works in the CLI: the same spelling works here
    for spelling in ("bfloat16", "BF16", "bf16"):
        summary = merge(
            FIX / "bases/tiny-llama", [FIX / "peft/llama-lora"], tmp_path / spelling, dtype=spelling
        )
        assert summary.dtype == "BF16"
    with pytest.raises(UsageError, match="unknown dtype 'int8'"):
        merge(FIX / "bases/tiny-llama", [FIX / "peft/llama-lora"], tmp_path / "x", dtype="int8")


def test_push_dry_run_is_the_cli_dry_run_and_makes_no_request(monkeypatch) -> None:
    # HF_ENDPOINT on a closed port: any request would fail the call
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    plan = push(FIX / "peft/llama-lora", "me/llama-lora", dry_run=True)
    doc = plan.to_json()
    assert doc["command"] == "push" and doc["dry_run"] is True
    assert [f["path"] for f in doc["files"]][-1] == "README.md"
    cli = subprocess.run(
        [sys.executable, "-m", "lora_tools", "push", "me/llama-lora", str(FIX / "peft/llama-lora"),
         "--dry-run", "--json"],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert json.loads(cli.stdout)["files"] == doc["files"]


def test_push_uploads_an_adapter_in_memory_as_save_adapter_writes_it(
    hub_server: HubServer, tmp_path: Path
) -> None:
    adapter = rescale(FIX / "peft/llama-lora", alpha=16).adapter
    repo = f"{TEST_USER}/llama-a16"
    result = push(adapter, repo, message="a16")
    files = hub_server.repos[repo].branches["main"][-1].files
    written = save_adapter(adapter, tmp_path / "same")
    assert files["adapter_model.safetensors"] == written.read_bytes()
    assert json.loads(files["adapter_config.json"])["lora_alpha"] == 16
    assert result.repo_id == repo and result.repo_created
    assert not list(Path(tempfile.gettempdir()).glob("loratool-*/llama-lora"))  # cleaned up


# -- typed: py.typed is shipped and every public function is fully annotated ----------------------


def test_py_typed_is_shipped() -> None:
    import tomllib

    assert (ROOT / "lora_tools/py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in config["package-data"]["lora_tools"]
    assert any(p == "lora_tools*" for p in config["packages"]["find"]["include"])


@pytest.mark.parametrize("name", API)
def test_public_functions_are_fully_annotated_and_documented(name: str) -> None:
    """No type checker is installed here, so the annotations are inspected: every parameter
    and the return value annotated, and every annotation resolves to real types."""
    import inspect as pyinspect
    import typing

    from typing_extensions import Unpack

    import lora_tools
    from lora_tools.adapter import Adapter
    from lora_tools.ops.combine import CombineResult
    from lora_tools.ops.convert import ConvertResult
    from lora_tools.ops.inspect import InspectResult
    from lora_tools.ops.push import PushPlan, PushResult
    from lora_tools.ops.rescale import RescaleResult
    from lora_tools.ops.resize import ResizeResult
    from lora_tools.ops.validate.report import Progress as ValidateProgress
    from lora_tools.ops.validate.report import Report

    fn = getattr(lora_tools, name)
    signature = pyinspect.signature(fn)
    missing = [p for p, v in signature.parameters.items() if v.annotation is v.empty]
    assert not missing, f"{name}: parameters without a type: {missing}"
    assert signature.return_annotation is not signature.empty, f"{name}: no return type"
    types = {
        "Unpack": Unpack,
        "Adapter": Adapter,
        "CombineResult": CombineResult,
        "ConvertResult": ConvertResult,
        "InspectResult": InspectResult,
        "PushPlan": PushPlan,
        "PushResult": PushResult,
        "RescaleResult": RescaleResult,
        "ResizeResult": ResizeResult,
        "ValidateProgress": ValidateProgress,
        "Report": Report,
    }
    hints = typing.get_type_hints(fn, localns=types)
    assert set(hints) == {*signature.parameters, "return"}
    documented = list(signature.parameters)
    for param in signature.parameters.values():
        if param.kind is param.VAR_KEYWORD:  # **options: Unpack[SomeOptions]
            (options,) = typing.get_args(hints[param.name])
            documented += list(typing.get_type_hints(options, localns=types))
    doc = fn.__doc__ or ""
    assert "Args:" in doc and "Example:" in doc, f"{name}: docstring lacks Args / Example"
    missing = [p for p in documented if f" {p}:" not in doc and f" **{p}:" not in doc]
    assert not missing, f"{name}: arguments the docstring does not describe: {missing}"
