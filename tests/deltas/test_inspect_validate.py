"""inspect and validate on every LyCORIS type: files lycoris-lora wrote (tests/data/lycoris), and
broken copies of them made here (a tensor dropped, one mis-shaped, NaN, zero alpha, zero
factors). Each rule added for the types has a test that fails without it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from lycoris.modules.lokr import LokrModule
from safetensors.numpy import load_file as read_tensors

from lora_tools.cli import cli
from lora_tools.deltas import DeltaModule
from lora_tools.formats import load_adapter
from lora_tools.io.safetensors import read_header, save_tensors
from lora_tools.ops.inspect import inspect_adapter
from lora_tools.ops.validate import validate

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "lycoris"
COMPUTED = ["loha", "loha-tucker", "lokr", "lokr-tucker", "full", "locon-dora"]
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # a 3x3 conv, in every file
LINEAR = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


def codes(report) -> list[str]:
    return sorted(f.rule.code for f in report.findings if f.rule.code != "LT206")


def copy_with(tmp_path: Path, name: str, change) -> Path:
    """``name``'s tensors after ``change(tensors)``, saved in tmp_path with its metadata."""
    source = DATA / f"{name}.safetensors"
    tensors = read_tensors(source)
    change(tensors)
    path = tmp_path / source.name
    save_tensors(path, tensors, read_header(source).metadata)
    return path


def findings(report, code: str):
    return [f for f in report.findings if f.rule.code == code]


# ------------------------------------------------------------------------------------ inspect


@pytest.mark.parametrize("name", COMPUTED)
def test_inspect_counts_every_module_by_type(name):
    r = inspect_adapter(DATA / f"{name}.safetensors")
    kind = load_adapter(DATA / f"{name}.safetensors").deltas[CONV].type
    assert r.by_type == {kind: 77} and r.counts["delta_modules"] == 77
    assert r.counts["modules"] == 0 and r.unsupported == {} and not r.foreign_modules
    # every trained number is counted once: the modules' tensors are all the file holds
    # but the alphas
    header = read_header(DATA / f"{name}.safetensors")
    total = sum(math.prod(i.shape) for k, i in header.tensors.items() if not k.endswith(".alpha"))
    assert r.parameters["deltas"] == total and r.parameters["other_passthrough"] == 0


def test_inspect_header_line_before_and_after():
    out = CliRunner().invoke(cli, ["inspect", str(DATA / "loha.safetensors")]).output
    assert "modules       77  (LoHa 77)" in out
    assert "rank          LoHa 2" in out and "scale         LoHa 0.5" in out
    assert "0 LoRA + 10,288 LoHa (5,144 as LoRAs of their ranks)" in out


def test_structure_lines_name_each_types_parts():
    rows = {
        name: {r["module"]: r for r in inspect_adapter(DATA / f"{name}.safetensors").delta_modules}
        for name in COMPUTED
    }
    assert rows["loha"][LINEAR]["structure"] == "rank 2: (w1_a w1_b) * (w2_a w2_b) -> 8 x 8"
    assert rows["loha-tucker"][CONV]["structure"] == (
        "rank 2: (w1_a w1_b) * (w2_a w2_b) -> 4 x 4 x 3 x 3, Tucker cores 2 x 2 x 3 x 3"
    )
    assert (
        rows["lokr"][CONV]["structure"] == "kron(2 x 2, 2 x 2 x 3 x 3) -> 4 x 4 x 3 x 3, both whole"
    )
    decomposed = [r for r in rows["lokr"].values() if r["rank"] is not None]
    assert decomposed and all("w2 = w2_a w2_b of rank 2" in r["structure"] for r in decomposed)
    assert rows["full"][CONV]["structure"] == "diff 4 x 4 x 3 x 3, bias diff [4]"
    dora = rows["locon-dora"][CONV]
    assert dora["dora_scale"] == "output" and dora["needs_base"]
    assert dora["structure"].endswith("weight-decomposed on the outputs (dora_scale 4 x 1 x 1 x 1)")
    # parameters: LoHa holds twice a LoRA of its rank (two pairs of factors)
    loha = rows["loha"][LINEAR]
    assert (loha["parameters"], loha["lora_parameters"]) == (2 * 2 * (8 + 8), 2 * (8 + 8))
    assert rows["lokr"][CONV]["lora_parameters"] is None


def test_oft_modules_are_computed_with_their_structure():
    r = inspect_adapter(DATA / "diag-oft.safetensors")
    assert r.by_type == {"OFT": 77} and r.unsupported == {} and not r.foreign_modules
    row = next(m for m in r.delta_modules if m["module"] == CONV)
    assert row["structure"] == "2 blocks of 2 x 2 (Cayley rotation of the outputs)"
    assert row["needs_base"] and row["update"] == [4]
    out = CliRunner().invoke(cli, ["inspect", str(DATA / "diag-oft.safetensors")]).output
    assert "modules       77  (OFT 77)" in out and "unsupported" not in out


def _dense(m: DeltaModule) -> np.ndarray:
    return m.delta().reshape(m.update_dims[0], -1)


@pytest.mark.parametrize("name", ["loha", "loha-tucker", "lokr", "lokr-tucker", "full"])
def test_stats_equal_the_dense_svd(name):
    adapter = load_adapter(DATA / f"{name}.safetensors")
    rows = {r["module"]: r for r in inspect_adapter(adapter, stats=True).stats["delta_modules"]}
    for stem, m in adapter.deltas.items():
        s = np.linalg.svd(_dense(m), compute_uv=False)
        row = rows[stem]
        assert row["frobenius"] == pytest.approx(np.linalg.norm(s), rel=1e-9)
        assert row["spectral"] == pytest.approx(s[0], rel=1e-9)
        p = s[s > 0] / s.sum()  # Roy & Vetterli, as for LoRA modules
        assert row["effective_rank"] == pytest.approx(np.exp(-np.sum(p * np.log(p))), abs=1e-3)


def test_lokr_stats_match_lycoris_own_weight():
    """The LoKr norm against LyCORIS' own module (its forward's weight, scale included)."""
    adapter = load_adapter(DATA / "lokr.safetensors")
    tensors = read_tensors(DATA / "lokr.safetensors")
    rows = {r["module"]: r for r in inspect_adapter(adapter, stats=True).stats["delta_modules"]}
    checked = 0
    for stem, m in adapter.deltas.items():
        if len(m.delta_shape) != 2:
            continue
        t = {
            k[len(stem) + 1 :]: torch.from_numpy(v.astype(np.float32))
            for k, v in tensors.items()
            if k.startswith(stem + ".")
        }
        base = torch.nn.Linear(m.update_dims[1], m.update_dims[0], bias=False)
        with torch.no_grad():
            module = LokrModule.make_module_from_state_dict(
                stem,
                base,
                t.get("lokr_w1"),
                None,
                None,
                t.get("lokr_w2"),
                t.get("lokr_w2_a"),
                t.get("lokr_w2_b"),
                None,
                None,
                t["alpha"],
                None,
            )
            # LyCORIS 4.1.3's get_weight already applies the scale (its get_diff_weight
            # multiplies once more: a bug); the forward path uses get_weight alone
            weight = module.get_weight(base.weight.shape).double().numpy()
        assert rows[stem]["frobenius"] == pytest.approx(np.linalg.norm(weight), rel=1e-5)
        checked += 1
    assert checked > 20


def test_stats_of_base_dependent_updates_say_so():
    r = inspect_adapter(DATA / "locon-dora.safetensors", stats=True)
    assert {row["note"] for row in r.stats["delta_modules"]} == {"needs the base"}
    assert all(row["frobenius"] is None for row in r.stats["delta_modules"])
    out = CliRunner().invoke(cli, ["inspect", "--stats", str(DATA / "locon-dora.safetensors")])
    assert "needs the base" in out.output


def test_stats_flag_non_finite_and_zero_modules(tmp_path):
    def change(t):
        t[f"{CONV}.hada_w1_a"][0, 0] = np.nan
        t[f"{LINEAR}.hada_w2_b"][:] = 0

    r = inspect_adapter(copy_with(tmp_path, "loha", change), stats=True)
    assert CONV in r.stats["non_finite"] and r.stats["zero"] == [LINEAR]


def test_inspect_json_carries_the_fields_and_validates(tmp_path):
    import jsonschema

    from lora_tools.results import json_schema

    for name in [*COMPUTED, "diag-oft"]:
        res = CliRunner().invoke(
            cli, ["inspect", "--json", "--stats", str(DATA / f"{name}.safetensors")]
        )
        doc = json.loads(res.output)
        jsonschema.validate(doc, json_schema("inspect"))
        assert doc["counts"]["delta_modules"] == len(doc["delta_modules"])


# ----------------------------------------------------------------------------------- validate


@pytest.mark.parametrize("name", COMPUTED)
def test_intact_files_of_computed_types_have_no_finding(name):
    expected = ["LT118"] if name.startswith("lokr") else []  # LyCORIS stores alpha on whole LoKr
    assert codes(validate([DATA / f"{name}.safetensors"])) == expected


def test_lt110_names_only_the_types_loratool_does_not_compute(tmp_path):
    def to_norm(t):  # LyCORIS' norm type (w_norm / b_norm): not computed
        for key in [k for k in t if k.endswith(".oft_blocks")]:
            stem = key.removesuffix(".oft_blocks")
            t[f"{stem}.w_norm"] = np.ones(4, np.float16)
            t[f"{stem}.b_norm"] = np.zeros(4, np.float16)
            del t[key], t[f"{stem}.alpha"]

    report = validate([copy_with(tmp_path, "diag-oft", to_norm)])
    assert codes(report) == ["LT110"]
    assert "norm (77 modules)" in findings(report, "LT110")[0].message
    assert "LT110" not in codes(validate([DATA / "diag-oft.safetensors"]))
    assert "LT110" not in codes(validate([DATA / "loha.safetensors"]))


@pytest.mark.parametrize(
    ("name", "drop", "missing"),
    [
        ("loha", "hada_w1_b", "hada_w1_b"),
        ("loha-tucker", "hada_t2", "hada_t2"),
        ("lokr", "lokr_w2", "lokr_w2"),
        ("locon-dora", "lora_up.weight", "lora_up"),
    ],
)
def test_a_dropped_tensor_is_lt116(tmp_path, name, drop, missing):
    path = copy_with(tmp_path, name, lambda t: t.pop(f"{CONV}.{drop}"))
    report = validate([path])
    assert [c for c in codes(report) if c != "LT118"] == ["LT116"]
    f = findings(report, "LT116")[0]
    assert f.module == CONV and f.expected == missing and f.path == str(path)
    assert CONV not in load_adapter(path).deltas


def _tucker_locon(t, down=(2, 4, 1, 1), mid=(2, 2, 3, 3)):
    """The DoRA file's 3x3 conv module turned into a Tucker LoCon (LyCORIS' use_tucker:
    ``lora_down`` 1x1, the kernel in ``lora_mid``)."""
    rng = np.random.default_rng(0)
    t.pop(f"{CONV}.dora_scale")
    t[f"{CONV}.lora_down.weight"] = rng.normal(size=down).astype(np.float16)
    t[f"{CONV}.lora_mid.weight"] = rng.normal(size=mid).astype(np.float16)


def test_tucker_locon_is_checked(tmp_path):
    path = copy_with(tmp_path, "locon-dora", _tucker_locon)
    assert codes(validate([path])) == []
    assert load_adapter(path).deltas[CONV].type == "Tucker LoCon"

    def dropped(t):
        _tucker_locon(t)
        t.pop(f"{CONV}.lora_down.weight")

    report = validate([copy_with(tmp_path, "locon-dora", dropped)])
    assert codes(report) == ["LT116"] and findings(report, "LT116")[0].expected == "lora_down"
    report = validate(
        [copy_with(tmp_path, "locon-dora", lambda t: _tucker_locon(t, mid=(3, 2, 3, 3)))]
    )
    assert codes(report) == ["LT117"] and "lora_mid" in findings(report, "LT117")[0].message


@pytest.mark.parametrize(
    ("name", "role", "rows"),
    [("loha", "hada_w2_a", 4), ("loha-tucker", "hada_t1", 1), ("locon-dora", "dora_scale", 1)],
)
def test_a_mis_shaped_tensor_is_lt117(tmp_path, name, role, rows):
    key = f"{CONV}.{role}"

    def change(t):
        old = t[key]
        t[key] = np.ones((old.shape[0] + rows, *old.shape[1:]), old.dtype)

    path = copy_with(tmp_path, name, change)
    report = validate([path])
    assert codes(report) == ["LT117"], [f.message for f in report.findings]
    f = findings(report, "LT117")[0]
    assert f.module == CONV and role in f.message


def test_intact_modules_beside_a_broken_one_are_not_flagged(tmp_path):
    path = copy_with(tmp_path, "loha", lambda t: t.pop(f"{CONV}.hada_w2_a"))
    report = validate([path])
    assert [f.module for f in report.findings if f.rule.code != "LT206"] == [CONV]
    assert len(load_adapter(path).deltas) == 76


def test_lokr_with_two_ranks_is_lt119(tmp_path):
    rng = np.random.default_rng(0)
    stem = "lora_unet_m"
    shapes = {"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 4), "lokr_w2_a": (8, 3), "lokr_w2_b": (3, 8)}
    tensors = {f"{stem}.{k}": rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    tensors[f"{stem}.alpha"] = np.asarray(2.0, np.float32)
    path = tmp_path / "lokr.safetensors"
    save_tensors(path, tensors)
    assert codes(validate([path])) == ["LT119"]
    tensors[f"{stem}.lokr_w2_a"] = tensors[f"{stem}.lokr_w2_a"][:, :2]
    tensors[f"{stem}.lokr_w2_b"] = tensors[f"{stem}.lokr_w2_b"][:2]
    save_tensors(path, tensors)
    assert codes(validate([path])) == []


def test_whole_lokr_alpha_is_one_lt118_per_file():
    report = validate([DATA / "lokr.safetensors"])
    (f,) = findings(report, "LT118")
    assert f.severity == "info" and "55 LoKr modules" in f.message
    assert not report.failed("warning")
    adapter = load_adapter(DATA / "lokr.safetensors")
    assert adapter.deltas[f.module].scale == 1.0 and adapter.deltas[f.module].alpha == 2.0


@pytest.mark.parametrize(("value", "code"), [(0.0, "LT106"), (np.nan, "LT108"), (-1.0, "LT107")])
def test_alpha_rules_apply_to_the_other_types(tmp_path, value, code):
    def change(t):
        t[f"{CONV}.alpha"] = np.asarray(value, t[f"{CONV}.alpha"].dtype)

    report = validate([copy_with(tmp_path, "loha", change)])
    assert codes(report) == [code]
    assert findings(report, code)[0].module == CONV
    if code == "LT106":
        assert "LyCORIS" in findings(report, code)[0].message


def test_missing_alpha_of_the_other_types_is_lt105(tmp_path):
    report = validate([copy_with(tmp_path, "loha", lambda t: t.pop(f"{CONV}.alpha"))])
    assert codes(report) == ["LT105"]


def test_zero_rank_is_lt103(tmp_path):
    def change(t):
        for part in ("w1_a", "w2_a"):
            t[f"{LINEAR}.hada_{part}"] = np.zeros((8, 0), np.float16)
        for part in ("w1_b", "w2_b"):
            t[f"{LINEAR}.hada_{part}"] = np.zeros((0, 8), np.float16)

    report = validate([copy_with(tmp_path, "loha", change)])
    assert codes(report) == ["LT103"]


def test_integer_factor_is_lt115(tmp_path):
    def change(t):
        t[f"{CONV}.hada_w1_a"] = t[f"{CONV}.hada_w1_a"].astype(np.int32)

    report = validate([copy_with(tmp_path, "loha", change)])
    assert codes(report) == ["LT115"]


# ----------------------------------------------------------------------------------- values


def test_nan_in_a_factor_is_lt201_naming_the_module(tmp_path):
    def change(t):
        t[f"{CONV}.hada_w2_b"][0, 0] = np.inf

    report = validate([copy_with(tmp_path, "loha", change)])
    assert codes(report) == ["LT201"] and findings(report, "LT201")[0].module == CONV


@pytest.mark.parametrize(
    ("name", "module", "role"),
    [
        ("loha", LINEAR, "hada_w2_a"),
        ("loha-tucker", CONV, "hada_t1"),
        ("lokr", LINEAR, "lokr_w1"),
        ("full", LINEAR, "diff"),
    ],
)
def test_an_all_zero_product_tensor_is_lt203(tmp_path, name, module, role):
    def change(t):
        t[f"{module}.{role}"][...] = 0
        t.pop(f"{module}.diff_b", None)

    report = validate([copy_with(tmp_path, name, change)])
    assert codes(report) == sorted(["LT203", *(["LT118"] if name == "lokr" else [])])
    f = findings(report, "LT203")[0]
    assert f.module == module and role in f.message


def test_zero_alpha_or_dora_scale_alone_is_no_zero_update(tmp_path):
    report = validate([copy_with(tmp_path, "full", lambda t: t[f"{CONV}.diff"].fill(0))])
    assert codes(report) == []  # its bias difference still changes the layer
    report = validate(
        [copy_with(tmp_path, "locon-dora", lambda t: t[f"{CONV}.lora_up.weight"].fill(0))]
    )
    assert codes(report) == []  # dora_scale renormalises the base weight all the same


def test_every_module_zero_is_lt202(tmp_path):
    def change(t):
        for key in t:
            if key.endswith(".hada_w2_a"):
                t[key][...] = 0

    report = validate([copy_with(tmp_path, "loha", change)])
    assert codes(report) == ["LT202"]


def test_header_only_inspect_and_validate_import_neither_torch_nor_ml_dtypes():
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from lora_tools.ops.inspect import inspect_adapter\n"
        "from lora_tools.ops.validate import validate\n"
        f"for name in {[*COMPUTED, 'diag-oft']!r}:\n"
        f"    path = {str(DATA)!r} + '/' + name + '.safetensors'\n"
        "    assert inspect_adapter(path).delta_modules or name == 'diag-oft'\n"
        "    validate([path], ignore='LT2')\n"
        "print(sorted(m for m in ('torch', 'ml_dtypes') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr


# ------------------------------------------- more types, written by lycoris-lora in the test

MORE = {
    "boft": {"algo": "boft"},
    "glora": {"algo": "glora"},
    "ia3": {"algo": "ia3"},
    "loha-dora-in": {"algo": "loha", "dora_wd": True, "wd_on_output": False},
    "lokr-both": {"algo": "lokr", "factor": 2, "decompose_both": True},
    "locon-tucker": {"algo": "locon", "use_tucker": True},
}


@pytest.fixture(scope="module")
def more_files(tmp_path_factory) -> Path:
    """Files of the types tests/data/lycoris does not hold, as make_lycoris_files.py writes
    them (lycoris-lora's own network, on tiny-sd's UNet)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make", DATA / "make_lycoris_files.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    out = tmp_path_factory.mktemp("lycoris")
    make.HERE, make.FILES = out, MORE
    make.main()
    return out


@pytest.mark.oracle
def test_more_lycoris_types_are_described_and_not_flagged(more_files):
    expected = {
        "boft": ({"BOFT": 77}, []),
        "glora": ({"GLoRA": 77}, []),
        "ia3": ({"IA3": 77}, []),  # its <stem>.weight vectors are no unknown keys
        "loha-dora-in": ({"LoHa": 77}, []),
        "lokr-both": ({"LoKr": 77}, ["LT118"]),
        # LyCORIS' Tucker LoCon puts lora_mid on 3x3 convs only: the rest are plain LoRA
        "locon-tucker": ({"Tucker LoCon": 16}, ["LT111"]),
    }
    for name, (by_type, found) in expected.items():
        path = more_files / f"{name}.safetensors"
        r = inspect_adapter(path)
        assert r.by_type == by_type, name
        assert codes(validate([path])) == found, name
    rows = {
        m["module"]: m
        for m in inspect_adapter(more_files / "loha-dora-in.safetensors").delta_modules
    }
    assert rows[CONV]["dora_scale"] == "input"
    ia3 = inspect_adapter(more_files / "ia3.safetensors").delta_modules
    assert ia3[0]["structure"] == "vector of 4 scaling the outputs"
    boft = inspect_adapter(more_files / "boft.safetensors")
    assert boft.unsupported == {} and not boft.foreign_modules
    assert boft.delta_modules[0]["structure"] == "2 butterfly factor(s) of 2 blocks 2 x 2"
    tucker_path = more_files / "locon-tucker.safetensors"
    tucker = load_adapter(tucker_path).deltas[CONV]
    report = inspect_adapter(tucker_path, stats=True)
    row = next(r for r in report.stats["delta_modules"] if r["module"] == CONV)
    s = np.linalg.svd(_dense(tucker), compute_uv=False)
    assert row["frobenius"] == pytest.approx(np.linalg.norm(s), rel=1e-9)
