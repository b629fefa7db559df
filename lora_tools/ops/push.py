"""``push``: publish an adapter or a merged model to the Hub in one commit, with a correct card.

Two phases, so that ``--dry-run`` shares every decision with a real push and touches no network:

1. :func:`plan_push` looks at PATH (no network): is it an adapter or a merged model, which files
   go up (hidden files and pickles never do), validation, and the model card facts.
2. :func:`publish` talks to the Hub: creates the repo if needed (``private`` applies only then),
   creates the branch if needed, merges the card with the README.md already on the Hub when PATH
   has none, and uploads every file in ONE ``create_commit`` (or one pull request). The Hub
   applies a commit whole or not at all, so a failure anywhere leaves the repo as it was.

The token comes from the caller, ``HF_TOKEN`` or the stored login (huggingface_hub decides); it is
passed to the client only, never printed, logged or written anywhere.

Example:
    >>> from lora_tools.ops.push import plan_push, publish
    >>> plan = plan_push("fixtures/peft/llama-lora", "me/llama-lora")    # doctest: +SKIP
    >>> [f.path_in_repo for f in plan.files]                            # doctest: +SKIP
    ['adapter_config.json', 'adapter_model.safetensors', 'README.md']
    >>> publish(plan).commit_url                                        # doctest: +SKIP
    'https://huggingface.co/me/llama-lora/commit/1f0c...'
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_tools import __version__
from lora_tools.constants import (
    ADAPTER_CONFIG_NAME,
    CARD_NAME,
    HISTORY_KEY,
    MERGE_RECORD_KEY,
    MERGE_RECORD_NAME,
    MODEL_CONFIG_NAME,
    PIPELINE_INDEX_NAME,
)
from lora_tools.errors import (
    EXIT_FINDINGS,
    FormatError,
    HubError,
    LoraToolError,
    UsageError,
    register_secret,
)
from lora_tools.io.folder import skip_reason
from lora_tools.io.hub import (
    bound_timeouts,
    http_status,
    hub_error,
    hub_exceptions,
    parse_hub_id,
    quiet_hub_logs,
    repo_id_problem,
)
from lora_tools.io.jsonfile import parse_json, read_json_object
from lora_tools.io.safetensors import PICKLE_SUFFIXES, SafetensorsFile
from lora_tools.ops.card import (
    PIPELINE_TAGS,
    CardFacts,
    adapter_details,
    is_hub_id,
    model_details,
    render_card,
)
from lora_tools.results import Result, input_ref

#: ``validator(path) -> error lines``; an adapter with any is refused.
Validator = Callable[[Path], list[str]]


@dataclass(frozen=True)
class UploadFile:
    """One file of the commit: read from ``local``, or the bytes in ``data`` (the card)."""

    path_in_repo: str
    size: int
    local: Path | None = None
    data: bytes | None = None


@dataclass(frozen=True, repr=False)
class PushPlan(Result):
    """Everything :func:`publish` sends, decided from PATH alone.

    Attributes:
        path: what the user named.
        repo_id: the target repo.
        kind: ``adapter`` or ``model``.
        files: the files to upload, the card (README.md) last.
        facts: the card facts (the card is re-rendered at push time if the Hub has a README.md).
        local_card: the README.md text found in PATH, if any.
        notes: what the user should know (files skipped, card changes).
        override_base: the card's base_model is replaced by ``facts.base_model``.
    """

    path: Path
    repo_id: str
    kind: str
    files: list[UploadFile]
    facts: CardFacts
    local_card: str | None
    notes: list[str] = field(default_factory=list)
    override_base: bool = False

    command = "push"

    @property
    def card(self) -> str:
        """The README.md in ``files``."""
        data = self.files[-1].data
        assert data is not None
        return data.decode("utf-8")

    def summary(self) -> dict[str, Any]:
        """What the plan would push: path, repo, kind, files (and their total), card, notes."""
        return {
            "path": str(self.path),
            "repo_id": self.repo_id,
            "kind": self.kind,
            "files": upload_entries(self.files),
            "total_bytes": sum(f.size for f in self.files),
            "card": self.card,
            "notes": list(self.notes),
        }

    def inputs(self) -> list[dict[str, Any]]:
        return [input_ref(self.path, self.kind)]

    def fields(self) -> dict[str, Any]:
        """The ``push --dry-run --json`` document's own fields."""
        summary = self.summary()
        return {
            "dry_run": True,
            "repo_id": summary.pop("repo_id"),
            "kind": summary.pop("kind"),
            "counts": {"files": len(self.files)},
            **{k: v for k, v in summary.items() if k != "path"},
        }


def upload_entries(files: list[UploadFile]) -> list[dict[str, Any]]:
    """``[{"path": path in the repo, "size_bytes": ...}]`` for ``push --json``."""
    return [{"path": f.path_in_repo, "size_bytes": f.size} for f in files]


@dataclass(frozen=True, repr=False)
class PushResult(Result):
    """What a push created. ``url`` is the PR's for a pull request, else the commit's.

    ``changed`` is False when the target already held exactly these files: the client then makes
    no commit (and opens no pull request), and ``commit_url`` is the current head's. ``path``,
    ``kind`` and ``files`` repeat the plan's (``files``: ``{"path", "size_bytes"}`` each).
    """

    command = "push"

    repo_id: str
    commit_url: str
    commit_oid: str
    pr_url: str | None
    repo_created: bool
    changed: bool = True
    notes: tuple[str, ...] = ()
    path: str | None = None
    kind: str | None = None
    files: tuple[dict[str, Any], ...] = ()

    @property
    def url(self) -> str:
        return self.pr_url or self.commit_url

    def inputs(self) -> list[dict[str, Any]]:
        return [] if self.path is None else [input_ref(self.path, self.kind or "adapter")]

    def fields(self) -> dict[str, Any]:
        return {
            "dry_run": False,
            "repo_id": self.repo_id,
            "kind": self.kind,
            "counts": {"files": len(self.files)},
            "files": [dict(f) for f in self.files],
            "total_bytes": sum(f["size_bytes"] for f in self.files),
            "url": self.url,
            "commit_url": self.commit_url,
            "commit_oid": self.commit_oid,
            "pr_url": self.pr_url,
            "repo_created": self.repo_created,
            "changed": self.changed,
            "notes": list(self.notes),
        }


def check_repo_id(repo_id: str) -> None:
    """Raise UsageError unless ``repo_id`` is ``user/name`` (no revision: use --revision)."""
    parsed = parse_hub_id(repo_id)
    if parsed is None or parsed[1] is not None or parsed[2] is not None or not is_hub_id(repo_id):
        raise UsageError(
            f"{repo_id!r} is not a Hub repo id",
            hint="write it as user/name (or org/name); use --revision for a branch",
        )
    if (problem := repo_id_problem(repo_id)) is not None:
        raise UsageError(f"{repo_id!r} is not a valid Hub repo id: {problem}")


def _read_metadata(path: Path) -> dict[str, str]:
    reader = SafetensorsFile(path)
    try:
        return dict(reader.metadata or {})
    finally:
        reader.close()


def _is_model_folder(path: Path) -> bool:
    """A merged model (or any full model): a provenance record, a pipeline, or config.json with
    weights that hold no adapter keys."""
    if (path / MERGE_RECORD_NAME).is_file() or (path / PIPELINE_INDEX_NAME).is_file():
        return True
    if not (path / MODEL_CONFIG_NAME).is_file() or (path / ADAPTER_CONFIG_NAME).is_file():
        return False
    from lora_tools.formats import registry
    from lora_tools.io.checkpoint import open_checkpoint

    formats = list(registry().values())
    with open_checkpoint(path) as ckpt:
        keys = [k for comp in ckpt.components.values() for k in comp]
    return not any(fmt.claims(k) for fmt in formats for k in keys)


def _collect(root: Path, *, recursive: bool, notes: list[str]) -> list[Path]:
    """Files under ``root`` worth publishing: no hidden paths, no pickles, no README.md (the card
    is generated), for adapters no subfolders (training checkpoints), and only plain files
    (:func:`lora_tools.io.folder.skip_reason`: no link leaving the folder, no FIFO, no device).

    Raises:
        FormatError: a file the upload cannot do without (weights, an index, the adapter's
            config) is one of those.
    """
    out: list[Path] = []
    for path in sorted(root.rglob("*") if recursive else root.iterdir()):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or "__pycache__" in rel.parts:
            continue
        if path.is_dir() and not path.is_symlink():
            if not recursive:
                notes.append(
                    f"skipped folder {rel.as_posix()}/ (only the adapter's own files go up)"
                )
            continue
        if rel.as_posix() == CARD_NAME:
            continue
        if path.suffix.lower() in PICKLE_SUFFIXES:
            notes.append(f"skipped {rel.as_posix()} (a pickle; loratool never publishes pickles)")
            continue
        reason = skip_reason(root, path)
        if reason is not None:
            if path.suffix == ".safetensors" or path.name.endswith(".json"):
                raise FormatError(
                    f"{rel.as_posix()} is {reason}; push uploads only plain files",
                    path=path,
                    hint="replace the link with a copy of the file it points to, then push again",
                )
            notes.append(f"skipped {rel.as_posix()} ({reason}; only plain files go up)")
            continue
        out.append(path)
    return out


def _local_card(root: Path, notes: list[str]) -> str | None:
    """The README.md of ``root`` when it is a plain file (a link leaving the folder, or a FIFO,
    would put what it points at into the card, or block)."""
    card_path = root / CARD_NAME
    if not os.path.lexists(card_path):
        return None
    reason = skip_reason(root, card_path)
    if reason is not None:
        notes.append(f"did not use {CARD_NAME} ({reason}); the card is generated")
        return None
    return _read_card(card_path)


def _history(metadata: dict[str, str]) -> list[Any] | None:
    raw = metadata.get(HISTORY_KEY)
    if not raw:
        return None
    try:
        parsed = parse_json(raw, what=f"__metadata__[{HISTORY_KEY!r}]")
    except FormatError:
        return [raw]
    return parsed if isinstance(parsed, list) else [parsed]


def _usage_adapter(library: str | None, repo_id: str, base: str | None, weight_name: str) -> str:
    base_ref = base or "BASE_MODEL"
    if library == "peft":
        return "\n".join(
            [
                "## Usage",
                "",
                "```python",
                "from peft import AutoPeftModel",
                "",
                f'model = AutoPeftModel.from_pretrained("{repo_id}")  # loads {base_ref} too',
                "```",
            ]
        )
    return "\n".join(
        [
            "## Usage",
            "",
            "```python",
            "from diffusers import DiffusionPipeline",
            "",
            f'pipe = DiffusionPipeline.from_pretrained("{base_ref}")',
            f'pipe.load_lora_weights("{repo_id}", weight_name="{weight_name}")',
            "```",
        ]
    )


def _usage_model(library: str | None, repo_id: str) -> str:
    if library == "transformers":
        code = [
            "from transformers import AutoModel",
            "",
            f'model = AutoModel.from_pretrained("{repo_id}")',
        ]
    elif library == "diffusers":
        code = [
            "from diffusers import DiffusionPipeline",
            "",
            f'pipe = DiffusionPipeline.from_pretrained("{repo_id}")',
        ]
    else:
        return ""
    return "\n".join(["## Usage", "", "```python", *code, "```"])


def _relative(root: Path, files: list[Path]) -> list[UploadFile]:
    return [UploadFile(p.relative_to(root).as_posix(), p.stat().st_size, local=p) for p in files]


def _plan_adapter(
    path: Path, repo_id: str, base_model: str | None, validator: Validator | None
) -> tuple[list[UploadFile], CardFacts, str | None, list[str]]:
    from lora_tools.formats import load_adapter
    from lora_tools.ops.inspect import inspect_adapter

    notes: list[str] = []
    if validator is not None:
        errors = validator(path)
        if errors:
            raise ValidationFailed(path, errors)
    adapter = load_adapter(path)
    if path.is_dir():
        uploads = _relative(path, _collect(path, recursive=False, notes=notes))
        local_card = _local_card(path, notes)
    else:
        parts = [p for p in (adapter.source, adapter.config_source) if p is not None]
        uploads = [UploadFile(p.name, p.stat().st_size, local=p) for p in parts]
        local_card = None
    report = inspect_adapter(adapter).to_json()
    config = adapter.config or {}
    recorded = (report.get("base_model") or {}).get("name")
    base = base_model or (recorded if is_hub_id(recorded) else None)
    library = "peft" if adapter.format == "peft" else "diffusers"
    tags = ["lora", *(["dora"] if report["dora"] else []), "loratool"]
    license_ = adapter.metadata.get("modelspec.license") or config.get("license")
    weights_name = Path(adapter.source).name if adapter.source else ""
    facts = CardFacts(
        kind="adapter",
        title=repo_id.split("/")[1],
        library_name=library,
        base_model=base,
        base_note=None if base else recorded,
        license=license_ if isinstance(license_, str) and license_ else None,
        pipeline_tag=PIPELINE_TAGS.get(str(config.get("task_type"))),
        tags=tags,
        details=adapter_details(
            report,
            [(u.path_in_repo, u.size) for u in uploads],
            _history(adapter.metadata),
        ),
        usage=_usage_adapter(library, repo_id, base, weights_name),
    )
    if not base:
        notes.append(
            f"no Hub id for the base model (recorded: {recorded or 'nothing'}); the card has no "
            "base_model (pass --base-model user/name to link it)"
        )
    return uploads, facts, local_card, notes


def _check_model_files(files: list[Path]) -> None:
    """Headers of every weight file parse (the rest of a merged model is plain files)."""
    for path in files:
        if path.suffix == ".safetensors":
            SafetensorsFile(path).close()


def _plan_model(
    path: Path, repo_id: str, base_model: str | None
) -> tuple[list[UploadFile], CardFacts, str | None, list[str]]:
    notes: list[str] = []
    if path.is_dir():
        files = _collect(path, recursive=True, notes=notes)
        from lora_tools.io.checkpoint import open_checkpoint

        open_checkpoint(path).close()  # the index and its shards are all there
        _check_model_files(files)
        uploads = _relative(path, files)
        provenance_path = path / MERGE_RECORD_NAME
        provenance = read_json_object(provenance_path) if provenance_path.is_file() else None
        _check_provenance(provenance, provenance_path, MERGE_RECORD_NAME)
        local_card = _local_card(path, notes)
        pipeline = (path / PIPELINE_INDEX_NAME).is_file()
        config_path = path / MODEL_CONFIG_NAME
        library = "diffusers" if pipeline else ("transformers" if config_path.is_file() else None)
        config_name = (
            read_json_object(config_path).get("_name_or_path") if config_path.is_file() else None
        )
    else:
        _check_model_files([path])
        uploads = [UploadFile(path.name, path.stat().st_size, local=path)]
        raw = _read_metadata(path).get(MERGE_RECORD_KEY)
        what = f"__metadata__[{MERGE_RECORD_KEY!r}]"
        provenance = parse_json(raw, path=path, what=what) if raw else None
        _check_provenance(provenance, path, what)
        local_card, library, config_name = None, None, None
    spec = ((provenance or {}).get("base") or {}).get("spec")
    candidates = [base_model, spec, config_name]
    base = next((c for c in candidates if is_hub_id(c)), None)
    label = next((c for c in candidates if isinstance(c, str) and c), None)
    facts = CardFacts(
        kind="model",
        title=repo_id.split("/")[1],
        library_name=library,
        base_model=base,
        base_note=None if base else label,
        tags=["lora", "merge", "loratool"],
        details=model_details(provenance, [(u.path_in_repo, u.size) for u in uploads], label),
        usage=_usage_model(library, repo_id),
    )
    if not base:
        notes.append(
            f"no Hub id for the base model (recorded: {label or 'nothing'}); the card has no "
            "base_model (pass --base-model user/name to link it)"
        )
    return uploads, facts, local_card, notes


class ValidationFailed(LoraToolError):
    """validate found errors in the adapter; push refuses to publish it (exit code 1)."""

    exit_code = EXIT_FINDINGS

    def __init__(self, path: Path, errors: list[str]) -> None:
        self.errors = errors
        shown = "; ".join(errors[:3]) + (f"; and {len(errors) - 3} more" if len(errors) > 3 else "")
        super().__init__(
            f"validate found {len(errors)} error(s), not pushing: {shown}",
            path=path,
            hint="fix them (`loratool validate` shows all), or pass --no-validate",
            kind="validation-failed",
        )


def default_validator(path: Path) -> list[str]:
    """Error lines of ``loratool validate`` on an adapter (warnings do not block a push)."""
    from lora_tools.ops.validate import validate

    report = validate([path])
    return [
        f"{f.rule.code} {f.rule.name}: {f.message}"
        for f in report.findings
        if f.severity == "error"
    ]


def plan_push(
    path: str | os.PathLike[str],
    repo_id: str,
    *,
    base_model: str | None = None,
    validator: Validator | None = default_validator,
) -> PushPlan:
    """Decide what a push of ``path`` to ``repo_id`` uploads; reads local files only.

    Args:
        path: an adapter file or folder, or a merged model folder (or merged single file).
        repo_id: ``user/name``.
        base_model: the base's Hub id, overriding what the files record.
        validator: returns error lines for an adapter (None: do not validate).

    Raises:
        UsageError: a bad repo id or base model id.
        ValidationFailed: the adapter has validation errors.
        FormatError / AdapterError: PATH is neither a readable adapter nor a model.
    """
    check_repo_id(repo_id)
    if base_model is not None and not is_hub_id(base_model):
        raise UsageError(f"--base-model {base_model!r} is not a Hub id", hint="write user/name")
    from lora_tools.formats import adapter_path

    root = adapter_path(path)
    if not root.exists():
        raise FormatError("no such file or folder", path=root, kind="missing")
    if root.is_dir():
        is_model = _is_model_folder(root)
    else:
        is_model = root.suffix == ".safetensors" and MERGE_RECORD_KEY in _read_metadata(root)
    if is_model:
        uploads, facts, local_card, notes = _plan_model(root, repo_id, base_model)
    else:
        uploads, facts, local_card, notes = _plan_adapter(root, repo_id, base_model, validator)
    override = base_model is not None or is_model
    try:
        card, card_notes = render_card(local_card, facts, override_base=override)
    except FormatError as exc:
        card_path = root / CARD_NAME if root.is_dir() else root
        raise FormatError(exc.message, path=card_path, hint=exc.hint, kind=exc.kind) from None
    data = card.encode("utf-8")
    uploads = [*uploads, UploadFile(CARD_NAME, len(data), data=data)]
    return PushPlan(
        path=root,
        repo_id=repo_id,
        kind="model" if is_model else "adapter",
        files=uploads,
        facts=facts,
        local_card=local_card,
        notes=[*notes, *card_notes],
        override_base=override,
    )


def _push_error(
    exc: BaseException, repo_id: str, step: str, revision: str | None, created: bool
) -> HubError:
    """The HubError for a failed step of a push (:func:`lora_tools.io.hub.hub_error`), saying
    that nothing was published where the failure came after the repo was ready."""
    error = hub_error(exc, repo_id, action=step, revision=revision)
    if step == "committing" or step.startswith("reading"):
        error.message += " (nothing was published"
        error.message += "; the new repo is empty)" if created else ")"
    return error


def _read_card(path: Path) -> str:
    """A README.md's text; FormatError naming it when it is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(
            f"not UTF-8 text ({exc.reason} at byte {exc.start})",
            path=path,
            hint="save the model card as UTF-8",
            kind="card",
        ) from None


def _check_provenance(doc: Any, path: Path, what: str) -> None:
    """FormatError unless ``doc`` has the shape ``loratool merge`` writes (or is None)."""
    if doc is None:
        return
    problem = None
    if not isinstance(doc, dict):
        problem = f"is a JSON {type(doc).__name__}, expected an object"
    elif not isinstance(doc.get("base") or {}, dict):
        problem = f"'base' is a {type(doc['base']).__name__}, expected an object"
    elif not isinstance(doc.get("adapters") or [], list) or not all(
        isinstance(a, dict) for a in doc.get("adapters") or []
    ):
        problem = "'adapters' is not a list of objects"
    if problem is not None:
        raise FormatError(
            f"{what} {problem}; it is not the provenance record loratool merge writes",
            path=path,
            hint="restore the file from the merge, or remove it",
            kind="provenance",
        )


def _remote_card(api: Any, repo_id: str, revision: str | None) -> str | None:
    """The README.md already on the target branch, or None."""
    from huggingface_hub.errors import EntryNotFoundError

    try:
        local = api.hf_hub_download(repo_id, CARD_NAME, revision=revision)
    except EntryNotFoundError:
        return None
    return _read_card(Path(local))


def publish(
    plan: PushPlan,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    message: str | None = None,
    token: str | None = None,
) -> PushResult:
    """Upload ``plan`` in one commit (or one pull request) and return where it went.

    Args:
        plan: from :func:`plan_push`.
        private: create the repo private (only when this push creates it).
        revision: target branch, created from main if missing.
        create_pr: open a pull request against the branch instead of committing to it.
        message: commit title (default: "Upload <kind> with loratool").
        token: a Hub token; None lets huggingface_hub use HF_TOKEN or the stored login.

    Raises:
        HubError: auth (401/403), missing repo or branch, rate limit, network; nothing is
            published then (the commit is applied whole or not at all).
    """
    register_secret(token)
    bound_timeouts()
    with quiet_hub_logs():
        return _publish(plan, private, revision, create_pr, message, token)


def _publish(
    plan: PushPlan,
    private: bool,
    revision: str | None,
    create_pr: bool,
    message: str | None,
    token: str | None,
) -> PushResult:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    api = HfApi(token=token)
    repo_id = plan.repo_id
    notes: list[str] = []
    created = False
    step = "checking the repo"
    try:
        try:
            info = api.model_info(repo_id)
            created = False
            if private and not info.private:
                notes.append("the repo exists and is public; --private applies only on creation")
        except RepositoryNotFoundError as exc:
            if http_status(exc) not in (401, 404):
                raise
            step = "creating the repo"
            api.create_repo(repo_id, private=private, exist_ok=True)
            created = True
        on_branch = bool(revision) and revision != "main"
        if on_branch:
            step = f"creating branch {revision}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        head = None
        if not created:
            head = api.model_info(repo_id, revision=revision).sha if on_branch else info.sha
        files = list(plan.files)
        if plan.local_card is None and not created:
            step = "reading the existing README.md"
            remote = _remote_card(api, repo_id, revision)
            if remote is not None:
                card, card_notes = render_card(remote, plan.facts, override_base=plan.override_base)
                notes += card_notes
                data = card.encode("utf-8")
                files[-1] = UploadFile(CARD_NAME, len(data), data=data)
        ops = [
            CommitOperationAdd(f.path_in_repo, f.data if f.data is not None else str(f.local))
            for f in files
        ]
        step = "committing"
        title = message or f"Upload {plan.kind} with loratool {__version__}"
        commit = api.create_commit(
            repo_id,
            ops,
            commit_message=title,
            commit_description=f"Files: {', '.join(f.path_in_repo for f in files)}",
            revision=revision,
            create_pr=create_pr,
        )
    except (*hub_exceptions(), RuntimeError) as exc:  # RuntimeError: a failed LFS upload
        raise _push_error(exc, repo_id, step, revision, created) from None
    changed = commit.oid != head
    if not changed:
        notes.append("the repo already holds exactly these files; no commit was made")
    return PushResult(
        repo_id=repo_id,
        commit_url=commit.commit_url,
        commit_oid=commit.oid,
        pr_url=commit.pr_url,
        repo_created=created,
        changed=changed,
        notes=tuple(notes),
        path=str(plan.path),
        kind=plan.kind,
        files=tuple(upload_entries(files)),
    )
