"""A seeded mutator aimed at qcow2 metadata: header fields, extensions, backing names, L1/L2
entries, refcounts, compressed clusters, snapshots, truncation.

`make_mutant(layout, seed, workdir)` is deterministic in (base image, seed), so every failure the
fuzzer reports can be rebuilt from its seed and kept as a named regression test.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import zlib

from tests.hostile.images import HEADER_FIELDS, Layout, patch

U64 = 1 << 64


def interesting(rng: random.Random, lay: Layout, width: int = 8) -> int:
    """A value an attacker would choose: edges, table offsets, past EOF, unaligned, huge."""
    cs = lay.cluster_size
    fs = lay.file_size
    pool = [0, 1, 7, 8, 104, 511, 512, cs - 1, cs, cs + 8, 2 * cs, fs - 8, fs, fs + cs, fs * 4,
            lay.l1_offset, lay.reftable_offset, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32,
            1 << 55, (1 << 56) - cs, 1 << 62, 1 << 63, U64 - 1, rng.getrandbits(width * 8),
            rng.randrange(0, max(fs, 1)), rng.randrange(0, max(fs, 1)) & ~(cs - 1)]
    pool += lay.l2_offsets[:3] + lay.refblocks[:2]
    return rng.choice(pool) % (1 << (8 * width))


# ---- mutation operators: each edits the file at `path` and returns a description ------------------
def op_header_field(rng, lay, path):
    name, off, width = rng.choice(HEADER_FIELDS)
    if name == "cluster_bits":
        v = rng.choice([0, 8, 9, 12, 16, 21, 22, 31, 32, 63, 64, 255, 1 << 31, (1 << 32) - 1])
    elif name in ("version", "refcount_order", "crypt_method", "compression_type"):
        v = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 64, 255, (1 << (8 * width)) - 1])
    elif name == "header_length":
        v = rng.choice([0, 71, 72, 100, 104, 105, 108, 112, 120, 4096, lay.cluster_size,
                        lay.cluster_size + 8, (1 << 32) - 8])
    elif name.endswith("features"):
        v = rng.choice([0, 1, 2, 4, 8, 16, 31, 32, 1 << 63, rng.getrandbits(64)])
    else:
        v = interesting(rng, lay, width)
    v %= 1 << (8 * width)
    patch(path, off, v.to_bytes(width, "big"))
    return f"header {name}=0x{v:x}"


def op_header_bytes(rng, lay, path):
    end = min(lay.file_size, lay.cluster_size, 1 << 12)
    if end <= 0:  # (an earlier mutation truncated the file to nothing)
        return "header bytes: none (empty file)"
    out = []
    for _ in range(rng.randint(1, 4)):
        off = rng.randrange(0, end)
        b = rng.randrange(256)
        patch(path, off, bytes([b]))
        out.append(f"0x{off:x}=0x{b:02x}")
    return "header bytes " + ",".join(out)


def op_extension(rng, lay, path):
    if not lay.extensions or rng.random() < 0.3:
        # A new extension where the first one (or the end marker) was.
        off = lay.extensions[0][0] if lay.extensions else lay.header_length
        etype = rng.choice([0x23852875, 0x0537BE77, 0x44415441, 0xE2792ACA, 0x6803F857, 0x12345678])
        length = rng.choice([0, 1, 15, 16, 24, 48, 100, 1 << 16, (1 << 32) - 1])
        body = rng.randbytes(min(length, 64)) if rng.random() < 0.5 else bytes(min(length, 64))
        patch(path, off, struct.pack(">II", etype, length) + body)
        return f"extension at 0x{off:x} type 0x{etype:08x} len {length}"
    off, ln = rng.choice(lay.extensions)
    what = rng.choice(["len", "type", "data", "end"])
    if what == "len":
        v = rng.choice([0, 1, 7, ln + 8, lay.cluster_size, lay.cluster_size - off, (1 << 32) - 1])
        patch(path, off + 4, struct.pack(">I", v % (1 << 32)))
        return f"extension at 0x{off:x} len={v}"
    if what == "type":
        v = rng.choice([0, 0x23852875, 0x0537BE77, 0x44415441, 0xE2792ACA, 0x6803F857, rng.getrandbits(32)])
        patch(path, off, struct.pack(">I", v))
        return f"extension at 0x{off:x} type=0x{v:08x}"
    if what == "data":
        n = max(1, min(ln, 16))
        p = off + 8 + rng.randrange(0, max(ln, 1))
        patch(path, p, rng.randbytes(n))
        return f"extension data at 0x{p:x} randomized"
    end = off + 8 + ln + (-ln % 8)
    patch(path, end, rng.randbytes(8))  # the next extension / end marker becomes garbage
    return f"extension after 0x{off:x} end marker garbled"


def op_backing(rng, lay, path):
    cs = lay.cluster_size
    name = rng.choice([b"a" * 1023, b"b" * 1024, b"json:{\"driver\":\"raw\"}", b"nbd://127.0.0.1:1/x",
                       b"file:/etc/passwd", os.path.basename(lay.path).encode(), b"missing.qcow2",
                       b"/etc/passwd", b"\xff\xfe\x00bad", b"", b"x" * 10, b"back.qcow2", b"back.raw"])
    bfo = rng.choice([cs - len(name), 512, 1024, cs - 10, cs, cs + 1, lay.header_length])
    bfo = max(bfo, 0)
    bfs = rng.choice([len(name), len(name), 1023, 1024, (1 << 32) - 1])
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(struct.pack(">QI", bfo, bfs % (1 << 32)))
    if 0 < bfo < lay.file_size:
        patch(path, bfo, name[: max(0, min(len(name), lay.file_size - bfo))])
    if rng.random() < 0.5 and lay.version == 3 and lay.extensions:
        # Drop the backing format so the chain has to probe.
        off, _ln = lay.extensions[0]
        patch(path, off, struct.pack(">I", 0x12345678))
    return f"backing name {name[:20]!r} at 0x{bfo:x} size {bfs}"


def op_l1(rng, lay, path):
    if not lay.l1_size:
        return op_header_field(rng, lay, path)
    i = rng.randrange(0, lay.l1_size) if rng.random() < 0.3 else 0
    cs = lay.cluster_size
    choices = [lay.l1_offset, lay.reftable_offset, 0, cs // 2, lay.file_size, lay.file_size + cs,
               (lay.l2_offsets or [cs])[0] + 512, 1 << 62, (1 << 63) | lay.l1_offset]
    choices += lay.refblocks + lay.l2_offsets + [x[0] & ~(cs - 1) for x in lay.compressed_data]
    v = rng.choice(choices) if rng.random() < 0.85 else interesting(rng, lay)
    if rng.random() < 0.2:
        v |= rng.choice([1, 0x1FF, 0x7F << 56, 1 << 63])
    struct_off = lay.l1_offset + 8 * i
    with open(path, "r+b") as f:
        f.seek(struct_off)
        f.write(struct.pack(">Q", v % U64))
    return f"L1[{i}]=0x{v % U64:x}"


def _l2_target(rng, lay) -> tuple[int, int]:
    """(file offset of an L2 entry, index) preferring the first entries (where the data is)."""
    l2 = rng.choice(lay.l2_offsets)
    n = lay.cluster_size // lay.l2_entry_size
    i = rng.randrange(0, min(n, 12)) if rng.random() < 0.8 else rng.randrange(0, n)
    return l2 + i * lay.l2_entry_size, i


def op_l2(rng, lay, path):
    if not lay.l2_offsets:
        return op_l1(rng, lay, path)
    off, i = _l2_target(rng, lay)
    cs, cb = lay.cluster_size, lay.cluster_bits
    x = 62 - (cb - 8)
    kind = rng.choice(["offset", "compressed", "bitmap", "both", "random"])
    w0 = bm = None
    if kind in ("offset", "both"):
        w0 = rng.choice([lay.l1_offset, lay.reftable_offset, 0, lay.file_size, lay.file_size + 16 * cs,
                         cs + 512, (1 << 55), (1 << 56) - cs] + lay.l2_offsets + lay.refblocks)
        w0 |= rng.choice([0, 1 << 63, 1, 0x1FE, 0x3F << 56])
    if kind == "compressed":
        host = rng.choice([lay.file_size - 100, lay.file_size, lay.file_size + cs, 0, 64, lay.l1_offset,
                           (1 << x) - 1] + [d[0] for d in lay.compressed_data])
        sectors = rng.choice([0, 1, 2, (1 << (cb - 8)) - 1, rng.randrange(0, 1 << (cb - 8))])
        w0 = (1 << 62) | (sectors << x) | (host & ((1 << x) - 1))
        if rng.random() < 0.2:
            w0 |= 1 << 63
    if kind in ("bitmap", "both") and lay.extended_l2:
        bm = rng.choice([0xFFFFFFFF, 0xFFFFFFFF << 32, U64 - 1, 1, 1 << 32 | 1, 1 << 63 | 1 << 31,
                         rng.getrandbits(64), 0])
    if kind == "random":
        w0 = rng.getrandbits(64)
        bm = rng.getrandbits(64) if lay.extended_l2 else None
    with open(path, "r+b") as f:
        if w0 is not None:
            f.seek(off)
            f.write(struct.pack(">Q", w0 % U64))
        if bm is not None:
            f.seek(off + 8)
            f.write(struct.pack(">Q", bm % U64))
    return f"L2 entry at 0x{off:x} (index {i}) word0={w0 if w0 is None else hex(w0)} bitmap={bm if bm is None else hex(bm)}"


def op_compressed_data(rng, lay, path):
    """Corrupt compressed data, or swap in a decompression bomb."""
    if not lay.compressed_entries:
        return op_l2(rng, lay, path)
    k = rng.randrange(len(lay.compressed_entries))
    host, nbytes = lay.compressed_data[k]
    what = rng.choice(["flip", "bomb", "short", "long"])
    cb = lay.cluster_bits
    x = 62 - (cb - 8)
    if what == "flip":
        p = host + rng.randrange(0, max(nbytes, 1))
        patch(path, p, rng.randbytes(rng.randint(1, 8)))
        return f"compressed data at 0x{p:x} flipped"
    if what == "bomb":
        zstd = _is_zstd(lay)
        payload = _bomb(zstd, 64 << 20)
        # Put the bomb at the end of the file and point the descriptor at it.
        at = lay.file_size
        patch(path, at, payload)
        sectors = min((at + len(payload) - 1) // 512 - at // 512, (1 << (cb - 8)) - 1)
        w0 = (1 << 62) | (sectors << x) | at
        patch(path, lay.compressed_entries[k], struct.pack(">Q", w0))
        return f"compressed cluster {k}: {len(payload)}-byte {'zstd' if zstd else 'deflate'} bomb at 0x{at:x}"
    zstd = _is_zstd(lay)
    size = lay.cluster_size // 2 if what == "short" else lay.cluster_size * 2
    payload = _compress(zstd, b"\x5a" * size)
    patch(path, host, payload)
    sectors = min((host + len(payload) - 1) // 512 - host // 512, (1 << (cb - 8)) - 1)
    patch(path, lay.compressed_entries[k], struct.pack(">Q", (1 << 62) | (sectors << x) | host))
    return f"compressed cluster {k} decompresses to {size} bytes"


def _is_zstd(lay: Layout) -> bool:
    with open(lay.path, "rb") as f:
        f.seek(104)
        return lay.header_length > 104 and f.read(1) == b"\x01"


def _compress(zstd: bool, data: bytes) -> bytes:
    if zstd:
        import zstandard
        return zstandard.ZstdCompressor().compress(data)
    c = zlib.compressobj(9, zlib.DEFLATED, -12)
    return c.compress(data) + c.flush()


_BOMBS: dict[bool, bytes] = {}


def _bomb(zstd: bool, size: int) -> bytes:
    if zstd not in _BOMBS:
        if zstd:
            import zstandard
            cobj = zstandard.ZstdCompressor(level=3).compressobj(size=size)
            chunk = bytes(1 << 20)
            _BOMBS[zstd] = b"".join(cobj.compress(chunk) for _ in range(size >> 20)) + cobj.flush()
        else:
            c = zlib.compressobj(9, zlib.DEFLATED, -12)
            chunk = bytes(1 << 20)
            _BOMBS[zstd] = b"".join(c.compress(chunk) for _ in range(size >> 20)) + c.flush()
    return _BOMBS[zstd]


def op_refcount(rng, lay, path):
    cs = lay.cluster_size
    if rng.random() < 0.5 or not lay.refblocks:
        i = rng.randrange(0, min(4, lay.reftable_clusters * cs // 8))
        v = rng.choice([0, lay.l1_offset, lay.reftable_offset, lay.file_size, lay.file_size + cs, 100,
                        cs + 1, U64 - 1] + lay.l2_offsets)
        with open(path, "r+b") as f:
            f.seek(lay.reftable_offset + 8 * i)
            f.write(struct.pack(">Q", v % U64))
        return f"reftable[{i}]=0x{v % U64:x}"
    rb = rng.choice(lay.refblocks)
    p = rb + rng.randrange(0, 64)
    b = rng.randbytes(rng.randint(1, 8))
    patch(path, p, b)
    return f"refcount block bytes at 0x{p:x}={b.hex()}"


def op_truncate(rng, lay, path):
    cs = lay.cluster_size
    points = [0, 1, 3, 4, 71, 72, 103, 104, lay.header_length, cs - 1, cs, lay.l1_offset,
              lay.l1_offset + 4, lay.reftable_offset + 8, lay.file_size - 1, lay.file_size - cs,
              rng.randrange(0, lay.file_size)]
    points += [x + cs // 2 for x in lay.l2_offsets] + [x for x, _n in lay.compressed_data]
    n = max(0, rng.choice(points))
    os.truncate(path, n)
    return f"truncated to {n} bytes"


def op_snapshot(rng, lay, path):
    if not lay.nb_snapshots:
        with open(path, "r+b") as f:
            f.seek(60)
            f.write(struct.pack(">IQ", rng.choice([1, 2, 65536, 65537, (1 << 32) - 1]),
                                rng.choice([0, lay.l1_offset, lay.file_size, 512, lay.cluster_size])))
        return "snapshot table invented"
    off = lay.snapshots_offset
    field_off, width = rng.choice([(0, 8), (8, 4), (12, 2), (14, 2), (32, 4), (36, 4)])
    v = interesting(rng, lay, width)
    patch(path, off + field_off, v.to_bytes(width, "big"))
    return f"snapshot 0 field +{field_off}=0x{v:x}"


def op_huge_virtual(rng, lay, path):
    """A huge virtual size with an L1 table just big enough (sparse) in a tiny file."""
    cs = lay.cluster_size
    per_l1 = (cs // lay.l2_entry_size) * cs
    l1_size = rng.choice([1 << 10, 1 << 16, 1 << 20, (1 << 22)])
    size = l1_size * per_l1
    with open(path, "r+b") as f:
        f.seek(24)
        f.write(struct.pack(">Q", size % U64))
        f.seek(36)
        f.write(struct.pack(">I", l1_size))
        f.seek(0, 2)
        if f.tell() < lay.l1_offset + 8 * l1_size:
            f.truncate(lay.l1_offset + 8 * l1_size)
    return f"virtual size 0x{size:x} with l1_size {l1_size}"


def op_random_bytes(rng, lay, path):
    targets = [lay.l1_offset, lay.reftable_offset] + lay.l2_offsets + lay.refblocks
    out = []
    for _ in range(rng.randint(1, 6)):
        p = rng.choice(targets) + rng.randrange(0, 256)
        b = rng.randrange(256)
        patch(path, p, bytes([b]))
        out.append(f"0x{p:x}=0x{b:02x}")
    return "metadata bytes " + ",".join(out)


OPS = [
    (op_header_field, 5), (op_header_bytes, 2), (op_extension, 3), (op_backing, 2), (op_l1, 4),
    (op_l2, 6), (op_compressed_data, 3), (op_refcount, 3), (op_truncate, 2), (op_snapshot, 1),
    (op_huge_virtual, 1), (op_random_bytes, 3),
]
_WEIGHTS = [w for _op, w in OPS]


def make_mutant(lay: Layout, seed: int, workdir: str) -> tuple[str, list[str]]:
    """Copy the base (and its backing files) into `workdir` and apply 1-3 seeded mutations."""
    rng = random.Random(seed)
    os.makedirs(workdir, exist_ok=True)
    src_dir = os.path.dirname(lay.path)
    for b in lay.backing:
        dst = os.path.join(workdir, b)
        if not os.path.exists(dst):
            shutil.copyfile(os.path.join(src_dir, b), dst)
    path = os.path.join(workdir, os.path.basename(lay.path))
    shutil.copyfile(lay.path, path)
    done = []
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        op = rng.choices([o for o, _w in OPS], weights=_WEIGHTS)[0]
        st = os.stat(path)
        cur = Layout(**{**lay.__dict__, "file_size": st.st_size})
        done.append(op(rng, cur, path))
    return path, done
