"""Every adapter type x every command, through the command line: the support table of the
README ("Adapter types") cell by cell.

The files are written here by the references themselves: lycoris-lora's kohya network on the
ResnetBlock2D layers of fixtures/bases/tiny-sd's UNet (29 modules: 3x3 and 1x1 convolutions and
a linear layer, float32), and PEFT's ``save_pretrained`` on the tiny Llama of tests/data/mlx.
Oracles: the trained LyCORIS modules in float64 (``references``), PEFT's ``merge_and_unload``, numpy's float64 SVD. A cell that works
gets its result checked against one of them and its output validated with ``--fail-on
warning``; a refused cell gets its exit code and its one-line message (type, hint).
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lora_tools.cli import cli
from lora_tools.cli._common import run

torch = pytest.importorskip("torch")
lycoris_kohya = pytest.importorskip("lycoris.kohya")
peft = pytest.importorskip("peft")

from tests.deltas.test_lycoris_types import float64_inverse, lycoris_files_maker  # noqa: E402
from tests.ops.test_merge_lycoris import kohya_names  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SD = ROOT / "fixtures" / "bases" / "tiny-sd"
UNET = "unet/diffusion_pytorch_model.safetensors"
LLAMA = ROOT / "tests" / "data" / "mlx" / "base"
EPS32 = float(np.finfo(np.float32).eps)
PRESET = """
enable_conv = true
unet_target_module = ["ResnetBlock2D"]
unet_target_name = []
text_encoder_target_module = []
text_encoder_target_name = []
"""
#: file name -> lycoris-lora's create_network options
LYCORIS = {
    "loha": {"algo": "loha"},
    "loha-tucker": {"algo": "loha", "use_tucker": True},
    "lokr-whole": {"algo": "lokr", "factor": 2, "full_matrix": True},
    "lokr": {"algo": "lokr", "factor": 2},
    "lokr-tucker": {"algo": "lokr", "factor": 2, "use_tucker": True},
    "locon-tucker": {"algo": "locon", "use_tucker": True},
    "full": {"algo": "full"},
    "dora-output": {"algo": "locon", "dora_wd": True},
    "dora-input": {"algo": "locon", "dora_wd": True, "wd_on_output": False},
    "oft": {"algo": "diag-oft"},
    "oft-constrained": {"algo": "diag-oft", "constraint": 2**-7},
    "oft-rescaled": {"algo": "diag-oft", "rescaled": True},
    "boft": {"algo": "boft"},
    "glora": {"algo": "glora"},
    "ia3": {"algo": "ia3"},
}
#: name -> the type loratool reports
TYPE = {
    "loha": "LoHa",
    "loha-tucker": "LoHa",
    "lokr-whole": "LoKr",
    "lokr": "LoKr",
    "lokr-tucker": "LoKr",
    "locon-tucker": "Tucker LoCon",
    "full": "full diff",
    "dora-output": "kohya DoRA",
    "dora-input": "kohya DoRA",
    "oft": "OFT",
    "oft-constrained": "OFT",
    "oft-rescaled": "OFT",
    "oft-diag-old": "OFT",
    "boft": "BOFT",
    "glora": "GLoRA",
    "ia3": "IA3",
}
#: LyCORIS types whose update is linear in their own tensors (no base needed)
FACTORED = ["loha", "loha-tucker", "lokr-whole", "lokr", "lokr-tucker", "locon-tucker"]
LINEAR = [*FACTORED, "full"]
#: LyCORIS types whose update reads the base weight
READS_BASE = [n for n in TYPE if n not in LINEAR]
#: types whose tensors keep a convolution's kernel: convert --to lora and resize need no base
KERNEL_KEPT = {"locon-tucker", "full"}
#: LyCORIS module classes whose update is computed apart from the base weight
DIFF_MODULES = {"LohaModule", "LokrModule", "LoConModule", "FullModule"}

TARGETS = ["q_proj", "v_proj"]
PEFT_CONFIGS = {
    "LOHA": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False),
    "LOKR": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False),
    "IA3": lambda: peft.IA3Config(
        target_modules=["q_proj", "v_proj", "down_proj"],
        feedforward_modules=["down_proj"],
        init_ia3_weights=False,
    ),
    "OFT": lambda: peft.OFTConfig(
        r=0, oft_block_size=4, target_modules=TARGETS, init_weights=False
    ),
    "BOFT": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=TARGETS, init_weights=False),
    "ADALORA": lambda: peft.AdaLoraConfig(
        init_r=4, target_r=2, total_step=10, target_modules=TARGETS, init_lora_weights=False
    ),
    "VERA": lambda: peft.VeraConfig(r=4, target_modules=TARGETS, init_weights=False),
    "FOURIERFT": lambda: peft.FourierFTConfig(
        n_frequency=10, target_modules=TARGETS, init_weights=False
    ),
}
PEFT_NAME = {
    "LOHA": "LoHa",
    "LOKR": "LoKr",
    "IA3": "IA3",
    "OFT": "OFT",
    "BOFT": "BOFT",
    "ADALORA": "AdaLoRA",
    "VERA": "VeRA",
    "FOURIERFT": "FourierFT",
}
PEFT_FACTORED = ["LOHA", "LOKR"]
PEFT_READS_BASE = ["IA3", "OFT", "BOFT", "VERA", "FOURIERFT"]


def loratool(*args) -> tuple[int, str, str]:
    """``loratool ARGS`` in this process as the console script runs it: (exit code, stdout,
    stderr)."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["loratool", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run(cli)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def ok(*args) -> str:
    code, out, err = loratool(*args)
    assert code == 0, (args, out, err)
    return out


def refused(args, code: int, *needles: str) -> str:
    """The command exits ``code`` with one error line holding every needle, writing nothing."""
    got, out, err = loratool(*args)
    line = err.strip()
    assert got == code, (args, out, err)
    assert line.startswith("loratool: error:") and "\n" not in line, err
    assert "internal error" not in line and "Traceback" not in line, err
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def clean(path: Path, base: Path, *ignore: str) -> None:
    """``validate --fail-on warning`` passes, with and without the base."""
    skip = ["--ignore", ",".join(ignore)] if ignore else []
    ok("validate", "--fail-on", "warning", *skip, path)
    ok("validate", "--fail-on", "warning", *skip, "--base", base, path)


# -- the files ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lycoris(tmp_path_factory):
    """name -> (file, {kohya module name: LyCORIS module}), plus the old ``oft_diag`` file (the
    rotations themselves, from LyCORIS' own ``get_r``) beside the diag-OFT one."""

    out = tmp_path_factory.mktemp("types")
    preset = out / "preset.toml"
    preset.write_text(PRESET)
    files = {}
    make = lycoris_files_maker()
    for i, (name, args) in enumerate(LYCORIS.items()):
        path = out / f"{name}.safetensors"
        net = make.write_network(path, args, seed=i, preset=preset, noise=0.05, dtype=torch.float32)
        files[name] = (path, {m.lora_name: m for m in net.loras})
    path, modules = files["oft"]
    state = load_file(path)
    for stem, module in modules.items():
        with torch.no_grad():
            rotation = module.get_r().detach().double().float().numpy()
        state[f"{stem}.oft_diag"] = rotation
        del state[f"{stem}.oft_blocks"]
        state.pop(f"{stem}.alpha", None)
    files["oft-diag-old"] = (out / "oft-diag-old.safetensors", modules)
    save_file(state, files["oft-diag-old"][0])
    return files


@pytest.fixture(scope="module")
def base_unet() -> dict[str, np.ndarray]:
    return load_file(SD / UNET)


@pytest.fixture(scope="module")
def references(lycoris, base_unet):
    """name -> {base key: merged weight} by the trained LyCORIS modules in float64 (the file
    holds their float32 values exactly; bias keys for diff_b): ``W + get_weight`` for LoHa and
    LoKr (whose ``get_diff_weight`` applies the scale twice), ``W + get_diff_weight`` for LoCon
    and full, ``get_merged_weight`` for the types that read the base and weight decomposition."""
    names = kohya_names(base_unet)
    out = {}
    for name, (_, modules) in lycoris.items():
        ref = {}
        for stem, module in modules.items():
            key = names[stem]
            w = base_unet[key].astype(np.float64)
            shape = tuple(w.shape)
            with float64_inverse(), torch.no_grad():
                module.org_module[0].double()
                module = module.double()
                kind = type(module).__name__
                if getattr(module, "wd", False) or kind not in DIFF_MODULES:
                    ref[key] = module.get_merged_weight(1.0, shape)[0].numpy().reshape(shape)
                    bkey = key.removesuffix("weight") + "bias"
                    if kind == "IA3Module" and not module.train_input and bkey in base_unet:
                        # its forward scales the whole output, bias included, by (1 + w)
                        vector = module.weight.detach().numpy().reshape(-1)
                        ref[bkey] = base_unet[bkey].astype(np.float64) * (1 + vector)
                elif kind in ("LohaModule", "LokrModule"):
                    ref[key] = w + module.get_weight(shape).numpy().reshape(shape)
                else:
                    diff, diff_b = module.get_diff_weight(1.0, shape)
                    ref[key] = w + diff.numpy().reshape(shape)
                    if diff_b is not None:
                        bkey = key.removesuffix("weight") + "bias"
                        ref[bkey] = base_unet[bkey].astype(np.float64) + diff_b.numpy()
        out[name] = ref
    return out


@pytest.fixture(scope="module")
def peft_folders(tmp_path_factory):
    """peft_type -> (folder, merge_and_unload's state dict) for PEFT's own random-initialised
    adapters on the tiny Llama."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("peft-types")
    out = {}
    for peft_type, config in PEFT_CONFIGS.items():
        torch.manual_seed(0)
        model = LlamaForCausalLM.from_pretrained(LLAMA, torch_dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = peft.get_peft_model(model, config())
            with torch.no_grad():
                for _, param in wrapped.named_parameters():
                    if param.requires_grad:
                        param.add_(torch.randn_like(param) * 0.05)
            wrapped.save_pretrained(root / peft_type)
            merged = wrapped.merge_and_unload()
        state = {k: v.detach().numpy().copy() for k, v in merged.state_dict().items()}
        out[peft_type] = (root / peft_type, state)
    return out


def assert_f32(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], ulps: float = 8) -> None:
    for key, want in ref.items():
        bound = ulps * EPS32 * max(float(np.abs(want).max()), 1e-30)
        worst = float(np.abs(got[key].astype(np.float64) - want).max())
        assert worst <= bound, f"{key}: {worst:.3g} > {bound:.3g}"


def merged_unet(adapter: Path, out: Path, *extra) -> dict[str, np.ndarray]:
    ok("merge", SD, adapter, "-o", out, "--device", "cpu", *extra)
    return load_file(out / UNET)


def delta_of(ref: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v - base[k].astype(np.float64) for k, v in ref.items()}


# -- inspect, validate ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TYPE))
def test_inspect_and_validate_every_lycoris_type(lycoris, name):
    path, modules = lycoris[name]
    line = next(x for x in ok("inspect", path).splitlines() if x.startswith("modules"))
    # every module is of the type (a Tucker LoCon file's 1x1 and linear layers are plain LoRA)
    want = "16" if name == "locon-tucker" else str(len(modules))
    assert f"{TYPE[name]} {want}" in line, line
    stats = ok("inspect", "--stats", path)
    if name in LINEAR:
        assert "||dW||_F" in stats and "needs the base" not in stats
    else:
        assert "needs the base" in stats or "needs the base weight" in stats
    # lycoris-lora writes a Tucker LoCon file's 1x1 and linear layers as plain LoRA: LT111
    clean(path, SD, *(["LT111"] if name == "locon-tucker" else []))


@pytest.mark.parametrize("name", LINEAR)
def test_inspect_stats_are_the_norms_of_lycoris_updates(lycoris, references, base_unet, name):
    import json

    path, _ = lycoris[name]
    doc = json.loads(ok("inspect", "--stats", "--json", path))
    names = kohya_names(base_unet)
    deltas = delta_of(references[name], base_unet)
    rows = doc["stats"]["delta_modules"]
    assert len(rows) == (16 if name == "locon-tucker" else 29)
    for row in rows:
        dw = deltas[names[row["module"]]]
        assert row["frobenius"] == pytest.approx(float(np.linalg.norm(dw)), rel=1e-6)
        flat = dw.reshape(dw.shape[0], -1)
        assert row["spectral"] == pytest.approx(float(np.linalg.norm(flat, 2)), rel=1e-6)


@pytest.mark.parametrize("peft_type", list(PEFT_CONFIGS))
def test_inspect_and_validate_every_peft_type(peft_folders, peft_type):
    folder, _ = peft_folders[peft_type]
    out = ok("inspect", folder)
    assert PEFT_NAME[peft_type] in out
    ok("inspect", "--stats", folder)
    clean(folder, LLAMA)


# -- merge -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TYPE))
def test_merge_is_lycoris_merged_weight(lycoris, references, base_unet, tmp_path, name):
    got = merged_unet(lycoris[name][0], tmp_path / "m")
    ref = references[name]
    assert_f32(got, ref)
    changed = sum(not np.array_equal(got[k], base_unet[k]) for k in ref)
    assert changed == len(ref)  # no reference is a copy of the base
    if name == "full":
        assert any(k.endswith(".bias") for k in ref)  # diff_b is merged too


@pytest.mark.parametrize("peft_type", list(PEFT_CONFIGS))
def test_merge_of_peft_types_is_merge_and_unload(peft_folders, tmp_path, peft_type):
    folder, state = peft_folders[peft_type]
    ok("merge", LLAMA, folder, "-o", tmp_path / "m", "--device", "cpu")
    got = load_file(tmp_path / "m" / "model.safetensors")
    changed = 0
    for key, value in got.items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)
        changed += not np.array_equal(value, load_file(LLAMA / "model.safetensors")[key])
    assert changed >= 4


# -- convert --to lora, and the LoRA it writes merged --------------------------------------------


def _to_lora(path: Path, out: Path, base: Path, whole: bool) -> None:
    """``convert --to lora --base`` (a LoHa convolution takes its kernel from the base), with
    ``--energy 1`` where the update has no low-rank form of its own (``whole``)."""
    extra = ["--energy", "1"] if whole else []
    if path.stem not in KERNEL_KEPT:
        extra += ["--base", base]
    ok("convert", path, "--to", "lora", "-o", out, *extra)
    clean(out, base)


@pytest.mark.parametrize("name", list(TYPE))
def test_convert_to_lora_merges_as_the_original(lycoris, references, tmp_path, name):
    path, _ = lycoris[name]
    lora = tmp_path / "lora.safetensors"
    if name == "ia3":
        # IA3 on the outputs also scales the layers' biases: a LoRA cannot carry that
        args = ["convert", path, "--to", "lora", "--energy", "1", "--base", SD, "-o", lora]
        refused(args, 3, "IA3", "bias", "loratool merge")
        assert not lora.exists()
        return
    _to_lora(path, lora, SD, name not in FACTORED)
    code, out, _ = loratool("inspect", lora)
    assert code == 0 and TYPE[name] not in out.split("modules")[1].splitlines()[0]
    got = merged_unet(lora, tmp_path / "m")
    # exact LoRAs (float64 factors rounded to float32 once): a few float32 roundings
    assert_f32(got, references[name], ulps=32)


@pytest.mark.parametrize("peft_type", [*PEFT_FACTORED, *PEFT_READS_BASE])
def test_convert_peft_types_to_lora_merges_as_the_original(peft_folders, tmp_path, peft_type):
    folder, state = peft_folders[peft_type]
    lora = tmp_path / "lora"
    _to_lora(folder, lora, LLAMA, peft_type in PEFT_READS_BASE)
    ok("merge", LLAMA, lora, "-o", tmp_path / "m", "--device", "cpu")
    got = load_file(tmp_path / "m" / "model.safetensors")
    assert_f32(got, {k: v.astype(np.float64) for k, v in state.items()}, ulps=32)


@pytest.mark.parametrize(
    "args",
    [
        ["convert", "{a}", "--to", "lora"],
        ["resize", "{a}", "--rank", "2"],
        ["combine", "{a}", "{a}"],
    ],
)
def test_adalora_becomes_a_lora(peft_folders, tmp_path, args):
    folder = str(peft_folders["ADALORA"][0])
    ok(*[a.format(a=folder) for a in args], "-o", tmp_path / "out")


@pytest.mark.parametrize(
    "peft_type",
    [*PEFT_FACTORED, "ADALORA"],
)
def test_peft_stats_are_the_update_norms(peft_folders, peft_type):
    import json

    folder, state = peft_folders[peft_type]
    base = load_file(LLAMA / "model.safetensors")
    doc = json.loads(ok("inspect", "--stats", "--json", folder))
    rows = doc["stats"]["delta_modules"]
    assert len(rows) == 4
    for row in rows:
        key = row["module"].removeprefix("base_model.model.") + ".weight"
        want = np.linalg.norm(state[key].astype(np.float64) - base[key])
        assert row["frobenius"] == pytest.approx(float(want), rel=1e-5)


def test_adalora_rescale_factor_is_refused(peft_folders, tmp_path):
    folder = peft_folders["ADALORA"][0]
    refused(["rescale", folder, "--factor", "2", "-o", tmp_path / "o"], 3, "AdaLoRA", "--to lora")


# -- resize, rescale, combine ---------------------------------------------------------------------


def _truncated(dw: np.ndarray, k: int) -> np.ndarray:
    flat = dw.reshape(dw.shape[0], -1)
    u, s, vh = np.linalg.svd(flat, full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vh[:k]).reshape(dw.shape)


@pytest.mark.parametrize("name", list(TYPE))
def test_resize_is_the_truncated_svd_of_each_update(lycoris, references, base_unet, tmp_path, name):
    path, _ = lycoris[name]
    out = tmp_path / "r.safetensors"
    # the base gives a LoHa / LoKr convolution its kernel, and is needed where the update reads it
    extra = [] if name in KERNEL_KEPT else ["--base", SD]
    if name == "ia3":  # it scales the layers' biases too: no LoRA of it
        refused(["resize", path, "--rank", "2", "-o", out, *extra], 3, "IA3", "bias")
        return
    ok("resize", path, "--rank", "2", "-o", out, *extra)
    clean(out, SD)
    got = merged_unet(out, tmp_path / "m")
    for key, dw in delta_of(references[name], base_unet).items():
        if key.endswith(".bias"):
            continue
        want = base_unet[key].astype(np.float64) + _truncated(dw, 2)
        bound = 32 * EPS32 * max(float(np.abs(want).max()), 1e-30)
        assert float(np.abs(got[key] - want).max()) <= bound, key


def _lt111(name: str) -> list[str]:
    """lycoris-lora writes a Tucker LoCon file's 1x1 and linear layers as plain LoRA: LT111."""
    return ["LT111"] if name == "locon-tucker" else []


@pytest.mark.parametrize("name", LINEAR)
def test_rescale_factor_scales_the_update(lycoris, references, base_unet, tmp_path, name):
    deltas = delta_of(references[name], base_unet)
    half = tmp_path / "half.safetensors"
    ok("rescale", lycoris[name][0], "--factor", "0.5", "-o", half)
    clean(half, SD, *_lt111(name))
    got = merged_unet(half, tmp_path / "m")
    assert_f32(got, {k: base_unet[k] + 0.5 * d for k, d in deltas.items()}, ulps=16)


@pytest.mark.parametrize(
    "name", ["loha-tucker", "lokr-whole", "lokr-tucker", "locon-tucker", "loha", "lokr"]
)
def test_combine_sums_the_updates(lycoris, references, base_unet, tmp_path, name):
    path, _ = lycoris[name]
    twice = tmp_path / "twice.safetensors"
    # a LoHa / decomposed LoKr convolution flattens its kernel: --base lays it out
    extra = [] if name in KERNEL_KEPT else ["--base", SD]
    ok("combine", path, path, "-o", twice, *extra)
    clean(twice, SD)
    got = merged_unet(twice, tmp_path / "m")
    deltas = delta_of(references[name], base_unet)
    assert_f32(got, {k: base_unet[k] + 2 * d for k, d in deltas.items()}, ulps=32)


def test_combine_without_the_base_says_the_kernel_is_unknown(lycoris, tmp_path):
    """Without --base a LoHa convolution's LoRA keeps the flattened kernel: combine says so."""
    code, _, err = loratool("combine", lycoris["loha"][0], "-o", tmp_path / "o.safetensors")
    assert code == 0 and "do not say a kernel shape" in err, err


def test_combine_refuses_a_bias_difference(lycoris, tmp_path):
    path = lycoris["full"][0]
    o = tmp_path / "o.safetensors"
    refused(["combine", path, path, "-o", o], 3, "diff_b", "loratool merge")


@pytest.mark.parametrize("name", FACTORED)
def test_rescale_alpha_keeps_the_update(lycoris, references, tmp_path, name):
    out = tmp_path / "a.safetensors"
    ok("rescale", lycoris[name][0], "--alpha", "3", "-o", out)
    clean(out, SD, *_lt111(name))
    assert_f32(merged_unet(out, tmp_path / "m"), references[name], ulps=16)


@pytest.mark.parametrize("peft_type", PEFT_FACTORED)
def test_peft_factored_types_resize_rescale_combine(peft_folders, tmp_path, peft_type):
    folder, state = peft_folders[peft_type]
    base = load_file(LLAMA / "model.safetensors")
    deltas = {k: v.astype(np.float64) - base[k] for k, v in state.items() if k in base}
    deltas = {k: d for k, d in deltas.items() if np.any(d)}
    for command, args, scale in (
        ("combine", [folder], 2.0),
        ("resize", ["--rank", "64"], 1.0),
    ):
        out = tmp_path / command
        ok(command, folder, *args, "-o", out)
        clean(out, LLAMA)
        ok("merge", LLAMA, out, "-o", tmp_path / f"m-{command}", "--device", "cpu")
        got = load_file(tmp_path / f"m-{command}" / "model.safetensors")
        assert_f32(got, {k: base[k] + scale * d for k, d in deltas.items()}, ulps=32)
    refused(["rescale", folder, "--alpha", "3", "-o", tmp_path / "a"], 2, "adapter_config.json")


@pytest.mark.parametrize("peft_type", PEFT_FACTORED)
def test_peft_factored_types_rescale_factor(peft_folders, tmp_path, peft_type):
    """The rescaled folder keeps its adapter_config.json (PEFT's type, r and alpha) and merges
    as ``W + 0.5 dW``."""
    folder, state = peft_folders[peft_type]
    half = tmp_path / "half"
    ok("rescale", folder, "--factor", "0.5", "-o", half)
    clean(half, LLAMA)
    ok("merge", LLAMA, half, "-o", tmp_path / "m", "--device", "cpu")
    got = load_file(tmp_path / "m" / "model.safetensors")
    base = load_file(LLAMA / "model.safetensors")
    want = {k: base[k] + 0.5 * (v.astype(np.float64) - base[k]) for k, v in state.items()}
    assert_f32(got, want, ulps=32)


@pytest.mark.parametrize("peft_type", ["VERA", "BOFT"])
def test_peft_types_resize_with_the_base(peft_folders, tmp_path, peft_type):
    folder, state = peft_folders[peft_type]
    ok("resize", folder, "--rank", "2", "--base", LLAMA, "-o", tmp_path / "r")
    clean(tmp_path / "r", LLAMA)
    ok("merge", LLAMA, tmp_path / "r", "-o", tmp_path / "m", "--device", "cpu")
    got = load_file(tmp_path / "m" / "model.safetensors")
    base = load_file(LLAMA / "model.safetensors")
    for key, value in state.items():
        dw = value.astype(np.float64) - base[key]
        if np.any(dw):
            want = base[key] + _truncated(dw, 2)
            assert float(np.abs(got[key] - want).max()) <= 1e-5 * float(np.abs(want).max())


@pytest.mark.parametrize("peft_type", ["IA3", "OFT", "FOURIERFT"])
def test_peft_types_without_output_dims_resize_with_the_base(peft_folders, tmp_path, peft_type):
    """Their tensors do not fix the update's rows or columns: the base does."""
    folder, state = peft_folders[peft_type]
    out = tmp_path / "r"
    ok("resize", folder, "--rank", "64", "--base", LLAMA, "-o", out)
    clean(out, LLAMA)
    ok("merge", LLAMA, out, "-o", tmp_path / "m", "--device", "cpu")
    got = load_file(tmp_path / "m" / "model.safetensors")
    assert_f32(got, {k: v.astype(np.float64) for k, v in state.items()}, ulps=32)


# -- refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", READS_BASE)
def test_types_that_read_the_base_are_refused_without_it(lycoris, tmp_path, name):
    path, _ = lycoris[name]
    kind = "dora_scale" if name.startswith("dora") else TYPE[name]
    o = tmp_path / "o.safetensors"
    refused(["convert", path, "--to", "lora", "-o", o], 2, kind, "--base")
    refused(["resize", path, "--rank", "2", "-o", o], 2, kind, "--base")
    refused(["combine", path, path, "-o", o], 2, kind, "--base")
    refused(["rescale", path, "--factor", "0.5", "-o", o], 3, kind, "rescale --factor")
    # a rotation, a vector or a weight decomposition has no low-rank form to pick by itself
    line = refused(["convert", path, "--to", "lora", "--base", SD, "-o", o], 2, TYPE[name])
    assert "--rank R or --energy E" in line
    assert not o.exists()


@pytest.mark.parametrize("name", [n for n in READS_BASE if n != "ia3"])
def test_combine_with_the_base_sums_updates_that_read_it(
    lycoris, references, base_unet, tmp_path, name
):
    """With --base each module becomes its exact LoRA ``merged(W) - W`` on that base first."""
    path, _ = lycoris[name]
    twice = tmp_path / "twice.safetensors"
    ok("combine", path, path, "--base", SD, "-o", twice)
    clean(twice, SD)
    got = merged_unet(twice, tmp_path / "m")
    deltas = delta_of(references[name], base_unet)
    assert_f32(got, {k: base_unet[k] + 2 * d for k, d in deltas.items()}, ulps=64)


def test_full_diff_needs_a_rank_rule(lycoris, tmp_path):
    o = tmp_path / "o.safetensors"
    refused(["convert", lycoris["full"][0], "--to", "lora", "-o", o], 2, "full diff", "--energy")


@pytest.mark.parametrize("name", list(TYPE))
@pytest.mark.parametrize("target", ["kohya", "peft", "diffusers"])
def test_renaming_a_type_is_refused_with_the_lora_hint(lycoris, tmp_path, name, target):
    path, _ = lycoris[name]
    o = tmp_path / ("o.safetensors" if target == "kohya" else "o")
    refused(
        ["convert", path, "--to", target, "--base", SD, "-o", o],
        3,
        f"unsupported adapter type {TYPE[name]} ",
        "--to lora",
    )


@pytest.mark.parametrize("peft_type", list(PEFT_CONFIGS))
def test_renaming_a_peft_type_is_refused(peft_folders, tmp_path, peft_type):
    folder, _ = peft_folders[peft_type]
    for target in ("kohya", "diffusers"):
        o = tmp_path / ("o.safetensors" if target == "kohya" else "o")
        refused(
            ["convert", folder, "--to", target, "--base", LLAMA, "-o", o],
            3,
            f"unsupported adapter type {PEFT_NAME[peft_type]}",
            "--to lora",
        )


@pytest.mark.parametrize("peft_type", PEFT_READS_BASE)
def test_peft_types_that_read_the_base_are_refused_without_it(peft_folders, tmp_path, peft_type):
    folder, _ = peft_folders[peft_type]
    kind = PEFT_NAME[peft_type]
    refused(["convert", folder, "--to", "lora", "-o", tmp_path / "o"], 2, kind, "--base")
    refused(["resize", folder, "--rank", "2", "-o", tmp_path / "o"], 2, kind, "--base")
    refused(["combine", folder, folder, "-o", tmp_path / "o"], 2, kind, "--base")
    refused(["rescale", folder, "--factor", "2", "-o", tmp_path / "o"], 3, kind)


@pytest.mark.parametrize("peft_type", PEFT_READS_BASE)
def test_peft_types_combine_with_the_base(peft_folders, tmp_path, peft_type):
    folder, state = peft_folders[peft_type]
    base = load_file(LLAMA / "model.safetensors")
    ok("combine", folder, folder, "--base", LLAMA, "-o", tmp_path / "c")
    clean(tmp_path / "c", LLAMA)
    ok("merge", LLAMA, tmp_path / "c", "-o", tmp_path / "m", "--device", "cpu")
    got = load_file(tmp_path / "m" / "model.safetensors")
    want = {k: 2 * v.astype(np.float64) - base[k] for k, v in state.items()}
    assert_f32(got, want, ulps=64)
