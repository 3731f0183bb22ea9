"""`bundle`: a metadata-only copy of an image, to hand a broken image over without its data.

The copy has the original's length and every metadata cluster byte for byte (header, L1 and L2
tables, refcount table and blocks, snapshot table, bitmap directory, tables and data), as the host
layout finds them; guest data clusters are left as holes, compressed clusters as zeros in place.
Unreferenced clusters that look like metadata (orphaned L2 tables, stale refcount blocks) are
kept, those that look like guest data become a hole whose first block says "guest data removed"
(`guess.BUNDLE_MARKER`), so `layout` guesses them as before. `check`, `map` and `layout` find on
the bundle what they find on the original.

The bundle says what it is in a header extension of qdebug's own (QDEBUG_EXT_MAGIC_BUNDLE, JSON:
source, size, date, what was removed, and the original's metadata-preallocation verdict, which
`map` uses on the bundle instead of looking at its holes); the backing file name moves up to make
room. Where cluster 0 cannot take it (a header QEMU refuses, no room), a side file
`OUT.qdebug-bundle.json` holds the same JSON.
"""

from __future__ import annotations

import datetime
import json
import os
import struct
import tempfile
from dataclasses import dataclass

import numpy as np

from ..errors import QcowError
from ..file.fileio import fsync, ftruncate, pwrite_all
from ..file.image import Image
from ..format import constants as C
from ..read.status import metadata_preallocated
from .guess import BUNDLE_MARKER, Guess
from .layout import METADATA_KINDS, HostKind, host_layout
from .source import ImageFile

_CHUNK = 8 << 20
SIDE_SUFFIX = ".qdebug-bundle.json"
_KEEP_GUESSES = (Guess.L1_TABLE, Guess.L2_TABLE, Guess.REFCOUNT_BLOCK)


@dataclass(frozen=True)
class BundleResult:
    path: str
    metadata_bytes: int
    removed_data_clusters: int
    zeroed_compressed_clusters: int
    removed_unreferenced_clusters: int
    kept_unreferenced_clusters: int
    marker: str  # "header extension" or the side file's path
    info: dict


def bundle_info(header, path: str | None = None) -> dict | None:
    """The bundle record of an image (None: not a bundle): its header extension, or the side
    file beside `path`."""
    from ..read.status import bundle_record

    return bundle_record(header, path)


def _prealloc(path: str) -> bool:
    try:
        with Image(path) as img:
            return metadata_preallocated(img)
    except QcowError:
        return False


_MAX_HOLES = 100_000


def _data_holes(src: ImageFile, r, cs: int) -> list[list[int]] | None:
    """[start, end) host ranges inside the original's data clusters that are holes in its file:
    where QEMU takes the image for metadata-preallocated, `map` reports them as zeros, so the
    bundle (whose data clusters are all holes) must remember them. None: too many to keep."""
    out: list[list[int]] = []
    for i in np.flatnonzero(r.kind == HostKind.DATA).tolist():
        a, b = int(r.start[i]) * cs, min(src.file_size, int(r.start[i] + r.count[i]) * cs)
        pos = a
        while pos < b:
            try:
                hole = os.lseek(src.fd, pos, os.SEEK_HOLE)
            except OSError:
                break
            if hole >= b:
                break
            try:
                data = os.lseek(src.fd, hole, os.SEEK_DATA)
            except OSError:
                data = b
            end = min(data, b)
            if out and out[-1][1] == hole:
                out[-1][1] = end
            else:
                out.append([hole, end])
            if len(out) > _MAX_HOLES:
                return None
            pos = end
    return out


def make_bundle(image: str, output: str) -> BundleResult:
    real = os.path.realpath(output)
    if real == os.path.realpath(image):
        raise QcowError(f"{output}: is the image itself; refusing to write it")
    if os.path.isdir(output):
        raise QcowError(f"{output}: is a directory")
    lay = host_layout(image)
    src = ImageFile.open(image)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", suffix=".qdebug-bundle",
                               dir=os.path.dirname(os.path.abspath(output)))
    try:
        cs = lay.cluster_size
        ftruncate(fd, src.file_size, output)
        r = lay.runs
        meta = np.isin(r.kind, list(METADATA_KINDS) + [HostKind.BITMAP_DATA])
        if (r.kind == HostKind.OVERLAP).any():  # an overlap with a metadata owner is that metadata
            for i in np.flatnonzero(r.kind == HostKind.OVERLAP).tolist():
                kinds = {o.kind for c in range(int(r.start[i]), int(r.start[i] + r.count[i])) for o in lay.owners(c)}
                meta[i] = bool(kinds - {"data", "compressed"})
        unref = (r.kind == HostKind.FREE) | (r.kind == HostKind.LEAKED)
        keep = meta | (unref & np.isin(r.guess, _KEEP_GUESSES))
        mark = unref & (r.guess == Guess.DATA)
        nbytes = 0
        for i in np.flatnonzero(keep).tolist():
            a, b = int(r.start[i]) * cs, min(src.file_size, int(r.start[i] + r.count[i]) * cs)
            for p in range(a, b, _CHUNK):
                data = src.pread(p, min(_CHUNK, b - p))
                if any(data):
                    pwrite_all(fd, data, p, output, "write the bundle,")
                nbytes += len(data)
        marker = BUNDLE_MARKER + bytes(512 - len(BUNDLE_MARKER))
        for i in np.flatnonzero(mark).tolist():
            for c in range(int(r.start[i]), int(r.start[i] + r.count[i])):
                pwrite_all(fd, marker[:max(0, min(512, src.file_size - c * cs))], c * cs, output, "write the bundle,")
        count = lambda m: int(r.count[m].sum())  # noqa: E731
        info = {"qdebug-bundle": 1, "source": os.path.basename(image), "source-size": src.file_size,
                "made-by": f"qdebug {__import__('qdebug').__version__}",
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "metadata-preallocated": _prealloc(image), "data-holes": _data_holes(src, r, cs),
                "removed": {"data-clusters": count(r.kind == HostKind.DATA),
                            "compressed-clusters": count(r.kind == HostKind.COMPRESSED),
                            "unreferenced-clusters": count(mark)}}
        where = _mark(fd, output, src, info)
        fsync(fd, output)
        os.close(fd)
        fd = -1
        os.replace(tmp, output)
        side = output + SIDE_SUFFIX
        if where == "side file":
            with open(side, "w") as f:
                json.dump(info, f, indent=1)
            where = side
        return BundleResult(output, nbytes, info["removed"]["data-clusters"], info["removed"]["compressed-clusters"],
                            count(mark), count(unref & np.isin(r.guess, _KEEP_GUESSES)), where, info)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)
        raise
    finally:
        src.close()


def _mark(fd: int, path: str, src: ImageFile, info: dict) -> str:
    """Put the record into cluster 0 as a header extension; "side file" when it does not fit."""
    h = src.header
    if not src.reading.extensions_known or h.version < 3 or bundle_info(h) is not None:
        return "side file"
    cs = h.cluster_size
    head = src.pread(0, cs)
    end = h.header_length
    for e in h.extensions:
        end = max(end, e.offset + 8 + len(e.data) + (-len(e.data) % 8))
    body = json.dumps(info, separators=(",", ":")).encode()
    ext = struct.pack(">II", C.QDEBUG_EXT_MAGIC_BUNDLE, len(body)) + body + bytes(-len(body) % 8)
    bfo, bfs = h.backing_file_offset, h.backing_file_size
    tail_end = bfo + bfs if bfo else end + 8
    if tail_end + len(ext) > cs or (bfo and bfo < end):
        return "side file"
    new = bytearray(head[:end] + ext + head[end:tail_end])
    if bfo:
        new[8:16] = struct.pack(">Q", bfo + len(ext))
    pwrite_all(fd, bytes(new) + bytes(tail_end + len(ext) - len(new)), 0, path, "write the bundle's header,")
    return "header extension"
