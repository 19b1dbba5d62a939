"""``spatial``: a supervised network that reads each voxel's in-plane neighbourhood.

Voxelwise, the supervised network is already near the lowest error any estimator of one
voxel's signals can reach; neighbouring voxels share tissue and arrival, so at clinical SNR
the neighbourhood is where a cleaner map comes from. This network takes the signals of the
voxel and of its in-plane neighbours (the 5×5 patch for 1C, the 3×3 patch for models of more
parameters: :attr:`SpatialEstimator.radius`), with a flag per neighbour saying whether it is
present (inside the mask, usable), divided by the patch's amplitude (whose log it also reads), and
returns the centre voxel's parameters (:mod:`~aslbatch.estimators.patches` gives the input layout
and the training prior: piecewise smooth parameter fields with straight edges, small islands,
lesions and partial volume).

Training: as the supervised network (:class:`~aslbatch.estimators.supervised.SupervisedEstimator`:
standardised inputs and targets, ReLU layers, Adam with early stopping by the numba trainer,
MSE loss) on simulated patches with the acquisition's protocol, noise model and slice offsets,
except that the network's CBF output is log(cbf + :data:`CBF_LOG_OFFSET`) and the estimate its
exponential (minus the offset), with the loss still on CBF itself
(:data:`~._mlp.HEAD_PARAM_MSE_LOG_OUTPUT`): the estimate stays the posterior mean of CBF (calibrated:
E[truth | estimate] = estimate), while a log output follows CBF across its decades and a small
low-CBF lesion better than a linear one (``benchmarks/study_spatial_prior.py``; the posterior mean of
log CBF, trained in prior versions 4 and 5, read CBF 10-20 % low at SNR 5-10); cached and stored like
every network (:mod:`~aslbatch.estimators.store`: arrays + JSON card, and a network trained for one
protocol refuses data of another).

Uncertainty: as the voxelwise networks (:mod:`~aslbatch.estimators.variance`), two variance
networks read the same patch input and give the posterior standard deviation of the centre's
parameters under the training prior (one at the voxel's SNR where its noise SD is known from
the repeats, one averaged over the training SNRs); ``stderr`` holds it, and ``intervals`` the
half-widths of the 68 % and 95 % intervals learnt as quantiles of |error| (as the voxelwise networks';
NaN for invalid input).

Prediction: :meth:`SpatialEstimator.predict_image` gathers each voxel's neighbours from the
mask's grid (in the plane across which the slice offsets do not vary:
:func:`~aslbatch.estimators.patches.plane_axes`). :meth:`~aslbatch.estimators.base.Estimator.predict`
on rows without a grid treats every voxel as isolated (no neighbour present, a case the
training includes): a voxelwise estimate, for the interface's sake; it is less accurate than
the ``supervised`` network's, so use ``predict_image`` for images.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, ClassVar, Sequence

import numba
import numpy as np
from threadpoolctl import threadpool_limits

from ..models import KineticModel
from .base import Estimate, Status, check_signals, check_slice_offsets, flag_undetermined
from .network import INFERENCE_CHUNK, Network
from .neural import NeuralEstimator, TrainingSet, constrain, scattered_estimate, model_signal, noise_sd_from_signal_se
from . import _mlp
from .patches import (PRIOR_VERSION, gather_patches, n_patch_inputs, neighbour_offsets, neighbour_rows, plane_axes,
                      simulate_patches, usable_rows)
from .supervised import SupervisedEstimator
from .trainer import Head

__all__ = ["SpatialEstimator"]

#: offset (mL/100 g/min) of the log-CBF training target: CBF 0 is in the training range
CBF_LOG_OFFSET = 5.0
#: largest log-CBF output turned back into CBF (far above the training range; keeps exp finite)
_LOG_CBF_MAX = 20.0


class SpatialEstimator(SupervisedEstimator):
    """Spatial supervised network (``"spatial"``): the options of
    :class:`~aslbatch.estimators.supervised.SupervisedEstimator` (MSE loss only), 1 000 000
    training patches by default."""

    name = "spatial"
    title = "a supervised neural network reading each voxel's in-plane neighbourhood (spatial)"
    losses: ClassVar[tuple[str, ...]] = ("mse",)
    uses_neighbourhood: ClassVar[bool] = True
    training_rows: ClassVar[str] = "patches"
    stderr_method: ClassVar[str | None] = NeuralEstimator.stderr_method.replace("simulated signals", "simulated patches")
    interval_method: ClassVar[str | None] = NeuralEstimator.interval_method.replace("simulated signals",
                                                                                  "simulated patches")

    @staticmethod
    def default_hidden_layers(model: KineticModel) -> tuple[int, ...]:
        """(64, 64) for 1C, (128, 128) for models of more parameters: the first sizes tried, which met the
        accuracy targets of ``benchmarks/study_spatial.py`` (not tuned further)."""
        return (64, 64) if model.n_params <= 2 else (128, 128)

    def __init__(self, model: KineticModel, hidden_layers: Sequence[int] | None = None, n_samples: int = 1_000_000,
                 snr_range: Sequence[float] = (2.0, 50.0), noise: str = "rician", loss: str = "mse",
                 batch_size: int = 1024, learning_rate: float = 1e-3, max_epochs: int = 100, patience: int = 8,
                 seed: int = 0, slice_offsets: Sequence[float] = (), alpha: float = 1e-4,
                 prior: int = PRIOR_VERSION) -> None:
        super().__init__(model, hidden_layers, n_samples, snr_range, noise, loss, batch_size, learning_rate,
                         max_epochs, patience, seed, slice_offsets, alpha)
        self.prior = prior

    def options(self) -> dict[str, Any]:
        """Validated options, JSON-ready, with the version of the training prior
        (:data:`~aslbatch.estimators.patches.PRIOR_VERSION`): a network trained on another prior is
        refused, and the cache trains a new one."""
        if self.prior != PRIOR_VERSION:
            raise ValueError(f"{self.name}: this network was trained on training prior {self.prior!r}; this "
                             f"aslbatch simulates prior {PRIOR_VERSION}: train it again")
        return {**super().options(), "prior": PRIOR_VERSION}

    @classmethod
    def evaluation_variants(cls) -> dict[str, dict[str, Any]]:
        """The MSE network alone."""
        return {cls.name: {}}

    @property
    def radius(self) -> int:
        """Radius of the in-plane patch read (voxels): 2 (5×5) for 1C (models of <= 2 parameters), 1 (3×3)
        for the others. The 5×5 patch pools more voxels on the centre's side of a boundary: at SNR 3 1C's edge
        att error fell from 0.242 to 0.200, below the smoothing baseline's 0.230 (``benchmarks/study_spatial.py``);
        2C's 9 volumes would make its input 2.8× wider and put inference below 1 M voxels/s on 2 cores
        (``benchmarks/bench_spatial.py``)."""
        return 2 if self.model.n_params <= 2 else 1

    @property
    def n_inputs(self) -> int:
        """Width of the network's input: the patch (:func:`~aslbatch.estimators.patches.n_patch_inputs`)
        plus one for the slice offset when trained with slice timing."""
        return n_patch_inputs(self.model.n_volumes, self.radius) + (1 if self.offset_input else 0)

    # --- training --------------------------------------------------------------------------
    def _simulated(self, n: int, opts: dict[str, Any], rng: np.random.Generator) -> TrainingSet:
        """``n`` simulated training patches (:func:`~.patches.simulate_patches`) with the options ``opts``."""
        return TrainingSet(*simulate_patches(self.model, n, opts["snr_range"], opts["noise"], opts["slice_offsets"],
                                             rng, self.radius))

    def _loss_head(self, opts: dict[str, Any], train: TrainingSet, y_scaler) -> Head:
        """Mean squared error with the CBF output read as log(cbf + CBF_LOG_OFFSET), standardised by
        ``y_scaler``, and its error taken on CBF (mL/100 g/min) over the SD of the training CBF."""
        j = self.model.param_names.index("cbf")
        mean, sd = np.zeros(self.model.n_params), np.zeros(self.model.n_params)
        mean[j], sd[j] = y_scaler.mean_[j], y_scaler.scale_[j]
        return Head(_mlp.HEAD_PARAM_MSE_LOG_OUTPUT, lower=mean, upper=sd,
                    scale=float(np.std(np.exp(train.params[:, j]))))

    def _train(self, train: TrainingSet, val: TrainingSet, opts: dict[str, Any], rng: np.random.Generator,
               progress: bool) -> tuple[Network, dict[str, Any]]:
        """The supervised network's training with the CBF output log(cbf + CBF_LOG_OFFSET) (module docstring)."""
        j = self.model.param_names.index("cbf")

        def logged(data: TrainingSet) -> TrainingSet:
            params = data.params.copy()
            params[:, j] = np.log(params[:, j] + CBF_LOG_OFFSET)
            return TrainingSet(data.inputs, params, data.snr)

        return super()._train(logged(train), logged(val), opts, rng, progress)

    def _cbf_from_output(self, params: np.ndarray) -> np.ndarray:
        """The network's parameters (n, n_params), cbf as log(cbf + CBF_LOG_OFFSET), to API units, in place."""
        j = self.model.param_names.index("cbf")
        np.minimum(params[:, j], _LOG_CBF_MAX, out=params[:, j])
        np.exp(params[:, j], out=params[:, j])
        params[:, j] -= CBF_LOG_OFFSET
        return params

    def _raw_predict(self, inputs: np.ndarray) -> np.ndarray:
        """Parameters (n, n_params), API units, of patch input rows (n, n_inputs), before clipping."""
        if self.network_ is None:
            raise ValueError(f"this {self.name} estimator has no network yet: fit() it or load a trained one")
        return self._cbf_from_output(self.network_.predict(inputs))

    # --- prediction --------------------------------------------------------------------------
    def _predict(self, y: np.ndarray, slice_offsets: np.ndarray | None, snr: np.ndarray | None = None) -> Estimate:
        """Rows without a grid: every voxel isolated (see the module docstring); ``snr`` (n,) of each
        voxel (NaN: unknown) for its standard errors."""
        return self._estimate(y, np.full((y.shape[0], len(neighbour_offsets(self.radius))), -1, dtype=np.int64),
                              slice_offsets, False, "", snr)

    def predict_image(self, signals: np.ndarray, mask: np.ndarray, *, slice_offsets: np.ndarray | None = None,
                      progress: bool = False, label: str = "", signal_se: np.ndarray | None = None) -> Estimate:
        """A whole acquisition (arguments as :meth:`Estimator.predict_image`): each voxel with its
        in-plane neighbours of ``mask``; ``signal_se`` (n, n_volumes) gives each voxel's noise SD
        (:func:`~.neural.noise_sd_from_signal_se`) and with it standard errors at its SNR."""
        if not self.is_fitted:
            raise ValueError(f"this {self.name} estimator is not fitted yet: call fit() first")
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 3 or int(mask.sum()) != np.shape(signals)[0]:
            raise ValueError(f"mask must be 3-D with one True voxel per row of signals ({np.shape(signals)[0]}), "
                             f"got shape {mask.shape} with {int(mask.sum())} voxels")
        y = check_signals(signals, self.model)
        offsets = check_slice_offsets(slice_offsets, y.shape[0])
        neighbours = neighbour_rows(mask, plane_axes(mask.shape, offsets, mask), self.radius)
        snr = None if signal_se is None else self._snr(noise_sd_from_signal_se(signal_se, y.shape), y.shape[0])
        estimate = self._estimate(y, neighbours, offsets, progress, label, snr)
        flag_undetermined(self.model, estimate.params, estimate.status, offsets)
        return estimate

    def _forward(self, y: np.ndarray, neighbours: np.ndarray, rows: np.ndarray, offsets: np.ndarray | None,
                 valid: np.ndarray, out: np.ndarray, uncertain: np.ndarray | None, snr: np.ndarray | None,
                 done: Callable[[int], Any]) -> None:
        """Parameters of the voxels ``rows`` into ``out`` and, given ``uncertain`` (len(rows), n_outputs of the
        variance networks), their standard errors then interval half-widths as
        :meth:`.variance.VarianceNetwork.split_inference_output` reads them (at ``snr`` (len(rows),) where
        finite): blocks of INFERENCE_CHUNK rows spread over numba's thread
        count, each gathered (numba, without the GIL) and passed through the network and its folded
        variance network (standard deviations out, :attr:`.variance.VarianceNetwork.inference_network`)
        while in cache; ``done(n)`` is called after each block of n rows."""
        if self.network_ is None:
            raise ValueError(f"this {self.name} estimator has no network yet: fit() it or load a trained one")
        network = self.network_.folded()  # the scalings in its layers: no passes over the rows for them
        uncertainty = self.uncertainty_ if uncertain is not None else None
        serving = None if uncertainty is None else uncertainty.network_for(snr)
        n_blocks = -(-rows.size // INFERENCE_CHUNK)

        def block(b: int) -> None:
            start = b * INFERENCE_CHUNK
            part = rows[start:start + INFERENCE_CHUNK]
            inputs = gather_patches(y, neighbours, part, slice_offsets=offsets, usable=valid, one_thread=True)
            network._forward_chunk(inputs, out[start:start + part.size], 0)
            if serving is not None:  # the variance network of every row, on the same gathered inputs
                variance, extra = serving
                variance.inference_network._forward_chunk(inputs, uncertain[start:start + part.size], 0,
                                                          None if extra is None else extra[start:start + part.size])
            elif uncertainty is not None:  # rows of known and unknown SNR mixed
                se, half = uncertainty.predict_intervals(inputs, snr[start:start + part.size])
                se_view, half_view = uncertainty.marginal.split_inference_output(uncertain[start:start + part.size])
                se_view[:] = se
                if half is not None:
                    half_view[:] = half
            done(part.size)

        workers = min(numba.get_num_threads(), n_blocks)
        if workers <= 1:
            for b in range(n_blocks):
                block(b)
        else:
            with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
                list(pool.map(block, range(n_blocks)))
        self._cbf_from_output(out)

    def _estimate(self, y: np.ndarray, neighbours: np.ndarray, slice_offsets: np.ndarray | None, progress: bool,
                  label: str, snr: np.ndarray | None = None) -> Estimate:
        """Parameters of every row of ``y`` (n, n_volumes) ΔM/M0t from its patch, and their standard
        errors when the network has variance networks (at ``snr`` (n,) where finite, else marginal);
        rows with NaN/Inf or all-zero signals are INVALID_INPUT (NaN parameters and se), predictions
        outside the bounds clipped and AT_BOUND."""
        from tqdm import tqdm

        n = y.shape[0]
        offsets = self._check_offsets(slice_offsets, n)
        valid = usable_rows(y)
        rows = np.flatnonzero(valid)
        raw = np.empty((rows.size, self.model.n_params))
        variance = None if self.uncertainty_ is None else self.uncertainty_.marginal
        uncertain = None if variance is None else np.empty((rows.size, variance.network.n_outputs))
        row_snr = None if snr is None else snr[rows]
        with tqdm(total=rows.size, desc=f"{label} {self.name}".strip(), unit="voxel", leave=False, file=sys.stderr,
                  disable=not progress) as bar:
            self._forward(y, neighbours, rows, offsets, valid, raw, uncertain, row_snr, bar.update)
        row_se, row_half = (None, None) if variance is None else variance.split_inference_output(uncertain)
        clipped = constrain(self.model, raw)
        every = rows.size == n  # the usual case: no copy of the signals, no scatter
        row_offsets = None if offsets is None or every else offsets[rows]
        residual = model_signal(self.model, raw, offsets if every else row_offsets)
        residual -= y if every else y[rows]
        row_status = (clipped * np.int8(Status.AT_BOUND)).astype(np.int8)  # CONVERGED is 0
        return scattered_estimate(self, n, None if every else rows, raw, row_status, residual, row_se, row_half,
                                  info={"network": self.network_.hidden_layers,
                                        "neighbourhood": f"in-plane {2 * self.radius + 1}x{2 * self.radius + 1}"})
