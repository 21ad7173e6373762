"""The root of every error the testbed raises on purpose, and the line between bad input and a failure.

Every exception class of ``testbed/`` derives from :class:`TestbedError`, so the command line catches
this one class, once (``testbed.cli.common.task``), and turns it into one line and exit 2: whatever
the message says is all the user needs, and a traceback is left for bugs. Classes keep their older
bases beside it (``class SpecError(UserError, ValueError)``), because callers catch ``ValueError`` and
``RuntimeError``.

:class:`UserError` marks bad input (a spec, a flag, a path the user gave): fix the input and run
again. It is a subclass rather than a ``user_error`` flag so that ``except UserError`` works and a
class says once, where it is defined, which kind it is. Both kinds are exit 2 today; the split tells a
reader (and a later caller) whether the testbed or the input is at fault.

This module imports nothing of the project, so every module can import it. The libraries below
``testbed`` (``smfs``, ``netem``, ``workloads``, ``vmimages``) never import it: they keep their own
errors (mostly ``ValueError`` and ``RuntimeError``), and ``testbed`` turns them into its own where it
calls them and knows the field or the step to name (``spec.py`` into :class:`~testbed.spec.SpecError`,
the flags of ``testbed.cli.common`` into one line, ``testbed.vm.images`` into its ``ImageError``).
"""

from __future__ import annotations


class TestbedError(Exception):
    """An error the testbed raises on purpose; its message is one line that says what to do."""

    __test__ = False  # not a pytest test class despite its name


class UserError(TestbedError):
    """Bad input: a spec, a flag or a path; the message names it and the fix."""


class InfrastructureError(TestbedError, RuntimeError):
    """The drill itself failed (a process died, a site never became ready): verdict unknown."""
