"""aslbatch.models against independent references.

Oracles: tests/reference.py (the equations of ASL_MODELS.md in plain Python), the anchor
values published in ASL_MODELS.md, the white-paper single-PLD formula, central finite
differences, and closed-form properties (no signal before arrival, linearity in flow).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from . import reference as ref
from aslbatch.models import get_model
from aslbatch.protocol import Constants, Protocol, default_protocol

N_POINTS = 10_000

#: constants sets: both T1' choices at the defaults, plus non-default values of every constant
#: (α_BS = 1 by default, so only a non-default set shows whether α_BS and the others are used)
CONSTANTS = {
    "blood": Constants(t1_prime="blood"),
    "tissue": Constants(t1_prime="tissue"),
    "blood-other": Constants(t1b=1.35, t1t=1.1, alpha=0.7, alpha_bs=0.8, lam=0.98, t1_prime="blood"),
    "tissue-other": Constants(t1b=1.35, t1t=1.1, alpha=0.7, alpha_bs=0.8, lam=0.98, t1_prime="tissue"),
}


def irregular_protocol(seed: int = 20240611) -> Protocol:
    """Per-volume τ and PLD: two decoded Hadamard-like blocks of sub-boli plus sequential volumes.

    Sub-bolus k of a block has its own τ_k (0.3–1.8 s) and effective PLD = the block's final
    PLD + the durations of the sub-boli played after it. Crushed flags are mixed.
    """
    rng = np.random.default_rng(seed)
    taus: list[float] = []
    plds: list[float] = []
    for n_sub, final_pld in ((4, 0.1), (3, 0.8)):
        sub = rng.uniform(0.3, 1.8, n_sub)
        for k in range(n_sub):
            taus.append(sub[k])
            plds.append(final_pld + sub[k + 1 :].sum())
    taus += rng.uniform(0.3, 1.8, 4).tolist()
    plds += rng.uniform(0.0, 2.5, 4).tolist()
    crushed = rng.random(len(plds)) < 0.5
    crushed[0], crushed[1] = False, True  # at least one of each
    return Protocol(taus, plds, crushed)


PROTOCOLS_1C = {"default": default_protocol("1c"), "irregular": irregular_protocol()}
PROTOCOLS_2C = {"default": default_protocol("2c"), "irregular": irregular_protocol()}


def random_params_1c(model, n: int, rng: np.random.Generator) -> np.ndarray:
    r = model.training_ranges
    return np.column_stack([rng.uniform(*r["cbf"], n), rng.uniform(*r["att"], n)])


def random_params_2c(model, n: int, rng: np.random.Generator) -> np.ndarray:
    """(cbf, abv, abat, att) with abat in (0.3, 1.5) s and att = abat + U(0, 1.5) s."""
    r = model.training_ranges
    abat = rng.uniform(*r["abat"], n)
    return np.column_stack([rng.uniform(*r["cbf"], n), rng.uniform(*r["abv"], n), abat, abat + rng.uniform(0.0, 1.5, n)])


def reference_signals(model, params: np.ndarray) -> np.ndarray:
    p = model.protocol
    edge = getattr(model, "arterial_edge_s", 0.0)
    return ref.signals(
        model.name, params, p.label_duration, p.pld, p.crushed, edge_s=edge, **ref.constants_kwargs(model.constants)
    )


# --- agreement with the reference implementation -----------------------------------------


@pytest.mark.parametrize("protocol_name", sorted(PROTOCOLS_1C))
@pytest.mark.parametrize("constants_name", sorted(CONSTANTS))
def test_1c_signal_matches_reference(protocol_name, constants_name):
    model = get_model("1c", PROTOCOLS_1C[protocol_name], CONSTANTS[constants_name])
    rng = np.random.default_rng(1)
    params = random_params_1c(model, N_POINTS, rng)
    got = model.signal(params)
    assert got.shape == (N_POINTS, model.n_volumes)
    np.testing.assert_allclose(got, reference_signals(model, params), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("edge_s", [0.0, 0.1])
@pytest.mark.parametrize("protocol_name", sorted(PROTOCOLS_2C))
@pytest.mark.parametrize("constants_name", sorted(CONSTANTS))
def test_2c_signal_matches_reference(protocol_name, constants_name, edge_s):
    model = get_model("2c", PROTOCOLS_2C[protocol_name], CONSTANTS[constants_name], arterial_edge_s=edge_s)
    rng = np.random.default_rng(2)
    params = random_params_2c(model, N_POINTS, rng)
    got = model.signal(params)
    assert got.shape == (N_POINTS, model.n_volumes)
    expected = reference_signals(model, params)
    # the sample must exercise the arterial window: some non-crushed volumes inside it
    t = model.protocol.readout_time
    inside = (t >= params[:, 2:3]) & (t < params[:, 2:3] + model.protocol.label_duration) & ~model.protocol.crushed
    assert inside.sum() > 1000
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_reference_is_not_trivially_matched():
    """Guard on the oracle: changing a constant changes the reference (it reads its inputs)."""
    args = (60.0, 1.2, 1.8, [1.0, 2.0, 3.0])
    base = ref.signal_1c(*args)
    for change in ({"alpha_bs": 0.9}, {"lam": 0.98}, {"t1b": 1.35}, {"alpha": 0.7}, {"t1_prime": "tissue"}):
        assert np.all(np.abs(ref.signal_1c(*args, **change) - base) > 1e-6), change


# --- published anchor values (ASL_MODELS.md) ------------------------------------------------

ANCHORS_1C = {
    "blood": [9.35, 8.34, 6.16, 4.55, 3.36],
    "tissue": [8.34, 6.98, 4.73, 3.20, 2.17],
}


@pytest.mark.parametrize("t1_prime", sorted(ANCHORS_1C))
def test_1c_anchor_values(t1_prime):
    protocol = default_protocol("1c")
    model = get_model("1c", protocol, Constants(t1_prime=t1_prime))
    got = model.signal([60.0, 1.2])[0] * 1e3
    # 3 significant digits as published (half a unit of the last printed digit)
    np.testing.assert_allclose(got, ANCHORS_1C[t1_prime], rtol=0, atol=0.005 + 1e-12)


ANCHORS_2C = [
    ((60.0, 0.01, 0.7, 1.2), [18.145, 19.687, 8.614, 9.685, 8.860, 9.350, 7.848, 5.456, 3.793]),
    ((40.0, 0.02, 1.3, 2.2), [17.182, 17.504, 18.361, 19.075, 2.489, 1.670, 2.830, 3.637, 2.528]),
]


@pytest.mark.parametrize("params, expected", ANCHORS_2C)
def test_2c_anchor_values(params, expected):
    cbf, abv, abat, att = params
    model = get_model("2c", default_protocol("2c"), Constants())
    got = model.signal([cbf, abv, abat, att])[0] * 1e3
    np.testing.assert_allclose(got, expected, rtol=0, atol=0.0005 + 1e-12)


# --- white-paper single-PLD quantification ----------------------------------------------------


def white_paper_cbf(dm_m0: np.ndarray, tau: np.ndarray, w: np.ndarray, c: Constants) -> np.ndarray:
    """Alsop 2015: CBF = 6000 λ (ΔM/M0t) e^(w/T1b) / (2 α T1b (1 − e^(−τ/T1b)))."""
    return 6000.0 * c.lam * dm_m0 * np.exp(w / c.t1b) / (2.0 * c.alpha * c.t1b * (1.0 - np.exp(-tau / c.t1b)))


@pytest.mark.parametrize("protocol_name", sorted(PROTOCOLS_1C))
def test_white_paper_formula_inverts_fully_delivered_points(protocol_name):
    protocol = PROTOCOLS_1C[protocol_name]
    c = Constants(t1_prime="blood", t1b=1.4, alpha=0.8, lam=0.95)  # alpha_bs = 1 as the formula assumes
    model = get_model("1c", protocol, c)
    rng = np.random.default_rng(3)
    params = np.column_stack([rng.uniform(5.0, 150.0, 2000), rng.uniform(0.3, 2.5, 2000)])
    sig = model.signal(params)
    delivered = protocol.pld[None, :] >= params[:, 1:2]  # w >= att: the whole bolus has arrived
    assert delivered.sum() > 1000 and (~delivered).sum() > 1000
    cbf_hat = white_paper_cbf(sig, protocol.label_duration[None, :], protocol.pld[None, :], c)
    cbf_true = np.broadcast_to(params[:, :1], sig.shape)
    np.testing.assert_allclose(cbf_hat[delivered], cbf_true[delivered], rtol=1e-12)
    # while the bolus is still arriving the formula underestimates
    assert np.all(cbf_hat[~delivered] < cbf_true[~delivered])


# --- Jacobian --------------------------------------------------------------------------------

H = {"cbf": 1e-3, "abv": 1e-6, "abat": 1e-5, "att": 1e-5}
KINK_MARGIN_S = 1e-3  # 100 time steps


def away_from_kinks(model, params: np.ndarray) -> np.ndarray:
    """Rows of params whose readout times are all at least KINK_MARGIN_S from every kink/edge."""
    t = model.protocol.readout_time[None, :]
    tau = model.protocol.label_duration[None, :]
    names = model.param_names
    att = params[:, [names.index("att")]]
    near = (np.abs(t - att) < KINK_MARGIN_S) | (np.abs(t - att - tau) < KINK_MARGIN_S)
    if "abat" in names and model.arterial_edge_s == 0.0:
        abat = params[:, [names.index("abat")]]
        arterial = ~model.protocol.crushed[None, :]
        near |= arterial & ((np.abs(t - abat) < KINK_MARGIN_S) | (np.abs(t - abat - tau) < KINK_MARGIN_S))
    return params[~near.any(axis=1)]


def check_jacobian(model, params: np.ndarray) -> None:
    params = away_from_kinks(model, params)
    assert len(params) > 0.9 * 2000
    sig, jac = model.signal_and_jacobian(params)
    np.testing.assert_array_equal(sig, model.signal(params))
    np.testing.assert_array_equal(jac, model.jacobian(params))
    assert jac.shape == (len(params), model.n_volumes, model.n_params)
    fd = ref.central_difference_jacobian(model.signal, params, [H[n] for n in model.param_names])
    for j, name in enumerate(model.param_names):
        scale = np.abs(fd[..., j]).max()
        assert scale > 0, name
        np.testing.assert_allclose(jac[..., j], fd[..., j], rtol=1e-6, atol=1e-7 * scale, err_msg=name)


@pytest.mark.parametrize("protocol_name", sorted(PROTOCOLS_1C))
@pytest.mark.parametrize("constants_name", ["blood", "tissue", "tissue-other"])
def test_1c_jacobian_matches_finite_differences(protocol_name, constants_name):
    model = get_model("1c", PROTOCOLS_1C[protocol_name], CONSTANTS[constants_name])
    rng = np.random.default_rng(4)
    params = np.column_stack([rng.uniform(1.0, 150.0, 2000), rng.uniform(0.5, 3.5, 2000)])
    check_jacobian(model, params)


@pytest.mark.parametrize("edge_s", [0.0, 0.1])
@pytest.mark.parametrize("protocol_name", sorted(PROTOCOLS_2C))
@pytest.mark.parametrize("constants_name", ["blood", "tissue"])
def test_2c_jacobian_matches_finite_differences(protocol_name, constants_name, edge_s):
    model = get_model("2c", PROTOCOLS_2C[protocol_name], CONSTANTS[constants_name], arterial_edge_s=edge_s)
    rng = np.random.default_rng(5)
    params = random_params_2c(model, 2000, rng)
    params[:, 0] = np.maximum(params[:, 0], 1.0)
    check_jacobian(model, params)


def test_hard_edge_abat_derivative_is_decay_only():
    """Hard window: inside it d/d abat = -arterial/T1b (closed form); outside it 0."""
    protocol = default_protocol("2c")
    model = get_model("2c", protocol, Constants())
    # window [1.3, 3.1) s holds the non-crushed readouts 2.0, 2.3, 2.6, 2.9 s but not 3.2 s
    params = np.array([[50.0, 0.02, 1.3, 2.0]])
    jac = model.jacobian(params)[0, :, 2]
    arterial = 2 * 0.85 * 0.02 * math.exp(-1.3 / 1.65) / 0.9
    expected = np.where(np.arange(9) < 4, -arterial / 1.65, 0.0)
    np.testing.assert_allclose(jac, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "abat, inside",
    [(0.5, False), (1.5, True), (0.75, True), (1.75, False)],  # readout t = 1.5 s, τ = 1 s
)
def test_hard_window_is_half_open(abat, inside):
    """W = 1 on [abat, abat + τ): readout exactly at abat counts, exactly at abat + τ does not.

    Dyadic times make t, abat and abat + τ exact in floating point.
    """
    protocol = Protocol(1.0, [0.5])
    model = get_model("2c", protocol, Constants())
    params = [40.0, 0.02, abat, 4.0]  # att after the readout: no tissue signal
    expected = 2 * 0.85 * 0.02 * math.exp(-abat / 1.65) / 0.9 if inside else 0.0
    assert model.signal(params)[0, 0] == pytest.approx(expected, rel=1e-14, abs=0)
    np.testing.assert_allclose(model.signal(params)[0], reference_signals(model, np.array([params]))[0], rtol=1e-14, atol=0)


# --- 2C reduces to 1C -------------------------------------------------------------------------


@pytest.mark.parametrize("edge_s", [0.0, 0.1])
@pytest.mark.parametrize("protocol_name", sorted(PROTOCOLS_2C))
@pytest.mark.parametrize("constants_name", ["blood", "tissue"])
def test_2c_crushed_volumes_are_tissue_only(protocol_name, constants_name, edge_s):
    protocol = PROTOCOLS_2C[protocol_name]
    c = CONSTANTS[constants_name]
    m2 = get_model("2c", protocol, c, arterial_edge_s=edge_s)
    m1 = get_model("1c", protocol, c)
    params = random_params_2c(m2, 2000, np.random.default_rng(6))
    s2 = m2.signal(params)
    s1 = m1.signal(params[:, [0, 3]])
    crushed = protocol.crushed
    np.testing.assert_allclose(s2[:, crushed], s1[:, crushed], rtol=1e-13, atol=1e-18)
    # and the arterial term is really there in the non-crushed volumes
    assert np.any(s2[:, ~crushed] - s1[:, ~crushed] > 1e-4)


@pytest.mark.parametrize("edge_s", [0.0, 0.1])
@pytest.mark.parametrize("protocol_name", sorted(PROTOCOLS_2C))
def test_2c_without_arterial_blood_is_1c(protocol_name, edge_s):
    protocol = PROTOCOLS_2C[protocol_name]
    m2 = get_model("2c", protocol, Constants(), arterial_edge_s=edge_s)
    m1 = get_model("1c", protocol, Constants())
    rng = np.random.default_rng(7)
    n = 2000
    cbf, att = rng.uniform(0, 150, n), rng.uniform(0.3, 3.5, n)
    abat = rng.uniform(0.0, 4.0, n)  # anywhere, even after att
    s2 = m2.signal(np.column_stack([cbf, np.zeros(n), abat, att]))
    s1 = m1.signal(np.column_stack([cbf, att]))
    np.testing.assert_allclose(s2, s1, rtol=1e-13, atol=1e-18)


# --- physical sanity against closed forms ----------------------------------------------------


@pytest.mark.parametrize("constants_name", ["blood", "tissue"])
def test_no_signal_before_arrival(constants_name):
    protocol = irregular_protocol()
    c = CONSTANTS[constants_name]
    rng = np.random.default_rng(8)
    n = 2000
    cbf, att = rng.uniform(1.0, 150.0, n), rng.uniform(0.5, 6.0, n)
    t = protocol.readout_time[None, :]
    before = t < att[:, None]
    assert before.sum() > 1000 and (~before).sum() > 1000
    s1 = get_model("1c", protocol, c).signal(np.column_stack([cbf, att]))
    assert np.all(s1[before] == 0.0)
    assert np.all(s1[~before] > 0.0)
    # 2C, hard edges: nothing before the label reaches the arteries (non-crushed) or the tissue
    abat = att - rng.uniform(0.0, 0.4, n)
    s2 = get_model("2c", protocol, c).signal(np.column_stack([cbf, np.full(n, 0.02), abat, att]))
    before_both = t < abat[:, None]
    assert before_both.sum() > 1000
    assert np.all(s2[before_both] == 0.0)
    assert np.all(s2[before & protocol.crushed[None, :]] == 0.0)


@pytest.mark.parametrize("model_name", ["1c", "2c"])
def test_linear_in_flow_with_blood_t1(model_name):
    """T1' = T1b: the signal is linear in cbf (and, for 2C, jointly in cbf and abv)."""
    protocol = irregular_protocol()
    model = get_model(model_name, protocol, Constants(t1_prime="blood"))
    rng = np.random.default_rng(9)
    params = (random_params_1c if model_name == "1c" else random_params_2c)(model, 2000, rng)
    doubled = params.copy()
    doubled[:, 0] *= 2.0
    if model_name == "2c":
        doubled[:, 1] *= 2.0
    np.testing.assert_allclose(model.signal(doubled), 2.0 * model.signal(params), rtol=1e-14, atol=0)


def test_sublinear_in_flow_with_tissue_t1():
    """Buxton's T1' shortens as flow rises (1/T1' = 1/T1t + f/λ): doubling cbf less than doubles ΔM."""
    protocol = irregular_protocol()
    model = get_model("1c", protocol, Constants(t1_prime="tissue"))
    rng = np.random.default_rng(10)
    params = random_params_1c(model, 2000, rng)
    params[:, 0] = np.maximum(params[:, 0], 1.0)
    doubled = params * [2.0, 1.0]
    s, s2 = model.signal(params), model.signal(doubled)
    pos = s > 0
    assert pos.sum() > 1000
    assert np.all(s2[pos] < 2.0 * s[pos]) and np.all(s2[pos] > s[pos])


def test_buxton_t1_prime_closed_form_single_point():
    """One delivered point against the formula written out with Buxton's T1'."""
    c = Constants(t1_prime="tissue")
    model = get_model("1c", Protocol(1.5, [2.0]), c)
    cbf, att = 80.0, 1.0
    f = cbf / 6000.0
    t1p = 1.0 / (1.0 / 1.3 + f / 0.9)
    expected = 2 * 0.85 * f * t1p * math.exp(-att / 1.65) / 0.9 * math.exp(-(3.5 - 1.5 - att) / t1p) * (1 - math.exp(-1.5 / t1p))
    assert model.signal([cbf, att])[0, 0] == pytest.approx(expected, rel=1e-13)


# --- API ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_name, bad_shape, columns",
    [
        ("1c", (5, 3), r"\('cbf', 'att'\)"),
        ("1c", (3,), r"\('cbf', 'att'\)"),
        ("1c", (2, 2, 2), r"\('cbf', 'att'\)"),
        ("2c", (5, 2), r"\('cbf', 'abv', 'abat', 'att'\)"),
        ("2c", (5,), r"\('cbf', 'abv', 'abat', 'att'\)"),
    ],
)
@pytest.mark.parametrize("method", ["signal", "jacobian", "signal_and_jacobian"])
def test_wrong_params_shape_names_columns(model_name, bad_shape, columns, method):
    model = get_model(model_name, default_protocol(model_name))
    with pytest.raises(ValueError, match=columns):
        getattr(model, method)(np.ones(bad_shape))


def test_single_voxel_1d_params_accepted():
    model = get_model("1c", default_protocol("1c"))
    np.testing.assert_array_equal(model.signal([60.0, 1.2]), model.signal([[60.0, 1.2]]))


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model '3c'.*'1c', '2c'"):
        get_model("3c", default_protocol("1c"))


@pytest.mark.parametrize(
    "edge, message",
    [(-0.1, "arterial_edge_s must be a finite number >= 0"), (float("nan"), "arterial_edge_s"), (float("inf"), "arterial_edge_s"), (100.0, "milliseconds")],
)
def test_bad_arterial_edge(edge, message):
    with pytest.raises(ValueError, match=message):
        get_model("2c", default_protocol("2c"), arterial_edge_s=edge)


def test_1c_rejects_arterial_edge_option():
    with pytest.raises(TypeError):
        get_model("1c", default_protocol("1c"), arterial_edge_s=0.1)


@pytest.mark.parametrize("bad", [{"protocol": "not a protocol"}, {"constants": {"t1b": 1.65}}])
def test_model_rejects_wrong_types(bad):
    kwargs = {"protocol": default_protocol("1c"), "constants": Constants(), **bad}
    with pytest.raises(TypeError, match="protocol|constants"):
        get_model("1c", kwargs["protocol"], kwargs["constants"])


def test_param_names_and_units_match_spec():
    m1 = get_model("1c", default_protocol("1c"))
    m2 = get_model("2c", default_protocol("2c"))
    assert m1.param_names == ("cbf", "att")
    assert m1.param_units == ("mL/100 g/min", "s")
    assert m2.param_names == ("cbf", "abv", "abat", "att")
    assert m2.param_units == ("mL/100 g/min", "mL/mL", "s", "s")
    assert [p.title for p in m1.parameters] == ["cerebral blood flow (CBF)", "arterial transit time (ATT)"]
    assert "TTT" in m2.parameter("att").title and "ATT" in m2.parameter("abat").title
    assert m2.default_bounds == ((0.0, 0.0, 0.0, 0.0), (300.0, 0.1, 3.0, 5.0))
    for spec in m1.parameters + m2.parameters:  # estimates may reach at least the training range
        assert spec.bounds[0] <= spec.training_range[0] < spec.training_range[1] <= spec.bounds[1], spec.name
        assert spec.display[0] < spec.display[1] and spec.se_display > 0
    with pytest.raises(KeyError, match="abv"):
        m1.parameter("abv")


def test_registry_lists_without_importing_and_names_unknown_models():
    from aslbatch.models import MODELS

    assert list(MODELS) == ["1c", "2c", "pasl", "single", "relative"] and "2c" in MODELS and "pasl9" not in MODELS
    assert MODELS["2c"].name == "2c" and MODELS["pasl"].name == "pasl"
    with pytest.raises(ValueError, match="unknown model 'x'.*'1c', '2c', 'pasl'"):
        get_model("x", default_protocol("1c"))


def test_shifted_model_reads_every_volume_later():
    m2 = get_model("2c", default_protocol("2c"), arterial_edge_s=0.05)
    later = m2.shifted(0.3)
    np.testing.assert_allclose(later.protocol.pld, m2.protocol.pld + 0.3)
    np.testing.assert_array_equal(later.protocol.crushed, m2.protocol.crushed)
    assert later.options() == m2.options() and later.constants == m2.constants
    # a voxel read 0.3 s late: its signal is the same voxel's signal at PLD + 0.3 s (closed form, tests/reference)
    p = np.array([[60.0, 0.01, 0.7, 1.2]])
    np.testing.assert_allclose(later.signal(p), get_model("2c", later.protocol, arterial_edge_s=0.05).signal(p))


def test_training_ranges_match_spec():
    m1 = get_model("1c", default_protocol("1c"))
    m2 = get_model("2c", default_protocol("2c"))
    assert m1.training_ranges == {"cbf": (0.0, 150.0), "att": (0.5, 3.5)}
    r2 = m2.training_ranges
    assert (r2["cbf"], r2["abv"], r2["abat"]) == ((0.0, 150.0), (0.0, 0.03), (0.3, 1.5))
    assert m2.ordered_times == (("abat", "att", (0.0, 1.5)),)
    # bounds enclose the training ranges
    for m in (m1, m2):
        lo, hi = m.bounds
        for j, name in enumerate(m.param_names):
            assert lo[j] <= m.training_ranges[name][0] and m.training_ranges[name][1] <= hi[j]


def test_model_records_options_and_constants():
    m2 = get_model("2c", default_protocol("2c"), Constants(t1_prime="tissue"), arterial_edge_s=0.05)
    d = m2.to_dict()
    assert d["model"] == "2c" and d["options"] == {"arterial_edge_s": 0.05}
    assert d["constants"]["t1_prime"] == "tissue"
    assert Protocol.from_dict(d["protocol"]) == default_protocol("2c")


@pytest.mark.parametrize("model_name,edge_s", [("1c", 0.0), ("2c", 0.0), ("2c", 0.1)])
@pytest.mark.parametrize("t1_prime", ["blood", "tissue"])
def test_vectorised_numpy_reference_agrees_with_scalar_reference(model_name, edge_s, t1_prime):
    """The benchmarks' numpy baseline is itself checked against the scalar reference."""
    rng = np.random.default_rng(11)
    prot = default_protocol(model_name)
    n = 2000
    if model_name == "1c":
        params = np.column_stack([rng.uniform(0, 150, n), rng.uniform(0.5, 3.5, n)])
    else:
        abat = rng.uniform(0.3, 1.5, n)
        params = np.column_stack([rng.uniform(0, 150, n), rng.uniform(0, 0.03, n), abat, abat + rng.uniform(0, 1.5, n)])
    consts = Constants(t1_prime=t1_prime).to_dict()
    slow = ref.signals(model_name, params, prot.label_duration, prot.pld, prot.crushed, edge_s=edge_s, **consts)
    fast = ref.signals_numpy(model_name, params, prot.label_duration, prot.pld, prot.crushed, edge_s=edge_s, **consts)
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-15)
