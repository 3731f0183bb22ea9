"""In-process fuzz driver: runs many qdebug commands in one Python process under a memory limit,
a per-command timeout and a no-writes watch, and reports every broken rule as a JSON line.

Run as `python -m tests.hostile.driver` with a JSON job on stdin (see `run_job`); one process serves
hundreds of mutants, so the fuzzer does not pay Python start-up per command. A crash of the whole
process (segfault, out of memory) is caught by the parent, which knows the last case started.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import resource
import signal
import sys
import time

MEMORY_LIMIT = 1 << 30  # address space; images here are a few MiB, so mmaps fit easily
COMMAND_TIMEOUT = 20.0  # seconds per command; real work on these images takes milliseconds
_KEEP = 4 << 20  # stdout bytes kept for JSON checks

# What a user-caused failure must look like: warnings, then exactly one error line.
_ERROR_LINE = re.compile(r"^qdebug: error: \S.*$")
_WARNING_LINE = re.compile(r"^qdebug: warning: \S.*$")


class Hang(BaseException):
    """Raised by the alarm: a BaseException so no `except Exception` in qdebug swallows it."""


def _alarm(_signum, _frame):
    raise Hang()


class _Sink(io.RawIOBase):
    def __init__(self):
        self.count = 0
        self.head = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = len(b)
        if len(self.head) < _KEEP:
            self.head += bytes(b[: _KEEP - len(self.head)])
        self.count += n
        return n


def run_command(argv: list[str], timeout: float = COMMAND_TIMEOUT) -> dict:
    """qdebug.cli.main(argv) with stdout/stderr captured, under an alarm."""
    from qdebug import cli

    sink = _Sink()
    out = io.TextIOWrapper(io.BufferedWriter(sink), encoding="utf-8", write_through=True)
    err = io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    rc: int | str
    t0 = time.monotonic()
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        try:
            rc = cli.main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        out.flush()
    except Hang:
        rc = "timeout"
    except MemoryError:
        rc = "MemoryError"
    except BaseException as e:  # noqa: BLE001 - anything escaping main() is a bug to report
        rc = f"escaped {type(e).__name__}: {e}"
    finally:
        sys.stdout, sys.stderr = old
    return {"argv": argv, "rc": rc, "stderr": err.getvalue(), "stdout_bytes": sink.count,
            "stdout_head": bytes(sink.head), "secs": round(time.monotonic() - t0, 3)}


def violations(res: dict, timeout: float = COMMAND_TIMEOUT) -> list[str]:
    """Every rule of issue 6 that one command result breaks (empty list: fine)."""
    bad = []
    rc, err = res["rc"], res["stderr"]
    if not isinstance(rc, int):
        return [f"{rc}"]
    if "Traceback" in err:
        bad.append("traceback on stderr")
    if "out of memory" in err:  # under RLIMIT_AS: the command wanted more than the limit
        bad.append("out of memory")
    if "internal error" in err:
        bad.append("internal error: " + err.strip().splitlines()[-1])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if res["argv"][0] in ("check", "replay", "repair"):  # reports on stderr (findings, hazards), qemu-like codes
        return bad + _check_violations(res, rc, lines)
    if rc == 0:
        extra = [ln for ln in lines if not _WARNING_LINE.match(ln)]
        if extra:
            bad.append(f"exit 0 with unexpected stderr {extra[:2]}")
        if res["argv"][0] in ("info", "map") and "--subclusters" not in res["argv"] and res["stdout_bytes"] == 0:
            bad.append("exit 0 with empty output")
        if "--output=json" in res["argv"] and res["stdout_bytes"] <= _KEEP:
            try:
                text = res["stdout_head"].decode()
                json.loads(text)
            except ValueError as e:
                bad.append(f"invalid JSON output ({e})")
    elif rc in (1, 2, 3):
        errors = [ln for ln in lines if not _WARNING_LINE.match(ln)]
        if len(errors) != 1 or not _ERROR_LINE.match(errors[0]):
            bad.append(f"exit {rc} without exactly one 'qdebug: error:' line: {lines[:3]}")
        elif len(errors[0]) > 600:
            bad.append(f"error line of {len(errors[0])} characters")
    else:
        bad.append(f"unexpected exit code {rc}")
    if res["secs"] > timeout:
        bad.append(f"took {res['secs']} s")
    return bad


def _check_violations(res: dict, rc: int, lines: list[str]) -> list[str]:
    """`check` speaks qemu-img check's language: findings on stderr, exit 0 clean, 2 corruptions,
    3 leaks only, 1 when the check could not complete (then one `qdebug: error:` line last), 63
    for a file that is not qcow2 (one error line, as 1).
    `replay` reports hazards per step on stderr the same way, its error line last."""
    if rc == 63 and res["argv"][0] == "check":  # qemu-img's "This image format does not support checks"
        rc = 1
    if rc not in (0, 1, 2, 3):
        return [f"check exit code {rc}"]
    if rc == 1:
        if not lines or not _ERROR_LINE.match(lines[-1]):
            return [f"{res['argv'][0]} exit 1 without a final 'qdebug: error:' line: {lines[-2:]}"]
        return []
    if res["stdout_bytes"] == 0 and res["argv"][0] == "check":
        return [f"check exit {rc} without a report"]
    return []


def fingerprint(directory: str) -> dict[str, tuple[int, int, str]]:
    """(size, mtime_ns, sha256) of every file in `directory`: read-only commands must not change it."""
    out = {}
    for name in sorted(os.listdir(directory)):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            st = os.stat(p)
            with open(p, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            out[name] = (st.st_size, st.st_mtime_ns, digest)
    return out


def _virtual_size(path: str) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(24)
            return int.from_bytes(f.read(8), "big")
    except OSError:
        return 0


def commands_for_case(img: str, has_backing: bool, seed: int) -> list[list[str]]:
    """The core commands on every mutant, plus a seed-rotated third of the slow ones (check,
    repair, plan, replay), so 10,000 mutants fit in minutes and each command sees thousands."""
    cmds = read_only_commands(img, has_backing)
    core = [c for c in cmds if c[0] in ("info", "map", "read")]
    slow = [c for c in cmds if c[0] not in ("info", "map", "read")]
    # human and JSON forms share the engine: each mutant gets one of each pair, alternating
    json_form = bool(seed % 2)
    core = [c for c in core if c[0] == "read" or "--no-backing" in c or ("--output=json" in c) == json_form]
    return core + [c for i, c in enumerate(slow) if (i + seed) % 4 == 0]


def read_only_commands(img: str, has_backing: bool) -> list[list[str]]:
    """Every read-only command and output form that exists in this checkout, for one image."""
    from qdebug.cli.main import build_parser

    size = min(_virtual_size(img), 1 << 62) // 512 * 512  # offsets stay inside qemu-io's number range
    n = min(size, 1 << 20)
    cmds = [
        ["info", img], ["info", "--output=json", img],
        ["map", img], ["map", "--wide", img], ["map", "--output=json", img],
        ["map", "--subclusters", img], ["map", "--subclusters", "--output=json", img],
        ["read", img, "0", str(n), "-o", os.devnull],
        ["read", img, str(max(0, size - 4096)), str(min(size, 4096))],
        ["read", img, "0", str(min(size + 512, (1 << 63) - 1))],  # past the end: an error
    ]
    if has_backing:
        cmds += [["info", "--no-backing", img], ["read", "--no-backing", img, "0", str(n), "-o", os.devnull]]
    sub = _subcommands(build_parser())
    if "check" in sub:
        cmds += [["check", img], ["check", "--output=json", img]]
    if "repair" in sub:
        cmds += [["repair", "--dry-run", img]]
    if "plan" in sub and _importable("qdebug.engine.write.writer"):
        cmds += [["plan", img, "write -P 0x22 0 4k"], ["plan", img, "write -z 8k 4k"], ["plan", img, "discard 0 64k"]]
    if "replay" in sub and _importable("qdebug.engine.write.writer"):
        cmds += [["replay", "--dry-run", img, _trace_file(img)]]
    return cmds


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _trace_file(img: str) -> str:
    """A small qemu-io trace beside the image's directory (outside it: the no-writes watch)."""
    path = os.path.join(os.path.dirname(os.path.dirname(img)), "trace.qio")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write("write -P 0x22 0 4k\nwrite -z 8k 4k\nwrite -c -P 0x23 64k 64k\ndiscard 0 64k\nread 0 4k\n")
    return path


def _subcommands(parser) -> set[str]:
    import argparse

    for a in parser._actions:  # argparse keeps subparsers here; no public accessor
        if isinstance(a, argparse._SubParsersAction):
            return set(a.choices)
    return set()


def _against_qemu_check(path: str, ours: int) -> list[dict]:
    """Where `qemu-img check` finds corruption (exit 2), `qdebug check` must not say clean."""
    import shutil
    import subprocess

    qemu = shutil.which("qemu-img")
    if not qemu:
        return []
    try:
        p = subprocess.run([qemu, "check", "-f", "qcow2", path], capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        return []  # QEMU itself can take minutes on some broken tables: nothing to compare
    if p.returncode == 2 and ours == 0:
        return [{"argv": ["check", path], "problem": "qemu-img check finds corruption, qdebug check says clean",
                 "stderr": p.stdout.decode()[-1500:]}]
    return []


def _against_qemu_read(path: str, case_dir: str, timeout: float) -> list[dict]:
    """Where QEMU and qdebug both read the whole guest disk (up to 8 MiB), the bytes agree."""
    import shutil
    import subprocess

    qemu = shutil.which("qemu-img")
    size = _virtual_size(path) // 512 * 512
    if not qemu or size > 8 << 20:
        return []
    ours = os.path.join(os.path.dirname(case_dir), "qdebug.raw")
    theirs = os.path.join(os.path.dirname(case_dir), "qemu.raw")
    res = run_command(["read", path, "0", str(size), "-o", ours], timeout)
    if res["rc"] != 0:
        return []
    try:
        p = subprocess.run([qemu, "convert", "-f", "qcow2", "-O", "raw", path, theirs], capture_output=True,
                           timeout=60)
    except subprocess.TimeoutExpired:
        return []
    if p.returncode != 0:
        return []
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        x, y = a.read(), b.read()
    if x == y:
        return []
    first = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), min(len(x), len(y)))
    return [{"argv": ["read", path], "problem": f"guest bytes differ from qemu-img convert first at 0x{first:x} "
             f"(sizes {len(x)} / {len(y)})", "stderr": ""}]


def run_case(layouts, base: str, seed: int, workdir: str, timeout: float = COMMAND_TIMEOUT) -> dict:
    from tests.hostile.mutate import make_mutant

    lay = layouts[base]
    case_dir = os.path.join(workdir, "case")
    if os.path.isdir(case_dir):
        for name in os.listdir(case_dir):
            os.unlink(os.path.join(case_dir, name))
    path, mutations = make_mutant(lay, seed, case_dir)
    before = fingerprint(case_dir)
    problems = []
    messages = []
    check_rc = None
    for argv in commands_for_case(path, bool(lay.backing), seed):
        res = run_command(argv, timeout)
        for v in violations(res, timeout):
            problems.append({"argv": argv, "problem": v, "stderr": res["stderr"][-2000:]})
        if res["rc"] == 1:
            lines = res["stderr"].strip().splitlines()
            if not lines:
                problems.append({"argv": argv, "problem": "exit 1 without a message", "stderr": ""})
                continue
            messages.append(lines[-1])
        if argv[0] == "check" and isinstance(res["rc"], int):
            check_rc = res["rc"]
    if check_rc is not None:
        problems += _against_qemu_check(path, check_rc)
    if seed % 8 == 1:
        problems += _against_qemu_read(path, case_dir, timeout)
    after = fingerprint(case_dir)
    if after != before:
        changed = [k for k in set(before) | set(after) if before.get(k) != after.get(k)]
        problems.append({"argv": None, "problem": f"read-only commands changed {changed}", "stderr": ""})
    return {"base": base, "seed": seed, "mutations": mutations, "problems": problems,
            "messages": sorted(set(messages))}


def run_job(job: dict, stream=sys.stdout) -> None:
    """job = {"manifest": path, "workdir": dir, "cases": [[base, seed], ...], "timeout": s}.
    Writes {"start": [base, seed]} before and the case result after each case."""
    timeout = job.get("timeout", COMMAND_TIMEOUT)
    for argv in job.get("commands", []):  # plain commands, e.g. on a hand-made hostile image
        res = run_command(argv, timeout)
        stream.write(json.dumps({"argv": argv, "rc": res["rc"], "secs": res["secs"], "stderr": res["stderr"][-2000:],
                                 "stdout_bytes": res["stdout_bytes"], "problems": violations(res, timeout)}) + "\n")
        stream.flush()
    from tests.hostile.images import load_manifest

    layouts = load_manifest(job["manifest"]) if job.get("cases") else {}
    log = os.environ.get("QDEBUG_FUZZ_LOG")  # one line per finished case, for long runs
    for base, seed in job.get("cases", []):
        stream.write(json.dumps({"start": [base, seed]}) + "\n")
        stream.flush()
        rec = run_case(layouts, base, seed, job["workdir"], timeout)
        stream.write(json.dumps(rec) + "\n")
        stream.flush()
        if log:
            with open(log, "a") as f:
                f.write(json.dumps({k: rec[k] for k in ("base", "seed", "mutations", "problems")}) + "\n")
    stream.write(json.dumps({"done": True, "maxrss_kib": peak_rss_kib()}) + "\n")
    stream.flush()


def peak_rss_kib() -> int:
    """This process's own peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux keeps that across
    exec, so a driver started by a pytest worker that once held 1.4 GB would report 1.4 GB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def spawn(job: dict, deadline: float) -> tuple[list[dict], dict]:
    """Run a driver process on `job`; returns (records, final stats). A crash or a missing final
    line fails with the case that was running."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=root)
    env.pop("QDEBUG_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "tests.hostile.driver"], input=json.dumps(job).encode(),
                       capture_output=True, cwd=root, env=env, timeout=deadline)
    records, started, done = [], None, None
    for line in p.stdout.decode().splitlines():
        rec = json.loads(line)
        if "start" in rec:
            started = rec["start"]
        elif "done" in rec:
            done = rec
        else:
            records.append(rec)
            started = None
    if done is None or p.returncode != 0:
        raise AssertionError(f"driver died (exit {p.returncode}) in case {started}: {p.stderr.decode()[-3000:]}")
    return records, done


def limit_memory(limit: int = MEMORY_LIMIT) -> None:
    """RLIMIT_AS; a negative limit leaves it unlimited (callers then judge peak RSS)."""
    if limit >= 0:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main() -> None:
    job = json.loads(sys.stdin.read())
    limit_memory(job.get("memory_limit", MEMORY_LIMIT))
    # Results go to the real stdout; qdebug's own output is captured per command.
    real = os.fdopen(os.dup(1), "w")
    run_job(job, real)


if __name__ == "__main__":
    main()
