"""QEMU's own accounting of what each command of a trace costs: the oracle of `qdebug stats`.

One qemu-io process (`-t writethrough`, so every write ends with QEMU writing its dirty metadata)
runs the trace one command at a time: the oracle sends a command, waits for qemu-io's next prompt,
and reads the image file's refcounts, L1 table and refcount table with its own small parser (no
qdebug code), so every command has an exact before and after. A `read 0 0` before each command is
a marker in the trace-event stream (a zero-length read at offset 0 reaches no node below the
BlockBackend and changes nothing). Every command gets a `flush` after it: writethrough QEMU flushes
after a write or a zero write anyway (so there it writes nothing more), but writes a discard's or a
compressed write's metadata only at the next flush (see notes/stats-design.md).

Per command, from QEMU's trace events and the two image states:

* host-data-bytes: `bdrv_co_pwritev_part` on the image's file node inside this command's data
  clusters (the host ranges `qcow2_add_task ... write:` names, rounded out to clusters; compressed
  writes: every non-metadata write), without BDRV_REQ_ZERO_WRITE;
* zero-fill-bytes: the same with BDRV_REQ_ZERO_WRITE (the write-zeroes QEMU issues instead of a
  COW whose source is all zeros, `qcow2_skip_cow`; the span includes the data area);
* cow-bytes: host-data-bytes minus the guest bytes the qcow2 driver was asked to write as data
  (`qcow2_add_task ... write:` lengths: guest writes, and the zeros of write-zeroes fallbacks);
* cow-read-bytes by source: COW reads are qcow2 read tasks (`qcow2_add_task ... read:`) during a
  write: on this image's node NORMAL (type 4) -> "this image", COMPRESSED (5) -> "this image
  (compressed)"; backing depth d: read tasks of type 4/5 on a qcow2 backing node, or reads of a raw
  backing node's file; zero subclusters and unallocated ones without backing cause no I/O and are
  not observable;
* metadata-bytes by kind: writes to the image file landing in an L2 table, a refcount block, the
  L1 table, the refcount table or the header (by the image states before and after);
* allocated-clusters (data and compressed-data host clusters whose refcount went 0 -> non-zero),
  l2-tables-allocated, refcount-blocks-allocated, file-size-before / file-size-after (os.stat).
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import threading
from dataclasses import dataclass, field

import numpy as np

from tests.qemu import QEMU_IO, require_qemu


def parse_size(text: str) -> int:
    """qemu-io's numbers: decimal or 0x hex, with an optional k/M/G suffix."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    scale = units.get(text[-1].lower(), 1)
    body = text[:-1] if scale > 1 else text
    return int(body, 0) * scale

EVENTS = ("blk_co_preadv", "blk_co_pwritev", "bdrv_co_pwritev_part", "bdrv_co_preadv_part", "bdrv_open_common",
          "qcow2_add_task", "qcow2_skip_cow")
MARKER = "read 0 0"
ZERO_WRITE = 0x2
NORMAL, COMPRESSED = 4, 5  # QCow2SubclusterType

_LINE = re.compile(r"^(\w+) (.*)$")
_RW = re.compile(r"bs (\S+) offset (\d+) bytes (\d+) flags 0x([0-9a-f]+)")
_BLK = re.compile(r"blk \S+ bs (\S+) offset (\d+) bytes (\d+) flags")
_OPEN = re.compile(r'bs (\S+) filename "(.*)" flags 0x[0-9a-f]+ format_name "(.*)"')
_TASK = re.compile(r"co \S+ bs (\S+) pool \S+: (read|write): cluster_type (\d+) file_cluster_offset (\d+) "
                   r"offset (\d+) bytes (\d+)")


@dataclass
class Cost:
    """What one command cost, as QEMU's events and the image file say."""

    command: str
    guest_write_bytes: int = 0
    guest_zero_bytes: int = 0
    guest_discard_bytes: int = 0
    host_data_bytes: int = 0
    cow_bytes: int = 0
    zero_fill_bytes: int = 0
    skip_cow: int = 0
    cow_read_bytes: dict[str, int] = field(default_factory=dict)
    metadata_bytes: int = 0
    metadata: dict[str, int] = field(default_factory=dict)  # L1, L2, refblock, reftable, header, other
    allocated_clusters: int = 0
    l2_tables_allocated: int = 0
    refcount_blocks_allocated: int = 0
    file_size_before: int = 0
    file_size_after: int = 0
    host_write_end: int = 0  # the end of the furthest write to the image file (zero-fills too)
    error: str | None = None  # what qemu-io said when QEMU failed the command (e.g. `write -c` over data)


@dataclass
class ImageState:
    """The parts of a qcow2 file the oracle reads: enough to name every host cluster's role."""

    cluster_bits: int
    refcounts: np.ndarray  # per host cluster
    l2_tables: frozenset[int]  # host cluster indices
    refblocks: frozenset[int]
    l1_clusters: frozenset[int]
    reftable_clusters: frozenset[int]
    file_size: int


def read_state(path: str) -> ImageState:
    """An independent reading of a qcow2 v2/v3 file (the spec's header, L1 and refcount layout)."""
    with open(path, "rb") as f:
        data = f.read()
    (cluster_bits,) = struct.unpack_from(">I", data, 20)
    l1_size, l1_off, rt_off, rt_clusters = struct.unpack_from(">IQQI", data, 36)
    version = struct.unpack_from(">I", data, 4)[0]
    order = struct.unpack_from(">I", data, 96)[0] if version >= 3 else 4
    cs = 1 << cluster_bits
    mask = 0x00FFFFFFFFFFFE00
    per_block = cs * 8 >> order
    reftable = np.frombuffer(data, ">u8", rt_clusters * cs // 8, rt_off)
    refblocks = [int(e) & ~(cs - 1) & mask for e in reftable]
    while refblocks and not refblocks[-1]:
        refblocks.pop()
    counts = np.zeros(len(refblocks) * per_block, dtype=np.uint64)
    for i, off in enumerate(refblocks):
        if not off:
            continue
        block = np.frombuffer(data, np.uint8, cs, off)
        bits = 1 << order
        if bits >= 8:
            vals = np.frombuffer(block.tobytes(), f">u{bits // 8}").astype(np.uint64)
        else:
            vals = np.unpackbits(block, bitorder="little").reshape(-1, bits)
            vals = (vals * (1 << np.arange(bits))).sum(axis=1).astype(np.uint64)
            # sub-byte refcounts: the spec packs them from the least significant bit of each byte
        counts[i * per_block:(i + 1) * per_block] = vals
    l1 = np.frombuffer(data, ">u8", l1_size, l1_off) if l1_size else np.zeros(0, ">u8")
    l2 = frozenset(int(e & mask) >> cluster_bits for e in l1 if int(e) & mask)
    return ImageState(cluster_bits, counts, l2, frozenset(o >> cluster_bits for o in refblocks if o),
                      frozenset(range(l1_off >> cluster_bits, (l1_off + max(8 * l1_size, 1) - 1 >> cluster_bits) + 1)),
                      frozenset(range(rt_off >> cluster_bits, (rt_off >> cluster_bits) + rt_clusters)), len(data))


class _QemuIO:
    """One interactive qemu-io process: commands in, prompts out, trace events collected."""

    def __init__(self, image: str, cache: str):
        require_qemu()
        args = [QEMU_IO, "-f", "qcow2", "-t", cache]
        for ev in EVENTS:
            args += ["-T", ev]
        self.p = subprocess.Popen([*args, image], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, bufsize=0)
        self.err: list[bytes] = []
        self._reader = threading.Thread(target=lambda: self.err.append(self.p.stderr.read()), daemon=True)
        self._reader.start()
        self.out = b""
        self.said: list[str] = []
        self._prompt()

    def _prompt(self) -> None:
        while b"qemu-io> " not in self.out:
            chunk = os.read(self.p.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"qemu-io ended: {self.out.decode()} {b''.join(self.err).decode()}")
            self.out += chunk
        said, _, self.out = self.out.partition(b"qemu-io> ")
        self.said.append(said.decode())

    def run(self, command: str) -> str:
        self.p.stdin.write(command.encode() + b"\n")
        self._prompt()
        return self.said[-1]

    def close(self) -> str:
        self.p.stdin.write(b"quit\n")
        self.p.stdin.close()
        self.p.wait()
        self._reader.join()
        return b"".join(self.err).decode()


def qemu_costs(image: str, commands: list[str], chain: list[tuple[str, str]] = (), cache: str = "writethrough"
               ) -> list[Cost]:
    """Cost of each of `commands` (qemu-io syntax) run in order in one qemu-io on `image`, whose
    backing chain below it is `chain` ([(file name, format)], depth 1 first)."""
    image = os.path.abspath(image)
    q = _QemuIO(image, cache)
    states = [read_state(image)]
    errors: list[str | None] = []
    try:
        for cmd in commands:
            q.run(MARKER)
            said = q.run(cmd)
            errors.append(next((line.strip() for line in said.splitlines()
                                if "failed" in line or "Pattern verification" in line), None))
            q.run("flush")  # discards and compressed writes leave writethrough's metadata dirty
            states.append(read_state(image))
        q.run(MARKER)
    finally:
        events = q.close()
    costs = _account(events, image, list(chain), commands, states)
    for c, e in zip(costs, errors):
        c.error = e
    return costs


def _account(events: str, image: str, chain: list[tuple[str, str]], commands: list[str],
             states: list[ImageState]) -> list[Cost]:
    nodes: dict[str, tuple[str, str]] = {}  # bs -> (file name, format)
    windows: list[list[tuple[str, str]]] = []
    top = None
    for line in events.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        name, rest = m.groups()
        if name == "bdrv_open_common":
            o = _OPEN.match(rest)
            nodes[o[1]] = (o[2], o[3])
        elif name == "blk_co_preadv":
            b = _BLK.match(rest)
            if b[2] == "0" and b[3] == "0":  # the marker
                top = b[1]
                windows.append([])
                continue
        if windows:
            windows[-1].append((name, rest))
    assert len(windows) == len(commands) + 1, f"{len(windows)} markers for {len(commands)} commands"
    base = os.path.basename
    depth_of = {base(f): d for d, (f, _fmt) in enumerate(chain, 1)}
    top_file = next(bs for bs, (f, fmt) in nodes.items() if fmt == "file" and base(f) == base(image))
    roles: dict[str, tuple[str, int]] = {}  # bs -> ('qcow2' | 'raw-file', depth) for backing nodes
    for bs, (f, fmt) in nodes.items():
        d = depth_of.get(base(f))
        if d is not None:
            kind = dict(chain)[next(c for c, _ in chain if base(c) == base(f))]
            if kind == "qcow2" and fmt == "qcow2":
                roles[bs] = ("qcow2", d)
            elif kind == "raw" and fmt == "file":
                roles[bs] = ("raw-file", d)
    return [_cost(cmd, win, top, top_file, roles, states[i], states[i + 1])
            for i, (cmd, win) in enumerate(zip(commands, windows))]


def _cost(cmd: str, window: list[tuple[str, str]], top: str, top_file: str, roles: dict[str, tuple[str, int]],
          before: ImageState, after: ImageState) -> Cost:
    words = cmd.split()
    op, length = words[0], parse_size(words[-1]) if words[0] in ("write", "discard", "read") else 0
    c = Cost(cmd, file_size_before=before.file_size, file_size_after=after.file_size)
    compressed = op == "write" and "-c" in words
    if op == "write":
        if "-z" in words:
            c.guest_zero_bytes = length
        else:
            c.guest_write_bytes = length
    elif op == "discard":
        c.guest_discard_bytes = length
    cb = before.cluster_bits
    data_clusters: set[int] = set()
    driver_data = 0
    for name, rest in window:
        if name == "qcow2_add_task":
            t = _TASK.match(rest)
            bs, rw, ctype, host, off, n = t[1], t[2], int(t[3]), int(t[4]), int(t[5]), int(t[6])
            if rw == "write" and bs == top:
                driver_data += n
                if not compressed:
                    data_clusters.update(range(host >> cb, ((host + n - 1) >> cb) + 1))
            elif rw == "read" and op == "write" and ctype in (NORMAL, COMPRESSED):
                if bs == top:
                    key = "this image" if ctype == NORMAL else "this image (compressed)"
                elif roles.get(bs, ("", 0))[0] == "qcow2":
                    key = f"backing depth {roles[bs][1]}"
                else:
                    continue
                c.cow_read_bytes[key] = c.cow_read_bytes.get(key, 0) + n
        elif name == "qcow2_skip_cow":
            c.skip_cow += 1
        elif name == "bdrv_co_preadv_part" and op == "write":
            r = _RW.match(rest)
            role = roles.get(r[1])
            if role and role[0] == "raw-file":
                key = f"backing depth {role[1]}"
                c.cow_read_bytes[key] = c.cow_read_bytes.get(key, 0) + int(r[3])
    meta_sets = (("L2", before.l2_tables | after.l2_tables), ("refblock", before.refblocks | after.refblocks),
                 ("L1", before.l1_clusters | after.l1_clusters),
                 ("reftable", before.reftable_clusters | after.reftable_clusters), ("header", frozenset({0})))
    for name, rest in window:
        if name != "bdrv_co_pwritev_part":
            continue
        r = _RW.match(rest)
        if r[1] != top_file:
            continue
        off, n, flags = int(r[2]), int(r[3]), int(r[4], 16)
        first, last = off >> cb, (off + n - 1) >> cb
        c.host_write_end = max(c.host_write_end, off + n)
        if flags & ZERO_WRITE:
            c.zero_fill_bytes += n
            continue
        kind = next((k for k, s in meta_sets if first in s), None)
        if kind is None and (compressed or first in data_clusters):
            assert compressed or last in data_clusters, f"{cmd}: host write [{off}, +{n}) leaves the data clusters"
            c.host_data_bytes += n
        else:
            kind = kind or "other"
            c.metadata[kind] = c.metadata.get(kind, 0) + n
            c.metadata_bytes += n
    c.cow_bytes = 0 if compressed else c.host_data_bytes - driver_data
    # clusters allocated: refcount 0 -> non-zero; their role from the state after
    n = max(len(before.refcounts), len(after.refcounts))
    old = np.zeros(n, np.uint64)
    new = np.zeros(n, np.uint64)
    old[:len(before.refcounts)] = before.refcounts
    new[:len(after.refcounts)] = after.refcounts
    fresh = set(np.flatnonzero((old == 0) & (new > 0)).tolist())
    c.l2_tables_allocated = len(fresh & after.l2_tables)
    c.refcount_blocks_allocated = len(fresh & after.refblocks)
    c.allocated_clusters = len(fresh - after.l2_tables - after.refblocks - after.l1_clusters - after.reftable_clusters)
    return c


# ---- the cases both the oracle's tests and qdebug's cost tests run ---------------------------------
def raw_file(path, size: int, byte: int = 0xEE) -> str:
    """A raw file of `size` bytes of `byte` (a backing file full of data)."""
    with open(path, "wb") as f:
        f.write(bytes([byte]) * size)
    return str(path)


def analytic_case(tmp_path, cs: int, ext: bool, writes: int, neighbours: int
                  ) -> tuple[str, str, int, list[int], list[str]]:
    """Aligned 4 KiB writes at random places (and right after `neighbours` of them) of a 32 MiB image
    over a raw backing file full of data: (image, backing file, allocation unit, 4 KiB blocks, commands)."""
    import random

    from tests.qemu import create

    size = 32 << 20
    base = raw_file(tmp_path / "base.raw", size)
    img = create(str(tmp_path / "a.qcow2"), size, cluster_size=str(cs), extended_l2=ext, backing=base,
                 backing_fmt="raw")
    rng = random.Random(cs + ext)
    blocks = rng.sample(range(size // 4096), writes)
    blocks += [b + 1 for b in blocks[:neighbours] if (b + 1) * 4096 < size and b + 1 not in blocks]
    cmds = [f"write -P 0x{i % 255 + 1:x} {b * 4096} 4k" for i, b in enumerate(blocks)]
    return img, base, cs // 32 if ext else cs, blocks, cmds
