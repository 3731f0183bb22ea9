"""`qdebug map` without --output prints qemu-img map's human columns byte for byte (differential);
the Depth/Status table is `--wide`."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from tests.qemu import create, qemu_io, require_qemu

QDEBUG = [sys.executable, "-m", "qdebug.cli"]


def _both(path: str, *extra: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    q = subprocess.run(["qemu-img", "map", *extra, path], capture_output=True, text=True, cwd=None)
    d = subprocess.run([*QDEBUG, "map", *extra, path], capture_output=True, text=True)
    return q, d


@pytest.mark.parametrize("seed", range(4))
def test_human_map_is_qemu_imgs(tmp_path, seed):
    require_qemu()
    rng = random.Random(seed)
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    create(base, "8M", cluster_size=rng.choice(["16k", "64k"]))
    create(top, "8M", cluster_size=rng.choice(["32k", "64k"]), backing=base)
    for path in (base, top):
        cmds = []
        for _ in range(12):
            off = rng.randrange(0, 8 << 20, 2048)
            ln = min(rng.choice([2048, 4096, 65536, 200 << 10]), (8 << 20) - off)
            cmds.append(rng.choice([f"write -P {rng.randrange(1, 255)} {off} {ln}", f"write -z {off} {ln}",
                                    f"discard {off} {ln}"]))
        qemu_io(path, *cmds)
    for path in (base, top):
        q, d = _both(path)
        assert d.returncode == q.returncode == 0, d.stderr
        assert d.stdout == q.stdout


def test_compressed_clusters_refused_as_qemu_img_does_and_wide_lists_them(tmp_path):
    require_qemu()
    path = str(tmp_path / "c.qcow2")
    create(path, "4M")
    qemu_io(path, "write -P 1 0 64k", "write -c -P 2 1M 64k")
    q, d = _both(path)
    assert q.returncode == d.returncode == 1
    assert d.stdout == q.stdout  # the header and the rows before the compressed extent
    assert "File contains external, encrypted or compressed clusters" in d.stderr
    w = subprocess.run([*QDEBUG, "map", "--wide", path], capture_output=True, text=True)
    assert w.returncode == 0 and "Depth Status" in w.stdout.splitlines()[0] and "compressed" in w.stdout


RANGES = [("--start-offset", "10k", "--max-length", "100k"), ("--start-offset", "100M"), ("--max-length", "1"),
          ("--start-offset", "1M", "--max-length", "0"), ("--start-offset", "8M"), ("--start-offset", "0x3f8800",
          "--max-length", "5000"), ("--start-offset", "3000", "--max-length", "1M")]


@pytest.mark.parametrize("span", RANGES, ids=[" ".join(r) for r in RANGES])
def test_start_offset_and_max_length_as_qemu_img(tmp_path, span):
    require_qemu()
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    create(base, "8M", cluster_size="16k")
    create(top, "8M", cluster_size="64k", backing=base)
    qemu_io(base, "write -P 1 0 1M", "write -z 2M 64k", "write -P 2 0x3f0000 64k")
    qemu_io(top, "write -P 3 8k 40k", "write -z 200k 64k", "discard 1M 128k", "write -P 4 0x3f8000 8k")
    for extra in ((), ("--output=json",)):
        q, d = _both(top, *extra, *span)
        assert d.returncode == q.returncode == 0, d.stderr
        assert d.stdout == q.stdout, (extra, span)
