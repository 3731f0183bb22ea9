"""Kill -9 at random points of `qdebug replay`, a foreign qemu-io write, then qdebug's recovery,
judged by QEMU: what `make faults` runs a few hundred times and the suite a few times.

One round: an image (with or without a qcow2 backing file), a trace of random pattern writes with
a `flush` every FLUSH_EVERY lines, `qdebug replay [--journal]` killed with SIGKILL after a random
delay; then, half the time, another program writes the image (qemu-io: 8 MiB of 0x77 at 0 and 8 MiB
of 0x78 at 120 MiB, patterns the trace never uses); then qdebug recovers (`qdebug replay IMAGE
EMPTY`, which rolls back the step the kill left unfinished, or refuses). A refusal is answered the
way its message says: `qdebug undo --discard-journal`. Verdicts:

- consistent: `qemu-img check` finds nothing, and the guest data equal, byte for byte, what qemu-io
  makes of a prefix of the trace (a flush boundary without --journal, any command with it) followed
  by the foreign write;
- kept: recovery was refused (only ever after a foreign write) and the journal discarded: `qemu-img
  check` finds no corruption (an interrupted step may leak clusters, as a killed QEMU does), and
  every guest byte is one the trace, the backing file or the foreign write put there;
- lost: anything else (the foreign data gone, a corruption, garbage, a refusal with no foreign
  write, a recovery that failed). Must never happen.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from tests.qemu import QEMU_IMG, QEMU_IO, create, qemu_check, qemu_io

SIZE = 128 << 20
FLUSH_EVERY = 100
FOREIGN = ((0, 8 << 20, 0x77), (120 << 20, 8 << 20, 0x78))
QDEBUG = [sys.executable, "-m", "qdebug.cli"]


@dataclass
class Verdict:
    kind: str  # consistent | kept | lost
    detail: str
    prefix: int | None = None
    killed: bool = True  # False: the replay had finished before the kill came


def make_trace(rng: random.Random, n: int) -> list[tuple[int, int, int] | None]:
    """(offset, length, pattern) writes; None is a flush."""
    out: list[tuple[int, int, int] | None] = []
    for i in range(n):
        if i and i % FLUSH_EVERY == 0:
            out.append(None)
        length = rng.randrange(1, 385) * 512
        offset = rng.randrange(0, (SIZE - length) // 512) * 512
        out.append((offset, length, rng.randrange(1, 0x70)))
    return out


def trace_text(trace) -> str:
    return "".join("flush\n" if c is None else f"write -q -P 0x{c[2]:02x} {c[0]} {c[1]}\n" for c in trace)


def raw(path: str, out: str) -> np.ndarray:
    subprocess.run([QEMU_IMG, "convert", "-O", "raw", path, out], check=True, capture_output=True)
    data = np.fromfile(out, dtype=np.uint8)
    os.unlink(out)
    return data


def _prefixes(trace, start: np.ndarray, img: np.ndarray, lo: int, hi: int) -> list[int]:
    """Every p such that img equals start with the first p commands applied, inside [lo, hi)."""
    model = start.copy()
    diff = int(np.count_nonzero(model[lo:hi] != img[lo:hi]))
    found = [0] if diff == 0 else []
    for p, c in enumerate(trace, 1):
        if c is not None:
            a, b = max(c[0], lo), min(c[0] + c[1], hi)
            if a < b:
                before = int(np.count_nonzero(model[a:b] != img[a:b]))
                model[a:b] = c[2]
                diff += int(np.count_nonzero(img[a:b] != c[2])) - before
        if diff == 0:
            found.append(p)
    return found


def _only_known_bytes(trace, start: np.ndarray, img: np.ndarray, lo: int, hi: int) -> int:
    """How many bytes of [lo, hi) no command, nor the starting content, ever put there."""
    ok = img[lo:hi] == start[lo:hi]
    for c in trace:
        if c is not None:
            a, b = max(c[0], lo), min(c[0] + c[1], hi)
            if a < b:
                ok[a - lo:b - lo] |= img[a:b] == c[2]
    return int(np.count_nonzero(~ok))


def one_round(workdir: str, seed: int, *, journal: bool, backing: bool, n: int | None = None) -> Verdict:
    v = _round(workdir, seed, journal=journal, backing=backing, n=n or (1500 if journal else 5000))
    return v


def _round(workdir: str, seed: int, *, journal: bool, backing: bool, n: int) -> Verdict:
    rng = random.Random(seed)
    os.makedirs(workdir, exist_ok=True)
    image, base = os.path.join(workdir, "img.qcow2"), os.path.join(workdir, "base.qcow2")
    for f in os.listdir(workdir):
        os.unlink(os.path.join(workdir, f))
    if backing:
        create(base, SIZE)
        qemu_io(base, *(f"write -q -P 0x7a {o << 20} 3M" for o in (2, 40, 77, 118)))
        create(image, SIZE, backing="base.qcow2")
    else:
        create(image, SIZE)
    start = raw(image, os.path.join(workdir, "start.raw"))
    trace = make_trace(rng, n)
    tpath, empty = os.path.join(workdir, "t.trace"), os.path.join(workdir, "empty.trace")
    with open(tpath, "w") as f:
        f.write(trace_text(trace))
    open(empty, "w").close()

    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.Popen([*QDEBUG, "replay", *(["--journal"] if journal else []), image, tpath],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    time.sleep(rng.uniform(0.2, 1.5))
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    killed = proc.returncode == -signal.SIGKILL

    foreign = rng.random() < 0.5
    if foreign:  # QEMU may open the image: qdebug's locks died with it
        qemu_io(image, *(f"write -q -P 0x{p:02x} {o} {ln}" for o, ln, p in FOREIGN), "flush")
    rec = subprocess.run([*QDEBUG, "replay", image, empty], capture_output=True, env=env)
    refused = rec.returncode != 0
    if refused:
        msg = rec.stderr.decode()
        if not foreign:
            return Verdict("lost", f"recovery refused with no foreign write: {msg.strip()}")
        if "--discard-journal" not in msg:
            return Verdict("lost", f"recovery failed without naming the choices: {msg.strip()}")
        d = subprocess.run([*QDEBUG, "undo", "--discard-journal", image], capture_output=True, env=env)
        if d.returncode != 0:
            return Verdict("lost", f"undo --discard-journal failed: {d.stderr.decode().strip()}")

    code, counts = qemu_check(image)
    img = raw(image, os.path.join(workdir, "img.raw"))
    for o, ln, p in FOREIGN if foreign else ():
        if not (img[o:o + ln] == p).all():
            return Verdict("lost", f"the foreign write at 0x{o:x} is gone (killed={killed})")
    lo, hi = FOREIGN[0][1], FOREIGN[1][0]  # outside the foreign ranges
    if refused:
        if counts.get("corruptions", 0) or counts.get("check-errors", 0) or code not in (0, 3):
            return Verdict("lost", f"qemu-img check after the journal was discarded: {code} {counts}")
        stray = _only_known_bytes(trace, start, img, lo, hi)
        if stray:
            return Verdict("lost", f"{stray} guest bytes neither the trace nor the image had")
        return Verdict("kept", "recovery refused after the foreign write; journal discarded", None, killed)
    if code != 0:
        return Verdict("lost", f"qemu-img check after recovery: exit {code} {counts} ({err.decode()[-300:]})")
    found = _prefixes(trace, start, img, 0 if not foreign else lo, SIZE if not foreign else hi)
    if not journal:  # write-back: consistent as of a flush (the lines before a flush line, or all)
        found = [p for p in found if p == len(trace) or (p < len(trace) and trace[p] is None) or p == 0]
    if not found:
        return Verdict("lost", "the guest data are no prefix of the trace")
    p = found[-1]
    # QEMU as the judge: qemu-io on the same prefix (and the foreign write) gives the same guest data
    ref = os.path.join(workdir, "ref.qcow2")
    if backing:
        create(ref, SIZE, backing="base.qcow2")
    else:
        create(ref, SIZE)
    cmds = trace_text(trace[:p]) + "".join(f"write -q -P 0x{pt:02x} {o} {ln}\n" for o, ln, pt in FOREIGN
                                           if foreign)
    subprocess.run([QEMU_IO, "-t", "writeback", "-f", "qcow2", ref], input=cmds.encode(), check=True,
                   capture_output=True)
    if not np.array_equal(raw(ref, os.path.join(workdir, "ref.raw")), img):
        return Verdict("lost", f"guest data differ from qemu-io's on the first {p} lines", p)
    return Verdict("consistent", f"prefix {p} of {len(trace)} (killed={killed}, foreign={foreign})", p, killed)


def campaign(workdir: str, rounds: int, seed: int = 1, log=print) -> dict[str, int]:
    counts = {"consistent": 0, "kept": 0, "lost": 0, "finished": 0}
    for i in range(rounds):
        journal, backing = bool(i & 1), bool(i & 2)
        v = one_round(os.path.join(workdir, "r"), seed * 100003 + i, journal=journal, backing=backing)
        counts[v.kind] += 1
        counts["finished"] += not v.killed
        if v.kind == "lost" or os.environ.get("QDEBUG_FAULTS_VERBOSE"):
            log(f"round {i} (journal={journal}, backing={backing}): {v.kind}: {v.detail}")
    return counts


def main() -> int:
    rounds = int(os.environ.get("QDEBUG_FAULTS_ROUNDS", "200"))
    workdir = os.environ.get("QDEBUG_FAULTS_DIR") or "/tmp/qdebug-faults"
    shutil.rmtree(workdir, ignore_errors=True)
    c = campaign(workdir, rounds, seed=int(os.environ.get("QDEBUG_FAULTS_SEED", "1")))
    print(f"{rounds} kills: {c['consistent'] + c['kept']} consistent ({c['consistent']} at a trace prefix, "
          f"{c['kept']} kept as the foreign writer left them; {c['finished']} replays had finished before their "
          f"kill), {c['lost']} lost")
    shutil.rmtree(workdir, ignore_errors=True)
    return 1 if c["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
