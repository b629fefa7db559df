"""The base weights an adapter carries a copy of, against the base it is checked or served on.

PEFT saves an embedding LoRA's embedding layer itself beside the factors
(``save_embedding_layers``, on whenever ``target_modules`` names an embedding layer):
``<module>.base_layer.weight``, e.g.
``base_model.model.model.embed_tokens.base_layer.weight`` or ``...lm_head.base_layer.weight``.
``PeftModel.from_pretrained`` loads that tensor over the base model's own (measured, PEFT
0.21.2); the serving engines skip it (vLLM ``is_base_embedding_weights``, SGLang, TGI,
llama.cpp's ``convert_lora_to_gguf.py``) and serve the base's. On the base the adapter was
saved with the two are the same tensor; on any other base PEFT and the servers compute
different models, without a word.

:func:`differing_copies` finds the copies whose base tensor (resolved as ``merge`` resolves
pass-through tensors: :func:`lora_tools.resolve.resolve_passthrough`, same key and shape) holds
other values. It reads both tensors block by block of rows, never both whole.

Example:
    >>> from lora_tools.formats import load_adapter                          # doctest: +SKIP
    >>> from lora_tools.io.checkpoint import open_checkpoint                 # doctest: +SKIP
    >>> with open_checkpoint("other-base/") as ckpt:                         # doctest: +SKIP
    ...     [d.describe() for d in differing_copies(load_adapter("adapter/"), ckpt)]
    ['3 of 128 rows differ, max |diff| 0.25, first at row 3']
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lora_tools.adapter import Adapter
from lora_tools.errors import UnsupportedAdapterError
from lora_tools.io.safetensors import FileTensor, Tensor, numpy_dtype

if TYPE_CHECKING:  # the checkpoint module (and the layouts it loads) only when a base is read
    from lora_tools.io.checkpoint import Checkpoint

#: The suffix of PEFT's saved base layers (``save_embedding_layers``).
BASE_LAYER_SUFFIX = ".base_layer.weight"
#: The saved embeddings vLLM skips (``is_base_embedding_weights``); SGLang and TGI drop them
#: too, and every other tensor that is no LoRA factor is another rule's finding there.
EMBEDDING_BASE_SUFFIXES = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")
#: The dtypes compared (floating-point weights; a copy in another one is not compared), by
#: precision: two tensors are compared at the narrower one's.
_PRECISION = {"F16": 1, "BF16": 1, "F32": 2, "F64": 3}
#: Bytes of each of the two row blocks held at a time.
CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class CopyDifference:
    """A saved base layer whose base tensor has the same shape and other values.

    Attributes:
        key: the adapter's tensor (``...embed_tokens.base_layer.weight``).
        base_key: the base tensor it stands for (``model.embed_tokens.weight``).
        base_file: the base file holding that tensor.
        rows: rows that differ.
        total_rows: rows of the tensor.
        max_abs_diff: the largest ``|copy - base|``, both at the narrower dtype's precision.
        first_row: the first row that differs.
    """

    key: str
    base_key: str
    base_file: Path
    rows: int
    total_rows: int
    max_abs_diff: float
    first_row: int

    def describe(self) -> str:
        """``3 of 128 rows differ, max |diff| 0.25, first at row 3``."""
        return (
            f"{self.rows} of {self.total_rows} rows differ, max |diff| {self.max_abs_diff:.3g}, "
            f"first at row {self.first_row}"
        )


def saved_base_layers(adapter: Adapter) -> list[str]:
    """The adapter's pass-through tensors that are PEFT's saved base layers."""
    return [key for key in adapter.passthrough if key.endswith(BASE_LAYER_SUFFIX)]


def differing_copies(
    adapter: Adapter, ckpt: Checkpoint, *, chunk_bytes: int = CHUNK_BYTES
) -> list[CopyDifference]:
    """The saved base layers (:func:`saved_base_layers`) whose base tensor differs.

    A copy is compared with the base tensor it resolves to (same key, same shape); one that
    resolves to none (another shape: a resized vocabulary, or a base without that layer) is
    left out, as are copies or base tensors that are not float16 / bfloat16 / float32 /
    float64. Two dtypes are compared at the narrower one's precision: the wider tensor is
    rounded to it (a float32 copy of a bf16 base, or a bf16 copy of a float32 base, that equals
    the base in bf16 is the same weight: loaded into a bf16 model it is the base's; only a
    model run in float32 would see the rounding); float16 against bfloat16 compares the values
    as float32. Same values: no difference.

    Args:
        adapter: the adapter (not modified).
        ckpt: the opened base checkpoint.
        chunk_bytes: the size of each row block read (one of the copy, one of the base).
    """
    from lora_tools.resolve import resolve_passthrough

    keys = saved_base_layers(adapter)
    if not keys:
        return []
    targets = resolve_passthrough(adapter, ckpt)
    out = []
    for key in keys:
        target = targets.get(key)
        copy = adapter.passthrough[key]
        if target is None or not copy.shape:
            continue
        dtype = _common_dtype(copy.dtype, target.info.dtype)
        if dtype is None:
            continue
        reader = ckpt.components[target.component].open(target.file)
        found = _compare(copy, partial(reader.read, target.key), dtype, chunk_bytes)
        if found is not None:
            rows, max_abs, first = found
            out.append(
                CopyDifference(key, target.key, target.file, rows, copy.shape[0], max_abs, first)
            )
    return out


def refuse_differing_copies(
    adapter: Adapter, base: str | os.PathLike[str], keys: list[str], who: str, operation: str
) -> None:
    """Raise for the first of ``keys`` (saved base layers ``who`` skips) whose tensor in the
    checkpoint ``base`` differs from the saved copy; a base without safetensors weights is not
    compared (nothing is raised).

    Raises:
        UnsupportedAdapterError: kind ``saved-layer-differs``, naming the adapter's tensor, the
            base tensor and file, and how they differ.
    """
    if not keys:
        return
    from lora_tools.io.checkpoint import open_checkpoint

    with open_checkpoint(base) as ckpt:
        found = [d for d in differing_copies(adapter, ckpt) if d.key in keys]
    if not found:
        return
    d = found[0]
    more = f" ({len(found)} such tensors)" if len(found) > 1 else ""
    raise UnsupportedAdapterError(
        f"{operation}: tensor {d.key!r} is the adapter's saved copy of the base's "
        f"{d.base_key!r} and differs from {d.base_file} ({d.describe()}){more}; {who} skips it "
        "and serves the base's, PEFT loads the copy over it: they compute different models",
        path=adapter.source,
        hint="merge the adapter into this base (`loratool merge BASE ADAPTER -o OUT`) and serve "
        "the merged model, or serve the adapter on the base it was saved with",
        kind="saved-layer-differs",
    )


def _common_dtype(ours: str, theirs: str) -> str | None:
    """The dtype two tensors are compared in: the narrower one's (float32 for float16 against
    bfloat16), or None when one is no float type compared here."""
    if ours not in _PRECISION or theirs not in _PRECISION:
        return None
    if ours == theirs:
        return ours
    if _PRECISION[ours] == _PRECISION[theirs]:
        return "F32"
    return ours if _PRECISION[ours] < _PRECISION[theirs] else theirs


def _compare(
    copy: Tensor, base_rows: Callable[[slice], np.ndarray], dtype: str, chunk_bytes: int
) -> tuple[int, float, int] | None:
    """``(rows that differ, max |diff|, first such row)``, or None when every row is equal.

    Values are compared once both blocks are in ``dtype``: NaNs in the same places are equal,
    and so are 0 and -0; a NaN against a number counts as an infinite difference."""
    as_dtype = numpy_dtype(dtype)
    differ, max_abs, first = 0, 0.0, -1
    for start, ours, theirs in _blocks(copy, base_rows, chunk_bytes):
        ours = ours.astype(as_dtype, copy=False).reshape(ours.shape[0], -1)
        theirs = theirs.astype(as_dtype, copy=False).reshape(ours.shape)
        same = (ours == theirs) | (np.isnan(ours) & np.isnan(theirs))
        rows = np.flatnonzero(~same.all(axis=1))
        if not rows.size:
            continue
        if first < 0:
            first = start + int(rows[0])
        differ += rows.size
        delta = np.abs(ours[rows].astype(np.float64) - theirs[rows].astype(np.float64))
        max_abs = max(max_abs, float(np.nan_to_num(delta, nan=np.inf).max()))
    return None if differ == 0 else (differ, max_abs, first)


def _blocks(
    copy: Tensor, base_rows: Callable[[slice], np.ndarray], chunk_bytes: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(first row, copy rows, base rows)``, blocks of at most ``chunk_bytes`` each (one row
    at least)."""
    total = copy.shape[0]
    step = max(1, chunk_bytes // max(1, copy.nbytes // max(total, 1)))
    for start in range(0, total, step):
        rows = slice(start, min(total, start + step))
        if isinstance(copy, FileTensor):
            ours = copy.file.read(copy.info.name, rows=rows)
        else:
            ours = copy.numpy()[rows]
        yield start, ours, base_rows(rows)
