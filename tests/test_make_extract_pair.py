"""The extract benchmark's pair generator (bench/make_extract_pair.py) writes what it says.

The benchmark measures each tool's error against the exact optimum of the pair's true
difference, so the pair itself is checked here: the planted rank-24 update with its spectrum,
the noise level, the knee, the unchanged tensors bit-equal, determinism, and a config that
transformers builds into a model with exactly the files' tensors.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from lora_tools.io.safetensors import SafetensorsFile

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "make_extract_pair", ROOT / "bench/make_extract_pair.py"
)
pair = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pair)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return pair.make_pair(tmp_path_factory.mktemp("pair") / "tiny", "tiny")


def tensors(folder: Path) -> dict[str, np.ndarray]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name, fname in index.items():
        with SafetensorsFile(folder / fname) as f:
            assert f.info(name).dtype == "BF16"
            out[name] = f.read(name)
    return out


def test_every_tensor_is_in_the_index_once_and_the_shards_are_several(tiny):
    names = [name for name, _ in pair.llama_tensors(pair.SHAPES["tiny"])]
    for folder in tiny:
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        assert sorted(index) == sorted(names)
        assert len(set(index.values())) > 1
        found = []
        for fname in set(index.values()):
            with SafetensorsFile(folder / fname) as f:
                found += list(f)
        assert sorted(found) == sorted(names)


def test_the_difference_is_the_planted_update_plus_small_noise_with_a_knee(tiny):
    b, f = (tensors(folder) for folder in tiny)
    linears = [n for n in b if pair.kind(n) == "linear"]
    assert len(linears) == 7 * pair.SHAPES["tiny"]["layers"]
    for name in linears:
        dw = f[name].astype(np.float64) - b[name].astype(np.float64)
        us, v = pair.planted_update(name, dw.shape)
        noise = dw - us @ v.T
        # the noise (1e-4) plus both bf16 roundings of a ~0.02 weight (step 2^-13, RMS ~3e-5)
        rms = np.sqrt(np.mean(noise**2))
        assert 0.9e-4 < rms < 1.4e-4, (name, rms)
        s = np.linalg.svd(dw, compute_uv=False)
        planted = pair.spectrum(dw.shape)
        # Weyl: each singular value within the noise's spectral norm of the planted one
        np.testing.assert_allclose(
            s[: pair.TRUE_RANK], planted, rtol=0, atol=np.linalg.norm(noise, 2)
        )
        assert s[pair.TRUE_RANK - 1] > 1.3 * s[pair.TRUE_RANK], (
            name
        )  # the knee (sharper at real sizes)


def test_norms_change_and_embeddings_and_lm_head_do_not(tiny):
    b, f = (tensors(folder) for folder in tiny)
    for name in b:
        if pair.kind(name) == "same":
            assert b[name].view(np.uint16).tobytes() == f[name].view(np.uint16).tobytes()
        elif pair.kind(name) == "norm":
            d = f[name].astype(np.float64) - b[name].astype(np.float64)
            assert 0.005 < np.sqrt(np.mean(d**2)) < 0.02, name
    assert {pair.kind(n) for n in b} == {"linear", "norm", "same"}


def test_the_same_files_on_every_run(tiny, tmp_path):
    again = pair.make_pair(tmp_path / "again", "tiny")
    for first, second in zip(tiny, again, strict=True):
        for path in first.glob("*.safetensors"):
            assert path.read_bytes() == (second / path.name).read_bytes()


@pytest.mark.oracle
def test_transformers_builds_the_config_into_exactly_these_tensors(tiny):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    config = transformers.AutoConfig.from_pretrained(tiny[0])
    assert type(config).__name__ == "LlamaConfig"
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = dict(pair.llama_tensors(pair.SHAPES["tiny"]))
    assert expected == found
