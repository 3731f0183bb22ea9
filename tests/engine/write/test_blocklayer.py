"""Properties of the block layer's head/body/tail split (bdrv_co_pdiscard / pwrite_zeroes)."""

from hypothesis import given
from hypothesis import strategies as st

from qdebug.engine.write.blocklayer import block_piece


@given(st.integers(0, 1 << 24), st.integers(1, 1 << 24), st.sampled_from([512, 2048, 65536, 1 << 21]))
def test_pieces_cover_the_request_with_at_most_one_unaligned_head_and_tail(offset, nbytes, align):
    end = offset + nbytes
    tail = end % align
    pieces = []
    while nbytes > 0:
        num = block_piece(offset, nbytes, align, tail)
        assert 0 < num <= nbytes
        pieces.append((offset, num))
        offset += num
        nbytes -= num
    assert pieces[-1][0] + pieces[-1][1] == end
    assert len(pieces) <= 3
    aligned = [(o, n) for o, n in pieces if o % align == 0 and n % align == 0]
    assert len(pieces) - len(aligned) <= 2
    # every piece but the first starts on a boundary; every piece but the last ends on one
    for o, n in pieces[1:]:
        assert o % align == 0
    for o, n in pieces[:-1]:
        assert (o + n) % align == 0
