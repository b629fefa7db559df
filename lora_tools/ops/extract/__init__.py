"""``extract``: a LoRA from a base checkpoint and its fine-tune.

Both checkpoints are opened header-only (:func:`lora_tools.io.checkpoint.open_checkpoint`, as
``merge`` opens a base) and matched tensor by tensor, one pair in memory at a time:

- a tensor missing from either side, or of another shape, is an error naming it; a resized
  vocabulary (an embedding / ``lm_head`` with other rows) is reported and left out;
- bit-equal tensors are skipped and counted;
- every changed weight of two or more dimensions (selected by ``modules``, a regex searched in
  the tensor name) becomes a LoRA module: the optimal rank-k approximation of
  ``dW = W_ft - W_base`` (convolutions flattened to ``[out, in * kh * kw]``), from a certified
  randomized SVD or the exact one (:func:`lora_tools.ops.extract.svd.truncate`). The singular
  values are split evenly, ``up = U sqrt(S)``, ``down = sqrt(S) Vh``, and alpha = rank, so
  every module has scale 1;
- other changed tensors (norms, biases, 1-D tensors, 2-D weights ``modules`` leaves out) are
  listed; with ``keep_diffs`` they are stored: PEFT ``modules_to_save`` (the fine-tuned
  tensors of the whole layer) or ``lora_B.bias`` for the bias of a LoRA layer, kohya
  ``.diff`` / ``.diff_b``.

Output naming: PEFT for transformers folders, kohya for single files, diffusers for diffusers
pipelines (:data:`DEFAULT_FORMATS`); every module is checked to resolve back onto the base
tensor it came from (:func:`lora_tools.resolve.resolve`), as merge and validate will resolve
it.

Example:
    >>> result = extract("fixtures/bases/tiny-llama", "fixtures/finetuned/tiny-llama-ft",
    ...                  rank=4)                                             # doctest: +SKIP
    >>> result.adapter.format, len(result.modules)                          # doctest: +SKIP
    ('peft', 14)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from lora_tools.adapter import CONV, EMBEDDING, LINEAR, Adapter, LoraModule
from lora_tools.errors import DeviceError, FormatError, ResolveError, ShapeError, UsageError
from lora_tools.io.checkpoint import Checkpoint, Component, open_checkpoint
from lora_tools.io.safetensors import ArrayTensor, Spool, Tensor, numpy_dtype
from lora_tools.naming import PEFT_PREFIX, kohya_name
from lora_tools.ops._algebra import Progress, add_history
from lora_tools.ops.extract.svd import (
    NumpyBackend,
    Rows,
    TorchBackend,
    Truncation,
    residual_error,
    truncate,
)
from lora_tools.resolve import CONV1D_MODEL_TYPES, CONV1D_NAMES, SINGLE_FILE_PREFIXES
from lora_tools.results import WrittenResult, input_ref

#: Output format per checkpoint kind (:attr:`Checkpoint.kind`).
DEFAULT_FORMATS = {"folder": "peft", "file": "kohya", "diffusers": "diffusers"}
FORMATS = ("peft", "kohya", "diffusers")
#: Safetensors float dtypes a LoRA is computed from.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
#: --dtype names -> safetensors dtypes.
OUTPUT_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
#: Layer names of token / position embeddings (PEFT's Embedding LoRA, lora_embedding_A / _B).
EMBEDDING_NAMES = (
    "embed_tokens",
    "wte",
    "wpe",
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
    "embed_positions",
    "token_embedding",
    "position_embedding",
    "shared",
)
#: Layers whose rows are the vocabulary: a fine-tune that added tokens has more of them.
VOCAB_NAMES = (*EMBEDDING_NAMES, "lm_head", "embed_out", "output")

#: The worker threads together hold at most this many bytes of whole differences (in float32,
#: or float64 for F64 inputs) for their SVDs; a larger difference (an embedding, lm_head) is
#: streamed: read again from the two files in row blocks on every pass of the sketch, so it
#: is never whole in memory.
RESIDENT_BYTES = 256 << 20

#: Tensor statuses of the non-LoRA rows.
UNCHANGED = "unchanged"
STORED = "stored"
LISTED = "listed"
RESIZED = "resized"


@dataclass(frozen=True)
class ModuleExtract:
    """One LoRA module extracted.

    Attributes:
        module: the module's key stem in the output.
        tensor: the base tensor (``component/key`` in a diffusers pipeline).
        shape: the weight's shape.
        rank: the rank written.
        retained_energy: ``||dW_k||_F^2 / ||dW||_F^2``.
        relative_error: ``||dW - up @ down||_F / ||dW||_F`` of the factors as written (rounded
            to the output dtype), measured in float64 over the true difference.
        svd_relative_error: the same before the rounding: the truncated SVD's own error (what
            ``excess_bound`` certifies against the Eckart-Young optimum).
        frobenius: ``||dW||_F``.
        method: ``randomized`` (certified) or ``exact`` (dense float64 SVD).
        excess_bound: certified ``error / optimal error - 1`` (0 for ``exact``).
        precision: ``float32`` or ``float64``.
    """

    module: str
    tensor: str
    shape: tuple[int, ...]
    rank: int
    retained_energy: float
    relative_error: float
    svd_relative_error: float
    frobenius: float
    method: str
    excess_bound: float
    precision: str

    def as_dict(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        row["shape"] = list(self.shape)
        return row


@dataclass(frozen=True)
class TensorExtract:
    """A changed tensor that is no LoRA module (or a resized one).

    Attributes:
        tensor: the base tensor's key (``component/key`` in a pipeline).
        shape: its shape in the fine-tune.
        status: ``stored`` (with keep_diffs), ``listed`` (not stored) or ``resized``.
        reason: why it is not a LoRA module, and how it was stored.
        frobenius: ``||W_ft - W_base||_F`` (0 for a resized tensor).
    """

    tensor: str
    shape: tuple[int, ...]
    status: str
    reason: str
    frobenius: float

    def as_dict(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        row["shape"] = list(self.shape)
        return row


@dataclass(frozen=True, repr=False)
class ExtractResult(WrittenResult):
    """The extracted adapter (in memory until written), per-module rows and the totals."""

    command = "extract"

    adapter: Adapter
    format: str
    rule: dict[str, Any]
    modules: tuple[ModuleExtract, ...]
    tensors: tuple[TensorExtract, ...]
    unchanged: int
    total_tensors: int
    device: str
    notes: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        """Totals; ``overall_relative_error = sqrt(sum ||dW - dW_k||^2 / sum ||dW||^2)`` over
        the LoRA modules."""
        rows = self.modules
        total = sum(r.frobenius**2 for r in rows)
        err = sum((r.relative_error * r.frobenius) ** 2 for r in rows)
        params = sum(m.down.numel + m.up.numel for m in self.adapter.modules.values())
        return {
            "overall_relative_error": math.sqrt(err / total) if total > 0 else 0.0,
            "max_relative_error": max((r.relative_error for r in rows), default=0.0),
            "min_retained_energy": min((r.retained_energy for r in rows), default=1.0),
            "max_excess_bound": max((r.excess_bound for r in rows), default=0.0),
            "lora_parameters": params,
            "ranks": _histogram([r.rank for r in rows]),
            "methods": _histogram([r.method for r in rows]),
        }

    def counts(self) -> dict[str, int]:
        return {
            "tensors": self.total_tensors,
            "modules": len(self.modules),
            "unchanged": self.unchanged,
            "stored": sum(t.status == STORED for t in self.tensors),
            "listed": sum(t.status == LISTED for t in self.tensors),
            "resized": sum(t.status == RESIZED for t in self.tensors),
        }

    def fields(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "device": self.device,
            "rule": dict(self.rule),
            "counts": self.counts(),
            "modules": [row.as_dict() for row in self.modules],
            "tensors": [row.as_dict() for row in self.tensors],
            "summary": self.summary(),
            "notes": list(self.notes),
        }


def _histogram(values: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in sorted(values, key=lambda x: (str(type(x)), x)):
        out[str(v)] = out.get(str(v), 0) + 1
    return out


# -- checking the rule and the device ----------------------------------------------------------


def check_rule(
    rank: int | None, energy: float | None, min_rank: int | None, max_rank: int | None
) -> None:
    """UsageError for a rule extract cannot apply (before anything is read)."""
    if (rank is None) == (energy is None):
        raise UsageError("give exactly one of --rank R and --energy E")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank must be at least 1, not {rank}")
    if energy is not None and not (0 < energy <= 1):
        raise UsageError(f"--energy must be in (0, 1], not {energy}")
    if min_rank is not None and min_rank < 1:
        raise UsageError(f"--min-rank must be at least 1, not {min_rank}")
    if max_rank is not None and max_rank < 1:
        raise UsageError(f"--max-rank must be at least 1, not {max_rank}")
    if min_rank is not None and max_rank is not None and min_rank > max_rank:
        raise UsageError(f"--min-rank {min_rank} is above --max-rank {max_rank}")
    if rank is not None and (min_rank is not None or max_rank is not None):
        raise UsageError(
            "--min-rank / --max-rank bound the rank --energy chooses; with --rank every "
            "module gets that rank",
            hint="drop --min-rank / --max-rank, or use --energy",
        )


def select_backend(device: str) -> NumpyBackend | TorchBackend:
    """numpy for ``cpu`` (and ``auto`` without a GPU); torch on the GPU for ``cuda[:N]``;
    torch on the CPU for ``torch-cpu`` (to check the torch path against numpy's).

    ``auto`` imports torch only when a GPU device node exists (as merge decides).

    Raises:
        DeviceError: ``cuda`` asked for, but torch or a GPU is missing.
        UsageError: an unknown device.
    """
    cuda = device == "cuda" or device.startswith("cuda:")
    if device not in ("auto", "cpu", "torch-cpu") and not cuda:
        raise UsageError(f"unknown device {device!r}", hint="use auto, cpu or cuda")
    if device == "cpu" or (device == "auto" and not _gpu_node()):
        return NumpyBackend()
    try:
        import torch
    except ImportError:
        if device == "auto":
            return NumpyBackend()
        raise DeviceError(
            f"--device {device} needs torch, which is not installed",
            hint="install a CUDA build of torch, or use --device cpu",
        ) from None
    if device == "torch-cpu":
        return TorchBackend("cpu")
    if not torch.cuda.is_available():
        if device == "auto":
            return NumpyBackend()
        built = "was built without CUDA" if torch.version.cuda is None else "sees no GPU"
        raise DeviceError(
            f"--device {device}: the installed torch {torch.__version__} {built}",
            hint="install a CUDA build of torch and check the GPU, or use --device cpu",
        )
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise DeviceError(f"--device {device}: no GPU {index}; torch sees {count}")
    return TorchBackend(f"cuda:{index}")


def _gpu_node() -> bool:
    """Whether a GPU could be usable, judged without importing torch."""
    import glob
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return False
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd")


# -- reading pairs ------------------------------------------------------------------------------


def _label(comp: Component, key: str) -> str:
    return f"{comp.name}/{key}" if comp.name else key


def _is_vocab(key: str) -> bool:
    parts = key.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in VOCAB_NAMES


def _pairs(base: Checkpoint, ft: Checkpoint) -> list[tuple[Component, Component, str]]:
    """Every (base component, fine-tune component, key), after checking the two agree."""
    missing = [c for c in base.components if c not in ft.components]
    extra = [c for c in ft.components if c not in base.components]
    if missing or extra:
        what = (
            f"component {missing[0]!r} is in the base but not in the fine-tune"
            if missing
            else f"component {extra[0]!r} is in the fine-tune but not in the base"
        )
        raise ShapeError(
            f"{what}; the two checkpoints have other layouts",
            path=ft.path,
            hint="extract from a fine-tune saved in the base's layout",
            kind="extract-layout",
        )
    out = []
    for name, comp in base.components.items():
        other = ft.components[name]
        keys = comp.keys()
        other_keys = set(other.keys())
        for key in keys:
            if key not in other_keys:
                raise ShapeError(
                    f"tensor {_label(comp, key)!r} is in the base but not in the fine-tune",
                    path=ft.path,
                    hint="is this the fine-tune of this base?",
                    kind="extract-missing",
                )
        known = set(keys)
        for key in other:
            if key not in known:
                raise ShapeError(
                    f"tensor {_label(other, key)!r} is in the fine-tune but not in the base",
                    path=base.path,
                    hint="is this the fine-tune of this base?",
                    kind="extract-missing",
                )
        out += [(comp, other, key) for key in keys]
    return out


#: Bytes of raw data read per side and row block when comparing and differencing a pair.
PAIR_BLOCK_BYTES = 4 << 20


def _decode(raw: np.ndarray, dtype: str, rows: int, wide: Any) -> np.ndarray:
    """Raw bytes of ``rows`` rows of a float tensor as a new ``[rows, -1]`` array of ``wide``
    (one array: no temporaries of the block's size)."""
    if dtype == "BF16":
        # bfloat16 is the top half of a float32: widening is a shift (no ml_dtypes needed)
        bits = np.empty(raw.nbytes // 2, np.uint32)
        bits[:] = raw.view("<u2")
        bits <<= 16
        out = bits.view(np.float32)
    elif dtype == "F16":
        out = raw.view("<f2").astype(np.float32)
    elif dtype == "F32":
        out = raw.view("<f4").copy()
    else:
        out = raw.view("<f8").copy()
    out = out if out.dtype == wide else out.astype(wide)
    return out.reshape(rows, -1)


class _Pair:
    """One (base, fine-tune) tensor pair, read in row blocks of about ``PAIR_BLOCK_BYTES`` per side:
    neither tensor is ever read whole (the difference is, where it is small enough)."""

    def __init__(self, comp_b: Component, comp_f: Component, key: str) -> None:
        self.key = key
        self.info_b, self.info_f = comp_b.info(key), comp_f.info(key)
        self.file_b = comp_b.open(comp_b.file_for(key))
        self.file_f = comp_f.open(comp_f.file_for(key))
        self.shape = tuple(self.info_f.shape)
        self.rows = self.shape[0] if self.shape else 1
        self.cols = math.prod(self.shape[1:]) if self.shape else 1
        self.numel = self.rows * self.cols
        widest = max(self.info_b.nbytes, self.info_f.nbytes) // max(self.rows, 1)
        self.rows_per_block = max(1, PAIR_BLOCK_BYTES // max(widest, 1))
        self.float = self.info_b.dtype in FLOAT_DTYPES and self.info_f.dtype in FLOAT_DTYPES
        self.wide = np.float64 if "F64" in (self.info_b.dtype, self.info_f.dtype) else np.float32

    def raw_blocks(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(first row, base bytes, fine-tune bytes)`` per row block; the buffers are reused."""
        rb = self.info_b.nbytes // max(self.rows, 1)
        rf = self.info_f.nbytes // max(self.rows, 1)
        buf_b = np.empty(rb * min(self.rows_per_block, self.rows), np.uint8)
        buf_f = np.empty(rf * min(self.rows_per_block, self.rows), np.uint8)
        for start in range(0, self.rows, self.rows_per_block):
            n = min(self.rows_per_block, self.rows - start)
            if not self.shape:  # a scalar: one "row"
                yield (
                    0,
                    self.file_b.read_into(self.key, buf_b),
                    self.file_f.read_into(self.key, buf_f),
                )
                return
            a = self.file_b.read_into(self.key, buf_b[: n * rb], row_start=start)
            b = self.file_f.read_into(self.key, buf_f[: n * rf], row_start=start)
            yield start, a, b

    def bit_equal(self) -> bool:
        """Same dtype and same bytes, compared block by block (stops at the first change)."""
        if self.info_b.dtype != self.info_f.dtype:
            return False
        return all(np.array_equal(a, b) for _, a, b in self.raw_blocks())

    def diff_blocks(self, dtype: Any = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, W_ft - W_base)`` per row block, ``[rows, cols]``, in ``dtype`` (the
        difference is formed in :attr:`wide`, exactly for bf16 / fp16 inputs)."""
        for start, a, b in self.raw_blocks():
            n = a.nbytes * self.rows // max(self.info_b.nbytes, 1) if self.shape else 1
            d = _decode(b, self.info_f.dtype, n, self.wide)
            d -= _decode(a, self.info_b.dtype, n, self.wide)
            yield start, d if dtype is None or d.dtype == dtype else d.astype(dtype)

    def diff(self) -> np.ndarray:
        """The whole difference, ``[rows, cols]`` in :attr:`wide`, filled block by block."""
        out = np.empty((self.rows, self.cols), self.wide)
        for start, d in self.diff_blocks():
            out[start : start + d.shape[0]] = d
        return out

    def stats(self) -> tuple[bool, bool, float]:
        """``(all finite, any nonzero, ||dW||_F^2)``, one streamed pass."""
        finite, nonzero, total = True, False, 0.0
        for _, d in self.diff_blocks():
            finite = finite and bool(np.isfinite(d).all())
            nonzero = nonzero or bool(d.any())
            total += float(np.einsum("ij,ij->", d, d, dtype=np.float64))
        return finite, nonzero, total


# -- naming -----------------------------------------------------------------------------------


@dataclass
class _Naming:
    """How the output names the module of a base weight, per format."""

    format: str
    kind: str
    #: single-file key prefix -> its OpenCLIP text encoder's layout (None: another model)
    _openclip: dict[str, Any] = dataclasses.field(default_factory=dict)

    def module(self, comp: Component, key: str) -> tuple[str, str | None, str, dict[str, str]]:
        """``(stem, component, path, keys)`` of the module updating base tensor ``key``."""
        path = key.removesuffix(".weight")
        if self.format == "peft":
            return PEFT_PREFIX + path, None, path, {}
        if self.format == "diffusers":
            component = comp.name or "transformer"
            return f"{component}.{path}", component, path, {}
        component, inner = self._component_path(comp, path)
        stem = kohya_name(component, inner)
        keys = {
            "down": f"{stem}.lora_down.weight",
            "up": f"{stem}.lora_up.weight",
            "alpha": f"{stem}.alpha",
        }
        return stem, component, inner, keys

    def _component_path(self, comp: Component, path: str) -> tuple[str, str]:
        if comp.name:
            return comp.name, path
        for prefix, component in SINGLE_FILE_PREFIXES:
            if path.startswith(prefix):
                return component, self._kohya_path(comp, prefix, path[len(prefix) :])
        return "unet", path

    def _kohya_path(self, comp: Component, prefix: str, path: str) -> str:
        """The module path kohya names: an OpenCLIP text encoder's (SD2's, SDXL's second) in
        transformers' layout, as sd-scripts trains it and diffusers and ComfyUI map it
        (``transformer.resblocks.0.attn.out_proj`` ->
        ``text_model.encoder.layers.0.self_attn.out_proj``); every other model's as stored."""
        layout = self._openclip.get(prefix)
        if prefix not in self._openclip:
            from lora_tools.layouts import open_clip

            shapes = {
                k[len(prefix) :]: tuple(comp.info(k).shape) for k in comp if k.startswith(prefix)
            }
            layout = self._openclip[prefix] = open_clip.from_native(shapes) if prefix else None
        pieces = layout.to_diffusers(path) if layout is not None else ()
        return pieces[0].diffusers if len(pieces) == 1 and pieces[0].whole else path


class _ByteBudget:
    """Bytes of whole differences the workers may hold at once. A worker waits for its share
    rather than streaming instead, so which tensors are streamed depends on their sizes alone
    and the output does not depend on the timing of the threads."""

    def __init__(self, total_bytes: int) -> None:
        self.free_bytes = total_bytes
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self.free_bytes >= nbytes)
            self.free_bytes -= nbytes
        try:
            yield
        finally:
            with self._cond:
                self.free_bytes += nbytes
                self._cond.notify_all()


def _default_name(ckpt: Checkpoint, given: str) -> str:
    """base_model_name_or_path: the base config's ``_name_or_path``, else the base as given."""
    comp = next(iter(ckpt.components.values()))
    name = (comp.config or {}).get("_name_or_path")
    return name if isinstance(name, str) and name else given


def _task_type(ckpt: Checkpoint) -> str | None:
    comp = next(iter(ckpt.components.values()))
    arch = (comp.config or {}).get("architectures") or []
    if any(isinstance(a, str) and a.endswith("ForCausalLM") for a in arch):
        return "CAUSAL_LM"
    if any(isinstance(a, str) and a.endswith("ForSeq2SeqLM") for a in arch):
        return "SEQ_2_SEQ_LM"
    return None


# -- the operation --------------------------------------------------------------------------------


def extract(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    *,
    rank: int | None = None,
    energy: float | None = None,
    min_rank: int | None = None,
    max_rank: int | None = None,
    modules: str | None = None,
    format: str | None = None,
    keep_diffs: bool = False,
    device: str = "auto",
    dtype: str | None = None,
    exact: bool = False,
    seed: int = 0,
    progress: Progress | None = None,
    base_spec: str | None = None,
    workers: int | None = None,
) -> ExtractResult:
    """Extract a LoRA from ``base`` and ``finetuned`` (see the module docstring).

    Args:
        base, finetuned: local checkpoints (file, HF folder, diffusers pipeline folder).
        rank / energy: the rule (exactly one); ``min_rank`` / ``max_rank`` bound the energy
            rule's rank.
        modules: a regex searched in each base tensor's key (``component/key`` in a
            pipeline): only matching weights become LoRA modules (default: every changed
            weight of two or more dimensions).
        format: ``peft``, ``kohya`` or ``diffusers`` (default from the base, see
            :data:`DEFAULT_FORMATS`).
        keep_diffs: store the changed tensors that are no LoRA module.
        device: ``auto``, ``cpu``, ``cuda``/``cuda:N`` (torch on the GPU) or ``torch-cpu``.
        dtype: output dtype (``bf16``, ``fp16``, ``fp32``); default: each fine-tuned tensor's.
        exact: dense SVDs only (no randomized sketch).
        seed: seed of the randomized SVD's Gaussian test matrices.
        progress: ``progress(done_bytes, total_bytes)`` after each tensor pair.
        base_spec: how the user named the base (for base_model_name_or_path).
        workers: pairs computed at once (default: one per CPU core; 1 on a GPU).

    Raises:
        UsageError: a bad rule, format or regex.
        ShapeError: a tensor missing on one side, or of another shape.
        DeviceError: ``cuda`` without torch / a GPU.
    """
    check_rule(rank, energy, min_rank, max_rank)
    if format is not None and format not in FORMATS:
        raise UsageError(f"unknown format {format!r}", hint=f"use one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}", hint="use bf16, fp16 or fp32")
    try:
        pattern = re.compile(modules) if modules is not None else None
    except re.error as exc:
        raise UsageError(f"--modules {modules!r} is not a regular expression: {exc}") from None
    backend = select_backend(device)
    with open_checkpoint(base) as ckpt_b, open_checkpoint(finetuned) as ckpt_f:
        fmt = format or DEFAULT_FORMATS[ckpt_b.kind]
        if fmt == "diffusers" and ckpt_b.kind == "file":
            raise UsageError(
                "diffusers naming needs a diffusers pipeline base (a single file names its "
                "layers in its own layout)",
                path=ckpt_b.path,
                hint="use --format kohya for single-file checkpoints",
            )
        run = _Run(ckpt_b, ckpt_f, fmt, pattern, keep_diffs, backend, dtype, exact, seed)
        run.rule = {"rank": rank, "energy": energy, "min_rank": min_rank, "max_rank": max_rank}
        run.go(progress, workers)
        adapter = run.build(base_spec or os.fspath(base))
        _check_resolves(adapter, ckpt_b, run.sources)
    rule = {k: v for k, v in run.rule.items() if v is not None}
    add_history(adapter, "extract", base=base_spec or os.fspath(base), **rule)
    inputs = (
        input_ref(base_spec or base, "base"),
        input_ref(finetuned, "model"),
    )
    return ExtractResult(
        adapter=adapter,
        format=fmt,
        rule=rule,
        modules=tuple(run.rows),
        tensors=tuple(run.others),
        unchanged=run.unchanged,
        total_tensors=run.total,
        device=backend.name,
        notes=tuple(run.notes),
        source_inputs=inputs,
    )


class _Run:
    """The state of one extraction: the pairs walked, what each became."""

    def __init__(
        self,
        ckpt_b: Checkpoint,
        ckpt_f: Checkpoint,
        fmt: str,
        pattern: re.Pattern[str] | None,
        keep_diffs: bool,
        backend: NumpyBackend | TorchBackend,
        dtype: str | None,
        exact: bool,
        seed: int,
    ) -> None:
        self.ckpt_b, self.ckpt_f = ckpt_b, ckpt_f
        self.format = fmt
        self.naming = _Naming(fmt, ckpt_b.kind)
        self.pattern = pattern
        self.keep_diffs = keep_diffs
        self.backend = backend
        self.dtype = OUTPUT_DTYPES[dtype] if dtype else None
        self.exact = exact
        self.seed = seed
        self.rule: dict[str, Any] = {}
        self.rows: list[ModuleExtract] = []
        self.others: list[TensorExtract] = []
        self.notes: list[str] = []
        self.unchanged = 0
        self.total = 0
        self.loras: dict[str, LoraModule] = {}
        #: module stem -> (component name, base key) it came from
        self.sources: dict[str, tuple[str, str]] = {}
        #: resized vocabulary tensors: (comp_f, key), the fine-tune's component
        self.resized: list[tuple[Component, str]] = []
        #: changed non-LoRA tensors: (comp_b, comp_f, key, the difference when it is stored)
        self.diffs: list[tuple[Component, Component, str, Tensor | None]] = []
        comp = next(iter(ckpt_b.components.values()))
        self.conv1d = comp.model_type in CONV1D_MODEL_TYPES
        self.resident = _ByteBudget(RESIDENT_BYTES)
        #: the factors written so far: on disk until the output is written, so what the run
        #: holds does not grow with the number of layers
        self.spool = Spool()

    def go(self, progress: Progress | None, workers: int | None = None) -> None:
        """Walk every pair: the shapes first (header-only, so a mismatch is reported before
        any work), then the data, ``workers`` pairs at a time (numpy's BLAS and LAPACK
        release the GIL; each worker's BLAS runs one thread). Results are applied in order."""
        from concurrent.futures import ThreadPoolExecutor

        pairs = _pairs(self.ckpt_b, self.ckpt_f)
        self.total = len(pairs)
        todo = [p for p in pairs if self.check_shapes(*p)]
        for ckpt in (self.ckpt_b, self.ckpt_f):
            for comp in ckpt.components.values():
                for path in comp.files:
                    comp.open(path)  # opened here, not raced by the workers
        sizes = [comp_f.info(key).nbytes for _, comp_f, key in todo]
        done, total = 0, sum(sizes)
        if workers is None:
            workers = 1 if isinstance(self.backend, TorchBackend) else (os.cpu_count() or 1)
        window = max(1, workers)
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(window) as pool:
            futures: list[Any] = []
            for n, pair in enumerate(todo):
                futures.append(pool.submit(self.work, *pair))
                if len(futures) > window:
                    self.apply(todo[n - window], futures.pop(0).result())
                    done += sizes[n - window]
                    if progress is not None:
                        progress(done, total)
            for pair, future in zip(todo[len(todo) - len(futures) :], futures, strict=True):
                self.apply(pair, future.result())
                done += pair[1].info(pair[2]).nbytes
                if progress is not None:
                    progress(done, total)

    def check_shapes(self, comp_b: Component, comp_f: Component, key: str) -> bool:
        """False for a resized vocabulary (recorded); ShapeError for any other mismatch."""
        info_b, info_f = comp_b.info(key), comp_f.info(key)
        if tuple(info_b.shape) == tuple(info_f.shape):
            return True
        label = _label(comp_b, key)
        if (
            len(info_b.shape) == 2
            and len(info_f.shape) == 2
            and info_b.shape[1] == info_f.shape[1]
            and _is_vocab(key)
        ):
            self.resized.append((comp_f, key))
            self.others.append(
                TensorExtract(
                    label,
                    tuple(info_f.shape),
                    RESIZED,
                    f"vocabulary resized from {info_b.shape[0]} to {info_f.shape[0]} rows; "
                    "a LoRA cannot change a layer's shape",
                    0.0,
                )
            )
            return False
        raise ShapeError(
            f"tensor {label!r} is {list(info_b.shape)} in the base but "
            f"{list(info_f.shape)} in the fine-tune",
            path=self.ckpt_f.path,
            hint="is this the fine-tune of this base?",
            kind="extract-shape",
        )

    def work(self, comp_b: Component, comp_f: Component, key: str) -> tuple[Any, ...]:
        """One pair, in a worker: ``("same",)``, ``("other", why, diff, norm)`` or ``("lora",
        kind, shape, truncation, up, down, error)``. Mutates nothing.

        Memory: two row blocks of the pair while comparing; the difference whole only when it
        is at most :data:`RESIDENT_BYTES` and the differences the other workers hold leave
        room for it (it waits for that; a larger one is streamed on every pass); a non-LoRA
        difference
        only when it will be stored (``keep_diffs``: kohya's ``.diff``, PEFT's bias)."""
        pair = _Pair(comp_b, comp_f, key)
        if pair.bit_equal():
            return ("same",)
        if not pair.float:
            return ("other", f"{pair.info_f.dtype} tensor (not a float weight) changed", None, 0.0)
        nbytes = pair.numel * np.dtype(pair.wide).itemsize
        if nbytes > RESIDENT_BYTES:
            return self.changed(comp_b, pair, key, None)
        with self.resident.hold(nbytes):  # all workers together hold RESIDENT_BYTES at most
            return self.changed(comp_b, pair, key, pair.diff())

    def changed(
        self, comp_b: Component, pair: _Pair, key: str, whole: np.ndarray | None
    ) -> tuple[Any, ...]:
        """The rest of :meth:`work` for a pair that is not bit-equal: ``whole`` is its
        difference, or None when it is streamed."""
        label = _label(comp_b, key)
        if whole is not None:
            finite, nonzero = bool(np.isfinite(whole).all()), bool(whole.any())
            total = float(np.einsum("ij,ij->", whole, whole, dtype=np.float64))
        else:
            finite, nonzero, total = pair.stats()
        if not finite:
            raise FormatError(
                f"tensor {label!r}: the difference holds NaN/Inf values",
                path=self.ckpt_f.path,
                hint="check both checkpoints for NaN/Inf weights",
                kind="non-finite",
            )
        if not nonzero:
            return ("same",)  # other bits, same values (-0.0 and 0.0, or another dtype)
        shape, ndim = pair.shape, len(pair.shape)
        selected = self.pattern is None or self.pattern.search(label) is not None
        if not (ndim >= 2 and key.endswith(".weight") and selected):
            if ndim < 2:
                why = "1-D (a norm or a bias)" if ndim == 1 else "a scalar"
            elif not key.endswith(".weight"):
                why = "not a layer weight"
            else:
                why = "left out by --modules"
            # kohya's .diff needs the values; PEFT stores the fine-tuned tensors (but biases)
            needed = self.keep_diffs and (self.format == "kohya" or ndim <= 1)
            if needed and whole is None:
                whole = pair.diff()
            kept = whole.reshape(shape) if needed and whole is not None else None
            return ("other", why, kept, math.sqrt(total))
        layer = key.removesuffix(".weight").rsplit(".", 1)[-1]
        source = (
            Rows.of(whole)
            if whole is not None
            else Rows((pair.rows, pair.cols), blocks=pair.diff_blocks, dtype=pair.wide)
        )
        if self.format == "peft" and layer in EMBEDDING_NAMES and ndim == 2:
            kind, transposed = EMBEDDING, True  # PEFT's embedding update is (B @ A)^T
        elif self.format == "peft" and self.conv1d and layer in CONV1D_NAMES and ndim == 2:
            kind, transposed = LINEAR, True  # GPT-2 Conv1D stores [in, out] (fan_in_fan_out)
        else:
            kind, transposed = (CONV if ndim > 2 else LINEAR), False  # a conv flattened
        t = truncate(
            source,
            **self._rule(),
            backend=self.backend,
            seed=self.seed,
            exact=self.exact,
            transposed=transposed,
        )
        # the error of what is written: the factors rounded to the output dtype
        out_dtype = self.dtype or pair.info_f.dtype
        up = t.up.astype(numpy_dtype(out_dtype))
        down = t.down.astype(numpy_dtype(out_dtype))
        err = residual_error(source, up, down, transposed)
        written = err / t.frobenius if t.frobenius > 0 else 0.0
        return ("lora", kind, shape, t, up, down, written)

    def apply(self, pair: tuple[Component, Component, str], outcome: tuple[Any, ...]) -> None:
        """Record a worker's outcome (main thread, in pair order)."""
        comp_b, comp_f, key = pair
        label = _label(comp_b, key)
        out_dtype = self.dtype or comp_f.info(key).dtype
        if outcome[0] == "same":
            self.unchanged += 1
            return
        if outcome[0] == "other":
            _, why, diff, norm = outcome
            shape = tuple(comp_f.info(key).shape)
            if norm == 0.0:  # not a float tensor: nothing to measure or store
                self.others.append(TensorExtract(label, shape, LISTED, f"{why}; not stored", 0.0))
                return
            # only what will be stored is kept (keep_diffs): a diff, never the whole walk's
            kept = self.spool.put(diff, out_dtype) if diff is not None else None
            self.diffs.append((comp_b, comp_f, key, kept))
            self.others.append(TensorExtract(label, shape, LISTED, why, norm))
            return
        _, kind, shape, t, up, down, written = outcome
        stem, component, path, keys = self.naming.module(comp_b, key)
        k = t.rank
        if kind == CONV:
            down = down.reshape(k, *shape[1:])
            up = up.reshape(shape[0], k, *[1] * (len(shape) - 2))
        module = LoraModule(
            key=stem,
            down=self.spool.put(down, out_dtype),
            up=self.spool.put(up, out_dtype),
            alpha=float(k),
            kind=kind,
            path=path,
            component=component,
            keys=keys,
        )
        if self.format == "kohya":
            module.alpha_tensor = ArrayTensor(np.array(float(k), np.float32), "F32")
        self.loras[stem] = module
        self.sources[stem] = (comp_b.name, key)
        self.rows.append(_row(stem, label, tuple(shape), t, written))

    def _rule(self) -> dict[str, Any]:
        r = self.rule
        if r.get("rank") is not None:
            return {"rank": r["rank"]}
        return {
            "energy": r["energy"],
            "min_rank": r.get("min_rank") or 1,
            "max_rank": r.get("max_rank"),
        }

    # -- the adapter --------------------------------------------------------------------------

    def build(self, base_name: str) -> Adapter:
        passthrough: dict[str, Tensor] = {}
        to_save: list[str] = []
        lora_bias = False
        if (self.diffs or self.resized) and self.keep_diffs:
            if self.format == "peft":
                to_save, lora_bias = self._peft_diffs(passthrough)
            elif self.format == "kohya":
                self._kohya_diffs(passthrough)
                self._kohya_diff_notes()
                if self.resized:
                    self.notes.append(self._resized_note("kohya"))
            else:
                self.notes.append(
                    f"{len(self.diffs) + len(self.resized)} changed tensors are no LoRA "
                    "module; diffusers LoRA files cannot hold full tensors, so they are "
                    "listed, not stored (use --format peft or kohya to keep them)"
                )
        else:
            if self.diffs:
                listed = next(row.tensor for row in self.others if row.status == LISTED)
                self.notes.append(
                    f"{len(self.diffs)} changed tensors are no LoRA module (e.g. {listed!r}); "
                    "they are listed, not stored: --keep-diffs stores them"
                )
            if self.resized:
                names = ", ".join(repr(key) for _, key in self.resized)
                self.notes.append(
                    f"the vocabulary is resized ({names}); it is listed, not stored: "
                    "--keep-diffs stores the fine-tuned layer (PEFT modules_to_save), or "
                    "resize the base's embeddings first and extract from that"
                )
        if self.format == "kohya":
            self._kohya_attention_note()
        if not self.loras and not passthrough:
            raise UsageError(
                "nothing to extract: no changed weight becomes a LoRA module"
                + (f" ({self.unchanged} tensors are bit-equal)" if self.unchanged else ""),
                path=self.ckpt_f.path,
                hint="check the two checkpoints, or --modules",
                kind="extract-empty",
            )
        metadata = {"format": "pt"} if self.format != "kohya" else {}
        adapter = Adapter(
            format=self.format,
            modules=dict(self.loras),
            passthrough=passthrough,
            metadata=metadata,
        )
        if self.format == "peft":
            from lora_tools.naming import target_paths

            adapter.config = {
                "peft_type": "LORA",
                "task_type": _task_type(self.ckpt_b),
                "base_model_name_or_path": _default_name(self.ckpt_b, base_name),
                "target_modules": target_paths(self.loras.values()),
                "modules_to_save": to_save or None,
                "bias": "none",
                "fan_in_fan_out": self.conv1d,
                "lora_dropout": 0.0,
                "init_lora_weights": True,
                "use_dora": False,
                "use_rslora": False,
                "lora_bias": lora_bias,
            }
        return adapter

    def _peft_diffs(self, passthrough: dict[str, Tensor]) -> tuple[list[str], bool]:
        """PEFT: a changed bias of a LoRA layer as ``lora_B.bias`` (when every LoRA layer's
        base has a bias: PEFT's lora_bias is one switch for all); every other changed tensor
        as its whole layer in ``modules_to_save`` (the fine-tune's tensors)."""
        lora_paths = {m.path: m for m in self.loras.values()}
        biased = {
            path: f"{path}.bias" for path in lora_paths if f"{path}.bias" in self._base_comp()
        }
        bias_diffs = {
            key.removesuffix(".bias"): diff
            for _, _, key, diff in self.diffs
            if key.endswith(".bias") and key.removesuffix(".bias") in lora_paths
        }
        lora_bias = bool(bias_diffs) and len(biased) == len(lora_paths)
        if bias_diffs and not lora_bias:
            self.notes.append(
                f"{len(bias_diffs)} LoRA layers' biases changed, but some LoRA layers have no "
                "bias in the base; PEFT's lora_bias is one switch for all, so the bias changes "
                "are not stored"
            )
        if lora_bias:
            for path, m in lora_paths.items():
                diff = bias_diffs.get(path)
                if diff is None:
                    diff = np.zeros(m.up.shape[0], numpy_dtype(m.up.dtype))
                m.bias = ArrayTensor(np.asarray(diff), m.up.dtype)
        layers: dict[str, Component] = {}
        for _comp_b, comp_f, key, _ in self.diffs:
            path = key.rsplit(".", 1)[0] if "." in key else key
            if path in lora_paths:
                continue  # a bias handled above, or not stored
            layers[path] = comp_f
        # a resized vocabulary: the fine-tune's whole layer (PEFT loads it once the base has
        # the rows: resize_token_embeddings)
        for comp_f, key in self.resized:
            layers[key.removesuffix(".weight")] = comp_f
        for path, comp_f in layers.items():
            for key in comp_f:
                if key.startswith(path + ".") and "." not in key[len(path) + 1 :]:
                    passthrough[PEFT_PREFIX + key] = comp_f.open(comp_f.file_for(key)).tensor(key)
        for row_index, row in enumerate(self.others):
            if row.status == RESIZED:
                self.others[row_index] = dataclasses.replace(
                    row,
                    reason=f"{row.reason}; the fine-tuned layer is stored in modules_to_save "
                    f"({row.tensor.removesuffix('.weight')}): resize the base to "
                    f"{row.shape[0]} rows before loading the adapter",
                )
                continue
            if row.status != LISTED:
                continue
            path = row.tensor.rsplit(".", 1)[0]
            if path in layers or (lora_bias and path in lora_paths):
                how = (
                    "stored as lora_B.bias"
                    if path in lora_paths
                    else f"stored in modules_to_save ({path})"
                )
                self.others[row_index] = dataclasses.replace(
                    row, status=STORED, reason=f"{row.reason}; {how}"
                )
        if self.dtype is not None:
            for key, tensor in list(passthrough.items()):  # one at a time, onto the spool
                passthrough[key] = self.spool.put(tensor.numpy(), self.dtype)
        return sorted(layers), lora_bias

    def _resized_note(self, fmt: str) -> str:
        names = ", ".join(repr(key) for _, key in self.resized)
        return (
            f"the resized vocabulary ({names}) is not stored: a {fmt} file cannot change a "
            "layer's shape (use --format peft, which stores the fine-tuned layer in "
            "modules_to_save)"
        )

    def _base_comp(self) -> Component:
        return next(iter(self.ckpt_b.components.values()))

    def _kohya_diffs(self, passthrough: dict[str, Tensor]) -> None:
        """kohya / ComfyUI: ``<name>.diff`` (a weight's difference) and ``<name>.diff_b`` (a
        bias's), beside the LoRA factors where the layer has them."""
        by_path = {(m.component, m.path): m for m in self.loras.values()}
        for (comp_b, _, key, diff), row_index in zip(
            self.diffs, self._listed_indices(), strict=True
        ):
            path, _, leaf = key.rpartition(".")
            if leaf not in ("weight", "bias") or not path:
                continue
            stem, component, inner, _ = self.naming.module(comp_b, path + ".weight")
            module = by_path.get((component, inner))
            if leaf == "bias" and module is not None:
                module.bias_diff = diff
                module.keys["bias_diff"] = f"{stem}.diff_b"
            else:
                passthrough[f"{stem}.{'diff' if leaf == 'weight' else 'diff_b'}"] = diff
            row = self.others[row_index]
            self.others[row_index] = dataclasses.replace(
                row,
                status=STORED,
                reason=f"{row.reason}; stored as {stem}.diff" + ("_b" if leaf == "bias" else ""),
            )

    def _kohya_diff_notes(self) -> None:
        """What --keep-diffs could not store in a kohya file, and who reads what it did."""
        left = [row.tensor for row in self.others if row.status == LISTED and row.frobenius]
        if left:
            self.notes.append(
                f"{len(left)} changed tensors are not stored (e.g. {left[0]!r}): a kohya "
                "file names a layer's .weight / .bias only (use --format peft to keep them)"
            )
        if any(row.status == STORED for row in self.others):
            self.notes.append(
                "the .diff / .diff_b tensors are applied by ComfyUI; diffusers' "
                "load_lora_weights refuses an SD / SDXL kohya file holding them and drops "
                "them from a Flux one (logged at info level only): for diffusers, extract "
                "without --keep-diffs"
            )

    def _kohya_attention_note(self) -> None:
        """A kohya text encoder's ``self_attn_q/k/v_proj`` modules without an ``out_proj``
        module beside them, which diffusers does not load
        (:func:`lora_tools.consumers.diffusers.kohya_te_attention_dropped`, LT547)."""
        from lora_tools.consumers.diffusers import kohya_te_attention_dropped

        for prefix, (qkv, _) in kohya_te_attention_dropped(list(self.loras)).items():
            self.notes.append(
                f"{len(qkv)} text-encoder attention modules ({prefix}..., e.g. {qkv[0]!r}) "
                "and no self_attn_out_proj module beside them: diffusers' "
                "load_lora_weights does not load them (it renames q/k/v only in a text "
                "encoder with an out_proj module: it drops them, or refuses the file when "
                "the text encoder has no other module); ComfyUI applies them (from a pipeline "
                "folder, --format diffusers writes names diffusers loads)"
            )

    def _listed_indices(self) -> list[int]:
        return [i for i, row in enumerate(self.others) if row.status == LISTED and row.frobenius]


def _row(
    stem: str, label: str, shape: tuple[int, ...], t: Truncation, written: float
) -> ModuleExtract:
    return ModuleExtract(
        module=stem,
        tensor=label,
        shape=shape,
        rank=t.rank,
        retained_energy=t.retained_energy,
        relative_error=written,
        svd_relative_error=t.relative_error,
        frobenius=t.frobenius,
        method=t.method,
        excess_bound=t.excess_bound,
        precision=t.precision,
    )


def _check_resolves(
    adapter: Adapter, ckpt: Checkpoint, sources: dict[str, tuple[str, str]]
) -> None:
    """Every module must resolve onto the base tensor it came from, as merge and validate
    resolve it; a naming that does not is refused here, before anything is written."""
    from lora_tools.resolve import resolve

    res = resolve(adapter, ckpt)
    for stem, (component, key) in sources.items():
        match = res.matches.get(stem)
        if match is None or match.target.key != key or match.target.component != component:
            where = "no base weight" if match is None else f"{match.target.key!r}"
            raise ResolveError(
                f"module {stem!r} (from {key!r}) resolves to {where} in this format",
                path=ckpt.path,
                hint="use --format peft",
                kind="extract-naming",
            )


__all__ = [
    "DEFAULT_FORMATS",
    "ExtractResult",
    "ModuleExtract",
    "TensorExtract",
    "check_rule",
    "extract",
    "select_backend",
]
