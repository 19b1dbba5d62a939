"""A variance network: the per-voxel posterior standard deviation of any network estimator's output.

A network trained on simulated data with a squared-error loss estimates the posterior mean
of each parameter under the training prior. The error of that estimate, squared, has as
its expectation given the input the posterior variance (plus the network's own squared
bias, small when it has learnt the mean). A second network regresses those squared
errors on the same inputs: trained on (inputs, squared residuals) of held-out simulated
data with the Gaussian negative log-likelihood of a log-variance output
(:data:`._mlp.HEAD_LOG_VARIANCE`), its exp(output) estimates E[residual² | input], and
the standard deviation is its square root. It is calibrated under the training prior by
construction; ``benchmarks/study_calibration.py`` measures its coverage, against
an ensemble's spread.

Averaged over the training prior, that includes the SNR: the inputs of one voxel say little
about its noise level (1C: five volumes for two parameters), so at a known SNR the average
over all SNRs is too wide at high SNR and too narrow at low SNR (measured: 95 % intervals
covering 91 % at SNR 3 and 97 % at SNR 10). :class:`Uncertainty` therefore holds two variance
networks trained on the same rows: one on the inputs alone (``marginal``, calibrated over the
training SNR range) and one with log(SNR) as an extra input (``at_snr``, calibrated at each
SNR), and uses the second for every voxel whose noise level is known.

Interval half-widths (``intervals=True``): the SD does not give the 68 % and 95 % intervals
where the posterior is not Gaussian (2C abat, flat between two readout times: ± 1 SD covers
58 %, ± 1.96 SD all). The same network then has, per parameter, two more outputs trained with
the pinball loss on |residual| (:data:`._mlp.HEAD_LOG_VARIANCE_INTERVALS`): the 68.27 % and 95 %
quantiles of |error| given the input, the half-widths of intervals about the estimate with that
coverage (measured on 2C abat at SNR 10: ± se 62.5 % / 97.4 %, half-widths 67.9 % / 94.4 %).
:meth:`Uncertainty.predict_intervals` gives them with the SDs.

Inference runs :attr:`VarianceNetwork.inference_network`, the network folded (scalings in its
layers, exponentials in float32 inside the forward pass), whose outputs are the SDs and
half-widths themselves (:meth:`VarianceNetwork.split_inference_output`).

Any network estimator can use it (supervised, unsupervised, a spatial one): call
:func:`fit_uncertainty` with its inputs, the SNR of each simulated row, its estimates and the
true parameters of simulated data it did not train on, keep the :class:`Uncertainty`, and ask
:meth:`Uncertainty.predict_se` for the standard errors of new inputs (with their SNR where
known). It is stored with the estimator's network (:meth:`Uncertainty.to_arrays`, prefixes
``se_`` and ``sesnr_``; ``<prefix>levels``: the intervals' nominal coverages).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import _mlp
from .network import Network
from .trainer import Head, train_network

__all__ = ["ARRAY_PREFIXES", "Uncertainty", "VarianceNetwork", "fit_uncertainty", "fit_variance_network"]

#: prefixes of the arrays of the marginal and the SNR-conditional variance network in a network file
MARGINAL_PREFIX, AT_SNR_PREFIX = "se_", "sesnr_"
ARRAY_PREFIXES = (MARGINAL_PREFIX, AT_SNR_PREFIX)
#: name (after the prefix) of the array holding a variance network's interval levels
LEVELS_ARRAY = "levels"


@dataclass(frozen=True)
class VarianceNetwork:
    """A network whose outputs are log variances (API units², one per parameter), optionally followed
    by the logs of interval half-widths (API units).

    ``network``: an affine-output :class:`~.network.Network` mapping the inputs to its outputs: the
    n_params log variances, then, for each level of ``levels`` (nominal coverages, fractions), n_params
    logs of the half-width of the interval about the estimate that covers the truth with that
    probability (the level's quantile of |error|, trained with the pinball loss, :data:`._mlp.HEAD_LOG_VARIANCE_INTERVALS`).
    """

    network: Network
    levels: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.network.n_outputs % (1 + len(self.levels)):
            raise ValueError(f"a variance network with {len(self.levels)} interval levels needs a multiple of "
                             f"{1 + len(self.levels)} outputs, got {self.network.n_outputs}")
        if not all(0.0 < level < 1.0 for level in self.levels):
            raise ValueError(f"interval levels must be nominal coverages in (0, 1), got {self.levels}")
        # log variance -> SD (exp of half), log half-width -> half-width (exp), inside the forward pass
        halves = np.concatenate([np.full(self.n_params, 0.5), np.ones(self.network.n_outputs - self.n_params)])
        object.__setattr__(self, "_inference", self.network.folded(exp_of=halves))

    @property
    def inference_network(self) -> Network:
        """The network with its scalings folded into its layers and the exponentials taken in its forward pass
        (:meth:`~.network.Network.folded`): its outputs are the standard deviations, then the half-widths (API
        units; split them with :meth:`split_inference_output`), equal to :meth:`split_output` of
        ``network``'s up to float32 rounding and cheaper to compute. What :meth:`predict_se` and the
        estimators use."""
        return self._inference

    def split_inference_output(self, output: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(standard deviation (n, n_params), half-widths (n, n_params, len(levels)) or None): views into the
        output (n, n_outputs) of :attr:`inference_network`, API units."""
        p = self.n_params
        if not self.levels:
            return output, None
        return output[:, :p], output[:, p:].reshape(output.shape[0], len(self.levels), p).transpose(0, 2, 1)

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        """Widths of the hidden layers."""
        return self.network.hidden_layers

    @property
    def n_params(self) -> int:
        """Parameters (outputs per level)."""
        return self.network.n_outputs // (1 + len(self.levels))

    def predict_se(self, inputs: np.ndarray) -> np.ndarray:
        """Standard deviation (n, n_params) in API units for finite ``inputs`` (n, n_inputs)."""
        return self.split_inference_output(self._inference.predict(inputs))[0]

    def predict_intervals(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(standard deviation (n, n_params), half-widths (n, n_params, len(levels)) or None without
        levels), API units, for finite ``inputs`` (n, n_inputs)."""
        return self.split_inference_output(self._inference.predict(inputs))

    @staticmethod
    def se_from_output(log_variance: np.ndarray) -> np.ndarray:
        """Standard deviation from the network's log-variance outputs (API units²), in place."""
        log_variance *= 0.5
        return np.exp(log_variance, out=log_variance)

    def split_output(self, output: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(standard deviation (n, n_params), half-widths (n, n_params, len(levels)) or None) from the
        network's whole output (n, n_outputs) float64, e.g. from :func:`~.network.predict_together`, API
        units. Computed in place: both are views into ``output`` (no copies at 10^6 voxels)."""
        p = self.n_params
        if not self.levels:
            return self.se_from_output(output), None
        output[:, :p] *= 0.5
        np.exp(output, out=output)
        return output[:, :p], output[:, p:].reshape(output.shape[0], len(self.levels), p).transpose(0, 2, 1)

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """The arrays of :meth:`Network.to_arrays` with ``prefix`` before each name, and ``<prefix>levels``
        when the network has interval levels."""
        arrays = {prefix + name: arr for name, arr in self.network.to_arrays().items()}
        if self.levels:
            arrays[prefix + LEVELS_ARRAY] = np.asarray(self.levels, dtype=np.float64)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> "VarianceNetwork":
        """Rebuild from the arrays whose names start with ``prefix`` (others are ignored)."""
        own = {name[len(prefix):]: arr for name, arr in arrays.items() if name.startswith(prefix)}
        if not own:
            raise KeyError(f"no {prefix}* arrays of a variance network")
        levels = own.pop(LEVELS_ARRAY, np.zeros(0))
        if levels.ndim != 1:
            raise ValueError(f"{prefix}{LEVELS_ARRAY} must be a vector of nominal coverages")
        return cls(Network.from_arrays(own, "affine"), tuple(float(v) for v in levels))


def _with_log_snr(inputs: np.ndarray, snr: np.ndarray) -> np.ndarray:
    """float32 (n, n_inputs + 1): the inputs and log SNR (inference runs in float32 anyway)."""
    out = np.empty((inputs.shape[0], inputs.shape[1] + 1), dtype=np.float32)
    out[:, :-1] = inputs
    out[:, -1] = np.log(snr)
    return out


@dataclass(frozen=True)
class Uncertainty:
    """The standard errors of a network estimator: a ``marginal`` variance network (inputs alone)
    and one conditional on the SNR (``at_snr``: inputs and log SNR)."""

    marginal: VarianceNetwork
    at_snr: VarianceNetwork

    def __post_init__(self) -> None:
        if (self.at_snr.network.n_inputs != self.marginal.network.n_inputs + 1
                or self.at_snr.network.n_outputs != self.marginal.network.n_outputs
                or self.at_snr.levels != self.marginal.levels):
            raise ValueError("the SNR-conditional variance network must take one input more than the marginal one "
                             "and give as many outputs, at the same interval levels")

    @property
    def n_inputs(self) -> int:
        """Inputs of the marginal network (the estimator's)."""
        return self.marginal.network.n_inputs

    @property
    def n_outputs(self) -> int:
        """Parameters."""
        return self.marginal.n_params

    @property
    def levels(self) -> tuple[float, ...]:
        """Nominal coverages of the interval half-widths the networks give (empty: standard deviations only)."""
        return self.marginal.levels

    def predict_se(self, inputs: np.ndarray, snr: np.ndarray | None = None) -> np.ndarray:
        """Standard deviation (n, n_params), API units, for finite ``inputs`` (n, n_inputs); rows with a
        finite ``snr`` > 0 (n,) (S_ref / σ) from the SNR-conditional network, the others from the marginal
        (the standard deviations of :meth:`predict_intervals`: one forward pass gives both)."""
        return self.predict_intervals(inputs, snr)[0]

    def predict_intervals(self, inputs: np.ndarray, snr: np.ndarray | None = None
                          ) -> tuple[np.ndarray, np.ndarray | None]:
        """As :meth:`predict_se`, with the interval half-widths: (standard deviation (n, n_params), half-widths
        (n, n_params, len(:attr:`levels`)) or None when the networks have no levels), API units."""
        known = np.zeros(inputs.shape[0], dtype=bool) if snr is None else np.isfinite(snr) & (snr > 0)
        if not known.any():
            return self.marginal.predict_intervals(inputs)
        if known.all():
            return self.at_snr.predict_intervals(_with_log_snr(inputs, snr))
        se = np.empty((inputs.shape[0], self.n_outputs))
        half = None if not self.levels else np.empty((inputs.shape[0], self.n_outputs, len(self.levels)))
        for rows, (part_se, part_half) in (
                (known, self.at_snr.predict_intervals(_with_log_snr(inputs[known], snr[known]))),
                (~known, self.marginal.predict_intervals(inputs[~known]))):
            se[rows] = part_se
            if half is not None:
                half[rows] = part_half
        return se, half

    def network_for(self, snr: np.ndarray | None) -> tuple[VarianceNetwork, np.ndarray | None] | None:
        """The variance network that serves every row of ``snr`` (n,) or None (no SNR known) and its extra
        input column (log SNR, or None for the marginal network); None when rows need both (then use
        :meth:`predict_se`). Lets an estimator run it in one pass with its own network."""
        known = None if snr is None else np.isfinite(snr) & (snr > 0)
        if known is None or not known.any():
            return self.marginal, None
        if known.all():
            return self.at_snr, np.log(snr)
        return None

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Both networks' arrays, prefixed :data:`MARGINAL_PREFIX` and :data:`AT_SNR_PREFIX`."""
        return {**self.marginal.to_arrays(MARGINAL_PREFIX), **self.at_snr.to_arrays(AT_SNR_PREFIX)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "Uncertainty":
        """Rebuild from :meth:`to_arrays` (other arrays are ignored); KeyError/ValueError if incomplete."""
        return cls(VarianceNetwork.from_arrays(arrays, MARGINAL_PREFIX),
                   VarianceNetwork.from_arrays(arrays, AT_SNR_PREFIX))


def squared_residuals(estimates: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(estimates − truth)² (n, n_params), API units²; rows with a non-finite value raise ValueError."""
    r2 = (np.asarray(estimates, dtype=np.float64) - np.asarray(truth, dtype=np.float64)) ** 2
    if not np.all(np.isfinite(r2)):
        raise ValueError("estimates and truth must be finite to train a variance network")
    return r2


def fit_variance_network(inputs: np.ndarray, estimates: np.ndarray, truth: np.ndarray, inputs_val: np.ndarray,
                         estimates_val: np.ndarray, truth_val: np.ndarray, *, hidden_layers: Sequence[int],
                         batch_size: int = 1024, learning_rate: float = 1e-3, max_epochs: int = 100,
                         patience: int = 8, seed: int = 0, progress: bool = False,
                         description: str = "training variance network", intervals: bool = False
                         ) -> tuple[VarianceNetwork, dict[str, Any]]:
    """Train a :class:`VarianceNetwork` on simulated data the estimator did not train on.

    ``inputs`` (n, n_inputs): the estimator's network inputs (ΔM/M0t [+ slice offset s]);
    ``estimates`` (n, n_params): its estimates from them, as it reports them (clipped into the
    bounds), API units; ``truth`` (n, n_params): the simulated parameters. ``*_val``: the same
    for held-out rows (early stopping). The squared residuals are divided by their mean per
    parameter for training, and the network's output shifted back, so the output is
    log variance in API units². With ``intervals``, it also learns the half-widths of the intervals
    of :data:`._mlp.INTERVAL_LEVELS` (quantiles of |error|, pinball loss; :class:`VarianceNetwork`),
    for errors whose distribution is not Gaussian (e.g. flat between two readout times). Returns the
    network and its training history.
    """
    from sklearn.preprocessing import StandardScaler  # scikit-learn only when training

    r2, r2_val = squared_residuals(estimates, truth), squared_residuals(estimates_val, truth_val)
    level = np.maximum(r2.mean(axis=0), np.finfo(np.float64).tiny)
    scaler = StandardScaler().fit(inputs)
    levels = _mlp.INTERVAL_LEVELS if intervals else ()
    n_params = r2.shape[1]
    sizes = [inputs.shape[1], *[int(h) for h in hidden_layers], n_params * (1 + len(levels))]
    head = _mlp.HEAD_LOG_VARIANCE_INTERVALS if intervals else _mlp.HEAD_LOG_VARIANCE
    theta, history = train_network(
        sizes, scaler.transform(inputs), r2 / level, scaler.transform(inputs_val), r2_val / level,
        Head(head), alpha=0.0, batch_size=batch_size, learning_rate=learning_rate,
        max_epochs=max_epochs, patience=patience, seed=seed, progress=progress, description=description)
    layers = _mlp.unpack(theta, sizes)
    # outputs in scaled units: log variance shifted by log(level), log half-width by log(sqrt(level))
    shift = np.concatenate([np.log(level), *[0.5 * np.log(level)] * len(levels)])
    network = Network(tuple(w.copy() for w, _ in layers), tuple(b.copy() for _, b in layers), scaler.mean_,
                      scaler.scale_, shift, np.ones(sizes[-1]), output_transform="affine")
    return VarianceNetwork(network, tuple(levels)), history


def fit_uncertainty(inputs: np.ndarray, snr: np.ndarray, estimates: np.ndarray, truth: np.ndarray,
                    inputs_val: np.ndarray, snr_val: np.ndarray, estimates_val: np.ndarray, truth_val: np.ndarray,
                    **options: Any) -> tuple[Uncertainty, dict[str, Any]]:
    """Train both networks of an :class:`Uncertainty` on the same simulated rows.

    As :func:`fit_variance_network`, with ``snr`` (n,) and ``snr_val``: the SNR (S_ref / σ) each row
    was simulated at; ``options`` go to :func:`fit_variance_network` (``description`` gets the
    network's name appended). Returns it and ``{"marginal": history, "at_snr": history}``.
    """
    description = options.pop("description", "training variance network")
    marginal, h_marginal = fit_variance_network(inputs, estimates, truth, inputs_val, estimates_val, truth_val,
                                                description=f"{description} (marginal)", **options)
    at_snr, h_at_snr = fit_variance_network(
        np.column_stack([inputs, np.log(snr)]), estimates, truth, np.column_stack([inputs_val, np.log(snr_val)]),
        estimates_val, truth_val, description=f"{description} (at SNR)", **options)
    return Uncertainty(marginal, at_snr), {"marginal": h_marginal, "at_snr": h_at_snr}
