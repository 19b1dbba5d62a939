"""The one contract of every estimator (scikit-learn's and dipy's habits): options validated in
``fit``, ``predict`` refused before it, ``predict(signals, slice_offsets=...)`` for every method,
``trains`` declared, and the whole-acquisition entry point ``predict_image``.

Independent references: a fit of each offset group with a model built by hand on the shifted
protocol (tests/reference-style, not through ``Estimator``), and the rows' own predictions."""

import numpy as np
import pytest

from aslbatch.estimators import ESTIMATORS, get_estimator
from aslbatch.models import MODELS, get_model
from aslbatch.protocol import Protocol, default_protocol

#: the methods that fit a time course without training
CONVENTIONAL = [m for m in ESTIMATORS if not ESTIMATORS[m].trains and ESTIMATORS[m].serves(MODELS["1c"])]


def _data(model, n=200, seed=0):
    rng = np.random.default_rng(seed)
    truth = np.column_stack([rng.uniform(20, 100, n), rng.uniform(1.2, 2.5, n)])
    offsets = rng.choice([0.0, 0.05, 0.1], n)
    signals = np.vstack([get_model("1c", Protocol(1.8, model.protocol.pld + o)).signal(p)
                         for p, o in zip(truth, offsets)])
    return truth, offsets, signals


def test_every_registered_method_declares_the_contract():
    assert set(CONVENTIONAL) == {"lm", "lut"}
    for name in ESTIMATORS:
        cls = ESTIMATORS[name]
        assert cls.name == name and isinstance(cls.trains, bool) and cls.title
        assert name in cls.evaluation_variants()
        assert any(cls.serves(MODELS[model]) for model in MODELS)


def test_the_closed_form_serves_only_the_single_delay_models():
    served = {name: [m for m in MODELS if ESTIMATORS[name].serves(MODELS[m])] for name in ESTIMATORS}
    assert served["whitepaper"] == ["single", "relative"]
    assert all(not {"single", "relative"} & set(models) for name, models in served.items() if name != "whitepaper")
    with pytest.raises(ValueError, match="does not serve the single model.*whitepaper"):
        get_estimator("lm", get_model("single", Protocol(1.8, [1.8])))


def test_the_closed_form_follows_the_contract_and_the_shifted_protocol():
    """Refused before fit; each offset group equals the estimate on a single-delay model built by
    hand on the shifted protocol; the estimate inverts the 1C signal of a delivered bolus."""
    model = get_model("single", Protocol(1.8, [1.8]))
    with pytest.raises(ValueError, match="not fitted"):
        get_estimator("whitepaper", model).predict(np.ones((2, 1)))
    rng = np.random.default_rng(0)
    truth = np.column_stack([rng.uniform(20, 100, 50), rng.uniform(0.3, 1.7, 50)])
    offsets = rng.choice([0.0, 0.05, 0.1], 50)
    signals = np.vstack([get_model("1c", Protocol(1.8, 1.8 + o)).signal(p) for p, o in zip(truth, offsets)])
    est = get_estimator("whitepaper", model).fit().predict(signals, slice_offsets=offsets)
    for offset in np.unique(offsets):
        rows = offsets == offset
        by_hand = get_estimator("whitepaper", get_model("single", Protocol(1.8, 1.8 + offset))).fit()
        np.testing.assert_allclose(est.params[rows], by_hand.predict(signals[rows]).params, rtol=1e-12)
    np.testing.assert_allclose(est["cbf"], truth[:, 0], rtol=1e-12)


@pytest.mark.parametrize("method", CONVENTIONAL)
def test_predict_before_fit_is_refused(method, model_1c):
    with pytest.raises(ValueError, match="not fitted"):
        get_estimator(method, model_1c).predict(np.ones((2, 5)))


@pytest.mark.parametrize("method", CONVENTIONAL)
def test_slice_offsets_fit_each_group_with_its_shifted_protocol(method, model_1c):
    truth, offsets, signals = _data(model_1c)
    est = get_estimator(method, model_1c).fit().predict(signals, slice_offsets=offsets)
    for offset in np.unique(offsets):
        rows = offsets == offset
        by_hand = get_estimator(method, get_model("1c", Protocol(1.8, model_1c.protocol.pld + offset))).fit()
        np.testing.assert_array_equal(est.params[rows], by_hand.predict(signals[rows]).params)
    if method == "lm":
        np.testing.assert_allclose(est.params, truth, rtol=1e-6)


def test_a_network_takes_offsets_as_input_and_refuses_them_untrained(supervised_1c):
    with pytest.raises(ValueError, match="without slice timing"):
        supervised_1c.predict(np.full((3, 5), 0.005), slice_offsets=0.1)
    zero = supervised_1c.predict(np.full((3, 5), 0.005), slice_offsets=0.0)
    np.testing.assert_array_equal(zero.params, supervised_1c.predict(np.full((3, 5), 0.005)).params)


@pytest.mark.parametrize("bad", [np.array([0.1, -0.1]), np.array([np.nan, 0.0]), np.zeros(3)])
def test_bad_slice_offsets_are_named(bad, model_1c):
    with pytest.raises(ValueError, match="slice_offsets"):
        get_estimator("lm", model_1c).fit().predict(np.full((2, 5), 0.005), slice_offsets=bad)


def test_predict_image_is_the_rowwise_prediction_and_checks_the_mask(model_1c):
    truth, offsets, signals = _data(model_1c, n=60)
    mask = np.zeros((5, 4, 6), bool)
    mask.flat[np.random.default_rng(1).choice(mask.size, 60, replace=False)] = True
    est = get_estimator("lm", model_1c).fit()
    whole = est.predict_image(signals, mask, slice_offsets=offsets, progress=True)
    np.testing.assert_array_equal(whole.params, est.predict(signals, slice_offsets=offsets).params)
    with pytest.raises(ValueError, match="mask"):
        est.predict_image(signals, mask[..., :3])


def test_options_are_validated_in_fit_not_in_the_constructor(model_1c):
    estimator = get_estimator("lm", model_1c, max_iter=0)  # construction stores options only
    with pytest.raises(ValueError, match="max_iter"):
        estimator.fit()


def test_shifted_estimators_are_built_once_per_offset(model_1c, monkeypatch):
    truth, offsets, signals = _data(model_1c, n=30)
    est = get_estimator("lut", model_1c).fit()
    est.predict(signals, slice_offsets=offsets)
    built = dict(est._shifted)
    est.predict(signals, slice_offsets=offsets)
    assert est._shifted == built and all(a is built[k] for k, a in est._shifted.items())
    assert sorted(built) == [0.05, 0.1]
    assert default_protocol("1c") == model_1c.protocol
