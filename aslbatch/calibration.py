"""Calibration of standard errors against the truth of simulated data, as pure array functions.

An estimate p̂ with standard error se states the interval p̂ ± z·se; if the errors are
Gaussian with that SD, the interval covers the truth p with probability 2Φ(z) − 1 (68.3 %
for z = 1, 95 % for z = 1.96). Per parameter, over the rows where both p̂ and se are finite:

- ``coverage_68`` / ``coverage_95``: share of rows with |p̂ − p| <= 1·se / 1.96·se;
- ``z_sd``: SD of z = (p̂ − p) / se (1 when calibrated; > 1: se too small), and ``z_robust_sd``,
  the interquartile range of z / 1.349 (the SD of a Gaussian with that IQR: less moved by a
  few rows whose se is far too small);
- ``se_undefined``: share of rows with a finite estimate but no finite se;
- :func:`coverage_curve`: observed coverage at any nominal level; :func:`binned_error`: RMS
  error against the RMS se in bins of se (on the diagonal when calibrated).

A method whose errors need not be Gaussian may state its intervals directly as half-widths
(``Estimate.intervals``: p̂ ± h covers the truth with probability ``level``); then
:func:`interval_coverage` is the share of rows with |p̂ − p| <= h, and :func:`calibration_rows`
reports it as ``coverage_68`` / ``coverage_95`` (the intervals a reader is given) and the ± se
coverage as ``coverage_68_se`` / ``coverage_95_se``.

Shares are fractions (not %).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["Z_68", "Z_95", "Calibration", "binned_error", "calibration", "calibration_rows", "coverage_curve",
           "interval_coverage"]

#: half-widths of the intervals, in se: 68.27 % and 95 % of a Gaussian
Z_68, Z_95 = 1.0, 1.959963984540054
#: Gaussian SD of an interquartile range of 1
IQR_TO_SD = 1.0 / 1.3489795003921634
#: nominal coverages of the 68 % and 95 % intervals (2Φ(1) − 1 and 0.95), to match interval levels against
LEVEL_68, LEVEL_95 = 0.6826894921370859, 0.95


@dataclass(frozen=True)
class Calibration:
    """Calibration of one parameter's standard errors (module docstring); NaN without rows."""

    coverage_68: float
    coverage_95: float
    z_sd: float
    z_robust_sd: float
    se_undefined: float
    n_rows: int


def _z(estimates, stderr, truth) -> tuple[np.ndarray, int]:
    """z-scores of the rows with a finite estimate and se, and the count of finite estimates."""
    est, se, true = (np.asarray(a, dtype=np.float64).ravel() for a in (estimates, stderr, truth))
    if not est.shape == se.shape == true.shape:
        raise ValueError(f"estimates, stderr and truth must have one value per row, got {est.shape}, {se.shape}, "
                         f"{true.shape}")
    finite = np.isfinite(est) & np.isfinite(true)
    usable = finite & np.isfinite(se) & (se > 0)
    return (est[usable] - true[usable]) / se[usable], int(finite.sum())


def calibration(estimates, stderr, truth) -> Calibration:
    """:class:`Calibration` of ``stderr`` (n,) for ``estimates`` (n,) of ``truth`` (n,), same units."""
    z, n_finite = _z(estimates, stderr, truth)
    if z.size == 0:
        return Calibration(np.nan, np.nan, np.nan, np.nan, 1.0 if n_finite else np.nan, 0)
    q1, q3 = np.percentile(z, [25, 75])
    return Calibration(float(np.mean(np.abs(z) <= Z_68)), float(np.mean(np.abs(z) <= Z_95)),
                       float(np.std(z)), float((q3 - q1) * IQR_TO_SD), 1.0 - z.size / n_finite, int(z.size))


def coverage_curve(estimates, stderr, truth, nominal: Sequence[float]) -> np.ndarray:
    """Observed coverage of the Gaussian intervals of each ``nominal`` level (fractions in (0, 1))."""
    from scipy.stats import norm

    z, _ = _z(estimates, stderr, truth)
    half = norm.ppf(0.5 + 0.5 * np.asarray(nominal, dtype=np.float64))
    if z.size == 0:
        return np.full(half.shape, np.nan)
    return np.mean(np.abs(z)[:, None] <= half[None, :], axis=0)


def binned_error(estimates, stderr, truth, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(RMS se, RMS error) in ``n_bins`` bins of se holding equal numbers of rows (API units): equal in
    expectation when the errors have SD se."""
    est, se, true = (np.asarray(a, dtype=np.float64).ravel() for a in (estimates, stderr, truth))
    usable = np.isfinite(est) & np.isfinite(true) & np.isfinite(se) & (se > 0)
    se, err = se[usable], est[usable] - true[usable]
    if se.size < n_bins:
        return np.full(0, np.nan), np.full(0, np.nan)
    order = np.argsort(se, kind="stable")
    bins = np.array_split(order, n_bins)
    return (np.array([np.sqrt(np.mean(se[b] ** 2)) for b in bins]),
            np.array([np.sqrt(np.mean(err[b] ** 2)) for b in bins]))


def interval_coverage(estimates, halfwidth, truth) -> float:
    """Share of rows whose interval ``estimates`` ± ``halfwidth`` (n,) covers ``truth`` (n,), same units,
    over the rows where all three are finite (NaN without such rows)."""
    est, half, true = (np.asarray(a, dtype=np.float64).ravel() for a in (estimates, halfwidth, truth))
    if not est.shape == half.shape == true.shape:
        raise ValueError(f"estimates, halfwidth and truth must have one value per row, got {est.shape}, "
                         f"{half.shape}, {true.shape}")
    usable = np.isfinite(est) & np.isfinite(half) & np.isfinite(true)
    if not usable.any():
        return float("nan")
    return float(np.mean(np.abs(est[usable] - true[usable]) <= half[usable]))


def calibration_rows(estimates: np.ndarray, stderr: np.ndarray, truth: np.ndarray,
                     names: Sequence[str], intervals: np.ndarray | None = None,
                     levels: Sequence[float] = ()) -> list[dict]:
    """``{"parameter", "metric", "value"}`` rows of :func:`calibration` for every column of
    ``estimates``/``stderr``/``truth`` (n, n_params); metric ``calibration_rows`` is the count.

    ``intervals`` (n, n_params, len(levels)): half-widths of the intervals of nominal coverage
    ``levels`` (``Estimate.intervals``); those of 68.27 % and 95 % give ``coverage_68`` and
    ``coverage_95``, and the ± se coverage becomes ``coverage_68_se`` and ``coverage_95_se``."""
    own = {}
    if intervals is not None:
        for k, level in enumerate(levels):
            for target, metric in ((LEVEL_68, "coverage_68"), (LEVEL_95, "coverage_95")):
                if abs(level - target) < 1e-6:
                    own[metric] = k
    rows = []
    for j, name in enumerate(names):
        c = calibration(estimates[:, j], stderr[:, j], truth[:, j])
        se_metrics = (("coverage_68", c.coverage_68), ("coverage_95", c.coverage_95))
        if own:
            se_metrics = tuple((metric + "_se", value) for metric, value in se_metrics) + tuple(
                (metric, interval_coverage(estimates[:, j], intervals[:, j, k], truth[:, j]))
                for metric, k in own.items())
        rows += [{"parameter": name, "metric": metric, "value": value} for metric, value in (
            *se_metrics, ("z_sd", c.z_sd), ("z_robust_sd", c.z_robust_sd), ("se_undefined", c.se_undefined),
            ("calibration_rows", c.n_rows))]
    return rows
