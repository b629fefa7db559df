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


def run(group: click.Group) -> None:
    """Run the CLI, mapping every error to one line on stderr and an exit code.

    ``--debug`` anywhere on the command line re-raises with the full traceback.
    """
    debug = "--debug" in sys.argv[1:]
    try:
        with _termination_unwinds():
            code = group.main(standalone_mode=False)
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


def console(stderr: bool = False):
    """A rich Console for tables on stdout (or progress on stderr)."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)
