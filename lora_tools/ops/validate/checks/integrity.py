"""File-integrity rules (``LT0xx``): the path itself, pickles (never opened) and every problem
:func:`~lora_tools.io.safetensors.check_header` finds in the safetensors container.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_tools.errors import LoraToolError
from lora_tools.io.safetensors import (
    PICKLE_SUFFIXES,
    Header,
    Problem,
    check_header,
    read_header_bytes,
)
from lora_tools.ops.validate.context import Context
from lora_tools.ops.validate.rules import PROBLEM_RULES


@dataclass(frozen=True)
class Container:
    """What the later rule families may rely on in a file whose header could be parsed.

    Attributes:
        names: every tensor name, those a problem names included (for format detection).
        trusted: the header without the tensors a container problem names or that end past
            the data buffer; only these are read.
        untrusted: the tensors left out of ``trusted``.
        clean: the container had no problem at all.
    """

    names: list[str]
    trusted: Header
    untrusted: set[str]
    clean: bool


def check_container(ctx: Context) -> Container | None:
    """The file-integrity rules for one target.

    Returns:
        The parsed container, or None when there are no weights to read: a path problem, a
        pickle, an unreadable file or an unparsable header (each reported).
    """
    t = ctx.target
    if t.problem is not None:
        ctx.add(t.problem, t.problem_message or "", hint=_problem_hint(t.problem))
        return None
    assert t.weights is not None
    if t.weights.suffix.lower() in PICKLE_SUFFIXES:
        ctx.add(
            "LT016",
            f"{t.weights.name} is a pickle; loading it can run arbitrary code, so loratool "
            "reports it without opening it",
            hint="re-save the adapter as safetensors in a trusted environment "
            "(PEFT: save_pretrained(..., safe_serialization=True))",
        )
        return None
    try:
        raw, header_bytes, file_bytes = read_header_bytes(t.weights)
    except LoraToolError as exc:
        code = PROBLEM_RULES.get(exc.kind or "", "LT017")
        ctx.add(code, exc.message, hint=exc.hint)
        return None
    header, problems = check_header(raw, header_bytes, file_bytes)
    for problem in problems:
        ctx.add(
            PROBLEM_RULES[problem.kind],
            problem.message,
            module=problem.tensor,
            hint=problem.hint,
        )
    if header is None:
        return None
    return _container(header, problems)


def _container(header: Header, problems: list[Problem]) -> Container:
    # Tensors a container problem names cannot be trusted: leave them out of later rules.
    quarantined = {p.tensor for p in problems if p.tensor}
    data_bytes = header.data_bytes
    beyond = {name for name, info in header.tensors.items() if info.end > data_bytes}
    all_names = list(dict.fromkeys([*header.tensors, *quarantined]))
    usable = Header(
        {
            name: info
            for name, info in header.tensors.items()
            if name not in quarantined and name not in beyond
        },
        header.metadata,
        header.header_bytes,
        header.file_bytes,
    )
    return Container(all_names, usable, quarantined | beyond, clean=not problems)


def _problem_hint(code: str) -> str | None:
    if code == "LT018":
        return "pass the adapter file itself, or save the adapter as safetensors"
    return "check the path"
