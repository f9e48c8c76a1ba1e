"""Shared test settings: seeds, the fixtures folder, and the slow marker."""
from pathlib import Path

import numpy as np
import paddle
import pytest

from ppdiffusers_fast import compat

compat.apply()  # tests import ppdiffusers directly too

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer runs (still run by CI unless deselected)")


@pytest.fixture(autouse=True)
def _seed_everything():
    paddle.seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def fixtures_dir():
    return FIXTURES
