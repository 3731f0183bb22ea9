"""`qdebug trace import` on real workloads, end to end.

fio: real fio jobs on a scratch file write iologs (v3; v2 made from them by dropping timestamps);
the imported script must replay in qemu-io (every `read -P` check passing) and in `qdebug replay`,
to the same guest data, which must be what the writes' patterns say wherever the trace decides it.
QEMU: real `qemu-io -T` logs; importing them gives back the commands that made them, and replaying
the import through `qemu-io -T` again logs the same guest-facing request sequence.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess

import pytest

from qdebug.cli import main
from qdebug.trace.importers import GuestContent, import_trace
from tests.engine.harness import same_guest_data
from tests.qemu import QEMU_IO, convert_raw, create
from tests.trace.fio_jobs import JOBS, as_version2, run_fio

pytestmark = pytest.mark.qemu


def _qemu_io_script(image: str, script: str, *trace_events: str, cache: str = "writeback") -> tuple[str, str]:
    """(stdout, stderr) of one qemu-io process reading `script` on stdin."""
    args = [QEMU_IO, "-f", "qcow2", "-t", cache]
    for ev in trace_events:
        args += ["-T", ev]
    p = subprocess.run([*args, image], input=(script + "quit\n").encode(), capture_output=True)
    return p.stdout.decode(), p.stderr.decode()


def _image_for(trace, folder, name: str, **opts) -> str:
    size = max(1 << 20, -(-trace.size_needed // (1 << 20)) * (1 << 20))
    return create(str(folder / name), size, **opts)


def _expected_content(trace) -> GuestContent:
    content = GuestContent()
    for c in trace.commands:
        if c.op == "write":
            content.set(c.offset, c.end, 0 if c.zero else c.pattern)
        elif c.op == "discard":
            content.set(c.offset, c.end, None)
    return content


@pytest.mark.parametrize("job", list(JOBS))
def test_fio_iolog_replays_alike_in_qemu_io_and_qdebug(qemu, tmp_path, job):
    log = run_fio(job, str(tmp_path))
    kw = {"select": "randrw-2files.0.1"} if job == "randrw-2files" else {}
    trace = import_trace(log, "fio", pattern_seed=5, **kw)
    assert trace.to_text() == import_trace(as_version2(log, str(tmp_path / "v2.iolog")), "fio", pattern_seed=5,
                                           **kw).to_text()
    # the import keeps every I/O line of the chosen file, in order
    name = trace.selected
    want = []
    for line in open(log).read().splitlines()[1:]:
        w = line.split()
        if w[1] == name and len(w) == 5:
            want.append(("flush", 0, 0) if w[2] in ("sync", "datasync") else
                        ({"trim": "discard"}.get(w[2], w[2]), int(w[3]), int(w[4])))
    got = [(c.op if c.op != "flush" else "flush", c.offset, c.length) for c in trace.commands]
    assert got == want and len(got) >= 8
    if job == "randrw-2files":
        assert any(c.op == "read" and c.pattern is not None for c in trace.commands), "no read became a check"

    script = tmp_path / "w.trace"
    script.write_text(trace.to_text())
    ref = _image_for(trace, tmp_path, "ref.qcow2")
    mine = shutil.copyfile(ref, tmp_path / "mine.qcow2")
    out, err = _qemu_io_script(ref, trace.to_text())
    assert "failed" not in out + err and "Pattern verification" not in out + err, (out + err)[-400:]
    assert main(["replay", str(mine), str(script)]) == 0
    assert same_guest_data(str(mine), ref)
    raw = convert_raw(ref, str(tmp_path / "ref.raw"))
    content = _expected_content(trace)
    for start, value, end in zip(content._starts, content._values, content._starts[1:] + [len(raw)]):
        if value is not None:
            assert raw[start:end] == bytes([value]) * (end - start), f"guest [{start}, {end}) is not 0x{value:x}"


_EV = re.compile(r"^blk_co_pwritev blk \S+ bs \S+ offset (\d+) bytes (\d+) flags (0x[0-9a-f]+)$")


def _requests(stderr: str) -> list[tuple[int, int, str]]:
    return [(int(m[1]), int(m[2]), m[3]) for m in map(_EV.match, stderr.splitlines()) if m]


def _workload(seed: int, size: int, cs: int) -> list[str]:
    """Random guest writes of every kind QEMU's write events carry (discards and flushes left in:
    they leave no event, so the import must not invent them)."""
    rng = random.Random(seed)
    out = [f"write -c -P 0x3c {size - cs} {cs}"]  # compressed, into a cluster nothing else has touched yet
    for _ in range(60):
        kind = rng.choice(["write", "write", "write", "zero", "zero-u", "discard", "flush"])
        length = rng.randrange(1, 3 * cs // 512) * 512 if rng.random() < 0.8 else rng.randrange(1, 3 * cs)
        off = rng.randrange(0, size - cs - length)
        out.append({"write": f"write -P 0x{rng.randrange(1, 256):x} {off} {length}",
                    "zero": f"write -z {off} {length}", "zero-u": f"write -z -u {off} {length}",
                    "discard": f"discard {off} {length}", "flush": "flush"}[kind])
    return out


@pytest.mark.parametrize("seed, cs, ext, backing", [(1, 65536, True, None), (2, 16384, False, "raw"),
                                                   (3, 131072, True, "qcow2")])
def test_qemu_trace_round_trip(qemu, tmp_path, seed, cs, ext, backing):
    size = 4 << 20
    base = None
    if backing == "raw":
        base = str(tmp_path / "base.raw")
        with open(base, "wb") as f:
            f.write(bytes([0xEE]) * size)
    elif backing == "qcow2":
        base = create(str(tmp_path / "base.qcow2"), size)
        _qemu_io_script(base, "write -P 0x5b 0 1M\n")
    opts = {"cluster_size": str(cs), "extended_l2": ext, "backing": base, "backing_fmt": backing}
    original = create(str(tmp_path / "orig.qcow2"), size, **opts)
    pristine = shutil.copyfile(original, tmp_path / "pristine.qcow2")
    cmds = _workload(seed, size, cs)
    _, err1 = _qemu_io_script(original, "\n".join(cmds) + "\n", "blk_co_pwritev")
    (tmp_path / "blk.log").write_text(err1)
    trace = import_trace(str(tmp_path / "blk.log"), "qemu-trace", pattern_seed=seed)

    # the guest-facing requests come back as the commands that made them (discards and flushes leave no event)
    def shape(text: str) -> tuple:
        w = text.split()
        return (w[0], "-z" in w, "-u" in w, "-c" in w, int(w[-2]), int(w[-1]))

    assert [shape(c.to_qemu_io()) for c in trace.commands] == [shape(c) for c in cmds if c.startswith("write")]

    # ... as read from the node events too, the node being the one a BlockBackend roots
    _, err2 = _qemu_io_script(shutil.copyfile(pristine, tmp_path / "b.qcow2"), "\n".join(cmds) + "\n",
                              "bdrv_co_pwritev_part", "blk_root_attach", "blk_root_detach")
    (tmp_path / "node.log").write_text(err2)
    assert import_trace(str(tmp_path / "node.log"), "qemu-trace", pattern_seed=seed).to_text() == trace.to_text()

    # replaying the import through qemu-io -T gives the same guest-facing request sequence
    replayed = shutil.copyfile(pristine, tmp_path / "replayed.qcow2")
    _, err3 = _qemu_io_script(str(replayed), trace.to_text(), "blk_co_pwritev")
    assert _requests(err3) == _requests(err1) and len(_requests(err1)) > 20

    # and qdebug replays it to the same guest data
    mine = shutil.copyfile(pristine, tmp_path / "mine.qcow2")
    (tmp_path / "t.trace").write_text(trace.to_text())
    assert main(["replay", str(mine), str(tmp_path / "t.trace")]) == 0
    assert same_guest_data(str(mine), str(replayed))
