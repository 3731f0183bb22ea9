"""A write-back flush cut short anywhere (a kill where no undo journal could be kept) leaves at
most leaked clusters, as QEMU's cache flush order does: refcount blocks and the refcount table
before the L2 tables that need them, L2 tables before the L1 table, the header last.

Each case holds back the metadata of writes that allocate L2 tables, a new refcount block and a
grown refcount table, then lets the flush's k-th image write fail (for every k) and asks
`qemu-img check` what the file holds: leaks are allowed, corruptions never.
"""

from __future__ import annotations

import shutil

import pytest

from qdebug.engine.errors import StorageError
from qdebug.engine.file.chain import open_chain
from qdebug.engine.write.txn import WriteMode
from qdebug.engine.write.writer import WriteEngine
from qdebug.trace.commands import parse_line
from tests.qemu import create, qemu_check

CMDS = [f"write -P 0x{i + 1:02x} {i * 3}G 64k" for i in range(6)] + ["write -P 0x33 100M 32M"]


def _flush_cut_at(path: str, k: int | None) -> int:
    """Run CMDS in write-back and flush, the k-th write of the flush failing; the writes made."""
    chain = open_chain(path, writable=True)
    try:
        eng = WriteEngine(chain, WriteMode.WRITE_BACK)
        for i, c in enumerate(CMDS):
            eng.run(parse_line(c, i + 1), i)
        img = chain.top
        real, made = img.pwrite, []

        def pwrite(offset, data):
            if k is not None and len(made) == k:
                raise StorageError(5, img.path, "injected")
            made.append(offset)
            real(offset, data)

        img.pwrite = pwrite
        try:
            eng.flush()
        except StorageError:
            pass
        return len(made)
    finally:
        chain.close()


@pytest.mark.parametrize("cluster_size,refcount_bits", [("64k", 16), ("16k", 64)])
def test_a_flush_cut_short_anywhere_leaves_at_most_leaks(tmp_path, qemu, cluster_size, refcount_bits):
    """(16k clusters with 64-bit refcounts: a refcount block covers 32 MiB, so the 32 MiB write
    needs a new one, far past the refcount table that points at it.)"""
    base = create(str(tmp_path / "base.qcow2"), "20G", cluster_size=cluster_size, refcount_bits=refcount_bits)
    whole = str(tmp_path / "whole.qcow2")
    shutil.copyfile(base, whole)
    writes = _flush_cut_at(whole, None)
    assert writes >= 4  # refcounts, L2 tables, L1, header: several groups to cut between
    assert qemu_check(whole)[0] == 0
    for k in range(writes):
        img = str(tmp_path / f"cut{k}.qcow2")
        shutil.copyfile(base, img)
        _flush_cut_at(img, k)
        rc, report = qemu_check(img)
        assert rc in (0, 3) and not report.get("corruptions"), (k, report)
