"""aslbatch.protocol: validation (one test per rule, the message names the problem), digests,
JSON round trips, the default protocols of ASL_MODELS.md and immutability."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aslbatch.protocol import MAX_TIME_S, Constants, Protocol, ProtocolError, default_protocol

REPO = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")


# --- Protocol validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        # length mismatch
        ({"label_duration": [1.8, 1.8], "pld": [1.0, 1.5, 2.0]}, r"length mismatch: label_duration has 2 values but pld has 3"),
        ({"label_duration": [], "pld": [1.0, 1.5]}, r"length mismatch: label_duration has 0 values"),
        ({"label_duration": 1.8, "pld": [1.0, 1.5], "crushed": [True, False, True]}, r"length mismatch: crushed has 3 values but pld has 2"),
        # empty
        ({"label_duration": 1.8, "pld": []}, r"pld is empty"),
        # not numbers / not 1-D
        ({"label_duration": 1.8, "pld": ["a", "b"]}, r"pld must be numbers"),
        ({"label_duration": "long", "pld": [1.0]}, r"label_duration must be numbers"),
        ({"label_duration": 1.8, "pld": [[1.0, 2.0], [3.0, 4.0]]}, r"pld must be one value per volume \(1-D\)"),
        ({"label_duration": [[1.8, 1.8]], "pld": [1.0, 2.0]}, r"label_duration must be one value per volume \(1-D\)"),
        # non-finite, naming the volume
        ({"label_duration": 1.8, "pld": [1.0, NAN, 2.0]}, r"pld has non-finite value\(s\) at volume\(s\) \[1\]"),
        ({"label_duration": 1.8, "pld": [1.0, 2.0, INF]}, r"pld has non-finite value\(s\) at volume\(s\) \[2\]"),
        ({"label_duration": [1.8, -INF], "pld": [1.0, 2.0]}, r"label_duration has non-finite value\(s\) at volume\(s\) \[1\]"),
        # negative PLD
        ({"label_duration": 1.8, "pld": [1.0, -0.2, 2.0]}, r"pld must be >= 0 s; negative value\(s\) at volume\(s\) \[1\]"),
        # label_duration <= 0
        ({"label_duration": [1.8, 0.0], "pld": [1.0, 2.0]}, r"label_duration must be > 0 s; value\(s\) <= 0 at volume\(s\) \[1\]"),
        ({"label_duration": [-1.8, 1.8], "pld": [1.0, 2.0]}, r"label_duration must be > 0 s; value\(s\) <= 0 at volume\(s\) \[0\]"),
        # milliseconds
        ({"label_duration": 1800, "pld": [1000, 1500]}, r"label_duration must be in seconds; value\(s\) \[1800.0, 1800.0\] .*milliseconds"),
        ({"label_duration": 1.8, "pld": [1.0, 2000.0]}, r"pld must be in seconds; value\(s\) \[2000.0\] exceed 10 s .*milliseconds"),
        # crushed not booleans
        ({"label_duration": 1.8, "pld": [1.0, 2.0], "crushed": [2, 0]}, r"crushed must be booleans"),
        ({"label_duration": 1.8, "pld": [1.0, 2.0], "crushed": ["yes", "no"]}, r"crushed must be booleans"),
        ({"label_duration": 1.8, "pld": [1.0, 2.0], "crushed": [1.0, 0.0]}, r"crushed must be booleans"),
    ],
)
def test_protocol_validation_names_the_problem(kwargs, message):
    with pytest.raises(ProtocolError, match=message):
        Protocol(**kwargs)


def test_protocol_error_is_a_value_error():
    assert issubclass(ProtocolError, ValueError)
    with pytest.raises(ValueError):
        Protocol(1.8, [-1.0])


@pytest.mark.parametrize("value", [MAX_TIME_S, 0.0])
def test_protocol_accepts_limits(value):
    """PLD 0 s and exactly MAX_TIME_S are allowed (the rules are pld >= 0 and <= MAX_TIME_S)."""
    p = Protocol(1.0, [value])
    assert p.pld.tolist() == [value]


def test_crushed_integers_zero_one_accepted():
    p = Protocol(1.8, [1.0, 2.0, 3.0], [1, 0, 1])
    assert p.crushed.dtype == bool and p.crushed.tolist() == [True, False, True]


@pytest.mark.parametrize("crushed, expected", [(None, [False] * 3), (True, [True] * 3), (False, [False] * 3)])
def test_crushed_default_and_scalar_broadcast(crushed, expected):
    assert Protocol(1.8, [1.0, 2.0, 3.0], crushed).crushed.tolist() == expected


def test_scalar_label_duration_broadcast():
    p = Protocol(1.8, [1.0, 1.5, 2.0])
    assert p.label_duration.shape == (3,)
    assert p.label_duration.tolist() == [1.8, 1.8, 1.8]
    assert p == Protocol([1.8, 1.8, 1.8], [1.0, 1.5, 2.0])
    assert p.n_volumes == 3
    np.testing.assert_array_equal(p.readout_time, [2.8, 3.3, 3.8])


def test_scalar_pld_is_one_volume():
    p = Protocol(1.8, 2.0)
    assert p.n_volumes == 1 and p.pld.tolist() == [2.0]


# --- immutability ---------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["label_duration", "pld", "crushed"])
def test_arrays_are_read_only(field):
    p = Protocol([1.0, 1.5], [0.5, 1.0], [True, False])
    arr = getattr(p, field)
    assert not arr.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        arr[0] = arr[1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(p, field, arr.copy())


def test_inputs_are_copied():
    tau = np.array([1.0, 1.5])
    pld = np.array([0.5, 1.0])
    crushed = np.array([True, False])
    p = Protocol(tau, pld, crushed)
    tau[0], pld[0], crushed[0] = 9.0, 9.0, False
    assert p.to_dict() == {"label_duration": [1.0, 1.5], "pld": [0.5, 1.0], "crushed": [True, False]}


def test_constants_are_frozen():
    c = Constants()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.t1b = 1.35  # type: ignore[misc]


# --- Constants validation -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["t1b", "t1t", "lam"])
@pytest.mark.parametrize("value", [0.0, -1.0, NAN, INF])
def test_constants_positive_fields(name, value):
    with pytest.raises(ProtocolError, match=rf"Constants\.{name} must be a finite positive number"):
        Constants(**{name: value})


@pytest.mark.parametrize("name", ["alpha", "alpha_bs"])
@pytest.mark.parametrize("value", [0.0, -0.5, 1.01, NAN, INF])
def test_constants_efficiencies_in_unit_interval(name, value):
    with pytest.raises(ProtocolError, match=rf"Constants\.{name} must be in \(0, 1\]"):
        Constants(**{name: value})


@pytest.mark.parametrize("kwargs", [{"t1b": 1650.0}, {"t1t": 1300.0}])
def test_constants_t1_in_milliseconds(kwargs):
    with pytest.raises(ProtocolError, match=r"T1 values must be in seconds.*milliseconds"):
        Constants(**kwargs)


@pytest.mark.parametrize("value", ["Blood", "buxton", "", None])
def test_constants_unknown_t1_prime(value):
    with pytest.raises(ProtocolError, match=r"Constants\.t1_prime must be one of \('blood', 'tissue'\)"):
        Constants(t1_prime=value)


def test_constants_defaults_match_spec():
    """ASL_MODELS.md defaults: T1b 1.65 s, T1t 1.3 s, α 0.85, α_BS 1, λ 0.9, T1' = T1b."""
    assert Constants().to_dict() == {
        "t1b": 1.65,
        "t1t": 1.3,
        "alpha": 0.85,
        "alpha_bs": 1.0,
        "lam": 0.9,
        "t1_prime": "blood",
    }


def test_constants_accept_limits_and_ints():
    c = Constants(alpha=1, alpha_bs=1.0, t1b=MAX_TIME_S, lam=1)
    assert isinstance(c.alpha, float) and isinstance(c.lam, float) and c.t1b == MAX_TIME_S


# --- unknown / missing dict fields ----------------------------------------------------------


def test_constants_from_dict_unknown_field():
    data = Constants().to_dict() | {"t2": 0.08}
    with pytest.raises(ProtocolError, match=r"unknown Constants field\(s\): \['t2'\]"):
        Constants.from_dict(data)


def test_protocol_from_dict_unknown_field():
    data = default_protocol("1c").to_dict() | {"m0": 1.0}
    with pytest.raises(ProtocolError, match=r"unknown Protocol field\(s\): \['m0'\]"):
        Protocol.from_dict(data)


def test_protocol_from_dict_missing_field():
    with pytest.raises(ProtocolError, match=r"Protocol is missing field\(s\): \['pld'\]"):
        Protocol.from_dict({"label_duration": [1.8]})


@pytest.mark.parametrize("text, message", [("{not json", "protocol JSON is malformed"), ("[1.0, 2.0]", "protocol JSON must be an object")])
def test_protocol_from_json_errors(text, message):
    with pytest.raises(ProtocolError, match=message):
        Protocol.from_json(text)


def test_protocol_from_dict_validates():
    with pytest.raises(ProtocolError, match="pld must be >= 0"):
        Protocol.from_dict({"label_duration": [1.8], "pld": [-1.0]})


# --- round trips ------------------------------------------------------------------------------


def random_protocol(seed: int) -> Protocol:
    rng = np.random.default_rng(seed)
    n = 11
    return Protocol(rng.uniform(0.3, 1.8, n), rng.uniform(0.0, 3.0, n), rng.random(n) < 0.5)


@pytest.mark.parametrize("protocol", [default_protocol("1c"), default_protocol("2c"), random_protocol(0)], ids=["1c", "2c", "random"])
def test_protocol_json_round_trip(protocol):
    again = Protocol.from_json(protocol.to_json())
    for field in ("label_duration", "pld", "crushed"):
        np.testing.assert_array_equal(getattr(again, field), getattr(protocol, field))  # exact floats
        assert getattr(again, field).dtype == getattr(protocol, field).dtype
    assert again == protocol and again.digest() == protocol.digest() and hash(again) == hash(protocol)
    assert Protocol.from_dict(protocol.to_dict()) == protocol
    # the dict is plain JSON types, in seconds
    d = json.loads(protocol.to_json())
    assert set(d) == {"label_duration", "pld", "crushed"}
    assert all(isinstance(v, float) for v in d["label_duration"] + d["pld"])
    assert all(isinstance(v, bool) for v in d["crushed"])


@pytest.mark.parametrize(
    "constants",
    [Constants(), Constants(t1b=1.35, t1t=1.1, alpha=0.7, alpha_bs=0.8, lam=0.98, t1_prime="tissue")],
    ids=["default", "other"],
)
def test_constants_round_trip(constants):
    assert Constants.from_dict(constants.to_dict()) == constants
    again = Constants.from_dict(json.loads(json.dumps(constants.to_dict())))
    assert again == constants and again.digest() == constants.digest()


def test_constants_from_partial_dict_uses_defaults():
    assert Constants.from_dict({"t1b": 1.35}) == Constants(t1b=1.35)


# --- digests ---------------------------------------------------------------------------------


def canonical_sha256(d: dict) -> str:
    """Independent recomputation: sha256 of sorted-key, compact JSON."""
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


#: digests of the default protocols and constants: a change here invalidates every cache keyed on them
DIGEST_1C = "7c53b5a6d51c7353762ebc4a4d2068695a1ee44e756ec68f4d9d8c8d9b5f3667"
DIGEST_2C = "bead28f6ca0e17591594089be1e451ee608d001456e8cbdb7267eb41998f8497"
DIGEST_CONSTANTS = "2be2308ff7e1d22ca71f529903f8f0419d8208dbbd34786e0c611b0eff0180c0"


def test_digest_is_sha256_of_canonical_content():
    p = default_protocol("2c")
    expected = canonical_sha256(
        {"label_duration": [1.8] * 9, "pld": [0.2, 0.5, 0.8, 1.1, 1.4, 1.0, 1.6, 2.2, 2.8], "crushed": [False] * 5 + [True] * 4}
    )
    assert p.digest() == expected == DIGEST_2C
    assert default_protocol("1c").digest() == DIGEST_1C
    assert Constants().digest() == canonical_sha256(Constants().to_dict()) == DIGEST_CONSTANTS


def test_digest_same_in_fresh_process():
    code = (
        "from aslbatch.protocol import Constants, Protocol, default_protocol;"
        "print(default_protocol('1c').digest());"
        "print(default_protocol('2c').digest());"
        "print(Constants(t1_prime='tissue').digest());"
        "print(Protocol([0.3, 1.7], [0.1, 2.9], [True, False]).digest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == [
        DIGEST_1C,
        DIGEST_2C,
        Constants(t1_prime="tissue").digest(),
        Protocol([0.3, 1.7], [0.1, 2.9], [True, False]).digest(),
    ]


def test_same_content_same_digest():
    a = Protocol(1.8, [1.0, 1.5], False)
    b = Protocol(np.array([1.8, 1.8]), (1.0, 1.5), [0, 0])
    assert a is not b and a == b
    assert a.digest() == b.digest() and hash(a) == hash(b)
    assert len({a, b}) == 1
    assert Constants(alpha=0.85) == Constants() and Constants(alpha=0.85).digest() == Constants().digest()


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["pld"].__setitem__(0, d["pld"][0] + 1e-12),
        lambda d: d["label_duration"].__setitem__(3, 1.5),
        lambda d: d["crushed"].__setitem__(0, True),
        lambda d: d["pld"].reverse(),
        lambda d: [d[k].pop() for k in ("label_duration", "pld", "crushed")],
    ],
    ids=["pld-1e-12", "tau", "crushed", "order", "one-volume-fewer"],
)
def test_different_protocol_different_digest(change):
    base = default_protocol("2c")
    data = base.to_dict()
    change(data)
    other = Protocol.from_dict(data)
    assert other != base
    assert other.digest() != base.digest()


@pytest.mark.parametrize(
    "change", [{"t1b": 1.35}, {"t1t": 1.4}, {"alpha": 0.9}, {"alpha_bs": 0.95}, {"lam": 0.98}, {"t1_prime": "tissue"}]
)
def test_different_constants_different_digest(change):
    assert Constants(**change) != Constants()
    assert Constants(**change).digest() != Constants().digest()


def test_protocol_not_equal_to_other_types():
    assert default_protocol("1c") != default_protocol("1c").to_dict()


# --- default protocols (ASL_MODELS.md) -------------------------------------------------------


def test_default_protocol_1c():
    p = default_protocol("1c")
    assert p.pld.tolist() == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert p.label_duration.tolist() == [1.8] * 5
    assert p.crushed.tolist() == [False] * 5


def test_default_protocol_2c():
    p = default_protocol("2c")
    assert p.n_volumes == 9
    assert p.pld.tolist() == [0.2, 0.5, 0.8, 1.1, 1.4, 1.0, 1.6, 2.2, 2.8]
    assert p.label_duration.tolist() == [1.8] * 9
    assert p.crushed.tolist() == [False] * 5 + [True] * 4


def test_default_protocol_pasl_is_the_bids_example_asl003():
    """Siemens multi-TI FAIR Q2TIPS (bids-examples asl003): τ_b = the first BolusCutOffDelayTime
    0.7 s, TI = PostLabelingDelay 0.3 to 3.0 s by 0.3 s, one value per TI."""
    p = default_protocol("pasl")
    assert p.pld.tolist() == [0.3, 0.6, 0.9, 1.2, 1.5, 1.8, 2.1, 2.4, 2.7, 3.0]
    assert p.label_duration.tolist() == [0.7] * 10
    assert p.crushed.tolist() == [False] * 10


def test_default_protocol_unknown_model():
    with pytest.raises(ProtocolError, match=r"no default protocol for model '3c'"):
        default_protocol("3c")


# --- known defects (reported, not fixed here) -----------------------------------------------


def test_signed_zero_pld_equal_protocols_hash_equal():
    a, b = Protocol(1.8, [0.0, 1.0]), Protocol(1.8, [-0.0, 1.0])
    assert a == b
    assert hash(a) == hash(b) and a.digest() == b.digest()


def test_crushed_must_be_one_dimensional():
    with pytest.raises(ProtocolError, match="crushed"):
        Protocol(1.8, [1.0, 2.0], [[True, False]])


def test_constants_accept_numpy_scalars_and_reject_bools_and_strings():
    c = Constants(lam=np.float32(0.9), t1b=np.int64(2))
    assert c.lam == pytest.approx(0.9) and c.t1b == 2.0 and type(c.lam) is float
    with pytest.raises(ProtocolError, match="lam must be a number"):
        Constants(lam=True)
    for name in ("t1b", "t1t", "lam", "alpha", "alpha_bs"):
        for value in ("1.65", None):
            with pytest.raises(ProtocolError, match=rf"Constants\.{name} must be a number"):
                Constants(**{name: value})


def test_numeric_strings_are_not_timings():
    with pytest.raises(ProtocolError, match="pld must be numbers"):
        Protocol("1.8", ["1.0"])
    with pytest.raises(ProtocolError, match="label_duration must be numbers"):
        Protocol("1.8", [1.0])


def test_shifted_protocol_delays_every_pld_and_keeps_the_rest():
    base = Protocol([1.8, 1.8, 1.5], [0.2, 1.0, 2.0], [False, True, True])
    later = base.shifted(0.05)
    assert later == Protocol([1.8, 1.8, 1.5], [0.25, 1.05, 2.05], [False, True, True])
    np.testing.assert_allclose(later.readout_time, base.readout_time + 0.05, rtol=0, atol=1e-15)
    assert base.shifted(0.0) == base
    with pytest.raises(ProtocolError, match="pld must be >= 0 s"):
        base.shifted(-0.3)
