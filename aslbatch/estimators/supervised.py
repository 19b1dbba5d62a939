"""``supervised``: a scikit-learn MLPRegressor trained on simulated signals with known parameters.

The research this project follows: a network trained on signals simulated from the
kinetic model with Rician noise estimates CBF and ATT more accurately and more robustly
to noise than conventional fitting, and (two-compartment) much faster.

Training: inputs standardised (StandardScaler), targets standardised per parameter,
``MLPRegressor`` (ReLU, Adam) trained epoch by epoch with ``partial_fit`` so that the
held-out validation loss is watched after every epoch (progress bar, early stopping with
``patience``, the best epoch's weights kept). The scalers and the MLP's weights are then
exported as a :class:`~aslbatch.estimators.network.Network` of plain arrays; inference and
storage use only those arrays. ``loss="mse"`` is what MLPRegressor minimises;
``loss="mae"`` (the research's other supervised variant) trains the same architecture on
the same scaled data with the numba trainer (:mod:`~aslbatch.estimators.trainer`).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Sequence

import numpy as np
from sklearn.neural_network import MLPRegressor
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from ..models import KineticModel
from . import _mlp
from .network import Network
from .neural import NeuralEstimator, TrainingSet
from .trainer import Head, train_network

__all__ = ["SupervisedEstimator"]

#: relative improvement of the validation loss that resets the patience counter
IMPROVEMENT = 1e-3


class SupervisedEstimator(NeuralEstimator):
    """Supervised network (``"supervised"``): see :class:`~aslbatch.estimators.neural.NeuralEstimator`
    for the options; ``alpha`` is the L2 penalty on the weights (scikit-learn's)."""

    name = "supervised"
    title = "a supervised neural network trained on simulated signals (supervised)"

    def __init__(self, model: KineticModel, hidden_layers: Sequence[int] | None = None, n_samples: int = 500_000,
                 snr_range: Sequence[float] = (2.0, 50.0), noise: str = "rician", loss: str = "mse",
                 batch_size: int = 1024, learning_rate: float = 1e-3, max_epochs: int = 100, patience: int = 8,
                 seed: int = 0, slice_offsets: Sequence[float] = (), alpha: float = 1e-4) -> None:
        super().__init__(model, hidden_layers, n_samples, snr_range, noise, loss, batch_size, learning_rate,
                         max_epochs, patience, seed, slice_offsets)
        self.alpha = alpha

    def options(self) -> dict[str, Any]:
        """Validated options, JSON-ready."""
        opts = super().options()
        if not float(self.alpha) >= 0:
            raise ValueError(f"{self.name}: alpha must be >= 0, got {self.alpha!r}")
        opts["alpha"] = float(self.alpha)
        return opts

    def _train(self, train: TrainingSet, val: TrainingSet, opts: dict[str, Any], rng: np.random.Generator,
               progress: bool) -> tuple[Network, dict[str, Any]]:
        x_scaler = StandardScaler().fit(train.inputs)
        y_scaler = StandardScaler().fit(train.params)
        x, y = x_scaler.transform(train.inputs), y_scaler.transform(train.params)
        x_val, y_val = x_scaler.transform(val.inputs), y_scaler.transform(val.params)
        if opts["loss"] == "mae":
            sizes = [x.shape[1], *opts["hidden_layers"], y.shape[1]]
            theta, history = train_network(
                sizes, x, y, x_val, y_val, Head(_mlp.HEAD_PARAM_MAE), alpha=opts["alpha"],
                batch_size=opts["batch_size"], learning_rate=opts["learning_rate"], max_epochs=opts["max_epochs"],
                patience=opts["patience"], seed=opts["seed"], progress=progress,
                description=f"training {self.name} (MAE) {self.model.name} network")
            layers = _mlp.unpack(theta, sizes)
            network = Network(tuple(w.copy() for w, _ in layers), tuple(b.copy() for _, b in layers), x_scaler.mean_,
                              x_scaler.scale_, y_scaler.mean_, y_scaler.scale_, output_transform=self.output_transform)
            return network, history
        mlp = MLPRegressor(hidden_layer_sizes=tuple(opts["hidden_layers"]), activation="relu", solver="adam",
                           alpha=opts["alpha"], batch_size=opts["batch_size"],
                           learning_rate_init=opts["learning_rate"], shuffle=True,
                           random_state=np.random.RandomState(opts["seed"]))
        best_loss, best, stale, epoch = np.inf, None, 0, 0
        t0 = time.perf_counter()
        bar = tqdm(range(opts["max_epochs"]), desc=f"training {self.name} {self.model.name} network", unit="epoch",
                   disable=not progress, file=sys.stderr, leave=False)
        for epoch in bar:
            mlp.partial_fit(x, y)
            val_loss = float(np.mean((mlp.predict(x_val) - y_val) ** 2))
            bar.set_postfix(validation_loss=f"{val_loss:.4f}")
            if val_loss < best_loss * (1.0 - IMPROVEMENT):
                stale = 0
            else:
                stale += 1
            if val_loss < best_loss:
                best_loss = val_loss
                best = ([w.copy() for w in mlp.coefs_], [b.copy() for b in mlp.intercepts_], epoch + 1)
            if stale >= opts["patience"]:
                break
        bar.close()
        weights, biases, best_epoch = best
        network = Network(tuple(weights), tuple(biases), x_scaler.mean_, x_scaler.scale_, y_scaler.mean_,
                          y_scaler.scale_, output_transform=self.output_transform)
        history = {"epochs": epoch + 1, "best_epoch": best_epoch, "validation_loss": best_loss,
                   "training_seconds": time.perf_counter() - t0}
        return network, history
