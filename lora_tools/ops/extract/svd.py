"""The optimal rank-k approximation of one dense difference ``dW``, with a certificate.

:func:`truncate` returns the factors ``up @ down`` of a rank-k approximation of ``A = dW``
(``[m, n]``, a convolution flattened to ``[out, in * kh * kw]``) and how far it is from the
Eckart-Young optimum ``e_opt = sqrt(sum_{i > k} s_i^2)``:

1. A randomized range finder (Halko, Martinsson and Tropp 2011, algorithms 4.4 and 5.1):
   ``Q`` = an orthonormal basis of ``(A A^T)^q A Omega`` (``Omega`` Gaussian ``[n, l]``,
   ``l = k + OVERSAMPLE``, ``q = POWER_ITERATIONS``), ``B = Q^T A = Ub diag(t) Vh``; the
   approximation is ``(Q Ub_k) diag(t_k) Vh_k``. Its error is exact, not estimated:
   ``e^2 = ||A||_F^2 - sum_{i <= k} t_i^2`` (``A - Q B_k`` splits into two orthogonal parts).
2. A certificate that ``e <= (1 + tol) e_opt`` (docs/math.md, "extract"): the Ritz values
   ``t_i^2`` are eigenvalues of ``H = Q^T A A^T Q``; the true ``s_i^2`` are eigenvalues of
   ``M = A A^T = [[H, E^T], [E, K]]`` in the basis ``[Q, Q_perp]``. With ``||E||_F`` measured
   (one more product) and ``kappa >= ||K||_2`` (power iterations on the residual, inflated; a
   probabilistic bound), Weyl's and Li and Li's quadratic residual bounds give
   ``0 <= s_i^2 - t_i^2 <= min(||E||, 2 ||E||^2 / (d_i + sqrt(d_i^2 + 4 ||E||^2)))`` with
   ``d_i = t_i^2 - kappa > 0``, hence a lower bound of ``e_opt``.
3. Where the certificate fails (no gap above the residual, or too little precision), the dense
   SVD in float64: exact.

The same code runs on numpy (LAPACK / BLAS) and on torch (``cuda`` or ``cpu``): the Gaussian
test matrices come from numpy's generator in both, so both compute the same approximation to
within their rounding.

Example:
    >>> rng = np.random.default_rng(0)
    >>> A = rng.normal(size=(80, 6)) @ rng.normal(size=(6, 120)) + 1e-3 * rng.normal(size=(80, 120))
    >>> t = truncate(A.astype(np.float32), rank=6)
    >>> t.method, t.rank, t.certified
    ('randomized', 6, True)
    >>> s = np.linalg.svd(A.astype(np.float32).astype(np.float64), compute_uv=False)
    >>> bool(abs(t.relative_error / (np.sqrt(np.sum(s[6:] ** 2) / np.sum(s**2))) - 1) < 1e-3)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from lora_tools.lowrank import select_rank

#: Columns the range finder samples beyond the rank (HMT section 4.2).
OVERSAMPLE = 10
#: Subspace iterations of the range finder (HMT algorithm 4.4).
POWER_ITERATIONS = 2
#: A sketch wider than this fraction of ``min(m, n)`` costs about a dense SVD: take that.
DENSE_FRACTION = 0.5
#: How far the approximation's error may be from the optimum: ``e <= (1 + TOLERANCE) e_opt``.
TOLERANCE = 1e-3
#: Differences of the error below this fraction of ``||dW||_F`` are not told apart (the
#: float32 products, and the rounding of the factors to the output dtype, are larger).
ERROR_FLOOR = 1e-6
#: Power iterations and start vectors of the estimate of ``||K||_2`` (the residual's top
#: eigenvalue), and the factor it is inflated by (``1 / (1 - eps)``, ``eps = 3/4``).
RESIDUAL_PRODUCTS = 3
RESIDUAL_VECTORS = 16
RESIDUAL_EPS = 0.9

#: Relative uncertainty, in float32 epsilons, of an energy computed from float32 products.
ROUNDING_EPS = 16

RANDOMIZED = "randomized"
EXACT = "exact"


@dataclass(frozen=True)
class Truncation:
    """A rank-k approximation ``up @ down`` of a dense difference and how good it is.

    Attributes:
        up: ``[m, k]`` (``U_k sqrt(S_k)``), in the working dtype.
        down: ``[k, n]`` (``sqrt(S_k) Vh_k``).
        S: the kept singular values (Ritz values for a sketch), float64.
        frobenius: ``||dW||_F``.
        relative_error: ``||dW - up @ down||_F / ||dW||_F`` (exact for both methods, before
            the factors are rounded to the output dtype).
        retained_energy: ``||up @ down||_F^2 / ||dW||_F^2``.
        method: :data:`RANDOMIZED` or :data:`EXACT` (dense SVD).
        excess_bound: certified ``e / e_opt - 1`` (0 for the exact SVD).
        failure_probability: the chance the certificate's residual bound is wrong (over the
            Gaussian vectors of the power iterations; 0 for the exact SVD).
        precision: ``float32`` or ``float64``, the arithmetic of the SVD.
    """

    up: np.ndarray
    down: np.ndarray
    S: np.ndarray
    frobenius: float
    relative_error: float
    retained_energy: float
    method: str
    excess_bound: float
    failure_probability: float
    precision: str

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])

    @property
    def certified(self) -> bool:
        return self.excess_bound <= TOLERANCE


# -- backends ---------------------------------------------------------------------------------


class NumpyBackend:
    """numpy arrays and LAPACK: the default."""

    name = "cpu"

    def asarray(self, a: np.ndarray, dtype: Any) -> np.ndarray:
        return np.asarray(a, dtype=dtype)

    def gaussian(self, rng: np.random.Generator, shape: tuple[int, int], like: Any) -> Any:
        return rng.standard_normal(shape).astype(like.dtype)

    def qr(self, x: Any) -> Any:
        return np.linalg.qr(x)[0]

    def sumsq(self, x: Any) -> float:
        """``sum(x^2)`` accumulated in float64."""
        return float(np.einsum("ij,ij->", x, x, dtype=np.float64))

    def colsumsq(self, x: Any) -> np.ndarray:
        x64 = np.asarray(x, dtype=np.float64)
        return np.einsum("ij,ij->j", x64, x64)

    def numpy64(self, x: Any) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)

    def numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def dense_svd(self, a: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.linalg.svd(np.asarray(a, dtype=np.float64), full_matrices=False)

    def vcat(self, parts: list[Any]) -> Any:
        return np.concatenate(parts, axis=0)


class TorchBackend:
    """torch tensors on a device (``cuda:N``, or ``cpu`` for checking the torch path)."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.name = device
        self.device = torch.device(device)

    def _dtype(self, dtype: Any) -> Any:
        return self.torch.float64 if np.dtype(dtype) == np.float64 else self.torch.float32

    def asarray(self, a: np.ndarray, dtype: Any) -> Any:
        t = self.torch.from_numpy(np.ascontiguousarray(a))
        return t.to(device=self.device, dtype=self._dtype(dtype))

    def gaussian(self, rng: np.random.Generator, shape: tuple[int, int], like: Any) -> Any:
        g = rng.standard_normal(shape)
        return self.torch.from_numpy(g).to(device=self.device, dtype=like.dtype)

    def qr(self, x: Any) -> Any:
        return self.torch.linalg.qr(x).Q

    def sumsq(self, x: Any, rows_per_block: int = 1024) -> float:
        total = 0.0
        for start in range(0, x.shape[0], rows_per_block):
            block = x[start : start + rows_per_block].to(self.torch.float64)
            total += float((block * block).sum())
        return total

    def colsumsq(self, x: Any) -> np.ndarray:
        x64 = x.to(self.torch.float64)
        return (x64 * x64).sum(dim=0).cpu().numpy()

    def numpy64(self, x: Any) -> np.ndarray:
        return x.to(self.torch.float64).cpu().numpy()

    def numpy(self, x: Any) -> np.ndarray:
        return x.cpu().numpy()

    def dense_svd(self, a: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u, s, vh = self.torch.linalg.svd(a.to(self.torch.float64), full_matrices=False)
        return u.cpu().numpy(), s.cpu().numpy(), vh.cpu().numpy()

    def vcat(self, parts: list[Any]) -> Any:
        return self.torch.cat(parts, dim=0)


Backend = NumpyBackend | TorchBackend


# -- the matrix, resident or streamed in row blocks ----------------------------------------

#: Bytes of one row block converted (float32 -> float64) or read from disk at a time.
BLOCK_BYTES = 8 << 20

BlockSource = Callable[[Any], Iterator[tuple[int, np.ndarray]]]


class Rows:
    """A matrix ``[m, n]`` as row blocks: resident (one ndarray) or streamed (``blocks(dtype)``
    yields ``(first row, block)`` in order, read anew on every pass, so the whole matrix is
    never in memory).

    Every product the SVD takes is a sum or a stack over row blocks: ``S @ X`` stacks
    ``S_b @ X``; ``S^T @ Y`` sums ``S_b^T @ Y_b``; ``||S||_F^2`` sums the blocks'.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        array: np.ndarray | None = None,
        blocks: BlockSource | None = None,
        dtype: Any = np.float32,
    ) -> None:
        if (array is None) == (blocks is None):
            raise ValueError("give exactly one of array and blocks")
        self.shape = (int(shape[0]), int(shape[1]))
        self.array = None if array is None else np.ascontiguousarray(array)
        self._blocks = blocks
        self.dtype = np.dtype(self.array.dtype if self.array is not None else dtype)

    @classmethod
    def of(cls, a: np.ndarray) -> Rows:
        return cls(a.shape, array=a)

    @property
    def resident(self) -> bool:
        return self.array is not None

    def blocks(self, dtype: Any) -> Iterator[tuple[int, np.ndarray]]:
        """Row blocks in ``dtype``: the resident array itself when it already has it."""
        dtype = np.dtype(dtype)
        if self.array is None:
            assert self._blocks is not None
            yield from self._blocks(dtype)
            return
        if self.array.dtype == dtype:
            yield 0, self.array
            return
        rows = _rows_per_block(self.shape[1], dtype.itemsize)
        for start in range(0, self.shape[0], rows):
            yield start, self.array[start : start + rows].astype(dtype)


def _rows_per_block(n: int, itemsize: int) -> int:
    return max(1, BLOCK_BYTES // max(1, n * itemsize))


class _Op:
    """The oriented matrix ``A`` (``S`` or ``S^T`` for the stored ``S``), on a backend, in the
    working dtype: the products the sketch takes, block by block over ``S``'s rows."""

    def __init__(self, source: Rows, flip: bool, be: Backend, dtype: Any) -> None:
        self.source, self.flip, self.be = source, flip, be
        self.np_dtype = np.dtype(dtype)
        self.like = be.asarray(np.zeros((1, 1)), dtype)
        m, n = source.shape
        self.shape = (n, m) if flip else (m, n)
        self._device = None
        if isinstance(be, TorchBackend) and source.resident:
            # a resident matrix goes to the device once, in the working dtype
            assert source.array is not None
            self._device = be.asarray(source.array, dtype)

    def _blocks(self) -> Iterator[tuple[int, Any]]:
        if self._device is not None:
            yield 0, self._device
            return
        for start, block in self.source.blocks(self.np_dtype):
            yield start, self.be.asarray(block, self.np_dtype)

    def _stack(self, X: Any) -> Any:
        """``S @ X``."""
        parts = [block @ X for _, block in self._blocks()]
        return parts[0] if len(parts) == 1 else self.be.vcat(parts)

    def _sum(self, Y: Any) -> Any:
        """``S^T @ Y``."""
        acc = None
        for start, block in self._blocks():
            part = block.T @ Y[start : start + block.shape[0]]
            acc = part if acc is None else acc + part
        assert acc is not None
        return acc

    def dot(self, X: Any) -> Any:
        """``A @ X``."""
        return self._sum(X) if self.flip else self._stack(X)

    def tdot(self, Y: Any) -> Any:
        """``A^T @ Y``."""
        return self._stack(Y) if self.flip else self._sum(Y)

    def sumsq(self) -> float:
        return sum(self.be.sumsq(block) for _, block in self._blocks())

    def whole(self) -> Any:
        """The oriented matrix whole (the dense SVD's input; a streamed one is read in)."""
        if self._device is not None:
            whole = self._device
        elif self.source.resident:
            assert self.source.array is not None
            whole = self.be.asarray(self.source.array, self.np_dtype)
        else:
            whole = self.be.vcat([block for _, block in self._blocks()])
        return whole.T if self.flip else whole


def residual_error(source: Rows, up: np.ndarray, down: np.ndarray, transposed: bool) -> float:
    """``||A - up @ down||_F`` in float64, row block by row block of the stored ``S``
    (``A = S^T`` when ``transposed``): the error of factors as they are (e.g. rounded)."""
    up64, down64 = np.asarray(up, np.float64), np.asarray(down, np.float64)
    # in S's orientation: S ~ L @ R
    L, R = (down64.T, up64.T) if transposed else (up64, down64)
    total = 0.0
    for start, block in source.blocks(np.float64):
        r = np.array(block, np.float64, copy=True)  # a resident block may be the matrix
        r -= L[start : start + block.shape[0]] @ R
        total += float(np.einsum("ij,ij->", r, r))
    return math.sqrt(total)


# -- the certificate ----------------------------------------------------------------------------


def residual_failure_probability(dim: int) -> float:
    """Chance that ``kappa = max_j mu_j / (1 - eps)`` is below ``||K||_2``: each of the
    :data:`RESIDUAL_VECTORS` power iterations from a uniformly random start fails with
    probability at most ``0.824 sqrt(dim) (1 - eps)^(t - 1/2)`` after ``t`` products
    (Kuczynski and Wozniakowski 1992); the starts are independent."""
    one = 0.824 * math.sqrt(max(dim, 1)) * (1 - RESIDUAL_EPS) ** (RESIDUAL_PRODUCTS - 0.5)
    return min(1.0, one) ** RESIDUAL_VECTORS


def excess_bounds(theta: np.ndarray, eta2: float, kappa: float) -> np.ndarray:
    """``b_i >= s_i^2 - t_i^2`` for each Ritz value ``theta_i = t_i^2`` (inf without a gap).

    Weyl: ``|lambda_i(M) - lambda_i(D)| <= ||E||_2 <= eta``; Li and Li (2005): ``<= 2 eta^2 /
    (d_i + sqrt(d_i^2 + 4 eta^2))`` with ``d_i`` the distance of ``theta_i`` to the spectrum
    of ``K`` (at least ``theta_i - kappa``). ``lambda_i(D) = theta_i`` needs ``theta_i >
    kappa >= ||K||_2``.
    """
    eta = math.sqrt(max(eta2, 0.0))
    gap = theta - kappa
    out = np.full(theta.shape, np.inf)
    live = gap > 0
    quad = 2 * eta2 / (gap[live] + np.sqrt(gap[live] ** 2 + 4 * eta2))
    out[live] = np.minimum(eta, quad)
    return out


def _sketch(
    A: _Op, width: int, be: Backend, seed: int
) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, float, float]:
    """``(Q, Ub, t, Vh, eta2, kappa)`` of a width-``width`` sketch of ``A`` (``[m, n]``).

    Passes over ``A`` (each one row block at a time, :class:`_Op`): ``2 q + 1`` for the range
    finder, then two that also start the residual's power iterations (``A^T [Q | X]`` gives
    ``B^T`` and ``R^T X``; ``A [B^T | W]`` gives the coupling ``E`` and the next iterate),
    then two per further power iteration.
    """
    rng = np.random.default_rng(seed)
    dtype = A.np_dtype
    Q = be.qr(A.dot(be.gaussian(rng, (A.shape[1], width), A.like)))
    for _ in range(POWER_ITERATIONS):
        Q = be.qr(A.dot(be.qr(A.tdot(Q))))
    X = be.gaussian(rng, (A.shape[0], RESIDUAL_VECTORS), A.like)
    X = _unit_columns(X - Q @ (Q.T @ X), be, dtype)
    # the residual R = (I - Q Q^T) A has R^T x = A^T x for x orthogonal to Q
    both = A.tdot(_hcat(be, Q, X))
    Bt, W = both[:, :width], both[:, width:]
    B64 = be.numpy64(Bt).T
    Ub, t, Vh = np.linalg.svd(B64, full_matrices=False)
    mu = be.colsumsq(W)  # x^T R R^T x for unit x: the first power step
    both = A.dot(_hcat(be, Bt, W))
    F, X = both[:, :width], both[:, width:]
    # E^T = (I - Q Q^T) A B^T: the coupling of range(Q) with the rest
    F = F - Q @ (Q.T @ F)
    eta2 = be.sumsq(F)
    for _ in range(RESIDUAL_PRODUCTS - 1):
        X = _unit_columns(X - Q @ (Q.T @ X), be, dtype)
        W = A.tdot(X)
        mu = be.colsumsq(W)
        X = A.dot(W)
    kappa = float(mu.max(initial=0.0)) / (1 - RESIDUAL_EPS)
    return Q, Ub, t, Vh, eta2, kappa


def _unit_columns(X: Any, be: Backend, dtype: Any) -> Any:
    norms = np.sqrt(be.colsumsq(X))
    norms[norms == 0] = 1.0
    return X / be.asarray(norms, dtype)


def _hcat(be: Backend, a: Any, b: Any) -> Any:
    if isinstance(be, TorchBackend):
        return be.torch.cat([a, b], dim=1)
    return np.concatenate([a, b], axis=1)


def _excess_ratio(err2_high: float, opt2_low: float, frob: float) -> float:
    """The certified ``e / e_opt - 1`` from an upper bound of ``e^2`` and a lower bound of
    ``e_opt^2``; 0 when the error itself is below the floor."""
    if err2_high <= (ERROR_FLOOR * frob) ** 2:
        return 0.0
    if opt2_low <= 0:
        return math.inf
    return max(math.sqrt(err2_high / opt2_low) - 1, 0.0)


@dataclass(frozen=True)
class _Rule:
    rank: int | None
    energy: float | None
    min_rank: int
    max_rank: int | None


def _choose_certified(
    theta: np.ndarray, bounds: np.ndarray, total: float, rule: _Rule, dim: int
) -> int | None:
    """The rank the rule picks, when the sketch proves it; None when it cannot."""
    if rule.rank is not None:
        k = min(rule.rank, dim, len(theta))
        live = int(np.count_nonzero(theta > theta[0] * dim * np.finfo(np.float64).eps))
        return max(1, min(k, live))
    assert rule.energy is not None
    lo = max(1, rule.min_rank)
    hi = dim if rule.max_rank is None else max(lo, min(rule.max_rank, dim))
    lo = min(lo, hi)
    target = rule.energy * total * (1 - 1e-12)
    lower = np.cumsum(theta)  # sum_{i<=k} t_i^2 <= sum_{i<=k} s_i^2
    upper = lower + np.cumsum(bounds)
    found = np.flatnonzero(lower >= target)
    k_hat = int(found[0]) + 1 if found.size else None
    if k_hat is not None and k_hat <= lo:
        return lo
    if hi - 1 <= len(theta) and hi >= 2 and upper[hi - 2] < target:
        return hi  # even rank hi - 1 keeps less than the target: the rule wants hi or more
    if k_hat is not None and k_hat <= hi and (k_hat == 1 or upper[k_hat - 2] < target):
        return k_hat
    return None


def truncate(
    A: np.ndarray | Rows,
    *,
    rank: int | None = None,
    energy: float | None = None,
    min_rank: int = 1,
    max_rank: int | None = None,
    backend: Backend | None = None,
    seed: int = 0,
    exact: bool = False,
    tolerance: float = TOLERANCE,
    transposed: bool = False,
) -> Truncation:
    """The optimal rank-k approximation of ``A`` (``[m, n]``, float32 or float64).

    ``rank`` fixes k; ``energy`` E picks the smallest k keeping ``E * ||A||_F^2``, clamped to
    ``[min_rank, max_rank]``. The randomized SVD is used where its certificate shows
    ``e <= (1 + tolerance) e_opt`` (or the difference is below :data:`ERROR_FLOOR`), the
    dense float64 SVD otherwise (and with ``exact``).

    Args:
        A: the difference, 2-D: an array (a transposed view is not copied), or :class:`Rows`
            (streamed in row blocks: only blocks of it are ever in memory, but for the dense
            fallback).
        rank, energy, min_rank, max_rank: the rule (exactly one of ``rank`` / ``energy``).
        backend: :class:`NumpyBackend` (default) or :class:`TorchBackend`.
        seed: seed of the Gaussian test matrices.
        exact: always take the dense SVD.
        tolerance: the certificate's relative tolerance.
        transposed: approximate ``A^T`` instead (the factors are those of ``A^T``).

    Returns:
        A :class:`Truncation` with ``up`` ``[m, k]`` and ``down`` ``[k, n]``.
    """
    if (rank is None) == (energy is None):
        raise ValueError("exactly one of rank and energy is needed")
    be = backend or NumpyBackend()
    rule = _Rule(rank, energy, min_rank, max_rank)
    if isinstance(A, np.ndarray):
        if not A.flags.c_contiguous and A.T.flags.c_contiguous:
            A, transposed = A.T, not transposed  # the stored rows, read in order
        source = Rows.of(A if A.dtype in (np.float32, np.float64) else A.astype(np.float32))
    else:
        source = A
    m, n = source.shape[::-1] if transposed else source.shape
    flip = m > n  # sketch the short side: Q is [min(m, n), l]
    dim = min(m, n)
    work64 = source.dtype == np.float64
    # the oriented A is S (stored) or S^T; the sketch works on its short side
    swap = flip != transposed
    Aw = _Op(source, swap, be, np.float64 if work64 else np.float32)
    total = Aw.sumsq()
    frob = math.sqrt(total)
    if total == 0 or exact:
        return _dense(Aw, be, rule, total, flip)
    guess = rank if rank is not None else max(min_rank, 8)
    while True:
        width = min(guess + OVERSAMPLE, dim)
        if width > DENSE_FRACTION * dim:
            return _dense(Aw, be, rule, total, flip)
        Q, Ub, t, Vh, eta2, kappa = _sketch(Aw, width, be, seed)
        theta = t**2
        bounds = excess_bounds(theta, eta2, kappa)
        k = _choose_certified(theta, bounds, total, rule, dim)
        if k is None:
            if rank is not None:
                return _dense(Aw, be, rule, total, flip)
            guess *= 2
            continue
        err2 = max(total - float(np.sum(theta[:k])), 0.0)
        excess = min(float(np.sum(bounds[:k])), k * kappa)
        # float32 products leave a few eps of each captured energy uncertain
        rounding = 0.0 if work64 else ROUNDING_EPS * np.finfo(np.float32).eps * total
        ratio = _excess_ratio(err2 + rounding, err2 - rounding - excess, frob)
        if (
            ratio > tolerance
            and not work64
            and _excess_ratio(err2, err2 - excess, frob) <= (tolerance / 2)
        ):
            work64 = True  # the spectrum needs more digits than float32 keeps
            Aw = _Op(source, swap, be, np.float64)
            continue
        if ratio > tolerance:
            if rank is not None or width >= DENSE_FRACTION * dim:
                return _dense(Aw, be, rule, total, flip)
            guess *= 2
            continue
        Sk = t[:k]
        root = np.sqrt(Sk)
        left = Q @ be.asarray(Ub[:, :k] * root, np.float64 if work64 else np.float32)
        up = be.numpy(left)
        down = (Vh[:k] * root[:, None]).astype(up.dtype)
        up, down = (down.T, up.T) if flip else (up, down)
        return Truncation(
            up=np.ascontiguousarray(up),
            down=np.ascontiguousarray(down),
            S=Sk,
            frobenius=frob,
            relative_error=math.sqrt(err2 / total),
            retained_energy=min(float(np.sum(theta[:k])) / total, 1.0),
            method=RANDOMIZED,
            excess_bound=ratio,
            failure_probability=residual_failure_probability(dim),
            precision="float64" if work64 else "float32",
        )


def _dense_rank(S: np.ndarray, rule: _Rule, total: float) -> int:
    dim = len(S)
    if total == 0:
        return 1
    if rule.rank is not None:
        live = int(np.count_nonzero(S[0] * dim * np.finfo(np.float64).eps < S))
        return max(1, min(rule.rank, live))
    return select_rank(S, energy=rule.energy, min_rank=rule.min_rank, max_rank=rule.max_rank)


def _dense(Aw: _Op, be: Backend, rule: _Rule, total: float, flip: bool) -> Truncation:
    """The dense float64 SVD: exact (Eckart-Young), for any rule. A streamed matrix whose
    short side is the stored columns (an embedding, lm_head) takes :func:`_gram` instead, which
    never holds it whole."""
    if not Aw.source.resident and Aw.flip and total > 0:
        return _gram(Aw, rule, total, flip)
    u, S, vh = be.dense_svd(Aw.whole())
    k = _dense_rank(S, rule, total)
    root = np.sqrt(S[:k])
    up, down = u[:, :k] * root, vh[:k] * root[:, None]
    up, down = (down.T, up.T) if flip else (up, down)
    kept = float(np.sum(S[:k] ** 2))
    tail = float(np.sum(S[k:] ** 2))
    energy = sum(S**2)
    return Truncation(
        up=np.ascontiguousarray(up),
        down=np.ascontiguousarray(down),
        S=S[:k],
        frobenius=math.sqrt(total),
        relative_error=math.sqrt(tail / energy) if energy > 0 else 0.0,
        retained_energy=kept / energy if energy > 0 else 1.0,
        method=EXACT,
        excess_bound=0.0,
        failure_probability=0.0,
        precision="float64",
    )


def _gram(Aw: _Op, rule: _Rule, total: float, flip: bool) -> Truncation:
    """The exact truncation of a streamed ``A = S^T`` (``[m, n]``, ``m`` the stored columns)
    from the float64 Gram matrix ``G = A A^T = sum_b S_b^T S_b`` (``[m, m]``, one pass):
    ``G = W diag(s^2) W^T``; the approximation is the projection ``W_k W_k^T A`` (one more
    pass, ``P = A^T W_k = S W_k``), whose error ``||A||_F^2 - ||P||_F^2`` is exact. Its
    distance to the optimum is at rounding level: ``e^2 - e_opt^2 <= delta = 4 k n eps s_1^2``
    (the eigensolver is backward stable; the Gram sum over ``n`` rows), reported as the
    excess bound."""
    m, n = Aw.shape
    G = np.zeros((m, m))
    for _, block in Aw.source.blocks(np.float64):
        G += block.T @ block
    lam, W = np.linalg.eigh(G)
    lam, W = lam[::-1], W[:, ::-1]
    S = np.sqrt(np.clip(lam, 0.0, None))
    k = _dense_rank(S, rule, total)
    Wk = np.ascontiguousarray(W[:, :k])
    P = np.empty((n, k))
    for start, block in Aw.source.blocks(np.float64):
        P[start : start + block.shape[0]] = block @ Wk
    kept = float(np.einsum("ij,ij->", P, P))
    err2 = max(total - kept, 0.0)
    root = np.sqrt(S[:k])
    live = root > 0
    inv = np.where(live, 1 / np.where(live, root, 1.0), 0.0)
    up, down = Wk * root, (P * inv).T  # A ~ (W_k sqrt(s)) (diag(1/sqrt(s)) P^T)
    up, down = (down.T, up.T) if flip else (up, down)
    delta = 4 * k * n * np.finfo(np.float64).eps * float(lam[0])
    return Truncation(
        up=np.ascontiguousarray(up),
        down=np.ascontiguousarray(down),
        S=S[:k],
        frobenius=math.sqrt(total),
        relative_error=math.sqrt(err2 / total),
        retained_energy=min(kept / total, 1.0),
        method=EXACT,
        excess_bound=_excess_ratio(err2, err2 - delta, math.sqrt(total)),
        failure_probability=0.0,
        precision="float64",
    )


__all__ = [
    "EXACT",
    "RANDOMIZED",
    "NumpyBackend",
    "Rows",
    "TorchBackend",
    "Truncation",
    "excess_bounds",
    "residual_error",
    "residual_failure_probability",
    "truncate",
]
