"""Real images to break: made by qemu-img / qemu-io (and by qdebug's create engine once it exists),
plus a `Layout` of each (where its header fields, extensions, tables and compressed data live) so
mutators can aim at metadata instead of flipping bytes in guest data.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass, field

from tests.qemu import create, qemu_img, qemu_io

# (name, offset, width in bytes) of every fixed header field (qcow2.txt "Header").
HEADER_FIELDS = [
    ("magic", 0, 4), ("version", 4, 4), ("backing_file_offset", 8, 8), ("backing_file_size", 16, 4),
    ("cluster_bits", 20, 4), ("size", 24, 8), ("crypt_method", 32, 4), ("l1_size", 36, 4),
    ("l1_table_offset", 40, 8), ("refcount_table_offset", 48, 8), ("refcount_table_clusters", 56, 4),
    ("nb_snapshots", 60, 4), ("snapshots_offset", 64, 8), ("incompatible_features", 72, 8),
    ("compatible_features", 80, 8), ("autoclear_features", 88, 8), ("refcount_order", 96, 4),
    ("header_length", 100, 4), ("compression_type", 104, 1),
]


@dataclass
class Layout:
    """Where the metadata of a (valid) base image lives: mutation targets."""

    path: str
    file_size: int
    version: int
    cluster_bits: int
    extended_l2: bool
    header_length: int
    extensions: list[tuple[int, int]]  # (file offset of the type field, data length)
    backing_file_offset: int
    l1_offset: int
    l1_size: int
    l2_offsets: list[int]
    reftable_offset: int
    reftable_clusters: int
    refblocks: list[int]
    snapshots_offset: int
    nb_snapshots: int
    compressed_entries: list[int] = field(default_factory=list)  # file offsets of compressed L2 entries
    compressed_data: list[tuple[int, int]] = field(default_factory=list)  # (host offset, bytes)
    backing: list[str] = field(default_factory=list)  # files the image needs beside it

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8


def layout_of(path: str, backing: list[str] | None = None) -> Layout:
    """Read the structure of a valid image with qdebug's engine (the bases are QEMU-made)."""
    import numpy as np

    from qdebug.engine.file.image import open_image
    from qdebug.engine.format import constants as C
    from qdebug.engine.format.compression import descriptor_fields

    with open_image(path, external_data=True) as img:
        h = img.header
        l1 = np.asarray(img.l1, dtype=np.uint64)
        l2s = sorted({int(x) & C.L1E_OFFSET_MASK for x in l1.tolist() if int(x) & C.L1E_OFFSET_MASK})
        rt = np.asarray(img.reftable, dtype=np.uint64)
        rbs = sorted({int(x) & C.REFT_OFFSET_MASK for x in rt.tolist() if int(x) & C.REFT_OFFSET_MASK})
        comp_entries, comp_data = [], []
        es = h.l2_entry_size
        for l2 in l2s:
            w0, _bm = img.l2_table(l2)
            for i in np.flatnonzero(np.asarray(w0, dtype=np.uint64) & np.uint64(C.QCOW_OFLAG_COMPRESSED)).tolist():
                comp_entries.append(l2 + i * es)
                comp_data.append(descriptor_fields(int(w0[i]), h.cluster_bits))
        return Layout(
            path=path, file_size=img.file_size, version=h.version, cluster_bits=h.cluster_bits,
            extended_l2=h.extended_l2, header_length=h.header_length,
            extensions=[(e.offset, len(e.data)) for e in h.extensions],
            backing_file_offset=h.backing_file_offset, l1_offset=h.l1_table_offset, l1_size=h.l1_size,
            l2_offsets=l2s, reftable_offset=h.refcount_table_offset,
            reftable_clusters=h.refcount_table_clusters, refblocks=rbs, snapshots_offset=h.snapshots_offset,
            nb_snapshots=h.nb_snapshots, compressed_entries=comp_entries, compressed_data=comp_data,
            backing=list(backing or []))


def _script(cs: int, compressed: bool) -> list[str]:
    """Writes that leave every subcluster type (and compressed clusters) in the first 8 clusters."""
    sc = max(cs // 32, 512)
    cmds = [
        f"write -P 0x11 0 {sc}",
        f"write -P 0x12 {3 * sc + 512} {sc}",
        f"write -z {cs + 4 * sc} {2 * sc}",
        f"write -P 0x14 {2 * cs} {cs}",
        f"write -P 0x15 {3 * cs} {cs}",
        f"write -z -u {3 * cs} {cs}",
        f"write -P 0x16 {4 * cs + 5 * sc} {3 * sc}",
        f"discard {4 * cs} {cs}",
    ]
    if compressed:
        cmds += [f"write -c -P 0x18 {6 * cs} {cs}", f"write -c -P 0x19 {7 * cs} {cs}"]
    return cmds


# name -> (create options, virtual size, compressed?)
QEMU_BASES = {
    "ext64": (dict(cluster_size="64k"), "4M", True),
    "ext16_zstd": (dict(cluster_size="16k", compression_type="zstd"), "1M", True),
    "std64": (dict(cluster_size="64k", extended_l2=False), "2M", True),
    "std512": (dict(cluster_size="512", extended_l2=False), "64k", False),
    "v2": (dict(cluster_size="4k", extended_l2=False, compat="0.10"), "256k", True),
    "rc1": (dict(cluster_size="16k", refcount_bits=1), "1M", False),
    "rc64": (dict(cluster_size="32k", refcount_bits=64), "1M", True),
}


def build_bases(directory: str) -> dict[str, Layout]:
    """Create every base image in `directory` (each a few hundred KiB) and return their layouts."""
    os.makedirs(directory, exist_ok=True)
    out: dict[str, Layout] = {}
    for name, (opts, size, compressed) in QEMU_BASES.items():
        path = os.path.join(directory, f"{name}.qcow2")
        opts = dict(opts)
        ext = opts.pop("extended_l2", True)
        cs = _parse_cs(opts["cluster_size"])
        create(path, size, extended_l2=ext, **opts)
        qemu_io(path, *[c for c in _script(cs, compressed) if _fits(c, size)])
        out[name] = layout_of(path)
    # A snapshot: a second L1 table and a snapshot table to aim at.
    snap = os.path.join(directory, "snap.qcow2")
    create(snap, "1M", cluster_size="16k")
    qemu_io(snap, "write -P 0x21 0 64k")
    qemu_img("snapshot", "-c", "s1", snap)
    qemu_io(snap, "write -P 0x22 16k 16k")
    out["snap"] = layout_of(snap)
    # Chains: qcow2 backing and raw backing, relative names, the overlay is what gets mutated.
    base = os.path.join(directory, "back.qcow2")
    create(base, "1M", cluster_size="16k")
    qemu_io(base, "write -P 0xee 0 1M")
    over = os.path.join(directory, "overlay.qcow2")
    create(over, "1M", cluster_size="16k", backing="back.qcow2", backing_fmt="qcow2")
    qemu_io(over, "write -P 0x31 1k 2k", "write -z 20k 4k", "write -c -P 0x32 64k 16k")
    out["overlay"] = layout_of(over, ["back.qcow2"])
    raw = os.path.join(directory, "back.raw")
    with open(raw, "wb") as f:
        f.write(b"\xdd" * (96 << 10))
    rover = os.path.join(directory, "rawover.qcow2")
    create(rover, "256k", cluster_size="16k", backing="back.raw", backing_fmt="raw")
    qemu_io(rover, "write -P 0x41 2k 1k")
    out["rawover"] = layout_of(rover, ["back.raw"])
    # An external data file (named absolutely: QEMU opens a relative name from the current directory).
    dimg = os.path.join(directory, "datafile.qcow2")
    create(dimg, "1M", cluster_size="16k", data_file=os.path.join(directory, "datafile.raw"))
    qemu_io(dimg, "write -P 0x51 0 64k", "write -z 128k 16k", "write -P 0x52 300k 3k", "discard 0 16k")
    out["datafile"] = layout_of(dimg)
    out.update(_qdebug_made(directory))
    return out


def _qdebug_made(directory: str) -> dict[str, Layout]:
    """Images made by qdebug's own create engine (W1), when that engine exists."""
    try:
        from qdebug.engine.write.create import create_image
    except ImportError:
        return {}
    out = {}
    for name, cs, ctype in (("qd_created", 65536, "zlib"), ("qd_zstd", 32768, "zstd")):
        path = os.path.join(directory, f"{name}.qcow2")
        create_image(path, 4 << 20, cluster_size=cs, extended_l2=True, compression_type=ctype)
        trace = os.path.join(directory, f"{name}.qio")
        with open(trace, "w") as f:
            f.write("\n".join(_script(cs, True)) + "\n")
        if _qdebug_replay(path, trace) != 0:  # qdebug's own write engine, else QEMU's
            qemu_io(path, *_script(cs, True))
        out[name] = layout_of(path)
    return out


def _qdebug_replay(path: str, trace: str) -> int:
    import contextlib
    import io

    from qdebug.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return main(["replay", path, trace])
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 2


def _parse_cs(text: str) -> int:
    return int(text[:-1]) << 10 if text.endswith("k") else int(text)


def _fits(cmd: str, size: str) -> bool:
    total = int(size[:-1]) << (20 if size.endswith("M") else 10)
    off, ln = (int(x) for x in cmd.split()[-2:])
    return off + ln <= total


def save_manifest(layouts: dict[str, Layout], path: str) -> None:
    with open(path, "w") as f:
        json.dump({k: asdict(v) for k, v in layouts.items()}, f)


def load_manifest(path: str) -> dict[str, Layout]:
    with open(path) as f:
        raw = json.load(f)
    out = {}
    for k, v in raw.items():
        v["extensions"] = [tuple(x) for x in v["extensions"]]
        v["compressed_data"] = [tuple(x) for x in v["compressed_data"]]
        out[k] = Layout(**v)
    return out


def patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def put_field(path: str, name: str, value: int) -> None:
    """Overwrite one header field (big-endian, width from HEADER_FIELDS)."""
    _n, off, width = next(f for f in HEADER_FIELDS if f[0] == name)
    patch(path, off, (value % (1 << (8 * width))).to_bytes(width, "big"))


def get_field(path: str, name: str) -> int:
    _n, off, width = next(f for f in HEADER_FIELDS if f[0] == name)
    with open(path, "rb") as f:
        f.seek(off)
        return int.from_bytes(f.read(width), "big")


def put_u64(path: str, offset: int, value: int) -> None:
    patch(path, offset, struct.pack(">Q", value % (1 << 64)))


def huge_virtual(path: str, l1_size: int = 1 << 22) -> int:
    """Give the (qemu-made) image at `path` a virtual size of l1_size L2 tables' worth, with a
    sparse L1 table of that size at the end of the file (its first entry kept). Returns the size."""
    lay = layout_of(path)
    end = -(-lay.file_size // lay.cluster_size) * lay.cluster_size
    with open(path, "r+b") as f:
        f.seek(lay.l1_offset)
        first = f.read(8)
        f.truncate(end + 8 * l1_size)
        f.seek(end)
        f.write(first)
    size = l1_size * (lay.cluster_size // lay.l2_entry_size) * lay.cluster_size
    put_field(path, "l1_table_offset", end)
    put_field(path, "l1_size", l1_size)
    put_field(path, "size", size)
    return size
