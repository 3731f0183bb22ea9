"""Host I/O against QEMU's own trace events: for every measured scenario (and a few more), the
bytes qdebug writes for data and COW cover exactly the host ranges QEMU writes (data writes plus
write-zeroes), and QEMU takes its zero-COW shortcut (qcow2_skip_cow) exactly where the plan says
skip_cow. Metadata writes are left out: QEMU caches them until close."""

from __future__ import annotations

import re
import subprocess

import pytest

from qdebug.engine.file.image import open_image
from qdebug.engine.format import constants as C
from tests.engine.harness import qdebug_process, qemu_process
from tests.engine.write.test_vectors import _ALL, _make, _setup
from tests.qemu import QEMU_IO

pytestmark = pytest.mark.qemu

_EV = re.compile(r"^(bdrv_co_pwritev_part|qcow2_skip_cow) (?:bs|co) (0x[0-9a-f]+) offset (\S+) (?:bytes|nb_clusters) (\d+)")


def _union(ranges) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _metadata_clusters(path: str) -> set[int]:
    with open_image(path) as img:
        h = img.header
        cb = img.cluster_bits
        out = {0}
        out |= {(h.refcount_table_offset >> cb) + i for i in range(h.refcount_table_clusters)}
        out |= {(h.l1_table_offset >> cb) + i for i in range(-(-h.l1_size * 8 // img.cluster_size))}
        out |= {(int(e) & C.REFT_OFFSET_MASK) >> cb for e in img.reftable if int(e)}
        out |= {(int(e) & C.L1E_OFFSET_MASK) >> cb for e in img.l1 if int(e) & C.L1E_OFFSET_MASK}
        for snap in img.snapshots():
            l1 = img.u64_view(snap.l1_table_offset, snap.l1_size, "snapshot L1")
            out |= {(int(e) & C.L1E_OFFSET_MASK) >> cb for e in l1 if int(e) & C.L1E_OFFSET_MASK}
        return out


def qemu_host_writes(path: str, cmd: str) -> tuple[list[tuple[int, int]], int]:
    """(file-level write ranges, number of qcow2_skip_cow events) of one traced qemu-io command."""
    p = subprocess.run([QEMU_IO, "-f", "qcow2", "-t", "writeback", "-T", "qcow2_skip_cow", "-T", "bdrv_co_pwritev_part",
                        "-c", cmd, path], capture_output=True, text=True)
    top = None
    writes, skips = [], 0
    for line in (p.stderr + p.stdout).splitlines():
        m = _EV.match(line)
        if not m:
            continue
        ev, ptr, off, n = m.groups()
        if ev == "qcow2_skip_cow":
            skips += 1
        elif top is None:
            top = ptr
        elif ptr != top:
            writes.append((int(off), int(off) + int(n)))
    return writes, skips


EXTRA = [  # (title, backing, setup, command) beyond the vector file
    ("multi-cluster new", None, [], "write -P 1 10k 200k"),
    ("in place then new, merged", None, ["write -P 1 0 2k"], "write -P 2 62k 6k"),
    ("zero fallback over compressed", None, ["write -c -P 1 0 64k"], "write -z 1k 2k"),
    ("big unaligned raw backing", "base.raw", [], "write -P 3 5000 150000"),
    ("zero with unaligned head", "base.raw", ["write -P 1 0 64k"], "write -z 1567 100000"),
]


def _scenarios():
    for v in _ALL:
        if not any(s.startswith("!python3") for s in v["setup"]):
            yield pytest.param(v, id=v["title"].split()[0])
    for title, backing, setup, cmd in EXTRA:
        yield pytest.param({"title": title, "backing": backing, "setup": setup, "cmd": cmd, "img": "x.qcow2"},
                           id=title.replace(" ", "-"))


@pytest.mark.parametrize("vec", list(_scenarios()))
def test_cow_host_ranges_match_qemu_trace(qemu, tmp_path, vec):
    (tmp_path / "q").mkdir()
    ours, ref = _make(tmp_path, vec), _make(tmp_path / "q", vec)
    _setup(ours, vec["setup"], qdebug_process)
    _setup(ref, vec["setup"], lambda p, c: qemu_process(p, c))
    (result,) = qdebug_process(ours, [vec["cmd"]])
    qemu_writes, skips = qemu_host_writes(ref, vec["cmd"])
    with open_image(ref) as img:
        cb = img.cluster_bits
    meta = _metadata_clusters(ref) | {w.offset >> cb for w in result.plan.host_writes if w.what not in ("data", "cow")}

    def is_meta(s: int, e: int) -> bool:
        return all(c in meta for c in range(s >> cb, ((e - 1) >> cb) + 1))

    theirs = _union((s, e) for s, e in qemu_writes if not is_meta(s, e))
    mine = _union((w.offset, w.offset + w.length) for w in result.plan.host_writes if w.what in ("data", "cow"))
    assert mine == theirs, f"{vec['cmd']}: qdebug {[(hex(s), hex(e)) for s, e in mine]} vs QEMU {[(hex(s), hex(e)) for s, e in theirs]}"
    planned_skips = sum(m.skip_cow for r in result.plan.requests for m in r.metas)
    assert planned_skips == skips, f"{vec['cmd']}: plan says skip_cow {planned_skips}x, QEMU traced {skips}"
