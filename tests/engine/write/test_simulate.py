"""WriteEngine in SIMULATE mode (the dry run's engine) and plan() on top of simulated commands."""

from __future__ import annotations

import pytest

from qdebug.engine.errors import QcowError
from qdebug.engine.file.chain import open_chain
from qdebug.engine.write.txn import WriteMode
from qdebug.engine.write.writer import WriteEngine
from qdebug.trace.commands import parse_line
from tests.qemu import create
from tests.trace.random_traces import random_trace

SIZE = 8 << 20


def test_plan_after_simulated_steps_is_pure_and_matches_simulate(tmp_path, qemu):
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    lines = random_trace(7, 40, SIZE)
    cmds = [parse_line(line, i) for i, line in enumerate(lines, 1)]
    with open(image, "rb") as f:
        original = f.read()
    with open_chain(image) as chain:  # read-only: a dry run never needs to write
        engine = WriteEngine(chain, WriteMode.SIMULATE)
        for cmd in cmds[:-1]:
            engine.run(cmd)
        before = {k: bytes(v) for k, v in engine._overlay.items()}
        state = engine.state
        planned = engine.plan(cmds[-1])
        planned_again = engine.plan(cmds[-1])
        assert {k: bytes(v) for k, v in engine._overlay.items()} == before and engine.state == state
        assert planned == planned_again == engine.run(cmds[-1]).plan
        with pytest.raises(QcowError, match="read-only"):
            WriteEngine(chain, WriteMode.EXECUTE)
    with open(image, "rb") as f:
        assert f.read() == original
