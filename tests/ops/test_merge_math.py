"""merge_math: the float32 arithmetic of a merge, against exact rationals and torch's kernels."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from lora_tools.ops.merge_math import fma_product, fma_round, lane_norm


def _round_f32(x: Fraction) -> np.float32:
    """The float32 nearest to an exact rational (ties to even)."""
    guess = np.float32(float(x))
    cands = [
        np.nextafter(guess, np.float32(-np.inf)),
        guess,
        np.nextafter(guess, np.float32(np.inf)),
    ]
    best = min(cands, key=lambda c: (abs(Fraction(float(c)) - x), int(c.view(np.uint32)) & 1))
    return np.float32(best)


def test_fma_round_corrects_double_rounding() -> None:
    # acc + a*b = 1 + 2^-24 + 2^-70: the float64 sum lands on the float32 midpoint 1 + 2^-24 and
    # would round to even (1.0); a fused multiply-add rounds up to 1 + 2^-23.
    acc = np.array([1 + 2.0**-23], np.float32)
    a = np.array([1 + 2.0**-23], np.float32)
    b = np.array([-(2.0**-24 - 2.0**-47)], np.float32)
    exact = Fraction(float(acc[0])) + Fraction(float(a[0])) * Fraction(float(b[0]))
    assert fma_round(acc, a, b)[0] == _round_f32(exact) == np.float32(1 + 2.0**-23)
    naive = (acc.astype(np.float64) + a.astype(np.float64) * b.astype(np.float64)).astype(
        np.float32
    )
    assert naive[0] == np.float32(1.0)  # the case really is one where double rounding errs


def test_fma_round_random_matches_exact_rounding() -> None:
    rng = np.random.default_rng(1)
    acc, a, b = (rng.standard_normal(300).astype(np.float32) for _ in range(3))
    got = fma_round(acc, a, b)
    for i in range(300):
        exact = Fraction(float(acc[i])) + Fraction(float(a[i])) * Fraction(float(b[i]))
        assert got[i] == _round_f32(exact)


@pytest.mark.oracle
@pytest.mark.parametrize("m,r,n", [(32, 4, 32), (96, 8, 33), (700, 16, 300), (128, 64, 200)])
def test_fma_product_equals_torch_cpu_matmul(m: int, r: int, n: int) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(m + r + n)
    up = (rng.standard_normal((m, r)) * 0.1).astype(np.float32)
    down = (rng.standard_normal((r, n)) * 0.1).astype(np.float32)
    ref = (torch.from_numpy(up) @ torch.from_numpy(down)).numpy()
    assert np.array_equal(fma_product(up, down), ref)
    # numpy's own matmul sums in another order: the emulation is what makes the bytes agree
    assert fma_product(up, down).dtype == np.float32


@pytest.mark.oracle
@pytest.mark.parametrize("n", [8, 32, 96, 2048, 5632])
def test_lane_norm_equals_torch_linalg_norm(n: int) -> None:
    # Row lengths that are multiples of 8 (every transformer hidden size); for other lengths
    # torch's remainder handling is not reproduced bit for bit (see merge_math.lane_norm).
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((64, n)) * 0.1).astype(np.float32)
    ref = torch.linalg.norm(torch.from_numpy(x), dim=1).numpy()
    assert np.array_equal(lane_norm(x), ref)
