"""The numpy engine of a merge: numpy and BLAS on the CPU, no torch.

It writes the tensors of one output file (:class:`~lora_tools.ops.merge.jobs.FilePlan`):
merged row blocks computed by worker threads with :mod:`lora_tools.ops.merge.arithmetic`, untouched
tensors copied in the kernel. It holds BLAS to one thread per worker (:func:`_one_blas_thread`).

Example:
    >>> NumpyEngine(threads=1).name
    'numpy'
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from lora_tools.io.safetensors import SafetensorsFile, SafetensorsWriter, numpy_dtype
from lora_tools.ops.merge.arithmetic import Term, apply_terms, compute_dtype_for
from lora_tools.ops.merge.jobs import DEFAULT_BLOCK_BYTES, FilePlan, ProgressFn, TensorJob, job_rows
from lora_tools.ops.merge.quantized import merge_rows, quant_rows


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
    scale: np.ndarray | None = None


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

    def _prepare(self, reader: SafetensorsFile, job: TensorJob) -> _Prepared:
        """Read a targeted tensor's updates (a worker's task, queued before its blocks)."""
        terms = job.terms()
        rows, cols, step = self._rows(job)
        if job.quant is not None:
            job.quant.old_scale()  # read once, before the blocks
            job.quant.measure(reader, terms, self.block_bytes, job.needs_whole_tensor)
        replacement = None
        if job.replacement is not None:
            replacement = job.replacement.numpy().reshape(rows, cols)
        return _Prepared(job, terms, rows, cols, step, replacement)

    def _rows(self, job: TensorJob) -> tuple[int, int, int]:
        if job.quant is not None:
            return quant_rows(job, self.block_bytes)
        return job_rows(job, self.block_bytes)

    def _quant_block(
        self, reader: SafetensorsFile, prepared: Future[_Prepared], start: int
    ) -> _Block:
        """Rows of an fp8 weight of a quantized base: dequantized, merged, requantized (or
        rounded to the --dtype) by :func:`~lora_tools.ops.merge.quantized.merge_rows`."""
        item = prepared.result()
        job = item.job
        assert job.quant is not None
        buffers = self._buffers()
        count = min(item.rows, start + item.step) - start
        shape = (count, item.cols)
        raw = buffers.get("in", numpy_dtype(job.info.dtype), shape)
        out_dtype = numpy_dtype(job.out_dtype)
        raw_out = self._outputs.take(count * item.cols * out_dtype.itemsize)
        out = _view(raw_out, out_dtype, shape)
        values, scale = merge_rows(
            job.quant,
            reader,
            item.terms,
            start,
            count,
            buffers.get("delta", np.float32, shape),
            raw,
            buffers.get("acc64", np.float64, shape),
            None if job.quant.keeps_scheme else out,  # --dtype: rounded straight into it
        )
        if values is not out:
            np.copyto(out, values.reshape(shape), casting="unsafe")
        return _Block(job, start * item.cols * out_dtype.itemsize, out, raw_out, scale)

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
            if job.copy_raw or job.scale_of is not None:
                continue
            prepared = pool.submit(self._prepare, reader, job)
            rows, _, step = self._rows(job)
            starts = range(0, rows, step) if rows else range(1)
            merge = self._merge_block if job.quant is None else self._quant_block
            for start in starts:
                task = functools.partial(merge, reader, prepared, start)
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
        untouched tensor while it waits, so the copies fill the time the workers need. The
        scale tensors of merged fp8 weights are written last, once their weights are done.
        """
        fd = reader.fileno()  # opened here, not raced by the workers
        copies = collections.deque(self._copies(reader, plan))
        blocks: collections.deque[tuple[Future[_Block], bool]] = collections.deque()
        pieces: dict[str, list[np.ndarray | None]] = {}
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
                        if block.job.quant is not None:
                            pieces.setdefault(block.job.name, []).append(block.scale)
                            if last:
                                block.job.quant.finish(pieces.pop(block.job.name))
                        progress(block.data.nbytes, 1 if last else 0)
                    elif copies:
                        item, last = copies.popleft()
                        writer.copy_range(item.job.name, fd, item.offset, item.nbytes, at=item.at)
                        progress(item.nbytes, 1 if last else 0)
                    else:
                        break
            except BaseException:
                for future, _ in blocks:
                    future.cancel()
                raise
        for job in plan.jobs:
            if job.scale_of is not None:
                scale = job.scale_of.scale_for_writing(self.block_bytes)
                writer.write_at(job.name, 0, scale)
                progress(scale.nbytes, 1)


def _one_blas_thread(workers: int) -> contextlib.AbstractContextManager[object]:
    """One BLAS thread per worker: the workers already use every CPU, and BLAS threads of
    their own would oversubscribe them (measured: 2.4-2.7 s of user time instead of 1.2 s on the
    1.67 GB benchmark, the extra threads spinning)."""
    if workers <= 1:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")
