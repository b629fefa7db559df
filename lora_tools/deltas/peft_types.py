"""PEFT's own math for its other adapter types (``peft_type`` in adapter_config.json): LoHa,
LoKr, IA3, OFT, BOFT, AdaLoRA and VeRA, as :data:`lora_tools.deltas.PEFT_TYPES` (a module with
``convention=PEFT`` reads its math here; formulas in docs/math.md, "PEFT's other types").

PEFT defines some types differently from LyCORIS: its LoHa / LoKr take ``r`` and ``alpha`` from
the config (``rank_pattern`` / ``alpha_pattern`` per module, scale ``alpha / r`` always), its IA3
multiplies the weight (``W * l``, rows or columns as ``feedforward_modules`` says), its OFT and
BOFT rotate the weight's input side (``W @ R^T``), and AdaLoRA / VeRA are its own. Each
module's config values are :attr:`DeltaModule.options`.

Exactness: :func:`~lora_tools.deltas.merged` in float32 follows PEFT's own torch operations in
their order when torch is installed (a float32 merge equals ``merge_and_unload`` bit for bit);
without torch the same operations run in numpy float32, whose matrix products may round the
last bit differently (measured in tests/deltas/test_peft_types.py). Float64 ``delta`` is numpy.

Orientation: as for every module, the base weight passed to ``delta`` / ``merged`` is in the
update's orientation, ``[out, in, *kernel]``; a GPT-2 Conv1D weight (PEFT's
``fan_in_fan_out``), stored ``[in, out]``, is passed transposed (resolve says so). A base whose
shape does not fit is a :class:`~lora_tools.deltas.DeltaError`, never reshaped.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import numpy as np

from lora_tools.deltas import (
    BOFT,
    IA3,
    LOHA,
    LOKR,
    OFT,
    PEFT,
    PEFT_TYPES,
    DeltaError,
    DeltaModule,
    TypeSpec,
    _agree,
    _LoHa,
    _LoKr,
    _need,
)
from lora_tools.io.safetensors import Tensor

ADALORA = "AdaLoRA"
VERA = "VeRA"
FOURIERFT = "FourierFT"

#: adapter_config.json ``peft_type`` -> loratool's type name, for the types computed here.
PEFT_TYPE_NAMES = {
    "LOHA": LOHA,
    "LOKR": LOKR,
    "IA3": IA3,
    "OFT": OFT,
    "BOFT": BOFT,
    "ADALORA": ADALORA,
    "VERA": VERA,
    "FOURIERFT": FOURIERFT,
}

#: Compute float32 updates with torch, in PEFT's operation order, when it is installed (tests
#: switch it off to measure the numpy fallback).
USE_TORCH = True


def _torch_installed() -> bool:
    """Whether torch can be imported, judged without importing it."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a broken or blocked installation
        return False


def _torch() -> Any:
    if not USE_TORCH:
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch


def _exact(dtype: np.dtype) -> Any:
    """torch when a float32 result should be PEFT's bits, else None (numpy)."""
    return _torch() if dtype == np.float32 else None


def _t(torch: Any, m: DeltaModule, role: str) -> Any:
    return torch.from_numpy(np.ascontiguousarray(m.array(role, np.float32)))


def _tensor(torch: Any, array: np.ndarray) -> Any:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _np(t: Any) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _fits(m: DeltaModule, base: np.ndarray, out: int | None, inp: int | None) -> None:
    """Raise unless ``base`` is ``[out, in, *kernel]`` (``None``: not fixed by the tensors)."""
    rows, cols = base.shape[0], math.prod(base.shape[1:])
    if (out is not None and rows != out) or (inp is not None and cols != inp):
        want = f"[{'?' if out is None else out}, {'?' if inp is None else inp}]"
        hint = ""
        if base.ndim == 2 and base.shape[1] in (out, None) and base.shape[0] in (inp, None):
            hint = " (a Conv1D / fan_in_fan_out weight is stored [in, out]: pass it transposed)"
        raise DeltaError(
            f"{m.type} module {m.key!r}: update {want} as [out, in * kernel] does not fit the "
            f"base weight {list(base.shape)}{hint}"
        )


def _blend(base: np.ndarray, full: np.ndarray, strength: float, dtype: np.dtype) -> np.ndarray:
    """``full`` at strength 1 (PEFT's weight exactly), else ``W + strength * (full - W)``."""
    if strength == 1.0:
        return full
    return base + dtype.type(strength) * (full - base)


# -- LoHa / LoKr: LyCORIS' products, PEFT's scale -------------------------------------------


def _config_rank(m: DeltaModule, rank: int | None) -> int | None:
    """The config's ``r`` for the module (rank_pattern applied); it must be the tensors'."""
    r = m.options.get("r")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int)):
        raise DeltaError(f"{m.type} module {m.key!r}: adapter_config.json gives r {r!r}")
    if r is not None and rank is not None and int(r) != rank:
        raise DeltaError(
            f"{m.type} module {m.key!r}: adapter_config.json gives r {r} (r / rank_pattern), "
            f"the tensors rank {rank}; PEFT fails to load it"
        )
    return rank if r is None else int(r)


def _config_alpha(m: DeltaModule, default: float, name: str = "alpha") -> float:
    """The config's alpha for the module (alpha_pattern applied), ``default`` without one."""
    alpha = m.alpha if m.alpha is not None else default
    if not math.isfinite(alpha):
        raise DeltaError(f"{m.type} module {m.key!r}: adapter_config.json's {name} is no number")
    return float(alpha)


class _PeftLoHa(_LoHa):
    """``dW = alpha / r * (w1a @ w1b) * (w2a @ w2b)`` (Tucker: ``einsum`` rebuilds of each half),
    ``r`` and ``alpha`` from the config, reshaped to the base weight (a conv without
    ``use_effective_conv2d`` keeps ``hada_w1_b`` as ``[r, in * k * k]``)."""

    def scale(self, m: DeltaModule) -> float:
        r = _config_rank(m, self.rank(m))
        alpha = _config_alpha(m, r or 0)
        return 0.0 if not r else alpha / r

    def halves(self, m: DeltaModule, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        torch = _exact(dtype)
        if torch is None:
            return super().halves(m, dtype)
        self.dims(m)
        t = {role: _t(torch, m, role) for role in m.tensors if role.startswith("hada_")}
        if "hada_t1" in t:  # HadaWeightCP.forward
            eq = "i j k l, j r, i p -> p r k l"
            h1 = torch.einsum(eq, t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
            h2 = torch.einsum(eq, t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
        else:  # HadaWeight.forward
            h1, h2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
        return _np(h1), _np(h2)

    def rows(self, m: DeltaModule, start: int, stop: int, dtype: np.dtype) -> np.ndarray:
        torch = _exact(dtype)
        if torch is None or "hada_t1" in m.tensors:
            h1, h2 = self.halves(m, dtype)
            flat = (h1 * h2 * dtype.type(self.scale(m))).reshape(h1.shape[0], -1)
            return flat[start:stop]
        self.dims(m)
        h = [
            _tensor(torch, m.array(f"hada_w{i}_a", np.float32)[start:stop])
            @ _t(torch, m, f"hada_w{i}_b")
            for i in (1, 2)
        ]
        return _np((h[0] * h[1]) * torch.tensor(self.scale(m)))


class _PeftLoKr(_LoKr):
    """``dW = alpha / r * kron(w1, w2)`` with PEFT's config ``r`` and ``alpha`` whether or not a
    factor is decomposed (LyCORIS: scale 1 with both factors whole). The Kronecker product and
    the scale are single roundings, the same in numpy; the factors' products follow PEFT's."""

    def scale(self, m: DeltaModule) -> float:
        r = _config_rank(m, None) or super().rank(m) or 1
        return _config_alpha(m, r) / r

    def factors(self, m: DeltaModule, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        torch = _exact(dtype)
        if torch is None:
            return super().factors(m, dtype)
        self.dims(m)
        t = {role: _t(torch, m, role) for role in m.tensors if role.startswith("lokr_")}
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:  # lokr.layer.make_weight_cp
            w2 = torch.einsum(
                "i j k l, i p, j r -> p r k l", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]
            )
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        w1, w2 = _np(w1), _np(w2)
        return w1.reshape(w1.shape[0], -1), w2.reshape(w2.shape[0], -1)


# -- IA3: W * l ------------------------------------------------------------------------------


class _PeftIA3(TypeSpec):
    """``W' = W * l``: ``ia3_l`` scales the weight's output rows, or with ``feedforward`` (the
    module is in the config's ``feedforward_modules``) its input columns; ``dW = W * (l - 1)``.

    PEFT also scales the base bias of a non-feedforward layer by ``l`` (:meth:`merged_bias`).
    """

    def _length(self, m: DeltaModule) -> int:
        _need(m, "ia3_l", ndim=1)
        shape = m.shape("ia3_l")
        if sum(d != 1 for d in shape) > 1:
            raise DeltaError(f"IA3 module {m.key!r}: ia3_l is {list(shape)}, expected a vector")
        return math.prod(shape)

    def dims(self, m: DeltaModule) -> tuple[int, int | None]:
        n = self._length(m)
        shape = m.shape("ia3_l")
        feedforward = bool(m.options.get("feedforward"))
        if len(shape) == 2 and n > 1 and (shape[0] == 1) != feedforward:
            side = "inputs (feed-forward)" if shape[0] == 1 else "outputs"
            raise DeltaError(
                f"IA3 module {m.key!r}: ia3_l {list(shape)} scales the {side}, but "
                f"feedforward_modules {'lists' if feedforward else 'does not list'} the module"
            )
        if not feedforward:
            return n, None
        # a conv's ia3_l [1, in, 1, 1] scales in channels: in * kernel is the base's
        return None, (n if len(m.shape("ia3_l")) <= 2 else None)  # type: ignore[return-value]

    def full_shape(self, m: DeltaModule) -> tuple[int, ...]:
        return self.dims(m)  # type: ignore[return-value]

    def _vector(self, m: DeltaModule, base: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """``l`` shaped to broadcast over ``base`` (a grouped conv repeats it per group, as
        PEFT's ``_get_ia3_scaling_for_weight``)."""
        n = self._length(m)
        values = m.array("ia3_l", dtype).reshape(-1)
        tail = [1] * (base.ndim - 2)
        if not m.options.get("feedforward"):
            _fits(m, base, n, None)
            return values.reshape(n, 1, *tail)
        cols = base.shape[1]
        if base.ndim == 2 or cols == n:
            _fits(m, base, None, n * math.prod(base.shape[2:]))
            return values.reshape(1, n, *tail)
        if n % cols or base.shape[0] % (n // cols):
            raise DeltaError(
                f"IA3 module {m.key!r}: ia3_l of {n} inputs fits no grouping of the base "
                f"weight {list(base.shape)}"
            )
        groups = n // cols
        out_per_group = base.shape[0] // groups
        grouped = np.broadcast_to(values.reshape(groups, 1, cols), (groups, out_per_group, cols))
        return grouped.reshape(base.shape[0], cols, *tail)

    def delta(self, m: DeltaModule, base: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
        assert base is not None
        weight = np.asarray(base, dtype=dtype)
        return weight * self._vector(m, weight, dtype) - weight

    def merged(
        self, m: DeltaModule, base: np.ndarray, strength: float, dtype: np.dtype
    ) -> np.ndarray:
        full = base * self._vector(m, base, dtype)  # IA3 Linear.merge: torch.mul(W, ia3_l)
        return _blend(base, full, strength, dtype)

    def scales_bias(self, m: DeltaModule) -> bool:
        return not m.options.get("feedforward")

    def merged_bias(
        self, m: DeltaModule, bias: np.ndarray, strength: float = 1.0, dtype: np.dtype = np.float32
    ) -> np.ndarray:
        """The base bias after the merge: ``b * l`` for a non-feedforward module (PEFT's
        merge), unchanged for a feedforward one."""
        dtype = np.dtype(dtype)
        bias = np.asarray(bias, dtype=dtype)
        if m.options.get("feedforward"):
            return bias
        full = bias * m.array("ia3_l", dtype).reshape(bias.shape)
        return _blend(bias, full, strength, dtype)


# -- OFT / BOFT: rotations of the input side --------------------------------------------------


def _block_size(m: DeltaModule, n: int) -> int:
    """``b`` with ``b (b - 1) / 2 = n`` (the strict upper triangle of a ``b x b`` block)."""
    b = (1 + math.isqrt(1 + 8 * n)) // 2
    if b * (b - 1) // 2 != n or b < 2:
        raise DeltaError(
            f"OFT module {m.key!r}: oft_R has {n} values per block, no b (b - 1) / 2 of a block"
        )
    return b


def _skew_np(vec: np.ndarray, b: int) -> np.ndarray:
    rows, cols = np.triu_indices(b, 1)
    out = np.zeros((vec.shape[0], b, b), dtype=vec.dtype)
    out[:, rows, cols] = vec
    return out - np.swapaxes(out, 1, 2)


def _solve_right_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``X`` with ``X @ a = b`` per batch (torch.linalg.solve(..., left=False))."""
    return np.swapaxes(np.linalg.solve(np.swapaxes(a, 1, 2), np.swapaxes(b, 1, 2)), 1, 2)


class _Rotates(TypeSpec):
    """A type whose merged weight is the base rotated (:meth:`_rotated`): ``dW = W' - W``."""

    def _rotated(self, m: DeltaModule, base: np.ndarray, dtype: np.dtype) -> np.ndarray:
        raise NotImplementedError

    def delta(self, m: DeltaModule, base: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
        assert base is not None
        weight = np.asarray(base, dtype=dtype)
        return self._rotated(m, weight, dtype) - weight

    def merged(
        self, m: DeltaModule, base: np.ndarray, strength: float, dtype: np.dtype
    ) -> np.ndarray:
        return _blend(base, self._rotated(m, base, dtype), strength, dtype)


class _PeftOFT(_Rotates):
    """``W' = W @ R^T`` on the flattened ``[out, in * k * k]`` weight, ``R`` block-diagonal:
    ``r`` blocks (one shared block repeated with ``block_share``), each the Cayley-Neumann series
    ``I + 2Q + 2Q^2 + ... + Q^(n-1)`` (or the Cayley transform ``(I - Q)(I + Q)^-1`` without
    ``use_cayley_neumann``) of the skew-symmetric ``Q`` whose upper triangle is a row of
    ``oft_R.weight``; ``coft`` first projects each ``Q`` into a ball of radius
    ``eps / sqrt(blocks)``. ``dW = W' - W``."""

    def _shape(self, m: DeltaModule) -> tuple[int, int]:
        _need(m, "oft_R")
        rows, n = m.shape("oft_R")
        if m.options.get("block_share") and rows != 1:
            raise DeltaError(
                f"OFT module {m.key!r}: block_share keeps one block, oft_R has {rows} rows"
            )
        return rows, _block_size(m, n)

    def dims(self, m: DeltaModule) -> tuple[int, int | None]:
        rows, b = self._shape(m)
        inp = None if m.options.get("block_share") else rows * b
        return None, inp  # type: ignore[return-value]

    def full_shape(self, m: DeltaModule) -> tuple[int, ...]:
        return self.dims(m)  # type: ignore[return-value]

    def _blocks_np(self, m: DeltaModule, dtype: np.dtype) -> np.ndarray:
        rows, b = self._shape(m)
        vec = m.array("oft_R", dtype)
        if m.options.get("coft"):
            q = _skew_np(vec, b)
            # PEFT's radius is float32 whatever the weights' dtype: eps * 1 / torch.sqrt(
            # torch.tensor(blocks)) is eps times the float32 reciprocal of a float32 root
            radius = (
                np.float32(1) / np.sqrt(np.float32(rows)) * np.float32(m.options.get("eps", 6e-5))
            )
            eps = dtype.type(radius)
            norm = np.sqrt(np.einsum("bij,bij->b", q, q)).reshape(-1, 1, 1)
            with np.errstate(invalid="ignore", divide="ignore"):
                q = np.where(norm <= eps, q, eps * (q / norm))
            upper = np.triu_indices(b, 1)
            vec = q[:, upper[0], upper[1]]
        q = _skew_np(vec, b)
        eye = np.broadcast_to(np.eye(b, dtype=dtype), q.shape)
        if not m.options.get("use_cayley_neumann", True):
            return _solve_right_np(eye + q, eye - q).astype(dtype, copy=False)
        terms = int(m.options.get("num_cayley_neumann_terms", 5))
        r = eye.copy()
        if terms > 1:
            r = r + 2 * q
            if terms > 2:
                power = q @ q
                r = r + 2 * power
                for _ in range(3, terms - 1):
                    power = power @ q
                    r = r + 2 * power
                power = power @ q
                r = r + power
        return r

    def _blocks_torch(self, torch: Any, m: DeltaModule) -> Any:
        """PEFT's OFTRotationModule.get_weight blocks, in its operations."""
        _rows, b = self._shape(m)
        weight = _t(torch, m, "oft_R")
        iu = torch.triu_indices(b, b, 1)

        def skew(vec: Any) -> Any:
            matrix = torch.zeros(vec.shape[0], b, b, dtype=vec.dtype)
            matrix[:, iu[0], iu[1]] = vec
            return matrix - matrix.transpose(-2, -1)

        if m.options.get("coft"):
            oft_r = skew(weight)
            eps = m.options.get("eps", 6e-5) * 1 / torch.sqrt(torch.tensor(oft_r.shape[0]))
            zero = torch.zeros((b, b), dtype=oft_r.dtype).unsqueeze(0).expand_as(oft_r)
            diff = oft_r - zero
            norm = torch.norm(oft_r - zero, dim=(1, 2), keepdim=True)
            out = torch.where(norm <= eps, oft_r, zero + eps * (diff / norm))
            weight = out[:, iu[0], iu[1]]
        q = skew(weight)
        if not m.options.get("use_cayley_neumann", True):
            eye = torch.eye(b).unsqueeze(0).expand(q.shape[0], b, b)
            return torch.linalg.solve(eye + q, eye - q, left=False).to(q.dtype)
        terms = int(m.options.get("num_cayley_neumann_terms", 5))
        r = torch.eye(b, dtype=q.dtype).repeat(q.shape[0], 1, 1)
        if terms > 1:
            r.add_(q, alpha=2.0)
            if terms > 2:
                power = torch.bmm(q, q)
                r.add_(power, alpha=2.0)
                for _ in range(3, terms - 1):
                    power = torch.bmm(power, q)
                    r.add_(power, alpha=2.0)
                power = torch.bmm(power, q)
                r.add_(power)
        return r

    def _count(self, m: DeltaModule, base: np.ndarray) -> int:
        rows, b = self._shape(m)
        cols = math.prod(base.shape[1:])
        count = cols // b if m.options.get("block_share") else rows
        _fits(m, base, None, count * b)
        return count

    def _rotated(self, m: DeltaModule, base: np.ndarray, dtype: np.dtype) -> np.ndarray:
        count = self._count(m, base)
        flat = base.reshape(base.shape[0], -1)
        torch = _exact(dtype)
        if torch is not None:
            blocks = self._blocks_torch(torch, m)
            parts = [blocks[0 if blocks.shape[0] == 1 else i] for i in range(count)]
            rotation = torch.block_diag(*parts)
            result = torch.mm(rotation, _tensor(torch, flat).t())
            return _np(result.t()).reshape(base.shape)
        blocks = self._blocks_np(m, dtype)
        b = blocks.shape[-1]
        rotation = np.zeros((count * b, count * b), dtype=dtype)
        for i in range(count):
            rotation[i * b : (i + 1) * b, i * b : (i + 1) * b] = blocks[
                0 if blocks.shape[0] == 1 else i
            ]
        return (rotation @ flat.T).T.reshape(base.shape).astype(dtype, copy=False)


def butterfly_perm(n: int, b: int, r: int, n_butterfly_factor: int) -> np.ndarray:
    """PEFT's ``BOFTLayer.block_butterfly_perm``: the index permutation of one butterfly
    factor (``n`` features in ``b`` blocks of base block size ``2 r``)."""
    if n_butterfly_factor == 0:
        return np.arange(n)
    if b * r * 2 > n:
        raise DeltaError(f"BOFT: {b} blocks of {2 * r} do not fit {n} features")
    block = n // b
    step = block // r
    order = np.concatenate([np.arange(0, step, 2), np.arange(1, step, 2)])
    sorted_order = np.concatenate([np.arange(p * r, p * r + r) for p in order])
    indices = np.arange(n)
    for i in range(0, n, block):
        indices[i : i + block] = indices[i : i + block][sorted_order]
    return indices


class _PeftBOFT(_Rotates):
    """``W' = (M @ W^T)^T * s`` on the flattened weight, ``s`` (``boft_s``) scaling output rows
    and ``M = B_(N-1) ... B_0`` the product of ``N`` butterfly factors ``B_i = P_i D_i P_i^T``:
    ``D_i`` block-diagonal with the Cayley transforms ``(I - S)(I + S)^-1`` of ``S = (R - R^T)
    / 2`` for the blocks ``R`` of ``boft_R[i]``, ``P_i`` PEFT's butterfly permutation (the
    identity for ``i = 0``). ``dW = W' - W``."""

    def _shape(self, m: DeltaModule) -> tuple[int, int, int]:
        _need(m, "boft_R", ndim=4)
        _need(m, "boft_s")
        factors, blocks, b, b2 = m.shape("boft_R")
        _agree(m, "sides of the boft_R blocks", b, b2)
        return factors, blocks, b

    def dims(self, m: DeltaModule) -> tuple[int, int]:
        _, blocks, b = self._shape(m)
        return math.prod(m.shape("boft_s")), blocks * b

    def _perms(self, m: DeltaModule) -> list[np.ndarray]:
        factors, blocks, b = self._shape(m)
        n = blocks * b
        return [butterfly_perm(n, blocks // 2**i, b // 2, factors - 1) for i in range(factors)]

    def _matrix_np(self, m: DeltaModule, dtype: np.dtype) -> np.ndarray:
        factors, blocks, b = self._shape(m)
        data = m.array("boft_R", dtype).reshape(-1, b, b)
        skew = dtype.type(0.5) * (data - np.swapaxes(data, 1, 2))
        eye = np.broadcast_to(np.eye(b, dtype=dtype), skew.shape)
        rot = _solve_right_np(eye + skew, eye - skew).astype(dtype, copy=False)
        rot = rot.reshape(factors, blocks, b, b)
        n = blocks * b
        out = None
        for i, perm in enumerate(self._perms(m)):
            diag = np.zeros((n, n), dtype=dtype)
            for j in range(blocks):
                diag[j * b : (j + 1) * b, j * b : (j + 1) * b] = rot[i, j]
            p = np.eye(n, dtype=dtype)[perm]
            factor = p @ (diag @ p.T)
            out = factor if out is None else factor @ out
        assert out is not None
        return out

    def _matrix_torch(self, torch: Any, m: DeltaModule) -> Any:
        """PEFT's BOFT ``get_delta_weight`` rotation, in its operations."""
        factors, blocks, b = self._shape(m)
        data = _t(torch, m, "boft_R").view(factors * blocks, b, b)
        skew = 0.5 * (data - data.transpose(1, 2))
        eye = torch.eye(b).unsqueeze(0).expand(factors * blocks, b, b)
        rot = torch.linalg.solve(eye + skew, eye - skew, left=False).to(data.dtype)
        rot = rot.view(factors, blocks, b, b)
        diag = torch.stack([torch.block_diag(*torch.unbind(rot[i])) for i in range(factors)])
        n = blocks * b
        p = torch.zeros((factors, n, n))
        for i, perm in enumerate(self._perms(m)):
            p[i, torch.arange(n), torch.from_numpy(perm)] = 1
        batch = torch.bmm(diag, p.permute(0, 2, 1))
        batch = torch.bmm(p, batch)
        out = batch[0]
        for i in range(1, batch.shape[0]):
            out = batch[i] @ out
        return out

    def _rotated(self, m: DeltaModule, base: np.ndarray, dtype: np.dtype) -> np.ndarray:
        out, inp = self.dims(m)
        _fits(m, base, out, inp)
        flat = base.reshape(out, -1)
        torch = _exact(dtype)
        if torch is not None:
            matrix = self._matrix_torch(torch, m)
            s = _t(torch, m, "boft_s").reshape(out, 1)
            weight = torch.mm(matrix, _tensor(torch, flat).transpose(0, 1)).transpose(0, 1)
            return _np(weight * s).reshape(base.shape)
        matrix = self._matrix_np(m, dtype)
        s = m.array("boft_s", dtype).reshape(out, 1)
        return ((matrix @ flat.T).T * s).reshape(base.shape)


# -- AdaLoRA, VeRA: PEFT's own additive types -------------------------------------------------


class _AdaLoRA(TypeSpec):
    """``dW = B @ (A * E) * alpha / (ranknum + 1e-5)``: ``lora_E`` ``[r, 1]`` the singular
    values AdaLoRA prunes, ``ranknum`` the config's ``init_r`` (the rank the layer was built
    with: pruning keeps it), ``alpha`` the config's ``lora_alpha`` (``r`` when not positive)."""

    def rank(self, m: DeltaModule) -> int:
        _need(m, "lora_A")
        return m.shape("lora_A")[0]

    def _ranknum(self, m: DeltaModule) -> float:
        init_r = m.options.get("init_r")
        if init_r is None:
            return float(self.rank(m))
        if isinstance(init_r, bool) or not isinstance(init_r, (int, float)):
            raise DeltaError(
                f"AdaLoRA module {m.key!r}: adapter_config.json gives init_r {init_r!r}"
            )
        return float(init_r)

    def _alpha(self, m: DeltaModule) -> float:
        alpha = _config_alpha(m, 0.0, "lora_alpha")
        return alpha if alpha > 0 else float(self.rank(m))

    def scale(self, m: DeltaModule) -> float:
        return self._alpha(m) / (self._ranknum(m) + 1e-5)

    def factors(self, m: DeltaModule, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """``(B [out, r], A * E [r, in])``: ``scale * B @ (A * E)`` is the update."""
        _, inp = self.dims(m)
        a = m.array("lora_A", dtype).reshape(-1, inp)
        return m.array("lora_B", dtype), a * m.array("lora_E", dtype).reshape(-1, 1)

    def dims(self, m: DeltaModule) -> tuple[int, int]:
        _need(m, "lora_A", "lora_B", "lora_E")
        r = self.rank(m)
        _agree(
            m, "ranks of lora_A, lora_B and lora_E", r, m.shape("lora_B")[1], m.shape("lora_E")[0]
        )
        return m.shape("lora_B")[0], math.prod(m.shape("lora_A")[1:])

    def delta(self, m: DeltaModule, base: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
        _out, inp = self.dims(m)
        torch = _exact(dtype)
        if torch is not None:
            a, b, e = (_t(torch, m, role) for role in ("lora_A", "lora_B", "lora_E"))
            ranknum = torch.tensor([self._ranknum(m)])
            result = b @ (a.reshape(a.shape[0], -1) * e) * self._alpha(m) / (ranknum + 1e-5)
            return _np(result)
        a = m.array("lora_A", dtype).reshape(-1, inp)
        b, e = m.array("lora_B", dtype), m.array("lora_E", dtype).reshape(-1, 1)
        ranknum = dtype.type(self._ranknum(m)) + dtype.type(1e-5)
        return (b @ (a * e)) * dtype.type(self._alpha(m)) / ranknum

    def rows(self, m: DeltaModule, start: int, stop: int, dtype: np.dtype) -> np.ndarray:
        torch = _exact(dtype)
        if torch is None:
            return self.delta(m, None, dtype)[start:stop]
        self.dims(m)
        a, e = _t(torch, m, "lora_A"), _t(torch, m, "lora_E")
        b = _tensor(torch, m.array("lora_B", np.float32)[start:stop])
        ranknum = torch.tensor([self._ranknum(m)])
        return _np(b @ (a.reshape(a.shape[0], -1) * e) * self._alpha(m) / (ranknum + 1e-5))


class _VeRA(TypeSpec):
    """``dW = (lambda_b * B[:out]) @ (lambda_d * A[:, :in])``: ``vera_A`` ``[r, max in]`` and
    ``vera_B`` ``[max out, r]`` are the frozen random matrices every module shares (saved once
    as ``base_model.vera_A`` / ``vera_B`` with ``save_projection``; options), ``lambda_b``
    ``[out]`` and ``lambda_d`` ``[r]`` the module's trained vectors. ``in`` is the base
    weight's: the update needs it."""

    def rank(self, m: DeltaModule) -> int:
        _need(m, "vera_lambda_d", ndim=1)
        return m.shape("vera_lambda_d")[0]

    def _shared(self, m: DeltaModule, name: str) -> Tensor:
        shared = m.options.get(name)
        if shared is None:
            raise DeltaError(
                f"VeRA module {m.key!r}: the file has no {name} (saved with save_projection "
                "false: the matrices come from projection_prng_key over the whole model)"
            )
        return shared

    def dims(self, m: DeltaModule) -> tuple[int, int | None]:
        _need(m, "vera_lambda_b", ndim=1)
        out, r = m.shape("vera_lambda_b")[0], self.rank(m)
        a, b = self._shared(m, "vera_A").shape, self._shared(m, "vera_B").shape
        if len(a) != 2 or len(b) != 2 or a[0] < r or b[1] < r or b[0] < out:
            raise DeltaError(
                f"VeRA module {m.key!r}: vera_A {list(a)} / vera_B {list(b)} do not hold rank "
                f"{r} and {out} outputs"
            )
        return out, None

    def full_shape(self, m: DeltaModule) -> tuple[int, ...]:
        return self.dims(m)  # type: ignore[return-value]

    def delta(self, m: DeltaModule, base: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
        assert base is not None
        out, _ = self.dims(m)
        inp = math.prod(base.shape[1:])
        a_all = np.asarray(self._shared(m, "vera_A").numpy())
        _fits(m, base, out, None)
        if inp > a_all.shape[1]:
            raise DeltaError(
                f"VeRA module {m.key!r}: the base weight has {inp} inputs, vera_A {a_all.shape[1]}"
            )
        b_all = np.asarray(self._shared(m, "vera_B").numpy())
        r = self.rank(m)
        torch = _exact(dtype)
        if torch is not None:
            a = _tensor(torch, a_all[:, :inp])
            b = _tensor(torch, b_all[:out, :])
            lb = _t(torch, m, "vera_lambda_b").unsqueeze(-1)
            ld = _t(torch, m, "vera_lambda_d").unsqueeze(-1)
            return _np((lb * b) @ (ld * a)).reshape(base.shape)
        a = np.asarray(a_all[:r, :inp], dtype=dtype)
        b = np.asarray(b_all[:out, :r], dtype=dtype)
        lb = m.array("vera_lambda_b", dtype).reshape(-1, 1)
        ld = m.array("vera_lambda_d", dtype).reshape(-1, 1)
        return ((lb * b) @ (ld * a)).reshape(base.shape)


class _FourierFT(TypeSpec):
    """``dW = Re(ifft2(F)) * scaling``: ``F`` ``[out, in]`` is zero but at ``n`` positions, the
    first ``n`` of ``torch.randperm(out * in)`` seeded with the config's ``random_loc_seed``,
    which hold ``fourierft_spectrum``. The positions are torch's random numbers: the update
    needs torch, and the base weight for ``out`` and ``in``. PEFT computes it in float32
    whatever the weights' dtype (its dense spectrum is float32)."""

    def dims(self, m: DeltaModule) -> tuple[int, int | None]:
        _need(m, "fourierft_spectrum", ndim=1)
        return None, None  # type: ignore[return-value]

    def full_shape(self, m: DeltaModule) -> tuple[int, ...]:
        return self.dims(m)  # type: ignore[return-value]

    def delta(self, m: DeltaModule, base: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
        assert base is not None
        torch = _torch()
        if torch is None:
            raise DeltaError(
                f"FourierFT module {m.key!r}: its spectrum's positions are torch.randperm's; "
                "install torch to compute it"
            )
        if base.ndim != 2:
            raise DeltaError(
                f"FourierFT module {m.key!r}: the base weight {list(base.shape)} is no linear layer's"
            )
        out, inp = base.shape
        spectrum = m.array("fourierft_spectrum", np.float32).reshape(-1)
        if spectrum.size > out * inp:
            raise DeltaError(
                f"FourierFT module {m.key!r}: {spectrum.size} coefficients for a {out} x {inp} weight"
            )
        seed = int(m.options.get("random_loc_seed", 777))
        order = torch.randperm(out * inp, generator=torch.Generator().manual_seed(seed))
        where = order[: spectrum.size]
        where = torch.stack([where // inp, where % inp], dim=0)
        scaling = m.options.get("scaling", 150.0)
        if dtype == np.float32:  # FourierFTLayer.get_delta_weight
            dense = torch.zeros(out, inp)
            dense[where[0, :], where[1, :]] = torch.from_numpy(spectrum)
            return _np(torch.fft.ifft2(dense).real * scaling)
        dense64 = np.zeros((out, inp), dtype=np.float64)
        dense64[where[0].numpy(), where[1].numpy()] = spectrum
        return (np.fft.ifft2(dense64).real * scaling).astype(dtype, copy=False)


_LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_SPECS: tuple[TypeSpec, ...] = (
    _PeftLoHa(LOHA, _LOHA_ROLES),
    _PeftLoKr(LOKR, _LOKR_ROLES),
    _PeftIA3(IA3, ("ia3_l",), needs_base=True),
    _PeftOFT(OFT, ("oft_R",), needs_base=True),
    _PeftBOFT(BOFT, ("boft_R", "boft_s"), needs_base=True),
    _AdaLoRA(ADALORA, ("lora_A", "lora_B", "lora_E")),
    _VeRA(VERA, ("vera_lambda_b", "vera_lambda_d"), needs_base=True),
    _FourierFT(
        FOURIERFT,
        ("fourierft_spectrum",),
        needs_base=True,
        computed=_torch_installed(),
    ),
)
PEFT_TYPES.update({spec.name: spec for spec in _SPECS})


# -- modules from a PEFT file and its config --------------------------------------------------


def _pattern_value(patterns: Any, path: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$",
    path)`` wins (dict order)."""
    from lora_tools.naming import pattern_key

    if not isinstance(patterns, dict) or not patterns:
        return default
    key = pattern_key(patterns, path, name="pattern")
    return default if key is None else patterns[key]


def _feedforward(config: dict[str, Any], path: str) -> bool:
    """IA3Model._check_target_module_feedforward: a string is a full regex match, a list
    matches by suffix."""
    from lora_tools.patterns import PatternError, fullmatch

    modules = config.get("feedforward_modules")
    if isinstance(modules, str):
        try:
            return fullmatch(modules, path)  # bounded time whatever the pattern
        except PatternError:
            return False  # the config rules report it
    return isinstance(modules, list) and any(path.endswith(str(k)) for k in modules)


def module_options(
    kind: str, config: dict[str, Any], path: str
) -> tuple[float | None, dict[str, Any]]:
    """``(alpha, options)`` of one module of PEFT type ``kind`` under its config."""
    options: dict[str, Any] = {"fan_in_fan_out": bool(config.get("fan_in_fan_out", False))}
    alpha: float | None = None
    if kind in (LOHA, LOKR):
        options["r"] = _pattern_value(config.get("rank_pattern"), path, config.get("r", 8))
        value = _pattern_value(config.get("alpha_pattern"), path, config.get("alpha", 8))
        alpha = float(value) if isinstance(value, (int, float)) else math.nan
        options["use_effective_conv2d"] = bool(config.get("use_effective_conv2d", False))
        if kind == LOKR:
            options["decompose_both"] = bool(config.get("decompose_both", False))
    elif kind == IA3:
        options["feedforward"] = _feedforward(config, path)
    elif kind == OFT:
        for name, default in (
            ("coft", False),
            ("eps", 6e-5),
            ("block_share", False),
            ("use_cayley_neumann", True),
            ("num_cayley_neumann_terms", 5),
        ):
            options[name] = config.get(name, default)
    elif kind == ADALORA:
        options["init_r"] = config.get("init_r", 12)
        value = config.get("lora_alpha", 8)
        alpha = float(value) if isinstance(value, (int, float)) else math.nan
    elif kind == FOURIERFT:
        options["scaling"] = config.get("scaling", 150.0)
        options["random_loc_seed"] = config.get("random_loc_seed", 777)
    elif kind == VERA:
        options["projection_prng_key"] = config.get("projection_prng_key", 0)
        options["save_projection"] = config.get("save_projection", True)
    return alpha, options


def _stem_of(key: str, stems: set[str]) -> str | None:
    head = key
    for _ in range(2):  # roles are one or two name parts (``ia3_l``, ``oft_R.weight``)
        head = head.rpartition(".")[0]
        if head in stems:
            return head
    return None


def peft_modules(
    tensors: dict[str, Tensor], stems: set[str], config: dict[str, Any] | None
) -> dict[str, DeltaModule | DeltaError]:
    """Every module of a PEFT file whose ``peft_type`` loratool computes, by stem: the module,
    or the :class:`~lora_tools.deltas.DeltaError` saying why its tensors make no update.

    Args:
        tensors: the file's tensors not read as LoRA modules, by key.
        stems: the module stems of the other types found among them.
        config: adapter_config.json; None or another ``peft_type``: no modules.
    """
    kind = PEFT_TYPE_NAMES.get(str((config or {}).get("peft_type", "")).upper())
    if kind is None or config is None:
        return {}
    from lora_tools.naming import split_stem

    parts: dict[str, dict[str, tuple[str, Tensor]]] = {}
    for key, tensor in tensors.items():
        stem = _stem_of(key, stems)
        if stem is not None:
            parts.setdefault(stem, {})[key[len(stem) + 1 :].removesuffix(".weight")] = (key, tensor)
    shared = {
        name: tensors.get(f"base_model.{name}") for name in ("vera_A", "vera_B") if kind == VERA
    }
    if None in shared.values():
        return {}  # save_projection false: PEFT draws the matrices over the whole base model
    out: dict[str, DeltaModule | DeltaError] = {}
    for stem, found in parts.items():
        component, path = split_stem(stem)
        alpha, options = module_options(kind, config, path)
        if kind == FOURIERFT and options["fan_in_fan_out"]:
            continue  # a Conv1D's: nothing in the file says which of its layers are
        options.update(shared)
        module = DeltaModule(
            key=stem,
            type=kind,
            tensors={role: t for role, (_, t) in found.items()},
            alpha=alpha,
            convention=PEFT,
            path=path,
            component=component,
            keys={role: key for role, (key, _) in found.items()},
            options=options,
        )
        try:
            module.update_dims  # noqa: B018 - the shape check
            module.scale  # noqa: B018 - the rank check
        except DeltaError as exc:
            out[stem] = exc
            continue
        out[stem] = module
    return out


def peft_deltas(
    tensors: dict[str, Tensor], stems: set[str], config: dict[str, Any] | None
) -> dict[str, DeltaModule]:
    """The modules of :func:`peft_modules` that make an update (validate reports the rest)."""
    found = peft_modules(tensors, stems, config)
    return {stem: m for stem, m in found.items() if isinstance(m, DeltaModule)}


__all__ = [
    "ADALORA",
    "FOURIERFT",
    "PEFT_TYPE_NAMES",
    "VERA",
    "butterfly_perm",
    "module_options",
    "peft_deltas",
    "peft_modules",
]
