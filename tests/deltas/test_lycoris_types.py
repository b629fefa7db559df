"""OFT, BOFT, GLoRA and IA3 against lycoris-lora's own modules, and every type's merged weight
against ComfyUI's (tests/deltas/comfy_reference.py), with the places where the references
disagree measured.

LyCORIS is the oracle of what a file means: its modules' ``get_merged_weight`` /
``get_diff_weight`` (for these four types they apply the scale once; LoHa's and LoKr's
``get_diff_weight`` apply it twice), in float64. LyCORIS inverts ``I - Q`` in float32 ("to
prevent unsupported type"); :func:`float64_inverse` keeps float64 there so that the oracle is
exact.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from lycoris.modules.boft import ButterflyOFTModule
from lycoris.modules.diag_oft import DiagOFTModule
from lycoris.modules.glora import GLoRAModule
from lycoris.modules.ia3 import IA3Module

from lora_tools.deltas import (
    BOFT,
    DORA_LORA,
    FULL,
    GLORA,
    IA3,
    LOHA,
    LOKR,
    OFT,
    TUCKER_LOCON,
    TYPES,
    DeltaError,
    DeltaModule,
    build,
    merged,
    module_type,
)
from lora_tools.deltas.lycoris_types import cayley
from lora_tools.formats import load_adapter
from lora_tools.io.safetensors import ArrayTensor
from tests.deltas import comfy_reference as comfy

ROOT = Path(__file__).resolve().parents[2]
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)


@contextlib.contextmanager
def float64_inverse():
    """LyCORIS' ``(I - Q).float().inverse()`` stays float64 on float64 tensors."""
    original = torch.Tensor.float

    def keep(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    torch.Tensor.float = keep
    try:
        yield
    finally:
        torch.Tensor.float = original


def from_state_dict(state: dict[str, torch.Tensor], stem: str = "m") -> DeltaModule:
    parts = {
        key.removesuffix(".weight"): (f"{stem}.{key}", ArrayTensor(v.detach().numpy()))
        for key, v in state.items()
    }
    module = build(stem, parts)
    assert module is not None, sorted(state)
    return module


def f32_close(ours: np.ndarray, ref, ulps: float = 8) -> None:
    """Equal to float32 rounding: within ``ulps`` float32 epsilons of the largest value."""
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    tol = ulps * np.finfo(np.float32).eps * max(1.0, float(np.abs(ref).max()))
    assert float(np.abs(ours - ref).max()) <= tol


# ------------------------------------------------------------- LyCORIS' modules, in float64

#: (module class, its options, whether LyCORIS' strength is W + s (W' - W) as loratool's)
CASES = {
    "oft": (DiagOFTModule, {"lora_dim": 2}, True),
    "oft-constrained": (DiagOFTModule, {"lora_dim": 4, "constraint": 2**-7}, True),
    "oft-rescaled": (DiagOFTModule, {"lora_dim": 2, "rescaled": True}, False),
    "boft": (ButterflyOFTModule, {"lora_dim": 2}, False),
    "boft-constrained-rescaled": (
        ButterflyOFTModule,
        {"lora_dim": 2, "constraint": 2**-7, "rescaled": True},
        False,
    ),
    "glora": (GLoRAModule, {"lora_dim": 2, "alpha": 1.0}, True),
    "ia3": (IA3Module, {}, True),
    "ia3-on-input": (IA3Module, {"train_on_input": True}, True),
}
LAYERS = {
    "linear": lambda: torch.nn.Linear(6, 16, bias=False),
    "conv": lambda: torch.nn.Conv2d(4, 16, 3, bias=False),
}


def lycoris_module(case: str, layer: str, seed: int = 0):
    cls, options, _ = CASES[case]
    torch.manual_seed(seed)
    base = LAYERS[layer]().double()
    module = cls("m", base, 1.0, **options).double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module, base.weight.detach().numpy()


@pytest.mark.oracle
@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_and_delta_equal_lycoris_modules(case, layer):
    module, w = lycoris_module(case, layer)
    m = from_state_dict(module.state_dict())
    with float64_inverse(), torch.no_grad():
        want = module.get_merged_weight(1.0)[0].numpy()
        want_diff = module.get_diff_weight(1.0)[0].numpy()
        half = module.get_merged_weight(0.5)[0].numpy()
    assert m.type == {"o": OFT, "b": BOFT, "g": GLORA, "i": IA3}[case[0]] and m.needs_base
    assert np.abs(want - w).max() > 0.01  # the module changes the weight
    np.testing.assert_allclose(merged(m, w, 1.0, F64), want, rtol=0, atol=1e-13)
    np.testing.assert_allclose(m.delta(w), want_diff, rtol=0, atol=1e-13)
    f32_close(merged(m, w, 1.0, F32), want)
    ours_half = merged(m, w, 0.5, F64)
    np.testing.assert_allclose(ours_half, w + 0.5 * (want - w), rtol=0, atol=1e-13)
    if CASES[case][2]:
        np.testing.assert_allclose(ours_half, half, rtol=0, atol=1e-13)
    else:  # LyCORIS interpolates BOFT's stages / leaves OFT's rescale whole: not linear
        assert np.abs(ours_half - half).max() > 1e-4


@pytest.mark.oracle
def test_the_oft_constraint_is_alpha_times_the_outputs():
    """LyCORIS stores ``constraint`` as alpha and bounds ``||Q||`` by ``alpha * out``: the
    bound bites here (the unconstrained rotation differs) and loratool applies it."""
    module, w = lycoris_module("oft-constrained", "linear")
    m = from_state_dict(module.state_dict())
    assert m.alpha == 2**-7 and m.spec.constraint(m) == 2**-7 * 16
    free = from_state_dict({k: v for k, v in module.state_dict().items() if k != "alpha"})
    with float64_inverse(), torch.no_grad():
        want = module.get_merged_weight(1.0)[0].numpy()
    assert np.abs(merged(free, w, 1.0, F64) - want).max() > 1e-3
    np.testing.assert_allclose(merged(m, w, 1.0, F64), want, rtol=0, atol=1e-13)


def test_old_oft_diag_holds_the_rotations():
    """An old LyCORIS ``oft_diag`` is ``R`` itself (AUTOMATIC1111's ``is_R`` path): the Cayley
    rotations of a module's blocks, stored so, merge to the same weight, and alpha is unused."""
    module, w = lycoris_module("oft", "conv")
    m = from_state_dict(module.state_dict())
    rotations = cayley(m.array("oft_blocks"), 0.0)
    old = DeltaModule("m", OFT, {"oft_diag": ArrayTensor(rotations)}, alpha=2**-7)
    assert old.update_dims == (16, None)
    np.testing.assert_allclose(merged(old, w, 1.0, F64), merged(m, w, 1.0, F64), atol=1e-14)


def test_a_module_that_does_not_fit_its_base_is_a_delta_error():
    module, _ = lycoris_module("boft", "linear")
    m = from_state_dict(module.state_dict())
    assert m.update_dims == (16, None) and m.kind == "linear"
    with pytest.raises(DeltaError, match="16 output rows"):
        merged(m, np.zeros((8, 6)))
    with pytest.raises(DeltaError, match="pass base"):
        m.delta()
    ia3 = from_state_dict(lycoris_module("ia3-on-input", "conv")[0].state_dict())
    assert ia3.update_dims == (None, None) and ia3.kind == "conv"
    with pytest.raises(DeltaError, match="4 input channels"):
        merged(ia3, np.zeros((16, 5, 3, 3)))
    glora = from_state_dict(lycoris_module("glora", "conv")[0].state_dict())
    assert glora.update_dims == (16, 36) and glora.rank == 2 and glora.scale == 0.5
    with pytest.raises(DeltaError, match="16 x 36 update"):
        merged(glora, np.zeros((16, 4, 1, 1)))


def test_types_are_told_apart_and_computed():
    assert all(TYPES[t].computed for t in (OFT, BOFT, GLORA, IA3))
    assert module_type({"oft_blocks", "alpha"}) == OFT
    assert module_type({"weight", "on_input"}) == IA3 and module_type({"weight"}) is None
    assert module_type({"a1", "a2", "b1", "b2", "alpha"}) == GLORA
    blocks = {"oft_blocks": ("m.oft_blocks", ArrayTensor(np.zeros((2, 4, 2, 2))))}
    assert build("m", blocks).type == BOFT
    blocks = {"oft_blocks": ("m.oft_blocks", ArrayTensor(np.zeros((4, 2, 2))))}
    assert build("m", blocks).type == OFT


# ------------------------------------------------------- files lycoris-lora writes, read back

MAKE = ROOT / "tests" / "data" / "lycoris" / "make_lycoris_files.py"
FILES = {
    "diag-oft": {"algo": "diag-oft"},
    "diag-oft-constrained": {"algo": "diag-oft", "constraint": 2**-7},
    "diag-oft-rescaled": {"algo": "diag-oft", "rescaled": True},
    "boft": {"algo": "boft", "rescaled": True},
    "glora": {"algo": "glora"},
    "ia3": {"algo": "ia3"},
    "locon-dora": {"algo": "locon", "dora_wd": True},
}


def lycoris_files_maker():
    """tests/data/lycoris/make_lycoris_files.py as a module (its ``write_network``)."""
    spec = importlib.util.spec_from_file_location("make_lycoris_files", MAKE)
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    return make


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """name -> (file, {module name: (LyCORIS module, base weight)}): each file as
    tests/data/lycoris/make_lycoris_files.py writes it (lycoris' kohya network on tiny-sd's
    UNet), in float32 so that the file holds the module's values exactly."""
    make = lycoris_files_maker()
    out = tmp_path_factory.mktemp("lycoris-types")
    preset = out / "preset.toml"
    preset.write_text(make.PRESET)
    files = {}
    for i, (name, args) in enumerate(FILES.items()):
        path = out / f"{name}.safetensors"
        net = make.write_network(path, args, seed=i, preset=preset, noise=0.05, dtype=torch.float32)
        modules = {m.lora_name: (m, m.org_weight.detach().double().numpy()) for m in net.loras}
        files[name] = (path, modules)
    return files


@pytest.mark.oracle
@pytest.mark.parametrize("name", [n for n in FILES if n != "locon-dora"])
def test_files_lycoris_writes_merge_as_lycoris_merges_them(written, name):
    path, modules = written[name]
    adapter = load_adapter(path)
    assert set(adapter.deltas) == set(modules) and len(modules) == 77
    worst, constrained = 0.0, 0
    for stem, (module, w) in modules.items():
        m = adapter.deltas[stem]
        with float64_inverse(), torch.no_grad():
            module.org_module[0].double()  # the base layer is no submodule of the module
            want = module.double().get_merged_weight(1.0)[0].numpy()
        ours = merged(m, w, 1.0, F64)
        worst = max(worst, float(np.abs(ours - want).max()))
        f32_close(merged(m, w, 1.0, F32), want)
        if m.alpha:
            free = DeltaModule(stem, m.type, m.tensors)
            constrained += np.abs(merged(free, w, 1.0, F64) - ours).max() > 1e-6
    assert worst < 1e-12
    if name == "diag-oft-constrained":
        assert constrained > 10  # the bound bites on these modules


def test_ia3_files_say_their_side():
    m = DeltaModule(
        "m", IA3, {"weight": ArrayTensor(np.ones(4)), "on_input": ArrayTensor(np.array(1))}
    )
    w = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(merged(m, w, 0.5, F64), w * 1.5)
    parts = {
        "weight": ("m.weight", ArrayTensor(np.ones(3))),
        "on_input": ("m.on_input", ArrayTensor(np.array(0, np.int64))),
    }
    out = build("m", parts)
    assert out.options["on_input"] == 0 and out.update_dims == (3, None)
    np.testing.assert_array_equal(merged(out, w, 1.0, F64), w * 2)


# ---------------------------------------------------------------- ComfyUI's calculate_weight


def _tensors(rng, shapes: dict[str, tuple[int, ...]], scale=0.3) -> dict[str, np.ndarray]:
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}


def _module(kind, t, alpha=None, dora=None) -> DeltaModule:
    tensors = {k: ArrayTensor(v) for k, v in t.items()}
    if dora is not None:
        tensors["dora_scale"] = ArrayTensor(dora)
    return DeltaModule("m", kind, tensors, alpha=alpha)


def _comfy(kind, w, t, alpha, strength, dora=None, fixed=False):
    if kind in (DORA_LORA, TUCKER_LOCON):
        return comfy.lora(
            w, t["lora_up"], t["lora_down"], alpha, strength, t.get("lora_mid"), dora, fixed
        )
    if kind == LOHA:
        return comfy.loha(w, t, alpha, strength, dora, fixed)
    if kind == LOKR:
        return comfy.lokr(w, t, alpha, strength, dora, fixed)
    if kind == GLORA:
        return comfy.glora(w, t["a1"], t["a2"], t["b1"], t["b2"], alpha, strength, dora, fixed)
    if kind == OFT:
        return comfy.oft(w, t["oft_blocks"], alpha, strength, t.get("rescale"))
    if kind == BOFT:
        return comfy.boft(w, t["oft_blocks"], alpha, strength, t.get("rescale"))
    if kind == FULL:
        return torch.as_tensor(w) + strength * torch.as_tensor(t["diff"])
    raise AssertionError(kind)


#: name -> (type, base shape, tensor shapes, alpha)
COMFY_CASES = {
    "loha": (LOHA, (8, 6), {"hada_w1_a": (8, 2), "hada_w1_b": (2, 6), "hada_w2_a": (8, 2),
                            "hada_w2_b": (2, 6)}, 1.0),
    "loha-tucker": (LOHA, (8, 4, 3, 3), {"hada_w1_a": (2, 8), "hada_w1_b": (2, 4),
                                         "hada_t1": (2, 2, 3, 3), "hada_w2_a": (2, 8),
                                         "hada_w2_b": (2, 4), "hada_t2": (2, 2, 3, 3)}, 1.0),
    "lokr-whole": (LOKR, (8, 6), {"lokr_w1": (2, 2), "lokr_w2": (4, 3)}, 3.0),
    "lokr": (LOKR, (8, 6), {"lokr_w1": (2, 2), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 3)}, 0.5),
    "lokr-conv": (LOKR, (8, 4, 3, 3), {"lokr_w1": (2, 2), "lokr_w2": (4, 2, 3, 3)}, None),
    "lokr-tucker": (LOKR, (8, 4, 3, 3), {"lokr_w1": (2, 2), "lokr_t2": (2, 2, 3, 3),
                                         "lokr_w2_a": (2, 4), "lokr_w2_b": (2, 2)}, 1.0),
    "locon-tucker": (TUCKER_LOCON, (8, 4, 3, 3), {"lora_up": (8, 2, 1, 1),
                                                  "lora_mid": (2, 2, 3, 3),
                                                  "lora_down": (2, 4, 1, 1)}, 1.0),
    "lora-dora": (DORA_LORA, (8, 6), {"lora_up": (8, 2), "lora_down": (2, 6)}, 1.0),
    "lora-dora-conv": (DORA_LORA, (8, 4, 3, 3), {"lora_up": (8, 2, 1, 1),
                                                 "lora_down": (2, 4, 3, 3)}, 1.0),
    "full": (FULL, (8, 4, 3, 3), {"diff": (8, 4, 3, 3)}, None),
    "glora": (GLORA, (8, 6), {"a1": (6, 2), "a2": (2, 6), "b1": (8, 2), "b2": (2, 6)}, 1.0),
    "glora-conv": (GLORA, (8, 4, 3, 3), {"a1": (4, 2, 1, 1), "a2": (2, 4, 1, 1),
                                         "b1": (8, 2, 1, 1), "b2": (2, 4, 3, 3)}, 1.0),
    "glora-square": (GLORA, (6, 6), {"a1": (6, 2), "a2": (2, 6), "b1": (6, 2), "b2": (2, 6)},
                     2.0),
    "glora-old": (GLORA, (8, 6), {"a1": (2, 6), "a2": (6, 2), "b1": (2, 6), "b2": (8, 2)}, 1.0),
    "glora-old-square": (GLORA, (6, 6), {"a1": (2, 6), "a2": (6, 2), "b1": (2, 6),
                                         "b2": (6, 2)}, 1.0),
    "oft": (OFT, (8, 6), {"oft_blocks": (4, 2, 2)}, None),
    "oft-conv": (OFT, (8, 4, 3, 3), {"oft_blocks": (2, 4, 4)}, None),
    "boft": (BOFT, (8, 6), {"oft_blocks": (3, 4, 2, 2)}, None),
    "boft-rescaled": (BOFT, (8, 4, 3, 3), {"oft_blocks": (2, 2, 4, 4),
                                           "rescale": (8, 1, 1, 1)}, None),
}  # fmt: skip
#: the ones whose strength ComfyUI applies as loratool does (OFT / BOFT: see below)
LINEAR_STRENGTH = [n for n, c in COMFY_CASES.items() if c[0] not in (OFT, BOFT)]


def comfy_case(name, seed=0):
    kind, shape, shapes, alpha = COMFY_CASES[name]
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape)).astype(np.float32)
    t = _tensors(rng, shapes)
    if "rescale" in t:
        t["rescale"] = 1 + t["rescale"]
    return kind, w, t, alpha


@pytest.mark.parametrize("name", sorted(COMFY_CASES))
def test_merged_equals_comfyui_at_strength_1(name):
    kind, w, t, alpha = comfy_case(name)
    m = _module(kind, t, alpha)
    ref = _comfy(kind, w, t, alpha, 1.0)
    assert float((ref - torch.as_tensor(w)).abs().max()) > 1e-4
    f32_close(merged(m, w, 1.0, F32), ref)


@pytest.mark.parametrize("name", LINEAR_STRENGTH)
def test_merged_equals_comfyui_at_other_strengths(name):
    kind, w, t, alpha = comfy_case(name, seed=1)
    m = _module(kind, t, alpha)
    for strength in (0.6, -1.0, 2.0):
        f32_close(merged(m, w, strength, F32), _comfy(kind, w, t, alpha, strength))


@pytest.mark.parametrize("name", ["oft", "boft", "boft-rescaled"])
def test_comfyui_applies_oft_strength_twice(name):
    """ComfyUI scales OFT's change by ``s`` inside the rotation and again when it adds it
    (``W + s^2 (R^T W - W)``); BOFT's stages are interpolated and then scaled by ``s`` again.
    loratool merges ``W + s (W' - W)``, LyCORIS' own strength for OFT."""
    kind, w, t, alpha = comfy_case(name, seed=2)
    m = _module(kind, t, alpha)
    ours = merged(m, w, 0.5, F32)
    ref = _comfy(kind, w, t, alpha, 0.5)
    assert float(np.abs(ours - ref.numpy()).max()) > 1e-3
    if kind == OFT:
        f32_close(merged(m, w, 0.25, F32), ref)


def test_comfyui_oft_ignores_rescale_and_reads_alpha_as_the_constraint():
    kind, w, t, _ = comfy_case("oft-conv", seed=3)
    t["rescale"] = (1 + 0.3 * np.random.default_rng(4).standard_normal((8, 1, 1, 1))).astype(
        np.float32
    )
    with_rescale = _module(kind, t)
    plain = {k: v for k, v in t.items() if k != "rescale"}
    assert (
        float(np.abs(merged(with_rescale, w, 1.0, F32) - merged(_module(kind, plain), w)).max())
        > 0.01
    )
    f32_close(merged(_module(kind, plain), w, 1.0, F32), _comfy(kind, w, t, None, 1.0))
    # alpha 0.05: LyCORIS bounds ||Q|| by 0.05 * 8 = 0.4, ComfyUI by 0.05
    q = t["oft_blocks"] - np.swapaxes(t["oft_blocks"], 1, 2)
    assert np.linalg.norm(q) > 0.4  # so both bounds bite
    m = _module(kind, plain, alpha=0.05)
    f32_close(merged(m, w, 1.0, F32), _comfy(kind, w, plain, 0.4, 1.0))
    assert (
        float(np.abs(merged(m, w, 1.0, F32) - _comfy(kind, w, plain, 0.05, 1.0).numpy()).max())
        > 0.01
    )


def test_glora_layouts_follow_comfyui():
    for name, old in [("glora", False), ("glora-square", False), ("glora-old", True),
                      ("glora-old-square", True)]:  # fmt: skip
        kind, w, t, alpha = comfy_case(name)
        m = _module(kind, t, alpha)
        assert m.spec.old_layout(m) is old and m.spec.old_layout(m, w.shape) is old, name
        assert m.rank == 2 and m.update_dims == w.shape, name
    # new layout, rank 6 on a 4 x 4 weight: the tensors alone read it as old (rank 4 on 6 x 6),
    # the base says new, as ComfyUI reads it
    rng = np.random.default_rng(7)
    shapes = {"a1": (4, 6), "a2": (6, 4), "b1": (4, 6), "b2": (6, 4)}
    t = _tensors(rng, shapes)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    m = _module(GLORA, t, 3.0)
    assert m.spec.old_layout(m) and not m.spec.old_layout(m, w.shape)
    f32_close(merged(m, w, 1.0, F32), _comfy(GLORA, w, t, 3.0, 1.0))


# ------------------------------------------------------------ dora_scale (weight decomposition)

DORA = {  # name -> comfy case whose tensors get a dora_scale
    "lora": "lora-dora",
    "lora-conv": "lora-dora-conv",
    "loha": "loha",
    "loha-tucker": "loha-tucker",
    "lokr": "lokr",
    "lokr-conv": "lokr-conv",
    "glora": "glora",  # ComfyUI decomposes GLoRA too (LyCORIS' GLoRA has no dora_scale)
}


def _dora(name, side, seed=5):
    kind, w, t, alpha = comfy_case(DORA[name], seed)
    if side == "output":
        norm = np.linalg.norm(w.reshape(w.shape[0], -1), axis=1)
        shape = (w.shape[0], *[1] * (w.ndim - 1))
    else:
        norm = np.linalg.norm(np.swapaxes(w, 0, 1).reshape(w.shape[1], -1), axis=1)
        shape = (1, w.shape[1], *[1] * (w.ndim - 2))
    rng = np.random.default_rng(seed + 1)
    dora = (norm * (1 + 0.2 * rng.standard_normal(norm.shape))).reshape(shape).astype(np.float32)
    return kind, w, t, alpha, dora


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("name", sorted(DORA))
def test_input_side_dora_equals_comfyui(name, strength):
    kind, w, t, alpha, dora = _dora(name, "input")
    m = _module(kind, t, alpha, dora)
    assert m.needs_base
    f32_close(merged(m, w, strength, F32), _comfy(kind, w, t, alpha, strength, dora))


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("name", sorted(DORA))
def test_output_side_dora_normalises_the_merged_weight(name, strength):
    """Output side: loratool divides by the norm of ``W + dW`` (LyCORIS, which trained the
    magnitude that way; PEFT's DoRA too), ComfyUI by the norm of the base ``W`` (its input
    side uses ``W + dW``; open PR #15458 changes the output side to match). Equal to ComfyUI
    with that change, and measurably off ComfyUI as it is."""
    kind, w, t, alpha, dora = _dora(name, "output")
    m = _module(kind, t, alpha, dora)
    ours = merged(m, w, strength, F32)
    f32_close(ours, _comfy(kind, w, t, alpha, strength, dora, fixed=True))
    as_is = _comfy(kind, w, t, alpha, strength, dora).numpy()
    assert np.abs(ours - as_is).max() > 100 * np.finfo(np.float32).eps * np.abs(ours).max()


@pytest.mark.oracle
def test_output_side_dora_equals_lycoris(written):
    """LyCORIS' own merge of a DoRA-weighted LoCon (``wd_on_output``, its default): loratool
    equals it at strength 1, and measures how far ComfyUI and diffusers are from it."""
    path, modules = written["locon-dora"]
    adapter = load_adapter(path)
    assert {m.type for m in adapter.deltas.values()} == {DORA_LORA}
    ratios = {"comfyui": 0.0, "diffusers": 0.0}
    for stem, (module, w) in modules.items():
        m = adapter.deltas[stem]
        with torch.no_grad():
            module.org_module[0].double()
            want = module.double().get_merged_weight(1.0)[0].numpy()
        np.testing.assert_allclose(merged(m, w, 1.0, F64), want, rtol=0, atol=1e-12)
        f32_close(merged(m, w, 1.0, F32), want)
        with torch.no_grad():  # LyCORIS' strength scales m / n - 1: W + dW at strength 0
            at_zero = module.get_merged_weight(0.0)[0].numpy()
        np.testing.assert_allclose(at_zero, w + m.delta(w), rtol=0, atol=1e-12)
        np.testing.assert_array_equal(merged(m, w, 0.0, F64), w)
        t = {role: m.array(role, F32) for role in ("lora_up", "lora_down")}
        as_is = _comfy(DORA_LORA, w, t, m.alpha, 1.0, m.array("dora_scale", F32)).numpy()
        plain = w + m.delta(w)  # diffusers drops dora_scale (test below)
        update = np.linalg.norm(want - w)
        ratios["comfyui"] = max(ratios["comfyui"], np.linalg.norm(as_is - want) / update)
        ratios["diffusers"] = max(ratios["diffusers"], np.linalg.norm(plain - want) / update)
    # the worst module's distance from LyCORIS' merged weight, relative to its update:
    # ComfyUI a third (its output-side norm of W), diffusers all of it (no magnitude at all)
    assert 0.25 < ratios["comfyui"] < 0.4 and ratios["diffusers"] > 0.9, ratios


def test_diffusers_drops_kohya_dora_scale():
    """diffusers' SD / SDXL loaders filter ``dora_scale`` out with a warning before converting a
    kohya file (loaders/lora_pipeline.py ``lora_state_dict``): the LoRA loads without its
    weight decomposition, ``W + dW``."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from safetensors.torch import load_file

    state = load_file(ROOT / "tests" / "data" / "lycoris" / "locon-dora.safetensors")
    assert any(k.endswith(".dora_scale") for k in state)
    out = StableDiffusionLoraLoaderMixin.lora_state_dict(state)
    converted = out[0] if isinstance(out, tuple) else out
    assert converted and not any("dora" in k or "magnitude" in k for k in converted)


@pytest.mark.oracle
@pytest.mark.parametrize("case", ["ia3", "ia3-on-input"])
def test_ia3_merge_reproduces_lycoris_forward_bias_included(case):
    """LyCORIS' IA3 on the outputs scales the layer's whole output, bias included (its
    ``get_merged_weight`` returns no bias): loratool scales the bias too, so that the merged
    layer computes what the adapter computed in training."""
    cls, options, _ = CASES[case]
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 16).double()
    module = cls("m", base, 1.0, **options).double()
    with torch.no_grad():
        for p in module.parameters():
            if p is not base.weight and p is not base.bias:
                p.add_(torch.randn_like(p) * 0.3)
    m = from_state_dict(module.state_dict())
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        want = module.bypass_forward(x, 1.0).numpy()
    w, b = base.weight.detach().numpy(), base.bias.detach().numpy()
    weight = merged(m, w, 1.0, F64)
    got = x.numpy() @ weight.T + m.spec.merged_bias(m, b, 1.0, F64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert m.spec.scales_bias(m) == (case == "ia3")
    if case == "ia3":  # the base bias left as it is would be wrong
        assert np.abs(x.numpy() @ weight.T + b - want).max() > 1e-3
