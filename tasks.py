"""invoke tasks: the command line of smfs-testbed (``./inv --list``).

Tasks are thin: they parse flags, call the library, print, and set the exit code.
Each concern keeps its tasks in ``testbed/cli/<concern>.py``; this file only assembles them.
"""

from invoke import Collection

from testbed.cli import collect

ns: Collection = collect()
