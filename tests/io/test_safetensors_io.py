"""The safetensors layer against the reference implementation (safetensors' own reader/writer)."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save as reference_save
from safetensors.numpy import save_file as reference_save_file

from lora_tools.errors import FormatError, LoraToolError, UnsafeFileError
from lora_tools.io.safetensors import (
    DTYPES,
    ArrayTensor,
    SafetensorsFile,
    SafetensorsWriter,
    TensorSpec,
    check_header,
    read_header,
    save_tensors,
)

NUMPY_DTYPES = [d for d in DTYPES.values() if d.numpy is not None]


def _raw(header: dict, data: bytes = b"", n: int | None = None) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body) if n is None else n) + body + data


def test_written_file_is_byte_identical_to_reference_writer(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "b": rng.normal(size=(3, 5)).astype(np.float32),
        "a": rng.normal(size=7).astype(np.float16),
        "i": np.arange(4, dtype=np.int64),
        "s": np.array(2.0, dtype=np.float32),  # 0-dim
        "e": np.zeros((0, 3), dtype=np.float32),
        "u": np.array([1, 2], dtype=np.uint8),
    }
    ours, ref = tmp_path / "ours.safetensors", tmp_path / "ref.safetensors"
    save_tensors(ours, tensors, {"format": "pt"})
    reference_save_file(tensors, ref, metadata={"format": "pt"})
    assert ours.read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: d.name)
def test_every_numpy_dtype_round_trips_through_reference_reader(tmp_path, dtype):
    values = np.arange(12).reshape(3, 4) % 2
    array = values.astype(dtype.numpy)
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"t": array})
    with SafetensorsFile(path) as f:
        ours = f.read("t")
        assert f.info("t").dtype == dtype.name
    assert ours.dtype == dtype.numpy
    assert ours.tobytes() == array.tobytes()
    if dtype.name not in (
        "F4",
        "F8_E8M0",
        "F8_E4M3FNUZ",
        "F8_E5M2FNUZ",
        "C64",
        "U16",
        "U32",
        "U64",
    ):
        with safe_open(path, "pt") as ref:  # the reference reader sees the same values
            assert np.array_equal(ref.get_tensor("t").float().numpy(), array.astype(np.float32))


def test_row_ranges_and_raw_bytes_read_only_what_is_asked(tmp_path):
    array = np.arange(40, dtype=np.float32).reshape(10, 4)
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"t": array, "u": np.ones(3, ml_dtypes.bfloat16)})
    with SafetensorsFile(path) as f:
        assert np.array_equal(f.read("t", rows=slice(3, 7)), array[3:7])
        assert f.read("t", rows=slice(8, 20)).shape == (2, 4)
        assert f.read_bytes("t", 16, 8) == array.tobytes()[16:24]
        chunks = [bytes(c) for c in f.iter_raw("t", chunk_bytes=48)]
        assert [len(c) for c in chunks] == [48, 48, 48, 16]
        assert b"".join(chunks) == array.tobytes()


def test_streaming_writer_takes_chunks_in_header_order(tmp_path):
    path = tmp_path / "w.safetensors"
    specs = [TensorSpec("b", "F32", (4, 2)), TensorSpec("a", "F16", (3,))]
    with SafetensorsWriter(path, specs, {"k": "v"}) as w:
        assert [s.name for s in w.order] == ["b", "a"]  # F32 sorts before F16
        w.write("b", np.ones((2, 2), np.float32))
        w.write("b", np.zeros((2, 2), np.float32))
        w.write("a", np.arange(3, dtype=np.float16))
    with safe_open(path, "np") as ref:
        assert ref.metadata() == {"k": "v"}
        assert ref.get_tensor("b").tolist() == [[1, 1], [1, 1], [0, 0], [0, 0]]


def test_incomplete_or_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "w.safetensors"
    specs = [TensorSpec("a", "F32", (2,)), TensorSpec("b", "F32", (2,))]
    with pytest.raises(LoraToolError, match="never written"), SafetensorsWriter(path, specs) as w:
        w.write("a", np.ones(2, np.float32))
    with pytest.raises(RuntimeError), SafetensorsWriter(path, specs) as w:
        w.write("a", np.ones(2, np.float32))
        raise RuntimeError("boom")
    with pytest.raises(LoraToolError, match="out of order"), SafetensorsWriter(path, specs) as w:
        w.write("b", np.ones(2, np.float32))
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_wrong_dtype_and_overflow(tmp_path):
    specs = [TensorSpec("a", "F32", (2,))]
    with pytest.raises(LoraToolError, match="dtype"), SafetensorsWriter(tmp_path / "x", specs) as w:
        w.write("a", np.ones(2, np.float16))
    with (
        pytest.raises(LoraToolError, match="bytes written"),
        SafetensorsWriter(tmp_path / "x", specs) as w,
    ):
        w.write("a", np.ones(3, np.float32))


def test_lazy_file_tensors_are_copied_as_raw_bytes(tmp_path):
    src = tmp_path / "src.safetensors"
    save_tensors(src, {"x": np.arange(6, dtype=np.float32)})
    with SafetensorsFile(src) as f:
        save_tensors(tmp_path / "dst.safetensors", {"y": f.tensor("x")})
    with SafetensorsFile(tmp_path / "dst.safetensors") as g:
        assert g.read("y").tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"\x01\x00", "file-too-small"),
        (struct.pack("<Q", 200_000_000) + b"{}", "header-too-large"),
        (struct.pack("<Q", 50) + b"{}", "header-length"),
        (
            _raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
            "truncated",
        ),
        (
            _raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9),
            "trailing-bytes",
        ),
        (_raw({"a": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "dtype"),
        (
            _raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
            "size-mismatch",
        ),
        (
            _raw(
                {
                    "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]},
                },
                b"\0" * 6,
            ),
            "overlap",
        ),
        (
            _raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
            "gap",
        ),
        (_raw({"__metadata__": {"a": 1}}), "metadata-type"),
        (struct.pack("<Q", 4) + b"{a:1", "header-json"),
        (struct.pack("<Q", 2) + b"\xff\xfe", "header-utf8"),
        (_raw({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "shape"),
        (_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4), "offsets"),
    ],
)
def test_header_checks_name_the_problem_and_agree_with_reference(tmp_path, raw, kind):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    with pytest.raises(FormatError) as err:
        read_header(path)
    assert err.value.kind == kind
    assert str(path) in str(err.value)
    with pytest.raises(Exception), safe_open(path, "np"):  # noqa: B017 - any reference error
        pass


def test_duplicate_keys_are_flagged_though_the_reference_accepts_them(tmp_path):
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    body = ('{"a":' + entry + ',"a":' + entry + "}").encode()
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 4)
    header, problems = check_header(body, len(body), path.stat().st_size)
    assert [p.kind for p in problems] == ["duplicate-key"]
    assert header is not None and list(header.tensors) == ["a"]
    with pytest.raises(FormatError, match="more than once"):
        read_header(path)


def test_all_problems_are_reported_at_once():
    body = json.dumps(
        {
            "__metadata__": {"x": 3},
            "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
        }
    ).encode()
    _, problems = check_header(body, len(body), 8 + len(body) + 20)
    assert {p.kind for p in problems} == {"metadata-type", "gap", "trailing-bytes"}


def test_pickle_files_are_refused_without_reading(tmp_path):
    path = tmp_path / "adapter_model.bin"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeFileError, match="never unpickles"):
        read_header(path)


@settings(max_examples=150, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 5), max_size=3), min_size=1, max_size=5),
    dtypes=st.lists(
        st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F64"]), min_size=5, max_size=5
    ),
    metadata=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
)
def test_property_reference_reads_what_we_write_and_we_read_what_reference_writes(
    tmp_path_factory, shapes, dtypes, metadata
):
    tmp = tmp_path_factory.mktemp("prop")
    tensors = {
        f"t{i}": np.arange(int(np.prod(s)), dtype=np.float64).reshape(s).astype(DTYPES[d].numpy)
        for i, (s, d) in enumerate(zip(shapes, dtypes, strict=False))
    }
    save_tensors(tmp / "ours.safetensors", tensors, metadata or None)
    ref_bytes = reference_save(tensors, metadata=metadata or None)
    (tmp / "ref.safetensors").write_bytes(ref_bytes)
    for name in ("ours.safetensors", "ref.safetensors"):
        with SafetensorsFile(tmp / name) as f:
            assert f.metadata == metadata
            for key, value in tensors.items():
                assert f.read(key).tobytes() == value.tobytes()
                assert f.info(key).shape == value.shape
    with safe_open(tmp / "ours.safetensors", "np") as ref:
        assert set(ref.keys()) == set(tensors)


def test_array_tensor_keeps_dtype_and_scalar_shape():
    t = ArrayTensor(np.array(3.0, np.float32))
    assert (t.dtype, t.shape, t.nbytes) == ("F32", (), 4)
    assert ArrayTensor(np.ones(2), "BF16").dtype == "BF16"


def test_f4_matches_the_reference_torch_layout(tmp_path):
    """F4 packs two elements per byte, low nibble first (torch's float4_e2m1fn_x2)."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file
    from safetensors.torch import save_file as torch_save_file

    codes = torch.tensor([[0x21, 0x43], [0xF8, 0x7A]], dtype=torch.uint8)
    torch_save_file({"x": codes.view(torch.float4_e2m1fn_x2)}, tmp_path / "ref.safetensors")
    with SafetensorsFile(tmp_path / "ref.safetensors") as f:
        values = f.read("x")
        assert f.info("x").shape == (2, 4)
        assert f.read("x", rows=slice(1, 2)).astype(np.float32).tolist() == [
            [-0.0, -6.0, -1.0, 6.0]
        ]
    assert values.astype(np.float32).tolist() == [[0.5, 1.0, 1.5, 2.0], [-0.0, -6.0, -1.0, 6.0]]
    save_tensors(tmp_path / "ours.safetensors", {"x": values})
    assert (tmp_path / "ours.safetensors").read_bytes() == (
        tmp_path / "ref.safetensors"
    ).read_bytes()
    back = load_file(tmp_path / "ours.safetensors")["x"].view(torch.uint8)
    assert back.tolist() == codes.tolist()


def test_f6_is_kept_but_not_decoded(tmp_path):
    body = json.dumps({"x": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}}).encode()
    path = tmp_path / "f6.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\x01\x02\x03")
    with SafetensorsFile(path) as f:
        assert f.read_bytes("x") == b"\x01\x02\x03"
        with pytest.raises(FormatError, match="no reference defines"):
            f.read("x")
