"""Kinetic model throughput: numba signal and Jacobian (1 and 2 threads) vs the numpy reference,
and simulation of 10^6 noisy samples. 10^6 voxels per call."""

import numpy as np
import pytest

from aslbatch.models import get_model
from aslbatch.protocol import Constants, default_protocol
from aslbatch.simulate import sample_parameters, simulate
from tests.reference import central_difference_jacobian, signals_numpy

N = 1_000_000


@pytest.fixture(scope="module", params=["1c", "2c"])
def case(request):
    model = get_model(request.param, default_protocol(request.param))
    params = sample_parameters(model, N, seed=0)
    model.signal(params[:10])  # compile or load the cache outside the timing
    model.jacobian(params[:10])
    return model, params


def _numpy_signal(model, params):
    prot = model.protocol
    return signals_numpy(model.name, params, prot.label_duration, prot.pld, prot.crushed, **Constants().to_dict())


def test_signal_numba(benchmark, case, threads):
    model, params = case
    benchmark.group = f"signal {model.name} 1e6"
    benchmark(model.signal, params)


def test_signal_numpy(benchmark, case):
    model, params = case
    benchmark.group = f"signal {model.name} 1e6"
    out = benchmark(_numpy_signal, model, params)
    np.testing.assert_allclose(out, model.signal(params), rtol=1e-10, atol=1e-15)


def test_jacobian_numba(benchmark, case, threads):
    model, params = case
    benchmark.group = f"jacobian {model.name} 1e6"
    benchmark(model.jacobian, params)


def test_jacobian_numpy_central_differences(benchmark, case):
    model, params = case
    benchmark.group = f"jacobian {model.name} 1e6"
    steps = np.array([1e-3, 1e-6, 1e-5, 1e-5] if model.name == "2c" else [1e-3, 1e-5])
    benchmark.pedantic(central_difference_jacobian, args=(lambda p: _numpy_signal(model, p), params, steps), rounds=3)


@pytest.mark.parametrize("noise", ["rician", "gaussian"])
def test_simulate_1e6(benchmark, noise):
    model = get_model("1c", default_protocol("1c"))
    simulate(model, 10, 5.0, seed=0)
    benchmark.group = "simulate 1c 1e6"
    benchmark(simulate, model, N, 5.0, noise=noise, seed=0)
