"""Relative single-delay quantification: CBF relative to the brain median, for data without an M0.

A background-suppressed acquisition exported without an M0 image or value (BIDS M0Type
Absent) cannot be scaled to ΔM/M0t: its control images are suppressed, so they are no M0
either. What its ΔM still determines is CBF *up to one unknown factor* (M0t, the
receiver gain and the suppression's efficiency): the white-paper formula with M0t = 1,
divided by its median over the voxels given (the brain mask in a run), is the relative CBF

    rcbf_i = q_i / median_j q_j,     q_i = ΔM_i / g_i

(g: the single-delay gain, :mod:`aslbatch.models.single_delay`, which also carries a 2D
readout's slice timing), dimensionless, 1 at the brain median. It is never converted to
mL/100 g/min. The outputs are this and the measured ΔM itself (``deltam``, the mean
control − label in the scanner's units), each named for what it is.
"""

from __future__ import annotations

import numpy as np

from .base import Parameter
from .single_delay import SingleDelayModel

__all__ = ["RelativeModel"]


class RelativeModel(SingleDelayModel):
    """Relative CBF (ratio to the brain median) and ΔM (scanner units) from volumes read at one
    time without an M0 (see the module doc); the bolus assumed fully delivered.

    Parameters
    ----------
    protocol : the acquisition (τ or τ_b and PLD or TI per volume, s).
    constants : physical constants (only T1b enters: through the slice timing of a 2D readout).
    labeling : ``"pcasl"`` (also CASL) or ``"pasl"``.
    """

    name = "relative"
    title = ("relative single-delay quantification without an M0 (the white-paper formula with M0t unknown; "
             "CBF as a ratio to its median over the brain mask)")
    parameters = (
        Parameter("rcbf", "ratio to the brain median", "relative cerebral blood flow (rCBF)",
                  ": CBF divided by its median over the brain mask (1 = the median), from ΔM without an M0; "
                  "never absolute CBF",
                  bounds=(-np.inf, np.inf), training_range=(0.0, 3.0), display=(0.0, 2.5), cmap="inferno",
                  se_display=0.5),
        Parameter("deltam", "scanner units", "mean perfusion-weighted difference (ΔM)",
                  ", the mean of control − label over the pairs as the scanner scaled it (no M0: not comparable "
                  "between sessions or scanners)",
                  bounds=(-np.inf, np.inf), training_range=(0.0, 1.0), display=(0.0, float("nan")),
                  cmap="gray", se_display=float("nan")),
    )
    calibrated = False

    def quantities(self, cbf: np.ndarray, cbf_se: np.ndarray | None, signals: np.ndarray,
                   signal_se: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """(rcbf, deltam) per voxel and their standard errors, from the white-paper estimate with
        M0t = 1 (``cbf``, scanner units × mL/100 g/min, NaN where invalid) and its se, and the
        averaged ΔM ``signals`` (n, n_volumes) with their se: rcbf = cbf / median(cbf) over the
        finite voxels given (NaN everywhere when that median is not > 0: ΔM not positive in the
        brain), deltam = mean over the volumes."""
        finite = np.isfinite(cbf)
        reference = float(np.median(cbf[finite])) if finite.any() else np.nan
        if not reference > 0:
            reference = np.nan
        deltam = signals.mean(axis=1)
        deltam[~finite] = np.nan
        params = np.column_stack([cbf / reference, deltam])
        if cbf_se is None:
            return params, None
        deltam_se = np.sqrt((signal_se * signal_se).sum(axis=1)) / signals.shape[1]
        deltam_se[~finite] = np.nan
        return params, np.column_stack([cbf_se[:, 0] / reference, deltam_se])

    def _batch_kernel(self, params: np.ndarray, vol: np.ndarray, const: np.ndarray, sig: np.ndarray,
                      jac: np.ndarray, want_jac: bool) -> None:
        # what is measured is ΔM itself (M0t = 1): deltam in every volume; rcbf, the data's own
        # ratio, does not enter the signal of one voxel
        sig[:] = params[:, 1:2]
        if want_jac:
            jac[:] = 0.0
            jac[:, :, 1] = 1.0
