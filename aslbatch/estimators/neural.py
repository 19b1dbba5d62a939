"""What every network estimator shares: simulated training data, inputs, and turning outputs into an Estimate.

A network estimator maps one voxel's ΔM/M0t signals (plus, for 2D readouts, the
slice's time offset in s) to parameters in API units. Subclasses (``supervised``,
``unsupervised``) implement :meth:`NeuralEstimator._train`; everything else is here:

- **Training data** (:func:`training_set`): parameters uniform over the model's training
  ranges, Rician (or Gaussian) noise with σ = S_ref / SNR and the SNR of each sample drawn
  log-uniformly over ``snr_range``; with ``slice_offsets``, each sample is simulated at one
  of those offsets (its PLDs shifted by it) and the offset is an extra input.
- **Prediction**: voxels with NaN/Inf or all-zero signals get status INVALID_INPUT and NaN
  parameters; predictions outside the model's bounds (or, 2C, abat > att) are clipped and
  flagged AT_BOUND; the others are CONVERGED. ``rss`` is the residual of the model signal at
  the predicted parameters (each voxel at its own slice timing).
- **Uncertainty**: after the network, two variance networks (:mod:`.variance`, half its
  widths, :func:`variance_layers`) are trained on the squared errors of its (clipped)
  estimates on :data:`VARIANCE_SHARE` × ``n_samples`` further simulated samples; ``stderr``
  is the posterior standard deviation under the training prior (NaN where the input is
  invalid): at each voxel's SNR where its noise SD is given (``predict(noise_sd=...)``;
  ``predict_image`` takes it from ``signal_se``, the repeats' spread), otherwise averaged
  over the training SNR range. The same variance networks give the half-widths of the 68 %
  and 95 % intervals (``Estimate.intervals``: quantiles of |error|, pinball loss), which hold
  their coverage where the posterior is not Gaussian (2C abat, flat between readout times).

The trained network is a :class:`~aslbatch.estimators.network.Network` (plain arrays);
:mod:`aslbatch.estimators.store` saves and loads it with its card.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np

from ..models import KineticModel
from ..simulate import NOISE_MODELS, add_noise, noise_sigma, reference_signal_level, sample_parameters
from .base import (PROGRESS_CHUNK, Estimate, Estimator, Status, check_signals, check_slice_offsets, flag_undetermined,
                   merge_estimates, noise_sd_from_signal_se)
from .network import Network, predict_together
from .variance import Uncertainty, fit_uncertainty

__all__ = ["NeuralEstimator", "TrainingSet", "shifted_model", "training_set"]

#: slice offsets (s) closer than this are the same offset
OFFSET_TOLERANCE_S = 1e-3
#: simulated samples of the variance networks, as a share of the network's ``n_samples``
VARIANCE_SHARE = 0.25
#: epochs of the variance networks at most (without a cap they ran to the 100-epoch limit and
#: tripled the training time of the default 1C network)
VARIANCE_MAX_EPOCHS = 30


def shifted_model(model: KineticModel, offset_s: float) -> KineticModel:
    """``model`` with every PLD shifted by ``offset_s`` (s): the timing of one slice of a 2D readout."""
    return model if offset_s == 0.0 else model.shifted(offset_s)


def model_signal(model: KineticModel, params: np.ndarray, offsets: np.ndarray | None) -> np.ndarray:
    """Noise-free ΔM/M0t (n, n_volumes) of ``params``, each row at its slice offset (s) if given."""
    if offsets is None or not np.any(offsets):
        return model.signal(params)
    out = np.empty((params.shape[0], model.n_volumes))
    for offset in np.unique(offsets):
        rows = offsets == offset
        out[rows] = shifted_model(model, float(offset)).signal(params[rows])
    return out


@dataclass(frozen=True)
class TrainingSet:
    """Simulated training data: ``inputs`` (n, n_inputs) = noisy ΔM/M0t [+ slice offset s],
    ``params`` (n, n_params) true parameters (API units), ``snr`` (n,)."""

    inputs: np.ndarray
    params: np.ndarray
    snr: np.ndarray


def training_set(model: KineticModel, n: int, snr_range: tuple[float, float], noise: str,
                 slice_offsets: Sequence[float], rng: np.random.Generator) -> TrainingSet:
    """``n`` simulated samples (see the module docstring); σ is the unshifted protocol's, as on a scanner."""
    params = sample_parameters(model, n, rng)
    lo, hi = snr_range
    snr = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    sigma = np.asarray(noise_sigma(model, snr), dtype=np.float64)
    if slice_offsets:
        offsets = np.asarray(slice_offsets, dtype=np.float64)[rng.integers(0, len(slice_offsets), n)]
        clean = model_signal(model, params, offsets)
        noisy = add_noise(clean, sigma, noise, rng)
        inputs = np.column_stack([noisy, offsets])
    else:
        inputs = add_noise(model.signal(params), sigma, noise, rng)
    return TrainingSet(inputs, params, snr)


class NeuralEstimator(Estimator):
    """Base of the network estimators: options shared by all, training data, prediction.

    Parameters (every option is recorded in the network's card and the provenance)
    ----------
    model : the kinetic model (protocol and constants) the network is trained for.
    hidden_layers : widths of the hidden layers (ReLU).
    n_samples : simulated training samples (a further 10 % is simulated for validation).
    snr_range : (low, high) SNR (S_ref / σ) of the training samples, drawn log-uniformly.
    noise : "rician" or "gaussian" training noise.
    loss : "mse" or "mae".
    batch_size : samples per optimiser step.
    learning_rate : Adam's step size.
    max_epochs : passes over the training set at most.
    patience : stop after this many epochs without a validation improvement (the best
        epoch's weights are kept).
    seed : seed of the simulation and of the training.
    slice_offsets : time offsets (s) of the slices of a 2D readout to train over, each
        an extra input; empty for 3D readouts (or data without SliceTiming).
    """

    trains: ClassVar[bool] = True
    takes_slice_offsets: ClassVar[bool] = True
    #: losses this estimator can minimise
    losses: ClassVar[tuple[str, ...]] = ("mse", "mae")
    #: output transform of the networks this estimator builds
    output_transform: ClassVar[str] = "affine"
    flags_prior_dominated: ClassVar[bool] = True
    takes_noise_sd: ClassVar[bool] = True
    #: what the networks train on, for messages
    training_rows: ClassVar[str] = "signals"
    stderr_method: ClassVar[str | None] = (
        "posterior standard deviation under the training prior: a variance network trained on the squared errors "
        "of this network's estimates on simulated signals (aslbatch.estimators.variance), at the voxel's SNR where "
        "its noise is known from the repeats, else averaged over the training SNR range; NaN for invalid input")
    interval_method: ClassVar[str | None] = (
        "quantile of |error| under the training prior: outputs of the same variance network trained with the "
        "pinball loss on the absolute errors of this network's estimates on simulated signals "
        "(aslbatch.estimators.variance), so the interval holds its nominal coverage whatever the shape of the "
        "posterior (e.g. flat between two readout times, where estimate ± 1.96 se is not a 95 % interval); at "
        "the voxel's SNR where its noise is known from the repeats, else averaged over the training SNR range")
    @staticmethod
    def default_hidden_layers(model: KineticModel) -> tuple[int, ...]:
        """(32, 32) for a model of two parameters (1C), (64, 64) for more (2C): the smallest that
        lost nothing (``benchmarks/study_networks.py``: wider or deeper networks were no more
        accurate at SNR 3-10)."""
        return (32, 32) if model.n_params <= 2 else (64, 64)

    def __init__(self, model: KineticModel, hidden_layers: Sequence[int] | None = None, n_samples: int = 500_000,
                 snr_range: Sequence[float] = (2.0, 50.0), noise: str = "rician", loss: str = "mse",
                 batch_size: int = 1024, learning_rate: float = 1e-3, max_epochs: int = 100, patience: int = 8,
                 seed: int = 0, slice_offsets: Sequence[float] = ()) -> None:
        super().__init__(model)
        self.hidden_layers = hidden_layers
        self.n_samples = n_samples
        self.snr_range = snr_range
        self.noise = noise
        self.loss = loss
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.max_epochs = max_epochs
        self.patience = patience
        self.seed = seed
        self.slice_offsets = slice_offsets
        self.network_: Network | None = None
        self.uncertainty_: Uncertainty | None = None
        self.training_: dict[str, Any] = {}
        #: the file the network was loaded from, and its sha256 (set by the store)
        self.network_file_: str | None = None
        self.network_sha256_: str | None = None

    # --- options ---------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """Validated options, JSON-ready (hidden layers resolved to the model's default)."""
        hidden = self.hidden_layers if self.hidden_layers is not None else self.default_hidden_layers(self.model)
        try:
            hidden = [int(h) for h in hidden]
            snr = [float(v) for v in self.snr_range]
            offsets = sorted({round(float(v), 4) for v in self.slice_offsets})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{self.name}: hidden_layers, snr_range and slice_offsets must be numbers ({exc})") from None
        if not hidden or min(hidden) < 1:
            raise ValueError(f"{self.name}: hidden_layers must be positive widths, got {hidden}")
        if len(snr) != 2 or not 0 < snr[0] <= snr[1] < np.inf:
            raise ValueError(f"{self.name}: snr_range must be (low, high) with 0 < low <= high, got {snr}")
        if self.noise not in NOISE_MODELS:
            raise ValueError(f"{self.name}: noise must be one of {NOISE_MODELS}, got {self.noise!r}")
        if self.loss not in ("mse", "mae"):
            raise ValueError(f"{self.name}: loss must be 'mse' or 'mae', got {self.loss!r}")
        if not all(np.isfinite(offsets)) or (offsets and min(offsets) < 0.0):
            raise ValueError(f"{self.name}: slice_offsets must be finite times >= 0 s, got {offsets}")
        for name, value, low in (("n_samples", self.n_samples, 100), ("batch_size", self.batch_size, 1),
                                 ("max_epochs", self.max_epochs, 1), ("patience", self.patience, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{self.name}: {name} must be an integer >= {low}, got {value!r}")
        if not float(self.learning_rate) > 0:
            raise ValueError(f"{self.name}: learning_rate must be > 0, got {self.learning_rate!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"{self.name}: seed must be an integer, got {self.seed!r}")
        return {
            "hidden_layers": hidden,
            "n_samples": int(self.n_samples),
            "snr_range": snr,
            "noise": self.noise,
            "loss": self.loss,
            "batch_size": int(self.batch_size),
            "learning_rate": float(self.learning_rate),
            "max_epochs": int(self.max_epochs),
            "patience": int(self.patience),
            "seed": int(self.seed),
            "slice_offsets": [] if offsets == [0.0] else offsets,  # all slices at once: no offset input
        }

    @property
    def offset_input(self) -> bool:
        """Whether the network takes the slice offset (s) as an extra input."""
        return bool(self.options()["slice_offsets"])

    # --- training ----------------------------------------------------------------------
    @classmethod
    def evaluation_variants(cls) -> dict[str, dict[str, Any]]:
        """The MSE network under the method's name and one per other loss (``<name>-mae``)."""
        return {(cls.name if loss == "mse" else f"{cls.name}-{loss}"): {"loss": loss} for loss in cls.losses}

    def _training_start(self, signals: np.ndarray | None) -> tuple[dict[str, Any], np.random.Generator, int]:
        """The options, random generator and validation-set size of a training run on simulated
        :attr:`training_rows`; data given to ``fit()`` or an unknown loss are refused."""
        if signals is not None:
            raise ValueError(f"{self.name} networks train on simulated {self.training_rows}; fit() takes no data")
        opts = self.options()
        if opts["loss"] not in self.losses:
            raise ValueError(f"{self.name}: loss {opts['loss']!r} is not available; choose one of {self.losses}")
        return opts, np.random.default_rng(opts["seed"]), max(opts["n_samples"] // 10, 1000)

    def _simulated(self, n: int, opts: dict[str, Any], rng: np.random.Generator) -> TrainingSet:
        """``n`` simulated training rows (:func:`training_set`) with the options ``opts``."""
        return training_set(self.model, n, opts["snr_range"], opts["noise"], opts["slice_offsets"], rng)

    def _fit(self, signals: np.ndarray | None, progress: bool) -> None:
        """Train on simulated rows (:meth:`_simulated`; ``progress``: a bar over epochs on stderr), then
        the variance networks (:mod:`.variance`) on the errors of the network's clipped estimates on
        :data:`VARIANCE_SHARE` × ``n_samples`` further rows, with interval outputs when the class
        writes intervals (:attr:`interval_method`)."""
        opts, rng, n_val = self._training_start(signals)
        train = self._simulated(opts["n_samples"], opts, rng)
        val = self._simulated(n_val, opts, rng)
        network, history = self._train(train, val, opts, rng, progress)
        self.network_ = network
        predicted = self._raw_predict(val.inputs)
        self.training_ = {**history, "validation": validation_metrics(self.model, predicted, val.params)}
        held_out = self._simulated(max(int(VARIANCE_SHARE * opts["n_samples"]), 1000), opts, rng)
        estimates = self._raw_predict(held_out.inputs)
        constrain(self.model, estimates)
        constrain(self.model, predicted)
        self.uncertainty_, variance_history = fit_uncertainty(
            held_out.inputs, held_out.snr, estimates, held_out.params, val.inputs, val.snr, predicted, val.params,
            hidden_layers=variance_layers(opts["hidden_layers"]), batch_size=opts["batch_size"],
            learning_rate=opts["learning_rate"], max_epochs=min(opts["max_epochs"], VARIANCE_MAX_EPOCHS),
            patience=opts["patience"], seed=opts["seed"], progress=progress,
            intervals=self.interval_method is not None,
            description=f"training {self.name} {self.model.name} variance network")
        self.training_["variance"] = {**variance_history, "samples": held_out.inputs.shape[0]}

    def _train(self, train: TrainingSet, val: TrainingSet, opts: dict[str, Any], rng: np.random.Generator,
               progress: bool) -> tuple[Network, dict[str, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- prediction --------------------------------------------------------------------
    @property
    def n_inputs(self) -> int:
        """Width of the network's input: the signals plus one for the slice offset when trained with
        slice timing."""
        return self.model.n_volumes + (1 if self.offset_input else 0)

    def set_network(self, network: Network, training: dict[str, Any], uncertainty: Uncertainty | None = None) -> None:
        """Install a trained network and its variance networks, if any (from
        :mod:`~aslbatch.estimators.store`), checking their shapes against :attr:`n_inputs`."""
        for what, net in (("network", network), ("variance network", uncertainty)):
            if net is not None and (net.n_inputs != self.n_inputs or net.n_outputs != self.model.n_params):
                raise ValueError(f"{what} has {net.n_inputs} inputs and {net.n_outputs} outputs; a {self.name} "
                                 f"network for this {self.model.name} protocol needs {self.n_inputs} and "
                                 f"{self.model.n_params}")
        if network.output_transform != self.output_transform:
            raise ValueError(f"{self.name} networks use a {self.output_transform} output, got {network.output_transform}")
        self.network_ = network
        self.uncertainty_ = uncertainty
        self.training_ = dict(training)
        self.fitted_ = True

    def _raw_predict(self, inputs: np.ndarray) -> np.ndarray:
        if self.network_ is None:
            raise ValueError(f"this {self.name} estimator has no network yet: fit() it or load a trained one")
        return self.network_.predict(inputs)

    def _check_offsets(self, slice_offsets: Any, n: int) -> np.ndarray | None:
        trained = self.options()["slice_offsets"]
        if slice_offsets is None:
            offsets = np.zeros(n)
        else:
            offsets = np.broadcast_to(np.asarray(slice_offsets, dtype=np.float64), (n,))
        if not trained:
            if np.any(offsets != 0.0):
                raise ValueError(f"this {self.name} network was trained without slice timing, but the data have "
                                 f"slice offsets up to {offsets.max():.3f} s (2D readout); train one with "
                                 f"slice_offsets")
            return None
        lo, hi = min(trained), max(trained)
        outside = (offsets < lo - OFFSET_TOLERANCE_S) | (offsets > hi + OFFSET_TOLERANCE_S) | ~np.isfinite(offsets)
        if np.any(outside):
            raise ValueError(f"slice offsets {np.unique(offsets[outside])[:5]} s lie outside the {lo:.3f}-{hi:.3f} s "
                             f"this {self.name} network was trained over")
        return offsets

    def predict(self, signals: np.ndarray, *, slice_offsets: np.ndarray | float | None = None,
                noise_sd: np.ndarray | float | None = None) -> Estimate:
        """As :meth:`Estimator.predict`; ``noise_sd`` (ΔM/M0t, a scalar or one per voxel; NaN: not
        known): the SD of the noise of each voxel's signals, which makes its standard errors those at
        its SNR (module docstring)."""
        if not self.is_fitted:
            raise ValueError(f"this {self.name} estimator is not fitted yet: call fit() first")
        y = check_signals(signals, self.model)
        offsets = check_slice_offsets(slice_offsets, y.shape[0])
        estimate = self._predict(y, offsets, self._snr(noise_sd, y.shape[0]))
        flag_undetermined(self.model, estimate.params, estimate.status, offsets)
        return estimate

    def predict_image(self, signals: np.ndarray, mask: np.ndarray, *, slice_offsets: np.ndarray | None = None,
                      progress: bool = False, label: str = "", signal_se: np.ndarray | None = None) -> Estimate:
        """As :meth:`Estimator.predict_image`; ``signal_se`` (n, n_volumes) gives each voxel's noise SD
        (:func:`noise_sd_from_signal_se`) and with it standard errors at its SNR."""
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 3 or int(mask.sum()) != np.shape(signals)[0]:
            raise ValueError(f"mask must be 3-D with one True voxel per row of signals ({np.shape(signals)[0]}), "
                             f"got shape {mask.shape} with {int(mask.sum())} voxels")
        noise = None if signal_se is None else noise_sd_from_signal_se(signal_se, np.shape(signals))
        if not progress:
            return self.predict(signals, slice_offsets=slice_offsets, noise_sd=noise)
        import sys

        from tqdm import tqdm

        n = int(np.shape(signals)[0])
        offsets = check_slice_offsets(slice_offsets, n)
        parts = []
        with tqdm(total=n, desc=f"{label} {self.name}".strip(), unit="voxel", leave=False, file=sys.stderr) as bar:
            for start in range(0, n, PROGRESS_CHUNK):
                rows = np.arange(start, min(start + PROGRESS_CHUNK, n))
                part = self.predict(signals[rows], slice_offsets=None if offsets is None else offsets[rows],
                                    noise_sd=None if noise is None else noise[rows])
                parts.append((rows, part))
                bar.update(rows.size)
        return merge_estimates(parts, n, self.model.param_names, self.name)

    def _snr(self, noise_sd: np.ndarray | float | None, n: int) -> np.ndarray | None:
        """Per-voxel SNR (n,) = S_ref / ``noise_sd`` (NaN where the noise is not known), or None."""
        if noise_sd is None:
            return None
        sd = np.asarray(noise_sd, dtype=np.float64)
        if sd.ndim > 1 or (sd.ndim == 1 and sd.shape[0] != n):
            raise ValueError(f"noise_sd must be a scalar or have one value per voxel ({n}), got shape {sd.shape}")
        if "_reference_level" not in self.__dict__:  # S_ref builds a model: once per estimator
            self._reference_level = reference_signal_level(self.model)
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = self._reference_level / np.broadcast_to(sd, (n,))
        return np.where(np.isfinite(snr) & (snr > 0), snr, np.nan)

    def _predict(self, y: np.ndarray, slice_offsets: np.ndarray | None, snr: np.ndarray | None = None) -> Estimate:
        """Parameters from ``y`` (n, n_volumes) ΔM/M0t; ``slice_offsets`` (n,), s, for networks
        trained with slice timing; ``snr`` (n,) of each voxel (NaN: unknown) for its standard errors."""
        n = y.shape[0]
        offsets = self._check_offsets(slice_offsets, n)
        magnitude = np.abs(y).sum(axis=1)  # NaN/Inf in any volume make it non-finite
        valid = np.isfinite(magnitude) & (magnitude > 0.0)
        every = bool(valid.all())
        rows = y if every else y[valid]
        row_offsets = None if offsets is None else (offsets if every else offsets[valid])
        inputs = rows if row_offsets is None else np.column_stack([rows, row_offsets])
        row_snr = None if snr is None else (snr if every else snr[valid])
        row_se = row_half = None
        serving = None if self.uncertainty_ is None or self.network_ is None or not rows.shape[0] \
            else self.uncertainty_.network_for(row_snr)
        if serving is not None:  # both networks in one pass over the rows
            variance, extra = serving
            raw, variance_output = predict_together([(self.network_, None), (variance.inference_network, extra)],
                                                      inputs)
            row_se, row_half = variance.split_inference_output(variance_output)
        else:
            raw = self._raw_predict(inputs) if rows.shape[0] else np.empty((0, self.model.n_params))
            if self.uncertainty_ is not None and rows.shape[0]:
                row_se, row_half = self.uncertainty_.predict_intervals(inputs, row_snr)
            elif self.uncertainty_ is not None:
                row_se = np.empty((0, self.model.n_params))
                row_half = np.empty((0, self.model.n_params, len(self.uncertainty_.levels))) \
                    if self.uncertainty_.levels else None
        clipped = constrain(self.model, raw)
        residual = model_signal(self.model, raw, row_offsets)
        residual -= rows
        row_status = np.where(clipped, Status.AT_BOUND, Status.CONVERGED).astype(np.int8)
        return scattered_estimate(self, n, None if every else valid, raw, row_status, residual, row_se, row_half,
                                  info={"network": self.network_.hidden_layers})


def scattered_estimate(estimator: "NeuralEstimator", n: int, where: np.ndarray | None, raw: np.ndarray,
                       row_status: np.ndarray, residual: np.ndarray, row_se: np.ndarray | None,
                       row_half: np.ndarray | None, info: dict[str, Any]) -> Estimate:
    """The :class:`~.base.Estimate` of ``n`` rows from the results of the rows ``where`` (a boolean mask or
    indices; None: every row, no copies): parameters (API units), status, model-signal residuals, standard
    errors and interval half-widths, if any (API units); the other rows INVALID_INPUT with NaN."""
    model = estimator.model
    rss_rows = np.einsum("ij,ij->i", residual, residual)
    if where is None:
        params, status, rss, stderr, half = raw, row_status, rss_rows, row_se, row_half
    else:
        params = np.full((n, model.n_params), np.nan)
        status = np.full(n, Status.INVALID_INPUT, dtype=np.int8)
        rss = np.full(n, np.nan)
        params[where], status[where], rss[where] = raw, row_status, rss_rows
        stderr = half = None
        if row_se is not None:
            stderr = np.full((n, model.n_params), np.nan)
            stderr[where] = row_se
        if row_half is not None:
            half = np.full((n, *row_half.shape[1:]), np.nan)
            half[where] = row_half
    return Estimate(params, status, stderr, rss, model.param_names, estimator.name, info=info, intervals=half,
                    interval_levels=() if half is None else estimator.uncertainty_.levels)


def variance_layers(hidden_layers: Sequence[int]) -> tuple[int, ...]:
    """Hidden widths of the variance networks: half the network's (at least 8), so that inference with
    standard errors costs little more than without."""
    return tuple(max(8, int(h) // 2) for h in hidden_layers)


def constrain(model: KineticModel, params: np.ndarray) -> np.ndarray:
    """Clip ``params`` (n, n_params) into the model's bounds in place (2C: abat <= att);
    returns which rows were changed."""
    lower, upper = model.bounds
    changed = np.any((params < lower) | (params > upper), axis=1)
    np.clip(params, lower, upper, out=params)
    for earlier, later, _ in model.ordered_times:
        i, j = model.param_names.index(earlier), model.param_names.index(later)
        wrong = params[:, i] > params[:, j]
        params[wrong, i] = params[wrong, j]
        changed |= wrong
    return changed


def validation_metrics(model: KineticModel, predicted: np.ndarray, truth: np.ndarray) -> dict[str, dict[str, float]]:
    """NRMSE and NMAE (over the mean truth) and bias per parameter on held-out simulated data."""
    predicted = predicted.copy()
    constrain(model, predicted)
    out = {}
    for j, name in enumerate(model.param_names):
        err = predicted[:, j] - truth[:, j]
        mean = float(np.mean(truth[:, j]))
        out[name] = {"nrmse": float(np.sqrt(np.mean(err**2)) / mean), "nmae": float(np.mean(np.abs(err)) / mean),
                     "bias": float(np.mean(err))}
    return out
