"""``./inv``'s program: invoke's, except that a command line it cannot parse exits 2 like every other bad input.

Invoke exits 1 on an unknown task or flag, a flag without its value or a missing positional argument;
in this project 1 means "data loss" (the drill's verdict), so a typo in a nightly job would read as a
broken promise. Every :class:`invoke.exceptions.ParseError` becomes one line on stderr naming what to
run instead, and exit 2.
"""

from __future__ import annotations

import sys

from invoke import Program
from invoke.exceptions import Exit, ParseError

HINT = "./inv --list shows the tasks, ./inv TASK --help a task's flags"


class InvProgram(Program):
    """invoke's :class:`~invoke.Program` with exit 2 (and a hint) for anything the parser refuses."""

    def parse_core(self, argv: list[str] | None) -> None:
        try:
            super().parse_core(argv)
        except ParseError as err:
            raise Exit(f"error: {err} ({HINT})", code=2) from None

    def execute(self) -> None:
        """A Ctrl-C that no task handled is exit 2 with one line (invoke's own ``run`` would exit 1: "data
        loss" here); tasks that give it another code (``task(interrupted=...)``) have done so already."""
        try:
            super().execute()
        except KeyboardInterrupt:
            raise Exit("interrupted (Ctrl-C)", code=2) from None

    def parse_tasks(self) -> None:
        try:
            super().parse_tasks()
        except ParseError as err:
            raise Exit(f"error: {err} ({HINT})", code=2) from None


def main() -> None:
    try:
        InvProgram(name="smfs-testbed", binary="./inv").run()
    except KeyboardInterrupt:  # a Ctrl-C before a task has its own handling (imports, parsing): no traceback
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
