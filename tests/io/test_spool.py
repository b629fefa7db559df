"""The spool: tensors kept in an anonymous temporary file read back with their exact bytes, as
arrays, in chunks, and written by the safetensors writer like file tensors."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest

from lora_tools.io.safetensors import SafetensorsFile, Spool, SpooledTensor, save_tensors


@pytest.mark.parametrize(
    ("array", "dtype"),
    [
        (np.arange(12, dtype=np.float32).reshape(3, 4) / 7, None),
        (np.arange(12, dtype=np.float32).reshape(3, 4) / 7, "BF16"),
        (np.arange(6, dtype=np.float64).reshape(2, 3, 1) - 2.5, "F16"),
        (np.arange(-8, 8, dtype=np.int64), None),
        (np.array(3.0, np.float32), None),
    ],
)
def test_a_spooled_tensor_reads_back_its_exact_bytes(array, dtype) -> None:
    spool = Spool()
    spool.put(np.ones(5, np.float32))  # something before it: offsets matter
    t = spool.put(array, dtype)
    want = array.astype(ml_dtypes.bfloat16 if dtype == "BF16" else np.float16) if dtype else array
    assert isinstance(t, SpooledTensor) and t.shape == array.shape
    assert t.tobytes() == want.tobytes() and t.nbytes == want.nbytes
    got = t.numpy()
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    got[...] = 0  # a fresh writable array: the spool is unchanged
    assert t.tobytes() == want.tobytes()
    assert b"".join(bytes(c) for c in t.iter_bytes(chunk_bytes=7)) == want.tobytes()
    assert spool.nbytes == 20 + want.nbytes


def test_the_writer_streams_spooled_tensors_and_the_file_leaves_no_trace(tmp_path) -> None:
    spool = Spool(dir=tmp_path)
    a, b = np.eye(3, dtype=np.float32), np.arange(4, dtype=np.int32)
    save_tensors(tmp_path / "out.safetensors", {"a": spool.put(a), "b": spool.put(b, "I32")})
    with SafetensorsFile(tmp_path / "out.safetensors") as f:
        assert f.read("a").tobytes() == a.tobytes() and f.read("b").tolist() == [0, 1, 2, 3]
    assert os.listdir(tmp_path) == ["out.safetensors"]  # the spool file is unlinked from the start
    spool.close()
