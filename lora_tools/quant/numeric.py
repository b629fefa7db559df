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

import math
import threading

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


#: Temporaries up to this size are reused per thread (:func:`_scratch`); larger ones (a whole
#: stacked-experts weight) are allocated each time, so the reused memory stays small.
_SCRATCH_BYTES = 64 << 20
_LOCAL = threading.local()


def _scratch(role: str, dtype: type | np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A temporary of this thread's, reused for each row block: fresh arrays page-fault on
    every block (as the merge engine's own buffers avoid). Its contents are garbage; it stays
    valid until this thread asks for ``role`` again, so no function returns one."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes > _SCRATCH_BYTES:
        return np.empty(shape, dtype)
    pool = getattr(_LOCAL, "pool", None)
    if pool is None:
        pool = _LOCAL.pool = {}
    raw = pool.get(role)
    if raw is None or raw.nbytes < nbytes:
        raw = pool[role] = np.empty(max(nbytes, 1), np.uint8)
    return raw[:nbytes].view(dtype).reshape(shape)


def _fp8(scheme: Scheme) -> type:
    return _FP8_NUMPY[scheme.fp8_dtype or "F8_E4M3"]


def _cast_fp8(values: np.ndarray, scheme: Scheme, *, in_place: bool = False) -> np.ndarray:
    """Clamp to ±finfo.max, then round to nearest even (ml_dtypes' cast, or the same bytes
    by :func:`_float32_to_fp8` for float32); ``in_place`` works in ``values`` itself (a
    temporary of the caller's)."""
    top = FP8_MAX[scheme.fp8_dtype or "F8_E4M3"]
    clamped = np.clip(values, -top, top, out=values if in_place else None)
    if clamped.dtype != np.float32 or np.isnan(clamped).any():
        return clamped.astype(_fp8(scheme))
    return _float32_to_fp8(clamped, scheme.fp8_dtype or "F8_E4M3")


#: fp8 format -> (mantissa bits, exponent bias).
_FP8_LAYOUT = {"F8_E4M3": (3, 7), "F8_E5M2": (2, 15)}


def _float32_to_fp8(values: np.ndarray, fp8: str) -> np.ndarray:
    """Finite float32 values within ±finfo.max, rounded to nearest even fp8, on the bits (twice
    as fast as ml_dtypes' cast; the same bytes). ``values`` is overwritten.

    Adding ``c = 2^(e + 23 - m)`` (``e`` the value's exponent, at least the smallest normal
    one) and subtracting it again rounds ``|x|`` to the fp8 grid in float32's own arithmetic
    (round to nearest even); the rounded value's float32 bits then hold the fp8 code, once
    rebiased. Subnormals are moved up by the smallest normal value (exact) to take the same
    road and moved back in the code.
    """
    mantissa, bias = _FP8_LAYOUT[fp8]
    tiny_exponent = 127 - bias + 1  # float32 exponent field of the smallest normal fp8 value
    sign = _scratch("fp8.sign", np.uint32, values.shape)
    np.right_shift(values.view(np.uint32), np.uint32(24), out=sign)
    sign &= np.uint32(0x80)
    a = np.abs(values, out=values)
    magic = _scratch("fp8.magic", np.uint32, values.shape)
    np.bitwise_and(a.view(np.uint32), np.uint32(0x7F80_0000), out=magic)
    np.maximum(magic, np.uint32(tiny_exponent << 23), out=magic)
    magic += np.uint32((23 - mantissa) << 23)
    a += magic.view(np.float32)
    a -= magic.view(np.float32)  # |x| on the fp8 grid, rounded to nearest even
    small = _scratch("fp8.small", np.bool_, values.shape)
    np.less(a, np.float32(2.0 ** (1 - bias)), out=small)
    np.add(a, np.float32(2.0 ** (1 - bias)), out=a, where=small)
    code = np.right_shift(a.view(np.uint32), np.uint32(23 - mantissa), out=magic)
    code -= np.uint32((127 - bias) << mantissa)
    np.subtract(code, np.uint32(1 << mantissa), out=code, where=small)
    code |= sign
    return code.astype(np.uint8).view(_FP8_NUMPY[fp8])


def _fp8_to_float64(codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The exact float64 value of each fp8 element, through float16's bits (ml_dtypes' own
    cast takes about three times as long), into ``out`` if given.

    F8_E5M2 is float16's top byte. F8_E4M3's 7 magnitude bits shifted into float16's place
    (``(c & 0x7F) << 7``) read as float16 give its value divided by 2^8, for normal and
    subnormal codes alike; its NaN codes (0x7F, 0xFF) are set apart.
    """
    values = np.empty(codes.shape, np.float64) if out is None else out
    raw = _scratch("fp8.raw", np.uint16, codes.shape)
    np.copyto(raw, codes.view(np.uint8))
    if codes.dtype == np.dtype(ml_dtypes.float8_e5m2):
        np.left_shift(raw, 8, out=raw)
        np.copyto(values, raw.view(np.float16))
        return values
    magnitude = _scratch("fp8.magnitude", np.uint16, codes.shape)
    np.bitwise_and(raw, np.uint16(0x7F), out=magnitude)
    nan = _scratch("fp8.nan", np.bool_, codes.shape)
    np.equal(magnitude, 0x7F, out=nan)
    np.bitwise_and(raw, np.uint16(0x80), out=raw)
    np.left_shift(raw, 8, out=raw)
    np.left_shift(magnitude, 7, out=magnitude)
    np.bitwise_or(raw, magnitude, out=raw)
    np.copyto(values, raw.view(np.float16))
    values *= 256.0
    if nan.any():
        values[nan] = np.copysign(np.nan, values[nan])
    return values


def _blocks(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    rows, cols = shape[-2:]
    return -(-rows // block[0]), -(-cols // block[1])


def _expand(grid: np.ndarray, shape: tuple[int, ...], block: tuple[int, int]) -> np.ndarray:
    """A per-block array repeated over its blocks, cut to ``shape`` (partial edge blocks)."""
    full = np.repeat(np.repeat(grid, block[0], axis=-2), block[1], axis=-1)
    return full[..., : shape[-2], : shape[-1]]


def _scale_blocks(values: np.ndarray, grid: np.ndarray, block: tuple[int, int]) -> None:
    """``values *= grid`` expanded over its blocks (partial edge blocks), in place, without
    building the expanded grid: rows repeated, then each block broadcast over its columns."""
    rows, cols = values.shape[-2:]
    per_row = np.repeat(grid, block[0], axis=-2)[..., :rows, :]  # [..., rows, column blocks]
    full = cols // block[1]
    if full:
        tiles = values[..., : full * block[1]].view()
        tiles.shape = (*values.shape[:-1], full, block[1])  # a view, never a copy
        np.multiply(tiles, per_row[..., :full, None], out=tiles)
    if full * block[1] < cols:
        edge = values[..., full * block[1] :]
        np.multiply(edge, per_row[..., full:], out=edge)


def _block_amax(values: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    rb, cb = _blocks(values.shape, block)
    magnitude = np.abs(values, out=_scratch("amax", values.dtype, values.shape))
    if rb * block[0] != values.shape[-2] or cb * block[1] != values.shape[-1]:
        pad = [(0, 0)] * (values.ndim - 2)
        pad += [(0, rb * block[0] - values.shape[-2]), (0, cb * block[1] - values.shape[-1])]
        magnitude = np.pad(magnitude, pad)  # zeros never raise an amax
    tiles = magnitude.reshape(*values.shape[:-2], rb, block[0], cb, block[1])
    return tiles.max(axis=-1).max(axis=-2)


def _quantize_hf(
    scheme: Scheme, weight: np.ndarray, whole_amax: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """transformers Fp8Quantize._quantize_one, in float32 throughout."""
    w = _scratch("hf.weight", np.float32, weight.shape)
    np.copyto(w, weight, casting="unsafe")  # astype's rounding, into a reused buffer
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
    _scale_blocks(w, scale, block)  # w is this function's float32 copy
    q = _cast_fp8(w, scheme, in_place=True)
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
        _check_grid(scheme, factor, shape)
        factor = _expand(factor, shape, scheme.block_size)
    elif factor.size == 1:
        factor = factor.reshape(())
    elif scheme.name == "hf-block-fp8":
        factor = factor.reshape(*factor.shape[:-2], 1, 1)  # per tensor of stacked experts
    return np.broadcast_to(factor, shape)


def dequantize(
    scheme: Scheme,
    weight: np.ndarray,
    scale: np.ndarray | None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The exact float64 value ``fp8 * scale`` of every element (no rounding: it fits 53 bits),
    into ``out`` (float64, the weight's shape) if given.

    The canonical dequantizers round this product to their compute dtype (float32 for
    transformers, the scale's dtype for compressed-tensors, the original dtype for ComfyUI).
    The values are those of :func:`expand_scale` times the weight, computed without the
    expanded scale.
    """
    weight = np.asarray(weight)
    if weight.dtype in (np.dtype(t) for t in _FP8_NUMPY.values()):
        values = _fp8_to_float64(weight, out)
    elif out is None:
        values = weight.astype(np.float64)
    else:
        values = out
        np.copyto(values, weight)
    if scale is None or scheme.name == "plain-fp8":
        return values
    factor = np.asarray(scale).astype(np.float64)
    if scheme.granularity == "block" and scheme.block_size:
        _check_grid(scheme, factor, values.shape)
        _scale_blocks(values, factor, scheme.block_size)
    elif factor.size == 1:
        values *= factor.reshape(())
    elif scheme.name == "hf-block-fp8":
        values *= factor.reshape(*factor.shape[:-2], 1, 1)  # per tensor of stacked experts
    else:
        values *= np.broadcast_to(factor, values.shape)
    return values


def _check_grid(scheme: Scheme, grid: np.ndarray, shape: tuple[int, ...]) -> None:
    assert scheme.block_size is not None
    expected = _blocks(shape, scheme.block_size)
    if grid.shape[-2:] != expected:
        raise ValueError(
            f"scale grid {grid.shape} does not fit weight {shape} in "
            f"{scheme.block_size[0]}x{scheme.block_size[1]} blocks (expected {expected})"
        )


def fp8_step(scheme: Scheme, values: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """The spacing of the scheme's fp8 grid around each of ``values`` (float64), in weight units:
    a round-to-nearest quantizer lands within half of it unless it saturates."""
    info = ml_dtypes.finfo(_fp8(scheme))
    values = np.asarray(values, dtype=np.float64)
    factor = np.abs(expand_scale(scheme, scale, values.shape))
    unit = np.abs(values) / np.where(factor > 0, factor, 1)
    exponent = np.floor(np.log2(np.maximum(unit, float(info.smallest_normal))))
    return np.exp2(exponent - info.nmant) * factor


#: float64 bits below float32's last mantissa bit (52 - 23).
_LOW29 = np.uint64((1 << 29) - 1)


def round_to(values: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """``values`` (float64) rounded once, to nearest even, to the float ``dtype`` (``--dtype``),
    into ``out`` (C-contiguous, ``values``' shape) if given.

    numpy rounds float64 to float32 and float16 directly; ml_dtypes' (and torch's) bfloat16
    goes through float32, two roundings. For bfloat16 the float32 step rounds to odd instead
    (truncate the float64 to float32's 24 bits, then set the last one where a dropped bit was
    set), after which the bfloat16 rounding is the correctly rounded one (24 >= 8 + 2 bits).
    Where float32 has fewer bits (below its normal range) and for NaN, the float32 step rounds
    to odd by comparison and ml_dtypes rounds to bfloat16 (:func:`_odd_float32`).

    Example:
        >>> float(round_to(np.array([1.0 + 2.0**-8 + 2.0**-30]), "BF16")[0])
        1.0078125
    """
    target = _FLOAT_NUMPY[dtype]
    values = np.ascontiguousarray(values, dtype=np.float64)
    result = np.empty(values.shape, target) if out is None else out
    if dtype != "BF16":
        np.copyto(result, values, casting="unsafe")  # astype's rounding
        return result
    bits = values.view(np.uint64)
    odd = _scratch("round.odd", np.uint64, values.shape)
    np.bitwise_and(bits, _LOW29, out=odd)
    odd += _LOW29  # carries into bit 29 where a dropped bit is set
    odd &= _LOW29 + np.uint64(1)
    odd |= bits
    odd &= ~_LOW29
    near = _scratch("round.near", np.float32, values.shape)
    with np.errstate(over="ignore"):  # beyond float32: inf, as beyond bfloat16
        np.copyto(near, odd.view(np.float64), casting="unsafe")  # exact in the normal range
    top = near.view(np.uint32)
    work = _scratch("round.work", np.uint32, values.shape)
    np.bitwise_and(top, np.uint32(0x7FFF_FFFF), out=work)
    work -= np.uint32(0x0080_0000)  # normal and inf: 0..0x7F000000; zero: 0xFF800000
    slow = _scratch("round.slow", np.bool_, values.shape)
    np.greater(work, np.uint32(0x7F00_0000), out=slow)  # float32 subnormal or NaN, or zero
    nonzero = _scratch("round.nonzero", np.bool_, values.shape)
    np.not_equal(work, np.uint32(0xFF80_0000), out=nonzero)
    slow &= nonzero
    where = np.flatnonzero(slow) if slow.any() else None
    slow_values = None if where is None else _odd_float32(values.reshape(-1)[where]).astype(target)
    # float32 -> bfloat16 to nearest even on the bits, as ml_dtypes rounds it (faster)
    np.right_shift(top, 16, out=work)
    work &= np.uint32(1)
    top += np.uint32(0x7FFF)
    top += work
    top >>= 16
    np.copyto(result.view(np.uint16), top, casting="unsafe")  # the low 16 bits
    if where is not None:
        result.reshape(-1)[where] = slow_values
    return result


def _odd_float32(values: np.ndarray) -> np.ndarray:
    """float64 values rounded to float32 by round-to-odd, by comparison (any range)."""
    with np.errstate(over="ignore"):
        near = values.astype(np.float32)
    inexact = near.astype(np.float64) != values
    toward_zero = inexact & (np.abs(near.astype(np.float64)) > np.abs(values))
    odd = np.where(toward_zero, np.nextafter(near, np.float32(0)), near).astype(np.float32)
    bits = odd.view(np.uint32)
    bits = np.where(inexact, bits | np.uint32(1), bits).astype(np.uint32)
    return bits.view(np.float32)
