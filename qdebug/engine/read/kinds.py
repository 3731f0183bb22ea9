"""What a guest byte range is in one layer: QEMU's subcluster types, and past them the kinds a
block-status walk needs (raw backing files, holes, the end of a short backing file). One numbering
for block status (`status`), the scalar guest view (`guestview`) and everything that shows them."""

from __future__ import annotations

from typing import Final

RAW_DATA: Final = 7  # a raw file's data (guest offset == file offset)
RAW_HOLE: Final = 8  # a hole in a raw file (found with SEEK_HOLE): reads as zeros
# A NORMAL range whose host bytes are a hole in the image file, in an image QEMU takes for metadata
# preallocated: its block status then recurses into the file (BDRV_BLOCK_RECURSE) and adds ZERO.
NORMAL_HOLE: Final = 9
PAST_END: Final = 10  # past the end of a shorter backing file (or past the chain): zeros
NKINDS: Final = 11

