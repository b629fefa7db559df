"""``extract`` in bounded memory: pairs compared and differenced in row blocks, the sketch
streamed over row blocks, no difference kept that will not be written, and the reported error
that of the factors as written. Each streamed result is checked against the whole-tensor one
and against numpy float64."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import lora_tools.ops.extract as ex
from lora_tools.io.checkpoint import open_checkpoint
from lora_tools.io.safetensors import SafetensorsFile, SpooledTensor, save_tensors
from lora_tools.ops._algebra import write_adapter
from lora_tools.ops.extract import extract, svd
from lora_tools.ops.extract.svd import Rows, truncate

ROOT = Path(__file__).resolve().parents[2]
LLAMA, LLAMA_FT = ROOT / "fixtures/bases/tiny-llama", ROOT / "fixtures/finetuned/tiny-llama-ft"


def knee(m: int, n: int, seed: int, noise: float = 1e-3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, 12)))
    v, _ = np.linalg.qr(rng.standard_normal((n, 12)))
    s = np.exp(-np.arange(12) / 4.0)
    return ((u * s) @ v.T + noise * rng.standard_normal((m, n))).astype(np.float32)


def streamed(a: np.ndarray, rows: int) -> tuple[Rows, list[int]]:
    """``a`` as a streamed :class:`Rows` of ``rows``-row blocks, and a log of the blocks read
    (each a fresh copy, as the pair reader gives)."""
    log: list[int] = []

    def blocks(dtype):
        for start in range(0, a.shape[0], rows):
            log.append(start)
            yield start, a[start : start + rows].astype(dtype)

    return Rows(a.shape, blocks=blocks, dtype=a.dtype), log


def same_truncation(s: svd.Truncation, w: svd.Truncation, a: np.ndarray) -> None:
    assert (s.method, s.rank, s.precision) == (w.method, w.rank, w.precision)
    assert s.relative_error == pytest.approx(w.relative_error, rel=1e-6)
    np.testing.assert_allclose(s.up @ s.down, w.up @ w.down, atol=1e-5 * np.abs(a).max())


@pytest.mark.parametrize("shape", [(90, 230), (230, 90)])
@pytest.mark.parametrize("transposed", [False, True])
def test_the_streamed_sketch_is_the_whole_tensor_one(shape, transposed) -> None:
    a = knee(*shape, seed=shape[0])
    rows, log = streamed(a, rows=17)  # blocks that do not divide the rows
    s = truncate(rows, rank=6, transposed=transposed)
    w = truncate(a.T if transposed else a, rank=6)
    assert s.method == svd.RANDOMIZED and s.certified
    same_truncation(s, w, a)
    assert len(log) > 2 * len(range(0, shape[0], 17))  # it really read the blocks, pass by pass
    # and both are the optimum's within the tolerance (numpy float64)
    target = (a.T if transposed else a).astype(np.float64)
    sv = np.linalg.svd(target, compute_uv=False)
    optimum = np.sqrt(np.sum(sv[6:] ** 2) / np.sum(sv**2))
    assert optimum * (1 - 1e-6) <= s.relative_error <= optimum * (1 + svd.TOLERANCE)


def test_the_streamed_float64_switch_and_dense_fallback_agree_with_the_whole_tensor() -> None:
    tiny = knee(60, 150, seed=5, noise=1e-7)  # float32 cannot certify: redone in float64
    s, w = truncate(streamed(tiny, 7)[0], rank=6), truncate(tiny, rank=6)
    same_truncation(s, w, tiny)
    flat = np.random.default_rng(3).standard_normal((50, 120)).astype(np.float32)
    s, w = truncate(streamed(flat, 9)[0], rank=5), truncate(flat, rank=5)
    assert s.method == w.method == svd.EXACT
    same_truncation(s, w, flat)


class ContiguousOnly(svd.NumpyBackend):
    """A backend that refuses to sum squares over a strided (transposed) view: the slow path
    (0.8-1.0 s against 0.023 s on a 1b MLP weight)."""

    def sumsq(self, x):
        assert x.flags.c_contiguous, "sumsq on a strided view"
        return super().sumsq(x)


@pytest.mark.parametrize("shape", [(80, 200), (200, 80)])
def test_the_total_is_summed_over_the_stored_contiguous_rows(shape) -> None:
    a = knee(*shape, seed=1)
    for view in (a, np.ascontiguousarray(a.T).T):  # a C array, and a transposed view
        t = truncate(view, rank=4, backend=ContiguousOnly())
        assert t.frobenius == pytest.approx(np.linalg.norm(a.astype(np.float64)), rel=1e-6)


def test_residual_error_is_the_float64_error_of_the_given_factors() -> None:
    a = knee(40, 70, seed=2)
    rng = np.random.default_rng(0)
    up, down = rng.standard_normal((40, 3)), rng.standard_normal((3, 70))
    want = np.linalg.norm(a.astype(np.float64) - up @ down)
    assert svd.residual_error(streamed(a, 6)[0], up, down, False) == pytest.approx(want)
    assert svd.residual_error(Rows.of(a.T.copy()), up, down, True) == pytest.approx(want)


# -- the pair reader ------------------------------------------------------------------------


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Row blocks of a few hundred bytes: every fixture tensor spans several."""
    monkeypatch.setattr(ex, "PAIR_BLOCK_BYTES", 256)


def pair_files(tmp_path: Path, base: dict, ft: dict) -> tuple[Path, Path]:
    for name, tensors in (("b", base), ("f", ft)):
        (tmp_path / name).mkdir()
        save_tensors(tmp_path / name / "model.safetensors", tensors)
    return tmp_path / "b", tmp_path / "f"


def test_block_equality_finds_a_change_in_the_last_row_only(tmp_path, small_blocks) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 24)).astype(np.float32)
    last = w.copy()
    last[-1, -1] += 1
    zero = np.zeros((40, 24), np.float32)
    base = {"same": w, "last": w, "zero": zero}
    ft = {"same": w.copy(), "last": last, "zero": -zero}  # -0.0: other bits, same values
    b, f = pair_files(tmp_path, base, ft)
    with open_checkpoint(b) as cb, open_checkpoint(f) as cf:
        comp_b, comp_f = cb.components[""], cf.components[""]
        pairs = {k: ex._Pair(comp_b, comp_f, k) for k in base}
        assert pairs["same"].rows_per_block < 40  # several blocks
        assert pairs["same"].bit_equal()
        assert not pairs["last"].bit_equal()
        assert not pairs["zero"].bit_equal()
        np.testing.assert_array_equal(pairs["last"].diff(), last - w)
        finite, nonzero, total = pairs["last"].stats()
        assert finite and nonzero and total == 1.0
        assert pairs["zero"].stats() == (True, False, 0.0)


def test_streamed_extraction_equals_the_resident_one(monkeypatch, small_blocks) -> None:
    """Every difference streamed (RESIDENT_BYTES 0) gives the adapter of the whole-tensor
    path: same modules, ranks, methods, errors and factors."""
    whole = extract(LLAMA, LLAMA_FT, rank=3, workers=1)
    monkeypatch.setattr(ex, "RESIDENT_BYTES", 0)
    streamed_ = extract(LLAMA, LLAMA_FT, rank=3, workers=1)
    assert [r.module for r in streamed_.modules] == [r.module for r in whole.modules]
    for a, b in zip(whole.modules, streamed_.modules, strict=True):
        assert (a.rank, a.method) == (b.rank, b.method)
        assert b.relative_error == pytest.approx(a.relative_error, rel=1e-5, abs=1e-7)
        ma, mb = whole.adapter.modules[a.module], streamed_.adapter.modules[b.module]
        np.testing.assert_allclose(
            mb.up.numpy().astype(np.float64) @ mb.down.numpy(),
            ma.up.numpy().astype(np.float64) @ ma.down.numpy(),
            atol=1e-2 * np.abs(ma.up.numpy()).max() * np.abs(ma.down.numpy()).max(),
        )
    assert streamed_.tensors == whole.tensors and streamed_.unchanged == whole.unchanged


def test_streamed_embeddings_match_numpy(tmp_path, monkeypatch, small_blocks) -> None:
    """A changed embedding (PEFT's transposed update) streamed: the written update is the
    float64 optimum's within the tolerance."""
    ft = tmp_path / "ft"
    shutil.copytree(LLAMA_FT, ft)
    with SafetensorsFile(LLAMA / "model.safetensors") as f:
        base = {k: f.read(k) for k in f}
    with SafetensorsFile(LLAMA_FT / "model.safetensors") as f:
        tensors = {k: f.read(k) for k in f}
    emb = base["model.embed_tokens.weight"].astype(np.float64)
    dw = knee(*emb.shape, seed=9).astype(np.float64) * 0.05
    tensors["model.embed_tokens.weight"] = (emb + dw).astype(np.float32)
    save_tensors(ft / "model.safetensors", tensors)
    monkeypatch.setattr(ex, "RESIDENT_BYTES", 0)
    result = extract(LLAMA, ft, rank=4, modules="embed_tokens", dtype="fp32")
    (row,) = result.modules
    m = result.adapter.modules[row.module]
    true = tensors["model.embed_tokens.weight"].astype(np.float64) - emb
    update = (m.up.numpy().astype(np.float64) @ m.down.numpy()).T  # (B @ A)^T
    err = np.linalg.norm(true - update) / np.linalg.norm(true)
    sv = np.linalg.svd(true, compute_uv=False)
    optimum = np.sqrt(np.sum(sv[4:] ** 2) / np.sum(sv**2))
    assert err == pytest.approx(row.relative_error, rel=1e-6)
    assert optimum <= err <= optimum * (1 + svd.TOLERANCE) + 1e-6


# -- what is kept, and the error reported -----------------------------------------------------


@pytest.mark.parametrize(("keep", "fmt"), [(False, "peft"), (False, "kohya"), (True, "kohya")])
def test_no_difference_is_kept_unless_it_will_be_stored(monkeypatch, keep, fmt) -> None:
    seen: list = []
    build = ex._Run.build

    def spy(self, base_name):
        seen.extend(d for *_, d in self.diffs)
        return build(self, base_name)

    monkeypatch.setattr(ex._Run, "build", spy)
    extract(LLAMA, LLAMA_FT, rank=3, format=fmt, keep_diffs=keep)
    assert len(seen) == 2  # the two changed norms of layer 0, listed either way
    if keep:
        assert all(isinstance(d, SpooledTensor) and d.shape == (32,) for d in seen)
    else:
        assert seen == [None, None]


def test_relative_error_is_that_of_the_written_bf16_factors(tmp_path: Path) -> None:
    result = extract(LLAMA, LLAMA_FT, rank=3, dtype="bf16", format="kohya")
    out = tmp_path / "a.safetensors"
    write_adapter(result.adapter, out, [])
    with SafetensorsFile(LLAMA / "model.safetensors") as f:
        base = {k: f.read(k).astype(np.float64) for k in f}
    with SafetensorsFile(LLAMA_FT / "model.safetensors") as f:
        ft = {k: f.read(k).astype(np.float64) for k in f}
    with SafetensorsFile(out) as f:
        written = {k: f.read(k).astype(np.float64) for k in f}
    moved = 0
    for row in result.modules:
        stem = result.adapter.modules[row.module].key
        dw = ft[row.tensor] - base[row.tensor]
        update = written[f"{stem}.lora_up.weight"] @ written[f"{stem}.lora_down.weight"]
        err = np.linalg.norm(dw - update) / np.linalg.norm(dw)
        assert err == pytest.approx(row.relative_error, rel=1e-6)
        moved += abs(row.relative_error - row.svd_relative_error) > 1e-7
    assert moved  # bf16 rounding changes the error: the two fields are not the same number


@pytest.mark.parametrize("transposed", [False, True])
def test_the_streamed_dense_fallback_never_takes_the_matrix_whole(monkeypatch, transposed) -> None:
    """No certificate on a tall streamed matrix (an embedding's shape): the float64 Gram
    route gives LAPACK's optimum, without ``whole()``."""
    flat = np.random.default_rng(4).standard_normal((300, 40)).astype(np.float32)
    want = truncate(flat.T if transposed else flat, rank=5)
    want_rank = truncate(flat.T if transposed else flat, energy=0.5).rank
    monkeypatch.setattr(svd._Op, "whole", lambda self: pytest.fail("took the matrix whole"))
    got = truncate(streamed(flat, 23)[0], rank=5, transposed=transposed)
    assert got.method == want.method == svd.EXACT and got.rank == 5
    assert got.relative_error == pytest.approx(want.relative_error, rel=1e-9)
    assert got.excess_bound < 1e-9
    np.testing.assert_allclose(got.up @ got.down, want.up @ want.down, atol=1e-9)
    # and the energy rule picks LAPACK's rank
    e_got = truncate(streamed(flat, 23)[0], energy=0.5, transposed=transposed)
    assert e_got.rank == want_rank


def test_the_workers_together_hold_at_most_the_resident_budget(monkeypatch) -> None:
    """Two workers never hold more than RESIDENT_BYTES of whole differences at once: a worker
    waits for room instead of streaming, so the adapter is the one-worker adapter bit for bit
    (which tensors stream depends on their sizes alone)."""
    held, peak, asked, lock = [0], [0], [], threading.Lock()
    hold = ex._ByteBudget.hold

    def counting(self, nbytes):
        inner = hold(self, nbytes)
        asked.append(nbytes)

        class _Count:
            def __enter__(self_):
                inner.__enter__()
                with lock:
                    held[0] += nbytes
                    peak[0] = max(peak[0], held[0])
                time.sleep(0.02)  # hold it long enough for the other worker to want room

            def __exit__(self_, *exc):
                with lock:
                    held[0] -= nbytes
                return inner.__exit__(*exc)

        return _Count()

    monkeypatch.setattr(ex._ByteBudget, "hold", counting)
    one = extract(LLAMA, LLAMA_FT, rank=3, workers=1)
    largest = max(asked)
    assert asked.count(largest) >= 3  # the MLP differences: two of them do not fit together
    budget = 2 * largest - 1
    monkeypatch.setattr(ex, "RESIDENT_BYTES", budget)
    peak[0] = 0
    two = extract(LLAMA, LLAMA_FT, rank=3, workers=2)
    assert largest <= peak[0] <= budget and held[0] == 0
    assert [r.module for r in two.modules] == [r.module for r in one.modules]
    for key, m in one.adapter.modules.items():
        other = two.adapter.modules[key]
        assert other.up.numpy().tobytes() == m.up.numpy().tobytes(), key
        assert other.down.numpy().tobytes() == m.down.numpy().tobytes(), key


def _layered_pair(tmp_path: Path, layers: int, n: int = 256) -> tuple[Path, Path]:
    """Two single-file checkpoints of ``layers`` changed ``n x n`` float32 weights."""
    rng = np.random.default_rng(layers)
    base = {
        f"layers.{i}.proj.weight": rng.standard_normal((n, n)).astype(np.float32)
        for i in range(layers)
    }
    ft = {k: v + knee(n, n, seed=i) for i, (k, v) in enumerate(base.items())}
    save_tensors(tmp_path / "base.safetensors", base)
    save_tensors(tmp_path / "ft.safetensors", ft)
    return tmp_path / "base.safetensors", tmp_path / "ft.safetensors"


def test_the_factors_wait_for_the_output_on_disk_not_in_memory(tmp_path: Path) -> None:
    """What the run holds does not grow with the layer count: every factor goes to the spool
    as its module finishes (the result holds under a tenth of their bytes), and the written
    file has every factor's exact bytes."""
    import tracemalloc

    base, ft = _layered_pair(tmp_path, layers=12)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = extract(base, ft, rank=64, workers=1)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    factors = [t for m in result.adapter.modules.values() for t in (m.up, m.down)]
    factor_bytes = sum(t.nbytes for t in factors)
    assert len(factors) == 24 and factor_bytes == 12 * 2 * 64 * 256 * 4
    assert all(isinstance(t, SpooledTensor) for t in factors)
    assert held < factor_bytes / 10, (held, factor_bytes)
    out = write_adapter(result.adapter, tmp_path / "out.safetensors", [base, ft])
    with SafetensorsFile(out) as f:
        for m in result.adapter.modules.values():
            assert f.read(m.keys["up"]).tobytes() == m.up.numpy().tobytes()
            assert f.read(m.keys["down"]).tobytes() == m.down.numpy().tobytes()
