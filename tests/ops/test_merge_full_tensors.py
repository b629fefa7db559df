"""Full tensors of a PEFT adapter (modules_to_save, saved layers) against the base: PEFT loads
each over the base tensor of its name with load_state_dict, refuses one of another shape (a
resized vocabulary) and drops one that names nothing, without a word. merge and validate --base
say so instead of skipping them (they did: "0 replaced" and "All checks passed")."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from lora_tools.errors import ResolveError, ShapeError
from lora_tools.io.safetensors import SafetensorsFile, save_tensors
from lora_tools.ops.merge import merge
from lora_tools.ops.validate import validate

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "fixtures" / "bases" / "tiny-llama"
MTS = ROOT / "fixtures" / "peft" / "llama-modules-to-save"
HEAD = "base_model.model.lm_head.weight"


def with_tensors(tmp_path: Path, extra: dict[str, np.ndarray], drop: tuple[str, ...] = ()) -> Path:
    """llama-modules-to-save with ``extra`` full tensors added (``drop`` removed)."""
    out = tmp_path / "adapter"
    shutil.copytree(MTS, out)
    weights = out / "adapter_model.safetensors"
    with SafetensorsFile(weights) as f:
        tensors = {k: f.read(k) for k in f if k not in drop}
    save_tensors(weights, {**tensors, **extra})
    return out


def resized(tmp_path: Path) -> Path:
    """lm_head in modules_to_save with 130 rows: a fine-tune that added two tokens."""
    return with_tensors(tmp_path, {HEAD: np.ones((130, 32), np.float32)})


def stray(tmp_path: Path) -> Path:
    return with_tensors(tmp_path, {"base_model.model.model.norm_x.weight": np.ones(32, np.float32)})


def codes(adapter: Path) -> list[tuple[str, str | None]]:
    return [(f.rule.code, f.module) for f in validate([adapter], base=BASE).findings]


def test_intact_modules_to_save_replaces_the_base_tensor(tmp_path) -> None:
    summary = merge(BASE, [MTS], tmp_path / "out")
    assert summary.tensors["replaced"] == 1 and summary.unmatched == 0
    assert codes(MTS) == []


def test_a_resized_vocabulary_is_refused_by_merge_and_an_error_in_validate(tmp_path) -> None:
    adapter = resized(tmp_path)
    with pytest.raises(ShapeError) as exc:
        merge(BASE, [adapter], tmp_path / "out")
    message = exc.value.message
    assert f"{HEAD!r}" in message and "[130, 32]" in message and "[128, 32]" in message
    assert "resized vocabulary" in message and "130 rows" in message
    assert not (tmp_path / "out").exists()
    assert codes(adapter) == [("LT403", HEAD)]


def test_a_full_tensor_naming_nothing_is_refused_unless_allowed(tmp_path) -> None:
    adapter = stray(tmp_path)
    key = "base_model.model.model.norm_x.weight"
    with pytest.raises(ResolveError, match=r"1 full tensor\(s\).*'base_model.model.model.norm_x"):
        merge(BASE, [adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    summary = merge(BASE, [adapter], tmp_path / "out", allow_unmatched=True)
    (record,) = summary.adapters
    assert record["unmatched"] == [key] and record["counts"]["tensors_unmatched"] == 1
    assert summary.unmatched == 1 and summary.tensors["replaced"] == 1
    assert codes(adapter) == [("LT401", key)]


def test_peft_refuses_the_resized_tensor_and_drops_the_stray_one_silently(tmp_path) -> None:
    """The oracle for the two severities: PEFT itself."""
    pytest.importorskip("peft")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), resized(tmp_path))
    adapter = stray(tmp_path / "s")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"]
    base = AutoModelForCausalLM.from_pretrained(BASE)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter)
    assert not any("norm_x" in str(w.message) for w in caught)  # not a word
    state = model.base_model.model.state_dict()
    assert not any("norm_x" in k for k in state)
    assert torch.equal(state["model.norm.weight"], before["model.norm.weight"])


def _classifier_adapter(tmp_path: Path) -> Path:
    """A sequence-classification adapter as PEFT saves it: the new ``score`` head (not in the
    causal-LM base checkpoint) in modules_to_save beside the LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=3)
    config = LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS")
    get_peft_model(model, config).save_pretrained(tmp_path / "cls")
    return tmp_path / "cls"


def test_a_new_head_in_modules_to_save_is_no_finding_but_merge_says_it_cannot_hold_it(
    tmp_path,
) -> None:
    """PEFT loads the head into the module the task's model class creates: an intact adapter,
    so validate --base finds nothing; a merge into the causal-LM checkpoint would lose it, so
    merge refuses (--allow-unmatched merges the LoRA and counts the head as skipped)."""
    pytest.importorskip("peft")
    adapter = _classifier_adapter(tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert "score" in config["modules_to_save"]
    assert [c for c in codes(adapter) if c[0] != "LT202"] == []  # LT202: untrained, lora_B = 0
    with pytest.raises(ResolveError, match="'base_model.model.score.weight' of modules_to_save"):
        merge(BASE, [adapter], tmp_path / "out")
    summary = merge(BASE, [adapter], tmp_path / "out", allow_unmatched=True)
    (record,) = summary.adapters
    assert record["unmatched"] == ["base_model.model.score.weight"]
    assert record["counts"]["tensors_unmatched"] == 1 and summary.unmatched == 1


def _trainable_tokens_adapter(tmp_path: Path, indices, dtype=None) -> Path:
    """A LoRA with PEFT's trainable tokens (``trainable_token_indices``), trained a little: the
    token rows and lora_B get random values."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=dtype or torch.float32)
    config = LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=indices)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in name or "lora_B" in name:
                p.copy_(torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "tokens")
    return tmp_path / "tokens"


@pytest.mark.parametrize("indices", [[3, 5, 100], {"embed_tokens": [7, 0]}])
def test_trainable_tokens_merge_as_peft_merges_them(tmp_path, indices) -> None:
    """The token rows replace the base's rows (index_copy), bit for bit as merge_and_unload;
    validate --base finds nothing (before: merge dropped them without a word)."""
    pytest.importorskip("peft")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = _trainable_tokens_adapter(tmp_path, indices)
    with SafetensorsFile(adapter / "adapter_model.safetensors") as f:
        assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in f
    assert codes(adapter) == []
    summary = merge(BASE, [adapter], tmp_path / "out")
    assert summary.tensors["replaced"] == 1
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    want = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    merge(BASE, [adapter], tmp_path / "torch", device="torch-cpu")
    for out in ("out", "torch"):
        with SafetensorsFile(tmp_path / out / "model.safetensors") as f:
            for key in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
                assert f.read(key).tobytes() == want[key].numpy().tobytes(), (out, key)


def test_trainable_tokens_that_do_not_fit_the_base_are_refused(tmp_path) -> None:
    pytest.importorskip("peft")
    adapter = _trainable_tokens_adapter(tmp_path, [3, 5])
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["trainable_token_indices"] = [3, 500]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ShapeError, match="token row 500 is outside the base's"):
        merge(BASE, [adapter], tmp_path / "out")
    assert [c for c, _ in codes(adapter)] == ["LT403"]


def test_a_config_rank_other_than_the_tensors_is_refused_as_peft_refuses_it(tmp_path) -> None:
    """r (or the rank_pattern key PEFT matches first) builds the layer; tensors of another rank
    fail PEFT's load, so no command computes with them (validate reports LT304)."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_tools.errors import AdapterError

    adapter = with_tensors(tmp_path, {})
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    rank = config["r"]
    config["rank_pattern"] = {"q_proj": rank + 2}
    path.write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), adapter)
    with pytest.raises(
        AdapterError, match=rf"rank {rank} in its tensors.*rank_pattern\['q_proj'\]"
    ):
        merge(BASE, [adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert "LT304" in [c for c, _ in codes(adapter)]
