"""combine: exact concat (checked against PEFT's add_weighted_adapter "cat"), optimal svd, and
TIES / DARE as the papers define them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lora_tools.errors import ShapeError, UnsupportedAdapterError, UsageError
from lora_tools.formats import load_adapter, save_adapter
from lora_tools.io.safetensors import ArrayTensor
from lora_tools.ops.combine import combine_adapters, dare, match_modules, ties

WEIGHTS = [1.0, -0.5, 2.0]
TRIO = ["peft/llama-lora", "peft/llama-patterns", "peft/llama-rslora"]  # ranks, alphas, rsLoRA


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def matrix(m):
    U, V = m.factors()
    return m.scale * U @ V


def truncated(D, k):
    u, s, vh = np.linalg.svd(D, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


@pytest.fixture(scope="module")
def trio(fixtures_dir):
    return [load_adapter(fixtures_dir / n) for n in TRIO]


def weighted_sum(adapters, weights, key):
    return sum(
        w * a.modules[key].delta()
        for a, w in zip(adapters, weights, strict=True)
        if key in a.modules
    )


def test_concat_is_the_exact_weighted_sum(trio):
    result = combine_adapters(trio, weights=WEIGHTS, method="concat")
    for key, m in result.adapter.modules.items():
        assert m.rank == sum(a.modules[key].rank for a in trio)
        assert m.scale == 1.0 and not m.rslora
        assert rel(m.delta(), weighted_sum(trio, WEIGHTS, key)) < 1e-6  # fp32 output
    rows = {r.key: r for r in result.modules}
    assert all(r.relative_error == 0.0 and r.inputs == (0, 1, 2) for r in rows.values())


def test_subtracting_an_adapter_from_itself_gives_zero(trio):
    result = combine_adapters([trio[0], trio[0]], weights=[1.0, -1.0])
    for key, m in result.adapter.modules.items():
        # the factors are exact copies with opposite signs: only float64 summation order remains
        assert np.abs(m.delta()).max() <= 1e-12 * np.abs(trio[0].modules[key].delta()).max()


@pytest.mark.parametrize("rank", [None, 3, 20])
@pytest.mark.parametrize("distribute", ["sqrt", "up"])
def test_svd_is_the_optimal_rank_r_of_the_sum(trio, rank, distribute):
    result = combine_adapters(trio, weights=WEIGHTS, method="svd", rank=rank, distribute=distribute)
    for row in result.modules:
        exact = weighted_sum(trio, WEIGHTS, row.key)
        k = rank or max(a.modules[row.key].rank for a in trio)  # default: largest input rank
        assert row.rank == min(k, row.exact_rank)
        got = result.adapter.modules[row.key].delta()
        assert rel(got, truncated(exact, row.rank)) < 1e-5
        s = np.linalg.svd(exact, compute_uv=False)
        assert row.relative_error == pytest.approx(
            np.sqrt((s[row.rank :] ** 2).sum() / (s**2).sum()), abs=1e-7
        )


def test_modules_in_only_some_inputs(fixtures_dir, trio):
    every = load_adapter(fixtures_dir / "peft/llama-all-linear")
    result = combine_adapters([trio[0], every], weights=[1.0, 0.5])
    assert len(result.adapter.modules) == len(every.modules)
    for row in result.modules:
        only_second = row.key not in trio[0].modules
        assert row.inputs == ((1,) if only_second else (0, 1))
        got = result.adapter.modules[row.key].delta()
        assert rel(got, weighted_sum([trio[0], every], [1.0, 0.5], row.key)) < 1e-6


def test_inputs_in_different_formats_match_by_layer(fixtures_dir, tmp_path):
    kohya = load_adapter(fixtures_dir / "kohya/sd-lora.safetensors")
    peft = load_adapter(fixtures_dir / "peft/sd-unet-conv")  # UNet only, no component
    groups = match_modules([kohya, peft])
    both = [g for g in groups.values() if len(g) == 2]
    shared = {"lora_unet_" + m.path.replace(".", "_") for m in peft.modules.values()} & set(
        kohya.modules
    )
    assert len(both) == len(shared) > 30  # the attention layers both adapters train
    result = combine_adapters([kohya, peft], weights=[1.0, -1.0])
    assert result.adapter.format == "kohya"
    for (_, a), (_, b) in both:
        m = result.adapter.modules[a.key]
        assert rel(matrix(m), matrix(a) - matrix(b)) < 5e-3  # fp16 output
    # modules only the PEFT input has get kohya names, and the file reloads
    out = save_adapter(result.adapter, tmp_path / "c.safetensors", refresh_hashes=True)
    back = load_adapter(out)
    assert len(back.modules) == len(groups)
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in back.modules


def test_shapes_must_agree(fixtures_dir, trio):
    a = trio[0]
    key = next(iter(a.modules))
    m = a.modules[key]
    bad = dataclasses.replace(
        m, down=ArrayTensor(np.zeros((m.rank, m.in_features + 1), np.float32))
    )
    b = dataclasses.replace(a, modules={**a.modules, key: bad})
    with pytest.raises(ShapeError, match="self_attn"):
        combine_adapters([a, b])


def test_ties_by_the_paper():
    t1 = np.array([3.0, -2.0, 0.5, 1.0])
    t2 = np.array([-1.0, -4.0, 2.0, 0.25])
    # trim to half: t1 -> [3, -2, 0, 0], t2 -> [0, -4, 2, 0]
    # elect: sums [3, -6, 2, 0] -> signs [+, -, +, 0]
    # disjoint mean: [3, (-2 - 4) / 2, 2, 0]
    np.testing.assert_array_equal(ties([t1, t2], 0.5), [3.0, -3.0, 2.0, 0.0])
    # density 1: every entry kept; disagreeing entries are left out of the mean
    np.testing.assert_array_equal(ties([t1, t2], 1.0), [3.0, -3.0, 1.25, 0.625])


def reference_ties(deltas, density):
    """Independent loop implementation of TIES for the test."""
    flat = [d.ravel() for d in deltas]
    trimmed = []
    for f in flat:
        k = round(density * f.size)
        keep = np.argsort(-np.abs(f), kind="stable")[:k]
        t = np.zeros_like(f)
        t[keep] = f[keep]
        trimmed.append(t)
    out = np.zeros_like(flat[0])
    for j in range(out.size):
        vals = [t[j] for t in trimmed]
        sign = np.sign(sum(vals))
        agree = [v for v in vals if v != 0 and np.sign(v) == sign]
        out[j] = np.mean(agree) if agree else 0.0
    return out.reshape(deltas[0].shape)


def test_ties_combine_matches_the_reference(trio):
    result = combine_adapters(trio[:2], weights=[1.0, 0.7], method="ties", density=0.3, rank=64)
    for row in result.modules:
        ms = [a.modules[row.key] for a in trio[:2]]
        ref = reference_ties([w * matrix(m) for m, w in zip(ms, [1.0, 0.7], strict=True)], 0.3)
        got = matrix(result.adapter.modules[row.key])
        assert row.relative_error < 1e-12  # rank 64 keeps everything of a 32 x 32 update
        assert rel(got, ref) < 1e-6


def test_dare_is_seeded_drop_and_rescale(trio):
    d = np.arange(1.0, 1001.0)
    out = dare(d, 0.25, np.random.default_rng(0))
    kept = out != 0
    np.testing.assert_array_equal(out[kept], d[kept] / 0.25)
    assert 0.2 < kept.mean() < 0.3
    a = combine_adapters(trio[:2], method="dare", density=0.5, seed=7, rank=64)
    b = combine_adapters(trio[:2], method="dare", density=0.5, seed=7, rank=64)
    c = combine_adapters(trio[:2], method="dare", density=0.5, seed=8, rank=64)
    key = next(iter(a.adapter.modules))
    np.testing.assert_array_equal(
        a.adapter.modules[key].up.numpy(), b.adapter.modules[key].up.numpy()
    )
    assert not np.array_equal(a.adapter.modules[key].up.numpy(), c.adapter.modules[key].up.numpy())


def test_dare_with_density_one_is_the_weighted_sum(trio):
    result = combine_adapters(trio, weights=WEIGHTS, method="dare", density=1.0, rank=64)
    for key, m in result.adapter.modules.items():
        assert rel(m.delta(), weighted_sum(trio, WEIGHTS, key)) < 1e-6


def test_ties_dare_truncate_to_rank(trio):
    result = combine_adapters(trio, method="ties", density=0.5, rank=3)
    assert {m.rank for m in result.adapter.modules.values()} == {3}
    assert all(0 < r.retained_energy < 1 for r in result.modules)


def test_refusals(fixtures_dir, trio):
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        combine_adapters([trio[0], load_adapter(fixtures_dir / "peft/llama-dora")])
    with pytest.raises(UnsupportedAdapterError, match="full tensors"):
        combine_adapters([trio[0], load_adapter(fixtures_dir / "peft/llama-modules-to-save")])
    with pytest.raises(UsageError, match="base weight"):
        combine_adapters([load_adapter(fixtures_dir / "kohya/sd-dora.safetensors")])
    for kwargs in (
        {"weights": [1.0]},
        {"method": "mean"},
        {"method": "ties"},
        {"method": "dare", "density": 0.0},
        {"method": "concat", "rank": 4},
        {"method": "svd", "density": 0.5},
        {"weights": [1.0, float("inf")]},
    ):
        with pytest.raises(UsageError):
            combine_adapters(trio[:2], **kwargs)


@pytest.mark.oracle
def test_concat_equals_peft_add_weighted_adapter_cat(fixtures_dir, tmp_path):
    """PEFT's "cat" combination and ours give the same merged weights on the tiny Llama."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    names, weights = ["peft/llama-lora", "peft/llama-patterns"], [0.8, -1.3]
    base_dir = fixtures_dir / "bases/tiny-llama"

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(model, fixtures_dir / names[0], adapter_name="a")
    pm.load_adapter(fixtures_dir / names[1], adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], weights, "cat", combination_type="cat")
    pm.set_adapter("cat")
    theirs = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}

    adapters = [load_adapter(fixtures_dir / n) for n in names]
    save_adapter(combine_adapters(adapters, weights=weights).adapter, tmp_path / "ours")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ours = peft.PeftModel.from_pretrained(model, tmp_path / "ours").merge_and_unload().state_dict()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).state_dict()
    changed = [k for k in base if not torch.equal(base[k], theirs[k])]
    assert len(changed) == 8
    for k in base:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6)
