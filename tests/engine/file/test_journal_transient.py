"""The throw-away journal of a replay without --journal (keep=False): committed steps are dropped at
once, yet a step interrupted later is still rolled back alone, never an earlier step's records."""

from __future__ import annotations

import os
import shutil

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qdebug.engine.file.image import open_image
from qdebug.engine.file.journal import Journal, journal_path
from tests.engine.file.test_journal import CS, digest, image  # noqa: F401  (image: a fixture)

writes = st.lists(st.tuples(st.integers(4096, 8 * CS), st.integers(1, 2 * CS), st.integers(0, 255)),
                  min_size=1, max_size=5)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(writes, min_size=1, max_size=6), last=st.one_of(st.just([]), writes))
def test_crash_rolls_back_the_open_step_only(image, tmp_path, steps, last):
    path = str(tmp_path / "copy.qcow2")
    shutil.copyfile(image, path)
    img = open_image(path, writable=True)
    jr = Journal(img, keep=False)
    for ops in steps:  # committed and dropped: their records stay on file, spoiled
        jr.begin({"ops": len(ops)})
        for off, n, byte in ops:
            img.pwrite(off, bytes([byte]) * n)
        jr.commit()
    assert jr.steps == 0
    before = digest(path)
    if last:
        jr.begin({"ops": len(last)})
        for off, n, byte in last:
            img.pwrite(off, bytes([byte ^ 0xFF]) * n)
    # "crash": the process dies (with the step open, or between steps); a new journal recovers it
    os.close(jr.fd)
    img.close()
    img = open_image(path, writable=True)
    jr = Journal(img, keep=False)
    assert jr.recovered == bool(last)
    jr.close()
    img.close()
    assert digest(path) == before
    assert not os.path.exists(journal_path(path))
