"""The certified truncated SVD of ``extract`` against numpy's float64 SVD (the exact optimum)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lora_tools.lowrank import relative_error, select_rank
from lora_tools.ops.extract import svd
from lora_tools.ops.extract.svd import EXACT, RANDOMIZED, truncate


def knee(m: int, n: int, rank: int, noise: float, seed: int, decay: float = 4.0) -> np.ndarray:
    """A planted rank-``rank`` update with a decaying spectrum plus full-rank noise (a knee)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    s = np.exp(-np.arange(rank) / decay)
    return ((u * s) @ v.T + noise * rng.standard_normal((m, n))).astype(np.float32)


def reference(A: np.ndarray) -> np.ndarray:
    return np.linalg.svd(A.astype(np.float64), compute_uv=False)


def measured_error(A: np.ndarray, t: svd.Truncation) -> float:
    A64 = A.astype(np.float64)
    return float(np.linalg.norm(A64 - t.up.astype(np.float64) @ t.down) / np.linalg.norm(A64))


@pytest.mark.parametrize(
    ("shape", "rank", "noise"),
    [((96, 240), 6, 1e-3), ((240, 96), 8, 1e-3), ((128, 128), 4, 1e-4), ((80, 400), 10, 5e-4)],
)
def test_randomized_is_within_tolerance_of_the_optimum(shape, rank, noise) -> None:
    A = knee(*shape, rank=12, noise=noise, seed=sum(shape) + rank)
    t = truncate(A, rank=rank)
    S = reference(A)
    optimum = relative_error(S, rank)
    assert t.method == RANDOMIZED and t.rank == rank and t.certified
    # the reported error is the real one, and the real one is near-optimal
    assert measured_error(A, t) == pytest.approx(t.relative_error, rel=1e-4)
    assert optimum <= t.relative_error * (1 + 1e-6)
    assert t.relative_error <= optimum * (1 + svd.TOLERANCE)
    # the certificate is honest: the true excess is below the certified one
    assert t.relative_error / optimum - 1 <= t.excess_bound + 1e-6
    assert up_down_split_evenly(t)


def up_down_split_evenly(t: svd.Truncation) -> bool:
    """``up = U sqrt(S)``, ``down = sqrt(S) Vh``: both factors have column / row norms sqrt(S)."""
    return bool(
        np.allclose(np.linalg.norm(t.up, axis=0), np.sqrt(t.S), rtol=1e-4)
        and np.allclose(np.linalg.norm(t.down, axis=1), np.sqrt(t.S), rtol=1e-4)
    )


def test_a_flat_spectrum_cannot_be_certified_and_falls_back_to_the_exact_svd() -> None:
    A = np.random.default_rng(3).standard_normal((100, 200)).astype(np.float32)
    t = truncate(A, rank=5)
    S = reference(A)
    assert t.method == EXACT and t.excess_bound == 0
    assert t.relative_error == pytest.approx(relative_error(S, 5), rel=1e-9)
    assert measured_error(A, t) == pytest.approx(relative_error(S, 5), rel=1e-5)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 0.999])
def test_the_energy_rule_picks_the_reference_rank(energy: float) -> None:
    A = knee(120, 300, rank=10, noise=1e-4, seed=7, decay=2.0)
    S = reference(A)
    want = select_rank(S, energy=energy)
    t = truncate(A, energy=energy)
    assert t.rank == want
    cum = np.cumsum(S**2) / np.sum(S**2)
    assert t.retained_energy >= energy * (1 - 1e-9) and (want == 1 or cum[want - 2] < energy)


def test_energy_is_clamped_to_the_rank_bounds() -> None:
    A = knee(120, 300, rank=10, noise=1e-4, seed=7, decay=2.0)
    assert truncate(A, energy=0.5, min_rank=3).rank == 3
    assert truncate(A, energy=0.999, max_rank=2).rank == 2


def test_a_rank_above_the_update_s_rank_gives_that_rank() -> None:
    rng = np.random.default_rng(1)
    A = (rng.standard_normal((60, 3)) @ rng.standard_normal((3, 90))).astype(np.float64)
    t = truncate(A, rank=8)
    assert t.rank == 3 and t.relative_error < 1e-7


def test_small_errors_switch_the_sketch_to_float64() -> None:
    A = knee(100, 250, rank=6, noise=1e-7, seed=5)
    t = truncate(A, rank=6)
    optimum = relative_error(reference(A), 6)
    assert t.relative_error <= optimum * (1 + svd.TOLERANCE) + svd.ERROR_FLOOR
    assert t.precision == "float64" or t.method == EXACT


def test_the_torch_cpu_path_gives_the_numpy_result() -> None:
    pytest.importorskip("torch")
    A = knee(96, 240, rank=12, noise=1e-3, seed=11)
    a = truncate(A, rank=6)
    b = truncate(A, rank=6, backend=svd.TorchBackend("cpu"))
    assert b.method == a.method == RANDOMIZED
    assert b.relative_error == pytest.approx(a.relative_error, rel=1e-5)
    np.testing.assert_allclose(b.up @ b.down, a.up @ a.down, atol=1e-5 * np.abs(A).max())


def test_excess_bounds_follow_weyl_and_the_quadratic_bound() -> None:
    theta = np.array([4.0, 1.0, 0.05])
    b = svd.excess_bounds(theta, eta2=0.01, kappa=0.1)
    assert b[0] == pytest.approx(2 * 0.01 / (3.9 + math.sqrt(3.9**2 + 0.04)))
    assert b[1] == pytest.approx(2 * 0.01 / (0.9 + math.sqrt(0.81 + 0.04)))
    assert math.isinf(b[2])  # no gap above the residual: nothing certified
    assert svd.residual_failure_probability(4096) < 1e-12
