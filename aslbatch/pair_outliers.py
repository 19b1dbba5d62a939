"""Robust averaging of repeated ΔM volumes: which control/label pairs to leave out.

The rule (README "Motion"), applied to the ΔM volumes of each condition (τ, PLD, crushed)
separately, since ΔM changes with PLD:

- the first stage of SCORE (Dolui et al., "Structural Correlation-based Outlier Rejection
  (SCORE) algorithm for arterial spin labeling time series", JMRI 2017;45:1786-1797): a volume
  whose mean signal in the brain deviates from the others' by more than
  :data:`Z_THRESHOLD` standard deviations is an outlier; here the condition's median and the
  MAD (scaled by 1.4826, a consistent estimate of σ) replace mean and SD, so the outliers do not
  hide themselves, and the MAD is pooled over the conditions (residuals from each condition's
  median): a multi-PLD protocol has few repeats per condition, too few for a scale of their own;
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


def _features(deltam: np.ndarray) -> np.ndarray:
    """Per volume of one condition (n_voxels, n): its mean over the finite voxels and its Pearson
    correlation with the condition's median volume; (n, 2)."""
    deltam = np.asarray(deltam, dtype=np.float64)
    values = deltam[np.isfinite(deltam).all(axis=1)]
    if values.shape[0] < 3:
        return np.zeros((deltam.shape[1], 2))
    median = np.median(values, axis=1)
    centred = values - values.mean(axis=0)
    reference = median - median.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = (centred * reference[:, None]).sum(axis=0) / (
            np.sqrt((centred**2).sum(axis=0) * (reference**2).sum()))
    return np.stack([values.mean(axis=0), np.nan_to_num(correlation, nan=0.0)], axis=1)


def outlier_scores(deltam: np.ndarray, condition: np.ndarray) -> np.ndarray:
    """The outlier score of every ΔM volume (``deltam`` (n_voxels, n), any units; ``condition`` (n,)):
    max(|z of its mean|, −z of its correlation with its condition's median volume), each z the
    distance from the median of the condition's other volumes over 1.4826 × the median absolute
    distance pooled over every condition (a scale from all the repeats: a condition holds too
    few for its own). 0 where
    the pooled spread is 0 (nothing to judge by)."""
    deltam = np.asarray(deltam, dtype=np.float64)
    condition = np.asarray(condition)
    features = np.zeros((deltam.shape[1], 2))
    residual = np.zeros_like(features)
    for value in np.unique(condition):
        index = np.flatnonzero(condition == value)
        features[index] = _features(deltam[:, index])
        for k in range(index.size):  # from the median of the others: a few repeats' median hugs each of them
            others = np.delete(features[index], k, axis=0)
            residual[index[k]] = features[index[k]] - (np.median(others, axis=0) if others.size else features[index[k]])
    scale = _MAD_TO_SD * np.median(np.abs(residual), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(scale > 0, residual / np.where(scale > 0, scale, 1.0), 0.0)
    return np.maximum(np.abs(z[:, 0]), -z[:, 1])


def outlier_volumes(deltam: np.ndarray, condition: np.ndarray, *, threshold: float = Z_THRESHOLD,
                    max_fraction: float = MAX_EXCLUDED_FRACTION) -> np.ndarray:
    """Which ΔM volumes to leave out of the average: bool (n,), True = excluded.

    ``deltam`` (n_voxels, n) in any units (ΔM/M0t in the pipeline); ``condition`` (n,) the
    condition of each volume. Scores by :func:`outlier_scores`; in each condition those above
    ``threshold`` are excluded, largest first, at most ``floor(max_fraction · n_condition)``."""
    deltam = np.asarray(deltam, dtype=np.float64)
    condition = np.asarray(condition)
    if deltam.ndim != 2 or condition.shape != (deltam.shape[1],):
        raise ValueError(f"deltam must be (n_voxels, n) and condition (n,), got {deltam.shape} and {condition.shape}")
    excluded = np.zeros(deltam.shape[1], dtype=bool)
    scores = outlier_scores(deltam, condition)
    for value in np.unique(condition):
        index = np.flatnonzero(condition == value)
        limit = int(np.floor(max_fraction * index.size))
        order = np.argsort(-scores[index], kind="stable")[:limit]
        excluded[index[order[scores[index][order] > threshold]]] = True
    return excluded
