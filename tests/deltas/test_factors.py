"""The plain LoRA of each type's update (:func:`lora_tools.deltas.factors.to_lora`) against the
references: lycoris-lora's own weight functions for the update (float64), numpy's dense SVD
of it for the truncation. Shapes are small enough for the dense route to be cheap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lycoris.functional import locon as ly_locon
from lycoris.functional import loha as ly_loha
from lycoris.functional import lokr as ly_lokr

from lora_tools.deltas import (
    DORA_LORA,
    FULL,
    LOHA,
    LOKR,
    TUCKER_LOCON,
    TYPES,
    DeltaError,
    DeltaModule,
    merged,
)
from lora_tools.deltas.factors import (
    DENSE,
    FACTOR_SPACE,
    RANDOMIZED,
    randomized_svd,
    to_lora,
)
from lora_tools.io.safetensors import ArrayTensor


def _t(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.normal(size=shape)


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, ArrayTensor]:
    return {k: ArrayTensor(v) for k, v in arrays.items()}


def _torch(arrays: dict[str, np.ndarray], name: str) -> torch.Tensor | None:
    return torch.from_numpy(arrays[name]) if name in arrays else None


def _loha(rng, tucker: bool):
    if tucker:  # hada_t [r, r, 3, 3], hada_w_a [r, out], hada_w_b [r, in]
        a = {
            "hada_t1": _t(rng, 3, 3, 3, 3),
            "hada_t2": _t(rng, 3, 3, 3, 3),
            "hada_w1_a": _t(rng, 3, 24),
            "hada_w1_b": _t(rng, 3, 20),
            "hada_w2_a": _t(rng, 3, 24),
            "hada_w2_b": _t(rng, 3, 20),
        }
        ref = ly_loha.diff_weight(
            *(_torch(a, k) for k in ("hada_w1_b", "hada_w1_a", "hada_w2_b", "hada_w2_a")),
            _torch(a, "hada_t1"),
            _torch(a, "hada_t2"),
            gamma=2.0 / 3,
            backend="torch",
        )
        return DeltaModule("loha_tucker", LOHA, _tensors(a), alpha=2.0), ref, 9
    a = {
        "hada_w1_a": _t(rng, 48, 4),
        "hada_w1_b": _t(rng, 4, 40),
        "hada_w2_a": _t(rng, 48, 4),
        "hada_w2_b": _t(rng, 4, 40),
    }
    ref = ly_loha.diff_weight(
        *(_torch(a, k) for k in ("hada_w1_b", "hada_w1_a", "hada_w2_b", "hada_w2_a")),
        None,
        None,
        gamma=0.5,
        backend="torch",
    )
    return DeltaModule("loha", LOHA, _tensors(a), alpha=2.0), ref, 16


def _lokr(rng, kind: str):
    a: dict[str, np.ndarray]
    if kind == "whole":  # both factors whole: scale 1 whatever alpha says
        a, alpha, rank = {"lokr_w1": _t(rng, 4, 5), "lokr_w2": _t(rng, 12, 8)}, 7.0, 32
    elif kind == "w2 decomposed":
        a = {"lokr_w1": _t(rng, 4, 4), "lokr_w2_a": _t(rng, 12, 3), "lokr_w2_b": _t(rng, 3, 10)}
        alpha, rank = 2.0, 12
    elif kind == "both decomposed":
        a = {
            "lokr_w1_a": _t(rng, 6, 2),
            "lokr_w1_b": _t(rng, 2, 5),
            "lokr_w2_a": _t(rng, 8, 2),
            "lokr_w2_b": _t(rng, 2, 9),
        }
        alpha, rank = 1.0, 4
    else:  # Tucker conv: lokr_t2 [r, r, 3, 3], lokr_w2_a [r, out2], lokr_w2_b [r, in2]
        a = {
            "lokr_w1": _t(rng, 2, 2),
            "lokr_t2": _t(rng, 3, 3, 3, 3),
            "lokr_w2_a": _t(rng, 3, 12),
            "lokr_w2_b": _t(rng, 3, 10),
        }
        alpha, rank = 1.5, 6  # w2 flattened [12, 10 * 9] has rank <= 3
    names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    weights = [_torch(a, k) for k in names]
    if kind == "tucker":
        # functional.lokr's rank_scale reads the rank as lokr_w2_a.shape[1], which for a
        # Tucker w2_a [r, out2] is out2; LokrModule scales by alpha / lora_dim (r).
        ref = ly_lokr.kron_weight(*weights, scale=alpha / 3, backend="torch")
    else:
        ref = ly_lokr.diff_weight(*weights, gamma=alpha, backend="torch")
    return DeltaModule(f"lokr {kind}", LOKR, _tensors(a), alpha=alpha), ref, rank


def _tucker_locon(rng):
    a = {"lora_up": _t(rng, 30, 4), "lora_mid": _t(rng, 4, 4, 3, 3), "lora_down": _t(rng, 4, 12)}
    ref = ly_locon.diff_weight(
        _torch(a, "lora_down"), _torch(a, "lora_up"), _torch(a, "lora_mid"), gamma=0.75
    )
    return DeltaModule("tucker", TUCKER_LOCON, _tensors(a), alpha=3.0), ref, 4


CASES = [
    "loha",
    "loha tucker",
    "lokr whole",
    "lokr w2 decomposed",
    "lokr both decomposed",
    "lokr tucker",
    "tucker locon",
]


def case(name: str) -> tuple[DeltaModule, np.ndarray, int]:
    """The module, lycoris-lora's update of it (flattened, float64) and its exact rank."""
    rng = np.random.default_rng(CASES.index(name))
    if name.startswith("loha"):
        m, ref, rank = _loha(rng, tucker="tucker" in name)
    elif name.startswith("lokr"):
        m, ref, rank = _lokr(rng, name.removeprefix("lokr "))
    else:
        m, ref, rank = _tucker_locon(rng)
    dense = ref.detach().numpy().astype(np.float64)
    return m, dense.reshape(dense.shape[0], -1), rank


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def no_dense_update(monkeypatch):
    """Make forming a type's dense update fail: factor-space conversions must not need it."""

    def refuse(*args, **kwargs):
        raise AssertionError("formed the dense update")

    for spec in TYPES.values():
        monkeypatch.setattr(type(spec), "delta", refuse)
        monkeypatch.setattr(type(spec), "rows", refuse)


@pytest.mark.parametrize("name", CASES)
def test_exact_lora_reproduces_lycoris_update(name, no_dense_update):
    m, ref, rank = case(name)
    lora = to_lora(m)
    assert lora.method == FACTOR_SPACE
    assert lora.rank == lora.exact_rank == rank  # LoHa r^2, LoKr rank(w1) * rank(w2), LoCon r
    assert lora.alpha == rank
    assert lora.relative_error == 0.0 and lora.retained_energy == 1.0
    assert rel(lora.up @ lora.down, ref) < 1e-12
    assert lora.frobenius == pytest.approx(np.linalg.norm(ref), rel=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_truncation_equals_dense_truncated_svd(name, no_dense_update):
    m, ref, rank = case(name)
    u, s, vh = np.linalg.svd(ref, full_matrices=False)
    for k in sorted({1, 2, rank // 2, rank - 1} - {0}):
        lora = to_lora(m, {"rank": k})
        best = (u[:, :k] * s[:k]) @ vh[:k]
        assert lora.rank == k
        assert rel(lora.up @ lora.down, best) < 1e-8, k
        tail = np.sqrt(np.sum(s[k:] ** 2) / np.sum(s**2))
        assert lora.relative_error == pytest.approx(tail, rel=1e-8)
        assert rel(lora.up @ lora.down, ref) == pytest.approx(tail, rel=1e-8)
        assert lora.retained_energy == pytest.approx(np.sum(s[:k] ** 2) / np.sum(s**2), rel=1e-10)
    # a rank above the exact one keeps the exact one (no zero columns)
    assert to_lora(m, {"rank": rank + 5}).rank == rank


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("energy", [0.3, 0.8, 0.95, 0.999])
def test_energy_rule_picks_the_reference_rank(name, energy, no_dense_update):
    m, ref, _ = case(name)
    s = np.linalg.svd(ref, compute_uv=False)
    cum = np.cumsum(s**2) / np.sum(s**2)
    want = int(np.argmax(cum >= energy)) + 1
    lora = to_lora(m, {"energy": energy})
    assert lora.rank == want
    assert lora.retained_energy >= energy
    assert lora.rank == 1 or cum[lora.rank - 2] < energy  # one fewer would not do


def test_lokr_singular_values_are_products_of_the_factors():
    m, ref, _ = case("lokr whole")
    s = np.linalg.svd(ref, compute_uv=False)
    lora = to_lora(m)
    assert np.sqrt(np.sum((lora.up @ lora.down) ** 2)) == pytest.approx(np.linalg.norm(s))
    # the columns of up are orthogonal with norms sqrt(S): the factors are an SVD
    norms = np.sum(lora.up**2, axis=0)
    assert np.allclose(norms, s[: lora.rank], rtol=1e-10)
    assert np.allclose(lora.up.T @ lora.up, np.diag(norms), atol=1e-10)


def test_negative_scale_is_kept():
    """A negative alpha flips the update; the LoRA carries the sign in up."""
    m, ref, _ = case("loha")
    m.alpha = -2.0
    assert rel(to_lora(m).up @ to_lora(m).down, -ref) < 1e-12
    k, kref, _ = case("lokr w2 decomposed")
    k.alpha = -2.0
    assert rel(to_lora(k).up @ to_lora(k).down, -kref) < 1e-12


def _decaying(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A dense update with a slowly decaying spectrum (S_i = 0.9^i), the hard case for a
    randomized range finder."""
    rng = np.random.default_rng(seed)
    q1 = np.linalg.qr(rng.normal(size=(rows, cols)))[0]
    q2 = np.linalg.qr(rng.normal(size=(cols, cols)))[0]
    return (q1 * 0.9 ** np.arange(cols)) @ q2.T


def test_randomized_svd_is_within_1e3_of_the_optimum():
    M = _decaying(300, 200)
    m = DeltaModule("full", FULL, {"diff": ArrayTensor(M)})
    s = np.linalg.svd(M, compute_uv=False)
    for k in (4, 16, 40):
        lora = to_lora(m, {"rank": k})
        assert lora.method == RANDOMIZED and lora.rank == k and lora.exact_rank is None
        optimum = np.sqrt(np.sum(s[k:] ** 2) / np.sum(s**2))
        measured = rel(lora.up @ lora.down, M) if k else 1.0
        err = np.linalg.norm(M - lora.up @ lora.down) / np.linalg.norm(M)
        assert lora.relative_error == pytest.approx(err, rel=1e-9)  # reported = measured
        assert optimum <= lora.relative_error <= optimum + 1e-3, (k, measured, optimum)


def test_randomized_energy_rule_picks_the_reference_rank():
    M = _decaying(300, 200, seed=1)
    m = DeltaModule("full", FULL, {"diff": ArrayTensor(M)})
    s = np.linalg.svd(M, compute_uv=False)
    cum = np.cumsum(s**2) / np.sum(s**2)
    for energy in (0.5, 0.9, 0.99):
        lora = to_lora(m, {"energy": energy})
        assert lora.method == RANDOMIZED
        assert lora.rank == int(np.argmax(cum >= energy)) + 1


def test_dense_route_is_exact_where_the_sketch_would_be_as_wide():
    """A rank near min(m, n), --energy 1 and the exact LoRA take the dense SVD."""
    M = _decaying(40, 30)
    m = DeltaModule("full", FULL, {"diff": ArrayTensor(M)})
    for rule in ({"rank": 25}, {"energy": 1.0}, None):
        lora = to_lora(m, rule)
        assert lora.method == DENSE and lora.exact_rank == 30
        s = np.linalg.svd(M, compute_uv=False)
        k = lora.rank
        assert lora.relative_error == pytest.approx(
            np.sqrt(np.sum(s[k:] ** 2) / np.sum(s**2)), abs=1e-12
        )
    assert rel(to_lora(m).up @ to_lora(m).down, M) < 1e-12


def test_randomized_svd_finds_an_exact_low_rank_matrix():
    rng = np.random.default_rng(3)
    M = rng.normal(size=(120, 6)) @ rng.normal(size=(6, 90))
    U, S, Vh = randomized_svd(M, 6, power_iterations=0)
    assert rel((U[:, :6] * S[:6]) @ Vh[:6], M) < 1e-12


def test_weight_decomposed_module_needs_the_base_and_matches_its_merge():
    """A kohya DoRA: the LoRA of ``merged(W) - W`` (numpy oracle of the decomposition:
    ``W' = dora_scale * (W + dW) / ||W + dW||`` per output row)."""
    rng = np.random.default_rng(5)
    up, down, W = rng.normal(size=(50, 3)), rng.normal(size=(3, 40)), rng.normal(size=(50, 40))
    scale = np.abs(rng.normal(size=(50, 1))) + 1
    m = DeltaModule(
        "dora",
        DORA_LORA,
        _tensors({"lora_up": up, "lora_down": down, "dora_scale": scale}),
        alpha=1.5,
    )
    with pytest.raises(DeltaError, match="base"):
        to_lora(m, {"rank": 2})
    W1 = W + up @ down * 0.5
    oracle = W1 * scale / np.linalg.norm(W1, axis=1, keepdims=True) - W
    lora = to_lora(m, {"energy": 1.0}, base=W)
    assert rel(lora.up @ lora.down, oracle) < 1e-10
    assert rel(merged(m, W, dtype=np.float64) - W, oracle) < 1e-10
    s = np.linalg.svd(oracle, compute_uv=False)
    best = to_lora(m, {"rank": 5}, base=W)
    optimum = np.sqrt(np.sum(s[5:] ** 2) / np.sum(s**2))
    assert best.method == RANDOMIZED
    assert optimum <= best.relative_error <= optimum + 1e-3
    assert best.relative_error == pytest.approx(rel(best.up @ best.down, oracle), rel=1e-9)


def test_zero_update_is_a_rank_one_zero_lora():
    m = DeltaModule("z", LOKR, _tensors({"lokr_w1": np.zeros((2, 2)), "lokr_w2": np.zeros((3, 3))}))
    lora = to_lora(m)
    assert lora.rank == 1 and not lora.up.any() and lora.relative_error == 0.0
    assert lora.up.shape == (6, 1) and lora.down.shape == (1, 6)
