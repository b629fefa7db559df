"""merge of the other adapter types (LoHa, LoKr, Tucker LoCon, full diff, kohya DoRA), checked
against LyCORIS itself.

The adapters are files lycoris-lora wrote: tests/data/lycoris/*.safetensors
(make_lycoris_files.py: kohya names of tiny-sd's UNet, fp16) and, written here in the test's
temporary folder, LoHa / LoKr files of a tiny diffusers Flux transformer (``lycoris_`` names, as
SimpleTuner writes them). The reference for every merged tensor is LyCORIS' own module, built
from the file's tensors by LyCORIS' own dispatch (``lycoris.modules.get_module`` /
``make_module``) on the base weight, in float64: ``W + w * dW`` with ``dW`` the module's update
(``get_weight`` for LoHa / LoKr, whose ``get_diff_weight`` applies the scale twice;
``get_diff_weight`` for LoCon and full). A weight-decomposed module (``dora_scale``) follows
ComfyUI's strength blend ``W + w * (W' - W)`` with ``W'`` LyCORIS' merged weight at strength 1
(LyCORIS blends ``W + dW`` instead; at strength 1 they agree). The reference is rounded once to
the output dtype: float32 outputs agree within float32 rounding, float16 / bfloat16 ones are the
once-rounded reference except where it lies next to a rounding tie.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lora_tools.errors import ShapeError, UnsupportedAdapterError
from lora_tools.formats import load_adapter
from lora_tools.io.safetensors import save_tensors
from lora_tools.layouts import UNetLayout
from lora_tools.ops.merge import merge
from lora_tools.ops.validate import validate

torch = pytest.importorskip("torch")
pytest.importorskip("ml_dtypes")  # numpy's bfloat16, for reading bf16 files
lycoris_modules = pytest.importorskip("lycoris.modules")

from tests.deltas.test_lycoris_types import float64_inverse  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "lycoris"
BASES = ROOT / "fixtures" / "bases"
SD = BASES / "tiny-sd"
UNET = "unet/diffusion_pytorch_model.safetensors"
FILES = ["loha", "loha-tucker", "lokr", "lokr-tucker", "locon-dora", "full"]
EPS32 = float(np.finfo(np.float32).eps)
#: A diffusers Flux transformer of tiny-flux.safetensors' shapes (hidden 16, one block of each).
FLUX = {
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "pooled_projection_dim": 16,
    "axes_dims_rope": [2, 2, 4],
}
# -- the oracle: LyCORIS' modules in float64 --------------------------------------------------


def _org_module(weight: np.ndarray):
    """A float64 torch layer holding ``weight`` (what LyCORIS wraps)."""
    w = torch.from_numpy(weight.astype(np.float64))
    if w.dim() == 2:
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.float64)
    else:
        layer = torch.nn.Conv2d(
            w.shape[1], w.shape[0], tuple(w.shape[2:]), bias=False, dtype=torch.float64
        )
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


def lycoris_merged(
    state: dict[str, np.ndarray], stem: str, base: np.ndarray, weight: float
) -> tuple[np.ndarray, np.ndarray | tuple[str, np.ndarray] | None]:
    """``(merged weight, bias difference times the weight, or ("scale", s) for a bias
    scaled by 1 + s, or None)`` of module ``stem`` on ``base`` at ``weight``, computed by
    LyCORIS' own module in float64."""
    tensors = {k: torch.from_numpy(v.astype(np.float64)) for k, v in state.items()}
    org = _org_module(base)
    kind, params = lycoris_modules.get_module(tensors, stem)
    assert kind is not None, stem
    with torch.no_grad():
        if kind is lycoris_modules.LokrModule and params[7] is not None:
            module = _tucker_lokr(stem, org, *params).double()
        elif kind is lycoris_modules.IA3Module:
            # lycoris-lora 4.1's make_module passes IA3 its on_input too, which
            # IA3Module.make_module_from_state_dict does not take (TypeError)
            module = kind.make_module_from_state_dict(stem, org, params[0]).double()
        else:
            module = lycoris_modules.make_module(kind, params, stem, org).double()
        shape = tuple(base.shape)
        w = torch.from_numpy(base.astype(np.float64))
        if getattr(module, "wd", False):  # weight decomposition: ComfyUI's strength blend
            merged1 = module.get_merged_weight(1, shape)[0].reshape(shape)
            return (w + weight * (merged1 - w)).numpy(), None
        bias = None
        diff_types = (
            lycoris_modules.LohaModule,
            lycoris_modules.LokrModule,
            lycoris_modules.FullModule,
            lycoris_modules.LoConModule,
        )
        if not isinstance(module, diff_types):  # reads the weight (OFT, BOFT, GLoRA, IA3)
            with float64_inverse():
                merged1 = module.get_merged_weight(1, shape)[0].reshape(shape)
            if isinstance(module, lycoris_modules.IA3Module) and not module.train_input:
                # LyCORIS' forward scales the whole output, bias included, by (1 + w); its
                # get_merged_weight returns no bias: the bias difference is weight * w * b
                scale = weight * module.weight.detach().numpy().reshape(-1)
                return (w + weight * (merged1 - w)).numpy(), ("scale", scale)
            return (w + weight * (merged1 - w)).numpy(), None
        if isinstance(module, (lycoris_modules.LohaModule, lycoris_modules.LokrModule)):
            diff = module.get_weight(shape)
        elif isinstance(module, lycoris_modules.FullModule):
            diff, diff_b = module.get_diff_weight()
            bias = None if diff_b is None else (weight * diff_b).numpy()
        else:
            diff = module.get_diff_weight(1, shape)[0]
        return (w + weight * diff.reshape(shape)).numpy(), bias


def _tucker_lokr(stem, org, w1, w1a, w1b, w2, w2a, w2b, _, t2, alpha, dora_scale):
    """LyCORIS' LoKr module with a Tucker ``w2``, as the file's writer built it.

    lycoris-lora 4.1's ``LokrModule.make_module_from_state_dict`` cannot read its own Tucker
    LoKr back: it takes the rank from ``lokr_w2_a.size(1)``, which for Tucker's ``[r, b]`` is
    ``b``. The module is built here with the rank of ``lokr_t2`` and the factor of ``w1``.
    """
    assert w1 is not None and w2a is not None and dora_scale is None
    module = lycoris_modules.LokrModule(
        stem, org, 1, t2.size(0), float(alpha), use_tucker=True, factor=max(w1.shape)
    )
    for name, value in (("lokr_w1", w1), ("lokr_w2_a", w2a), ("lokr_w2_b", w2b), ("lokr_t2", t2)):
        getattr(module, name).copy_(value)
    return module


def kohya_names(keys) -> dict[str, str]:
    """kohya module name -> base weight key, for tiny-sd's UNet (``lora_unet_`` + path)."""
    return {
        "lora_unet_" + k.removesuffix(".weight").replace(".", "_"): k
        for k in keys
        if k.endswith(".weight")
    }


def references(
    adapters: list[tuple[Path, float]], base: dict[str, np.ndarray], names: dict[str, str]
) -> dict[str, np.ndarray]:
    """Every base tensor after the adapters, in order, by LyCORIS (float64): each module sees
    the weight as the adapters before it left it."""
    out = {k: v.astype(np.float64) for k, v in base.items()}
    for path, weight in adapters:
        state = load_file(path)
        for stem in sorted({k.split(".")[0] for k in state}):
            if stem not in names:
                continue  # another component (text encoder): not merged into the UNet
            key = names[stem]
            out[key], bias = lycoris_merged(state, stem, out[key], weight)
            bias_key = key.removesuffix("weight") + "bias"
            if isinstance(bias, tuple):  # IA3 on the outputs: the bias scaled by (1 + w)
                if bias_key in out:
                    out[bias_key] = out[bias_key] * (1 + bias[1])
            elif bias is not None:
                out[bias_key] += bias
    return out


# -- comparisons -------------------------------------------------------------------------------


def assert_float32_rounding(got: np.ndarray, ref: np.ndarray, name: str) -> None:
    """Within a few float32 roundings of the largest value of the tensor (the update is a
    float32 product of rank 2 added to the weight)."""
    got64 = got.astype(np.float64)
    bound = 8 * EPS32 * max(float(np.abs(ref).max()), 1e-30)
    worst = float(np.abs(got64 - ref).max(initial=0.0))
    assert worst <= bound, f"{name}: {worst:.3g} > {bound:.3g}"


def assert_once_rounded(got: np.ndarray, ref: np.ndarray, name: str, base: np.ndarray) -> None:
    """``got`` (float16 / bfloat16) is ``ref`` (float64) rounded once, except where ``ref`` lies
    within float32 rounding of a tie between ``got`` and the rounded reference: float32
    rounding of the merge's own operands, the weight ``base`` and the result (an element that
    nearly cancels keeps the weight's float32 error)."""
    expected = ref.astype(got.dtype)
    differ = expected.astype(np.float64) != got.astype(np.float64)
    if not differ.any():
        return
    a = got.astype(np.float64)[differ]
    b = expected.astype(np.float64)[differ]
    r = ref[differ]
    scale = np.maximum(np.abs(r), np.abs(base.astype(np.float64)[differ]))
    tol = 8 * EPS32 * np.maximum(scale, 1e-30)
    assert np.all(np.abs(r - (a + b) / 2) <= tol), (
        f"{name}: {int(differ.sum())} elements are no once-rounded reference, "
        f"e.g. {a[0]!r} vs {b[0]!r} for {r[0]!r}"
    )
    assert differ.sum() <= max(2, differ.size // 100), f"{name}: {int(differ.sum())} near-ties"


def compare(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], dtype: str, base: dict) -> int:
    """Compare every tensor of ``ref``; returns how many differ from the ``base`` (rounded to
    the output dtype), so that a test knows its references are no copies."""
    changed = 0
    for key, value in ref.items():
        out = got[key]
        if dtype == "fp32":
            assert out.dtype == np.float32
            assert_float32_rounding(out, value, key)
        else:
            assert_once_rounded(out, value, key, base[key])
        changed += int(not np.array_equal(out, base[key].astype(out.dtype)))
    return changed


def _merged_unet(tmp_path: Path, adapters: list[tuple[Path, float]], **kw) -> dict:
    out = tmp_path / "merged"
    merge(
        SD,
        [p for p, _ in adapters],
        out,
        weights=[w for _, w in adapters],
        device=kw.pop("device", "cpu"),
        force=True,
        **kw,
    )
    return load_file(out / UNET)


# -- every LyCORIS-written file, weights 1 / 0.5 / 2 ---------------------------------------------


@pytest.mark.parametrize("weight", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("name", FILES)
def test_each_type_merges_as_lycoris_computes_it(tmp_path, name, weight):
    base = load_file(SD / UNET)
    names = kohya_names(base)
    path = DATA / f"{name}.safetensors"
    ref = references([(path, weight)], base, names)
    got = _merged_unet(tmp_path, [(path, weight)])
    adapter = load_adapter(path)
    assert len(adapter.deltas) == 77 and not adapter.uncomputed()
    touched = {names[s] for s in adapter.deltas}
    for key in ref:
        if key not in touched and not key.endswith(".bias"):
            assert np.array_equal(got[key], base[key])  # untouched tensors: copied
    assert compare(got, {k: ref[k] for k in touched}, "fp32", base) == len(touched)
    if name == "full":  # full diff carries diff_b: the biases move by weight * diff_b
        biases = [k.removesuffix("weight") + "bias" for k in touched]
        biases = [k for k in biases if k in base]
        assert len(biases) == 53
        assert compare(got, {k: ref[k] for k in biases}, "fp32", base) == len(biases)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("name", FILES)
def test_narrow_outputs_are_the_reference_rounded_once(tmp_path, name, dtype):
    base = load_file(SD / UNET)
    path = DATA / f"{name}.safetensors"
    ref = references([(path, 0.5)], base, kohya_names(base))
    got = _merged_unet(tmp_path, [(path, 0.5)], dtype=dtype)
    assert compare(got, ref, dtype, base) > 70


def test_the_files_hold_tucker_and_conv_modules():
    """The parametrized files cover what they are named for (no test passes vacuously)."""
    kinds = {}
    for name in FILES:
        adapter = load_adapter(DATA / f"{name}.safetensors")
        kinds[name] = {(m.type, m.kind, len(m.delta_shape)) for m in adapter.deltas.values()}
        roles = {r for m in adapter.deltas.values() for r in m.tensors}
        if name.endswith("tucker"):
            assert {"hada_t1", "lokr_t2"} & roles
    assert ("LoHa", "conv", 4) in kinds["loha-tucker"]  # Tucker LoHa on 3x3 convolutions
    assert ("LoKr", "conv", 4) in kinds["lokr-tucker"]  # Tucker LoKr on 3x3 convolutions
    assert ("LoKr", "conv", 4) in kinds["lokr"]  # LoKr's w2 carries the kernel
    assert ("LoHa", "linear", 2) in kinds["loha"]  # a flat LoHa on 3x3 convs, and linears
    assert {t for t, _, _ in kinds["locon-dora"]} == {"kohya DoRA"}
    assert {t for t, _, _ in kinds["full"]} == {"full diff"}


# -- composition: several adapters on one tensor, in order -------------------------------------


def test_a_lora_then_a_loha_then_a_dora_compose_in_order(tmp_path):
    base = load_file(SD / UNET)
    names = kohya_names(base)
    adapters = [
        (ROOT / "fixtures" / "kohya" / "sd-lora.safetensors", 0.5),
        (DATA / "loha.safetensors", 2.0),
        (DATA / "locon-dora.safetensors", 0.5),  # its norm is the one of the weight so far
    ]
    ref = references(adapters, base, names)
    got = _merged_unet(tmp_path, adapters)
    lora = {k.split(".")[0] for k in load_file(adapters[0][0])} & set(names)
    loha = set(load_adapter(adapters[1][0]).deltas)
    assert len(lora & loha) >= 40  # one tensor, a LoRA and a LoHa (and the DoRA after them)
    assert compare(got, ref, "fp32", base) >= 77
    # the order matters: the DoRA after the LoHa is no DoRA before it
    swapped = references([adapters[0], adapters[2], adapters[1]], base, names)
    key = names[sorted(lora & loha)[0]]
    assert not np.allclose(swapped[key], ref[key], rtol=1e-5, atol=1e-6)


# -- engines and blocks -------------------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_numpy_and_torch_engines_write_the_same_bytes(tmp_path, name):
    path = DATA / f"{name}.safetensors"
    outs = []
    for i, (device, block) in enumerate([("cpu", None), ("torch-cpu", None), ("cpu", 256)]):
        out = tmp_path / f"out{i}"
        extra = {} if block is None else {"block_bytes": block}
        merge(SD, [path], out, weights=[0.5], device=device, dtype="bf16", **extra)
        outs.append((out / UNET).read_bytes())
    assert outs[0] == outs[1] == outs[2]


# -- a single-file SD checkpoint (original layout) --------------------------------------------


def test_a_single_file_sd_checkpoint_takes_the_same_update(tmp_path):
    config = json.loads((SD / "unet" / "config.json").read_text())
    layout = UNetLayout.from_config(config)
    base = load_file(SD / UNET)
    original = {}
    for key in base:
        module, _, param = key.rpartition(".")
        original[key] = f"model.diffusion_model.{layout.original_path(module)}.{param}"
    single = tmp_path / "sd1.safetensors"
    save_file({original[k]: v for k, v in base.items()}, single)
    adapters = [(DATA / "loha-tucker.safetensors", 1.0), (DATA / "lokr.safetensors", 0.5)]
    ref = references(adapters, base, kohya_names(base))
    out = tmp_path / "merged.safetensors"
    merge(single, [p for p, _ in adapters], out, weights=[1.0, 0.5], device="cpu")
    got = load_file(out)
    assert compare({k: got[original[k]] for k in ref}, ref, "fp32", base) > 70


# -- fused rows: diffusers-named Flux modules in BFL's qkv / linear1 ----------------------------


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> dict:
    """A tiny diffusers Flux transformer as a BFL single file (bf16, built through the layout
    map as tests/ops/test_flux_lora_layouts.py builds it), and LoHa / LoKr files lycoris-lora
    writes for the diffusers model (``lycoris_`` names, every attention layer)."""
    diffusers = pytest.importorskip("diffusers")
    from lycoris import LycorisNetwork, create_lycoris

    from lora_tools.layouts.flux import from_diffusers
    from tests.formats.layout_oracle import native_state_dict

    folder = tmp_path_factory.mktemp("flux-lycoris")
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(**FLUX).to(torch.bfloat16)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layout = from_diffusers(
        {"_class_name": "FluxTransformer2DModel", **dict(model.config)},
        {k: tuple(v.shape) for k, v in state.items()},
    )
    assert layout is not None
    native = native_state_dict(layout, state)
    bfl = folder / "flux.safetensors"
    save_file({k: v.float().numpy().astype(np.float32) for k, v in native.items()}, bfl)
    files = {}
    for seed, (algo, extra) in enumerate(
        [("loha", {}), ("lokr", {"factor": 4}), ("lokr", {"factor": 4, "decompose_both": True})]
    ):
        torch.manual_seed(seed)
        net_model = diffusers.FluxTransformer2DModel(**FLUX)
        LycorisNetwork.apply_preset({"target_module": ["FluxAttention"], "module_algo_map": {}})
        net = create_lycoris(net_model, 1.0, linear_dim=2, linear_alpha=1, algo=algo, **extra)
        net.apply_to()
        with torch.no_grad():
            for param in net.parameters():
                param.add_(torch.randn_like(param) * 0.1)
        name = f"{algo}{'-both' if extra.get('decompose_both') else ''}"
        files[name] = folder / f"flux-{name}.safetensors"
        net.save_weights(str(files[name]), torch.float32, None)
    return {
        "base": bfl,
        "state": state,
        "layout": layout,
        "files": files,
        "oracle": native_state_dict,
    }


def flux_references(flux: dict, path: Path, weight: float) -> dict[str, np.ndarray]:
    """The BFL tensors after a diffusers-named file: each module merged into its diffusers
    weight by LyCORIS (float64), then laid out as BFL's fused tensors by the layout map."""
    state = load_file(path)
    merged = {k: v.double() for k, v in flux["state"].items()}
    for stem in sorted({k.split(".")[0] for k in state}):
        path_ = stem.removeprefix("lycoris_")
        key = next(
            k
            for k in merged
            if k.endswith(".weight") and k.removesuffix(".weight").replace(".", "_") == path_
        )
        value, _ = lycoris_merged(state, stem, merged[key].numpy(), weight)
        merged[key] = torch.from_numpy(value)
    return {k: v.numpy() for k, v in flux["oracle"](flux["layout"], merged).items()}


@pytest.mark.parametrize("name", ["loha", "lokr", "lokr-both"])
def test_diffusers_named_flux_modules_merge_into_fused_rows(tmp_path, flux, name):
    path = flux["files"][name]
    adapter = load_adapter(path)
    assert len(adapter.deltas) == 11
    assert {m.type for m in adapter.deltas.values()} == {"LoHa" if name == "loha" else "LoKr"}
    base = load_file(flux["base"])
    ref = flux_references(flux, path, 2.0)
    outs = []
    for device in ("cpu", "torch-cpu"):
        out = tmp_path / f"{device}.safetensors"
        merge(flux["base"], [path], out, weights=[2.0], device=device, dtype="bf16")
        outs.append({k: v.tobytes() for k, v in load_file(out).items()})  # header: engine
    assert outs[0] == outs[1]
    got = load_file(tmp_path / "cpu.safetensors")
    fused = ["double_blocks.0.img_attn.qkv.weight", "double_blocks.0.txt_attn.qkv.weight",
             "single_blocks.0.linear1.weight"]  # fmt: skip
    assert compare(got, ref, "bf16", base) == 5  # the fused three, img_attn / txt_attn proj
    for key in fused:
        assert not np.array_equal(got[key], base[key].astype(got[key].dtype))
    # linear1's MLP rows, which no module updates, are the base's
    assert np.array_equal(got[fused[2]][48:], base[fused[2]][48:].astype(got[fused[2]].dtype))
    assert not [
        f for f in validate([path], base=flux["base"]).findings if f.rule.code.startswith("LT4")
    ]


def test_a_fused_row_module_of_the_wrong_shape_is_a_finding_and_a_refusal(tmp_path, flux):
    state = load_file(flux["files"]["loha"])
    stem = "lycoris_single_transformer_blocks_0_attn_to_k"
    for part in ("hada_w1_a", "hada_w2_a"):  # 16 output rows -> 17
        value = state[f"{stem}.{part}"]
        state[f"{stem}.{part}"] = np.concatenate([value, value[:1]])
    path = tmp_path / "wrong.safetensors"
    save_file(state, path)
    report = validate([path], base=flux["base"])
    assert [f.module for f in report.findings if f.rule.code == "LT403"] == [stem]
    with pytest.raises(ShapeError, match=stem):
        merge(flux["base"], [path], tmp_path / "out.safetensors", device="cpu")
    assert not (tmp_path / "out.safetensors").exists()


# -- validate --base and refusals --------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_validate_base_is_clean_on_intact_files_and_flags_a_wrong_shape(tmp_path, name):
    path = DATA / f"{name}.safetensors"
    assert not [f for f in validate([path], base=SD).findings if f.rule.code.startswith("LT4")]
    state = load_file(path)
    adapter = load_adapter(path)
    module = next(m for m in adapter.deltas.values() if m.kind == "linear")
    role = next(r for r in ("hada_w1_a", "lokr_w1", "lora_up", "diff") if r in module.tensors)
    key = module.keys[role]
    value = state[key]
    state[key] = np.concatenate([value, value])  # twice the output rows
    if role == "hada_w1_a":
        other = module.keys["hada_w2_a"]
        state[other] = np.concatenate([state[other], state[other]])
    if role == "lora_up":
        scale = module.keys["dora_scale"]
        state[scale] = np.concatenate([state[scale], state[scale]])
    wrong = tmp_path / f"{name}.safetensors"
    save_file(state, wrong)
    report = validate([wrong], base=SD, ignore="LT1,LT2")
    assert [f.module for f in report.findings if f.rule.code == "LT403"] == [module.key]
    with pytest.raises(ShapeError, match=module.key):
        merge(SD, [wrong], tmp_path / "out", device="cpu")


def test_a_type_loratool_does_not_compute_is_refused_by_name(tmp_path):
    state = load_file(DATA / "loha.safetensors")
    stem = "lora_unet_down_blocks_0_resnets_0_norm1"
    state[f"{stem}.w_norm"] = np.ones(4, np.float16)
    state[f"{stem}.b_norm"] = np.zeros(4, np.float16)
    path = tmp_path / "loha-and-norm.safetensors"
    save_tensors(path, state)
    with pytest.raises(UnsupportedAdapterError, match=r"type norm .*'lora_unet_down_blocks_0_"):
        merge(SD, [path], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


# -- fit_delta: how an update's shape meets the weight's ----------------------------------------


def _module(kind: str, **shapes: tuple[int, ...]):
    from lora_tools.deltas import DeltaModule
    from lora_tools.io.safetensors import ArrayTensor

    tensors = {role: ArrayTensor(np.ones(shape, np.float32)) for role, shape in shapes.items()}
    return DeltaModule("m", kind, tensors, alpha=1.0)


@pytest.mark.parametrize(
    ("kind", "shapes", "base", "expected"),
    [
        # a flat LoHa (hada_w1_b [r, in * 3 * 3]) on a 3x3 convolution: reshaped
        ("LoHa", {"hada_w1_a": (4, 2), "hada_w1_b": (2, 27), "hada_w2_a": (4, 2),
                  "hada_w2_b": (2, 27)}, (4, 3, 3, 3), (False, True)),
        # a 1x1 conv DoRA LoCon on a linear weight, and a linear one on a 1x1 conv
        ("kohya DoRA", {"lora_up": (4, 2, 1, 1), "lora_down": (2, 3, 1, 1),
                        "dora_scale": (4, 1, 1, 1)}, (4, 3), (False, True)),
        ("kohya DoRA", {"lora_up": (4, 2), "lora_down": (2, 3), "dora_scale": (4, 1)},
         (4, 3, 1, 1), (False, True)),
        # a Tucker LoHa's kernel is its own: 3x3 fits 3x3 only
        ("LoHa", {"hada_w1_a": (2, 4), "hada_w1_b": (2, 3), "hada_t1": (2, 2, 3, 3),
                  "hada_w2_a": (2, 4), "hada_w2_b": (2, 3), "hada_t2": (2, 2, 3, 3)},
         (4, 3, 3, 3), (False, False)),
        ("LoHa", {"hada_w1_a": (2, 4), "hada_w1_b": (2, 3), "hada_t1": (2, 2, 3, 3),
                  "hada_w2_a": (2, 4), "hada_w2_b": (2, 3), "hada_t2": (2, 2, 3, 3)},
         (4, 27), None),
        # a full diff stored [in, out] (GPT-2 Conv1D) takes the update transposed
        ("full diff", {"diff": (4, 3)}, (3, 4), (True, False)),
        ("full diff", {"diff": (4, 3)}, (4, 4), None),
    ],
)  # fmt: skip
def test_fit_delta_lays_each_update_shape_onto_the_weight(kind, shapes, base, expected):
    from lora_tools.io.safetensors import TensorInfo
    from lora_tools.resolve import fit_delta

    info = TensorInfo("w.weight", "F32", base, 0, 4 * int(np.prod(base)))
    module = _module(kind, **shapes)
    if expected is None:
        with pytest.raises(ShapeError, match="does not fit base weight 'w.weight'"):
            fit_delta(module, info)
    else:
        assert fit_delta(module, info) == expected


def test_gpt2_conv1d_weights_stored_in_out_take_every_type_transposed(tmp_path):
    """GPT-2's Conv1D weights are stored ``[in, out]``: a LoHa (row-local), a full diff on a
    square one (known from the model type) and a weight-decomposed LoCon (merged whole) land
    transposed; numpy float64 of the module orientation is the reference."""
    gpt2 = BASES / "tiny-gpt2"
    base = load_file(gpt2 / "model.safetensors")
    rng = np.random.default_rng(3)

    def f32(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    attn, proj, fc = (
        f"lora_unet_transformer_h_0_{n}" for n in ("attn_c_attn", "attn_c_proj", "mlp_c_fc")
    )
    state = {
        f"{attn}.hada_w{i}_{s}": f32(*shape)
        for i in (1, 2)
        for s, shape in (("a", (96, 2)), ("b", (2, 32)))
    }
    state |= {f"{attn}.alpha": np.array(1.0, np.float32), f"{proj}.diff": f32(32, 32)}
    state |= {
        f"{fc}.lora_up.weight": f32(128, 2),
        f"{fc}.lora_down.weight": f32(2, 32),
        f"{fc}.alpha": np.array(2.0, np.float32),
        f"{fc}.dora_scale": np.abs(f32(128, 1)) + 1,
    }
    path = tmp_path / "gpt2.safetensors"
    save_tensors(path, state)
    s = {k: v.astype(np.float64) for k, v in state.items()}
    w = 0.5
    loha = (
        (s[f"{attn}.hada_w1_a"] @ s[f"{attn}.hada_w1_b"])
        * (s[f"{attn}.hada_w2_a"] @ s[f"{attn}.hada_w2_b"])
        * 0.5
    )
    weight = base["transformer.h.0.mlp.c_fc.weight"].astype(np.float64).T  # [out, in]
    merged = weight + s[f"{fc}.lora_up.weight"] @ s[f"{fc}.lora_down.weight"]
    norm = np.linalg.norm(merged, axis=1, keepdims=True) + EPS32
    decomposed = merged * s[f"{fc}.dora_scale"] / norm
    ref = {
        "transformer.h.0.attn.c_attn.weight": base["transformer.h.0.attn.c_attn.weight"] + w * loha.T,
        "transformer.h.0.attn.c_proj.weight": base["transformer.h.0.attn.c_proj.weight"] + w * s[f"{proj}.diff"].T,
        "transformer.h.0.mlp.c_fc.weight": (weight + w * (decomposed - weight)).T,
    }  # fmt: skip
    outs = []
    for device in ("cpu", "torch-cpu"):
        out = tmp_path / device
        merge(gpt2, [path], out, weights=[w], device=device)
        outs.append({k: v.tobytes() for k, v in load_file(out / "model.safetensors").items()})
    assert outs[0] == outs[1]
    got = load_file(tmp_path / "cpu" / "model.safetensors")
    assert compare(got, ref, "fp32", base) == 3


def test_comfyui_named_modules_merge_into_a_bfl_file(tmp_path):
    """ComfyUI names (``diffusion_model.<BFL path>``): a LoHa on the whole fused ``qkv`` and
    a LoKr on ``linear1``, tensors as LyCORIS lays them out, LyCORIS' modules the reference."""
    flux = BASES / "tiny-flux.safetensors"
    base = load_file(flux)
    rng = np.random.default_rng(5)

    def f32(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    qkv, lin = (
        "diffusion_model.double_blocks.0.img_attn.qkv",
        "diffusion_model.single_blocks.0.linear1",
    )
    state = {
        f"{qkv}.hada_w{i}_{s}": f32(*shape)
        for i in (1, 2)
        for s, shape in (("a", (48, 2)), ("b", (2, 16)))
    }
    state |= {f"{qkv}.alpha": np.array(1.0, np.float32), f"{lin}.lokr_w1": f32(4, 4)}
    state |= {
        f"{lin}.lokr_w2_a": f32(28, 2),
        f"{lin}.lokr_w2_b": f32(2, 4),
        f"{lin}.alpha": np.array(1.0, np.float32),
    }
    path = tmp_path / "comfy.safetensors"
    save_tensors(path, state)
    adapter = load_adapter(path)
    assert adapter.format == "comfyui" and len(adapter.deltas) == 2
    ref = {}
    for stem in (qkv, lin):
        key = stem.removeprefix("diffusion_model.") + ".weight"
        ref[key], _ = lycoris_merged(state, stem, base[key].astype(np.float64), 0.5)
    out = tmp_path / "out.safetensors"
    merge(flux, [path], out, weights=[0.5], device="cpu")
    assert compare(load_file(out), ref, "bf16", base) == 2


# -- the types whose merge reads the weight (OFT, BOFT, GLoRA, IA3): merged whole --------------


@pytest.fixture(scope="module")
def weight_reading_files(tmp_path_factory) -> dict[str, Path]:
    """diag-OFT (the committed file) and BOFT / GLoRA / IA3 files lycoris-lora writes here as
    make_lycoris_files.py writes its files (kohya network on tiny-sd's UNet, fp16)."""
    import lycoris.kohya as lycoris_kohya
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from tests.data.lycoris.make_lycoris_files import PRESET

    folder = tmp_path_factory.mktemp("lycoris-weight-reading")
    preset = folder / "preset.toml"
    preset.write_text(PRESET)
    files = {"diag-oft": DATA / "diag-oft.safetensors"}
    for seed, algo in enumerate(("boft", "glora", "ia3"), 10):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_pretrained(SD / "unet")
        text_encoder = CLIPTextModel.from_pretrained(SD / "text_encoder")
        net = lycoris_kohya.create_network(
            1.0, 2, 1.0, None, text_encoder, unet, preset=str(preset), conv_dim=2, conv_alpha=1,
            algo=algo,
        )  # fmt: skip
        net.apply_to(text_encoder, unet, True, True)
        with torch.no_grad():
            for param in net.parameters():
                param.add_(torch.randn_like(param) * 0.05)
        files[algo] = folder / f"{algo}.safetensors"
        net.save_weights(str(files[algo]), torch.float16, {})
    return files


@pytest.mark.parametrize("weight", [1.0, 0.5])
@pytest.mark.parametrize("name", ["diag-oft", "boft", "glora", "ia3"])
def test_weight_reading_types_merge_as_lycoris_computes_them(
    tmp_path, weight_reading_files, name, weight
):
    path = weight_reading_files[name]
    adapter = load_adapter(path)
    if adapter.uncomputed():
        pytest.skip(f"loratool does not compute {sorted(adapter.uncomputed())} yet")
    assert len(adapter.deltas) == 77 and all(m.needs_base for m in adapter.deltas.values())
    base = load_file(SD / UNET)
    ref = references([(path, weight)], base, kohya_names(base))
    outs = []
    for device in ("cpu", "torch-cpu"):
        got = _merged_unet(tmp_path, [(path, weight)], device=device, dtype="bf16")
        outs.append({k: v.tobytes() for k, v in got.items()})
        assert compare(got, ref, "bf16", base) >= 70
    assert outs[0] == outs[1]
