"""``convert --for llamacpp`` composes with ``convert --to gguf``: the GGUF of the baked PEFT
folder serves what the GGUF of the original adapter serves (llama.cpp: each tensor pair at
``adapter.lora.alpha / rank(lora_b)``, src/llama-adapter.h ``get_scale``), and the baked
folder's scales are uniform, so ``--to gguf`` bakes nothing more (what llama.cpp's own
convert_lora_to_gguf.py writes for it, which reads one alpha: the ``--to gguf`` tests hold that
uniform case to the script's recorded bytes)."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
to_gguf = pytest.importorskip("lora_tools.ops.to_gguf")

from lora_tools.formats import load_adapter, save_adapter  # noqa: E402
from lora_tools.ops.deploy import convert_for  # noqa: E402


def served(path) -> tuple[float, dict[str, np.ndarray]]:
    """(alpha, tensor stem -> alpha / rank * lora_b @ lora_a) as llama.cpp computes them."""
    reader = gguf.GGUFReader(path)
    field = reader.fields["adapter.lora.alpha"]
    alpha = float(field.parts[field.data[0]][0])
    tensors = {t.name: np.array(t.data, dtype=np.float64) for t in reader.tensors}
    out = {}
    for name, a in tensors.items():
        if name.endswith(".lora_a"):
            b = tensors[name.removesuffix(".lora_a") + ".lora_b"]
            out[name.removesuffix(".lora_a")] = alpha / b.shape[1] * (b @ a)
    return alpha, out


@pytest.mark.parametrize("name", ["llama-patterns", "llama-rslora"])
def test_for_llamacpp_then_to_gguf_serves_the_direct_gguf(fixtures_dir, tmp_path, name):
    source = load_adapter(fixtures_dir / "peft" / name)
    base = fixtures_dir / "bases/tiny-llama"
    to_gguf.convert_to_gguf(source, tmp_path / "direct.gguf", base=base)
    result = convert_for(source, "llamacpp")
    save_adapter(result.adapter, tmp_path / "baked")
    via = to_gguf.convert_to_gguf(
        load_adapter(tmp_path / "baked"), tmp_path / "via.gguf", base=base
    )
    assert not via.plan.baked  # one alpha / r for every module already
    _, want = served(tmp_path / "direct.gguf")
    alpha, got = served(tmp_path / "via.gguf")
    assert alpha == result.rank
    assert sorted(got) == sorted(want)
    for key, update in want.items():
        np.testing.assert_allclose(
            got[key], update, rtol=0, atol=8 * np.finfo(np.float32).eps * np.abs(update).max()
        )
