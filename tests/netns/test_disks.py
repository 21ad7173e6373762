"""The data disk model on the host (nbdkit + qemu-io, no libvirt): a volatile write cache, so a
killed server keeps exactly what was flushed; and the error filter's file fails every request.

qemu-io runs with ``-t writeback`` (its default sends every write with FUA, which the cache filter
writes through) and ends with ``sigraise 9``, so it never flushes on exit either.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from testbed import procs
from testbed.registry import Registry
from testbed.vm import disks

OWNER = "pytest-disks"
BLOCK = 64 * 1024
A, B = 0, 1 << 20  # offsets of the flushed block and of the block written after the flush

pytestmark = pytest.mark.skipif(not (shutil.which("nbdkit") and shutil.which("qemu-io")),
                                reason="needs nbdkit and qemu-io (./inv installs them)")


@pytest.fixture()
def served(tmp_path: Path):
    registry = Registry(tmp_path / "registry.json")
    disk = disks.DataDisk(vm="vm1", site="primary", file=tmp_path / "vm1-data.raw", folder=tmp_path / "disks")
    subprocess.run(["truncate", "-s", "16M", str(disk.file)], check=True)
    disks.start(disk, owner=OWNER, registry=registry)
    try:
        yield disk, registry
    finally:
        registry.teardown(owner=OWNER)


def qemu_io(disk: disks.DataDisk, *cmds: str) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-io", "-f", "raw", "-t", "writeback", f"nbd+unix:///?socket={disk.socket}"]
    for c in cmds:
        argv += ["-c", c]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def block(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(BLOCK)


def test_a_killed_server_keeps_exactly_what_was_flushed(served) -> None:
    disk, registry = served
    res = disks.server(OWNER, "vm1", registry)
    assert res is not None and res.meta["name"] == "nbdkit:vm1" and res.meta["site"] == "primary"
    pid = disks.pid(OWNER, "vm1", registry)
    assert pid is not None and procs.alive(pid, res.meta["started"])

    r = qemu_io(disk, f"write -P 0xaa {A} {BLOCK}", "flush", f"write -P 0xbb {B} {BLOCK}", "sigraise 9")
    assert r.stdout.count("wrote 65536/65536") == 2, r.stdout + r.stderr
    # B reached the server (a new client reads it back from the cache) but not the file
    assert qemu_io(disk, f"read -P 0xbb {B} {BLOCK}", "sigraise 9").stdout.count("read 65536/65536") == 1
    assert block(disk.file, A) == b"\xaa" * BLOCK
    assert block(disk.file, B) == bytes(BLOCK)

    assert disks.stop(OWNER, "vm1", registry)  # SIGKILL: the power cut
    assert not procs.alive(pid, res.meta["started"]) and disks.server(OWNER, "vm1", registry) is None
    assert block(disk.file, A) == b"\xaa" * BLOCK
    assert block(disk.file, B) == bytes(BLOCK)

    # booted again on the same file: what survived is what was flushed
    disks.start(disk, owner=OWNER, registry=registry)
    r = qemu_io(disk, f"read -P 0xaa {A} {BLOCK}", f"read -P 0x00 {B} {BLOCK}", "sigraise 9")
    assert r.stdout.count("read 65536/65536") == 2, r.stdout + r.stderr


def test_a_flush_writes_the_cache_back(served) -> None:
    disk, _ = served
    qemu_io(disk, f"write -P 0xcc {B} {BLOCK}", "sigraise 9")
    assert block(disk.file, B) == bytes(BLOCK)
    qemu_io(disk, "flush", "sigraise 9")
    assert block(disk.file, B) == b"\xcc" * BLOCK


def test_the_error_file_fails_every_request_while_it_exists(served) -> None:
    disk, _ = served
    disks.fail(disk)
    r = qemu_io(disk, f"read 0 {BLOCK}")
    assert r.returncode != 0 and "read failed: Input/output error" in r.stdout + r.stderr
    r = qemu_io(disk, f"write -P 0xdd 0 {BLOCK}")
    assert r.returncode != 0 and "write failed: Input/output error" in r.stdout + r.stderr
    disks.heal(disk)
    r = qemu_io(disk, f"read -P 0x00 0 {BLOCK}")
    assert r.returncode == 0 and "read 65536/65536" in r.stdout, r.stdout + r.stderr


def test_start_reports_a_server_that_cannot_serve(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry.json")
    disk = disks.DataDisk(vm="vm2", site="primary", file=tmp_path / "missing.raw", folder=tmp_path / "disks")
    with pytest.raises(disks.DiskError, match="data disk .* is missing"):
        disks.start(disk, owner=OWNER, registry=registry)
    disk.file.mkdir()  # not a disk image: nbdkit exits at once
    try:
        with pytest.raises(disks.DiskError, match="nbdkit did not serve"):
            disks.start(disk, owner=OWNER, registry=registry, timeout=5)
    finally:
        registry.teardown(owner=OWNER)
    assert not disks.servers(OWNER, registry=registry)


def test_a_server_outlives_the_command_that_started_it(tmp_path: Path) -> None:
    """``./inv up`` starts the servers and exits; nbdkit 1.32 would take its parent's death as a
    signal to shut down (then every request fails with ESHUTDOWN)."""
    import sys

    disk = disks.DataDisk(vm="vm3", site="mirror", file=tmp_path / "vm3-data.raw", folder=tmp_path / "disks")
    subprocess.run(["truncate", "-s", "16M", str(disk.file)], check=True)
    registry = Registry(tmp_path / "registry.json")
    code = ("import sys; from pathlib import Path; from testbed.vm import disks; from testbed.registry import Registry; "
            f"d = disks.DataDisk(vm='vm3', site='mirror', file=Path({str(disk.file)!r}), folder=Path({str(disk.folder)!r})); "
            f"print(disks.start(d, owner={OWNER!r}, registry=Registry(Path({str(registry.path)!r}))))")
    pid = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    try:
        import time

        time.sleep(0.5)
        assert disks.pid(OWNER, "vm3", registry) == pid
        r = qemu_io(disk, f"write -P 0xee {A} {BLOCK}", "flush", "sigraise 9")
        assert "wrote 65536/65536" in r.stdout, r.stdout + r.stderr
        assert block(disk.file, A) == b"\xee" * BLOCK
    finally:
        registry.teardown(owner=OWNER)
    assert not procs.alive(pid, procs.start_time(pid))


@pytest.mark.parametrize("fs", ["minix", "ext4"])
def test_a_data_disk_is_a_sparse_copy_of_an_empty_filesystem(tmp_path: Path, monkeypatch, fs: str) -> None:
    from vmimages import build

    monkeypatch.setenv("SMFS_TESTBED_CACHE", str(tmp_path / "cache"))
    size = 64 << 20
    disks.create_image(tmp_path / "vm-data.raw", size, fs)
    st = (tmp_path / "vm-data.raw").stat()
    assert st.st_size == size and st.st_blocks * 512 < size // 2  # holes stay holes
    kind = subprocess.run(["blkid", "-o", "value", "-s", "TYPE", str(tmp_path / "vm-data.raw")],
                          capture_output=True, text=True).stdout.strip()
    assert kind == fs
    base = build.data_raw(tmp_path / "cache", size, fs)
    assert base == tmp_path / "cache" / "images" / f"data-64M-{fs}.raw"
    before = base.stat().st_mtime_ns
    disks.create_image(tmp_path / "vm2-data.raw", size, fs)
    assert base.stat().st_mtime_ns == before  # built once per size and filesystem
    with pytest.raises(disks.DiskError, match="no filesystem 'xfs'; use one of ext4, minix"):
        disks.create_image(tmp_path / "vm3-data.raw", size, "xfs")
