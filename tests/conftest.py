"""Fixtures shared by the test modules: the models on their default protocols, small networks,
and a private network cache (tests never read or write the user's)."""

import pytest

from aslbatch.models import get_model
from aslbatch.protocol import default_protocol


@pytest.fixture(scope="session", autouse=True)
def private_network_cache(tmp_path_factory):
    """ASLBATCH_CACHE_DIR points into the test session's temporary folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ASLBATCH_CACHE_DIR", str(tmp_path_factory.mktemp("network-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def model_1c():
    """The one-compartment model on the default 1C protocol and constants."""
    return get_model("1c", default_protocol("1c"))


@pytest.fixture(scope="session")
def model_2c():
    """The two-compartment model (hard arterial edges) on the default 2C protocol."""
    return get_model("2c", default_protocol("2c"))


#: a small network that trains in seconds and is accurate at high SNR (tests only)
SMALL_NETWORK = {"n_samples": 20_000, "hidden_layers": (32, 32), "snr_range": (50.0, 100.0), "max_epochs": 60,
                 "batch_size": 256, "learning_rate": 3e-3, "seed": 1}


@pytest.fixture(scope="session")
def supervised_1c(model_1c):
    """A small supervised network trained on the default 1C protocol at high SNR."""
    from aslbatch.estimators import get_estimator

    return get_estimator("supervised", model_1c, **SMALL_NETWORK).fit()


@pytest.fixture(scope="session")
def supervised_2c(model_2c):
    """A small supervised network trained on the default 2C protocol at high SNR."""
    from aslbatch.estimators import get_estimator

    return get_estimator("supervised", model_2c, **SMALL_NETWORK).fit()
