"""The second QMP monitor of a testbed VM, driven with qemu.qmp: what libvirt lacks.

Each VM's QEMU listens on ``<testbed>/qmp/<vm>.sock`` (``-qmp unix:...,server=on,wait=off``; the
folder is owned by the QEMU user). QEMU serves one client at a time on it, so every call connects,
runs and disconnects; ``events()`` holds the connection for its duration.

- freeze / thaw: ``stop`` / ``cont`` (packets queue in the host, none lost);
- link cut: ``set_link`` on the NIC (libvirt does not notice; prefer ``VmTestbed.set_link``).

Disk failures are the data disk server's business (nbdkit's error filter: ``testbed.vm.disks``).

Changes libvirt should know about (memory, snapshots, link state) go through libvirt instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from testbed.errors import TestbedError
from testbed.registry import Resource, register_teardown

log = logging.getLogger(__name__)

NIC = "ua-net0"


class QmpError(TestbedError, RuntimeError):
    """A QMP command failed, or the socket is not there (VM not running?)."""


class Qmp:
    def __init__(self, path: str, name: str = "vm") -> None:
        self.path = path
        self.name = name

    # --- plumbing -----------------------------------------------------------------------------

    async def aexecute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10) -> Any:
        client = QMPClient(self.name)
        try:
            await asyncio.wait_for(client.connect(self.path), timeout)
            return await asyncio.wait_for(client.execute(command, arguments), timeout)
        except (TimeoutError, QMPError, OSError) as err:
            raise QmpError(f"{self.name}: QMP {command}: {err}") from err
        finally:
            await client.disconnect()

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10) -> Any:
        """Run one QMP command (synchronously; use ``aexecute`` from async code)."""
        return asyncio.run(self.aexecute(command, arguments, timeout))

    async def events(self, seconds: float, names: tuple[str, ...] = ()) -> AsyncIterator[dict[str, Any]]:
        """QMP events (``{'event', 'data', 'timestamp'}``) for ``seconds``, filtered by name when given."""
        client = QMPClient(self.name)
        await client.connect(self.path)
        try:
            loop = asyncio.get_running_loop()
            end = loop.time() + seconds
            with client.listener(names or ()) as listener:
                while (left := end - loop.time()) > 0:
                    try:
                        ev = await asyncio.wait_for(listener.get(), left)
                    except TimeoutError:
                        break
                    yield dict(ev)
        finally:
            await client.disconnect()

    def collect_events(self, seconds: float, names: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        async def run() -> list[dict[str, Any]]:
            return [e async for e in self.events(seconds, names)]

        return asyncio.run(run())

    # --- operations ---------------------------------------------------------------------------

    def status(self) -> str:
        return self.execute("query-status")["status"]

    def freeze(self) -> None:
        self.execute("stop")

    def thaw(self) -> None:
        self.execute("cont")

    def set_link(self, up: bool, nic: str = NIC) -> None:
        self.execute("set_link", {"name": nic, "up": up})


def _teardown_qmp(res: Resource) -> None:
    import os

    try:
        os.unlink(res.ident)
    except FileNotFoundError:
        pass


register_teardown("qmp", _teardown_qmp)
