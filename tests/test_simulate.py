"""Simulation: noise statistics against closed forms, SNR definition, reproducibility, file format."""

import json
import math

import numpy as np
import pytest
from scipy import special, stats

from aslbatch.models import get_model
from aslbatch.protocol import Constants, Protocol
from aslbatch.simulate import (
    SimulatedSet,
    add_noise,
    noise_sigma,
    reference_signal_level,
    sample_parameters,
    simulate,
)

from .reference import signal_1c


def test_reference_level_is_peak_of_reference_voxel_from_equations(model_1c, model_2c):
    consts = Constants().to_dict()
    for model in (model_1c, model_2c):
        prot = model.protocol
        expected = max(signal_1c(60.0, 1.2, prot.label_duration, prot.pld, **consts))
        assert reference_signal_level(model) == pytest.approx(expected, rel=1e-12)
    # 1C default protocol: the peak is the first volume, 9.35e-3 (ASL_MODELS.md anchor)
    assert reference_signal_level(model_1c) == pytest.approx(9.35e-3, abs=5e-6)
    # 2C default protocol: the peak is PLD 1.1 s (non-crushed), tissue only; ASL_MODELS.md's
    # first 2C anchor has 9.685e-3 there, where abat + τ = 2.5 s < t = 2.9 s (no arterial term)
    assert reference_signal_level(model_2c) == pytest.approx(9.685e-3, abs=5e-6)


def test_sigma_is_reference_level_over_snr(model_1c):
    assert noise_sigma(model_1c, 5.0) == pytest.approx(reference_signal_level(model_1c) / 5.0)
    np.testing.assert_allclose(noise_sigma(model_1c, np.array([2.0, 4.0])), reference_signal_level(model_1c) / np.array([2.0, 4.0]))
    with pytest.raises(ValueError, match="SNR must be > 0"):
        noise_sigma(model_1c, 0.0)


def test_gaussian_noise_standard_deviation_matches_sigma():
    rng = np.random.default_rng(1)
    clean = np.full((200_000, 5), 0.01)
    noisy = add_noise(clean, 0.002, "gaussian", rng)
    resid = (noisy - clean).ravel()
    # sample std of 1e6 normal draws: relative standard error ~ 1/sqrt(2N) = 7e-4
    assert resid.std() == pytest.approx(0.002, rel=5e-3)
    assert abs(resid.mean()) < 5 * 0.002 / math.sqrt(resid.size)
    # normality against scipy's distribution (KS on a subsample)
    assert stats.kstest(resid[:20000] / 0.002, "norm").pvalue > 1e-3


def test_per_row_sigma_is_applied_per_row():
    rng = np.random.default_rng(2)
    clean = np.zeros((2, 100_000))
    noisy = add_noise(clean, np.array([0.001, 0.01]), "gaussian", rng)
    np.testing.assert_allclose(noisy.std(axis=1), [0.001, 0.01], rtol=1e-2)


def test_rician_high_snr_is_unbiased_with_gaussian_spread():
    rng = np.random.default_rng(3)
    clean = np.full((400_000,), 1.0)[:, None]
    sigma = 0.01  # SNR 100
    noisy = add_noise(clean, sigma, "rician", rng).ravel()
    # Rician mean = ν + σ²/(2ν) + O(σ⁴): bias 5e-5, far below the tolerance
    assert noisy.mean() == pytest.approx(1.0 + sigma**2 / 2, abs=5e-5)
    assert noisy.std() == pytest.approx(sigma, rel=1e-2)


def test_rician_mean_matches_closed_form_and_rayleigh_limit():
    rng = np.random.default_rng(4)
    sigma = 1.0
    # exact Rician mean: σ sqrt(π/2) L_{1/2}(-ν²/2σ²); scipy's rice distribution as the oracle
    for nu in (0.0, 0.5, 2.0):
        noisy = add_noise(np.full((400_000, 1), nu), sigma, "rician", rng).ravel()
        expected = stats.rice.mean(nu / sigma, scale=sigma)
        assert noisy.mean() == pytest.approx(expected, rel=5e-3)
    # SNR -> 0: the Rayleigh mean σ sqrt(π/2)
    noisy = add_noise(np.zeros((400_000, 1)), sigma, "rician", rng).ravel()
    assert noisy.mean() == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=5e-3)
    assert (noisy >= 0).all()
    # the Laguerre form agrees with scipy (an independent check of the oracle itself)
    nu = 0.5
    x = -(nu**2) / 2
    laguerre = math.exp(x / 2) * ((1 - x) * special.i0(-x / 2) - x * special.i1(-x / 2))
    assert stats.rice.mean(nu, scale=1.0) == pytest.approx(math.sqrt(math.pi / 2) * laguerre, rel=1e-10)


def test_same_seed_same_data_and_different_seed_different_data(model_2c):
    a = simulate(model_2c, 500, 5.0, seed=7)
    b = simulate(model_2c, 500, 5.0, seed=7)
    c = simulate(model_2c, 500, 5.0, seed=8)
    np.testing.assert_array_equal(a.signals, b.signals)
    np.testing.assert_array_equal(a.params, b.params)
    assert not np.array_equal(a.signals, c.signals)


def test_samples_cover_training_ranges_and_respect_arrival_order(model_1c, model_2c):
    p1 = sample_parameters(model_1c, 100_000, 0)
    for j, name in enumerate(model_1c.param_names):
        lo, hi = model_1c.training_ranges[name]
        assert p1[:, j].min() >= lo and p1[:, j].max() <= hi
        # uniform: the sample covers the range (KS against scipy's uniform)
        assert stats.kstest(p1[:5000, j], "uniform", args=(lo, hi - lo)).pvalue > 1e-3
    p2 = sample_parameters(model_2c, 100_000, 0)
    cbf, abv, abat, att = p2.T
    assert (abat <= att).all()
    gap = att - abat
    assert gap.min() >= 0.0 and gap.max() <= 1.5 and gap.max() > 1.45
    assert 0.3 <= abat.min() and abat.max() <= 1.5
    assert 0.0 <= abv.min() and abv.max() <= 0.03


def test_range_override_and_unknown_parameter(model_1c):
    p = sample_parameters(model_1c, 1000, 0, ranges={"att": (1.0, 1.0)})
    assert (p[:, 1] == 1.0).all()
    with pytest.raises(ValueError, match="unknown parameter 'abv'"):
        sample_parameters(model_1c, 10, 0, ranges={"abv": (0, 1)})


def test_monte_carlo_repeats_share_parameters_and_differ_in_noise(model_1c):
    data = simulate(model_1c, 50, 5.0, repeats=20, seed=1)
    assert data.params.shape == (1000, 2)
    for g in (0, 17, 49):
        rows = data.group == g
        assert rows.sum() == 20
        assert (data.params[rows] == data.params[rows][0]).all()
        assert (data.clean[rows] == data.clean[rows][0]).all()
        assert len(np.unique(data.signals[rows][:, 0])) == 20
    np.testing.assert_allclose(data.clean, model_1c.signal(data.params))


def test_infinite_snr_is_noise_free_and_snr_range_is_respected(model_1c):
    data = simulate(model_1c, 100, np.inf, noise="gaussian", seed=0)
    np.testing.assert_array_equal(data.signals, data.clean)
    ranged = simulate(model_1c, 10_000, (2.0, 20.0), seed=0)
    assert ranged.snr.min() >= 2.0 and ranged.snr.max() <= 20.0
    # log-uniform: the median SNR is the geometric mean of the range
    assert np.median(ranged.snr) == pytest.approx(math.sqrt(40.0), rel=0.05)
    np.testing.assert_allclose(ranged.sigma * ranged.snr, reference_signal_level(model_1c))


def test_save_load_round_trip_without_pickle(tmp_path):
    model = get_model("2c", Protocol([1.8, 1.5], [0.3, 1.5], [False, True]), Constants(t1b=1.35), arterial_edge_s=0.05)
    data = simulate(model, 30, 8.0, repeats=2, seed=3)
    path = tmp_path / "set.npz"
    data.save(path)
    with np.load(path, allow_pickle=False) as raw:  # plain arrays only
        assert json.loads(str(raw["protocol"]))["pld"] == [0.3, 1.5]
    back = SimulatedSet.load(path)
    assert back.model.to_dict() == model.to_dict()
    for key in ("params", "clean", "signals", "sigma", "snr", "group"):
        np.testing.assert_array_equal(getattr(back, key), getattr(data, key))
    assert back.seed == 3 and back.noise == "rician"
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_load_rejects_foreign_and_truncated_files(tmp_path):
    other = tmp_path / "other.npz"
    np.savez(other, x=np.ones(3))
    with pytest.raises(ValueError, match=r"other\.npz: not an aslbatch simulated set"):
        SimulatedSet.load(other)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ValueError, match=r"broken\.npz: not a readable \.npz"):
        SimulatedSet.load(broken)
