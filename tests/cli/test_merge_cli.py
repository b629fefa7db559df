"""``loratool merge`` on the command line: exit codes, JSON summary, error lines."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.errors import OutputError, UsageError

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
BASE = str(FIXTURES / "bases" / "tiny-llama-sharded")
ADAPTER = str(FIXTURES / "peft" / "llama-lora")


def _run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False, standalone_mode=False)


def test_json_summary(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["merge", BASE, ADAPTER, "-o", str(out), "--json", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["command"] == "merge"
    assert doc["outputs"] == [{"path": str(out), "kind": "folder"}]
    assert [i["role"] for i in doc["inputs"]] == ["base", "adapter"]
    assert doc["adapters"][0]["spec"] == ADAPTER
    assert doc["adapters"][0]["counts"]["modules_merged"] == 8
    assert doc["counts"] == {
        "adapters": 1,
        "files": 3,
        "tensors": 21,
        "tensors_merged": 8,
        "tensors_replaced": 0,
        "tensors_copied": 13,
        "tensors_cast": 0,
        "tensors_unmatched": 0,
    }
    assert doc["bytes_written"] == sum(p.stat().st_size for p in out.glob("*.safetensors")) - sum(
        8 + int.from_bytes(p.read_bytes()[:8], "little") for p in out.glob("*.safetensors")
    )
    assert doc["engine"] == "numpy"
    assert doc["fsync"] is False


def test_summary_counts_weight_files_in_words(tmp_path: Path) -> None:
    one = CliRunner().invoke(
        cli, ["merge", str(FIXTURES / "bases/tiny-llama"), ADAPTER, "-o", str(tmp_path / "a")]
    )
    assert one.exit_code == 0 and "(1 weight file," in one.output, one.output
    three = CliRunner().invoke(cli, ["merge", BASE, ADAPTER, "-o", str(tmp_path / "b")])
    assert three.exit_code == 0 and "(3 weight files," in three.output, three.output


def test_fsync_flag_reaches_the_merge(tmp_path: Path, synced: list[Path]) -> None:
    out = tmp_path / "out"
    args = ["merge", BASE, ADAPTER, "-o", str(out), "--json", "--device", "cpu", "--fsync"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["fsync"] is True
    assert len(synced) >= len(list(out.rglob("*")))  # every file and folder, and more


def test_errors_and_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    (tmp_path / "exists").mkdir()
    r = runner.invoke(cli, ["merge", BASE, ADAPTER, "-o", str(tmp_path / "exists"), "--quiet"])
    # the group raises; lora_tools.cli.main maps LoraToolError to exit code 3 (tested below)
    assert isinstance(r.exception, OutputError) and r.exception.exit_code == 3
    r = runner.invoke(
        cli,
        [
            "merge",
            BASE,
            ADAPTER,
            ADAPTER,
            "--weight",
            "1",
            "--weight",
            "2",
            "--weight",
            "3",
            "-o",
            str(tmp_path / "w"),
        ],
    )
    assert isinstance(r.exception, UsageError) and r.exception.exit_code == 2
    r = runner.invoke(cli, ["merge", BASE, "-o", str(tmp_path / "x")])
    assert r.exit_code == 2  # no adapter
    assert not (tmp_path / "w").exists() and not (tmp_path / "x").exists()


def test_main_maps_errors_to_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_tools",
            "merge",
            BASE,
            str(FIXTURES / "peft" / "gpt2-lora"),
            "-o",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "0 of 8 modules match this base" in lines[0]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_tools",
            "merge",
            BASE,
            ADAPTER,
            "-o",
            str(tmp_path / "o"),
            "--allow-unmatched",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and (tmp_path / "o" / "model.safetensors.index.json").is_file()


def test_cli_cpu_and_auto_never_import_torch(tmp_path: Path) -> None:
    """``--device cpu`` (and ``auto`` without a GPU) runs without torch: 220 MB and 2 s saved."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from lora_tools.cli import main\n"
        "sys.argv = ['loratool', 'merge', sys.argv[1], sys.argv[2], '-o', sys.argv[3], "
        "'--device', sys.argv[4], '--quiet']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code, 'torch' in sys.modules)\n"
    )
    for device in ("cpu", "auto"):
        env = dict(__import__("os").environ, CUDA_VISIBLE_DEVICES="")  # auto: no GPU to find
        out = tmp_path / device
        proc = subprocess.run(
            [sys.executable, "-c", script, BASE, ADAPTER, str(out), device],
            capture_output=True,
            text=True,
            env=env,
        )
        # --quiet hides the progress bar only: the summary comes first
        assert proc.stdout.startswith("wrote "), proc.stderr
        assert proc.stdout.split()[-3:] == ["exit", "0", "False"], proc.stderr
        assert (out / "model.safetensors.index.json").is_file()
        assert json.loads((out / "loratool_merge.json").read_text())["engine"] == "numpy"


def test_unknown_device_is_a_usage_error(tmp_path: Path) -> None:
    r = CliRunner().invoke(
        cli, ["merge", BASE, ADAPTER, "-o", str(tmp_path / "o"), "--device", "numpy"]
    )
    assert isinstance(r.exception, UsageError) and r.exception.exit_code == 2
    assert not (tmp_path / "o").exists()


def test_exact_merges_with_torch_and_refuses_other_devices(tmp_path: Path) -> None:
    """--exact is the torch-cpu engine (bit-identical to PEFT: tests/ops/test_merge.py)."""
    runner = CliRunner()
    args = ["merge", str(FIXTURES / "bases/tiny-llama"), str(FIXTURES / "peft/llama-all-linear")]
    exact = runner.invoke(cli, [*args, "-o", str(tmp_path / "exact"), "--exact", "--json"])
    assert exact.exit_code == 0, exact.output
    assert json.loads(exact.stdout)["engine"] == "torch-cpu"
    refused = runner.invoke(
        cli, [*args, "-o", str(tmp_path / "gpu"), "--exact", "--device", "cuda"]
    )
    assert isinstance(refused.exception, UsageError)
    assert not (tmp_path / "gpu").exists()


def test_an_os_error_is_one_line_not_a_bug_report(tmp_path: Path, monkeypatch, capsys) -> None:
    import errno
    import sys

    import pytest

    from lora_tools.cli import main

    def refuse(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", str(tmp_path / "disk"))

    monkeypatch.setattr("lora_tools.ops.merge.merge", refuse)
    monkeypatch.setattr(sys, "argv", ["loratool", "merge", BASE, ADAPTER, "-o", "x"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"loratool: error: {tmp_path / 'disk'}: Input/output error "
        "(hint: rerun with --debug for the traceback)"
    ]
