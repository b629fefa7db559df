"""``loratool ARGS`` in-process, through the console script's entry point (its error mapping,
exit codes and stderr included), for tests of what a user sees."""

from __future__ import annotations

import contextlib
import io
import sys
from dataclasses import dataclass

from lora_tools.cli import main


@dataclass(frozen=True)
class Run:
    """One run: its exit code, standard output and standard error."""

    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """Standard output then standard error, as a terminal shows them."""
        return self.stdout + self.stderr


def run_console(*args: object) -> Run:
    """Run ``loratool ARGS`` as the console script does and capture what it prints."""
    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["loratool", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    return Run(code, out.getvalue(), err.getvalue())
