"""The salvage damage corpus: images with known guest data (made by qemu-io, read back as the
truth with `qemu-img convert` before any damage), one damage each, and for every damage the
guest ranges it may destroy (salvage may call no more than that lost).

`python -m tests.engine.forensics.corpus` prints the qemu-img convert vs salvage table for the
README (it runs every case, like the tests do)."""

from __future__ import annotations

import os
import random
import struct
import subprocess
from dataclasses import dataclass

from qdebug.engine.file.image import open_image
from qdebug.engine.format import constants as C
from tests.qemu import QEMU_IMG, create, qemu_img, qemu_io

SHAPES = {
    # name: (cluster size, virtual size, extended L2, backing, snapshot)
    "ext16k": ("16k", 64 << 20, True, None, False),
    "ext64k-snap": ("64k", 32 << 20, True, None, True),
    "ext2M": ("2M", 64 << 20, True, None, False),
    "std64k-rawbacking": ("64k", 32 << 20, False, "raw", False),
    "ext16k-qcowbacking": ("16k", 32 << 20, True, "qcow2", False),
}


def _size(s: str) -> int:
    return int(s[:-1]) << (10 if s[-1] == "k" else 20)


def _writes(rng: random.Random, size: int, cs: int, n: int, compressed: bool, touched: set | None = None) -> list[str]:
    """Random writes (data, zeros, compressed clusters); a compressed write only goes to a cluster
    nothing touched yet (QEMU refuses it over an allocated one)."""
    touched = set() if touched is None else touched
    cmds = []
    for _ in range(n):
        kind = rng.random()
        if compressed and kind < 0.08:
            c = rng.randrange(size // cs)
            if c not in touched:
                cmds.append(f"write -c -P {rng.randrange(1, 255)} {c * cs} {cs}")
                touched.add(c)
            continue
        off = rng.randrange(size // 512) * 512
        if kind < 0.15:
            ln = min(rng.choice((512, 4096, cs)), size - off)
            cmds.append(f"write -z {off} {ln}")
        else:
            ln = min(rng.choice((512, 4096, 12288, cs, 2 * cs, 70000 // 512 * 512)), size - off)
            cmds.append(f"write -P {rng.randrange(1, 255)} {off} {ln}")
        touched.update(range(off // cs, (off + ln - 1) // cs + 1))
    return cmds


def make(tmp: str, shape: str, seed: int = 1) -> str:
    """The shape's image in `tmp` (with its backing file), guest data written; returns its path."""
    cs_s, size, ext, backing, snap = SHAPES[shape]
    cs = _size(cs_s)
    rng = random.Random(seed)
    path = os.path.join(tmp, "disk.qcow2")
    b = None
    if backing == "raw":
        b = os.path.join(tmp, "base.raw")
        with open(b, "wb") as f:
            f.write(bytes(rng.randrange(256) for _ in range(4096)) * (size // 4096 * 3 // 4))  # shorter than the disk
    elif backing == "qcow2":
        b = os.path.join(tmp, "base.qcow2")
        create(b, size, cluster_size=cs_s, extended_l2=ext)
        qemu_io(b, *_writes(rng, size, cs, 60, False))
    create(path, size, cluster_size=cs_s, extended_l2=ext, backing=os.path.basename(b) if b else None,
           backing_fmt=backing)
    n = 40 if cs >= 1 << 20 else 200
    touched: set = set()
    qemu_io(path, *_writes(rng, size, cs, n, True, touched))
    if snap:
        qemu_img("snapshot", "-c", "s1", path)
        qemu_io(path, *_writes(rng, size, cs, 40, True, touched))
    return path


def truth(path: str, out: str) -> bytes:
    qemu_img("convert", "-f", "qcow2", "-O", "raw", path, out)
    with open(out, "rb") as f:
        return f.read()


# ---- looking at the image (before damage) ------------------------------------------------------
@dataclass
class Geo:
    cs: int
    size: int
    span: int  # guest bytes per L1 entry
    l1_offset: int
    l1: list[int]
    reftable: int
    file_size: int
    entry_size: int


def geo(path: str) -> Geo:
    with open_image(path) as img:
        h = img.header
        return Geo(h.cluster_size, img.size, h.l2_entries * h.cluster_size, h.l1_table_offset,
                   [int(e) for e in img.l1], h.refcount_table_offset, img.file_size, h.l2_entry_size)


def guest_map(path: str) -> list[dict]:
    import json

    return json.loads(qemu_img("map", "--output=json", "-f", "qcow2", path).stdout)


def _w(path, off, data):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def _r(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def _slot_of_host(g: Geo, path: str, pick: int = 0) -> int:
    used = [i for i, e in enumerate(g.l1) if e & C.L1E_OFFSET_MASK]
    return used[pick % len(used)]


def _top_data_ranges(path: str, pred) -> list[tuple[int, int]]:
    """Guest ranges the top layer's data (or compressed) clusters serve, where pred(host offset)."""
    out = []
    for e in guest_map(path):
        if e["depth"] == 0 and e["data"] and pred(e.get("offset")):
            out.append((e["start"], e["start"] + e["length"]))
    return out


# ---- damages: each returns the guest ranges it may destroy, or None (not applicable) ------------
def reftable_zeroed(path, g):
    _w(path, g.reftable, bytes(g.cs))
    return []


def reftable_past_eof(path, g):
    _w(path, 48, struct.pack(">Q", (g.file_size // g.cs + 100) * g.cs))
    return []


def refblock_garbage(path, g):
    rb = struct.unpack(">Q", _r(path, g.reftable, 8))[0]
    _w(path, rb, random.Random(7).randbytes(g.cs))
    return []


def l1_offset_unaligned(path, g):
    _w(path, 40, struct.pack(">Q", g.l1_offset + 512))
    return []


def l1_offset_past_eof(path, g):
    _w(path, 40, struct.pack(">Q", (g.file_size // g.cs + 7) * g.cs))
    return []


def l1_entry_zeroed(path, g):
    slot = _slot_of_host(g, path, 1)
    _w(path, g.l1_offset + 8 * slot, bytes(8))
    return []  # the orphaned table is placed back (refcounts intact)


def l1_entry_garbage(path, g):
    slot = _slot_of_host(g, path, 0)
    _w(path, g.l1_offset + 8 * slot, struct.pack(">Q", 0x7F00000000000123))
    return [(slot * g.span, min(g.size, (slot + 1) * g.span))]


def _l2(g, path, pick=0):
    slot = _slot_of_host(g, path, pick)
    return slot, g.l1[slot] & C.L1E_OFFSET_MASK


def l2_zeroed(path, g):
    slot, off = _l2(g, path)
    _w(path, off, bytes(g.cs))
    return [(slot * g.span, min(g.size, (slot + 1) * g.span))]


def l2_garbage(path, g):
    slot, off = _l2(g, path)
    _w(path, off, random.Random(3).randbytes(g.cs))
    return [(slot * g.span, min(g.size, (slot + 1) * g.span))]


def l2_refblock(path, g):
    slot, off = _l2(g, path)
    rb = struct.unpack(">Q", _r(path, g.reftable, 8))[0]
    _w(path, off, _r(path, rb, g.cs))
    return [(slot * g.span, min(g.size, (slot + 1) * g.span))]


def l2_other_table(path, g):
    used = [i for i, e in enumerate(g.l1) if e & C.L1E_OFFSET_MASK]
    if len(used) < 2:
        return None
    a, b = used[0], used[1]
    _w(path, g.l1[a] & C.L1E_OFFSET_MASK, _r(path, g.l1[b] & C.L1E_OFFSET_MASK, g.cs))
    return [(a * g.span, min(g.size, (a + 1) * g.span)), (b * g.span, min(g.size, (b + 1) * g.span))]


def _normal_entries(path, g):
    """(entry file offset, guest cluster, host) of plain data entries of the active L1."""
    out = []
    with open_image(path) as img:
        for i, e in enumerate(img.l1):
            l2 = int(e) & C.L1E_OFFSET_MASK
            if not l2:
                continue
            w0, _bm = img.l2_table(l2)
            for j, w in enumerate(w0.tolist()):
                if w & C.L2E_OFFSET_MASK and not w & C.QCOW_OFLAG_COMPRESSED:
                    out.append((l2 + j * g.entry_size, i * img.header.l2_entries + j, w & C.L2E_OFFSET_MASK))
    return out


def double_reference(path, g):
    """Entry B re-pointed at entry A's data cluster: B's old cluster is leaked."""
    e = _normal_entries(path, g)
    if len(e) < 2:
        return None
    (ea, ga, ha), (eb, gb, hb) = e[0], e[len(e) // 2]
    old = struct.unpack(">Q", _r(path, eb, 8))[0]
    _w(path, eb, struct.pack(">Q", (old & ~C.L2E_OFFSET_MASK) | ha))
    return [(ga * g.cs, (ga + 1) * g.cs), (gb * g.cs, (gb + 1) * g.cs)]


def data_into_l2_table(path, g):
    e = _normal_entries(path, g)
    slot, off = _l2(g, path)
    eb, gb, hb = e[-1]
    old = struct.unpack(">Q", _r(path, eb, 8))[0]
    _w(path, eb, struct.pack(">Q", (old & ~C.L2E_OFFSET_MASK) | off))
    return [(gb * g.cs, (gb + 1) * g.cs)]


def data_past_eof(path, g):
    e = _normal_entries(path, g)
    eb, gb, hb = e[0]
    old = struct.unpack(">Q", _r(path, eb, 8))[0]
    _w(path, eb, struct.pack(">Q", (old & ~C.L2E_OFFSET_MASK) | ((g.file_size // g.cs + 50) * g.cs)))
    return [(gb * g.cs, (gb + 1) * g.cs)]


def _truncate(path, g, frac_num, frac_den):
    new = g.file_size * frac_num // frac_den
    lost = []
    for e in guest_map(path):
        if e["depth"] != 0 or not e["data"]:
            continue
        s, n, off = e["start"], e["length"], e.get("offset")
        if off is None:  # compressed: somewhere in the file
            lost.append((s, s + n))
        elif off + n > new:
            lost.append((s + max(0, new - off), s + n))
    for i, e in enumerate(g.l1):  # L2 tables cut off: their whole range
        off = e & C.L1E_OFFSET_MASK
        if off and off + g.cs > new:
            lost.append((i * g.span, min(g.size, (i + 1) * g.span)))
    if g.l1_offset + len(g.l1) * 8 > new:
        lost.append((0, g.size))
    os.truncate(path, new)
    return lost


def truncated_3_4(path, g):
    return _truncate(path, g, 3, 4)


def truncated_1_2(path, g):
    return _truncate(path, g, 1, 2)


def compressed_broken(path, g):
    comp = []
    with open_image(path) as img:
        for i, e in enumerate(img.l1):
            l2 = int(e) & C.L1E_OFFSET_MASK
            if l2:
                w0, _bm = img.l2_table(l2)
                comp += [(i * img.header.l2_entries + j, w) for j, w in enumerate(w0.tolist())
                         if w & C.QCOW_OFLAG_COMPRESSED]
    if not comp:
        return None
    x = 62 - (g.cs.bit_length() - 1 - 8)
    gc, w = comp[0]
    coff = w & ((1 << x) - 1)
    _w(path, coff, b"\xff" * 64)
    # every compressed cluster whose stream starts in the 64 bytes (streams are packed byte-wise)
    return [(c * g.cs, (c + 1) * g.cs) for c, w in comp if coff <= (w & ((1 << x) - 1)) < coff + 64]


def backing_missing(path, g):
    with open_image(path) as img:
        name = img.header.backing_file
    if not name:
        return None
    os.unlink(os.path.join(os.path.dirname(path), name))
    # what the backing file served, and past its end (without it, its size is unknown too)
    return [(e["start"], e["start"] + e["length"]) for e in guest_map_cache[path]
            if e["depth"] > 0 or not e["present"]]


def extension_area_garbage(path, g):
    with open_image(path) as img:
        h = img.header
        start = h.header_length
        end = h.backing_file_offset or 4096
    _w(path, start, b"\xee" * (end - start))
    return []


DAMAGES = {f.__name__: f for f in (
    reftable_zeroed, reftable_past_eof, refblock_garbage, l1_offset_unaligned, l1_offset_past_eof, l1_entry_zeroed,
    l1_entry_garbage, l2_zeroed, l2_garbage, l2_refblock, l2_other_table, double_reference, data_into_l2_table,
    data_past_eof, truncated_3_4, truncated_1_2, compressed_broken, backing_missing, extension_area_garbage)}
guest_map_cache: dict[str, list[dict]] = {}


def damage(path: str, name: str):
    """Apply damage `name`; the guest ranges it may destroy, or None (not applicable)."""
    guest_map_cache[path] = guest_map(path)
    return DAMAGES[name](path, geo(path))


def qemu_convert(path: str, out: str, want: bytes) -> tuple[str, int]:
    """('right' | 'failed' | 'wrong', wrong bytes) of qemu-img convert on the damaged image."""
    p = subprocess.run([QEMU_IMG, "convert", "-U", "-f", "qcow2", "-O", "raw", path, out], capture_output=True)
    if p.returncode:
        return "failed", 0
    with open(out, "rb") as f:
        got = f.read()
    if got == want:
        return "right", 0
    import numpy as np

    a = np.frombuffer(got.ljust(len(want), b"\0")[:len(want)], np.uint8)
    return "wrong", int((a != np.frombuffer(want, np.uint8)).sum())


def table(tmp: str) -> str:
    """Every shape x damage: qemu-img convert's outcome next to salvage's, as a markdown table."""
    from qdebug.engine.forensics.salvage_run import salvage

    rows = ["| image | damage | qemu-img convert -O raw | qdebug salvage: recovered / zero / lost (orphaned) |",
            "|---|---|---|---|"]
    counts = {"right": 0, "failed": 0, "wrong": 0}
    for shape in SHAPES:
        base = os.path.join(tmp, shape)
        os.makedirs(base)
        path = make(base, shape)
        want = truth(path, os.path.join(base, "truth.raw"))
        for name in DAMAGES:
            d = os.path.join(tmp, f"{shape}-{name}")
            import shutil

            shutil.copytree(base, d)
            p = os.path.join(d, "disk.qcow2")
            if damage(p, name) is None:
                continue
            q, wrong = qemu_convert(p, os.path.join(d, "qemu.raw"), want)
            counts[q] += 1
            res = salvage(p, os.path.join(d, "out.raw"))
            t = res.totals()
            qtext = {"right": "right data", "failed": "fails (exit 1)",
                     "wrong": f"**silently wrong**: {wrong} bytes differ, exit 0"}[q]
            mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
            orphan = f" ({res.evidence})" if res.evidence else ""
            rows.append(f"| {shape} | {name.replace('_', ' ')} | {qtext} | {mib(t['recovered'])} / "
                        f"{mib(t['zero'])} / {mib(t['lost'])}{orphan} |")
    rows.append("")
    rows.append(f"qemu-img convert: {counts['right']} right, {counts['failed']} failed, {counts['wrong']} "
                "silently wrong. salvage: every recovered or zero byte equals the original (tested).")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(table(tmp))
