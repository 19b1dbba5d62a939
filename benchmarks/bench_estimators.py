"""Estimator throughput on the same data in one run: numba LM (1 and 2 threads), LUT, and a
per-voxel bounded scipy.optimize.least_squares loop (the way peer tools fit).

Voxels/s = N / time. Ratios against the scipy loop are what the closing notes quote.
"""

import numpy as np
import pytest

from aslbatch.bench import coarse_start, scipy_loop
from aslbatch.estimators import get_estimator
from aslbatch.models import get_model
from aslbatch.protocol import default_protocol
from aslbatch.simulate import simulate

N = {"1c": 200_000, "2c": 50_000, "pasl": 200_000}
N_SCIPY = 200


@pytest.fixture(scope="module", params=["1c", "2c", "pasl"])
def case(request):
    model = get_model(request.param, default_protocol(request.param))
    data = simulate(model, N[request.param], 5.0, seed=0)
    return model, data


def test_lm_numba(benchmark, case, threads):
    model, data = case
    est = get_estimator("lm", model).fit()
    est.predict(data.signals[:10])
    benchmark.group = f"estimators {model.name} (SNR 5)"
    benchmark.extra_info["voxels"] = data.signals.shape[0]
    benchmark.pedantic(est.predict, args=(data.signals,), rounds=3, iterations=1)


def test_lut(benchmark, case, threads):
    model, data = case
    est = get_estimator("lut", model).fit()
    est.predict(data.signals[:10])
    benchmark.group = f"estimators {model.name} (SNR 5)"
    benchmark.extra_info["voxels"] = data.signals.shape[0]
    benchmark.pedantic(est.predict, args=(data.signals,), rounds=3, iterations=1)


def test_scipy_least_squares_loop(benchmark, case):
    """Per-voxel scipy fit from LM's grid start (no abat <= att constraint: scipy cannot express it)."""
    model, data = case
    signals = data.signals[:N_SCIPY]
    start = coarse_start(model, signals)
    benchmark.group = f"estimators {model.name} (SNR 5)"
    benchmark.extra_info["voxels"] = N_SCIPY
    benchmark.pedantic(scipy_loop, args=(model, signals, start), rounds=1, iterations=1)


@pytest.fixture(scope="module")
def single_delay():
    """Two million voxels of a single-delay acquisition with 2D slice offsets and repeat spreads."""
    model = get_model("single", default_protocol("single"))
    rng = np.random.default_rng(0)
    signals = rng.normal(0.006, 0.002, (2_000_000, 1))
    return model, signals, rng.choice([0.0, 0.045, 0.09], signals.shape[0]), np.abs(signals) * 0.1


def test_single_delay_white_paper(benchmark, single_delay):
    """The single-delay path (voxels/s); compare with the memory pass below, same group."""
    model, signals, _, _ = single_delay
    est = get_estimator("whitepaper", model).fit()
    benchmark.group = "single delay (2 M voxels)"
    benchmark.extra_info["voxels"] = signals.shape[0]
    benchmark.pedantic(est.predict, args=(signals,), rounds=5, iterations=1)


def test_single_delay_white_paper_with_offsets_and_spread(benchmark, single_delay):
    model, signals, offsets, spread = single_delay
    est = get_estimator("whitepaper", model).fit()
    mask = np.ones((signals.shape[0], 1, 1), bool)
    benchmark.group = "single delay (2 M voxels)"
    benchmark.extra_info["voxels"] = signals.shape[0]
    benchmark.pedantic(est.predict_image, args=(signals, mask), kwargs={"slice_offsets": offsets, "signal_se": spread},
                       rounds=5, iterations=1)


def test_single_delay_memory_pass(benchmark, single_delay):
    """One multiply over the signals: the memory-bound floor of any per-voxel formula."""
    _, signals, _, _ = single_delay
    benchmark.group = "single delay (2 M voxels)"
    benchmark.extra_info["voxels"] = signals.shape[0]
    benchmark.pedantic(np.multiply, args=(signals[:, 0], 2.0), rounds=5, iterations=1)
