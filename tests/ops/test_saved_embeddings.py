"""PEFT's saved base embedding (``embed_tokens.base_layer.weight``) against the base it is used
on: validate reports a copy that differs (LT591; LT508 / LT517 / LT527 / LT536 under
``--profile``), ``convert --for`` and ``convert --to gguf`` refuse one when they have the base's
weights.

The adapters are saved by real PEFT (tests/ops/profile_adapters.py) on a tiny random Llama; the
same base gives identical copies, a copy of it with three embedding rows moved gives a copy
that differs. PEFT itself is run to pin the fact every rule rests on: it loads the saved copy
over the base's embedding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lora_tools.errors import UnsupportedAdapterError
from lora_tools.formats import load_adapter
from lora_tools.io.checkpoint import open_checkpoint
from lora_tools.io.safetensors import SafetensorsFile
from lora_tools.ops.base_copies import differing_copies
from lora_tools.ops.deploy import convert_for
from lora_tools.ops.validate import validate
from tests.ops import profile_adapters

COPY = "base_model.model.model.embed_tokens.base_layer.weight"
BASE_KEY = "model.embed_tokens.weight"
MOVED_ROWS = [3, 7, 100]
SHIFT = 0.25


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("saved-embeddings")
    profile_adapters.make(root, "embedding")
    profile_adapters.make(root, "clean")
    profile_adapters.make(root / "v136", "embedding", vocab_size=136)
    base = profile_adapters.save_base(root)
    moved = profile_adapters.save_moved_base(base, MOVED_ROWS, SHIFT)
    config_only = root / "base-config-only"
    config_only.mkdir()
    shutil.copy(moved / "config.json", config_only / "config.json")
    return root


def _codes(report) -> list[str]:
    return sorted(f.rule.code for f in report.findings)


# -- the fact: PEFT loads the copy over the base ------------------------------------------------


def test_peft_loads_the_saved_copy_over_the_base(root):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "base-128-moved")
    moved = model.model.embed_tokens.weight.detach().clone()
    loaded = PeftModel.from_pretrained(model, root / "embedding")
    served = loaded.base_model.model.model.embed_tokens.base_layer.weight
    saved = load_file(root / "embedding" / "adapter_model.safetensors")[COPY]
    assert torch.equal(served, saved)
    assert not torch.equal(served, moved)


# -- the comparison ------------------------------------------------------------------------------


def test_same_base_no_difference(root):
    with open_checkpoint(root / "base-128") as ckpt:
        assert differing_copies(load_adapter(root / "embedding"), ckpt) == []


def test_moved_rows_counted_with_the_largest_difference(root):
    with open_checkpoint(root / "base-128-moved") as ckpt:
        (d,) = differing_copies(load_adapter(root / "embedding"), ckpt)
    assert (d.key, d.base_key) == (COPY, BASE_KEY)
    assert d.base_file == root / "base-128-moved" / "model.safetensors"
    assert (d.rows, d.total_rows, d.first_row) == (3, 128, 3)
    assert d.max_abs_diff == pytest.approx(SHIFT, rel=1e-6)
    assert d.describe() == "3 of 128 rows differ, max |diff| 0.25, first at row 3"


def test_read_block_by_block_never_whole(root, monkeypatch):
    """Two rows of 64 float32 values per block: neither tensor is read whole."""
    reads: list[tuple[str, slice | None]] = []
    read = SafetensorsFile.read

    def spy(self, name, rows=None):
        reads.append((name, rows))
        return read(self, name, rows)

    monkeypatch.setattr(SafetensorsFile, "read", spy)
    with open_checkpoint(root / "base-128-moved") as ckpt:
        (d,) = differing_copies(load_adapter(root / "embedding"), ckpt, chunk_bytes=2 * 64 * 4)
    assert d.rows == 3
    for name in (COPY, BASE_KEY):
        blocks = [rows for n, rows in reads if n == name]
        assert len(blocks) == 64, name
        assert all(rows is not None and rows.stop - rows.start == 2 for rows in blocks), name


def test_bf16_copy_of_a_float32_base_is_the_same_weight(root, tmp_path):
    """A copy saved in bf16 equals the float32 base rounded to bf16: no difference. The
    float32 base of a bf16 copy that is not its rounding differs."""
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    adapter = tmp_path / "bf16"
    shutil.copytree(root / "embedding", adapter)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors[COPY] = tensors[COPY].astype(ml_dtypes.bfloat16)
    save_file(tensors, weights, metadata={"format": "pt"})
    with open_checkpoint(root / "base-128") as ckpt:
        assert differing_copies(load_adapter(adapter), ckpt) == []
    with open_checkpoint(root / "base-128-moved") as ckpt:
        (d,) = differing_copies(load_adapter(adapter), ckpt)
    assert (d.rows, d.first_row) == (3, 3)


@pytest.mark.parametrize("base", ["tiny-llama", "tiny-llama-sharded", "tiny-llama-bf16"])
def test_fixture_adapter_on_its_base_in_every_layout(base):
    """fixtures/peft/llama-embedding was saved on tiny-llama: its copy is that base's embedding,
    sharded as well, and in bf16 it is the bf16 base's (a float32 copy compared at bf16)."""
    fixtures = Path(__file__).resolve().parents[2] / "fixtures"
    adapter = load_adapter(fixtures / "peft" / "llama-embedding")
    with open_checkpoint(fixtures / "bases" / base) as ckpt:
        assert differing_copies(adapter, ckpt) == []


def test_float32_copy_against_a_moved_bf16_base(root, tmp_path):
    import ml_dtypes

    def bf16_base(source: Path, name: str) -> Path:
        from safetensors.numpy import load_file, save_file

        out = tmp_path / name
        shutil.copytree(source, out)
        path = out / "model.safetensors"
        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})
        return out

    adapter = load_adapter(root / "embedding")
    with open_checkpoint(bf16_base(root / "base-128", "same")) as ckpt:
        assert differing_copies(adapter, ckpt) == []
    with open_checkpoint(bf16_base(root / "base-128-moved", "moved")) as ckpt:
        (d,) = differing_copies(adapter, ckpt)
    assert (d.rows, d.first_row) == (3, 3)
    assert d.max_abs_diff == pytest.approx(SHIFT, abs=2e-2)  # at bf16 precision


# -- validate ------------------------------------------------------------------------------------


def test_validate_same_base_no_finding(root):
    report = validate([root / "embedding"], base=root / "base-128")
    assert _codes(report) == []


def test_validate_moved_base_reports_lt591_info(root):
    report = validate([root / "embedding"], base=root / "base-128-moved")
    (finding,) = report.findings
    assert (finding.rule.code, finding.severity) == ("LT591", "info")
    assert finding.module == COPY
    assert BASE_KEY in finding.message and "3 of 128 rows differ" in finding.message
    assert "max |diff| 0.25" in finding.message
    assert not report.failed("warning")


def test_validate_without_saved_layer_reads_nothing_new(root):
    report = validate([root / "clean"], base=root / "base-128-moved")
    assert _codes(report) == []


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        ("vllm", ["LT508"]),
        ("sglang", ["LT517"]),
        # TGI also leaves the embedding LoRA itself out (LT522)
        ("tgi", ["LT522", "LT527"]),
        ("llamacpp", ["LT536"]),
        # before 0.18 vLLM refuses the saved embedding outright: LT504, not LT508
        ("vllm:0.16", ["LT504"]),
        ("peft", []),
    ],
)
def test_profiles_report_the_copy_they_skip_as_an_error(root, profile, expected):
    moved = validate([root / "embedding"], base=root / "base-128-moved", profiles=profile)
    assert [c for c in _codes(moved) if c.startswith("LT5")] == expected
    assert "LT591" not in _codes(moved)  # with --profile each profile reports its own
    same = validate([root / "embedding"], base=root / "base-128", profiles=profile)
    assert [c for c in _codes(same) if c.startswith("LT5")] == [
        c for c in expected if c not in ("LT508", "LT517", "LT527", "LT536")
    ]
    for f in moved.findings:
        if f.rule.code in ("LT508", "LT517", "LT527", "LT536"):
            assert f.severity == "error" and f.module == COPY
            assert "3 of 128 rows differ" in f.message


def test_ignored_rule_reads_no_copy(root, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("compared although no rule reports it")

    monkeypatch.setattr("lora_tools.ops.validate.checks.consumers.differing_copies", fail)
    report = validate([root / "embedding"], base=root / "base-128-moved", ignore="LT591")
    assert _codes(report) == []
    # no server profile: nothing skips the copy
    report = validate([root / "embedding"], base=root / "base-128-moved", profiles="peft")
    assert _codes(report) == []


def test_resized_vocabulary_is_a_shape_finding_not_a_value_one(root):
    """A copy of another shape (vocab 136 on a 128-token base) is not compared: its embedding
    LoRA does not fit the base (LT403), and vLLM refuses its vocabulary (LT507)."""
    report = validate([root / "v136" / "embedding"], base=root / "base-128")
    assert _codes(report) == ["LT403"]
    report = validate([root / "v136" / "embedding"], base=root / "base-128", profiles="vllm")
    assert _codes(report) == ["LT403", "LT507"]
    with open_checkpoint(root / "base-128") as ckpt:
        assert differing_copies(load_adapter(root / "v136" / "embedding"), ckpt) == []


# -- convert --for -------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["vllm", "sglang", "llamacpp"])
def test_convert_for_refuses_a_copy_that_differs(root, target):
    adapter = load_adapter(root / "embedding")
    with pytest.raises(UnsupportedAdapterError) as info:
        convert_for(adapter, target, base=root / "base-128-moved")
    exc = info.value
    assert exc.kind == "saved-layer-differs"
    assert COPY in exc.message and BASE_KEY in exc.message
    assert "3 of 128 rows differ" in exc.message and "\n" not in exc.message
    assert "loratool merge" in exc.hint


@pytest.mark.parametrize(
    ("target", "base"),
    [
        ("vllm", "base-128"),
        ("sglang", "base-128"),
        ("llamacpp", "base-128"),
        # without a base nothing is compared (SGLang needs one here: q_proj without v_proj)
        ("vllm", None),
        ("llamacpp", None),
    ],
)
def test_convert_for_same_base_or_no_base_passes(root, target, base):
    adapter = load_adapter(root / "embedding")
    result = convert_for(adapter, target, base=root / base if base else None)
    assert result.adapter.passthrough == {}  # the copy is left out, as the engines skip it
    assert any("copies of base embedding weights left out" in n for n in result.notes)


# -- convert --to gguf ---------------------------------------------------------------------------


def test_gguf_refuses_a_copy_that_differs_when_the_folder_has_weights(root, tmp_path):
    pytest.importorskip("gguf")
    from lora_tools.ops.to_gguf import convert_to_gguf

    adapter = load_adapter(root / "embedding")
    out = tmp_path / "moved.gguf"
    for base in (root / "base-128-moved", root / "base-128-moved" / "config.json"):
        with pytest.raises(UnsupportedAdapterError) as info:
            convert_to_gguf(adapter, out, base=base)
        assert info.value.kind == "saved-layer-differs"
        assert COPY in info.value.message and "3 of 128 rows differ" in info.value.message
    assert not out.exists()


def test_gguf_same_base_or_config_only_converts(root, tmp_path):
    pytest.importorskip("gguf")
    from lora_tools.ops.to_gguf import convert_to_gguf

    adapter = load_adapter(root / "embedding")
    same = convert_to_gguf(adapter, tmp_path / "same.gguf", base=root / "base-128")
    # a config.json alone: the weights are not there to compare, the file is written as before
    alone = convert_to_gguf(adapter, tmp_path / "alone.gguf", base=root / "base-config-only")
    assert same.plan.skipped == alone.plan.skipped == [COPY]
    assert (tmp_path / "same.gguf").read_bytes() == (tmp_path / "alone.gguf").read_bytes()


def test_inputs_untouched(root, tmp_path):
    before = {
        p: p.read_bytes()
        for folder in ("embedding", "base-128-moved")
        for p in (root / folder).iterdir()
    }
    with pytest.raises(UnsupportedAdapterError):
        convert_for(load_adapter(root / "embedding"), "vllm", base=root / "base-128-moved")
    validate([root / "embedding"], base=root / "base-128-moved")
    assert {p: p.read_bytes() for p in before} == before
    assert json.loads((root / "embedding" / "adapter_config.json").read_text())["r"] == 8
