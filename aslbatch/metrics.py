"""Accuracy metrics of a Monte Carlo evaluation (ASL_MODELS.md, Metrics), as pure array functions.

Per parameter, with truth p and estimates p̂ in API units (cbf mL/100 g/min, times s,
abv mL/mL) and σ in ΔM/M0t:

- :func:`accuracy`: bias = mean(p̂ − p) (API units); NMAE = mean|p̂ − p| / mean(p) and
  NRMSE = RMSE / mean(p) (fractions, not %).
- :func:`noise_immunity`: coefficient of variation of p̂ over the noise repeats of each
  parameter set, averaged over the sets (lower is better).
- :func:`cv_net`: the same over K networks trained with different seeds (per voxel).
- :func:`crlb`: the Cramér–Rao lower bound on the standard deviation of an unbiased estimator
  under Gaussian noise, sqrt(diag((JᵀJ/σ²)⁻¹)); :func:`sd_over_crlb`: empirical SD over
  repeats divided by it (efficiency ratio, ~1 for an efficient estimator).
- :func:`metric_rows`: all of these for one method as plain (parameter, metric, value) rows.

Invalid estimates (NaN or ±inf, e.g. status INVALID_INPUT) are never propagated: every
function drops them, counts them, and reports the count beside the value.

Zero-truth policy of the two coefficients of variation. A CoV divides an SD by a level,
and near a zero level it diverges (cbf 0 has an SD but no meaningful CoV, and a noisy mean
estimate of it can be ~0 or negative). So:

- the level of a parameter set is its **true value**, not the mean estimate: it is noise-free
  and the same for every method, so a biased method cannot lower (or blow up) its CoV by
  shifting its mean, and for an unbiased estimator it is the same std/mean. IVIM-NET
  (Kaandorp et al. 2021) likewise divides its network variability by the true values (their
  mean over the set). Without a truth (CV_Net on measured data) the level is the mean
  estimate over the K networks;
- sets (or voxels) whose level is below ``min_relative`` (default 0.1) times the mean level
  over all sets are excluded and counted (a level <= 0 always is). For the default 1C
  ranges this drops cbf < 7.5 of cbf 0–150 (about 5 % of uniform draws) and no att set: it
  removes the sets whose CoV is undefined or dominated by the division, and keeps
  everything a CoV describes.

The spread is the sample SD (ddof = 1) of the finite estimates of a set; sets with fewer than
two finite estimates are excluded too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "Accuracy",
    "Variability",
    "accuracy",
    "crlb",
    "cv_net",
    "metric_rows",
    "noise_immunity",
    "sd_over_crlb",
]

#: default of ``min_relative``: sets whose level is below this fraction of the mean level are excluded
MIN_RELATIVE = 0.1
#: eigenvalues of the column-normalised JᵀJ (between 0 and n_params) at or below this count as zero
NULL_EIGENVALUE = 1e-12
#: a parameter whose unit vector has more than this squared share in the null space is not identifiable
NULL_SHARE = 1e-6


@dataclass(frozen=True)
class Accuracy:
    """Errors of one parameter's estimates against the truth.

    Attributes
    ----------
    bias : mean(p̂ − p), API units of the parameter.
    nmae : mean|p̂ − p| / mean(p), a fraction.
    nrmse : sqrt(mean((p̂ − p)²)) / mean(p), a fraction.
    n_valid : rows with a finite estimate (the rows every value is computed over).
    n_invalid : rows whose estimate is NaN or ±inf, excluded.

    All three values are NaN when no row is valid; nmae and nrmse are NaN when mean(p) is 0.
    """

    bias: float
    nmae: float
    nrmse: float
    n_valid: int
    n_invalid: int


@dataclass(frozen=True)
class Variability:
    """A coefficient of variation averaged over parameter sets (or voxels).

    Attributes
    ----------
    cov : mean over the included units of SD / level, a fraction; NaN if none is included.
    n_units : sets (voxels) included in the mean.
    n_excluded : sets (voxels) excluded: level below ``min_relative`` × the mean level, or
        fewer than two finite estimates.
    n_invalid : estimates (NaN or ±inf) dropped before the SDs were taken.
    """

    cov: float
    n_units: int
    n_excluded: int
    n_invalid: int


# --- validation ---------------------------------------------------------------------
def _vector(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per row), got shape {arr.shape}")
    return arr


def _finite_truth(truth, n: int, name: str = "truth") -> np.ndarray:
    arr = _vector(truth, name)
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} rows, the estimates {n}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return arr


def _groups(group, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group ids sorted, index of each id's first row, position of each row's id)."""
    arr = np.asarray(group)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"group must be 1-D with one entry per row ({n}), got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"group must hold integers (parameter-set indices), got dtype {arr.dtype}")
    return np.unique(arr, return_index=True, return_inverse=True)


def _check_min_relative(min_relative: float) -> float:
    if not (np.isfinite(min_relative) and 0 <= min_relative < 1):
        raise ValueError(f"min_relative must be in [0, 1), got {min_relative!r}")
    return float(min_relative)


# --- accuracy -----------------------------------------------------------------------
def accuracy(estimates, truth) -> Accuracy:
    """Bias, NMAE and NRMSE of one parameter over the rows with a finite estimate.

    ``estimates`` and ``truth`` are 1-D, one value per row, in the parameter's API unit;
    ``truth`` must be finite. mean(p) is taken over the same valid rows.
    """
    est = _vector(estimates, "estimates")
    true = _finite_truth(truth, est.shape[0])
    valid = np.isfinite(est)
    n_valid = int(valid.sum())
    n_invalid = est.shape[0] - n_valid
    if n_valid == 0:
        return Accuracy(np.nan, np.nan, np.nan, 0, n_invalid)
    err = est[valid] - true[valid]
    level = true[valid].mean()
    mae = np.abs(err).mean()
    rmse = np.sqrt(np.mean(err**2))
    nmae, nrmse = (mae / level, rmse / level) if level != 0 else (np.nan, np.nan)
    return Accuracy(float(err.mean()), float(nmae), float(nrmse), n_valid, n_invalid)


# --- spread over repeats ------------------------------------------------------------
def _group_sd(values: np.ndarray, inverse: np.ndarray, n_groups: int) -> np.ndarray:
    """Sample SD (ddof=1) of the finite values of each group; NaN with fewer than two."""
    finite = np.isfinite(values)
    count = np.bincount(inverse, weights=finite, minlength=n_groups)
    clean = np.where(finite, values, 0.0)
    mean = np.bincount(inverse, weights=clean, minlength=n_groups) / np.maximum(count, 1)
    dev = np.where(finite, values - mean[inverse], 0.0)
    ss = np.bincount(inverse, weights=dev**2, minlength=n_groups)
    sd = np.full(n_groups, np.nan)
    enough = count >= 2
    sd[enough] = np.sqrt(ss[enough] / (count[enough] - 1))
    return sd


def _relative_spread(values: np.ndarray, inverse: np.ndarray, level: np.ndarray, min_relative: float) -> Variability:
    """Mean of SD / level over the groups whose level passes the floor (module docstring)."""
    sd = _group_sd(values, inverse, level.shape[0])
    known = np.isfinite(level)
    floor = min_relative * level[known].mean() if known.any() else np.inf
    include = known & (level > 0) & (level >= floor) & np.isfinite(sd)
    n_units = int(include.sum())
    cov = float(np.mean(sd[include] / level[include])) if n_units else np.nan
    n_invalid = int((~np.isfinite(values)).sum())
    return Variability(cov, n_units, level.shape[0] - n_units, n_invalid)


def noise_immunity(estimates, truth, group, *, min_relative: float = MIN_RELATIVE) -> Variability:
    """CoV of one parameter over noise repeats: per set SD(p̂) / p, averaged over the sets.

    ``estimates``, ``truth`` and ``group`` are 1-D, one entry per row; rows with the same
    ``group`` (integer, as :attr:`aslbatch.simulate.SimulatedSet.group`) are repeats of one
    parameter set and must share their truth. Sets whose true value is below
    ``min_relative`` × the mean true value over the sets are excluded (module docstring).
    """
    est = _vector(estimates, "estimates")
    true = _finite_truth(truth, est.shape[0])
    _, first, inverse = _groups(group, est.shape[0])
    level = true[first]
    if not np.array_equal(true, level[inverse]):
        raise ValueError("rows of one group must share the same truth (they are repeats of one parameter set)")
    return _relative_spread(est, inverse, level, _check_min_relative(min_relative))


def cv_net(estimates, truth=None, *, min_relative: float = MIN_RELATIVE) -> Variability:
    """Network-to-network CoV of one parameter: per voxel SD over K networks / level, averaged.

    ``estimates`` is (K, n_voxels): the same data estimated by K networks trained with
    different seeds. The level of a voxel is ``truth`` (n_voxels,) when given, else the mean
    of its finite estimates over the networks; voxels whose level is below ``min_relative``
    × the mean level are excluded (module docstring).
    """
    est = np.asarray(estimates, dtype=np.float64)
    if est.ndim != 2 or est.shape[0] < 2:
        raise ValueError(f"estimates must be (K networks >= 2, n_voxels), got shape {est.shape}")
    n_nets, n_vox = est.shape
    values = est.T.reshape(-1)
    inverse = np.repeat(np.arange(n_vox), n_nets)
    if truth is not None:
        level = _finite_truth(truth, n_vox)
    else:
        finite = np.isfinite(est)
        count = finite.sum(axis=0)
        level = np.full(n_vox, np.nan)
        seen = count > 0
        level[seen] = np.where(finite, est, 0.0).sum(axis=0)[seen] / count[seen]
    return _relative_spread(values, inverse, level, _check_min_relative(min_relative))


# --- Cramér–Rao lower bound ---------------------------------------------------------
def crlb(jacobian, sigma) -> np.ndarray:
    """Cramér–Rao lower bound on the SD of each parameter, (n, n_params), API units.

    ``jacobian`` is d(ΔM/M0t)/d(param) per voxel, (n, n_volumes, n_params), e.g.
    ``model.jacobian(params)``; ``sigma`` the Gaussian noise SD (ΔM/M0t), a scalar or one
    value per voxel. The bound is σ sqrt(diag((JᵀJ)⁻¹)).

    Where JᵀJ is singular the bound of a parameter is ``inf`` if the parameter is not
    identifiable (its unit vector has a component in the null space of J: a zero column, as
    att of a zero-flow voxel or below the shortest PLD, or columns that move together), and
    finite, from the pseudo-inverse, for the parameters the null space does not touch. Never
    a LinAlgError. The columns are normalised to unit length before the eigendecomposition,
    so parameters in different units (cbf ~60, abv ~0.01) do not make JᵀJ look singular.
    """
    jac = np.asarray(jacobian, dtype=np.float64)
    if jac.ndim != 3:
        raise ValueError(f"jacobian must be (n, n_volumes, n_params), got shape {jac.shape}")
    if not np.all(np.isfinite(jac)):
        raise ValueError("jacobian must be finite")
    n = jac.shape[0]
    sig = np.asarray(sigma, dtype=np.float64)
    if sig.ndim == 0:
        sig = np.full(n, float(sig))
    if sig.shape != (n,):
        raise ValueError(f"sigma must be a scalar or one value per voxel ({n}), got shape {sig.shape}")
    if not np.all(np.isfinite(sig) & (sig > 0)):
        raise ValueError("sigma must be finite and > 0")
    norm = np.sqrt(np.einsum("nvi,nvi->ni", jac, jac))
    scale = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)
    unit = jac * scale[:, np.newaxis, :]
    eigval, eigvec = np.linalg.eigh(np.einsum("nvi,nvj->nij", unit, unit))
    null = eigval <= NULL_EIGENVALUE
    inv_eig = np.divide(1.0, eigval, out=np.zeros_like(eigval), where=~null)
    share = eigvec**2
    variance = np.einsum("nik,nk->ni", share, inv_eig)
    bound = sig[:, np.newaxis] * np.sqrt(variance) * scale
    bound[np.einsum("nik,nk->ni", share, null.astype(np.float64)) > NULL_SHARE] = np.inf
    return bound


def sd_over_crlb(estimates, group, bound) -> tuple[np.ndarray, np.ndarray]:
    """Efficiency ratio: per parameter set, the SD of the estimates over its repeats / CRLB.

    ``estimates`` and ``bound`` (from :func:`crlb` at each row's truth and σ) are
    (n, n_params); ``group`` (n,) integers as in :func:`noise_immunity`, whose rows must share
    their bound. Returns (group ids sorted, ratios (n_groups, n_params)); a ratio is NaN where
    the bound is not finite (parameter not identifiable) or the set has fewer than two finite
    estimates. NaN estimates are dropped from their set's SD.
    """
    est = np.asarray(estimates, dtype=np.float64)
    bnd = np.asarray(bound, dtype=np.float64)
    if est.ndim != 2 or bnd.shape != est.shape:
        raise ValueError(f"estimates and bound must both be (n, n_params), got {est.shape} and {bnd.shape}")
    ids, first, inverse = _groups(group, est.shape[0])
    per_group = bnd[first]
    if not np.array_equal(bnd, per_group[inverse], equal_nan=True):
        raise ValueError("rows of one group must share the same bound (same truth and σ)")
    sd = np.column_stack([_group_sd(est[:, j], inverse, ids.shape[0]) for j in range(est.shape[1])])
    usable = np.isfinite(per_group) & (per_group > 0)
    ratio = np.full(sd.shape, np.nan)
    ratio[usable] = sd[usable] / per_group[usable]
    return ids, ratio


# --- one method's table -------------------------------------------------------------
def metric_rows(
    estimates,
    truth,
    param_names: Sequence[str],
    *,
    group=None,
    bound=None,
    min_relative: float = MIN_RELATIVE,
) -> list[dict]:
    """All metrics of one method as rows ``{"parameter", "metric", "value"}``.

    ``estimates`` (e.g. ``Estimate.params``) and ``truth`` are (n, n_params) in API units,
    columns named by ``param_names``. Per parameter, metrics ``n_valid``, ``n_invalid``,
    ``bias``, ``nmae``, ``nrmse`` (:func:`accuracy`); with ``group``: ``cov``, ``cov_sets``,
    ``cov_excluded`` (:func:`noise_immunity`); with ``group`` and ``bound`` ((n, n_params),
    :func:`crlb` at each row's truth): ``sd_over_crlb``, the mean of the finite ratios of
    :func:`sd_over_crlb`, and ``sd_over_crlb_sets``, how many there are. Counts are ints.
    The caller adds method, SNR and whatever else identifies the rows.
    """
    est = np.asarray(estimates, dtype=np.float64)
    true = np.asarray(truth, dtype=np.float64)
    names = tuple(param_names)
    if est.ndim != 2 or est.shape[1] != len(names):
        raise ValueError(f"estimates must be (n, {len(names)}) for parameters {names}, got shape {est.shape}")
    if true.shape != est.shape:
        raise ValueError(f"truth must have the shape of the estimates {est.shape}, got {true.shape}")
    if bound is not None and group is None:
        raise ValueError("bound needs group: the efficiency ratio is an SD over each set's repeats")
    ratio = sd_over_crlb(est, group, bound)[1] if bound is not None else None
    rows: list[dict] = []
    for j, name in enumerate(names):
        acc = accuracy(est[:, j], true[:, j])
        values: dict[str, float | int] = {
            "n_valid": acc.n_valid,
            "n_invalid": acc.n_invalid,
            "bias": acc.bias,
            "nmae": acc.nmae,
            "nrmse": acc.nrmse,
        }
        if group is not None:
            var = noise_immunity(est[:, j], true[:, j], group, min_relative=min_relative)
            values.update(cov=var.cov, cov_sets=var.n_units, cov_excluded=var.n_excluded)
        if ratio is not None:
            finite = ratio[np.isfinite(ratio[:, j]), j]
            values.update(sd_over_crlb=float(finite.mean()) if finite.size else np.nan,
                          sd_over_crlb_sets=int(finite.size))
        rows.extend({"parameter": name, "metric": metric, "value": value} for metric, value in values.items())
    return rows
