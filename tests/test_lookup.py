"""Lookup table: exhaustive grid search checked against brute force, error bounded by the grid step."""

import numpy as np
import pytest
from scipy.optimize import lsq_linear, nnls

from aslbatch.estimators import Status, get_estimator
from aslbatch.estimators.lookup import build_time_grid, grid_search
from aslbatch.models import get_model
from aslbatch.protocol import default_protocol
from aslbatch.simulate import simulate


@pytest.mark.parametrize("name", ["1c", "2c"])
def test_grid_search_matches_brute_force_nnls(name):
    """Every grid pair solved by scipy's NNLS: the kernel finds the same minimum residual."""
    model = get_model(name, default_protocol(name))
    grid = build_time_grid(model, 0.1)
    data = simulate(model, 60, 5.0, seed=3)
    best_pair, _, amp, rss, invalid = grid_search(grid, data.signals)
    assert not invalid.any()
    for i, y in enumerate(data.signals):
        best = np.inf
        for k in range(grid.n_pairs):
            cols = [grid.tissue[grid.pair_att[k]]]
            if grid.pair_abat[k] >= 0:
                cols.append(grid.arterial[grid.pair_abat[k]])
            _, res = nnls(np.column_stack(cols), y)
            best = min(best, res**2)
        assert rss[i] == pytest.approx(best, rel=1e-9, abs=1e-18)


@pytest.mark.parametrize("name", ["1c", "2c"])
def test_grid_search_is_bounded_least_squares(name):
    """Signals whose best non-negative amplitudes exceed their upper bounds (cbf 300, abv 0.1):
    the kernel's choice is the minimum over the grid of scipy's bounded least squares
    (lsq_linear) at each pair, with amplitudes inside the bounds."""
    model = get_model(name, default_protocol(name))
    grid = build_time_grid(model, 0.2)
    lo, hi = model.bounds
    names = model.param_names
    caps = [hi[names.index("cbf")]] + ([hi[names.index("abv")]] if "abv" in names else [])
    data = simulate(model, 12, 3.0, seed=4, noise="gaussian")
    top = data.params.copy()
    top[:, 0] = caps[0]
    if "abv" in names:
        top[:, 1] = caps[1]
    signals = np.vstack([data.signals, 2.5 * model.signal(top[:6]) + data.signals[:6] - data.clean[:6],
                         -data.signals[:3]])
    best_pair, _, amp, rss, invalid = grid_search(grid, signals)
    assert not invalid.any()
    exceeded = 0
    for i, y in enumerate(signals):
        costs = []
        for k in range(grid.n_pairs):
            cols = [grid.tissue[grid.pair_att[k]]]
            if grid.pair_abat[k] >= 0:
                cols.append(grid.arterial[grid.pair_abat[k]])
            a = np.column_stack(cols)
            fit = lsq_linear(a, y, bounds=(0.0, caps[: a.shape[1]]), method="bvls", tol=1e-14)
            costs.append(2.0 * fit.cost)
            exceeded += bool(np.any(nnls(a, y)[0] > caps[: a.shape[1]]))
        assert rss[i] == pytest.approx(min(costs), rel=1e-9, abs=1e-18)
        assert costs[best_pair[i]] == pytest.approx(min(costs), rel=1e-9, abs=1e-18)
        assert 0.0 <= amp[i, 0] <= caps[0] and (len(caps) == 1 or 0.0 <= amp[i, 1] <= caps[1])
    assert exceeded > 0  # the premise: the bounds mattered somewhere


def test_noise_free_error_is_bounded_by_the_grid_step_and_shrinks_with_it(model_1c):
    rng = np.random.default_rng(0)
    # identifiable region: att above the shortest PLD (1.0 s) by more than the coarsest step
    # (below it the residual is flat in att and the table returns the middle of the flat run)
    params = np.column_stack([rng.uniform(20, 150, 500), rng.uniform(1.25, 3.4, 500)])
    signals = model_1c.signal(params)
    max_err = []
    for step in (0.2, 0.1, 0.05, 0.02):
        est = get_estimator("lut", model_1c, resolution_s=step).fit().predict(signals)
        att_err = np.abs(est["att"] - params[:, 1])
        # the best point by residual (amplitude re-fitted) is within one step, not always the nearest
        assert att_err.max() <= step + 1e-9
        max_err.append(att_err.max())
    assert max_err == sorted(max_err, reverse=True) and max_err[-1] < max_err[0] / 4


def test_hard_edge_abat_pieces_are_exact_enumeration(model_2c):
    """Noise-free 2C: abat lands in the truth's bracket; cbf exact when att is on the grid."""
    grid = build_time_grid(model_2c, 0.05)
    vol_t = model_2c.protocol.readout_time[~model_2c.protocol.crushed]
    tau = model_2c.protocol.label_duration[~model_2c.protocol.crushed]
    breaks = np.unique(np.clip(np.concatenate([vol_t, vol_t - tau, [0.0, 3.0]]), 0.0, 3.0))  # abat bounds
    assert np.allclose(grid.abat, 0.5 * (breaks[:-1] + breaks[1:]))
    rng = np.random.default_rng(1)
    abat = rng.uniform(0.3, 1.4, 300)
    params = np.column_stack([rng.uniform(20, 150, 300), rng.uniform(0.005, 0.03, 300), abat, np.round(abat + rng.uniform(0.5, 1.5, 300), 2)])
    params[:, 3] = np.round(params[:, 3] / 0.05) * 0.05  # on the att grid
    est = get_estimator("lut", model_2c, resolution_s=0.05).fit().predict(model_2c.signal(params))
    same_piece = np.searchsorted(breaks, est["abat"]) == np.searchsorted(breaks, params[:, 2])
    assert same_piece.all()
    np.testing.assert_allclose(est["att"], params[:, 3], atol=1e-9)
    np.testing.assert_allclose(est["cbf"], params[:, 0], rtol=1e-9)


def test_invalid_voxels_and_rss(model_1c):
    good = model_1c.signal([[60.0, 1.5]])[0]
    signals = np.array([good, np.full(5, np.nan), np.r_[good[:4], np.inf], np.zeros(5)])
    est = get_estimator("lut", model_1c).fit().predict(signals)
    assert est.status.tolist() == [Status.CONVERGED] + [Status.INVALID_INPUT] * 3
    assert np.isnan(est.params[1:]).all() and np.isnan(est.rss[1:]).all()
    np.testing.assert_allclose(est.rss[0], np.sum((good - model_1c.signal(est.params[0])) ** 2))
    assert est.stderr is None


def test_unknown_resolution_rejected(model_1c):
    with pytest.raises(ValueError, match="grid resolution must be a positive number of seconds"):
        get_estimator("lut", model_1c, resolution_s=0).fit()
