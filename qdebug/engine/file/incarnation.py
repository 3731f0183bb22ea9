"""Which incarnation of an image file an undo journal was written for.

A path outlives its file's contents: `qemu-img create` over it truncates and rewrites the same
inode, `cp other.qcow2 IMAGE` does too, `mv other.qcow2 IMAGE` puts another inode there. A journal
left beside the path must then never be undone into the new contents, and the user should hear
that the journal is stale (with the fix), not that "someone wrote the image".

What identifies an incarnation has to survive every legitimate write of QEMU or qdebug and change
when the image is made anew:

- the qcow2 header fields fixed at creation: magic, version, cluster_bits, virtual size,
  crypt_method, refcount_order, header_length, compression_type, the compatible features, the
  incompatible ones but the dirty and corrupt bits (which writes set), and the backing file's
  name. Not the refcount table's offset and size (a write that needs more refcount blocks moves
  and grows it), not the L1 table's (grown by snapshot and VM-state writes), not the snapshot
  table, not the autoclear bits (QEMU clears unknown ones when it opens an image). `qemu-img
  resize`, `amend` or `rebase` change some of these too: after them the journal is as stale.
- the file's device and inode: a different one is another file, unless it holds exactly what the
  journal's last step left (same length and mtime: the image and its journal copied or moved
  together, which is fine). The inode alone proves nothing for `cp` and `qemu-img create`, which
  keep it, so the header and the length (no QEMU write shrinks an image file) decide there.

A re-created image with the very same header, as long as or longer than the journaled one, cannot
be told from a foreign write by these; the journal is refused either way (its last step's length
and mtime no longer hold), only the message differs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..format.header import V2_HEADER_LENGTH, read_fields

FIELDS = ("magic", "version", "cluster_bits", "size", "crypt_method", "refcount_order", "header_length",
          "compression_type", "compatible_features", "incompatible_features")
_WRITES_SET = 0b11  # incompatible features a write may set or clear: dirty, corrupt
_BACKING_MAX = 1023  # QEMU's limit on the backing file name


@dataclass(frozen=True)
class Incarnation:
    """An image file's identity as a journal records it."""

    device: int
    inode: int
    header: tuple[tuple[str, int | str], ...]  # (field, value) in FIELDS order, then "backing"

    def to_bytes(self) -> bytes:
        return json.dumps({"device": self.device, "inode": self.inode, "header": dict(self.header)},
                          separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Incarnation | None":
        try:
            d = json.loads(raw)
            return cls(int(d["device"]), int(d["inode"]), tuple((str(k), v) for k, v in d["header"].items()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def same_file(self, other: "Incarnation") -> bool:
        return (self.device, self.inode) == (other.device, other.inode)

    def header_changes(self, now: "Incarnation") -> list[str]:
        """What differs in `now`'s header, as "field now (journal: then)"."""
        then = dict(self.header)
        return [f"{k} {_show(k, v)} (the journal's: {_show(k, then.get(k))})" for k, v in now.header
                if then.get(k) != v]


def _show(name: str, v) -> str:
    if isinstance(v, int) and name.endswith(("_features", "magic")):
        return f"0x{v:x}"  # (flags: extended_l2 is 0x10)
    return repr(v) if isinstance(v, str) else "none" if v is None else str(v)


def incarnation(fd: int) -> Incarnation:
    """The identity of the image open at `fd`. Any bytes do (a half-written image included): what
    is not a qcow2 header is recorded as the fields it happens to hold."""
    st = os.fstat(fd)
    buf = os.pread(fd, 4096, 0)
    fields: dict[str, int | str] = {}
    if len(buf) >= V2_HEADER_LENGTH:
        raw = read_fields(buf)
        fields = {k: raw[k] for k in FIELDS}
        fields["incompatible_features"] = raw["incompatible_features"] & ~_WRITES_SET
        off, n = raw["backing_file_offset"], min(raw["backing_file_size"], _BACKING_MAX)
        fields["backing"] = os.pread(fd, n, off).decode("utf-8", "surrogateescape") if off and n else ""
    return Incarnation(st.st_dev, st.st_ino, tuple(fields.items()))
