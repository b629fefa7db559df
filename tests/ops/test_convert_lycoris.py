"""``convert --to lora``, and rescale / resize / combine, on the files lycoris-lora wrote
(tests/data/lycoris) and the LyCORIS fixtures: the LoRA written reproduces each module's update
(lycoris-lora's own module weights, float64), the outputs pass ``validate --fail-on warning``,
the CLI's exit codes and messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from lycoris.functional import lokr as ly_lokr
from safetensors.numpy import load_file as read_tensors

from lora_tools.cli import cli
from lora_tools.deltas import merged
from lora_tools.errors import UnsupportedAdapterError, UsageError
from lora_tools.formats import load_adapter, save_adapter
from lora_tools.io.checkpoint import open_checkpoint
from lora_tools.io.safetensors import read_header
from lora_tools.ops.combine import combine_adapters
from lora_tools.ops.convert import convert_adapter
from lora_tools.ops.rescale import rescale_adapter
from lora_tools.ops.resize import resize_adapter
from lora_tools.results import json_schema

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "lycoris"
SD = ROOT / "fixtures" / "bases" / "tiny-sd"
FACTORED = ["loha", "loha-tucker", "lokr", "lokr-tucker"]
#: fp16 factors: the LoRA's product is the update up to the rounding of its factors.
FP16 = 5e-3


def run(*args) -> tuple[int, str]:
    """A command in this process (its output; errors raise)."""
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def run_cli(*args) -> tuple[int, str]:
    """The installed command line: exit code and stderr (one line per error)."""
    proc = subprocess.run(
        [sys.executable, "-m", "lora_tools", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return proc.returncode, proc.stderr


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def base_weight(stem: str) -> np.ndarray:
    """tiny-sd's UNet weight a kohya name stands for."""
    path = stem.removeprefix("lora_unet_")
    with open_checkpoint(SD) as ckpt:
        comp = ckpt.components["unet"]
        for key in comp:
            if key.endswith(".weight") and key[: -len(".weight")].replace(".", "_") == path:
                return np.asarray(comp.open(comp.file_for(key)).read(key), np.float64)
    raise KeyError(stem)


@pytest.mark.parametrize("name", FACTORED)
def test_exact_lora_reproduces_every_update_and_validates(tmp_path, name):
    source = load_adapter(DATA / f"{name}.safetensors")
    result = convert_adapter(source, "lora")
    assert result.exact and len(result.modules) == 77 and result.kept == 0
    assert all(r.relative_error == 0 and r.method == "factors" for r in result.modules)
    out = tmp_path / "lora.safetensors"
    save_adapter(result.adapter, out, refresh_hashes=True)
    lora = load_adapter(out)
    assert not lora.foreign and not lora.deltas and not lora.passthrough
    # kohya names stay kohya: the same stems, now as lora_down / lora_up / alpha
    assert set(lora.modules) == set(source.deltas)
    keys = set(read_tensors(out))
    assert keys == {
        f"{s}.{t}" for s in source.deltas for t in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    for stem, m in source.deltas.items():
        mod = lora.modules[stem]
        assert mod.rank == next(r.exact_rank for r in result.modules if r.key == stem)
        want = m.delta().reshape(m.update_dims[0], -1)
        assert rel(mod.delta().reshape(want.shape), want) < FP16, stem
    code, text = run("validate", out, "--fail-on", "warning")
    assert code == 0, text


def test_lokr_lora_matches_lycoris_own_kron(tmp_path):
    """The written LoRA against lycoris-lora's own rebuild of each LoKr module."""
    source = load_adapter(DATA / "lokr.safetensors")
    tensors = read_tensors(DATA / "lokr.safetensors")
    out = tmp_path / "lora.safetensors"
    save_adapter(convert_adapter(source, "lora").adapter, out)
    lora = load_adapter(out)
    for stem in source.deltas:
        t = {
            k[len(stem) + 1 :]: torch.from_numpy(v.astype(np.float64))
            for k, v in tensors.items()
            if k.startswith(stem + ".")
        }
        ref = ly_lokr.diff_weight(
            t.get("lokr_w1"),
            t.get("lokr_w1_a"),
            t.get("lokr_w1_b"),
            t.get("lokr_w2"),
            t.get("lokr_w2_a"),
            t.get("lokr_w2_b"),
            t.get("lokr_t2"),
            gamma=float(t["alpha"]),
            backend="torch",
        ).numpy()
        assert rel(lora.modules[stem].delta().reshape(ref.shape), ref) < FP16, stem


def test_metadata_describes_a_plain_lora(tmp_path):
    result = convert_adapter(load_adapter(ROOT / "fixtures/kohya/sd-loha.safetensors"), "lora")
    meta = result.adapter.metadata
    assert meta["ss_network_module"] == "networks.lora"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    out = tmp_path / "lora.safetensors"
    save_adapter(result.adapter, out, refresh_hashes=True)
    written = read_header(out).metadata
    assert written["ss_network_dim"] != "2"  # rank r^2 = 4 now
    assert json.loads(written["loratool_history"])[-1]["to"] == "lora"


def test_loha_convolutions_take_the_kernel_from_the_base(tmp_path):
    source = load_adapter(DATA / "loha.safetensors")
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    without = convert_adapter(source, "lora")
    assert without.adapter.modules[conv].down.shape == (4, 36)
    assert any("kernel" in n for n in without.notes)
    with_base = convert_adapter(source, "lora", base=SD)
    assert with_base.adapter.modules[conv].down.shape == (4, 4, 3, 3)
    assert with_base.adapter.modules[conv].kind == "conv" and not with_base.notes
    out = tmp_path / "lora.safetensors"
    save_adapter(with_base.adapter, out)
    code, text = run("validate", out, "--base", SD, "--fail-on", "warning")
    assert code == 0, text


def test_full_diff_needs_a_rule_and_keeps_its_bias_diff(tmp_path):
    source = load_adapter(DATA / "full.safetensors")
    with pytest.raises(UsageError, match="--rank R or --energy E"):
        convert_adapter(source, "lora")
    whole = convert_adapter(source, "lora", energy=1.0)
    assert whole.exact
    low = convert_adapter(source, "lora", rank=1)
    assert {m.rank for m in low.adapter.modules.values()} == {1}
    for stem, m in source.deltas.items():
        want = m.delta().reshape(m.update_dims[0], -1)
        s = np.linalg.svd(want, compute_uv=False)
        row = next(r for r in low.modules if r.key == stem)
        assert row.relative_error == pytest.approx(np.sqrt(np.sum(s[1:] ** 2) / np.sum(s**2)))
        mod = whole.adapter.modules[stem]
        assert rel(mod.delta().reshape(want.shape), want) < FP16
        if m.bias_diff is None:
            assert mod.bias_diff is None
        else:
            assert np.array_equal(mod.bias_diff.numpy(), m.bias_diff.numpy())
    out = tmp_path / "lora.safetensors"
    save_adapter(whole.adapter, out)
    with_bias = {s for s, m in source.deltas.items() if m.bias_diff is not None}
    assert (
        with_bias
        and {k[: -len(".diff_b")] for k in read_tensors(out) if k.endswith(".diff_b")} == with_bias
    )
    code, text = run("validate", out, "--fail-on", "warning")
    assert code == 0, text


def test_weight_decomposed_lora_needs_the_base_and_merges_the_same(tmp_path):
    """A LyCORIS DoRA-weighted LoCon: its LoRA is ``merged(W) - W`` (ComfyUI's weight
    decomposition), so merging the LoRA gives the DoRA module's weight."""
    source = load_adapter(DATA / "locon-dora.safetensors")
    with pytest.raises(UsageError, match="base weight") as caught:
        convert_adapter(source, "lora")
    assert caught.value.kind == "needs-base"
    result = convert_adapter(source, "lora", base=SD, energy=1.0)
    out = tmp_path / "lora.safetensors"
    save_adapter(result.adapter, out)
    lora = load_adapter(out)
    for stem in list(source.deltas)[:12]:
        m = source.deltas[stem]
        W = base_weight(stem)
        want = merged(m, W, dtype=np.float64) - W
        assert rel(lora.modules[stem].delta().reshape(W.shape), want) < FP16, stem
    code, text = run("validate", out, "--base", SD, "--fail-on", "warning")
    assert code == 0, text


def test_oft_lora_is_the_rotation_of_the_base(tmp_path):
    """A diagonal OFT rotates the base weight: its LoRA is ``merged(W) - W`` (loratool's OFT
    merge, checked against ComfyUI's and LyCORIS' elsewhere), exact with --energy 1."""
    source = load_adapter(DATA / "diag-oft.safetensors")
    result = convert_adapter(source, "lora", base=SD, energy=1.0)
    assert result.exact and {r.method for r in result.modules} <= {"dense", "randomized"}
    low = convert_adapter(source, "lora", base=SD, rank=1)
    out = tmp_path / "lora.safetensors"
    save_adapter(result.adapter, out)
    lora = load_adapter(out)
    for stem in list(source.deltas)[:12]:
        m = source.deltas[stem]
        W = base_weight(stem)
        want = merged(m, W, dtype=np.float64) - W
        assert rel(lora.modules[stem].delta().reshape(W.shape), want) < FP16, stem
        s = np.linalg.svd(want.reshape(W.shape[0], -1), compute_uv=False)
        row = next(r for r in low.modules if r.key == stem)
        assert row.relative_error == pytest.approx(
            np.sqrt(np.sum(s[1:] ** 2) / np.sum(s**2)), rel=1e-6
        )
    code, text = run("validate", out, "--base", SD, "--fail-on", "warning")
    assert code == 0, text


def test_cli_convert_to_lora_prints_each_module_and_json(tmp_path):
    out = tmp_path / "lora.safetensors"
    code, text = run("convert", DATA / "lokr.safetensors", "--to", "lora", "--rank", "2", "-o", out)
    assert code == 0, text
    assert "down_blocks_0_resnets_0_conv1" in text and "LoKr" in text
    assert "77 modules converted to LoRA; max relative error" in text
    code, text = run(
        "convert",
        DATA / "loha.safetensors",
        "--to",
        "lora",
        "-o",
        tmp_path / "x.safetensors",
        "--json",
    )
    assert code == 0, text
    doc = json.loads(text[text.index("{") :])
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(doc, json_schema("convert"))
    assert doc["to"] == "lora" and doc["format"] == "kohya" and doc["rule"] == {}
    assert doc["counts"]["converted"] == 77 and doc["summary"]["exact"] is True
    row = doc["modules"][0]
    assert set(row) >= {"module", "type", "rank", "exact_rank", "relative_error", "method"}
    assert row["type"] == "LoHa" and row["rank"] == row["exact_rank"] == 4


@pytest.mark.parametrize(
    ("args", "code", "needles"),
    [
        (["{full}", "--to", "lora"], 2, ["full diff", "--rank R or --energy E"]),
        (["{dora}", "--to", "lora"], 2, ["lora_unet_down_blocks_0_resnets_0_conv1", "--base"]),
        (["{lokr}", "--to", "lora", "--rank", "2", "--energy", "0.5"], 2, ["at most one"]),
        (["{lokr}", "--to", "lora", "--energy", "1.5"], 2, ["(0, 1]"]),
        (["{lokr}", "--to", "lora", "--rank", "0"], 2, [">= 1"]),
        (["{lokr}", "--to", "kohya", "--rank", "2"], 2, ["--to lora"]),
        (["{lokr}", "--to", "lora", "--component", "unet"], 2, ["--component"]),
        (["{lora}", "--to", "lora"], 2, ["nothing to convert"]),
        (["{oft}", "--to", "lora"], 2, ["OFT", "--base"]),
    ],
)
def test_cli_refusals_are_one_line_with_exit_codes(tmp_path, args, code, needles):
    files = {
        "full": DATA / "full.safetensors",
        "dora": DATA / "locon-dora.safetensors",
        "lokr": DATA / "lokr.safetensors",
        "oft": DATA / "diag-oft.safetensors",
        "lora": ROOT / "fixtures/kohya/sd-lora.safetensors",
    }
    argv = [a.format(**files) for a in args]
    out = tmp_path / "o.safetensors"
    got, text = run_cli("convert", *argv, "-o", out)
    assert got == code, text
    line = text.strip()
    assert line.startswith("loratool: error:") and "\n" not in line and "Traceback" not in line
    for needle in needles:
        assert needle in line
    assert not out.exists()


# -- rescale / resize / combine on the other types ---------------------------------------------


@pytest.mark.parametrize("name", [*FACTORED, "full"])
def test_rescale_factor_scales_each_update_exactly_in_its_type(tmp_path, name):
    source = load_adapter(DATA / f"{name}.safetensors")
    result = rescale_adapter(source, factor=-0.75)
    out = tmp_path / "r.safetensors"
    save_adapter(result.adapter, out, refresh_hashes=True)
    back = load_adapter(out)
    assert {m.type for m in back.deltas.values()} == {m.type for m in source.deltas.values()}
    for stem, m in source.deltas.items():
        assert rel(back.deltas[stem].delta(), -0.75 * m.delta()) < 2e-3, stem
        if m.bias_diff is not None:
            assert (
                rel(
                    back.deltas[stem].bias_diff.numpy().astype(np.float64),
                    -0.75 * m.bias_diff.numpy().astype(np.float64),
                )
                < 2e-3
            )
    assert len(result.changed) == 77
    code, text = run("validate", out, "--fail-on", "warning")
    assert code == 0, text


def test_rescale_alpha_keeps_the_update(tmp_path):
    source = load_adapter(DATA / "loha.safetensors")
    result = rescale_adapter(source, alpha=8.0)
    out = tmp_path / "r.safetensors"
    save_adapter(result.adapter, out, refresh_hashes=True)
    back = load_adapter(out)
    for stem, m in source.deltas.items():
        assert back.deltas[stem].alpha == 8.0
        assert rel(back.deltas[stem].delta(), m.delta()) < 2e-3
    # a whole LoKr has no alpha / r scale: kept, and said so
    lokr = rescale_adapter(load_adapter(DATA / "lokr.safetensors"), normalize=True)
    assert any("no alpha / r scale" in n for n in lokr.notes)


def test_rescale_factor_refuses_a_weight_decomposition():
    with pytest.raises(UnsupportedAdapterError, match="dora_scale"):
        rescale_adapter(load_adapter(DATA / "locon-dora.safetensors"), factor=2.0)


def test_resize_writes_the_optimal_lora(tmp_path):
    source = load_adapter(DATA / "loha-tucker.safetensors")
    result = resize_adapter(source, rank=2)
    assert all(r.changed and r.new_rank <= 2 for r in result.modules)
    for row in result.modules:
        m = source.deltas[row.key]
        s = np.linalg.svd(m.delta().reshape(m.update_dims[0], -1), compute_uv=False)
        assert row.relative_error == pytest.approx(np.sqrt(np.sum(s[2:] ** 2) / np.sum(s**2)))
        assert row.old_rank == 4
    out = tmp_path / "r.safetensors"
    save_adapter(result.adapter, out, refresh_hashes=True)
    assert not load_adapter(out).deltas
    code, text = run("validate", out, "--fail-on", "warning")
    assert code == 0, text
    code, text = run_cli(
        "resize", DATA / "locon-dora.safetensors", "--rank", "2", "-o", tmp_path / "d"
    )
    assert code == 2 and "--base" in text
    code, text = run(
        "resize",
        DATA / "locon-dora.safetensors",
        "--energy",
        "0.9",
        "--base",
        SD,
        "-o",
        tmp_path / "d.safetensors",
    )
    assert code == 0, text


def test_combine_converts_each_module_exactly_first():
    loha = load_adapter(DATA / "loha.safetensors")
    lokr = load_adapter(DATA / "lokr.safetensors")
    result = combine_adapters([loha, lokr], weights=[1.0, -0.5])
    assert all(r.relative_error == 0 for r in result.modules)
    for stem in loha.deltas:
        a, b = loha.deltas[stem], lokr.deltas[stem]
        want = a.delta().reshape(a.update_dims[0], -1) - 0.5 * b.delta().reshape(
            b.update_dims[0], -1
        )
        got = result.adapter.modules[stem].delta()
        assert rel(got.reshape(want.shape), want) < FP16, stem
    with pytest.raises(UsageError, match="base weight") as caught:
        combine_adapters([load_adapter(DATA / "locon-dora.safetensors")])
    assert caught.value.kind == "needs-base"
    code, text = run_cli("combine", DATA / "locon-dora.safetensors", "-o", "unused.safetensors")
    assert code == 2 and "pass --base" in text


# -- PEFT's types: the LoRA written loads in PEFT and merges to what the original merges to ----

PEFT_TYPES = ["loha", "loha-tucker", "lokr", "adalora", "vera", "fourierft", "ia3", "oft", "boft"]


@pytest.mark.parametrize("name", PEFT_TYPES)
def test_peft_types_become_a_lora_peft_merges_the_same(tmp_path, name):
    """Oracle: PEFT. The original adapter's ``merge_and_unload`` (float64) against PEFT loading
    the converted LoRA folder (``PeftModel.from_pretrained``) and merging it."""
    import copy
    import warnings

    import peft
    import peft.tuners.boft.layer as boft_layer

    from lora_tools.io.safetensors import save_tensors
    from tests.deltas import test_peft_types as pt

    warnings.filterwarnings("ignore", category=UserWarning)
    boft_layer.get_fbd_cuda = lambda: None  # CPU: PEFT's torch.block_diag fallback
    folder, base, weights, _, merged64 = pt._write(tmp_path, name)
    base_file = tmp_path / "base.safetensors"
    save_tensors(base_file, {k: v.numpy() for k, v in weights.items()})
    source = load_adapter(folder)
    if name == "ia3":
        # IA3 on the outputs scales the layer's bias too: no LoRA carries that
        with pytest.raises(UnsupportedAdapterError, match="scales the base layer's bias"):
            convert_adapter(source, "lora", base=base_file, energy=1.0)
        unbiased = {k: (v * 0 if k.endswith(".bias") else v) for k, v in weights.items()}
        save_tensors(base_file, {k: v.numpy() for k, v in unbiased.items()})
    exact = name in ("loha", "loha-tucker", "lokr", "adalora")
    result = convert_adapter(source, "lora", base=base_file, **({} if exact else {"energy": 1.0}))
    assert result.exact and {r.method for r in result.modules} == (
        {"factors"} if exact else {"dense"}
    )
    out = tmp_path / "lora"
    save_adapter(result.adapter, out, refresh_hashes=True)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base).double(), out)
    got = model.merge_and_unload().state_dict()
    for m in source.deltas.values():
        key = m.path + ".weight"
        want = merged64[key].numpy() - weights[key].double().numpy()
        assert rel(got[key].numpy() - weights[key].double().numpy(), want) < 1e-6, (name, key)
    code, text = run("validate", out, "--fail-on", "warning")
    assert code == 0, text
