"""The white-paper single-delay formula (Alsop 2015): CBF in closed form, for data read at one time.

Serves :class:`~aslbatch.models.single_delay.SingleDelayModel` only, whose signal is linear
in CBF, s_v = cbf · g_v. With one condition this is the white-paper formula
cbf = s / g; with several conditions read at the same time (e.g. two label durations)
it is their least-squares combination Σ g s / Σ g², which is what Levenberg–Marquardt or
a lookup table would converge to exactly: one method answers for all of them. A 2D
readout's slice read δ s after the nominal PLD/TI has g multiplied by e^(−δ/T1b).

The standard error comes from the spread of the repeated pairs (the standard error of
each averaged signal), propagated through the linear formula: se = √(Σ g² se_v²) / Σ g².

The model turns the estimate into its outputs (``quantities``): cbf itself for ``single``; for
``relative`` (no M0: the signals are ΔM in scanner units) CBF relative to its median over the
voxels given, and the mean ΔM.
"""

from __future__ import annotations

import numpy as np

from ..models import KineticModel
from .base import Estimate, Estimator, Status, check_signals, check_slice_offsets

__all__ = ["WhitePaperEstimator"]


class WhitePaperEstimator(Estimator):
    """CBF (mL/100 g/min; relative CBF and ΔM for the relative model) by the white-paper formula; no
    options, nothing to train."""

    name = "whitepaper"
    title = "the white-paper single-delay formula (Alsop et al. 2015), a closed form"
    stderr_method = ("the spread of the repeated control/label pairs: the standard error of each averaged "
                     "ΔM/M0t (sample standard deviation / √n) propagated through the linear formula")
    takes_slice_offsets = True

    @classmethod
    def serves(cls, model: type[KineticModel]) -> bool:
        """Only models read at one time (``time_resolved`` False), whose signal is linear in CBF."""
        return not model.time_resolved

    def _predict(self, signals: np.ndarray, slice_offsets: np.ndarray | None,
                 signal_se: np.ndarray | None = None) -> Estimate:
        # a voxel read δ s late has gain g e^(−δ/T1b): a factor k per voxel on one gain vector g,
        # so cbf = (y·g) / (k |g|²) and rss = |y|² − (y·g)²/|g|² (independent of k); one volume
        # (the usual single-delay series after averaging) fits exactly: rss 0, two passes in all
        gain = self.model.gain
        norm = float(gain @ gain)
        one = signals.shape[1] == 1
        projection = signals[:, 0] * gain[0] if one else signals @ gain
        scale = norm if slice_offsets is None else norm * np.exp(-slice_offsets / self.model.constants.t1b)
        with np.errstate(invalid="ignore", over="ignore"):
            cbf = np.divide(projection, scale, out=projection)
            rss = np.zeros(signals.shape[0]) if one else np.maximum(
                np.einsum("ij,ij->i", signals, signals) - cbf * cbf * (scale * scale / norm), 0.0)
        invalid = ~np.isfinite(cbf) | ~signals.any(axis=1)
        cbf[invalid] = np.nan
        stderr = None
        if signal_se is not None and np.isfinite(signal_se).any():
            stderr = (np.sqrt((signal_se * signal_se) @ (gain * gain)) / scale)[:, np.newaxis]
            stderr[invalid] = np.nan
        params, stderr = self.model.quantities(cbf, stderr, signals, signal_se)
        status = np.where(invalid, Status.INVALID_INPUT, Status.CONVERGED).astype(np.int8)
        return Estimate(params, status, stderr, rss, self.model.param_names, self.name)

    def predict_image(self, signals: np.ndarray, mask: np.ndarray, *, slice_offsets: np.ndarray | None = None,
                      progress: bool = False, label: str = "", signal_se: np.ndarray | None = None) -> Estimate:
        """The whole acquisition in one vectorised pass (memory-bound: no progress bar needed);
        ``signal_se`` (like ``signals``) gives the CBF standard error."""
        if not self.is_fitted:
            raise ValueError(f"this {self.name} estimator is not fitted yet: call fit() first")
        y = check_signals(signals, self.model)
        se = None
        if signal_se is not None:
            se = np.asarray(signal_se, dtype=np.float64)
            if se.shape != y.shape:
                raise ValueError(f"signal_se must have the shape of signals {y.shape}, got {se.shape}")
        return self._predict(y, check_slice_offsets(slice_offsets, y.shape[0]), se)
