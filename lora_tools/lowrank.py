"""Linear algebra on low-rank factors, never forming the dense ``d x k`` update.

For an update ``dW = s * U @ V`` with ``U`` ``[m, r]`` and ``V`` ``[r, n]``:

1. QR of both thin factors: ``U = Qu Ru`` and ``V^T = Qv Rv`` (``Qu`` ``[m, r]``, ``Qv``
   ``[n, r]``, ``Ru`` and ``Rv`` ``[r, r]``), costing ``O((m + n) r^2)``.
2. SVD of the small core ``C = s * Ru @ Rv^T = Uc diag(S) Vc^T`` (``O(r^3)``).
3. Then ``dW = (Qu Uc) diag(S) (Qv Vc)^T`` is an exact SVD of the update: the singular values of
   ``dW`` are ``S`` and its singular vectors are ``Qu Uc`` and ``Qv Vc``.

Everything runs in float64. docs/math.md derives this for users.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> U, V = rng.normal(size=(50, 4)), rng.normal(size=(4, 30))
    >>> svd = factor_svd(U, V, scale=0.5)
    >>> bool(np.allclose(svd.S, np.linalg.svd(0.5 * U @ V, compute_uv=False)[:4]))
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FactorSVD:
    """Thin SVD ``dW = U @ diag(S) @ Vh`` with ``k = len(S) <= r`` singular values, descending."""

    U: np.ndarray
    S: np.ndarray
    Vh: np.ndarray

    @property
    def frobenius(self) -> float:
        """``||dW||_F = sqrt(sum S^2)``."""
        return float(np.sqrt(np.sum(self.S**2)))

    @property
    def spectral(self) -> float:
        """Largest singular value ``||dW||_2``."""
        return float(self.S[0]) if self.S.size else 0.0


def factor_svd(U: np.ndarray, V: np.ndarray, scale: float = 1.0) -> FactorSVD:
    """Exact SVD of ``scale * U @ V`` from the factors (QR of each, SVD of the r x r core).

    Args:
        U: ``[m, r]`` up factor.
        V: ``[r, n]`` down factor.
        scale: the module's scale.
    """
    U = np.asarray(U, dtype=np.float64)
    V = np.asarray(V, dtype=np.float64)
    Qu, Ru = np.linalg.qr(U)
    Qv, Rv = np.linalg.qr(V.T)
    core = scale * (Ru @ Rv.T)
    Uc, S, Vch = np.linalg.svd(core)
    return FactorSVD(U=Qu @ Uc, S=S, Vh=(Qv @ Vch.T).T)


def max_abs_update(
    U: np.ndarray, V: np.ndarray, scale: float, limit: float, *, block_bytes: int = 1 << 26
) -> float:
    """An upper bound of ``max |scale * U @ V|`` that is exact whenever it reaches ``limit``.

    First the Cauchy-Schwarz bound ``|s| * max_i ||U[i]|| * max_j ||V[:, j]||`` (``O((m + n)
    r)``); only when that reaches ``limit`` the product itself, a block of rows at a time
    (at most ``block_bytes`` of float64 at once). Operations compare the result with the
    largest value of the dtype a consumer computes the update in.
    """
    U = np.asarray(U, dtype=np.float64)
    V = np.asarray(V, dtype=np.float64)
    if U.size == 0 or V.size == 0:
        return 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        bound = (
            abs(scale)
            * float(np.sqrt((U * U).sum(axis=1)).max())
            * float(np.sqrt((V * V).sum(axis=0)).max())
        )
        if bound < limit:
            return bound
        rows = max(1, block_bytes // (8 * max(V.shape[1], 1)))
        peak = 0.0
        for start in range(0, U.shape[0], rows):
            peak = max(peak, float(np.abs(U[start : start + rows] @ V).max()) * abs(scale))
    return peak if np.isfinite(peak) else float("inf")


def singular_values(U: np.ndarray, V: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Singular values of ``scale * U @ V`` (descending), from the r x r core only."""
    U = np.asarray(U, dtype=np.float64)
    V = np.asarray(V, dtype=np.float64)
    Ru = np.linalg.qr(U, mode="r")
    Rv = np.linalg.qr(V.T, mode="r")
    return np.linalg.svd(scale * (Ru @ Rv.T), compute_uv=False)


def effective_rank(S: np.ndarray) -> float:
    """Roy & Vetterli's effective rank ``exp(H(p))`` with ``p = S / sum(S)``; 0 for a zero update.

    It equals k for k equal singular values and decays towards 1 as one direction dominates.
    """
    total = float(np.sum(S))
    if total <= 0 or not np.isfinite(total):
        return 0.0
    p = S[S > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


# -- truncation, rank selection, factor splits (resize, combine, rescale) ------------------------

#: How the singular values of a truncated update are split between the two factors.
DISTRIBUTIONS = ("sqrt", "up")


@dataclass(frozen=True)
class LowRank:
    """A rank-k update ``scale * up @ down`` with its spectrum.

    Attributes:
        up: ``[m, k]`` float64.
        down: ``[k, n]`` float64.
        S: all singular values of the update that was truncated (descending, length
            ``min(r, m, n)``), so that retained energy and error can be reported.
        k: the kept rank.
    """

    up: np.ndarray
    down: np.ndarray
    S: np.ndarray
    k: int

    @property
    def retained_energy(self) -> float:
        """``sum(S[:k]^2) / sum(S^2)``: the fraction of ``||dW||_F^2`` kept (1 for a zero update)."""
        return retained_energy(self.S, self.k)

    @property
    def relative_error(self) -> float:
        """``||dW - dW_k||_F / ||dW||_F`` (0 for a zero update)."""
        return relative_error(self.S, self.k)


def retained_energy(S: np.ndarray, k: int) -> float:
    """Fraction of the squared Frobenius norm held by the first ``k`` singular values."""
    total = float(np.sum(np.square(S)))
    if total <= 0:
        return 1.0
    return float(np.sum(np.square(S[:k])) / total)


def relative_error(S: np.ndarray, k: int) -> float:
    """Eckart-Young error of the rank-k truncation, relative: ``sqrt(sum S[k:]^2 / sum S^2)``.

    Computed from the tail (not as ``sqrt(1 - energy)``) so small errors keep their digits.
    """
    total = float(np.sum(np.square(S)))
    if total <= 0:
        return 0.0
    return float(np.sqrt(np.sum(np.square(S[k:])) / total))


def select_rank(
    S: np.ndarray,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    sv_cumulative: float | None = None,
    min_rank: int = 1,
    max_rank: int | None = None,
) -> int:
    """The rank to keep for singular values ``S`` (descending) under exactly one rule.

    - ``rank``: that rank (capped at ``len(S)``; bounds do not apply).
    - ``energy`` E in (0, 1]: the smallest k with ``sum(S[:k]^2) >= E * sum(S^2)``.
      sd-scripts' ``sv_fro`` with parameter p is ``energy = p^2``.
    - ``sv_ratio`` X >= 1: every singular value with ``S_i >= S_0 / X``.
    - ``sv_cumulative`` X in (0, 1]: the smallest k with ``sum(S[:k]) >= X * sum(S)``.

    sd-scripts adds one to the rank its dynamic rules find (its index is already a count); these
    rules return the smallest rank that satisfies the criterion. Dynamic choices are clamped to
    ``[min_rank, max_rank]`` and never exceed ``len(S)``. A zero update gets ``min_rank``.

    Args:
        S: singular values, descending.
        rank, energy, sv_ratio, sv_cumulative: the rule (exactly one).
        min_rank, max_rank: bounds for the dynamic rules.

    Returns:
        The rank k, ``1 <= k <= len(S)`` (0 only when ``S`` is empty).

    Example:
        >>> select_rank(np.array([4.0, 2.0, 1.0, 0.0]), energy=0.75)
        1
        >>> select_rank(np.array([4.0, 2.0, 1.0, 0.0]), sv_ratio=2)
        2
    """
    rules = [x is not None for x in (rank, energy, sv_ratio, sv_cumulative)]
    if sum(rules) != 1:
        raise ValueError("exactly one of rank, energy, sv_ratio, sv_cumulative is needed")
    S = np.asarray(S, dtype=np.float64)
    n = len(S)
    if n == 0:
        return 0
    if rank is not None:
        return max(1, min(int(rank), n))
    lo = max(1, int(min_rank))
    hi = n if max_rank is None else max(lo, min(int(max_rank), n))
    lo = min(lo, hi)
    if not np.any(S > 0):
        return lo
    # A relative slack of a few ulps keeps E = 1.0 (or X = 1.0) from demanding one more rank
    # than exists because a cumulative sum rounded just below the total.
    slack = 1e-12
    if energy is not None:
        cum = np.cumsum(np.square(S))
        k = int(np.searchsorted(cum, energy * cum[-1] * (1 - slack))) + 1
    elif sv_cumulative is not None:
        cum = np.cumsum(S)
        k = int(np.searchsorted(cum, sv_cumulative * cum[-1] * (1 - slack))) + 1
    else:
        assert sv_ratio is not None
        k = int(np.sum(S * sv_ratio >= S[0] * (1 - slack)))
    return max(lo, min(k, hi))


#: CholeskyQR2 is as accurate as Householder QR while cond(A) stays well below 1 / sqrt(eps)
#: (Yamamoto et al. 2015); above this bound on the first pass, Householder takes over.
_CHOLQR_MAX_COND = 1e6


def r_factor(A: np.ndarray) -> np.ndarray:
    """The R of a thin QR ``A = Q R`` (``[min(m, r), r]``), without forming Q.

    Tall factors use CholeskyQR2: ``R1 = chol(A^T A)``, ``Q1 = A R1^-1``, ``R = chol(Q1^T Q1) R1``
    (two Gram matrices and one ``[m, r] x [r, r]`` product: several times faster than Householder
    on tall-skinny LoRA factors). Ill-conditioned or rank-deficient factors, where CholeskyQR2
    would lose accuracy, fall back to Householder (LAPACK geqrf). R is unique up to the signs of
    its rows, which the callers never depend on.

    Example:
        >>> A = np.random.default_rng(2).normal(size=(100, 5))
        >>> R = r_factor(A)
        >>> bool(np.allclose(R.T @ R, A.T @ A))
        True
    """
    A = np.asarray(A, dtype=np.float64)
    m, r = A.shape
    if m >= 2 * r and r > 0:
        try:
            R1 = np.linalg.cholesky(A.T @ A).T
            if np.linalg.cond(R1) < _CHOLQR_MAX_COND:
                Q1 = A @ np.linalg.inv(R1)
                return np.linalg.cholesky(Q1.T @ Q1).T @ R1
        except np.linalg.LinAlgError:
            pass
    return np.linalg.qr(A, mode="r")


def low_rank_approx(
    U: np.ndarray,
    V: np.ndarray,
    scale: float,
    k: int | None = None,
    *,
    target_scale: float = 1.0,
    distribute: str = "sqrt",
    rule: dict[str, float | int | None] | None = None,
) -> LowRank:
    """The optimal rank-k approximation of ``scale * U @ V``, as factors, never forming it.

    With ``Ru`` and ``Rv`` the R factors of ``U`` and ``V^T`` and ``C = scale * Ru @ Rv^T =
    Uc diag(S) Vc^T`` (a small SVD), the update's SVD is ``(Qu Uc) diag(S) (Qv Vc)^T``. The
    Q factors are never formed: since ``V Qv = Rv^T`` and ``Qu^T U = Ru``,

        ``Qu Uc_k diag(S_k) = scale * U @ (Rv^T Vc_k)``  and
        ``diag(S_k) Vc_k^T Qv^T = scale * (Uc_k^T Ru) @ V``,

    two ``[m, r] x [r, k]`` products. Dividing by ``S_k`` (or its square root) then gives the
    factors; components with ``S_i = 0`` are dropped to zero columns. Cost:
    ``O((m + n) r (r + k))``, against ``O(m n min(m, n))`` for a dense SVD.

    Args:
        U: ``[m, r]`` up factor.
        V: ``[r, n]`` down factor.
        scale: the update's scale (folded into the result).
        k: the rank to keep; None to choose it with ``rule`` (keyword arguments of
            :func:`select_rank`).
        target_scale: the scale the output factors will be used with:
            ``target_scale * up @ down`` is the approximation.
        distribute: ``sqrt`` puts ``sqrt(S)`` in both factors; ``up`` puts ``S`` in ``up`` and
            leaves ``down`` orthonormal (sd-scripts' convention).
        rule: see ``k``.

    Returns:
        A :class:`LowRank` with ``up`` ``[m, k]``, ``down`` ``[k, n]`` and the full spectrum.

    Example:
        >>> rng = np.random.default_rng(1)
        >>> U, V = rng.normal(size=(40, 6)), rng.normal(size=(6, 30))
        >>> lr = low_rank_approx(U, V, 0.5, 2)
        >>> u, s, vh = np.linalg.svd(0.5 * U @ V)
        >>> bool(np.allclose(lr.up @ lr.down, (u[:, :2] * s[:2]) @ vh[:2]))
        True
    """
    if distribute not in DISTRIBUTIONS:
        raise ValueError(f"distribute must be one of {DISTRIBUTIONS}, not {distribute!r}")
    if target_scale == 0 or not np.isfinite(target_scale):
        raise ValueError(f"target_scale must be finite and non-zero, not {target_scale}")
    U = np.asarray(U, dtype=np.float64)
    V = np.asarray(V, dtype=np.float64)
    Ru = r_factor(U)
    Rv = r_factor(V.T)
    Uc, S, Vch = np.linalg.svd(scale * (Ru @ Rv.T), full_matrices=False)
    if k is None:
        k = select_rank(S, **(rule or {}))
    k = max(0, min(int(k), len(S)))
    left = scale * (U @ (Rv.T @ Vch[:k].T))  # Qu Uc_k diag(S_k), [m, k]
    right = scale * ((Uc[:, :k].T @ Ru) @ V)  # diag(S_k) Vc_k^T Qv^T, [k, n]
    Sk = S[:k]
    # Components at the round-off floor carry nothing; dividing by them would only add noise.
    floor = (S[0] if len(S) else 0.0) * 1e-14
    live = Sk > floor
    t = float(target_scale)
    w = np.zeros(k)
    if distribute == "sqrt":
        w[live] = 1.0 / np.sqrt(Sk[live] * abs(t))
        up = left * (w * np.sign(t))
    else:
        w[live] = 1.0 / Sk[live]
        up = left / t
    down = right * w[:, None]
    up[:, ~live] = 0.0
    down[~live, :] = 0.0
    return LowRank(up=up, down=down, S=S, k=k)


def dense_low_rank(
    M: np.ndarray,
    k: int | None = None,
    *,
    target_scale: float = 1.0,
    distribute: str = "sqrt",
    rule: dict[str, float | int | None] | None = None,
) -> LowRank:
    """The optimal rank-k approximation of a dense ``[m, n]`` matrix (TIES / DARE results).

    Same output as :func:`low_rank_approx`; only for updates that exist solely in dense form.
    """
    if distribute not in DISTRIBUTIONS:
        raise ValueError(f"distribute must be one of {DISTRIBUTIONS}, not {distribute!r}")
    u, S, vh = np.linalg.svd(np.asarray(M, dtype=np.float64), full_matrices=False)
    if k is None:
        k = select_rank(S, **(rule or {}))
    k = max(0, min(int(k), len(S)))
    Sk = S[:k] / target_scale
    if distribute == "sqrt":
        root = np.sqrt(np.abs(Sk))
        up = u[:, :k] * (root * np.sign(Sk))
        down = vh[:k] * root[:, None]
    else:
        up = u[:, :k] * Sk
        down = vh[:k].copy()
    return LowRank(up=up, down=down, S=S, k=k)


def stack_factors(
    terms: list[tuple[np.ndarray, np.ndarray, float]],
) -> tuple[np.ndarray, np.ndarray]:
    """``(U, V)`` with ``U @ V = sum_i c_i * U_i @ V_i``, exactly, at rank ``sum r_i``.

    ``U = [c_1 U_1 | c_2 U_2 | ...]`` and ``V = [V_1; V_2; ...]``: the sum of products is one
    product of concatenated factors (block matrix multiplication).

    Args:
        terms: ``(U_i [m, r_i], V_i [r_i, n], c_i)`` for each term.

    Example:
        >>> a, b = np.ones((3, 1)), np.ones((1, 2))
        >>> U, V = stack_factors([(a, b, 2.0), (a, b, -1.0)])
        >>> (U @ V).tolist()
        [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    """
    U = np.concatenate([np.asarray(u, np.float64) * c for u, _, c in terms], axis=1)
    V = np.concatenate([np.asarray(v, np.float64) for _, v, _ in terms], axis=0)
    return U, V


def split_scalar(c: float) -> tuple[float, float]:
    """``(c_up, c_down)`` with ``c_up * c_down = c``; ``c_down`` a power of two near ``sqrt|c|``.

    Scaling a factor by a power of two is exact in binary floating point, so ``down`` takes no
    rounding and ``up`` one; splitting the magnitude keeps fp16 factors away from underflow and
    overflow when ``c`` is far from 1 (diffusers splits kohya's alpha / r the same way). The
    sign goes to ``up``.

    Example:
        >>> split_scalar(1 / 64)
        (0.125, 0.125)
        >>> split_scalar(-8.0)
        (-2.0, 4.0)
    """
    if c == 0 or not np.isfinite(c):
        return float(c), 1.0
    down = 2.0 ** round(np.log2(abs(c)) / 2)
    return c / down, down
