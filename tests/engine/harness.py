"""Shared helpers of the write-engine tests: run commands through qdebug as one qemu-io process
would, and compare two images the way the differential tests need (guest data via qemu-img
compare, metadata byte for byte: same L1, L2 tables, refcount structures and host offsets)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np

from qdebug.engine.file.chain import open_chain
from qdebug.engine.file.image import open_image
from qdebug.engine.format import constants as C
from qdebug.engine.write.txn import WriteMode
from qdebug.engine.write.writer import WriteEngine
from qdebug.trace.commands import parse_line
from tests.qemu import QEMU_IMG, QEMU_IO, require_qemu

# The engine mode qdebug_process uses; the `engine_mode` fixture runs a test in both.
MODE = {"writeback": False}


def qdebug_process(path: str, cmds: list[str]):
    """All `cmds` through one WriteEngine (one 'process'); returns the StepRecords. In write-back
    mode the metadata reaches the file at the end, as a replay's last flush does."""
    chain = open_chain(path, writable=True)
    try:
        eng = WriteEngine(chain, WriteMode.WRITE_BACK if MODE["writeback"] else WriteMode.EXECUTE)
        results = [eng.run(parse_line(c), i) for i, c in enumerate(cmds)]
        eng.flush()
        return results
    finally:
        chain.close()


def qemu_process(path: str, cmds: list[str], *, stdin: bool = True, cache: str = "writeback") -> str:
    """All `cmds` through one qemu-io process (writeback cache unless asked), commands on stdin."""
    require_qemu()
    text = "\n".join(cmds + ["quit"]) + "\n"
    p = subprocess.run([QEMU_IO, "-f", "qcow2", "-t", cache, path], input=text.encode(),
                       capture_output=True)
    return p.stdout.decode() + p.stderr.decode()


def metadata(path: str) -> dict:
    """Header fields, L1, every L2 table and every refcount (by host cluster) of an image."""
    with open_image(path) as img:
        h = img.header
        out = {"l1_offset": h.l1_table_offset, "l1_size": h.l1_size,
               "reftable_offset": h.refcount_table_offset, "incompat": h.incompatible_features,
               "l1": np.array(img.l1).tolist(), "reftable": np.array(img.reftable).tolist()}
        l2 = {}
        for i, e in enumerate(img.l1):
            off = int(e) & C.L1E_OFFSET_MASK
            if off:
                l2[i] = img.pread(off, img.cluster_size)
        out["l2"] = l2
        nclusters = -(-img.file_size // img.cluster_size)
        out["refcounts"] = [img.refcount(i) for i in range(nclusters)]
        while out["refcounts"] and out["refcounts"][-1] == 0:
            out["refcounts"].pop()
    return out


def assert_same_metadata(a: str, b: str) -> None:
    ma, mb = metadata(a), metadata(b)
    for key in ("l1_offset", "l1_size", "reftable_offset", "incompat", "l1", "reftable"):
        assert ma[key] == mb[key], f"{key} differs: qdebug {ma[key]} vs qemu {mb[key]}"
    assert ma["l2"].keys() == mb["l2"].keys()
    for i in ma["l2"]:
        if ma["l2"][i] != mb["l2"][i]:
            wa = np.frombuffer(ma["l2"][i], dtype=">u8")
            wb = np.frombuffer(mb["l2"][i], dtype=">u8")
            bad = np.flatnonzero(wa != wb)[:4]
            raise AssertionError(f"L2 table {i} differs at u64 {bad.tolist()}: qdebug "
                                 f"{[hex(int(wa[j])) for j in bad]} vs qemu {[hex(int(wb[j])) for j in bad]}")
    assert ma["refcounts"] == mb["refcounts"], "refcounts differ"


def same_guest_data(a: str, b: str) -> bool:
    p = subprocess.run([QEMU_IMG, "compare", "-f", "qcow2", "-F", "qcow2", a, b], capture_output=True)
    return p.returncode == 0


def check_verdict(path: str) -> tuple[int, str]:
    p = subprocess.run([QEMU_IMG, "check", path], capture_output=True)
    return p.returncode, p.stdout.decode() + p.stderr.decode()


def copy(src: str, dst: str) -> str:
    shutil.copyfile(src, dst)
    return dst
