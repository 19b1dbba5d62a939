"""``unsupervised``: a physics-informed network trained without parameter labels.

The research this project follows: the network's parameter estimates are turned back
into a signal by the kinetic model, and the loss is the mean squared (``loss="mse"``) or
absolute (``"mae"``) error between that signal and the observed one; no true parameter
is used. It found this network the most noise-immune for ATT.

- Output: params = lower + (upper − lower) · sigmoid(o), with (lower, upper) the training
  ranges widened by :data:`MARGIN` of their width on each side, within the model's bounds.
- Loss: through the model's analytic Jacobian (:mod:`._mlp` physics heads), scaled by
  S_ref (the reference signal level) so that it is O(1).
- Training data: simulated noisy signals by default (:meth:`fit` without data; the
  parameters drawn for the simulation are never shown to the network), or a subject's
  own voxels (``fit(signals)``: it adapts to the data at hand).
- 2C hard arterial edges: the arterial window's edges give abat a zero gradient almost
  everywhere. Training starts with the Gaussian-smoothed window of ASL_MODELS.md (width
  :data:`EDGE_START_S`) and narrows it geometrically to :data:`EDGE_END_S` over
  ``edge_epochs`` epochs, so abat is learnt while it has a gradient; early stopping only
  watches the epochs after that, at the final width.
- Slice timing (2D readouts) is not supported: the loss evaluates one protocol, so data
  with slice offsets are refused with a clear message.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..models import KineticModel, get_model
from ..simulate import reference_signal_level
from . import _mlp
from .base import check_signals
from .network import Network
from .neural import NeuralEstimator, TrainingSet
from .trainer import Head, train_network

__all__ = ["UnsupervisedEstimator"]

#: widening of the training range on each side, as a fraction of its width
MARGIN = 0.1
#: the smoothed arterial window's width (s) at the start and the end of 2C training
EDGE_START_S, EDGE_END_S = 0.3, 0.02
#: share of rows of a subject's own data held out for early stopping
DATA_VALIDATION_SHARE = 0.1


class UnsupervisedEstimator(NeuralEstimator):
    """Physics-informed network (``"unsupervised"``): see :class:`~aslbatch.estimators.neural.NeuralEstimator`
    for the shared options; ``alpha`` is the L2 penalty on the weights, ``edge_epochs`` the
    epochs over which a 2C model's arterial window narrows (hard-edged models only), and
    ``train_on_data`` makes ``aslbatch run`` train a network on each acquisition's own voxels
    (no cache) instead of using one trained on simulated signals."""

    name = "unsupervised"
    title = "a physics-informed neural network trained through the kinetic model (unsupervised)"
    output_transform = "sigmoid"

    def __init__(self, model: KineticModel, hidden_layers: Sequence[int] | None = None, n_samples: int = 500_000,
                 snr_range: Sequence[float] = (2.0, 50.0), noise: str = "rician", loss: str = "mse",
                 batch_size: int = 1024, learning_rate: float = 1e-3, max_epochs: int = 100, patience: int = 8,
                 seed: int = 0, slice_offsets: Sequence[float] = (), alpha: float = 0.0, edge_epochs: int = 20,
                 train_on_data: bool = False) -> None:
        super().__init__(model, hidden_layers, n_samples, snr_range, noise, loss, batch_size, learning_rate,
                         max_epochs, patience, seed, slice_offsets)
        self.alpha = alpha
        self.edge_epochs = edge_epochs
        self.train_on_data = train_on_data

    def options(self) -> dict[str, Any]:
        """Validated options, JSON-ready."""
        opts = super().options()
        if opts["slice_offsets"]:
            raise ValueError(f"{self.name}: slice timing (2D readouts) is not supported: its loss evaluates one "
                             f"protocol; use the supervised network, lm or lut for these data")
        if not float(self.alpha) >= 0:
            raise ValueError(f"{self.name}: alpha must be >= 0, got {self.alpha!r}")
        if isinstance(self.edge_epochs, bool) or not isinstance(self.edge_epochs, (int, np.integer)) \
                or self.edge_epochs < 0 or (self._anneals() and self.edge_epochs >= opts["max_epochs"]):
            raise ValueError(f"{self.name}: edge_epochs must be an integer in [0, max_epochs), got {self.edge_epochs!r}")
        if not isinstance(self.train_on_data, (bool, np.bool_)):
            raise ValueError(f"{self.name}: train_on_data must be true or false, got {self.train_on_data!r}")
        opts["alpha"] = float(self.alpha)
        opts["train_on_data"] = bool(self.train_on_data)
        opts["edge_epochs"] = int(self.edge_epochs) if self._anneals() else 0
        return opts

    def _anneals(self) -> bool:
        return "arterial_edge_s" in self.model.option_names and self.model.options()["arterial_edge_s"] == 0.0

    def output_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) of the sigmoid output: the training ranges widened by MARGIN, within the bounds."""
        lo_bound, hi_bound = self.model.bounds
        ranges = np.array([self.model.training_ranges[n] for n in self.model.param_names])
        width = ranges[:, 1] - ranges[:, 0]
        return (np.maximum(ranges[:, 0] - MARGIN * width, lo_bound),
                np.minimum(ranges[:, 1] + MARGIN * width, hi_bound))

    def _head(self, code: int, edge_s: float | None) -> Head:
        lower, upper = self.output_bounds()
        model = self.model if edge_s is None else get_model(
            self.model.name, self.model.protocol, self.model.constants, arterial_edge_s=edge_s)
        return Head(code, lower, upper, reference_signal_level(self.model), model.kernel_id, model.vol, model.const)

    def _train(self, train: TrainingSet, val: TrainingSet, opts: dict[str, Any], rng: np.random.Generator,
               progress: bool) -> tuple[Network, dict[str, Any]]:
        return self._train_on(train.inputs, val.inputs, opts, progress)

    def _train_on(self, x: np.ndarray, x_val: np.ndarray, opts: dict[str, Any],
                  progress: bool) -> tuple[Network, dict[str, Any]]:
        code = _mlp.HEAD_SIGNAL_MSE if opts["loss"] == "mse" else _mlp.HEAD_SIGNAL_MAE
        from sklearn.preprocessing import StandardScaler  # scikit-learn only when training

        scaler = StandardScaler().fit(x)
        edge_epochs = opts["edge_epochs"]
        if edge_epochs:
            widths = EDGE_START_S * (EDGE_END_S / EDGE_START_S) ** (np.arange(edge_epochs + 1) / edge_epochs)
            heads = [self._head(code, float(s)) for s in widths]
            head = lambda epoch: heads[min(epoch, edge_epochs)]  # noqa: E731 - the schedule
        else:
            head = self._head(code, None)
        sizes = [x.shape[1], *opts["hidden_layers"], self.model.n_params]
        theta, history = train_network(
            sizes, scaler.transform(x), x, scaler.transform(x_val), x_val, head, alpha=opts["alpha"],
            batch_size=opts["batch_size"], learning_rate=opts["learning_rate"], max_epochs=opts["max_epochs"],
            patience=opts["patience"], seed=opts["seed"], progress=progress, fixed_epochs=edge_epochs,
            description=f"training {self.name} ({opts['loss'].upper()}) {self.model.name} network")
        lower, upper = self.output_bounds()
        layers = _mlp.unpack(theta, sizes)
        network = Network(tuple(w.copy() for w, _ in layers), tuple(b.copy() for _, b in layers), scaler.mean_,
                          scaler.scale_, lower, upper - lower, output_transform=self.output_transform)
        if edge_epochs:
            history["arterial_edge_s"] = [EDGE_START_S, EDGE_END_S]
        return network, history

    def _fit(self, signals: np.ndarray | None, progress: bool) -> None:
        """Train on simulated signals, or on ``signals`` (n, n_volumes) ΔM/M0t of the data at hand
        (rows with NaN/Inf or all zeros are left out; 10 % of the rest are held out for early stopping)."""
        if signals is None:
            return super()._fit(None, progress)
        opts = self.options()
        y = check_signals(signals, self.model)
        y = y[np.isfinite(y).all(axis=1) & (y != 0.0).any(axis=1)]
        if y.shape[0] < 100:
            raise ValueError(f"{self.name}: training on data needs at least 100 valid voxels, got {y.shape[0]}")
        order = np.random.default_rng(opts["seed"]).permutation(y.shape[0])
        n_val = max(int(DATA_VALIDATION_SHARE * y.shape[0]), 10)
        network, history = self._train_on(y[order[n_val:]], y[order[:n_val]], opts, progress)
        self.network_ = network
        self.uncertainty_ = None  # no truth to learn its errors from: no standard errors
        self.training_ = {**history, "trained_on": f"{y.shape[0]} voxels of the data"}
