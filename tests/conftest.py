"""Fixtures shared by the test modules: the models on their default protocols."""

import pytest

from aslbatch.models import get_model
from aslbatch.protocol import default_protocol


@pytest.fixture(scope="session")
def model_1c():
    """The one-compartment model on the default 1C protocol and constants."""
    return get_model("1c", default_protocol("1c"))


@pytest.fixture(scope="session")
def model_2c():
    """The two-compartment model (hard arterial edges) on the default 2C protocol."""
    return get_model("2c", default_protocol("2c"))
