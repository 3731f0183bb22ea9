"""On-disk constants of the qcow2 format, spelled as in docs/interop/qcow2.txt and QEMU's qcow2.h."""

from __future__ import annotations

from typing import Final

QCOW_MAGIC: Final = 0x514649FB  # "QFI\xfb"

# Header extension types (qcow2.txt "Header extensions").
QCOW2_EXT_MAGIC_END: Final = 0x00000000
QCOW2_EXT_MAGIC_BACKING_FORMAT: Final = 0xE2792ACA
QCOW2_EXT_MAGIC_FEATURE_TABLE: Final = 0x6803F857
QCOW2_EXT_MAGIC_BITMAPS: Final = 0x23852875
QCOW2_EXT_MAGIC_CRYPTO_HEADER: Final = 0x0537BE77
QCOW2_EXT_MAGIC_DATA_FILE: Final = 0x44415441
# qdebug's own (QEMU ignores unknown extensions): "this file is a metadata-only bundle" (JSON).
QDEBUG_EXT_MAGIC_BUNDLE: Final = 0x71646231  # "qdb1"

EXTENSION_NAMES = {
    QCOW2_EXT_MAGIC_BACKING_FORMAT: "backing format",
    QCOW2_EXT_MAGIC_FEATURE_TABLE: "feature name table",
    QCOW2_EXT_MAGIC_BITMAPS: "bitmaps",
    QCOW2_EXT_MAGIC_CRYPTO_HEADER: "full disk encryption header pointer",
    QCOW2_EXT_MAGIC_DATA_FILE: "external data file",
    QDEBUG_EXT_MAGIC_BUNDLE: "qdebug bundle",
}

# Incompatible feature bits.
QCOW2_INCOMPAT_DIRTY: Final = 1 << 0
QCOW2_INCOMPAT_CORRUPT: Final = 1 << 1
QCOW2_INCOMPAT_DATA_FILE: Final = 1 << 2
QCOW2_INCOMPAT_COMPRESSION: Final = 1 << 3
QCOW2_INCOMPAT_EXTL2: Final = 1 << 4
QCOW2_INCOMPAT_MASK: Final = 0x1F

# Compatible / autoclear feature bits.
QCOW2_COMPAT_LAZY_REFCOUNTS: Final = 1 << 0
QCOW2_AUTOCLEAR_BITMAPS: Final = 1 << 0
QCOW2_AUTOCLEAR_DATA_FILE_RAW: Final = 1 << 1

# Names QEMU 7.2 writes into the feature name table: (type, bit) -> name.
FEATURE_NAMES = {
    (0, 0): "dirty bit",
    (0, 1): "corrupt bit",
    (0, 2): "external data file",
    (0, 3): "compression type",
    (0, 4): "extended L2 entries",
    (1, 0): "lazy refcounts",
    (2, 0): "bitmaps",
    (2, 1): "raw external data",
}
FEATURE_TYPES = ("incompatible", "compatible", "autoclear")

QCOW_CRYPT_NONE: Final = 0
QCOW_CRYPT_AES: Final = 1
QCOW_CRYPT_LUKS: Final = 2
CRYPT_NAMES = {0: "none", 1: "aes", 2: "luks"}

QCOW2_COMPRESSION_TYPE_ZLIB: Final = 0
QCOW2_COMPRESSION_TYPE_ZSTD: Final = 1
COMPRESSION_NAMES = {0: "zlib", 1: "zstd"}

# Limits QEMU enforces at open time.
MIN_CLUSTER_BITS: Final = 9
MAX_CLUSTER_BITS: Final = 21
MAX_REFCOUNT_ORDER: Final = 6
QCOW_MAX_L1_SIZE: Final = 0x2000000  # bytes (32 MiB)
QCOW_MAX_REFTABLE_SIZE: Final = 0x800000  # bytes (8 MiB)
BACKING_FILE_NAME_MAX: Final = 1023
QCOW_MAX_SNAPSHOTS: Final = 65536
QCOW2_MAX_BITMAPS: Final = 65535
QCOW2_MAX_BITMAP_DIRECTORY_SIZE: Final = 1024 * QCOW2_MAX_BITMAPS

# L1 / L2 / refcount-table entry masks.
L1E_OFFSET_MASK: Final = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK: Final = 0x7F000000000001FF
L2E_OFFSET_MASK: Final = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK: Final = 0x3F000000000001FE
REFT_OFFSET_MASK: Final = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK: Final = 0x1FF
QCOW_OFLAG_COPIED: Final = 1 << 63
QCOW_OFLAG_COMPRESSED: Final = 1 << 62
QCOW_OFLAG_ZERO: Final = 1 << 0

# Subclusters.
SUBCLUSTERS_PER_CLUSTER: Final = 32
BITMAP_ALL_ALLOC: Final = 0x00000000FFFFFFFF
BITMAP_ALL_ZEROES: Final = 0xFFFFFFFF00000000

# Snapshot table.
SNAPSHOT_HEADER_FIXED: Final = 40
