"""PEFT's other adapter types against PEFT itself: files written by ``save_pretrained`` of tiny
models (Linear, Conv2d, GPT-2 Conv1D) with every trained tensor randomised, read by loratool.

Oracles: PEFT's ``merge_and_unload`` of the same model in float32 (loratool's float32 merge must
equal it bit for bit) and in float64 (loratool's float64 update ``delta`` must equal PEFT's
``W' - W`` within float64 rounding).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_tools import deltas
from lora_tools.deltas import PEFT, DeltaError
from lora_tools.deltas import peft_types as pt
from lora_tools.formats import load_adapter
from lora_tools.ops.inspect import inspect_adapter
from lora_tools.ops.validate import validate


class Tiny(nn.Module):
    """One layer of each kind PEFT's types target."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 12)
        self.ff = nn.Linear(12, 8)
        self.conv = nn.Conv2d(4, 6, 3)
        self.c1d = Conv1D(10, 8)  # GPT-2's layer: weight [in 8, out 10]
        self.sq = Conv1D(8, 8)  # square: only fan_in_fan_out tells its orientation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


CONFIGS = {
    "loha": lambda: peft.LoHaConfig(
        r=2,
        alpha=3,
        target_modules=["lin", "conv"],
        rank_pattern={"conv": 3},
        alpha_pattern={"lin": 5},
    ),
    "loha-tucker": lambda: peft.LoHaConfig(
        r=2, alpha=3, target_modules=["lin", "conv"], use_effective_conv2d=True
    ),
    "lokr": lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=["lin", "conv"]),
    "lokr-decomposed": lambda: peft.LoKrConfig(
        r=1,
        alpha=3,
        target_modules=["lin", "conv", "ff"],
        decompose_both=True,
        use_effective_conv2d=True,
    ),
    "ia3": lambda: peft.IA3Config(target_modules=["lin", "ff", "conv"], feedforward_modules=["ff"]),
    "ia3-feedforward": lambda: peft.IA3Config(
        target_modules=["lin", "ff", "conv"], feedforward_modules=["lin", "conv"]
    ),
    "ia3-conv1d": lambda: peft.IA3Config(
        target_modules=["c1d", "sq"], feedforward_modules=["sq"], fan_in_fan_out=True
    ),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=["lin", "conv"]),
    "oft-coft": lambda: peft.OFTConfig(
        r=0, oft_block_size=4, target_modules=["lin", "conv"], coft=True, eps=1e-2
    ),
    "oft-shared-cayley": lambda: peft.OFTConfig(
        r=0, oft_block_size=4, target_modules=["lin"], block_share=True, use_cayley_neumann=False
    ),
    "boft": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=["lin", "conv"]),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=["lin", "ff", "c1d"], save_projection=True),
    "adalora": lambda: peft.AdaLoraConfig(
        init_r=4, target_r=2, target_modules=["lin", "ff", "c1d"], total_step=10, lora_alpha=6
    ),
    "fourierft": lambda: peft.FourierFTConfig(n_frequency=20, target_modules=["lin", "ff"]),
}
TYPE_OF = {
    "loha": "LoHa",
    "lokr": "LoKr",
    "ia3": "IA3",
    "oft": "OFT",
    "boft": "BOFT",
    "vera": "VeRA",
    "adalora": "AdaLoRA",
    "fourierft": "FourierFT",
}
#: Trained tensors that PEFT initialises around 1 (scales), randomised around 1 here too.
AROUND_ONE = ("ia3_l", "boft_s")


@pytest.fixture(autouse=True)
def _no_cuda_build(monkeypatch):
    # BOFT tries to compile its CUDA extension at layer creation; on CPU it falls back to
    # torch.block_diag (one butterfly factor), which is what these tests compare with.
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)
    warnings.filterwarnings("ignore", category=UserWarning)


def _write(tmp_path, name: str):
    """``(adapter folder, base state dict, float32 merge, float64 merge)`` for CONFIGS[name]."""
    torch.manual_seed(0)
    base = Tiny()
    weights = {k: v.detach().clone() for k, v in base.state_dict().items()}
    model = peft.get_peft_model(copy.deepcopy(base), CONFIGS[name]())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if p.requires_grad:
                around = 1.0 if key.split(".")[-2] in AROUND_ONE else 0.0
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + around)
    folder = tmp_path / name
    model.save_pretrained(folder)
    wide = copy.deepcopy(model).double()
    merged64 = wide.merge_and_unload().state_dict()
    merged32 = model.merge_and_unload().state_dict()
    return folder, base, weights, merged32, merged64


def _oriented(base: nn.Module, path: str, w: torch.Tensor) -> np.ndarray:
    """A weight in the update's orientation: GPT-2 Conv1D weights are stored [in, out]."""
    a = w.detach().numpy()
    return a.T if isinstance(getattr(base, path), Conv1D) else a


@pytest.mark.parametrize("name", list(CONFIGS))
def test_merge_is_peft_bit_for_bit_and_delta_is_peft_in_float64(tmp_path, name):
    folder, base, weights, merged32, merged64 = _write(tmp_path, name)
    adapter = load_adapter(folder)
    kind = TYPE_OF[name.split("-")[0]]
    assert adapter.deltas and not adapter.modules
    assert set(adapter.deltas) == {s for stems in adapter.foreign.values() for s in stems}
    for m in adapter.deltas.values():
        assert (m.type, m.convention, m.computed) == (kind, PEFT, True)
        key = f"{m.path}.weight"
        w32 = _oriented(base, m.path, weights[key])
        got = deltas.merged(m, w32, 1.0, np.float32)
        assert got.dtype == np.float32 and got.shape == w32.shape
        np.testing.assert_array_equal(got, _oriented(base, m.path, merged32[key]), err_msg=key)
        w64 = w32.astype(np.float64)
        ref = _oriented(base, m.path, merged64[key]) - w64
        got64 = m.delta(w64)
        assert got64.dtype == np.float64 and np.abs(ref).max() > 0
        # PEFT computes FourierFT's update in float32 even in a float64 model
        atol = 1e-6 * np.abs(ref).max() if kind == "FourierFT" else 1e-12 * np.abs(w64).max()
        np.testing.assert_allclose(got64, ref, rtol=0, atol=atol, err_msg=key)


@pytest.mark.parametrize("name", ["loha", "lokr-decomposed", "vera", "adalora"])
def test_delta_is_peft_get_delta_weight(tmp_path, name):
    """The additive types: ``delta`` is PEFT's own ``get_delta_weight`` (float64 model)."""
    folder, base, weights, _, _ = _write(tmp_path, name)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).double()
    adapter = load_adapter(folder)
    for m in adapter.deltas.values():
        layer = model.base_model.model.get_submodule(m.path)
        ref = layer.get_delta_weight("default").detach().numpy()
        w64 = _oriented(base, m.path, weights[f"{m.path}.weight"]).astype(np.float64)
        np.testing.assert_allclose(
            m.delta(w64), _oriented(base, m.path, torch.from_numpy(ref)), rtol=1e-12, atol=1e-14
        )


@pytest.mark.parametrize("name", ["loha-tucker", "oft", "boft", "vera", "adalora"])
def test_numpy_fallback_differs_from_peft_in_the_last_bits_only(tmp_path, monkeypatch, name):
    """Without torch the float32 merge runs PEFT's operations in numpy: its matrix products
    round differently, by at most a few float32 ulps of the weight's scale (measured: 2, OFT
    and BOFT; docs/math.md)."""
    folder, base, weights, merged32, _ = _write(tmp_path, name)
    monkeypatch.setattr(pt, "USE_TORCH", False)
    worst = 0.0
    for m in load_adapter(folder).deltas.values():
        key = f"{m.path}.weight"
        w32 = _oriented(base, m.path, weights[key])
        ref = _oriented(base, m.path, merged32[key])
        got = deltas.merged(m, w32, 1.0, np.float32)
        worst = max(worst, float(np.abs(got - ref).max() / np.spacing(np.abs(ref).max())))
    assert 0 < worst <= 4  # 0: the fallback was not taken


def test_rank_and_alpha_patterns_give_each_module_its_scale(tmp_path):
    folder, *_ = _write(tmp_path, "loha")
    adapter = load_adapter(folder)
    lin, conv = adapter.deltas["base_model.model.lin"], adapter.deltas["base_model.model.conv"]
    assert (lin.rank, lin.alpha, lin.scale) == (2, 5.0, 2.5)  # alpha_pattern {"lin": 5}
    assert (conv.rank, conv.alpha, conv.scale) == (3, 3.0, 1.0)  # rank_pattern {"conv": 3}
    assert conv.delta_shape == (6, 36)  # no use_effective_conv2d: hada_w1_b is [r, 4 * 3 * 3]


def test_lokr_scales_by_alpha_over_r_with_both_factors_whole(tmp_path):
    folder, *_ = _write(tmp_path, "lokr")
    for m in load_adapter(folder).deltas.values():
        assert {"lokr_w1", "lokr_w2"} <= set(m.tensors) and m.scale == 1.5  # LyCORIS: 1


def test_ia3_feedforward_modules_decide_rows_or_columns(tmp_path):
    folder, *_ = _write(tmp_path, "ia3")
    adapter = load_adapter(folder)
    ff = {m.path: m.options["feedforward"] for m in adapter.deltas.values()}
    assert ff == {"lin": False, "ff": True, "conv": False}
    assert adapter.deltas["base_model.model.ff"].update_dims == (None, 12)
    assert adapter.deltas["base_model.model.lin"].update_dims == (12, None)


def test_ia3_merge_scales_the_bias_of_a_non_feedforward_layer(tmp_path):
    folder, _base, weights, merged32, _ = _write(tmp_path, "ia3")
    for m in load_adapter(folder).deltas.values():
        key = f"{m.path}.bias"
        got = pt.PEFT_TYPES["IA3"].merged_bias(m, weights[key].numpy())
        np.testing.assert_array_equal(got, merged32[key].numpy())
        assert np.array_equal(got, weights[key].numpy()) == m.options["feedforward"]


@pytest.mark.parametrize("name", ["ia3-conv1d", "vera", "adalora"])
def test_a_conv1d_weight_as_stored_is_refused_not_reshaped(tmp_path, name):
    folder, _base, weights, *_ = _write(tmp_path, name)
    m = load_adapter(folder).deltas["base_model.model.c1d"]
    stored = weights["c1d.weight"].numpy()  # [in 8, out 10]
    with pytest.raises(DeltaError, match="transposed|does not fit|elements"):
        deltas.merged(m, stored, 1.0, np.float32)
    assert m.options["fan_in_fan_out"]  # PEFT turns it on in the saved config for a Conv1D


def test_strength_blends_the_rotated_weight(tmp_path):
    folder, _base, weights, _merged32, _ = _write(tmp_path, "oft")
    m = load_adapter(folder).deltas["base_model.model.lin"]
    w = weights["lin.weight"].numpy().astype(np.float64)
    half = deltas.merged(m, w, 0.5, np.float64)
    np.testing.assert_allclose(half, w + 0.5 * m.delta(w), rtol=1e-12)
    np.testing.assert_array_equal(deltas.merged(m, w, 0.0, np.float64), w)


def test_boft_butterfly_permutations_are_peft_s():
    from peft.tuners.boft.layer import BOFTLayer

    for n, blocks, half, factors in [(16, 4, 2, 1), (32, 4, 2, 2), (32, 8, 1, 2), (24, 6, 2, 1)]:
        for i in range(factors + 1):
            b = blocks // 2**i
            want = BOFTLayer.block_butterfly_perm(None, n, b, half, factors).numpy()
            np.testing.assert_array_equal(pt.butterfly_perm(n, b, half, factors), want)


@pytest.mark.parametrize(
    "name", ["loha", "lokr", "ia3", "oft", "boft", "vera", "adalora", "fourierft"]
)
def test_inspect_and_validate_read_the_modules(tmp_path, name):
    folder, *_ = _write(tmp_path, name)
    report = inspect_adapter(folder)
    kind = TYPE_OF[name]
    count = len(load_adapter(folder).deltas)
    assert report.by_type == {kind: count} and report.counts["delta_modules"] == count
    assert report.unsupported == {}
    rows = {row["module"]: row for row in report.to_json()["delta_modules"]}
    assert all(row["type"] == kind for row in rows.values())
    codes = [f.rule.code for f in validate([str(folder)]).files[0].findings]
    assert "LT110" not in codes and "LT117" not in codes and "LT116" not in codes


def test_validate_reports_a_tensor_that_breaks_a_peft_module(tmp_path):
    from safetensors.torch import load_file, save_file

    folder, *_ = _write(tmp_path, "loha")
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    del tensors["base_model.model.lin.hada_w2_b"]
    for role in ("hada_w1_a", "hada_w2_a"):  # rank 2, where rank_pattern says 3
        tensors[f"base_model.model.conv.{role}"] = tensors[f"base_model.model.conv.{role}"][
            :, :2
        ].contiguous()
    for role in ("hada_w1_b", "hada_w2_b"):
        tensors[f"base_model.model.conv.{role}"] = tensors[f"base_model.model.conv.{role}"][:2]
    save_file(tensors, weights, {"format": "pt"})
    findings = {f.rule.code: f for f in validate([str(folder)]).files[0].findings}
    assert "hada_w2_b" in findings["LT116"].message
    assert "rank_pattern" in findings["LT117"].message
    assert set(load_adapter(folder).deltas) == set()


def test_vera_without_its_projection_stays_uncomputed(tmp_path):
    from safetensors.torch import load_file, save_file

    folder, *_ = _write(tmp_path, "vera")
    weights = folder / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(weights).items() if not k.startswith("base_model.vera_")}
    save_file(tensors, weights, {"format": "pt"})
    adapter = load_adapter(folder)
    assert adapter.deltas == {} and len(adapter.foreign["VeRA"]) == 3
    codes = [f.rule.code for f in validate([str(folder)]).files[0].findings]
    assert "LT110" in codes


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loratool_merge_is_peft_merge_and_unload(tmp_path, name):
    """``loratool merge`` of the file into the base's safetensors equals PEFT's merged model,
    every weight bit for bit (float32). Left out: a square Conv1D outside a GPT-2 model type
    (``sq``: no shape nor name says it is stored ``[in, out]``), and biases, which PEFT's IA3
    also scales (``merged_bias``; the merge engine leaves them)."""
    from safetensors.numpy import load_file
    from safetensors.torch import save_file

    from lora_tools.ops.merge import merge

    folder, _base, weights, merged32, _ = _write(tmp_path, name)
    base_file = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, base_file)
    merge(base_file, [str(folder)], tmp_path / "merged.safetensors")
    out = load_file(tmp_path / "merged.safetensors")
    changed = 0
    for key, value in out.items():
        if key.endswith(".bias") or key == "sq.weight":
            continue
        np.testing.assert_array_equal(value, merged32[key].numpy(), err_msg=key)
        changed += not np.array_equal(value, weights[key].numpy())
    assert changed == len(load_adapter(folder).deltas) - (name == "ia3-conv1d")


def test_boft_with_several_butterfly_factors_is_peft_s(tmp_path, monkeypatch):
    """PEFT builds more than one butterfly factor only with its CUDA block-diagonal kernel:
    stand it in with torch.block_diag per factor (what the kernel computes) and compare."""
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: object())
    monkeypatch.setattr(
        boft_layer.FastBlockDiag,
        "apply",
        staticmethod(lambda x: torch.stack([torch.block_diag(*torch.unbind(f)) for f in x])),
    )
    monkeypatch.setitem(
        CONFIGS,
        "boft-butterfly",
        lambda: peft.BOFTConfig(
            boft_block_size=2, boft_n_butterfly_factor=2, target_modules=["lin", "conv"]
        ),
    )
    folder, _base, weights, merged32, merged64 = _write(tmp_path, "boft-butterfly")
    for m in load_adapter(folder).deltas.values():
        assert m.shape("boft_R")[0] == 2
        key = f"{m.path}.weight"
        w = weights[key].numpy()
        np.testing.assert_array_equal(deltas.merged(m, w, 1.0, np.float32), merged32[key].numpy())
        ref = merged64[key].numpy() - w.astype(np.float64)
        np.testing.assert_allclose(m.delta(w.astype(np.float64)), ref, atol=1e-12, rtol=0)


def test_adalora_factors_make_its_update(tmp_path):
    folder, _base, weights, *_ = _write(tmp_path, "adalora")
    for m in load_adapter(folder).deltas.values():
        up, down = m.spec.factors(m, np.dtype(np.float64))
        w = weights[f"{m.path}.weight"].numpy().astype(np.float64)
        w = w.T if m.path == "c1d" else w
        np.testing.assert_allclose(up @ down * m.scale, m.delta(w), rtol=1e-13)
        assert up.shape[1] == m.rank == 4


def test_validate_reports_an_ia3_vector_on_the_side_the_config_does_not_say(tmp_path):
    import json

    folder, *_ = _write(tmp_path, "ia3")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["feedforward_modules"] = ["lin"]  # lin's ia3_l is [12, 1]: an output scale
    (folder / "adapter_config.json").write_text(json.dumps(config))
    findings = [f for f in validate([str(folder)]).files[0].findings if f.rule.code == "LT117"]
    assert len(findings) == 2  # lin (listed, scales outputs) and ff (unlisted, scales inputs)
    assert all("feedforward_modules" in f.message for f in findings)
    assert set(load_adapter(folder).deltas) == {"base_model.model.conv"}


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("loha", {"r": "2"}),
        ("loha", {"alpha": "x", "alpha_pattern": {}}),
        ("adalora", {"lora_alpha": None}),
        ("adalora", {"init_r": [4]}),
        ("ia3", {"feedforward_modules": "(a+)+$"}),
        ("ia3", {"feedforward_modules": 3}),
    ],
)
def test_hostile_config_values_are_findings_not_crashes(tmp_path, name, change):
    import json

    folder, *_ = _write(tmp_path, name)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    adapter = load_adapter(folder)
    computed = len(adapter.deltas)
    codes = [f.rule.code for f in validate([str(folder)]).files[0].findings]
    if name == "ia3":  # a pattern matching nothing: no module is feed-forward
        assert not any(m.options["feedforward"] for m in adapter.deltas.values())
    else:  # (loha's conv takes its r from rank_pattern)
        assert computed < len(adapter.foreign[TYPE_OF[name]]) and "LT117" in codes
