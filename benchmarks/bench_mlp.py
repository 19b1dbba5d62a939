"""Network training throughput: the numba kernels of ``aslbatch.estimators._mlp`` (1 and 2 threads)
against scikit-learn's MLPRegressor (Adam; BLAS limited to the same number of threads) on the same data.

One epoch = 10^5 simulated samples (SNR 5) in minibatches of 1024, L2 alpha 1e-4. Architectures: 1C-like
(5 inputs, hidden (64, 64), 2 outputs) and 2C-like (9 inputs, hidden (128, 128), 4 outputs). Supervised
MSE head for the comparison with scikit-learn; the physics-informed signal head (kinetic model and its
Jacobian per sample) and prediction are measured too. extra_info["samples_per_s"] = N / fastest round.
"""

import numpy as np
import pytest
from sklearn.neural_network import MLPRegressor
from threadpoolctl import threadpool_limits

from aslbatch.estimators import _mlp
from aslbatch.models import get_model
from aslbatch.protocol import default_protocol
from aslbatch.simulate import simulate

N = 100_000
BATCH = 1024
ALPHA = 1e-4
HIDDEN = {"1c": (64, 64), "2c": (128, 128)}


@pytest.fixture(scope="module", params=["1c", "2c"])
def case(request):
    """(model, sizes, X standardised signals, T parameters scaled to [0, 1], signals, signal scale)."""
    model = get_model(request.param, default_protocol(request.param))
    data = simulate(model, N, 5.0, seed=0)
    lower, upper = model.bounds
    X = (data.signals - data.signals.mean(axis=0)) / data.signals.std(axis=0)
    T = (data.params - lower) / (upper - lower)
    sizes = np.array([model.n_volumes, *HIDDEN[model.name], model.n_params], dtype=np.int64)
    return model, sizes, X, T, data.signals, float(data.signals.std())


def _record(benchmark):
    benchmark.extra_info["samples_per_s"] = round(N / benchmark.stats.stats.min)


def _train_epoch(case, threads, head):
    """A function running one epoch of train_epoch with ``head`` on ``threads`` chunks."""
    model, sizes, X, T, signals, scale = case
    if head == _mlp.HEAD_SIGNAL_MSE:
        T = signals
    lower, upper = model.bounds
    theta = _mlp.init_weights(sizes, 0)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    order = np.random.default_rng(0).permutation(N)

    def epoch():
        return _mlp.train_epoch(theta, sizes, X, T, order, BATCH, head, lower, upper, scale, model.kernel_id, model.vol,
                                model.const, ALPHA, m, v, 0, 1e-3, 0.9, 0.999, 1e-8, threads)

    _mlp.train_epoch(theta, sizes, X, T, order[:10], BATCH, head, lower, upper, scale, model.kernel_id, model.vol,
                     model.const, ALPHA, m, v, 0, 1e-3, 0.9, 0.999, 1e-8, threads)  # compile or load the cache
    return epoch


def test_train_numba(benchmark, case, threads):
    benchmark.group = f"train {case[0].name}-like {HIDDEN[case[0].name]}, supervised MSE"
    epoch = _train_epoch(case, threads, _mlp.HEAD_PARAM_MSE)
    benchmark.pedantic(epoch, rounds=5, iterations=1)
    _record(benchmark)


def test_train_sklearn(benchmark, case, threads):
    model, sizes, X, T, _, _ = case
    benchmark.group = f"train {model.name}-like {HIDDEN[model.name]}, supervised MSE"
    sk = MLPRegressor(hidden_layer_sizes=HIDDEN[model.name], batch_size=BATCH, alpha=ALPHA, random_state=0)
    with threadpool_limits(threads, user_api="blas"):
        sk.partial_fit(X[:BATCH], T[:BATCH])
        benchmark.pedantic(sk.partial_fit, args=(X, T), rounds=5, iterations=1)
    _record(benchmark)


def test_train_numba_physics_informed(benchmark, case, threads):
    benchmark.group = f"train {case[0].name}-like {HIDDEN[case[0].name]}, physics-informed MSE"
    epoch = _train_epoch(case, threads, _mlp.HEAD_SIGNAL_MSE)
    benchmark.pedantic(epoch, rounds=5, iterations=1)
    _record(benchmark)


def test_forward_numba(benchmark, case, threads):
    model, sizes, X, _, _, _ = case
    benchmark.group = f"predict {model.name}-like {HIDDEN[model.name]}"
    theta = _mlp.init_weights(sizes, 0)
    out = np.empty((N, model.n_params))
    _mlp.forward(theta, sizes, X[:10], out[:10])
    benchmark.pedantic(_mlp.forward, args=(theta, sizes, X, out), rounds=10, iterations=1)
    _record(benchmark)


def test_predict_sklearn(benchmark, case, threads):
    model, sizes, X, T, _, _ = case
    benchmark.group = f"predict {model.name}-like {HIDDEN[model.name]}"
    sk = MLPRegressor(hidden_layer_sizes=HIDDEN[model.name], batch_size=BATCH, random_state=0)
    with threadpool_limits(threads, user_api="blas"):
        sk.partial_fit(X[:BATCH], T[:BATCH])
        benchmark.pedantic(sk.predict, args=(X,), rounds=10, iterations=1)
    _record(benchmark)
