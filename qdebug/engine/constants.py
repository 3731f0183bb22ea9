"""On-disk constants of the qcow2 format, spelled as in docs/interop/qcow2.txt and QEMU's qcow2.h."""

from __future__ import annotations

QCOW_MAGIC = 0x514649FB  # "QFI\xfb"

# Header extension types (qcow2.txt "Header extensions").
QCOW2_EXT_MAGIC_END = 0x00000000
QCOW2_EXT_MAGIC_BACKING_FORMAT = 0xE2792ACA
QCOW2_EXT_MAGIC_FEATURE_TABLE = 0x6803F857
QCOW2_EXT_MAGIC_BITMAPS = 0x23852875
QCOW2_EXT_MAGIC_CRYPTO_HEADER = 0x0537BE77
QCOW2_EXT_MAGIC_DATA_FILE = 0x44415441

EXTENSION_NAMES = {
    QCOW2_EXT_MAGIC_BACKING_FORMAT: "backing format",
    QCOW2_EXT_MAGIC_FEATURE_TABLE: "feature name table",
    QCOW2_EXT_MAGIC_BITMAPS: "bitmaps",
    QCOW2_EXT_MAGIC_CRYPTO_HEADER: "full disk encryption header pointer",
    QCOW2_EXT_MAGIC_DATA_FILE: "external data file",
}

# Incompatible feature bits.
QCOW2_INCOMPAT_DIRTY = 1 << 0
QCOW2_INCOMPAT_CORRUPT = 1 << 1
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_INCOMPAT_COMPRESSION = 1 << 3
QCOW2_INCOMPAT_EXTL2 = 1 << 4
QCOW2_INCOMPAT_MASK = 0x1F

# Compatible / autoclear feature bits.
QCOW2_COMPAT_LAZY_REFCOUNTS = 1 << 0
QCOW2_AUTOCLEAR_BITMAPS = 1 << 0
QCOW2_AUTOCLEAR_DATA_FILE_RAW = 1 << 1

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

QCOW_CRYPT_NONE = 0
QCOW_CRYPT_AES = 1
QCOW_CRYPT_LUKS = 2
CRYPT_NAMES = {0: "none", 1: "aes", 2: "luks"}

QCOW2_COMPRESSION_TYPE_ZLIB = 0
QCOW2_COMPRESSION_TYPE_ZSTD = 1
COMPRESSION_NAMES = {0: "zlib", 1: "zstd"}

# Limits QEMU enforces at open time.
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_REFCOUNT_ORDER = 6
QCOW_MAX_L1_SIZE = 0x2000000  # bytes (32 MiB)
QCOW_MAX_REFTABLE_SIZE = 0x800000  # bytes (8 MiB)
BACKING_FILE_NAME_MAX = 1023
QCOW_MAX_SNAPSHOTS = 65536
QCOW2_MAX_BITMAPS = 65535
QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS

# L1 / L2 / refcount-table entry masks.
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0

# Subclusters.
SUBCLUSTERS_PER_CLUSTER = 32
BITMAP_ALL_ALLOC = 0x00000000FFFFFFFF
BITMAP_ALL_ZEROES = 0xFFFFFFFF00000000

# Snapshot table.
SNAPSHOT_HEADER_FIXED = 40
