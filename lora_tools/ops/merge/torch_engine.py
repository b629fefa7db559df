"""The torch engine of ``loratool merge``: the same arithmetic as :mod:`.arithmetic`, on CPU or CUDA.

Imported only for ``--device cuda[:N]`` (or ``auto`` on a machine with a GPU); ``--device cpu``
is the numpy engine and never loads torch. ``select_engine("torch-cpu")`` runs this engine on
the CPU so that its code path is tested where no GPU is present.

Work is split over three threads so that reading, transfers, compute and writing overlap:

- a reader thread reads each row block of a targeted tensor into a (pinned, on CUDA) host
  buffer, ahead of the compute by a bounded number of blocks;
- the calling thread copies the block to the device (a separate copy stream on CUDA), computes
  the merge in float32, rounds once to the output dtype and copies the result back into a pinned
  buffer, recording a CUDA event;
- a writer thread waits for each block's event and appends it to the output file; it also copies
  untouched tensors byte for byte, so raw copies proceed while the GPU computes.

The products ``up @ down`` use torch's float32 matmul (cuBLAS on CUDA, MKL on CPU) with TF32
disabled; every other step is the same elementwise operation sequence as the numpy engine. The
two engines therefore write the same bytes except where the BLAS libraries sum the rank of a
product in different orders (the last bit of a float32 product, for ranks >= 8; see
:mod:`lora_tools.ops.merge.arithmetic`).

Example:
    >>> from lora_tools.ops.merge.torch_engine import TorchEngine
    >>> TorchEngine("cpu").name                                        # doctest: +SKIP
    'torch-cpu'
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lora_tools.errors import DeviceError
from lora_tools.io.safetensors import SafetensorsFile, SafetensorsWriter
from lora_tools.ops.merge.arithmetic import (
    NORM_LANES,
    DenseTerm,
    LowRankTerm,
    RowsTerm,
    Term,
    WeightTerm,
    rows_delta,
    term_span,
    weight_merged,
)
from lora_tools.ops.merge.jobs import (
    DEFAULT_BLOCK_BYTES,
    FilePlan,
    ProgressFn,
    TensorJob,
    copy_raw,
    job_rows,
)

TORCH_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
#: Row blocks read ahead of the compute, and results waiting for the writer.
QUEUE_DEPTH = 3


def cuda_device(spec: str, *, required: bool) -> str | None:
    """The CUDA device for ``spec`` (``cuda`` or ``cuda:N``), or None when none is usable.

    Raises:
        DeviceError: when ``required`` and torch has no CUDA, sees no GPU, or no GPU ``N``.
    """
    if not torch.cuda.is_available():
        if not required:
            return None
        if torch.version.cuda is None:
            raise DeviceError(
                f"--device {spec}: the installed torch {torch.__version__} was built without CUDA",
                hint="install a CUDA build of torch, or use --device cpu",
            )
        raise DeviceError(
            f"--device {spec}: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU",
            hint="check nvidia-smi and CUDA_VISIBLE_DEVICES, or use --device cpu",
        )
    index = 0 if spec in ("cuda", "auto") else int(spec.split(":", 1)[1])
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise DeviceError(
            f"--device {spec}: no GPU {index}; torch sees {count}",
            hint=f"use cuda:0 .. cuda:{count - 1}",
        )
    return f"cuda:{index}"


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    """A torch view of a numpy array, including ml_dtypes bfloat16."""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def _as_numpy_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a uint8 numpy array (no copy)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def fma_round(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``float32(acc + a * b)`` rounded once (see lora_tools.ops.merge.arithmetic.fma_round)."""
    acc64, prod = acc.double(), a.double() * b.double()
    total = acc64 + prod
    bits = total.view(torch.int64)
    mid = (bits & ((1 << 29) - 1)) == (1 << 28)
    if bool(mid.any()):
        a_, p, s = acc64[mid], prod[mid], total[mid]
        bb = s - a_
        err = (a_ - (s - bb)) + (p - bb)
        inf = torch.full_like(s, float("inf"))
        s = torch.where(
            err > 0,
            torch.nextafter(s, inf),
            torch.where(err < 0, torch.nextafter(s, -inf), s),
        )
        total[mid] = s
    return total.float()


def lane_norm(rows: torch.Tensor) -> torch.Tensor:
    """Per-row L2 norm, reduced exactly as lora_tools.ops.merge.arithmetic.lane_norm (and torch's CPU kernel)."""
    m, n = rows.shape
    full = n - n % NORM_LANES
    lanes = torch.zeros((m, NORM_LANES), dtype=torch.float32, device=rows.device)
    for j in range(0, full, NORM_LANES):
        chunk = rows[:, j : j + NORM_LANES]
        lanes = lanes + chunk * chunk
    total = lanes[:, 0].clone()
    for j in range(1, NORM_LANES):
        total = total + lanes[:, j]
    for j in range(full, n):
        total = fma_round(total, rows[:, j], rows[:, j])
    # torch's vectorised float32 sqrt is not always correctly rounded; the float64 square root
    # of a float32 rounded to float32 is (53 >= 2 * 24 + 2 bits), as the scalar kernel's is.
    return torch.sqrt(total.double()).float()


def column_norm(stored: torch.Tensor) -> torch.Tensor:
    """Per-column L2 norm, reduced exactly as lora_tools.ops.merge.arithmetic.column_norm (torch's CPU kernel on a
    non-contiguous dimension): ``acc = acc + x * x`` down the rows in order."""
    acc = torch.zeros(stored.shape[1], dtype=torch.float32, device=stored.device)
    for row in stored:
        acc = acc + row * row
    return torch.sqrt(acc.double()).float()


@dataclass
class _DeviceTerm:
    """A term with its factors on the device."""

    term: Term
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    value: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None


class TorchEngine:
    """Merge with torch on ``device`` (``cpu`` or ``cuda:N``), overlapping I/O and compute.

    Args:
        device: ``cpu`` or ``cuda:N``.
        block_bytes: float32 bytes per row block.
    """

    def __init__(self, device: str = "cpu", *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.block_bytes = block_bytes
        self.name = f"torch-{device}"

    # -- compute -------------------------------------------------------------------------

    def _device_terms(self, terms: list[Term]) -> list[_DeviceTerm]:
        out = []
        for t in terms:
            if isinstance(t, (RowsTerm, WeightTerm)):
                out.append(_DeviceTerm(t))  # computed by the numpy code: the same bytes
                continue
            if isinstance(t, DenseTerm):
                out.append(_DeviceTerm(t, value=self._put(t.value.astype(np.float32))))
                continue
            out.append(
                _DeviceTerm(
                    t,
                    up=self._put(t.up),
                    down=self._put(t.down),
                    magnitude=None if t.magnitude is None else self._put(t.magnitude),
                )
            )
        return out

    def _put(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    @staticmethod
    def _delta(dt: _DeviceTerm, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the term's own update (row 0: tensor row ``offset``)."""
        t = dt.term
        if isinstance(t, RowsTerm):
            return torch.from_numpy(rows_delta(t, start, stop))
        assert not isinstance(t, WeightTerm)
        scale = float(np.float32(t.scale))
        if isinstance(t, DenseTerm):
            assert dt.value is not None
            return dt.value.reshape(dt.value.shape[0], -1)[start:stop] * scale
        assert dt.up is not None and dt.down is not None
        if t.transposed:
            return torch.mm(dt.up, dt.down[:, start:stop]).T * scale
        return torch.mm(dt.up[start:stop], dt.down) * scale

    def _merge_block(
        self, base: torch.Tensor, dterms: list[_DeviceTerm], start: int
    ) -> torch.Tensor:
        stop = start + base.shape[0]
        acc = base
        for dt in dterms:
            lo, hi = term_span(dt.term, start, stop)
            if lo >= hi:
                continue  # a row range of a fused tensor outside this block
            if (lo, hi) == (start, stop):
                acc = self._merge_rows(base, acc, dt, lo - dt.term.offset)
                continue
            a, b = lo - start, hi - start
            merged = self._merge_rows(base[a:b], acc[a:b], dt, lo - dt.term.offset)
            acc = acc.clone() if acc is base else acc
            acc[a:b] = merged
        return acc

    def _merge_rows(
        self, base: torch.Tensor, acc: torch.Tensor, dt: _DeviceTerm, at: int
    ) -> torch.Tensor:
        """``acc`` (rows of the tensor, ``base`` their unmerged values) with one term's rows
        ``at : at + len(acc)`` of its own update added (for a :class:`WeightTerm`, ``acc``
        merged by the numpy code on the CPU, so that both engines write the same bytes)."""
        if isinstance(dt.term, WeightTerm):
            rows = acc.cpu().numpy()
            return torch.from_numpy(weight_merged(dt.term, rows)).to(acc.device)
        delta = self._delta(dt, at, at + acc.shape[0])
        if isinstance(dt.term, RowsTerm):
            delta = delta.to(acc.device)
        if dt.magnitude is None:
            if isinstance(dt.term, LowRankTerm) and dt.term.delta_dtype is not None:
                delta = delta.to(TORCH_DTYPES[dt.term.delta_dtype]).float()
            return (acc + delta).to(base.dtype)
        unmerged = (base + delta).float()
        merged = (acc + delta).float()
        if isinstance(dt.term, LowRankTerm) and dt.term.transposed:
            factor = dt.magnitude / column_norm(unmerged)
            return factor[None, :] * merged
        factor = dt.magnitude[at : at + acc.shape[0]] / lane_norm(unmerged)
        return factor[:, None] * merged

    # -- pipeline ------------------------------------------------------------------------

    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)

    def _read_blocks(
        self, reader: SafetensorsFile, plan: FilePlan, out_q: queue.Queue, stop: threading.Event
    ) -> None:
        """Reader thread: raw items and row blocks, in file order."""
        try:
            for job in plan.jobs:
                if stop.is_set():
                    return
                if job.copy_raw:
                    out_q.put(("raw", job, None))
                    continue
                terms = job.terms()
                rows, _, step = job_rows(job, self.block_bytes)
                out_q.put(("start", job, terms))
                for start in range(0, rows, step):
                    if stop.is_set():
                        return
                    count = min(rows, start + step) - start
                    out_q.put(("block", job, (start, self._read_rows(reader, job, start, count))))
                out_q.put(("end", job, None))
            out_q.put(("done", None, None))
        except BaseException as exc:  # handed to the compute thread, which re-raises it
            out_q.put(("error", None, exc))

    def _read_rows(
        self, reader: SafetensorsFile, job: TensorJob, start: int, count: int
    ) -> torch.Tensor:
        rows, cols = job_rows(job, 1)[:2]
        if job.replacement is not None:
            values = job.replacement.numpy().reshape(rows, cols)[start : start + count]
            return _from_numpy(np.ascontiguousarray(values))
        info = job.info
        itemsize = info.nbytes // max(info.numel, 1)
        buf = self._host_buffer(count * cols * itemsize)
        reader.read_into(job.name, _as_numpy_bytes(buf), row_start=start)
        return buf.view(TORCH_DTYPES[info.dtype]).reshape(count, cols)

    def _write_items(
        self,
        reader: SafetensorsFile,
        writer: SafetensorsWriter,
        in_q: queue.Queue,
        progress: ProgressFn,
        errors: list[BaseException],
    ) -> None:
        """Writer thread: waits for each block's copy back, then appends it."""
        try:
            while True:
                kind, job, payload = in_q.get()
                if kind == "done":
                    return
                if kind == "raw":
                    copy_raw(reader, job, writer, progress)
                elif kind == "block":
                    host, event = payload
                    if event is not None:
                        event.synchronize()
                    data = _as_numpy_bytes(host)
                    writer.write(job.name, memoryview(data))
                    progress(data.nbytes, 0)
                elif kind == "end":
                    progress(0, 1)
        except BaseException as exc:
            errors.append(exc)

    def write_file(
        self,
        reader: SafetensorsFile,
        plan: FilePlan,
        writer: SafetensorsWriter,
        progress: ProgressFn,
    ) -> None:
        """Write every tensor of one output file (see the module docstring for the threads).

        A file holding fp8 weights of a quantized base to merge or dequantize, or their scales,
        is written by the numpy engine's code (:mod:`.quantized`: float64 dequantization and
        the schemes' quantizers), so that both engines write the same bytes for it.
        """
        if any(job.quant is not None or job.scale_of is not None for job in plan.jobs):
            from lora_tools.ops.merge.numpy_engine import NumpyEngine

            NumpyEngine(self.block_bytes).write_file(reader, plan, writer, progress)
            return
        read_q: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        write_q: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        stop = threading.Event()
        write_errors: list[BaseException] = []
        read_thread = threading.Thread(
            target=self._read_blocks, args=(reader, plan, read_q, stop), daemon=True
        )
        write_thread = threading.Thread(
            target=self._write_items,
            args=(reader, writer, write_q, progress, write_errors),
            daemon=True,
        )
        read_thread.start()
        write_thread.start()
        try:
            self._compute_loop(read_q, write_q, write_errors)
        except BaseException:
            stop.set()
            _drain(read_q)
            _put_done(write_q, write_errors)
            raise
        finally:
            read_thread.join()
            write_thread.join()
        if write_errors:
            raise write_errors[0]

    def _compute_loop(
        self, read_q: queue.Queue, write_q: queue.Queue, write_errors: list[BaseException]
    ) -> None:
        copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        dterms: list[_DeviceTerm] = []
        out_dtype: Any = None
        with _exact_matmul(self.cuda):
            while True:
                if write_errors:
                    raise write_errors[0]
                kind, job, payload = read_q.get()
                if kind == "error":
                    raise payload
                if kind in ("raw", "end", "done"):
                    _put(write_q, (kind, job, None), write_errors)
                    if kind == "done":
                        return
                    continue
                if kind == "start":
                    dterms = self._device_terms(payload)
                    out_dtype = TORCH_DTYPES[job.out_dtype]
                    continue
                start, host_in = payload
                _put(
                    write_q,
                    (
                        "block",
                        job,
                        self._compute(host_in, dterms, start, out_dtype, job, copy_stream),
                    ),
                    write_errors,
                )

    def _compute(
        self,
        host_in: torch.Tensor,
        dterms: list[_DeviceTerm],
        start: int,
        out_dtype: torch.dtype,
        job: TensorJob,
        copy_stream: Any,
    ) -> tuple[torch.Tensor, Any]:
        compute_dtype = torch.float64 if job.info.dtype == "F64" else torch.float32
        if not self.cuda:
            merged = self._merge_block(host_in.to(compute_dtype), dterms, start)
            return merged.to(out_dtype).contiguous(), None
        with torch.cuda.stream(copy_stream):
            dev_in = host_in.to(self.device, non_blocking=True)
        torch.cuda.current_stream(self.device).wait_stream(copy_stream)
        dev_in.record_stream(torch.cuda.current_stream(self.device))
        merged = self._merge_block(dev_in.to(compute_dtype), dterms, start).to(out_dtype)
        host_out = torch.empty(merged.shape, dtype=out_dtype, pin_memory=True)
        host_out.copy_(merged, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return host_out, event


class _exact_matmul:
    """Disable TF32 (and reduced-precision reductions) for the duration of a merge on CUDA."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.saved: tuple[bool, bool] | None = None

    def __enter__(self) -> None:
        if self.cuda:
            m = torch.backends.cuda.matmul
            self.saved = (m.allow_tf32, m.allow_fp16_reduced_precision_reduction)
            m.allow_tf32 = False
            m.allow_fp16_reduced_precision_reduction = False

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            m = torch.backends.cuda.matmul
            m.allow_tf32, m.allow_fp16_reduced_precision_reduction = self.saved


def _put(q: queue.Queue, item: tuple, errors: list[BaseException]) -> None:
    """Put without blocking forever when the consumer thread died."""
    while True:
        if errors:
            raise errors[0]
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _put_done(q: queue.Queue, errors: list[BaseException]) -> None:
    _drain(q)
    with contextlib.suppress(queue.Full):
        q.put(("done", None, None), timeout=1)


def _drain(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


__all__ = ["TorchEngine", "cuda_device"]
