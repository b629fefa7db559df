"""Hub ids as inputs: ``user/name[@revision][:path]`` resolved to a local snapshot folder or file.

A local path always wins when both exist. Only the files a role needs are downloaded, through
the huggingface_hub cache, which honours ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and ``HF_TOKEN``:

- ``adapter``: the adapter weights (``adapter_model.safetensors``,
  ``pytorch_lora_weights.safetensors``, or the repo's only top-level ``.safetensors``) and
  ``adapter_config.json``.
- ``base``: the weights (the files an index names, else the one checkpoint), the configs and the
  tokenizer files; for a diffusers pipeline (``model_index.json``) the same per component folder.
  Top-level single-file checkpoints beside a pipeline, ``original/`` exports, pickles and dtype
  variants (``*.fp16.safetensors``) are not downloaded.

``:path`` names one file in the repo (``user/sd-loras:style-v2.safetensors``), for repos that
hold several.

Example:
    >>> from lora_tools.io.hub import parse_hub_id, select_files
    >>> parse_hub_id("user/my-lora@v2")
    ('user/my-lora', 'v2', None)
    >>> select_files(["adapter_config.json", "adapter_model.safetensors", "README.md"], "adapter")
    ['adapter_model.safetensors', 'adapter_config.json']
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Callable
from pathlib import Path

from lora_tools.errors import FormatError, HubError, UsageError

_HUB_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)"
    r"(?:@(?P<rev>[\w./-]+))?(?::(?P<file>[^:@]+))?$"
)

#: Adapter weight file names, in order of preference (the same as lora_tools.formats.WEIGHT_NAMES;
#: io sits below formats, so the tuple is repeated here and a test keeps the two equal).
ADAPTER_WEIGHT_NAMES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")
ADAPTER_CONFIG_NAME = "adapter_config.json"
#: Base weight file names preferred when a folder holds several checkpoints.
BASE_WEIGHT_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
#: Non-weight files a base needs: configs, generation settings, tokenizer and scheduler files.
BASE_SIDE_SUFFIXES = (".json", ".txt", ".model", ".tiktoken")
_INDEX_SUFFIX = ".safetensors.index.json"
ROLES = ("adapter", "base")

#: ``read_index(path_in_repo) -> shard file names``, used for sharded checkpoints.
IndexReader = Callable[[str], list[str]]


def parse_hub_id(spec: str) -> tuple[str, str | None, str | None] | None:
    """``(repo_id, revision, path_in_repo)`` if ``spec`` looks like a Hub id, else None.

    Example:
        >>> parse_hub_id("org/sd-loras@refs/pr/2:styles/ink.safetensors")
        ('org/sd-loras', 'refs/pr/2', 'styles/ink.safetensors')
        >>> parse_hub_id("adapter.safetensors") is None
        True
    """
    m = _HUB_ID.match(spec)
    if m is None:
        return None
    return m.group("repo"), m.group("rev"), m.group("file")


def _split(files: list[str]) -> dict[str, list[str]]:
    """Repo file paths grouped by folder (``""`` for the top level), hidden paths dropped."""
    folders: dict[str, list[str]] = {}
    for path in files:
        if any(part.startswith(".") for part in path.split("/")):
            continue
        folder, name = posixpath.split(path)
        folders.setdefault(folder, []).append(name)
    return folders


def _is_variant(name: str, suffix: str) -> bool:
    """``model.fp16.safetensors`` is a dtype variant of ``model.safetensors``."""
    return "." in name[: -len(suffix)]


def _pick_weights(folder: str, names: list[str], read_index: IndexReader, spec: str) -> list[str]:
    """The weight files of one checkpoint folder (paths in the repo), or [] if it has none."""
    join = (lambda n: f"{folder}/{n}") if folder else (lambda n: n)
    indexes = sorted(
        n for n in names if n.endswith(_INDEX_SUFFIX) and not _is_variant(n, _INDEX_SUFFIX)
    )
    if indexes:
        preferred = [n for n in indexes if n[: -len(".index.json")] in BASE_WEIGHT_NAMES]
        index = (preferred or indexes)[0]
        shards = read_index(join(index))
        return [join(index), *(join(s) for s in shards)]
    weights = sorted(n for n in names if n.endswith(".safetensors"))
    for standard in BASE_WEIGHT_NAMES:
        if standard in weights:
            return [join(standard)]
    plain = [n for n in weights if not _is_variant(n, ".safetensors")]
    if len(weights) == 1 or len(plain) == 1:
        return [join((plain or weights)[0])]
    if not weights:
        return []
    shown = ", ".join(join(n) for n in weights[:4])
    raise UsageError(
        f"{len(weights)} checkpoints in {folder or 'the repo'} ({shown}); which one?",
        path=spec,
        hint=f"name one file: {spec.split(':')[0]}:{join(weights[0])}",
    )


def select_files(
    files: list[str],
    role: str,
    path_in_repo: str | None = None,
    *,
    read_index: IndexReader | None = None,
    spec: str = "",
) -> list[str]:
    """The repo files an input of ``role`` needs, from the repo's file list (no network here).

    Args:
        files: every file path in the repo at the revision.
        role: ``adapter`` or ``base`` (see the module docstring).
        path_in_repo: a file the user named (``user/name:path``), or None.
        read_index: returns the shard names of a ``*.safetensors.index.json``; needed for
            sharded bases only.
        spec: the user's spelling, for error messages.

    Returns:
        Paths in the repo, in download order.

    Raises:
        UsageError: an unknown role, or several candidate checkpoints and none named.
        HubError: the named file is not in the repo, or the repo holds no weights.
    """
    if role not in ROLES:
        raise UsageError(f"unknown input role {role!r}", hint=f"one of {', '.join(ROLES)}")
    present = set(files)
    if path_in_repo is not None:
        if path_in_repo not in present:
            raise HubError(f"no file {path_in_repo!r} in the repo", path=spec)
        out = [path_in_repo]
        config = posixpath.join(posixpath.dirname(path_in_repo), ADAPTER_CONFIG_NAME)
        if role == "adapter" and config in present:
            out.append(config)
        return out
    folders = _split(files)
    top = folders.get("", [])
    if role == "adapter":
        weights = [n for n in ADAPTER_WEIGHT_NAMES if n in top]
        if not weights:
            weights = sorted(n for n in top if n.endswith(".safetensors"))
        if len(weights) > 1 and not any(n in ADAPTER_WEIGHT_NAMES for n in weights):
            shown = ", ".join(weights[:4])
            raise UsageError(
                f"the repo holds {len(weights)} .safetensors files ({shown}); which is the adapter?",
                path=spec,
                hint=f"name one file: {spec.split(':')[0]}:{weights[0]}",
            )
        if not weights:
            raise HubError(
                "no adapter weights in the repo (looked for adapter_model.safetensors, "
                "pytorch_lora_weights.safetensors, a top-level *.safetensors)",
                path=spec,
                hint="pickled adapters (.bin) are never downloaded or loaded",
            )
        return [weights[0], *([ADAPTER_CONFIG_NAME] if ADAPTER_CONFIG_NAME in top else [])]

    def reader(path: str) -> list[str]:
        if read_index is None:
            raise UsageError("a sharded base needs read_index", path=spec)
        return read_index(path)

    side = lambda folder, names: [  # noqa: E731
        f"{folder}/{n}" if folder else n
        for n in sorted(names)
        if n.endswith(BASE_SIDE_SUFFIXES) and not n.endswith(_INDEX_SUFFIX)
    ]
    if "model_index.json" in top:
        out = ["model_index.json"]
        for folder in sorted(f for f in folders if f and "/" not in f):
            out += _pick_weights(folder, folders[folder], reader, spec) + side(
                folder, folders[folder]
            )
        return out
    weights = _pick_weights("", top, reader, spec)
    if not weights:
        raise HubError(
            "no safetensors weights at the top level of the repo",
            path=spec,
            hint="name a file with user/name:path/to/file.safetensors",
        )
    return weights + side("", top)


def _hub_error(exc: Exception, spec: str, repo_id: str, revision: str | None) -> HubError:
    """One line for a huggingface_hub failure; never includes the token."""
    from huggingface_hub.errors import (
        CachedRepoTreeNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, HFValidationError):
        return HubError(f"{repo_id!r} is not a valid Hub repo id", path=spec)
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(
            f"no local path and no Hub repo {repo_id!r} (or no access to it)",
            path=spec,
            hint="check the spelling, or log in with `hf auth login` for private repos",
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"revision {revision!r} not found in {repo_id}", path=spec)
    if isinstance(exc, GatedRepoError):
        return HubError(
            f"{repo_id} is gated", path=spec, hint="accept its terms on the Hub and log in"
        )
    if isinstance(
        exc, (LocalEntryNotFoundError, CachedRepoTreeNotFoundError, OfflineModeIsEnabled)
    ):
        return HubError(
            f"{repo_id} is not (completely) in the local cache and the Hub cannot be reached",
            path=spec,
            hint="unset HF_HUB_OFFLINE, check the network, or download it once online",
        )
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        hint = {
            401: "log in with `hf auth login` or set HF_TOKEN",
            403: "the token lacks access to this repo",
            429: "rate limited by the Hub; wait a minute and retry",
        }.get(status, "retry later; check the Hub status")
        reason = exc.server_message or exc.response.reason_phrase
        first = reason.splitlines()[0] if reason else ""
        return HubError(
            f"download of {repo_id} failed: HTTP {status} {first}".rstrip(), path=spec, hint=hint
        )
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return HubError(
        f"download of {repo_id} failed: {type(exc).__name__}: {text}",
        path=spec,
        hint="check the network and HF_ENDPOINT",
    )


def _client_errors() -> tuple[type[Exception], ...]:
    """What huggingface_hub raises for Hub, cache and network failures."""
    import httpx2
    from huggingface_hub.errors import (
        CachedRepoTreeNotFoundError,
        EntryNotFoundError,
        HFValidationError,
        RevisionResolutionError,
    )

    return (
        OSError,  # HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, disk errors
        httpx2.HTTPError,
        CachedRepoTreeNotFoundError,
        EntryNotFoundError,
        HFValidationError,
        RevisionResolutionError,
    )


def _list_repo(repo_id: str, revision: str | None) -> list[str]:
    """Every file path in the repo: from the Hub, or from the cached listing when offline or
    when the Hub cannot be reached."""
    import httpx2
    from huggingface_hub import HfApi, constants, get_cached_repo_tree
    from huggingface_hub.errors import OfflineModeIsEnabled

    if not constants.is_offline_mode():
        try:
            return HfApi().list_repo_files(repo_id, revision=revision)
        except (httpx2.ConnectError, httpx2.TimeoutException, OfflineModeIsEnabled):
            pass  # fall back on the cache, as snapshot_download does
    return [f.path for f in get_cached_repo_tree(repo_id, revision=revision)]


def resolve_input(spec: str | os.PathLike[str], *, role: str = "adapter") -> Path:
    """A local path for ``spec``: the path itself if it exists, else a Hub snapshot.

    Args:
        spec: a local file or folder, or ``user/name[@revision][:path/in/repo]``.
        role: ``adapter`` (weights + adapter_config.json) or ``base`` (weights, indexes,
            configs, tokenizer files).

    Returns:
        The local path, or the snapshot folder in the huggingface_hub cache (the named file in it
        when ``:path`` was given).

    Raises:
        FormatError: neither a local path nor a Hub id.
        UsageError: the repo holds several checkpoints and none was named.
        HubError: the download failed (offline and not cached, missing repo, auth, network).

    Example:
        >>> resolve_input("fixtures/peft/llama-lora")             # doctest: +SKIP
        PosixPath('fixtures/peft/llama-lora')
        >>> resolve_input("user/llama-lora@v2")                   # doctest: +SKIP
        PosixPath('~/.cache/huggingface/hub/models--user--llama-lora/snapshots/3f2a...')
    """
    path = Path(spec)
    if path.exists():
        return path
    text = os.fspath(spec)
    parsed = parse_hub_id(text)
    if parsed is None:
        raise FormatError("no such file or folder", path=spec, kind="missing")
    repo_id, revision, path_in_repo = parsed
    from huggingface_hub import hf_hub_download, snapshot_download

    def read_index(index_path: str) -> list[str]:
        local = Path(hf_hub_download(repo_id, index_path, revision=revision))
        try:
            weight_map = json.loads(local.read_text(encoding="utf-8"))["weight_map"]
            return sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise FormatError(
                "index has no weight_map of tensor name -> file name", path=f"{text} ({index_path})"
            ) from None

    try:
        files = _list_repo(repo_id, revision)
        wanted = select_files(files, role, path_in_repo, read_index=read_index, spec=text)
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=wanted))
    except _client_errors() as exc:
        raise _hub_error(exc, text, repo_id, revision) from None
    return folder / path_in_repo if path_in_repo else folder
