"""User-facing errors and the one place that turns them into a clean exit.

Every problem a user can fix (bad params, missing snapshot, missing weights...) is raised as a
`UserError` subclass whose message names the problem and the fix. Stage `main()`s run through
`run_cli`, so such errors print one readable message instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix; the message says what and how."""


def run_cli(main: Callable[[], object]) -> None:
    """Run a stage's main; a UserError becomes `error: ...` on stderr and exit status 2."""
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
