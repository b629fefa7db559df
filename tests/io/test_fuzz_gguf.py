"""Property-based fuzzing of the GGUF path: mutated LoRA GGUFs must end in findings (validate)
or a LoraToolError (inspect), never another exception, a hang (hypothesis deadline) or an
unbounded allocation (tracemalloc peak). ``LORATOOL_FUZZ_EXAMPLES`` raises the number of inputs,
as for tests/io/test_fuzz_validate.py.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_tools.errors import LoraToolError
from lora_tools.ops.inspect import inspect_adapter
from lora_tools.ops.validate import validate
from tests.io.fuzzing import FUZZ_SETTINGS, bounded

gguf = pytest.importorskip("gguf")


def _seed(qtype, tokens: bool) -> bytes:
    """A small LoRA GGUF as convert --to gguf writes one, in memory."""
    import tempfile

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seed.gguf"
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_string("general.name", "seed")
        writer.add_float32("adapter.lora.alpha", 8.0)
        if tokens:
            writer.add_key_value(
                "adapter.alora.invocation_tokens",
                [1, 2, 3],
                gguf.GGUFValueType.ARRAY,
                sub_type=gguf.GGUFValueType.UINT32,
            )
        for i in range(2):
            a = rng.standard_normal((4, 64)).astype(np.float32)
            b = rng.standard_normal((32, 4)).astype(np.float32)
            writer.add_tensor(
                f"blk.{i}.attn_q.weight.lora_a", gguf.quants.quantize(a, qtype), raw_dtype=qtype
            )
            writer.add_tensor(f"blk.{i}.attn_q.weight.lora_b", b)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


Q = gguf.GGMLQuantizationType
SEEDS = [_seed(Q.F32, False), _seed(Q.Q8_0, True), _seed(Q.BF16, False)]
#: Where the header ends in the seeds: mutations aim there most of the time.
HEADER_BYTES = 700


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "count", "insert"]))
        head = min(len(data), HEADER_BYTES)
        if kind == "flip" and data:
            pos = draw(st.integers(0, (head if draw(st.booleans()) else len(data)) - 1))
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif kind == "count" and head >= 8:
            # counts, lengths, dimensions and offsets are the header's uint64s
            pos = draw(st.integers(0, head - 8))
            value = draw(st.sampled_from([0, 1, 2**31, 2**32 + 1, 2**63, 2**64 - 1]))
            data[pos : pos + 8] = struct.pack("<Q", value)
        elif kind == "insert":
            pos = draw(st.integers(0, head))
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-gguf") / "adapter.gguf"


@FUZZ_SETTINGS
@given(data=mutated())
def test_mutated_gguf_ends_in_findings_or_one_error(scratch, data):
    scratch.write_bytes(data)
    report = bounded(validate, [scratch])
    for finding in report.findings:
        assert finding.rule.code.startswith("LT") and finding.message
    if data in SEEDS:
        assert report.findings == []
    try:
        bounded(inspect_adapter, scratch, stats=True, consumers=True)
    except LoraToolError as exc:
        assert "\n" not in str(exc)


def test_the_seeds_are_clean(scratch):
    for data in SEEDS:
        scratch.write_bytes(data)
        assert validate([scratch]).findings == []
