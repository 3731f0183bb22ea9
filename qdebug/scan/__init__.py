"""`qdebug scan`: `qemu-img check` over a fleet of images, in long-lived worker processes.

discover (which files) -> task (one image checked in a worker, exactly as `qdebug check` does) ->
runners (a local process pool, or an existing Dask cluster: the same task either way) -> scan
(the window of work in flight, resume state, the running tally). Imports the engine, never a UI.
"""
