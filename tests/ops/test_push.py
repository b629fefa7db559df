"""``push``: what is planned from local files, the model card, and what arrives on the Hub
(the real huggingface_hub client against tests/hub_server.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lora_tools.errors import FormatError, HubError, UsageError
from lora_tools.ops.card import BEGIN, END, render_card, split_card
from lora_tools.ops.push import ValidationFailed, default_validator, plan_push, publish
from tests.hub_server import GITATTRIBUTES, TEST_USER, HubServer

pytest_plugins = ["tests.conftest_hub"]

FIX = Path(__file__).resolve().parents[2] / "fixtures"
REPO = f"{TEST_USER}/llama-lora"
BASE_ID = "meta-llama/Llama-3.2-1B"


@pytest.fixture
def no_backoff_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client sleeps 1-8 s between retries; tests don't need to wait."""
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda seconds: None))


@pytest.fixture(scope="module")
def merged_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lora_tools.ops.merge import merge

    out = tmp_path_factory.mktemp("merged") / "llama-merged"
    merge(FIX / "bases/tiny-llama", [FIX / "peft/llama-lora"], out, device="cpu")
    return out


def kohya_with_metadata(tmp_path: Path, **extra: str) -> Path:
    src = FIX / "kohya/sd-lora.safetensors"
    from lora_tools.io.safetensors import read_header

    metadata = dict(read_header(src).metadata or {})
    out = tmp_path / "style.safetensors"
    save_file(load_file(src), out, metadata={**metadata, **extra})
    return out


def front_matter(card: str) -> dict:
    return split_card(card)[0]


# -- planning (local files only) -----------------------------------------------------------------


def test_peft_adapter_plan_and_card() -> None:
    src = FIX / "peft/llama-lora"
    plan = plan_push(src, REPO, base_model=BASE_ID)
    assert plan.kind == "adapter"
    assert [(f.path_in_repo, f.size) for f in plan.files[:-1]] == [
        ("adapter_config.json", (src / "adapter_config.json").stat().st_size),
        ("adapter_model.safetensors", (src / "adapter_model.safetensors").stat().st_size),
    ]
    assert plan.files[-1].path_in_repo == "README.md"
    meta = front_matter(plan.card)
    assert meta["base_model"] == BASE_ID and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    # PEFT's own tags are kept; its base_model:adapter tag for the local path is rebuilt.
    assert meta["tags"] == ["lora", "transformers", "loratool", f"base_model:adapter:{BASE_ID}"]

    # The existing card's body is kept byte for byte; loratool's block follows it.
    old_body = split_card((src / "README.md").read_text())[1].rstrip("\n")
    new_body = split_card(plan.card)[1]
    assert new_body.startswith(old_body + "\n\n" + BEGIN)
    block = new_body[len(old_body) :]
    for fact in ("| format | peft (LoRA) |", "| rank | 4 |", "| alpha | 8 |", "| scale | 2 |"):
        assert fact in block
    assert "`q_proj` (x2)" in block and "| modules | 8 (linear 8) |" in block
    assert "`adapter_model.safetensors` (9.2 kB)" in block

    # Pushing the pushed card again changes nothing.
    again, _ = render_card(plan.card, plan.facts, override_base=True)
    assert again == plan.card


def test_local_base_path_is_not_published_as_base_model() -> None:
    plan = plan_push(FIX / "peft/llama-lora", REPO)
    meta = front_matter(plan.card)
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert not any(t.startswith("base_model:") for t in meta["tags"])
    assert any("--base-model" in note for note in plan.notes)


def test_new_card_for_a_kohya_file_with_license_and_history(tmp_path: Path) -> None:
    history = [
        {"op": "resize", "version": "0.1.0", "rank": 2, "method": "fixed"},
        {"op": "rescale", "version": "0.1.0", "factor": 0.5},
    ]
    path = kohya_with_metadata(
        tmp_path, **{"modelspec.license": "openrail++", "loratool_history": json.dumps(history)}
    )
    plan = plan_push(path, f"{TEST_USER}/style", base_model="org/tiny-sd")
    assert [f.path_in_repo for f in plan.files] == ["style.safetensors", "README.md"]
    meta = front_matter(plan.card)
    assert meta == {
        "base_model": "org/tiny-sd",
        "base_model_relation": "adapter",
        "library_name": "diffusers",
        "license": "openrail++",
        "tags": ["lora", "loratool", "base_model:adapter:org/tiny-sd"],
    }
    body = split_card(plan.card)[1]
    assert body.startswith("\n# style\n\nA LoRA adapter for [org/tiny-sd]")
    assert '1. `resize` (loratool 0.1.0): rank=2, method="fixed"' in body
    assert "2. `rescale` (loratool 0.1.0): factor=0.5" in body
    assert "| components | text_encoder 12, unet 48 |" in body
    assert 'pipe.load_lora_weights("tester/style", weight_name="style.safetensors")' in body


def test_user_card_front_matter_is_merged_not_clobbered() -> None:
    user = (
        "---\nlicense: mit\nlibrary_name: custom\ntags:\n- my-tag\n- base_model:adapter:old/base\n"
        "base_model: someone/real-base\nlanguage: en\n---\n# Mine\n\nMy words.\n"
    )
    from lora_tools.ops.card import CardFacts

    facts = CardFacts(
        kind="adapter",
        title="x",
        library_name="peft",
        base_model="other/base",
        license="apache-2.0",
        tags=["lora"],
        details="D",
    )
    text, notes = render_card(user, facts)
    meta, body = split_card(text)
    assert (
        meta["license"] == "mit" and meta["library_name"] == "custom" and meta["language"] == "en"
    )
    assert meta["base_model"] == "someone/real-base"  # a Hub id the user wrote wins
    assert meta["tags"] == ["my-tag", "lora", "base_model:adapter:someone/real-base"]
    assert body == f"# Mine\n\nMy words.\n\n{BEGIN}\nD\n{END}\n"
    assert notes == []
    text, notes = render_card(user, facts, override_base=True)
    assert split_card(text)[0]["base_model"] == "other/base" and "replaced" in notes[0]
    # A second push replaces loratool's block only.
    facts.details = "E"
    assert (
        split_card(render_card(text, facts)[0])[1] == f"# Mine\n\nMy words.\n\n{BEGIN}\nE\n{END}\n"
    )


def test_adapter_folder_skips_pickles_hidden_files_and_subfolders(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    shutil.copytree(FIX / "peft/llama-lora", folder)
    (folder / "training_args.bin").write_bytes(b"\x80\x04pickle")
    (folder / ".git").mkdir()
    (folder / ".git/config").write_text("x")
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10/adapter_model.safetensors").write_bytes(b"old")
    (folder / "tokenizer.json").write_text("{}")
    plan = plan_push(folder, REPO)
    assert [f.path_in_repo for f in plan.files] == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "README.md",
    ]
    assert any("training_args.bin" in n and "pickle" in n for n in plan.notes)
    assert any("checkpoint-10/" in n for n in plan.notes)


def test_validation_errors_refuse_the_push() -> None:
    with pytest.raises(ValidationFailed, match="LT201 non-finite") as exc:
        plan_push(FIX / "broken/nan-weights", REPO)
    assert exc.value.exit_code == 1 and "--no-validate" in str(exc.value)
    assert len(exc.value.errors) == len(default_validator(FIX / "broken/nan-weights"))
    plan = plan_push(FIX / "broken/nan-weights", REPO, validator=None)
    assert plan.kind == "adapter"
    with pytest.raises(FormatError, match="truncated"):  # unreadable, validation or not
        plan_push(FIX / "broken/truncated.safetensors", REPO, validator=None)


def test_bad_ids_are_usage_errors() -> None:
    for bad in ("no-slash", "a/b/c", "user/name@v2", "user/na me"):
        with pytest.raises(UsageError):
            plan_push(FIX / "peft/llama-lora", bad)
    with pytest.raises(UsageError, match="--base-model"):
        plan_push(FIX / "peft/llama-lora", REPO, base_model="./local/path")


def test_merged_model_plan(merged_llama: Path) -> None:
    plan = plan_push(merged_llama, f"{TEST_USER}/merged", base_model="org/tiny-llama")
    assert plan.kind == "model"
    names = [f.path_in_repo for f in plan.files]
    assert names == [
        "config.json",
        "generation_config.json",
        "loratool_merge.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    ]
    meta = front_matter(plan.card)
    assert meta["base_model"] == "org/tiny-llama" and meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers"
    assert "base_model:finetune:org/tiny-llama" in meta["tags"] and "merge" in meta["tags"]
    body = split_card(plan.card)[1]
    assert "| `" in body and "| peft | 1.0 | 8 |" in body  # the adapter row from the provenance
    # merge wrote its own card into the folder: its text is kept, loratool's block appended.
    merge_card = (merged_llama / "README.md").read_text()
    assert split_card(plan.card)[1].startswith(split_card(merge_card)[1].rstrip("\n"))


def test_pipeline_and_plain_model_folders_are_models() -> None:
    sd = plan_push(FIX / "bases/tiny-sd", f"{TEST_USER}/sd")
    assert sd.kind == "model" and front_matter(sd.card)["library_name"] == "diffusers"
    assert "unet/diffusion_pytorch_model.safetensors" in [f.path_in_repo for f in sd.files]
    llama = plan_push(FIX / "bases/tiny-llama-sharded", f"{TEST_USER}/llama")
    assert llama.kind == "model" and front_matter(llama.card)["library_name"] == "transformers"


# -- publishing ----------------------------------------------------------------------------------


def commit_of(server: HubServer, repo_id: str = REPO, branch: str = "main"):
    return server.repos[repo_id].branches[branch][-1]


def test_publish_uploads_every_byte_in_one_commit(hub_server: HubServer) -> None:
    src = FIX / "peft/llama-lora"
    plan = plan_push(src, REPO, base_model=BASE_ID)
    result = publish(plan, private=True, message="first version")
    repo = hub_server.repos[REPO]
    assert repo.private is True and result.repo_created
    assert [c.message for c in repo.branches["main"]] == ["initial commit", "first version"]
    commit = repo.branches["main"][-1]
    assert result.commit_oid == commit.oid
    assert result.url == result.commit_url == f"{hub_server.url}/{REPO}/commit/{commit.oid}"
    assert commit.files == {
        ".gitattributes": GITATTRIBUTES,
        "adapter_config.json": (src / "adapter_config.json").read_bytes(),
        "adapter_model.safetensors": (src / "adapter_model.safetensors").read_bytes(),
        "README.md": plan.card.encode(),
    }
    assert commit.lfs == {"adapter_model.safetensors"}
    sha = hashlib.sha256((src / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert hub_server.lfs_objects[sha] == (src / "adapter_model.safetensors").read_bytes()
    assert len(hub_server.requests("/commit/", "POST")) == 1
    assert hub_server.requests("/api/validate-yaml")[0].status == 200


def test_branch_pr_and_existing_public_repo(hub_server: HubServer) -> None:
    hub_server.add_repo(REPO)
    plan = plan_push(FIX / "peft/llama-lora", REPO, base_model=BASE_ID)
    on_branch = publish(plan, revision="dev", private=True)
    repo = hub_server.repos[REPO]
    assert not on_branch.repo_created and repo.private is False
    assert any("--private applies only on creation" in n for n in on_branch.notes)
    assert len(repo.branches["main"]) == 1 and "README.md" in repo.branches["dev"][-1].files

    pr = publish(plan_push(FIX / "peft/llama-patterns", REPO), create_pr=True)
    assert pr.pr_url == f"{hub_server.url}/{REPO}/discussions/1" and pr.url == pr.pr_url
    assert len(repo.branches["main"]) == 1  # main untouched
    pr_files = repo.branches["refs/pr/1"][-1].files
    want = (FIX / "peft/llama-patterns/adapter_config.json").read_bytes()
    assert pr_files["adapter_config.json"] == want


def test_remote_card_is_merged_when_the_input_has_none(hub_server: HubServer, tmp_path) -> None:
    user_card = b"---\nlicense: mit\ntags:\n- style\n---\n# Ink style\n\nTrained on my drawings.\n"
    hub_server.add_repo(f"{TEST_USER}/style", files={"README.md": user_card})
    path = kohya_with_metadata(tmp_path)
    plan = plan_push(path, f"{TEST_USER}/style", base_model="org/tiny-sd")
    publish(plan)
    card = commit_of(hub_server, f"{TEST_USER}/style").files["README.md"].decode()
    meta, body = split_card(card)
    assert meta["license"] == "mit" and meta["tags"][0] == "style"
    assert meta["base_model"] == "org/tiny-sd" and meta["library_name"] == "diffusers"
    assert body.startswith("# Ink style\n\nTrained on my drawings.\n\n" + BEGIN)
    assert card != plan.card  # the dry-run card could not know the remote one


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        ("no-token", "HTTP 401"),
        ("read-only", "HTTP 403"),
        ("forbidden", "HTTP 403"),
        ("commit-429", "HTTP 429"),
        ("commit-500", "HTTP 500"),
        ("lfs-403", "Error while uploading"),
    ],
)
def test_failures_publish_nothing(
    hub_server: HubServer, monkeypatch, no_backoff_sleep: None, setup: str, match: str
) -> None:
    hub_server.add_repo(REPO, files={"README.md": b"# keep me\n"})
    before = list(hub_server.repos[REPO].branches["main"])
    token = None
    if setup == "no-token":
        monkeypatch.delenv("HF_TOKEN")
        hub_server.require_token = True
    elif setup == "read-only":
        hub_server.tokens["hf_read_only"] = TEST_USER
        hub_server.read_only_tokens.add("hf_read_only")
        token = "hf_read_only"
    elif setup == "forbidden":
        hub_server.write_forbidden.add(REPO)
    elif setup == "commit-429":
        hub_server.fail_next("/commit/main", 429)
    elif setup == "commit-500":
        hub_server.fail_next("/commit/main", 500)
    else:
        hub_server.fail_next("/lfs-upload/", 403, method="PUT")
    plan = plan_push(FIX / "peft/llama-lora", REPO)
    with pytest.raises(HubError, match=match) as exc:
        publish(plan, token=token)
    assert "\n" not in str(exc.value)
    assert hub_server.repos[REPO].branches["main"] == before
    assert set(hub_server.repos[REPO].branches) == {"main"}
    assert "hf_" not in str(exc.value)


def test_network_down_is_one_error(hub_server: HubServer, no_backoff_sleep: None) -> None:
    plan = plan_push(FIX / "peft/llama-lora", REPO)
    hub_server.stop()
    with pytest.raises(HubError, match="failed: ConnectError") as exc:
        publish(plan)
    assert "HF_ENDPOINT" in str(exc.value)


def test_merged_model_arrives_exactly(hub_server: HubServer, merged_llama: Path) -> None:
    plan = plan_push(merged_llama, f"{TEST_USER}/merged", base_model="org/tiny-llama")
    publish(plan)
    files = commit_of(hub_server, f"{TEST_USER}/merged").files
    for f in plan.files[:-1]:
        assert files[f.path_in_repo] == (merged_llama / f.path_in_repo).read_bytes()
    assert files["README.md"] == plan.card.encode()
    merged = load_file(merged_llama / "model.safetensors")
    base = load_file(FIX / "bases/tiny-llama/model.safetensors")
    changed = [k for k in base if not np.array_equal(base[k], merged[k])]
    assert len(changed) == 8  # the uploaded weights are the merged ones, not the base's
