"""Fuzz: seeded mutants of real images (qemu-img / qemu-io made, and qdebug made when its create
engine exists) through every read-only command, under a memory limit and a per-command timeout.

Rules asserted for every command on every mutant (issue 6): exit 0 with sane output (valid JSON
where JSON is asked for), or exit 1 with exactly one `qdebug: error:` line (`check`: qemu-img's
exit codes); never a traceback, an internal error, a hang, a crash or an out-of-memory under
RLIMIT_AS = 1 GiB; not one byte or mtime of the image or its backing files changed. Each mutant
runs info, map, map --subclusters (human or JSON, alternating), three reads, the --no-backing
forms, and a rotating quarter of check / repair --dry-run / plan / replay --dry-run. Where check
ran, `qemu-img check` finding corruption means qdebug check must not say clean; on every eighth
mutant the guest bytes are compared with `qemu-img convert` when both tools read the disk.

`make test` runs QDEBUG_FUZZ_EXAMPLES (default 240) mutants; `make fuzz` runs 10,000. Cases are
(base image, seed) pairs, so a failure names what to rebuild:
`python -m tests.hostile.repro BASE SEED DIR`.
"""

from __future__ import annotations

import os

import pytest

from tests.hostile.driver import spawn
from tests.hostile.images import build_bases, save_manifest
from tests.qemu import require_qemu

pytestmark = [pytest.mark.slow, pytest.mark.qemu]

EXAMPLES = int(os.environ.get("QDEBUG_FUZZ_EXAMPLES", "240"))
SEED = int(os.environ.get("QDEBUG_FUZZ_SEED", "20261126"))
SHARDS = 4  # parametrized so pytest -n 2 spreads them over both cores
BATCH = 250  # mutants per driver process (a crash loses at most one batch's remaining cases)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    require_qemu()
    d = tmp_path_factory.mktemp("fuzz-bases")
    layouts = build_bases(str(d))
    manifest = str(d / "manifest.json")
    save_manifest(layouts, manifest)
    return layouts, manifest


def cases_for(names: list[str], shard: int) -> list[tuple[str, int]]:
    """Case i -> (base i mod n, SEED + i); shard k takes every SHARDS-th case."""
    return [(names[i % len(names)], SEED + i) for i in range(shard, EXAMPLES, SHARDS)]


def run_driver(manifest: str, workdir: str, cases: list, timeout: float = 20.0) -> tuple[list[dict], dict]:
    """One driver process over `cases`: (case results, final stats)."""
    job = {"manifest": manifest, "workdir": workdir, "cases": cases, "timeout": timeout}
    return spawn(job, 60 + timeout * 12 * len(cases))


@pytest.mark.parametrize("shard", range(SHARDS))
def test_mutants_follow_the_rules(bases, shard, tmp_path):
    layouts, manifest = bases
    cases = cases_for(sorted(layouts), shard)
    problems, maxrss = [], 0
    for b in range(0, len(cases), BATCH):
        results, done = run_driver(manifest, str(tmp_path), cases[b:b + BATCH])
        maxrss = max(maxrss, done["maxrss_kib"])
        assert len(results) == len(cases[b:b + BATCH])
        for r in results:
            for p in r["problems"]:
                problems.append(f"{r['base']} seed {r['seed']} {r['mutations']}: {p['argv']}: {p['problem']}"
                                f"\n    {p['stderr'].strip()[-400:]}")
    assert not problems, f"{len(problems)} rule violations:\n" + "\n".join(problems[:15])
    assert maxrss < 1 << 20, f"peak RSS {maxrss} KiB"
