"""The pulsed-ASL (Buxton) model against independent references: the check values of
ASL_MODELS.md (3 digits), tests/reference.py written from the equations (1e-12), the fully
delivered white-paper formula, and its Jacobian against central differences."""

import numpy as np
import pytest

from aslbatch.models.pasl import PulsedModel, relaxation_factor
from aslbatch.protocol import Constants, Protocol

from . import reference

TI = np.round(np.arange(0.3, 3.01, 0.3), 10)
CHECK = {  # ASL_MODELS.md, ΔM/M0t x 1e3: cbf 60, att 0.7 s, τ_b 0.7 s, α 0.98
    "blood": [0, 0, 2.524, 5.262, 6.142, 5.121, 4.269, 3.560, 2.968, 2.474],
    "tissue": [0, 0, 2.481, 5.039, 5.682, 4.496, 3.558, 2.815, 2.228, 1.763],
}


def _model(t1_prime, tau_b=0.7, ti=TI, **constants):
    return PulsedModel(Protocol(tau_b, ti), Constants(alpha=0.98, t1_prime=t1_prime, **constants))


@pytest.mark.parametrize("t1_prime", ["blood", "tissue"])
def test_check_values_of_asl_models(t1_prime):
    sig = _model(t1_prime).signal([[60.0, 0.7]])[0] * 1e3
    np.testing.assert_allclose(sig, CHECK[t1_prime], atol=5e-4)


@pytest.mark.parametrize("t1_prime", ["blood", "tissue"])
def test_agrees_with_the_reference_everywhere(t1_prime):
    rng = np.random.default_rng(0)
    ti = np.sort(rng.uniform(0.1, 3.5, 12))
    tau_b = rng.uniform(0.5, 1.0, 12)
    model = PulsedModel(Protocol(tau_b, ti), Constants(alpha=0.98, t1_prime=t1_prime, t1t=1.3))
    params = np.column_stack([rng.uniform(0, 150, 300), rng.uniform(0, 3.0, 300)])
    ours = model.signal(params)
    ref = np.array([reference.signal_pasl(c, a, tau_b, ti, t1_prime=t1_prime) for c, a in params])
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("t1_prime", ["blood", "tissue"])
def test_jacobian_matches_central_differences(t1_prime):
    model = _model(t1_prime)
    rng = np.random.default_rng(1)
    for cbf, att in zip(rng.uniform(5, 140, 40), rng.uniform(0.05, 2.8, 40)):
        if np.min(np.abs(np.concatenate([TI - att, TI - att - 0.7]))) < 1e-3:
            continue  # the kinks (t = att, t = att + τ_b) have one-sided derivatives
        jac = model.jacobian([[cbf, att]])[0]
        num = reference.central_difference_jacobian(lambda p: model.signal(p[None])[0], [cbf, att], [1e-4, 1e-6])
        np.testing.assert_allclose(jac, num, rtol=1e-6, atol=1e-10)


def test_fully_delivered_bolus_inverts_the_white_paper_formula():
    """Single-TI white paper: CBF = 6000 λ (ΔM/M0t) e^(TI/T1b) / (2 α τ_b), exact for att + τ_b <= TI."""
    model = _model("blood", tau_b=0.8, ti=[2.0])
    dm = model.signal([[55.0, 0.9]])[0, 0]
    assert 6000 * 0.9 * dm * np.exp(2.0 / 1.65) / (2 * 0.98 * 0.8) == pytest.approx(55.0, rel=1e-12)


def test_no_signal_before_arrival_and_t1_equal_limit_is_smooth():
    model = _model("tissue", t1t=1.65)  # 1/T1t = 1/T1b: k = f/λ, zero at cbf 0
    assert np.all(model.signal([[60.0, 3.5]]) == 0.0)
    small = model.signal([[1e-9, 0.7]])[0] / 1e-9
    limit = _model("blood").signal([[1.0, 0.7]])[0]
    np.testing.assert_allclose(small, limit, rtol=1e-6)
    for k in (1e-9, 1e-6, 1e-3, 0.3):  # the series and the closed form meet
        phi, dphi = relaxation_factor(k, 0.7)
        assert phi == pytest.approx(-np.expm1(-k * 0.7) / k, rel=1e-12)
        assert dphi == pytest.approx((0.7 * np.exp(-k * 0.7) - phi) / k, rel=1e-6, abs=1e-12)


def test_volume_table_reads_ti_as_the_readout_time():
    model = _model("blood")
    np.testing.assert_allclose(model.vol[:, 2], TI)  # TIME = TI, not τ_b + TI
    assert model.param_names == ("cbf", "att") and model.tissue_model() is model


def test_kinks_sit_in_the_table_where_lm_looks_for_them():
    """The signal has one-sided derivatives at att = TI (arrival) and att = TI − τ_b (bolus end):
    the table's TIME and PLD columns, which LM's kink handling reads."""
    model = _model("blood")
    np.testing.assert_allclose(model.vol[:, 1], TI - 0.7)
    for ti in (1.2, 1.2 - 0.7):
        h = 1e-7
        left = model.jacobian([[60.0, ti - h]])[0, :, 1]
        right = model.jacobian([[60.0, ti + h]])[0, :, 1]
        assert np.abs(left - right).max() > 1e-3


def test_alpha_defaults_to_the_white_paper_pasl_value():
    assert PulsedModel(Protocol(0.7, TI)).constants == Constants(alpha=0.98)
    assert PulsedModel.default_constants(t1_prime="tissue") == Constants(alpha=0.98, t1_prime="tissue")
    assert PulsedModel.default_constants(alpha=0.9).alpha == 0.9
    from aslbatch.models.one_compartment import OneCompartmentModel

    assert OneCompartmentModel(Protocol(1.8, [1.0, 2.0])).constants == Constants()
