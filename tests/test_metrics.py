"""aslbatch.metrics against values worked out by hand, closed forms and a Monte Carlo of LM.

Hand values: tiny arrays whose arithmetic is written out beside each expected value
(sample SDs with ddof = 1). CRLB: (a) a straight-line model y = a + b x, whose JᵀJ inverse is
known in closed form, and singular cases; (b) the spread of Levenberg–Marquardt estimates
over Gaussian noise repeats at SNR 50, which at high SNR reaches the bound.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from aslbatch.estimators import get_estimator
from aslbatch.metrics import accuracy, crlb, cv_net, metric_rows, noise_immunity, sd_over_crlb
from aslbatch.simulate import noise_sigma, simulate


# --- accuracy -----------------------------------------------------------------------
def test_accuracy_by_hand():
    acc = accuracy([1.5, 2.0, 2.5], [1.0, 2.0, 3.0])
    assert acc.bias == pytest.approx((0.5 + 0.0 - 0.5) / 3, abs=1e-15)
    # mean|err| = (0.5 + 0 + 0.5) / 3, mean(p) = 2
    assert acc.nmae == pytest.approx((0.5 + 0.0 + 0.5) / 3 / 2)
    # RMSE = sqrt((0.25 + 0 + 0.25) / 3)
    assert acc.nrmse == pytest.approx(math.sqrt((0.25 + 0.0 + 0.25) / 3) / 2)
    assert (acc.n_valid, acc.n_invalid) == (3, 0)


def test_accuracy_signed_bias_by_hand():
    acc = accuracy([12.0, 18.0, 33.0], [10.0, 20.0, 30.0])
    assert acc.bias == pytest.approx((2.0 - 2.0 + 3.0) / 3)
    assert acc.nmae == pytest.approx((2.0 + 2.0 + 3.0) / 3 / 20.0)
    assert acc.nrmse == pytest.approx(math.sqrt((4.0 + 4.0 + 9.0) / 3) / 20.0)


def test_accuracy_excludes_and_counts_invalid_estimates():
    acc = accuracy([3.0, np.nan, 4.0, 6.0, np.inf], [2.0, 2.0, 4.0, 4.0, 4.0])
    # valid rows 0, 2, 3: errors 1, 0, 2; mean(p) over them (2 + 4 + 4) / 3
    level = (2.0 + 4.0 + 4.0) / 3
    assert acc.bias == pytest.approx((1.0 + 0.0 + 2.0) / 3)
    assert acc.nmae == pytest.approx((1.0 + 0.0 + 2.0) / 3 / level)
    assert acc.nrmse == pytest.approx(math.sqrt((1.0 + 0.0 + 4.0) / 3) / level)
    assert (acc.n_valid, acc.n_invalid) == (3, 2)


def test_accuracy_all_invalid_is_nan_with_counts_and_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acc = accuracy([np.nan, np.nan], [1.0, 2.0])
        zero = accuracy([0.1, -0.1], [0.0, 0.0])
    assert np.isnan([acc.bias, acc.nmae, acc.nrmse]).all()
    assert (acc.n_valid, acc.n_invalid) == (0, 2)
    # mean(p) = 0: the normalised errors are undefined, the bias is not
    assert zero.bias == pytest.approx(0.0) and np.isnan(zero.nmae) and np.isnan(zero.nrmse)


def test_accuracy_rejects_bad_shapes_and_truth():
    with pytest.raises(ValueError, match="truth has 2 rows, the estimates 3"):
        accuracy([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="1-D"):
        accuracy([[1.0, 2.0]], [[1.0, 2.0]])
    with pytest.raises(ValueError, match="truth must be finite"):
        accuracy([1.0, 2.0], [1.0, np.nan])


# --- noise immunity -----------------------------------------------------------------
def test_noise_immunity_by_hand_with_zero_truth_set_excluded():
    group = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    truth = [10.0, 10.0, 10.0, 20.0, 20.0, 20.0, 0.0, 0.0]
    est = [9.0, 10.0, 11.0, 16.0, 20.0, 24.0, 1.0, 3.0]
    var = noise_immunity(est, truth, group)
    # set 0: SD(9, 10, 11) = sqrt((1 + 0 + 1) / 2) = 1, /10; set 1: SD(16, 20, 24) = 4, /20;
    # set 2: truth 0 < 0.1 * mean(10, 20, 0) = 1, excluded
    assert var.cov == pytest.approx((1.0 / 10 + 4.0 / 20) / 2)
    assert (var.n_units, var.n_excluded, var.n_invalid) == (2, 1, 0)


def test_noise_immunity_floor_is_relative_to_mean_truth():
    group = np.array([0, 0, 1, 1])
    # mean truth (10 + 1.5) / 2 = 5.75: floor 0.575 keeps both sets, 0.3 * 5.75 = 1.725 drops set 1
    est, truth = [9.0, 11.0, 1.0, 2.0], [10.0, 10.0, 1.5, 1.5]
    sd0, sd1 = math.sqrt(2.0), math.sqrt(0.5)  # SD(9, 11), SD(1, 2)
    assert noise_immunity(est, truth, group).cov == pytest.approx((sd0 / 10 + sd1 / 1.5) / 2)
    assert noise_immunity(est, truth, group, min_relative=0.3).cov == pytest.approx(sd0 / 10)
    with pytest.raises(ValueError, match="min_relative"):
        noise_immunity(est, truth, group, min_relative=1.5)


def test_noise_immunity_drops_nan_rows_and_sets_with_one_finite_estimate():
    group = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    truth = [10.0] * 4 + [20.0] * 2 + [30.0] * 2
    est = [9.0, np.nan, 10.0, 11.0, 20.0, np.nan, 27.0, 33.0]
    var = noise_immunity(est, truth, group)
    # set 0: SD(9, 10, 11) = 1, /10; set 1: one finite estimate, excluded; set 2: SD(27, 33) = sqrt(18), /30
    assert var.cov == pytest.approx((1.0 / 10 + math.sqrt(18.0) / 30) / 2)
    assert (var.n_units, var.n_excluded, var.n_invalid) == (2, 1, 2)


def test_noise_immunity_groups_need_not_be_contiguous_or_from_zero():
    group = np.array([7, 3, 7, 3, 7, 3])
    var = noise_immunity([9.0, 16.0, 10.0, 20.0, 11.0, 24.0], [10.0, 20.0] * 3, group)
    assert var.cov == pytest.approx((1.0 / 10 + 4.0 / 20) / 2)


def test_noise_immunity_rejects_inconsistent_input():
    with pytest.raises(ValueError, match="share the same truth"):
        noise_immunity([1.0, 2.0], [1.0, 1.5], np.array([0, 0]))
    with pytest.raises(ValueError, match="one entry per row"):
        noise_immunity([1.0, 2.0], [1.0, 1.0], np.array([0, 0, 0]))
    with pytest.raises(ValueError, match="integers"):
        noise_immunity([1.0, 2.0], [1.0, 1.0], np.array([0.0, 0.0]))


# --- CV_Net -------------------------------------------------------------------------
def test_cv_net_by_hand_level_from_mean_estimate():
    # K = 3 networks x 3 voxels
    est = np.array([[1.0, 4.0, -0.1], [2.0, 4.0, 0.0], [3.0, 4.0, 0.1]])
    var = cv_net(est)
    # voxel 0: SD(1, 2, 3) = 1, mean 2; voxel 1: SD 0; voxel 2: mean 0 < 0.1 * mean(2, 4, 0), excluded
    assert var.cov == pytest.approx((1.0 / 2 + 0.0 / 4) / 2)
    assert (var.n_units, var.n_excluded, var.n_invalid) == (2, 1, 0)


def test_cv_net_by_hand_level_from_truth_and_nan_network():
    est = np.array([[1.0, 6.0], [2.0, np.nan], [3.0, 10.0]])
    var = cv_net(est, truth=[4.0, 8.0])
    # voxel 0: SD(1, 2, 3) = 1, /4; voxel 1: SD(6, 10) = sqrt(8), /8
    assert var.cov == pytest.approx((1.0 / 4 + math.sqrt(8.0) / 8) / 2)
    assert (var.n_units, var.n_excluded, var.n_invalid) == (2, 0, 1)
    with pytest.raises(ValueError, match="K networks >= 2"):
        cv_net(np.ones((1, 4)))
    with pytest.raises(ValueError, match="truth has 3 rows"):
        cv_net(est, truth=[1.0, 2.0, 3.0])


# --- CRLB ---------------------------------------------------------------------------
def test_crlb_straight_line_closed_form():
    # y = a + b x at x = 0, 1, 2: J = [[1, 0], [1, 1], [1, 2]], JᵀJ = [[3, 3], [3, 5]], det 6,
    # (JᵀJ)⁻¹ = [[5/6, -1/2], [-1/2, 1/2]]
    jac = np.array([[[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]]])
    np.testing.assert_allclose(crlb(jac, 0.1), [[0.1 * math.sqrt(5 / 6), 0.1 * math.sqrt(1 / 2)]], rtol=1e-12)
    # one σ per voxel; parameters in very different units (b's column x 1e-4: its SD x 1e4)
    two = np.concatenate([jac, jac * [1.0, 1e-4]])
    np.testing.assert_allclose(
        crlb(two, [0.1, 2.0]),
        [[0.1 * math.sqrt(5 / 6), 0.1 * math.sqrt(1 / 2)], [2.0 * math.sqrt(5 / 6), 2.0 * 1e4 * math.sqrt(1 / 2)]],
        rtol=1e-10,
    )


def test_crlb_singular_cases_are_inf_for_the_unidentifiable_parameters_only():
    jac = np.array([
        # zero column: b inf, a from its own column alone: σ / sqrt(3)
        [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]],
        # collinear columns: neither identifiable
        [[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]],
    ])
    bound = crlb(jac, 0.3)
    assert bound[0, 0] == pytest.approx(0.3 / math.sqrt(3))
    assert np.isinf(bound[0, 1]) and np.isinf(bound[1]).all()
    # a and b move together, c alone on its own volume: c keeps its bound σ / 1
    three = np.array([[[1.0, 1.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, 1.0]]])
    b3 = crlb(three, 0.3)
    assert np.isinf(b3[0, :2]).all() and b3[0, 2] == pytest.approx(0.3)


def test_crlb_zero_flow_voxel_has_infinite_att_bound(model_1c):
    params = np.array([[0.0, 1.5], [60.0, 0.7]])
    sigma = noise_sigma(model_1c, 10.0)
    bound = crlb(model_1c.jacobian(params), sigma)
    # cbf 0: the signal is 0 whatever att (d/datt = 0), cbf from its column alone
    d_cbf = model_1c.jacobian(params)[0, :, 0]
    assert bound[0, 0] == pytest.approx(sigma / np.linalg.norm(d_cbf))
    assert np.isinf(bound[0, 1])
    # att 0.7 s below the shortest PLD (1.0 s): every volume sees the delivered bolus
    assert np.isfinite(bound[1, 0]) and np.isinf(bound[1, 1])


def test_crlb_rejects_bad_input():
    jac = np.ones((2, 3, 2))
    with pytest.raises(ValueError, match="n_volumes, n_params"):
        crlb(jac[0], 0.1)
    with pytest.raises(ValueError, match="one value per voxel"):
        crlb(jac, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        crlb(jac, 0.0)
    with pytest.raises(ValueError, match="jacobian must be finite"):
        crlb(np.full((1, 3, 2), np.nan), 0.1)


def test_sd_over_crlb_by_hand():
    est = np.array([[9.0, 1.0], [10.0, 1.0], [11.0, 1.0], [16.0, 2.0], [np.nan, 2.0], [24.0, 4.0]])
    group = np.array([0, 0, 0, 1, 1, 1])
    bound = np.array([[0.5, 0.25]] * 3 + [[2.0, np.inf]] * 3)
    ids, ratio = sd_over_crlb(est, group, bound)
    np.testing.assert_array_equal(ids, [0, 1])
    # set 0: SD(9, 10, 11) = 1 / 0.5, SD(1, 1, 1) = 0 / 0.25; set 1: SD(16, 24) = sqrt(32) / 2, bound inf -> NaN
    np.testing.assert_allclose(ratio, [[2.0, 0.0], [math.sqrt(32.0) / 2.0, np.nan]])
    with pytest.raises(ValueError, match="share the same bound"):
        sd_over_crlb(est, group, np.arange(12.0).reshape(6, 2))


def test_crlb_matches_lm_spread_at_high_snr(model_1c):
    # 1C default protocol (PLD 1.0 ... 3.0 s, τ 1.8 s); att kept off the kinks at the PLDs
    truth = np.array([[60.0, 1.2], [40.0, 2.2], [80.0, 1.7]])
    data = simulate(model_1c, 0, 50.0, noise="gaussian", repeats=2000, params=truth, seed=11)
    est = get_estimator("lm", model_1c).fit().predict(data.signals)
    bound = crlb(model_1c.jacobian(data.params), data.sigma)
    _, ratio = sd_over_crlb(est.params, data.group, bound)
    # SD of 2000 repeats: relative standard error 1/sqrt(2 * 1999) = 1.6 %
    np.testing.assert_allclose(ratio, 1.0, rtol=0.10)


# --- rows ---------------------------------------------------------------------------
def test_metric_rows_collects_every_metric_per_parameter():
    est = np.array([[9.0, 1.1], [10.0, np.nan], [11.0, 0.9], [16.0, 2.0], [20.0, 2.0], [24.0, 2.0]])
    truth = np.array([[10.0, 1.0]] * 3 + [[20.0, 2.0]] * 3)
    group = np.array([0, 0, 0, 1, 1, 1])
    bound = np.array([[0.5, 0.1]] * 3 + [[2.0, 0.1]] * 3)
    rows = metric_rows(est, truth, ("cbf", "att"), group=group, bound=bound)
    table = {(r["parameter"], r["metric"]): r["value"] for r in rows}
    assert all(set(r) == {"parameter", "metric", "value"} for r in rows)
    assert len(rows) == 2 * 10
    assert table["cbf", "bias"] == pytest.approx(0.0)
    # cbf errors -1, 0, 1, -4, 0, 4: mean|err| = 10 / 6, mean(p) = 15
    assert table["cbf", "nmae"] == pytest.approx(10.0 / 6 / 15.0)
    assert table["cbf", "nrmse"] == pytest.approx(math.sqrt(34.0 / 6) / 15.0)
    assert table["cbf", "cov"] == pytest.approx((1.0 / 10 + 4.0 / 20) / 2)
    # SD / bound: 1 / 0.5 and 4 / 2
    assert table["cbf", "sd_over_crlb"] == pytest.approx(2.0)
    assert table["cbf", "sd_over_crlb_sets"] == 2
    # att: one NaN dropped; set 0 SD(1.1, 0.9) = sqrt(0.02), set 1 SD 0
    assert (table["att", "n_valid"], table["att", "n_invalid"]) == (5, 1)
    assert table["att", "cov"] == pytest.approx((math.sqrt(0.02) / 1.0 + 0.0) / 2)
    assert table["att", "sd_over_crlb"] == pytest.approx((math.sqrt(0.02) / 0.1 + 0.0) / 2)
    assert (table["att", "cov_sets"], table["att", "cov_excluded"]) == (2, 0)
    assert isinstance(table["att", "n_valid"], int)


def test_metric_rows_without_groups_and_shape_errors():
    rows = metric_rows([[1.5], [2.0], [2.5]], [[1.0], [2.0], [3.0]], ["cbf"])
    assert [r["metric"] for r in rows] == ["n_valid", "n_invalid", "bias", "nmae", "nrmse"]
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        metric_rows(np.ones((3, 1)), np.ones((3, 1)), ["cbf", "att"])
    with pytest.raises(ValueError, match="truth must have the shape"):
        metric_rows(np.ones((3, 2)), np.ones((2, 2)), ["cbf", "att"])
    with pytest.raises(ValueError, match="bound needs group"):
        metric_rows(np.ones((3, 2)), np.ones((3, 2)), ["cbf", "att"], bound=np.ones((3, 2)))
