"""Where the per-image tasks run: a local pool of long-lived worker processes (the standard
library's), or an existing Dask distributed cluster. Both run the same function on the same
arguments and hand back results in completion order; the scan never sees the difference.

Local workers are forked from this process once it has imported the checker (numpy included) and
before it starts any thread, so they start in milliseconds with everything loaded (a fresh
interpreter per worker would cost a few tenths of a second, a tenth of a scan of 2,000 small
images); a pool replacing one whose worker died comes from a fork server instead, as threads run
by then. Workers ignore SIGINT: Ctrl-C reaches only the scan, which stops handing out work and
lets the running checks finish.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable

from ..engine.errors import QcowError


class WorkerLost(Exception):
    """The process running a task died (killed, out of memory) before it returned."""


def _ignore_sigint() -> None:
    """A worker leaves Ctrl-C to the scan, and dies plainly on SIGTERM / SIGHUP (the command's own
    handlers, inherited by a fork, would raise in the middle of a check)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


class LocalRunner:
    """`jobs` worker processes on this machine (concurrent.futures.ProcessPoolExecutor)."""

    def __init__(self, jobs: int | None = None):
        import importlib
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.workers = jobs or os.cpu_count() or 1
        importlib.import_module("qdebug.scan.task")  # what the forked workers run, loaded once
        methods = multiprocessing.get_all_start_methods()
        start = "fork" if "fork" in methods else "forkserver" if "forkserver" in methods else "spawn"
        self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(start),
                                         initializer=_ignore_sigint)
        self._pool.submit(os.getpid).result()  # every worker started now, before any thread of ours

    def submit(self, fn: Callable, *args: Any):
        from concurrent.futures.process import BrokenProcessPool

        try:
            return self._pool.submit(fn, *args)
        except BrokenProcessPool:  # a worker died earlier: a fresh pool for the work still to come
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool.shutdown(wait=False, cancel_futures=True)
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            if ctx.get_start_method() == "forkserver":
                ctx.set_forkserver_preload(["qdebug.scan.task"])
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_ignore_sigint)
            return self._pool.submit(fn, *args)

    def wait(self, handles, timeout: float):
        """(done, not done) once at least one is done or `timeout` seconds have passed."""
        from concurrent.futures import FIRST_COMPLETED, wait

        return wait(handles, timeout=timeout, return_when=FIRST_COMPLETED)

    @staticmethod
    def result(handle):
        from concurrent.futures.process import BrokenProcessPool

        try:
            return handle.result()
        except BrokenProcessPool:
            raise WorkerLost("the worker process died while checking it (killed? out of memory?)") from None

    @staticmethod
    def cancel(handles) -> None:
        for h in handles:
            h.cancel()

    def close(self, *, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)


class DaskRunner:
    """The tasks on an existing dask.distributed cluster (`qdebug[dask]`). Every worker must see the
    images at the same paths as this machine (a shared filesystem) and have qdebug installed.
    A task costs the scheduler a few milliseconds: tasks carry 4x the images of local ones."""

    chunk_scale = 4

    def __init__(self, address: str, *, timeout: float = 30):
        try:
            from distributed import Client
        except ImportError:
            raise QcowError("--dask needs Dask's distributed scheduler: pip install 'qdebug[dask]'") from None
        try:
            self._client = Client(address, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError) as e:
            raise QcowError(f"cannot reach the Dask scheduler at {address}: {e}") from None
        self.workers = sum(w.get("nthreads", 1) for w in self._client.scheduler_info()["workers"].values()) or 1

    def submit(self, fn: Callable, *args: Any):
        return self._client.submit(fn, *args, pure=False)

    def wait(self, handles, timeout: float):
        from distributed import wait

        try:
            with self._client.as_current():
                return wait(list(handles), timeout=timeout, return_when="FIRST_COMPLETED")
        except TimeoutError:
            return set(), set(handles)

    @staticmethod
    def result(handle):
        from distributed import KilledWorker

        try:
            return handle.result()
        except KilledWorker:
            raise WorkerLost("Dask workers died while checking it (killed? out of memory?)") from None

    def cancel(self, handles) -> None:
        self._client.cancel(list(handles))

    def close(self, *, wait: bool = True) -> None:
        self._client.close()
