"""SafetensorsWriter: positional writes from threads, kernel copies, and their checks."""

from __future__ import annotations

import errno
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from lora_tools.errors import FormatError, LoraToolError
from lora_tools.io import safetensors as st
from lora_tools.io.safetensors import SafetensorsFile, SafetensorsWriter, TensorSpec, save_tensors


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "a": rng.standard_normal((37, 5)).astype(np.float32),
        "b": rng.integers(0, 9, (3,), dtype=np.int64),
        "c": rng.standard_normal((64, 16)).astype(np.float16),
        "empty": np.zeros((0, 4), np.float32),
    }


def _sequential(path: Path, arrays: dict[str, np.ndarray]) -> bytes:
    specs = [TensorSpec(k, st.dtype_of(v), v.shape) for k, v in arrays.items()]
    with SafetensorsWriter(path, specs, {"format": "pt"}, keep_order=True) as w:
        for k, v in arrays.items():
            w.write(k, v)
    return path.read_bytes()


@pytest.mark.parametrize("stream_to_disk", [False, True])
def test_positional_writes_from_threads_give_the_sequential_bytes(
    tmp_path: Path, stream_to_disk: bool
) -> None:
    arrays = _arrays()
    expected = _sequential(tmp_path / "seq.safetensors", arrays)
    specs = [TensorSpec(k, st.dtype_of(v), v.shape) for k, v in arrays.items()]
    pieces = []
    for k, v in arrays.items():
        flat = v.reshape(v.shape[0], -1) if v.size else v.reshape(0, 1)
        row = flat.shape[1] * v.itemsize
        pieces += [(k, r * row, flat[r : r + 3]) for r in range(0, flat.shape[0], 3)]
    out = tmp_path / "pos.safetensors"
    with (
        SafetensorsWriter(
            out, specs, {"format": "pt"}, keep_order=True, stream_to_disk=stream_to_disk
        ) as w,
        ThreadPoolExecutor(4) as pool,
    ):
        # reversed: the last bytes first, so the file grows out of order
        list(pool.map(lambda p: w.write_at(*p), reversed(pieces)))
    assert out.read_bytes() == expected
    loaded = load_file(out)  # the reference reader agrees
    assert all(np.array_equal(loaded[k], v) for k, v in arrays.items())


def _copy_all(tmp_path: Path, positional: bool) -> bytes:
    arrays = _arrays()
    src = tmp_path / "src.safetensors"
    save_tensors(src, arrays)
    out = tmp_path / f"copy-{positional}.safetensors"
    with SafetensorsFile(src) as f:
        specs = [TensorSpec(k, f.info(k).dtype, f.info(k).shape) for k in f]
        chunks: list[int] = []
        with SafetensorsWriter(out, specs, keep_order=True) as w:
            for spec in specs:
                info = f.info(spec.name)
                start = f.header.data_start + info.begin
                half = info.nbytes // 2
                for at, n in ((0, half), (half, info.nbytes - half)):
                    w.copy_range(
                        spec.name,
                        f.fileno(),
                        start + at,
                        n,
                        at=at if positional else None,
                        on_chunk=chunks.append,
                        chunk_bytes=64,
                    )
        assert sum(chunks) == sum(f.info(k).nbytes for k in f)
        assert max(chunks) <= 64
    assert load_file(out).keys() == arrays.keys()
    return out.read_bytes()


def test_copy_range_sequential_and_positional(tmp_path: Path) -> None:
    seq = _copy_all(tmp_path, positional=False)
    pos = _copy_all(tmp_path, positional=True)
    with SafetensorsFile(tmp_path / "src.safetensors") as f:
        order = sorted(f.keys(), key=lambda k: f.info(k).begin)
        data = b"".join(f.read_bytes(k) for k in order)
    assert seq == pos
    assert seq.endswith(data)


def test_copy_range_falls_back_when_the_kernel_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = _copy_all(tmp_path, positional=True)

    def refuse(*args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    assert _copy_all(tmp_path, positional=True) == expected
    assert _copy_all(tmp_path, positional=False) == expected


def test_incomplete_or_mixed_writes_leave_no_file(tmp_path: Path) -> None:
    a = np.ones((4, 2), np.float32)
    spec = [TensorSpec("a", "F32", (4, 2))]
    out = tmp_path / "x.safetensors"
    with pytest.raises(LoraToolError, match="never written"), SafetensorsWriter(out, spec) as w:
        w.write_at("a", 0, a[:2])
    with pytest.raises(LoraToolError, match="outside"), SafetensorsWriter(out, spec) as w:
        w.write_at("a", 16, a[:3])
    with (
        pytest.raises(LoraToolError, match="positional write after sequential"),
        SafetensorsWriter(out, spec) as w,
    ):
        w.write("a", a[:2])
        w.write_at("a", 16, a[2:])
    with (
        pytest.raises(LoraToolError, match="sequential write after positional"),
        SafetensorsWriter(out, spec) as w,
    ):
        w.write_at("a", 0, a[:2])
        w.write("a", a[2:])
    assert list(tmp_path.iterdir()) == []


def test_read_into_reads_rows_into_a_buffer(tmp_path: Path) -> None:
    arrays = _arrays()
    path = tmp_path / "r.safetensors"
    save_tensors(path, arrays)
    with SafetensorsFile(path) as f:
        buf = np.empty((3, 5), np.float32)
        assert np.array_equal(f.read_into("a", buf, row_start=34), arrays["a"][34:])
        raw = np.empty(3 * 5 * 4, np.uint8)  # any dtype: bytes are bytes
        f.read_into("a", raw, row_start=1)
        assert np.array_equal(raw.view(np.float32).reshape(3, 5), arrays["a"][1:4])
        with pytest.raises(FormatError, match="outside"):
            f.read_into("a", buf, row_start=35)
