"""`qdebug demo`: a small image, its backing file and a trace that show every interesting case.

Built with qdebug's own create and write engine (no qemu-img): a backing file with data in its
first half, an overlay prepared with a zeroed cluster, a partly allocated cluster, a full data
cluster whose L2 bitmap gets one invalid subcluster poked into it, and a trace of unaligned
writes (COW from the backing file, across two clusters), writes into zero and unallocated
subclusters, a zero write, a discard, a compressed cluster and a read check.
"""

from __future__ import annotations

import os
import struct

from .engine.file.chain import open_chain
from .engine.file.image import open_image
from .engine.write.create import create_image

SIZE = 8 << 20
INVALID_CLUSTER = 48
INVALID_SUBCLUSTER = 7

# Applied while building (the state the demo opens in).
PREPARE = [
    "write -P 0x33 1M 64k",  # cluster 16: written, then zeroed below
    "write -z 1M 64k",  # cluster 16: all subclusters zero (ZERO_ALLOC)
    "write -P 0x22 0x208000 4k",  # cluster 32: subclusters 16-17 NORMAL, the rest unallocated in an allocated cluster
    "write -P 0x44 3M 64k",  # cluster 48: a full data cluster (one of its subclusters is made invalid)
]

TRACE = """\
# qdebug demo trace (qemu-io syntax): n steps forward, p steps back
write -P 0x5a 5k 3k
write -P 0x61 61k 6k
write -P 0x62 0x100800 1k
write -P 0x63 0x20a000 2k
write -z 0x80000 128k
write -P 0x64 0x140000 64k
discard 0x140000 64k
write -c -P 0x65 0x400000 64k
read -P 0x5a 6k 2k
"""


def _run(image: str, lines: list[str]) -> None:
    from .engine.write.writer import WriteEngine
    from .trace.commands import parse_line

    with open_chain(image, writable=True) as chain:
        engine = WriteEngine(chain)
        for n, line in enumerate(lines, 1):
            cmd = parse_line(line, n)
            rec = engine.run(cmd, n)
            if rec.error:
                raise RuntimeError(f"demo: {line}: {rec.error}")


def poke_invalid(image: str, cluster: int, subcluster: int) -> None:
    """Set the zero bit of an allocated subcluster: both bits set is invalid (QEMU: EIO)."""
    img = open_image(image, writable=True)
    try:
        _w0, bitmap, l2_offset, l2_index = img.l2_entry(cluster)
        if not l2_offset:
            raise RuntimeError(f"demo: cluster {cluster} has no L2 table")
        img.pwrite(l2_offset + l2_index * 16 + 8, struct.pack(">Q", bitmap | 1 << (32 + subcluster)))
    finally:
        img.close()


def build_demo(directory: str) -> dict[str, str]:
    """Create base.qcow2, demo.qcow2 and demo.trace in `directory`; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, "base.qcow2")
    image = os.path.join(directory, "demo.qcow2")
    trace = os.path.join(directory, "demo.trace")
    create_image(base, SIZE)
    _run(base, ["write -P 0xb0 0 2M", "write -P 0xb1 2M 2M"])
    create_image(image, SIZE, backing="base.qcow2", backing_format="qcow2")
    _run(image, PREPARE)
    poke_invalid(image, INVALID_CLUSTER, INVALID_SUBCLUSTER)
    with open(trace, "w", encoding="utf-8") as f:
        f.write(TRACE)
    return {"image": image, "backing": base, "trace": trace}
