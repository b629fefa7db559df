"""merge.arithmetic: the float32 arithmetic of a merge, against exact rationals, float64 and torch."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from lora_tools.ops.merge.arithmetic import (
    PRODUCT_ROWS,
    LowRankTerm,
    apply_terms,
    column_norm,
    fma_round,
    lane_norm,
    product_rows,
    term_delta,
)


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


@pytest.mark.parametrize("m,r,n", [(64, 4, 32), (300, 16, 64), (1000, 64, 200), (130, 7, 45)])
def test_product_rows_is_within_float32_summation_error(m: int, r: int, n: int) -> None:
    # every element is a float32 sum of r exact products: within r * 2^-24 * sum|u_k v_k| of
    # the exact value (the float64 product of the same float32 numbers is exact enough)
    rng = np.random.default_rng(m + r + n)
    up = (rng.standard_normal((m, r)) * 0.1).astype(np.float32)
    down = (rng.standard_normal((r, n)) * 0.1).astype(np.float32)
    got = product_rows(up, down, np.empty((m, n), np.float32)).astype(np.float64)
    exact = up.astype(np.float64) @ down.astype(np.float64)
    bound = (r + 1) * 2.0**-24 * (np.abs(up).astype(np.float64) @ np.abs(down).astype(np.float64))
    assert np.all(np.abs(got - exact) <= bound)


def test_product_does_not_depend_on_the_row_block() -> None:
    # the bytes of a merge must not depend on --block size: blocks start at multiples of
    # PRODUCT_ROWS, and each BLAS call covers the same rows whatever the block
    rng = np.random.default_rng(5)
    m, r, n = 7 * PRODUCT_ROWS + 5, 16, 96
    up = (rng.standard_normal((m, r)) * 0.1).astype(np.float32)
    down = (rng.standard_normal((r, n)) * 0.1).astype(np.float32)
    term = LowRankTerm(up, down, scale=0.37)
    whole = term_delta(term, 0, m)
    for block in (PRODUCT_ROWS, 3 * PRODUCT_ROWS):
        parts = [term_delta(term, a, min(m, a + block)) for a in range(0, m, block)]
        assert np.array_equal(np.concatenate(parts), whole)
    transposed = LowRankTerm(down.T.copy(), up.T.copy(), scale=0.37, transposed=True)
    parts = [term_delta(transposed, a, min(m, a + 2 * PRODUCT_ROWS)) for a in range(0, m, 128)]
    assert np.array_equal(np.concatenate(parts), term_delta(transposed, 0, m))
    assert np.array_equal(term_delta(transposed, 0, m), whole)


def test_apply_terms_is_peft_op_sequence() -> None:
    # float32(W) + (P * float32(s)) for each term, in adapter order, in float32
    rng = np.random.default_rng(9)
    base = rng.standard_normal((80, 24)).astype(np.float32)
    terms = [
        LowRankTerm(
            rng.standard_normal((80, 4)).astype(np.float32),
            rng.standard_normal((4, 24)).astype(np.float32),
            scale=s,
        )
        for s in (0.5, -1.25)
    ]
    expected = base.copy()
    for t in terms:
        expected = expected + (t.up @ t.down) * np.float32(t.scale)
    got = apply_terms(base.copy(), terms, 0)
    assert got.dtype == np.float32 and np.array_equal(got, expected)


@pytest.mark.oracle
@pytest.mark.parametrize("n", [8, 32, 96, 2048, 5632])
def test_lane_norm_equals_torch_linalg_norm(n: int) -> None:
    # Row lengths that are multiples of 8 (every transformer hidden size); for other lengths
    # torch's remainder handling is not reproduced bit for bit (see merge.arithmetic.lane_norm).
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((64, n)) * 0.1).astype(np.float32)
    ref = torch.linalg.norm(torch.from_numpy(x), dim=1).numpy()
    assert np.array_equal(lane_norm(x), ref)


@pytest.mark.oracle
@pytest.mark.parametrize("rows,cols", [(32, 96), (128, 32), (37, 50), (1024, 24)])
def test_column_norm_equals_torch_norm_of_the_transposed_view(rows: int, cols: int) -> None:
    """PEFT's DoRA norm on a Conv1D weight stored [in, out]: torch.linalg.norm(W.T, dim=1),
    reduced down a non-contiguous dimension."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(rows * cols)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    ref = torch.linalg.norm(torch.from_numpy(x).T, dim=1).numpy()
    assert np.array_equal(column_norm(x), ref)
    # and it is not the contiguous kernel's order: the two differ somewhere on these sizes
    assert not np.array_equal(lane_norm(np.ascontiguousarray(x.T)), ref) or rows < 16
