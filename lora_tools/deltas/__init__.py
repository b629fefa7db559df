"""Adapter types other than plain LoRA: their tensors, their scale, and the update they make.

LyCORIS (through sd-scripts, SimpleTuner, OneTrainer) and PEFT write many module types besides
LoRA. A :class:`DeltaModule` is one module of such a type, read from any naming scheme: the type,
its tensors by role (the LyCORIS / PEFT tensor name without the module stem, e.g.
``hada_w1_a``), its alpha and where it goes. The math of each type lives in one place,
:data:`TYPES` (formulas in docs/math.md, "Other adapter types"); every operation asks the module
for its update instead of knowing the types.

Orientation is the base weight's (PyTorch): a linear update is ``[out, in]``, a convolution's
``[out, in, *kernel]``; :meth:`DeltaModule.delta` returns that shape, or the flattened ``[out,
in * prod(kernel)]`` where the type's tensors do not say the kernel (a non-Tucker LoHa keeps
``hada_w1_b`` as ``[r, in * k * k]``): the base weight's shape decides then.

Example:
    >>> import numpy as np
    >>> from lora_tools.io.safetensors import ArrayTensor
    >>> t = {k: ArrayTensor(np.ones(s, np.float32)) for k, s in
    ...      {"hada_w1_a": (4, 2), "hada_w1_b": (2, 3), "hada_w2_a": (4, 2),
    ...       "hada_w2_b": (2, 3)}.items()}
    >>> m = DeltaModule(key="m", type=LOHA, tensors=t, alpha=1.0)
    >>> m.rank, m.scale, m.update_dims
    (2, 0.5, (4, 3))
    >>> float(m.delta()[0, 0])
    2.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lora_tools.io.safetensors import Tensor

LOHA = "LoHa"
LOKR = "LoKr"
TUCKER_LOCON = "Tucker LoCon"
FULL = "full diff"
OFT = "OFT"
BOFT = "BOFT"
GLORA = "GLoRA"
IA3 = "IA3"
#: A LoRA module whose file carries a weight decomposition (LyCORIS / kohya ``dora_scale``):
#: loratool reads it as this type, not as PEFT's DoRA (the norms differ, docs/math.md).
DORA_LORA = "kohya DoRA"

#: Who wrote the module decides conventions the tensors do not show (LoKr's scale).
LYCORIS = "lycoris"
PEFT = "peft"


class DeltaError(ValueError):
    """A module's tensors do not make an update of its type (missing, or shapes disagree).

    Readers and validate turn it into a finding naming the file and the module.
    """


@dataclass(repr=False)
class DeltaModule:
    """One module of a non-LoRA adapter type.

    Attributes:
        key: the module's stem as spelled in the file.
        type: :data:`LOHA`, :data:`LOKR`, :data:`TUCKER_LOCON`, :data:`FULL`, :data:`OFT`,
            :data:`BOFT`, :data:`GLORA`, :data:`IA3` or :data:`DORA_LORA`.
        tensors: role -> tensor; roles are the type's tensor names (``hada_w1_a``,
            ``lokr_w2``, ``lora_mid``, ``diff``, ``oft_blocks``, ``dora_scale``...).
        alpha: the stored alpha, or None when the file has none (LyCORIS reads a missing or
            zero alpha as the rank).
        convention: :data:`LYCORIS` or :data:`PEFT`: who defines the scale.
        path / component: where the module goes, as for :class:`~lora_tools.adapter.LoraModule`.
        keys: role -> tensor key in the file.
        options: type settings the tensors do not show (PEFT config values, OFT constraint).
        bias_diff: a ``diff_b`` bias difference, added at the merge weight, or None.
    """

    key: str
    type: str
    tensors: dict[str, Tensor]
    alpha: float | None = None
    convention: str = LYCORIS
    path: str | None = None
    component: str | None = None
    keys: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    bias_diff: Tensor | None = None
    #: What :func:`~lora_tools.resolve.resolve` reads off every module (LoRA ones too).
    rows: tuple[int, int] | None = None
    bias: Tensor | None = None

    def __repr__(self) -> str:
        """Type, name, rank and update dims; never tensor values.

        Example:
            >>> import numpy as np
            >>> from lora_tools.io.safetensors import ArrayTensor
            >>> DeltaModule("m", FULL, {"diff": ArrayTensor(np.zeros((2, 3), np.float32))})
            DeltaModule('m', type='full diff', update=(2, 3))
        """
        rank = "" if self.rank is None else f", rank={self.rank}"
        return f"DeltaModule({self.key!r}, type={self.type!r}{rank}, update={self.update_dims})"

    # -- structure --------------------------------------------------------------------------
    def shape(self, role: str) -> tuple[int, ...]:
        return tuple(self.tensors[role].shape)

    @property
    def spec(self) -> TypeSpec:
        """The math of this module's type under its convention (PEFT defines some types'
        math differently from LyCORIS: :data:`PEFT_TYPES` overrides :data:`TYPES` there)."""
        if self.convention == PEFT and self.type in PEFT_TYPES:
            return PEFT_TYPES[self.type]
        return TYPES[self.type]

    @property
    def computed(self) -> bool:
        """loratool computes this module's update (False: detected, inspected, refused)."""
        peft = self.convention == PEFT and self.type in PEFT_TYPES
        return (peft or self.type in TYPES) and self.spec.computed

    @property
    def dora_scale(self) -> Tensor | None:
        return self.tensors.get("dora_scale")

    @property
    def kind(self) -> str:
        """``conv`` when the update has a kernel (or a LyCORIS conv factor), else ``linear``."""
        return "conv" if len(self.delta_shape) > 2 or self.spec.is_conv(self) else "linear"

    @property
    def rank(self) -> int | None:
        """The rank parameter of the type (LoHa / LoCon ``r``, LoKr the decomposed factor's),
        None where the type has none (full, OFT, IA3)."""
        return self.spec.rank(self)

    @property
    def scale(self) -> float:
        """The factor the type's product is multiplied by (alpha / r where the type has one)."""
        return self.spec.scale(self)

    @property
    def update_dims(self) -> tuple[int, int | None]:
        """``(out, in)`` of the update, ``in`` counting every input element (``in_channels *
        prod(kernel)``); None where the type does not fix it (OFT rotates outputs only)."""
        return self.spec.dims(self)

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """The update's shape as far as the tensors say it (see the module docstring)."""
        return self.spec.full_shape(self)

    @property
    def needs_base(self) -> bool:
        """The update depends on the base weight (OFT rotates it, IA3 scales it, GLoRA and a
        weight decomposition read it): computing it needs the base tensor."""
        return self.spec.needs_base or self.dora_scale is not None

    @property
    def parameters(self) -> int:
        """Trained numbers in the module (every tensor but alpha)."""
        return sum(math.prod(t.shape) for role, t in self.tensors.items() if role != "alpha")

    # -- values -----------------------------------------------------------------------------
    def array(self, role: str, dtype: np.dtype = np.float64) -> np.ndarray:
        return np.asarray(self.tensors[role].numpy(), dtype=dtype)

    def delta(self, base: np.ndarray | None = None, dtype: np.dtype = np.float64) -> np.ndarray:
        """The update ``dW`` at strength 1, without the weight decomposition, in ``dtype``.

        Args:
            base: the base weight (any float dtype, its own shape), needed when the type's
                update depends on it (:attr:`needs_base`); ignored otherwise.
            dtype: the dtype to compute in (float64 for references, float32 to merge).

        Returns:
            ``dW`` shaped as ``base`` when given, else as :attr:`delta_shape`.

        Raises:
            DeltaError: the tensors do not make an update, or ``base`` is missing or its shape
                does not fit.
        """
        if self.spec.needs_base and base is None:
            raise DeltaError(f"a {self.type} update depends on the base weight: pass base")
        out = self.spec.delta(self, base, np.dtype(dtype))
        if base is not None:
            if out.size != base.size or out.shape[0] != base.shape[0]:
                # rows must agree: a Conv1D weight stored [in, out] is passed transposed, never
                # reshaped into a wrong [out, in]
                raise DeltaError(
                    f"{self.type} update has {out.size} elements {tuple(out.shape)}, the base "
                    f"weight {base.size} {tuple(base.shape)}"
                )
            out = out.reshape(base.shape)
        return out

    @property
    def row_local(self) -> bool:
        """Rows of the update come from the tensors alone, a block at a time
        (:meth:`delta_rows`): the type does not read the base and has no weight decomposition."""
        return not self.needs_base

    def delta_rows(self, start: int, stop: int, dtype: np.dtype = np.float32) -> np.ndarray:
        """Rows ``start:stop`` of the flattened ``[out, in * k]`` update at strength 1, computed
        from the rows of the factors they need only (for merging a tensor in row blocks).

        Raises:
            DeltaError: the type's update depends on the base (:attr:`row_local` is False).
        """
        if not self.row_local:
            raise DeltaError(f"a {self.type} update depends on the base weight: use delta(base)")
        return self.spec.rows(self, start, stop, np.dtype(dtype))


@dataclass(frozen=True)
class TypeSpec:
    """The math of one type: which tensors it has and how they make an update.

    Attributes:
        name: the type's name.
        roles: every tensor role the type may hold (``alpha`` and ``dora_scale`` included).
        needs_base: the update depends on the base weight.
    """

    name: str
    roles: tuple[str, ...]
    needs_base: bool = False
    #: loratool computes the type's update; False for a type it detects and refuses.
    computed: bool = True

    def merged(
        self, m: DeltaModule, base: np.ndarray, strength: float, dtype: np.dtype
    ) -> np.ndarray:
        """The base weight (already in ``dtype``) with the module merged at ``strength``.

        The default is ``W + strength * dW`` (or the weight decomposition when the module has
        ``dora_scale``); a type whose reference merge computes the weight another way
        (PEFT's IA3 scales ``W``, OFT rotates it) overrides this to follow that order exactly.
        """
        delta = m.delta(base, dtype)
        if m.dora_scale is not None:
            return weight_decompose(m, base, delta, strength)
        return base + dtype.type(strength) * delta

    def scales_bias(self, m: DeltaModule) -> bool:
        """The module's merge changes the layer's bias too (an IA3 vector on the outputs
        scales the whole output, bias included): :meth:`merged_bias` says how."""
        return False

    def merged_bias(
        self, m: DeltaModule, bias: np.ndarray, strength: float, dtype: np.dtype
    ) -> np.ndarray:
        """The base bias (already in ``dtype``) after the merge; unchanged by default."""
        return bias

    def rank(self, m: DeltaModule) -> int | None:
        return None

    def scale(self, m: DeltaModule) -> float:
        return 1.0

    def dims(self, m: DeltaModule) -> tuple[int, int | None]:
        raise NotImplementedError

    def full_shape(self, m: DeltaModule) -> tuple[int, ...]:
        out, inp = self.dims(m)
        return (out,) if inp is None else (out, inp)

    def is_conv(self, m: DeltaModule) -> bool:
        return False

    def delta(self, m: DeltaModule, base: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
        raise NotImplementedError

    def rows(self, m: DeltaModule, start: int, stop: int, dtype: np.dtype) -> np.ndarray:
        """Rows of the flattened update; types override it to compute only those rows."""
        return self.delta(m, None, dtype).reshape(m.update_dims[0], -1)[start:stop]


def _need(m: DeltaModule, *roles: str, ndim: int = 2) -> None:
    for role in roles:
        if role not in m.tensors:
            raise DeltaError(f"{m.type} module {m.key!r} has no {role}")
        if len(m.tensors[role].shape) < ndim:
            raise DeltaError(
                f"{m.type} module {m.key!r}: {role} is {list(m.tensors[role].shape)}, "
                f"expected at least {ndim} dimensions"
            )


def _alpha_over(m: DeltaModule, rank: int) -> float:
    """LyCORIS' scale: alpha / rank, a missing or zero alpha read as the rank."""
    if rank <= 0:
        return 0.0
    alpha = m.alpha if m.alpha not in (None, 0) else rank
    return float(alpha) / (math.sqrt(rank) if m.options.get("rs_lora") else rank)


def _agree(m: DeltaModule, what: str, *values: int) -> int:
    if len(set(values)) != 1:
        raise DeltaError(
            f"{m.type} module {m.key!r}: {what} disagree ({', '.join(map(str, values))})"
        )
    return values[0]


def tucker(core: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sum_ij core[i, j, ...] a[i, p] b[j, q]`` -> ``[p, q, ...]`` (LyCORIS' Tucker rebuild:
    ``a`` ``[r, out]``, ``b`` ``[r, in]``, ``core`` ``[r, r, *kernel]``)."""
    return np.einsum("ij...,ip,jq->pq...", core, a, b)


class _LoHa(TypeSpec):
    """``dW = scale * (w1a @ w1b) * (w2a @ w2b)`` (Hadamard product); with Tucker cores each
    half is ``tucker(t, a, b)``."""

    def rank(self, m: DeltaModule) -> int:
        _need(m, "hada_w1_b", "hada_w2_b")
        return _agree(
            m, "ranks of hada_w1_b and hada_w2_b", m.shape("hada_w1_b")[0], m.shape("hada_w2_b")[0]
        )

    def scale(self, m: DeltaModule) -> float:
        return _alpha_over(m, self.rank(m))

    def dims(self, m: DeltaModule) -> tuple[int, int]:
        _need(m, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if "hada_t1" in m.tensors:
            _need(m, "hada_t1", "hada_t2")
            kernel = math.prod(m.shape("hada_t1")[2:])
            return m.shape("hada_w1_a")[1], m.shape("hada_w1_b")[1] * kernel
        out = _agree(
            m,
            "outputs of hada_w1_a and hada_w2_a",
            m.shape("hada_w1_a")[0],
            m.shape("hada_w2_a")[0],
        )
        inp = _agree(
            m, "inputs of hada_w1_b and hada_w2_b", m.shape("hada_w1_b")[1], m.shape("hada_w2_b")[1]
        )
        return out, inp

    def full_shape(self, m: DeltaModule) -> tuple[int, ...]:
        if "hada_t1" in m.tensors:
            return (m.shape("hada_w1_a")[1], m.shape("hada_w1_b")[1], *m.shape("hada_t1")[2:])
        return self.dims(m)

    def is_conv(self, m: DeltaModule) -> bool:
        return "hada_t1" in m.tensors

    def halves(self, m: DeltaModule, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """The two rebuilt matrices whose Hadamard product (times the scale) is the update."""
        self.dims(m)
        if "hada_t1" in m.tensors:
            return tuple(  # type: ignore[return-value]
                tucker(
                    m.array(f"hada_t{i}", dtype),
                    m.array(f"hada_w{i}_a", dtype),
                    m.array(f"hada_w{i}_b", dtype),
                )
                for i in (1, 2)
            )
        return tuple(  # type: ignore[return-value]
            m.array(f"hada_w{i}_a", dtype)
            @ m.array(f"hada_w{i}_b", dtype).reshape(self.rank(m), -1)
            for i in (1, 2)
        )

    def delta(self, m: DeltaModule, base: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
        h1, h2 = self.halves(m, dtype)
        out = h1 * h2 * dtype.type(self.scale(m))
        return out.astype(dtype, copy=False).reshape(self.full_shape(m))

    def rows(self, m: DeltaModule, start: int, stop: int, dtype: np.dtype) -> np.ndarray:
        self.dims(m)
        halves = []
        for i in (1, 2):
            a, b = m.array(f"hada_w{i}_a", dtype), m.array(f"hada_w{i}_b", dtype)
            if "hada_t1" in m.tensors:
                core = np.einsum("aj...,jq->aq...", m.array(f"hada_t{i}", dtype), b)
                halves.append(a[:, start:stop].T @ core.reshape(a.shape[0], -1))
            else:
                halves.append(a[start:stop] @ b.reshape(b.shape[0], -1))
        return halves[0] * halves[1] * dtype.type(self.scale(m))


class _LoKr(TypeSpec):
    """``dW = scale * kron(w1, w2)``; ``w1`` is ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``,
    ``w2`` is ``lokr_w2``, ``lokr_w2_a @ lokr_w2_b`` or ``tucker(lokr_t2, lokr_w2_a,
    lokr_w2_b)``; a conv's ``w2`` carries the kernel (``w1`` broadcasts over it).

    Scale: LyCORIS (and ComfyUI) apply ``alpha / r`` only when a factor is decomposed, ``r``
    the decomposed factor's rank; with both factors whole the scale is 1 whatever alpha says.
    PEFT's LoKr always scales by ``alpha / r`` (its config's): :data:`PEFT_TYPES` has its spec.
    """

    def _w1_dims(self, m: DeltaModule) -> tuple[int, int]:
        if "lokr_w1" in m.tensors:
            _need(m, "lokr_w1")
            return m.shape("lokr_w1")[0], math.prod(m.shape("lokr_w1")[1:])
        _need(m, "lokr_w1_a", "lokr_w1_b")
        _agree(
            m, "ranks of lokr_w1_a and lokr_w1_b", m.shape("lokr_w1_a")[1], m.shape("lokr_w1_b")[0]
        )
        return m.shape("lokr_w1_a")[0], m.shape("lokr_w1_b")[1]

    def _w2_shape(self, m: DeltaModule) -> tuple[int, ...]:
        if "lokr_w2" in m.tensors:
            _need(m, "lokr_w2")
            return m.shape("lokr_w2")
        if "lokr_t2" in m.tensors:
            _need(m, "lokr_t2", "lokr_w2_a", "lokr_w2_b")
            return (m.shape("lokr_w2_a")[1], m.shape("lokr_w2_b")[1], *m.shape("lokr_t2")[2:])
        _need(m, "lokr_w2_a", "lokr_w2_b")
        _agree(
            m, "ranks of lokr_w2_a and lokr_w2_b", m.shape("lokr_w2_a")[1], m.shape("lokr_w2_b")[0]
        )
        return m.shape("lokr_w2_a")[0], m.shape("lokr_w2_b")[1]

    def rank(self, m: DeltaModule) -> int | None:
        if "lokr_w1_b" in m.tensors:
            return m.shape("lokr_w1_b")[0]
        if "lokr_w2_b" in m.tensors:
            return m.shape("lokr_w2_b")[0]
        return None

    def scale(self, m: DeltaModule) -> float:
        rank = self.rank(m)
        return 1.0 if rank is None else _alpha_over(m, rank)

    def dims(self, m: DeltaModule) -> tuple[int, int]:
        a, c = self._w1_dims(m)
        w2 = self._w2_shape(m)
        return a * w2[0], c * math.prod(w2[1:])

    def full_shape(self, m: DeltaModule) -> tuple[int, ...]:
        a, c = self._w1_dims(m)
        w2 = self._w2_shape(m)
        if len(w2) > 2:
            return (a * w2[0], c * w2[1], *w2[2:])
        return self.dims(m)

    def is_conv(self, m: DeltaModule) -> bool:
        return len(self._w2_shape(m)) > 2

    def factors(self, m: DeltaModule, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """``(w1, w2)`` as 2-D matrices (``w2`` flattened over the kernel): the update is
        ``scale * kron(w1, w2)`` in the flattened ``[out, in * k]`` layout."""
        self.dims(m)
        if "lokr_w1" in m.tensors:
            w1 = m.array("lokr_w1", dtype).reshape(m.shape("lokr_w1")[0], -1)
        else:
            w1 = m.array("lokr_w1_a", dtype) @ m.array("lokr_w1_b", dtype)
        if "lokr_w2" in m.tensors:
            w2 = m.array("lokr_w2", dtype)
        elif "lokr_t2" in m.tensors:
            w2 = tucker(
                m.array("lokr_t2", dtype), m.array("lokr_w2_a", dtype), m.array("lokr_w2_b", dtype)
            )
        else:
            w2 = m.array("lokr_w2_a", dtype) @ m.array("lokr_w2_b", dtype)
        return w1, w2.reshape(w2.shape[0], -1)

    def delta(self, m: DeltaModule, base: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
        w1, w2 = self.factors(m, dtype)
        out = np.kron(w1, w2) * dtype.type(self.scale(m))
        return out.astype(dtype, copy=False).reshape(self.full_shape(m))

    def rows(self, m: DeltaModule, start: int, stop: int, dtype: np.dtype) -> np.ndarray:
        w1, w2 = self.factors(m, dtype)
        index = np.arange(start, stop)
        i, j = np.divmod(index, w2.shape[0])  # row i * b + j of kron(w1, w2)
        block = w1[i][:, :, None] * w2[j][:, None, :]
        return block.reshape(len(index), -1) * dtype.type(self.scale(m))


class _TuckerLoCon(TypeSpec):
    """``dW[o, i, ...] = scale * sum_ab up[o, a] mid[a, b, ...] down[b, i]`` (LyCORIS'
    ``tucker_weight_from_conv``): a rank-``r`` LoRA once the core is contracted into ``down``."""

    def rank(self, m: DeltaModule) -> int:
        _need(m, "lora_down")
        return m.shape("lora_down")[0]

    def scale(self, m: DeltaModule) -> float:
        return _alpha_over(m, self.rank(m))

    def full_shape(self, m: DeltaModule) -> tuple[int, ...]:
        _need(m, "lora_up", "lora_down", "lora_mid")
        r = self.rank(m)
        _agree(
            m,
            "ranks of lora_up, lora_mid and lora_down",
            m.shape("lora_up")[1],
            r,
            m.shape("lora_mid")[0],
            m.shape("lora_mid")[1],
        )
        return (m.shape("lora_up")[0], m.shape("lora_down")[1], *m.shape("lora_mid")[2:])

    def dims(self, m: DeltaModule) -> tuple[int, int]:
        shape = self.full_shape(m)
        return shape[0], math.prod(shape[1:])

    def is_conv(self, m: DeltaModule) -> bool:
        return True

    def factors(self, m: DeltaModule, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """``(up [out, r], down [r, in * k])``: the core contracted into ``down``, so that
        ``scale * up @ down`` is the flattened update."""
        self.full_shape(m)
        r = self.rank(m)
        up = m.array("lora_up", dtype).reshape(-1, r)
        down = m.array("lora_down", dtype).reshape(r, -1)
        core = m.array("lora_mid", dtype)
        contracted = np.einsum("ab...,bi->ai...", core, down)  # [r, in, *k]
        return up, contracted.reshape(r, -1)

    def delta(self, m: DeltaModule, base: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
        up, down = self.factors(m, dtype)
        out = (up @ down) * dtype.type(self.scale(m))
        return out.astype(dtype, copy=False).reshape(self.full_shape(m))

    def rows(self, m: DeltaModule, start: int, stop: int, dtype: np.dtype) -> np.ndarray:
        up, down = self.factors(m, dtype)
        return (up[start:stop] @ down) * dtype.type(self.scale(m))


class _Full(TypeSpec):
    """``dW = diff`` (LyCORIS full / ComfyUI ``diff``), no alpha."""

    def dims(self, m: DeltaModule) -> tuple[int, int]:
        _need(m, "diff", ndim=1)
        shape = m.shape("diff")
        return shape[0], math.prod(shape[1:])

    def full_shape(self, m: DeltaModule) -> tuple[int, ...]:
        _need(m, "diff", ndim=1)
        return m.shape("diff")

    def is_conv(self, m: DeltaModule) -> bool:
        return len(m.shape("diff")) > 2

    def delta(self, m: DeltaModule, base: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
        return m.array("diff", dtype)

    def rows(self, m: DeltaModule, start: int, stop: int, dtype: np.dtype) -> np.ndarray:
        diff = m.tensors["diff"].numpy()
        return np.asarray(diff.reshape(diff.shape[0], -1)[start:stop], dtype=dtype)


class _DoraLoRA(TypeSpec):
    """A LoRA (``lora_up @ lora_down * alpha / r``) whose merge renormalises the weight with
    ``dora_scale`` (:func:`weight_decompose`)."""

    def rank(self, m: DeltaModule) -> int:
        _need(m, "lora_down")
        return m.shape("lora_down")[0]

    def scale(self, m: DeltaModule) -> float:
        return _alpha_over(m, self.rank(m))

    def full_shape(self, m: DeltaModule) -> tuple[int, ...]:
        _need(m, "lora_up", "lora_down")
        _agree(m, "ranks of lora_up and lora_down", m.shape("lora_up")[1], self.rank(m))
        return (m.shape("lora_up")[0], *m.shape("lora_down")[1:])

    def dims(self, m: DeltaModule) -> tuple[int, int]:
        shape = self.full_shape(m)
        return shape[0], math.prod(shape[1:])

    def is_conv(self, m: DeltaModule) -> bool:
        return len(m.shape("lora_down")) > 2

    def factors(self, m: DeltaModule, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        r = self.rank(m)
        return m.array("lora_up", dtype).reshape(-1, r), m.array("lora_down", dtype).reshape(r, -1)

    def delta(self, m: DeltaModule, base: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
        up, down = self.factors(m, dtype)
        out = (up @ down) * dtype.type(self.scale(m))
        return out.astype(dtype, copy=False).reshape(self.full_shape(m))

    def rows(self, m: DeltaModule, start: int, stop: int, dtype: np.dtype) -> np.ndarray:
        up, down = self.factors(m, dtype)
        return (up[start:stop] @ down) * dtype.type(self.scale(m))


class _NotYet(TypeSpec):
    """A type whose update loratool does not compute yet: detected, inspected, refused."""

    def __init__(self, name: str, roles: tuple[str, ...], needs_base: bool = False) -> None:
        super().__init__(name, roles, needs_base, computed=False)

    def dims(self, m: DeltaModule) -> tuple[int, int | None]:
        raise DeltaError(f"the shape of a {m.type} update is not known to loratool")

    def delta(self, m: DeltaModule, base: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
        raise DeltaError(f"loratool does not compute {m.type} updates")


_COMMON = ("alpha", "dora_scale")
#: The math of every type loratool computes, by type name.
TYPES: dict[str, TypeSpec] = {
    spec.name: spec
    for spec in (
        _LoHa(
            LOHA,
            ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", *_COMMON),
        ),
        _LoKr(
            LOKR,
            (
                "lokr_w1",
                "lokr_w1_a",
                "lokr_w1_b",
                "lokr_w2",
                "lokr_w2_a",
                "lokr_w2_b",
                "lokr_t2",
                *_COMMON,
            ),
        ),
        _TuckerLoCon(TUCKER_LOCON, ("lora_up", "lora_down", "lora_mid", *_COMMON)),
        _Full(FULL, ("diff", *_COMMON)),
        _DoraLoRA(DORA_LORA, ("lora_up", "lora_down", *_COMMON)),
    )
}

# OFT, BOFT, GLoRA and IA3 (they need the base weight): their math in their own module, which
# imports the names above
from lora_tools.deltas.lycoris_types import SPECS as _LYCORIS_SPECS  # noqa: E402

TYPES.update({spec.name: spec for spec in _LYCORIS_SPECS})


#: PEFT's math for types it defines differently from LyCORIS, by type name; filled by
#: :mod:`lora_tools.deltas.peft_types` (PEFT's LoHa, LoKr, IA3, OFT, BOFT, VeRA, AdaLoRA...).
PEFT_TYPES: dict[str, TypeSpec] = {}


def weight_decompose(
    m: DeltaModule, base: np.ndarray, delta: np.ndarray, strength: float = 1.0
) -> np.ndarray:
    """The weight after a module with ``dora_scale`` (LyCORIS' weight decomposition).

    ``W1 = W + dW``; ``n`` = the norm of each output row (``dora_scale`` ``[out, 1, ...]``,
    LyCORIS ``wd_on_output``) or input column (``[1, in, ...]``) of ``W1``, plus float eps;
    ``W' = W1 * dora_scale / n``, then blended with the base at ``strength``: ``W + strength *
    (W' - W)``. All in ``base``'s float dtype; ``base`` and ``delta`` have the base weight's
    shape. The norm is LyCORIS' (lycoris/functional/general.py), which trained the magnitude;
    ComfyUI (comfy/weight_adapter/base.py ``weight_decompose``) takes the output side's norm of
    ``W`` instead, and its strength blend is the one here (docs/math.md, "Other adapter types").
    """
    scale = m.array("dora_scale", base.dtype)
    weight = base + delta
    flat = weight.reshape(weight.shape[0], -1)
    if scale.shape[0] == weight.shape[0]:
        norm = np.sqrt(np.einsum("ij,ij->i", flat, flat)).reshape(-1, *[1] * (weight.ndim - 1))
    else:
        cols = np.swapaxes(weight, 0, 1).reshape(weight.shape[1], -1)
        norm = np.sqrt(np.einsum("ij,ij->i", cols, cols))
        norm = norm.reshape(1, -1, *[1] * (weight.ndim - 2))
    norm = norm + np.finfo(base.dtype).eps
    out = weight * (scale.reshape(norm.shape) / norm).astype(base.dtype)
    if strength != 1.0:
        out = base + base.dtype.type(strength) * (out - base)
    return out


def merged(
    m: DeltaModule, base: np.ndarray, strength: float = 1.0, dtype: np.dtype = np.float32
) -> np.ndarray:
    """The base weight with the module merged at ``strength``, in ``dtype`` (not rounded to the
    base's dtype): ``W + strength * dW``, or the weight decomposition of ``W + dW``."""
    dtype = np.dtype(dtype)
    weight = np.asarray(base, dtype=dtype)
    return m.spec.merged(m, weight, strength, dtype)


#: Tensor name (after the module stem, ``.weight`` dropped) -> the type it marks. A module's
#: type is the first of these its tensors hold; the rest of its tensors are roles of that type.
MARKERS: tuple[tuple[str, str], ...] = (
    ("hada_w1_a", LOHA),
    ("hada_w1_b", LOHA),
    ("lokr_w1", LOKR),
    ("lokr_w1_a", LOKR),
    ("lokr_w2", LOKR),
    ("lokr_w2_a", LOKR),
    ("lora_mid", TUCKER_LOCON),
    ("a1", GLORA),
    ("b1", GLORA),
    ("on_input", IA3),
    ("diff", FULL),
    ("dora_scale", DORA_LORA),
)


def role_of(suffix: str) -> str:
    """The role a tensor name after the stem names: ``lora_mid.weight`` -> ``lora_mid``."""
    return suffix.removesuffix(".weight")


def module_type(roles: set[str] | dict[str, Any]) -> str | None:
    """The type a module's tensor roles make, or None for none loratool computes (plain LoRA
    included: ``lora_up`` / ``lora_down`` alone).

    Example:
        >>> module_type({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"})
        'LoHa'
        >>> module_type({"oft_blocks", "alpha"}), module_type({"lora_up", "lora_down"})
        ('OFT', None)
    """
    if "oft_blocks" in roles or "oft_diag" in roles:
        return OFT  # BOFT's blocks are 4-D: :func:`build` tells them apart by shape
    for marker, kind in MARKERS:
        if marker in roles:
            if kind == DORA_LORA and not {"lora_up", "lora_down"} <= set(roles):
                return None
            return kind
    return None


def build(
    stem: str,
    parts: dict[str, tuple[str, Tensor]],
    *,
    convention: str = LYCORIS,
    path: str | None = None,
    component: str | None = None,
    options: dict[str, Any] | None = None,
) -> DeltaModule | None:
    """A :class:`DeltaModule` from one module's tensors (role -> ``(key, tensor)``), or None
    when they make no type loratool computes.

    ``alpha`` is read from its tensor (a missing or zero alpha is None: the type's rank);
    ``diff_b`` becomes :attr:`DeltaModule.bias_diff`.
    """
    kind = module_type(parts)
    if kind is None:
        return None
    if kind == OFT and "oft_blocks" in parts and len(parts["oft_blocks"][1].shape) == 4:
        kind = BOFT
    tensors = {role: t for role, (_, t) in parts.items() if role not in ("alpha", "diff_b")}
    options = dict(options or {})
    if kind == IA3 and "on_input" in parts:  # which side it scales, for inspect
        options.setdefault("on_input", int(np.asarray(parts["on_input"][1].numpy()).reshape(-1)[0]))
    alpha = None
    if "alpha" in parts:
        values = np.asarray(parts["alpha"][1].numpy(), dtype=np.float64).reshape(-1)
        alpha = float(values[0]) if values.size and values[0] != 0 else None
    return DeltaModule(
        key=stem,
        type=kind,
        tensors=tensors,
        alpha=alpha,
        convention=convention,
        path=path,
        component=component,
        keys={role: key for role, (key, _) in parts.items()},
        options=options,
        bias_diff=parts["diff_b"][1] if "diff_b" in parts else None,
    )


__all__ = [
    "BOFT",
    "DORA_LORA",
    "FULL",
    "GLORA",
    "IA3",
    "LOHA",
    "LOKR",
    "LYCORIS",
    "MARKERS",
    "OFT",
    "PEFT",
    "PEFT_TYPES",
    "TUCKER_LOCON",
    "TYPES",
    "DeltaError",
    "DeltaModule",
    "TypeSpec",
    "build",
    "merged",
    "module_type",
    "role_of",
    "tucker",
    "weight_decompose",
]

from lora_tools.deltas import peft_types as _peft_types  # noqa: E402, F401 - fills PEFT_TYPES
