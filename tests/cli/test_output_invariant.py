"""One invariant for every command that writes an adapter (rescale, resize, combine, convert),
over every fixture and each command's main options:

1. it writes a file, or refuses in one error line and writes nothing (the expected refusals are
   listed: a refusal that is not listed fails, and so does a listed one that writes);
2. its output passes ``loratool validate --fail-on warning`` (against the base);
3. the output loads in its consumer with nothing missing, nothing unexpected and no warnings
   (PEFT ``from_pretrained`` for PEFT files, diffusers ``load_lora_weights`` for diffusers,
   old diffusers and kohya SD files; see tests/consumers.py);
4. the consumer's merged weights equal the float64 reference computed from the input's
   factors (rescale --factor F: F dW; resize: the truncated SVD of dW; combine: the weighted
   sum, its truncated SVD, TIES; convert: dW), and every other base tensor is unchanged.

Fixtures without a library consumer here (there is no tiny SDXL or Flux pipeline, and nothing
loads kohya-named LLM LoRAs) are read back by loratool itself and resolved against their base:
checks 1, 2 and 4 still hold, with loratool's reader in the consumer's place.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.errors import LoraToolError
from lora_tools.formats import load_adapter
from tests import consumers

pytestmark = pytest.mark.oracle

FIX = Path(__file__).resolve().parents[2] / "fixtures"
BASES = FIX / "bases"
SD = BASES / "tiny-sd"

#: fixture -> (consumer, base): peft (PeftModel on a causal LM), peft-unet (on the bare UNet),
#: diffusers (the SD pipeline), reader (no library consumer).
FIXTURES: dict[str, tuple[str, Path]] = {
    "peft/gpt2-bias": ("peft", BASES / "tiny-gpt2"),
    "peft/gpt2-lora": ("peft", BASES / "tiny-gpt2"),
    "peft/llama-all-linear": ("peft", BASES / "tiny-llama"),
    "peft/llama-bias": ("peft", BASES / "tiny-llama"),
    "peft/llama-dora": ("peft", BASES / "tiny-llama"),
    "peft/llama-embedding": ("peft", BASES / "tiny-llama"),
    "peft/llama-lora": ("peft", BASES / "tiny-llama"),
    "peft/llama-lora-bf16": ("peft", BASES / "tiny-llama-bf16"),
    "peft/llama-modules-to-save": ("peft", BASES / "tiny-llama"),
    "peft/llama-patterns": ("peft", BASES / "tiny-llama"),
    "peft/llama-rslora": ("peft", BASES / "tiny-llama"),
    "peft/sd-unet-conv": ("peft-unet", SD),
    "kohya/sd-lora.safetensors": ("diffusers", SD),
    "kohya/sd-lora-noalpha.safetensors": ("diffusers", SD),
    "kohya/sd-locon.safetensors": ("diffusers", SD),
    "kohya/sd-loha.safetensors": ("diffusers", SD),
    "kohya/sd-dora.safetensors": ("diffusers", SD),
    "kohya/sdxl-lora.safetensors": ("reader", BASES / "tiny-sdxl.safetensors"),
    "kohya/flux-lora.safetensors": ("reader", BASES / "tiny-flux.safetensors"),
    "diffusers/sd-lora": ("diffusers", SD),
    "diffusers-old/sd-attn-procs.safetensors": ("diffusers", SD),
}
assert len(FIXTURES) == sum(
    1 for d in ("peft", "kohya", "diffusers", "diffusers-old") for _ in (FIX / d).iterdir()
), "every fixture adapter is in the property"

#: Fixtures of other adapter types (LyCORIS LoHa, kohya DoRA): rescale / resize / combine keep
#: or convert their type (tests/ops/test_convert_lycoris.py), so this property leaves them out.
FOREIGN = {"kohya/sd-loha.safetensors", "kohya/sd-dora.safetensors"}

OPTIONS: dict[str, list[list[str]]] = {
    "rescale": [["--alpha", "16"], ["--factor", "-0.5"], ["--normalize"]],
    "resize": [["--rank", "2"], ["--energy", "0.9", "--distribute", "up"]],
    "combine": [
        ["--weights", "1,-0.25"],
        ["--method", "svd", "--rank", "3", "--weights", "1,0.5"],
        ["--method", "ties", "--density", "0.5", "--rank", "64", "--weights", "1,-0.25"],
    ],
}


@dataclass(frozen=True)
class Case:
    command: str
    inputs: tuple[str, ...]
    args: tuple[str, ...]
    refused: str | None = None  # a word the one-line error must hold
    #: (consumer, base) of the output when it differs from the first input's.
    consumer: tuple[str, Path] | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def id(self) -> str:
        return f"{self.command}-{'+'.join(self.inputs)}-{' '.join(self.args)}"


NO_TEXT_ENCODER_KEYS = (
    "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'"
)


LORA_BIAS_WITHOUT_BIAS = (
    "`lora_bias=True` was passed but the targeted layer of type Linear has no bias"
)


def _refusal(command: str, fixture: str, args: list[str]) -> str | None:
    """The reason an option cannot apply to a fixture (None: it must succeed)."""
    if fixture in FOREIGN:
        return "unsupported adapter type"
    if fixture == "peft/llama-dora" and (command != "rescale" or "--factor" in args):
        return "DoRA"
    if command == "combine" and fixture in ("peft/llama-modules-to-save", "peft/llama-embedding"):
        return "full tensors"
    if (
        command == "rescale"
        and fixture.startswith("diffusers-old")
        and "--factor" not in args
        and "--normalize" not in args
    ):
        return "old diffusers spelling"
    return None


def _cases() -> list[Case]:
    out = []
    for command, option_sets in OPTIONS.items():
        for fixture in FIXTURES:
            if fixture in FOREIGN:
                continue
            for args in option_sets:
                inputs = (fixture, fixture) if command == "combine" else (fixture,)
                out.append(Case(command, inputs, tuple(args), _refusal(command, fixture, args)))
    out += [
        # item 2: the output config covers the modules of both inputs
        Case("combine", ("peft/llama-lora", "peft/llama-all-linear"), ("--weights", "1,0.5")),
        # formats mixed: kohya names for the PEFT-only modules
        Case(
            "combine",
            ("kohya/sd-lora.safetensors", "peft/sd-unet-conv"),
            ("--weights", "1,-0.5"),
        ),
        # a diffusers first input: its per-component metadata covers the UNet-only modules
        Case("combine", ("diffusers/sd-lora", "peft/sd-unet-conv"), ("--weights", "1,0.5")),
        Case(
            "combine",
            ("peft/sd-unet-conv", "kohya/sd-lora.safetensors"),
            ("--weights", "1,-0.5"),
            refused="2 pipeline components",
        ),
        Case(
            "combine",
            ("peft/llama-lora", "peft/gpt2-lora"),
            (),
            refused="share no layer",
        ),
        Case(
            "combine",
            ("kohya/sd-lora.safetensors", "peft/llama-lora"),
            (),
            refused="share no layer",
        ),
    ]
    peft_unet, diffusers = ("peft-unet", SD), ("diffusers", SD)
    reader_llama, reader_gpt2 = ("reader", BASES / "tiny-llama"), ("reader", BASES / "tiny-gpt2")
    convert = [
        ("peft/sd-unet-conv", ("--to", "diffusers"), None, diffusers),
        ("peft/sd-unet-conv", ("--to", "kohya"), None, diffusers),
        ("peft/llama-patterns", ("--to", "kohya"), None, reader_llama),
        ("peft/llama-rslora", ("--to", "kohya"), None, reader_llama),
        ("peft/gpt2-lora", ("--to", "kohya"), None, reader_gpt2),
        ("peft/llama-dora", ("--to", "kohya"), "DoRA", None),
        ("peft/llama-bias", ("--to", "kohya"), "lora_B bias", None),
        ("peft/llama-modules-to-save", ("--to", "kohya"), "full tensors", None),
        ("kohya/sd-lora.safetensors", ("--to", "diffusers", "--base", SD), None, diffusers),
        ("kohya/sd-locon.safetensors", ("--to", "diffusers", "--base", SD), None, diffusers),
        (
            "kohya/sd-lora-noalpha.safetensors",
            ("--to", "peft", "--base", SD, "--component", "unet"),
            None,
            peft_unet,
        ),
        (
            "kohya/sd-locon.safetensors",
            ("--to", "peft", "--base", SD, "--component", "unet"),
            None,
            peft_unet,
        ),
        ("kohya/sd-lora.safetensors", ("--to", "peft"), "--base", None),
        (
            "kohya/sdxl-lora.safetensors",
            ("--to", "diffusers", "--base", BASES / "tiny-sdxl.safetensors"),
            "layout",
            None,
        ),
        (
            "kohya/flux-lora.safetensors",
            ("--to", "diffusers", "--base", BASES / "tiny-flux.safetensors"),
            "layout",
            None,
        ),
        ("kohya/flux-lora.safetensors", ("--to", "peft"), "layout", None),
        ("kohya/sd-loha.safetensors", ("--to", "diffusers", "--base", SD), "unsupported", None),
        ("kohya/sd-dora.safetensors", ("--to", "diffusers", "--base", SD), "unsupported", None),
        ("diffusers/sd-lora", ("--to", "peft", "--component", "unet"), None, peft_unet),
        ("diffusers/sd-lora", ("--to", "kohya"), None, diffusers),
        ("diffusers-old/sd-attn-procs.safetensors", ("--to", "diffusers"), None, diffusers),
        ("diffusers-old/sd-attn-procs.safetensors", ("--to", "kohya"), None, diffusers),
        (
            "diffusers-old/sd-attn-procs.safetensors",
            ("--to", "peft", "--component", "unet"),
            None,
            peft_unet,
        ),
    ]
    for fixture, args, refused, consumer in convert:
        out.append(Case("convert", (fixture,), tuple(str(a) for a in args), refused, consumer))
    return out


CASES = _cases()


# -- the float64 reference -------------------------------------------------------------------


def _matrix(d: np.ndarray) -> np.ndarray:
    return d.reshape(d.shape[0], -1)


def _truncate(d: np.ndarray, rank: int | None = None, energy: float | None = None) -> np.ndarray:
    u, s, vh = np.linalg.svd(_matrix(d), full_matrices=False)
    if energy is not None:
        share = np.cumsum(s**2) / np.sum(s**2)
        rank = int(np.searchsorted(share, energy - 1e-12) + 1)
    assert rank is not None
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(d.shape)


def _ties(parts: list[np.ndarray], density: float) -> np.ndarray:
    """TIES by the paper, entry by entry: trim each part to its top entries by magnitude, elect
    the sign of the sum, average the kept entries that agree with it."""
    trimmed = []
    for p in parts:
        flat = p.ravel()
        keep = np.argsort(-np.abs(flat), kind="stable")[: round(density * flat.size)]
        t = np.zeros_like(flat)
        t[keep] = flat[keep]
        trimmed.append(t)
    stacked = np.stack(trimmed)
    sign = np.sign(stacked.sum(axis=0))
    agree = (np.sign(stacked) == sign) & (stacked != 0)
    total = np.where(agree, stacked, 0.0).sum(axis=0)
    count = agree.sum(axis=0)
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    return mean.reshape(parts[0].shape)


def _option(args: tuple[str, ...], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def expected_deltas(case: Case, base: Path) -> dict[str, np.ndarray]:
    """What the command's output must add to each base tensor, from the inputs' factors."""
    per_input = [consumers.reference_deltas(load_adapter(FIX / n), base) for n in case.inputs]
    args = case.args
    if case.command in ("rescale", "convert"):
        factor = float(_option(args, "--factor") or 1.0)
        component = _option(args, "--component")
        return {
            k: factor * d
            for k, d in per_input[0].items()
            if component is None or k.startswith(component + "/")
        }
    if case.command == "resize":
        rank, energy = _option(args, "--rank"), _option(args, "--energy")
        return {
            k: d
            if k.endswith(".bias")
            else _truncate(d, int(rank) if rank else None, float(energy) if energy else None)
            for k, d in per_input[0].items()
        }
    weights = [float(w) for w in (_option(args, "--weights") or "1,1").split(",")]
    method = _option(args, "--method") or "concat"
    keys = list(dict.fromkeys(k for deltas in per_input for k in deltas))
    out = {}
    for k in keys:
        parts = [w * deltas[k] for w, deltas in zip(weights, per_input, strict=True) if k in deltas]
        if method == "ties" and not k.endswith(".bias"):
            out[k] = _ties(parts, float(_option(args, "--density")))
        else:
            out[k] = np.sum(parts, axis=0)
        if method == "svd" and not k.endswith(".bias"):
            out[k] = _truncate(out[k], int(_option(args, "--rank")))
    return out


#: Relative error allowed per output dtype: the factors are rounded once to it.
TOLERANCE = {"F32": 2e-6, "F16": 2e-3, "BF16": 2e-2}


def _check_merged(
    consumed: consumers.Consumed, expected: dict[str, np.ndarray], dtype: str, bf16_base: bool
) -> None:
    """Each updated tensor is base + expected (to the dtype's rounding); the rest unchanged."""
    assert set(expected) <= set(consumed.merged), sorted(set(expected) - set(consumed.merged))[:3]
    eps = {"F32": 2.0**-23, "F16": 2.0**-10, "BF16": 2.0**-7}
    for key, got in consumed.merged.items():
        before = consumed.base.get(key)
        if key not in expected:
            assert before is not None and np.array_equal(got, before), f"{key} changed"
            continue
        want = expected[key] if before is None else before + expected[key]
        scale = np.linalg.norm(expected[key]) + 1e-30
        # the merge itself rounds to the base's dtype (bf16 base: the bf16 step of W + dW)
        base_eps = eps["BF16"] if bf16_base else eps["F32"]
        err = np.linalg.norm(got - want)
        allowed = TOLERANCE[dtype] * scale + 2 * base_eps * np.linalg.norm(want)
        assert err <= allowed, f"{key}: |merged - reference| {err:.3g} > {allowed:.3g}"


@functools.cache
def _valid_with_base(fixture: str, base: Path) -> bool:
    return _invoke("validate", FIX / fixture, "--fail-on", "warning", "--base", base).exit_code == 0


def _invoke(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def _output_path(case: Case, tmp_path: Path, fmt: str) -> Path:
    single = fmt == "kohya" or (fmt == "diffusers-old")
    return tmp_path / ("out.safetensors" if single else "out")


def _target_format(case: Case) -> str:
    if case.command == "convert":
        return _option(case.args, "--to")
    return load_adapter(FIX / case.inputs[0]).format


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_written_adapter_validates_and_loads_in_its_consumer(case: Case, tmp_path):
    fmt = _target_format(case) if case.refused is None or case.command == "convert" else "peft"
    out = _output_path(case, tmp_path, fmt)
    inputs = [FIX / n for n in case.inputs]
    result = _invoke(case.command, *inputs, "-o", out, *case.args)
    if case.refused is not None:
        # run() maps the error to this one line and its exit code (tests/cli/test_algebra_cli.py)
        error = result.exception
        assert isinstance(error, LoraToolError), result.output
        assert error.exit_code in (2, 3) and "\n" not in str(error), str(error)
        assert case.refused in str(error), str(error)
        assert not out.exists()
        return
    assert result.exit_code == 0, result.output
    consumer, base = case.consumer or FIXTURES[case.inputs[0]]
    written = load_adapter(out)

    # --base when the command had one, and wherever the input itself passes against the base
    # (a command must not make a valid file invalid)
    with_base = "--base" in case.args or all(_valid_with_base(n, base) for n in case.inputs)
    check = _invoke(
        "validate", out, "--fail-on", "warning", *(["--base", base] if with_base else [])
    )
    assert check.exit_code == 0, check.output

    if consumer == "peft":
        consumed = consumers.peft_consume(base, out)
    elif consumer == "peft-unet":
        consumed = consumers.peft_consume(base / "unet", out, kind="unet")
    elif consumer == "diffusers":
        weights = out if out.suffix == ".safetensors" else next(out.glob("*.safetensors"))
        consumed = consumers.diffusers_consume(base, weights)
    else:
        consumed = consumers.reader_consume(base, out)
    problems = consumed.problems(len(written.modules))
    if not any(m.component == "text_encoder" for m in written.modules.values()):
        # diffusers says so for every UNet-only LoRA, whoever wrote it: nothing is lost
        problems = [p for p in problems if NO_TEXT_ENCODER_KEYS not in p]
    if case.inputs[0] == "peft/llama-bias":
        # PEFT says so for the fixture itself: tiny-llama's q/v projections have no bias
        problems = [p for p in problems if LORA_BIAS_WITHOUT_BIAS not in p]
    assert problems == []

    expected = expected_deltas(case, base)
    first = load_adapter(inputs[0])
    replaced = consumers.replacements(first, base)
    dora = consumers.dora_merged(first, base, consumed.base, expected)
    dtype = next(iter(written.modules.values())).up.dtype
    full = {**expected}
    for key, value in {**replaced, **dora}.items():
        full[key] = value - consumed.base[key]
    _check_merged(consumed, full, dtype, bf16_base="bf16" in str(base))
