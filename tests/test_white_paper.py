"""The single-delay model and the white-paper formula (Alsop 2015), against the consensus formulas
written here as the paper prints them, the time-resolved models of tests/reference.py at a fully
delivered point, numpy's least squares and a Monte Carlo spread."""

import numpy as np
import pytest

from aslbatch.estimators import Status, get_estimator
from aslbatch.models import get_model
from aslbatch.protocol import Constants, Protocol

from .reference import signal_1c, signal_pasl

CONSTANTS = Constants(alpha=0.85, alpha_bs=0.95**4, t1b=1.65, lam=0.9)


def _pcasl_formula(s, pld, tau, c):
    return 6000 * c.lam * s * np.exp(pld / c.t1b) / (2 * c.alpha * c.alpha_bs * c.t1b * (1 - np.exp(-tau / c.t1b)))


def _pasl_formula(s, ti, tau_b, c):
    return 6000 * c.lam * s * np.exp(ti / c.t1b) / (2 * c.alpha * c.alpha_bs * tau_b)


@pytest.mark.parametrize("t1_prime", ["blood", "tissue"])
def test_pcasl_inverts_the_delivered_1c_signal_as_the_white_paper_formula(t1_prime):
    """t1_prime does not enter the consensus formula; with T1' = T1b it inverts the 1C model exactly."""
    constants = Constants(**{**CONSTANTS.to_dict(), "t1_prime": t1_prime})
    model = get_model("single", Protocol(1.8, [2.0]), constants)
    est = get_estimator("whitepaper", model).fit()
    s = np.array([[0.004], [0.011], [-0.002]])
    np.testing.assert_allclose(est.predict(s)["cbf"], _pcasl_formula(s[:, 0], 2.0, 1.8, constants), rtol=1e-13)
    for cbf, att in [(60.0, 0.4), (25.0, 1.9)]:  # att < PLD: fully delivered, T1' = T1b by definition
        y = signal_1c(cbf, att, 1.8, [2.0], **{**CONSTANTS.to_dict(), "t1_prime": "blood"})
        np.testing.assert_allclose(est.predict(y[None, :])["cbf"], cbf, rtol=1e-12)
        np.testing.assert_allclose(model.signal([[cbf]])[0], y, rtol=1e-12)


def test_pasl_inverts_the_delivered_pasl_signal_as_the_white_paper_formula():
    constants = Constants(**{**CONSTANTS.to_dict(), "alpha": 0.98})
    model = get_model("single", Protocol(0.7, [1.8]), constants, labeling="pasl")
    est = get_estimator("whitepaper", model).fit()
    y = signal_pasl(45.0, 0.6, 0.7, [1.8], alpha=0.98, alpha_bs=CONSTANTS.alpha_bs)  # att + τ_b < TI
    np.testing.assert_allclose(est.predict(y[None, :])["cbf"], 45.0, rtol=1e-12)
    np.testing.assert_allclose(est.predict(y[None, :])["cbf"], _pasl_formula(y[0], 1.8, 0.7, constants), rtol=1e-13)


def test_several_conditions_at_one_time_are_combined_by_least_squares():
    model = get_model("single", Protocol([1.8, 1.3], [1.5, 2.0]), CONSTANTS)
    rng = np.random.default_rng(2)
    signals = rng.normal(0.006, 0.002, (40, 2))
    est = get_estimator("whitepaper", model).fit().predict(signals)
    design = model.signal([[1.0]])[0][:, None]
    expected = [np.linalg.lstsq(design, y, rcond=None)[0][0] for y in signals]
    np.testing.assert_allclose(est["cbf"], expected, rtol=1e-12)
    np.testing.assert_allclose(est.rss, [np.sum((y - c * design[:, 0]) ** 2) for y, c in zip(signals, expected)],
                               rtol=1e-10)


def test_the_standard_error_from_the_pairs_matches_the_spread_of_repeated_estimates():
    """se from each condition's standard error, against the SD of the estimate over many draws."""
    model = get_model("single", Protocol([1.8, 1.3], [1.5, 2.0]), CONSTANTS)
    est = get_estimator("whitepaper", model).fit()
    sd = np.array([0.002, 0.004])
    draws = np.random.default_rng(5).normal(0.006, sd, (200_000, 2))
    spread = est.predict(draws)["cbf"].std()
    mask = np.ones((1, 1, 1), bool)
    one = est.predict_image(np.array([[0.006, 0.006]]), mask, signal_se=sd[None, :])
    assert one.stderr[0, 0] == pytest.approx(spread, rel=0.01)
    assert est.predict_image(np.array([[0.006, 0.006]]), mask).stderr is None  # no repeats, no se


def test_unusable_voxels_are_flagged_and_nan():
    est = get_estimator("whitepaper", get_model("single", Protocol(1.8, [1.8]))).fit()
    out = est.predict(np.array([[np.nan], [0.0], [0.005]]))
    assert out.status.tolist() == [Status.INVALID_INPUT, Status.INVALID_INPUT, Status.CONVERGED]
    assert np.isnan(out["cbf"][:2]).all() and np.isfinite(out["cbf"][2])


def test_the_model_refuses_an_unknown_labeling_scheme():
    with pytest.raises(ValueError, match="labeling must be one of"):
        get_model("single", Protocol(1.8, [1.8]), labeling="fair")
