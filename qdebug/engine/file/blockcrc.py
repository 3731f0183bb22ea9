"""CRC32 of 4 KiB blocks: what the undo journal records of the state each write leaves behind.

4 KiB is a page: a killed process tears a write only between pages, so every block of an
interrupted write is either as before or as after it. Guest data is mostly one repeated byte
(qemu-io patterns, zeros), handed down as views of one long run of that byte: such a run is
recognised once, and every whole block of it takes its CRC from a table; only other data pays for
zlib's CRC.
"""

from __future__ import annotations

import zlib
from array import array
from typing import Callable

BLOCK = 4096
ZERO_CRC = zlib.crc32(bytes(BLOCK))
_BYTE_CRC: dict[int, int] = {}
_RUNS: dict[int, tuple[bytes, int]] = {}  # id(object) -> (the object, its one byte or -1)
_RUN_MAX = 2 << 20
_PIN_MAX = 32 << 20  # bytes of viewed objects kept alive in _RUNS (256 pattern runs: 16 MiB)
_pinned = 0
_NUMPY_MIN = 32  # blocks: below it numpy's fixed costs outweigh what it saves
_table = None  # numpy: the CRC of a block of each byte
_NUMPY_CHUNK = 1024  # blocks per numpy pass: bounded temporaries for any write


def _byte_crc(b: int) -> int:
    crc = _BYTE_CRC.get(b)
    if crc is None:
        crc = _BYTE_CRC[b] = zlib.crc32(bytes([b]) * BLOCK)
    return crc


def _repeats(obj: bytes) -> int:
    return obj[0] if obj and obj == obj[:1] * len(obj) else -1  # (a memset and a memcmp: fast)


def _one_byte(buf) -> int:
    """The byte a view repeats, if the object it views is made of one byte only (a pattern's run,
    a buffer of zeros: a few objects, used again and again); else -1."""
    if not isinstance(buf, memoryview):
        return -1
    obj = buf.obj
    if not isinstance(obj, bytes) or len(obj) > _RUN_MAX:
        return -1
    hit = _RUNS.get(id(obj))
    if hit is None or hit[0] is not obj:
        global _pinned
        if _pinned + len(obj) > _PIN_MAX:  # the objects are kept alive while known: a budget
            _RUNS.clear()
            _pinned = 0
        hit = _RUNS[id(obj)] = (obj, _repeats(obj))
        _pinned += len(obj)
    return hit[1]


def block_crcs(buf, byte: int = -1) -> array:
    """The CRC32 of each block of `buf` (bytes-like, a whole number of blocks); `byte`: the byte
    it is known to repeat."""
    n = len(buf) // BLOCK if not isinstance(buf, memoryview) else buf.nbytes // BLOCK
    if byte >= 0:
        return array("I", [_byte_crc(byte)]) * n
    mv = memoryview(buf).cast("B")
    if n < _NUMPY_MIN:
        return array("I", [zlib.crc32(mv[i:i + BLOCK]) for i in range(0, n * BLOCK, BLOCK)])
    # A long buffer (data merged with its copy-on-write, metadata pages): numpy finds its blocks of
    # one byte at memory speed; zlib does the others.
    import numpy as np

    global _table
    if _table is None:
        _table = np.array([_byte_crc(b) for b in range(256)], dtype=np.uint32)
    out = np.empty(n, dtype=np.uint32)
    for c in range(0, n, _NUMPY_CHUNK):
        k = min(_NUMPY_CHUNK, n - c)
        words = np.frombuffer(mv, dtype=np.uint64, count=k * (BLOCK // 8), offset=c * BLOCK).reshape(k, -1)
        first = words[:, 0]
        low = first & np.uint64(0xFF)
        one = (first == low * np.uint64(0x0101010101010101)) & (words == first[:, None]).all(axis=1)
        out[c:c + k] = _table[low.astype(np.intp)]
        for i in np.flatnonzero(~one).tolist():
            at = (c + i) * BLOCK
            out[c + i] = zlib.crc32(mv[at:at + BLOCK])
    return array("I", out.tobytes())


def _piece(data, i: int, j: int):
    """data[i:j]: data is bytes-like, a list of them (one write), or None (zeros)."""
    if data is None:
        return bytes(j - i)
    if not isinstance(data, list):
        return memoryview(data).cast("B")[i:j]  # a view: a long write is never copied
    out, pos = [], 0
    for part in data:
        n = len(part)
        if pos + n > i and pos < j:
            out.append(bytes(memoryview(part).cast("B")[max(i - pos, 0):min(j - pos, n)]))
        pos += n
        if pos >= j:
            break
    return b"".join(out)


def _data_byte(data) -> int:
    """The one byte all of a write's `data` repeats (None: zeros), or -1."""
    if data is None:
        return 0
    if not isinstance(data, list):
        return _one_byte(data)
    byte = _one_byte(data[0])
    for part in data:
        if part is not data[0] and _one_byte(part) != byte:
            return -1
    return byte


def _run(byte: int, n: int) -> memoryview:
    """n <= BLOCK bytes of `byte`."""
    run = _BLOCKS.get(byte)
    if run is None:
        run = _BLOCKS[byte] = memoryview(bytes([byte]) * BLOCK)
    return run[:n]


_BLOCKS: dict[int, memoryview] = {}


def after_crcs(read: Callable[[int, int], bytes], offset: int, length: int, data) -> array:
    """The CRC32 of each block [offset, offset+length) touches, as it will be once `data` (None:
    zeros) is written there: the blocks' other bytes as `read(offset, n)` gives them now."""
    end = offset + length
    byte = _data_byte(data)
    if byte >= 0:
        # Guest data of one byte (a pattern, zeros): every whole block's CRC from the table; a
        # partly written first or last block chained through zlib from its pieces, never joined.
        lo, hi = offset - offset % BLOCK, -(-end // BLOCK) * BLOCK
        out = array("I", [_byte_crc(byte)]) * ((hi - lo) // BLOCK)
        if offset > lo or end < lo + BLOCK:
            top = min(end, lo + BLOCK)
            crc = zlib.crc32(_run(byte, top - offset), zlib.crc32(read(lo, offset - lo)) if offset > lo else 0)
            out[0] = zlib.crc32(read(top, lo + BLOCK - top), crc) if top < lo + BLOCK else crc
        if end < hi and hi - BLOCK > lo:
            out[-1] = zlib.crc32(read(end, hi - end), zlib.crc32(_run(byte, end - (hi - BLOCK))))
        return out
    lo = offset - offset % BLOCK
    mid_lo = -(-offset // BLOCK) * BLOCK  # the whole blocks inside the write
    mid_hi = max(mid_lo, end - end % BLOCK)
    out = array("I")
    if offset > lo or end < lo + BLOCK:  # a first block only partly written
        top = min(end, lo + BLOCK)
        block = b"".join((read(lo, offset - lo), bytes(_piece(data, 0, top - offset)), read(top, lo + BLOCK - top)))
        out.append(zlib.crc32(block))
        mid_lo = lo + BLOCK
        mid_hi = max(mid_lo, end - end % BLOCK)
    if mid_lo < mid_hi:
        if data is None:
            out.extend(array("I", [ZERO_CRC]) * ((mid_hi - mid_lo) // BLOCK))
        elif isinstance(data, list) and mid_lo == offset and all(len(p) % BLOCK == 0 for p in data[:-1]):
            pos = 0
            for part in data:  # a long pattern write: the same run again and again
                n = min(len(part), mid_hi - offset - pos) // BLOCK * BLOCK
                if n > 0:
                    out.extend(block_crcs(memoryview(part).cast("B")[:n], _one_byte(part)))
                pos += len(part)
        else:
            out.extend(block_crcs(_piece(data, mid_lo - offset, mid_hi - offset), _one_byte(data)))
    if end > mid_hi and mid_hi >= lo + BLOCK:  # a last block only partly written
        block = bytes(_piece(data, mid_hi - offset, length)) + read(end, mid_hi + BLOCK - end)
        out.append(zlib.crc32(block))
    return out
