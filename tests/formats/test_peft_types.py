"""PEFT's non-LoRA adapter types, as PEFT's own save_pretrained writes them: detected, named,
inspected module by module, validated without false findings, refused by every math command."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.errors import UnsupportedAdapterError
from lora_tools.formats import load_adapter
from lora_tools.ops.convert import convert_adapter
from lora_tools.ops.inspect import inspect_adapter
from lora_tools.ops.merge import merge
from lora_tools.ops.resize import resize_adapter
from lora_tools.ops.validate import validate

BASE = Path(__file__).resolve().parents[1] / "data" / "mlx" / "base"
TARGETS = ["q_proj", "v_proj"]

#: peft_type -> (name loratool reports, structure of a q_proj module of the tiny Llama)
EXPECTED = {
    "LOHA": ("LoHa", "rank 4: (w1_a w1_b) * (w2_a w2_b) -> 16 x 16"),
    "LOKR": ("LoKr", "kron(4 x 4, 4 x 4) -> 16 x 16"),
    "IA3": ("IA3", "vector of 16 scaling the outputs"),
    "OFT": ("OFT", "4 blocks of 4 x 4 (6 parameters each, skew-symmetric)"),
    "BOFT": ("BOFT", "1 butterfly factor(s) of 4 blocks 4 x 4, scale [16]"),
    "VERA": ("VeRA", "rank 4: lambda_b [16] x shared vera_B, lambda_d x shared vera_A"),
    "FOURIERFT": ("FourierFT", "10 spectral coefficients"),
}


def _config(peft_type: str):
    import peft

    return {
        "LOHA": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=TARGETS),
        "LOKR": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=TARGETS),
        "IA3": lambda: peft.IA3Config(
            target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
        "OFT": lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=TARGETS),
        "BOFT": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=TARGETS),
        "VERA": lambda: peft.VeraConfig(r=4, target_modules=TARGETS),
        "FOURIERFT": lambda: peft.FourierFTConfig(n_frequency=10, target_modules=TARGETS),
    }[peft_type]()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("peft-types")
    out = {}
    for peft_type in EXPECTED:
        torch.manual_seed(0)
        model = LlamaForCausalLM.from_pretrained(BASE, torch_dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.get_peft_model(model, _config(peft_type)).save_pretrained(root / peft_type)
        out[peft_type] = root / peft_type
    return out


#: The types loratool computes from PEFT's config (lora_tools.deltas.peft_types); the rest are
#: detected and refused. PEFT's default init makes LoHa's and LoKr's update zero (LT202).
COMPUTED = {"LOHA", "LOKR", "IA3", "OFT", "BOFT", "VERA", "FOURIERFT"}
ZERO_AT_INIT = {"LOHA", "LOKR"}


@pytest.mark.parametrize("peft_type", list(EXPECTED))
def test_detected_named_and_inspected(folders: dict[str, Path], peft_type: str) -> None:
    kind, structure = EXPECTED[peft_type]
    adapter = load_adapter(folders[peft_type])
    assert adapter.format == "peft" and not adapter.modules
    assert list(adapter.foreign) == [kind] and kind in adapter.variants
    report = inspect_adapter(folders[peft_type])
    assert report.config["peft_type"] == peft_type
    computed = peft_type in COMPUTED
    table = report.to_json()["delta_modules" if computed else "foreign_modules"]
    rows = {row["module"]: row for row in table}
    q = rows["base_model.model.model.layers.0.self_attn.q_proj"]
    assert q["type"] == kind and q["structure"].startswith(structure)
    assert q["tensors"]
    count = 6 if peft_type == "IA3" else 4
    assert len(rows) == count
    assert report.unsupported == ({} if computed else {kind: count})
    assert len(adapter.deltas) == (count if computed else 0)
    if peft_type == "VERA":
        assert sorted(report.shared_tensors) == ["base_model.vera_A", "base_model.vera_B"]
    if peft_type == "IA3":
        down = rows["base_model.model.model.layers.1.mlp.down_proj"]
        assert down["structure"] == "vector of 32 scaling the inputs (feed-forward)"
    text = CliRunner().invoke(cli, ["inspect", str(folders[peft_type])])
    assert text.exit_code == 0, text.output
    assert structure in text.output and peft_type in text.output
    doc = json.loads(CliRunner().invoke(cli, ["inspect", str(folders[peft_type]), "--json"]).output)
    assert doc["delta_modules" if computed else "foreign_modules"][0]["type"] == kind


@pytest.mark.parametrize("peft_type", list(EXPECTED))
def test_validate_names_the_type_and_nothing_else(folders: dict[str, Path], peft_type: str) -> None:
    kind, _ = EXPECTED[peft_type]
    (report,) = validate([folders[peft_type]]).files
    codes = [f.rule.code for f in report.findings]
    if peft_type not in COMPUTED:
        assert codes == ["LT110"] and kind in report.findings[0].message
    else:
        assert codes == (["LT202"] if peft_type in ZERO_AT_INIT else [])


@pytest.mark.parametrize("peft_type", list(EXPECTED))
def test_math_commands_refuse_naming_the_type(
    folders: dict[str, Path], peft_type: str, tmp_path: Path
) -> None:
    kind, _ = EXPECTED[peft_type]
    adapter = load_adapter(folders[peft_type])
    merging = lambda: merge(BASE, [str(folders[peft_type])], tmp_path / "merged")  # noqa: E731
    if peft_type in COMPUTED:
        # merged as PEFT merges them (tests/deltas/test_peft_types.py checks the bits)
        merging()
        assert (tmp_path / "merged").exists()
    calls = [
        *([] if peft_type in COMPUTED else [merging]),
        lambda: resize_adapter(adapter, rank=2),
        lambda: convert_adapter(adapter, "kohya"),
        lambda: convert_adapter(adapter, "mlx"),
    ]
    for call in calls:
        with pytest.raises(UnsupportedAdapterError, match=f"unsupported adapter type {kind} "):
            call()
    assert (tmp_path / "merged").exists() == (peft_type in COMPUTED)


def test_a_peft_type_with_unknown_tensors_is_named_from_its_config(tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp_path / "future"
    folder.mkdir()
    save_file(
        {"base_model.model.model.layers.0.self_attn.q_proj.zeta_w": np.zeros(4, np.float32)},
        folder / "adapter_model.safetensors",
    )
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "ZETA"}))
    with pytest.raises(UnsupportedAdapterError, match="unsupported adapter type ZETA"):
        load_adapter(folder)
