"""Build the guest image from ``recipe.toml``: mmdebstrap rootfs → ext4 → qcow2 base, with the
kernel and a tiny busybox initrd beside it.

Two cache levels under ``<cache>/``:

- ``rootfs/<rootfs-hash>/``: the Debian tree (slow: one mmdebstrap run, ~1-2 min); rebuilt only
  when the recipe's suite, mirrors, packages or trimming change;
- ``images/<image-key>/``: ``base.qcow2``, ``vmlinuz``, ``initrd.img``, ``manifest.json``; the key
  also covers the project's stack code (``smfs``, ``workloads``, ``netem``), so a code change
  rebuilds only this level (seconds). An existing image is never rebuilt unless forced.

The caller says where the cache is (``cache``) and which images are still in use (``in_use``): both
are the testbed's knowledge (``testbed.vm.images``), and this builder imports nothing of ``testbed``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from smfs.units import parse_size

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
REPO = HERE.parent
RECIPE = HERE / "recipe.toml"
BUILDER_VERSION = "1"
MIB = 1 << 20

Progress = Callable[[str], None]


class ImageError(RuntimeError):
    """The image could not be built (the message says which step and why)."""


@dataclass(frozen=True)
class Image:
    key: str
    dir: Path
    base: Path  # qcow2 root disk (ext4, no partition table: root=/dev/vda)
    kernel: Path
    initrd: Path
    kernel_version: str
    built: bool  # False when it came from the cache
    seconds: float  # time spent in ensure_image()

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(json.loads((self.dir / "manifest.json").read_text()).get("modules", []))


@dataclass(frozen=True)
class Recipe:
    suite: str
    variant: str
    mirrors: tuple[str, ...]
    packages: tuple[str, ...]
    exclude_paths: tuple[str, ...]
    drop_modules: tuple[str, ...]
    initrd_modules: tuple[str, ...]
    modules: tuple[str, ...]
    project_packages: tuple[str, ...]
    root_free: int

    @classmethod
    def load(cls, path: Path = RECIPE) -> Recipe:
        raw = tomllib.loads(path.read_text())
        try:
            return cls(
                suite=raw["suite"], variant=raw["variant"], mirrors=tuple(raw["mirrors"]),
                packages=tuple(raw["packages"]), exclude_paths=tuple(raw.get("exclude_paths", ())),
                drop_modules=tuple(raw.get("drop_modules", ())), initrd_modules=tuple(raw["initrd_modules"]),
                modules=tuple(raw["modules"]), project_packages=tuple(raw["project_packages"]),
                root_free=parse_size(raw.get("root_free", "384MiB"), "root_free"),
            )
        except KeyError as err:
            raise ImageError(f"{path}: missing field {err}; see the shipped vmimages/recipe.toml") from None


def rootfs_hash(recipe: Recipe) -> str:
    """Hash of what goes into the Debian tree (mmdebstrap inputs and trimming)."""
    parts = [BUILDER_VERSION, recipe.suite, recipe.variant, *recipe.mirrors, "|", *recipe.packages, "|",
             *recipe.exclude_paths, "|", *recipe.drop_modules]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def recipe_hash(recipe_path: Path = RECIPE) -> str:
    """Hash of the whole recipe, the init scripts and this builder (the image level)."""
    h = hashlib.sha256(BUILDER_VERSION.encode())
    for p in (recipe_path, HERE / "init.sh", HERE / "initrd-init.sh", Path(__file__)):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


CODE_SUFFIXES = (".py", ".c", ".h", ".mk")
"""Files whose content makes the guest's code: Python and the compiled gateway's sources (with ``Makefile``)."""
NATIVE_GATEWAY = Path("smfs") / "native" / "build" / "smfs-gateway-static"
"""The compiled gateway the guests run (``[fec] engine = "c"``), built on the host by ``gateway.mk``, static."""


def code_hash(packages: tuple[str, ...]) -> str:
    """Hash of the project's stack code copied into the guest (``*.py`` of each package, and the C
    sources of the compiled gateway, which is built for the image)."""
    h = hashlib.sha256()
    for pkg in packages:
        files = (f for f in (REPO / pkg).rglob("*") if f.suffix in CODE_SUFFIXES or f.name == "Makefile")
        for f in sorted(files):
            if "__pycache__" in f.parts or "build" in f.relative_to(REPO).parts or not f.is_file():
                continue
            h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def image_key(recipe_path: Path = RECIPE) -> str:
    recipe = Recipe.load(recipe_path)
    return hashlib.sha256((recipe_hash(recipe_path) + code_hash(recipe.project_packages)).encode()).hexdigest()[:12]


def find_image(cache: Path, recipe_path: Path = RECIPE) -> Image | None:
    """The image for the current recipe and code in ``cache``, or None."""
    d = cache / "images" / image_key(recipe_path)
    return _load_image(d, built=False, seconds=0.0) if (d / "manifest.json").exists() else None


def ensure_image(cache: Path, rebuild: bool = False, progress: Progress | None = None, recipe_path: Path = RECIPE,
                 rebuild_rootfs: bool = False, in_use: Callable[[Path], bool] | None = None) -> Image:
    """Return the image for the current recipe and code in ``cache``, building what is missing.

    ``rebuild`` rebuilds the image level; ``rebuild_rootfs`` also reruns mmdebstrap. After a build the
    other images in ``cache`` are deleted unless ``in_use(image_dir)`` says one is still used; without
    ``in_use`` every other image is kept (only the caller knows what its testbeds use).
    """
    say = progress or (lambda msg: log.info("%s", msg))
    t0 = time.monotonic()
    recipe = Recipe.load(recipe_path)
    key = image_key(recipe_path)
    images = cache / "images"
    out = images / key
    images.mkdir(parents=True, exist_ok=True)
    with _flock(images / f".{key}.lock"):
        if (out / "manifest.json").exists() and not (rebuild or rebuild_rootfs):
            return _load_image(out, built=False, seconds=time.monotonic() - t0)
        rootfs = _ensure_rootfs(cache, recipe, rootfs_hash(recipe), say, force=rebuild_rootfs)
        _build_image(recipe, rootfs, out, key, say, in_use or (lambda _d: True))
    return _load_image(out, built=True, seconds=time.monotonic() - t0)


def _load_image(d: Path, built: bool, seconds: float) -> Image:
    m = json.loads((d / "manifest.json").read_text())
    return Image(m["key"], d, d / "base.qcow2", d / "vmlinuz", d / "initrd.img", m["kernel_version"], built, seconds)


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _run(cmd: list[str], step: str, **kw: object) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    except FileNotFoundError:
        raise ImageError(f"{step}: {cmd[0]} not found; run ./inv once as root to install the Debian packages") from None
    except subprocess.CalledProcessError as err:
        tail = (err.stderr or err.stdout or "").strip().splitlines()[-5:]
        raise ImageError(f"{step}: {' '.join(cmd[:3])}... exited {err.returncode}: {' | '.join(tail)}") from None


def _ensure_rootfs(cache: Path, recipe: Recipe, rhash: str, say: Progress, force: bool) -> Path:
    top = cache / "rootfs" / rhash
    rootfs = top / "rootfs"
    if (top / "complete").exists() and not force:
        say(f"rootfs {rhash} cached")
        return rootfs
    if os.geteuid() != 0:
        raise ImageError("building the guest rootfs needs root (mmdebstrap, chroot); run as root")
    shutil.rmtree(top, ignore_errors=True)
    top.mkdir(parents=True)
    tmp = top / "rootfs.tmp"
    say(f"mmdebstrap {recipe.suite} {recipe.variant} ({len(recipe.packages)} packages; ~1-2 min)")
    cmd = ["mmdebstrap", f"--variant={recipe.variant}", "--include=" + ",".join(recipe.packages)]
    cmd += [f"--dpkgopt=path-exclude={p}" for p in recipe.exclude_paths]
    cmd += ["--skip=output/dev", recipe.suite, str(tmp), *recipe.mirrors]
    t0 = time.monotonic()
    _run(cmd, "mmdebstrap")
    say(f"mmdebstrap done in {time.monotonic() - t0:.0f} s")
    _trim(recipe, tmp)
    tmp.rename(rootfs)
    (top / "complete").write_text(json.dumps({"recipe_hash": rhash, "t": time.time()}))
    return rootfs


def _kernel_version(rootfs: Path) -> str:
    versions = sorted(p.name for p in (rootfs / "lib" / "modules").iterdir())
    if not versions:
        raise ImageError(f"no kernel modules in {rootfs}; is linux-image-amd64 in the recipe's packages?")
    return versions[-1]


def _trim(recipe: Recipe, rootfs: Path) -> None:
    """Drop unneeded modules (then depmod), Debian's initrd and apt's caches."""
    kver = _kernel_version(rootfs)
    kdir = rootfs / "lib" / "modules" / kver / "kernel"
    for sub in recipe.drop_modules:
        shutil.rmtree(kdir / sub, ignore_errors=True)
    _run(["chroot", str(rootfs), "depmod", "-a", kver], "depmod")
    for p in (rootfs / "boot").glob("initrd.img*"):
        p.unlink()
    for d in ("var/lib/apt/lists", "var/cache/apt", "var/cache/debconf", "var/log"):
        for p in (rootfs / d).glob("*"):
            if p.is_file():
                p.unlink()


def _build_image(recipe: Recipe, rootfs: Path, out: Path, key: str, say: Progress,
                 in_use: Callable[[Path], bool]) -> None:
    kver = _kernel_version(rootfs)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    say("installing the project's packages and PID 1")
    _install_project(recipe, rootfs)
    say("building the initrd (busybox + root-disk modules)")
    _build_initrd(recipe, rootfs, kver, staging / "initrd.img")
    shutil.copy2(rootfs / "boot" / f"vmlinuz-{kver}", staging / "vmlinuz")
    say("making the ext4 root disk and converting to qcow2")
    used = int(_run(["du", "-sb", "--apparent-size", str(rootfs)], "du").stdout.split()[0])
    size_mib = (used + recipe.root_free) // MIB + (used // MIB) // 5
    raw = staging / "root.raw"
    _run(["truncate", "-s", f"{size_mib}M", str(raw)], "truncate")
    _run(["mkfs.ext4", "-q", "-F", "-L", "smfs-root", "-E", "lazy_itable_init=1,lazy_journal_init=1",
          "-d", str(rootfs), str(raw)], "mkfs.ext4")
    _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(staging / "base.qcow2")], "qemu-img convert")
    raw.unlink()
    manifest = {"key": key, "kernel_version": kver, "modules": list(recipe.modules), "root_mib": size_mib,
                "suite": recipe.suite, "packages": list(recipe.packages), "t": time.time()}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    for d in staging.parent.iterdir():  # keep the cache small: drop other images nobody uses
        if d.is_dir() and d.name != out.name and not d.name.endswith(".tmp") and not in_use(d):
            shutil.rmtree(d, ignore_errors=True)
    say(f"image {key}: {size_mib} MiB root, kernel {kver}")


def build_native_gateway() -> Path:
    """Build the static C gateway on this host (``make -f smfs/native/gateway.mk static``): linked
    statically (glibc and Debian's libcrypto.a), it runs in the bookworm guests whatever the host."""
    _run(["make", "-s", "-f", str(REPO / "smfs" / "native" / "gateway.mk"), "static"], "building the C gateway")
    return REPO / NATIVE_GATEWAY


def _install_project(recipe: Recipe, rootfs: Path) -> None:
    opt = rootfs / "opt" / "smfs-testbed"
    shutil.rmtree(opt, ignore_errors=True)
    opt.mkdir(parents=True)
    gateway = build_native_gateway() if "smfs" in recipe.project_packages else None
    for pkg in recipe.project_packages:
        shutil.copytree(REPO / pkg, opt / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "build"))
    if gateway is not None:
        (opt / NATIVE_GATEWAY).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(gateway, opt / NATIVE_GATEWAY)
    pyver = sorted(p.name for p in (rootfs / "usr" / "lib").glob("python3.*"))[-1]
    site = rootfs / "usr" / "lib" / "python3" / "dist-packages"
    site.mkdir(parents=True, exist_ok=True)
    (site / "smfs-testbed.pth").write_text("/opt/smfs-testbed\n")
    log.debug("project installed for %s", pyver)
    init = (HERE / "init.sh").read_text().replace("@MODULES@", " ".join(recipe.modules))
    target = rootfs / "sbin" / "smfs-init"
    target.write_text(init)
    target.chmod(0o755)


def _build_initrd(recipe: Recipe, rootfs: Path, kver: str, out: Path) -> None:
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).exists():
        raise ImageError("busybox not found; install busybox-static (./inv does it)")
    moddir = rootfs / "lib" / "modules" / kver
    deps: dict[str, list[str]] = {}
    paths: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        name = Path(target).name.removesuffix(".ko").replace("-", "_")
        paths[name] = target
        deps[name] = [Path(d).name.removesuffix(".ko").replace("-", "_") for d in rest.split()]
    order: list[str] = []

    def add(name: str) -> None:  # dependencies first (modules.dep lists the deepest last)
        if name in order or name not in paths:
            return  # done, or built into the kernel
        for dep in reversed(deps[name]):
            add(dep)
        order.append(name)

    for name in recipe.initrd_modules:
        add(name.replace("-", "_"))
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for d in ("bin", "modules", "proc", "sys", "dev", "newroot"):
            (t / d).mkdir()
        shutil.copy2(busybox, t / "bin" / "busybox")
        for name in order:
            shutil.copy2(moddir / paths[name], t / "modules" / f"{name}.ko")
        (t / "modules.list").write_text("\n".join(order) + "\n")
        init = t / "init"
        shutil.copy2(HERE / "initrd-init.sh", init)
        init.chmod(0o755)
        files = sorted(str(p.relative_to(t)) for p in t.rglob("*"))
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input="\n".join(files).encode(),
                              cwd=t, capture_output=True, check=False)
        if cpio.returncode:
            raise ImageError(f"initrd: cpio exited {cpio.returncode}: {cpio.stderr.decode().strip()}")
        import gzip

        out.write_bytes(gzip.compress(cpio.stdout, compresslevel=6))


DATA_MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-L", "smfs-data", "-E", "lazy_itable_init=1,lazy_journal_init=1"],
    "minix": ["mkfs.minix", "-3"],  # no journal: only what was fsynced is on the disk
}


def data_raw(cache: Path, size: int, fs: str = "ext4") -> Path:
    """An empty data disk of ``size`` bytes with filesystem ``fs`` (ext4 labelled smfs-data, or
    minix v3) as a raw sparse file in ``cache``, built once per size and filesystem; each VM's data
    disk is a sparse copy of it (served by nbdkit: ``testbed.vm.disks``)."""
    if fs not in DATA_MKFS:
        raise ImageError(f"data disk: no filesystem {fs!r}; use one of {', '.join(DATA_MKFS)}")
    d = cache / "images"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"data-{size // MIB}M-{fs}.raw"
    with _flock(d / ".data.lock"):
        if path.exists():
            return path
        tmp = Path(str(path) + ".tmp")
        tmp.unlink(missing_ok=True)
        _run(["truncate", "-s", str(size), str(tmp)], "truncate")
        _run([*DATA_MKFS[fs], str(tmp)], f"mkfs ({fs} data disk)")
        os.replace(tmp, path)
    return path
