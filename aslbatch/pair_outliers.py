"""Robust averaging of repeated ΔM volumes: which control/label pairs to leave out.

The rule (README "Motion"), applied to the ΔM volumes of each condition (τ, PLD, crushed)
separately, since ΔM changes with PLD:

- the first stage of SCORE (Dolui et al., "Structural Correlation-based Outlier Rejection
  (SCORE) algorithm for arterial spin labeling time series", JMRI 2017;45:1786-1797): a volume
  whose mean signal in the brain deviates from the others' by more than
  :data:`Z_THRESHOLD` standard deviations is an outlier; here the median and the MAD
  (scaled by 1.4826, a consistent estimate of σ) replace mean and SD, so the outliers do not
  hide themselves;
- the same robust z-score of the volume's spatial (Pearson) correlation with the condition's
  median ΔM, on the low side only: a sudden movement between control and label leaves edge
  artefacts of both signs, which cancel in the mean but lower the correlation (SCORE's second
  stage uses the correlation with the mean CBF in the same spirit).

A volume is excluded when either robust z-score passes the threshold; at most
:data:`MAX_EXCLUDED_FRACTION` of a condition's volumes are excluded (the most extreme first), so
a condition with fewer than 1 / :data:`MAX_EXCLUDED_FRACTION` repeats keeps them all.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_EXCLUDED_FRACTION", "Z_THRESHOLD", "outlier_scores", "outlier_volumes"]

#: robust z-score (median / 1.4826 MAD) beyond which a volume is an outlier; 2.5 is SCORE's
#: threshold on the SD, 3 here because two scores are tested (false exclusions: ~0.3 % each on Gaussian noise)
Z_THRESHOLD = 3.0
#: at most this fraction of a condition's volumes is excluded (rounded down)
MAX_EXCLUDED_FRACTION = 0.2
#: MAD scaled to a standard deviation for Gaussian data
_MAD_TO_SD = 1.4826


def _robust_z(values: np.ndarray) -> np.ndarray:
    """(values − median) / (1.4826 MAD); zeros when the MAD is 0 (no spread to judge by)."""
    centre = np.median(values)
    spread = _MAD_TO_SD * np.median(np.abs(values - centre))
    if not spread > 0:
        return np.zeros_like(values)
    return (values - centre) / spread


def outlier_scores(deltam: np.ndarray) -> np.ndarray:
    """The outlier score of each of the volumes ``deltam`` (n_voxels, n) of one condition (any
    units): max(|robust z of the mean over voxels|, −robust z of the correlation with the
    median volume). Non-finite voxels are left out."""
    deltam = np.asarray(deltam, dtype=np.float64)
    finite = np.isfinite(deltam).all(axis=1)
    values = deltam[finite]
    if values.shape[0] < 2 or values.shape[1] < 3:
        return np.zeros(deltam.shape[1])
    median = np.median(values, axis=1)
    centred = values - values.mean(axis=0)
    reference = median - median.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = (centred * reference[:, None]).sum(axis=0) / (
            np.sqrt((centred**2).sum(axis=0) * (reference**2).sum()))
    correlation = np.nan_to_num(correlation, nan=0.0)
    return np.maximum(np.abs(_robust_z(values.mean(axis=0))), -_robust_z(correlation))


def outlier_volumes(deltam: np.ndarray, condition: np.ndarray, *, threshold: float = Z_THRESHOLD,
                    max_fraction: float = MAX_EXCLUDED_FRACTION) -> np.ndarray:
    """Which ΔM volumes to leave out of the average: bool (n,), True = excluded.

    ``deltam`` (n_voxels, n) in any units (ΔM/M0t in the pipeline); ``condition`` (n,) the
    condition of each volume (volumes of one condition are compared with each other). Each
    condition: scores by :func:`outlier_scores`, those above ``threshold`` excluded, largest
    first, at most ``floor(max_fraction · n_condition)``."""
    deltam = np.asarray(deltam, dtype=np.float64)
    condition = np.asarray(condition)
    if deltam.ndim != 2 or condition.shape != (deltam.shape[1],):
        raise ValueError(f"deltam must be (n_voxels, n) and condition (n,), got {deltam.shape} and {condition.shape}")
    excluded = np.zeros(deltam.shape[1], dtype=bool)
    for value in np.unique(condition):
        index = np.flatnonzero(condition == value)
        limit = int(np.floor(max_fraction * index.size))
        if limit == 0:
            continue
        scores = outlier_scores(deltam[:, index])
        order = np.argsort(-scores, kind="stable")[:limit]
        excluded[index[order[scores[order] > threshold]]] = True
    return excluded
