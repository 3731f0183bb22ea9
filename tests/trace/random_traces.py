"""Seeded random qemu-io traces for the session, replay and benchmark tests."""

from __future__ import annotations

import random

# The benchmark's mix (issue 3, item 7): writes of 512 B..64 KiB at 512-aligned offsets, zero writes,
# discards and multi-cluster writes.
BENCH_MIX = (("write", 60), ("zero", 20), ("discard", 10), ("multi", 10))
# For correctness tests: also unaligned writes, zero writes with -u, and compressed writes.
TEST_MIX = (("write", 40), ("unaligned", 10), ("zero", 15), ("discard", 10), ("multi", 10),
            ("compressed", 8), ("read", 7))


def random_trace(seed: int, n: int, size: int, cluster_size: int = 65536, mix=TEST_MIX,
                 comments: bool = False) -> list[str]:
    """`n` qemu-io command lines inside a `size`-byte image (with `# comments` if asked)."""
    rng = random.Random(seed)
    kinds = [k for k, _ in mix]
    weights = [w for _, w in mix]
    cs = cluster_size
    out = []
    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        if kind == "write":
            length = rng.randrange(1, 129) * 512
            off = rng.randrange(0, (size - length) // 512 + 1) * 512
            line = f"write -q -P 0x{rng.randrange(256):02x} {off} {length}"
        elif kind == "unaligned":
            length = rng.randrange(1, 3 * cs)
            off = rng.randrange(0, size - length)
            line = f"write -q -P {rng.randrange(256)} {off} {length}"
        elif kind == "zero":
            length = rng.randrange(1, 3 * 128) * 512
            off = rng.randrange(0, (size - length) // 512 + 1) * 512
            line = f"write -q -z{' -u' if rng.random() < 0.3 else ''} {off} {length}"
        elif kind == "discard":
            length = rng.randrange(1, 4 * 128) * 512
            off = rng.randrange(0, (size - length) // 512 + 1) * 512
            line = f"discard -q {off} {length}"
        elif kind == "multi":
            length = rng.randrange(2 * cs // 512, 8 * cs // 512) * 512
            off = rng.randrange(0, (size - length) // 512 + 1) * 512
            line = f"write -q -P 0x{rng.randrange(256):02x} {off} {length}"
        elif kind == "compressed":
            off = rng.randrange(0, size // cs) * cs
            line = f"write -q -c -P 0x{rng.randrange(256):02x} {off} {cs}"
        else:  # read, no pattern check: it only has to be inside the image
            length = rng.randrange(1, 17) * 512
            off = rng.randrange(0, (size - length) // 512 + 1) * 512
            line = f"read -q {off} {length}"
        if comments and i % 7 == 0:
            out.append(f"# step {i}")
        out.append(line + ("   # trailing comment" if comments and i % 11 == 3 else ""))
    return out


def strip_comments(lines: list[str]) -> list[str]:
    """What qemu-io reads: no comments, no blank lines."""
    out = []
    for line in lines:
        body = line.split("#", 1)[0].strip()
        if body:
            out.append(body)
    return out
