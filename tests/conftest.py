import os

import pytest

from tests.qemu import require_qemu


@pytest.fixture
def qemu():
    """Differential tests request this: QEMU must be there (in CI a missing QEMU fails)."""
    require_qemu()


@pytest.fixture
def tmpdir_path(tmp_path):
    old = os.getcwd()
    yield tmp_path
    os.chdir(old)
