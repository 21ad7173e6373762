"""Invoke task modules, one per concern; ``collect()`` builds the root collection.

Every module in this package may define ``TASKS``: a list of invoke ``Task`` objects
that become top-level tasks (``./inv drill``, ``./inv up``, ...). Each is declared with
:func:`testbed.cli.common.task`, which turns every project error into one line and exit 2.
"""

from __future__ import annotations

import importlib
import pkgutil

from invoke import Collection


def collect() -> Collection:
    ns = Collection()
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for task in getattr(module, "TASKS", []):
            ns.add_task(task)
    ns.configure({"run": {"echo": False}})
    return ns
