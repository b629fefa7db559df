"""Hints name only options the command that prints them has (issue 10.13).

Two nets. The source scan finds every ``--option`` in any string the package can print and
checks it against each command that can reach the module holding it: a module shared by several
commands (formats, io, resolve...) must name no option, the CLI layer supplies those
(``cli._common.command_hints``). The second net triggers the common mistakes per command and
checks every ``--option`` in what the command printed.
"""

from __future__ import annotations

import ast
import re
import shutil
import sys
from pathlib import Path

import click
import numpy as np
import pytest

from lora_tools.cli import COMMANDS, cli
from lora_tools.cli._common import run
from lora_tools.io.safetensors import SafetensorsFile, save_tensors

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "lora_tools"
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
#: A command line in backticks: `loratool CMD ...` is checked against CMD; other programs'
#: (`hf extensions remove lora`, `pip install ...`) are not loratool's options.
COMMAND_LINE = re.compile(r"`(loratool|hf|pip|python|vllm)\s+([^`]*)`")
GLOBAL_OPTIONS = {"--help", "--debug", "--version"}
WRITERS = ("rescale", "resize", "combine", "convert", "merge")
CLI_MODULES = {target.split(":")[0]: name for name, target in COMMANDS.items()}
#: Modules (and packages) whose strings only some of the commands importing them can print.
#: io.atomic is imported everywhere (through io.safetensors) but refuses outputs, which only
#: the writers have; cli._common names global options only; push runs validate without a base
#: and shows its errors' messages, never their hints; the consumers package's strings are
#: validate --profile's (its scale models, which inspect reaches too, print no option).
PRINTED_BY = {
    "lora_tools.io.atomic": WRITERS,
    "lora_tools.cli._common": (),
    "lora_tools.cli._algebra": ("rescale", "resize", "combine", "convert"),
    "lora_tools.ops.validate": ("validate",),
    "lora_tools.consumers": ("validate",),
    # merge renders only a new card with it and prints none of its notes or errors
    "lora_tools.ops.card": ("push",),
}


def command_options() -> dict[str, set[str]]:
    ctx = click.Context(cli)
    out: dict[str, set[str]] = {}
    for name in COMMANDS:
        cmd = cli.get_command(ctx, name)
        cmds = list(cmd.commands.values()) if isinstance(cmd, click.Group) else [cmd]
        opts = {o for c in cmds for p in c.params for o in [*p.opts, *p.secondary_opts]}
        out[name] = {o for o in opts if o.startswith("--")} | GLOBAL_OPTIONS
    return out


OPTIONS = command_options()


def misnamed(text: str, command: str) -> list[str]:
    """The ``--options`` in ``text`` that the command meant does not have."""
    wrong = []
    for program, rest in COMMAND_LINE.findall(text):
        words = rest.split()
        if program == "loratool" and words and words[0] in OPTIONS:
            wrong += [f"{o} (in `loratool {rest}`)" for o in OPTION.findall(rest)
                      if o not in OPTIONS[words[0]]]  # fmt: skip
    bare = COMMAND_LINE.sub("", text)
    return wrong + [o for o in OPTION.findall(bare) if o not in OPTIONS[command]]


# ----------------------------------------------------------------------------- the source scan


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(module: str) -> set[str]:
    """The package modules ``module`` imports anywhere (function-level imports included)."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    out = set()
    for name in names:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out & set(MODULES)


def reach() -> dict[str, set[str]]:
    """module -> the commands whose CLI module imports it, directly or not (a helper taken
    from another command's CLI module does not run that command)."""
    out: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, name in CLI_MODULES.items():
        seen, todo = set(), [module]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += [i for i in imported(m) if CLI_MODULES.get(i, name) == name]
        for m in seen:
            out[m].add(name)
    for m in out:
        for prefix, commands in PRINTED_BY.items():
            if m == prefix or m.startswith(prefix + "."):
                out[m] = set(commands)
    return out


def printable_strings(path: Path):
    """``(line, text)`` of every string literal but docstrings and click declarations
    (an f-string's fields read as ``{}``)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            skip.add(id(first.value))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "click"
        ):
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
            yield (
                node.lineno,
                "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values),
            )
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_the_scan_sees_the_hints() -> None:
    """The nets are not empty: known hints are found, and a shared module reaches everyone."""
    found = {
        (m, text) for m, p in MODULES.items() for _, text in printable_strings(p)
        if OPTION.search(text)
    }  # fmt: skip
    assert ("lora_tools.cli.merge", "drop --device, or drop --exact") in found
    assert any(m == "lora_tools.io.atomic" and "--force" in t for m, t in found)
    where = reach()
    assert where["lora_tools.formats.base"] == set(COMMANDS) - {"hf-extension"}
    assert where["lora_tools.cli.validate"] == {"validate"}
    assert where["lora_tools.resolve"] == {
        "convert",
        "validate",
        "merge",
        "push",
        "resize",  # other adapter types' base weights (ops.to_lora)
        "combine",
        "extract",  # checks its own output's names
    }


def test_every_option_in_the_source_exists_on_each_command_that_can_print_it() -> None:
    where = reach()
    wrong = []
    for module, path in sorted(MODULES.items()):
        for line, text in printable_strings(path):
            if not OPTION.search(text):
                continue
            for command in sorted(where[module]) or ["loratool"]:
                if command == "loratool":  # cli._common: global options only
                    bad = [o for o in OPTION.findall(text) if o not in GLOBAL_OPTIONS]
                else:
                    bad = misnamed(text, command)
                if bad:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} ({command}): {bad}: {text!r}")
    assert not wrong, "\n".join(wrong)


# ----------------------------------------------------------------------------- the mistakes


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, fixtures_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("hints")
    # a PEFT adapter with one module the base does not have
    extra = root / "llama-extra"
    shutil.copytree(fixtures_dir / "peft/llama-lora", extra)
    weights = extra / "adapter_model.safetensors"
    with SafetensorsFile(weights) as f:
        tensors = {n: f.read(n) for n in f.header.tensors}
    stem = "base_model.model.model.layers.0.self_attn.zz_proj"
    tensors[f"{stem}.lora_A.weight"] = np.zeros((4, 32), np.float32)
    tensors[f"{stem}.lora_B.weight"] = np.zeros((32, 4), np.float32)
    save_tensors(weights, tensors)
    (root / "taken").mkdir()
    (root / "taken.safetensors").write_bytes(b"not loratool's")
    return root


def mistakes(f: Path, w: Path) -> list[list[str]]:
    base, lora, kohya = (
        f / "bases/tiny-llama",
        f / "peft/llama-lora",
        f / "kohya/sd-lora.safetensors",
    )
    old = f / "diffusers-old/sd-attn-procs.safetensors"
    missing = str(w / "no-such-adapter")
    return [
        ["inspect", str(base)],
        ["inspect", str(f / "bases/tiny-flux.safetensors")],
        ["inspect", missing],
        ["inspect", str(f / "broken/truncated.safetensors")],
        ["inspect", str(f / "broken/pickle")],
        ["validate", str(base)],
        ["validate", *(str(p) for p in sorted((f / "broken").iterdir()))],
        ["validate", str(lora), "--base", str(f / "bases/tiny-sd")],
        ["validate", str(w / "llama-extra"), "--base", str(base)],
        ["validate", str(lora), "--select", "LT999"],
        ["validate", str(lora), "--base", missing],
        ["rescale", str(base), "-o", str(w / "r1"), "--factor", "2"],
        ["rescale", str(lora), "-o", str(w / "r2")],
        ["rescale", str(lora), "-o", str(w / "r3"), "--factor", "2", "--alpha", "3"],
        ["rescale", str(lora), "-o", str(w / "taken"), "--factor", "2"],
        ["rescale", str(old), "-o", str(w / "r4.safetensors"), "--alpha", "3"],
        ["rescale", missing, "-o", str(w / "r5"), "--factor", "2"],
        ["resize", str(base), "-o", str(w / "s1"), "--rank", "2"],
        ["resize", str(lora), "--rank", "2"],
        ["resize", str(lora), "-o", str(w / "s2")],
        ["resize", str(lora), "-o", str(w / "taken"), "--rank", "2"],
        ["resize", str(lora), "-o", str(w / "s3"), "--rank", "2", "--min-rank", "1"],
        ["combine", str(base), str(lora), "-o", str(w / "c1")],
        ["combine", str(lora), str(kohya), "-o", str(w / "c2")],
        ["combine", str(lora), str(lora), "-o", str(w / "c3"), "--weights", "1,2,3"],
        ["combine", str(lora), str(lora), "-o", str(w / "c4"), "--method", "ties"],
        ["combine", str(lora), str(lora), "-o", str(w / "taken")],
        ["convert", str(base), "--to", "kohya", "-o", str(w / "v1.safetensors")],
        ["convert", str(kohya), "--to", "peft", "-o", str(w / "v2")],
        ["convert", str(kohya), "--to", "diffusers", "-o", str(w / "v3")],
        ["convert", str(f / "diffusers/sd-lora"), "--to", "peft", "-o", str(w / "v4")],
        ["convert", str(lora), "--to", "kohya", "-o", str(w / "taken.safetensors")],
        ["merge", str(lora), str(base), "-o", str(w / "m1")],
        ["merge", str(base), str(base), "-o", str(w / "m2")],
        ["merge", str(f / "bases/tiny-sd"), str(lora), "-o", str(w / "m3")],
        ["merge", str(base), str(w / "llama-extra"), "-o", str(w / "m4")],
        ["merge", str(base), str(lora), str(lora), "-o", str(w / "m5"), "--weight", "1",
         "--weight", "2", "--weight", "3"],
        ["merge", str(base), str(lora), "-o", str(w / "taken")],
        ["merge", str(base), str(lora), "-o", str(w / "m6"), "--exact", "--device", "cuda"],
        ["merge", missing, str(lora), "-o", str(w / "m7")],
        ["push", str(lora), "not a repo id", "--dry-run"],
        ["push", str(base / "model.safetensors"), "me/x", "--dry-run"],
        ["push", str(base / "model.safetensors"), "me/x", "--dry-run", "--no-validate"],
        ["push", str(f / "broken/rank-mismatch"), "me/x", "--dry-run"],
        ["push", str(lora), "me/x", "--dry-run", "--base-model", "./local"],
        ["push", missing, "me/x", "--dry-run"],
    ]  # fmt: skip


def test_every_option_a_command_prints_exists_on_it(
    work: Path, fixtures_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    wrong, hinted = [], 0
    for args in mistakes(fixtures_dir, work):
        monkeypatch.setattr(sys, "argv", ["loratool", *args])
        with pytest.raises(SystemExit) as exit_info:
            run(cli)
        out = capsys.readouterr()
        printed = out.out + out.err
        assert exit_info.value.code != 0, (args, printed)
        assert "internal error" not in printed, (args, printed)
        hinted += "hint:" in printed
        bad = misnamed(printed, args[0])
        if bad:
            wrong.append(f"loratool {' '.join(args)}: {bad}\n  {printed.strip()}")
    assert not wrong, "\n".join(wrong)
    assert hinted >= 30  # the mistakes did reach their hints


def test_swapped_base_and_adapter_gets_a_hint_merge_can_follow(
    fixtures_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    base, lora = fixtures_dir / "bases/tiny-llama", fixtures_dir / "peft/llama-lora"
    monkeypatch.setattr(sys, "argv", ["loratool", "merge", str(lora), str(base), "-o", "x"])
    with pytest.raises(SystemExit):
        run(cli)
    err = capsys.readouterr().err
    assert "--base" not in err and "BASE first" in err
