"""The estimator interface shared by every method, and the Estimate it returns.

scikit-learn's contract: ``__init__`` stores the model and options only;
options are validated in ``fit`` (or on first ``predict`` for methods that do not
train); learned state ends in ``_``. Every method returns the same
:class:`Estimate`, so pipeline, evaluation and benchmarks treat all alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

import numpy as np

from ..models import KineticModel
from ..models.base import TAU, TIME

__all__ = ["PROGRESS_CHUNK", "Estimate", "Estimator", "Status", "arrival_limits", "check_signals", "check_slice_offsets",
           "flag_undetermined", "merge_estimates"]


class Status(IntEnum):
    """Per-voxel outcome of an estimate (stored as int8 in :attr:`Estimate.status`).

    ATT_UNDETERMINED and CBF_UNDETERMINED are set from the estimate and the protocol alone,
    the same rule for every method (:func:`flag_undetermined`).
    """

    #: the fit converged inside the bounds (relative step or cost change below tolerance)
    CONVERGED = 0
    #: the iteration limit was reached before convergence; parameters are the best found
    MAX_ITERATIONS = 1
    #: converged (or chosen) with at least one parameter on a bound (or clipped to it)
    AT_BOUND = 2
    #: the input was unusable (NaN or Inf in any volume, or all zeros): parameters are NaN
    INVALID_INPUT = 3
    #: (replaces CONVERGED) with T1' = T1b the fitted arrival att is at or before the end of the
    #: bolus at every volume (att <= the shortest t − τ, the PLD for PCASL): every volume sees the
    #: fully delivered bolus, whose signal does not depend on att. cbf (and abv, abat) are
    #: determined; att is only bounded above by that time
    ATT_UNDETERMINED = 4
    #: (replaces CONVERGED, MAX_ITERATIONS, AT_BOUND) the fitted arrival att is at or after every
    #: distinct readout time but the last (att >= the second-latest t = τ + w): at most one
    #: readout time sees the label, so cbf and att are not determined, only a combination of the
    #: two (nothing at all when att >= the last readout time, where any cbf fits); abv and abat
    #: (2C) keep their meaning
    CBF_UNDETERMINED = 5


# --- which fitted values the data determine -----------------------------------------------------
# The tissue signal of every model with an arrival time att (1C, PASL, the tissue part of 2C) is
# zero at a readout time t <= att and, with T1' = T1b, independent of att once the whole bolus has
# arrived (att <= t − τ: the PLD for PCASL, TI − τ_b for PASL). Hence, with the readout times
# shifted by the voxel's slice offset: att >= the second-latest distinct readout time leaves at
# most one time that sees the label (Jacobian in (cbf, att) of rank <= 1; none at all from the
# last readout time on, where any cbf fits, and a noise fit there often ends with cbf on its
# upper bound: a hot spot) -> CBF_UNDETERMINED; att <= the shortest t − τ with T1' = T1b ->
# ATT_UNDETERMINED (cbf determined). The rule reads only the estimate and the protocol, so every
# method gets the same one.


def arrival_limits(model: KineticModel) -> tuple[float, float]:
    """(flat_below, blind_from) in s for a voxel read at the protocol's nominal times.

    att <= flat_below: att not determined (T1' = T1b only; -inf otherwise);
    att >= blind_from: cbf and att not determined (-inf with a single readout time).
    Add a voxel's slice offset (s) to both.
    """
    times = np.unique(model.vol[:, TIME])
    blind_from = float(times[-2]) if times.size >= 2 else -np.inf
    flat_below = -np.inf
    if model.constants.t1_prime == "blood":
        flat_below = float(np.min(model.vol[:, TIME] - model.vol[:, TAU]))
    return flat_below, blind_from


def flag_undetermined(model: KineticModel, params: np.ndarray, status: np.ndarray,
                      slice_offsets: np.ndarray | None = None) -> np.ndarray:
    """``status`` (n,) int8 with ATT_UNDETERMINED and CBF_UNDETERMINED set, in place and returned.

    ``params`` (n, n_params) in API units (att in s); ``slice_offsets`` (n,) s or None (all 0):
    how much later than the protocol's nominal times each voxel was read. Models without an
    ``att`` parameter are left as they are.
    """
    if "att" not in model.param_names:
        return status
    flat_below, blind_from = arrival_limits(model)
    att = params[:, model.param_names.index("att")]
    att = np.ascontiguousarray(att) if slice_offsets is None else att - slice_offsets
    with np.errstate(invalid="ignore"):  # NaN att (invalid input) is neither
        blind = att >= blind_from
        flat = att <= flat_below
    blind &= status != np.int8(Status.INVALID_INPUT)  # int8 scalars: no upcast of the status array
    flat &= status == np.int8(Status.CONVERGED)
    flat &= ~blind
    # arithmetic select (branch-free: several times faster than a scattered mask or np.where)
    status *= ~(blind | flat)
    status += flat * np.int8(Status.ATT_UNDETERMINED) + blind * np.int8(Status.CBF_UNDETERMINED)
    return status


@dataclass(frozen=True)
class Estimate:
    """Parameters estimated from ``n`` voxels by one method.

    Attributes
    ----------
    params : (n, n_params) in API units (cbf mL/100 g/min, times s, abv mL/mL); NaN
        where ``status`` is INVALID_INPUT.
    status : (n,) int8 :class:`Status` codes.
    stderr : (n, n_params) standard errors in API units, NaN where a parameter is not
        estimable (fixed, or not identifiable at this protocol); None for methods
        without uncertainty.
    rss : (n,) residual sum of squares of the fitted signal, (ΔM/M0t)².
    param_names : names of the columns of ``params``.
    method : the estimator's registry name.
    intervals : (n, n_params, len(interval_levels)) half-widths in API units of the intervals
        params ± half-width that cover the truth with probability ``interval_levels[k]`` (NaN where
        not available), for methods whose errors need not be Gaussian (the networks); None when the
        intervals are params ± 1 and ± 1.96 stderr.
    interval_levels : nominal coverages (fractions) of the ``intervals``.
    """

    params: np.ndarray
    status: np.ndarray
    stderr: np.ndarray | None
    rss: np.ndarray
    param_names: tuple[str, ...]
    method: str
    info: dict[str, Any] = field(default_factory=dict)
    intervals: np.ndarray | None = None
    interval_levels: tuple[float, ...] = ()

    def __getitem__(self, name: str) -> np.ndarray:
        """The column of ``params`` for parameter ``name`` (a read-only view)."""
        try:
            j = self.param_names.index(name)
        except ValueError:
            raise KeyError(f"no parameter {name!r}; have {self.param_names}") from None
        view = self.params[:, j]
        view.flags.writeable = False
        return view

    @property
    def n_voxels(self) -> int:
        """Number of voxels."""
        return int(self.params.shape[0])

    def status_counts(self) -> dict[str, int]:
        """Number of voxels per status name."""
        codes, counts = np.unique(self.status, return_counts=True)
        return {Status(int(c)).name.lower(): int(k) for c, k in zip(codes, counts)}


def check_signals(signals: Any, model: KineticModel) -> np.ndarray:
    """``signals`` as contiguous float64 (n_voxels, n_volumes) ΔM/M0t, or a ValueError."""
    arr = np.asarray(signals)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"signals must be numbers (ΔM/M0t), got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[np.newaxis, :]
    if arr.ndim != 2 or arr.shape[1] != model.n_volumes:
        raise ValueError(
            f"signals must have shape (n_voxels, {model.n_volumes}) for this protocol's "
            f"{model.n_volumes} volumes, got shape {np.shape(signals)}"
        )
    return np.ascontiguousarray(arr, dtype=np.float64)


def check_slice_offsets(slice_offsets: Any, n: int) -> np.ndarray | None:
    """Per-voxel slice offsets (n,) float64 in s from an array, a scalar or None (None: all 0);
    a ValueError for negative or non-finite offsets or a length other than ``n``."""
    if slice_offsets is None:
        return None
    arr = np.asarray(slice_offsets, dtype=np.float64)
    if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != n):
        raise ValueError(f"slice_offsets must be a scalar or have one value per voxel ({n}), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0.0):
        raise ValueError("slice_offsets must be finite times >= 0 s")
    return np.broadcast_to(arr, (n,))


def merge_estimates(parts: list[tuple[np.ndarray, Estimate]], n: int, names: tuple[str, ...],
                    method: str) -> Estimate:
    """One Estimate of ``n`` voxels from estimates of row subsets ``[(rows, estimate), ...]``."""
    if len(parts) == 1 and parts[0][0].size == n:
        return parts[0][1]
    params = np.full((n, len(names)), np.nan)
    status = np.empty(n, dtype=np.int8)
    rss = np.empty(n)
    has_stderr = all(est.stderr is not None for _, est in parts)
    stderr = np.full((n, len(names)), np.nan) if has_stderr else None
    levels = parts[0][1].interval_levels
    has_intervals = all(est.intervals is not None and est.interval_levels == levels for _, est in parts)
    intervals = np.full((n, len(names), len(levels)), np.nan) if has_intervals else None
    for rows, est in parts:
        params[rows] = est.params
        status[rows] = est.status
        rss[rows] = est.rss
        if stderr is not None:
            stderr[rows] = est.stderr
        if intervals is not None:
            intervals[rows] = est.intervals
    return Estimate(params, status, stderr, rss, names, method, intervals=intervals,
                    interval_levels=levels if has_intervals else ())


def noise_sd_from_signal_se(signal_se: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Each voxel's noise SD (n,), ΔM/M0t: the root mean square over its volumes of ``signal_se``
    (n, n_volumes), the standard error of each averaged signal from its repeats; NaN where no
    volume has one."""
    se = np.ascontiguousarray(signal_se, dtype=np.float64)
    if se.shape != tuple(shape):
        raise ValueError(f"signal_se must have the shape of signals {tuple(shape)}, got {se.shape}")
    from ._row_kernels import rms_of_finite  # numba: not on the path of --help

    out = np.empty(se.shape[0])
    rms_of_finite(se, out)
    return out


#: voxels per call of ``predict`` when :meth:`Estimator.predict_image` shows a progress bar
PROGRESS_CHUNK = 50_000


class Estimator:
    """Base of all estimators: ``fit`` (training, where there is any) then ``predict``.

    Subclasses set the class attributes and implement ``_fit`` (validate options, build
    grids or train) and ``_predict(signals, slice_offsets)``. Methods whose input includes
    each voxel's slice offset (networks) set ``takes_slice_offsets``; for the others
    :meth:`predict` fits each group of voxels read at one offset with the model's protocol
    shifted by that offset (exact per-slice timing of 2D readouts).
    """

    #: registry name
    name: ClassVar[str]
    #: the method in words (sidecars and reports)
    title: ClassVar[str]
    #: how standard errors are computed (sidecar ``StandardErrorMethod``); None: no uncertainty
    stderr_method: ClassVar[str | None] = None
    #: ``predict`` takes ``noise_sd`` (each voxel's noise SD, ΔM/M0t) for standard errors at that noise level;
    #: evaluate passes the test SNR's, a run the repeats' spread (``predict_image(signal_se=...)``)
    takes_noise_sd: ClassVar[bool] = False
    #: how interval half-widths (Estimate.intervals) are computed (sidecar ``IntervalMethod``); None: none
    interval_method: ClassVar[str | None] = None
    #: its outputs include the prior-dominated bit mask (:mod:`.prior`): methods with standard errors
    #: whose values can come from a prior or a bound rather than the data (lm, the networks)
    flags_prior_dominated: ClassVar[bool] = False
    #: the method trains a network (the pipeline takes it from a file or the cache)
    trains: ClassVar[bool] = False
    #: ``_predict`` takes each voxel's slice offset as an input
    takes_slice_offsets: ClassVar[bool] = False
    #: the estimate of a voxel uses its neighbours (``predict_image``); such methods are judged on
    #: spatial phantoms (:mod:`aslbatch.evaluate_spatial`), not on the Monte Carlo sets of unrelated voxels
    uses_neighbourhood: ClassVar[bool] = False

    def __init__(self, model: KineticModel) -> None:
        self.model = model

    @classmethod
    def serves(cls, model: type[KineticModel]) -> bool:
        """Whether this method estimates the parameters of ``model`` (a model class): every
        method fits a time course (``model.time_resolved``) unless it says otherwise."""
        return model.time_resolved

    @classmethod
    def evaluation_variants(cls) -> dict[str, dict[str, Any]]:
        """``{label: fixed options}`` of this method in ``aslbatch evaluate`` (default: the method alone)."""
        return {cls.name: {}}

    def options(self) -> dict[str, Any]:
        """The options that define this estimator's behaviour (for provenance)."""
        return {}

    def check_options(self) -> None:
        """Raise ValueError naming an option whose value is out of its range; nothing is built or
        trained (the run's settings are checked with it before any session starts)."""
        self.options()

    @property
    def is_fitted(self) -> bool:
        """Whether ``fit`` has run (or a trained network was installed)."""
        return getattr(self, "fitted_", False)

    def fit(self, signals: np.ndarray | None = None, progress: bool = False) -> "Estimator":
        """Validate the options and train where the method trains (on simulated signals, or on
        ``signals`` (n_voxels, n_volumes) ΔM/M0t for methods that train on data);
        ``progress``: a bar over epochs on stderr. Returns self."""
        self._fit(signals, progress)
        self.fitted_ = True
        return self

    def _fit(self, signals: np.ndarray | None, progress: bool) -> None:
        if signals is not None:
            raise ValueError(f"{self.name} does not train on data; fit() takes no signals")

    def predict(self, signals: np.ndarray, *, slice_offsets: np.ndarray | float | None = None) -> Estimate:
        """Estimate parameters from ``signals`` (n_voxels, n_volumes) ΔM/M0t; ``slice_offsets``
        (s, a scalar or one per voxel): when each voxel's slice was read after the nominal PLD.
        Values the data do not determine get their status code (:func:`flag_undetermined`)."""
        if not self.is_fitted:
            raise ValueError(f"this {self.name} estimator is not fitted yet: call fit() first")
        y = check_signals(signals, self.model)
        offsets = check_slice_offsets(slice_offsets, y.shape[0])
        if self.takes_slice_offsets:
            estimate = self._predict(y, offsets)
        elif offsets is None or not np.any(offsets):
            estimate = self._predict(y, None)
        else:
            parts = [(rows, self._at_offset(float(offset))._predict(np.ascontiguousarray(y[rows]), None))
                     for offset in np.unique(offsets) for rows in (np.flatnonzero(offsets == offset),)]
            estimate = merge_estimates(parts, y.shape[0], self.model.param_names, self.name)
        flag_undetermined(self.model, estimate.params, estimate.status, offsets)
        return estimate

    def _at_offset(self, offset_s: float) -> "Estimator":
        """This estimator for voxels read ``offset_s`` s after the nominal PLD (fitted, cached)."""
        if offset_s == 0.0:
            return self
        cache = self.__dict__.setdefault("_shifted", {})
        if offset_s not in cache:
            cache[offset_s] = type(self)(self.model.shifted(offset_s), **self.options()).fit()
        return cache[offset_s]

    def _predict(self, signals: np.ndarray, slice_offsets: np.ndarray | None) -> Estimate:  # pragma: no cover
        raise NotImplementedError

    def predict_image(self, signals: np.ndarray, mask: np.ndarray, *, slice_offsets: np.ndarray | None = None,
                      progress: bool = False, label: str = "", signal_se: np.ndarray | None = None) -> Estimate:
        """A whole acquisition: ``signals`` (n_voxels, n_volumes) ΔM/M0t of the voxels of the 3-D
        boolean ``mask`` in C order (``mask.nonzero()``), with per-voxel ``slice_offsets`` (s).
        ``signal_se``: the standard error of each averaged signal from its repeats (NaN where a
        volume was read once), for methods that derive their uncertainty from it.

        Voxelwise methods fit the rows independently (in chunks of PROGRESS_CHUNK behind a
        progress bar when ``progress``, labelled ``label``); a method that uses each voxel's
        neighbourhood overrides this (the voxel coordinates are ``np.argwhere(mask)``).
        """
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 3 or int(mask.sum()) != np.shape(signals)[0]:
            raise ValueError(f"mask must be 3-D with one True voxel per row of signals ({np.shape(signals)[0]}), "
                             f"got shape {mask.shape} with {int(mask.sum())} voxels")
        n = int(np.shape(signals)[0])
        if not progress:
            return self.predict(signals, slice_offsets=slice_offsets)
        import sys

        from tqdm import tqdm

        offsets = check_slice_offsets(slice_offsets, n)
        parts = []
        with tqdm(total=n, desc=f"{label} {self.name}".strip(), unit="voxel", leave=False, file=sys.stderr) as bar:
            for start in range(0, n, PROGRESS_CHUNK):
                rows = np.arange(start, min(start + PROGRESS_CHUNK, n))
                parts.append((rows, self.predict(signals[rows], slice_offsets=None if offsets is None else offsets[rows])))
                bar.update(rows.size)
        return merge_estimates(parts, n, self.model.param_names, self.name)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({self.model.name}{', ' if opts else ''}{opts})"
