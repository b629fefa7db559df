"""loratool's fp8 quantizers against each scheme's own code: transformers' Fp8Quantize /
Fp8Dequantize, compressed-tensors' calculate_qparams + quantize, and ComfyUI's
TensorCoreFP8Layout.quantize (not on the package index: its four lines are transcribed in torch)."""

from __future__ import annotations

import types

import ml_dtypes
import numpy as np
import pytest

from lora_tools.quant.numeric import dequantize, expand_scale, fp8_step, quantize
from lora_tools.quant.schemes import Scheme

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.oracle

_TORCH_FP8 = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_TORCH_FLOAT = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _weight(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Gaussian values with rows of very different magnitudes, an all-zero row and -0.0s."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * np.exp2(rng.integers(-12, 6, size=(*shape[:-1], 1)))
    w[..., 0, :] = 0.0
    w[..., 1, :2] = -0.0
    return w.astype(np.float32)


def _bytes(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.contiguous().view(torch.uint8).numpy()
    return np.ascontiguousarray(array).view(np.uint8)


def _hf(block, scale_fmt="float"):
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    qc = types.SimpleNamespace(weight_block_size=block, scale_fmt=scale_fmt)
    return Fp8Quantize(types.SimpleNamespace(quantization_config=qc))


def _hf_scheme(block, scale_fmt="float") -> Scheme:
    return Scheme(
        "hf-block-fp8", "F8_E4M3", "block", block, "weight_scale_inv", scale_fmt=scale_fmt
    )


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
@pytest.mark.parametrize(
    ("shape", "block"), [((8, 12), (4, 4)), ((6, 16), (2, 8)), ((3, 8, 8), (4, 4))]
)
def test_hf_block_quantize_is_transformers_bit_for_bit(shape, block, scale_fmt):
    w = _weight(shape, seed=sum(shape))
    out = _hf(block, scale_fmt).convert({"l.weight": torch.from_numpy(w)})
    q, inv = quantize(_hf_scheme(block, scale_fmt), w)
    assert q.dtype == ml_dtypes.float8_e4m3fn and q.shape == w.shape
    np.testing.assert_array_equal(_bytes(q), _bytes(out["l.weight"]))
    np.testing.assert_array_equal(inv, out["l.weight_scale_inv"].to(torch.float32).numpy())


@pytest.mark.parametrize("shape", [(6, 10), (3, 4, 6)])
def test_hf_per_tensor_without_block_size_is_transformers_bit_for_bit(shape):
    w = _weight(shape, seed=9)
    out = _hf(None).convert({"l.weight": torch.from_numpy(w)})
    scheme = Scheme("hf-block-fp8", "F8_E4M3", "tensor", None, "weight_scale_inv")
    q, inv = quantize(scheme, w)
    np.testing.assert_array_equal(_bytes(q), _bytes(out["l.weight"]))
    np.testing.assert_array_equal(inv, out["l.weight_scale_inv"].numpy())
    np.testing.assert_array_equal(dequantize(scheme, q, inv), q.astype(np.float64) * inv)


def test_hf_partial_edge_blocks_quantize_as_if_zero_padded():
    """transformers' Fp8Quantize passes a weight that blocks do not tile through unquantized;
    the checkpoints (DeepSeek-V3 kv_a_proj_with_mqa 576 rows in 128-row blocks) carry ceil-sized
    scale grids, so loratool quantizes each partial block on its own, as the zero-padded
    tensor quantizes (zeros never raise an amax)."""
    w = _weight((7, 10), seed=3)
    padded = np.zeros((8, 12), dtype=np.float32)
    padded[:7, :10] = w
    out = _hf((4, 4)).convert({"l.weight": torch.from_numpy(padded)})
    q, inv = quantize(_hf_scheme((4, 4)), w)
    assert inv.shape == (2, 3)
    np.testing.assert_array_equal(_bytes(q), _bytes(out["l.weight"])[:7, :10])
    np.testing.assert_array_equal(inv, out["l.weight_scale_inv"].numpy())


def test_hf_dequantize_matches_transformers_including_edge_blocks():
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    w = _weight((7, 10), seed=4)
    q, inv = quantize(_hf_scheme((4, 4)), w)
    ours = dequantize(_hf_scheme((4, 4)), q, inv)
    theirs = _dequantize_fp8_weight(
        torch.from_numpy(_bytes(q).copy()).view(torch.float8_e4m3fn),
        torch.from_numpy(inv),
        [4, 4],
        torch.float32,
    )
    np.testing.assert_array_equal(ours.astype(np.float32), theirs.numpy())


def _ct(strategy: str, w: np.ndarray, dtype: str):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True)
    t = torch.from_numpy(w).to(getattr(torch, _TORCH_FLOAT[dtype]))
    if strategy == "channel":
        lo, hi = t.amin(dim=1, keepdim=True), t.amax(dim=1, keepdim=True)
    else:
        lo, hi = t.amin(), t.amax()
    scale, zero = calculate_qparams(lo, hi, args)
    q = ct_quantize(t, scale, zero, args, dtype=torch.float8_e4m3fn)
    return q, scale, ct_dequantize(q, scale, zero, args)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_compressed_tensors_quantize_is_bit_for_bit(strategy, dtype):
    w = _weight((6, 9), seed=5)
    if dtype == "F16":
        w = np.clip(w, -60000, 60000)
    scheme = Scheme("compressed-tensors-fp8", "F8_E4M3", strategy, None, "weight_scale")
    q_ref, scale_ref, deq_ref = _ct(strategy, w, dtype)
    # the canonical quantizer sees the weight in its own dtype: give it the same
    stored = torch.from_numpy(w).to(getattr(torch, _TORCH_FLOAT[dtype])).float().numpy()
    q, scale = quantize(scheme, stored.astype(np.float64), compute_dtype=dtype)
    assert scale.shape == tuple(scale_ref.shape)
    np.testing.assert_array_equal(_bytes(q), _bytes(q_ref))
    np.testing.assert_array_equal(scale.astype(np.float32), scale_ref.float().numpy())
    ours = dequantize(scheme, q, scale)
    rounded = torch.from_numpy(ours).to(deq_ref.dtype)
    np.testing.assert_array_equal(rounded.float().numpy(), deq_ref.float().numpy())


def _comfy_quantize(tensor, dtype):
    """ComfyUI comfy/quant_ops.py TensorCoreFP8Layout.quantize (scale=None), transcribed."""
    scale = torch.amax(tensor.abs()) / torch.finfo(dtype).max
    scale = scale.to(dtype=torch.float32)
    tensor_scaled = tensor * (1.0 / scale).to(tensor.dtype)
    return tensor_scaled.to(dtype), scale


@pytest.mark.parametrize("fp8", ["F8_E4M3", "F8_E5M2"])
@pytest.mark.parametrize("dtype", ["BF16", "F32", "F16"])
@pytest.mark.parametrize("name", ["comfyui-fp8", "comfyui-scaled-fp8"])
def test_comfy_quantize_is_bit_for_bit(name, dtype, fp8):
    w = _weight((5, 8), seed=6)
    w[0, 0] = 3.0  # the all-zero first row would make ComfyUI's scale 0 only if all were zero
    t = torch.from_numpy(w).to(getattr(torch, _TORCH_FLOAT[dtype]))
    q_ref, scale_ref = _comfy_quantize(t, getattr(torch, _TORCH_FP8[fp8]))
    scheme = Scheme(name, fp8, "tensor", None, "weight_scale")
    q, scale = quantize(scheme, t.float().numpy().astype(np.float64), compute_dtype=dtype)
    np.testing.assert_array_equal(_bytes(q), _bytes(q_ref))
    assert scale.dtype == np.float32 and scale == scale_ref.numpy()
    assert np.array_equal(dequantize(scheme, q, scale), _bytes(q).view(q.dtype) * np.float64(scale))


@pytest.mark.parametrize("fp8", ["F8_E4M3", "F8_E5M2"])
def test_plain_fp8_is_torch_cast_and_saturates_instead_of_nan(fp8):
    w = _weight((4, 6), seed=7) * 100
    scheme = Scheme("plain-fp8", fp8)
    q, scale = quantize(scheme, w)
    assert scale is None
    inside = torch.from_numpy(w).clamp(
        -float(ml_dtypes.finfo(q.dtype).max), float(ml_dtypes.finfo(q.dtype).max)
    )
    np.testing.assert_array_equal(_bytes(q), _bytes(inside.to(getattr(torch, _TORCH_FP8[fp8]))))
    assert np.isfinite(q.astype(np.float32)).all()


SCHEMES = [
    _hf_scheme((4, 4)),
    _hf_scheme((4, 4), "ue8m0"),
    Scheme("compressed-tensors-fp8", "F8_E4M3", "tensor", None, "weight_scale"),
    Scheme("compressed-tensors-fp8", "F8_E4M3", "channel", None, "weight_scale"),
    Scheme("comfyui-fp8", "F8_E4M3", "tensor", None, "weight_scale"),
    Scheme("comfyui-scaled-fp8", "F8_E5M2", "tensor", None, "scale_weight"),
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_round_trip_within_one_step_even_when_the_update_raises_amax(scheme):
    """Requantizing with a recomputed scale never saturates: an update that raises a layer's
    amax eightfold still lands every element within one fp8 step of W'."""
    base = _weight((7, 10), seed=8).astype(np.float64)
    raised = base.copy()
    raised[3, 4] = 8 * np.abs(base).max() + 1
    for w in (base, raised):
        q, scale = quantize(scheme, w)
        back = dequantize(scheme, q, scale)
        step = fp8_step(scheme, w, scale)
        # bf16 compute (compressed-tensors) rounds W once more before the fp8 rounding
        assert (np.abs(back - w) <= step + 1e-300).all()
        assert np.abs(back).max() >= 0.99 * np.abs(w).max()


def test_expand_scale_refuses_a_grid_that_does_not_fit():
    with pytest.raises(ValueError, match=r"expected \(2, 3\)"):
        expand_scale(_hf_scheme((4, 4)), np.ones((2, 2), np.float32), (7, 10))


@pytest.mark.parametrize("fp8", ["F8_E4M3", "F8_E5M2"])
def test_dequantize_is_each_codes_value_times_its_block_scale(fp8):
    """Every fp8 byte (NaNs, subnormals, -0 included) decoded as torch decodes it, times the
    scale of its block (partial edge blocks), exactly in float64."""
    codes = np.arange(256, dtype=np.uint8).reshape(16, 16)
    tensor = torch.from_numpy(codes.copy()).view(getattr(torch, _TORCH_FP8[fp8]))
    values = tensor.to(torch.float64).numpy()
    scheme = Scheme("hf-block-fp8", fp8, "block", (6, 5), "weight_scale_inv")
    grid = np.exp2(np.arange(12, dtype=np.float32).reshape(3, 4) - 6) * np.float32(1.1)
    expected = values * np.repeat(np.repeat(grid.astype(np.float64), 6, 0), 5, 1)[:16, :16]
    fp8_dtype = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}[fp8]
    with np.errstate(invalid="ignore"):
        ours = dequantize(scheme, codes.view(fp8_dtype), grid)
    np.testing.assert_array_equal(ours, expected)
    assert np.array_equal(np.signbit(ours), np.signbit(expected))  # -0 and -NaN too


def _nearest_bf16(values: np.ndarray) -> np.ndarray:
    """float64 values rounded to nearest even bfloat16, chosen among the neighbours of a guess
    by exact distance (independent of loratool's round-to-odd)."""
    with np.errstate(all="ignore"):
        guess = values.astype(np.float32).astype(ml_dtypes.bfloat16)
    bits = guess.view(np.uint16).astype(np.int32)
    candidates = np.stack(
        [(bits + d).astype(np.uint16).view(ml_dtypes.bfloat16) for d in (-1, 0, 1)]
    )
    with np.errstate(all="ignore"):
        distance = np.abs(candidates.astype(np.float64) - values)
    distance = np.where(np.isnan(distance), np.inf, distance)
    best = distance.min(axis=0)
    even = (candidates.view(np.uint16) & 1) == 0
    rank = np.where((distance == best) & even, 0, np.where(distance == best, 1, 2))
    nearest = np.take_along_axis(candidates, rank.argmin(axis=0)[None], axis=0)[0]
    # IEEE 754: at or beyond (2 - 2^-8) * 2^127 (half a step past the largest) is infinite
    overflow = np.abs(values) >= (2 - 2.0**-8) * 2.0**127
    return np.where(overflow, np.copysign(np.inf, values), nearest).astype(ml_dtypes.bfloat16)


def test_round_to_bfloat16_is_the_correctly_rounded_value():
    """Random magnitudes from float32's subnormals to beyond its range, every kind of bfloat16
    midpoint and its float64 neighbours (where rounding through float32 goes wrong), signed
    zeros, infinities, NaN."""
    from lora_tools.quant.numeric import round_to

    rng = np.random.default_rng(0)
    spread = rng.standard_normal(200_000) * np.exp2(rng.integers(-150, 129, 200_000))
    codes = rng.integers(0, 1 << 16, 20_000).astype(np.uint16).view(ml_dtypes.bfloat16)
    grid = codes.astype(np.float64)
    grid = grid[np.isfinite(grid) & (np.abs(grid) < 3e38)]
    up = np.nextafter(grid.astype(np.float32).astype(ml_dtypes.bfloat16), np.inf)
    mid = (grid + np.asarray(up, np.float64)) / 2
    mid = mid[np.isfinite(mid)]
    special = np.array([0.0, -0.0, np.inf, -np.inf, 2.0**-140, -(2.0**-149), 3.3961e38, 1e300])
    values = np.concatenate(
        [spread, mid, np.nextafter(mid, 0), np.nextafter(mid, np.inf), grid, special]
    )
    values = np.concatenate([values, -values])
    with np.errstate(all="ignore"):
        ours = round_to(values, "BF16")
    expected = _nearest_bf16(values)
    assert ours.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(ours.view(np.uint16), expected.view(np.uint16))
    nan = round_to(np.array([np.nan, -np.nan]), "BF16").astype(np.float32)
    assert np.isnan(nan).all()
    for name, dtype in (("F16", np.float16), ("F32", np.float32)):
        with np.errstate(all="ignore"):
            assert np.array_equal(round_to(values, name), values.astype(dtype))


@pytest.mark.parametrize("fp8", ["F8_E4M3", "F8_E5M2"])
def test_float32_to_fp8_on_the_bits_is_torchs_cast(fp8):
    """Float32 values from 0 to finfo.max (a stride through every bit pattern), every fp8
    value, every midpoint between two (ties: nearest even) and its neighbours, both signs:
    the bytes of torch's (and ml_dtypes') round-to-nearest-even cast. (Run with stride 7 when
    written: 325M and 342M values, all equal.)"""
    from lora_tools.quant.numeric import _FP8_NUMPY, _float32_to_fp8

    top = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}[fp8]
    last = int(np.float32(top).view(np.uint32))
    strided = np.arange(0, last + 1, 1009, dtype=np.uint32).view(np.float32)
    grid = np.arange(256, dtype=np.uint8).view(_FP8_NUMPY[fp8]).astype(np.float64)
    grid = np.unique(np.abs(grid[np.isfinite(grid) & (np.abs(grid) <= top)]))
    mids = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)  # exact in float32
    x = np.concatenate(
        [strided, grid.astype(np.float32), mids, np.nextafter(mids, 0), np.nextafter(mids, top)]
    ).astype(np.float32)
    x = np.concatenate([x, -x])
    expected = torch.from_numpy(x).to(getattr(torch, _TORCH_FP8[fp8])).view(torch.uint8).numpy()
    assert np.array_equal(_float32_to_fp8(x.copy(), fp8).view(np.uint8), expected)
