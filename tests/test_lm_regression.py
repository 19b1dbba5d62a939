"""LM results pinned, and the same voxels checked against an independent optimum.

1. Regression pin: tests/data/lm_regression.npz holds ~300 voxels per model variant (SNR inf
   to 1, Gaussian and Rician noise, arrival beyond the sampled range, signals above the cbf
   bound, negative and invalid voxels; see tests/lm_regression_cases.py) with the params,
   standard errors, rss, status and evaluation count that LM produced before its fast paths
   became one algorithm. A restructuring of LM must reproduce them to rounding (1e-12).
   Two deliberate changes since (issue 13.4) are accounted for, not re-pinned: the status codes
   ATT_UNDETERMINED and CBF_UNDETERMINED, a relabelling by the closed-form rule applied to the
   pinned parameters; and the start grid's amplitudes bounded by their upper bounds (before, a
   start with cbf above 300 was only clipped after the grid had chosen it), which moves the
   start of a few voxels: those must reach a cost no higher than the pinned one on most of them.
   A pin alone cannot say the pinned numbers are right, hence 2.
2. Oracle: on the same voxels, ``scipy.optimize.least_squares`` (bounded trf) on the numpy
   models of tests/reference.py (nothing from aslbatch.models), started from the best points
   of a fine global grid over the arrival times with non-negative least-squares amplitudes
   (a multi-start: close to an exact global optimum). LM's cost must be no worse on the vast
   majority of voxels, and where both reach the same cost at a well-determined point, the
   parameters must agree.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import least_squares

from aslbatch.estimators import Status, get_estimator
from aslbatch.estimators.base import flag_undetermined
from aslbatch.estimators.lookup import grid_search

from . import reference
from .lm_regression_cases import regression_models

PINNED = Path(__file__).parent / "data" / "lm_regression.npz"
MODELS = regression_models()
#: oracle: fine grid step (s) over the arrival times, and the number of grid starts refined by trf
GRID_S = 0.05
N_STARTS = 3


@pytest.fixture(scope="module")
def pinned():
    with np.load(PINNED, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def lm_results(pinned):
    """name -> LM's estimate on the pinned signals (today's code)."""
    return {name: get_estimator("lm", model).fit().predict(pinned[f"{name}/signals"])
            for name, model in MODELS.items()}


def _start_moved(name, y: np.ndarray) -> np.ndarray:
    """Voxels whose LM start (best and second grid point, amplitudes clipped into the bounds as LM
    clips them) differs between the start grid with bounded amplitudes and the same grid without
    upper bounds, the pinned LM's."""
    model = MODELS[name]
    grid = get_estimator("lm", model).fit().grid_
    unbounded = replace(grid, amp_max=np.full(2, np.inf))
    lo = np.zeros(2)
    (best, alt, amp, _, _), (best0, alt0, amp0, _, _) = grid_search(grid, y), grid_search(unbounded, y)
    clipped = np.clip(amp, lo, grid.amp_max), np.clip(amp0, lo, grid.amp_max)
    return (best != best0) | (alt != alt0) | ~np.all(clipped[0] == clipped[1], axis=1)


#: share of the voxels whose start moved that must reach a cost no higher than the pinned one:
#: all for 1C and hard-edged 2C; with smooth arterial edges the 2C cost surface has local minima
#: (see NO_WORSE below), measured 51 of 59 and 34 of 37 voxels no worse; thresholds sit below
MOVED_NO_WORSE = {"1c_default": 1.0, "1c_shifted_tissue": 1.0, "2c_default": 1.0, "2c_edge_shifted_tissue": 0.8,
                  "2c_edge_default": 0.8}


@pytest.mark.parametrize("name", list(MODELS))
def test_lm_reproduces_pinned_results(name, pinned, lm_results):
    est = lm_results[name]
    y = pinned[f"{name}/signals"]
    moved = _start_moved(name, y)
    assert moved.mean() < 0.25, moved.mean()  # the signals built beyond the bounds, and a few noisy ones
    same = ~moved
    status = flag_undetermined(MODELS[name], pinned[f"{name}/params"], pinned[f"{name}/status"].astype(np.int8))
    np.testing.assert_array_equal(est.status[same], status[same])
    np.testing.assert_array_equal(est.info["n_eval"][same], pinned[f"{name}/n_eval"].astype(np.int64)[same])
    for field in ("params", "stderr", "rss"):
        np.testing.assert_allclose(getattr(est, field)[same], pinned[f"{name}/{field}"][same], rtol=1e-12, atol=0.0,
                                   equal_nan=True, err_msg=f"{name} {field}")
    rss_pinned = pinned[f"{name}/rss"][moved]
    no_worse = est.rss[moved] <= rss_pinned * (1 + 1e-9)
    assert no_worse.mean() >= MOVED_NO_WORSE[name], (no_worse.mean(), np.flatnonzero(moved)[~no_worse])


# --- the oracle --------------------------------------------------------------------------------
def _reference_signal(model, params: np.ndarray) -> np.ndarray:
    """ΔM/M0t of params (n, n_params) from tests/reference.py (independent of aslbatch.models)."""
    p = model.protocol
    return reference.signals_numpy(model.name, params, p.label_duration, p.pld, p.crushed,
                                   edge_s=model.options().get("arterial_edge_s", 0.0),
                                   **reference.constants_kwargs(model.constants))


def _hard_edges(model) -> bool:
    return model.name == "2c" and model.options()["arterial_edge_s"] == 0.0


def _bracket_midpoints(model) -> np.ndarray:
    """Hard arterial edges: abat is only bracketed between the readout times t and the PLDs w
    (= t − τ) of the non-crushed volumes, inside its bounds; LM holds it at a bracket's midpoint."""
    p = model.protocol
    lo, hi = model.bounds
    open_vols = ~np.asarray(p.crushed)
    w = np.asarray(p.pld)[open_vols]
    t = w + np.asarray(p.label_duration)[open_vols]
    breaks = np.unique(np.clip(np.concatenate([w, t, [lo[2], hi[2]]]), lo[2], hi[2]))
    return 0.5 * (breaks[:-1] + breaks[1:])


def _grid_starts(model, y: np.ndarray) -> list[np.ndarray]:
    """The N_STARTS best points (lowest cost) of a global grid: arrival times on a GRID_S grid
    (abat <= att for 2C), amplitudes (cbf, abv) by non-negative least squares inside the bounds."""
    lo, hi = model.bounds
    att = np.arange(lo[-1], hi[-1] + 1e-9, GRID_S)
    two = model.name == "2c"
    abat = np.zeros(1)
    if two:
        abat = _bracket_midpoints(model) if _hard_edges(model) else np.arange(lo[2], hi[2] + 1e-9, 2 * GRID_S)
    pairs = np.array([(b, a) for b in abat for a in att if not two or b <= a])
    n = pairs.shape[0]
    unit = np.zeros((n, model.n_params))
    unit[:, 0] = 1.0
    unit[:, -1] = pairs[:, 1]
    if two:
        unit[:, 2] = pairs[:, 0]
        art = unit.copy()
        art[:, 0], art[:, 1] = 0.0, 1.0
        basis_a = _reference_signal(model, art)
        unit[:, 1] = 0.0
    basis_t = _reference_signal(model, unit)
    best = []
    for i, b_t in enumerate(basis_t):
        options = []
        tt = b_t @ b_t
        if tt > 0:
            options.append((min(max(b_t @ y / tt, 0.0), hi[0]), 0.0))
        if two:
            b_a = basis_a[i]
            aa = b_a @ b_a
            if aa > 0:
                options.append((0.0, min(max(b_a @ y / aa, 0.0), hi[1])))
                m = np.array([[tt, b_t @ b_a], [b_t @ b_a, aa]])
                if abs(np.linalg.det(m)) > 1e-12 * tt * aa:
                    c, a = np.linalg.solve(m, [b_t @ y, b_a @ y])
                    if 0 <= c <= hi[0] and 0 <= a <= hi[1]:
                        options.append((c, a))
        for c, a in options or [(0.0, 0.0)]:
            r = y - c * b_t - (a * basis_a[i] if two else 0.0)
            best.append((float(r @ r), c, a, *pairs[i]))
    best.sort()
    starts = []
    for cost, c, a, b, t in best[: N_STARTS]:
        starts.append(np.array([c, a, b, t]) if two else np.array([c, t]))
    return starts


def _oracle_fit(model, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Bounded trf from each grid start; the lowest cost wins. 2C in z = (cbf, abv, abat, gap =
    att − abat >= 0) so that abat <= att is a bound; the gap's upper bound att_max − abat_max keeps
    every z feasible (a subset of LM's feasible set: scipy's optimum can only be higher)."""
    lo, hi = model.bounds
    two = model.name == "2c"
    if two:
        z_lo = np.array([lo[0], lo[1], lo[2], 0.0])
        z_hi = np.array([hi[0], hi[1], hi[2], hi[3] - hi[2]])

        def params(z):
            return np.array([[z[0], z[1], z[2], z[2] + z[3]]])
    else:
        z_lo, z_hi = lo, hi

        def params(z):
            return z[np.newaxis, :]

    best = (np.full(model.n_params, np.nan), np.inf)
    # with hard edges abat is held at its bracket's midpoint (as LM does): trf fits the others
    fit = [0, 1, 3] if _hard_edges(model) else list(range(model.n_params))
    for start in _grid_starts(model, y):
        z0 = start.copy()
        if two:
            z0[3] = start[3] - start[2]
        z0 = np.clip(z0, z_lo, z_hi)

        def residual(x):
            z = z0.copy()
            z[fit] = x
            return _reference_signal(model, params(z))[0] - y

        res = least_squares(residual, z0[fit], bounds=(z_lo[fit], z_hi[fit]), method="trf", x_scale="jac",
                            xtol=1e-12, ftol=1e-12, gtol=1e-12)
        cost = float(np.sum(res.fun**2))
        if cost < best[1]:
            z0[fit] = res.x
            best = (params(z0)[0], cost)
    return best


def _well_determined(model, params: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """(voxels whose Jacobian over the compared parameters is well conditioned, those columns).

    With hard arterial edges abat is only bracketed (its column is a multiple of abv's): the
    comparison then covers cbf and att, the columns LM and the oracle both determine."""
    cols = list(range(model.n_params))
    if _hard_edges(model):
        cols = [0, 3]
    jac = model.jacobian(params)[:, :, cols]
    norms = np.linalg.norm(jac, axis=1)
    ok = (norms > 0).all(axis=1)
    cond = np.full(params.shape[0], np.inf)
    cond[ok] = np.linalg.cond(jac[ok] / norms[ok][:, None, :])
    return ok & (cond < 1e4), cols


#: fraction of voxels where LM's cost must be no worse than the oracle's. LM starts from one
#: grid point (and a second past a flat run); with smooth arterial edges (abat free) the 2C
#: cost surface has local minima the oracle's three trf starts escape more often: measured
#: 0.76-0.79 there (0.97-1.0 elsewhere) with the LM of commit 0da1647; thresholds sit just below.
NO_WORSE = {"1c_default": 0.95, "1c_shifted_tissue": 0.95, "2c_default": 0.95, "2c_edge_shifted_tissue": 0.7,
            "2c_edge_default": 0.7}


def _kinks(model) -> np.ndarray:
    """Kinks of the tissue signal in att: every PLD w and readout time t (one-sided Jacobian)."""
    w = np.asarray(model.protocol.pld)
    return np.unique(np.concatenate([w, w + np.asarray(model.protocol.label_duration)]))


#: voxels of each pinned set compared with the oracle (every 3rd: ~100, scipy is slow)
ORACLE_STRIDE = 3


@pytest.mark.parametrize("name", list(MODELS))
def test_lm_cost_no_worse_than_multistart_scipy(name, pinned, lm_results):
    model = MODELS[name]
    y_all = pinned[f"{name}/signals"]
    est = lm_results[name]
    rows = np.flatnonzero(est.status != Status.INVALID_INPUT)[::ORACLE_STRIDE]
    p_sp = np.empty((rows.size, model.n_params))
    rss_sp = np.empty(rows.size)
    for k, i in enumerate(rows):
        p_sp[k], rss_sp[k] = _oracle_fit(model, y_all[i])
    rss_lm = est.rss[rows]
    # LM's rss is its own model's: the same as the reference model's at LM's answer
    np.testing.assert_allclose(np.sum((y_all[rows] - _reference_signal(model, est.params[rows])) ** 2, axis=1),
                               rss_lm, rtol=1e-9, atol=1e-24)
    no_worse = rss_lm <= rss_sp * (1 + 1e-6) + 1e-20
    assert no_worse.mean() >= NO_WORSE[name], (no_worse.mean(), rows[~no_worse][:5], rss_lm[~no_worse][:5],
                                               rss_sp[~no_worse][:5])
    # where both reach the same minimum at a point well determined for both (a point on a kink,
    # e.g. att at a readout time, can look determined on one side only), the parameters agree
    same = np.abs(rss_lm - rss_sp) <= 1e-7 * rss_sp
    determined, cols = _well_determined(model, p_sp)
    determined_lm, _ = _well_determined(model, est.params[rows])
    kinks = _kinks(model)
    off_kink = ((np.abs(est.params[rows][:, -1:] - kinks) > 1e-3).all(axis=1)
                & (np.abs(p_sp[:, -1:] - kinks) > 1e-3).all(axis=1))
    check = same & determined & determined_lm & off_kink
    assert check.sum() >= 0.3 * rows.size, check.sum()
    lo, hi = model.bounds
    close = np.isclose(est.params[rows][:, cols], p_sp[:, cols], rtol=1e-4, atol=1e-5 * (hi - lo)[cols]).all(axis=1)
    bad = np.flatnonzero(check & ~close)
    assert bad.size <= 0.05 * check.sum(), (bad.size, est.params[rows][bad[:3]], p_sp[bad[:3]])
