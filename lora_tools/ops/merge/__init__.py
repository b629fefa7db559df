"""Fold adapters into a base checkpoint, streaming tensor by tensor: LoRA, and the other types
loratool computes (:mod:`lora_tools.deltas`: LoHa, LoKr, Tucker LoCon, full diff, kohya DoRA...).

:func:`merge` is the entry point (what ``loratool merge`` calls). The package has a module per
phase, each importing only the ones below it (no module imports this package back):

- :mod:`.plan`: the inputs (:class:`AdapterSpec`, the output path, the dtype), the checks, and
  :func:`plan_merge`, which opens the base (headers and indexes only) and every adapter, resolves
  each adapter module to the base weight it updates and records what happens to every tensor;
- :mod:`.jobs`: the per-tensor jobs (:class:`TensorJob`: copied as raw bytes, merged with a list
  of updates, or replaced by an adapter tensor) and the raw copy both engines use;
- :mod:`.arithmetic`: the arithmetic of a merge, as PEFT computes it (the other types: their
  update's rows, or their merged weight, from :mod:`lora_tools.deltas`);
- :mod:`.quantized`: an fp8 weight of a quantized base (:mod:`lora_tools.quant`), dequantized
  in float64, merged and requantized with a fresh scale (or dequantized for ``--dtype``);
- :mod:`.numpy_engine` (CPU, no torch) and :mod:`.torch_engine` (CUDA, or ``--exact``): write the
  tensors of one output file;
- :mod:`.engine`: which engine, on which device (:func:`select_engine`);
- :mod:`.write`: :func:`execute` writes the output (weights, indexes, side files, provenance
  record, model card) under a temporary name and renames it to OUT only when complete.

Example:
    >>> from lora_tools.ops.merge import merge
    >>> summary = merge("fixtures/bases/tiny-llama", ["fixtures/peft/llama-lora"],
    ...                 "/tmp/merged-llama", force=True)                  # doctest: +SKIP
    >>> summary.adapters[0]["counts"]["modules_merged"]                   # doctest: +SKIP
    8
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from lora_tools.adapter import Adapter
from lora_tools.constants import DTYPE_ALIASES
from lora_tools.errors import UsageError
from lora_tools.io.atomic import check_output
from lora_tools.io.checkpoint import Checkpoint
from lora_tools.ops.merge.engine import Engine, select_engine
from lora_tools.ops.merge.jobs import (
    DEFAULT_BLOCK_BYTES,
    FilePlan,
    ProgressFn,
    TensorJob,
    build_term,
    copy_raw,
    job_rows,
)
from lora_tools.ops.merge.numpy_engine import NumpyEngine, cpu_threads
from lora_tools.ops.merge.plan import (
    DTYPE_NAMES,
    AdapterReport,
    AdapterSpec,
    MergePlan,
    output_path,
    plan_merge,
)
from lora_tools.ops.merge.write import execute, sha256_file, tensors_sha256
from lora_tools.results import MergeResult


@contextlib.contextmanager
def _closing(ckpt: Checkpoint) -> Iterator[Checkpoint]:
    try:
        yield ckpt
    finally:
        ckpt.close()


def merge(
    base: str | os.PathLike[str],
    adapters: list[str | os.PathLike[str] | Adapter | AdapterSpec]
    | str
    | os.PathLike[str]
    | Adapter
    | AdapterSpec,
    out: str | os.PathLike[str],
    *,
    weights: list[float] | None = None,
    device: str = "auto",
    dtype: str = "keep",
    force: bool = False,
    fsync: bool = False,
    allow_unmatched: bool = False,
    progress: ProgressFn | None = None,
    on_plan: Callable[[int, int], None] | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> MergeResult:
    """Merge adapters into a base checkpoint and write the result at ``out``.

    Args:
        base: a .safetensors file, an HF folder (single or sharded), a diffusers folder, or a
            Hub id ``user/name[@revision]``.
        adapters: adapter files / folders / Hub ids, or in-memory
            :class:`~lora_tools.adapter.Adapter` objects (from ``load_adapter``, ``rescale``
            ...), merged in this order; a single one needs no list. Each passes the checks
            the CLI applies to what it reads (at least one LoRA module, usable scales, a known
            alpha, plain LoRA). The
            summary gives an in-memory adapter ``"path": None``; the provenance record
            ``"spec": null``, ``"weights_file"`` its ``source`` (or null), ``"sha256_of":
            "tensors"`` and as ``"sha256"`` the digest of its tensors' bytes
            (:func:`~lora_tools.ops.merge.write.tensors_sha256`), not of a file, which may
            hold other values than the adapter in memory.
        out: the output path: a folder for a folder base; for a single-file base a
            .safetensors file, or a folder (ending in ``/`` or existing) to write it into under
            the base's file name (:func:`output_path`).
        weights: one weight per adapter (default 1.0 each; negative subtracts).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (see :func:`select_engine`).
        dtype: ``keep``, ``bf16``, ``fp16`` or ``fp32`` for the float tensors written, in any
            case, or the CLI's other spellings (``bfloat16``, ``float16``, ``half``...).
        force: replace an existing ``out``.
        fsync: flush every output file to the disk before ``out`` appears, so that it survives
            a power loss or kernel crash too (slower: the call returns only once the disk has
            everything). Without it ``out`` still appears whole or not at all for any failure
            of this process (error, Ctrl-C, kill), and the data reaches the disk later, as
            after ``cp`` or ``save_pretrained``.
        allow_unmatched: skip modules that match no base weight instead of failing.
        progress: called with ``(bytes written, tensors finished)`` increments.
        on_plan: called once planning is done with ``(bytes to write, tensors to write)``.
        block_bytes: float32 bytes per row block of a merged tensor.

    Returns:
        A :class:`~lora_tools.results.MergeResult` (``to_json()``: what ``merge --json`` prints).

    Example:
        >>> merge("fixtures/bases/tiny-llama", ["fixtures/peft/llama-lora"],
        ...       "/tmp/merged", force=True).tensors["merged"]           # doctest: +SKIP
        8
    """
    from lora_tools.formats import adapter_path
    from lora_tools.io.hub import resolve_input

    name = str(dtype).strip().lower()
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype {dtype!r}", hint="use keep, bf16, fp16 or fp32")
    if isinstance(adapters, (str, os.PathLike, Adapter, AdapterSpec)):
        adapters = [adapters]
    specs: list[AdapterSpec] = []
    weights = list(weights or [])
    if weights and len(weights) not in (1, len(adapters)):
        raise UsageError(
            f"{len(weights)} weight{'s' * (len(weights) != 1)} for {len(adapters)} "
            f"adapter{'s' * (len(adapters) != 1)}",
            hint="give one weight per adapter, or one for all",
            kind="weights",
        )
    for i, item in enumerate(adapters):
        if isinstance(item, AdapterSpec):
            specs.append(item)
            continue
        w = weights[i] if len(weights) == len(adapters) else (weights[0] if weights else 1.0)
        if isinstance(item, Adapter):
            specs.append(AdapterSpec(None, float(w), item))
        else:
            specs.append(AdapterSpec(os.fspath(item), float(w)))
    base_path = resolve_input(os.fspath(base), role="base")
    local = [
        s
        if s.adapter is not None or s.path is None
        else AdapterSpec(os.fspath(adapter_path(resolve_input(s.path, role="adapter"))), s.weight)
        for s in specs
    ]
    # an in-memory adapter may still read its tensors from its file: that is an input too
    inputs = [s.adapter.source if s.adapter else s.path and Path(s.path) for s in local]
    out = output_path(out, Path(base_path))
    check_output(out, [base_path, *(p for p in inputs if p)], force=force)
    engine = select_engine(device, block_bytes=block_bytes)
    plan = plan_merge(
        base_path,
        local,
        dtype=DTYPE_NAMES[name],
        allow_unmatched=allow_unmatched,
        base_spec=os.fspath(base),
    )
    if on_plan is not None:
        on_plan(plan.total_bytes, plan.total_tensors)
    with _closing(plan.base):
        for report, spec in zip(plan.adapters, specs, strict=True):
            report.spec = AdapterSpec(spec.path, report.spec.weight, spec.adapter)
        summary = execute(plan, out, engine=engine, force=force, fsync=fsync, progress=progress)
        return MergeResult.from_summary(summary, base_path=base_path)


__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "DTYPE_NAMES",
    "AdapterReport",
    "AdapterSpec",
    "Engine",
    "FilePlan",
    "MergePlan",
    "NumpyEngine",
    "ProgressFn",
    "TensorJob",
    "build_term",
    "copy_raw",
    "cpu_threads",
    "execute",
    "job_rows",
    "merge",
    "output_path",
    "plan_merge",
    "select_engine",
    "sha256_file",
    "tensors_sha256",
]
