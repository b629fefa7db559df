"""The steps that made a 1,000,000-tensor header superlinear, tested by behaviour (issue 10, item
24). Times are in docs/benchmarks.md (bench/bench_many_tensors.py), not asserted here."""

from __future__ import annotations

import gc
import json
import shutil
import struct
from pathlib import Path

import pytest

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.formats import load_adapter
from lora_tools.formats.base import add_foreign
from lora_tools.io.safetensors import ArrayTensor, check_header
from lora_tools.ops.validate import validate

FIX = Path(__file__).resolve().parents[2] / "fixtures"


def _header(text: str) -> tuple[bytes, int, int]:
    raw = text.encode()
    return raw, len(raw), 8 + len(raw)


def test_duplicate_keys_are_still_found() -> None:
    entry = '{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    doc = f'{{"t":{entry},"u":{entry},"t":{entry},"v":{entry},"u":{entry},"t":{entry}}}'
    header, problems = check_header(*_header(doc))
    dups = [p.tensor for p in problems if p.kind == "duplicate-key"]
    assert header is not None and header.duplicate_keys == ("t", "u", "t")
    assert dups == ["t", "u", "t"] and list(header.tensors) == ["t", "u", "v"]
    clean, none = check_header(*_header(f'{{"t":{entry},"u":{entry}}}'))
    assert none == [] and list(clean.tensors) == ["t", "u"]


@pytest.mark.parametrize("enabled", [True, False])
def test_gc_state_is_restored(enabled: bool) -> None:
    from lora_tools.io.safetensors import gc_paused

    (gc.enable if enabled else gc.disable)()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert gc.isenabled() is enabled
        with pytest.raises(ValueError), gc_paused():
            raise ValueError
        assert gc.isenabled() is enabled
        check_header(*_header("{not json"))
        assert gc.isenabled() is enabled
    finally:
        gc.enable()


def test_foreign_stems_once_each_in_first_seen_order() -> None:
    adapter = Adapter(format="kohya")
    tensor = ArrayTensor(__import__("numpy").zeros(1, "float32"))
    keys = [f"m{i % 3}.hada_w{1 + (i // 3) % 2}_a" for i in range(12)] + ["m9.lokr_w1"]
    for key in keys:
        assert add_foreign(adapter, key, tensor)
    assert adapter.foreign == {"LoHa": ["m0", "m1", "m2"], "LoKr": ["m9"]}
    assert len(adapter.passthrough) == len(set(keys))
    loha = load_adapter(FIX / "kohya/sd-loha.safetensors")
    assert [len(set(stems)) == len(stems) for stems in loha.foreign.values()] == [True]


def test_kohya_conv_grouping_compares_no_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """`m not in wide` compared every narrow module with every 3x3 one (dataclass __eq__)."""
    calls = []
    original = LoraModule.__eq__

    def counting_eq(self, other):
        calls.append(1)
        return original(self, other)

    monkeypatch.setattr(LoraModule, "__eq__", counting_eq)
    validate([FIX / "kohya/sd-locon.safetensors"], select="LT3")
    assert calls == []


def _with_targets(tmp_path: Path, targets: list[str]) -> Path:
    folder = tmp_path / "lora"
    shutil.copytree(FIX / "peft/llama-lora", folder, dirs_exist_ok=True)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"target_modules": targets}))
    return folder


@pytest.mark.parametrize(
    "targets",
    [
        ["q_proj", "k_proj"],
        ["layers.1.self_attn.v_proj", "o_proj"],
        ["model.layers.0.self_attn.q_proj"],
        ["proj", "self_attn", "attn.k_proj", "s.1.self_attn.o_proj"],
        [f"unrelated_{i}" for i in range(50)] + ["v_proj"],
    ],
)
def test_target_modules_coverage_is_peft_rule(tmp_path: Path, targets: list[str]) -> None:
    modules = load_adapter(FIX / "peft/llama-lora").modules.values()
    path_of = {m.key: m.path for m in modules}
    peft_covered = {
        p for p in path_of.values() if any(p == t or p.endswith("." + t) for t in targets)
    }
    report = validate([_with_targets(tmp_path, targets)], select=["LT306", "LT307"])
    if peft_covered:
        flagged = {path_of[f.module] for f in report.findings}
        assert {f.rule.code for f in report.findings} <= {"LT307"}
        assert flagged == set(path_of.values()) - peft_covered
    else:
        assert [f.rule.code for f in report.findings] == ["LT306"]


def test_a_large_header_parses_with_every_tensor(tmp_path: Path) -> None:
    n = 20_000
    entries = ",".join(
        f'"base_model.model.m{i}.lora_{ab}.weight":{{"dtype":"F32","shape":{shape},'
        '"data_offsets":[0,0]}'
        for i in range(n)
        for ab, shape in (("A", "[1,0]"), ("B", "[0,1]"))
    )
    raw = ("{" + entries + "}").encode()
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    adapter = load_adapter(folder)
    assert len(adapter.modules) == n and adapter.modules["base_model.model.m19999"].rank == 1
