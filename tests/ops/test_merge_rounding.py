"""merge against PEFT's merge_and_unload, byte for byte, for every layer kind and base dtype.

Each PEFT layer kind rounds its merge its own way (docs/math.md, section 7): Linear, GPT-2
Conv1D and conv layers add the float32 update to the weight in place (one rounding), while
``Embedding.merge`` adds ``delta.to(weight.dtype)`` (two roundings for fp16 / bf16 weights);
DoRA rescales the unrounded sum; lora_bias adds to the base bias. A tiny model holding every
kind is built here with torch, trained-looking factors are set, PEFT merges it (the oracle), and
loratool merges the saved files.

What each engine promises (README, docs/math.md): ``--exact`` (torch's own matmul) writes PEFT's
bytes at every rank; the default cpu engine (numpy + OpenBLAS) writes them at small ranks, and at
larger ranks stays within the float32 summation error of the product ``B @ A``, because the two
BLAS libraries sum the ``r`` terms in different orders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from lora_tools.ops.merge import merge  # noqa: E402

pytestmark = [
    pytest.mark.oracle,
    # PEFT notes that it flips fan_in_fan_out per layer, and takes lora_B.bias for a shard
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set"),
    pytest.mark.filterwarnings("ignore:Adapter 'default'"),
]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Tiny(nn.Module):
    """One layer of every kind PEFT merges (reduced dimensions are multiples of 8, where the
    DoRA norm's summation order is torch's, see merge.arithmetic.lane_norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(96, 80)
        self.c1d = Conv1D(80, 96)  # GPT-2 style: weight stored [in, out] = [96, 80]
        self.conv = nn.Conv2d(16, 24, 3)
        self.pw = nn.Conv2d(16, 24, 1)
        self.c1 = nn.Conv1d(16, 24, 3)
        self.c3 = nn.Conv3d(8, 12, 3)
        self.emb = nn.Embedding(120, 40)


#: variant -> (LoraConfig options, the layers it targets). PEFT turns fan_in_fan_out on for the
#: Conv1D layer by itself.
VARIANTS = {
    "lora": ({}, ["lin", "c1d", "conv", "pw", "c1", "c3", "emb"]),
    "dora": ({"use_dora": True}, ["lin", "c1d", "conv", "pw", "c1", "c3"]),
    "lora_bias": ({"lora_bias": True}, ["lin", "c1d", "conv"]),
}


def _build(tmp_path: Path, dtype: str, variant: str, rank: int) -> tuple[Path, Path, dict]:
    """Base file, PEFT adapter folder, and PEFT's merged state dict for one case."""
    torch.manual_seed(rank * 100 + len(variant) + list(DTYPES).index(dtype))
    options, targets = VARIANTS[variant]
    tdtype = DTYPES[dtype]
    base = Tiny().to(tdtype)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn_like(p))
    state = {k: v.contiguous() for k, v in base.state_dict().items()}
    base_file = tmp_path / "base.safetensors"
    save_file(state, base_file)

    config = LoraConfig(r=rank, lora_alpha=2 * rank + 1, target_modules=targets, **options)
    model = get_peft_model(Tiny().to(tdtype), config)
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # factors, DoRA magnitudes and lora biases, all non-trivial
                p.copy_(torch.randn_like(p) * 0.5)
    model.save_pretrained(tmp_path / "adapter")

    fresh = Tiny().to(tdtype)
    fresh.load_state_dict(load_file(base_file))
    merged = PeftModel.from_pretrained(fresh, tmp_path / "adapter").merge_and_unload()
    reference = {k: v.contiguous() for k, v in merged.state_dict().items()}
    changed = sorted(k for k in reference if not torch.equal(reference[k], state[k]))
    expected = {f"{t}.weight" for t in targets}
    if variant == "lora_bias":
        expected |= {f"{t}.bias" for t in targets}
    assert set(changed) == expected  # the oracle merged every kind it was asked to
    return base_file, tmp_path / "adapter", reference


def _differing(got: dict, reference: dict) -> dict[str, str]:
    out = {}
    for key, want in reference.items():
        have = got[key]
        assert have.dtype == want.dtype and have.shape == want.shape, key
        if have.view(-1).view(torch.uint8).tolist() != want.view(-1).view(torch.uint8).tolist():
            out[key] = f"{int((have != want).sum())} of {want.numel()} elements"
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_bit_identical_to_peft_per_layer_kind(tmp_path: Path, dtype: str, variant: str) -> None:
    """Rank 4: both engines write PEFT's bytes for every kind (fp16 / bf16 embeddings included,
    whose update PEFT rounds to the weight's dtype before adding it)."""
    base, adapter, reference = _build(tmp_path, dtype, variant, rank=4)
    for engine in ("cpu", "torch-cpu"):
        out = tmp_path / f"{engine}.safetensors"
        merge(base, [adapter], out, device=engine)
        assert _differing(load_file(out), reference) == {}, engine


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_larger_rank_exact_engine_identical_cpu_engine_within_bound(
    tmp_path: Path, dtype: str, variant: str
) -> None:
    """Rank 32: ``--exact`` still writes PEFT's bytes; the cpu engine differs from PEFT at most
    by the float32 summation error of the product, ``e = |s| 2 (r + 1) 2^-24 sum_k |B_ik A_kj|``
    (carried through DoRA's rescaling), plus one rounding of the output dtype."""
    rank = 32
    base, adapter, reference = _build(tmp_path, dtype, variant, rank=rank)
    exact = tmp_path / "exact.safetensors"
    merge(base, [adapter], exact, device="torch-cpu")
    assert _differing(load_file(exact), reference) == {}

    out = tmp_path / "cpu.safetensors"
    merge(base, [adapter], out, device="cpu")
    got = load_file(out)
    factors = {k: v.double() for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    originals = {k: v.double() for k, v in load_file(base).items()}
    scale = (2 * rank + 1) / rank
    for key, want in reference.items():
        if key.endswith(".bias") or key not in originals or torch.equal(got[key], want):
            assert torch.equal(got[key], want), key  # no product involved: exact
            continue
        layer = key.removesuffix(".weight")
        stem = f"base_model.model.{layer}"
        emb = layer == "emb"
        a = factors[f"{stem}.lora_embedding_A" if emb else f"{stem}.lora_A.weight"]
        b = factors[f"{stem}.lora_embedding_B" if emb else f"{stem}.lora_B.weight"]
        a, b = a.reshape(rank, -1), b.reshape(-1, rank)
        transposed = layer in ("emb", "c1d")  # stored [in, out]: the update is (B A)^T
        magnitude = (b.abs() @ a.abs()).T if transposed else b.abs() @ a.abs()
        bound = (scale * 2 * (rank + 1) * 2.0**-24 * magnitude).reshape(want.shape)
        if variant == "dora":
            # W' = (m / n) T with T = W + dW, n = ||T|| per output feature: an error e in dW
            # moves W' by at most (m / n) e + |W'| ||e|| / n.
            delta = (b @ a).T if transposed else b @ a
            total = originals[key] + scale * delta.reshape(want.shape)
            feature_axis = 1 if transposed else 0
            others = tuple(d for d in range(total.dim()) if d != feature_axis)
            norm = total.pow(2).sum(others, keepdim=True).sqrt()
            err_norm = bound.pow(2).sum(others, keepdim=True).sqrt()
            m = factors[f"{stem}.lora_magnitude_vector"].reshape(norm.shape).abs()
            bound = (m / norm) * bound + want.double().abs() * err_norm / norm
        have = got[key].double()
        ulp = _ulp(torch.maximum(have.abs(), want.double().abs()), want.dtype)
        assert torch.all((have - want.double()).abs() <= bound + ulp), key


def _ulp(magnitudes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at each magnitude, as float64."""
    finfo = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(magnitudes.clamp_min(finfo.tiny)))
    return torch.pow(2.0, exponent) * finfo.eps


def test_fp16_embedding_rounds_the_update_first(tmp_path: Path) -> None:
    """The case found by hand (issue 10): an fp16 embedding merge was 1 ulp off PEFT on about a
    third of the elements, because PEFT adds ``delta.to(float16)``; now every byte matches."""
    base, adapter, reference = _build(tmp_path, "fp16", "lora", rank=4)
    out = tmp_path / "out.safetensors"
    merge(base, [adapter], out, device="cpu")
    got = load_file(out)["emb.weight"]
    assert torch.equal(got, reference["emb.weight"])
    # the two orders really differ here, so the test can fail: one rounding gives other bytes
    w = load_file(base)["emb.weight"].float()
    a = load_file(adapter / "adapter_model.safetensors")
    delta = (
        a["base_model.model.emb.lora_embedding_B"] @ a["base_model.model.emb.lora_embedding_A"]
    ).T * np.float32(9 / 4)
    assert not torch.equal((w + delta).half(), got)
