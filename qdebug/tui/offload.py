"""Run `check_image` in a child process, so a whole-image check never holds the UI's GIL.

numpy calls inside the check can hold the GIL for hundreds of milliseconds on a 1 TiB image; in
a thread worker that freezes the UI. A child Python (a new process, not a fork: the app has threads) checks the image file as
it is on disk (every engine write is a pwrite, so the file is current) and sends progress and the
frozen CheckReport back on a pipe.
"""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys
from typing import Callable

from ..engine.errors import QcowError

LARGE_CLUSTERS = 1 << 20  # images with more guest clusters (64 GiB at 64 KiB) are checked in a child


def _child(path: str, out, keep_references: bool) -> None:
    def send(msg) -> None:
        pickle.dump(msg, out)
        out.flush()

    try:
        import os

        from ..engine.check.checker import check_image
        from ..engine.file.image import open_image

        os.nice(10)  # the UI process comes first when the two share a core
        img = open_image(path)
        try:
            report = check_image(img, progress=lambda done, total: send(("progress", done, total)))
        finally:
            img.close()
        if not keep_references:
            report = dataclasses.replace(report, references=None)
        send(("done", report))
    except QcowError as e:
        send(("error", str(e)))
    except Exception as e:  # noqa: BLE001 - reported in the app as one line
        send(("error", f"check failed: {type(e).__name__}: {e}"))


def check_in_child(path: str, progress: Callable[[int, int], None] | None = None, *,
                   keep_references: bool = False):
    """check_image(open_image(path)) in a child Python; messages come back pickled on its stdout.

    A plain subprocess with explicit pipes: multiprocessing's spawn needs a real sys.stderr, which
    a running Textual app has replaced."""
    code = ("import sys; from qdebug.tui.offload import _child; "
            "_child(sys.argv[1], sys.stdout.buffer, sys.argv[2] == '1')")
    proc = subprocess.Popen([sys.executable, "-c", code, path, "1" if keep_references else "0"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while True:
            try:
                msg = pickle.load(proc.stdout)  # our own child: trusted
            except EOFError:
                err = proc.stderr.read().decode(errors="replace").strip().splitlines()
                raise QcowError(f"check of {path} stopped: {err[-1] if err else 'no output'}") from None
            if msg[0] == "progress":
                if progress:
                    progress(msg[1], msg[2])
            elif msg[0] == "done":
                return msg[1]
            else:
                raise QcowError(msg[1])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
