"""Standard errors: the variance network against a known variance, the calibration metrics against
hand-made cases, and the prior-dominated flag where the data say nothing about att."""

import numpy as np
import pytest
from scipy.stats import norm

from aslbatch.calibration import (Z_95, binned_error, calibration, calibration_rows, coverage_curve,
                                  interval_coverage)
from aslbatch.estimators import Status, get_estimator
from aslbatch.estimators.neural import noise_sd_from_signal_se
from aslbatch.estimators.prior import PRIOR_SHARE, bits_to_flags, flag_bits, prior_dominated, prior_sd
from aslbatch.estimators.variance import fit_variance_network
from aslbatch.models import get_model
from aslbatch.protocol import Protocol
from aslbatch.simulate import noise_sigma, sample_parameters, simulate


# --- calibration metrics -----------------------------------------------------------------------


def test_calibration_of_a_hand_made_case():
    truth = np.zeros(7)
    se = np.array([1.0, 2.0, 1.0, 0.5, 1.0, np.nan, 1.0])
    # z = 0.5, -0.5, 1.5, 3.0, -1.0, (no se), 1.9
    estimates = np.array([0.5, -1.0, 1.5, 1.5, -1.0, 4.0, 1.9])
    c = calibration(estimates, se, truth)
    z = np.array([0.5, -0.5, 1.5, 3.0, -1.0, 1.9])
    assert c.n_rows == 6
    assert c.coverage_68 == pytest.approx(3 / 6)  # 0.5, -0.5, -1.0 (|z| <= 1 counts)
    assert c.coverage_95 == pytest.approx(5 / 6)  # all but 3.0
    assert c.z_sd == pytest.approx(np.std(z))
    q1, q3 = np.percentile(z, [25, 75])
    assert c.z_robust_sd == pytest.approx((q3 - q1) / (norm.ppf(0.75) - norm.ppf(0.25)))
    assert c.se_undefined == pytest.approx(1 / 7)
    # the curve at the nominal levels of 1 and 1.96 se gives the same shares
    curve = coverage_curve(estimates, se, truth, [norm.cdf(1) - norm.cdf(-1), 0.95])
    np.testing.assert_allclose(curve, [3 / 6, 5 / 6])
    assert Z_95 == pytest.approx(norm.ppf(0.975))


def test_interval_coverage_of_a_hand_made_case():
    """Half-widths given directly: the share of |error| <= half-width over the rows where all are finite,
    and calibration_rows reporting them as coverage_68/95 with the ± se ones beside."""
    truth = np.zeros(6)
    estimates = np.array([0.5, -1.0, 2.0, 0.3, np.nan, 1.0])
    half = np.array([1.0, 1.0, 1.5, np.nan, 1.0, 1.0])  # covered: 0.5, -1.0 (|e| = h counts), 1.0; not 2.0
    assert interval_coverage(estimates, half, truth) == pytest.approx(3 / 4)
    assert np.isnan(interval_coverage(estimates[3:5], half[3:5], truth[3:5]))
    with pytest.raises(ValueError, match="one value per row"):
        interval_coverage(estimates, half[:3], truth)
    se = np.array([0.25, 1.0, 1.0, 1.0, 1.0, 2.0])  # z = 2, -1, 2, 0.3, -, 0.5
    intervals = np.stack([half, 2.0 * half], axis=1)[:, None, :]  # (n, 1 parameter, 2 levels)
    rows = calibration_rows(estimates[:, None], se[:, None], truth[:, None], ("a",), intervals, (0.6826894921370859, 0.95))
    got = {r["metric"]: r["value"] for r in rows}
    assert got["coverage_68"] == pytest.approx(3 / 4) and got["coverage_95"] == pytest.approx(4 / 4)
    assert got["coverage_68_se"] == pytest.approx(3 / 5)  # |z| <= 1: -1, 0.3, 0.5
    assert got["coverage_95_se"] == pytest.approx(3 / 5)  # |z| <= 1.96: the same three
    plain = {r["metric"] for r in calibration_rows(estimates[:, None], se[:, None], truth[:, None], ("a",))}
    assert "coverage_68_se" not in plain and "coverage_68" in plain


def test_calibrated_gaussian_errors_cover_their_nominal_share():
    rng = np.random.default_rng(0)
    se = rng.uniform(0.1, 3.0, 200_000)
    truth = rng.uniform(-5, 5, se.size)
    estimates = truth + se * rng.standard_normal(se.size)
    c = calibration(estimates, se, truth)
    assert c.coverage_68 == pytest.approx(0.6827, abs=0.005)
    assert c.coverage_95 == pytest.approx(0.95, abs=0.003)
    assert c.z_sd == pytest.approx(1.0, abs=0.01)
    rms_se, rms = binned_error(estimates, se, truth, n_bins=8)
    np.testing.assert_allclose(rms, rms_se, rtol=0.03)  # on the diagonal
    first = np.sort(se)[: se.size // 8]  # the first bin, by hand
    assert rms_se[0] == pytest.approx(np.sqrt(np.mean(first**2)))
    rows = calibration_rows(np.c_[estimates, estimates], np.c_[se, 2 * se], np.c_[truth, truth], ("a", "b"))
    got = {(r["parameter"], r["metric"]): r["value"] for r in rows}
    assert got[("b", "z_sd")] == pytest.approx(0.5, abs=0.01)  # se twice too large


# --- the variance network -------------------------------------------------------------------------


def test_variance_network_learns_a_known_heteroscedastic_sd():
    """Residuals with SD 0.1 + x (x the input): the network's se follows it."""
    rng = np.random.default_rng(1)

    def rows(n):
        x = rng.uniform(0.0, 1.0, (n, 1))
        truth = rng.uniform(-1, 1, (n, 1))
        return x, truth + (0.1 + x) * rng.standard_normal((n, 1)), truth

    x, est, truth = rows(20_000)
    xv, estv, truthv = rows(2_000)
    variance, history = fit_variance_network(x, est, truth, xv, estv, truthv, hidden_layers=(16,), max_epochs=30,
                                             batch_size=256, learning_rate=3e-3, seed=0)
    grid = np.linspace(0.05, 0.95, 10)[:, None]
    np.testing.assert_allclose(variance.predict_se(grid)[:, 0], 0.1 + grid[:, 0], rtol=0.12)
    assert history["epochs"] >= 1


def test_noise_sd_from_signal_se_is_the_rms_over_volumes():
    se = np.array([[0.3, 0.4, np.nan], [np.nan, np.nan, np.nan], [1.0, 1.0, 1.0]])
    got = noise_sd_from_signal_se(se, se.shape)
    np.testing.assert_allclose(got[[0, 2]], [np.sqrt((0.09 + 0.16) / 2), 1.0])
    assert np.isnan(got[1])
    with pytest.raises(ValueError, match="shape"):
        noise_sd_from_signal_se(se, (3, 4))
    # random rows with NaN and Inf entries against numpy's masked root mean square
    rng = np.random.default_rng(2)
    se = rng.random((500, 9))
    se[rng.random(se.shape) < 0.2] = np.nan
    se[rng.random(se.shape) < 0.05] = np.inf
    se[::50] = np.nan
    finite = np.ma.masked_invalid(se)
    expected = np.sqrt((finite**2).mean(axis=1)).filled(np.nan)
    np.testing.assert_allclose(noise_sd_from_signal_se(se, se.shape), expected, rtol=1e-13, equal_nan=True)


def test_network_se_is_calibrated_at_a_given_snr(supervised_1c, model_1c):
    """The small test network, at its training SNRs and the noise SD given: 95 % intervals cover ~95 %,
    from ± 1.96 se and from the half-widths it gives (68 % ones too)."""
    lo, hi = supervised_1c.options()["snr_range"]
    snr = float(np.sqrt(lo * hi))
    data = simulate(model_1c, 4000, snr, seed=11)
    estimate = supervised_1c.predict(data.signals, noise_sd=noise_sigma(model_1c, snr))
    assert estimate.interval_levels == (0.6826894921370859, 0.95)
    for j in range(model_1c.n_params):
        c = calibration(estimate.params[:, j], estimate.stderr[:, j], data.params[:, j])
        assert 0.90 <= c.coverage_95 <= 0.98, (model_1c.param_names[j], c)
        for k, (low, high) in enumerate(((0.62, 0.74), (0.90, 0.98))):
            covered = interval_coverage(estimate.params[:, j], estimate.intervals[:, j, k], data.params[:, j])
            assert low <= covered <= high, (model_1c.param_names[j], k, covered)


# --- prior-dominated flag ---------------------------------------------------------------------------


def test_flag_bits_round_trip_and_rule(model_1c):
    flags = np.array([[True, False], [False, True], [True, True], [False, False]])
    bits = flag_bits(flags)
    np.testing.assert_array_equal(bits, [1, 2, 3, 0])
    np.testing.assert_array_equal(bits_to_flags(bits, 2), flags)
    sd = prior_sd(model_1c)
    lo, hi = model_1c.training_ranges["att"]
    assert sd[1] == pytest.approx((hi - lo) / np.sqrt(12), rel=0.01)  # uniform over the training range
    params = np.array([[50.0, 1.0], [50.0, 1.0], [np.nan, np.nan], [50.0, 1.0]])
    stderr = np.array([[1.0, 0.99 * PRIOR_SHARE * sd[1]], [1.0, 1.01 * PRIOR_SHARE * sd[1]],
                       [np.nan, np.nan], [1.0, np.nan]])
    np.testing.assert_array_equal(prior_dominated(model_1c, params, stderr),
                                  [[False, False], [False, True], [False, False], [False, True]])


@pytest.fixture(scope="module")
def blind_to_att():
    """1C read only at PLDs after every att of the prior: with T1' = T1b the signal does not depend on att."""
    model = get_model("1c", Protocol(1.8, [3.6, 3.8, 4.0, 4.2]))
    assert model.training_ranges["att"][1] <= 3.6
    return model


def test_flag_marks_att_where_the_data_carry_no_information(blind_to_att):
    model = blind_to_att
    params = sample_parameters(model, 3000, np.random.default_rng(4))
    np.testing.assert_allclose(model.signal(params), model.signal(np.c_[params[:, 0], np.full(3000, 2.0)]),
                               rtol=1e-12, atol=1e-15)  # att moves nothing
    net = get_estimator("supervised", model, hidden_layers=(16, 16), n_samples=12_000, max_epochs=25,
                        snr_range=(20.0, 50.0), seed=0).fit()
    data = simulate(model, 3000, 30.0, seed=5)
    estimate = net.predict(data.signals, noise_sd=noise_sigma(model, 30.0))
    flags = prior_dominated(model, estimate.params, estimate.stderr)
    sd = prior_sd(model)
    assert np.mean(flags[:, 1]) > 0.95  # att: from the prior
    assert np.median(estimate.stderr[:, 1]) == pytest.approx(sd[1], rel=0.15)  # the posterior is the prior
    assert np.mean(flags[:, 0]) < 0.05  # cbf: from the data
    # lm: where its att is undetermined (its se undefined) the flag is set. (Where it converges just
    # past the flat region, at att ~ 3.6 s, the linearisation reports a small se: not flagged.)
    lm = get_estimator("lm", model).fit().predict(data.signals[:500])
    lm_flags = prior_dominated(model, lm.params, lm.stderr)
    undetermined = lm.status == Status.ATT_UNDETERMINED
    assert undetermined.mean() > 0.3 and lm_flags[undetermined, 1].all()
    assert not lm_flags[undetermined, 0].any()


def test_predict_image_takes_each_voxels_noise_from_signal_se(supervised_1c, model_1c):
    """The pipeline's path: signal_se of the repeats gives each voxel its SNR's standard errors;
    NaN (a volume read once) falls back to the marginal ones; a bad mask is refused."""
    data = simulate(model_1c, 24, 10.0, seed=8)
    mask = np.zeros((4, 3, 3), dtype=bool)
    mask.flat[:24] = True
    signal_se = np.full(data.signals.shape, noise_sigma(model_1c, 10.0))
    signal_se[:4] = np.nan
    for progress in (False, True):
        image = supervised_1c.predict_image(data.signals, mask, signal_se=signal_se, progress=progress)
        at_snr = supervised_1c.predict(data.signals[4:], noise_sd=noise_sigma(model_1c, 10.0))
        np.testing.assert_allclose(image.stderr[4:], at_snr.stderr, rtol=1e-6)
        np.testing.assert_allclose(image.stderr[:4], supervised_1c.predict(data.signals[:4]).stderr, rtol=1e-6)
        # the interval half-widths follow the same rows (merged across the progress bar's chunks)
        np.testing.assert_allclose(image.intervals[4:], at_snr.intervals, rtol=1e-6)
        np.testing.assert_allclose(image.intervals[:4], supervised_1c.predict(data.signals[:4]).intervals, rtol=1e-6)
    assert not np.allclose(image.stderr[4:], supervised_1c.predict(data.signals[4:]).stderr)
    with pytest.raises(ValueError, match="mask"):
        supervised_1c.predict_image(data.signals, mask[:2], progress=True)


def test_intervals_are_nan_for_invalid_input_and_come_from_either_network(supervised_1c, model_1c):
    """Invalid rows get NaN half-widths; a mix of known and unknown noise SDs gives each row the
    half-widths of the network that serves it (the one-pass and the split paths agree)."""
    data = simulate(model_1c, 40, 10.0, seed=4)
    signals = data.signals.copy()
    signals[5] = np.nan
    sd = np.full(40, noise_sigma(model_1c, 10.0))
    sd[20:] = np.nan
    mixed = supervised_1c.predict(signals, noise_sd=sd)
    assert np.isnan(mixed.intervals[5]).all() and np.isfinite(np.delete(mixed.intervals, 5, axis=0)).all()
    known = supervised_1c.predict(signals[:20], noise_sd=sd[:20])
    unknown = supervised_1c.predict(signals[20:])
    np.testing.assert_allclose(mixed.intervals[:20], known.intervals, rtol=1e-6)
    np.testing.assert_allclose(mixed.intervals[20:], unknown.intervals, rtol=1e-6)
    se, half = supervised_1c.uncertainty_.predict_intervals(signals[20:])
    np.testing.assert_allclose(half, unknown.intervals, rtol=1e-6)
    np.testing.assert_allclose(se, unknown.stderr, rtol=1e-6)
    # the 95 % half-width exceeds the 68 % one everywhere
    assert np.all(mixed.intervals[:, :, 1][np.isfinite(mixed.intervals[:, :, 1])]
                  > mixed.intervals[:, :, 0][np.isfinite(mixed.intervals[:, :, 0])])


def test_folded_variance_network_matches_the_stored_one_in_float64(supervised_1c, model_1c):
    """The folded inference network (scalings in the layers, exponentials in float32) gives the SDs and
    half-widths of the stored network's float64 pass through split_output, to float32 rounding."""
    data = simulate(model_1c, 500, 10.0, seed=9)
    for variance, inputs in ((supervised_1c.uncertainty_.marginal, data.signals),
                             (supervised_1c.uncertainty_.at_snr, np.column_stack([data.signals, np.full(500, 2.3)]))):
        se64, half64 = variance.split_output(variance.network.predict_float64(inputs))
        se, half = variance.predict_intervals(inputs)
        np.testing.assert_allclose(se, se64, rtol=2e-4)
        np.testing.assert_allclose(half, half64, rtol=2e-4)
        assert variance.inference_network.output_transform == "exp"
        assert np.all(variance.inference_network.in_scale == 1.0) and np.all(variance.inference_network.in_shift == 0.0)
