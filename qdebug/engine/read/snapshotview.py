"""An internal snapshot seen as an image: its L1 table and virtual size in place of the active ones.

qcow2.txt "Snapshot table": each snapshot has its own L1 table (`l1_table_offset`, `l1_size`) and,
with 16 bytes of extra data, its virtual disk size. Its L2 tables and data clusters are shared with
the active image until one of them writes (which is why they lack the COPIED flag). Swapping those
header fields lets every reader (map rows, block status, guest reads, searches) walk the snapshot
exactly as it walks the active image. Opened read-only: nothing can write through it.
"""

from __future__ import annotations

import dataclasses

from ..errors import QcowError
from ..file.image import Image, Snapshot
from ..format.geometry import Geometry


class SnapshotImage(Image):
    """The image file as of internal snapshot `snapshot` (read-only)."""

    def __init__(self, path: str, snapshot: Snapshot):
        self.snapshot = snapshot
        super().__init__(path)
        self._as_snapshot()

    def reload_header(self) -> None:
        super().reload_header()
        self._as_snapshot()

    def _as_snapshot(self) -> None:
        s = self.snapshot
        self.header = dataclasses.replace(self.header, l1_table_offset=s.l1_table_offset, l1_size=s.l1_size,
                                          size=s.disk_size if s.disk_size is not None else self.header.size)
        self._l1_cache = None
        self.geometry = Geometry(self.header, self.size)
        self.backing_l1 = {}


def find_snapshot(img: Image, name: str) -> Snapshot:
    """A snapshot of `img` by ID or name (ID first, as qemu-img does)."""
    snaps = img.snapshots()
    for s in snaps:
        if s.id == name:
            return s
    for s in snaps:
        if s.name == name:
            return s
    raise QcowError(f"{img.path}: no snapshot with ID or name {name!r}")


def open_snapshot(path: str, name: str) -> SnapshotImage:
    """Open internal snapshot `name` (ID or name) of the image at `path` as a read-only image."""
    img = Image(path)
    try:
        snap = find_snapshot(img, name)
    finally:
        img.close()
    return SnapshotImage(path, snap)
