"""The math of LyCORIS' base-dependent types: diagonal OFT, BOFT, GLoRA and (IA)^3.

Each rotates, scales or multiplies the base weight, so its update needs the base: ``delta(base)``
is ``W' - W`` and ``merged`` computes ``W'`` the way the reference does (LyCORIS' modules,
lycoris/modules/{diag_oft,boft,glora,ia3}.py, which ComfyUI follows in
comfy/weight_adapter/{oft,boft,glora}.py). Formulas in docs/math.md, "Other adapter types".

- OFT: ``oft_blocks [n, b, b]``; ``Q = B - B^T`` per block, ``R = (I + Q)(I - Q)^-1`` (Cayley);
  ``W'`` block ``k`` of ``b`` output rows is ``R_k^T W_k``, times ``rescale [out, 1, ...]`` when
  the file has one. Old files store ``R`` itself as ``oft_diag``.
- BOFT: ``oft_blocks [m, n, b, b]``: ``m`` butterfly stages, each a block-diagonal rotation of
  the output rows after a stride permutation; ``rescale`` as OFT's.
- Constraint (OFT and BOFT): the stored ``alpha`` is LyCORIS' ``constraint``; when it is above 0,
  ``Q`` (all blocks together) is scaled down to Frobenius norm ``alpha * out`` if it is larger.
- GLoRA: ``dW = alpha / r * (W a1 a2 + b1 b2)``, ``W a1`` contracting the weight's input
  channels (``a1 [in, r]``, ``a2 [r, in]``, ``b1 [out, r]``, ``b2 [r, in, *k]``); the old
  LyCORIS layout (``a1 [r, in]``, ``a2 [in, r]``, ``b1 [r, in]``, ``b2 [out, r]``) is
  ``alpha / r * (b2 b1 + W a2 a1)``.
- IA3: ``W' = W * (1 + w)``, the vector ``w`` along the inputs (``on_input`` 1) or outputs (0).

Strength ``s`` blends the merged weight with the base, ``W + s (W' - W)``: what LyCORIS computes
for OFT without rescale, GLoRA and IA3 (ComfyUI multiplies OFT's and BOFT's change by ``s``
twice, LyCORIS interpolates each BOFT stage; all agree at ``s = 1``).

Example:
    >>> import numpy as np
    >>> from lora_tools.deltas import OFT, DeltaModule, merged
    >>> from lora_tools.io.safetensors import ArrayTensor
    >>> blocks = np.zeros((2, 2, 2)); blocks[0, 0, 1] = 1.0  # a quarter turn in block 0
    >>> m = DeltaModule("m", OFT, {"oft_blocks": ArrayTensor(blocks)})
    >>> merged(m, np.eye(4), dtype=np.float64)[:2].tolist()
    [[0.0, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
"""

from __future__ import annotations

import math

import numpy as np

from lora_tools.deltas import (
    BOFT,
    GLORA,
    IA3,
    OFT,
    DeltaError,
    DeltaModule,
    TypeSpec,
    _agree,
    _alpha_over,
    _need,
    tucker,
)

#: LyCORIS' (and ComfyUI's) guard on the norm of ``Q`` before comparing it with the constraint.
_NORM_EPS = 1e-8


def cayley(blocks: np.ndarray, constraint: float) -> np.ndarray:
    """``R = (I + Q)(I - Q)^-1`` for each ``b x b`` block, ``Q = B - B^T``; with a constraint
    above 0, ``Q`` is first scaled to Frobenius norm ``constraint`` (all blocks together) when
    its norm (plus 1e-8) is larger. Computed in ``blocks``' dtype."""
    q = blocks - np.swapaxes(blocks, -1, -2)
    if constraint > 0:
        norm = float(np.linalg.norm(q.reshape(-1))) + _NORM_EPS
        if norm > constraint:
            q = q * q.dtype.type(constraint / norm)
    eye = np.eye(blocks.shape[-1], dtype=blocks.dtype)
    return (eye + q) @ np.linalg.inv(eye - q)


def _base_rows(m: DeltaModule, base: np.ndarray | None, out: int) -> np.ndarray:
    if base is None:
        raise DeltaError(f"a {m.type} update depends on the base weight: pass base")
    if base.ndim < 2 or base.shape[0] != out:
        raise DeltaError(
            f"{m.type} module {m.key!r} acts on {out} output rows, the base weight is "
            f"{list(base.shape)}"
        )
    return base


def _blend(base: np.ndarray, weight: np.ndarray, strength: float, dtype: np.dtype) -> np.ndarray:
    """``W + s (W' - W)``: the merged weight at strength ``s`` (``W'`` itself at 1)."""
    if strength == 1.0:
        return weight
    return base + dtype.type(strength) * (weight - base)


class _Rotation(TypeSpec):
    """What OFT and BOFT share: blocks, the constraint, the rescale, merged = rotated base."""

    def scale(self, m: DeltaModule) -> float:
        return 1.0  # alpha is the constraint, not a scale

    def blocks(self, m: DeltaModule) -> tuple[int, ...]:
        raise NotImplementedError

    def dims(self, m: DeltaModule) -> tuple[int, None]:
        *_, n, b, _ = self.blocks(m)
        out = n * b
        if "rescale" in m.tensors and math.prod(m.shape("rescale")) != out:
            raise DeltaError(
                f"{m.type} module {m.key!r}: rescale is {list(m.shape('rescale'))}, expected "
                f"[{out}, 1, ...]"
            )
        return out, None

    def constraint(self, m: DeltaModule) -> float:
        """LyCORIS' bound on ``||Q||``: the stored alpha times the output rows (its modules
        store ``constraint`` as alpha and multiply it by ``out`` when they build;
        ComfyUI compares ``||Q||`` with alpha itself)."""
        return 0.0 if not m.alpha or m.alpha < 0 else float(m.alpha) * self.dims(m)[0]

    def rotation(self, m: DeltaModule, dtype: np.dtype) -> np.ndarray:
        """The blocks' rotations ``R``, in ``dtype``."""
        return cayley(m.array("oft_blocks", dtype), self.constraint(m))

    def rotate(self, m: DeltaModule, rotation: np.ndarray, base: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def rotated(self, m: DeltaModule, base: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """``W'`` at strength 1, in ``dtype``, shaped as ``base``."""
        out, _ = self.dims(m)
        base = np.asarray(_base_rows(m, base, out), dtype=dtype)
        weight = self.rotate(m, self.rotation(m, dtype), base)
        if "rescale" in m.tensors:
            weight = weight * m.array("rescale", dtype).reshape(out, *[1] * (base.ndim - 1))
        return weight

    def delta(self, m: DeltaModule, base: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
        out, _ = self.dims(m)
        base = np.asarray(_base_rows(m, base, out), dtype=dtype)
        return self.rotated(m, base, dtype) - base

    def merged(
        self, m: DeltaModule, base: np.ndarray, strength: float, dtype: np.dtype
    ) -> np.ndarray:
        if m.dora_scale is not None:
            return super().merged(m, base, strength, dtype)
        return _blend(base, self.rotated(m, base, dtype), strength, dtype)


class _OFT(_Rotation):
    """LyCORIS diag-OFT: ``W'_k = R_k^T W_k`` on each block of ``b`` output rows
    (lycoris/functional/diag_oft.py, einsum ``k n m, k n ... -> k m ...``). Old LyCORIS files
    store the rotations themselves as ``oft_diag`` (no Cayley, no constraint: AUTOMATIC1111's
    extensions-builtin/Lora/network_oft.py, whose ``is_R`` path reads them so)."""

    def _role(self, m: DeltaModule) -> str:
        return (
            "oft_diag"
            if "oft_diag" in m.tensors and "oft_blocks" not in m.tensors
            else ("oft_blocks")
        )

    def blocks(self, m: DeltaModule) -> tuple[int, ...]:
        role = self._role(m)
        _need(m, role, ndim=3)
        shape = m.shape(role)
        if len(shape) != 3 or shape[1] != shape[2]:
            raise DeltaError(f"OFT module {m.key!r}: {role} is {list(shape)}, expected [n, b, b]")
        return shape

    def rotation(self, m: DeltaModule, dtype: np.dtype) -> np.ndarray:
        if self._role(m) == "oft_diag":
            self.blocks(m)
            return m.array("oft_diag", dtype)
        return super().rotation(m, dtype)

    def rotate(self, m: DeltaModule, rotation: np.ndarray, base: np.ndarray) -> np.ndarray:
        n, b, _ = rotation.shape
        rows = base.reshape(n, b, -1)
        return (np.swapaxes(rotation, 1, 2) @ rows).reshape(base.shape)


class _BOFT(_Rotation):
    """LyCORIS BOFT: stage ``i`` of ``m`` groups the output rows by a stride of ``2^i * b / 2``
    into ``n`` blocks of ``b`` and applies ``R_{i,k}`` to block ``k`` (lycoris/functional/boft.py)."""

    def blocks(self, m: DeltaModule) -> tuple[int, ...]:
        _need(m, "oft_blocks", ndim=4)
        shape = m.shape("oft_blocks")
        stages, n, b, b2 = shape if len(shape) == 4 else (0, 0, 1, 0)
        if b != b2 or b % 2 or n % 2 ** max(stages - 1, 0):
            raise DeltaError(
                f"BOFT module {m.key!r}: oft_blocks is {list(shape)}, expected [m, n, b, b] "
                "with b even and n a multiple of 2^(m-1)"
            )
        return shape

    def rotate(self, m: DeltaModule, rotation: np.ndarray, base: np.ndarray) -> np.ndarray:
        stages, n, b, _ = rotation.shape
        x = base.reshape(base.shape[0], -1)
        cols = x.shape[1]
        for i in range(stages):
            stride = 2**i * (b // 2)
            x = x.reshape(-1, 2, stride, cols).swapaxes(1, 2).reshape(n, b, cols)
            x = rotation[i] @ x
            x = x.reshape(-1, stride, 2, cols).swapaxes(1, 2).reshape(-1, cols)
        return x.reshape(base.shape)


class _GLoRA(TypeSpec):
    """``dW = alpha / r * (W a1 a2 + b1 b2)`` (lycoris/modules/glora.py; ``b1 b2`` a Tucker
    LoCon product when the module has a ``bm`` core), or the old layout's ``b2 b1 + W a2 a1``
    (ComfyUI comfy/weight_adapter/glora.py tells the two apart by shape, as here)."""

    def _shapes(self, m: DeltaModule) -> dict[str, tuple[int, ...]]:
        _need(m, "a1", "a2", "b1", "b2")
        return {role: m.shape(role) for role in ("a1", "a2", "b1", "b2")}

    def old_layout(self, m: DeltaModule, base_shape: tuple[int, ...] | None = None) -> bool:
        """The module is in the old LyCORIS layout. Both layouts fit a square weight's
        tensors; ComfyUI then reads it as old when ``a2`` has as many rows as the weight; without
        the base, the reading whose rank is not above its dimension."""
        s = self._shapes(m)
        old = s["b2"][1] == s["b1"][0] == s["a1"][0] == s["a2"][1]
        new = s["b2"][0] == s["b1"][1] == s["a1"][1] == s["a2"][0]
        if "bm" in m.tensors or not old:
            if not new:
                raise DeltaError(
                    f"GLoRA module {m.key!r}: a1 {list(s['a1'])}, a2 {list(s['a2'])}, b1 "
                    f"{list(s['b1'])}, b2 {list(s['b2'])} share no rank"
                )
            return False
        if not new:
            return True
        if base_shape is not None:
            return len(base_shape) >= 2 and s["a2"][0] == base_shape[0] == base_shape[1]
        return s["a1"][0] <= s["a2"][0]

    def rank(self, m: DeltaModule, old: bool | None = None) -> int:
        s = self._shapes(m)
        return s["a1"][0] if (self.old_layout(m) if old is None else old) else s["a2"][0]

    def scale(self, m: DeltaModule, old: bool | None = None) -> float:
        return _alpha_over(m, self.rank(m, old))

    def full_shape(self, m: DeltaModule, old: bool | None = None) -> tuple[int, ...]:
        s = self._shapes(m)
        if self.old_layout(m) if old is None else old:
            return s["b2"][0], math.prod(s["b1"][1:])
        _agree(m, "inputs of a1 and a2", s["a1"][0], s["a2"][1])
        if "bm" in m.tensors:
            _need(m, "bm", ndim=3)
            return s["b1"][0], s["b2"][1], *m.shape("bm")[2:]
        return s["b1"][0], s["b2"][1], *s["b2"][2:]

    def dims(self, m: DeltaModule, old: bool | None = None) -> tuple[int, int]:
        shape = self.full_shape(m, old)
        return shape[0], math.prod(shape[1:])

    def is_conv(self, m: DeltaModule) -> bool:
        return len(self.full_shape(m)) > 2 or len(m.shape("b2")) > 2

    def delta(self, m: DeltaModule, base: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
        if base is None:
            raise DeltaError("a GLoRA update depends on the base weight: pass base")
        old = self.old_layout(m, tuple(base.shape))
        out, inp = self.dims(m, old)
        if base.shape[0] != out or math.prod(base.shape[1:]) != inp:
            raise DeltaError(
                f"GLoRA module {m.key!r} makes a {out} x {inp} update, the base weight is "
                f"{list(base.shape)}"
            )
        weight = np.asarray(base, dtype=dtype)
        a1, a2, b1, b2 = (m.array(role, dtype) for role in ("a1", "a2", "b1", "b2"))
        if old:
            flat = weight.reshape(out, -1)
            a2, a1 = a2.reshape(a2.shape[0], -1), a1.reshape(a1.shape[0], -1)
            dw = b2.reshape(out, -1) @ b1.reshape(b1.shape[0], -1) + (flat @ a2) @ a1
        else:
            r = self.rank(m, old)
            a1, a2 = a1.reshape(-1, r), a2.reshape(r, -1)
            # W a1 a2 contracts the input channels; a conv's kernel axes stay
            wa = np.moveaxis(np.tensordot(weight, a1, axes=([1], [0])), -1, 1)
            wa = np.moveaxis(np.tensordot(wa, a2, axes=([1], [0])), -1, 1)
            if "bm" in m.tensors:
                bb = tucker(m.array("bm", dtype), b1.reshape(-1, r).T, b2.reshape(r, -1))
            else:
                bb = b1.reshape(-1, r) @ b2.reshape(r, -1)
            dw = wa.reshape(out, -1) + bb.reshape(out, -1)
        return (dw * dtype.type(self.scale(m, old))).astype(dtype, copy=False).reshape(base.shape)


class _IA3(TypeSpec):
    """``W' = W * (1 + w)``: LyCORIS' (IA)^3 vector scales the weight's input channels
    (``on_input`` 1) or its output rows (0) (lycoris/modules/ia3.py)."""

    def on_input(self, m: DeltaModule) -> bool:
        if "on_input" in m.tensors:
            return bool(np.asarray(m.tensors["on_input"].numpy()).reshape(-1)[0])
        return bool(m.options.get("on_input", 0))

    def _size(self, m: DeltaModule) -> int:
        _need(m, "weight", ndim=1)
        shape = m.shape("weight")
        size = math.prod(shape)
        if len(shape) > 1 and shape[1] != size:
            raise DeltaError(
                f"IA3 module {m.key!r}: weight is {list(shape)}, expected [c] or [1, c, 1, ...]"
            )
        return size

    def dims(self, m: DeltaModule) -> tuple[int | None, int | None]:  # type: ignore[override]
        """``(c, None)`` on the outputs; on the inputs ``(None, c)`` for a linear layer,
        ``(None, None)`` for a convolution (``in`` counts its kernel too)."""
        size = self._size(m)
        if not self.on_input(m):
            return size, None
        return None, None if self.is_conv(m) else size

    def full_shape(self, m: DeltaModule) -> tuple[int | None, ...]:  # type: ignore[override]
        size = self._size(m)
        return (None, size) if self.on_input(m) else (size,)

    def is_conv(self, m: DeltaModule) -> bool:
        return len(m.shape("weight")) > 1

    def vector(self, m: DeltaModule, base: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """``w`` shaped to broadcast over ``base``."""
        size, axis = self._size(m), 1 if self.on_input(m) else 0
        if base.ndim < 2 or base.shape[axis] != size:
            side = "input channels" if axis else "output rows"
            raise DeltaError(
                f"IA3 module {m.key!r} scales {size} {side}, the base weight is {list(base.shape)}"
            )
        shape = [1] * base.ndim
        shape[axis] = size
        return m.array("weight", dtype).reshape(shape)

    def delta(self, m: DeltaModule, base: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
        if base is None:
            raise DeltaError("an IA3 update depends on the base weight: pass base")
        weight = np.asarray(base, dtype=dtype)
        return weight * self.vector(m, weight, dtype)

    def merged(
        self, m: DeltaModule, base: np.ndarray, strength: float, dtype: np.dtype
    ) -> np.ndarray:
        # LyCORIS' order: W * (w * s + 1)
        return base * (self.vector(m, base, dtype) * dtype.type(strength) + dtype.type(1))

    def scales_bias(self, m: DeltaModule) -> bool:
        # LyCORIS' forward scales the layer's output, bias included: org_forward(x) * (w + 1)
        # (its get_merged_weight returns no bias, so its own merge loses that part)
        return not self.on_input(m)

    def merged_bias(
        self, m: DeltaModule, bias: np.ndarray, strength: float, dtype: np.dtype
    ) -> np.ndarray:
        if not self.scales_bias(m):
            return bias
        size = self._size(m)
        if bias.size != size:
            raise DeltaError(
                f"IA3 module {m.key!r} scales {size} outputs, the bias has {bias.size}"
            )
        w = m.array("weight", dtype).reshape(bias.shape)
        return bias * (w * dtype.type(strength) + dtype.type(1))


_COMMON = ("alpha", "dora_scale")
#: The specs :data:`lora_tools.deltas.TYPES` registers for these types.
SPECS: tuple[TypeSpec, ...] = (
    _OFT(OFT, ("oft_blocks", "oft_diag", "rescale", *_COMMON), needs_base=True),
    _BOFT(BOFT, ("oft_blocks", "rescale", *_COMMON), needs_base=True),
    _GLoRA(GLORA, ("a1", "a2", "b1", "b2", "bm", *_COMMON), needs_base=True),
    _IA3(IA3, ("weight", "on_input"), needs_base=True),
)

__all__ = ["SPECS", "cayley"]
