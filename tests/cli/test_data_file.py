"""Images with an external data file (`data_file`, incompatible bit 2) against qemu-img / qemu-io 7.2.

qdebug reads them as QEMU does: info, map (human, JSON, --wide, --subclusters), check and read.
What was measured and is checked here, each case through both tools from the same directory:
- the data file name is opened from the current directory (QEMU 7.2 and 10.0 alike), not from
  the image's; a missing data file fails map/check/read (exit 1) while info does not open it;
- an entry with offset 0 and COPIED is allocated (offset 0 is a place in the data file);
- a host offset other than the guest offset, and a compressed entry, fail reads and map where a
  request starts there; check finds neither offset problem, but reports a compressed entry
  ("ERROR compressed cluster N with data file") and COPIED against a refcount of 1;
- data clusters take no reference in the image's refcounts; bit 2 without the name extension and
  the raw bit without bit 2 are refused as QEMU refuses them, the extension without bit 2 ignored.
Commands that write, plan or salvage refuse such images in one line and leave them untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys

import pytest

from tests.qemu import QEMU_IMG, QEMU_IO, require_qemu

pytestmark = pytest.mark.qemu
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "TZ": "UTC", "PYTHONPATH": REPO}


def qemu(cwd, tool: str, *args: str) -> subprocess.CompletedProcess:
    require_qemu()
    return subprocess.run([QEMU_IMG if tool == "img" else QEMU_IO, *args], capture_output=True, cwd=cwd, env=ENV)


def qd(cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qdebug.cli", *args], capture_output=True, cwd=cwd, env=ENV)


def make(cwd, name: str = "a.qcow2", data: str = "d.raw", *, raw: bool = False, extended: bool = True,
         cluster_size: str = "64k", size: str = "8M", writes=(), backing: str | None = None) -> str:
    opts = f"data_file={data},data_file_raw={'on' if raw else 'off'},extended_l2={'on' if extended else 'off'}," \
           f"cluster_size={cluster_size}"
    args = ["create", "-q", "-f", "qcow2", "-o", opts]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    assert qemu(cwd, "img", *args, name, size).returncode == 0
    if writes:
        cmds = [a for w in writes for a in ("-c", w)]
        p = qemu(cwd, "io", "-f", "qcow2", *cmds, name)
        assert p.returncode == 0 and b"failed" not in p.stdout + p.stderr, p.stdout + p.stderr
    return name


def qemu_part(text: bytes) -> bytes:
    return text.split(b"qdebug:\n")[0].rstrip(b"\n") + b"\n"


def without(doc: dict, *keys: str) -> dict:
    for k in keys:
        doc.pop(k, None)
    return doc


def assert_info_same(cwd, image: str) -> None:
    q, d = qemu(cwd, "img", "info", image), qd(cwd, "info", image)
    assert q.returncode == d.returncode == 0, d.stderr
    assert qemu_part(d.stdout) == q.stdout
    q, d = qemu(cwd, "img", "info", "--output=json", image), qd(cwd, "info", "--output=json", image)
    assert json.dumps(without(json.loads(d.stdout), "qdebug"), indent=4).encode() + b"\n" == q.stdout


def assert_map_same(cwd, image: str) -> None:
    for args in (["map", "--output=json", image], ["map", image]):
        q, d = qemu(cwd, "img", *args), qd(cwd, *args)
        assert d.returncode == q.returncode, (args, q.stderr, d.stderr)
        assert d.stdout == q.stdout, args
        if q.returncode:
            assert len(d.stderr.decode().splitlines()) == 1, d.stderr


def assert_check_same(cwd, image: str) -> subprocess.CompletedProcess:
    q, d = qemu(cwd, "img", "check", "--output=json", image), qd(cwd, "check", "--output=json", image)
    assert d.returncode == q.returncode, (q.stdout, q.stderr, d.stdout, d.stderr)
    if q.stdout:
        assert without(json.loads(d.stdout), "findings") == json.loads(q.stdout)
    q, d = qemu(cwd, "img", "check", image), qd(cwd, "check", image)
    assert d.returncode == q.returncode
    ours = [ln.split("  [L1 index")[0] for ln in d.stdout.decode().splitlines()]
    assert ours == q.stdout.decode().splitlines()
    return d


def assert_data_same(cwd, image: str, size: int) -> None:
    """Every guest byte: qemu-img convert's against `qdebug read` (through the data file)."""
    assert qemu(cwd, "img", "convert", "-O", "raw", image, "guest.raw").returncode == 0
    d = qd(cwd, "read", image, "0", str(size), "-o", "ours.raw")
    assert d.returncode == 0, d.stderr
    theirs, ours = (hashlib.sha256((cwd / f).read_bytes()).hexdigest() for f in ("guest.raw", "ours.raw"))
    assert ours == theirs


def random_writes(seed: int, size: int, cs: int) -> list[str]:
    rnd = random.Random(seed)
    out = []
    for _ in range(rnd.randrange(3, 25)):
        off = rnd.randrange(0, size // 512) * 512
        n = min(size - off, rnd.choice([512, 4096, cs // 32, cs, 3 * cs + 1536, rnd.randrange(1, 64) * 512]))
        op = rnd.choices(["write -P", "write -z", "discard", "write -z -u"], [6, 2, 1, 1])[0]
        out.append(f"write -P {rnd.randrange(1, 255)} {off} {n}" if op == "write -P" else f"{op} {off} {n}")
    return out


@pytest.mark.parametrize("seed", range(12))
def test_random_images_read_alike(tmp_path, seed):
    """Images QEMU wrote through random traces, every geometry and both data_file_raw settings:
    info, map, check and every guest byte equal QEMU's."""
    rnd = random.Random(seed)
    extended = seed % 3 != 2
    cs = rnd.choice([16384, 65536, 131072] if extended else [4096, 65536])
    size = 4 << 20
    img = make(tmp_path, raw=seed % 2 == 1, extended=extended, cluster_size=str(cs), size=str(size),
               writes=random_writes(seed, size, cs))
    assert_info_same(tmp_path, img)
    assert_map_same(tmp_path, img)
    assert_check_same(tmp_path, img)
    assert_data_same(tmp_path, img, size)


def test_the_data_file_name_is_taken_from_the_current_directory(tmp_path):
    """QEMU opens a relative data file name from the current directory: run from elsewhere, it
    does not find the image's own data file, and neither does qdebug (saying why)."""
    (tmp_path / "sub").mkdir()
    make(tmp_path / "sub", writes=["write -P 0xaa 0 64k"])
    assert_map_same(tmp_path / "sub", "a.qcow2")
    for args in (["map", "sub/a.qcow2"], ["check", "sub/a.qcow2"], ["read", "sub/a.qcow2", "0", "4096"]):
        q = qemu(tmp_path, "img", *args) if args[0] != "read" else qemu(tmp_path, "io", "-r", "-c", "read 0 4k", args[1])
        d = qd(tmp_path, *args)
        assert q.returncode == d.returncode == 1 and b"d.raw" in q.stderr, (q.stderr, d.stderr)
        line, = d.stderr.decode().splitlines()
        assert "'d.raw' not found" in line and "current directory" in line and str(tmp_path) in line
    # a data file of the same name in the current directory is the one both open
    shutil.copy(tmp_path / "sub" / "d.raw", tmp_path / "d.raw")
    assert_map_same(tmp_path, "sub/a.qcow2")
    assert_data_same(tmp_path, "sub/a.qcow2", 8 << 20)


def test_a_missing_data_file_fails_everything_but_info(tmp_path):
    make(tmp_path, writes=["write -P 1 0 64k"])
    os.rename(tmp_path / "d.raw", tmp_path / "gone.raw")
    assert_info_same(tmp_path, "a.qcow2")  # qemu-img info opens no data file
    warning, = qd(tmp_path, "info", "a.qcow2").stderr.decode().splitlines()  # qdebug says what will fail
    assert warning.startswith("qdebug: warning: a.qcow2: data file 'd.raw' not found from the current directory")
    assert_map_same(tmp_path, "a.qcow2")
    assert_check_same(tmp_path, "a.qcow2")
    d = qd(tmp_path, "read", "a.qcow2", "0", "512")
    assert d.returncode == 1 and d.stdout == b"" and "data file 'd.raw' not found" in d.stderr.decode()


# --- damaged entries -------------------------------------------------------------------------------
def _l2_offset(path) -> int:
    with open(path, "rb") as f:
        head = f.read(512)
        l1 = struct.unpack_from(">Q", head, 40)[0]
        f.seek(l1)
        return struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00


def set_entry(path, index: int, word0: int, bitmap: int) -> None:
    l2 = _l2_offset(path)
    with open(path, "r+b") as f:
        f.seek(l2 + 16 * index)
        f.write(struct.pack(">QQ", word0, bitmap))


COPIED, COMPRESSED = 1 << 63, 1 << 62
DAMAGE = {  # cluster index: (word 0, bitmap), in an image with data in clusters 0 and 16
    "offset-mismatch-first": (0, COPIED | 0x10000, 0xFFFFFFFF),
    "offset-mismatch-later": (16, COPIED | 0x200000, 0x3),
    "offset-zero-elsewhere": (1, COPIED, 0xFFFFFFFF),
    "offset-zero-without-copied": (0, 0, 0xFFFFFFFF),
    "copied-missing": (16, 0x100000, 0x3),
    "compressed": (16, COMPRESSED | 0x100000, 0),
    "compressed-copied-bitmap": (16, COPIED | COMPRESSED | 0x100000, 0x1),
    "mismatch-and-invalid-bitmap": (16, COPIED | 0x200000, 0x300000003),
    "unaligned": (3, COPIED | 0x30200, 0xFF),
    "zero-only-at-zero": (5, COPIED, 0xFF00000000),
    "allocated-at-its-place": (2, COPIED | 0x20000, 0xFFFFFFFF),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaged_entries_fail_and_report_as_qemu(tmp_path, name):
    """map (what is printed before the error too), check and reads of each cluster, as QEMU."""
    make(tmp_path, writes=["write -P 0xaa 0 64k", "write -P 0xbb 1M 4k"])
    index, w0, bm = DAMAGE[name]
    set_entry(tmp_path / "a.qcow2", index, w0, bm)
    assert_map_same(tmp_path, "a.qcow2")
    d = assert_check_same(tmp_path, "a.qcow2")
    if name == "compressed":
        assert json.loads(qd(tmp_path, "check", "--output=json", "a.qcow2").stdout)["findings"][0]["kind"] == \
            "compressed-data-file"
    assert d.stdout
    for cluster in sorted({0, 1, 16, index}):
        q = qemu(tmp_path, "io", "-r", "-f", "qcow2", "-c", f"read {cluster << 16} 64k", "a.qcow2")
        failed = b"read failed" in q.stdout + q.stderr
        r = qd(tmp_path, "read", "a.qcow2", str(cluster << 16), str(1 << 16))
        assert (r.returncode != 0) == failed, (cluster, q.stdout, r.stderr)
        if failed:
            assert len(r.stderr.decode().splitlines()) == 1 and r.stdout == b""
        else:
            q = qemu(tmp_path, "io", "-r", "-f", "qcow2", "-c", f"read -v {cluster << 16} 64k", "a.qcow2")
            assert _hexdump_bytes(q.stdout) == r.stdout


def _hexdump_bytes(out: bytes) -> bytes:
    """The bytes of qemu-io's `read -v` dump."""
    data = bytearray()
    for line in out.decode().splitlines():
        if len(line) > 10 and line[8] == ":" and all(c in "0123456789abcdef" for c in line[:8]):
            data += bytes.fromhex(line[10:58].replace(" ", ""))
    return bytes(data)


def test_data_past_the_end_of_the_data_file_and_a_sparse_metadata_file(tmp_path):
    """A data file cut short reads as zeros past its end; with a sparse metadata file QEMU's
    preallocation heuristics asks the data file for its holes: map says so alike."""
    make(tmp_path, writes=["write -P 0xaa 0 64k", "write -P 0xbb 1M 4k"])
    os.truncate(tmp_path / "d.raw", 32768)
    subprocess.run(["cp", "--sparse=always", "a.qcow2", "s.qcow2"], cwd=tmp_path, check=True)
    for img in ("a.qcow2", "s.qcow2"):
        assert_map_same(tmp_path, img)
        assert_data_same(tmp_path, img, 8 << 20)


def test_map_subclusters_shows_offset_zero_of_the_data_file(tmp_path):
    make(tmp_path, writes=["write -P 0xaa 0 64k", "write -P 0xbb 1M 4k"])
    rows = json.loads(qd(tmp_path, "map", "--subclusters", "--output=json", "a.qcow2").stdout)
    assert [(r["cluster"], r["host-offset"], r["subclusters"]) for r in rows] == [
        (0, 0, "N" * 8 + "_" + "N" * 8 + "_" + "N" * 8 + "_" + "N" * 8),
        (16, 0x100000, "NN------_--------_--------_--------")]
    wide = qd(tmp_path, "map", "--wide", "a.qcow2").stdout.decode()
    assert "0x0             0x10000         0     data        0x0             d.raw" in wide


@pytest.mark.parametrize("case", ["bit-without-name", "name-without-bit", "raw-bit-without-data-file"])
def test_header_combinations_as_qemu_opens_them(tmp_path, case):
    make(tmp_path, writes=["write -P 0xaa 0 64k"])
    path = tmp_path / "a.qcow2"
    buf = bytearray(path.read_bytes()[:65536])
    incompat, autoclear = struct.unpack_from(">QQ", buf, 72)
    if case == "bit-without-name":  # the extension's type renamed: an unknown extension
        i = buf.index(struct.pack(">I", 0x44415441), 104)
        struct.pack_into(">I", buf, i, 0x44415442)
    elif case == "name-without-bit":
        incompat &= ~4
    else:
        incompat &= ~4
        autoclear |= 2
    struct.pack_into(">QQ", buf, 72, incompat, autoclear)
    with open(path, "r+b") as f:
        f.write(buf)
    assert_info_same(tmp_path, "a.qcow2")
    assert_map_same(tmp_path, "a.qcow2")
    assert_check_same(tmp_path, "a.qcow2")


def test_a_backing_file_with_its_own_data_file(tmp_path):
    make(tmp_path, "base.qcow2", "base.raw", writes=["write -P 0x11 0 1M", "write -z 2M 64k"])
    make(tmp_path, "top.qcow2", "top.raw", backing="base.qcow2", writes=["write -P 0x22 512k 4k"])
    assert_map_same(tmp_path, "top.qcow2")
    assert_data_same(tmp_path, "top.qcow2", 8 << 20)
    q, d = qemu(tmp_path, "img", "info", "--backing-chain", "top.qcow2"), qd(tmp_path, "info", "--backing-chain",
                                                                               "top.qcow2")
    assert b"\n\n".join(qemu_part(b) .rstrip(b"\n") for b in d.stdout.split(b"\n\n")) + b"\n" == q.stdout


def rename_data_file(path, old: str, new: str) -> None:
    """Change the data file name in the header extension (same length)."""
    assert len(old) == len(new)
    with open(path, "r+b") as f:
        buf = f.read(65536)
        f.seek(buf.index(old.encode(), 104))
        f.write(new.encode())


def test_data_files_follow_the_backing_file_rules(tmp_path):
    """The name comes from the image: a device or pseudo-file is refused unless --allow-backing
    names it, and an untrusted image's data file must stay in its directory tree."""
    make(tmp_path, data="zzzzzzzzz")
    rename_data_file(tmp_path / "a.qcow2", "zzzzzzzzz", "/dev/zero")
    d = qd(tmp_path, "map", "a.qcow2")
    line, = d.stderr.decode().splitlines()
    assert d.returncode == 1 and "data file '/dev/zero' is a character device" in line
    assert qd(tmp_path, "map", "--allow-backing", "/dev/zero", "a.qcow2").returncode == 0
    (tmp_path / "img").mkdir()
    make(tmp_path / "img", "b.qcow2", str(tmp_path / "outside.raw"), writes=["write -P 3 0 4k"])
    assert qd(tmp_path / "img", "read", "b.qcow2", "0", "4096").stdout == b"\3" * 4096
    d = qd(tmp_path / "img", "read", "--untrusted", "b.qcow2", "0", "4096")
    assert d.returncode == 1 and "outside the image's directory" in d.stderr.decode() and d.stdout == b""
    make(tmp_path, "j.qcow2", "x.raw")
    rename_data_file(tmp_path / "j.qcow2", "x.raw", "nbd:x")  # a protocol prefix is never followed
    d = qd(tmp_path, "map", "j.qcow2")
    assert d.returncode == 1 and "protocol" in d.stderr.decode()


@pytest.mark.parametrize("argv", [
    ["replay", "a.qcow2", "t.trace"], ["replay", "--journal", "a.qcow2", "t.trace"],
    ["replay", "--dry-run", "a.qcow2", "t.trace"], ["plan", "a.qcow2", "write 0 4k"],
    ["stats", "a.qcow2", "t.trace"], ["repair", "a.qcow2"], ["repair", "--dry-run", "a.qcow2"],
    ["check", "-r", "all", "a.qcow2"], ["salvage", "a.qcow2", "-o", "out.raw"],
    ["bundle", "a.qcow2", "-o", "b.qcow2"], ["layout", "a.qcow2"]])
def test_commands_that_write_plan_or_salvage_refuse_in_one_line(tmp_path, argv):
    make(tmp_path, writes=["write -P 0xaa 0 64k"])
    (tmp_path / "t.trace").write_text("write -P 1 0 4k\n")
    before = {f: (tmp_path / f).read_bytes() for f in ("a.qcow2", "d.raw")}
    d = qd(tmp_path, *argv)
    line, = d.stderr.decode().splitlines()
    assert d.returncode != 0 and "external data file ('d.raw')" in line, line
    assert {f: (tmp_path / f).read_bytes() for f in before} == before
    assert sorted(os.listdir(tmp_path)) == ["a.qcow2", "d.raw", "t.trace"]


@pytest.mark.parametrize("bytes_,exclusive", [((103,), False), ((200,), False), ((201,), False), ((101,), False)],
                         ids=["resize-held", "consistent-read-unshared", "write-unshared", "write-held"])
def test_the_data_file_is_locked_as_qemu_locks_it(tmp_path, bytes_, exclusive):
    """A qcow2 reader locks its data file too (7.2: holds "consistent read", refuses to share only
    "resize"): another process's bytes there refuse map, check and reads exactly where and as
    qemu-img / qemu-io refuse them (the data file named in the question), never info."""
    from tests.cli.test_backing_locks import QEMU_IMG as IMG
    from tests.cli.test_backing_locks import READ_0, _hold_bytes, qdebug_words, qemu_words

    make(tmp_path, "dtop.qcow2", "dd.raw", writes=["write -P 5 0 64k"])
    fd = _hold_bytes(str(tmp_path / "dd.raw"), *bytes_, exclusive=exclusive)
    try:
        refused = 0
        for argv, qemu_argv in ((["info", "dtop.qcow2"], [IMG, "info", "dtop.qcow2"]),
                                (["map", "dtop.qcow2"], [IMG, "map", "dtop.qcow2"]),
                                (["map", "-U", "dtop.qcow2"], [IMG, "map", "-U", "dtop.qcow2"]),
                                (["check", "dtop.qcow2"], [IMG, "check", "dtop.qcow2"]),
                                (["read", "dtop.qcow2", "0", "4k", "-o", "/dev/null"], [*READ_0, "dtop.qcow2"])):
            status, words = qemu_words(qemu_argv, tmp_path)
            assert qdebug_words(argv, tmp_path)[:2] == (status, words if status else ""), argv
            refused += status != 0
        # (resize held: all but -U and info; consistent read unshared: -U too; write: nobody)
        assert refused == {(103,): 3, (200,): 4}.get(bytes_, 0)
    finally:
        os.close(fd)


def test_json_outputs_of_a_data_file_image_match_their_schemas(tmp_path):
    from tests.cli.test_json_schemas import conforms

    make(tmp_path, raw=True, writes=["write -P 0xaa 0 64k", "write -P 0xbb 1M 4k"])
    conforms("info", json.loads(qd(tmp_path, "info", "--output=json", "a.qcow2").stdout))
    conforms("map", json.loads(qd(tmp_path, "map", "--output=json", "a.qcow2").stdout))
    conforms("map-subclusters", json.loads(qd(tmp_path, "map", "--subclusters", "--output=json", "a.qcow2").stdout))
    set_entry(tmp_path / "a.qcow2", 16, COMPRESSED | 0x100000, 0)
    report = json.loads(qd(tmp_path, "check", "--output=json", "a.qcow2").stdout)
    assert [f["kind"] for f in report["findings"]] == ["compressed-data-file"]
    conforms("check", report)
