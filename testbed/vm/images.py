"""The guest image in the testbed's cache.

:mod:`vmimages.build` builds the image and knows nothing of the testbed; this module tells it what only
the testbed knows (where its cache is, which images a registered overlay or a saved clone still uses)
and turns the builder's errors into the testbed's own, so that ``./inv up`` and ``./inv image`` say
them as one line (exit 2).
"""

from __future__ import annotations

from pathlib import Path

from testbed.errors import TestbedError
from testbed.paths import cache_dir
from testbed.progress import Say
from testbed.registry import Registry
from vmimages import build
from vmimages.build import Image


class ImageError(TestbedError, RuntimeError):
    """The guest image could not be built (the builder's message: which step and why)."""


def ensure_image(rebuild: bool = False, progress: Say | None = None, rebuild_rootfs: bool = False) -> Image:
    """The image for the current recipe and code (:func:`vmimages.build.ensure_image` in the testbed's cache)."""
    try:
        return build.ensure_image(cache_dir(), rebuild=rebuild, progress=progress, rebuild_rootfs=rebuild_rootfs,
                                  in_use=in_use)
    except build.ImageError as err:
        raise ImageError(str(err)) from None


def in_use(image_dir: Path) -> bool:
    """An image is in use while a registered overlay or a saved clone is based on it."""
    if any(r.meta.get("image") == image_dir.name for r in Registry().items("overlay")):
        return True
    clones = cache_dir() / "clones"
    return any(image_dir.name in p.read_text() for p in clones.glob("*/clone.json")) if clones.exists() else False
