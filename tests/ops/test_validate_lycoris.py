"""validate on files LyCORIS wrote: their ``sshs_model_hash`` convention (LT205 / LT206) and
their modules against ``--base`` (LT4xx).

tests/data/lycoris/*.safetensors were written by lycoris-lora 4.1.3 itself
(tests/data/lycoris/make_lycoris_files.py) for the UNet of fixtures/bases/tiny-sd;
state_dict_order.json holds the order LyCORIS hashed each file's tensors in.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file as read_tensors

from lora_tools.formats import load_adapter
from lora_tools.io.checkpoint import open_checkpoint
from lora_tools.io.safetensors import (
    TensorSpec,
    encode_header,
    read_header,
    reference_order,
    save_tensors,
)
from lora_tools.ops.push import default_validator
from lora_tools.ops.validate import validate

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "lycoris"
BASES = ROOT / "fixtures" / "bases"
LOHA_FIXTURE = ROOT / "fixtures" / "kohya" / "sd-loha.safetensors"
ORDERS = json.loads((DATA / "state_dict_order.json").read_text())
LYCORIS_FILES = sorted(ORDERS)


def codes(report) -> list[str]:
    return sorted(f.rule.code for f in report.findings)


def lycoris_hash(path: Path, order: list[str]) -> str:
    """LyCORIS' precalculate_safetensors_hashes (lycoris/utils/__init__.py): "0x" + sha256 of
    each tensor's bytes, as ``safetensors.torch.save({"tensor": t})`` lays them out, in
    state-dict order."""
    header = read_header(path)
    raw = path.read_bytes()
    digest = hashlib.sha256()
    for name in order:
        info = header.tensors[name]
        digest.update(raw[header.data_start + info.begin : header.data_start + info.end])
    return "0x" + digest.hexdigest()


def write_in_order(path: Path, tensors: dict[str, np.ndarray], order: list[str], metadata) -> None:
    """A valid safetensors file whose data buffer holds the tensors in ``order``."""
    specs = [
        TensorSpec(n, {"float32": "F32"}[str(tensors[n].dtype)], tensors[n].shape) for n in order
    ]
    head = encode_header(specs, metadata)
    with open(path, "wb") as fh:
        fh.write(head)
        for name in order:
            fh.write(np.ascontiguousarray(tensors[name]).astype("<f4").tobytes())


def kohya_tensors(count: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for i in range(count):
        stem = f"lora_unet_block_{i}_attn_to_q"
        out[f"{stem}.lora_down.weight"] = rng.normal(size=(2, 8)).astype(np.float32)
        out[f"{stem}.lora_up.weight"] = rng.normal(size=(8, 2)).astype(np.float32)
        out[f"{stem}.alpha"] = np.asarray(1.0, np.float32)
    return out


# ---------------------------------------------------------------------- LT205 / LT206 hashes


@pytest.mark.parametrize("name", LYCORIS_FILES)
def test_lycoris_files_are_not_called_corrupt(name):
    path = DATA / f"{name}.safetensors"
    header = read_header(path)
    stored = header.metadata["sshs_model_hash"]
    # The convention, checked on LyCORIS' own output: tensors in state-dict order, not the
    # data buffer (the file's order) that sd-scripts hashes.
    assert stored == lycoris_hash(path, ORDERS[name])
    data = path.read_bytes()[header.data_start :]
    assert stored[2:] != hashlib.sha256(data).hexdigest()

    report = validate([path])
    assert "LT205" not in codes(report)
    assert "LT206" in codes(report)
    assert not report.failed("warning")
    assert default_validator(path) == []  # push does not refuse it


def test_lycoris_convention_is_verified_when_the_order_is_the_files(tmp_path):
    tensors = kohya_tensors()
    order = [
        s.name for s in reference_order(TensorSpec(n, "F32", t.shape) for n, t in tensors.items())
    ]
    good = tmp_path / "good.safetensors"
    save_tensors(good, tensors, {"sshs_model_hash": "0x" + "0" * 64})
    digest = lycoris_hash(good, order)
    save_tensors(good, tensors, {"sshs_model_hash": digest})
    assert codes(validate([good])) == []  # verified: no finding at all

    changed = dict(tensors)
    changed["lora_unet_block_0_attn_to_q.lora_up.weight"] = changed[
        "lora_unet_block_0_attn_to_q.lora_up.weight"
    ] * np.float32(2)
    bad = tmp_path / "bad.safetensors"
    save_tensors(bad, changed, {"sshs_model_hash": digest})
    # The order is unknown in general, so a LyCORIS hash that does not match is unverified,
    # never a mismatch.
    assert codes(validate([bad])) == ["LT206"]


def test_sd_scripts_hash_is_checked_in_the_reference_order(tmp_path):
    tensors = kohya_tensors()
    specs = reference_order(TensorSpec(n, "F32", t.shape) for n, t in tensors.items())
    digest = hashlib.sha256()
    for spec in specs:
        digest.update(tensors[spec.name].astype("<f4").tobytes())
    sd_scripts_hash = digest.hexdigest()
    # Same tensors, laid out in another order: the data buffer differs, the tensors do not.
    shuffled = [s.name for s in reversed(specs)]
    other_order = tmp_path / "reordered.safetensors"
    write_in_order(other_order, tensors, shuffled, {"sshs_model_hash": sd_scripts_hash})
    assert read_tensors(other_order).keys() == tensors.keys()
    header = read_header(other_order)
    buffer_hash = hashlib.sha256(other_order.read_bytes()[header.data_start :]).hexdigest()
    assert buffer_hash != sd_scripts_hash
    assert codes(validate([other_order])) == []

    tensors["lora_unet_block_1_attn_to_q.lora_down.weight"][0, 0] += 1
    changed = tmp_path / "changed.safetensors"
    write_in_order(changed, tensors, shuffled, {"sshs_model_hash": sd_scripts_hash})
    assert codes(validate([changed])) == ["LT205"]


@pytest.mark.parametrize("value", ["deadbeef", "sha256:" + "a" * 64, "0x1234"])
def test_unknown_hash_convention_is_an_info(tmp_path, value):
    path = tmp_path / "k.safetensors"
    save_tensors(path, kohya_tensors(), {"sshs_model_hash": value})
    report = validate([path])
    assert codes(report) == ["LT206"]
    assert not report.failed("warning")


def test_bad_hash_fixture_still_fails():
    assert codes(validate([ROOT / "fixtures" / "broken" / "kohya-bad-hash.safetensors"])) == [
        "LT205"
    ]


# ------------------------------------------------------------------------- LT4xx, every type


def test_sd1_loha_against_a_llama_base_fails():
    report = validate([LOHA_FIXTURE], base=BASES / "tiny-llama", ignore="LT2")
    assert codes(report).count("LT401") == 3
    assert "LT404" in codes(report)
    assert report.failed()


def test_sd1_loha_against_its_base_passes():
    report = validate([LOHA_FIXTURE], base=BASES / "tiny-sd", ignore="LT2")
    assert codes(report) == []


@pytest.mark.parametrize("name", LYCORIS_FILES)
def test_lycoris_written_files_resolve_and_fit_their_base(name):
    from lora_tools.resolve import resolve, resolve_foreign

    path = DATA / f"{name}.safetensors"
    adapter = load_adapter(path)
    with open_checkpoint(BASES / "tiny-sd") as ckpt:
        computed = resolve(adapter, ckpt)  # the types loratool computes, as merge places them
        res = resolve_foreign(adapter, ckpt)  # the others, by name and outer shape
        # Every module's outer shape was derived and checked, not skipped.
        assert sorted(res.shape_checked) == sorted(res.kinds) and res.total == len(res.kinds)
    total = computed.total + res.total
    assert total == sum(len(stems) for stems in adapter.foreign.values())
    assert len(computed.deltas) == len(adapter.deltas) == computed.total
    for problems in (res, computed):
        assert not (problems.unmatched or problems.ambiguous or problems.shape_errors)
    assert not [c for c in codes(validate([path], base=BASES / "tiny-sd")) if c.startswith("LT4")]
    wrong = codes(validate([path], base=BASES / "tiny-llama", ignore="LT2"))
    assert "LT404" in wrong and wrong.count("LT401") == total


def _with_shape_change(tmp_path: Path, source: Path, key: str, rows: int) -> Path:
    tensors = read_tensors(source)
    old = tensors[key]
    tensors[key] = np.zeros((old.shape[0] + rows, *old.shape[1:]), old.dtype)
    path = tmp_path / source.name
    save_tensors(path, tensors, read_header(source).metadata)
    return path


def test_loha_update_that_does_not_fit_the_base_is_lt403(tmp_path):
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "loha.safetensors"
    tensors = read_tensors(LOHA_FIXTURE)
    for part in ("hada_w1_a", "hada_w2_a"):  # out dim 8 -> 16
        tensors[f"{stem}.{part}"] = np.concatenate([tensors[f"{stem}.{part}"]] * 2)
    save_tensors(path, tensors)
    report = validate([path], base=BASES / "tiny-sd", ignore="LT2")
    assert codes(report) == ["LT403"]
    finding = next(f for f in report.findings if f.rule.code == "LT403")
    assert finding.module == stem and "LoHa" in finding.message


def test_lokr_update_that_does_not_fit_the_base_is_lt403(tmp_path):
    header = read_header(DATA / "lokr.safetensors")
    key = next(k for k in header.tensors if k.endswith(".lokr_w1"))
    path = _with_shape_change(tmp_path, DATA / "lokr.safetensors", key, rows=1)
    report = validate([path], base=BASES / "tiny-sd", ignore="LT2")
    assert [f.module for f in report.findings if f.rule.code == "LT403"] == [key.rsplit(".", 1)[0]]
