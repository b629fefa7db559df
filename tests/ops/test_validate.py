"""validate: every fixture gets the right findings; each rule fires on a file made for it."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from lora_tools.errors import UsageError
from lora_tools.io.safetensors import TensorInfo, read_header, save_tensors
from lora_tools.lowrank import factor_svd
from lora_tools.ops.validate import (
    discover,
    load_settings,
    validate,
)
from lora_tools.ops.validate.rules import RULES, select_rules
from lora_tools.ops.validate.scan import TensorScan as _TensorScan
from lora_tools.ops.validate.scan import gram as _gram

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"

#: broken fixture -> the exact set of error/warning rules it must produce (nothing else).
#: Lone files with PEFT keys also get LT301: without adapter_config.json their scale is unknown.
BROKEN = {
    "truncated.safetensors": {"LT012", "LT301"},
    "bad-header.safetensors": {"LT005"},
    "overlap.safetensors": {"LT011", "LT301"},
    "gap.safetensors": {"LT010", "LT301"},
    "trailing-bytes.safetensors": {"LT013", "LT301"},
    "duplicate-keys.safetensors": {"LT014", "LT301"},
    "header-too-large.safetensors": {"LT003"},
    "bad-dtype.safetensors": {"LT006", "LT301"},
    "size-mismatch.safetensors": {"LT009", "LT301"},
    "nonstring-metadata.safetensors": {"LT015", "LT301"},
    "kohya-bad-hash.safetensors": {"LT205"},
    "nan-weights": {"LT201"},
    "rank-mismatch": {"LT102"},
    "zero-b": {"LT202"},
    "missing-partner": {"LT101"},
    "no-config": {"LT301"},
    "bad-config": {"LT302"},
    "wrong-alpha-config": {"LT304"},
    "pickle": {"LT016"},
    # structurally valid: made for the base rules (see test_wrong_base_against_base)
    "wrong-base": set(),
}

GOOD = sorted(
    [p for p in (FIXTURES / "peft").iterdir() if p.is_dir()]
    + [p for p in (FIXTURES / "kohya").glob("*.safetensors")]
    + [FIXTURES / "diffusers" / "sd-lora", FIXTURES / "diffusers-old" / "sd-attn-procs.safetensors"]
)

#: adapter -> base it was made for.
GOOD_WITH_BASE = [
    ("peft/llama-lora", "bases/tiny-llama"),
    ("peft/llama-lora", "bases/tiny-llama-sharded"),
    ("peft/llama-all-linear", "bases/tiny-llama"),
    ("peft/llama-patterns", "bases/tiny-llama"),
    ("peft/llama-embedding", "bases/tiny-llama"),
    ("peft/llama-modules-to-save", "bases/tiny-llama"),
    ("peft/llama-lora-bf16", "bases/tiny-llama-bf16"),
    ("peft/gpt2-lora", "bases/tiny-gpt2"),
    ("peft/gpt2-bias", "bases/tiny-gpt2"),
    ("peft/sd-unet-conv", "bases/tiny-sd/unet"),
    ("diffusers/sd-lora", "bases/tiny-sd"),
    ("diffusers-old/sd-attn-procs.safetensors", "bases/tiny-sd"),
    ("kohya/sd-lora.safetensors", "bases/tiny-sd"),
    ("kohya/sd-locon.safetensors", "bases/tiny-sd"),
    ("kohya/sdxl-lora.safetensors", "bases/tiny-sdxl.safetensors"),
    ("kohya/flux-lora.safetensors", "bases/tiny-flux.safetensors"),
]


def serious(report) -> set[str]:
    return {f.rule.code for f in report.findings if f.severity in ("error", "warning")}


def codes(report) -> list[str]:
    return [f.rule.code for f in report.findings]


# ----------------------------------------------------------------------------- fixtures


def test_broken_fixture_list_is_complete():
    assert {p.name for p in (FIXTURES / "broken").iterdir()} == set(BROKEN)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_each_broken_fixture_gets_exactly_its_rule(name):
    report = validate([FIXTURES / "broken" / name])
    assert serious(report) == BROKEN[name], [f.message for f in report.findings]
    assert report.failed("error") == bool(BROKEN[name])


@pytest.mark.parametrize("path", GOOD, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_good_fixtures_are_clean(path):
    report = validate([path])
    assert serious(report) == set(), [f.message for f in report.findings]
    assert not report.failed("warning")


def test_good_fixture_infos_are_the_expected_ones():
    report = validate([FIXTURES / "kohya"])
    infos = {(Path(f.path).name, f.rule.code) for f in report.findings}
    # LoHa and kohya DoRA are types loratool computes: no LT110 for them
    assert infos == {("sd-lora-noalpha.safetensors", "LT105")}


@pytest.mark.parametrize(("adapter", "base"), GOOD_WITH_BASE)
def test_good_fixtures_fit_their_base(adapter, base):
    report = validate([FIXTURES / adapter], base=FIXTURES / base)
    assert serious(report) == set(), [f.message for f in report.findings]


def test_wrong_base_against_base():
    report = validate([FIXTURES / "broken" / "wrong-base"], base=FIXTURES / "bases" / "tiny-llama")
    assert serious(report) == {"LT401", "LT404"}
    assert codes(report).count("LT401") == 8
    summary = next(f for f in report.findings if f.rule.code == "LT404")
    assert "0 of 8 modules match" in summary.message


def test_some_modules_unmatched_is_not_zero_of_n(tmp_path):
    tensors = read_tensors(FIXTURES / "peft" / "llama-lora" / "adapter_model.safetensors")
    stem = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors[stem.replace("q_proj", "nope_proj") + ".lora_A.weight"] = tensors[
        stem + ".lora_A.weight"
    ]
    tensors[stem.replace("q_proj", "nope_proj") + ".lora_B.weight"] = tensors[
        stem + ".lora_B.weight"
    ]
    folder = peft_folder(
        tmp_path, tensors, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "nope_proj"]
    )
    report = validate([folder], base=FIXTURES / "bases" / "tiny-llama")
    assert serious(report) == {"LT401"}
    assert [f.module for f in report.findings] == [stem.replace("q_proj", "nope_proj")]


def test_lora_bias_without_base_bias_and_dtype_note():
    report = validate([FIXTURES / "peft" / "llama-bias"], base=FIXTURES / "bases" / "tiny-llama")
    assert serious(report) == {"LT403"}
    report = validate(
        [FIXTURES / "peft" / "llama-lora"], base=FIXTURES / "bases" / "tiny-llama-bf16"
    )
    assert codes(report) == ["LT405"]
    assert report.findings[0].expected == "BF16" and report.findings[0].found == "F32"


def test_shape_mismatch_against_base(tmp_path):
    tensors = read_tensors(FIXTURES / "peft" / "llama-lora" / "adapter_model.safetensors")
    stem = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors[stem + ".lora_A.weight"] = tensors[stem + ".lora_A.weight"][:, :31].copy()
    report = validate([peft_folder(tmp_path, tensors)], base=FIXTURES / "bases" / "tiny-llama")
    assert serious(report) == {"LT403"}
    assert report.findings[0].module == stem


# ----------------------------------------------------------------------------- helpers


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    from lora_tools.io.safetensors import SafetensorsFile

    with SafetensorsFile(path) as f:
        names = f.keys()
        return {k: f.read(k) for k in names}


LLAMA_CONFIG = json.loads((FIXTURES / "peft" / "llama-lora" / "adapter_config.json").read_text())


def peft_folder(tmp_path: Path, tensors, name: str = "adapter", **config_changes) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    save_tensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"})
    config = {**LLAMA_CONFIG, **config_changes}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def kohya_file(tmp_path: Path, modules: dict, metadata=None, name="k.safetensors") -> Path:
    """modules: name -> (down, up, alpha or None)."""
    tensors = {}
    for stem, (down, up, alpha) in modules.items():
        tensors[f"{stem}.lora_down.weight"] = down
        tensors[f"{stem}.lora_up.weight"] = up
        if alpha is not None:
            tensors[f"{stem}.alpha"] = np.asarray(alpha)
    path = tmp_path / name
    save_tensors(path, tensors, metadata)
    return path


def rng_factors(seed: int, r=4, n_in=16, n_out=16, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (
        (rng.normal(size=(r, n_in)) * 0.1).astype(dtype),
        (rng.normal(size=(n_out, r)) * 0.1).astype(dtype),
    )


def kohya_modules(count=6, alpha=2.0, r=4):
    return {
        f"lora_unet_block_{i}_attn_to_q": (*rng_factors(i, r=r), np.float32(alpha))
        for i in range(count)
    }


# ----------------------------------------------------------------------------- integrity


def raw_file(path: Path, header: dict, data: bytes, length: int | None = None) -> Path:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def test_all_container_problems_are_reported(tmp_path):
    header = {
        "__metadata__": {"format": "pt", "n": 3},
        "a.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "a.lora_B.weight": {"dtype": "F9", "shape": [2, 2], "data_offsets": [16, 32]},
        "b.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [48, 64]},
        "b.lora_B.weight": {"dtype": "F32", "shape": [3, 2], "data_offsets": [64, 80]},
    }
    path = raw_file(tmp_path / "many.safetensors", header, bytes(80) + b"junk")
    report = validate([path])
    assert sorted(codes(report)) == ["LT006", "LT009", "LT010", "LT013", "LT015"]


@pytest.mark.parametrize(
    ("content", "rule"),
    [
        (b"\x01\x02", "LT001"),
        (struct.pack("<Q", 500) + b"{}", "LT002"),
        (struct.pack("<Q", 2) + b"\xff\xfe", "LT004"),
        (struct.pack("<Q", 2) + b"[]", "LT005"),
    ],
)
def test_header_level_problems(tmp_path, content, rule):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    assert codes(validate([path])) == [rule]


def test_shape_and_offset_entries(tmp_path):
    header = {
        "a.lora_A.weight": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 16]},
        "a.lora_B.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [32, 16]},
    }
    path = raw_file(tmp_path / "x.safetensors", header, bytes(32))
    assert set(codes(validate([path]))) >= {"LT007", "LT008"}


def test_missing_path_and_folder_without_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    report = validate([tmp_path / "nope.safetensors", tmp_path / "empty"])
    assert codes(report) == ["LT017", "LT018"]


# ----------------------------------------------------------------------------- structure


def test_kohya_alpha_rules(tmp_path):
    mods = kohya_modules(6)
    names = list(mods)
    mods[names[0]] = (*mods[names[0]][:2], np.float32(0))
    mods[names[1]] = (*mods[names[1]][:2], np.float32(-2))
    mods[names[2]] = (*mods[names[2]][:2], np.float32("nan"))
    mods[names[3]] = (*mods[names[3]][:2], np.array([2.0, 2.0], np.float32))
    mods[names[4]] = (*mods[names[4]][:2], None)
    report = validate([kohya_file(tmp_path, mods)])
    by_module = {f.module: f.rule.code for f in report.findings}
    assert by_module == {
        names[0]: "LT106",
        names[1]: "LT107",
        names[2]: "LT108",
        names[3]: "LT109",
        names[4]: "LT105",
    }


def test_factor_shape_zero_rank_dtype_and_partner(tmp_path):
    mods = kohya_modules(4)
    names = list(mods)
    mods[names[0]] = (np.ones((4, 16, 3), np.float32), np.ones((16, 4), np.float32), 2.0)
    mods[names[1]] = (np.ones((0, 16), np.float32), np.ones((16, 0), np.float32), 2.0)
    mods[names[2]] = (np.ones((4, 16), np.int32), np.ones((16, 4), np.float32), 2.0)
    path = kohya_file(tmp_path, mods)
    tensors = read_tensors(path)
    tensors["lora_unet_orphan.lora_up.weight"] = np.ones((16, 4), np.float32)
    tensors["lora_unet_lonely.alpha"] = np.float32(4)
    tensors["something_else.weight"] = np.ones(3, np.float32)
    save_tensors(path, tensors)
    by_module = sorted((f.module, f.rule.code) for f in validate([path]).findings)
    assert by_module == sorted(
        [
            (names[0], "LT104"),
            (names[1], "LT103"),
            (names[2], "LT115"),
            ("lora_unet_orphan", "LT101"),
            ("lora_unet_lonely", "LT101"),
            ("something_else.weight", "LT112"),
        ]
    )


def test_dora_magnitude_shape(tmp_path):
    tensors = read_tensors(FIXTURES / "peft" / "llama-dora" / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
    tensors[key] = np.ones(5, np.float32)
    config = json.loads((FIXTURES / "peft" / "llama-dora" / "adapter_config.json").read_text())
    folder = peft_folder(
        tmp_path, tensors, **{k: config[k] for k in ("use_dora", "target_modules")}
    )
    report = validate([folder])
    assert codes(report) == ["LT104"]
    assert report.findings[0].module == key.rsplit(".", 1)[0]


def test_foreign_types_mixed_with_lora(tmp_path):
    path = kohya_file(tmp_path, kohya_modules(4))
    tensors = read_tensors(path)
    for part, shape in (("w1_a", (4, 2)), ("w1_b", (2, 4)), ("w2_a", (4, 2)), ("w2_b", (2, 4))):
        tensors[f"lora_unet_x.hada_{part}"] = np.ones(shape, np.float32)
    tensors["lora_unet_x.alpha"] = np.asarray(2.0, np.float32)
    save_tensors(path, tensors)
    assert codes(validate([path])) == ["LT111"]


def test_unknown_format_and_no_modules(tmp_path):
    base = FIXTURES / "bases" / "tiny-flux.safetensors"
    assert codes(validate([base])) == ["LT113"]
    path = tmp_path / "k.safetensors"
    save_tensors(path, {"lora_unet_foo.weight": np.ones((2, 2), np.float32)})
    assert codes(validate([path])) == ["LT112", "LT114"]


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "dtype",
    [np.float32, np.float16, ml_dtypes.bfloat16, np.float64, ml_dtypes.float8_e5m2, np.complex64],
)
def test_non_finite_counts_match_numpy(dtype):
    rng = np.random.default_rng(0)
    values = rng.normal(size=4000).astype(np.float32)
    values[rng.choice(4000, 7, replace=False)] = np.nan
    values[rng.choice(4000, 5, replace=False)] = np.inf
    values[rng.choice(4000, 3, replace=False)] = -np.inf
    array = values.astype(dtype)
    floats = array.view(np.float32) if dtype is np.complex64 else array.astype(np.float32)
    nan, inf = int(np.isnan(floats).sum()), int(np.isinf(floats).sum())
    name = {np.float32: "F32", np.float16: "F16", np.float64: "F64", np.complex64: "C64"}.get(
        dtype, "BF16" if dtype is ml_dtypes.bfloat16 else "F8_E5M2"
    )
    scan = _TensorScan(name)
    raw = memoryview(np.ascontiguousarray(array).view(np.uint8))
    for start in range(0, len(raw), 1000 * array.itemsize):  # several chunks
        scan.feed(raw[start : start + 1000 * array.itemsize])
    assert (scan.nan, scan.inf) == (nan, inf)
    assert not scan.finite and not scan.all_zero


@pytest.mark.parametrize("name", ["F32", "F16", "BF16", "F64"])
def test_zero_detection_treats_negative_zero_as_zero(name):
    from lora_tools.io.safetensors import numpy_dtype

    array = np.array([0.0, -0.0, 0.0], dtype=numpy_dtype(name))
    scan = _TensorScan(name)
    scan.feed(memoryview(array.view(np.uint8)))
    assert scan.all_zero and scan.finite
    scan.feed(memoryview(np.array([1e-30], dtype=numpy_dtype(name)).view(np.uint8)))
    assert not scan.all_zero or (
        name in ("F16", "BF16") and float(np.array(1e-30, numpy_dtype(name))) == 0
    )


def test_update_norm_from_grams_matches_factor_svd():
    rng = np.random.default_rng(3)
    down = rng.normal(size=(6, 40)).astype(np.float32)
    up = rng.normal(size=(30, 6)).astype(np.float32)
    g_up = _gram(
        memoryview(up.view(np.uint8)).cast("B"), TensorInfo("u", "F32", (30, 6), 0, 0), "up"
    )
    g_down = _gram(
        memoryview(down.view(np.uint8)).cast("B"), TensorInfo("d", "F32", (6, 40), 0, 0), "down"
    )
    scale = 0.75
    ours = math.sqrt(float(np.sum(g_up * g_down))) * scale
    oracle = factor_svd(up.astype(np.float64), down.astype(np.float64), scale).frobenius
    dense = np.linalg.norm(scale * (up.astype(np.float64) @ down.astype(np.float64)))
    assert ours == pytest.approx(oracle, rel=1e-5)
    assert ours == pytest.approx(dense, rel=1e-5)


def test_norm_outlier_is_found_and_named(tmp_path):
    mods = kohya_modules(8)
    names = list(mods)
    down, up, alpha = mods[names[5]]
    mods[names[5]] = (down, up * 50, alpha)
    report = validate([kohya_file(tmp_path, mods)])
    assert codes(report) == ["LT204"]
    finding = report.findings[0]
    assert finding.module == names[5]
    expected = factor_svd(up.astype(np.float64) * 50, down.astype(np.float64), alpha / 4).frobenius
    assert float(finding.found) == pytest.approx(expected, rel=1e-3)


def test_modest_spread_is_not_an_outlier(tmp_path):
    mods = kohya_modules(8)
    names = list(mods)
    down, up, alpha = mods[names[2]]
    mods[names[2]] = (down, up * 4, alpha)  # 4x: notable, not extreme
    assert codes(validate([kohya_file(tmp_path, mods)])) == []


def test_single_zero_factor_is_a_warning(tmp_path):
    mods = kohya_modules(4)
    name = next(iter(mods))
    down, up, alpha = mods[name]
    mods[name] = (np.zeros_like(down), up, alpha)
    report = validate([kohya_file(tmp_path, mods)])
    assert codes(report) == ["LT203"] and report.findings[0].module == name


def test_hash_rule_agrees_with_hashlib(tmp_path):
    mods = kohya_modules(3)
    path = kohya_file(tmp_path, mods, {"sshs_model_hash": "0" * 64})
    header = read_header(path)
    data = path.read_bytes()[header.data_start :]
    report = validate([path])
    assert codes(report) == ["LT205"]
    assert report.findings[0].expected == hashlib.sha256(data).hexdigest()
    path2 = kohya_file(
        tmp_path, mods, {"sshs_model_hash": hashlib.sha256(data).hexdigest()}, "ok.safetensors"
    )
    assert codes(validate([path2])) == []


def test_value_rules_stream_large_tensors_in_chunks(tmp_path, monkeypatch):
    import lora_tools.ops.validate as validate_module

    monkeypatch.setattr(validate_module, "CHUNK_BYTES", 64)
    tensors = read_tensors(FIXTURES / "peft" / "llama-embedding" / "adapter_model.safetensors")
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[key][100, 3] = np.nan
    config = json.loads((FIXTURES / "peft" / "llama-embedding" / "adapter_config.json").read_text())
    report = validate([peft_folder(tmp_path, tensors, target_modules=config["target_modules"])])
    assert codes(report) == ["LT201"] and report.findings[0].module == key


# ----------------------------------------------------------------------------- config


def test_config_rules(tmp_path):
    tensors = read_tensors(FIXTURES / "peft" / "llama-lora" / "adapter_model.safetensors")
    folder = peft_folder(
        tmp_path,
        tensors,
        peft_type="LOHA",
        rank_pattern={"nothing_here": 2},
        alpha_pattern={"(": 3},
        target_modules=["q_proj", "k_proj", "v_proj"],
        use_dora=True,
        lora_alpha=0,
    )
    by_rule = sorted({f.rule.code for f in validate([folder]).findings})
    # "(" is no regex: PEFT fails on it (re.error), so it is a config error, not a warning.
    assert by_rule == ["LT106", "LT302", "LT303", "LT305", "LT307", "LT308"]
    report = validate([folder])
    missing = [f.module for f in report.findings if f.rule.code == "LT307"]
    assert len(missing) == 2 and all(m.endswith("o_proj") for m in missing)
    assert all(f.path.endswith("adapter_config.json") for f in report.findings)


def test_target_modules_covering_nothing_and_regex(tmp_path):
    tensors = read_tensors(FIXTURES / "peft" / "llama-lora" / "adapter_model.safetensors")
    assert codes(validate([peft_folder(tmp_path, tensors, "a", target_modules=["c_attn"])])) == [
        "LT306"
    ]
    regex = r".*\.(q|k|v|o)_proj"
    assert codes(validate([peft_folder(tmp_path, tensors, "b", target_modules=regex)])) == []
    assert (
        codes(validate([peft_folder(tmp_path, tensors, "c", target_modules=r".*\.q_proj")]))
        == ["LT307"] * 6
    )


def test_magnitudes_without_use_dora(tmp_path):
    tensors = read_tensors(FIXTURES / "peft" / "llama-dora" / "adapter_model.safetensors")
    config = json.loads((FIXTURES / "peft" / "llama-dora" / "adapter_config.json").read_text())
    folder = peft_folder(tmp_path, tensors, use_dora=False, target_modules=config["target_modules"])
    assert codes(validate([folder])) == ["LT308"]


def test_rank_pattern_consistency():
    # only the serving engines' scales (LT590, info: vLLM, SGLang and TGI read no pattern)
    assert codes(validate([FIXTURES / "peft" / "llama-patterns"])) == ["LT590"] * 3
    config = json.loads((FIXTURES / "peft" / "llama-patterns" / "adapter_config.json").read_text())
    assert config["rank_pattern"]  # the fixture exercises the pattern path


def test_diffusers_metadata_rank_mismatch(tmp_path):
    src = FIXTURES / "diffusers" / "sd-lora" / "pytorch_lora_weights.safetensors"
    header = read_header(src)
    meta = dict(header.metadata)
    flat = json.loads(meta["lora_adapter_metadata"])
    flat["unet.r"] = 8
    meta["lora_adapter_metadata"] = json.dumps(flat)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_tensors(path, read_tensors(src), meta)
    report = validate([path])
    assert set(codes(report)) == {"LT304"} and len(report.findings) == 32
    meta["lora_adapter_metadata"] = "{not json"
    save_tensors(path, read_tensors(src), meta)
    assert codes(validate([path])) == ["LT302"]


def test_kohya_metadata_rules(tmp_path):
    mods = kohya_modules(4, alpha=2.0, r=4)
    good = kohya_file(
        tmp_path, mods, {"ss_network_dim": "4", "ss_network_alpha": "2.0"}, "g.safetensors"
    )
    assert codes(validate([good])) == []
    dynamic = kohya_file(
        tmp_path,
        mods,
        {"ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"},
        "d.safetensors",
    )
    assert codes(validate([dynamic])) == []
    stale = kohya_file(
        tmp_path, mods, {"ss_network_dim": "16", "ss_network_alpha": "8"}, "s.safetensors"
    )
    assert codes(validate([stale])) == ["LT309", "LT310"]


# ----------------------------------------------------------------------------- discovery, selection


def test_paths_naming_one_adapter_are_validated_once():
    folder = FIXTURES / "peft" / "llama-lora"
    targets = discover(
        [folder, folder / "adapter_config.json", folder / "adapter_model.safetensors"]
    )
    assert len(targets) == 1 and targets[0].config is not None


def test_config_alone_means_its_folder():
    targets = discover([FIXTURES / "broken" / "bad-config" / "adapter_config.json"])
    assert [t.weights.name for t in targets] == ["adapter_model.safetensors"]
    assert codes(validate([FIXTURES / "broken" / "bad-config" / "adapter_config.json"])) == [
        "LT302"
    ]


def test_select_and_ignore():
    assert select_rules() == frozenset(RULES)
    assert select_rules("LT2") == {c for c in RULES if c.startswith("LT2")}
    assert select_rules(["truncated", "LT013"]) == {"LT012", "LT013"}
    assert "LT205" not in select_rules(None, "LT2")
    with pytest.raises(UsageError):
        select_rules("LT999")
    with pytest.raises(UsageError):
        select_rules("nonsense")
    report = validate([FIXTURES / "broken" / "nan-weights"], ignore=["LT2"])
    assert codes(report) == []
    report = validate([FIXTURES / "broken" / "truncated.safetensors"], select=["LT2"])
    assert codes(report) == []


def test_settings_from_pyproject(tmp_path):
    assert load_settings(tmp_path / "nowhere").fail_on in ("error",)
    (tmp_path / "pyproject.toml").write_text(
        '[tool.loratool.validate]\nselect = ["LT0", "LT1"]\nignore = "LT105"\n'
        'fail-on = "warning"\noutput-format = "json"\n'
    )
    (tmp_path / "sub").mkdir()
    settings = load_settings(tmp_path / "sub")
    assert settings.select == ("LT0", "LT1") and settings.ignore == ("LT105",)
    assert (settings.fail_on, settings.output_format) == ("warning", "json")
    for bad in ('fail-on = "info"', 'select = ["LT9"]', "colour = true", 'output-format = "xml"'):
        (tmp_path / "pyproject.toml").write_text(f"[tool.loratool.validate]\n{bad}\n")
        with pytest.raises(UsageError) as err:
            load_settings(tmp_path)
        assert "pyproject.toml" in str(err.value)


# ----------------------------------------------------------------------------- read only


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    return {
        str(p): (p.stat().st_mtime_ns, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_validation_never_writes_or_modifies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(FIXTURES)
    paths = [
        p
        for group in ("peft", "kohya", "broken", "diffusers")
        for p in (FIXTURES / group).iterdir()
    ]
    validate(paths, base=FIXTURES / "bases" / "tiny-llama")
    assert snapshot(FIXTURES) == before
    assert list(tmp_path.iterdir()) == []
