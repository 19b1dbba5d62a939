"""Numba kernels that train a fully connected network: forward pass, loss heads, backpropagation, Adam.

The engine of the network estimators; no estimator logic here.

Layout
------
``sizes``: int64 ``[n_in, h1, ..., hK, n_out]``; hidden layers ReLU, output layer linear.
``theta``: one flat float64 vector holding, for each layer k in order, W_k row-major with shape
``(sizes[k], sizes[k+1])`` followed by b_k ``(sizes[k+1],)``, so that
``h_{k+1} = relu(h_k @ W_k + b_k)``. Gradients and the Adam moments share this layout.

Heads (per-sample loss of the network output o, n_out values, against a target row t)
-------------------------------------------------------------------------------------
- ``HEAD_PARAM_MSE`` / ``HEAD_PARAM_MAE``: mean_j (o_j - t_j)² / mean_j |o_j - t_j|, t the
  parameters already scaled by the caller.
- ``HEAD_PARAM_MSE_LOG_OUTPUT``: as ``HEAD_PARAM_MSE``, except for the outputs j with
  ``upper_j > 0``, which hold log(q_j + c) scaled by the caller (mean ``lower_j``, SD ``upper_j``)
  for a quantity q_j: their error is taken on q itself, e_j = (exp(lower_j + upper_j o_j) −
  exp(lower_j + upper_j t_j)) / scale (c cancels; ``scale`` the SD of q), so the loss is still
  minimised by the posterior mean of q (a log output makes the network's function of the input
  closer to linear where q spans decades; the mean of log q would be biased low by its spread).
  o_j is taken at most :data:`LOG_OUTPUT_MAX`.
- ``HEAD_SIGNAL_MSE`` / ``HEAD_SIGNAL_MAE`` (physics-informed): params_j = lower_j +
  (upper_j - lower_j) sigmoid(o_j) in API units, s = the kinetic model's ΔM/M0t, and the loss
  is mean_v (s_v - t_v)² / scale² / mean_v |s_v - t_v| / scale with t the observed signal
  row; backpropagated through the model's analytic Jacobian.
- ``HEAD_LOG_VARIANCE`` (a variance network, :mod:`.variance`): o_j is the log of a variance
  and t_j a squared residual, both in the caller's scaled units; the loss is the Gaussian
  negative log-likelihood up to constants, mean_j (o_j + t_j exp(-o_j)), minimised by
  exp(o_j) = E[t_j | input] (exp(-o_j) is taken with o_j at least -LOG_VARIANCE_FLOOR).
- ``HEAD_LOG_VARIANCE_INTERVALS`` (a variance network with interval half-widths): t has p values
  (squared residuals, as for HEAD_LOG_VARIANCE) and o has p (1 + K) values: o_0..o_{p-1} log
  variances as above, then for each level τ_k of :data:`INTERVAL_LEVELS` p values o = log q, q a
  half-width of the error, trained with the pinball (quantile) loss of a = sqrt(t_j) = |error|,
  τ_k (a - q) if a >= q else (1 - τ_k)(q - a), minimised by the τ_k quantile of |error| given the
  input: the half-width of an interval symmetric about the estimate covering τ_k of the truths,
  whatever the shape of the error's distribution (q = exp(o) with o at most LOG_VARIANCE_FLOOR).
  The loss is the sum of those p (1 + K) terms over p (1 + K).
The batch loss is the mean over rows plus scikit-learn's L2 term alpha / (2 n) * sum(W²)
(weights, not biases).

Parallelism
-----------
A batch's rows are split into ``n_chunks`` contiguous chunks, one ``prange`` iteration each.
A chunk sums its rows' gradients into its own row of an (n_chunks, n_weights) accumulator,
and the rows are reduced in a fixed order: the result depends on ``n_chunks`` only, never on
the thread schedule (pass ``numba.get_num_threads()`` for full use of the threads). Inside a
chunk the rows go through the layers in tiles of ``TILE`` rows as small matrices: each group of
8 weight rows is loaded once per tile and applied to every row of the tile in axpy loops over
contiguous rows, which LLVM vectorises (without fast-math, which stays off: each sum runs in
the order of the naive loop).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from numba import prange

from .._numba import parallel, serial
from ..models.kernels import model_signal_jacobian

HEAD_PARAM_MSE = 0
HEAD_PARAM_MAE = 1
HEAD_SIGNAL_MSE = 2
HEAD_SIGNAL_MAE = 3
HEAD_LOG_VARIANCE = 4
HEAD_LOG_VARIANCE_INTERVALS = 5
HEAD_PARAM_MSE_LOG_OUTPUT = 6
#: nominal coverages of the half-widths of HEAD_LOG_VARIANCE_INTERVALS: 68.27 % (±1 SD of a Gaussian) and 95 %
INTERVAL_LEVELS = (0.6826894921370859, 0.95)
#: the log-variance head evaluates exp(-o) at o >= -LOG_VARIANCE_FLOOR (no overflow early in training)
LOG_VARIANCE_FLOOR = 30.0
#: HEAD_PARAM_MSE_LOG_OUTPUT takes the exponential of a scaled output at most this many SDs above its mean
LOG_OUTPUT_MAX = 10.0

#: rows that go through a layer together inside a chunk
TILE = 16
#: rows per work item of :func:`forward`
_FORWARD_BLOCK = 512


# --- the flat weight vector ------------------------------------------------------------


def n_weights(sizes: Sequence[int]) -> int:
    """Length of ``theta`` for the layer widths ``sizes``."""
    s = np.asarray(sizes, dtype=np.int64)
    return int(np.sum(s[:-1] * s[1:] + s[1:]))


def unpack(theta: np.ndarray, sizes: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(W_k, b_k)]``: views into ``theta``, W_k of shape (sizes[k], sizes[k+1])."""
    if theta.shape != (n_weights(sizes),):
        raise ValueError(f"theta must have shape ({n_weights(sizes)},) for sizes {list(sizes)}, got {theta.shape}")
    layers = []
    off = 0
    for a, b in zip(sizes[:-1], sizes[1:]):
        w = theta[off : off + a * b].reshape(a, b)
        off += a * b
        layers.append((w, theta[off : off + b]))
        off += b
    return layers


def pack(layers: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The flat float64 ``theta`` holding ``[(W_k, b_k)]`` (inverse of :func:`unpack`)."""
    return np.concatenate([np.concatenate([np.ravel(w), np.ravel(b)]) for w, b in layers]).astype(np.float64)


def init_weights(sizes: Sequence[int], seed: int | np.random.Generator) -> np.ndarray:
    """Initial ``theta`` as scikit-learn's MLP with ReLU (``_init_coef``).

    Weights and biases of each layer uniform in ±sqrt(6 / (fan_in + fan_out)), drawn layer by
    layer (W_k then b_k) from ``numpy.random.default_rng(seed)``.
    """
    rng = np.random.default_rng(seed)
    parts = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        parts.append(rng.uniform(-bound, bound, (fan_in, fan_out)).ravel())
        parts.append(rng.uniform(-bound, bound, fan_out))
    return np.concatenate(parts)


# --- views inside compiled code ----------------------------------------------------------


@serial
def _layer(theta, sizes, k):
    """(W_k, b_k) views of layer k in a vector laid out as ``theta``."""
    off = 0
    for layer in range(k):
        off += sizes[layer] * sizes[layer + 1] + sizes[layer + 1]
    a = sizes[k]
    b = sizes[k + 1]
    return theta[off : off + a * b].reshape((a, b)), theta[off + a * b : off + a * b + b]


@serial
def _layer_t(theta_t, sizes, k):
    """View of W_kᵀ, shape (sizes[k+1], sizes[k]), in a vector laid out as ``theta``."""
    off = 0
    for layer in range(k):
        off += sizes[layer] * sizes[layer + 1] + sizes[layer + 1]
    return theta_t[off : off + sizes[k] * sizes[k + 1]].reshape((sizes[k + 1], sizes[k]))


@serial
def _tile(act, sizes, k):
    """View (TILE, sizes[k]) of the activations of layer k in a chunk's buffer ``act``."""
    off = 0
    for layer in range(k):
        off += TILE * sizes[layer]
    return act[off : off + TILE * sizes[k]].reshape((TILE, sizes[k]))


@serial
def _transpose_weights(theta, sizes, theta_t):
    """W_kᵀ of every layer into ``theta_t`` (at W_k's offset; the bias slots are left alone)."""
    for k in range(sizes.shape[0] - 1):
        w, _ = _layer(theta, sizes, k)
        w_t = _layer_t(theta_t, sizes, k)
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                w_t[j, i] = w[i, j]


# --- dense layers on a tile ----------------------------------------------------------------


@serial
def _dense_forward(h, w, bias, z, m, relu):
    """z[:m] = h[:m] @ w + bias, then ReLU if ``relu``; h (TILE, a), w (a, b), z (TILE, b)."""
    a, nb = w.shape
    for r in range(m):
        zr = z[r]
        for j in range(nb):
            zr[j] = bias[j]
    i = 0
    while i + 8 <= a:
        w0 = w[i]
        w1 = w[i + 1]
        w2 = w[i + 2]
        w3 = w[i + 3]
        w4 = w[i + 4]
        w5 = w[i + 5]
        w6 = w[i + 6]
        w7 = w[i + 7]
        for r in range(m):
            hr = h[r]
            h0 = hr[i]
            h1 = hr[i + 1]
            h2 = hr[i + 2]
            h3 = hr[i + 3]
            h4 = hr[i + 4]
            h5 = hr[i + 5]
            h6 = hr[i + 6]
            h7 = hr[i + 7]
            zr = z[r]
            for j in range(nb):
                zr[j] = (zr[j] + h0 * w0[j] + h1 * w1[j] + h2 * w2[j] + h3 * w3[j] + h4 * w4[j] + h5 * w5[j]
                         + h6 * w6[j] + h7 * w7[j])
        i += 8
    while i < a:
        wi = w[i]
        for r in range(m):
            hi = h[r, i]
            zr = z[r]
            for j in range(nb):
                zr[j] = zr[j] + hi * wi[j]
        i += 1
    if relu:
        for r in range(m):
            zr = z[r]
            for j in range(nb):
                if zr[j] < 0.0:
                    zr[j] = 0.0


@serial
def _dense_backward(h, d, w_t, g_w, g_b, p, m, need_p):
    """Backpropagate dL/dz ``d`` through one layer for the first m rows of a tile.

    Adds h[:m]ᵀ d[:m] to ``g_w`` (a, b) and the column sums of d[:m] to ``g_b``; with ``need_p``,
    p[:m] = (d[:m] @ Wᵀ) where h > 0, else 0 (dL/dz of the layer below through its ReLU).
    h (TILE, a) is the layer's input, d (TILE, b), w_t = Wᵀ (b, a), p (TILE, a).
    """
    a, nb = g_w.shape
    for r in range(m):
        dr = d[r]
        for j in range(nb):
            g_b[j] = g_b[j] + dr[j]
    for i in range(a):
        gi = g_w[i]
        r = 0
        while r + 8 <= m:
            x0 = h[r, i]
            x1 = h[r + 1, i]
            x2 = h[r + 2, i]
            x3 = h[r + 3, i]
            x4 = h[r + 4, i]
            x5 = h[r + 5, i]
            x6 = h[r + 6, i]
            x7 = h[r + 7, i]
            d0 = d[r]
            d1 = d[r + 1]
            d2 = d[r + 2]
            d3 = d[r + 3]
            d4 = d[r + 4]
            d5 = d[r + 5]
            d6 = d[r + 6]
            d7 = d[r + 7]
            for j in range(nb):
                gi[j] = (gi[j] + x0 * d0[j] + x1 * d1[j] + x2 * d2[j] + x3 * d3[j] + x4 * d4[j] + x5 * d5[j]
                         + x6 * d6[j] + x7 * d7[j])
            r += 8
        while r < m:
            x = h[r, i]
            dr = d[r]
            for j in range(nb):
                gi[j] = gi[j] + x * dr[j]
            r += 1
    if not need_p:
        return
    for r in range(m):
        pr = p[r]
        for i in range(a):
            pr[i] = 0.0
    j = 0
    while j + 8 <= nb:
        v0 = w_t[j]
        v1 = w_t[j + 1]
        v2 = w_t[j + 2]
        v3 = w_t[j + 3]
        v4 = w_t[j + 4]
        v5 = w_t[j + 5]
        v6 = w_t[j + 6]
        v7 = w_t[j + 7]
        for r in range(m):
            dr = d[r]
            e0 = dr[j]
            e1 = dr[j + 1]
            e2 = dr[j + 2]
            e3 = dr[j + 3]
            e4 = dr[j + 4]
            e5 = dr[j + 5]
            e6 = dr[j + 6]
            e7 = dr[j + 7]
            pr = p[r]
            for i in range(a):
                pr[i] = (pr[i] + e0 * v0[i] + e1 * v1[i] + e2 * v2[i] + e3 * v3[i] + e4 * v4[i] + e5 * v5[i]
                         + e6 * v6[i] + e7 * v7[i])
        j += 8
    while j < nb:
        v = w_t[j]
        for r in range(m):
            e = d[r, j]
            pr = p[r]
            for i in range(a):
                pr[i] = pr[i] + e * v[i]
        j += 1
    for r in range(m):
        pr = p[r]
        hr = h[r]
        for i in range(a):
            if not hr[i] > 0.0:
                pr[i] = 0.0


# --- loss heads ------------------------------------------------------------------------------


@serial
def _sigmoid(x):
    """(sigmoid(x), 1 - sigmoid(x)), each without overflow or cancellation."""
    if x >= 0.0:
        e = math.exp(-x)
        s = 1.0 / (1.0 + e)
        return s, e * s
    e = math.exp(x)
    s1 = 1.0 / (1.0 + e)
    return e * s1, s1


@serial
def _sign(x):
    """-1, 0 or 1: the subgradient of |x| (0 at 0)."""
    if x > 0.0:
        return 1.0
    if x < 0.0:
        return -1.0
    return 0.0


@serial
def _head(head, o, t, d, lower, upper, scale, kernel_id, vol, const, prm, dprm, sig, jac):
    """Per-sample loss of the output ``o`` against the target row ``t``; dL/do into ``d``.

    prm, dprm (n_out), sig (n_volumes) and jac (n_volumes, n_out) are work buffers of the
    physics-informed heads.
    """
    n_out = o.shape[0]
    loss = 0.0
    if head == HEAD_PARAM_MSE or head == HEAD_PARAM_MAE:
        for j in range(n_out):
            e = o[j] - t[j]
            if head == HEAD_PARAM_MSE:
                loss += e * e
                d[j] = 2.0 * e / n_out
            else:
                loss += abs(e)
                d[j] = _sign(e) / n_out
        return loss / n_out
    if head == HEAD_PARAM_MSE_LOG_OUTPUT:
        for j in range(n_out):
            if upper[j] > 0.0:
                clipped = o[j] > LOG_OUTPUT_MAX
                q = math.exp(lower[j] + upper[j] * min(o[j], LOG_OUTPUT_MAX))
                e = (q - math.exp(lower[j] + upper[j] * t[j])) / scale
                d[j] = 0.0 if clipped else 2.0 * e * q * upper[j] / (scale * n_out)
            else:
                e = o[j] - t[j]
                d[j] = 2.0 * e / n_out
            loss += e * e
        return loss / n_out
    if head == HEAD_LOG_VARIANCE:
        for j in range(n_out):
            ratio = t[j] * math.exp(-max(o[j], -LOG_VARIANCE_FLOOR))
            loss += o[j] + ratio
            d[j] = (1.0 - ratio) / n_out
        return loss / n_out
    if head == HEAD_LOG_VARIANCE_INTERVALS:
        p = t.shape[0]
        for j in range(p):
            ratio = t[j] * math.exp(-max(o[j], -LOG_VARIANCE_FLOOR))
            loss += o[j] + ratio
            d[j] = (1.0 - ratio) / n_out
            a = math.sqrt(max(t[j], 0.0))
            for k in range(len(INTERVAL_LEVELS)):
                tau = INTERVAL_LEVELS[k]
                i = (k + 1) * p + j
                q = math.exp(min(o[i], LOG_VARIANCE_FLOOR))
                if a >= q:
                    loss += tau * (a - q)
                    d[i] = -tau * q / n_out
                else:
                    loss += (1.0 - tau) * (q - a)
                    d[i] = (1.0 - tau) * q / n_out
        return loss / n_out
    for j in range(n_out):
        s, s1 = _sigmoid(o[j])
        width = upper[j] - lower[j]
        prm[j] = lower[j] + width * s
        dprm[j] = width * s * s1
        d[j] = 0.0
    model_signal_jacobian(kernel_id, prm, vol, const, sig, jac)
    n_vol = sig.shape[0]
    mse = head == HEAD_SIGNAL_MSE
    for v in range(n_vol):
        e = sig[v] - t[v]
        if mse:
            loss += e * e
            dl_ds = 2.0 * e / (n_vol * scale * scale)
        else:
            loss += abs(e)
            dl_ds = _sign(e) / (n_vol * scale)
        for j in range(n_out):
            d[j] += dl_ds * jac[v, j]
    for j in range(n_out):
        d[j] *= dprm[j]
    if mse:
        return loss / (n_vol * scale * scale)
    return loss / (n_vol * scale)


# --- gradient over a batch ---------------------------------------------------------------------


@serial
def _chunk_gradient(theta, theta_t, sizes, X, T, rows, lo, hi, head, lower, upper, scale, kernel_id, vol, const,
                    g, act, delta, prm, dprm, sig, jac):
    """Sum over the rows ``rows[lo:hi]`` of X/T of the per-sample loss (returned) and its gradient (into g)."""
    n_layers = sizes.shape[0] - 1
    n_in = sizes[0]
    n_out = sizes[n_layers]
    g[:] = 0.0
    loss = 0.0
    x = _tile(act, sizes, 0)
    out = _tile(act, sizes, n_layers)
    for r0 in range(lo, hi, TILE):
        m = min(TILE, hi - r0)
        for r in range(m):
            xr = X[rows[r0 + r]]
            for i in range(n_in):
                x[r, i] = xr[i]
        for k in range(n_layers):
            w, b = _layer(theta, sizes, k)
            _dense_forward(_tile(act, sizes, k), w, b, _tile(act, sizes, k + 1), m, k < n_layers - 1)
        d = delta[0, : TILE * n_out].reshape((TILE, n_out))
        for r in range(m):
            loss += _head(head, out[r], T[rows[r0 + r]], d[r], lower, upper, scale, kernel_id, vol, const, prm, dprm,
                          sig, jac)
        for k in range(n_layers - 1, -1, -1):
            g_w, g_b = _layer(g, sizes, k)
            p = delta[(n_layers - k) % 2, : TILE * sizes[k]].reshape((TILE, sizes[k]))
            _dense_backward(_tile(act, sizes, k), d, _layer_t(theta_t, sizes, k), g_w, g_b, p, m, k > 0)
            d = p
    return loss


@parallel
def _batch_gradient(theta, theta_t, sizes, X, T, rows, start, stop, head, lower, upper, scale, kernel_id, vol, const,
                    acc, losses, act, delta, prm, dprm, sig, jac):
    """Per-chunk loss sums and gradient sums over the rows ``rows[start:stop]``, one chunk per row of ``acc``."""
    n_chunks = acc.shape[0]
    n = stop - start
    for c in prange(n_chunks):
        lo = start + c * n // n_chunks
        hi = start + (c + 1) * n // n_chunks
        losses[c] = _chunk_gradient(theta, theta_t, sizes, X, T, rows, lo, hi, head, lower, upper, scale, kernel_id,
                                    vol, const, acc[c], act[c], delta[c], prm[c], dprm[c], sig[c], jac[c])


@serial
def _gradient_sums(theta, theta_t, sizes, X, T, rows, start, stop, head, lower, upper, scale, kernel_id, vol, const,
                   acc, losses, act, delta, prm, dprm, sig, jac):
    """:func:`_batch_gradient`, without a parallel region (and its thread wake-up) for one chunk."""
    if acc.shape[0] == 1:
        losses[0] = _chunk_gradient(theta, theta_t, sizes, X, T, rows, start, stop, head, lower, upper, scale,
                                    kernel_id, vol, const, acc[0], act[0], delta[0], prm[0], dprm[0], sig[0], jac[0])
    else:
        _batch_gradient(theta, theta_t, sizes, X, T, rows, start, stop, head, lower, upper, scale, kernel_id, vol,
                        const, acc, losses, act, delta, prm, dprm, sig, jac)


@serial
def _reduce(theta, sizes, acc, losses, n, alpha, grad):
    """Mean loss and gradient over n rows from the chunk sums, chunks added in order, plus the L2 term."""
    n_chunks = acc.shape[0]
    grad[:] = acc[0]
    loss = losses[0]
    for c in range(1, n_chunks):
        grad += acc[c]
        loss += losses[c]
    grad /= n
    loss /= n
    if alpha != 0.0:
        penalty = 0.0
        for k in range(sizes.shape[0] - 1):
            w, _ = _layer(theta, sizes, k)
            g_w, _ = _layer(grad, sizes, k)
            for i in range(w.shape[0]):
                for j in range(w.shape[1]):
                    penalty += w[i, j] * w[i, j]
                    g_w[i, j] += alpha * w[i, j] / n
        loss += alpha * penalty / (2.0 * n)
    return loss


@serial
def _workspace(sizes, n_chunks, n_vol):
    """Work buffers of a gradient: (theta_t, acc, losses, act, delta, prm, dprm, sig, jac)."""
    n_out = sizes[-1]
    n_w = 0
    width = 0
    for k in range(sizes.shape[0] - 1):
        n_w += sizes[k] * sizes[k + 1] + sizes[k + 1]
        width = max(width, sizes[k])
    return (np.zeros(n_w), np.empty((n_chunks, n_w)), np.empty(n_chunks), np.empty((n_chunks, TILE * sizes.sum())),
            np.empty((n_chunks, 2, TILE * max(width, n_out))), np.empty((n_chunks, n_out)),
            np.empty((n_chunks, n_out)), np.empty((n_chunks, n_vol)), np.empty((n_chunks, n_vol, n_out)))


@serial
def loss_and_gradient(theta, sizes, X, T, head, lower, upper, scale, kernel_id, vol, const, alpha, grad, n_chunks):
    """Mean loss over the rows of X and T, with its gradient w.r.t. theta written into ``grad``.

    X (n, n_in): network inputs. T: targets, (n, n_out) scaled parameters for the HEAD_PARAM_* heads,
    (n, n_volumes) ΔM/M0t for the HEAD_SIGNAL_* heads. head: one of the HEAD_* constants.
    lower, upper (n_out,): output bounds (API units); scale > 0: typical signal level (ΔM/M0t);
    kernel_id, vol, const: the kinetic model (``model.kernel_id``, ``model.vol``, ``model.const``).
    Those five are read by the physics-informed heads only: pass dummies otherwise (``np.zeros(0)``,
    ``np.zeros((0, 6))`` for vol). alpha >= 0: L2 penalty. n_chunks >= 1: row chunks; the result
    depends on it, not on the number of threads (``numba.get_num_threads()`` keeps every thread busy).
    """
    n = X.shape[0]
    theta_t, acc, losses, act, delta, prm, dprm, sig, jac = _workspace(sizes, max(1, n_chunks), vol.shape[0])
    _transpose_weights(theta, sizes, theta_t)
    _gradient_sums(theta, theta_t, sizes, X, T, np.arange(n), 0, n, head, lower, upper, scale, kernel_id, vol, const,
                   acc, losses, act, delta, prm, dprm, sig, jac)
    return _reduce(theta, sizes, acc, losses, n, alpha, grad)


# --- optimiser and training loop ------------------------------------------------------------


@serial
def adam_update(theta, grad, m, v, step, learning_rate, beta1, beta2, eps):
    """One Adam update of ``theta`` in place (``m``, ``v``: first and second moments, updated in place).

    step: Adam updates applied before this one (0 at the start); returns step + 1. Bias
    correction as scikit-learn's AdamOptimizer (Kingma & Ba, section 2): with t = step + 1,
    theta -= learning_rate sqrt(1 - beta2^t) / (1 - beta1^t) m / (sqrt(v) + eps).
    """
    t = step + 1
    rate = learning_rate * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
    for i in range(theta.shape[0]):
        gi = grad[i]
        m[i] = beta1 * m[i] + (1.0 - beta1) * gi
        v[i] = beta2 * v[i] + (1.0 - beta2) * gi * gi
        theta[i] -= rate * m[i] / (math.sqrt(v[i]) + eps)
    return t


@serial
def train_epoch(theta, sizes, X, T, order, batch_size, head, lower, upper, scale, kernel_id, vol, const, alpha, m, v,
                step, learning_rate, beta1, beta2, eps, n_chunks):
    """One pass over the rows ``order`` of X/T in minibatches of ``batch_size``, one Adam update each.

    Arguments as :func:`loss_and_gradient` and :func:`adam_update`; theta, m and v are updated in
    place. The last batch holds the remainder. Returns (mean over rows of the batch losses, each
    taken before its update, new step).
    """
    n = order.shape[0]
    theta_t, acc, losses, act, delta, prm, dprm, sig, jac = _workspace(sizes, max(1, n_chunks), vol.shape[0])
    grad = np.empty_like(theta)
    total = 0.0
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        _transpose_weights(theta, sizes, theta_t)
        _gradient_sums(theta, theta_t, sizes, X, T, order, start, stop, head, lower, upper, scale, kernel_id, vol,
                       const, acc, losses, act, delta, prm, dprm, sig, jac)
        total += _reduce(theta, sizes, acc, losses, stop - start, alpha, grad) * (stop - start)
        step = adam_update(theta, grad, m, v, step, learning_rate, beta1, beta2, eps)
    return total / n, step


# --- prediction -------------------------------------------------------------------------------


@serial
def _chunk_forward(theta, sizes, X, lo, hi, act, out):
    """Network output of the rows lo:hi of X into the same rows of ``out``."""
    n_layers = sizes.shape[0] - 1
    x = _tile(act, sizes, 0)
    z = _tile(act, sizes, n_layers)
    for r0 in range(lo, hi, TILE):
        m = min(TILE, hi - r0)
        for r in range(m):
            x[r] = X[r0 + r]
        for k in range(n_layers):
            w, b = _layer(theta, sizes, k)
            _dense_forward(_tile(act, sizes, k), w, b, _tile(act, sizes, k + 1), m, k < n_layers - 1)
        for r in range(m):
            out[r0 + r] = z[r]


@parallel
def forward(theta, sizes, X, out):
    """Network output for every row of X (n, n_in) into ``out`` (n, n_out), blocks of rows spread over the threads."""
    n = X.shape[0]
    for c in prange((n + _FORWARD_BLOCK - 1) // _FORWARD_BLOCK):
        act = np.empty(TILE * sizes.sum())
        _chunk_forward(theta, sizes, X, c * _FORWARD_BLOCK, min(n, (c + 1) * _FORWARD_BLOCK), act, out)
