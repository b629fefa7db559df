"""Quantized base checkpoints: which fp8 scheme a base uses, and its dequantize / requantize.

``schemes`` is header-only (no torch, no ml_dtypes); ``numeric`` holds the math and imports
ml_dtypes. Facts: shared FORMATS.md section 6.
"""

from lora_tools.quant.schemes import FP8_MAX, Scheme, detect_scheme, is_gguf

__all__ = ["FP8_MAX", "Scheme", "detect_scheme", "is_gguf"]
