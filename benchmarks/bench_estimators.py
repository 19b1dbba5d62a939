"""Estimator throughput on the same data in one run: numba LM (1 and 2 threads), LUT, and a
per-voxel bounded scipy.optimize.least_squares loop (the way peer tools fit).

Voxels/s = N / time. Ratios against the scipy loop are what the closing notes quote.
"""

import numpy as np
import pytest
from scipy.optimize import least_squares

from aslbatch.estimators import get_estimator
from aslbatch.models import get_model
from aslbatch.protocol import default_protocol
from aslbatch.simulate import simulate

N = {"1c": 200_000, "2c": 50_000}
N_SCIPY = 200


@pytest.fixture(scope="module", params=["1c", "2c"])
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


def _scipy_loop(model, signals, start):
    lower, upper = model.bounds
    out = np.empty_like(start)
    for i, y in enumerate(signals):
        res = least_squares(lambda p: model.signal(p)[0] - y, start[i], jac=lambda p: model.jacobian(p)[0],
                            bounds=(lower, upper), method="trf")
        out[i] = res.x
    return out


def test_scipy_least_squares_loop(benchmark, case):
    """Per-voxel scipy fit from the same grid start (no abat <= att constraint: scipy cannot express it)."""
    model, data = case
    signals = data.signals[:N_SCIPY]
    start = np.clip(get_estimator("lut", model, resolution_s=0.2).fit().predict(signals).params, *model.bounds)
    benchmark.group = f"estimators {model.name} (SNR 5)"
    benchmark.extra_info["voxels"] = N_SCIPY
    benchmark.pedantic(_scipy_loop, args=(model, signals, start), rounds=1, iterations=1)
