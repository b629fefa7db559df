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
