import pytest

from tests.engine import harness


@pytest.fixture(params=["write-through", "write-back"])
def engine_mode(request):
    """Run the test with the engine writing metadata at once, and with it held back until a flush."""
    harness.MODE["writeback"] = request.param == "write-back"
    yield request.param
    harness.MODE["writeback"] = False
