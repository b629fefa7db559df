"""One interface across commands (issue 11): the same options spelled and meaning the same,
old spellings still accepted, and output that suits a pipe and a narrow terminal."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lora_tools.cli import cli, prog_name
from lora_tools.cli._common import fit_names
from lora_tools.cli.options import blas_threads
from lora_tools.io.safetensors import SafetensorsFile, save_tensors
from lora_tools.ops.inspect import human_size

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
BASE = str(FIXTURES / "bases" / "tiny-llama")
LORA = str(FIXTURES / "peft" / "llama-lora")
#: Commands that draw a progress bar (theirs, or the Hub's while downloading or uploading).
#: Every command that may read a Hub id shows the Hub's download bar, inspect included.
WITH_A_BAR = ("inspect", "rescale", "resize", "combine", "convert", "validate", "merge", "push")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: What makes rich see a terminal (or size it) where there is none.
TERMINAL_ENV = ("FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS", "LINES")


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def loratool(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in TERMINAL_ENV}
    full.update(PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "lora_tools", *args],
        capture_output=True,
        text=True,
        env=full,
        check=False,
    )


def weight_bytes(folder: Path) -> dict[str, bytes]:
    files = sorted(folder.rglob("*.safetensors")) if folder.is_dir() else [folder]
    return {p.name: p.read_bytes() for p in files}


@pytest.mark.parametrize("command", ["rescale", "resize", "combine", "convert", "merge"])
def test_output_and_base_read_the_same_in_every_help(command: str) -> None:
    text = invoke(command, "--help").output
    assert re.search(r"^\s+-o, --output PATH\s", text, re.M), text
    options = text.split("Options:")[1]
    base = re.search(r"^\s+--base (\S+)\s+(.*?)(?=^\s+-)", options, re.M | re.S)
    if base:  # BASE, and a Hub id is accepted, as validate --base says
        assert base.group(1) == "BASE" and "Hub id" in base.group(2), base.group(0)


def test_json_and_force_read_the_same_in_every_help() -> None:
    def line(command: str, option: str) -> str:
        text = invoke(command, "--help").output.split("Options:")[1]
        found = re.search(rf"^\s+{option}\s+(.*?)(?=^\s+-)", text, re.M | re.S)
        assert found, (command, option)
        return " ".join(found.group(1).split())

    for option, commands in (
        ("--json", ["inspect", "rescale", "resize", "combine", "convert", "merge", "push"]),
        ("--force", ["rescale", "resize", "combine", "convert", "merge"]),
    ):
        helps = {command: line(command, option) for command in commands}
        assert len(set(helps.values())) == 1, helps


@pytest.mark.parametrize("command", WITH_A_BAR)
def test_every_command_with_a_bar_has_quiet(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert re.search(r"^\s+-q, --quiet\s", result.output, re.M), result.output


def test_merge_quiet_hides_the_bar_only(tmp_path: Path) -> None:
    quiet = invoke("merge", BASE, LORA, "-o", str(tmp_path / "q"), "-q", "--device", "cpu")
    loud = invoke("merge", BASE, LORA, "-o", str(tmp_path / "l"), "--device", "cpu")
    assert quiet.exit_code == loud.exit_code == 0
    assert quiet.stdout.startswith("wrote ") and "tensors: 8 merged" in quiet.stdout
    assert quiet.stdout.splitlines()[1:] == loud.stdout.splitlines()[1:]


def test_merge_summary_prints_sizes_in_the_bars_units(tmp_path: Path) -> None:
    out = tmp_path / "m"
    result = invoke("merge", BASE, LORA, "-o", str(out), "--json", "--device", "cpu")
    written = json.loads(result.stdout)["bytes_written"]
    text = invoke("merge", BASE, LORA, "-o", str(tmp_path / "t"), "--device", "cpu").stdout
    assert f"(1 weight file, {human_size(written)}," in text
    assert human_size(1_671_600_000) == "1.7 GB"


@pytest.mark.parametrize(
    ("repeated", "listed"),
    [(["--weight", "0.8", "--weight", "-0.3"], ["--weights", "0.8,-0.3"])],
)
def test_merge_weight_spellings_write_the_same_bytes(
    tmp_path: Path, repeated: list[str], listed: list[str]
) -> None:
    args = ["merge", BASE, LORA, LORA, "--device", "cpu", "-q"]
    assert invoke(*args, "-o", str(tmp_path / "a"), *repeated).exit_code == 0
    assert invoke(*args, "-o", str(tmp_path / "b"), *listed).exit_code == 0
    a, b = weight_bytes(tmp_path / "a"), weight_bytes(tmp_path / "b")
    assert a and a == b
    # and the weights did reach the merge: another list gives other bytes
    assert invoke(*args, "-o", str(tmp_path / "c"), "--weights", "0.8,0.3").exit_code == 0
    assert weight_bytes(tmp_path / "c") != a


def test_combine_weight_spellings_write_the_same_bytes(tmp_path: Path) -> None:
    args = ["combine", LORA, LORA, "-q"]
    r1 = invoke(*args, "-o", str(tmp_path / "a"), "--weights", "1,-0.5")
    r2 = invoke(*args, "-o", str(tmp_path / "b"), "--weight", "1", "--weight", "-0.5")
    assert r1.exit_code == r2.exit_code == 0, r1.output + r2.output
    assert weight_bytes(tmp_path / "a") == weight_bytes(tmp_path / "b")
    assert invoke(*args, "-o", str(tmp_path / "c"), "--weights", "1,0.5").exit_code == 0
    assert weight_bytes(tmp_path / "c") != weight_bytes(tmp_path / "a")


def test_mixing_the_two_weight_spellings_is_a_usage_error(tmp_path: Path) -> None:
    result = loratool("combine", LORA, LORA, "-o", str(tmp_path / "x"), "--weight", "1",
                      "--weights", "1")  # fmt: skip
    assert result.returncode == 2 and "not both" in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("text", ["1,,-1", "1,-1,", ",1,-1", ""])
@pytest.mark.parametrize("command", ["combine", "merge"])
def test_an_empty_weight_is_refused_not_skipped(command: str, text: str, tmp_path: Path) -> None:
    # "1,,-1" for two inputs used to run as "1,-1": a typo gave the next input another weight
    inputs = [BASE, LORA, LORA] if command == "merge" else [LORA, LORA]
    result = invoke(command, *inputs, "-o", str(tmp_path / "x"), "--weights", text)
    assert result.exit_code == 2, result.output
    assert "expected comma-separated numbers" in result.output
    assert not (tmp_path / "x").exists()


def test_merge_weight_count_is_checked_once_with_the_commands_hint(tmp_path: Path) -> None:
    result = loratool("merge", BASE, LORA, LORA, "-o", str(tmp_path / "x"),
                      "--weights", "1,2,3")  # fmt: skip
    assert result.returncode == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1
    assert line.startswith("loratool: error: 3 weights for 2 adapters (hint: give one --weight")
    from lora_tools.errors import UsageError
    from lora_tools.ops.merge import merge

    with pytest.raises(UsageError) as info:
        merge(BASE, [LORA, LORA], tmp_path / "y", weights=[1, 2, 3])
    assert info.value.kind == "weights" and "--" not in str(info.value)


@pytest.mark.parametrize("spelling", ["bfloat16", "BF16", "BFloat16"])
def test_dtype_aliases_write_the_same_bytes(tmp_path: Path, spelling: str) -> None:
    args = ["merge", BASE, LORA, "--device", "cpu", "-q"]
    assert invoke(*args, "-o", str(tmp_path / "ref"), "--dtype", "bf16").exit_code == 0
    assert invoke(*args, "-o", str(tmp_path / "alt"), "--dtype", spelling).exit_code == 0
    ref = weight_bytes(tmp_path / "ref")
    assert ref == weight_bytes(tmp_path / "alt")
    with SafetensorsFile(next((tmp_path / "ref").glob("*.safetensors"))) as f:
        assert {t.dtype for t in f.header.tensors.values()} == {"BF16"}


@pytest.mark.parametrize(("alias", "canonical"), [("half", "fp16"), ("Float32", "fp32")])
def test_other_dtype_aliases(tmp_path: Path, alias: str, canonical: str) -> None:
    args = ["merge", BASE, LORA, "--device", "cpu", "-q"]
    assert invoke(*args, "-o", str(tmp_path / "ref"), "--dtype", canonical).exit_code == 0
    assert invoke(*args, "-o", str(tmp_path / "alt"), "--dtype", alias).exit_code == 0
    assert weight_bytes(tmp_path / "ref") == weight_bytes(tmp_path / "alt")


def test_unknown_dtype_lists_the_spellings(tmp_path: Path) -> None:
    result = loratool("merge", BASE, LORA, "-o", str(tmp_path / "x"), "--dtype", "int8")
    assert result.returncode == 2
    assert "bf16|bfloat16, fp16|float16|half, fp32|float32|float" in result.stderr


def test_validate_json_is_output_format_json() -> None:
    a = invoke("validate", LORA, "--json")
    b = invoke("validate", LORA, "--output-format", "json")
    assert a.exit_code == b.exit_code == 0
    assert json.loads(a.stdout) == json.loads(b.stdout)
    clash = loratool("validate", LORA, "--json", "--output-format", "sarif")
    assert clash.returncode == 2


def test_validate_quiet_still_prints_the_summary() -> None:
    result = invoke("validate", LORA, "-q")
    assert "All checks passed" in result.stdout


def test_push_both_orders_plan_the_same_upload() -> None:
    new = invoke("push", "me/x", LORA, "--dry-run", "--json")
    old = invoke("push", LORA, "me/x", "--dry-run", "--json")
    assert new.exit_code == old.exit_code == 0, new.output + old.output
    doc = json.loads(new.stdout)
    assert doc == json.loads(old.stdout)
    assert "me/x" in new.stdout and len(doc) > 1


@pytest.mark.parametrize("both", [False, True])
def test_push_with_an_order_that_cannot_be_told_names_both_readings(
    tmp_path: Path, both: bool
) -> None:
    first, second = "me/x", "other/y"  # both read as repo ids, neither exists
    cwd = tmp_path
    if both:
        (tmp_path / "me" / "x").mkdir(parents=True)
        second = LORA
    result = subprocess.run(
        [sys.executable, "-m", "lora_tools", "push", first, second, "--dry-run"],
        capture_output=True, text=True, cwd=cwd, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1
    assert f"repo {first!r}, path {second!r}" in line
    assert f"repo {second!r}, path {first!r}" in line


@pytest.mark.parametrize("order", ["new", "old"])
def test_push_of_a_missing_path_says_so(tmp_path: Path, order: str) -> None:
    missing = str(tmp_path / "adapters" / "missing")  # not a repo id: it must be the path
    args = ["me/x", missing] if order == "new" else [missing, "me/x"]
    result = loratool("push", *args, "--dry-run")
    assert result.returncode == 2
    assert f"{missing}: no such file or folder to push" in result.stderr
    assert "cannot tell" not in result.stderr


def test_push_commit_message_and_its_old_spellings() -> None:
    text = invoke("push", "--help").output
    assert "-m, --commit-message, --message M" in text
    assert "old spelling, still accepted" in text
    assert re.search(r"Usage: .*push \[OPTIONS\] REPO_ID PATH", text)


def test_hf_extension_prints_its_own_usage() -> None:
    assert prog_name("/venv/bin/hf-lora") == "hf lora"
    assert prog_name("/venv/bin/loratool") is None
    code = "import sys; sys.argv[0] = '/venv/bin/hf-lora'; from lora_tools.cli import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", code, "merge", "--help"],
        capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: hf lora merge ")


def test_exit_code_130_is_documented() -> None:
    assert "130 interrupted" in invoke("--help").output
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^\| 130 \| interrupted", readme, re.M)


def test_fit_names_keeps_the_distinguishing_end() -> None:
    names = [f"base_model.model.model.layers.{i}.self_attn.q_proj" for i in (3, 12)]
    assert fit_names(names, 80) == names
    assert fit_names(names, 30) == ["layers.3.self_attn.q_proj", "layers.12.self_attn.q_proj"]
    cut = fit_names(names, 20)
    assert all(len(c) == 20 and c[0] == "…" for c in cut)
    assert all(n.endswith(c[1:]) for n, c in zip(names, cut, strict=True))
    assert fit_names(["a.b.c"], 2) == ["…c"]


def test_blas_threads_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    modules = dict(sys.modules)
    modules.pop("numpy", None)
    monkeypatch.setattr(sys, "modules", modules)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    blas_threads(dense=True)
    assert "OPENBLAS_NUM_THREADS" not in os.environ
    monkeypatch.setenv("MKL_NUM_THREADS", "4")
    blas_threads()
    assert os.environ["OPENBLAS_NUM_THREADS"] == os.environ["OMP_NUM_THREADS"] == "1"
    assert os.environ["MKL_NUM_THREADS"] == "4"  # the user's own setting wins


@pytest.mark.parametrize("command", ["rescale", "resize", "combine", "convert", "merge",
                                     "validate", "inspect"])  # fmt: skip
def test_every_command_that_computes_applies_the_blas_policy(command: str) -> None:
    source = (ROOT / "lora_tools" / "cli" / f"{command}.py").read_text()
    assert "blas_threads(" in source
    assert "NUM_THREADS" not in source and "threadpool" not in source


# ----------------------------------------------------------------------------- long names


LONG_STEM = "model.layers.0." + "_".join(["a_very_long_block_name"] * 8) + ".k_proj"


@pytest.fixture(scope="module")
def long_names(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama-lora with one module renamed to a 200-character name."""
    folder = tmp_path_factory.mktemp("long") / "lora"
    shutil.copytree(LORA, folder)
    weights = folder / "adapter_model.safetensors"
    with SafetensorsFile(weights) as f:
        tensors = {n: np.asarray(f.read(n)) for n in f.header.tensors}
    old = "base_model.model.model.layers.0.self_attn.k_proj"
    renamed = {n.replace(old, f"base_model.model.{LONG_STEM}"): t for n, t in tensors.items()}
    save_tensors(weights, renamed)
    assert len(f"base_model.model.{LONG_STEM}") >= 200
    return folder


def test_piped_tables_are_plain(long_names: Path) -> None:
    for args in (["resize", str(long_names), "--rank", "2", "--dry-run"],
                 ["inspect", str(long_names), "--stats"]):  # fmt: skip
        result = loratool(*args)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert not [line for line in lines if line != line.rstrip()], args
        assert not ANSI.search(result.stdout)
        assert any(LONG_STEM in line for line in lines), args  # whole, on one line


def test_a_narrow_terminal_keeps_the_end_of_long_names(long_names: Path) -> None:
    names = [f"base_model.model.{LONG_STEM}"]
    with SafetensorsFile(long_names / "adapter_model.safetensors") as f:
        names += [n.rpartition(".lora_")[0] for n in f.header.tensors]
    for args in (["resize", str(long_names), "--rank", "2", "--dry-run"],
                 ["inspect", str(long_names), "--stats"]):  # fmt: skip
        result = loratool(*args, env={"COLUMNS": "60", "FORCE_COLOR": "1", "TTY_COMPATIBLE": "1"})
        assert result.returncode == 0, result.stderr
        assert ANSI.search(result.stdout)  # rich saw a terminal
        text = ANSI.sub("", result.stdout)
        table = [line for line in text.splitlines() if "│" in line]
        assert table and max(len(line) for line in table) <= 60, text
        elided = re.findall(r"…([\w.]+)", text)
        assert elided, text
        # what is left of each cut name is the END of a real module name, the k_proj included
        assert all(any(n.endswith(e) for n in names) for e in elided), elided
        assert f"base_model.model.{LONG_STEM}".endswith(elided[0]), elided  # the long one
        assert elided[0].endswith("_proj"), elided


def _on_a_terminal(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run loratool with stderr on a pseudo-terminal, so that the progress bar is drawn."""
    import pty

    main, side = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "lora_tools", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=side, cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}, timeout=120,
            check=False,
        )  # fmt: skip
    finally:
        os.close(side)
    seen = b""
    try:
        while chunk := os.read(main, 65536):
            seen += chunk
    except OSError:  # the terminal's other side is closed: everything is read
        pass
    os.close(main)
    return done.returncode, seen.decode(errors="replace")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
@pytest.mark.parametrize(
    "args",
    [
        ["rescale", LORA, "--factor", "0.5", "-o", "out"],
        ["resize", LORA, "--rank", "2", "-o", "out"],
        ["combine", LORA, LORA, "--weights", "1,-0.5", "-o", "out"],
        ["combine", LORA, LORA, "--method", "ties", "--density", "0.5", "--rank", "4", "-o", "out"],
        ["validate", LORA],
        ["merge", BASE, LORA, "-o", "out"],
    ],
    ids=lambda a: "-".join(a[:1] + [x for x in a if x in ("ties",)]),
)
def test_every_progress_bar_runs_on_a_terminal(tmp_path: Path, args: list[str]) -> None:
    code, terminal = _on_a_terminal(args, tmp_path)
    assert code == 0, terminal
    assert "error" not in terminal, terminal
