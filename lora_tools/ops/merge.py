"""Fold LoRA adapters into a base checkpoint, streaming tensor by tensor.

Two phases:

1. :func:`plan_merge` opens the base (headers and indexes only) and every adapter, resolves each
   adapter module to the base weight it updates (:mod:`lora_tools.resolve`), and records, per
   output file, every tensor in the base file's order with what happens to it: copied as raw
   bytes, merged with a list of updates, or replaced by an adapter tensor (PEFT
   modules_to_save).
2. :func:`execute` writes the output: the base folder's layout mirrored under a temporary
   name beside OUT, each weight file written header first by the streaming writer, untouched
   tensors copied without decoding, targeted tensors merged in row blocks by an engine (numpy
   here, torch on CPU or CUDA in :mod:`lora_tools.ops.merge_torch`), the index rewritten
   (``total_size`` recomputed), every other file copied, a provenance record and a model card
   added. The folder is renamed to OUT only when complete.

Example:
    >>> from lora_tools.ops.merge import merge
    >>> summary = merge("fixtures/bases/tiny-llama", ["fixtures/peft/llama-lora"],
    ...                 "/tmp/merged-llama", force=True)                  # doctest: +SKIP
    >>> summary["adapters"][0]["merged"]                                  # doctest: +SKIP
    8
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lora_tools import __version__
from lora_tools.adapter import EMBEDDING, Adapter
from lora_tools.errors import DeviceError, OutputError, UnsupportedAdapterError, UsageError
from lora_tools.io.atomic import atomic_dir, check_output
from lora_tools.io.checkpoint import INDEX_NAMES, Checkpoint, open_checkpoint
from lora_tools.io.safetensors import (
    PICKLE_SUFFIXES,
    SafetensorsFile,
    SafetensorsWriter,
    Tensor,
    TensorInfo,
    TensorSpec,
    tensor_nbytes,
)
from lora_tools.ops.merge_math import (
    FLOAT_DTYPES,
    DenseTerm,
    LowRankTerm,
    Term,
    apply_terms,
    compute_dtype_for,
    dims_2d,
    round_to,
    row_block,
)
from lora_tools.resolve import ModuleMatch, Resolution, resolve

#: --dtype spellings -> safetensors dtype names (``keep`` keeps each tensor's own).
DTYPE_NAMES = {"keep": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32"}
#: Provenance record written into every merged folder.
PROVENANCE_NAME = "loratool_merge.json"
#: Bytes of one row block of a merged tensor (in float32).
DEFAULT_BLOCK_BYTES = 32 << 20
#: PEFT variants whose adapters only make sense on a base they also changed, or that cannot be
#: folded into weights at all.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "eva")

ProgressFn = Callable[[int, int], None]


@dataclass
class AdapterSpec:
    """One adapter to merge and its weight (negative weights subtract)."""

    path: str
    weight: float = 1.0


@dataclass
class TensorJob:
    """What happens to one base tensor.

    Attributes:
        info: the tensor in the base file.
        out_dtype: dtype written.
        terms: updates (built lazily from ``sources`` when the tensor is reached).
        replacement: an adapter tensor that replaces the base values before the updates.
    """

    info: TensorInfo
    out_dtype: str
    sources: list[tuple[ModuleMatch, float, str]] = field(default_factory=list)
    replacement: Tensor | None = None

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def copy_raw(self) -> bool:
        return not self.sources and self.replacement is None and self.out_dtype == self.info.dtype

    @property
    def out_nbytes(self) -> int:
        return tensor_nbytes(self.out_dtype, self.info.shape)

    def terms(self) -> list[Term]:
        """The updates, with factors read from the adapter files now."""
        return [build_term(match, weight, role) for match, weight, role in self.sources]


@dataclass
class FilePlan:
    """One output weight file: where it comes from and every tensor in the base's order."""

    source: Path
    relative: Path
    jobs: list[TensorJob]
    metadata: dict[str, str] | None


@dataclass
class AdapterReport:
    spec: AdapterSpec
    adapter: Adapter
    resolution: Resolution

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.spec.path,
            "weights_file": str(self.adapter.source),
            "format": self.adapter.format,
            "weight": self.spec.weight,
            "modules": self.resolution.total,
            "merged": len(self.resolution.matches),
            "replaced_tensors": len(self.resolution.replacements),
            "unmatched": list(self.resolution.unmatched),
        }


@dataclass
class MergePlan:
    """Everything :func:`execute` needs; built by :func:`plan_merge` without reading tensor data."""

    base: Checkpoint
    base_spec: str
    files: list[FilePlan]
    adapters: list[AdapterReport]
    dtype: str | None

    @property
    def output_is_file(self) -> bool:
        return self.base.kind == "file"

    @property
    def total_bytes(self) -> int:
        return sum(job.out_nbytes for f in self.files for job in f.jobs)

    @property
    def total_tensors(self) -> int:
        return sum(len(f.jobs) for f in self.files)


# -- terms --------------------------------------------------------------------------------


def build_term(match: ModuleMatch, weight: float, role: str) -> Term:
    """The float32 update one resolved module makes to its weight (``role="weight"``) or to
    its bias (``role="bias"``, PEFT lora_bias)."""
    module = match.module
    scale = module.scale * weight
    if role == "bias":
        assert module.bias is not None
        return DenseTerm(module.bias.numpy().astype(np.float32), scale, module.key)
    up, down = module.factors(np.float32)
    magnitude = None
    if module.magnitude is not None:
        magnitude = module.magnitude.numpy().astype(np.float32).reshape(-1)
    transposed = module.kind == EMBEDDING or match.transpose
    return LowRankTerm(up, down, scale, transposed, magnitude, module.key)


def _check_mergeable(adapter: Adapter, weight: float) -> None:
    adapter.require_plain_lora("merge")
    config = adapter.config or {}
    init = str(config.get("init_lora_weights", "")).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        raise UnsupportedAdapterError(
            f"adapter was initialised with {config['init_lora_weights']!r}, which also changes "
            "the base weights; merging it into the original base gives a wrong model",
            path=adapter.config_source or adapter.source,
            hint="convert it to a plain LoRA with PEFT first (save_pretrained with "
            "path_initial_model_for_weight_conversion)",
            kind="unsupported-type",
        )
    for key in ("layer_replication", "alora_invocation_tokens"):
        if config.get(key):
            raise UnsupportedAdapterError(
                f"adapter uses {key}, which cannot be folded into the base weights",
                path=adapter.config_source or adapter.source,
                kind="unsupported-type",
            )
    for m in adapter.modules.values():
        if m.dora and m.kind == EMBEDDING:
            raise UnsupportedAdapterError(
                f"module {m.key!r} is a DoRA embedding; its norm runs over whole columns of the "
                "table, which loratool does not merge",
                path=adapter.source,
                hint="merge this adapter with PEFT's merge_and_unload",
                kind="unsupported-type",
            )
    if weight != 1.0 and adapter.modules and any(m.dora for m in adapter.modules.values()):
        raise UsageError(
            f"DoRA adapter with --weight {weight}: DoRA rescales whole rows, so a weighted "
            "DoRA merge is not defined",
            path=adapter.source,
        )


# -- planning -----------------------------------------------------------------------------


def _out_dtype(dtype: str, target: str | None) -> str:
    return target if target is not None and dtype in FLOAT_DTYPES else dtype


def plan_merge(
    base: str | os.PathLike[str],
    adapters: list[AdapterSpec],
    *,
    dtype: str | None = None,
    allow_unmatched: bool = False,
    base_spec: str | None = None,
) -> MergePlan:
    """Resolve every adapter against the base and decide what happens to each base tensor.

    Args:
        base: a local base checkpoint (file, HF folder, diffusers folder).
        adapters: adapters in merge order with their weights.
        dtype: output dtype for float tensors (safetensors name) or None to keep.
        allow_unmatched: modules that match no base weight are skipped (and counted).
        base_spec: how the user named the base (a Hub id), for the provenance record.

    Raises:
        ResolveError / ShapeError: a module matches nothing, several weights, or does not fit.
        UnsupportedAdapterError: LyCORIS types, base-changing PEFT variants, DoRA embeddings.
    """
    from lora_tools.formats import load_adapter

    if not adapters:
        raise UsageError("no adapter to merge", hint="name at least one adapter")
    ckpt = open_checkpoint(base)
    reports: list[AdapterReport] = []
    per_tensor: dict[tuple[str, str], list[tuple[ModuleMatch, float, str]]] = {}
    replacements: dict[tuple[str, str], Tensor] = {}
    for spec in adapters:
        adapter = load_adapter(spec.path)
        _check_mergeable(adapter, spec.weight)
        res = resolve(adapter, ckpt)
        res.raise_for_problems(adapter, allow_unmatched=allow_unmatched)
        reports.append(AdapterReport(spec, adapter, res))
        for match in res.matches.values():
            t = match.target
            per_tensor.setdefault((t.component, t.key), []).append((match, spec.weight, "weight"))
            if match.bias is not None:
                b = match.bias
                per_tensor.setdefault((b.component, b.key), []).append((match, spec.weight, "bias"))
        for key, target in res.replacements.items():
            if spec.weight != 1.0:
                raise UsageError(
                    f"{key!r} is a full tensor that replaces the base's {target.key!r} "
                    f"(modules_to_save); a merge weight of {spec.weight} is not defined for it",
                    path=adapter.source,
                    hint="merge this adapter with weight 1",
                )
            replacements[(target.component, target.key)] = adapter.passthrough[key]

    files: list[FilePlan] = []
    root = ckpt.path.parent if ckpt.kind == "file" else ckpt.path
    for comp in ckpt.components.values():
        for path in comp.files:
            reader = comp.open(path)
            infos = sorted(reader.header.tensors.values(), key=lambda i: (i.begin, i.end))
            jobs = []
            for info in infos:
                key = (comp.name, info.name)
                sources = per_tensor.get(key, [])
                replacement = replacements.get(key)
                if (sources or replacement is not None) and info.dtype not in FLOAT_DTYPES:
                    raise UsageError(
                        f"base tensor {info.name!r} is {info.dtype}; merging needs a float "
                        "weight (F16, BF16, F32, F64)",
                        path=path,
                        hint="quantized bases cannot be merged into; use the unquantized base",
                    )
                jobs.append(TensorJob(info, _out_dtype(info.dtype, dtype), sources, replacement))
            files.append(FilePlan(path, path.relative_to(root), jobs, reader.header.metadata))
    return MergePlan(ckpt, base_spec or str(base), files, reports, dtype)


# -- engines ------------------------------------------------------------------------------


class Engine(Protocol):
    """Writes the tensors of one file: raw copies and merges (numpy or torch)."""

    name: str

    def write_file(
        self,
        reader: SafetensorsFile,
        plan: FilePlan,
        writer: SafetensorsWriter,
        progress: ProgressFn,
    ) -> None: ...


def copy_raw(
    reader: SafetensorsFile, job: TensorJob, writer: SafetensorsWriter, progress: ProgressFn
) -> None:
    """Copy a tensor's bytes without decoding them."""
    for chunk in reader.iter_raw(job.name):
        writer.write(job.name, chunk)
        progress(len(chunk), 0)
    progress(0, 1)


def job_rows(job: TensorJob, terms: list[Term], block_bytes: int) -> tuple[int, int, int]:
    """``(rows, cols, rows per block)`` for merging a tensor in row blocks."""
    rows, cols = dims_2d(job.info.shape)
    if any(getattr(t, "needs_whole_tensor", False) for t in terms):
        return rows, cols, rows
    return rows, cols, row_block(rows, cols * 4, block_bytes)


class NumpyEngine:
    """The torch-free engine: exact (see :mod:`lora_tools.ops.merge_math`), single-threaded."""

    name = "numpy"

    def __init__(self, block_bytes: int = DEFAULT_BLOCK_BYTES) -> None:
        self.block_bytes = block_bytes

    def write_file(
        self,
        reader: SafetensorsFile,
        plan: FilePlan,
        writer: SafetensorsWriter,
        progress: ProgressFn,
    ) -> None:
        for job in plan.jobs:
            if job.copy_raw:
                copy_raw(reader, job, writer, progress)
                continue
            terms = job.terms()
            compute = compute_dtype_for(job.info.dtype)
            rows, cols, step = job_rows(job, terms, self.block_bytes)
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                if job.replacement is not None:
                    src = job.replacement.numpy().reshape(rows, cols)[start:stop]
                else:
                    src = reader.read(job.name, rows=slice(start, stop)).reshape(-1, cols)
                merged = apply_terms(src.astype(compute), terms, start, compute)
                out = round_to(merged, job.out_dtype).reshape(
                    (stop - start, *job.info.shape[1:]) if job.info.shape else ()
                )
                writer.write(job.name, out)
                progress(out.nbytes, 0)
            progress(0, 1)


def select_engine(device: str = "auto", *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> Engine:
    """The engine for ``--device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``numpy``.

    ``auto`` uses CUDA when torch is installed and sees a GPU, else the CPU; ``cpu`` uses torch's
    CPU kernels when torch is installed (same bytes as numpy, faster) and numpy otherwise;
    ``numpy`` never imports torch.

    Raises:
        DeviceError: CUDA asked for but torch or a GPU is missing.
        UsageError: an unknown device name.
    """
    if device == "numpy":
        return NumpyEngine(block_bytes)
    if device not in ("auto", "cpu") and not (device == "cuda" or device.startswith("cuda:")):
        raise UsageError(f"unknown device {device!r}", hint="use auto, cpu, cuda, cuda:N or numpy")
    try:
        import torch  # noqa: F401
    except ImportError:
        if device.startswith("cuda"):
            raise DeviceError(
                f"--device {device} needs torch, which is not installed",
                hint="pip install 'loratool[torch]' (a CUDA build of torch), or use --device cpu",
            ) from None
        return NumpyEngine(block_bytes)
    from lora_tools.ops.merge_torch import TorchEngine, cuda_device

    if device == "auto":
        return TorchEngine(cuda_device("cuda", required=False) or "cpu", block_bytes=block_bytes)
    if device == "cpu":
        return TorchEngine("cpu", block_bytes=block_bytes)
    return TorchEngine(cuda_device(device, required=True), block_bytes=block_bytes)


# -- execution ----------------------------------------------------------------------------


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _provenance(plan: MergePlan, engine: Engine) -> dict[str, Any]:
    return {
        "tool": "loratool",
        "loratool_version": __version__,
        "operation": "merge",
        "base": {"spec": plan.base_spec, "path": str(plan.base.path), "kind": plan.base.kind},
        "adapters": [
            {
                "spec": r.spec.path,
                "weights_file": str(r.adapter.source),
                "sha256": sha256_file(Path(r.adapter.source)) if r.adapter.source else None,
                "format": r.adapter.format,
                "weight": r.spec.weight,
                "modules_merged": len(r.resolution.matches),
                "modules_unmatched": len(r.resolution.unmatched),
            }
            for r in plan.adapters
        ],
        "dtype": plan.dtype or "keep",
        "engine": engine.name,
    }


def _base_name(plan: MergePlan) -> str:
    for comp in plan.base.components.values():
        name = (comp.config or {}).get("_name_or_path")
        if isinstance(name, str) and name and not os.path.isabs(name):
            return name
    return plan.base_spec


def _model_card(plan: MergePlan) -> str:
    base = _base_name(plan)
    lines = [
        "---",
        f"base_model: {json.dumps(base)}",
        "tags:",
        "  - lora",
        "  - merge",
        "  - loratool",
        "---",
        "",
        f"# {base} with merged LoRA adapters",
        "",
        f"This model is `{base}` with these LoRA adapters folded into its weights by "
        f"loratool {__version__} (`loratool merge`):",
        "",
    ]
    for r in plan.adapters:
        lines.append(
            f"- `{r.spec.path}` (weight {r.spec.weight:g}, {len(r.resolution.matches)} modules)"
        )
    lines += ["", f"The exact inputs and their sha256 are in `{PROVENANCE_NAME}`.", ""]
    return "\n".join(lines)


def _is_weight_artifact(path: Path, written: set[Path]) -> bool:
    """Files the output must not carry over: the weights rewritten, their indexes, and pickled
    weights that a loader could pick up instead of the merged safetensors."""
    if path in written:
        return True
    name = path.name
    if name in INDEX_NAMES or name.endswith(".safetensors.index.json"):
        return True
    if path.suffix.lower() in PICKLE_SUFFIXES or name.endswith(".bin.index.json"):
        return True
    return name.startswith(".")


def _copy_other_files(plan: MergePlan, dest: Path) -> list[str]:
    """Copy every non-weight file of the base folder; return the relative paths copied."""
    root = plan.base.path
    written = {root / f.relative for f in plan.files}
    copied = []
    for src in sorted(root.rglob("*")):
        rel = src.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or src.is_dir():
            continue
        if _is_weight_artifact(src, written):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        copied.append(str(rel))
    return copied


def _write_indexes(plan: MergePlan, dest: Path) -> None:
    root = plan.base.path
    sizes: dict[Path, int] = {}
    for f in plan.files:
        sizes[f.source] = sum(job.out_nbytes for job in f.jobs)
    for comp in plan.base.components.values():
        if comp.index_path is None:
            continue
        doc = json.loads(comp.index_path.read_text(encoding="utf-8"))
        meta = dict(doc.get("metadata") or {})
        meta["total_size"] = sum(sizes[p] for p in comp.files)
        doc["metadata"] = meta
        target = dest / comp.index_path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def _write_weights(
    plan: MergePlan,
    engine: Engine,
    dest_for: Callable[[FilePlan], Path],
    progress: ProgressFn,
    extra_metadata: dict[str, str] | None = None,
) -> None:
    for fplan in plan.files:
        specs = [TensorSpec(j.name, j.out_dtype, j.info.shape) for j in fplan.jobs]
        metadata = dict(fplan.metadata or {})
        if extra_metadata:
            metadata.update(extra_metadata)
        reader = SafetensorsFile(fplan.source)
        try:
            with SafetensorsWriter(
                dest_for(fplan), specs, metadata or None, keep_order=True
            ) as writer:
                engine.write_file(reader, fplan, writer, progress)
        finally:
            reader.close()


def execute(
    plan: MergePlan,
    out: str | os.PathLike[str],
    *,
    engine: Engine | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Write the merged model at ``out`` and return the summary ``--json`` prints.

    A single-file base gives a single file (provenance in its ``__metadata__`` under
    ``loratool_merge``); a folder base gives a folder mirroring it. Nothing appears at ``out``
    unless every byte was written.
    """
    engine = engine or select_engine("auto")
    out = Path(out)
    done = {"bytes": 0, "tensors": 0}

    def tick(nbytes: int, tensors: int) -> None:
        done["bytes"] += nbytes
        done["tensors"] += tensors
        if progress is not None:
            progress(nbytes, tensors)

    started = time.perf_counter()
    provenance = _provenance(plan, engine)
    if plan.output_is_file:
        if out.is_dir():
            raise OutputError(
                "the base is a single file, so the output is a file, but this is a folder",
                path=out,
                hint="give a .safetensors path",
            )
        _write_weights(
            plan,
            engine,
            lambda f: out,
            tick,
            extra_metadata={"loratool_merge": json.dumps(provenance, sort_keys=True)},
        )
        copied: list[str] = []
    else:
        with atomic_dir(out, force=force) as tmp:
            copied = _copy_other_files(plan, tmp)
            _write_weights(plan, engine, lambda f: tmp / f.relative, tick)
            _write_indexes(plan, tmp)
            (tmp / PROVENANCE_NAME).write_text(
                json.dumps(provenance, indent=2) + "\n", encoding="utf-8"
            )
            if not (tmp / "README.md").exists():
                (tmp / "README.md").write_text(_model_card(plan), encoding="utf-8")
    seconds = time.perf_counter() - started
    read = sum(
        j.info.nbytes if j.replacement is None else j.replacement.nbytes
        for f in plan.files
        for j in f.jobs
    )
    return {
        "base": plan.base_spec,
        "output": str(out),
        "engine": engine.name,
        "dtype": plan.dtype or "keep",
        "adapters": [r.summary() for r in plan.adapters],
        "files": [str(f.relative) for f in plan.files],
        "copied_files": copied,
        "tensors": {
            "total": plan.total_tensors,
            "merged": sum(1 for f in plan.files for j in f.jobs if j.sources),
            "replaced": sum(1 for f in plan.files for j in f.jobs if j.replacement is not None),
            "copied": sum(1 for f in plan.files for j in f.jobs if j.copy_raw),
        },
        "bytes_read": read,
        "bytes_written": done["bytes"],
        "seconds": round(seconds, 3),
    }


@contextlib.contextmanager
def _closing(ckpt: Checkpoint) -> Iterator[Checkpoint]:
    try:
        yield ckpt
    finally:
        ckpt.close()


def merge(
    base: str | os.PathLike[str],
    adapters: list[str | os.PathLike[str] | AdapterSpec],
    out: str | os.PathLike[str],
    *,
    weights: list[float] | None = None,
    device: str = "auto",
    dtype: str = "keep",
    force: bool = False,
    allow_unmatched: bool = False,
    progress: ProgressFn | None = None,
    on_plan: Callable[[int, int], None] | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> dict[str, Any]:
    """Merge adapters into a base checkpoint and write the result at ``out``.

    Args:
        base: a .safetensors file, an HF folder (single or sharded), a diffusers folder, or a
            Hub id ``user/name[@revision]``.
        adapters: adapter files / folders / Hub ids, merged in this order.
        out: the output path (a folder, or a .safetensors file for a single-file base).
        weights: one weight per adapter (default 1.0 each; negative subtracts).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``numpy`` (see :func:`select_engine`).
        dtype: ``keep``, ``bf16``, ``fp16`` or ``fp32`` for the float tensors written.
        force: replace an existing ``out``.
        allow_unmatched: skip modules that match no base weight instead of failing.
        progress: called with ``(bytes written, tensors finished)`` increments.
        on_plan: called once planning is done with ``(bytes to write, tensors to write)``.
        block_bytes: float32 bytes per row block of a merged tensor.

    Returns:
        The summary dict (what ``loratool merge --json`` prints).

    Example:
        >>> merge("fixtures/bases/tiny-llama", ["fixtures/peft/llama-lora"],
        ...       "/tmp/merged", force=True)["tensors"]["merged"]        # doctest: +SKIP
        8
    """
    from lora_tools.io.hub import resolve_input

    if dtype not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype {dtype!r}", hint="use keep, bf16, fp16 or fp32")
    specs: list[AdapterSpec] = []
    weights = list(weights or [])
    if weights and len(weights) not in (1, len(adapters)):
        raise UsageError(
            f"{len(weights)} weights for {len(adapters)} adapters",
            hint="give one --weight per adapter (or one for all)",
        )
    for i, item in enumerate(adapters):
        if isinstance(item, AdapterSpec):
            specs.append(item)
            continue
        w = weights[i] if len(weights) == len(adapters) else (weights[0] if weights else 1.0)
        specs.append(AdapterSpec(os.fspath(item), float(w)))
    base_path = resolve_input(os.fspath(base), role="base")
    local = [AdapterSpec(os.fspath(resolve_input(s.path, role="adapter")), s.weight) for s in specs]
    check_output(out, [base_path, *(Path(s.path) for s in local)], force=force)
    engine = select_engine(device, block_bytes=block_bytes)
    plan = plan_merge(
        base_path,
        local,
        dtype=DTYPE_NAMES[dtype],
        allow_unmatched=allow_unmatched,
        base_spec=os.fspath(base),
    )
    if on_plan is not None:
        on_plan(plan.total_bytes, plan.total_tensors)
    with _closing(plan.base):
        for report, spec in zip(plan.adapters, specs, strict=True):
            report.spec = AdapterSpec(spec.path, report.spec.weight)
        return execute(plan, out, engine=engine, force=force, progress=progress)
