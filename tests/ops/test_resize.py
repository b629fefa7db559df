"""resize and the factor-space linear algebra under it, against dense numpy float64 SVDs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.errors import UnsupportedAdapterError, UsageError
from lora_tools.formats import load_adapter, save_adapter
from lora_tools.formats.kohya import data_sha256
from lora_tools.io.safetensors import ArrayTensor
from lora_tools.lowrank import (
    dense_low_rank,
    low_rank_approx,
    r_factor,
    relative_error,
    retained_energy,
    select_rank,
    split_scalar,
    stack_factors,
)
from lora_tools.ops.resize import resize_adapter

RNG = np.random.default_rng(1234)


def truncated(D: np.ndarray, k: int) -> np.ndarray:
    """The dense reference: rank-k truncated SVD of D, float64."""
    u, s, vh = np.linalg.svd(D, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def as_f64(adapter: Adapter) -> Adapter:
    """The same adapter with float64 factors, so dtype rounding does not hide math errors."""
    mods = {
        k: dataclasses.replace(
            m,
            up=ArrayTensor(m.up.numpy().astype(np.float64)),
            down=ArrayTensor(m.down.numpy().astype(np.float64)),
        )
        for k, m in adapter.modules.items()
    }
    return dataclasses.replace(adapter, modules=mods)


def matrix(m: LoraModule) -> np.ndarray:
    """The scaled update as the 2-D factor-layout matrix (conv flattened, embedding transposed)."""
    U, V = m.factors()
    return m.scale * U @ V


# -- rank rules ------------------------------------------------------------------------------

S4 = np.array([4.0, 2.0, 1.0, 0.5])


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ({"rank": 3}, 3),
        ({"rank": 9}, 4),  # capped at the number of singular values
        # squares 16, 4, 1, .25 (total 21.25): 16/21.25 = .753, 20/21.25 = .941
        ({"energy": 0.75}, 1),
        ({"energy": 0.9}, 2),
        ({"energy": 1.0}, 4),
        # S_i >= 4 / 2 keeps 4 and 2; sd-scripts' index + 1 would give 3
        ({"sv_ratio": 2.0}, 2),
        ({"sv_ratio": 1.0}, 1),
        # cumulative 4/7.5 = .533, 6/7.5 = .8
        ({"sv_cumulative": 0.5}, 1),
        ({"sv_cumulative": 0.8}, 2),
        ({"sv_cumulative": 0.81}, 3),
        ({"energy": 0.75, "min_rank": 3}, 3),
        ({"energy": 1.0, "max_rank": 2}, 2),
    ],
)
def test_select_rank_rules(rule, expected):
    assert select_rank(S4, **rule) == expected


def test_select_rank_zero_update_and_bad_calls():
    assert select_rank(np.zeros(3), energy=0.9) == 1
    assert select_rank(np.zeros(3), energy=0.9, min_rank=2) == 2
    with pytest.raises(ValueError):
        select_rank(S4, rank=2, energy=0.5)


def test_energy_and_error_identities():
    for k in range(5):
        e, err = retained_energy(S4, k), relative_error(S4, k)
        assert e + err**2 == pytest.approx(1.0)
    assert relative_error(S4, 4) == 0.0 and retained_energy(np.zeros(2), 0) == 1.0


# -- factor-space truncation ------------------------------------------------------------------


@pytest.mark.parametrize("distribute", ["sqrt", "up"])
@pytest.mark.parametrize(("m", "n", "r", "k"), [(60, 40, 8, 3), (30, 90, 6, 6), (5, 50, 8, 2)])
def test_low_rank_approx_is_the_truncated_svd(distribute, m, n, r, k):
    U, V = RNG.normal(size=(m, r)), RNG.normal(size=(r, n))
    lr = low_rank_approx(U, V, 0.37, k, target_scale=2.5, distribute=distribute)
    assert lr.up.shape == (m, min(k, m)) and lr.down.shape == (min(k, m), n)
    got = 2.5 * lr.up @ lr.down
    assert rel(got, truncated(0.37 * U @ V, k)) < 1e-12
    np.testing.assert_allclose(lr.S, np.linalg.svd(0.37 * U @ V, compute_uv=False)[: len(lr.S)])
    if distribute == "up":  # sd-scripts convention: down has orthonormal rows
        np.testing.assert_allclose(lr.down @ lr.down.T, np.eye(lr.k), atol=1e-10)
    else:  # sqrt: both factors carry the same column / row norms
        np.testing.assert_allclose(
            np.linalg.norm(lr.up, axis=0), np.linalg.norm(lr.down, axis=1), rtol=1e-10
        )


def test_low_rank_approx_negative_scale_and_rank_deficient_factors():
    U = RNG.normal(size=(50, 3)) @ RNG.normal(size=(3, 6))  # rank 3 of 6
    V = RNG.normal(size=(6, 40))
    lr = low_rank_approx(U, V, -1.5, 5, target_scale=-0.5)
    assert np.all(np.isfinite(lr.up)) and np.all(np.isfinite(lr.down))
    assert rel(-0.5 * lr.up @ lr.down, -1.5 * U @ V) < 1e-12
    assert lr.S[3:].max() < 1e-12 * lr.S[0]


@pytest.mark.parametrize("cond", [1e1, 1e5, 1e10])
def test_r_factor_matches_householder(cond):
    q, _ = np.linalg.qr(RNG.normal(size=(400, 10)))
    A = (q * np.logspace(0, -np.log10(cond), 10)) @ np.linalg.qr(RNG.normal(size=(10, 10)))[0]
    R = r_factor(A)
    Rh = np.linalg.qr(A, mode="r")
    # R is unique up to row signs
    np.testing.assert_allclose(np.abs(R), np.abs(Rh), atol=1e-12 * np.abs(Rh).max())


def test_ill_conditioned_factors_keep_accuracy():
    q, _ = np.linalg.qr(RNG.normal(size=(300, 12)))
    U = (q * np.logspace(0, -9, 12)) @ np.linalg.qr(RNG.normal(size=(12, 12)))[0]
    V = RNG.normal(size=(12, 200))
    for k in (3, 12):
        lr = low_rank_approx(U, V, 0.7, k)
        assert rel(lr.up @ lr.down, truncated(0.7 * U @ V, k)) < 1e-10


def test_stack_factors_and_dense_low_rank():
    terms = [
        (RNG.normal(size=(20, r)), RNG.normal(size=(r, 15)), c) for r, c in ((2, 0.5), (3, -2))
    ]
    U, V = stack_factors(terms)
    exact = sum(c * u @ v for u, v, c in terms)
    assert rel(U @ V, exact) < 1e-14
    lr = dense_low_rank(exact, 2, target_scale=3.0)
    assert rel(3.0 * lr.up @ lr.down, truncated(exact, 2)) < 1e-12


@pytest.mark.parametrize("c", [1.0, 1 / 128, 1000.0, -3.0, 0.3, -1e-6])
def test_split_scalar(c):
    up, down = split_scalar(c)
    assert up * down == pytest.approx(c, rel=1e-15)
    assert np.log2(down) == int(np.log2(down))  # a power of two
    assert abs(np.log2(abs(up)) - np.log2(down)) <= 1.01  # magnitudes balanced


# -- resize on real adapters ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "peft/llama-all-linear",  # linear
        "peft/llama-rslora",  # rsLoRA scale
        "peft/llama-embedding",  # embedding
        "peft/sd-unet-conv",  # 3x3 conv (PEFT)
        "kohya/sd-locon.safetensors",  # conv + linear (kohya, fp16, per-module alpha)
    ],
)
@pytest.mark.parametrize("rule", [{"rank": 2}, {"energy": 0.8}, {"sv_ratio": 3.0, "min_rank": 2}])
@pytest.mark.parametrize("distribute", ["sqrt", "up"])
def test_resize_equals_dense_truncated_svd(fixtures_dir, name, rule, distribute):
    adapter = as_f64(load_adapter(fixtures_dir / name))
    result = resize_adapter(adapter, distribute=distribute, **rule)
    assert {m.kind for m in adapter.modules.values()} == {
        m.kind for m in result.adapter.modules.values()
    }
    for row in result.modules:
        old, new = adapter.modules[row.key], result.adapter.modules[row.key]
        assert new.rank == row.new_rank
        if adapter.format == "kohya":  # kohya keeps each module's alpha (diffusers reads it)
            assert new.alpha == old.alpha
        else:
            assert new.scale == pytest.approx(old.scale)  # each module keeps its scale
        assert new.delta().shape == old.delta().shape
        D = matrix(old)
        assert rel(matrix(new), truncated(D, row.new_rank)) < 1e-5
        s = np.linalg.svd(D, compute_uv=False)
        assert row.relative_error == pytest.approx(relative_error(s, row.new_rank), abs=1e-9)
        if "energy" in rule and row.changed:
            assert row.retained_energy >= 0.8 - 1e-12
            assert retained_energy(s, row.new_rank - 1) < 0.8  # the smallest such rank


def test_resize_in_the_input_dtype(fixtures_dir):
    """fp16 kohya factors come back fp16, within fp16 rounding of the float64 result."""
    adapter = load_adapter(fixtures_dir / "kohya/sd-locon.safetensors")
    result = resize_adapter(adapter, rank=2)
    for key, new in result.adapter.modules.items():
        old = adapter.modules[key]
        assert (new.up.dtype, new.down.dtype) == (old.up.dtype, old.down.dtype)
        if old.rank > 2:
            assert rel(matrix(new), truncated(matrix(old), 2)) < 5e-3


def test_resize_writes_exact_patterns_peft(fixtures_dir, tmp_path):
    adapter = load_adapter(fixtures_dir / "peft/llama-all-linear")
    result = resize_adapter(adapter, energy=0.85)
    assert len({r.new_rank for r in result.modules}) > 1  # the test needs mixed ranks
    save_adapter(result.adapter, tmp_path / "out")
    back = load_adapter(tmp_path / "out")
    config = json.loads((tmp_path / "out/adapter_config.json").read_text())
    assert config["rank_pattern"]  # not every module has r
    for key, m in result.adapter.modules.items():
        assert (back.modules[key].rank, back.modules[key].scale) == (m.rank, pytest.approx(m.scale))
        np.testing.assert_array_equal(back.modules[key].up.numpy(), m.up.numpy())
    history = json.loads(back.metadata["loratool_history"])
    assert history[-1]["op"] == "resize" and history[-1]["energy"] == 0.85


def test_resize_kohya_metadata_and_hashes(fixtures_dir, tmp_path):
    adapter = load_adapter(fixtures_dir / "kohya/sd-locon.safetensors")
    result = resize_adapter(adapter, energy=0.9)
    out = save_adapter(result.adapter, tmp_path / "r.safetensors", refresh_hashes=True)
    back = load_adapter(out)
    assert back.metadata["ss_network_dim"] == "Dynamic"
    assert back.metadata["sshs_model_hash"] == data_sha256(
        {**{k: t for m in back.modules.values() for k, t in _tensors(m)}, **back.passthrough}
    )
    assert "sshs_legacy_hash" not in back.metadata
    for key, m in result.adapter.modules.items():
        assert back.modules[key].scale == pytest.approx(m.scale)


def _tensors(m: LoraModule):
    yield m.keys["down"], m.down
    yield m.keys["up"], m.up
    if "alpha" in m.keys:
        yield m.keys["alpha"], m.alpha_tensor


def test_rank_at_or_above_current_changes_nothing(fixtures_dir):
    adapter = load_adapter(fixtures_dir / "peft/llama-lora")
    result = resize_adapter(adapter, rank=4)
    assert result.changed == []
    for key, m in adapter.modules.items():
        assert result.adapter.modules[key] is m
    assert result.summary(adapter)["changed"] == 0


def test_missing_kohya_alpha_stays_missing(fixtures_dir):
    adapter = load_adapter(fixtures_dir / "kohya/sd-lora-noalpha.safetensors")
    result = resize_adapter(adapter, rank=2)
    assert all(m.alpha is None and m.scale == 1.0 for m in result.adapter.modules.values())


def test_dry_run_and_summary(fixtures_dir):
    adapter = load_adapter(fixtures_dir / "peft/llama-lora")
    result = resize_adapter(adapter, rank=2, dry_run=True)
    assert result.adapter is None
    summary = result.summary(adapter)
    assert summary["lora_parameters_after"] * 2 == summary["lora_parameters_before"]
    assert summary["ranks_after"] == {"2": 8}
    errs = np.array([r.relative_error * r.frobenius for r in result.modules])
    norms = np.array([r.frobenius for r in result.modules])
    assert summary["overall_relative_error"] == pytest.approx(
        np.sqrt((errs**2).sum() / (norms**2).sum())
    )


def test_refuses_dora(fixtures_dir):
    with pytest.raises(UnsupportedAdapterError):
        resize_adapter(load_adapter(fixtures_dir / "peft/llama-dora"), rank=2)


def test_weight_decomposed_modules_need_the_base(fixtures_dir):
    with pytest.raises(UsageError, match="base weight") as caught:
        resize_adapter(load_adapter(fixtures_dir / "kohya/sd-dora.safetensors"), rank=2)
    assert caught.value.kind == "needs-base"


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"rank": 2, "energy": 0.5},
        {"rank": 0},
        {"energy": 1.5},
        {"sv_ratio": 0.5},
        {"sv_cumulative": 0},
        {"rank": 2, "min_rank": 1},
        {"energy": 0.5, "min_rank": 4, "max_rank": 2},
        {"rank": 2, "distribute": "down"},
    ],
)
def test_bad_rules_are_usage_errors(fixtures_dir, kwargs):
    with pytest.raises(UsageError):
        resize_adapter(load_adapter(fixtures_dir / "peft/llama-lora"), **kwargs)
