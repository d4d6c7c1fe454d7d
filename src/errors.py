"""User-facing errors and the one place that turns them into a clean exit.

Every problem a user can fix (bad params, missing snapshot, missing weights...) is raised as a
`UserError` subclass whose message names the problem and the fix. Stage `main()`s run through
`run_cli`, so such errors print one readable message instead of a traceback; so does an OSError
that escapes (the OS refused a path), naming the path and the cause. The project's own warnings print
as one `warning: ...` line too (a library's keep Python's form, file and line).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable

SRC_DIR = os.path.dirname(os.path.abspath(__file__))  # this package: where the project's own warnings come from


class UserError(Exception):
    """A problem the user can fix; the message says what and how. `exit_code` is the status it exits with."""

    exit_code = 2


def stage_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of `python -m src.<stage>`: `--help` shows the module's docstring, exits 0 and
    does no work; an unknown flag exits 2 (argparse's `usage` and one `error:` line)."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


_python_format = warnings.formatwarning


def one_line_warning(message, category, filename, lineno, line=None) -> str:  # warnings.formatwarning's signature
    """A warning raised in this project's code as `warning: <message>`, without the source line Python adds."""
    if os.path.abspath(filename).startswith(SRC_DIR + os.sep):
        return f"warning: {message}\n"
    return _python_format(message, category, filename, lineno, line)


def run_cli(main: Callable[[], object]) -> None:
    """Run a stage's main; a UserError becomes `error: ...` on stderr and its exit status (2, unless it says)."""
    warnings.formatwarning = one_line_warning
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except OSError as exc:  # the OS refused a path no check foresaw (an odd name, a full disk, no permission)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc} (the operating system refused it); fix the path, its "
              "permissions or the free space, then run again", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
