"""Property-based fuzzing of the header parser, every format reader and validate.

Mutated fixture files and random headers must always end in findings or a LoraToolError: never
another exception, a hang (hypothesis deadline) or an unbounded allocation (tracemalloc peak).
``LORATOOL_FUZZ_EXAMPLES`` raises the number of inputs per test (docs/fuzzing.md records a long
run); the default keeps the suite fast.
"""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_tools.errors import LoraToolError
from lora_tools.formats import load_adapter, registry
from lora_tools.io.safetensors import DTYPES, check_header, read_header
from lora_tools.ops.validate import validate
from tests.io.fuzzing import FUZZ_SETTINGS, bounded

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
#: No input may make one validation allocate more than this (the inputs are a few KB).

SEEDS = [
    FIXTURES / "peft" / "llama-lora" / "adapter_model.safetensors",
    FIXTURES / "peft" / "llama-embedding" / "adapter_model.safetensors",
    FIXTURES / "kohya" / "sd-locon.safetensors",
    FIXTURES / "kohya" / "sd-loha.safetensors",
    FIXTURES / "diffusers" / "sd-lora" / "pytorch_lora_weights.safetensors",
    FIXTURES / "diffusers-old" / "sd-attn-procs.safetensors",
]
SEED_BYTES = [p.read_bytes() for p in SEEDS]


@st.composite
def mutated(draw) -> bytes:
    """A fixture file with header-aware and blind mutations."""
    data = bytearray(draw(st.sampled_from(SEED_BYTES)))
    (n,) = struct.unpack("<Q", data[:8])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(
            st.sampled_from(["flip", "length", "truncate", "insert", "header-byte", "digits"])
        )
        if kind == "flip" and data:
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "length":
            value = draw(
                st.one_of(
                    st.integers(0, 2**64 - 1),
                    st.sampled_from([0, 1, n - 1, n + 1, 100_000_001, 2**63, 2**64 - 1]),
                )
            )
            data[:8] = struct.pack("<Q", max(0, min(value, 2**64 - 1)))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif kind == "insert":
            pos = draw(st.integers(0, len(data)))
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "header-byte" and len(data) > 8:
            pos = draw(st.integers(8, min(len(data), 8 + n) - 1 if len(data) > 8 else 8))
            data[pos] = draw(st.sampled_from(b'{}[]":,0123456789-eE. \xff'))
        elif kind == "digits" and len(data) > 8:
            # Rewrite one number of the header: shapes and offsets are where parsers trust input.
            text = bytes(data[8 : 8 + n]).decode("utf-8", "replace")
            import re

            numbers = list(re.finditer(r"\d+", text))
            if numbers:
                m = draw(st.sampled_from(numbers))
                new = str(draw(st.sampled_from([0, 1, 2**31, 2**63, 2**64, 10**30, -1])))
                text = text[: m.start()] + new + text[m.end() :]
                header = text.encode("utf-8")
                data[8 : 8 + n] = header
                data[:8] = struct.pack("<Q", len(header))
                n = len(header)
    return bytes(data)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "adapter.safetensors"


@FUZZ_SETTINGS
@given(data=mutated())
def test_validate_mutated_files_ends_in_findings(scratch, data):
    scratch.write_bytes(data)
    report = bounded(validate, [scratch])
    if data in SEED_BYTES:
        return
    for finding in report.findings:
        assert finding.rule.code.startswith("LT") and finding.message


@FUZZ_SETTINGS
@given(data=mutated(), fmt=st.sampled_from(sorted(registry())))
def test_every_format_reader_on_mutated_files(scratch, data, fmt):
    scratch.write_bytes(data)
    try:
        adapter = bounded(load_adapter, scratch, format=fmt)
    except LoraToolError:
        return
    for module in adapter.modules.values():  # lazy tensors stay readable or fail cleanly
        with contextlib.suppress(LoraToolError):
            assert module.rank >= 0 and len(module.delta_shape) >= 2


json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=8),
)
json_value = st.recursive(
    json_scalar,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def entries(draw) -> dict:
    dtype = draw(st.one_of(st.sampled_from(sorted(DTYPES)), st.text(max_size=6), json_scalar))
    shape = draw(
        st.one_of(
            st.lists(st.integers(-2, 2**40), max_size=4),
            st.lists(st.integers(0, 6), max_size=3),
            json_value,
        )
    )
    offsets = draw(
        st.one_of(
            st.lists(st.integers(-2, 2**66), min_size=2, max_size=2),
            st.tuples(st.integers(0, 64), st.integers(0, 64)).map(list),
            json_value,
        )
    )
    entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    for key in draw(st.sets(st.sampled_from(["dtype", "shape", "data_offsets"]), max_size=1)):
        del entry[key]
    return entry


@st.composite
def headers(draw) -> tuple[bytes, int, int]:
    doc = draw(st.dictionaries(st.text(max_size=10), entries(), max_size=5))
    if draw(st.booleans()):
        doc["__metadata__"] = draw(
            st.one_of(st.dictionaries(st.text(max_size=5), json_value, max_size=3), json_value)
        )
    raw = json.dumps(doc).encode()
    data_bytes = draw(st.integers(0, 2**20))
    return raw, len(raw), 8 + len(raw) + data_bytes


@FUZZ_SETTINGS
@given(case=headers())
def test_check_header_on_random_headers(case):
    raw, n, size = case
    header, problems = bounded(check_header, raw, n, size)
    if not problems:
        assert header is not None
        spans = sorted((t.begin, t.end) for t in header.tensors.values())
        position = 0
        for begin, end in spans:
            assert begin == position
            position = end
        assert position == size - 8 - n


@FUZZ_SETTINGS
@given(raw=st.binary(max_size=512), size_extra=st.integers(0, 2**40))
def test_check_header_on_random_bytes(raw, size_extra):
    header, problems = check_header(raw, len(raw), 8 + len(raw) + size_extra)
    assert header is not None or problems


@FUZZ_SETTINGS
@given(data=mutated())
def test_read_header_raises_only_typed_errors(scratch, data):
    scratch.write_bytes(data)
    try:
        bounded(read_header, scratch)
    except LoraToolError as exc:
        assert exc.kind, exc
