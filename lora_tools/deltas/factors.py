"""Each type's update as low-rank factors, exactly, without forming the ``d x k`` matrix where
the algebra allows.

- LoRA-shaped types (Tucker LoCon with its core contracted, kohya DoRA's factors): ``up @ down``.
- LoHa: ``(A1 B1) * (A2 B2) = (A1 .r A2) @ (B1 .c B2)``, the row-wise Khatri-Rao product of the
  ``[out, r]`` factors times the column-wise Khatri-Rao product of the ``[r, in]`` ones: rank
  at most ``r1 * r2``.
- LoKr: ``kron(w1, w2) = kron(U1 S1, U2 S2) @ kron(V1, V2)`` from the SVDs of the two small
  factors: rank ``rank(w1) * rank(w2)``, singular values the products of theirs.
- full: the difference itself (its SVD).

:func:`compact` turns any factor pair into an SVD (``up = U * s``, ``down = Vh``) with a QR of
each factor and an ``R x R`` SVD, so every spectrum here costs ``O((m + n) R^2)``.

Example:
    >>> import numpy as np
    >>> from lora_tools.deltas import DeltaModule, LOKR
    >>> from lora_tools.io.safetensors import ArrayTensor
    >>> m = DeltaModule("m", LOKR, {"lokr_w1": ArrayTensor(np.diag([2.0, 1.0])),
    ...                             "lokr_w2": ArrayTensor(np.diag([3.0, 0.5]))})
    >>> singular_values(m).tolist()
    [6.0, 3.0, 1.0, 0.5]
"""

from __future__ import annotations

import numpy as np

from lora_tools.deltas import (
    DORA_LORA,
    FULL,
    LOHA,
    LOKR,
    TUCKER_LOCON,
    DeltaError,
    DeltaModule,
)


def khatri_rao_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[m, r1] x [m, r2] -> [m, r1 * r2]``: row ``i`` is ``kron(a[i], b[i])``."""
    return (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], -1)


def khatri_rao_cols(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[r1, n] x [r2, n] -> [r1 * r2, n]``: column ``j`` is ``kron(a[:, j], b[:, j])``."""
    return (a[:, None, :] * b[None, :, :]).reshape(-1, a.shape[1])


def _svd_small(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SVD of a small dense matrix with the zero singular values dropped."""
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    keep = s > s[0] * max(w.shape) * np.finfo(w.dtype).eps if s.size and s[0] > 0 else s > 0
    return u[:, keep], s[keep], vh[keep]


def exact_factors(m: DeltaModule, dtype: np.dtype = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """``(up [out, R], down [R, in * k])`` with ``up @ down`` equal to the module's flattened
    update (scale included), for the types whose update does not depend on the base.

    Raises:
        DeltaError: the type's update depends on the base weight (OFT, GLoRA, IA3, a weight
            decomposition): it has no factors of its own.
    """
    dtype = np.dtype(dtype)
    scale = dtype.type(m.scale)
    if m.type in (TUCKER_LOCON, DORA_LORA):
        up, down = m.spec.factors(m, dtype)  # type: ignore[attr-defined]
        return up * scale, down
    if m.type == LOHA:
        m.update_dims  # noqa: B018 - the shape check
        halves = []
        for i in (1, 2):
            a, b = m.array(f"hada_w{i}_a", dtype), m.array(f"hada_w{i}_b", dtype)
            if "hada_t1" in m.tensors:
                core = m.array(f"hada_t{i}", dtype)
                # half[p, (q, k)] = sum_a a[a, p] * (sum_j core[a, j, k] b[j, q])
                halves.append((a.T, np.einsum("aj...,jq->aq...", core, b).reshape(a.shape[0], -1)))
            else:
                halves.append((a, b.reshape(b.shape[0], -1)))
        (a1, b1), (a2, b2) = halves
        return khatri_rao_rows(a1, a2) * scale, khatri_rao_cols(b1, b2)
    if m.type == LOKR:
        w1, w2 = m.spec.factors(m, dtype)  # type: ignore[attr-defined]
        u1, s1, v1 = _svd_small(w1)
        u2, s2, v2 = _svd_small(w2)
        return np.kron(u1 * s1, u2 * s2) * scale, np.kron(v1, v2)
    if m.type == FULL:
        diff = m.array("diff", dtype).reshape(m.update_dims[0], -1)
        u, s, vh = np.linalg.svd(diff, full_matrices=False)
        return u * s, vh
    raise DeltaError(f"a {m.type} update depends on the base weight: it has no factors of its own")


def compact(up: np.ndarray, down: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The SVD ``(U, s, Vh)`` of ``up @ down`` from a QR of each factor and an ``R x R`` SVD
    (``R`` the inner dimension), singular values descending."""
    qu, ru = np.linalg.qr(up)
    qv, rv = np.linalg.qr(down.T)
    u, s, vh = np.linalg.svd(ru @ rv.T, full_matrices=False)
    return qu @ u, s, vh @ qv.T


def singular_values(m: DeltaModule, base: np.ndarray | None = None) -> np.ndarray:
    """The singular values of the module's flattened update, descending, in float64.

    LoKr's are the products of its factors' (no matrix of the update's size is formed); other
    factored types go through :func:`compact`; types that depend on the base need ``base``
    and take the SVD of the dense update.
    """
    if m.type == LOKR:
        w1, w2 = m.spec.factors(m, np.dtype(np.float64))  # type: ignore[attr-defined]
        s = np.outer(np.linalg.svd(w1, compute_uv=False), np.linalg.svd(w2, compute_uv=False))
        return np.sort(s.reshape(-1) * abs(m.scale))[::-1]
    if m.needs_base or m.type == FULL:
        if m.needs_base and base is None:
            raise DeltaError(f"the spectrum of a {m.type} update needs the base weight")
        dense = m.delta(base).reshape(m.update_dims[0], -1)
        return np.linalg.svd(dense, compute_uv=False)
    up, down = exact_factors(m)
    return compact(up, down)[1]


__all__ = [
    "compact",
    "exact_factors",
    "khatri_rao_cols",
    "khatri_rao_rows",
    "singular_values",
]
