"""The dtype registry resolves ml_dtypes types lazily, to the same dtypes as before."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from lora_tools.errors import FormatError
from lora_tools.io.safetensors import DTYPES, dtype_of, numpy_dtype, scalar_value

EXPECTED = {
    "F4": ml_dtypes.float4_e2m1fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E8M0": ml_dtypes.float8_e8m0fnu,
    "F8_E4M3FNUZ": ml_dtypes.float8_e4m3fnuz,
    "F8_E5M2FNUZ": ml_dtypes.float8_e5m2fnuz,
    "BF16": ml_dtypes.bfloat16,
    "F16": np.float16,
    "F32": np.float32,
    "BOOL": np.bool_,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_numpy_dtype_and_back(name: str) -> None:
    assert numpy_dtype(name) == np.dtype(EXPECTED[name])
    assert dtype_of(np.zeros(2, EXPECTED[name])) == name


def test_every_decodable_dtype_round_trips() -> None:
    for d in DTYPES.values():
        assert d.decodable == (d.numpy is not None)
        if d.decodable:
            assert dtype_of(np.zeros(1, d.numpy)) == d.name


def test_foreign_dtypes_are_refused() -> None:
    for array in (np.zeros(1, ">f4"), np.zeros(1, np.float128), np.zeros(1, "U3")):
        with pytest.raises(FormatError, match="no safetensors equivalent"):
            dtype_of(array)


def test_bf16_scalar_decoding_matches_ml_dtypes_for_every_bit_pattern() -> None:
    bits = np.arange(1 << 16, dtype="<u2")
    with np.errstate(invalid="ignore"):
        reference = bits.view(ml_dtypes.bfloat16).astype(np.float64)
    ours = np.array([scalar_value(b.tobytes(), "BF16") for b in bits])
    np.testing.assert_array_equal(ours, reference)  # NaNs compare equal here


@pytest.mark.parametrize("name", ["F16", "F32", "F64", "F8_E4M3", "I32", "F4"])
def test_scalar_value_other_dtypes(name: str) -> None:
    value = np.array([1.5, 0.0] if name == "F4" else [1.5], EXPECTED.get(name, numpy_dtype(name)))
    raw = bytes([0x03]) if name == "F4" else value.tobytes()  # F4: 1.5 is code 3, low nibble
    assert scalar_value(raw, name) == (1.0 if name == "I32" else 1.5)
