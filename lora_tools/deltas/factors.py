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

:func:`to_lora` turns a module into the optimal plain LoRA of a chosen rank (Eckart-Young) or
the exact one: in factor space for LoHa, LoKr and Tucker LoCon; through a randomized SVD of the
dense update for a full diff and for the types whose update depends on the base weight (given
as an array), with the error measured against that update. docs/math.md, "Other adapter
types", has the formulas.

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

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lora_tools.deltas import (
    DORA_LORA,
    FULL,
    LOHA,
    LOKR,
    TUCKER_LOCON,
    DeltaError,
    DeltaModule,
    merged,
)
from lora_tools.deltas.peft_types import ADALORA
from lora_tools.lowrank import low_rank_approx, relative_error, retained_energy, select_rank


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
    if m.type in (TUCKER_LOCON, DORA_LORA, ADALORA) and not m.needs_base:
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


# -- the optimal plain LoRA of a module ------------------------------------------------------

#: Columns a randomized range finder samples beyond the rank it is asked for (Halko, Martinsson
#: and Tropp 2011, section 4.2: 5 to 10 make a failure negligible).
OVERSAMPLE = 10
#: Power iterations of the range finder: each one raises the spectrum's decay to a higher
#: power, so a slowly decaying spectrum is captured almost as well as by a dense SVD (section 4.5).
POWER_ITERATIONS = 2
#: A sketch wider than this fraction of ``min(m, n)`` costs about what the dense SVD does,
#: which is exact: the dense SVD is taken then.
DENSE_FRACTION = 0.5

#: How :func:`to_lora` found the factors.
FACTOR_SPACE = "factors"
RANDOMIZED = "randomized"
DENSE = "dense"


@dataclass(frozen=True)
class LoraFactors:
    """A module's update as a plain LoRA ``up @ down`` at scale 1 (alpha = rank).

    Attributes:
        up: ``[out, k]`` float64.
        down: ``[k, in * prod(kernel)]`` float64.
        exact_rank: the rank of the module's update (its numerical rank), None where a
            randomized sketch does not tell it.
        retained_energy: ``||up @ down||_F^2 / ||dW||_F^2``.
        relative_error: ``||dW - up @ down||_F / ||dW||_F`` (0 for a zero update): from the
            spectrum (Eckart-Young) where it is known whole, else measured on the dense update.
        frobenius: ``||dW||_F``.
        method: :data:`FACTOR_SPACE`, :data:`RANDOMIZED` or :data:`DENSE`.
    """

    up: np.ndarray
    down: np.ndarray
    exact_rank: int | None
    retained_energy: float
    relative_error: float
    frobenius: float
    method: str

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])

    @property
    def alpha(self) -> float:
        """The alpha that gives scale 1 at this rank."""
        return float(self.rank)


def numerical_rank(S: np.ndarray, dims: tuple[int, int]) -> int:
    """How many singular values lie above the round-off floor ``S_0 * max(dims) * eps``
    (LAPACK's and numpy's ``matrix_rank`` tolerance)."""
    if len(S) == 0 or not S[0] > 0:
        return 0
    return int(np.count_nonzero(S[0] * max(dims) * np.finfo(np.float64).eps < S))


def _choose(S: np.ndarray, rule: dict[str, Any] | None, dims: tuple[int, int]) -> int:
    """The rank to keep of a whole spectrum: the exact (numerical) rank without a rule, else
    the rule's, never above the exact rank (columns beyond it would be zero), at least 1."""
    exact = numerical_rank(S, dims)
    k = exact if rule is None else select_rank(S, **rule)
    return max(1, min(k, exact) if exact else 1)


def _split(
    left: np.ndarray, S: np.ndarray, right: np.ndarray, sign: float = 1.0, distribute: str = "sqrt"
) -> tuple[np.ndarray, np.ndarray]:
    """``(left * sqrt(S) * sign, sqrt(S) * right)``: the singular values shared evenly, or
    with ``distribute="up"`` all in ``left`` (``right`` orthonormal, sd-scripts' split)."""
    if distribute == "up":
        return left * (S * sign), right.copy()
    root = np.sqrt(S)
    return left * (root * sign), right * root[:, None]


def _thin_svd(up: np.ndarray, down: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The SVD of ``up @ down`` from the factors (:func:`compact`), zero values dropped."""
    u, s, vh = compact(up, down)
    keep = s > (s[0] if s.size else 0.0) * max(up.shape[0], down.shape[1]) * np.finfo(s.dtype).eps
    return u[:, keep], s[keep], vh[keep]


def _lokr_factor_svds(
    m: DeltaModule,
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The SVDs of a LoKr's ``w1`` and ``w2`` (``w2`` flattened over the kernel), each from
    its own low-rank factors where the file stores it decomposed."""
    m.update_dims  # noqa: B018 - the shape check
    f64 = np.float64
    if "lokr_w1" in m.tensors:
        svd1 = _svd_small(m.array("lokr_w1", f64).reshape(m.shape("lokr_w1")[0], -1))
    else:
        svd1 = _thin_svd(m.array("lokr_w1_a", f64), m.array("lokr_w1_b", f64))
    if "lokr_w2" in m.tensors:
        svd2 = _svd_small(m.array("lokr_w2", f64).reshape(m.shape("lokr_w2")[0], -1))
    elif "lokr_t2" in m.tensors:
        a, b = m.array("lokr_w2_a", f64), m.array("lokr_w2_b", f64)
        core = np.einsum("ij...,jq->iq...", m.array("lokr_t2", f64), b).reshape(a.shape[0], -1)
        svd2 = _thin_svd(a.T, core)
    else:
        b = m.array("lokr_w2_b", f64)
        svd2 = _thin_svd(m.array("lokr_w2_a", f64), b.reshape(b.shape[0], -1))
    return svd1, svd2


def _lokr_to_lora(m: DeltaModule, rule: dict[str, Any] | None, distribute: str) -> LoraFactors:
    """``kron(U1 S1 V1, U2 S2 V2) = kron(U1, U2) kron(S1, S2) kron(V1, V2)``: the singular
    triplets of the update are the pairs ``(u1_i x u2_j, s1_i s2_j, v1_i x v2_j)``; the top
    ``k`` pairs by product are the truncated SVD. Only ``[out, k]`` and ``[k, in]`` are formed."""
    (u1, s1, v1), (u2, s2, v2) = _lokr_factor_svds(m)
    scale = m.scale
    products = np.outer(s1, s2).reshape(-1) * abs(scale)
    order = np.argsort(-products, kind="stable")
    S = products[order]
    dims = m.update_dims
    k = _choose(S, rule, (dims[0], dims[1] or 0))
    i, j = np.divmod(order[:k], len(s2))
    left = (u1[:, i][:, None, :] * u2[:, j][None, :, :]).reshape(-1, k)
    right = (v1[i][:, :, None] * v2[j][:, None, :]).reshape(k, -1)
    up, down = _split(left, S[:k], right, -1.0 if scale < 0 else 1.0, distribute)
    if not S.size or not S[0] > 0:
        up, down = np.zeros((dims[0], 1)), np.zeros((1, dims[1] or 0))
    return LoraFactors(
        up,
        down,
        numerical_rank(S, (dims[0], dims[1] or 0)),
        retained_energy(S, k),
        relative_error(S, k),
        float(np.sqrt(np.sum(np.square(S)))),
        FACTOR_SPACE,
    )


def _factored_to_lora(m: DeltaModule, rule: dict[str, Any] | None, distribute: str) -> LoraFactors:
    """LoHa (Khatri-Rao factors, rank ``r1 * r2``) and Tucker LoCon (core contracted, rank
    ``r``): the truncated SVD from a QR of each factor and a small SVD
    (:func:`lora_tools.lowrank.low_rank_approx`)."""
    up, down = exact_factors(m)
    S = compact(up, down)[1]
    k = _choose(S, rule, (up.shape[0], down.shape[1]))
    lr = low_rank_approx(up, down, 1.0, k, distribute=distribute)
    return LoraFactors(
        lr.up,
        lr.down,
        numerical_rank(S, (up.shape[0], down.shape[1])),
        retained_energy(S, k),
        relative_error(S, k),
        float(np.sqrt(np.sum(np.square(S)))),
        FACTOR_SPACE,
    )


def dense_update(m: DeltaModule, base: np.ndarray | None = None) -> np.ndarray:
    """The module's flattened ``[out, in * k]`` update in float64: for a type that reads the
    base weight (or has a weight decomposition), what it changes the weight by,
    ``merged(W) - W``.

    Raises:
        DeltaError: the update depends on the base weight and ``base`` is None.
    """
    if not m.needs_base:
        return m.delta().reshape(m.update_dims[0], -1)
    if base is None:
        raise DeltaError(f"a {m.type} update depends on the base weight: pass base")
    weight = np.asarray(base, dtype=np.float64)
    return (merged(m, weight, 1.0, np.float64) - weight).reshape(weight.shape[0], -1)


def randomized_svd(
    M: np.ndarray,
    k: int,
    *,
    oversample: int = OVERSAMPLE,
    power_iterations: int = POWER_ITERATIONS,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An approximate thin SVD ``(U, S, Vh)`` of the top ``k + oversample`` triplets of ``M``.

    Range finder with power iterations (Halko et al. 2011, algorithms 4.4 and 5.1): ``Q`` =
    an orthonormal basis of ``(M M^T)^q M Omega`` (``Omega`` Gaussian ``[n, k + p]``, each
    product re-orthonormalised by a QR), then the SVD of the small ``Q^T M``. Cost
    ``O(m n (k + p) (2 q + 2))`` against ``O(m n min(m, n))`` for the dense SVD.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> M = rng.normal(size=(60, 8)) @ rng.normal(size=(8, 50))
        >>> _, S, _ = randomized_svd(M, 8)
        >>> bool(np.allclose(S[:8], np.linalg.svd(M, compute_uv=False)[:8]))
        True
    """
    rows, cols = M.shape
    width = max(1, min(k + oversample, rows, cols))
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(M @ rng.standard_normal((cols, width)))[0]
    for _ in range(power_iterations):
        Z = np.linalg.qr(M.T @ Q)[0]
        Q = np.linalg.qr(M @ Z)[0]
    ub, S, Vh = np.linalg.svd(Q.T @ M, full_matrices=False)
    return Q @ ub, S, Vh


def _dense_to_lora(
    M: np.ndarray, rule: dict[str, Any] | None, seed: int, distribute: str
) -> LoraFactors:
    """The rank-``k`` LoRA of a dense update: a randomized SVD for a fixed rank or an energy
    (the sketch widened until it holds the rank with ``OVERSAMPLE`` to spare), the dense SVD
    where the sketch would be as wide as it costs, or for the exact LoRA and the other rules."""
    total = float(np.vdot(M, M))
    frob = math.sqrt(total)
    small = min(M.shape)
    sketch = None
    if rule is not None and set(rule) <= {"rank", "energy", "min_rank", "max_rank"}:
        want = int(rule["rank"]) if "rank" in rule else 16
        while want + OVERSAMPLE <= small * DENSE_FRACTION:
            U, S, Vh = randomized_svd(M, want, seed=seed)
            if "rank" in rule:
                sketch = (U, S, Vh, want)
                break
            tail = math.sqrt(max(total - float(np.sum(np.square(S))), 0.0))
            k = select_rank(np.append(S, tail), **rule)
            if k <= want:
                sketch = (U, S, Vh, k)
                break
            want *= 2
    if sketch is None:
        U, S, Vh = np.linalg.svd(M, full_matrices=False)
        k = _choose(S, rule, M.shape)
        up, down = _split(U[:, :k], S[:k], Vh[:k], distribute=distribute)
        return LoraFactors(
            up,
            down,
            numerical_rank(S, M.shape),
            retained_energy(S, k),
            relative_error(S, k),
            frob,
            DENSE,
        )
    U, S, Vh, k = sketch
    k = max(1, min(k, len(S)))
    up, down = _split(U[:, :k], S[:k], Vh[:k], distribute=distribute)
    error = float(np.linalg.norm(M - up @ down)) / frob if total > 0 else 0.0
    energy = float(np.sum(np.square(S[:k]))) / total if total > 0 else 1.0
    return LoraFactors(up, down, None, min(energy, 1.0), error, frob, RANDOMIZED)


def to_lora(
    m: DeltaModule,
    rule: dict[str, Any] | None = None,
    *,
    base: np.ndarray | None = None,
    seed: int = 0,
    distribute: str = "sqrt",
) -> LoraFactors:
    """The plain LoRA of a module's update: exact without ``rule``, else the optimal one of the
    rank ``rule`` picks (Eckart-Young).

    - LoKr: from the SVDs of its two factors (singular values are products of theirs);
    - LoHa: the Khatri-Rao factors (rank ``<= r1 * r2``), a QR of each and a small SVD;
    - Tucker LoCon (and PEFT's AdaLoRA): the core contracted into ``down``, then the same;
    - full diff, and types that read the base weight (OFT, IA3, GLoRA, a weight
      decomposition; ``base`` needed), VeRA, FourierFT: a randomized SVD of the dense update,
      error measured.

    Args:
        m: the module (its tensors are not changed).
        rule: keyword arguments of :func:`lora_tools.lowrank.select_rank` (``rank``,
            ``energy``, ``sv_ratio``, ``sv_cumulative``, ``min_rank``, ``max_rank``), or None
            for the exact LoRA (the update's numerical rank: ``r1 * r2`` for a LoHa,
            ``rank(w1) * rank(w2)`` for a LoKr, up to ``min(out, in)`` for a dense update).
        base: the base weight (its own shape), for modules whose update reads it.
        seed: seed of the randomized SVD's test matrix.
        distribute: ``sqrt`` (``sqrt(S)`` in both factors) or ``up`` (``S`` in ``up``).

    Returns:
        A :class:`LoraFactors`: ``up @ down`` approximates the flattened update at scale 1.

    Raises:
        DeltaError: the type is not computed, or needs ``base`` and has none.

    Example:
        >>> from lora_tools.deltas import DeltaModule, LOKR
        >>> from lora_tools.io.safetensors import ArrayTensor
        >>> m = DeltaModule("m", LOKR, {"lokr_w1": ArrayTensor(np.diag([2.0, 1.0])),
        ...                             "lokr_w2": ArrayTensor(np.diag([3.0, 0.5]))})
        >>> lora = to_lora(m, {"rank": 2})
        >>> lora.rank, round(lora.retained_energy, 3), np.diag(lora.up @ lora.down).round(6).tolist()
        (2, 0.973, [6.0, 0.0, 3.0, 0.0])
    """
    if not m.computed:
        raise DeltaError(f"loratool does not compute {m.type} updates")
    if not low_rank_form(m):
        return _dense_to_lora(dense_update(m, base), rule, seed, distribute)
    if m.type == LOKR:
        return _lokr_to_lora(m, rule, distribute)
    return _factored_to_lora(m, rule, distribute)


#: Types whose update is a low-rank product the algebra reaches from the tensors.
FACTORED_TYPES = (LOHA, LOKR, TUCKER_LOCON, ADALORA)


def low_rank_form(m: DeltaModule) -> bool:
    """The module's update has a low-rank form in its tensors (LoHa, LoKr, Tucker LoCon,
    AdaLoRA, none reading the base): :func:`to_lora` works in factor space and its exact LoRA
    is small. Other updates (a full diff, OFT, IA3, GLoRA, VeRA, FourierFT, a weight
    decomposition) go through the dense update."""
    return m.type in FACTORED_TYPES and not m.needs_base


__all__ = [
    "DENSE",
    "FACTORED_TYPES",
    "FACTOR_SPACE",
    "RANDOMIZED",
    "LoraFactors",
    "compact",
    "dense_update",
    "exact_factors",
    "khatri_rao_cols",
    "khatri_rao_rows",
    "low_rank_form",
    "numerical_rank",
    "randomized_svd",
    "singular_values",
    "to_lora",
]
