"""Hub ids as inputs: ``user/name[@revision]`` resolved to a local snapshot folder.

A local path always wins when both exist. Only the files a role needs are downloaded, through
the huggingface_hub cache, which honours ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and ``HF_TOKEN``.

Example:
    >>> from lora_tools.io.hub import parse_hub_id
    >>> parse_hub_id("user/my-lora@v2")
    ('user/my-lora', 'v2')
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lora_tools.errors import FormatError, HubError

_HUB_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<rev>[\w./-]+))?$"
)

#: Files an adapter needs.
ADAPTER_PATTERNS = ["*.safetensors", "adapter_config.json", "README.md"]
#: Files a base checkpoint needs: weights, indexes, configs, tokenizer and scheduler files.
BASE_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "README.md",
]


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` if ``spec`` looks like a Hub id, else None."""
    m = _HUB_ID.match(spec)
    if m is None:
        return None
    return m.group("repo"), m.group("rev")


def resolve_input(spec: str | os.PathLike[str], *, role: str = "adapter") -> Path:
    """A local path for ``spec``: the path itself if it exists, else a Hub snapshot.

    Args:
        spec: a local file or folder, or ``user/name[@revision]``.
        role: ``adapter`` (weights + adapter_config.json) or ``base`` (weights, indexes, configs,
            tokenizer files).

    Raises:
        FormatError: neither a local path nor a Hub id.
        HubError: the download failed (offline, missing repo, auth, network).
    """
    path = Path(spec)
    if path.exists():
        return path
    parsed = parse_hub_id(os.fspath(spec))
    if parsed is None:
        raise FormatError("no such file or folder", path=spec, kind="missing")
    repo_id, revision = parsed
    patterns = ADAPTER_PATTERNS if role == "adapter" else BASE_PATTERNS
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise HubError(
            f"no local path {spec!r} and no Hub repo {repo_id!r} (or no access to it)",
            hint="check the spelling, or log in with `hf auth login` for private repos",
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"revision {revision!r} not found in {repo_id}", path=spec) from None
    except GatedRepoError:
        raise HubError(
            f"{repo_id} is gated", hint="accept its terms on the Hub and log in"
        ) from None
    except LocalEntryNotFoundError:
        raise HubError(
            f"{repo_id} is not in the local cache and the Hub cannot be reached",
            hint="unset HF_HUB_OFFLINE or check the network",
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise HubError(f"download of {repo_id} failed: {exc}".splitlines()[0]) from None
