"""`qdebug stats` and `qdebug whatif` end to end: totals equal to QEMU's own accounting summed over
the trace (tests/qemu_costs.py), the image untouched, the extended-L2 result on a 4 KiB
random-write workload over a backing file, JSON, charts, and bad input."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys

import pytest

from qdebug.cli import main
from tests.qemu import create, qemu_img, qemu_io
from tests.qemu_costs import qemu_costs, raw_file

pytestmark = pytest.mark.qemu
K = 1024


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def trace_file(path, lines) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def summed(costs) -> dict:
    """QEMU's per-command accounting summed the way `qdebug stats` sums its steps."""
    out = {k: sum(getattr(c, k) for c in costs) for k in (
        "guest_write_bytes", "guest_zero_bytes", "guest_discard_bytes", "host_data_bytes", "cow_bytes",
        "zero_fill_bytes", "allocated_clusters", "l2_tables_allocated", "metadata_bytes")}
    out["file_size_after"] = costs[-1].file_size_after
    return out


def test_stats_totals_equal_qemus_accounting_and_leave_the_image_alone(tmp_path, capsys):
    base = raw_file(tmp_path / "base.raw", 4 << 20, 0x5A)
    img = create(str(tmp_path / "img.qcow2"), "4M", backing=base, backing_fmt="raw")
    rng = random.Random(7)
    cmds = [f"write -P 0x{i + 1:x} {rng.randrange(1024) * 4096} 4k" for i in range(30)]
    cmds += ["write -z 1M 128k", "discard 2M 64k", "write -P 0x33 100k 3k"]
    trace = trace_file(tmp_path / "t", cmds)
    before = digest(img)
    assert main(["stats", img, trace, "--output=json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert main(["stats", img, trace]) == 0
    text = capsys.readouterr().out
    assert "dry run: the image is untouched" in text and f"COW:              {ours['cow-bytes']:,} bytes" in text
    assert digest(img) == before
    theirs = summed(qemu_costs(img, cmds, [(base, "raw")]))
    assert {k: ours[k.replace("_", "-")] for k in theirs} == theirs
    assert ours["commands"] == len(cmds) and ours["failed-commands"] == 0
    assert ours["write-amplification"] == pytest.approx(
        (ours["host-data-bytes"] + ours["metadata-bytes"]) / ours["guest-write-bytes"], rel=1e-5)


def test_stats_of_the_seed_example(tmp_path, capsys):
    """The seed's cluster: 54 KiB of COW for a 2 KiB write, 4 KiB of it avoidable."""
    base = raw_file(tmp_path / "base.raw", 1 << 20)
    img = create(str(tmp_path / "seed.qcow2"), "1M", backing=base, backing_fmt="raw")
    qemu_io(img, "write -P 1 8k 4k", "write -P 2 16k 48k", "write -z 4k 2k", "write -z 14k 2k")
    qemu_img("snapshot", "-c", "s1", img)
    assert main(["stats", img, trace_file(tmp_path / "t", ["write -P 0x55 16k 2k"]), "--output=json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["cow-bytes"], out["cow-avoidable-bytes"], out["host-data-bytes"]) == (54 * K, 4 * K, 56 * K)
    assert out["avoidable-share"] == pytest.approx(4 / 54, abs=1e-6)


def test_stats_refuses_bad_input_in_one_line(tmp_path):
    img = create(str(tmp_path / "i.qcow2"), "1M")
    bad = trace_file(tmp_path / "bad", ["write 0 4k", "write -P 0x1 zz 4k"])
    good = trace_file(tmp_path / "good", ["write 0 4k"])
    for args, words in (([img, bad], "bad:2"), ([img, str(tmp_path / "none")], "cannot read the trace"),
                        ([str(tmp_path / "missing.qcow2"), good], "missing.qcow2")):
        p = subprocess.run([sys.executable, "-m", "qdebug.cli", "stats", *args], capture_output=True, text=True)
        assert p.returncode != 0 and p.stdout == ""
        assert len(p.stderr.strip().splitlines()) == 1 and words in p.stderr and "Traceback" not in p.stderr


def _random_4k_writes(path, size: int, n: int, seed: int = 3) -> str:
    rng = random.Random(seed)
    return trace_file(path, [f"write -P 0x{i % 255 + 1:x} {rng.randrange(size // 4096) * 4096} 4k"
                             for i in range(n)])


def test_whatif_shows_what_extended_l2_was_made_for(tmp_path, capsys):
    """4 KiB random writes over a backing file full of data: with subclusters much less COW and a
    smaller file than without, for 64 KiB clusters and more so for larger ones."""
    size = 64 << 20
    base = raw_file(tmp_path / "base.raw", size)
    trace = _random_4k_writes(tmp_path / "t", size, 200)
    assert main(["whatif", trace, "--size", "64M", "-b", base, "-F", "raw", "--cluster-size", "64k,128k,2M",
                 "--jobs", "2", "--output=json"]) == 0
    rows = {(r["cluster-size"], r["extended-l2"]): r for r in json.loads(capsys.readouterr().out)}
    assert len(rows) == 6
    for cs in (65536, 131072, 2 << 20):
        on, off = rows[cs, True], rows[cs, False]
        assert on["cow-bytes"] < off["cow-bytes"] / 4
        # 200 writes touch every one of the 32 2 MiB clusters either way: the files are as large
        assert on["file-size-after"] < off["file-size-after"] or cs == 2 << 20 and \
            on["file-size-after"] == off["file-size-after"]
        assert on["guest-write-bytes"] == off["guest-write-bytes"] == 200 * 4096
        assert on["l2-cache-bytes"] == 2 * off["l2-cache-bytes"] == size // cs * 16
    assert rows[65536, True]["cow-bytes"] < rows[2 << 20, True]["cow-bytes"]
    assert sum(r["recommended"] for r in rows.values()) == 1


def test_whatif_row_is_stats_on_a_fresh_image_of_that_geometry(tmp_path, capsys):
    size = 16 << 20
    base = raw_file(tmp_path / "base.raw", size, 0x11)
    trace = _random_4k_writes(tmp_path / "t", size, 40, seed=9)
    assert main(["whatif", trace, "--size", "16M", "-b", base, "-F", "raw", "--cluster-size", "128k",
                 "--extended-l2", "on", "--refcount-bits", "8", "--output=json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    img = create(str(tmp_path / "g.qcow2"), size, cluster_size="128k", extended_l2=True, backing=base,
                 backing_fmt="raw", refcount_bits=8)
    assert main(["stats", img, trace, "--output=json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in row.items() if k in stats and k not in ("image", "trace")} == \
        {k: v for k, v in stats.items() if k not in ("image", "trace")}


def test_whatif_text_chart_and_notes(tmp_path, capsys):
    trace = _random_4k_writes(tmp_path / "t", 8 << 20, 30)
    svg, png = str(tmp_path / "c.svg"), str(tmp_path / "c.png")
    assert main(["whatif", trace, "--size", "8M", "--cluster-size", "4k,64k", "--chart", svg]) == 0
    out, err = capsys.readouterr()
    assert "left out 4 KiB clusters with extended L2" in err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["geometry", "guest", "written"]
    assert [ln.split()[0] for ln in lines[1:4]] == ["4k", "64k", "64k"]
    assert any(ln.startswith("recommended: ") for ln in lines) and "host bytes written:" in out
    with open(svg) as f:
        assert "<svg" in f.read(2000)
    assert main(["whatif", trace, "--size", "8M", "--cluster-size", "64k", "--chart", png, "--output=json"]) == 0
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.loads(capsys.readouterr().out)[0]["cluster-size"] == 65536


@pytest.mark.parametrize("args, words", [
    (["--chart", "x.gif"], "an .svg or a .png"),
    (["-b", "nowhere.raw", "-F", "raw"], "no such backing file"),
    (["-b", "nowhere.raw"], "without backing format"),
    (["--cluster-size", "4k", "--extended-l2", "on"], "no geometry left"),
])
def test_whatif_refuses_bad_input_in_one_line(tmp_path, args, words):
    trace = _random_4k_writes(tmp_path / "t", 1 << 20, 3)
    p = subprocess.run([sys.executable, "-m", "qdebug.cli", "whatif", trace, "--size", "1M", *args],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode != 0 and words in p.stderr and "Traceback" not in p.stderr


def test_whatif_shows_the_minimal_cow_policy_beside_qemus(tmp_path, capsys):
    """--policy minimal-cow: a row beside each extended-L2 geometry, labelled not QEMU, never the
    recommendation. A fresh image never has avoidable COW (a cluster only moves when a snapshot
    shares it): the rows agree there; stats on the seed's snapshot-shared cluster shows the gap."""
    size = 8 << 20
    base = raw_file(tmp_path / "base.raw", size, 0x42)
    trace = _random_4k_writes(tmp_path / "t", size, 40)
    assert main(["whatif", trace, "--size", "8M", "-b", base, "-F", "raw", "--cluster-size", "128k",
                 "--policy", "minimal-cow", "--output=json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["extended-l2"], r["policy"]) for r in rows] == [(True, "qemu"), (True, "minimal-cow"), (False, "qemu")]
    qemu, minimal = rows[0], rows[1]
    assert minimal["cow-bytes"] == qemu["cow-bytes"] - qemu["cow-avoidable-bytes"]
    assert not minimal["recommended"]
    assert main(["whatif", trace, "--size", "8M", "-b", base, "-F", "raw", "--cluster-size", "64k",
                 "--extended-l2", "on", "--policy", "minimal-cow"]) == 0
    assert "64k ext-l2 minimal-COW (not QEMU)" in capsys.readouterr().out
    seed = raw_file(tmp_path / "seed-base.raw", 1 << 20)
    img = create(str(tmp_path / "seed.qcow2"), "1M", backing=seed, backing_fmt="raw")
    qemu_io(img, "write -P 1 8k 4k", "write -P 2 16k 48k", "write -z 4k 2k", "write -z 14k 2k")
    qemu_img("snapshot", "-c", "s1", img)
    one = trace_file(tmp_path / "one", ["write -P 0x55 16k 2k"])
    assert main(["stats", img, one, "--policy", "minimal-cow", "--output=json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["policy"], out["cow-bytes"], out["cow-avoidable-bytes"]) == ("minimal-cow", 50 * K, 0)
    assert main(["stats", img, one, "--policy", "minimal-cow"]) == 0
    assert "NOT QEMU" in capsys.readouterr().out


def test_replay_log_costs_add_up_to_stats(tmp_path, capsys):
    """`replay --log-costs` gives every step record its cost; summed, they are what stats reports."""
    base = raw_file(tmp_path / "base.raw", 4 << 20, 0x21)
    img = create(str(tmp_path / "i.qcow2"), "4M", cluster_size="128k", backing=base, backing_fmt="raw")
    trace = _random_4k_writes(tmp_path / "t", 4 << 20, 30, seed=5)
    assert main(["stats", img, trace, "--output=json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    log = tmp_path / "steps.jsonl"
    assert main(["replay", "--dry-run", "--log", str(log), "--log-costs", img, trace]) == 0
    costs = [json.loads(ln)["cost"] for ln in log.read_text().splitlines()]
    assert len(costs) == 30
    for key in ("guest-write-bytes", "host-data-bytes", "cow-bytes", "metadata-bytes", "allocated-clusters"):
        assert sum(c[key] for c in costs) == stats[key], key
    assert main(["replay", "--dry-run", "--log", str(log), img, trace]) == 0
    assert "cost" not in json.loads(log.read_text().splitlines()[0])
