"""Real fio runs on a scratch file, for the iolog import tests (fio is installed by `make test`)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

FIO = shutil.which("fio")
IN_CI = os.environ.get("CI") == "true"

# The job types of the issue: random 4k writes, sequential 1M writes with fsyncs, writes mixed with
# trims (the falloc engine punches holes for trims in a regular file; psync cannot), and a mixed
# read/write job over two files (reads become read -P checks; --file picks one file).
JOBS = {
    "randwrite-4k": ["--rw=randwrite", "--bs=4k", "--size=4M", "--number_ios=300", "--ioengine=psync"],
    "seq-1m": ["--rw=write", "--bs=1M", "--size=8M", "--fsync=3", "--ioengine=psync"],
    "trim-mix": ["--rw=randtrimwrite", "--bs=8k", "--size=4M", "--number_ios=150", "--ioengine=falloc"],
    "randrw-2files": ["--rw=randrw", "--bs=4k", "--size=256k", "--norandommap", "--nrfiles=2", "--number_ios=300",
                      "--ioengine=psync"],
}


def require_fio() -> None:
    """Skip without fio locally; in CI a missing fio is a failure, never a skip."""
    if FIO:
        return
    if IN_CI:
        pytest.fail("CI=true but fio is missing: the fio import tests must run")
    pytest.skip("fio not installed")


def run_fio(job: str, folder) -> str:
    """Run one job of JOBS in `folder` (its scratch files there); return its iolog's path."""
    require_fio()
    log = os.path.join(folder, f"{job}.iolog")
    args = [FIO, f"--name={job}", f"--directory={folder}", f"--write_iolog={log}", "--randseed=1234",
            "--output=/dev/null", *JOBS[job]]
    p = subprocess.run(args, capture_output=True, text=True)
    assert p.returncode == 0, f"fio {job} failed: {p.stderr}"
    return log


def as_version2(v3_log: str, out: str) -> str:
    """The same log as fio before 3.31 wrote it: version 2 header, no timestamps."""
    with open(v3_log) as f:
        lines = f.read().splitlines()
    assert lines[0] == "fio version 3 iolog"
    with open(out, "w") as f:
        f.write("fio version 2 iolog\n")
        for line in lines[1:]:
            f.write(line.split(None, 1)[1] + "\n")
    return out
