"""Which quantization scheme a checkpoint uses, told from its headers and config alone.

Header-only: this module imports neither torch nor ml_dtypes. The facts behind each scheme (names,
shapes, dtypes, where the scales live) are in shared FORMATS.md, section 6.

Example:
    >>> from lora_tools.quant.schemes import detect_scheme
    >>> headers = {"l.weight": ("F8_E4M3", (4, 4)), "l.weight_scale_inv": ("F32", (1, 1))}
    >>> config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    >>> detect_scheme(headers, config=config).name
    'hf-block-fp8'
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

#: safetensors dtype -> the largest finite value of that fp8 format (finfo.max).
FP8_MAX: dict[str, float] = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}

#: config ``quant_method`` values loratool refuses, with the name the refusal gives.
_REFUSED_METHODS: dict[str, str] = {
    "gptq": "GPTQ",
    "awq": "AWQ",
    "bitsandbytes": "bitsandbytes",
    "hqq": "HQQ",
    "aqlm": "AQLM",
    "eetq": "EETQ",
    "quanto": "quanto",
    "torchao": "torchao",
    "fbgemm_fp8": "fbgemm_fp8",
    "mxfp4": "MXFP4",
    "gguf": "GGUF",
    "exl2": "EXL2",
    "higgs": "HIGGS",
    "vptq": "VPTQ",
    "bitnet": "BitNet",
}

#: The names Hugging Face fp8 checkpoints give a weight's block scale, after ``<layer>.``, with
#: the activation scale's name beside it. transformers 5.24+ reads all three (its FP8 quantizer
#: renames ``<layer>.scale``, DeepSeek-V4, and ``<layer>.qscale_weight``, Mistral's own format,
#: to ``weight_scale_inv``: the same multiplier, grid and dtype); Mistral's static activation
#: scale is ``qscale_act`` (vLLM's ``input_scale``). FORMATS.md section 6.
HF_FP8_SCALE_SPELLINGS: dict[str, str] = {
    "weight_scale_inv": "activation_scale",
    "qscale_weight": "qscale_act",
    "scale": "activation_scale",
}

#: safetensors dtypes a Hugging Face fp8 weight scale may have: floats, and F8_E8M0 (a power of
#: two, exactly) for ``scale_fmt: ue8m0`` only.
_HF_SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0")

#: Tensor-name endings that only packed-integer schemes write, with the scheme they name.
_REFUSED_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".qweight", "GPTQ/AWQ int4"),
    (".qzeros", "GPTQ/AWQ int4"),
    (".g_idx", "GPTQ"),
    (".quant_state.bitsandbytes__nf4", "bitsandbytes NF4"),
    (".quant_state.bitsandbytes__fp4", "bitsandbytes FP4"),
    (".absmax", "bitsandbytes 4-bit"),
    (".quant_map", "bitsandbytes 4-bit"),
    (".SCB", "bitsandbytes int8"),
    (".weight_packed", "compressed-tensors pack-quantized (int4)"),
)


class _HasDtypeShape(Protocol):
    dtype: str
    shape: tuple[int, ...]


#: What detect_scheme reads per tensor: a TensorInfo-like object or a (dtype, shape) pair.
HeaderEntry = _HasDtypeShape | tuple[str, tuple[int, ...]]


@dataclass(frozen=True)
class Scheme:
    """How a checkpoint's weights are quantized, and where each weight's scales live.

    Attributes:
        name: ``float`` (not quantized), ``plain-fp8``, ``comfyui-scaled-fp8`` (legacy
            ``scale_weight``), ``comfyui-fp8`` (``_quantization_metadata`` / ``weight_scale``),
            ``hf-block-fp8``, ``compressed-tensors-fp8`` or ``unsupported``.
        fp8_dtype: the weights' safetensors dtype, ``F8_E4M3`` or ``F8_E5M2``.
        granularity: one scale per ``tensor``, per output ``channel``, per ``block``; ``none``.
        block_size: (rows, cols) of a block for ``block``; None otherwise.
        weight_scale_suffix: the scale tensor's name ending after ``<layer>.`` (for
            ``hf-block-fp8`` the base's own spelling: ``weight_scale_inv``, ``scale`` or
            ``qscale_weight``, :data:`HF_FP8_SCALE_SPELLINGS`).
        input_scale_suffix: the activation scale's ending, kept untouched by a merge.
        scale_fmt: ``float``, or ``ue8m0`` (power-of-two scales, DeepSeek-V3.1).
        unsupported: for ``unsupported``, the scheme found ("GPTQ", "bitsandbytes NF4", ...).
        marker: a tensor that only marks the scheme (ComfyUI's ``scaled_fp8``), copied as is.
    """

    name: str
    fp8_dtype: str | None = None
    granularity: str = "none"
    block_size: tuple[int, int] | None = None
    weight_scale_suffix: str | None = None
    input_scale_suffix: str | None = None
    scale_fmt: str = "float"
    unsupported: str | None = None
    marker: str | None = None

    @property
    def supported(self) -> bool:
        return self.name != "unsupported"

    @property
    def quantized(self) -> bool:
        return self.name not in ("float", "unsupported")

    def describe(self) -> str:
        """One phrase for messages: ``hf-block-fp8 (F8_E4M3, 128x128 blocks)``."""
        if not self.supported:
            return f"unsupported: {self.unsupported}"
        if not self.quantized:
            return "float"
        detail = [self.fp8_dtype or "?"]
        if self.granularity == "block" and self.block_size:
            detail.append(f"{self.block_size[0]}x{self.block_size[1]} blocks")
        elif self.granularity in ("tensor", "channel"):
            detail.append(f"per-{self.granularity} scale")
        if self.scale_fmt != "float":
            detail.append(f"{self.scale_fmt} scales")
        if self.name == "hf-block-fp8" and self.weight_scale_suffix != "weight_scale_inv":
            detail.append(f"scales as <layer>.{self.weight_scale_suffix}")
        return f"{self.name} ({', '.join(detail)})"

    def layer_of(self, weight_name: str) -> str:
        return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name

    def weight_scale_name(self, weight_name: str) -> str | None:
        """The name of the tensor that scales ``weight_name``, or None where none does."""
        if self.weight_scale_suffix is None:
            return None
        return f"{self.layer_of(weight_name)}.{self.weight_scale_suffix}"

    def scale_names(self, weight_name: str) -> tuple[str, ...]:
        """Every scale-like tensor a layer of this scheme may carry (weight scale first)."""
        suffixes = (self.weight_scale_suffix, self.input_scale_suffix)
        layer = self.layer_of(weight_name)
        return tuple(f"{layer}.{s}" for s in suffixes if s)

    def scale_mismatch(
        self, weight_shape: tuple[int, ...], scale_shape: tuple[int, ...]
    ) -> str | None:
        """None when a weight scale of ``scale_shape`` fits a weight of ``weight_shape`` in
        this scheme; else the shape expected (for the refusal: a scale that does not fit is
        never broadcast some other way).

        Example:
            >>> Scheme("hf-block-fp8", "F8_E4M3", "block", (128, 128)).scale_mismatch(
            ...     (300, 256), (2, 2))
            '[..., 3, 2] (128x128 blocks, partial edge blocks included)'
        """
        size = math.prod(scale_shape)
        lead = tuple(weight_shape[:-2])
        if self.granularity == "block" and self.block_size and len(weight_shape) >= 2:
            grid = tuple(
                -(-n // b) for n, b in zip(weight_shape[-2:], self.block_size, strict=True)
            )
            if tuple(scale_shape[-2:]) == grid and tuple(scale_shape[:-2]) in (lead, ()):
                return None
            rows, cols = self.block_size
            return (
                f"[..., {grid[0]}, {grid[1]}] ({rows}x{cols} blocks, partial edge blocks included)"
            )
        if self.granularity == "channel" and weight_shape:
            if size == weight_shape[0] and len(scale_shape) <= 2:
                return None
            return f"[{weight_shape[0]}, 1] (one per output channel)"
        if size == 1 or (lead and size == math.prod(lead) and self.name == "hf-block-fp8"):
            return None
        return "[] or [1] (one per tensor)"

    def is_scale(self, name: str) -> bool:
        suffixes = [s for s in (self.weight_scale_suffix, self.input_scale_suffix) if s]
        return any(name.endswith("." + s) for s in suffixes) or name == self.marker


def _dtype_shape(entry: Any) -> tuple[str, tuple[int, ...]]:
    if isinstance(entry, tuple):
        return entry[0], tuple(entry[1])
    return entry.dtype, tuple(entry.shape)


def _refused(what: str) -> Scheme:
    return Scheme(name="unsupported", unsupported=what)


def _fp8_weights(tensors: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, str]:
    return {n: d for n, (d, _) in tensors.items() if d.startswith("F8_") and n.endswith(".weight")}


def _one_fp8_dtype(dtypes: set[str]) -> Scheme | str:
    odd = sorted(d for d in dtypes if d not in FP8_MAX)
    if odd:
        return _refused(f"{odd[0]} weights")
    if len(dtypes) > 1:
        return _refused("mixed F8_E4M3 and F8_E5M2 weights")
    return next(iter(dtypes), "F8_E4M3")


def _only_e4m3(dtype: Scheme | str, scheme: str) -> Scheme | str:
    """transformers' FP8 and compressed-tensors quantize to F8_E4M3 only (their max is 448)."""
    if dtype == "F8_E5M2":
        return _refused(f"{scheme} with F8_E5M2 weights (its quantizer writes F8_E4M3 only)")
    return dtype


def _quant_config(config: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    if not config:
        return None
    inner = config.get("quantization_config")
    if isinstance(inner, Mapping):
        return inner
    # diffusers / text-encoder configs nest it one level down in some exports
    return config if "quant_method" in config else None


def _from_hf_fp8(
    qc: Mapping[str, Any],
    fp8: dict[str, str],
    tensors: Mapping[str, tuple[str, tuple[int, ...]]],
    config: Mapping[str, Any] | None = None,
) -> Scheme:
    if str(qc.get("fmt", "e4m3")).lower() not in ("e4m3", "float8_e4m3fn"):
        return _refused(f"fp8 fmt {qc.get('fmt')!r}")
    # transformers' FineGrainedFP8Config: 128x128 when the key is absent, per tensor when null
    block = qc.get("weight_block_size", [128, 128])
    scale_fmt = str(qc.get("scale_fmt") or "float")
    if scale_fmt not in ("float", "ue8m0"):
        return _refused(f"fp8 scale_fmt {scale_fmt!r}")
    dtype = _only_e4m3(_one_fp8_dtype(set(fp8.values())), "Hugging Face fp8")
    if isinstance(dtype, Scheme):
        return dtype
    suffix = _hf_scale_spelling(fp8, tensors, config)
    if isinstance(suffix, Scheme):
        return suffix
    odd = _odd_hf_scale(fp8, tensors, suffix, scale_fmt)
    if odd is not None:
        return odd
    return Scheme(
        name="hf-block-fp8",
        fp8_dtype=dtype,
        granularity="block" if block else "tensor",
        block_size=(int(block[0]), int(block[1])) if block else None,
        weight_scale_suffix=suffix,
        input_scale_suffix=HF_FP8_SCALE_SPELLINGS[suffix],
        scale_fmt=scale_fmt,
    )


def _hf_scale_spelling(
    fp8: dict[str, str],
    tensors: Mapping[str, tuple[str, tuple[int, ...]]],
    config: Mapping[str, Any] | None,
) -> str | Scheme:
    """The one spelling the fp8 weights' scales use (``weight_scale_inv`` where none is found:
    the merge then names the scale missing), or a refusal naming two scales spelled differently
    (of two weights, or both of one: transformers would load either into its place)."""
    spellings = list(HF_FP8_SCALE_SPELLINGS)
    if str((config or {}).get("model_type") or "").startswith("inkling2"):
        # transformers leaves Inkling2's `.scale` tensors (norms) alone
        spellings.remove("scale")
    found: dict[str, str] = {}
    for weight in sorted(fp8):
        layer = weight[: -len(".weight")]
        for suffix in spellings:
            if f"{layer}.{suffix}" in tensors:
                found.setdefault(suffix, f"{layer}.{suffix}")
    if len(found) > 1:
        names = " and ".join(repr(n) for n in found.values())
        return _refused(f"Hugging Face fp8 with its scales spelled two ways ({names})")
    return next(iter(found), "weight_scale_inv")


def _odd_hf_scale(
    fp8: dict[str, str],
    tensors: Mapping[str, tuple[str, tuple[int, ...]]],
    suffix: str,
    scale_fmt: str,
) -> Scheme | None:
    """A refusal naming the first weight scale whose dtype loratool would misread or could not
    write back: MXFP8 exponent bytes (U8, ``2^(byte - 127)``), an F8_E8M0 scale outside
    ``scale_fmt: ue8m0`` (a recomputed float scale does not fit it), anything else."""
    for weight in sorted(fp8):
        name = f"{weight[: -len('.weight')]}.{suffix}"
        scale_dtype = tensors[name][0] if name in tensors else None
        if scale_dtype is None or scale_dtype in ("F32", "BF16", "F16"):
            continue
        if scale_dtype == "F8_E8M0" and scale_fmt == "ue8m0":
            continue
        if scale_dtype == "F8_E8M0":
            what = "without scale_fmt 'ue8m0' in its quantization_config"
        elif scale_dtype == "U8":
            what = "(MXFP8 exponent bytes)"
        else:
            what = f"(loratool reads {', '.join(_HF_SCALE_DTYPES)})"
        return _refused(f"Hugging Face fp8 with {scale_dtype} scale {name!r} {what}")
    return None


def _from_compressed_tensors(qc: Mapping[str, Any], fp8: dict[str, str]) -> Scheme:
    fmt = str(qc.get("format") or "")
    groups = qc.get("config_groups") or {}
    weights = [g.get("weights") or {} for g in groups.values() if isinstance(g, Mapping)]
    if not weights:
        return _refused(f"compressed-tensors without weight quantization (format {fmt!r})")
    kinds = {(w.get("type"), w.get("num_bits"), w.get("strategy")) for w in weights}
    if len(kinds) > 1:
        return _refused(f"compressed-tensors with mixed weight schemes {sorted(map(str, kinds))}")
    wtype, bits, strategy = kinds.pop()
    if wtype != "float" or bits != 8:
        return _refused(f"compressed-tensors {wtype} {bits}-bit (format {fmt!r})")
    if not weights[0].get("symmetric", True) or weights[0].get("dynamic") is True:
        return _refused("compressed-tensors fp8 with asymmetric or dynamic weights")
    if strategy not in ("tensor", "channel"):
        return _refused(f"compressed-tensors fp8 strategy {strategy!r}")
    dtype = _only_e4m3(_one_fp8_dtype(set(fp8.values())), "compressed-tensors fp8")
    if isinstance(dtype, Scheme):
        return dtype
    return Scheme(
        name="compressed-tensors-fp8",
        fp8_dtype=dtype,
        granularity=strategy,
        weight_scale_suffix="weight_scale",
        input_scale_suffix="input_scale",
    )


def _comfy_layer_formats(metadata: Mapping[str, str] | None) -> set[str] | None:
    raw = (metadata or {}).get("_quantization_metadata")
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return {"unreadable _quantization_metadata"}
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, dict):
        return {"_quantization_metadata without layers"}
    return {str(v.get("format") if isinstance(v, dict) else v) for v in layers.values()}


def detect_scheme(
    headers: Mapping[str, HeaderEntry],
    *,
    metadata: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Scheme:
    """The quantization scheme of a checkpoint, from its tensor headers, metadata and config.

    Args:
        headers: every tensor of the checkpoint (all shards together: a scale may sit in a
            shard other than its weight's), name -> TensorInfo or (dtype, shape).
        metadata: the safetensors ``__metadata__`` of the file(s) (ComfyUI writes
            ``_quantization_metadata`` there).
        config: the model's config.json (``quantization_config``), if it has one.

    Returns:
        A :class:`Scheme`; ``name == "unsupported"`` with ``unsupported`` naming what was found
        for int4 / NF4 / GPTQ / AWQ / bitsandbytes / GGUF and other schemes loratool refuses.

    Example:
        >>> detect_scheme({"a.weight": ("F8_E5M2", (2, 2))}).name
        'plain-fp8'
    """
    tensors = {n: _dtype_shape(e) for n, e in headers.items()}
    fp8 = _fp8_weights(tensors)
    qc = _quant_config(config)
    if qc is not None:
        method = str(qc.get("quant_method") or "").lower().replace("_", "-")
        if method == "fp8":
            return _from_hf_fp8(qc, fp8, tensors, config)
        if method == "compressed-tensors":
            return _from_compressed_tensors(qc, fp8)
        refused = _REFUSED_METHODS.get(method.replace("-", "_"))
        if method == "bitsandbytes":
            if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
                refused = f"bitsandbytes {str(qc.get('bnb_4bit_quant_type', 'fp4')).upper()}"
            else:
                refused = "bitsandbytes int8"
        if refused is not None:
            return _refused(refused)
        if method:
            return _refused(f"quant_method {method!r}")
    for name in tensors:
        for suffix, what in _REFUSED_SUFFIXES:
            if name.endswith(suffix):
                return _refused(what)
    comfy_formats = _comfy_layer_formats(metadata)
    has_comfy_quant = any(n.endswith(".comfy_quant") for n in tensors)
    if comfy_formats is not None or has_comfy_quant:
        odd = sorted(f for f in comfy_formats or () if f not in ("float8_e4m3fn", "float8_e5m2"))
        if odd:
            return _refused(f"ComfyUI {odd[0]}")
        dtype = _one_fp8_dtype(set(fp8.values()))
        if isinstance(dtype, Scheme):
            return dtype
        return Scheme(
            name="comfyui-fp8",
            fp8_dtype=dtype,
            granularity="tensor",
            weight_scale_suffix="weight_scale",
            input_scale_suffix="input_scale",
        )
    marker = next((n for n in tensors if n == "scaled_fp8" or n.endswith(".scaled_fp8")), None)
    if marker is not None:
        marker_dtype = tensors[marker][0]
        dtype = marker_dtype if marker_dtype in FP8_MAX else "F8_E4M3"
        found = _one_fp8_dtype(set(fp8.values()) | {dtype})
        if isinstance(found, Scheme):
            return found
        return Scheme(
            name="comfyui-scaled-fp8",
            fp8_dtype=found,
            granularity="tensor",
            weight_scale_suffix="scale_weight",
            input_scale_suffix="scale_input",
            marker=marker,
        )
    if any(n.endswith(".weight_scale_inv") for n in tensors):
        # block FP8 without its config.json: transformers' default block is 128x128
        return _from_hf_fp8({"weight_block_size": [128, 128]}, fp8, tensors)
    if not fp8:
        return Scheme(name="float")
    if any(
        n.endswith((".weight_scale", ".scale_weight", ".qscale_weight")) for n in tensors
    ) or any(w[: -len("weight")] + "scale" in tensors for w in fp8):
        return _refused("fp8 weights with scales but no config naming their scheme")
    dtype = _one_fp8_dtype(set(fp8.values()))
    if isinstance(dtype, Scheme):
        return dtype
    return Scheme(name="plain-fp8", fp8_dtype=dtype)


def component_scheme(component: Any) -> Scheme:
    """The scheme of one component of a checkpoint (:class:`~lora_tools.io.checkpoint.Component`):
    :func:`detect_scheme` on every shard's headers and metadata together and its config.json.

    Header-only: it reads the shards' headers, never their tensors. ``merge`` (its plan) and
    ``validate --base`` (rules LT401-LT405) both ask it.
    """
    headers: dict[str, Any] = {}
    metadata: dict[str, str] = {}
    for path in component.files:
        header = component.open(path).header
        headers.update(header.tensors)
        metadata.update(header.metadata or {})
    return detect_scheme(headers, metadata=metadata, config=component.config)


def is_gguf(head: bytes) -> bool:
    """Whether a file's first bytes are GGUF's magic (loratool refuses GGUF bases)."""
    return head[:4] == b"GGUF"


GGUF = _refused("GGUF")
