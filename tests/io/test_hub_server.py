"""End-to-end checks of ``tests/hub_server.py`` with the real ``huggingface_hub`` client."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    create_repo,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.hub_server import GITATTRIBUTES, TEST_TOKEN, TEST_USER, HubServer, git_blob_sha1

pytest_plugins = ["tests.conftest_hub"]

REPO = f"{TEST_USER}/adapter"
CONFIG = b'{"r": 8, "lora_alpha": 16}\n'
WEIGHTS = b"safetensors-ish text payload " * 1000  # no NUL, < 10 MiB: LFS by .gitattributes only


@pytest.fixture
def no_backoff_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client sleeps 1-8 s between retries (`http_backoff`); tests don't need to wait."""
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda seconds: None))


def _upload(api: HfApi, repo_id: str = REPO, **kwargs):
    ops = [
        CommitOperationAdd("adapter_config.json", CONFIG),
        CommitOperationAdd("adapter_model.safetensors", WEIGHTS),
    ]
    return api.create_commit(repo_id, ops, commit_message="Upload adapter", **kwargs)


def test_fixture_points_the_client_at_the_server(hub_server: HubServer) -> None:
    assert constants.ENDPOINT == hub_server.url == os.environ["HF_ENDPOINT"]
    assert constants.HF_HUB_DISABLE_XET and not constants.is_offline_mode()
    assert HfApi().whoami()["name"] == TEST_USER
    assert hub_server.requests("/api/whoami-v2") == [("GET", "/api/whoami-v2", 200)]


def test_create_repo_private_and_exist_ok(hub_server: HubServer) -> None:
    url = create_repo(REPO, private=True)  # module-level function: uses the patched `hf_api.api`
    assert url.repo_id == REPO and url.startswith(hub_server.url)
    repo = hub_server.repos[REPO]
    assert repo.private is True
    assert repo.branches["main"][-1].files == {".gitattributes": GITATTRIBUTES}

    assert create_repo(REPO, exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError) as exc:
        create_repo(REPO)
    assert exc.value.response.status_code == 409
    assert HfApi().model_info(REPO).private is True
    assert HfApi().repo_exists(REPO) and not HfApi().repo_exists(f"{TEST_USER}/missing")


def test_create_commit_regular_and_lfs(hub_server: HubServer) -> None:
    api = HfApi()
    api.create_repo(REPO, private=True)
    info = _upload(api)

    commit = hub_server.repos[REPO].branches["main"][-1]
    assert info.oid == commit.oid and commit.message == "Upload adapter"
    assert commit.files["adapter_config.json"] == CONFIG
    assert commit.files["adapter_model.safetensors"] == WEIGHTS
    assert commit.lfs == {"adapter_model.safetensors"}  # config went inline, base64 in the NDJSON
    sha = hashlib.sha256(WEIGHTS).hexdigest()
    assert hub_server.lfs_objects[sha] == WEIGHTS
    assert hub_server.requests("/info/lfs/objects/batch", "POST")[0].status == 200
    assert [r.status for r in hub_server.requests("/lfs-upload/", "PUT")] == [200]
    assert [r.status for r in hub_server.requests("/lfs-verify/", "POST")] == [200]

    assert sorted(api.list_repo_files(REPO)) == [
        ".gitattributes",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert api.file_exists(REPO, "adapter_config.json")
    assert not api.file_exists(REPO, "nope.bin")
    files = {f.path: f for f in api.list_repo_tree(REPO)}
    assert files["adapter_model.safetensors"].lfs.sha256 == sha
    assert files["adapter_config.json"].blob_id == git_blob_sha1(CONFIG)
    siblings = {s.rfilename: s for s in api.model_info(REPO, files_metadata=True).siblings}
    assert siblings["adapter_model.safetensors"].lfs.size == len(WEIGHTS)
    history = hub_server.repos[REPO].history(commit)
    assert [c.message for c in history] == ["initial commit", "Upload adapter"]

    # Same content again: preupload returns the remote oids, so the client skips the empty commit.
    assert _upload(api).oid == commit.oid
    assert len(hub_server.repos[REPO].branches["main"]) == 2


def test_large_files_are_lfs_and_existing_blobs_are_not_reuploaded(hub_server: HubServer) -> None:
    api = HfApi()
    api.create_repo(REPO)
    hub_server.lfs_threshold = 1024  # instead of 10 MiB
    big_text = b"x" * 2048
    api.create_commit(
        REPO, [CommitOperationAdd("notes/big.txt", big_text)], commit_message="big text"
    )
    assert hub_server.repos[REPO].branches["main"][-1].lfs == {"notes/big.txt"}

    api.create_commit(REPO, [CommitOperationAdd("copy.txt", big_text)], commit_message="same blob")
    assert len(hub_server.requests("/lfs-upload/")) == 1  # batch answered "already there"
    tree = api.list_repo_tree(REPO)
    assert sorted(f.path for f in tree) == [".gitattributes", "copy.txt", "notes"]


def test_seeded_repo(hub_server: HubServer, tmp_path: Path) -> None:
    files = {"w.safetensors": b"abc", "notes/a.md": b"# hi\n"}
    hub_server.add_repo("org/seeded", private=True, files=files)
    assert hub_server.repos["org/seeded"].branches["main"][-1].lfs == {"w.safetensors"}
    assert Path(hf_hub_download("org/seeded", "w.safetensors")).read_bytes() == b"abc"
    folder = Path(snapshot_download("org/seeded", allow_patterns="notes/*", local_dir=tmp_path))
    assert [p.relative_to(folder).as_posix() for p in folder.rglob("*.md")] == ["notes/a.md"]
    assert not (folder / "w.safetensors").exists()


def test_branch_commit_and_pull_request(hub_server: HubServer) -> None:
    api = HfApi()
    api.create_repo(REPO)
    main_head = _upload(api).oid

    api.create_branch(REPO, branch="dev")
    api.create_branch(REPO, branch="dev", exist_ok=True)
    api.create_commit(
        REPO,
        [CommitOperationAdd("README.md", b"---\nlicense: mit\n---\n# dev\n")],
        commit_message="Card on dev",
        revision="dev",
    )
    repo = hub_server.repos[REPO]
    assert repo.branches["main"][-1].oid == main_head
    assert "README.md" in repo.branches["dev"][-1].files
    assert repo.branches["dev"][-2].oid == main_head
    assert hub_server.requests("/api/validate-yaml")[0].status == 200
    assert {ref.name for ref in api.list_repo_refs(REPO).branches} == {"main", "dev"}

    pr = api.create_commit(
        REPO,
        [CommitOperationDelete("adapter_config.json")],
        commit_message="Drop config",
        create_pr=True,
    )
    assert pr.pr_num == 1 and pr.pr_revision == "refs/pr/1"
    assert pr.pr_url == f"{hub_server.url}/{REPO}/discussions/1"
    pr_commit = repo.branches["refs/pr/1"][-1]
    assert pr_commit.pr_num == 1 and pr_commit.message == "Drop config"
    assert "adapter_config.json" not in pr_commit.files
    assert repo.branches["main"][-1].oid == main_head  # target branch untouched
    assert api.list_repo_files(REPO, revision="refs/pr/1") == [
        ".gitattributes",
        "adapter_model.safetensors",
    ]
    path = hf_hub_download(REPO, "adapter_model.safetensors", revision="refs/pr/1")
    assert Path(path).read_bytes() == WEIGHTS
    refs = api.list_repo_refs(REPO, include_pull_requests=True)
    assert [ref.name for ref in refs.pull_requests] == ["refs/pr/1"]


def test_snapshot_download_with_allow_patterns(hub_server: HubServer, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo(REPO, private=True)
    _upload(api)
    api.create_commit(
        REPO, [CommitOperationAdd("extra/other.bin", b"\0" * 10)], commit_message="more"
    )

    folder = Path(snapshot_download(REPO, allow_patterns=["*.json", "*.safetensors"]))
    assert folder.is_relative_to(constants.HF_HUB_CACHE)
    got = {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }
    assert got == {"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS}
    assert folder.name == hub_server.repos[REPO].branches["main"][-1].oid

    local = Path(snapshot_download(REPO, allow_patterns="extra/*", local_dir=tmp_path / "out"))
    assert (local / "extra" / "other.bin").read_bytes() == b"\0" * 10
    assert not (local / "adapter_config.json").exists()


def test_hf_hub_download_single_file(hub_server: HubServer) -> None:
    api = HfApi()
    api.create_repo(REPO)
    first = _upload(api).oid
    api.create_commit(REPO, [CommitOperationAdd("adapter_config.json", b"{}")], commit_message="v2")

    assert Path(hf_hub_download(REPO, "adapter_config.json")).read_bytes() == b"{}"
    old = hf_hub_download(REPO, "adapter_config.json", revision=first)
    assert Path(old).read_bytes() == CONFIG
    lfs = hf_hub_download(REPO, "adapter_model.safetensors")
    assert Path(lfs).read_bytes() == WEIGHTS
    heads = hub_server.requests("/resolve/main/adapter_model.safetensors", "HEAD")
    assert [r.status for r in heads] == [200]
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.txt")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "adapter_config.json", revision="no-such-branch")


def test_failed_commit_publishes_nothing(hub_server: HubServer) -> None:
    api = HfApi()
    api.create_repo(REPO)
    before = list(hub_server.repos[REPO].branches["main"])

    hub_server.fail_next("/commit/main", 500)
    with pytest.raises(HfHubHTTPError) as exc:
        _upload(api)
    assert exc.value.response.status_code == 500
    assert hub_server.repos[REPO].branches["main"] == before
    assert api.list_repo_files(REPO) == [".gitattributes"]
    # The LFS blob was uploaded before the commit failed, but it is not in any commit.
    assert hashlib.sha256(WEIGHTS).hexdigest() in hub_server.lfs_objects

    _upload(api)  # a retry succeeds (and does not upload the blob twice)
    assert len(hub_server.repos[REPO].branches["main"]) == 2
    assert len(hub_server.requests("/lfs-upload/")) == 1


def test_failed_lfs_upload_publishes_nothing(hub_server: HubServer) -> None:
    api = HfApi()
    api.create_repo(REPO)
    hub_server.fail_next("/lfs-upload/", 403, method="PUT")  # 403 is not retried
    with pytest.raises(RuntimeError, match=r"Error while uploading 'adapter_model\.safetensors'"):
        _upload(api)
    assert hub_server.lfs_objects == {}
    assert not hub_server.requests("/commit/")
    assert api.list_repo_files(REPO) == [".gitattributes"]


def test_transient_errors_are_retried(hub_server: HubServer, no_backoff_sleep: None) -> None:
    api = HfApi()
    api.create_repo(REPO)
    hub_server.fail_next("/preupload/", 429, headers={"Retry-After": "3"})
    hub_server.fail_next("/lfs-upload/", 503, count=2)
    _upload(api)
    assert [r.status for r in hub_server.requests("/preupload/")] == [429, 200]
    assert [r.status for r in hub_server.requests("/lfs-upload/")] == [503, 503, 200]
    assert hub_server.repos[REPO].branches["main"][-1].files["adapter_model.safetensors"] == WEIGHTS


def test_auth_401_without_token_and_403_on_read_only_token(
    hub_server: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    HfApi().create_repo(REPO, private=True)
    anonymous = HfApi(token=False)
    with pytest.raises(RepositoryNotFoundError) as exc:  # private repo, no token: 401 RepoNotFound
        anonymous.model_info(REPO)
    assert exc.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as exc:
        HfApi(token="hf_wrong").model_info(REPO)
    assert exc.value.response.status_code == 401

    hub_server.require_token = True
    with pytest.raises(HfHubHTTPError) as exc:
        anonymous.whoami(token="hf_wrong")
    assert exc.value.response.status_code == 401
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HfHubHTTPError) as exc:
        snapshot_download(REPO)
    assert exc.value.response.status_code == 401
    assert HfApi(token=TEST_TOKEN).model_info(REPO).id == REPO
    _upload(HfApi(token=TEST_TOKEN))  # the signed LFS upload URL needs no Authorization header
    assert len(hub_server.repos[REPO].branches["main"]) == 2

    hub_server.tokens["hf_read"] = "reader"
    hub_server.read_only_tokens.add("hf_read")
    with pytest.raises(HfHubHTTPError) as exc:
        _upload(HfApi(token="hf_read"))
    assert exc.value.response.status_code == 403
    assert len(hub_server.repos[REPO].branches["main"]) == 2
    hub_server.write_forbidden.add(REPO)
    with pytest.raises(HfHubHTTPError) as exc:
        HfApi(token=TEST_TOKEN).create_branch(REPO, branch="x")
    assert exc.value.response.status_code == 403
    assert all("hf_" not in f"{r}" for r in hub_server.log)  # no token values in the log
    assert hub_server.errors == []


def test_cli_subprocess_uses_the_server(hub_server: HubServer) -> None:
    """The environment alone (no patched constants) is enough for a child process."""
    HfApi().create_repo(REPO)
    code = f"from huggingface_hub import HfApi; print(HfApi().list_repo_files({REPO!r}))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "['.gitattributes']"
