"""What the algebra commands (rescale, resize, combine, convert) share: loading inputs, warnings.

The commands hold no math: they parse options, call ``lora_tools.ops.<name>``, and print.
"""

from __future__ import annotations

from lora_tools.cli._common import error_line


def load_input(spec: str):
    """An adapter from a local path or a Hub id ``user/name[@rev]`` (a local path wins)."""
    from lora_tools.formats import load_adapter
    from lora_tools.io.hub import resolve_input

    return load_adapter(resolve_input(spec, role="adapter"))


def warn(message: str) -> None:
    """One ``loratool: warning: ...`` line on stderr."""
    error_line(message, "warning")
