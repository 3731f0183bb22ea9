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


def _size_text(rng: random.Random, n: int) -> str:
    """`n` in one of the spellings qemu-io's cvtnum reads the same."""
    forms = [str(n), hex(n)]
    for shift, suffix in ((10, "k"), (20, "M")):
        if n and n % (1 << shift) == 0:
            forms.append(f"{n >> shift}{rng.choice([suffix, suffix.upper()])}")
        if n and (n * 2) % (1 << shift) == 0 and n % (1 << shift):
            forms.append(f"{n / (1 << shift):g}{suffix}")  # 1.5k
    return rng.choice(forms)


def random_syntax_trace(seed: int, n: int, size: int, cluster_size: int = 65536) -> list[str]:
    """`n` lines using the whole of qemu-io's syntax that changes or checks image state: writev,
    aio_write (also -z -u), readv/aio_read checks, read -s/-l, write -f/-n/-c/-s, permuted options,
    bundles, number spellings and the print-only commands. Every line is valid (some fail at run
    time as QEMU fails them: compressed writes over allocated clusters, -n where QEMU would fall
    back, pattern checks of data that was overwritten). Write -s reads the file `pat`."""
    rng = random.Random(seed)
    cs = cluster_size
    out = []
    last: tuple[int, int, int] | None = None  # (offset, length, pattern) of the last plain write

    def where(most: int, align: int = 512) -> tuple[int, int]:
        length = rng.randrange(1, most // align + 1) * align
        return rng.randrange(0, (size - length) // align + 1) * align, length

    for _ in range(n):
        kind = rng.choice(["write", "writev", "aio_write", "zero", "aio_zero", "compressed", "source", "check",
                           "vcheck", "discard", "print", "fua"])
        p = rng.randrange(256)
        if kind == "write":
            off, length = where(3 * cs, rng.choice([1, 512]))
            opts = [f"-P {p}", "-q"] if rng.random() < 0.5 else [f"-qP{p}"]
            rng.shuffle(opts)
            words = ["write", *opts, _size_text(rng, off), _size_text(rng, length)]
            if rng.random() < 0.3:  # getopt permutes: options after the arguments
                words = ["write", _size_text(rng, off), _size_text(rng, length), *opts]
            out.append(" ".join(words))
            last = (off, length, p)
        elif kind in ("writev", "aio_write"):
            parts = [rng.randrange(0, 40) * 512 + rng.choice([0, 0, 1, 100]) for _ in range(rng.randrange(1, 4))]
            off = rng.randrange(0, size - sum(parts))
            out.append(f"{kind} -P {p} {off} " + " ".join(_size_text(rng, x) for x in parts))
            last = (off, sum(parts), p)
            if kind == "aio_write":
                out.append("aio_flush")  # (qemu-io's requests in flight may allocate in another order)
        elif kind in ("zero", "aio_zero"):
            off, length = where(3 * cs, rng.choice([512, 2048, cs]))
            flags = rng.choice(["-z", "-zu", "-z -u", "-zn", "-z -n -u"] if kind == "zero" else ["-z", "-zu"])
            out.append(f"{'write' if kind == 'zero' else 'aio_write'} {flags} {_size_text(rng, off)} "
                       f"{_size_text(rng, length)}")
            if kind == "aio_zero":
                out.append("aio_flush")
        elif kind == "compressed":
            off = rng.randrange(0, size // cs) * cs
            out.append(f"write -c -P {p} {off} {_size_text(rng, cs)}")
        elif kind == "source":
            off, length = where(2 * cs, 1)
            out.append(f"write{' -c' if rng.random() < 0.2 and off % cs == 0 and length == cs else ''} -s pat "
                       f"{off} {length}")
        elif kind == "check" and last is not None:
            off, length, p = last
            s = rng.randrange(0, length)
            out.append(f"read -P {p} -s {s} -l {rng.randrange(0, length - s + 1)} {off} {length}")
        elif kind == "vcheck" and last is not None:
            off, length, p = last
            cut = rng.randrange(0, length + 1)
            verb = rng.choice(["readv", "aio_read"])
            out.append(f"{verb} -P {p} {off} {cut} {length - cut}")
            if verb == "aio_read":
                out.append("aio_flush")  # (where qemu-io prints what the read found)
        elif kind == "discard":
            off, length = where(4 * cs)
            out.append(f"d -q {off} {length}")
        elif kind == "print":
            out.append(rng.choice(["map", "info", "length", "alloc 0 1M", "sleep 0", "help read",
                                   "aio_write -i 0 512", "flush", "f"]))
        elif kind == "fua":
            off, length = where(cs)
            out.append(f"writev -f -P {p} {off} {length}" if rng.random() < 0.5 else f"write -f -P {p} {off} {length}")
    return out
