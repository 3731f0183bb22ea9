"""Block checksums of a write's after-state, against the bytes themselves (every data shape a
write hands down: bytes, a view of a pattern's run, a list of runs of one byte or of several, zeros)."""

from __future__ import annotations

import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from qdebug.engine.file.blockcrc import BLOCK, after_crcs


@st.composite
def cases(draw):
    size = draw(st.integers(0, 5 * BLOCK))
    current = draw(st.one_of(st.binary(min_size=size, max_size=size),
                             st.integers(0, 2).map(lambda b: bytes([b]) * size)))
    offset = draw(st.integers(0, 6 * BLOCK))
    length = draw(st.integers(1, 4 * BLOCK))
    kind = draw(st.sampled_from(["bytes", "view", "runs", "mixed runs", "zeros"]))
    byte = draw(st.integers(0, 255))
    if kind == "bytes":
        data = draw(st.binary(min_size=length, max_size=length))
    elif kind == "view":
        data = memoryview(bytes([byte]) * (length + draw(st.integers(0, 3000))))[:length]
    elif kind == "runs":
        run = memoryview(bytes([byte]) * (2 * BLOCK))
        whole, rest = divmod(length, len(run))
        data = [run] * whole + ([run[:rest]] if rest else [])
    elif kind == "mixed runs":  # one-byte runs of different bytes, and plain bytes among them
        parts = [memoryview(bytes([byte]) * BLOCK), memoryview(bytes([byte ^ 1]) * BLOCK), bytes([byte]) * BLOCK]
        data, left = [], length
        while left:
            part = parts[draw(st.integers(0, 2))][:min(left, draw(st.integers(1, BLOCK)))]
            data.append(part)
            left -= len(part)
    else:
        data = None
    return current, offset, length, data


@settings(max_examples=800, deadline=None)
@given(case=cases())
def test_after_crcs_are_the_crcs_of_the_blocks_after_the_write(case):
    current, offset, length, data = case

    def read(off: int, n: int) -> bytes:
        got = current[off:off + n]
        return got + bytes(n - len(got))

    after = bytearray(current) + bytes(max(0, offset + length - len(current)))
    flat = bytes(length) if data is None else b"".join(map(bytes, data)) if isinstance(data, list) else bytes(data)
    after[offset:offset + length] = flat
    first, last = offset // BLOCK, (offset + length - 1) // BLOCK
    want = [zlib.crc32(bytes(after[b * BLOCK:(b + 1) * BLOCK]).ljust(BLOCK, b"\0")) for b in range(first, last + 1)]
    assert after_crcs(read, offset, length, data).tolist() == want


@settings(max_examples=200, deadline=None)
@given(blocks=st.lists(st.one_of(st.integers(0, 255).map(lambda b: bytes([b]) * BLOCK),
                                 st.binary(min_size=BLOCK, max_size=BLOCK),
                                 st.integers(0, 255).map(lambda b: bytes([b]) * 8 + bytes([b ^ 1]) * (BLOCK - 8))),
                       min_size=1, max_size=70))
def test_block_crcs_of_long_buffers_match_zlib(blocks):
    from qdebug.engine.file.blockcrc import block_crcs

    assert block_crcs(b"".join(blocks)).tolist() == [zlib.crc32(b) for b in blocks]
