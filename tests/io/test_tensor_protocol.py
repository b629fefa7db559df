"""Tensors in the Python API: numpy's array protocol gives the decoded values, reprs are short."""

from __future__ import annotations

import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from lora_tools.errors import FormatError
from lora_tools.io.safetensors import ArrayTensor, FileTensor, SafetensorsFile

#: One fixture per float dtype an adapter is saved in.
BY_DTYPE = {
    "F32": "peft/llama-lora/adapter_model.safetensors",
    "F16": "kohya/sd-lora.safetensors",
    "BF16": "peft/llama-lora-bf16/adapter_model.safetensors",
}


def _tensors(path: Path) -> tuple[SafetensorsFile, list[FileTensor]]:
    f = SafetensorsFile(path)
    return f, [f.tensor(name) for name in f if f.info(name).numel > 1]


@pytest.mark.parametrize("dtype", sorted(BY_DTYPE))
def test_np_asarray_is_the_decoded_tensor(fixtures_dir: Path, dtype: str) -> None:
    f, tensors = _tensors(fixtures_dir / BY_DTYPE[dtype])
    with f:
        assert tensors and {t.dtype for t in tensors} == {dtype}
        for t in tensors:
            expected = t.numpy()
            got = np.asarray(t)
            assert got.dtype == expected.dtype and got.shape == t.shape
            assert np.array_equal(got, expected)
            in_memory = ArrayTensor(expected)
            assert np.array_equal(np.asarray(in_memory), expected)
            assert np.asarray(in_memory).dtype == expected.dtype


def test_array_protocol_casts_and_copies_as_numpy_says(fixtures_dir: Path) -> None:
    with SafetensorsFile(fixtures_dir / BY_DTYPE["BF16"]) as f:
        t = f.tensor(next(n for n in f if f.info(n).numel > 1))
        values = t.numpy()
        as_f32 = np.asarray(t, dtype=np.float32)
        assert as_f32.dtype == np.float32
        assert np.array_equal(as_f32, values.astype(np.float32))
        with pytest.raises(ValueError):
            np.array(t, dtype=np.float32, copy=False)  # a cast is a copy
        assert np.array_equal(np.array(t, copy=False), values)  # a read shares with nothing

    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    in_memory = ArrayTensor(array)
    assert np.shares_memory(np.asarray(in_memory), array)
    copied = np.array(in_memory, copy=True)
    assert not np.shares_memory(copied, array) and np.array_equal(copied, array)
    with pytest.raises(ValueError):
        np.array(in_memory, dtype=np.float64, copy=False)
    halves = np.asarray(in_memory, dtype=ml_dtypes.bfloat16)
    assert halves.dtype == ml_dtypes.bfloat16 and halves.tolist() == array.tolist()


def test_reprs_are_short_and_read_nothing(fixtures_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "adapter.safetensors"
    shutil.copy(fixtures_dir / BY_DTYPE["F16"], path)
    f, tensors = _tensors(path)
    path.unlink()  # any read from now on fails: the file is opened on the first read only
    with f:
        t = next(t for t in tensors if len(t.shape) == 2)
        assert repr(t) == f"FileTensor(F16, [{t.shape[0]}, {t.shape[1]}])"
        assert all(len(repr(t)) < 40 for t in tensors)
        with pytest.raises(FormatError, match="cannot open"):
            t.numpy()
    assert repr(ArrayTensor(np.zeros((16, 4096), np.float16))) == "ArrayTensor(F16, [16, 4096])"
    assert repr(ArrayTensor(np.float32(2.0))) == "ArrayTensor(F32, [])"
