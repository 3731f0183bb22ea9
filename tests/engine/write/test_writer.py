"""WriteEngine behaviour beyond single vectors: QEMU's data-corrupting bug reproduced and flagged,
errors QEMU reports, plan purity, one-process allocator state, plan output."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from qdebug.engine.errors import QcowError
from qdebug.engine.file.chain import open_chain
from qdebug.engine.file.image import open_image
from qdebug.engine.write.create import create_image
from qdebug.engine.write.writer import WriteEngine
from qdebug.trace.commands import parse_line
from tests.engine.harness import (
    assert_same_metadata,
    check_verdict,
    copy,
    metadata,
    qdebug_process,
    qemu_process,
    same_guest_data,
)

pytestmark = pytest.mark.qemu

HAZARD_TRACE = ["write -c -P 0x67 0 64k", "write -P 0x35 1k 3k", "write -P 0x3c 1M 512", "write -c -P 0x8a 2M 64k"]


@pytest.mark.parametrize("extended", [True, False])
def test_qemu_bug_reproduced_and_flagged(qemu, tmp_path, extended):
    img = str(tmp_path / "a.qcow2")
    create_image(img, 4 << 20, extended_l2=extended)
    ref = copy(img, str(tmp_path / "ref.qcow2"))
    results = qdebug_process(img, HAZARD_TRACE + ["read -P 0x3c 1M 512"])
    out = qemu_process(ref, HAZARD_TRACE + ["read -P 0x3c 1M 512"])
    assert [bool(r.hazards) for r in results[:4]] == [False, False, False, True]
    (hz,) = results[3].hazards
    # The compressed bytes land at host 0x5004f.., inside the 512 bytes guest 1M holds there.
    assert hz.guest_range is not None and (1 << 20) <= hz.guest_range[0] < hz.guest_range[1] <= (1 << 20) + 512
    assert "hazard" in hz.message and "guest cluster 16" in hz.owner
    # Same corrupted image as QEMU, and the same failed pattern check afterwards.
    assert same_guest_data(img, ref)
    assert_same_metadata(img, ref)
    rc, text = check_verdict(ref)
    assert rc != 0 and "OFLAG_COPIED data cluster" in text
    assert check_verdict(img)[1] == text.replace("ref.qcow2", "a.qcow2")
    assert "Pattern verification failed" in out
    assert results[4].error == "Pattern verification failed at offset 1048576, 512 bytes"


def test_stale_packing_into_an_l2_table_is_stopped_like_qemu(qemu, tmp_path):
    """When the freed cluster became an L2 table, QEMU's overlap check refuses the compressed
    write, marks the image corrupt, and the qemu-io process can do nothing more.

    Known difference: QEMU then drops the metadata still dirty in its caches (here guest 300M's
    L2 entry and its data cluster's refcount from the previous command); qdebug has written
    them through, so only the corrupt bit, the errors and this write's own effects are compared."""
    img = str(tmp_path / "a.qcow2")
    create_image(img, 1 << 30)
    ref = copy(img, str(tmp_path / "ref.qcow2"))
    cmds = ["write -c -P 0x67 0 64k", "write -P 0x35 1k 3k", "write -P 0x3c 300M 512", "write -c -P 0x8a 2M 64k",
            "write -P 1 4M 512"]
    results = qdebug_process(img, cmds)
    out = qemu_process(ref, cmds)
    assert [r.error for r in results][3:] == [
        "write failed: Input/output error (Preventing invalid write on metadata (overlaps with active L2 table))",
        "write failed: No medium found"]
    assert "write failed: Input/output error" in out and "write failed: No medium found" in out
    for path in (img, ref):
        with open_image(path) as im:
            assert im.header.is_corrupt
            assert im.l2_entry(32)[0] == 0  # guest 2M: the refused compressed write left no entry
            assert im.refcount(5) == 1  # the L2 table in host cluster 5 got no extra reference


def test_in_place_write_into_shared_cluster_is_a_hazard(qemu, tmp_path):
    """After the bug, guest 1M's cluster has COPIED but refcount 2: QEMU writes it in place and the
    compressed cluster sharing it changes too. qdebug does the same and says so."""
    img = str(tmp_path / "a.qcow2")
    create_image(img, 4 << 20)
    ref = copy(img, str(tmp_path / "ref.qcow2"))
    cmds = HAZARD_TRACE + ["write -P 0x11 1M 4k", "write -P 0x12 3M 4k"]
    results = qdebug_process(img, cmds)
    qemu_process(ref, cmds)
    assert results[4].hazards and "refcount is 2" in results[4].hazards[0].message
    assert not results[5].hazards
    # Guest 2M's compressed bytes are overwritten now (qemu-img compare cannot even read it):
    # compare the files themselves.
    assert open(img, "rb").read() == open(ref, "rb").read()
    assert_same_metadata(img, ref)


def test_plan_is_pure_and_matches_execute(tmp_path):
    img = str(tmp_path / "a.qcow2")
    create_image(img, 4 << 20)
    before = open(img, "rb").read()
    chain = open_chain(img, writable=True)
    eng = WriteEngine(chain)
    cmds = [parse_line(c) for c in ["write -P 1 3k 512", "write -P 2 60k 8k", "write -z -u 0 64k",
                                     "write -c -P 3 128k 64k", "discard 64k 64k"]]
    for c in cmds:
        plan = eng.plan(c)
        assert open(img, "rb").read() == before, "plan() changed the file"
        res = eng.run(c)
        assert res.plan == plan
        assert [(w.offset, w.length, w.what) for w in res.plan.host_writes] == [
            (w.offset, w.length, w.what) for w in plan.host_writes]
        before = open(img, "rb").read()
        assert json.loads(json.dumps(plan.to_json()))["command"] == c.text
        assert plan.to_text().startswith(c.text)
    chain.close()


def test_restore_state_reproduces_allocation(tmp_path):
    """The compressed packing offset is process state: restoring it decides where the next
    compressed cluster goes (packed after the last one, or a fresh cluster as in a new process)."""
    img = str(tmp_path / "a.qcow2")
    create_image(img, 4 << 20)
    chain = open_chain(img, writable=True)
    eng = WriteEngine(chain)
    eng.run(parse_line("write -c -P 1 0 64k"))
    packed = eng.state
    nxt = parse_line("write -c -P 2 64k 64k")
    p_packed = eng.plan(nxt)
    fresh = WriteEngine(chain).plan(nxt)
    assert p_packed.requests[-1].host_offset < 0x60000 <= fresh.requests[-1].host_offset
    eng.restore_state(WriteEngine(chain).state)
    assert eng.plan(nxt) == fresh
    eng.restore_state(packed)
    assert eng.plan(nxt) == p_packed
    chain.close()


def test_errors_like_qemu(qemu, tmp_path):
    img = str(tmp_path / "a.qcow2")
    create_image(img, 1 << 20)
    ref = copy(img, str(tmp_path / "ref.qcow2"))
    cmds = ["write -P 1 0 64k", "write -c -P 2 0 64k", "write -c 4k 64k", "write 1M 1", "discard 2M 64k",
            "write -c -P 3 64k 64k", "read -P 3 64k 64k", "read -P 4 64k 512"]
    results = qdebug_process(img, cmds)
    out = qemu_process(ref, cmds)
    errors = [r.error for r in results]
    assert errors == [None, "write failed: Input/output error", "write failed: Invalid argument",
                      "write failed: Input/output error", "discard failed: Input/output error", None, None,
                      "Pattern verification failed at offset 65536, 512 bytes"]
    for e in errors:
        if e:
            assert e in out
    assert same_guest_data(img, ref)
    assert_same_metadata(img, ref)


def test_read_only_chain_refused(tmp_path):
    img = str(tmp_path / "a.qcow2")
    create_image(img, 1 << 20)
    with open_chain(img) as chain, pytest.raises(QcowError, match="read-only"):
        WriteEngine(chain)


@pytest.mark.parametrize("cs,bits,ext", [(512, 64, False), (1024, 32, False), (16384, 64, True)])
def test_refcount_blocks_and_table_grow_like_qemu(qemu, engine_mode, tmp_path, cs, bits, ext):
    """Writes that run past the refcount blocks (and the refcount table) QEMU created: new blocks
    after the data run, EAGAIN restarts, a 1.5x refcount table at the end of the file."""
    img = str(tmp_path / "a.qcow2")
    create_image(img, 64 << 20, cluster_size=cs, extended_l2=ext, refcount_bits=bits)
    ref = copy(img, str(tmp_path / "ref.qcow2"))
    step = 48 * cs
    cmds = [f"write -P {i % 250 + 1} {i * step + (i % 3) * 512} {step}" for i in range(40)]
    cmds += ["discard 0 1M", "write -P 7 8M 3M", "write -z -u 2M 1M", "write -c -P 9 60M %d" % cs]
    results = qdebug_process(img, cmds)
    qemu_process(ref, cmds)
    assert [r.error for r in results] == [None] * len(cmds)
    assert same_guest_data(img, ref)
    assert_same_metadata(img, ref)
    assert check_verdict(img)[0] == 0


def test_multi_cluster_compressed_write(qemu, tmp_path):
    """QEMU compresses the clusters of one `write -c` in parallel tasks, so their packing order
    varies from run to run; qdebug packs them in guest order, one of QEMU's orders. The set of
    packed offsets, the data and the refcounts are the same."""
    img = str(tmp_path / "a.qcow2")
    create_image(img, 4 << 20)
    ref = copy(img, str(tmp_path / "ref.qcow2"))
    qdebug_process(img, ["write -c -P 5 0 512k"])
    qemu_process(ref, ["write -c -P 5 0 512k"])
    ma, mb = metadata(img), metadata(ref)
    wa = np.frombuffer(ma["l2"][0], dtype=">u8")[0:16:2]
    wb = np.frombuffer(mb["l2"][0], dtype=">u8")[0:16:2]
    offsets = [w & ((1 << 54) - 1) for w in wa.tolist()]
    assert sorted(wa.tolist()) == sorted(wb.tolist()) and offsets == sorted(offsets)
    assert ma["refcounts"] == mb["refcounts"]
    assert same_guest_data(img, ref)


def test_pieces_of_one_request_allocate_before_any_frees(qemu, tmp_path):
    """QEMU runs the host-contiguous pieces of one request as parallel tasks: the compressed
    cluster piece 1 replaces is freed only after piece 3 got its cluster, so piece 3 does not
    reuse it (a sequential model would put guest cluster 3 at 0x50000)."""
    img = str(tmp_path / "a.qcow2")
    create_image(img, 1 << 20)
    ref = copy(img, str(tmp_path / "ref.qcow2"))
    for path, run in ((img, qdebug_process), (ref, qemu_process)):
        run(path, ["write -c -P 1 64k 64k"])
        run(path, ["write -P 2 128k 64k"])
        run(path, ["write -P 3 126k 100k", "write -P 4 512k 4k"])
    assert_same_metadata(img, ref)
    assert same_guest_data(img, ref)
    with open_image(img) as im:
        assert [im.l2_entry(c)[0] & 0xFFFFFFFFFE00 for c in (1, 2, 3, 8)] == [0x70000, 0x60000, 0x80000, 0x50000]


def test_zero_cow_reusing_a_freed_cluster_zeroes_its_old_data(qemu, engine_mode, tmp_path):
    """QEMU's zero-COW shortcut (skip_cow) zeroes the new cluster with one write-zeroes before the
    data: a freed host cluster reused for a small write must not show its old bytes around it,
    and a cluster past the end of the file is zero by extending the file."""
    img = str(tmp_path / "a.qcow2")
    create_image(img, 4 << 20)
    ref = copy(img, str(tmp_path / "ref.qcow2"))
    cmds = ["write -P 0x77 0 64k", "write -P 0x78 64k 64k", "discard 0 64k",
            "write -P 0x12 1049600 512", "write -P 0x13 2M 512", "read -P 0 1M 1k", "read -P 0 1050112 512"]
    results = qdebug_process(img, cmds)
    qemu_process(ref, cmds)
    assert [r.error for r in results] == [None] * len(cmds)
    first = results[3].plan.requests[0].metas[0]
    assert first.skip_cow and first.alloc_offset == results[0].plan.requests[0].host_offset  # reused
    assert same_guest_data(img, ref)
    assert_same_metadata(img, ref)
    assert os.path.getsize(img) == os.path.getsize(ref)
