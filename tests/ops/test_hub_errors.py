"""One translation of Hub failures: a download (io.hub) and a push (ops.push) that meet the same
huggingface_hub exception print the same words, the same hint and the same kind.

The exceptions are the real ones: huggingface_hub's own ``hf_raise_for_status`` turns a Hub
answer (status, ``X-Error-Code``, message) into the exception it raises for it.
"""

from __future__ import annotations

import re

import httpx2
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import OfflineModeIsEnabled
from huggingface_hub.utils import hf_raise_for_status

from lora_tools.errors import HubError
from lora_tools.io.hub import HUB_HINTS, _download_error
from lora_tools.ops.push import _push_error

REPO = "me/lora"
TOKEN = "hf_" + "Q" * 34  # redacted by its shape in every message


def answered(status: int, code: str | None, message: str, path: str) -> Exception:
    """What huggingface_hub raises for this answer of the Hub."""
    headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
    request = httpx2.Request("GET", f"https://huggingface.co{path}")
    response = httpx2.Response(status, headers=headers, request=request, json={"error": message})
    with pytest.raises(Exception) as caught:
        hf_raise_for_status(response)
    return caught.value


CASES = {
    "401": (
        answered(401, None, f"Invalid credentials: token {TOKEN} rejected", "/api/whoami-v2"),
        "hub-auth",
        "HTTP 401 Invalid credentials: token hf_*** rejected",
    ),
    "404 repo": (
        answered(404, "RepoNotFound", "Repository not found", f"/api/models/{REPO}"),
        "hub-repo-not-found",
        f"no Hub repo {REPO!r} (or no access to it)",
    ),
    "404 revision": (
        answered(404, "RevisionNotFound", "Invalid rev id: v9", f"/api/models/{REPO}/revision/v9"),
        "hub-revision-not-found",
        f"revision 'v9' not found in {REPO}",
    ),
    "connection refused": (
        httpx2.ConnectError("[Errno 111] Connection refused"),
        "hub-unreachable",
        f"ConnectError: the Hub at {constants.ENDPOINT} cannot be reached "
        "([Errno 111] Connection refused)",
    ),
    "no answer": (
        httpx2.ReadTimeout("timed out"),
        "hub-timeout",
        f"ReadTimeout: the Hub at {constants.ENDPOINT} did not answer within "
        f"{constants.HF_HUB_DOWNLOAD_TIMEOUT:g} s",
    ),
}


def _what(error: HubError) -> str:
    """The message after ``<what was being done> failed: ``."""
    assert " failed: " in error.message, error.message
    return error.message.split(" failed: ", 1)[1]


@pytest.mark.parametrize("case", list(CASES))
def test_download_and_push_say_the_same_for_the_same_exception(case: str) -> None:
    exc, kind, what = CASES[case]
    download = _download_error(exc, f"{REPO}@v9", REPO, "v9", None)
    push = _push_error(exc, REPO, "checking the repo", "v9", False)
    assert str(download).startswith(f"{REPO}@v9: no local path, and the download failed: ")
    assert str(push).startswith("checking the repo failed: ")
    assert _what(download) == _what(push) == what
    assert download.hint == push.hint == HUB_HINTS[kind]
    assert download.kind == push.kind == kind
    for error in (download, push):
        assert "\n" not in str(error) and TOKEN not in str(error)


def test_offline_is_named_in_the_same_words(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, a download is a cache lookup: its error is the cache miss, saying why in the
    words a push uses."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    exc = OfflineModeIsEnabled("offline mode is enabled")
    download = _download_error(exc, REPO, REPO, None, None)
    push = _push_error(exc, REPO, "checking the repo", None, False)
    assert _what(push) == "HF_HUB_OFFLINE is set, so the Hub is not contacted"
    assert str(download).startswith(f"{REPO}: no local path, and {REPO} is not (completely) in")
    assert download.message.endswith(f"; {_what(push)}")
    assert push.hint == "unset HF_HUB_OFFLINE" and download.hint.startswith(push.hint)


def test_library_hints_name_no_option() -> None:
    """Commands add hints naming their options by kind (cli._common.command_hints)."""
    assert not [hint for hint in HUB_HINTS.values() if hint and re.search(r"--[a-z]", hint)]
