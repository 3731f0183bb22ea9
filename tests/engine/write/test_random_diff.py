"""Randomized differential test: the same random trace through ONE qemu-io process and ONE
WriteEngine, on copies of the same random image. Guest data (qemu-img compare), L1/L2 tables,
refcounts (so every host offset) and the qemu-img check verdict must agree; where QEMU corrupts
its own image (the compressed-packing bug: a compressed cluster packed into a freed and
reused host cluster), qdebug must have flagged a hazard.

Fixed seed; QDEBUG_DIFF_TRACES raises the number of traces (default 240).
"""

from __future__ import annotations

import os
import random

import pytest

from qdebug.engine.write.create import create_image
from tests.engine.harness import (
    assert_same_metadata,
    check_verdict,
    copy,
    qdebug_process,
    qemu_process,
    same_guest_data,
)
from tests.qemu import qemu_img, qemu_io

pytestmark = pytest.mark.qemu

TOTAL = int(os.environ.get("QDEBUG_DIFF_TRACES", "240"))
BATCHES = 24
PER_BATCH = max(1, -(-TOTAL // BATCHES))
SEED = 20261126


def _image(rng: random.Random, d) -> tuple[str, int, int]:
    cs = rng.choice([16384, 32768, 65536, 65536, 131072, 2 << 20])
    ext = rng.random() < 0.75
    n = rng.randint(3, 12) if cs >= 1 << 20 else rng.randint(4, 24)
    size = n * cs - (rng.randrange(1, 64) * 512 if rng.random() < 0.2 else 0)
    kind = rng.choice(["none", "none", "raw", "qcow2", "short"])
    backing = fmt = None
    if kind in ("raw", "short"):
        blen = size if kind == "raw" else rng.randrange(1, size // 512) * 512
        data = bytearray()
        while len(data) < blen:
            chunk = rng.choice([512, 4096, cs // 2, cs])
            data += bytes([rng.randrange(1, 256)]) * chunk
        (d / "base.raw").write_bytes(bytes(data[:blen]))
        backing, fmt = "base.raw", "raw"
    elif kind == "qcow2":
        base = str(d / "base.qcow2")
        create_image(base, size, cluster_size=cs, extended_l2=rng.random() < 0.5)
        cmds = [f"write -P 0x{rng.randrange(1, 256):x} {rng.randrange(0, size // 512) * 512} {rng.choice([512, 4096, cs])}"
                for _ in range(4)]
        qemu_io(base, *[c for c in cmds if int(c.split()[-2]) + int(c.split()[-1]) <= size])
        backing, fmt = "base.qcow2", "qcow2"
    img = str(d / "img.qcow2")
    if not ext and rng.random() < 0.25:  # a v2 (compat=0.10) image: no zero flag, discard instead
        opts = f"compat=0.10,cluster_size={cs}"
        args = ["create", "-q", "-f", "qcow2", "-o", opts] + (["-b", backing, "-F", fmt] if backing else [])
        qemu_img(*args, img, str(size))
        return img, size, cs
    create_image(img, size, cluster_size=cs, extended_l2=ext, backing=backing, backing_format=fmt,
                 compression_type=rng.choice(["zlib", "zlib", "zstd"]))
    return img, size, cs


def _trace(rng: random.Random, size: int, cs: int, n: int) -> list[str]:
    """Writes, zero writes (with and without -u), discards and compressed writes, aligned to
    bytes, sectors, subclusters or clusters, 1 byte to 3 clusters long."""
    sc = cs // 32
    out = []
    for _ in range(n):
        r = rng.random()
        c = rng.randrange(0, -(-size // cs))
        if r < 0.12:  # compressed, one whole cluster (or the image's last partial one)
            out.append(f"write -c -P 0x{rng.randrange(256):x} {c * cs} {min(cs, size - c * cs)}")
            continue
        unit = rng.choice([1, 512, 512, sc, sc, cs, cs])
        off = rng.randrange(0, size // unit) * unit
        maxlen = min(size - off, 3 * cs)
        if maxlen <= 0:
            continue
        lunit = rng.choice([1, 512, sc, cs]) if unit > 1 else 1
        length = min(maxlen, rng.randint(1, max(1, 2 * cs // lunit)) * lunit)
        if r < 0.55:
            out.append(f"write -P 0x{rng.randrange(256):x} {off} {length}")
        elif r < 0.8:
            out.append(f"write -z {'-u ' if rng.random() < 0.5 else ''}{off} {length}")
        else:
            out.append(f"discard {off} {length}")
    return out


def _qemu_errors(output: str) -> list[str]:
    return [line.replace("qemu-io> ", "").strip() for line in output.splitlines() if "failed:" in line]


def run_one(tmp_path, rng: random.Random, n_cmds: int) -> None:
    img, size, cs = _image(rng, tmp_path)
    ref = copy(img, str(tmp_path / "ref.qcow2"))
    cmds = _trace(rng, size, cs, n_cmds)
    results = qdebug_process(img, cmds)
    out = qemu_process(ref, cmds)
    ours = [r.error for r in results if r.error]
    assert ours == _qemu_errors(out), f"errors differ for {cmds}"
    where = f"trace {cmds} on {cs}-byte clusters, size {size}"
    assert same_guest_data(img, ref), f"guest data differs: {where}"
    try:
        assert_same_metadata(img, ref)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{where}") from None
    rc_ours, text_ours = check_verdict(img)
    rc_ref, text_ref = check_verdict(ref)
    assert rc_ours == rc_ref, f"check verdict differs: {where}\n{text_ours}\n{text_ref}"
    if rc_ref != 0:
        assert any(r.hazards for r in results), f"QEMU corrupted its image but no hazard flagged: {where}\n{text_ref}"


@pytest.mark.slow
@pytest.mark.parametrize("batch", range(BATCHES))
def test_random_traces(qemu, tmp_path, batch):
    rng = random.Random(SEED * 1000 + batch)
    for i in range(PER_BATCH):
        d = tmp_path / f"t{i}"
        d.mkdir()
        run_one(d, rng, rng.randint(3, 14))
