"""Fold LoRA adapters into a base checkpoint, streaming tensor by tensor.

Two phases:

1. :func:`plan_merge` opens the base (headers and indexes only) and every adapter, resolves each
   adapter module to the base weight it updates (:mod:`lora_tools.resolve`), and records, per
   output file, every tensor in the base file's order with what happens to it: copied as raw
   bytes, merged with a list of updates, or replaced by an adapter tensor (PEFT
   modules_to_save).
2. :func:`execute` writes the output: the base folder's layout mirrored under a temporary
   name beside OUT, each weight file written header first by the streaming writer, untouched
   tensors copied in the kernel without decoding, targeted tensors merged in row blocks by an
   engine (numpy on the CPU here, torch on CUDA in :mod:`lora_tools.ops.merge_torch`), the
   index rewritten
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

import collections
import contextlib
import functools
import glob
import hashlib
import importlib.util
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lora_tools import __version__
from lora_tools.adapter import EMBEDDING, LARGEST, LARGEST_F32, Adapter, require_finite
from lora_tools.constants import CARD_NAME, INDEX_NAMES, MERGE_RECORD_KEY, MERGE_RECORD_NAME
from lora_tools.errors import (
    AdapterError,
    DeviceError,
    OutputError,
    UnsupportedAdapterError,
    UsageError,
)
from lora_tools.io.atomic import atomic_dir, check_output, require_space
from lora_tools.io.checkpoint import Checkpoint, open_checkpoint
from lora_tools.io.folder import skip_reason
from lora_tools.io.jsonfile import read_json_object
from lora_tools.io.safetensors import (
    PICKLE_SUFFIXES,
    SafetensorsFile,
    SafetensorsWriter,
    Tensor,
    TensorInfo,
    TensorSpec,
    numpy_dtype,
    tensor_nbytes,
)
from lora_tools.lowrank import max_abs_update
from lora_tools.ops.merge_math import (
    FLOAT_DTYPES,
    NARROW_DTYPES,
    PRODUCT_ROWS,
    DenseTerm,
    LowRankTerm,
    Term,
    apply_terms,
    compute_dtype_for,
    dims_2d,
    row_block,
)
from lora_tools.resolve import ModuleMatch, Resolution, resolve

#: --dtype spellings -> safetensors dtype names (``keep`` keeps each tensor's own).
DTYPE_NAMES = {"keep": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32"}
#: Bytes of one row block of a merged tensor (in float32): a few MB keeps a block's passes
#: (product, scale, add, round) in the CPU caches (measured fastest between 1 and 8 MB).
DEFAULT_BLOCK_BYTES = 4 << 20
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
        return [
            build_term(match, weight, role, self.info.dtype) for match, weight, role in self.sources
        ]

    @property
    def needs_whole_tensor(self) -> bool:
        """DoRA on a transposed layout (GPT-2 Conv1D) normalises columns of the base, so the
        tensor is merged in one block; known from the plan, without reading the factors."""
        return any(
            role == "weight"
            and match.module.dora
            and (match.module.kind == EMBEDDING or match.transpose)
            for match, _, role in self.sources
        )


@dataclass
class FilePlan:
    """One output weight file: where it comes from and every tensor in the base's order."""

    source: Path
    relative: Path
    jobs: list[TensorJob]
    metadata: dict[str, str] | None

    @property
    def untouched(self) -> bool:
        """No adapter changes any tensor of this file: it is a copy."""
        return all(job.copy_raw for job in self.jobs)


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


def build_term(match: ModuleMatch, weight: float, role: str, base_dtype: str = "F32") -> Term:
    """The float32 update one resolved module makes to its weight (``role="weight"``) or to
    its bias (``role="bias"``, PEFT lora_bias); ``base_dtype`` is the base tensor's dtype.

    Each layer kind rounds as PEFT's ``merge`` does (docs/math.md): Linear, Conv1D and conv
    layers add the float32 update to the weight (one rounding), embeddings add the update
    rounded to the weight's dtype first (two roundings for float16 / bfloat16 weights).

    Raises:
        AdapterError: a factor holds NaN or Inf, which would make the merged weight non-finite.
    """
    module = match.module
    scale = module.scale * weight
    harm = f"merging it would make {match.target.key!r} non-finite"
    if role == "bias":
        assert module.bias is not None
        bias = module.bias.numpy().astype(np.float32)
        return DenseTerm(require_finite(bias, "lora_B.bias", module, harm), scale, module.key)
    up, down = module.finite_factors(np.float32, consequence=harm)
    magnitude = None
    if module.magnitude is not None:
        magnitude = module.magnitude.numpy().astype(np.float32).reshape(-1)
        require_finite(magnitude, "DoRA magnitude", module, harm)
    transposed = module.kind == EMBEDDING or match.transpose
    # PEFT's Embedding.merge: weight += delta.to(weight.dtype); its DoRA path adds unrounded
    delta_dtype = None
    if module.kind == EMBEDDING and magnitude is None and base_dtype in NARROW_DTYPES:
        delta_dtype = base_dtype
    return LowRankTerm(up, down, scale, transposed, magnitude, module.key, delta_dtype)


def _check_update_fits(match: ModuleMatch, weight: float, role: str, out_dtype: str) -> None:
    """AdapterError when ``weight`` times a module's update cannot be held by ``out_dtype``.

    Checked while planning, so nothing is written. Half the dtype's range is left for the
    base weight the update is added to.
    """
    module = match.module
    scale = module.scale * weight
    limit = LARGEST.get(out_dtype, LARGEST_F32) / 2
    if role == "bias":
        assert module.bias is not None
        with np.errstate(over="ignore", invalid="ignore"):
            peak = float(np.abs(module.bias.numpy().astype(np.float64)).max(initial=0.0))
            peak *= abs(scale)
    else:
        harm = f"merging it would make {match.target.key!r} non-finite"
        up, down = module.finite_factors(consequence=harm)
        peak = max_abs_update(up, down, scale, limit)
    if not peak < limit:
        raise AdapterError(
            f"module {module.key!r}: its update times weight {weight:g} reaches {peak:.3g} "
            f"(scale {scale:.3g}), beyond what {out_dtype} can hold next to the base weight "
            f"({limit:.3g}); merging would write inf into {match.target.key!r}",
            path=getattr(getattr(module.down, "file", None), "path", None),
            hint="use a smaller --weight, or fix the adapter's alpha",
            kind="non-finite",
        )


def _check_mergeable(adapter: Adapter, weight: float) -> None:
    adapter.require_plain_lora("merge")
    adapter.require_known_scale("merge")
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
        if not math.isfinite(spec.weight):
            raise UsageError(
                f"--weight {spec.weight!r} for {spec.path} is not a finite number",
                hint="give each --weight as a finite number such as 0.8 or -0.5",
            )
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
                out_dtype = _out_dtype(info.dtype, dtype)
                for match, weight, role in sources:
                    _check_update_fits(match, weight, role, out_dtype)
                jobs.append(TensorJob(info, out_dtype, sources, replacement))
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
    """Copy a tensor's bytes without decoding them (kernel-side, see ``copy_range``)."""
    info = job.info
    writer.copy_range(
        job.name,
        reader.fileno(),
        reader.header.data_start + info.begin,
        info.nbytes,
        on_chunk=lambda n: progress(n, 0),
    )
    progress(0, 1)


def job_rows(job: TensorJob, block_bytes: int) -> tuple[int, int, int]:
    """``(rows, cols, rows per block)`` for merging a tensor in row blocks.

    Blocks hold a multiple of PRODUCT_ROWS rows, so that the products (and so the bytes written)
    do not depend on ``block_bytes``.
    """
    rows, cols = dims_2d(job.info.shape)
    if job.needs_whole_tensor:
        return rows, cols, rows
    step = row_block(rows, cols * 4, block_bytes)
    return rows, cols, min(rows, max(PRODUCT_ROWS, step - step % PRODUCT_ROWS))


def cpu_threads() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class _Buffers:
    """Reused scratch memory for one row block: fresh arrays would page-fault on every block."""

    def __init__(self) -> None:
        self._raw: dict[str, np.ndarray] = {}

    def get(self, role: str, dtype: np.dtype, shape: tuple[int, int]) -> np.ndarray:
        nbytes = shape[0] * shape[1] * np.dtype(dtype).itemsize
        raw = self._raw.get(role)
        if raw is None or raw.nbytes < nbytes:
            raw = self._raw[role] = np.empty(max(nbytes, 1), np.uint8)
        return _view(raw, dtype, shape)


def _view(raw: np.ndarray, dtype: np.dtype, shape: tuple[int, int]) -> np.ndarray:
    nbytes = shape[0] * shape[1] * np.dtype(dtype).itemsize
    return raw[:nbytes].view(dtype).reshape(shape)


class _OutputBuffers:
    """Merged blocks waiting for the writer: taken by a worker, given back once written.

    At most one buffer per block in flight, so the pool stays as small as the queue.
    """

    def __init__(self) -> None:
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            raw = self._free.pop() if self._free else None
        if raw is None or raw.nbytes < nbytes:
            raw = np.empty(max(nbytes, 1), np.uint8)
        return raw

    def give_back(self, raw: np.ndarray) -> None:
        with self._lock:
            self._free.append(raw)


@dataclass
class _Prepared:
    """A targeted tensor with its updates read, ready to be merged block by block."""

    job: TensorJob
    terms: list[Term]
    rows: int
    cols: int
    step: int
    replacement: np.ndarray | None


@dataclass
class _Block:
    """A merged row block: ``data`` goes to byte ``at`` of the tensor; ``raw`` is its buffer."""

    job: TensorJob
    at: int
    data: np.ndarray
    raw: np.ndarray


@dataclass
class _Copy:
    """Bytes of an untouched tensor to copy from the base file (``offset``) to byte ``at``."""

    job: TensorJob
    offset: int
    nbytes: int
    at: int


class NumpyEngine:
    """The CPU engine: numpy and BLAS, no torch.

    Worker threads read, merge and round the row blocks of targeted tensors (numpy releases the
    GIL in BLAS, large ufuncs and ml_dtypes' casts); the calling thread is the only one that
    writes: each merged block at its own offset (``pwrite``) once it is ready, and, while the
    next one is not, 8 MB pieces of the untouched tensors copied in the kernel without decoding
    (``copy_file_range``). One writer, because a file system serialises writes to one file
    (ext4 takes the inode's lock for each), and threads waiting for that lock spin on it
    instead of computing. At most ``lookahead * threads`` blocks are in flight and every
    buffer is reused, so memory stays at a few blocks per thread whatever the model size.

    Args:
        block_bytes: float32 bytes per row block.
        threads: worker threads (default: the CPUs this process may use).
    """

    name = "numpy"
    #: Bytes of one kernel copy (untouched tensors): small enough that the writer comes back
    #: to the merged blocks soon.
    copy_bytes = 8 << 20
    #: Blocks queued per worker ahead of the writer.
    lookahead = 2

    def __init__(self, block_bytes: int = DEFAULT_BLOCK_BYTES, threads: int | None = None) -> None:
        self.block_bytes = block_bytes
        self.threads = threads or cpu_threads()
        self._local = threading.local()
        self._outputs = _OutputBuffers()

    def _buffers(self) -> _Buffers:
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = _Buffers()
        return buffers

    def _prepare(self, job: TensorJob) -> _Prepared:
        """Read a targeted tensor's updates (a worker's task, queued before its blocks)."""
        terms = job.terms()
        rows, cols, step = job_rows(job, self.block_bytes)
        replacement = None
        if job.replacement is not None:
            replacement = job.replacement.numpy().reshape(rows, cols)
        return _Prepared(job, terms, rows, cols, step, replacement)

    def _merge_block(
        self, reader: SafetensorsFile, prepared: Future[_Prepared], start: int
    ) -> _Block:
        """Read, merge and round rows ``start:start+step`` of one tensor (a worker's task).

        ``prepared`` was queued before this task, so it is done or running in another worker.
        """
        item = prepared.result()
        job = item.job
        buffers = self._buffers()
        count = min(item.rows, start + item.step) - start
        shape = (count, item.cols)
        compute = compute_dtype_for(job.info.dtype)
        out_dtype = numpy_dtype(job.out_dtype)
        raw_out = self._outputs.take(count * item.cols * out_dtype.itemsize)
        out = _view(raw_out, out_dtype, shape)
        # merge straight into the output buffer when no rounding step is needed
        acc = out if out_dtype == compute else buffers.get("acc", compute, shape)
        if item.replacement is not None:
            np.copyto(acc, item.replacement[start : start + count], casting="unsafe")
        elif numpy_dtype(job.info.dtype) == compute:
            reader.read_into(job.name, acc, row_start=start)
        else:
            raw = buffers.get("in", numpy_dtype(job.info.dtype), shape)
            np.copyto(acc, reader.read_into(job.name, raw, row_start=start), casting="unsafe")
        merged = apply_terms(
            acc, item.terms, start, compute, buffers.get("delta", np.float32, shape)
        )
        if merged is not out:
            np.copyto(out, merged, casting="unsafe")  # the one rounding to the output dtype
        return _Block(job, start * item.cols * out_dtype.itemsize, out, raw_out)

    def _copies(self, reader: SafetensorsFile, plan: FilePlan) -> list[tuple[_Copy, bool]]:
        """The untouched tensors as kernel copies of at most ``copy_bytes``, in file order,
        each with whether it is the last piece of its tensor."""
        out = []
        for job in plan.jobs:
            if job.copy_raw:
                base = reader.header.data_start + job.info.begin
                size = job.info.nbytes
                starts = range(0, size, self.copy_bytes) if size else range(1)
                for at in starts:
                    n = min(self.copy_bytes, size - at)
                    out.append((_Copy(job, base + at, n, at), at == starts[-1]))
        return out

    def _block_tasks(
        self, reader: SafetensorsFile, plan: FilePlan, pool: ThreadPoolExecutor
    ) -> Iterator[tuple[Callable[[], _Block], bool]]:
        """``(block task, last block of its tensor)`` for the targeted tensors, in file order;
        each tensor's factors are queued for reading just before its first block."""
        for job in plan.jobs:
            if job.copy_raw:
                continue
            prepared = pool.submit(self._prepare, job)
            rows, _, step = job_rows(job, self.block_bytes)
            starts = range(0, rows, step) if rows else range(1)
            for start in starts:
                task = functools.partial(self._merge_block, reader, prepared, start)
                yield task, start == starts[-1]

    def write_file(
        self,
        reader: SafetensorsFile,
        plan: FilePlan,
        writer: SafetensorsWriter,
        progress: ProgressFn,
    ) -> None:
        """Write every tensor of one output file (see the class docstring).

        The writer takes the oldest block when it is ready, and otherwise copies a piece of an
        untouched tensor while it waits, so the copies fill the time the workers need.
        """
        fd = reader.fileno()  # opened here, not raced by the workers
        copies = collections.deque(self._copies(reader, plan))
        blocks: collections.deque[tuple[Future[_Block], bool]] = collections.deque()
        with (
            _one_blas_thread(self.threads),
            ThreadPoolExecutor(self.threads, thread_name_prefix="merge") as pool,
        ):
            tasks = self._block_tasks(reader, plan, pool)
            try:
                while True:
                    while len(blocks) < self.lookahead * self.threads:
                        task = next(tasks, None)
                        if task is None:
                            break
                        blocks.append((pool.submit(task[0]), task[1]))
                    if blocks and (blocks[0][0].done() or not copies):
                        future, last = blocks.popleft()
                        block = future.result()
                        writer.write_at(block.job.name, block.at, block.data)
                        self._outputs.give_back(block.raw)
                        progress(block.data.nbytes, 1 if last else 0)
                    elif copies:
                        item, last = copies.popleft()
                        writer.copy_range(item.job.name, fd, item.offset, item.nbytes, at=item.at)
                        progress(item.nbytes, 1 if last else 0)
                    else:
                        return
            except BaseException:
                for future, _ in blocks:
                    future.cancel()
                raise


def _one_blas_thread(workers: int) -> contextlib.AbstractContextManager[object]:
    """One BLAS thread per worker: the workers already use every CPU, and BLAS threads of
    their own would oversubscribe them (measured: 2.4-2.7 s of user time instead of 1.2 s on the
    1.67 GB benchmark, the extra threads spinning)."""
    if workers <= 1:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _cuda_possible() -> bool:
    """Whether a GPU could be usable, judged without importing torch (2 s and 220 MB)."""
    if importlib.util.find_spec("torch") is None:
        return False
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    # NVIDIA's device nodes, or AMD's (ROCm builds of torch also answer torch.cuda)
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd")


def select_engine(device: str = "auto", *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> Engine:
    """The engine for ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    ``cpu`` is the numpy engine and never imports torch. ``auto`` uses CUDA when torch is
    installed and sees a GPU, else the numpy engine; torch is imported only when a GPU device
    node exists, so a machine without one pays nothing for the check. ``torch-cpu`` (the CLI's
    ``--exact``) runs the torch engine on the CPU: its products are torch's own float32 matmul,
    so the result is bit-identical to PEFT's ``merge_and_unload`` on CPU for every rank, at the
    cost of importing torch (about 2 s and 220 MB). The numpy engine's BLAS sums the rank in the
    same order only for small ranks; otherwise it differs in the last bit of a few elements.

    Raises:
        DeviceError: CUDA asked for but torch or a GPU is missing.
        UsageError: an unknown device name.

    Example:
        >>> select_engine("cpu").name
        'numpy'
    """
    cuda = device == "cuda" or device.startswith("cuda:")
    if device not in ("auto", "cpu", "torch-cpu") and not cuda:
        raise UsageError(f"unknown device {device!r}", hint="use auto, cpu, cuda or cuda:N")
    if device == "cpu" or (device == "auto" and not _cuda_possible()):
        return NumpyEngine(block_bytes)
    try:
        import torch  # noqa: F401
    except ImportError:
        if device == "auto":
            return NumpyEngine(block_bytes)
        if device == "torch-cpu":
            raise DeviceError(
                "--exact needs torch (it merges with torch's own matmul, as PEFT does), "
                "which is not installed",
                hint="pip install 'loratool[torch]', or drop --exact",
            ) from None
        raise DeviceError(
            f"--device {device} needs torch, which is not installed",
            hint="pip install 'loratool[torch]' (a CUDA build of torch), or use --device cpu",
        ) from None
    from lora_tools.ops.merge_torch import TorchEngine, cuda_device

    if device == "torch-cpu":
        return TorchEngine("cpu", block_bytes=block_bytes)
    if device == "auto":
        found = cuda_device("cuda", required=False)
        return TorchEngine(found, block_bytes=block_bytes) if found else NumpyEngine(block_bytes)
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
    lines += ["", f"The exact inputs and their sha256 are in `{MERGE_RECORD_NAME}`.", ""]
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


def _copy_other_files(plan: MergePlan, dest: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Copy every non-weight file of the base folder.

    Only plain files are copied (:func:`lora_tools.io.folder.skip_reason`): a link leaving the
    base folder, a FIFO or a device is skipped, so that a merge never copies (and push never
    publishes) what merely a link in the base pointed at.

    Returns:
        The relative paths copied, and ``{"path", "reason"}`` for each entry skipped.
    """
    root = plan.base.path
    written = {root / f.relative for f in plan.files}
    copied: list[str] = []
    skipped: list[dict[str, str]] = []
    for current, dirs, files in os.walk(root):
        here = Path(current)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in [d for d in dirs if (here / d).is_symlink()]:
            dirs.remove(name)  # os.walk would not enter it: say so instead of dropping it
            rel = (here / name).relative_to(root).as_posix()
            skipped.append({"path": rel, "reason": "a symbolic link to a folder (not followed)"})
        for name in sorted(files):
            src = here / name
            rel = src.relative_to(root)
            if name.startswith(".") or _is_weight_artifact(src, written):
                continue
            reason = skip_reason(root, src)
            if reason is not None:
                skipped.append({"path": rel.as_posix(), "reason": reason})
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
            copied.append(str(rel))
    return sorted(copied), sorted(skipped, key=lambda item: item["path"])


def _files_written(folder: Path) -> list[str]:
    """Every file under ``folder``, relative and ``/``-separated, for the provenance record."""
    return sorted(
        (Path(current) / name).relative_to(folder).as_posix()
        for current, _dirs, files in os.walk(folder)
        for name in files
    )


def _write_indexes(plan: MergePlan, dest: Path) -> None:
    root = plan.base.path
    sizes: dict[Path, int] = {}
    for f in plan.files:
        sizes[f.source] = sum(job.out_nbytes for job in f.jobs)
    for comp in plan.base.components.values():
        if comp.index_path is None:
            continue
        doc = read_json_object(comp.index_path, kind="checkpoint-json")
        meta = dict(doc.get("metadata") or {})
        meta["total_size"] = sum(sizes[p] for p in comp.files)
        doc["metadata"] = meta
        target = dest / comp.index_path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


class _Cancelled(Exception):
    """Raised in the copying thread when the merge failed elsewhere."""


def _copy_file(
    reader: SafetensorsFile,
    plan: FilePlan,
    writer: SafetensorsWriter,
    progress: ProgressFn,
    stop: threading.Event,
) -> None:
    """Write a file that no adapter touches: every tensor copied in the kernel, in order."""
    for job in plan.jobs:
        if stop.is_set():
            raise _Cancelled
        copy_raw(reader, job, writer, progress)


def _write_weights(
    plan: MergePlan,
    engine: Engine,
    dest_for: Callable[[FilePlan], Path],
    progress: ProgressFn,
    extra_metadata: dict[str, str] | None = None,
    *,
    durable: bool = False,
) -> None:
    """Write every weight file of the output.

    Files that no adapter touches (the last shard holding only ``lm_head``, a diffusers VAE or
    text encoder the adapter does not target) are copied by a second thread while the engine
    merges the others: they are different files, so their writes do not wait for each other.
    """

    def write(fplan: FilePlan, body: Callable[..., None], *extra: object) -> None:
        specs = [TensorSpec(j.name, j.out_dtype, j.info.shape) for j in fplan.jobs]
        metadata = dict(fplan.metadata or {})
        if extra_metadata:
            metadata.update(extra_metadata)
        reader = SafetensorsFile(fplan.source)
        try:
            with SafetensorsWriter(
                dest_for(fplan),
                specs,
                metadata or None,
                keep_order=True,
                # hand each range to the disk as it is written, so the closing fsync is short
                stream_to_disk=durable,
                durable=durable,
            ) as writer:
                body(reader, fplan, writer, progress, *extra)
        finally:
            reader.close()

    stop = threading.Event()
    untouched = [f for f in plan.files if f.untouched]
    merged = [f for f in plan.files if not f.untouched]
    if not untouched or not merged:
        for fplan in plan.files:
            if fplan.untouched:
                write(fplan, _copy_file, stop)
            else:
                write(fplan, engine.write_file)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="copy") as background:
        copying = background.submit(lambda: [write(f, _copy_file, stop) for f in untouched])
        try:
            for fplan in merged:
                if copying.done():
                    copying.result()  # the copies failed (a corrupt shard): stop here
                write(fplan, engine.write_file)
        except BaseException:
            stop.set()  # the copying thread stops at its next tensor and removes its file
            raise
        copying.result()


def execute(
    plan: MergePlan,
    out: str | os.PathLike[str],
    *,
    engine: Engine | None = None,
    force: bool = False,
    fsync: bool = False,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Write the merged model at ``out`` and return the summary ``--json`` prints.

    A single-file base gives a single file (provenance in its ``__metadata__`` under
    ``loratool_merge``); a folder base gives a folder mirroring it. Nothing appears at ``out``
    unless every byte was written; with ``fsync`` every byte is also on the disk before it
    appears (see :mod:`lora_tools.io.atomic`).
    """
    engine = engine or select_engine("auto")
    out = Path(out)
    done = {"bytes": 0, "tensors": 0}
    lock = threading.Lock()

    def tick(nbytes: int, tensors: int) -> None:  # called from two threads
        with lock:
            done["bytes"] += nbytes
            done["tensors"] += tensors
            if progress is not None:
                progress(nbytes, tensors)

    started = time.perf_counter()
    require_space(
        out.parent,
        plan.total_bytes,
        what=f"the merged model ({len(plan.files)} weight files)",
        output=out,
    )
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
            extra_metadata={MERGE_RECORD_KEY: json.dumps(provenance, sort_keys=True)},
            durable=fsync,
        )
        copied: list[str] = []
        skipped: list[dict[str, str]] = []
    else:
        with atomic_dir(out, force=force, durable=fsync) as tmp:
            copied, skipped = _copy_other_files(plan, tmp)
            _write_weights(plan, engine, lambda f: tmp / f.relative, tick, durable=fsync)
            _write_indexes(plan, tmp)
            if not (tmp / CARD_NAME).exists():
                (tmp / CARD_NAME).write_text(_model_card(plan), encoding="utf-8")
            # the record names every file written, so that --force can tell this folder from
            # one holding anything else (lora_tools.io.atomic.check_replaceable)
            provenance["files"] = _files_written(tmp)
            provenance["skipped_files"] = skipped
            (tmp / MERGE_RECORD_NAME).write_text(
                json.dumps(provenance, indent=2) + "\n", encoding="utf-8"
            )
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
        "skipped_files": skipped,
        "tensors": {
            "total": plan.total_tensors,
            "merged": sum(1 for f in plan.files for j in f.jobs if j.sources),
            "replaced": sum(1 for f in plan.files for j in f.jobs if j.replacement is not None),
            "copied": sum(1 for f in plan.files for j in f.jobs if j.copy_raw),
        },
        "bytes_read": read,
        "bytes_written": done["bytes"],
        "fsync": fsync,
        "seconds": round(seconds, 3),
    }


def output_path(out: str | os.PathLike[str], base: Path) -> Path:
    """Where ``-o OUT`` puts the merged model of ``base`` (a local path).

    The output has the base's shape. A single-file base gives one file: OUT itself when it
    ends in ``.safetensors``; inside OUT, under the base's file name, when OUT ends in ``/`` or
    names an existing folder. A folder base gives a folder: OUT, which must not end in
    ``.safetensors``.

    Example:
        >>> output_path("merged/", Path("fixtures/bases/tiny-flux.safetensors"))  # doctest: +SKIP
        PosixPath('merged/tiny-flux.safetensors')
    """
    text = os.fspath(out)
    given = Path(text)
    if base.is_file():
        if text.endswith(("/", os.sep)) or given.is_dir():
            if not given.is_dir():
                raise OutputError(
                    "the folder the output goes in does not exist",
                    path=text,
                    hint="create it first, or give -o NAME.safetensors",
                )
            return given / base.name
        if given.suffix != ".safetensors":
            raise UsageError(
                "the base is a single file, so the merged model is one .safetensors file, but "
                "OUT does not end in .safetensors",
                path=text,
                hint="give -o NAME.safetensors, or -o FOLDER/ to write it there under the "
                f"base's name ({base.name})",
            )
        return given
    if given.suffix == ".safetensors":
        raise UsageError(
            "the base is a folder, so the merged model is a folder, but OUT ends in .safetensors",
            path=text,
            hint="give a folder path for -o (the weight files keep the base's names)",
        )
    return given


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
    fsync: bool = False,
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
        out: the output path: a folder for a folder base; for a single-file base a
            .safetensors file, or a folder (ending in ``/`` or existing) to write it into under
            the base's file name (:func:`output_path`).
        weights: one weight per adapter (default 1.0 each; negative subtracts).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (see :func:`select_engine`).
        dtype: ``keep``, ``bf16``, ``fp16`` or ``fp32`` for the float tensors written.
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
        The summary dict (what ``loratool merge --json`` prints).

    Example:
        >>> merge("fixtures/bases/tiny-llama", ["fixtures/peft/llama-lora"],
        ...       "/tmp/merged", force=True)["tensors"]["merged"]        # doctest: +SKIP
        8
    """
    from lora_tools.formats import adapter_path
    from lora_tools.io.hub import resolve_input

    if dtype not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype {dtype!r}", hint="use keep, bf16, fp16 or fp32")
    specs: list[AdapterSpec] = []
    weights = list(weights or [])
    if weights and len(weights) not in (1, len(adapters)):
        raise UsageError(
            f"{len(weights)} weights for {len(adapters)} adapters",
            hint="give one weight per adapter, or one for all",
            kind="weights",
        )
    for i, item in enumerate(adapters):
        if isinstance(item, AdapterSpec):
            specs.append(item)
            continue
        w = weights[i] if len(weights) == len(adapters) else (weights[0] if weights else 1.0)
        specs.append(AdapterSpec(os.fspath(item), float(w)))
    base_path = resolve_input(os.fspath(base), role="base")
    local = [
        AdapterSpec(os.fspath(adapter_path(resolve_input(s.path, role="adapter"))), s.weight)
        for s in specs
    ]
    out = output_path(out, Path(base_path))
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
        return execute(plan, out, engine=engine, force=force, fsync=fsync, progress=progress)
