"""Every `python -m src.<stage>` parses its arguments: `--help` prints help, exits 0 and does no work.

(Unknown flags exit 2 with one `error:` line: rows `unknown-flag-*` of tests/test_bad_inputs.py.)
"""

from __future__ import annotations

import pytest

from tests.conftest import cli_env
from tests.test_bad_inputs import digests, trained_outputs

STAGES = ("collect", "train", "evaluate", "tune", "sample", "inception_weights")


@pytest.mark.parametrize("stage", STAGES)
def test_help_prints_usage_exits_0_and_changes_nothing(tiny_project, forked_cli, stage):
    trained_outputs(tiny_project)  # outputs a stage that ran by mistake would rewrite
    before = sorted(p for p in tiny_project.rglob("*"))
    contents = digests(tiny_project)

    done = forked_cli.run(f"src.{stage}", "--help", cwd=tiny_project, env=cli_env(tiny_project), timeout=120)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m src.{stage}"), done.stdout
    assert "--help" in done.stdout and done.stderr == "", done.stderr
    assert sorted(p for p in tiny_project.rglob("*")) == before, "--help must not create a file (nor the lock)"
    assert digests(tiny_project) == contents, "--help must not change a file"


def test_the_projects_warnings_print_as_one_line_and_a_librarys_keep_pythons_form():
    import os

    from src.errors import SRC_DIR, one_line_warning

    ours = one_line_warning(UserWarning("few samples"), UserWarning, os.path.join(SRC_DIR, "evaluate.py"), 3, "  x(")
    assert ours == "warning: few samples\n"
    theirs = one_line_warning(UserWarning("deprecated"), UserWarning, "/site-packages/lib.py", 3, "call()")
    assert "lib.py:3: UserWarning: deprecated" in theirs
