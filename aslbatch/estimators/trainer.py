"""The numba network trainer: epochs of minibatch Adam (:mod:`._mlp`), validation, early stopping.

Used by the physics-informed ``unsupervised`` network and by the supervised network (both
losses; until TRAINING_VERSION 2 its MSE variant was trained by scikit-learn). Every epoch
is one call of the compiled :func:`._mlp.train_epoch`; after it the loss on the held-out
rows is computed with the same head, and training stops after ``patience`` epochs
without a relative improvement of IMPROVEMENT, keeping the best epoch's weights.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numba
import numpy as np
from tqdm import tqdm

from . import _mlp

__all__ = ["Head", "train_network"]

#: relative improvement of the validation loss that resets the patience counter
IMPROVEMENT = 1e-3
#: Adam's moment decays and epsilon (scikit-learn's defaults)
BETA1, BETA2, EPSILON = 0.9, 0.999, 1e-8


def _read_only(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)
    return arr


@dataclass
class Head:
    """The loss: a ``_mlp.HEAD_*`` code and, for the physics-informed heads, the model's
    kernel id, per-volume table and constants, the parameter bounds of the sigmoid output
    (API units) and the signal scale (ΔM/M0t) that makes the loss O(1)."""

    code: int
    lower: np.ndarray = field(default_factory=lambda: np.zeros(0))
    upper: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scale: float = 1.0
    kernel_id: int = 0
    # read-only like a model's vol/const, so the kernels are compiled once for both kinds of head
    vol: np.ndarray = field(default_factory=lambda: _read_only(np.zeros((0, 6))))
    const: np.ndarray = field(default_factory=lambda: _read_only(np.zeros(6)))

    def args(self) -> tuple:
        """The head's arguments of the _mlp kernels, in their order."""
        return (self.code, self.lower, self.upper, float(self.scale), int(self.kernel_id), self.vol, self.const)


def validation_loss(theta: np.ndarray, sizes: np.ndarray, x: np.ndarray, t: np.ndarray, head: Head) -> float:
    """Mean loss of the head over rows (no L2 term)."""
    grad = np.empty_like(theta)
    return float(_mlp.loss_and_gradient(theta, sizes, x, t, *head.args(), 0.0, grad, numba.get_num_threads()))


def train_network(sizes: list[int], x: np.ndarray, t: np.ndarray, x_val: np.ndarray, t_val: np.ndarray,
                  head: Head | Callable[[int], Head], *, alpha: float, batch_size: int, learning_rate: float,
                  max_epochs: int, patience: int, seed: int, progress: bool = False, description: str = "training",
                  fixed_epochs: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """Train a network of layer widths ``sizes`` on inputs ``x`` (already standardised) and
    targets ``t``; returns the best weights (flat, :mod:`._mlp` layout) and the history.

    ``head`` may be a function of the epoch (0-based) for a loss that changes during
    training (e.g. a narrowing arterial window): the first ``fixed_epochs`` epochs then
    run without early stopping, and validation counts only after them.
    """
    sizes_arr = np.asarray(sizes, dtype=np.int64)
    theta = _mlp.init_weights(sizes_arr, seed)
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    rng = np.random.default_rng(seed)
    x, t = np.ascontiguousarray(x, dtype=np.float64), np.ascontiguousarray(t, dtype=np.float64)
    x_val, t_val = np.ascontiguousarray(x_val, dtype=np.float64), np.ascontiguousarray(t_val, dtype=np.float64)
    step, best_loss, best, stale, epoch, train_loss = 0, np.inf, theta.copy(), 0, 0, np.nan
    best_epoch = 0
    head_at = head if callable(head) else (lambda _epoch: head)
    t0 = time.perf_counter()
    bar = tqdm(range(max_epochs), desc=description, unit="epoch", disable=not progress, file=sys.stderr, leave=False)
    for epoch in bar:
        current = head_at(epoch)
        order = rng.permutation(x.shape[0]).astype(np.int64)
        train_loss, step = _mlp.train_epoch(theta, sizes_arr, x, t, order, batch_size, *current.args(), alpha, m, v,
                                            step, learning_rate, BETA1, BETA2, EPSILON, numba.get_num_threads())
        if not np.isfinite(train_loss):
            raise FloatingPointError(f"{description}: the training loss became {train_loss} at epoch {epoch + 1}; "
                                     f"lower the learning rate")
        if epoch < fixed_epochs:
            bar.set_postfix(loss=f"{train_loss:.4g}")
            continue
        val_loss = validation_loss(theta, sizes_arr, x_val, t_val, current)
        bar.set_postfix(loss=f"{train_loss:.4g}", validation_loss=f"{val_loss:.4g}")
        stale = 0 if val_loss < best_loss * (1.0 - IMPROVEMENT) else stale + 1
        if val_loss < best_loss:
            best_loss, best, best_epoch = val_loss, theta.copy(), epoch + 1
        if stale >= patience:
            break
    bar.close()
    history = {"epochs": epoch + 1, "best_epoch": best_epoch, "validation_loss": float(best_loss),
               "training_loss": float(train_loss), "training_seconds": time.perf_counter() - t0,
               "samples_per_second": (epoch + 1) * x.shape[0] / max(time.perf_counter() - t0, 1e-9)}
    return best, history
