"""Helpers shared by the task modules: user errors without tracebacks, size parsing."""

from __future__ import annotations

from invoke.exceptions import Exit

from smfs.units import parse_size

__all__ = ["parse_size", "user_error"]

def user_error(message: str, code: int = 2) -> Exit:
    """An invoke Exit carrying a one-line message; raise it for bad input (no traceback)."""
    return Exit(f"error: {message}", code=code)
