"""``merge()`` takes in-memory adapters as it takes paths: same checks, same bytes, an honest
provenance record."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.constants import MERGE_RECORD_NAME
from lora_tools.errors import AdapterError, UnknownScaleError, UnsupportedAdapterError
from lora_tools.formats import load_adapter
from lora_tools.ops.merge import merge
from lora_tools.ops.rescale import rescale_adapter

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
BASE = FIXTURES / "bases" / "tiny-llama-sharded"
LLAMA = FIXTURES / "peft" / "llama-lora"


def _weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _record(folder: Path) -> dict:
    return json.loads((folder / MERGE_RECORD_NAME).read_text())


def test_an_in_memory_adapter_gives_the_cli_bytes(tmp_path: Path) -> None:
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    args = ["merge", str(BASE), str(LLAMA), "-o", str(cli_out), "--weight", "0.5", "--json"]
    result = CliRunner().invoke(cli, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    adapter = load_adapter(LLAMA)
    summary = merge(BASE, [adapter], api_out, weights=[0.5], device="cpu")
    assert _weights(api_out) == _weights(cli_out) and len(_weights(api_out)) == 3
    cli_summary = json.loads(result.stdout)
    assert summary.to_json()["counts"] == cli_summary["counts"]
    (mine,), (theirs,) = summary.to_json()["adapters"], cli_summary["adapters"]
    assert mine["spec"] is None and theirs["spec"] == str(LLAMA)
    assert {k: v for k, v in mine.items() if k != "spec"} == {
        k: v for k, v in theirs.items() if k != "spec"
    }
    record, cli_record = _record(api_out)["adapters"][0], _record(cli_out)["adapters"][0]
    assert record["spec"] is None and record["sha256_of"] == "tensors"
    assert record["weights_file"] == cli_record["weights_file"] == str(adapter.source)
    # the documented digest: each module's down then up, in the adapter's order; no file bytes
    digest = hashlib.sha256()
    for m in adapter.modules.values():
        digest.update(m.down.tobytes())
        digest.update(m.up.tobytes())
    assert record["sha256"] == digest.hexdigest() != cli_record["sha256"]
    assert "sha256_of" not in cli_record
    card = (api_out / "README.md").read_text()
    assert f"- an in-memory adapter read from `{adapter.source}` (weight 0.5, 8 modules)" in card


def test_a_changed_adapter_is_merged_as_it_is_in_memory(tmp_path: Path) -> None:
    """rescale by 0.5 in memory == weight 0.5 from the file (scale is a power of two)."""
    halved = rescale_adapter(load_adapter(LLAMA), factor=0.5).adapter
    merge(BASE, [halved], tmp_path / "a", device="cpu")
    merge(BASE, [LLAMA], tmp_path / "b", weights=[0.5], device="cpu")
    assert _weights(tmp_path / "a") == _weights(tmp_path / "b")
    assert (
        _record(tmp_path / "a")["adapters"][0]["sha256"]
        != (_record(tmp_path / "b")["adapters"][0]["sha256"])
    )


def test_in_memory_adapters_pass_the_cli_checks(tmp_path: Path) -> None:
    adapter = load_adapter(LLAMA)
    key = next(iter(adapter.modules))
    bad = dataclasses.replace(
        adapter,
        modules={**adapter.modules, key: dataclasses.replace(adapter.modules[key], alpha=1e400)},
    )
    with pytest.raises(AdapterError, match="scale"):
        merge(BASE, [bad], tmp_path / "a", device="cpu")
    unknown = dataclasses.replace(
        adapter,
        modules={
            k: dataclasses.replace(m, alpha=None, alpha_unknown="no adapter_config.json")
            for k, m in adapter.modules.items()
        },
    )
    with pytest.raises(UnknownScaleError):
        merge(BASE, [unknown], tmp_path / "b", device="cpu")
    with pytest.raises(AdapterError, match="no LoRA module"):
        merge(BASE, [dataclasses.replace(adapter, modules={})], tmp_path / "c", device="cpu")
    pissa = dataclasses.replace(adapter, config={**adapter.config, "init_lora_weights": "pissa"})
    with pytest.raises(UnsupportedAdapterError, match="pissa"):
        merge(BASE, [pissa], tmp_path / "d", device="cpu")
    assert not any(tmp_path.iterdir())  # nothing written for any refusal


def test_the_file_an_in_memory_adapter_reads_is_an_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its factors are read from its file when merged, so the output may not replace it."""
    import lora_tools.ops.merge as merge_package

    seen: list[list[Path]] = []
    real = merge_package.check_output
    monkeypatch.setattr(
        merge_package,
        "check_output",
        lambda out, inputs, force: seen.append(list(inputs)) or real(out, inputs, force=force),
    )
    adapter = load_adapter(LLAMA)
    merge(BASE, [adapter], tmp_path / "out", device="cpu")
    assert seen == [[BASE, adapter.source]]


def test_weight_errors_name_no_option_and_count_in_good_grammar(tmp_path: Path) -> None:
    import pytest

    from lora_tools.errors import UsageError

    with pytest.raises(UsageError) as bad:
        merge(BASE, [LLAMA], tmp_path / "a", weights=[float("nan")])
    assert "--" not in str(bad.value) and "weight nan" in str(bad.value)
    with pytest.raises(UsageError) as counted:
        merge(BASE, [LLAMA], tmp_path / "b", weights=[1.0, 2.0])
    assert "2 weights for 1 adapter " in str(counted.value) + " "
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("dtype", ["keep", "bf16"])
def test_every_tensor_is_counted_once(tmp_path: Path, dtype: str) -> None:
    summary = merge(BASE, [LLAMA], tmp_path / "m", dtype=dtype)
    counts = summary.to_json()["counts"]
    parts = ("tensors_merged", "tensors_replaced", "tensors_copied", "tensors_cast")
    assert sum(counts[k] for k in parts) == counts["tensors"] == 21
    assert (counts["tensors_cast"] > 0) == (dtype == "bf16")
