"""Model cards (README.md): the one renderer for the cards ``loratool push`` publishes and the
card ``loratool merge`` writes into a merged folder.

A card is YAML front matter (the Hub reads ``base_model``, ``base_model_relation``,
``library_name``, ``license``, ``pipeline_tag`` and ``tags`` from it) and a Markdown body.
loratool computes the front matter from the files (:class:`CardFacts`) and writes its summary into
one marked block of the body; an existing card keeps its text and its own front-matter values:

- scalars the card already sets (``license``, ``library_name``, ``pipeline_tag``) are kept;
- ``tags`` are the union, the card's first; ``base_model:<relation>:<id>`` tags, which are
  derived from ``base_model``, are rebuilt;
- ``base_model`` from the card is kept when it is a Hub id, except for merged models, whose base is
  the one loratool merged into (a card copied from the base names the base's own parent);
- loratool's block (between :data:`BEGIN` and :data:`END`) is replaced on every push, or appended
  when the card has none, so pushing twice gives the same card.

``loratool merge`` writes a new card with the same front matter, title and intro, and
:func:`merged_adapters` as its text, unmarked (``render_card(None, facts, marked=False)``): from
then on the text is the folder's own, and push keeps it and appends its block.

Hub conventions: ``base_model_relation`` is one of ``adapter``, ``merge``, ``quantized``,
``finetune``. An adapter is ``adapter``; a model with a LoRA folded into its single base is
``finetune`` (what the Hub infers for full weights with one base; ``merge`` means a merge of
several Hub models). PEFT's own cards tag ``base_model:adapter:<id>``; the same scheme is used here.

Example:
    >>> facts = CardFacts(kind="adapter", title="my-lora", library_name="peft",
    ...                   base_model="meta-llama/Llama-3.2-1B", details="rank 8")
    >>> text, notes = render_card(None, facts)
    >>> text.splitlines()[1]
    'base_model: meta-llama/Llama-3.2-1B'
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from lora_tools import __version__
from lora_tools.constants import MERGE_RECORD_NAME
from lora_tools.errors import FormatError
from lora_tools.ops.inspect import human_size

#: Markers around the block loratool owns in a card's body.
BEGIN = "<!-- loratool:begin (written by `loratool push`; replaced on every push) -->"
END = "<!-- loratool:end -->"
_BLOCK = re.compile(r"<!-- loratool:begin[^>]*-->.*?<!-- loratool:end -->\n?", re.DOTALL)
#: The values the Hub accepts for base_model_relation.
RELATIONS = ("adapter", "merge", "quantized", "finetune")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: PEFT task_type -> Hub pipeline_tag (as PEFT's own cards map them).
PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}


def is_hub_id(value: Any) -> bool:
    """Whether ``value`` is spelled like a Hub model id (``user/name``), not a local path.

    Example:
        >>> is_hub_id("meta-llama/Llama-3.2-1B"), is_hub_id("fixtures/bases/tiny-llama")
        (True, False)
    """
    return (
        isinstance(value, str)
        and bool(_REPO_ID.match(value))
        and ".." not in value
        and "--" not in value
    )


@dataclass
class CardFacts:
    """What loratool knows about the thing being published.

    Attributes:
        kind: ``adapter`` or ``model`` (a base with adapters merged into it).
        title: heading of a new card.
        library_name: ``peft``, ``diffusers``, ``transformers``, or None (let the Hub guess).
        base_model: the base's Hub id, or None when unknown or not on the Hub.
        base_note: how the base was recorded when it is not a Hub id (a local path).
        license: an SPDX-like id, when the files record one.
        pipeline_tag: the Hub task, when known.
        tags: extra tags (``lora``, ``dora``...).
        details: Markdown for loratool's block (what the files hold, how they were made).
        usage: Markdown with a code sample, used only in a new card.
    """

    kind: str
    title: str
    library_name: str | None = None
    base_model: str | None = None
    base_note: str | None = None
    license: str | None = None
    pipeline_tag: str | None = None
    tags: list[str] = field(default_factory=list)
    details: str = ""
    usage: str = ""

    @property
    def relation(self) -> str:
        return "adapter" if self.kind == "adapter" else "finetune"


def split_card(text: str) -> tuple[dict[str, Any], str]:
    """``(front matter, body)`` of a card; ``({}, text)`` when it has no front matter.

    Raises:
        FormatError: the front matter is not a YAML mapping (names README.md; the caller
            adds the path).
    """
    import yaml
    from huggingface_hub import ModelCard

    try:
        card = ModelCard(text, ignore_metadata_errors=True)
        data = card.data.to_dict()
    except (ValueError, yaml.YAMLError, RecursionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(
            f"README.md front matter (between the --- lines) is not a YAML mapping: {first}",
            hint="fix the YAML, or remove the front matter and let loratool write it",
            kind="card",
        ) from None
    return data, card.text


def _merge_tags(existing: list[Any], ours: list[str], base_tag: str | None) -> list[str]:
    out: list[str] = []
    for tag in [*existing, *ours, *([base_tag] if base_tag else [])]:
        if not isinstance(tag, str):
            continue
        # base_model:<relation>:<id> tags are derived from base_model: rebuilt, never kept stale.
        if tag.startswith("base_model:") and tag != base_tag:
            continue
        if tag not in out:
            out.append(tag)
    return out


def merge_front_matter(
    existing: dict[str, Any], facts: CardFacts, *, override_base: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """The front matter to publish, and notes on what was changed in the existing one.

    Args:
        existing: the card's current front matter ({} for a new card).
        facts: what loratool computed.
        override_base: ``facts.base_model`` replaces the card's (``--base-model``, merged models).
    """
    notes: list[str] = []
    meta = dict(existing)
    base = existing.get("base_model")
    card_base_ok = is_hub_id(base) or (
        isinstance(base, list) and bool(base) and all(is_hub_id(b) for b in base)
    )
    if facts.base_model and (override_base or not card_base_ok):
        if base and base != facts.base_model:
            notes.append(f"card base_model {base!r} replaced by {facts.base_model!r}")
        base = facts.base_model
    elif not card_base_ok:
        if base:
            notes.append(
                f"card base_model {base!r} is not a Hub id; left out "
                "(pass --base-model user/name to link the base)"
            )
        base = None
    if base:
        meta["base_model"] = base
        relation = existing.get("base_model_relation")
        if relation not in RELATIONS or (override_base and relation != facts.relation):
            relation = facts.relation
        meta["base_model_relation"] = relation
    else:
        meta.pop("base_model", None)
        meta.pop("base_model_relation", None)
    for key in ("library_name", "license", "pipeline_tag"):
        value = getattr(facts, key)
        if value and not existing.get(key):
            meta[key] = value
    base_tag = f"base_model:{meta['base_model_relation']}:{base}" if isinstance(base, str) else None
    tags = existing.get("tags")
    tags = tags if isinstance(tags, list) else ([tags] if isinstance(tags, str) else [])
    meta["tags"] = _merge_tags(tags, facts.tags, base_tag)
    order = ["base_model", "base_model_relation", "library_name", "license", "pipeline_tag", "tags"]
    ordered = {k: meta[k] for k in order if k in meta}
    ordered.update({k: v for k, v in meta.items() if k not in ordered})
    return ordered, notes


def _block(facts: CardFacts) -> str:
    return f"{BEGIN}\n{facts.details.strip()}\n{END}\n"


def render_card(
    existing: str | None, facts: CardFacts, *, override_base: bool = False, marked: bool = True
):
    """The card text to publish, and notes on changes to the existing card's front matter.

    Args:
        existing: the current README.md text, or None for a new card.
        facts: what loratool computed.
        override_base: see :func:`merge_front_matter`.
        marked: a new card holds ``facts.details`` between :data:`BEGIN` and :data:`END` (the
            block push replaces); False writes them as plain text, the card's own from then on
            (what ``loratool merge`` writes). No effect on an existing card.

    Returns:
        ``(text, notes)``.

    Example:
        >>> old = "---\\nlicense: mit\\n---\\n# Mine\\n\\nMy words.\\n"
        >>> text, _ = render_card(old, CardFacts(kind="adapter", title="x", details="d"))
        >>> "My words." in text and "license: mit" in text
        True
    """
    from huggingface_hub import ModelCardData

    data, body = split_card(existing) if existing else ({}, "")
    meta, notes = merge_front_matter(data, facts, override_base=override_base)
    if existing is None:
        intro = _intro(facts)
        details = _block(facts) if marked else f"{facts.details.strip()}\n"
        body = f"\n# {facts.title}\n\n{intro}\n\n{details}"
        if facts.usage:
            body += f"\n{facts.usage.strip()}\n"
    elif _BLOCK.search(body):
        body = _BLOCK.sub(lambda _: _block(facts), body, count=1)
    else:
        body = body.rstrip("\n") + "\n\n" + _block(facts)
    yaml = ModelCardData(**meta).to_yaml()
    return f"---\n{yaml}\n---\n{body}", notes


def _intro(facts: CardFacts) -> str:
    base = (
        f"[{facts.base_model}](https://huggingface.co/{facts.base_model})"
        if facts.base_model
        else None
    )
    if facts.kind == "adapter":
        on = f" for {base}" if base else (f" for `{facts.base_note}`" if facts.base_note else "")
        return f"A LoRA adapter{on}."
    on = base or (f"`{facts.base_note}`" if facts.base_note else "its base model")
    return f"{on} with LoRA adapters merged into its weights."


def _hist(hist: dict[str, int]) -> str:
    if len(hist) == 1:
        return next(iter(hist))
    return ", ".join(f"{k} (x{v})" for k, v in hist.items())


def files_table(files: list[tuple[str, int]]) -> str:
    """A Markdown list of ``(path in repo, size in bytes)``."""
    return "\n".join(f"- `{name}` ({human_size(size)})" for name, size in files)


def _history_lines(history: list[Any]) -> list[str]:
    lines = []
    for i, entry in enumerate(history, 1):
        if not isinstance(entry, dict):
            lines.append(f"{i}. {json.dumps(entry)}")
            continue
        params = {k: v for k, v in entry.items() if k not in ("op", "version")}
        shown = ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items())
        version = f" (loratool {entry['version']})" if entry.get("version") else ""
        lines.append(f"{i}. `{entry.get('op', '?')}`{version}" + (f": {shown}" if shown else ""))
    return lines


def adapter_details(
    report: dict[str, Any], files: list[tuple[str, int]], history: list[Any] | None
) -> str:
    """loratool's block for an adapter, from its ``inspect --json`` document.

    Args:
        report: ``inspect_adapter(...).to_json()``.
        files: ``(path in repo, bytes)`` of every file published (README.md excluded).
        history: the ``loratool_history`` metadata entries, oldest first, if any.
    """
    base = report.get("base_model")
    targets = ", ".join(f"`{k}` (x{v})" for k, v in report["targets"].items())
    rows = [
        ("format", f"{report['format']} ({', '.join(report['variants']) or 'no LoRA modules'})"),
        ("base model (as recorded)", f"`{base['name']}`" if base else "not recorded"),
        (
            "modules",
            f"{report['counts']['modules']} "
            f"({', '.join(f'{k} {v}' for k, v in report['by_kind'].items())})",
        ),
        ("components", ", ".join(f"{k} {v}" for k, v in report["by_component"].items())),
        ("targets", targets or "-"),
        ("rank", _hist(report["rank"]["histogram"]) or "-"),
        ("alpha", _hist(report["alpha"]["histogram"]) or "-"),
        ("scale", _hist(report["scale"]["histogram"]) or "-"),
        ("dtypes", ", ".join(f"{k} (x{v})" for k, v in report["dtypes"].items())),
        ("parameters", f"{report['parameters']['lora']:,}"),
        ("size", human_size(sum(size for _, size in files))),
    ]
    if report["parameters"]["passthrough"]:
        rows.append(("pass-through parameters", f"{report['parameters']['passthrough']:,}"))
    if report["unsupported"]:
        rows.append(("other adapter types", ", ".join(report["unsupported"])))
    lines = ["## Adapter details", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in rows]
    lines += ["", "Files:", "", files_table(files)]
    if history:
        lines += ["", "### How it was made", "", "With loratool, in this order:", ""]
        lines += _history_lines(history)
    lines += ["", f"*Summary written by loratool {__version__}.*"]
    return "\n".join(lines)


def model_details(
    provenance: dict[str, Any] | None, files: list[tuple[str, int]], base_label: str | None
) -> str:
    """loratool's block for a merged model, from the ``loratool_merge.json`` provenance record."""
    lines = ["## Merge details", ""]
    if provenance:
        base = provenance.get("base") or {}
        lines.append(f"Base: `{base.get('spec') or base.get('path') or base_label}`.")
        lines += ["", "| adapter | format | weight | modules merged |", "|---|---|---|---|"]
        for a in provenance.get("adapters") or []:
            lines.append(
                f"| `{a.get('spec')}` | {a.get('format')} | {a.get('weight')} | "
                f"{a.get('modules_merged')} |"
            )
        version = provenance.get("loratool_version")
        lines += [
            "",
            f"Merged by loratool {version} (`loratool merge`, dtype {provenance.get('dtype')}, "
            f"engine {provenance.get('engine')}).",
        ]
        lines.append(f"The inputs and their sha256 are in `{MERGE_RECORD_NAME}`.")
    else:
        lines.append(f"Base: `{base_label}`." if base_label else "Base: not recorded.")
    lines += [
        "",
        "Files:",
        "",
        files_table(files),
        "",
        f"*Summary written by loratool {__version__}.*",
    ]
    return "\n".join(lines)


def merged_adapters(provenance: dict[str, Any]) -> str:
    """The text of the card ``loratool merge`` writes: the adapters folded in, in order, from
    the provenance record it writes beside the card (``loratool_merge.json``).

    Example:
        >>> print(merged_adapters({"loratool_version": "1.0", "adapters": [
        ...     {"spec": "my/lora", "weight": 0.8, "modules_merged": 8}]}))
        Merged by loratool 1.0 (`loratool merge`), in this order:
        <BLANKLINE>
        - `my/lora` (weight 0.8, 8 modules)
        <BLANKLINE>
        The exact inputs and their sha256 are in `loratool_merge.json`.
    """
    version = provenance.get("loratool_version")
    lines = [
        f"Merged by loratool {version} (`loratool merge`), in this order:",
        "",
    ]
    for a in provenance.get("adapters") or []:
        name = f"`{a['spec']}`" if a.get("spec") else "an in-memory adapter"
        if not a.get("spec") and a.get("weights_file"):
            name += f" read from `{a['weights_file']}`"
        lines.append(f"- {name} (weight {a['weight']:g}, {a['modules_merged']} modules)")
    lines += ["", f"The exact inputs and their sha256 are in `{MERGE_RECORD_NAME}`."]
    return "\n".join(lines)
