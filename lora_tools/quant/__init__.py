"""Quantized base checkpoints: which fp8 scheme a base uses, and its dequantize / requantize.

``schemes`` is header-only (no torch, no ml_dtypes); ``numeric`` holds the math and imports
ml_dtypes. Facts: shared FORMATS.md section 6.

What a merge does per merged weight ``name`` of a base whose ``scheme.quantized``:

1. ``scale = scheme.weight_scale_name(name)`` (None for plain fp8); it may sit in another shard.
2. ``w = numeric.dequantize(scheme, fp8_array, scale_array)`` (exact, float64), plus the delta.
3. ``q, s = numeric.quantize(scheme, w, compute_dtype=...)``: compressed-tensors passes the stored
   scale's dtype (the original weight's), ComfyUI the dtype its weights came from (F32 if unknown).
4. ``q`` replaces the weight (same name, dtype, shape); ``s`` replaces the scale, cast to the stored
   scale's dtype and shape. Every other tensor, ``scheme.input_scale_suffix`` tensors and the
   ``scheme.marker`` included, is copied byte for byte.
"""

from lora_tools.quant.schemes import FP8_MAX, Scheme, component_scheme, detect_scheme, is_gguf

__all__ = ["FP8_MAX", "Scheme", "component_scheme", "detect_scheme", "is_gguf"]
