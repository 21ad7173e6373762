"""The second QMP monitor of a testbed VM, driven with qemu.qmp: what libvirt lacks.

Each VM's QEMU listens on ``<testbed>/qmp/<vm>.sock`` (``-qmp unix:...,server=on,wait=off``; the
folder is owned by the QEMU user). QEMU serves one client at a time on it, so every call connects,
runs and disconnects; ``events()`` holds the connection for its duration.

- freeze / thaw: ``stop`` / ``cont`` (packets queue in the host, none lost);
- link cut: ``set_link`` on the NIC (libvirt does not notice; prefer ``VmTestbed.set_link``);
- disk failure: a ``blkdebug`` filter is inserted between the data disk's qcow2 node and its file
  node with ``blockdev-add`` + ``blockdev-reopen``; its rules fail every data read, write and flush
  with EIO (5), which the guest sees as I/O errors on /dev/vdb. ``disk_heal`` reopens the qcow2 node
  on its file again and deletes the filter.

Changes libvirt should know about (memory, snapshots, link state) go through libvirt instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from testbed.registry import Resource, register_teardown

log = logging.getLogger(__name__)

FAIL_NODE = "smfs-blkdebug"
NIC = "ua-net0"
DATA_DISK = "ua-data"
EIO = 5
# blkdebug events qcow2 raises on its file child for guest data reads and writes. qcow2 metadata
# writes and flushes still succeed, so the image stays consistent and the filter can be removed
# again (blockdev-reopen flushes first; failing flushes would make healing impossible without a
# restart). Reads of clusters still in the backing image (never written) are not failed.
FAIL_EVENTS = ("read_aio", "write_aio")


class QmpError(RuntimeError):
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

    def _data_nodes(self, disk_file: str, device: str = DATA_DISK) -> tuple[dict[str, Any], str, str]:
        """(qcow2 node of the disk, its file node, the node currently under the qcow2 node)."""
        blocks = self.execute("query-block")
        top = next((b for b in blocks if device in b.get("qdev", "") and "inserted" in b), None)
        if top is None:
            raise QmpError(f"{self.name}: no disk {device} (is the domain running?)")
        nodes = {n["node-name"]: n for n in self.execute("query-named-block-nodes", {"flat": True})}
        fmt = nodes[top["inserted"]["node-name"]]
        storage = next((n["node-name"] for n in nodes.values() if n.get("drv") == "file"
                        and n.get("file") == disk_file), None)
        if storage is None:
            raise QmpError(f"{self.name}: no file node for {disk_file}")
        return fmt, storage, FAIL_NODE if FAIL_NODE in nodes else storage

    def _reopen(self, fmt: dict[str, Any], file_node: str) -> None:
        opts: dict[str, Any] = {"node-name": fmt["node-name"], "driver": "qcow2", "file": file_node}
        backing = fmt.get("backing_file")
        if backing:
            nodes = self.execute("query-named-block-nodes", {"flat": True})
            opts["backing"] = next((n["node-name"] for n in nodes if n.get("drv") == "qcow2"
                                    and n.get("file") == backing), None)
        self.execute("blockdev-reopen", {"options": [opts]})

    def disk_fail(self, disk_file: str, errno: int = EIO) -> None:
        """Fail every read, write and flush of the disk whose top image is ``disk_file``."""
        fmt, storage, current = self._data_nodes(disk_file)
        if current == FAIL_NODE:
            return
        rules = [{"event": ev, "errno": errno} for ev in FAIL_EVENTS]
        self.execute("blockdev-add", {"driver": "blkdebug", "node-name": FAIL_NODE, "image": storage,
                                      "inject-error": rules})
        try:
            self._reopen(fmt, FAIL_NODE)
        except QmpError:
            self.execute("blockdev-del", {"node-name": FAIL_NODE})
            raise

    def disk_heal(self, disk_file: str) -> None:
        """Undo ``disk_fail``: put the qcow2 node back on its file and drop the filter."""
        fmt, storage, current = self._data_nodes(disk_file)
        if current != FAIL_NODE:
            return
        self._reopen(fmt, storage)
        self.execute("blockdev-del", {"node-name": FAIL_NODE})


def _teardown_qmp(res: Resource) -> None:
    import os

    try:
        os.unlink(res.ident)
    except FileNotFoundError:
        pass


register_teardown("qmp", _teardown_qmp)
