"""The kill campaign (tests/faults/campaign.py), short: four kills, one per mode (write-back or
--journal, with or without a backing file). `make faults` runs hundreds."""

from __future__ import annotations

import pytest

from tests.faults.campaign import campaign


@pytest.mark.parametrize("seed", [11])
def test_kill_then_foreign_write_then_recovery_loses_nothing(tmp_path, qemu, seed):
    lost: list[str] = []
    counts = campaign(str(tmp_path), 4, seed=seed, log=lost.append)
    assert counts["lost"] == 0, lost
    assert counts["consistent"] + counts["kept"] == 4
