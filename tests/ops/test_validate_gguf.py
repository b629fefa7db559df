"""``validate`` and ``inspect`` on llama.cpp LoRA GGUFs: what loratool writes passes, and what
llama.cpp's ``llama_adapter_lora_init`` (src/llama-adapter.cpp) refuses, aborts on or serves
wrong is caught, each broken file built with the gguf package's own GGUFWriter.

The oracle for the good files is the file itself read back with ``gguf.GGUFReader`` (the reader
llama.cpp ships): shapes, types, alpha and the scale llama.cpp applies, ``alpha / r`` per module
(``llama_adapter_lora_weight::get_scale``).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from lora_tools.errors import UnsupportedAdapterError, UsageError  # noqa: E402
from lora_tools.formats import load_adapter  # noqa: E402
from lora_tools.ops.inspect import inspect_adapter  # noqa: E402
from lora_tools.ops.to_gguf import convert_to_gguf  # noqa: E402
from lora_tools.ops.validate import validate  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data" / "gguf"
Q = gguf.GGMLQuantizationType
RNG = np.random.default_rng(0)

#: A tiny Llama LoRA in GGUF's layout: lora_a [r, in], lora_b [out, r] (numpy order).
GOOD = {
    "blk.0.attn_q.weight": (4, 64, 64),
    "blk.0.attn_v.weight": (8, 64, 16),
    "blk.1.ffn_down.weight": (4, 128, 64),
}


def factors(rank: int, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    a = RNG.standard_normal((rank, n_in)).astype(np.float32) / 8
    b = RNG.standard_normal((n_out, rank)).astype(np.float32) / 8
    return a, b


def good_tensors() -> dict[str, np.ndarray]:
    out = {}
    for stem, (rank, n_in, n_out) in GOOD.items():
        out[stem + ".lora_a"], out[stem + ".lora_b"] = factors(rank, n_in, n_out)
    return out


def write(
    path: Path,
    tensors: dict[str, np.ndarray] | None = None,
    *,
    kv: dict[str, tuple[object, object]] | None = None,
    drop: tuple[str, ...] = (),
    arch: str = "llama",
    qtype: object = None,
) -> Path:
    """A GGUF as GGUFWriter writes it: the adapter key-values of convert_lora_to_gguf.py
    (``kv`` adds or replaces some, ``drop`` removes some), the tensors quantized to ``qtype``."""
    writer = gguf.GGUFWriter(path, arch)
    values: dict[str, tuple[object, object]] = {
        "general.type": ("adapter", gguf.GGUFValueType.STRING),
        "adapter.type": ("lora", gguf.GGUFValueType.STRING),
        "adapter.lora.alpha": (16.0, gguf.GGUFValueType.FLOAT32),
        **(kv or {}),
    }
    for key, (value, vtype) in values.items():
        if isinstance(vtype, tuple):
            writer.add_key_value(key, value, vtype[0], sub_type=vtype[1])
        else:
            writer.add_key_value(key, value, vtype)
    for key in drop:
        writer.kv_data[0].pop(key, None)
    for name, array in (good_tensors() if tensors is None else tensors).items():
        if qtype is None:
            writer.add_tensor(name, array)
        else:
            try:  # rows that do not split into blocks fall back to F16, as the script does
                data, typed = gguf.quants.quantize(array, qtype), qtype
            except gguf.QuantError:
                data, typed = gguf.quants.quantize(array, Q.F16), Q.F16
            writer.add_tensor(name, data, raw_dtype=typed)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def codes(path: Path, **kwargs) -> list[str]:
    return [f.rule.code for f in validate([path], **kwargs).findings]


# -- what loratool writes passes -----------------------------------------------------------------


CONVERTED = [
    ("llama", "llama", "f32"),
    ("llama", "llama", "f16"),
    ("llama", "llama", "bf16"),
    ("llama", "llama", "q8_0"),
    ("llama-patterns", "llama", "q8_0"),
    ("llama-alora", "llama", "f32"),
    ("gemma", "gemma", "bf16"),
    ("qwen3", "qwen3", "f16"),
]


@pytest.mark.parametrize(
    ("case", "base", "outtype"), CONVERTED, ids=["-".join(c) for c in CONVERTED]
)
def test_converted_gguf_passes_and_inspect_reads_llama_cpps_scales(case, base, outtype, tmp_path):
    out = tmp_path / f"{case}.gguf"
    convert_to_gguf(
        load_adapter(DATA / "adapters" / case), out, base=DATA / "bases" / base, outtype=outtype
    )
    report = validate([out])
    assert report.files[0].format == "gguf"
    assert report.findings == [] and not report.failed("warning")

    reader = gguf.GGUFReader(out)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    want = {}
    for t in reader.tensors:
        if t.name.endswith(".lora_b"):
            rank = int(t.shape[0])  # ne[0]: what get_scale divides by
            want[t.name.removesuffix(".lora_b")] = (rank, alpha / rank, t.tensor_type.name)
    result = inspect_adapter(out)
    got = {row["module"]: (row["rank"], row["scale"]) for row in result.modules}
    assert got == {stem: (rank, scale) for stem, (rank, scale, _) in want.items()}
    assert (
        result.format == "gguf"
        and result.architecture["name"] == reader.fields["general.architecture"].contents()
    )
    assert sum(result.dtypes.values()) == len(reader.tensors)
    if outtype == "q8_0":
        assert "Q8_0" in result.dtypes


def test_inspect_factors_are_the_files_values(tmp_path):
    """--stats reads the factors as llama.cpp holds them: B @ A of the dequantized tensors."""
    path = write(tmp_path / "a.gguf", qtype=Q.Q8_0)
    reader = gguf.GGUFReader(path)
    values = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    adapter = load_adapter(path, gguf=True)
    for stem, (rank, _, _) in GOOD.items():
        m = adapter.modules[stem]
        np.testing.assert_array_equal(m.down.numpy(), values[stem + ".lora_a"])
        np.testing.assert_array_equal(m.up.numpy(), values[stem + ".lora_b"])
        assert m.scale == 16.0 / rank
    stats = inspect_adapter(path, stats=True).stats["modules"]
    for row in stats:
        a, b = values[row["module"] + ".lora_a"], values[row["module"] + ".lora_b"]
        update = (b.astype(np.float64) @ a.astype(np.float64)) * row["scale"]
        assert row["frobenius"] == pytest.approx(np.linalg.norm(update), rel=1e-9)


def test_token_embedding_pair_is_read_flipped(tmp_path):
    """llama.cpp's token_embd pair: lora_a is A transposed [n_vocab, r], lora_b [n_embd, r]."""
    a = RNG.standard_normal((128, 4)).astype(np.float32)
    b = RNG.standard_normal((64, 4)).astype(np.float32)
    path = write(
        tmp_path / "e.gguf", {"token_embd.weight.lora_a": a, "token_embd.weight.lora_b": b}
    )
    assert codes(path) == []
    m = load_adapter(path, gguf=True).modules["token_embd.weight"]
    assert (m.kind, m.rank, m.delta_shape) == ("embedding", 4, (128, 64))
    np.testing.assert_allclose(
        m.delta(), (a.astype(np.float64) @ b.T.astype(np.float64)) * 4.0, rtol=1e-12
    )


def test_alpha_zero_or_absent_means_scale_one(tmp_path):
    """get_scale: ``alpha ? alpha / r : 1``."""
    zero = write(
        tmp_path / "zero.gguf", kv={"adapter.lora.alpha": (0.0, gguf.GGUFValueType.FLOAT32)}
    )
    absent = write(tmp_path / "absent.gguf", drop=("adapter.lora.alpha",))
    for path in (zero, absent):
        assert codes(path) == ["LT315"]
        assert not validate([path]).failed("warning")  # an info
        assert {row["scale"] for row in inspect_adapter(path).modules} == {1.0}


# -- what llama.cpp refuses is caught ------------------------------------------------------------


def _broken_tensors(kind: str) -> dict[str, np.ndarray]:
    t = good_tensors()
    if kind == "lone-a":
        del t["blk.0.attn_v.weight.lora_b"]
    elif kind == "rank-mismatch":  # lora_a written as [in, r]: "lora_a tensor is not transposed"
        t["blk.0.attn_q.weight.lora_a"] = np.ascontiguousarray(t["blk.0.attn_q.weight.lora_a"].T)
    elif kind == "three-d":
        t["blk.0.attn_q.weight.lora_b"] = np.zeros((2, 64, 4), np.float32) + 1
    elif kind == "unexpected":
        t["blk.0.attn_q.weight"] = np.ones((64, 64), np.float32)
    elif kind == "norm":
        t["blk.0.attn_norm.weight"] = np.ones(64, np.float32)
    elif kind == "integer":
        t["blk.0.attn_q.weight.lora_a"] = np.ones((4, 64), np.int32)
    elif kind == "zero-rank":
        t["blk.0.attn_q.weight.lora_a"] = np.zeros((0, 64), np.float32)
        t["blk.0.attn_q.weight.lora_b"] = np.zeros((64, 0), np.float32)
    return t


@pytest.mark.parametrize(
    ("kind", "code", "module"),
    [
        ("lone-a", "LT101", "blk.0.attn_v.weight"),
        ("rank-mismatch", "LT102", "blk.0.attn_q.weight"),
        ("three-d", "LT104", "blk.0.attn_q.weight"),
        ("unexpected", "LT120", "blk.0.attn_q.weight"),
        ("norm", "LT112", "blk.0.attn_norm.weight"),
        ("integer", "LT115", "blk.0.attn_q.weight"),
    ],
)
def test_structure_llama_cpp_refuses(kind, code, module, tmp_path):
    path = write(tmp_path / f"{kind}.gguf", _broken_tensors(kind))
    report = validate([path], select="LT1")
    assert [(f.rule.code, f.module) for f in report.findings] == [(code, module)]
    assert report.failed("error")
    # the other modules are still checked: their values are read
    assert validate([path], select="LT2").findings == []


def test_rank_mismatch_message_names_both_shapes(tmp_path):
    path = write(tmp_path / "t.gguf", _broken_tensors("rank-mismatch"))
    (finding,) = validate([path]).findings
    assert "lora_a [64, 4] has rank 64 but lora_b [64, 4] has rank 4" in finding.message
    assert "not transposed" in finding.message


@pytest.mark.parametrize(
    ("kv", "drop", "arch", "expected"),
    [
        ({"general.type": ("model", gguf.GGUFValueType.STRING)}, (), "llama", ["LT311"]),
        ({}, ("general.type",), "llama", ["LT311"]),
        ({"adapter.type": ("control_vector", gguf.GGUFValueType.STRING)}, (), "llama", ["LT312"]),
        ({}, (), "LlamaForCausalLM", ["LT313"]),
        ({}, ("general.architecture",), "llama", ["LT313"]),
        ({"adapter.lora.alpha": (16, gguf.GGUFValueType.UINT32)}, (), "llama", ["LT314"]),
        ({"adapter.lora.alpha": (16.0, gguf.GGUFValueType.FLOAT64)}, (), "llama", ["LT314"]),
        ({"general.type": (1, gguf.GGUFValueType.UINT8)}, (), "llama", ["LT314"]),
        (
            {
                "adapter.alora.invocation_tokens": (
                    [1, 2],
                    (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32),
                )
            },
            (),
            "llama",
            ["LT314"],
        ),
        ({"adapter.lora.alpha": (-8.0, gguf.GGUFValueType.FLOAT32)}, (), "llama", ["LT107"]),
        (
            {"adapter.lora.alpha": (float("nan"), gguf.GGUFValueType.FLOAT32)},
            (),
            "llama",
            ["LT108"],
        ),
    ],
    ids=[
        "type-model",
        "type-missing",
        "adapter-type",
        "hf-arch",
        "arch-missing",
        "alpha-uint32",
        "alpha-float64",
        "type-uint8",
        "tokens-int32",
        "alpha-negative",
        "alpha-nan",
    ],
)
def test_metadata_llama_cpp_refuses_or_misreads(kv, drop, arch, expected, tmp_path):
    path = write(tmp_path / "m.gguf", kv=kv, drop=drop, arch=arch)
    assert codes(path) == expected


def test_good_invocation_tokens_pass(tmp_path):
    tokens = {
        "adapter.alora.invocation_tokens": (
            [5, 7],
            (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32),
        )
    }
    assert codes(write(tmp_path / "t.gguf", kv=tokens)) == []


@pytest.mark.parametrize("qtype", [None, Q.F16, Q.BF16, Q.Q8_0], ids=["f32", "f16", "bf16", "q8_0"])
def test_nan_is_caught_in_every_outtype(qtype, tmp_path):
    t = good_tensors()
    t["blk.0.attn_v.weight.lora_b"][3, 1] = np.nan
    path = write(tmp_path / "n.gguf", t, qtype=qtype)
    report = validate([path])
    (finding,) = [f for f in report.findings if f.rule.code == "LT201"]
    assert finding.module == "blk.0.attn_v.weight" and "NaN" in finding.message
    assert report.failed("error")


def test_zero_factors(tmp_path):
    t = good_tensors()
    t["blk.0.attn_q.weight.lora_b"][:] = 0
    assert codes(write(tmp_path / "one.gguf", t, qtype=Q.Q8_0)) == ["LT203"]
    for stem in GOOD:
        t[stem + ".lora_b"][:] = 0
    assert codes(write(tmp_path / "all.gguf", t)) == ["LT202"]


def test_outlier_module(tmp_path):
    t = {}
    for i in range(6):
        t[f"blk.{i}.attn_q.weight.lora_a"], t[f"blk.{i}.attn_q.weight.lora_b"] = factors(4, 64, 64)
    t["blk.5.attn_q.weight.lora_b"] *= 1000
    report = validate([write(tmp_path / "o.gguf", t, qtype=Q.F16)])
    assert [(f.rule.code, f.module) for f in report.findings] == [("LT204", "blk.5.attn_q.weight")]


def test_duplicate_key_is_caught(tmp_path):
    """llama.cpp's gguf_init_from_file refuses a key twice; gguf's reader keeps both."""
    path = write(tmp_path / "d.gguf", kv={"general.name": ("lora", gguf.GGUFValueType.STRING)})
    raw = path.read_bytes()
    assert raw.count(b"general.name") == 1
    path.write_bytes(raw.replace(b"general.name", b"adapter.type"))
    assert codes(path) == ["LT014"]


@pytest.mark.parametrize("cut", [3, 40, -100])
def test_unparsable_gguf(cut, tmp_path):
    raw = write(tmp_path / "whole.gguf").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(raw[:cut])
    (finding,) = validate([path]).findings
    assert finding.rule.code == "LT019" and finding.path == str(path)


def test_gguf_found_by_magic_without_the_suffix(tmp_path):
    path = write(tmp_path / "adapter.bin.gguf", _broken_tensors("lone-a"))
    renamed = path.rename(tmp_path / "adapter.weights")
    assert codes(renamed) == ["LT101"]


def test_a_folder_means_its_gguf_files(tmp_path):
    """A folder holding only LoRA GGUFs is those adapters (not LT018), each checked; the
    adapter_config.json beside them is not theirs."""
    write(tmp_path / "good.gguf")
    bad = good_tensors()
    bad["blk.0.attn_q.weight.lora_b"][0, 0] = np.nan
    write(tmp_path / "bad.gguf", bad)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 99}')
    report = validate([tmp_path])
    assert sorted(r.path for r in report.files) == sorted(
        os.path.join(str(tmp_path), n) for n in ("bad.gguf", "good.gguf")
    )
    by_path = {os.path.basename(r.path): [f.rule.code for f in r.findings] for r in report.files}
    assert by_path["good.gguf"] == [] and "LT201" in by_path["bad.gguf"]


def test_profiles_on_a_gguf(tmp_path):
    """vLLM loads no GGUF; the llama.cpp profile adds nothing to llama.cpp's own rules."""
    path = write(tmp_path / "p.gguf")
    assert "LT501" in codes(path, profiles="vllm")
    assert codes(path, profiles="llamacpp") == []


# -- other commands refuse GGUF; a missing gguf package is one clear error -----------------------


def test_operations_refuse_a_gguf(tmp_path):
    path = write(tmp_path / "a.gguf")
    with pytest.raises(UnsupportedAdapterError, match="only inspect and validate read it") as exc:
        load_adapter(path)
    assert exc.value.kind == "gguf-read-only"


def test_a_model_gguf_is_no_adapter_for_inspect(tmp_path):
    path = write(tmp_path / "m.gguf", kv={"general.type": ("model", gguf.GGUFValueType.STRING)})
    with pytest.raises(UnsupportedAdapterError, match="general.type 'model'"):
        inspect_adapter(path)


def test_without_the_gguf_package(tmp_path, monkeypatch):
    path = write(tmp_path / "a.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    with pytest.raises(UsageError, match="gguf package") as exc:
        validate([path])
    assert "pip install 'loratool[gguf]'" in str(exc.value)
    with pytest.raises(UsageError, match="gguf package"):
        inspect_adapter(path)


def test_cli_without_the_gguf_package_is_one_line(tmp_path):
    path = write(tmp_path / "a.gguf")
    probe = (
        "import sys; sys.modules['gguf'] = None; sys.argv = ['loratool', 'validate', sys.argv[1]];"
        "from lora_tools.cli import main; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=120
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "pip install 'loratool[gguf]'" in lines[0]


def test_validate_json_names_the_format(tmp_path):
    path = write(tmp_path / "a.gguf")
    from lora_tools.ops.validate import to_json

    doc = json.loads(json.dumps(to_json(validate([path]))))
    assert doc["files"][0]["format"] == "gguf"


def test_consumers_llama_cpp_loads_the_gguf_at_its_own_scales(tmp_path):
    path = write(tmp_path / "c.gguf")
    table = inspect_adapter(path, consumers=True).consumers
    loading = {c["name"]: c for c in table["consumers"] if c["loads"]}
    assert list(loading) == ["llamacpp"]
    for row in table["modules"]:
        rank = GOOD[row["module"]][0]
        assert row["scales"]["llamacpp"] == row["intended"] == 16.0 / rank
    assert table["disagreements"] == 0


# -- --base: the base tensors llama.cpp looks each pair up in ------------------------------------


def _model_gguf(path: Path, base: Path, *, arch: str = "llama", drop=(), resize=()) -> Path:
    """A GGUF model of ``base``'s weights under the names llama.cpp's converter gives them
    (gguf's own tensor map), as zeros of the right shape: only names and shapes matter."""
    from lora_tools.io.safetensors import SafetensorsFile

    config = json.loads((base / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type("model")
    with SafetensorsFile(base / "model.safetensors") as f:
        for key, info in f.header.tensors.items():
            name = names.get_name(key=key, try_suffixes=(".weight", ".bias"))
            if name is None or name in drop:
                continue
            shape = tuple(d + 1 for d in info.shape) if name in resize else info.shape
            writer.add_tensor(name, np.zeros(shape, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def patterns_gguf(tmp_path, fixtures_dir) -> Path:
    out = tmp_path / "patterns.gguf"
    base = fixtures_dir / "bases/tiny-llama"
    convert_to_gguf(load_adapter(fixtures_dir / "peft/llama-patterns"), out, base=base)
    return out


def test_base_hf_folder_and_gguf_model_agree(patterns_gguf, tmp_path, fixtures_dir):
    base = fixtures_dir / "bases/tiny-llama"
    assert codes(patterns_gguf, base=base) == []
    assert codes(patterns_gguf, base=_model_gguf(tmp_path / "m.gguf", base)) == []


def test_base_architecture_mismatch(patterns_gguf, tmp_path, fixtures_dir):
    model = _model_gguf(tmp_path / "m.gguf", fixtures_dir / "bases/tiny-llama", arch="qwen2")
    assert codes(patterns_gguf, base=model) == ["LT406"]


def test_base_lacks_a_tensor_or_its_shape(patterns_gguf, tmp_path, fixtures_dir):
    base = fixtures_dir / "bases/tiny-llama"
    missing = _model_gguf(tmp_path / "m.gguf", base, drop=("blk.1.attn_q.weight",))
    report = validate([patterns_gguf], base=missing)
    assert [(f.rule.code, f.module) for f in report.findings] == [("LT401", "blk.1.attn_q.weight")]
    wrong = _model_gguf(tmp_path / "w.gguf", base, resize=("blk.0.attn_v.weight",))
    (finding,) = validate([patterns_gguf], base=wrong).findings
    assert (finding.rule.code, finding.module) == ("LT403", "blk.0.attn_v.weight")
    assert "incorrect shape" in finding.message


def test_base_of_another_size(tmp_path, fixtures_dir):
    """An adapter for a 64-wide Llama against the 32-wide tiny-llama: every pair's shape."""
    out = tmp_path / "wide.gguf"
    convert_to_gguf(load_adapter(DATA / "adapters/llama"), out, base=DATA / "bases/llama")
    found = codes(out, base=fixtures_dir / "bases/tiny-llama")
    assert found and set(found) == {"LT403"}


def test_gguf_base_with_a_safetensors_adapter_is_a_usage_error(tmp_path, fixtures_dir):
    model = _model_gguf(tmp_path / "m.gguf", fixtures_dir / "bases/tiny-llama")
    with pytest.raises(UsageError, match="checks llama.cpp GGUF adapters only"):
        validate([fixtures_dir / "peft/llama-patterns"], base=model)


def test_a_string_that_is_no_utf8_is_unparsable(tmp_path):
    """Found by fuzzing: gguf decodes key-value strings as UTF-8."""
    path = write(tmp_path / "u.gguf", kv={"general.name": ("naming", gguf.GGUFValueType.STRING)})
    path.write_bytes(path.read_bytes().replace(b"naming", b"nam\xe5\xffg"))
    (finding,) = validate([path]).findings
    assert finding.rule.code == "LT019" and "general.name" in finding.message


def test_a_fifo_named_gguf_is_not_opened(tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    (finding,) = validate([fifo]).findings
    assert finding.rule.code == "LT017" and "FIFO" in finding.message


def test_a_hostile_array_length_is_refused_not_looped_on(tmp_path):
    """gguf's reader loops over an array's length past the end of the file (found by
    fuzzing); llama.cpp's reader refuses a length the bytes left cannot hold, and so does
    loratool."""
    tokens = {
        "adapter.alora.invocation_tokens": (
            [5, 7],
            (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32),
        )
    }
    path = write(tmp_path / "t.gguf", kv=tokens)
    raw = bytearray(path.read_bytes())
    at = raw.index(b"adapter.alora.invocation_tokens") + len("adapter.alora.invocation_tokens")
    assert struct.unpack_from("<IIQ", raw, at) == (9, 4, 2)  # ARRAY of UINT32, 2 items
    struct.pack_into("<Q", raw, at + 8, 2**63)
    path.write_bytes(bytes(raw))
    (finding,) = validate([path]).findings
    assert finding.rule.code == "LT019" and "runs past the end of the file" in finding.message


def test_a_model_gguf_is_one_finding(tmp_path, fixtures_dir):
    """A base model given as the adapter: LT311, not one LT120 per weight."""
    model = _model_gguf(tmp_path / "m.gguf", fixtures_dir / "bases/tiny-llama")
    assert codes(model) == ["LT311"]


@pytest.mark.parametrize("case", ["llama-patterns", "llama-rslora", "qwen2"])
def test_inspect_stats_of_the_gguf_are_the_adapters(case, tmp_path):
    """What llama.cpp applies from the GGUF (alpha / r * B' @ A, B' permuted and scale-baked) has
    the norms and spectrum of the PEFT update it came from: a row permutation and the baked
    factor leave ||dW||_F and sigma_max as PEFT's scale * B @ A has them."""
    out = tmp_path / f"{case}.gguf"
    base = "llama" if case.startswith("llama") else case
    source = load_adapter(DATA / "adapters" / case)
    result = convert_to_gguf(source, out, base=DATA / "bases" / base)
    peft = {row["module"]: row for row in inspect_adapter(source, stats=True).stats["modules"]}
    mine = {row["module"]: row for row in inspect_adapter(out, stats=True).stats["modules"]}
    assert len(mine) == len(result.plan.modules)
    for key, stem in result.plan.modules.items():
        for field in ("frobenius", "spectral"):
            assert mine[stem][field] == pytest.approx(peft[key][field], rel=1e-5), (key, field)
        assert mine[stem]["rank"] == peft[key]["rank"]
