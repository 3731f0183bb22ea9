"""An independent, deliberately plain decoder of host-cluster ownership for the layout tests:
whole file in memory, struct and Python loops, one entry at a time, nothing shared with
qdebug.engine.forensics. Same rules as docs: a claim per reference; two claims of one cluster
are an overlap unless they are the same guest cluster's data (or the same L1 index's L2 table)
seen from the active L1 and a snapshot, or compressed clusters packed together."""

from __future__ import annotations

import struct

MASK = 0x00FFFFFFFFFFFE00


def _q(buf, off):
    if off + 8 > len(buf):
        return int.from_bytes((buf[off:off + 8] + bytes(8))[:8], "big") if off < len(buf) else 0
    return struct.unpack_from(">Q", buf, off)[0]


def decode(path: str) -> dict:
    with open(path, "rb") as f:
        buf = f.read()
    (_m, version, _bfo, _bfs, cb, _size, _crypt, l1_size, l1_off, rt_off, rt_cl, nb_snap,
     snap_off) = struct.unpack_from(">IIQIIQIIQQIIQ", buf, 0)
    incompat, _c, autoclear, order, hlen = (struct.unpack_from(">QQQII", buf, 72) if version == 3
                                            else (0, 0, 0, 4, 72))
    ext = bool(incompat & 16)
    cs = 1 << cb
    nb = -(-len(buf) // cs)
    claims: dict[int, list] = {}
    problems = []

    def claim(c, kind, owner, snap):
        claims.setdefault(c, []).append((kind, owner, snap))

    def region(off, length, kind, owner=-1, snap=-1):
        if length <= 0:
            return
        if off % cs:
            problems.append(("unaligned", off))
            return
        if off // cs >= nb:
            problems.append(("past-eof", off))
            return
        for c in range(off // cs, (off + length - 1) // cs + 1):
            if c < nb:
                claim(c, kind, owner, snap)
        if (off + length - 1) // cs >= nb:
            problems.append(("past-eof", nb * cs))

    region(0, cs, "header")
    l1s = [(l1_off, l1_size, -1)]
    snaps = []
    p = snap_off
    for i in range(nb_snap):
        so, ss, idl, nl, _d, _dn, _vm, _vs, extra = struct.unpack_from(">QIHHIIQII", buf, p)
        size = 40 + extra + idl + nl
        size += -size % 8
        snaps.append((so, ss, i))
        p += size
    if nb_snap:
        last_start = p - size
        region(snap_off, last_start + size - snap_off, "snapshot-table")
    l1s += snaps
    seen = set()
    per = cs // (16 if ext else 8)
    x = 62 - (cb - 8)
    for off, size, snap in l1s:
        if not size:
            continue
        region(off, size * 8, "l1", snap, snap)
        for i in range(size):
            e = _q(buf, off + 8 * i) & MASK
            if not e:
                continue
            if e % cs:
                problems.append(("unaligned", e))
                continue
            if e // cs >= nb:
                problems.append(("past-eof", e))
                continue
            claim(e // cs, "l2", i, snap)
            if (i, e) in seen:
                continue
            seen.add((i, e))
            for j in range(per):
                w = _q(buf, e + j * (16 if ext else 8))
                g = i * per + j
                if w >> 62 & 1:
                    coff = w & ((1 << x) - 1)
                    nbytes = (((w >> x) & ((1 << (cb - 8)) - 1)) + 1) * 512 - coff % 512
                    if coff // cs >= nb:
                        problems.append(("past-eof", coff))
                        continue
                    for c in range(coff // cs, min((coff + nbytes - 1) // cs, nb - 1) + 1):
                        claim(c, "compressed", g, snap)
                    continue
                d = w & MASK
                if not d:
                    continue
                if d % cs:
                    problems.append(("unaligned", d))
                elif d // cs >= nb:
                    problems.append(("past-eof", d))
                else:
                    claim(d // cs, "data", g, snap)
    # bitmaps extension
    if version == 3 and autoclear & 1:
        p = hlen
        while p + 8 <= cs:
            t, n = struct.unpack_from(">II", buf, p)
            if t == 0:
                break
            if t == 0x23852875:
                nbm, _r, dsize, doff = struct.unpack_from(">IIQQ", buf, p + 8)
                region(doff, dsize, "bitmap-directory")
                q = doff
                padded = buf + bytes(max(0, doff + dsize - len(buf)) + 24)  # zeros past EOF
                for k in range(nbm):
                    toff, tsize, _fl, _ty, _gr, nsz, ex = struct.unpack_from(">QIIBBHI", padded, q)
                    region(toff, tsize * 8, "bitmap-table", k)
                    for m in range(tsize):
                        d = _q(buf, toff + 8 * m) & MASK
                        if d and d % cs == 0 and d // cs < nb:
                            claim(d // cs, "bitmap-data", k, -1)
                    s = 24 + ex + nsz
                    q += s + (-s % 8)
            p += 8 + n + (-n % 8)
    # refcounts
    region(rt_off, rt_cl * cs, "refcount-table")
    bits = 1 << order
    perb = cs * 8 // bits
    refcount = {}
    for i in range(rt_cl * cs // 8):
        b = _q(buf, rt_off + 8 * i) & ~0x1FF & 0xFFFFFFFFFFFFFFFF
        if not b:
            continue
        if b % cs:
            problems.append(("unaligned", b))
            continue
        if b // cs >= nb:
            problems.append(("past-eof", b))
            continue
        claim(b // cs, "refcount-block", i, -1)
        for k in range(perb):
            c = i * perb + k
            if c >= nb:
                break
            bit = k * bits
            if bits >= 8:
                v = int.from_bytes(buf[b + bit // 8:b + bit // 8 + bits // 8], "big")
            else:
                v = (buf[b + bit // 8] >> (bit % 8)) & ((1 << bits) - 1)
            refcount[c] = v
    kinds = {}
    for c in range(nb):
        cl = claims.get(c, [])
        distinct = set()
        for kind, owner, snap in cl:
            if kind == "compressed":
                distinct.add(("compressed",))
            elif kind in ("data", "l2"):
                distinct.add((kind, owner))
            else:
                distinct.add((kind, owner, snap, len(distinct)))  # never shared
        if not cl:
            kinds[c] = "leaked" if refcount.get(c, 0) else "free"
        elif len(distinct) > 1:
            kinds[c] = "overlap"
        else:
            kinds[c] = cl[0][0]
    return {"kinds": kinds, "problems": sorted(problems)}
