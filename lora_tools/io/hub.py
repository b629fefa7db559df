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

A spec that looks like a local path is never looked up on the Hub (:func:`local_reason`): it
starts with ``.``, ``/`` or ``~``, has more than one ``/`` before any ``@`` or ``:``, ends in
``.safetensors`` or ``.json``, or its first part is an existing folder. A missing one is a
"no such file or folder" error at once.

Every request loratool makes through huggingface_hub is bounded (:func:`bound_timeouts`): it
connects within ``HF_HUB_ETAG_TIMEOUT`` seconds and waits at most ``HF_HUB_DOWNLOAD_TIMEOUT``
seconds for each answer (huggingface_hub's own settings, 10 s each by default) wherever
huggingface_hub sets no timeout itself. A Hub that cannot be reached is found by one request
without retries; the cache is used then, or the lookup fails in one line.

Example:
    >>> from lora_tools.io.hub import parse_hub_id, select_files
    >>> parse_hub_id("user/my-lora@v2")
    ('user/my-lora', 'v2', None)
    >>> select_files(["adapter_config.json", "adapter_model.safetensors", "README.md"], "adapter")
    ['adapter_model.safetensors', 'adapter_config.json']
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from lora_tools.constants import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHT_NAMES,
    BASE_WEIGHT_NAMES,
    PIPELINE_INDEX_NAME,
)
from lora_tools.errors import FormatError, HubError, UsageError, redact
from lora_tools.io.jsonfile import parse_json
from lora_tools.io.safetensors import file_kind

_HUB_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)"
    r"(?:@(?P<rev>[\w./-]+))?(?::(?P<file>[^:@]+))?$"
)

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


#: The Hub's limit on each part of a repo id (huggingface_hub's validate_repo_id).
REPO_ID_PART_MAX = 96
_REPO_PART = re.compile(r"[A-Za-z0-9_.-]+")


def repo_id_problem(repo_id: str) -> str | None:
    """What the Hub would refuse in ``repo_id`` (``namespace/name``), or None if it is valid.

    The rules of huggingface_hub's ``validate_repo_id``: each part 1-96 characters of
    ``A-Z a-z 0-9 - _ .``, not starting or ending with ``-`` or ``.``, no ``--`` or ``..``, and
    no ``.git`` at the end.

    Example:
        >>> repo_id_problem("user/" + "a" * 97)
        'the name is 97 characters long; the Hub allows at most 96'
        >>> repo_id_problem("user/my-lora") is None
        True
    """
    parts = repo_id.split("/")
    if len(parts) > 2:
        return "a repo id is namespace/name, with one '/'"
    for label, part in zip(("namespace", "name")[2 - len(parts) :], parts, strict=True):
        if len(part) > REPO_ID_PART_MAX:
            return (
                f"the {label} is {len(part)} characters long; the Hub allows at most "
                f"{REPO_ID_PART_MAX}"
            )
        if not _REPO_PART.fullmatch(part):
            return f"the {label} may use only letters, digits, '-', '_' and '.'"
        if part[0] in "-." or part[-1] in "-.":
            return f"the {label} cannot start or end with '-' or '.'"
    if "--" in repo_id or ".." in repo_id:
        return "'--' and '..' are not allowed in a repo id"
    if repo_id.endswith(".git"):
        return "a repo id cannot end in '.git'"
    return None


def local_reason(spec: str) -> str | None:
    """Why ``spec`` is taken for a local path and never looked up on the Hub, or None.

    Example:
        >>> local_reason("out/llama-lora/adapter_model.safetensors")
        "it has more than one '/'"
        >>> local_reason("./llama-lora"), local_reason("user/llama-lora")
        ("it starts with '.'", None)
    """
    head = re.split(r"[@:]", spec, maxsplit=1)[0]
    if spec[:1] in (".", "/", "~"):
        return f"it starts with {spec[0]!r}"
    if head.count("/") > 1:
        return "it has more than one '/'"
    if head.lower().endswith((".safetensors", ".json")):
        return f"it ends in {Path(head).suffix!r}"
    first = head.split("/", 1)[0]
    if "/" in head and first and Path(first).is_dir():
        return f"{first}/ is a local folder"
    return None


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
    if PIPELINE_INDEX_NAME in top:
        out = [PIPELINE_INDEX_NAME]
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


#: The hint for each kind of Hub failure (the ``kind`` of the HubError). Library hints name no
#: command-line option: a command that has one for the case adds it by kind
#: (``cli._common.command_hints``).
HUB_HINTS: dict[str, str | None] = {
    "hub-repo-id": None,
    "hub-repo-not-found": (
        "check the spelling; for a private repo log in with `hf auth login` or set HF_TOKEN"
    ),
    "hub-revision-not-found": "check the branch, tag or commit name",
    "hub-gated": "accept its terms on the Hub, then log in with `hf auth login`",
    "hub-auth": "log in with `hf auth login` or set HF_TOKEN",
    "hub-forbidden": "the token lacks the rights for this; a read-only token cannot write",
    "hub-conflict": "a conflicting change happened on the Hub; retry",
    "hub-branch-moved": "the branch moved meanwhile; retry",
    "hub-rate-limit": "rate limited by the Hub; wait a few minutes and retry",
    "hub-http": "retry later; check the Hub status",
    "hub-timeout": "check the network and HF_ENDPOINT, or raise HF_HUB_DOWNLOAD_TIMEOUT (seconds)",
    "hub-unreachable": "check the network and HF_ENDPOINT; then retry",
    "hub-offline": "unset HF_HUB_OFFLINE",
    "hub-error": "check the network and HF_ENDPOINT",
}
_OFFLINE = "HF_HUB_OFFLINE is set, so the Hub is not contacted"
_STATUS_KINDS = {
    401: "hub-auth",
    403: "hub-forbidden",
    409: "hub-conflict",
    412: "hub-branch-moved",
    429: "hub-rate-limit",
}


def http_status(exc: BaseException) -> int | None:
    """The HTTP status a huggingface_hub error carries; None when no answer came."""
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _first_line(text: str | None) -> str:
    """The first non-blank line of a server's or an exception's text, tokens redacted."""
    return redact(next((line for line in (text or "").splitlines() if line.strip()), ""))


def unreachable_reason(exc: BaseException) -> str:
    """Why the Hub was not used, naming the exception: ``ConnectError: the Hub at URL cannot be
    reached ([Errno 111] Connection refused)``, ``ReadTimeout: the Hub at URL did not answer
    within 10 s``."""
    import httpx2
    from huggingface_hub import constants

    where = f"{type(exc).__name__}: the Hub at {constants.ENDPOINT}"
    if isinstance(exc, httpx2.TimeoutException):
        connect, read = hub_timeouts()
        if isinstance(exc, httpx2.ConnectTimeout):
            return f"{where} did not accept a connection within {connect:g} s"
        return f"{where} did not answer within {read:g} s"
    text = _first_line(str(exc))
    return f"{where} cannot be reached" + (f" ({text})" if text else "")


def _describe(exc: BaseException, repo_id: str, revision: str | None) -> tuple[str, str]:
    """``(kind, what happened)`` for a huggingface_hub or network failure."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, LocalEntryNotFoundError) and isinstance(
        exc.__cause__, (httpx2.TransportError, OfflineModeIsEnabled)
    ):
        exc = exc.__cause__  # not cached because the Hub could not be asked: say why
    if isinstance(exc, HFValidationError):
        return "hub-repo-id", f"{repo_id!r} is not a valid Hub repo id"
    if isinstance(exc, RevisionNotFoundError):
        which = f"revision {revision!r}" if revision else "the revision"
        return "hub-revision-not-found", f"{which} not found in {repo_id}"
    if isinstance(exc, GatedRepoError):  # before its base class, RepositoryNotFoundError
        return "hub-gated", f"{repo_id} is gated"
    if isinstance(exc, RepositoryNotFoundError):
        return "hub-repo-not-found", f"no Hub repo {repo_id!r} (or no access to it)"
    if isinstance(exc, OfflineModeIsEnabled):
        return "hub-offline", _OFFLINE
    if isinstance(exc, httpx2.TransportError):
        kind = "hub-timeout" if isinstance(exc, httpx2.TimeoutException) else "hub-unreachable"
        return kind, unreachable_reason(exc)
    status = http_status(exc)
    if status is not None:
        response = getattr(exc, "response", None)
        reason = getattr(exc, "server_message", None) or getattr(response, "reason_phrase", "")
        what = f"HTTP {status} {_first_line(reason)}".rstrip()
        return _STATUS_KINDS.get(status, "hub-http"), what
    text = _first_line(str(exc))
    return "hub-error", f"{type(exc).__name__}: {text}".rstrip(": ")


def hub_error(
    exc: BaseException,
    repo_id: str,
    *,
    action: str,
    revision: str | None = None,
    path: str | None = None,
) -> HubError:
    """The one translation of a failed huggingface_hub call: ``{action} failed: {what}``.

    One line, server texts cut to their first line and tokens redacted; the hint comes from
    :data:`HUB_HINTS` by the error's ``kind`` (``hub-auth``, ``hub-repo-not-found``...), which
    a command uses to add a hint naming its own options.

    Args:
        exc: what huggingface_hub (or httpx) raised.
        repo_id: the repo the call was about.
        action: what was being done (``checking the repo``, ``the download``).
        revision: the branch, tag or commit asked for, if any.
        path: what the user named, printed before the message.

    Example:
        >>> from huggingface_hub.errors import HFValidationError
        >>> str(hub_error(HFValidationError("bad"), "a/b", action="checking the repo"))
        "checking the repo failed: 'a/b' is not a valid Hub repo id"
    """
    kind, what = _describe(exc, repo_id, revision)
    return HubError(f"{action} failed: {what}", path=path, hint=HUB_HINTS[kind], kind=kind)


def _not_cached(spec: str, repo_id: str, why: BaseException | None) -> HubError:
    """``repo_id`` is not (completely) in the cache; the message says what stopped the download
    in :func:`hub_error`'s words (HF_HUB_OFFLINE only when it is set)."""
    from huggingface_hub import constants

    if why is not None:
        kind, what = _describe(why, repo_id, None)
    elif constants.is_offline_mode():
        kind, what = "hub-offline", _OFFLINE
    else:
        kind, what = "hub-unreachable", "the Hub cannot be reached"
    hint = {
        "hub-offline": f"{HUB_HINTS['hub-offline']} to download it, or pass a local path",
        "hub-timeout": HUB_HINTS["hub-timeout"],
    }.get(kind, f"{HUB_HINTS['hub-error']}, or pass a local path")
    return HubError(
        f"no local path, and {repo_id} is not (completely) in the local cache; {what}",
        path=spec,
        hint=hint,
        kind="hub-not-cached",
    )


def _download_error(
    exc: Exception, spec: str, repo_id: str, revision: str | None, unreachable: Exception | None
) -> HubError:
    """What :func:`resolve_input` raises for a failed lookup: a cache miss where the Hub was not
    used, else :func:`hub_error`."""
    from huggingface_hub.errors import (
        CachedRepoTreeNotFoundError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    if isinstance(
        exc, (LocalEntryNotFoundError, CachedRepoTreeNotFoundError, OfflineModeIsEnabled)
    ):
        return _not_cached(spec, repo_id, unreachable)
    action = "no local path, and the download"
    return hub_error(exc, repo_id, action=action, revision=revision, path=spec)


def hub_exceptions() -> tuple[type[Exception], ...]:
    """What huggingface_hub raises for Hub, cache and network failures (catch these, pass them
    to :func:`hub_error`)."""
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


def hub_timeouts() -> tuple[float, float]:
    """``(connect, read)`` seconds for Hub requests: ``HF_HUB_ETAG_TIMEOUT`` and
    ``HF_HUB_DOWNLOAD_TIMEOUT``, huggingface_hub's own settings (10 s each by default)."""
    from huggingface_hub import constants

    return float(constants.HF_HUB_ETAG_TIMEOUT), float(constants.HF_HUB_DOWNLOAD_TIMEOUT)


def _fill_timeouts(request: object) -> None:
    """httpx request hook: a connect, read and write timeout wherever the call set none."""
    extensions = request.extensions  # type: ignore[attr-defined]
    current = dict(extensions.get("timeout") or {})
    connect, read = hub_timeouts()
    for key, default in (("connect", connect), ("read", read), ("write", read)):
        if current.get(key) is None:
            current[key] = default
    current.setdefault("pool", None)
    request.extensions = {**extensions, "timeout": current}  # type: ignore[attr-defined]


_BOUNDED = False


def bound_timeouts() -> None:
    """Give every request huggingface_hub sends a connect and a read timeout (see
    :func:`hub_timeouts`); without one, a Hub that accepts the connection and never answers
    hangs the caller forever. Idempotent; wraps the client factory already set, so a caller's
    own ``set_client_factory`` (proxies, certificates) is kept.
    """
    global _BOUNDED
    if _BOUNDED:
        return
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)

    def factory():  # -> httpx2.Client
        client = previous()
        if _fill_timeouts not in client.event_hooks["request"]:
            client.event_hooks["request"].append(_fill_timeouts)
        return client

    set_client_factory(factory)
    _BOUNDED = True


@contextlib.contextmanager
def quiet_hub_logs() -> Iterator[None]:
    """Keep huggingface_hub's retry and fallback chatter off the terminal while loratool talks
    to the Hub; every failure becomes one HubError line instead."""
    import logging

    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _list_repo(repo_id: str, revision: str | None, spec: str) -> tuple[list[str], Exception | None]:
    """Every file path in the repo, and why the Hub was not used (None if it was).

    One request without retries first (huggingface_hub retries a failed listing five times,
    23 s of back-off): a Hub that cannot be reached sends the lookup to the cached listing at
    once, as snapshot_download does.

    Raises:
        HubError: the Hub was not used and the repo is not in the cache.
    """
    import httpx2
    from huggingface_hub import HfApi, constants, get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError, OfflineModeIsEnabled

    if not constants.is_offline_mode():
        api = HfApi()
        try:
            api.model_info(repo_id, revision=revision, expand=["sha"])
        except (httpx2.TransportError, httpx2.TimeoutException, OfflineModeIsEnabled) as exc:
            unreachable: Exception | None = exc
        else:
            return api.list_repo_files(repo_id, revision=revision), None
    else:
        unreachable = None
    try:
        cached = get_cached_repo_tree(repo_id, revision=revision)
    except CachedRepoTreeNotFoundError:
        raise _not_cached(spec, repo_id, unreachable) from None
    return [f.path for f in cached], unreachable


def _regular(path: Path, role: str) -> Path:
    """``path`` if it is a folder or a regular file; a FIFO, device or socket is refused
    (reading one blocks forever or never ends)."""
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        return path
    what = "adapter" if role == "adapter" else "base checkpoint"
    raise FormatError(
        f"not a regular file or folder (a {file_kind(mode)})",
        path=path,
        hint=f"pass the {what} file itself or its folder",
        kind="not-regular",
    )


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
        FormatError: neither a local path nor a Hub id, a local-looking path that does not
            exist (:func:`local_reason`), or a FIFO / device instead of a file.
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
        return _regular(path, role)
    text = os.fspath(spec)
    parsed = parse_hub_id(text)
    if parsed is None:
        raise FormatError("no such file or folder", path=spec, kind="missing")
    if (why := local_reason(text)) is not None:
        raise FormatError(
            f"no such file or folder (not looked up on the Hub: {why})",
            path=spec,
            kind="missing",
        )
    repo_id, revision, path_in_repo = parsed
    if (problem := repo_id_problem(repo_id)) is not None:
        raise HubError(f"no such file or folder, and not a valid Hub repo id: {problem}", path=spec)
    from huggingface_hub import hf_hub_download, snapshot_download

    bound_timeouts()
    unreachable: Exception | None = None

    def read_index(index_path: str) -> list[str]:
        local = Path(
            hf_hub_download(
                repo_id, index_path, revision=revision, local_files_only=unreachable is not None
            )
        )
        doc = parse_json(local.read_bytes(), path=f"{text} ({index_path})")
        try:
            return sorted(set(doc["weight_map"].values()))
        except (KeyError, TypeError, AttributeError):
            raise FormatError(
                "index has no weight_map of tensor name -> file name", path=f"{text} ({index_path})"
            ) from None

    try:
        with quiet_hub_logs():
            files, unreachable = _list_repo(repo_id, revision, text)
            wanted = select_files(files, role, path_in_repo, read_index=read_index, spec=text)
            folder = Path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    allow_patterns=wanted,
                    local_files_only=unreachable is not None,
                )
            )
    except hub_exceptions() as exc:
        raise _download_error(exc, text, repo_id, revision, unreachable) from None
    return folder / path_in_repo if path_in_repo else folder
