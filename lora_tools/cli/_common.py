"""What every command shares: error reporting, exit codes, output helpers."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from lora_tools.errors import EXIT_ERROR, EXIT_USAGE, LoraToolError, safe_text

#: Exit code for Ctrl-C, as shells report SIGINT.
EXIT_INTERRUPTED = 130


def error_line(message: str, kind: str = "error") -> None:
    """Print one ``loratool: error: ...`` line on stderr (``kind``: error, warning, note).

    Tokens are redacted and control characters escaped (:func:`lora_tools.errors.safe_text`):
    a path or a server's answer can neither leak a token nor split or colour the line.
    """
    click.echo(f"loratool: {kind}: {safe_text(message)}", err=True)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind like Ctrl-C, so that temporary outputs are removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    # once: a second signal during the clean-up must not cut the clean-up short
    signal.signal(signum, signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def _termination_unwinds() -> Iterator[None]:
    """Make SIGTERM (``kill``) and SIGHUP (a closed terminal) raise :class:`Terminated`.

    Python's default for both is to exit at once, without running ``finally`` blocks, which
    would leave an interrupted output's temporary files behind.
    """
    signums = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _terminate) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run(group: click.Group, prog_name: str | None = None) -> None:
    """Run the CLI, mapping every error to one line on stderr and an exit code.

    ``prog_name`` is the name usage lines show (default: click's, from ``sys.argv[0]``).

    ``--debug`` anywhere on the command line re-raises with the full traceback.
    """
    debug = "--debug" in sys.argv[1:]
    try:
        with _termination_unwinds():
            code = group.main(prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        error_line("aborted")
        sys.exit(EXIT_INTERRUPTED)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message())
        sys.exit(0)
    except click.UsageError as exc:
        # One line like every other error, with the help command to run as the hint.
        command = exc.ctx.command_path if exc.ctx is not None else "loratool"
        error_line(f"{exc.format_message()} (hint: see '{command} --help')")
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        error_line(exc.format_message())
        sys.exit(exc.exit_code)
    except LoraToolError as exc:
        if debug:
            raise
        error_line(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        error_line("interrupted; no output was written")
        sys.exit(EXIT_INTERRUPTED)
    except Terminated as exc:
        error_line(f"stopped by {signal.Signals(exc.signum).name}; no output was written")
        sys.exit(128 + exc.signum)
    except BrokenPipeError:
        sys.exit(0)
    except OSError as exc:
        # the system refused a read or a write (I/O error, permissions, a file that vanished):
        # a runtime error, not a bug in loratool
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        error_line(f"{where}{exc.strerror or exc} (hint: rerun with --debug for the traceback)")
        sys.exit(EXIT_ERROR)
    except Exception as exc:
        if debug:
            raise
        error_line(
            f"internal error: {type(exc).__name__}: {exc} "
            "(hint: this is a bug in loratool; rerun with --debug and report the traceback)"
        )
        sys.exit(EXIT_ERROR)
    sys.exit(code if isinstance(code, int) else 0)


F = TypeVar("F", bound=Callable[..., Any])


def command_hints(hints: dict[str, str]) -> Callable[[F], F]:
    """Give library errors of the listed kinds this command's own hint.

    The library is shared by every command, so its hints name no command-line option; a
    command that has an option (or an argument order) for the case says so here, by the
    error's ``kind``. Put it directly above the function, below the click decorators.

    Example:
        >>> @command_hints({"unmatched": "pass --allow-unmatched to skip them"})
        ... def command() -> None: ...
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except LoraToolError as exc:
                if exc.kind in hints:
                    exc.hint = hints[exc.kind]
                raise

        return wrapper  # type: ignore[return-value]

    return decorate


#: How --json spells floats that JSON has no number for (strict JSON: RFC 8259).
NONFINITE_JSON = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def json_safe(value: Any) -> Any:
    """``value`` with every NaN / Inf float replaced by the string ``"NaN"``, ``"Infinity"`` or
    ``"-Infinity"``, so that it serialises as strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else NONFINITE_JSON[repr(value)]
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def print_json(doc: Any) -> None:
    """Write one strict JSON document to stdout (non-finite floats as strings, see
    :func:`json_safe`)."""
    click.echo(json.dumps(json_safe(doc), indent=2, sort_keys=False, default=str, allow_nan=False))


#: Width given to rich for a pipe or a file: wide enough that nothing wraps.
PLAIN_WIDTH = 100_000


def console(stderr: bool = False, soft_wrap: bool = False) -> Any:
    """A rich Console for tables and text on stdout (or stderr).

    On a terminal it is rich's own, as wide as the terminal. Anywhere else (a pipe, a file) the
    output is plain: no colour, no line wrapped, no line padded with trailing spaces.
    """
    from rich.console import Console

    terminal = Console(stderr=stderr, highlight=False, soft_wrap=soft_wrap)
    return terminal if terminal.is_terminal else PlainConsole(stderr)


class PlainConsole:
    """What :func:`console` gives for a pipe or a file: rich's rendering, one long line per
    line, trailing spaces removed."""

    is_terminal = False
    width = PLAIN_WIDTH

    def __init__(self, stderr: bool = False) -> None:
        self.stderr = stderr

    def print(self, *objects: Any, **kwargs: Any) -> None:
        import io

        from rich.console import Console

        buffer = io.StringIO()
        plain = {"color_system": None, "highlight": False, "soft_wrap": True}
        Console(file=buffer, width=PLAIN_WIDTH, **plain).print(*objects, **kwargs)
        for line in buffer.getvalue().splitlines():
            click.echo(line.rstrip(), err=self.stderr)


#: The fewest characters of a module name a table shows, however narrow the terminal.
MIN_NAME_WIDTH = 6


def fit_names(names: list[str], width: int) -> list[str]:
    """Module names that fit in ``width`` characters, keeping what tells them apart.

    Names that fit are kept whole. Otherwise the dotted prefix every name shares is dropped
    but for its last part (``base_model.model.model.``, as inspect drops a prefix for targets),
    and a name still too long loses its start, never its end: ``…layers.3.self_attn.q_proj``.
    """
    if not names or max(map(len, names)) <= width:
        return list(names)
    parts = [n.split(".") for n in names]
    shared = 0
    while all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    shared = max(shared - 1, 0)  # keep the last shared part: layers.3 reads, 3 does not
    short = [".".join(p[shared:]) for p in parts]
    keep = max(width - 1, 1)
    return [s if len(s) <= width else "…" + s[len(s) - keep :] for s in short]


def column_room(
    width: int, headers: tuple[str, ...], rows: list[list[str]], overhead_per_column: int = 3
) -> int:
    """Characters left for one more column of a table ``width`` wide, once the columns named
    by ``headers`` (cells in ``rows``) have their widest cell and every column its padding and
    rule."""
    used = sum(max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers))
    return max(width - used - overhead_per_column * (len(headers) + 1) - 1, MIN_NAME_WIDTH)
