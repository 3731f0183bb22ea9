"""qcow2 header and header extensions (qcow2.txt "Header" and "Header extensions").

`HEADER_FIELDS` is the header as one self-describing table (name, offset, width, how to show it,
the version that has it): it parses, packs, names a field's place in error messages, and tells
writers where a field lives (`FIELD["incompatible_features"].offset`), so no offset is spelled
twice. Parsing validates what QEMU validates at open time, so that an image QEMU refuses is
refused here too, with the field named. Unknown extensions are kept byte for byte.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field, replace

from ..errors import CorruptImage, NotQcow2, UnsupportedFeature
from . import constants as C


@dataclass(frozen=True)
class HeaderField:
    """One field of the fixed header: big-endian, `width` bytes at `offset`."""

    name: str
    offset: int
    width: int  # bytes: 1, 4 or 8
    show: str  # "dec", "hex" or "flags": how dumps display it
    version: int = 2  # the first version that has it

    @property
    def where(self) -> str:
        """The field's place, as error messages name it."""
        return f"{self.name} at offset {self.offset}"

    def read(self, buf: bytes) -> int:
        return int.from_bytes(buf[self.offset:self.offset + self.width], "big")

    def pack(self, value: int) -> bytes:
        return value.to_bytes(self.width, "big")

    def display(self, value: int) -> str:
        return f"0x{value:x}" if self.show in ("hex", "flags") else str(value)


HEADER_FIELDS: tuple[HeaderField, ...] = (
    HeaderField("magic", 0, 4, "hex"),
    HeaderField("version", 4, 4, "dec"),
    HeaderField("backing_file_offset", 8, 8, "hex"),
    HeaderField("backing_file_size", 16, 4, "dec"),
    HeaderField("cluster_bits", 20, 4, "dec"),
    HeaderField("size", 24, 8, "dec"),
    HeaderField("crypt_method", 32, 4, "dec"),
    HeaderField("l1_size", 36, 4, "dec"),
    HeaderField("l1_table_offset", 40, 8, "hex"),
    HeaderField("refcount_table_offset", 48, 8, "hex"),
    HeaderField("refcount_table_clusters", 56, 4, "dec"),
    HeaderField("nb_snapshots", 60, 4, "dec"),
    HeaderField("snapshots_offset", 64, 8, "hex"),
    HeaderField("incompatible_features", 72, 8, "flags", 3),
    HeaderField("compatible_features", 80, 8, "flags", 3),
    HeaderField("autoclear_features", 88, 8, "flags", 3),
    HeaderField("refcount_order", 96, 4, "dec", 3),
    HeaderField("header_length", 100, 4, "dec", 3),
    HeaderField("compression_type", 104, 1, "dec", 3),  # only when header_length > 104
)
FIELD = {f.name: f for f in HEADER_FIELDS}
V2_HEADER_LENGTH = FIELD["incompatible_features"].offset  # 72: a v2 header ends where v3's features start
V3_HEADER_MIN = FIELD["compression_type"].offset  # 104: header_length's lower bound


def _packed(version: int) -> tuple[tuple[str, ...], struct.Struct]:
    """The fields a version adds (compression_type aside), as one struct: parsing is on the path
    of every command, and of every image a fleet scan opens."""
    fields = [f for f in HEADER_FIELDS if f.version == version and f.name != "compression_type"]
    assert all(a.offset + a.width == b.offset for a, b in zip(fields, fields[1:]))
    return tuple(f.name for f in fields), struct.Struct(">" + "".join({1: "B", 4: "I", 8: "Q"}[f.width]
                                                                     for f in fields))


_V2_NAMES, _V2 = _packed(2)
_V3_NAMES, _V3 = _packed(3)
_V2_DEFAULTS = {"incompatible_features": 0, "compatible_features": 0, "autoclear_features": 0, "refcount_order": 4,
                "header_length": V2_HEADER_LENGTH, "compression_type": 0}


def read_fields(buf: bytes) -> dict[str, int]:
    """The raw field values `buf` holds, unvalidated: the v2 fields (`buf` has at least 72 bytes),
    the v3 ones when the version says 3 and they are there, defaults for the rest (as QEMU
    reads a v2 header: refcount_order 4, header_length 72, no compression type)."""
    out = dict(zip(_V2_NAMES, _V2.unpack_from(buf, 0)))
    out.update(_V2_DEFAULTS)
    if out["version"] >= 3 and len(buf) >= V3_HEADER_MIN:
        out.update(zip(_V3_NAMES, _V3.unpack_from(buf, V2_HEADER_LENGTH)))
        if V3_HEADER_MIN < out["header_length"] <= len(buf):
            out["compression_type"] = buf[V3_HEADER_MIN]
    return out


def _at(name: str) -> str:
    return f"(offset {FIELD[name].offset})"


@dataclass(frozen=True)
class Extension:
    type: int
    data: bytes
    offset: int  # file offset of the extension's type field

    @property
    def name(self) -> str:
        return C.EXTENSION_NAMES.get(self.type, f"unknown 0x{self.type:08x}")


@dataclass(frozen=True)
class FeatureName:
    type: int
    bit: int
    name: str


@dataclass(frozen=True)
class Header:
    magic: int
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = 72
    compression_type: int = 0
    extensions: tuple[Extension, ...] = ()
    backing_file: str | None = None
    feature_names: tuple[FeatureName, ...] = field(default=())

    # ---- derived geometry -------------------------------------------------------------------
    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & C.QCOW2_INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        """Entries per L2 table (an L2 table is always one cluster)."""
        return self.cluster_size // self.l2_entry_size

    @property
    def subclusters_per_cluster(self) -> int:
        return C.SUBCLUSTERS_PER_CLUSTER if self.extended_l2 else 1

    @property
    def subcluster_size(self) -> int:
        return self.cluster_size // self.subclusters_per_cluster

    @property
    def subcluster_bits(self) -> int:
        return self.subcluster_size.bit_length() - 1

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def refcount_block_entries(self) -> int:
        return self.cluster_size * 8 // self.refcount_bits

    @property
    def guest_clusters(self) -> int:
        return -(-self.size // self.cluster_size)

    @property
    def l1_entries_needed(self) -> int:
        return -(-self.guest_clusters // self.l2_entries)

    @property
    def compression_name(self) -> str:
        return C.COMPRESSION_NAMES.get(self.compression_type, f"unknown ({self.compression_type})")

    @property
    def backing_format(self) -> str | None:
        for ext in self.extensions:
            if ext.type == C.QCOW2_EXT_MAGIC_BACKING_FORMAT:
                return ext.data.split(b"\0", 1)[0].decode("utf-8", "replace")
        return None

    @property
    def data_file(self) -> str | None:
        for ext in self.extensions:
            if ext.type == C.QCOW2_EXT_MAGIC_DATA_FILE:
                return ext.data.decode("utf-8", "replace")
        return None

    @property
    def data_file_path(self) -> str | None:
        """The data file name as QEMU opens it: a C string (up to its first NUL), its bytes as they
        are (os.fsdecode), relative names taken from the current directory as QEMU 7.2 takes them."""
        for ext in self.extensions:
            if ext.type == C.QCOW2_EXT_MAGIC_DATA_FILE:
                return os.fsdecode(ext.data.split(b"\0", 1)[0])
        return None

    @property
    def has_data_file(self) -> bool:
        """Guest data lives in an external data file (incompatible bit 2: QEMU's has_data_file);
        the extension alone, without the bit, changes nothing (QEMU ignores it)."""
        return bool(self.incompatible_features & C.QCOW2_INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & C.QCOW2_AUTOCLEAR_DATA_FILE_RAW)

    @property
    def is_corrupt(self) -> bool:
        return bool(self.incompatible_features & C.QCOW2_INCOMPAT_CORRUPT)

    @property
    def is_dirty(self) -> bool:
        return bool(self.incompatible_features & C.QCOW2_INCOMPAT_DIRTY)

    def feature_list(self) -> list[dict]:
        """Every set feature bit, by name (the image's own name table first, then QEMU's)."""
        table = {(f.type, f.bit): f.name for f in self.feature_names}
        out = []
        for ftype, value in enumerate(
            (self.incompatible_features, self.compatible_features, self.autoclear_features)
        ):
            for bit in range(64):
                if value >> bit & 1:
                    name = table.get((ftype, bit)) or C.FEATURE_NAMES.get((ftype, bit))
                    out.append(
                        {"type": C.FEATURE_TYPES[ftype], "bit": bit, "name": name or f"unknown bit {bit}"}
                    )
        return out

    def with_incompatible(self, value: int) -> "Header":
        return replace(self, incompatible_features=value)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise CorruptImage(message)


def parse_header(buf: bytes, file_size: int) -> Header:
    """Parse and validate the header in `buf` (cluster 0, or as much of it as the file has)."""
    if len(buf) < 4 or struct.unpack_from(">I", buf, 0)[0] != C.QCOW_MAGIC:
        raise NotQcow2("not a qcow2 image (bad magic at offset 0)")
    if len(buf) < V2_HEADER_LENGTH:
        raise CorruptImage(f"header truncated: file is {len(buf)} bytes, a qcow2 header needs {V2_HEADER_LENGTH}")
    v = read_fields(buf)
    magic, version, bfo, bfs, cluster_bits = (v[n] for n in ("magic", "version", "backing_file_offset",
                                                             "backing_file_size", "cluster_bits"))
    size, crypt, l1_size, l1_off, rt_off, rt_clusters, nb_snap, snap_off = (v[n] for n in (
        "size", "crypt_method", "l1_size", "l1_table_offset", "refcount_table_offset", "refcount_table_clusters",
        "nb_snapshots", "snapshots_offset"))
    if version not in (2, 3):
        raise UnsupportedFeature(f"unsupported qcow2 version {version} ({FIELD['version'].where})")
    if not C.MIN_CLUSTER_BITS <= cluster_bits <= C.MAX_CLUSTER_BITS:
        raise CorruptImage(
            f"unsupported cluster size: cluster_bits={cluster_bits} {_at('cluster_bits')}, QEMU accepts 9..21"
        )
    cluster_size = 1 << cluster_bits
    incompat = compat = autoclear = 0
    refcount_order, header_length, compression_type = 4, V2_HEADER_LENGTH, 0
    if version == 3:
        if len(buf) < V3_HEADER_MIN:
            raise CorruptImage(f"v3 header truncated: file is {len(buf)} bytes, need {V3_HEADER_MIN}")
        incompat, compat, autoclear, refcount_order, header_length = (
            v[n] for n in ("incompatible_features", "compatible_features", "autoclear_features",
                           "refcount_order", "header_length"))
        _check(header_length >= V3_HEADER_MIN,
               f"header_length {header_length} {_at('header_length')} is below {V3_HEADER_MIN}")
        _check(header_length % 8 == 0, f"header_length {header_length} {_at('header_length')} is not a multiple of 8")
        _check(header_length <= cluster_size,
               f"header_length {header_length} {_at('header_length')} exceeds the cluster size {cluster_size}")
        _check(header_length <= len(buf), f"header_length {header_length} runs past the end of the file")
        if header_length > V3_HEADER_MIN:
            compression_type = v["compression_type"]
    if refcount_order > C.MAX_REFCOUNT_ORDER:
        raise CorruptImage(f"refcount_order {refcount_order} {_at('refcount_order')} is above 6")
    # Unknown incompatible bits: refuse like QEMU ("Unsupported qcow2 feature(s)").
    unknown = incompat & ~C.QCOW2_INCOMPAT_MASK
    # Extensions (v3 only place them after header_length; v2 after byte 72).
    ext_start = header_length
    ext_end = cluster_size
    if bfo:
        _check(bfo <= cluster_size, f"invalid backing file offset 0x{bfo:x} {_at('backing_file_offset')}: past cluster 0")
        ext_end = bfo
    extensions, names = _parse_extensions(
        buf, ext_start, ext_end, "the backing file name" if bfo else "cluster 0")
    _check_extensions(extensions, crypt, autoclear, cluster_size)
    if unknown:
        table = {(f.type, f.bit): f.name for f in names}
        bits = [table.get((0, b), f"bit {b}") for b in range(64) if unknown >> b & 1]
        raise UnsupportedFeature("unsupported qcow2 feature(s): " + ", ".join(bits))
    backing = None
    if bfo:
        _check(bfs <= C.BACKING_FILE_NAME_MAX,
               f"backing file name too long: {bfs} bytes {_at('backing_file_size')}, QEMU allows 1023")
        _check(bfo + bfs <= min(cluster_size, len(buf)),
               f"backing file name at 0x{bfo:x}+{bfs} runs past cluster 0 or the end of the file")
        # QEMU reads the name into a C string: it ends at the first NUL byte.
        backing = bytes(buf[bfo:bfo + bfs]).split(b"\0", 1)[0].decode("utf-8", "replace")
    _check(l1_off % cluster_size == 0, f"L1 table offset 0x{l1_off:x} {_at('l1_table_offset')} is not cluster aligned")
    _check(rt_off % cluster_size == 0,
           f"refcount table offset 0x{rt_off:x} {_at('refcount_table_offset')} is not cluster aligned")
    _check(rt_clusters > 0, f"refcount_table_clusters {_at('refcount_table_clusters')} is 0")
    _check(rt_clusters * cluster_size <= C.QCOW_MAX_REFTABLE_SIZE,
           f"refcount table too large: {rt_clusters} clusters {_at('refcount_table_clusters')}")
    _check(l1_size * 8 <= C.QCOW_MAX_L1_SIZE, f"active L1 table too large: l1_size={l1_size} {_at('l1_size')}")
    hdr = Header(magic, version, bfo, bfs, cluster_bits, size, crypt, l1_size, l1_off, rt_off,
                 rt_clusters, nb_snap, snap_off, incompat, compat, autoclear, refcount_order,
                 header_length, compression_type, tuple(extensions), backing, tuple(names))
    if hdr.extended_l2:
        _check(version == 3, "extended L2 entries need a v3 image")
        _check(hdr.subcluster_size >= 512, f"unsupported subcluster size: {hdr.subcluster_size}")
    _check(l1_size >= hdr.l1_entries_needed,
           f"L1 table is too small: l1_size={l1_size} {_at('l1_size')}, size needs {hdr.l1_entries_needed}")
    if hdr.compression_type not in (0, 1):
        raise UnsupportedFeature(f"unknown compression type {compression_type} {_at('compression_type')}")
    if (compression_type != 0) != bool(incompat & C.QCOW2_INCOMPAT_COMPRESSION):
        raise CorruptImage(f"compression type {_at('compression_type')} and incompatible bit 3 disagree")
    if l1_size:
        _check(l1_off != 0 and l1_off + l1_size * 8 <= file_size,
               f"L1 table at 0x{l1_off:x} ({l1_size} entries) runs past the end of the file ({file_size})")
    _check(rt_off != 0 and rt_off + rt_clusters * cluster_size <= file_size,
           f"refcount table at 0x{rt_off:x} ({rt_clusters} clusters) runs past the end of the file")
    return hdr


def _check_extensions(exts: list[Extension], crypt: int, autoclear: int, cluster_size: int) -> None:
    """What qcow2_read_extensions refuses at open time, with the extension's place."""
    for e in exts:
        where = f"{e.name} extension at 0x{e.offset:x}"
        if e.type == C.QCOW2_EXT_MAGIC_CRYPTO_HEADER:
            _check(crypt == C.QCOW_CRYPT_LUKS, f"{where}: only expected with LUKS encryption (crypt_method {crypt})")
            _check(len(e.data) == 16, f"{where}: length {len(e.data)}, expected 16")
            off = struct.unpack_from(">Q", e.data)[0]
            _check(off % cluster_size == 0, f"{where}: encryption header offset 0x{off:x} is not cluster aligned")
        elif e.type == C.QCOW2_EXT_MAGIC_BITMAPS:
            _check(len(e.data) == 24, f"{where}: length {len(e.data)}, expected 24")
            if not autoclear & C.QCOW2_AUTOCLEAR_BITMAPS:
                continue  # QEMU ignores (and drops) a bitmaps extension without the autoclear bit
            nb, reserved, dir_size, dir_off = struct.unpack_from(">IIQQ", e.data)
            _check(reserved == 0, f"{where}: reserved field is not zero")
            _check(0 < nb <= C.QCOW2_MAX_BITMAPS, f"{where}: {nb} bitmaps (QEMU allows 1..{C.QCOW2_MAX_BITMAPS})")
            _check(dir_off % cluster_size == 0, f"{where}: bitmap directory offset 0x{dir_off:x} is not cluster aligned")
            _check(dir_size <= C.QCOW2_MAX_BITMAP_DIRECTORY_SIZE,
                   f"{where}: bitmap directory size {dir_size} exceeds {C.QCOW2_MAX_BITMAP_DIRECTORY_SIZE}")


def _parse_extensions(buf: bytes, start: int, end: int, limit: str) -> tuple[list[Extension], list[FeatureName]]:
    """Extensions in [start, end) as QEMU's qcow2_read_extensions walks them: the list ends at a
    type-0 entry or exactly at `end`; an entry (or its data) crossing `end` is an error."""
    exts: list[Extension] = []
    names: list[FeatureName] = []
    off = start
    while off < end:
        if off + 8 > end:
            raise CorruptImage(f"header extension at 0x{off:x} runs past {limit} (at 0x{end:x})")
        if off + 8 > len(buf):
            raise CorruptImage(f"header extension at 0x{off:x} runs past the end of the file ({len(buf)})")
        etype, elen = struct.unpack_from(">II", buf, off)
        if etype == C.QCOW2_EXT_MAGIC_END:
            break
        data_end = off + 8 + elen
        if data_end > end:
            raise CorruptImage(
                f"header extension 0x{etype:08x} at 0x{off:x}: length {elen} runs past {limit} (at 0x{end:x})")
        if data_end > len(buf):
            raise CorruptImage(
                f"header extension 0x{etype:08x} at 0x{off:x}: length {elen} runs past the end of the file")
        data = bytes(buf[off + 8:data_end])
        if etype == C.QCOW2_EXT_MAGIC_BACKING_FORMAT and elen >= 16:
            # QEMU keeps the format name in a 16-byte buffer and refuses longer ones.
            raise CorruptImage(f"backing format extension at 0x{off:x}: length {elen} is too large (QEMU allows 15)")
        exts.append(Extension(etype, data, off))
        if etype == C.QCOW2_EXT_MAGIC_FEATURE_TABLE:
            for i in range(0, len(data) - 47, 48):
                name = data[i + 2:i + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
                names.append(FeatureName(data[i], data[i + 1], name))
        off = data_end + (-elen % 8)
    return exts, names


def pack_header_fields(hdr: Header) -> bytes:
    """The fixed header of `hdr` (72 bytes for v2; v3 up to header_length, the compression type
    byte included when the header has it); extensions and the backing name are not touched."""
    out = bytearray()
    for f in HEADER_FIELDS:
        if f.version > hdr.version or (f.name == "compression_type" and hdr.header_length <= f.offset):
            continue
        out += f.pack(getattr(hdr, f.name))
    return bytes(out)


def header_dump(hdr: Header) -> list[tuple[HeaderField, int, str]]:
    """(field, value, display text) of every field the header has: for dumps and inspectors."""
    return [(f, v, f.display(v)) for f in HEADER_FIELDS
            if f.version <= hdr.version and not (f.name == "compression_type" and hdr.header_length <= f.offset)
            for v in (getattr(hdr, f.name),)]


def build_header(*, cluster_bits: int, size: int, l1_size: int, l1_table_offset: int,
                 refcount_table_offset: int, refcount_table_clusters: int, refcount_order: int,
                 extended_l2: bool, compression_type: int, backing_file: str | None = None,
                 backing_format: str | None = None) -> bytes:
    """Cluster 0 of a new v3 image, laid out as QEMU 7.2 lays it out (header_length 112)."""
    incompat = (C.QCOW2_INCOMPAT_EXTL2 if extended_l2 else 0) | (
        C.QCOW2_INCOMPAT_COMPRESSION if compression_type else 0)
    body = bytearray()
    if backing_format:
        body += _ext(C.QCOW2_EXT_MAGIC_BACKING_FORMAT, backing_format.encode())
    if cluster_bits > 12:  # QEMU 7.2 leaves the feature name table out for clusters of 4 KiB and less
        table = b"".join(bytes([t, b]) + n.encode().ljust(46, b"\0") for (t, b), n in C.FEATURE_NAMES.items())
        body += _ext(C.QCOW2_EXT_MAGIC_FEATURE_TABLE, table)
    body += struct.pack(">II", 0, 0)
    header_length = 112
    bfo = bfs = 0
    name = backing_file.encode() if backing_file else b""
    if name:
        bfo = header_length + len(body)
        bfs = len(name)
    hdr = Header(C.QCOW_MAGIC, 3, bfo, bfs, cluster_bits, size, 0, l1_size, l1_table_offset,
                 refcount_table_offset, refcount_table_clusters, 0, 0, incompat, 0, 0,
                 refcount_order, header_length, compression_type)
    fixed = pack_header_fields(hdr) + bytes(header_length - V3_HEADER_MIN - 1)
    out = fixed + bytes(body) + name
    if len(out) > (1 << cluster_bits):
        raise ValueError("header does not fit in cluster 0")
    return out


def _ext(etype: int, data: bytes) -> bytes:
    return struct.pack(">II", etype, len(data)) + data + bytes(-len(data) % 8)
