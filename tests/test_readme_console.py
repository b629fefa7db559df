"""Every ``console`` example in README.md runs as written, in order, in a fresh clone.

The working folder is laid out like a fresh clone (``fixtures/`` copied, nothing else), so an
example that writes into a folder no earlier example made fails here as it would for a reader.
``loratool`` is this checkout's ``python -m lora_tools``; ``hf`` is huggingface_hub's CLI. Hub
ids are served by the local test Hub (tests/hub_server.py), which holds the repos the examples
name: ``someone/llama-lora`` (with a ``v2`` branch) is fixtures/peft/llama-lora and
``meta-llama/Llama-3.2-1B`` is fixtures/bases/tiny-llama.

Each command must exit 0, or 1 where its shown output is a validate report that failed. Where
the example shows output, every shown line must appear in the output, in order, with all
whitespace (line breaks included: tables wrap with the terminal's width) collapsed: ``...``
stands for any text, an abbreviated commit id (``5f0e2c...``) for any commit id, a duration
(``0.02 s``) for any duration, and ``https://huggingface.co`` for the test Hub's address.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hub_server import HubServer

pytest_plugins = ["tests.conftest_hub"]

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Example:
    line: int  # in README.md
    command: str
    shown: tuple[str, ...]  # the output lines the README shows after it


def console_examples(text: str) -> list[Example]:
    examples: list[Example] = []
    for block in re.finditer(r"```console\n(.*?)```", text, flags=re.S):
        first = text.count("\n", 0, block.start(1)) + 1
        current: tuple[int, str, list[str]] | None = None
        for offset, line in enumerate(block.group(1).splitlines()):
            if line.startswith("$ "):
                if current is not None:
                    examples.append(Example(current[0], current[1], tuple(current[2])))
                current = (first + offset, line[2:], [])
            elif current is not None and line.strip():
                current[2].append(line)
        if current is not None:
            examples.append(Example(current[0], current[1], tuple(current[2])))
    return examples


EXAMPLES = console_examples(README)


def argv_and_env(command: str) -> tuple[list[str], dict[str, str]]:
    words = shlex.split(command, comments=True)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    program, *args = words
    if program == "loratool":
        return [sys.executable, "-m", "lora_tools", *args], env
    if program == "hf":
        return [str(BIN / "hf"), *args], env
    raise AssertionError(f"README example runs an unknown program: {command}")


def collapse(text: str) -> str:
    return " ".join(text.split())


def line_pattern(shown: str, hub_url: str) -> re.Pattern[str]:
    """A shown line as a pattern on the collapsed output, matching whole words only."""
    text = collapse(shown.replace("https://huggingface.co", hub_url))
    wild = {"...": ".*?", "hex": "[0-9a-f]+", "s": r"\d+(?:\.\d+)? s"}
    parts = re.split(r"((?<![0-9a-f])[0-9a-f]{6,}\.\.\.|\.\.\.|\b\d+(?:\.\d+)? s\b)", text)
    regex = "".join(
        wild["hex"] if p.endswith("...") and len(p) > 3 else
        wild["..."] if p == "..." else
        wild["s"] if re.fullmatch(r"\d+(?:\.\d+)? s", p) else
        re.escape(p)
        for p in parts
    )  # fmt: skip
    return re.compile(rf"(?<!\S){regex}(?!\S)")


def expected_code(example: Example) -> int:
    failed_report = any(re.search(r"; failed \(--fail-on \w+\)$", s) for s in example.shown)
    return 1 if failed_report else 0


def test_readme_has_console_examples() -> None:
    assert len(EXAMPLES) >= 25 and sum("loratool" in e.command for e in EXAMPLES) >= 20
    assert expected_code(next(e for e in EXAMPLES if e.command.startswith("loratool validate")))


def test_shown_output_matching_is_strict() -> None:
    """The matcher is not a rubber stamp: a wrong number or word does not match."""
    pattern = line_pattern("tensors: 8 merged, 0 replaced, 13 copied", "http://x")
    assert pattern.search("done. tensors: 8 merged, 0 replaced, 13 copied")
    assert not pattern.search("tensors: 7 merged, 0 replaced, 13 copied")
    assert not pattern.search("tensors: 8 merged, 0 replaced, 130 copied")
    timed = line_pattern("wrote merged  (3 weight files, 0.1 MB, 0.02 s, engine numpy)", "")
    assert timed.search("wrote merged (3 weight files, 0.1 MB, 1.75 s, engine numpy)")
    assert not timed.search("wrote merged (3 weight files, 0.2 MB, 1.75 s, engine numpy)")
    url = line_pattern("https://huggingface.co/me/x/commit/5f0e2c...", "http://127.0.0.1:1")
    assert url.search("http://127.0.0.1:1/me/x/commit/8192affcd02da27a8acdc32354f5e34c56e265e3")
    assert not url.search("http://127.0.0.1:1/me/y/commit/8192affcd02da27a8acdc32354f5e34c56e265e3")
    hint = line_pattern("error LT102 rank-mismatch module 'm' (hint: ...)", "")
    assert hint.search("error LT102 rank-mismatch module 'm' (hint: re-export it)")


@pytest.fixture
def clone(tmp_path: Path, hub_server: HubServer, fixtures_dir: Path) -> Path:
    """A folder laid out like a fresh clone, with the README's Hub repos on the test Hub."""
    work = tmp_path / "clone"
    work.mkdir()
    shutil.copytree(fixtures_dir, work / "fixtures")

    def files(folder: Path) -> dict[str, bytes]:
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}  # fmt: skip

    lora = hub_server.add_repo("someone/llama-lora", files=files(fixtures_dir / "peft/llama-lora"))
    lora.branches["v2"] = list(lora.branches["main"])
    hub_server.add_repo("meta-llama/Llama-3.2-1B", files=files(fixtures_dir / "bases/tiny-llama"))
    return work


def test_every_console_example_runs_as_written(
    clone: Path, hub_server: HubServer, tmp_path: Path
) -> None:
    home = tmp_path / "home"  # hf-extension install writes under ~/.local/share
    home.mkdir()
    base_env = {
        **os.environ,
        "HOME": str(home),
        "PYTHONPATH": str(ROOT),  # this checkout's lora_tools, also for the hf-lora extension
        "COLUMNS": "80",  # what rich uses when stdout is not a terminal
    }
    failures = []
    for example in EXAMPLES:
        argv, extra = argv_and_env(example.command)
        proc = subprocess.run(
            argv, cwd=clone, env={**base_env, **extra}, capture_output=True, text=True, timeout=300
        )
        printed = proc.stdout + proc.stderr
        problem = None
        if proc.returncode != expected_code(example):
            problem = f"exit code {proc.returncode}, expected {expected_code(example)}"
        else:
            output, pos = collapse(printed), 0
            for shown in example.shown:
                found = line_pattern(shown, hub_server.url).search(output, pos)
                if found is None:
                    problem = f"shown line not printed (in order): {shown.strip()!r}"
                    break
                pos = found.end()
        if problem:
            tail = "\n  ".join(printed.splitlines()[-15:])
            failures.append(f"README.md:{example.line}: $ {example.command}\n  {problem}\n  {tail}")
    assert not failures, "\n\n".join(failures)
    # the examples did their work: outputs where the README says, repos on the Hub
    assert (clone / "llama-a16/adapter_model.safetensors").is_file()
    assert (clone / "merged/model.safetensors.index.json").is_file()
    assert {"me/llama-lora", "me/llama-merged"} <= set(hub_server.repos)
