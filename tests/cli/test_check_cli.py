"""`qdebug check [-r leaks|all]` and `qdebug repair` against qemu-img, through the command line."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.engine.corruptions import CORRUPTIONS, corrupt, make_shape
from tests.qemu import QEMU_IMG, create, qemu_check, qemu_io

pytestmark = pytest.mark.qemu

# Where `-r` deliberately differs from qemu-img: compressed data is never freed, an L1 entry
# without offset is refused, a misplaced L2 table is not written into, and refcount structures
# are rebuilt in place (QEMU writes new ones at the end, or fails).
DEVIATES = {"compressed_bitmap", "l1_only_flags", "l2_table_unaligned"}
REBUILD = {"refcount_down", "reftable_reserved", "refblock_unaligned", "refblock_outside", "prealloc_unaligned",
           "refblock_dropped"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from tests.qemu import require_qemu

    require_qemu()
    d = tmp_path_factory.mktemp("shapes")
    return {name: make_shape(d, name) for name in ("ext64k", "std64k", "ext16k", "ext32k-snap")}


def qdebug(*args):
    """`qdebug ARGS` in this process (fast), as a CompletedProcess."""
    import contextlib
    import io

    from qdebug.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as e:  # argparse errors
            rc = e.code
    return subprocess.CompletedProcess(args, rc, out.getvalue().encode(), err.getvalue().encode())


def qimg(*args):
    return subprocess.run([QEMU_IMG, *args], capture_output=True)


def _counts(stdout: bytes) -> dict:
    out = json.loads(stdout)
    out.pop("findings", None)
    out.pop("findings-before-repair", None)
    out["filename"] = None
    return out


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_check_json_human_and_exit_code(shapes, name, tmp_path):
    path = str(tmp_path / "img.qcow2")
    shutil.copy(shapes["ext64k"], path)
    corrupt(path, name)
    ours, theirs = qdebug("check", "--output=json", path), qimg("check", "--output=json", path)
    assert ours.returncode == theirs.returncode
    assert _counts(ours.stdout) == _counts(theirs.stdout)
    assert list(json.loads(ours.stdout))[:-1] == list(json.loads(theirs.stdout))
    ours, theirs = qdebug("check", path), qimg("check", path)
    assert ours.stdout == theirs.stdout  # the summary, byte for byte
    for line in theirs.stderr.decode().splitlines():
        if line.startswith(("ERROR", "Leaked", "Can't")):
            assert line in ours.stderr.decode()


@pytest.mark.parametrize("mode", ["leaks", "all"])
@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
@pytest.mark.parametrize("shape", ["ext64k", "std64k", "ext32k-snap"])
def test_check_repair_like_qemu(shapes, shape, name, mode, tmp_path):
    from qdebug.engine.check.repair import check_repair
    from qdebug.engine.errors import QcowError
    from qdebug.engine.file.chain import open_chain

    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    shutil.copy(shapes[shape], ours)
    if corrupt(ours, name) is None:
        pytest.skip("not applicable")
    shutil.copy(ours, theirs)
    q = qimg("check", "-r", mode, "--output=json", theirs)
    try:
        with open_chain(ours, writable=True, no_backing=True) as chain:
            final = check_repair(chain, mode)[2]
        rc, counts = final.exit_code, dict(final.counts(), filename=None)
    except QcowError:
        rc, counts = 1, None
    after_theirs, after_ours = qemu_check(theirs)[0], qemu_check(ours)[0]
    if name in DEVIATES or (mode == "all" and name in REBUILD):
        # never worse than QEMU: clean wherever QEMU's repair is clean
        assert after_ours <= after_theirs or after_theirs == 1 or after_ours == 0
        return
    assert rc == q.returncode
    assert after_ours == after_theirs
    if q.returncode != 1:
        assert counts == _counts(q.stdout)


def test_check_r_all_keeps_compressed_data(shapes, tmp_path):
    path = str(tmp_path / "img.qcow2")
    shutil.copy(shapes["ext64k"], path)
    corrupt(path, "compressed_bitmap")
    o = qdebug("check", "-r", "all", path)
    assert b"its data is not freed" in o.stderr
    assert o.returncode == 2  # the bitmap is still wrong: `qdebug repair` clears it


def test_repair_dry_run_previews_and_writes_nothing(shapes, tmp_path):
    path = str(tmp_path / "img.qcow2")
    shutil.copy(shapes["ext64k"], path)
    corrupt(path, "both_bits_zero_sc")
    before = open(path, "rb").read()
    o = qdebug("repair", "--dry-run", path)
    assert o.returncode == 2, o.stderr  # work to do: `if qdebug repair --dry-run` means "nothing to repair"
    text = o.stdout.decode()
    assert "Allocated cluster has corrupted subcluster allocation bitmap" in text
    assert "keep the data: clear the zero bit of subclusters" in text
    assert "before EIO" in text and "as data" in text and "after " in text
    assert open(path, "rb").read() == before
    j = json.loads(qdebug("repair", "--dry-run", "--output=json", "--policy", "zero", path).stdout)
    (item,) = [i for i in j["plan"]["items"] if i["finding"]]
    assert item["guest-changes"][0]["after"].startswith("00 00")


def test_repair_then_undo_restores_bytes(shapes, tmp_path):
    path = str(tmp_path / "img.qcow2")
    shutil.copy(shapes["ext32k-snap"], path)
    corrupt(path, "both_bits")
    corrupt(path, "refcount_up")
    corrupt(path, "corrupt_bit")
    before = open(path, "rb").read()
    o = qdebug("repair", path)
    assert o.returncode == 0, o.stdout.decode() + o.stderr.decode()
    assert b"no errors were found" in o.stdout
    assert qemu_check(path)[0] == 0
    assert b'"corrupt": false' in qimg("info", "--output=json", path).stdout
    u = qdebug("undo", path)
    assert u.returncode == 0, u.stderr
    assert open(path, "rb").read() == before


def test_repair_entry_option_and_bad_input(shapes, tmp_path):
    path = str(tmp_path / "img.qcow2")
    shutil.copy(shapes["ext64k"], path)
    corrupt(path, "both_bits")
    o = qdebug("repair", "--entry", "0:99", "--dry-run", path)
    # nothing selected, the image still broken: non-zero, like a repair that leaves findings behind
    assert o.returncode == 2 and b"nothing to repair" in o.stdout and b"remain unrepaired" in o.stderr
    o = qdebug("repair", "--entry", "x", path)
    assert o.returncode == 1 and b"bad entry" in o.stderr  # a usage error: 1, as qemu-img
    o = qdebug("repair", "--no-backing", "--dry-run", path)
    assert o.returncode == 2 and b"keep the data" in o.stdout
    o = qdebug("check", str(tmp_path / "missing.qcow2"))
    assert o.returncode == 1 and o.stderr.startswith(b"qdebug: error:") and b"Traceback" not in o.stderr


def test_repair_refuses_an_image_qemu_holds(shapes, tmp_path):
    """Same locking rules as writes: while a QEMU process has the image open, nothing is written."""
    from tests.qemu import QEMU_IO

    path = str(tmp_path / "img.qcow2")
    shutil.copy(shapes["ext64k"], path)
    corrupt(path, "refcount_up")
    before = open(path, "rb").read()
    holder = subprocess.Popen([QEMU_IO, "-f", "qcow2", path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        holder.stdin.write(b"read 0 512\n")
        holder.stdin.flush()
        holder.stdout.readline()  # qemu-io has the image open (and locked) once it answers
        o = qdebug("repair", path)
        assert o.returncode == 1 and b"Is another process using the image" in o.stderr, o.stderr
        o = qdebug("check", "-r", "leaks", path)
        assert o.returncode == 1 and b"Is another process using the image" in o.stderr
    finally:
        holder.communicate(b"quit\n", timeout=30)
    assert open(path, "rb").read() == before
    assert qdebug("repair", path).returncode == 0


def test_repair_overlay_with_missing_backing(tmp_path):
    path = make_shape(tmp_path, "ext64k-backing")
    corrupt(path, "both_bits")
    import os

    os.remove(str(tmp_path / "ext64k-backing-base.raw"))
    o = qdebug("repair", path)
    assert o.returncode == 1 and b"not found" in o.stderr and b"Traceback" not in o.stderr
    o = qdebug("repair", "--no-backing", path)
    assert o.returncode == 0, o.stdout + o.stderr
    assert qdebug("check", path).returncode == 1  # as qemu-img: it cannot open it without the backing file
    with open(str(tmp_path / "ext64k-backing-base.raw"), "wb") as f:
        f.write(b"\xee" * (4 << 20))
    assert qemu_check(path)[0] == 0


def test_cli_policy_names_are_the_engines():
    from qdebug.cli.check import POLICY_NAMES
    from qdebug.engine.check.repair import RepairPolicy

    assert POLICY_NAMES == tuple(p.value for p in RepairPolicy)


def test_repair_exit_code_when_findings_remain(qemu, tmp_path):
    """A finding no policy keep-data repair can fix (data at an unaligned offset): the dry run and
    the repair both exit non-zero and say so; with --policy zero it is repaired and exits 0."""
    path = create(str(tmp_path / "u.qcow2"), "1M")
    qemu_io(path, "write -q -P 1 4k 2k")
    with open(path, "r+b") as f:
        f.seek(0x40006)
        f.write(b"\x02")
    o = qdebug("repair", "--dry-run", path)
    assert o.returncode == 2 and b"would remain unrepaired" in o.stderr
    o = qdebug("repair", path)
    assert o.returncode == 2 and b"remain" in o.stdout
    o = qdebug("repair", "--policy", "zero", path)
    assert o.returncode == 0, o.stdout + o.stderr


def test_check_r_all_says_where_it_differs_from_qemu(qemu, tmp_path):
    """iotest 271's unaligned data cluster: qemu-img rebuilds the refcount structure, qdebug fixes
    the refcounts in place and says so; the counts after the repair are qemu-img's."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"\xff" * (128 << 10))
    paths = []
    for n in ("q", "d"):
        p = create(str(tmp_path / f"{n}.qcow2"), "128k", backing=str(base), backing_fmt="raw")
        qemu_io(p, "write -q -P 1 4k 2k")
        with open(p, "r+b") as f:
            f.seek(0x40006)
            f.write(b"\x02")
        paths.append(p)
    q = qimg("check", "-r", "all", paths[0])
    o = qdebug("check", "-r", "all", paths[1])
    assert o.returncode == q.returncode == 2
    assert b"differs from qemu-img check -r all" in o.stderr and b"rebuilds the whole refcount structure" in o.stderr
    assert qemu_check(paths[1])[1].get("corruptions") == qemu_check(paths[0])[1].get("corruptions") == 1


def test_check_fails_like_qemu_img_when_the_backing_file_is_missing(tmp_path, qemu):
    """qemu-img check opens the whole chain first: a missing backing file is exit 1, not a clean
    check of the top layer (issue #17 item 10). With the file back, both check it clean."""
    base = create(str(tmp_path / "base.qcow2"), "1M")
    top = create(str(tmp_path / "top.qcow2"), "1M", backing=base, backing_fmt="qcow2")
    qemu_io(top, "write -P 0x11 0 4k")
    assert qemu_check(top)[0] == 0 and qdebug("check", top).returncode == 0
    shutil.move(base, base + ".away")
    assert qemu_check(top)[0] == 1
    p = qdebug("check", top)
    assert p.returncode == 1
    err = p.stderr.decode() if isinstance(p.stderr, bytes) else p.stderr
    assert err.startswith("qdebug: error: ") and "backing file" in err and "not found" in err
    assert err.count("\n") == 1 and not p.stdout
    from qdebug.scan.task import check_one

    o = check_one(top, True, False)
    assert o.exit_code == 1 and "not found" in o.error  # the scan says the same, as qemu-img check
