"""The status codes ATT_UNDETERMINED and CBF_UNDETERMINED (issue 13.4).

1. The rule of :func:`flag_undetermined` against its closed-form conditions, written here from
   the protocol: CBF_UNDETERMINED where at most one distinct readout time t = τ + w (TI for PASL)
   lies after att; ATT_UNDETERMINED (T1' = T1b, converged fits only) where att <= every t − τ;
   which codes each replaces; per-voxel slice offsets.
2. The conditions against the physics, independently of aslbatch: the central-difference
   Jacobian of tests/reference.py's signals has rank <= 1 in (cbf, att) exactly where the rule
   says cbf is not determined, and a zero att column where it says att is not.
3. Every estimator applies the rule to its own estimate.
"""

from __future__ import annotations

import numpy as np
import pytest

from aslbatch import Constants
from aslbatch.estimators import Status, get_estimator
from aslbatch.estimators.base import flag_undetermined
from aslbatch.models import get_model
from aslbatch.models.pasl import PulsedModel
from aslbatch.protocol import Protocol, default_protocol

from . import reference

CONVERGED, MAX_ITERATIONS, AT_BOUND, INVALID = (int(Status.CONVERGED), int(Status.MAX_ITERATIONS),
                                                int(Status.AT_BOUND), int(Status.INVALID_INPUT))
ATT_UND, CBF_UND = int(Status.ATT_UNDETERMINED), int(Status.CBF_UNDETERMINED)


def _expected(readout, delivered_by, att, status, flat_possible):
    """Closed form: readout times t and the times t − τ by which each volume's bolus is delivered,
    both per volume (s) for this voxel; the expected status of a fit ending at ``att``."""
    if status == INVALID:
        return INVALID
    if np.unique(readout[readout > att]).size <= 1:
        return CBF_UND
    if flat_possible and status == CONVERGED and att <= delivered_by.min():
        return ATT_UND
    return status


def _models():
    p1 = default_protocol("1c")
    return {
        "1c": get_model("1c", p1),
        "1c tissue": get_model("1c", p1, Constants(t1_prime="tissue")),
        "1c repeated plds": get_model("1c", Protocol(1.8, [1.0, 1.0, 2.0, 2.0, 2.0])),
        "1c single pld": get_model("1c", Protocol(1.8, [2.0, 2.0])),
        "2c": get_model("2c", default_protocol("2c")),
        "pasl": PulsedModel(Protocol(0.7, [0.3, 0.6, 0.9, 1.2, 1.5, 1.8, 2.1, 2.4, 2.7, 3.0])),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_flags_follow_the_closed_form_conditions(name):
    model = _models()[name]
    proto = model.protocol
    tau, w = np.asarray(proto.label_duration, float), np.asarray(proto.pld, float)
    # PCASL: readout at τ + w, bolus delivered by w; PASL: readout at TI (= pld), delivered by TI − τ_b
    readout = w if name == "pasl" else tau + w
    delivered_by = readout - tau
    # every kink exactly, and either side of it, plus a uniform spread over the bounds
    att = np.unique(np.concatenate([readout, delivered_by, readout - 1e-9, readout + 1e-9, delivered_by + 1e-9,
                                    np.linspace(0.0, model.bounds[1][model.param_names.index("att")], 101)]))
    att = att[att >= 0]
    n = att.size
    rng = np.random.default_rng(0)
    params = np.column_stack([rng.uniform(0, 300, n)] + [rng.uniform(0.001, 0.02, n), np.minimum(att, 0.5)] * (
        model.n_params == 4) + [att])
    for code in (CONVERGED, MAX_ITERATIONS, AT_BOUND, INVALID):
        status = np.full(n, code, dtype=np.int8)
        out = flag_undetermined(model, params, status)
        assert out is status  # in place
        expected = [_expected(readout, delivered_by, a, code, model.constants.t1_prime == "blood") for a in att]
        np.testing.assert_array_equal(out, expected, err_msg=f"{name}, status {code}")


def test_flags_follow_each_voxels_slice_offset():
    """A voxel read o s late has every readout time shifted by o: the same as the model shifted."""
    model = _models()["1c"]
    rng = np.random.default_rng(1)
    n = 4000
    att = rng.uniform(0.0, 5.0, n)
    offsets = rng.choice([0.0, 0.35, 0.7], n)
    params = np.column_stack([rng.uniform(0, 150, n), att])
    got = flag_undetermined(model, params, np.zeros(n, dtype=np.int8), offsets)
    for o in np.unique(offsets):
        rows = offsets == o
        shifted = flag_undetermined(model.shifted(float(o)), params[rows], np.zeros(rows.sum(), dtype=np.int8))
        np.testing.assert_array_equal(got[rows], shifted)
    # and the closed form at one offset: blind from 4.3 + 0.7 s, flat up to 1.0 + 0.7 s
    rows = offsets == 0.7
    np.testing.assert_array_equal(got[rows] == CBF_UND, att[rows] >= 5.0)
    np.testing.assert_array_equal(got[rows] == ATT_UND, att[rows] <= 1.7)


def _reference_jacobian(model, cbf, att):
    """Central-difference Jacobian (n_volumes, 2) in (cbf, att) of tests/reference.py's 1C signal."""
    p = model.protocol
    kwargs = reference.constants_kwargs(model.constants)

    def fun(x):
        return np.asarray(reference.signal_1c(x[0], x[1], p.label_duration, p.pld, **kwargs))

    return reference.central_difference_jacobian(fun, [cbf, att], [1e-3, 1e-6])


@pytest.mark.parametrize("t1_prime", ["blood", "tissue"])
def test_flags_are_where_the_reference_jacobian_is_degenerate(t1_prime):
    """Away from the kinks: CBF_UNDETERMINED ⇔ at most one volume's row of J is non-zero (rank
    <= 1 from a single readout, or 0); ATT_UNDETERMINED ⇔ the att column of J is zero while the
    cbf column is not (never with Buxton's T1', where the delivered signal still depends on att)."""
    model = get_model("1c", default_protocol("1c"), Constants(t1_prime=t1_prime))
    p = model.protocol
    kinks = np.concatenate([p.pld, p.pld + p.label_duration])
    att = np.linspace(0.01, 4.99, 250)
    att = att[np.abs(att[:, None] - kinks).min(axis=1) > 1e-3]
    cbf = 60.0
    flags = flag_undetermined(model, np.column_stack([np.full(att.size, cbf), att]), np.zeros(att.size, np.int8))
    assert (flags == CBF_UND).any() and ((flags == ATT_UND).any() == (t1_prime == "blood"))
    for a, flag in zip(att, flags):
        jac = _reference_jacobian(model, cbf, a)
        informative_rows = np.count_nonzero(np.abs(jac).max(axis=1) > 0.0)
        assert (flag == CBF_UND) == (informative_rows <= 1), (a, flag, jac)
        # zero up to the differences' rounding (1e-12 against derivatives of ~1e-3 per s)
        att_flat = np.abs(jac[:, 1]).max() <= 1e-8 * cbf * np.abs(jac[:, 0]).max() and np.abs(jac[:, 0]).max() > 0
        assert (flag == ATT_UND) == att_flat, (a, flag, jac)


@pytest.mark.parametrize("method", ["lm", "lut"])
def test_estimators_flag_their_estimates(method):
    """Noise-free signals with att below the shortest PLD, inside the sampled range, and after the
    second-latest readout time get the codes of that att; a slice offset moves the limits."""
    model = _models()["1c"]
    truth = np.array([[50.0, 0.6], [50.0, 1.6], [50.0, 4.5]])
    y = model.signal(truth)
    est = get_estimator(method, model).fit()
    status = est.predict(y).status
    # the third voxel's signal is in its last volume only: any (cbf, att >= 4.3 s) on a curve fits it
    assert status.tolist() == [ATT_UND, CONVERGED, CBF_UND], status
    # read 0.7 s later (2D slice): the same signals are now those of arrival times 0.7 s later,
    # so the second voxel (att 1.6 -> 2.3, no longer flat) stays converged, and the first is flat
    late = est.predict(y[:2], slice_offsets=0.7).status
    assert late.tolist() == [ATT_UND, CONVERGED], late
