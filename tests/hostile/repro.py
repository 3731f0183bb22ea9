"""Rebuild one fuzz case: `python -m tests.hostile.repro BASE SEED DIR` makes the base images in
DIR (once), writes the mutant to DIR/case-SEED/ and prints its path, its mutations and what every
read-only command answers, so a failure can become a named regression test."""

from __future__ import annotations

import os
import sys

from tests.hostile.driver import commands_for_case, run_command, violations
from tests.hostile.images import build_bases, load_manifest, save_manifest
from tests.hostile.mutate import make_mutant


def main(argv: list[str]) -> int:
    base, seed, directory = argv[0], int(argv[1]), argv[2]
    manifest = os.path.join(directory, "manifest.json")
    if not os.path.exists(manifest):
        save_manifest(build_bases(directory), manifest)
    layouts = load_manifest(manifest)
    path, mutations = make_mutant(layouts[base], seed, os.path.join(directory, f"case-{seed}"))
    print(path, mutations)
    for cmd in commands_for_case(path, bool(layouts[base].backing), seed):
        res = run_command(cmd)
        last = res["stderr"].strip().splitlines()[-1:] or [""]
        print(res["rc"], " ".join(cmd), "|", last[0][:200], "|", violations(res) or "ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
