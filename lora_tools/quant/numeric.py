"""Dequantize and requantize one weight the way its scheme's own quantizer does (numpy + ml_dtypes).

Every canonical quantizer computes ``scale = amax / finfo.max`` (or its inverse) over its
granularity, divides (or multiplies by the inverse), clamps and casts with round-to-nearest-even;
they differ in the dtype each step runs in. Each ``_quantize_*`` below follows its source step by
step (FORMATS.md section 6 names the file), so the bytes match it.

Example:
    >>> import numpy as np
    >>> from lora_tools.quant.schemes import Scheme
    >>> s = Scheme("hf-block-fp8", "F8_E4M3", "block", (2, 2), "weight_scale_inv")
    >>> q, scale = quantize(s, np.array([[1.0, -2.0], [0.5, 4.0]]))
    >>> round(float(dequantize(s, q, scale).max()), 4)
    4.0
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from lora_tools.quant.schemes import FP8_MAX, Scheme

_FP8_NUMPY = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
_FLOAT_NUMPY = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F64": np.float64,
}


def _fp8(scheme: Scheme) -> type:
    return _FP8_NUMPY[scheme.fp8_dtype or "F8_E4M3"]


def _cast_fp8(values: np.ndarray, scheme: Scheme) -> np.ndarray:
    """Clamp to ±finfo.max, then round to nearest even (ml_dtypes' cast)."""
    top = FP8_MAX[scheme.fp8_dtype or "F8_E4M3"]
    return np.clip(values, -top, top).astype(_fp8(scheme))


def _blocks(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    rows, cols = shape[-2:]
    return -(-rows // block[0]), -(-cols // block[1])


def _expand(grid: np.ndarray, shape: tuple[int, ...], block: tuple[int, int]) -> np.ndarray:
    """A per-block array repeated over its blocks, cut to ``shape`` (partial edge blocks)."""
    full = np.repeat(np.repeat(grid, block[0], axis=-2), block[1], axis=-1)
    return full[..., : shape[-2], : shape[-1]]


def _block_amax(values: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    rb, cb = _blocks(values.shape, block)
    pad = [(0, 0)] * (values.ndim - 2)
    pad += [(0, rb * block[0] - values.shape[-2]), (0, cb * block[1] - values.shape[-1])]
    padded = np.pad(np.abs(values), pad)  # zeros never raise an amax
    tiles = padded.reshape(*values.shape[:-2], rb, block[0], cb, block[1])
    return tiles.max(axis=(-3, -1))


def _quantize_hf(
    scheme: Scheme, weight: np.ndarray, whole_amax: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """transformers Fp8Quantize._quantize_one, in float32 throughout."""
    w = weight.astype(np.float32)
    block = scheme.block_size or w.shape[-2:]
    if whole_amax is not None and scheme.block_size is None and w.ndim == 2:
        amax = np.asarray(whole_amax, dtype=np.float32).reshape(1, 1)
    else:
        amax = _block_amax(w, block)
    top = np.float32(FP8_MAX[scheme.fp8_dtype or "F8_E4M3"])
    # torch runs `448.0 / t` as reciprocal(t) * 448.0: two float32 roundings, kept here
    safe = np.where(amax > 0, amax, np.float32(1)).astype(np.float32)
    scale = ((np.float32(1) / safe).astype(np.float32) * top).astype(np.float32)
    scale = np.where(amax > 0, scale, np.float32(1)).astype(np.float32)
    inv = (np.float32(1) / scale).astype(np.float32)
    if scheme.scale_fmt == "ue8m0":
        tiny = np.finfo(np.float32).tiny
        inv = np.exp2(np.ceil(np.log2(np.maximum(inv, tiny)))).astype(np.float32)
        scale = (np.float32(1) / inv).astype(np.float32)
    q = _cast_fp8(w * _expand(scale, w.shape, block), scheme)
    # per tensor (no weight_block_size) transformers keeps the grid's shape: [..., 1, 1]
    return q, inv


def _quantize_compressed_tensors(
    scheme: Scheme, weight: np.ndarray, compute: type, whole_amax: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """compressed-tensors calculate_qparams + _quantize, in the weight's (= the scale's) dtype.

    torch runs a bf16/fp16 division in float32 and rounds the result to bf16/fp16; so does this.
    """
    w = weight.astype(compute)
    if scheme.granularity == "channel":
        amax = np.abs(w).max(axis=-1, keepdims=True)
    elif whole_amax is not None:
        amax = np.asarray(whole_amax, dtype=compute).reshape(1)
    else:
        amax = np.abs(w).max().reshape(1)
    top = FP8_MAX[scheme.fp8_dtype or "F8_E4M3"]
    scale = (amax.astype(np.float32) / np.float32(top)).astype(compute)
    eps = np.finfo(compute).eps
    scale = np.where(scale == 0, np.asarray(eps, dtype=compute), scale).astype(compute)
    scaled = (w.astype(np.float32) / scale.astype(np.float32)).astype(compute)
    scaled = scaled + np.asarray(0, dtype=compute)  # its `+= zero_point`: -0 becomes +0
    return _cast_fp8(scaled.astype(np.float32), scheme), scale


def _quantize_comfy(
    scheme: Scheme, weight: np.ndarray, compute: type, whole_amax: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """ComfyUI TensorCoreFP8Layout.quantize: scale in the tensor's dtype, then float32."""
    w = weight.astype(compute)
    top = FP8_MAX[scheme.fp8_dtype or "F8_E4M3"]
    amax = np.abs(w).max() if whole_amax is None else np.asarray(whole_amax, dtype=compute)
    scale = np.float32((np.float32(amax) / np.float32(top)).astype(compute))
    if scale == 0:
        scale = np.float32(1)  # ComfyUI's 1/0 would make NaN of an all-zero weight
    inv = np.asarray(np.float32(1) / scale, dtype=np.float32).astype(compute)
    scaled = (w.astype(np.float32) * np.float32(inv)).astype(compute)
    return _cast_fp8(scaled.astype(np.float32), scheme), np.asarray(scale, dtype=np.float32)


def quantize(
    scheme: Scheme,
    weight: np.ndarray,
    *,
    compute_dtype: str = "F32",
    whole_amax: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Quantize ``weight`` as ``scheme``'s canonical quantizer does, with a fresh scale.

    Args:
        scheme: the base's scheme (from :func:`~lora_tools.quant.schemes.detect_scheme`).
        weight: the merged weight, float32 or float64.
        compute_dtype: the safetensors dtype the quantizer runs in where it runs in the
            weight's dtype: compressed-tensors and ComfyUI. For compressed-tensors pass the
            stored scale's dtype (it is the original weight's); ignored by the others.
        whole_amax: for a per-tensor scale, the amax of the whole weight
            (:func:`tensor_amax`), so that ``weight`` may be a row block of it: each block
            then gets the bytes the whole tensor would. Ignored by the other granularities.

    Returns:
        (fp8 array of the scheme's dtype, new weight scale) - the scale as the scheme stores it
        (float32 ``weight_scale_inv`` grid, float32 scalar, or compute-dtype per tensor [1] /
        per channel [out, 1]); None for plain fp8.
    """
    compute = _FLOAT_NUMPY[compute_dtype]
    if scheme.name == "plain-fp8":
        return _cast_fp8(weight, scheme), None
    if scheme.name == "hf-block-fp8":
        return _quantize_hf(scheme, weight, whole_amax)
    if scheme.name == "compressed-tensors-fp8":
        return _quantize_compressed_tensors(scheme, weight, compute, whole_amax)
    if scheme.name in ("comfyui-fp8", "comfyui-scaled-fp8"):
        return _quantize_comfy(scheme, weight, compute, whole_amax)
    raise ValueError(f"scheme {scheme.describe()} has no quantizer")


def tensor_amax(weight: np.ndarray, *, compute_dtype: str = "F32") -> np.ndarray:
    """``max |weight|`` as a per-tensor quantizer takes it: in its compute dtype (float32 for
    transformers and ComfyUI here, the scale's for compressed-tensors). The maximum of row
    blocks' amaxes is the whole tensor's (rounding is monotonic), so a weight may be measured
    block by block and quantized block by block (:func:`quantize` ``whole_amax``)."""
    w = np.asarray(weight).astype(_FLOAT_NUMPY[compute_dtype])
    return np.abs(w).max(initial=np.zeros((), w.dtype))


def expand_scale(scheme: Scheme, scale: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """Each element's dequantization factor (float64): scales broadcast per tensor, per channel,
    or per block with partial edge blocks; ones for plain fp8."""
    if scale is None or scheme.name == "plain-fp8":
        return np.ones(shape)
    factor = np.asarray(scale).astype(np.float64)
    if scheme.granularity == "block" and scheme.block_size:
        expected = _blocks(shape, scheme.block_size)
        if factor.shape[-2:] != expected:
            raise ValueError(
                f"scale grid {factor.shape} does not fit weight {shape} in "
                f"{scheme.block_size[0]}x{scheme.block_size[1]} blocks (expected {expected})"
            )
        factor = _expand(factor, shape, scheme.block_size)
    elif factor.size == 1:
        factor = factor.reshape(())
    elif scheme.name == "hf-block-fp8":
        factor = factor.reshape(*factor.shape[:-2], 1, 1)  # per tensor of stacked experts
    return np.broadcast_to(factor, shape)


def dequantize(scheme: Scheme, weight: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """The exact float64 value ``fp8 * scale`` of every element (no rounding: it fits 53 bits).

    The canonical dequantizers round this product to their compute dtype (float32 for
    transformers, the scale's dtype for compressed-tensors, the original dtype for ComfyUI).
    """
    values = np.asarray(weight).astype(np.float64)
    return values * expand_scale(scheme, scale, values.shape)


def fp8_step(scheme: Scheme, values: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """The spacing of the scheme's fp8 grid around each of ``values`` (float64), in weight units:
    a round-to-nearest quantizer lands within half of it unless it saturates."""
    info = ml_dtypes.finfo(_fp8(scheme))
    values = np.asarray(values, dtype=np.float64)
    factor = np.abs(expand_scale(scheme, scale, values.shape))
    unit = np.abs(values) / np.where(factor > 0, factor, 1)
    exponent = np.floor(np.log2(np.maximum(unit, float(info.smallest_normal))))
    return np.exp2(exponent - info.nmant) * factor


def round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` (float64) rounded once, to nearest even, to the float ``dtype`` (``--dtype``).

    numpy rounds float64 to float32 and float16 directly; ml_dtypes' (and torch's) bfloat16
    goes through float32, two roundings. For bfloat16 the float32 step rounds to odd instead
    (truncate, then set the last bit where inexact), after which the bfloat16 rounding is the
    correctly rounded one (24 >= 8 + 2 bits).

    Example:
        >>> float(round_to(np.array([1.0 + 2.0**-8 + 2.0**-30]), "BF16")[0])
        1.0078125
    """
    target = _FLOAT_NUMPY[dtype]
    values = np.asarray(values, dtype=np.float64)
    if dtype != "BF16":
        return values.astype(target)
    with np.errstate(over="ignore"):  # beyond float32: inf, as beyond bfloat16
        near = values.astype(np.float32)
    inexact = near.astype(np.float64) != values
    toward_zero = inexact & (np.abs(near.astype(np.float64)) > np.abs(values))
    odd = np.where(toward_zero, np.nextafter(near, np.float32(0)), near).astype(np.float32)
    bits = odd.view(np.uint32)
    bits = np.where(inexact, bits | np.uint32(1), bits).astype(np.uint32)
    return bits.view(np.float32).astype(target)
