"""``supervised``: a network trained on simulated signals with known parameters (loss on the parameters).

The research this project follows: a network trained on signals simulated from the
kinetic model with Rician noise estimates CBF and ATT more accurately and more robustly
to noise than conventional fitting, and (two-compartment) much faster.

Training: inputs standardised (StandardScaler), targets standardised per parameter, the
network (ReLU hidden layers, linear output, minibatch Adam, L2 penalty ``alpha`` as
scikit-learn's MLPRegressor) trained by the numba trainer (:mod:`~aslbatch.estimators.trainer`)
on the mean squared (``loss="mse"``) or absolute (``loss="mae"``, the research's other
supervised variant) error of the scaled parameters; the held-out validation loss is watched
after every epoch (progress bar, early stopping with ``patience``, the best epoch's weights
kept). The scalers and the weights are then exported as a
:class:`~aslbatch.estimators.network.Network` of plain arrays; inference and storage use only
those arrays. (Until TRAINING_VERSION 2 the MSE network was trained with MLPRegressor's
``partial_fit``; ``benchmarks/study_training.py`` compares the two: same accuracy, faster.)
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..models import KineticModel
from . import _mlp
from .network import Network
from .neural import NeuralEstimator, TrainingSet
from .trainer import Head, train_network

__all__ = ["SupervisedEstimator"]


class SupervisedEstimator(NeuralEstimator):
    """Supervised network (``"supervised"``): see :class:`~aslbatch.estimators.neural.NeuralEstimator`
    for the options; ``alpha`` is the L2 penalty on the weights (scikit-learn's).

    250 000 training samples by default (the other networks: 500 000): ``benchmarks/study_training.py``
    measured them as accurate as 500 000 (test NRMSE within 0.004 per parameter at SNR 3, 5 and 10,
    1C and 2C) for half the training time."""

    name = "supervised"
    title = "a supervised neural network trained on simulated signals (supervised)"

    def __init__(self, model: KineticModel, hidden_layers: Sequence[int] | None = None, n_samples: int = 250_000,
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

    def _loss_head(self, opts: dict[str, Any], train: TrainingSet, y_scaler) -> Head:
        """The loss on the standardised parameters: mean squared or absolute error (``opts["loss"]``)."""
        return Head(_mlp.HEAD_PARAM_MSE if opts["loss"] == "mse" else _mlp.HEAD_PARAM_MAE)

    def _train(self, train: TrainingSet, val: TrainingSet, opts: dict[str, Any], rng: np.random.Generator,
               progress: bool) -> tuple[Network, dict[str, Any]]:
        from sklearn.preprocessing import StandardScaler  # scikit-learn only when training

        x_scaler = StandardScaler().fit(train.inputs)
        y_scaler = StandardScaler().fit(train.params)
        x, y = x_scaler.transform(train.inputs), y_scaler.transform(train.params)
        x_val, y_val = x_scaler.transform(val.inputs), y_scaler.transform(val.params)
        sizes = [x.shape[1], *opts["hidden_layers"], y.shape[1]]
        head = self._loss_head(opts, train, y_scaler)
        # the MSE heads are mean_j e² (scikit-learn's squared loss is half that): twice scikit-learn's alpha
        # keeps its balance of loss and L2 penalty, so that "alpha" means what MLPRegressor's does
        alpha = 2.0 * opts["alpha"] if head.code != _mlp.HEAD_PARAM_MAE else opts["alpha"]
        theta, history = train_network(
            sizes, x, y, x_val, y_val, head, alpha=alpha, batch_size=opts["batch_size"],
            learning_rate=opts["learning_rate"], max_epochs=opts["max_epochs"], patience=opts["patience"],
            seed=opts["seed"], progress=progress,
            description=f"training {self.name} ({opts['loss'].upper()}) {self.model.name} network")
        layers = _mlp.unpack(theta, sizes)
        network = Network(tuple(w.copy() for w, _ in layers), tuple(b.copy() for _, b in layers), x_scaler.mean_,
                          x_scaler.scale_, y_scaler.mean_, y_scaler.scale_, output_transform=self.output_transform)
        return network, history
