"""The in-memory adapter model every format reads into and writes from.

A LoRA module applies ``dW = scale * (up @ down)`` to one base weight, where ``down`` (PEFT's
lora_A, kohya's lora_down) is ``[r, in]`` (conv: ``[r, in, *kernel]``), ``up`` (lora_B /
lora_up) is ``[out, r]`` (conv: ``[out, r, 1, ...]``) and ``scale = alpha / r`` (rsLoRA:
``alpha / sqrt(r)``). Embeddings store ``down`` as ``[r, num_embeddings]`` and ``up`` as
``[dim, r]``; their update is the transpose, ``[num_embeddings, dim]``.

Tensors stay lazy (:class:`~lora_tools.io.safetensors.FileTensor`) until an operation needs
their values, so building an :class:`Adapter` from a 1 GB file reads only its header.

Example:
    >>> import numpy as np
    >>> from lora_tools.adapter import LoraModule
    >>> from lora_tools.io.safetensors import ArrayTensor
    >>> m = LoraModule(key="q", down=ArrayTensor(np.ones((2, 3), np.float32)),
    ...                up=ArrayTensor(np.ones((4, 2), np.float32)), alpha=4.0, kind="linear")
    >>> m.rank, m.scale, m.delta_shape
    (2, 2.0, (4, 3))
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora_tools.deltas import DeltaModule
from lora_tools.errors import AdapterError, UnknownScaleError, UnsupportedAdapterError
from lora_tools.io.safetensors import Tensor
from lora_tools.lowrank import max_abs_update
from lora_tools.naming import flat_target_name

#: What to do about an adapter whose alpha is unknown (PEFT keys without their config).
UNKNOWN_SCALE_HINT = (
    "add the adapter's adapter_config.json (the lora_alpha and r it was trained with) beside "
    "it, named adapter_model.safetensors, and pass that folder"
)

LINEAR = "linear"
CONV = "conv"
EMBEDDING = "embedding"
KINDS = (LINEAR, CONV, EMBEDDING)


#: Copies of a module's factors (as the working float dtype) an operation holds at once: the
#: factors, their QR / SVD pieces and products.
WORK_COPIES = 4
#: Working memory below which a module is not checked against the memory available.
MEMORY_CHECK_BYTES = 1 << 28


def available_memory_bytes() -> int | None:
    """Memory this process can still allocate: Linux ``MemAvailable`` (else the physical
    memory), capped by a cgroup v2 memory limit and by ``RLIMIT_AS``; None where unknown."""
    limits: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            limits += [int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    if not limits:
        with contextlib.suppress(AttributeError, ValueError, OSError):
            limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    try:
        cgroup = Path("/sys/fs/cgroup")
        high = (cgroup / "memory.max").read_text().strip()
        if high != "max":
            limits.append(int(high) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    except (ImportError, OSError, ValueError):
        pass
    return max(min(limits), 0) if limits else None


@dataclass(repr=False)
class LoraModule:
    """One LoRA module: the factors and scale that update one base weight.

    Attributes:
        key: the module's stem as spelled in the file (lossless round trips keep it).
        down: A / lora_down, ``[r, in]`` or ``[r, in, *kernel]`` (embedding ``[r, num_emb]``).
        up: B / lora_up, ``[out, r]`` or ``[out, r, 1, ...]`` (embedding ``[dim, r]``).
        alpha: the module's alpha; None means "alpha = rank" (scale 1), as kohya reads a
            missing alpha tensor, unless ``alpha_unknown`` says it is unknown.
        kind: ``linear``, ``conv`` or ``embedding``.
        path: dotted module path inside its component (None until resolved, e.g. kohya names).
        component: pipeline component (``unet``, ``text_encoder``, ``transformer``...), or None.
        rslora: scale is ``alpha / sqrt(r)`` instead of ``alpha / r``.
        magnitude: DoRA magnitude vector, if any.
        bias: lora_B bias (PEFT ``lora_bias=True``), if any.
        alpha_tensor: kohya's stored alpha tensor, kept to write it back byte for byte.
        keys: role (``down``, ``up``, ``alpha``, ``magnitude``, ``bias``, ``bias_diff``) ->
            tensor key in the file.
        alpha_unknown: why the file does not say the module's alpha (``"no adapter_config.json"``
            for PEFT keys without their config), or None when it does. An unknown alpha makes
            :attr:`scale` and :attr:`effective_alpha` raise :class:`UnknownScaleError`.
        bias_diff: a difference for the base layer's bias (ComfyUI / LyCORIS ``.diff_b``,
            ``[out]``), or None. Consumers add ``strength * bias_diff`` to the bias: it is no
            part of ``up @ down`` and is not multiplied by :attr:`scale` (ComfyUI
            comfy/lora.py applies it as a plain ``diff`` patch).
        rows: ``(start, stop)``: the update covers only these rows of the base weight (XLabs'
            single-block ``qkv_lora`` updates the q / k / v rows of Flux's fused ``linear1``),
            or None for the whole weight.
    """

    key: str
    down: Tensor
    up: Tensor
    alpha: float | None
    kind: str
    path: str | None = None
    component: str | None = None
    rslora: bool = False
    magnitude: Tensor | None = None
    bias: Tensor | None = None
    alpha_tensor: Tensor | None = None
    keys: dict[str, str] = field(default_factory=dict)
    alpha_unknown: str | None = None
    bias_diff: Tensor | None = None
    rows: tuple[int, int] | None = None

    def __repr__(self) -> str:
        """Name, kind, rank, shapes and alpha; never tensor values.

        Example:
            >>> import numpy as np
            >>> from lora_tools.io.safetensors import ArrayTensor
            >>> LoraModule(key="q", down=ArrayTensor(np.ones((2, 3), np.float32)),
            ...            up=ArrayTensor(np.ones((4, 2), np.float32)), alpha=4.0, kind="linear")
            LoraModule('q', kind='linear', rank=2, down=(2, 3), up=(4, 2), alpha=4.0)
        """
        alpha = "unknown" if self.alpha_unknown is not None else repr(self.alpha)
        extra = "".join(
            f", {name}" for name, on in (("rslora", self.rslora), ("dora", self.dora)) if on
        )
        return (
            f"LoraModule({self.key!r}, kind={self.kind!r}, rank={self.rank}, "
            f"down={tuple(self.down.shape)}, up={tuple(self.up.shape)}, alpha={alpha}{extra})"
        )

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def effective_alpha(self) -> float:
        """alpha, with a missing alpha read as the rank.

        Raises:
            UnknownScaleError: the file does not say the alpha (:attr:`alpha_unknown`).
        """
        if self.alpha_unknown is not None:
            raise unknown_scale_error(self, "this operation")
        return float(self.rank) if self.alpha is None else float(self.alpha)

    @property
    def scale(self) -> float:
        """The factor the product ``up @ down`` is multiplied by.

        Raises:
            UnknownScaleError: the file does not say the alpha (:attr:`alpha_unknown`).
        """
        if self.alpha_unknown is not None:
            raise unknown_scale_error(self, "this operation")
        if self.rank == 0:
            return 0.0
        denom = math.sqrt(self.rank) if self.rslora else self.rank
        return self.effective_alpha / denom

    @property
    def in_features(self) -> int:
        return self.down.shape[1] if len(self.down.shape) > 1 else 0

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.down.shape[2:]) if self.kind == CONV else ()

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """Shape of the update (PEFT / torch layout): the base weight's, or its :attr:`rows`."""
        if self.kind == EMBEDDING:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features, *self.kernel)

    @property
    def parameter_count(self) -> int:
        extra = sum(t.numel for t in (self.magnitude, self.bias, self.bias_diff) if t is not None)
        return self.down.numel + self.up.numel + extra

    @property
    def dora(self) -> bool:
        return self.magnitude is not None

    @property
    def full_path(self) -> str | None:
        """``component.path`` when both are known, else the path."""
        if self.path is None:
            return None
        return f"{self.component}.{self.path}" if self.component else self.path

    @property
    def target_name(self) -> str:
        """The layer name this module targets: ``q_proj``, ``to_out.0``, ``conv1``...

        From the module path when known; from a flattened kohya name by recognising common
        layer names, else the part after the last ``_<digits>_``.
        """
        if self.path:
            parts = self.path.split(".")
            if parts[-1].isdigit() and len(parts) > 1:
                return ".".join(parts[-2:])
            return parts[-1]
        return flat_target_name(self.key)

    def factors(self, dtype: np.dtype = np.float64) -> tuple[np.ndarray, np.ndarray]:
        """``(U, V)`` as 2-D arrays with ``U @ V * scale`` = the update as a matrix.

        For linear and conv modules the matrix is ``[out, in * prod(kernel)]`` (reshape to
        :attr:`delta_shape`); for embeddings it is ``[dim, num_embeddings]``, the transpose of
        the update.
        """
        self._require_fitting_factors()
        self._require_memory(np.dtype(dtype).itemsize)
        up = self.up.numpy().astype(dtype).reshape(self.out_features, self.rank)
        down = self.down.numpy().astype(dtype).reshape(self.rank, -1)
        return up, down

    @property
    def source_path(self) -> Path | None:
        """The file the module's factors were read from, if any (for error messages)."""
        source = getattr(self.down, "file", None)
        return source.path if source is not None else None

    def _require_fitting_factors(self) -> None:
        """AdapterError naming the module when up and down do not share the rank: such a
        module (validate's LT102) has no update to compute."""
        if self.up.numel == self.out_features * self.rank:
            return
        raise AdapterError(
            f"module {self.key!r}: up {list(self.up.shape)} does not fit down "
            f"{list(self.down.shape)} (rank {self.rank}), so the module has no update",
            path=self.source_path,
            hint="run loratool validate on the file: its structure rules say what is wrong",
        )

    def _require_memory(self, itemsize: int) -> None:
        """AdapterError naming the module when its factors, as ``itemsize``-byte floats, and
        the working copies of an operation on them would not fit in the memory available."""
        need = (self.up.numel + self.down.numel) * itemsize * WORK_COPIES
        if need < MEMORY_CHECK_BYTES:
            return
        budget = available_memory_bytes()
        if budget is None or need <= budget:
            return
        layer = self.delta_shape
        thin = min(self.out_features, max(self.in_features * math.prod(self.kernel), 1))
        raise AdapterError(
            f"module {self.key!r}: rank {self.rank} on a {' x '.join(map(str, layer))} layer "
            f"needs about {need / 2**30:.1f} GiB of working memory, more than the "
            f"{budget / 2**30:.1f} GiB available",
            path=self.source_path,
            hint=f"a rank above min(out, in) = {thin} adds nothing but size; export the "
            f"adapter at rank <= {thin}"
            if self.rank > thin
            else "run it on a machine with more memory",
            kind="memory",
        )

    def finite_factors(
        self, dtype: np.dtype = np.float64, *, consequence: str = "the result would be NaN"
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`factors`, or AdapterError when either holds NaN or Inf."""
        up, down = self.factors(dtype)
        require_finite(up, "up factor (B)", self, consequence)
        require_finite(down, "down factor (A)", self, consequence)
        return up, down

    def delta(self) -> np.ndarray:
        """The dense float64 update in the base weight's layout (small modules and tests only)."""
        up, down = self.factors()
        product = (up @ down) * self.scale
        if self.kind == EMBEDDING:
            return product.T
        return product.reshape(self.delta_shape)


def unknown_scale_error(module: LoraModule, operation: str) -> UnknownScaleError:
    """The one-line error for an operation that needs the scale of a module whose alpha the
    file does not say."""
    return UnknownScaleError(
        f"alpha unknown: {module.alpha_unknown}; {operation} needs every module's scale "
        f"lora_alpha / r (e.g. {module.key!r}, rank {module.rank})",
        path=module.source_path,
        hint=UNKNOWN_SCALE_HINT,
        kind="alpha-unknown",
    )


def require_finite(
    values: np.ndarray, what: str, module: LoraModule, consequence: str
) -> np.ndarray:
    """``values``, or AdapterError naming the module and the file when they hold NaN / Inf.

    Operations refuse such factors rather than spread them: PEFT and diffusers merge them
    silently into a non-finite model.
    """
    finite = np.isfinite(values)
    if not finite.all():
        raise AdapterError(
            f"module {module.key!r}: the {what} holds {values.size - int(finite.sum())} "
            f"NaN/Inf values; {consequence}",
            path=module.source_path,
            hint="run `loratool validate` on the adapter; use an earlier checkpoint",
            kind="non-finite",
        )
    return values


#: Largest float32 (and about bfloat16's): consumers compute updates in the factors' dtype.
LARGEST_F32 = float(np.finfo(np.float32).max)
#: Largest finite value per safetensors float dtype, for overflow checks (no ml_dtypes import).
LARGEST = {"F16": 65504.0, "BF16": 3.3895313892515355e38, "F64": float(np.finfo(np.float64).max)}

#: Smallest non-zero |scale| operations accept: below it alpha / r is a subnormal float, and
#: anything divided by the scale (rescale, convert) overflows.
_SMALLEST_SCALE = float(np.finfo(np.float64).tiny)


def _short(value: object) -> str:
    """``repr(value)``, cut to 40 characters (a hostile config value can be huge)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(repr=False)
class Adapter:
    """A LoRA adapter as read from one file (plus its config), in any format.

    Attributes:
        format: the naming scheme: ``peft``, ``diffusers``, ``kohya``, ``diffusers-old``, or a
            registered third-party format.
        modules: LoRA modules by key stem, in file order.
        passthrough: tensors kept byte for byte (modules_to_save, embeddings, LyCORIS tensors).
        foreign: adapter types other than LoRA (LoHa, LoKr, OFT...), type -> module stems;
            their tensors stay in ``passthrough`` (written back byte for byte).
        deltas: the modules of ``foreign`` whose update loratool computes, by stem
            (:class:`~lora_tools.deltas.DeltaModule`: the same tensors, read as their type).
        metadata: the file's ``__metadata__``.
        config: the adapter config (PEFT adapter_config.json), or None.
        source: the file the tensors came from.
        config_source: the config file, if any.
    """

    format: str
    modules: dict[str, LoraModule] = field(default_factory=dict)
    passthrough: dict[str, Tensor] = field(default_factory=dict)
    foreign: dict[str, list[str]] = field(default_factory=dict)
    deltas: dict[str, DeltaModule] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    source: Path | None = None
    config_source: Path | None = None
    #: ``foreign`` as sets, so that noting a stem stays O(1) (readers see a key per tensor)
    _foreign_seen: dict[str, set[str]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __repr__(self) -> str:
        """Format, module count, rank range and source; never tensors or per-module detail.

        Example:
            >>> Adapter(format="kohya")
            Adapter(format='kohya', modules=0, source=None)
        """
        ranks = sorted(self.ranks)
        shown = [f"format={self.format!r}", f"modules={len(self.modules)}"]
        if ranks:
            shown.append(f"rank={ranks[0]}" + (f"..{ranks[-1]}" if len(ranks) > 1 else ""))
        if self.foreign:
            shown.append(f"foreign={sorted(self.foreign)!r}")
        if self.passthrough:
            shown.append(f"passthrough={len(self.passthrough)}")
        shown.append(f"source={str(self.source) if self.source else None!r}")
        return f"Adapter({', '.join(shown)})"

    @property
    def name(self) -> str:
        return str(self.source) if self.source else "<adapter>"

    @property
    def ranks(self) -> Counter[int]:
        return Counter(m.rank for m in self.modules.values())

    @property
    def variants(self) -> list[str]:
        """Names for what the file holds: LoRA, DoRA, rsLoRA, LoCon, bias diff, LoHa, ..."""
        out: list[str] = []
        mods = self.modules.values()
        if mods:
            out.append("LoRA")
        if any(m.dora for m in mods):
            out.append("DoRA")
        if any(m.rslora for m in mods):
            out.append("rsLoRA")
        if self.format == "kohya" and any(m.kind == CONV and math.prod(m.kernel) > 1 for m in mods):
            out.append("LoCon")
        if any(m.bias_diff is not None for m in mods):
            out.append("bias diff")
        out.extend(self.foreign)
        return out

    def uncomputed(self) -> dict[str, list[str]]:
        """The foreign modules loratool cannot compute with (no :attr:`deltas` entry), by type."""
        out = {
            kind: [s for s in stems if s not in self.deltas] for kind, stems in self.foreign.items()
        }
        return {kind: stems for kind, stems in out.items() if stems}

    def require_plain_lora(self, operation: str, *, deltas_ok: bool = False) -> None:
        """Raise UnsupportedAdapterError if the adapter holds types ``operation`` can't handle:
        any non-LoRA module, or with ``deltas_ok`` those that are no :attr:`deltas` entry."""
        foreign = self.uncomputed() if deltas_ok else self.foreign
        if foreign:
            kind, stems = next(iter(foreign.items()))
            if stems[0] in self.deltas:  # the suffix table says OFT for BOFT's oft_blocks too
                kind = self.deltas[stems[0]].type
            raise UnsupportedAdapterError(
                f"unsupported adapter type {kind} ({len(stems)} modules, e.g. {stems[0]!r}); "
                f"{operation} is defined for LoRA factors only",
                path=self.source,
                hint=self._foreign_hint(stems),
                kind="unsupported-type",
            )

    def _foreign_hint(self, stems: list[str]) -> str:
        if all(stem in self.deltas for stem in stems):
            needs = any(self.deltas[stem].needs_base for stem in stems)
            if needs:  # their update reads the base weight
                return "`loratool convert --to lora --base BASE` makes a plain LoRA of them"
            return "`loratool convert --to lora` makes a plain LoRA of them"
        if self.format == "peft":
            return "PEFT merges its own types (PeftModel.merge_and_unload)"
        return "LyCORIS types need LyCORIS' own tools"

    @property
    def alpha_unknown(self) -> str | None:
        """Why the file does not say its modules' alpha (see :attr:`LoraModule.alpha_unknown`),
        or None when every module's scale is known."""
        return next((m.alpha_unknown for m in self.modules.values() if m.alpha_unknown), None)

    def require_known_scale(self, operation: str) -> None:
        """Raise UnknownScaleError if ``operation`` would need a scale the file does not say."""
        for m in self.modules.values():
            if m.alpha_unknown is not None:
                raise unknown_scale_error(m, operation)

    def require_usable_scales(self) -> None:
        """Raise AdapterError unless every module has a rank and a finite, usable scale.

        The one gate between what a file says and what operations compute with: an alpha
        that is NaN, infinite, beyond float32 or no number (``"8"``, ``{}``, ``1e400``), a
        PEFT ``r`` that is no positive integer, a rank / alpha pattern that is no object, or
        a rank-0 module would make every result wrong or non-finite, so no operation starts
        on one. ``validate`` reads adapters without it
        and reports each such value as a finding.
        """
        config = self.config or {}
        r = config.get("r")
        if (
            self.format == "peft"
            and config.get("peft_type", "LORA") == "LORA"  # r means other things elsewhere
            and "r" in config
            and not (isinstance(r, int) and not isinstance(r, bool) and r > 0)
        ):
            raise AdapterError(
                f"r is {r!r}, expected a positive integer (PEFT cannot build the layers)",
                path=self.config_source or self.source,
                hint="set r to the adapter's rank; `loratool validate` lists every problem",
                kind="config-invalid",
            )
        for name in ("rank_pattern", "alpha_pattern"):
            value = config.get(name)
            if value is not None and not isinstance(value, dict):
                raise AdapterError(
                    f"{name} is a {type(value).__name__}, expected an object of module "
                    "pattern -> value (PEFT fails to load the config)",
                    path=self.config_source or self.source,
                    hint=f'write {name} as {{"module.name": value}}, or remove it',
                    kind="config-invalid",
                )
        for m in self.modules.values():
            if m.rank == 0:
                raise AdapterError(
                    f"module {m.key!r} has rank 0 (down {list(m.down.shape)}, up "
                    f"{list(m.up.shape)}): no update to compute with",
                    path=self.source,
                    hint="drop the module or use the checkpoint it was trained to",
                    kind="zero-rank",
                )
            if m.alpha_unknown is not None:
                continue  # no scale to check: operations that need one refuse it themselves
            scale = m.scale
            unusable = not math.isfinite(scale) or abs(m.effective_alpha) > LARGEST_F32
            if unusable or (scale != 0 and abs(scale) < _SMALLEST_SCALE):
                origin, where = self._alpha_origin(m)
                raise AdapterError(
                    f"module {m.key!r}: {origin}, so its scale alpha / "
                    f"{'sqrt(r)' if m.rslora else 'r'} is {scale!r}; expected a finite "
                    "number that float32 (the dtype consumers compute in) can hold",
                    path=where,
                    hint="set the alpha the adapter was trained with; `loratool validate` "
                    "lists every problem",
                    kind="alpha-not-finite",
                )

    def require_config_ranks(self) -> None:
        """Raise AdapterError unless each PEFT LoRA module's rank as the file's config gives it
        (``rank_pattern``'s first matching key, else ``r``) is its tensors': PEFT builds the
        layer at the config's rank and its load fails on the tensors ("size mismatch"), so no
        result could be PEFT's. Checked on adapters read from files (an adapter changed in
        memory gets its config rewritten when written)."""
        config = self.config or {}
        if self.format != "peft" or config.get("peft_type", "LORA") != "LORA":
            return
        if not isinstance(config.get("r"), int):
            return
        from lora_tools.naming import pattern_key

        patterns = config.get("rank_pattern")
        patterns = patterns if isinstance(patterns, dict) else {}
        for m in self.modules.values():
            if m.path is None:
                continue
            key = pattern_key(patterns, m.path, name="rank_pattern") if patterns else None
            expected = patterns[key] if key is not None else config["r"]
            if isinstance(expected, int) and not isinstance(expected, bool) and expected != m.rank:
                self._config_rank_error(m, key, expected)

    def _config_rank_error(self, m: LoraModule, key: str | None, expected: int) -> None:
        source = f"rank_pattern[{key!r}]" if key is not None else "r"
        raise AdapterError(
            f"module {m.key!r} has rank {m.rank} in its tensors, but adapter_config.json gives "
            f"it {source} = {expected}: PEFT builds the layer at {expected} and fails to load "
            "the tensors (size mismatch)",
            path=self.config_source or self.source,
            hint="set r / rank_pattern to the tensors' ranks; `loratool validate` lists every "
            "problem",
            kind="config-invalid",
        )

    def require_writable(self) -> None:
        """Raise AdapterError unless every module's update is finite where consumers compute it.

        What :meth:`require_usable_scales` checks, plus: factors without NaN / Inf, and
        ``max |scale * up @ down|`` within the factors' dtype (a finite scale can still make
        the update overflow: float32 holds at most 3.4e38). Every command that writes an
        adapter calls it before writing.
        """
        self.require_usable_scales()
        harm = "the written adapter would be non-finite"
        for m in self.modules.values():
            up, down = m.finite_factors(consequence=harm)
            dtype = m.up.dtype
            limit = LARGEST.get(dtype, LARGEST_F32)
            peak = max_abs_update(up, down, m.scale, limit)
            if peak >= limit:
                raise AdapterError(
                    f"module {m.key!r}: its update reaches {peak:.3g} (scale {m.scale:.3g}), "
                    f"beyond the largest {dtype} value {limit:.3g}; consumers would compute "
                    "inf",
                    path=self.source,
                    hint="use a smaller alpha, or scale the adapter down with `loratool rescale`",
                    kind="non-finite",
                )

    def _alpha_origin(self, m: LoraModule) -> tuple[str, Path | None]:
        """How messages name ``m``'s alpha (where it comes from, as stored), and its file."""
        if m.keys.get("alpha"):
            return f"its alpha tensor {m.keys['alpha']!r} holds {m.alpha!r}", self.source
        if self.config is not None and m.component is None:
            from lora_tools.naming import alpha_source

            name, raw = alpha_source(self.config, m.path or "")
            shown = (
                repr(raw)
                if isinstance(raw, (int, float))
                else f"{_short(raw)} (a {type(raw).__name__})"
            )
            return f"{name} is {shown}", self.config_source or self.source
        return f"its alpha is {m.alpha!r}", self.source

    def require_no_dora(self, operation: str) -> None:
        """Raise for DoRA modules where ``operation`` is not defined for them."""
        for m in self.modules.values():
            if m.dora:
                raise UnsupportedAdapterError(
                    f"module {m.key!r} is DoRA; {operation} of DoRA adapters is not defined "
                    "(the magnitude normalisation is not linear in the factors)",
                    path=self.source,
                    hint="merge the DoRA adapter into its base with `loratool merge` instead",
                    kind="unsupported-type",
                )
