"""The one way every command-line entry point runs: library exceptions become one-line errors.

Library code raises exceptions with a message that says what is wrong and how to fix it; only the
CLI turns them into an exit status. ``run_cli(fn, argv, prog)`` calls ``fn(argv)`` and

- returns its integer result as the exit status (0 when it returns anything else),
- prints ``prog: error: <message>`` and returns 2 for a usage / config error, 1 for any other error,
- returns 130 on Ctrl-C,
- with ``--debug`` (anywhere in argv) or ``SPARSE_MIM_DEBUG=1`` re-raises, so the traceback shows.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

from .config import ConfigError

__all__ = ["UsageError", "run_cli", "one_line", "command_parser"]


def command_parser(prog: str, description: str, epilog: str | None = None):
    """The ``argparse`` parser of one command: ``description`` / ``epilog`` printed as written (examples keep
    their lines). The commands' own flags are added by the CLI modules."""
    import argparse
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


class UsageError(ValueError):
    """A command-line or config value that cannot work (the message names the fix); exit status 2."""


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (its first line when it has several)."""
    text = str(exc).strip()
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = str(exc.args[0])
    if not text:
        text = type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if len(lines) == 1 else " ".join(lines)


def _disk_full_as_one_line(e: Exception) -> Exception:
    """A full disk anywhere in the exception chain becomes the one documented line (naming the file
    when the error knows it), whatever layer raised it."""
    from .checkpoint import DiskFullError, disk_full_error, is_disk_full
    if isinstance(e, DiskFullError) or not is_disk_full(e):
        return e
    cur, name = e, None
    while cur is not None and name is None:
        name = getattr(cur, "filename", None)
        cur = cur.__cause__ or cur.__context__
    return disk_full_error(str(name) if name else "a file of this run (--debug shows which)",
                           "files written before are intact")


def run_cli(fn: Callable[[list[str]], Any], argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run ``fn(argv)`` as a command-line program and return its exit status (see module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0] or "sparse_mim")
    debug = "--debug" in argv or os.environ.get("SPARSE_MIM_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        result = fn(argv)
    except SystemExit as e:  # argparse --help / usage errors, --print-config
        if e.code is None:
            return 0
        return e.code if isinstance(e.code, int) else 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place exceptions become exit codes
        if debug:
            raise
        e = _disk_full_as_one_line(e)
        kind = "" if isinstance(e, (ConfigError, UsageError)) else f"{type(e).__name__}: "
        print(f"{prog}: error: {kind}{one_line(e)}  (--debug shows the traceback)", file=sys.stderr)
        return 2 if isinstance(e, (ConfigError, UsageError)) else 1
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
