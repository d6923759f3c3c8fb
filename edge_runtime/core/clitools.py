"""What every ``infantino-*`` command shares: bad input ends in one line on stderr and a
non-zero exit, never a traceback unless ``-v`` / ``--verbose`` asks for one.

One exit-code convention for all four commands: 0 done, 1 the command failed (a missing
file, a refused package, a server that does not answer), 2 the command line itself is wrong
(argparse's errors, and ``UsageError`` for what argparse cannot check, like an option that
must come from the environment when it is not given), 130 interrupted.

Standard library only, so the device's command line and the server's, the exporter's and the
demo's behave the same without pulling each other's dependencies in.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable, NoReturn

FAILURE_EXIT = 1  # the command could not do what it was asked
USAGE_EXIT = 2  # a malformed command line, as argparse has it
INTERRUPTED_EXIT = 130


class UsageError(ValueError):
    """A command line that cannot mean anything (argparse could not tell): exit ``USAGE_EXIT``."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``prog: error: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(USAGE_EXIT)


def add_verbose(parser: argparse.ArgumentParser, *, top: bool = True) -> None:
    """``-v``: tracebacks and progress. On a sub-command (``top=False``) it may follow the
    sub-command's name and leaves the top-level value alone when not given."""
    parser.add_argument("-v", "--verbose", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="show tracebacks and progress")


def first_line(exc: BaseException) -> str:
    """The exception's message as one line; its class name when the message is empty, or when
    the class is not one of the ordinary input errors (so an unforeseen error still says what)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    if isinstance(exc, (ValueError, OSError, RuntimeError)) and line:
        return line[:500]
    return f"{exc.__class__.__name__}: {line}".rstrip(": ")[:500]


def run_command(prog: str, call: Callable[[], int | None], *, verbose: bool = False) -> int:
    """Run one sub-command; an exception becomes ``prog: error: <one line>`` and ``FAILURE_EXIT``
    (``USAGE_EXIT`` for a ``UsageError``)."""
    try:
        return int(call() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    except Exception as exc:  # noqa: BLE001 - the whole point: no traceback for the user
        if verbose:
            traceback.print_exc()
        print(f"{prog}: error: {first_line(exc)}", file=sys.stderr)
        return USAGE_EXIT if isinstance(exc, UsageError) else FAILURE_EXIT
