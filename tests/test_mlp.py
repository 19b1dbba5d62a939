"""aslbatch.estimators._mlp (network training kernels) against independent references.

Oracles: explicit offsets of the documented weight layout, scikit-learn (initial weight range,
AdamOptimizer, MLPRegressor accuracy), a plain numpy forward pass, losses written in numpy on
tests/reference.py signals and their central finite differences, and Adam steps computed by
hand.
"""

from __future__ import annotations

import warnings

import numba
import numpy as np
import pytest
from scipy.special import expit
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPRegressor
from sklearn.neural_network._stochastic_optimizers import AdamOptimizer
from threadpoolctl import threadpool_limits

from . import reference as ref
from aslbatch.estimators import _mlp
from aslbatch.models import get_model
from aslbatch.protocol import default_protocol

HEADS = {
    "param-mse": _mlp.HEAD_PARAM_MSE,
    "param-mae": _mlp.HEAD_PARAM_MAE,
    "signal-mse": _mlp.HEAD_SIGNAL_MSE,
    "signal-mae": _mlp.HEAD_SIGNAL_MAE,
    "log-variance": _mlp.HEAD_LOG_VARIANCE,
    "log-variance-intervals": _mlp.HEAD_LOG_VARIANCE_INTERVALS,
    "param-mse-log-output": _mlp.HEAD_PARAM_MSE_LOG_OUTPUT,
}
#: typical ΔM/M0t of the test signals: the physics-informed losses are O(1)
SCALE = 0.005
#: hidden widths of the gradient tests: not multiples of the kernels' 8-wide unrolling
HIDDEN = (11, 9)


def numpy_forward(theta, sizes, X):
    """(output, hidden pre-activations) of the network: h @ W + b, ReLU on hidden layers."""
    layers = _mlp.unpack(theta, sizes)
    h = X
    pre = []
    for k, (w, b) in enumerate(layers):
        z = h @ w + b
        if k < len(layers) - 1:
            pre.append(z)
            z = np.maximum(z, 0.0)
        h = z
    return h, pre


def reference_signals(model, params):
    prot = model.protocol
    return ref.signals(model.name, params, prot.label_duration, prot.pld, prot.crushed,
                       edge_s=getattr(model, "arterial_edge_s", 0.0), **ref.constants_kwargs(model.constants))


def sigmoid_params(o, lower, upper):
    return lower + (upper - lower) * expit(o)


def reference_loss(theta, sizes, X, T, head, lower, upper, model, alpha):
    """The batch loss written directly from the module's definition, in numpy."""
    o, _ = numpy_forward(theta, sizes, X)
    if head in (_mlp.HEAD_PARAM_MSE, _mlp.HEAD_PARAM_MAE):
        r = o - T
        per_row = (r**2).mean(axis=1) if head == _mlp.HEAD_PARAM_MSE else np.abs(r).mean(axis=1)
    elif head == _mlp.HEAD_LOG_VARIANCE:  # Gaussian NLL of squared residuals T with variance exp(o)
        per_row = (o + T * np.exp(-o)).mean(axis=1)
    elif head == _mlp.HEAD_LOG_VARIANCE_INTERVALS:  # NLL, then pinball losses of |residual| at each level
        p = T.shape[1]
        total = (o[:, :p] + T * np.exp(-o[:, :p])).sum(axis=1)
        for k, tau in enumerate(_mlp.INTERVAL_LEVELS):
            u = np.sqrt(T) - np.exp(o[:, (k + 1) * p:(k + 2) * p])
            total += np.where(u >= 0, tau * u, (tau - 1.0) * u).sum(axis=1)
        per_row = total / o.shape[1]
    elif head == _mlp.HEAD_PARAM_MSE_LOG_OUTPUT:  # the outputs with upper > 0: errors of exp(lower + upper o)
        logged = upper > 0
        q_o = np.exp(lower + upper * np.minimum(o, _mlp.LOG_OUTPUT_MAX))
        r = np.where(logged, (q_o - np.exp(lower + upper * T)) / SCALE, o - T)
        per_row = (r**2).mean(axis=1)
    else:
        r = reference_signals(model, sigmoid_params(o, lower, upper)) - T
        per_row = (r**2).mean(axis=1) / SCALE**2 if head == _mlp.HEAD_SIGNAL_MSE else np.abs(r).mean(axis=1) / SCALE
    penalty = sum(float((w**2).sum()) for w, _ in _mlp.unpack(theta, sizes))
    return per_row.mean() + alpha * penalty / (2 * X.shape[0])


def kink_distances(model, params):
    """Smallest distance (s) of the arrival times in ``params`` from a kink of the model.

    The tissue curve has kinks at att = t and att = t - τ; the hard arterial window jumps at
    abat = t and abat = t - τ (non-crushed volumes).
    """
    prot = model.protocol
    t = prot.readout_time
    edges = np.concatenate([t, t - prot.label_duration])
    att = params[:, -1]
    dist = np.abs(att[:, None] - edges[None, :]).min()
    if model.name == "2c":
        open_ = ~prot.crushed
        art = np.concatenate([t[open_], (t - prot.label_duration)[open_]])
        dist = min(dist, np.abs(params[:, 2][:, None] - art[None, :]).min())
    return dist


MODELS = {
    "1c": lambda: get_model("1c", default_protocol("1c")),
    "2c-smooth": lambda: get_model("2c", default_protocol("2c"), arterial_edge_s=0.1),
    "2c-hard": lambda: get_model("2c", default_protocol("2c")),
}
#: output bounds of the physics-informed heads (API units), slightly wider than training ranges
BOUNDS = {
    "1c": ([0.0, 0.3], [160.0, 4.0]),
    "2c": ([0.0, 0.0, 0.2, 0.2], [160.0, 0.04, 1.8, 3.5]),
}


def gradient_problem(model, head, seed):
    """Network, inputs and targets of a gradient check (21 rows: two chunks, a part tile)."""
    rng = np.random.default_rng(seed)
    n_out = model.n_params * (1 + len(_mlp.INTERVAL_LEVELS) if head == _mlp.HEAD_LOG_VARIANCE_INTERVALS else 1)
    sizes = np.array([model.n_volumes, *HIDDEN, n_out], dtype=np.int64)
    theta = _mlp.init_weights(sizes, rng)
    n = 21
    X = rng.standard_normal((n, model.n_volumes))
    lower, upper = (np.array(b, dtype=np.float64) for b in BOUNDS[model.name])
    if head == _mlp.HEAD_PARAM_MSE_LOG_OUTPUT:  # the first output a log (mean -5, SD 0.5: q ~ 0.007), the rest not
        lower, upper = np.zeros(model.n_params), np.zeros(model.n_params)
        lower[0], upper[0] = -5.0, 0.5
    if head in (_mlp.HEAD_PARAM_MSE, _mlp.HEAD_PARAM_MAE, _mlp.HEAD_PARAM_MSE_LOG_OUTPUT):
        T = rng.standard_normal((n, model.n_params))
    elif head in (_mlp.HEAD_LOG_VARIANCE, _mlp.HEAD_LOG_VARIANCE_INTERVALS):
        T = rng.standard_normal((n, model.n_params)) ** 2
    else:
        true = sigmoid_params(rng.standard_normal((n, model.n_params)), lower, upper)
        T = reference_signals(model, true) + rng.normal(0.0, 0.3 * SCALE, (n, model.n_volumes))
    return sizes, theta, X, T, lower, upper


#: (model, head, alpha): every head with both models, with and without L2, plus hard 2C edges
GRADIENT_CASES = [(m, h, a) for m in ("1c", "2c-smooth") for h in sorted(HEADS) for a in (0.0, 0.7)]
GRADIENT_CASES.append(("2c-hard", "signal-mse", 0.0))


@pytest.mark.parametrize("model_name, head_name, alpha", GRADIENT_CASES)
def test_gradient_matches_central_differences(model_name, head_name, alpha):
    """Every component of the gradient against central differences of the numpy reference loss."""
    model = MODELS[model_name]()
    head = HEADS[head_name]
    sizes, theta, X, T, lower, upper = gradient_problem(model, head, seed=3)

    # the test point is away from every kink the finite differences could cross (the steps
    # move pre-activations and outputs by < 1e-5, signals by < 1e-7, arrival times by < 1e-5 s)
    o, pre = numpy_forward(theta, sizes, X)
    assert min(np.abs(z).min() for z in pre) > 1e-4
    if head in (_mlp.HEAD_SIGNAL_MSE, _mlp.HEAD_SIGNAL_MAE):
        params = sigmoid_params(o, lower, upper)
        assert kink_distances(model, params) > 1e-4
        if head == _mlp.HEAD_SIGNAL_MAE:
            assert np.abs(reference_signals(model, params) - T).min() > 1e-6
    elif head == _mlp.HEAD_PARAM_MAE:
        assert np.abs(o - T).min() > 1e-4
    elif head == _mlp.HEAD_LOG_VARIANCE_INTERVALS:  # away from the pinball losses' kinks
        p = T.shape[1]
        assert np.abs(np.sqrt(np.tile(T, len(_mlp.INTERVAL_LEVELS))) - np.exp(o[:, p:])).min() > 1e-4

    grad = np.full_like(theta, np.nan)
    loss = _mlp.loss_and_gradient(theta, sizes, X, T, head, lower, upper, SCALE, model.kernel_id, model.vol,
                                  model.const, alpha, grad, 2)
    assert loss == pytest.approx(reference_loss(theta, sizes, X, T, head, lower, upper, model, alpha), rel=1e-10)

    h = 1e-6
    fd = np.empty_like(theta)
    for i in range(theta.size):
        up = theta.copy()
        down = theta.copy()
        up[i] += h
        down[i] -= h
        fd[i] = (reference_loss(up, sizes, X, T, head, lower, upper, model, alpha)
                 - reference_loss(down, sizes, X, T, head, lower, upper, model, alpha)) / (2 * h)
    scale = np.abs(fd).max()
    assert scale > 0.01
    np.testing.assert_allclose(grad, fd, rtol=0, atol=1e-6 * scale)


# --- layout and initialisation -------------------------------------------------------------


def test_pack_unpack_layout_and_round_trip():
    sizes = [3, 4, 2]
    theta = np.arange(_mlp.n_weights(sizes), dtype=np.float64)
    assert theta.size == 3 * 4 + 4 + 4 * 2 + 2
    (w0, b0), (w1, b1) = _mlp.unpack(theta, sizes)
    # documented layout: W_0 row-major (3, 4), b_0, W_1 row-major (4, 2), b_1
    np.testing.assert_array_equal(w0, np.arange(12.0).reshape(3, 4))
    np.testing.assert_array_equal(b0, np.arange(12.0, 16.0))
    np.testing.assert_array_equal(w1, np.arange(16.0, 24.0).reshape(4, 2))
    np.testing.assert_array_equal(b1, [24.0, 25.0])
    w0[1, 2] = -1.0  # views, not copies
    assert theta[1 * 4 + 2] == -1.0
    packed = _mlp.pack([(w0, b0), (w1, b1)])
    assert packed.dtype == np.float64
    np.testing.assert_array_equal(packed, theta)
    with pytest.raises(ValueError, match="theta must have shape"):
        _mlp.unpack(theta[:-1], sizes)


def test_init_weights_follows_sklearn():
    sizes = [40, 64, 64, 3]
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, sizes[0]))
    y = rng.standard_normal((50, sizes[-1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        # a vanishing learning rate leaves sklearn's initial weights in place after one step
        sk = MLPRegressor(hidden_layer_sizes=sizes[1:-1], max_iter=1, learning_rate_init=1e-12,
                          random_state=0).fit(X, y)
    theta = _mlp.init_weights(sizes, 7)
    layers = _mlp.unpack(theta, sizes)
    assert len(layers) == len(sk.coefs_)
    for (w, b), sk_w, sk_b in zip(layers, sk.coefs_, sk.intercepts_):
        assert w.shape == sk_w.shape and b.shape == sk_b.shape
        bound = np.sqrt(6.0 / sum(w.shape))
        for ours, theirs in ((w, sk_w), (b, sk_b)):
            assert np.abs(ours).max() <= bound and np.abs(theirs).max() <= bound * (1 + 1e-9)
        # both fill the same range
        assert np.abs(w).max() > 0.9 * bound and np.abs(sk_w).max() > 0.9 * bound
        assert abs(w.std() - bound / np.sqrt(3)) < 0.1 * bound
    np.testing.assert_array_equal(theta, _mlp.init_weights(sizes, np.random.default_rng(7)))
    assert not np.array_equal(theta, _mlp.init_weights(sizes, 8))


# --- forward pass ----------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[9, 20, 13, 4], [5, 64, 64, 2], [3, 1]])
def test_forward_matches_numpy(sizes):
    rng = np.random.default_rng(1)
    sizes = np.array(sizes, dtype=np.int64)
    theta = _mlp.init_weights(sizes, rng)
    X = rng.standard_normal((1037, sizes[0]))  # part blocks and part tiles
    out = np.full((X.shape[0], sizes[-1]), np.nan)
    _mlp.forward(theta, sizes, X, out)
    expected, _ = numpy_forward(theta, sizes, X)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


# --- Adam ----------------------------------------------------------------------------------


def test_adam_two_steps_by_hand_and_sklearn():
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 0.01  # eps this large makes its placement visible
    theta = np.array([1.0, -2.0])
    m = np.zeros(2)
    v = np.zeros(2)
    g1 = np.array([0.5, -1.0])
    g2 = np.array([0.1, 0.2])
    # step 1: m = 0.1 g1 = (0.05, -0.1), v = 0.001 g1² = (0.00025, 0.001),
    # rate = 0.1 sqrt(1 - 0.999) / (1 - 0.9) = 0.0316227766, theta -= rate m / (sqrt(v) + eps)
    assert _mlp.adam_update(theta, g1, m, v, 0, lr, b1, b2, eps) == 1
    np.testing.assert_allclose(m, [0.05, -0.1], rtol=1e-14)
    np.testing.assert_allclose(v, [0.00025, 0.001], rtol=1e-14)
    np.testing.assert_allclose(theta, [0.938742588672279, -1.924025307335204], rtol=1e-13)
    # step 2: m = (0.055, -0.07), v = (0.00025975, 0.001039), rate = 0.1 sqrt(1 - 0.999²) / (1 - 0.9²)
    assert _mlp.adam_update(theta, g2, m, v, 1, lr, b1, b2, eps) == 2
    np.testing.assert_allclose(m, [0.055, -0.07], rtol=1e-14)
    np.testing.assert_allclose(v, [0.00025975, 0.001039], rtol=1e-14)
    np.testing.assert_allclose(theta, [0.889186597925896, -1.885022710267655], rtol=1e-13)

    sk_theta = [np.array([1.0, -2.0])]
    sk = AdamOptimizer(sk_theta, learning_rate_init=lr, beta_1=b1, beta_2=b2, epsilon=eps)
    sk.update_params(sk_theta, [g1])
    sk.update_params(sk_theta, [g2])
    np.testing.assert_allclose(theta, sk_theta[0], rtol=1e-14)


# --- training ---------------------------------------------------------------------------------


def _train(theta, sizes, X, T, orders, n_chunks, batch_size=64, head=_mlp.HEAD_PARAM_MSE, alpha=1e-4, lr=1e-3):
    """Epochs of train_epoch over ``orders``; returns (theta, losses, step)."""
    theta = theta.copy()
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    dummy = np.zeros(0)
    step = 0
    losses = []
    for order in orders:
        loss, step = _mlp.train_epoch(theta, sizes, X, T, order, batch_size, head, dummy, dummy, 1.0, 0,
                                      np.zeros((0, 6)), dummy, alpha, m, v, step, lr, 0.9, 0.999, 1e-8, n_chunks)
        losses.append(loss)
    return theta, losses, step


@pytest.fixture
def two_threads():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 numba threads")
    previous = numba.get_num_threads()
    yield
    numba.set_num_threads(previous)


def test_train_epoch_reproducible(two_threads):
    rng = np.random.default_rng(5)
    sizes = np.array([5, 24, 24, 2], dtype=np.int64)
    theta0 = _mlp.init_weights(sizes, rng)
    X = rng.standard_normal((700, 5))
    T = np.column_stack([np.sin(X[:, 0]) * X[:, 1], np.cos(X[:, 2] + X[:, 3])])
    orders = [rng.permutation(700) for _ in range(2)]

    numba.set_num_threads(1)
    one_a, _, step = _train(theta0, sizes, X, T, orders, n_chunks=1)
    one_b, _, _ = _train(theta0, sizes, X, T, orders, n_chunks=1)
    two_chunks_one_thread, _, _ = _train(theta0, sizes, X, T, orders, n_chunks=2)
    numba.set_num_threads(2)
    two_a, _, _ = _train(theta0, sizes, X, T, orders, n_chunks=2)
    two_b, _, _ = _train(theta0, sizes, X, T, orders, n_chunks=2)

    assert step == 2 * 11  # 700 rows in batches of 64: 10 full and one of 60, per epoch
    np.testing.assert_array_equal(one_a, one_b)
    np.testing.assert_array_equal(two_a, two_b)
    # the result depends on the chunks, not on the threads that run them
    np.testing.assert_array_equal(two_a, two_chunks_one_thread)
    assert not np.array_equal(two_a, theta0)
    np.testing.assert_allclose(two_a, one_a, rtol=1e-9, atol=1e-12)


def test_chunks_change_only_rounding():
    """More chunks than rows (empty chunks) and uneven chunks give the one-chunk gradient."""
    rng = np.random.default_rng(2)
    sizes = np.array([4, 10, 3], dtype=np.int64)
    theta = _mlp.init_weights(sizes, rng)
    X = rng.standard_normal((5, 4))
    T = rng.standard_normal((5, 3))
    dummy = np.zeros(0)
    grads = []
    for n_chunks in (1, 3, 8):
        g = np.full_like(theta, np.nan)
        _mlp.loss_and_gradient(theta, sizes, X, T, _mlp.HEAD_PARAM_MSE, dummy, dummy, 1.0, 0, np.zeros((0, 6)),
                               dummy, 0.5, g, n_chunks)
        grads.append(g)
    for g in grads[1:]:
        np.testing.assert_allclose(g, grads[0], rtol=1e-13, atol=1e-15)


def test_train_epoch_fits_a_sine():
    rng = np.random.default_rng(0)
    sizes = np.array([1, 32, 32, 1], dtype=np.int64)
    X = rng.uniform(-3.0, 3.0, (2000, 1))
    T = np.sin(X)
    orders = [rng.permutation(2000) for _ in range(150)]
    theta, losses, _ = _train(_mlp.init_weights(sizes, rng), sizes, X, T, orders, n_chunks=1, lr=3e-3, alpha=0.0)
    assert losses[0] > 0.1
    assert losses[-1] < 2e-3
    X_test = np.linspace(-2.9, 2.9, 200)[:, None]
    out = np.empty_like(X_test)
    _mlp.forward(theta, sizes, X_test, out)
    assert np.abs(out - np.sin(X_test)).max() < 0.1


def test_supervised_mse_as_accurate_as_sklearn():
    """Same data, architecture, batch, Adam settings, L2 and epochs as MLPRegressor (its loss is ours / 2)."""
    rng = np.random.default_rng(1)
    n_train, n_val, epochs = 3000, 1000, 40
    X = rng.uniform(-1.0, 1.0, (n_train + n_val, 3))
    Y = np.column_stack([np.sin(2 * X[:, 0]) * X[:, 1], X[:, 1] * X[:, 2] + np.cos(X[:, 2])])
    Y = (Y - Y[:n_train].mean(axis=0)) / Y[:n_train].std(axis=0)
    X_train, X_val, Y_train, Y_val = X[:n_train], X[n_train:], Y[:n_train], Y[n_train:]
    hidden, batch, lr, alpha = (32, 32), 64, 1e-3, 1e-4

    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk = MLPRegressor(hidden_layer_sizes=hidden, batch_size=batch, learning_rate_init=lr, alpha=alpha,
                          max_iter=epochs, tol=0.0, n_iter_no_change=epochs + 1, random_state=0).fit(X_train, Y_train)
    sk_mse = np.mean((sk.predict(X_val) - Y_val) ** 2)

    sizes = np.array([3, *hidden, 2], dtype=np.int64)
    orders = [rng.permutation(n_train) for _ in range(epochs)]
    theta, _, _ = _train(_mlp.init_weights(sizes, 0), sizes, X_train, Y_train, orders, n_chunks=1, batch_size=batch,
                         lr=lr, alpha=2 * alpha)
    out = np.empty_like(Y_val)
    _mlp.forward(theta, sizes, X_val, out)
    ours_mse = np.mean((out - Y_val) ** 2)
    assert sk_mse < 0.05  # the problem is learnable in this budget
    assert ours_mse < 1.5 * sk_mse


def test_interval_head_learns_the_quantiles_of_a_known_error_distribution():
    """Trained on |error| from a uniform distribution (a box-shaped posterior) whose width depends on the
    input, the half-widths are its quantiles (τ·w for U(-w, w)) and the variance w²/3: the closed forms."""
    from aslbatch.estimators.trainer import Head, train_network

    rng = np.random.default_rng(5)
    n = 40_000
    x = rng.uniform(-1.0, 1.0, (n, 1))
    width = 1.0 + 0.5 * x[:, 0]
    err = rng.uniform(-1.0, 1.0, n) * width
    t = (err**2)[:, None]
    sizes = [1, 16, 16, 3]
    theta, _ = train_network(sizes, x[:30_000], t[:30_000], x[30_000:], t[30_000:],
                             Head(_mlp.HEAD_LOG_VARIANCE_INTERVALS), alpha=0.0, batch_size=256,
                             learning_rate=3e-3, max_epochs=40, patience=8, seed=0)
    grid = np.linspace(-0.8, 0.8, 9)[:, None]
    out, _ = numpy_forward(theta, np.asarray(sizes), grid)
    w = 1.0 + 0.5 * grid[:, 0]
    np.testing.assert_allclose(np.exp(0.5 * out[:, 0]), w / np.sqrt(3.0), rtol=0.06)
    for k, tau in enumerate(_mlp.INTERVAL_LEVELS):
        np.testing.assert_allclose(np.exp(out[:, k + 1]), tau * w, rtol=0.06)
    # the point: 1 SD of a box covers 57.7 %, not 68.3 %, so the 68 % half-width is longer than the SD
    assert np.all(np.exp(out[:, 1]) > 1.1 * np.exp(0.5 * out[:, 0]))


def test_log_output_head_is_minimised_by_the_mean_of_the_quantity_not_of_its_log():
    """A network that is a bias alone (zero inputs): the loss of HEAD_PARAM_MSE_LOG_OUTPUT is stationary where
    exp(lower + upper b) is the mean of the targets' quantities exp(lower + upper t) (closed form), and there the
    mean of the logs (b = mean t, the estimate of a log target) still has a negative gradient: it is too low."""
    rng = np.random.default_rng(5)
    T = rng.normal(0.0, 1.0, (400, 1))
    lower, upper = np.array([3.0]), np.array([0.6])
    sizes = np.array([1, 1], dtype=np.int64)
    X = np.zeros((T.shape[0], 1))
    grad = np.empty(2)

    def bias_gradient(b):
        theta = np.array([0.0, b])  # W (1 x 1), then the bias
        _mlp.loss_and_gradient(theta, sizes, X, T, _mlp.HEAD_PARAM_MSE_LOG_OUTPUT, lower, upper, 10.0, 0,
                               np.zeros((0, 6)), np.zeros(6), 0.0, grad, 2)
        return grad[1]

    mean_of_quantity = (np.log(np.exp(lower + upper * T).mean()) - lower[0]) / upper[0]
    assert abs(bias_gradient(mean_of_quantity)) < 1e-10
    assert bias_gradient(T.mean()) < -0.01
    assert mean_of_quantity > T.mean() + 0.1  # by the spread: exp(upper² var / 2) for a Gaussian t
