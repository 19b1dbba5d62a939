"""Network files: bit-identical round trip, no pickle, tamper and mismatch refusal, and the cache."""

import json
import threading
import zipfile

import numpy as np
import pytest

from aslbatch.estimators import get_estimator
from aslbatch.estimators.store import (NetworkCache, NetworkFileError, NetworkMismatch, default_cache_dir,
                                       load_network, read_card, save_network)
from aslbatch.models import get_model
from aslbatch.protocol import Constants, Protocol, default_protocol
from aslbatch.simulate import simulate

from .conftest import SMALL_NETWORK


@pytest.fixture(scope="module")
def saved(tmp_path_factory, supervised_1c):
    path = tmp_path_factory.mktemp("net") / "net.npz"
    save_network(supervised_1c, path)
    return path


def test_round_trip_bit_identical(saved, supervised_1c, model_1c):
    signals = simulate(model_1c, 3000, 5.0, seed=2).signals
    loaded = load_network(saved, model_1c)
    before, after = supervised_1c.predict(signals), loaded.predict(signals)
    np.testing.assert_array_equal(before.params, after.params)
    np.testing.assert_array_equal(before.status, after.status)
    # the standard errors, marginal and at a given noise SD, come back too
    assert before.stderr is not None and np.isfinite(before.stderr).all()
    np.testing.assert_array_equal(before.stderr, after.stderr)
    np.testing.assert_array_equal(supervised_1c.predict(signals, noise_sd=0.001).stderr,
                                  loaded.predict(signals, noise_sd=0.001).stderr)
    # and the interval half-widths with their levels
    assert loaded.uncertainty_.levels == supervised_1c.uncertainty_.levels and len(loaded.uncertainty_.levels) == 2
    np.testing.assert_array_equal(before.intervals, after.intervals)
    np.testing.assert_array_equal(supervised_1c.predict(signals, noise_sd=0.001).intervals,
                                  loaded.predict(signals, noise_sd=0.001).intervals)
    assert loaded.options() == supervised_1c.options()
    # without a model, the card rebuilds it
    np.testing.assert_array_equal(load_network(saved).predict(signals).params, before.params)


def test_file_holds_plain_arrays_only(saved):
    with np.load(saved, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    assert all(a.dtype.kind in "fU" for a in arrays.values())
    card = json.loads(str(arrays["card"]))
    for key in ("model", "options", "training_ranges", "versions", "created", "arrays_sha256", "training"):
        assert key in card
    assert card["model"]["protocol"]["pld"] == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert card["options"]["snr_range"] == list(SMALL_NETWORK["snr_range"])
    assert card["options"]["noise"] == "rician" and card["options"]["seed"] == SMALL_NETWORK["seed"]
    assert set(card["training"]["validation"]) == {"cbf", "att"}
    assert card["versions"]["scikit-learn"]
    assert read_card(saved) == card


def _member_data_offset(path, name):
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    raw = path.read_bytes()
    name_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


@pytest.mark.parametrize("member", ["weight_1.npy", "bias_0.npy", "in_scale.npy", "card.npy", "se_weight_1.npy",
                                    "sesnr_bias_0.npy", "sesnr_out_shift.npy", "se_levels.npy", "sesnr_levels.npy"])
@pytest.mark.parametrize("where", [0.5, 0.95])
def test_one_changed_byte_is_refused(saved, tmp_path, member, where):
    start, size = _member_data_offset(saved, member)
    raw = bytearray(saved.read_bytes())
    position = start + int(size * where)
    raw[position] ^= 0x01
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(NetworkFileError, match="bad.npz"):
        load_network(bad)


def test_altered_card_with_valid_zip_is_refused(saved, tmp_path):
    """Rewriting the card (e.g. another PLD list) without the checksum is caught."""
    with np.load(saved, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    card = json.loads(str(arrays["card"]))
    card["model"]["protocol"]["pld"][0] = 1.1
    arrays["card"] = np.array(json.dumps(card))
    bad = tmp_path / "edited.npz"
    np.savez(bad, **arrays)
    with pytest.raises(NetworkFileError, match="checksum mismatch"):
        load_network(bad)


def test_truncated_and_foreign_files_refused(saved, tmp_path):
    cut = tmp_path / "cut.npz"
    cut.write_bytes(saved.read_bytes()[:1000])
    with pytest.raises(NetworkFileError, match="cut.npz"):
        load_network(cut)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, card=np.array([{"a": 1}], dtype=object))
    with pytest.raises(NetworkFileError, match="pickle"):
        load_network(pickled)
    with pytest.raises(NetworkFileError, match="no such"):
        load_network(tmp_path / "missing.npz")


def test_protocol_and_constants_mismatch_refused(saved):
    other_pld = get_model("1c", Protocol(1.8, [1.0, 1.5, 2.0, 2.5, 3.5]))
    with pytest.raises(NetworkMismatch, match=r"pld \[1.0, 1.5, 2.0, 2.5, 3.0\] s \(data: \[1.0, 1.5, 2.0, 2.5, 3.5\]"):
        load_network(saved, other_pld)
    other_t1 = get_model("1c", default_protocol("1c"), Constants(t1b=1.35))
    with pytest.raises(NetworkMismatch, match="constant t1b 1.65 .data: 1.35"):
        load_network(saved, other_t1)
    with pytest.raises(NetworkMismatch, match="model 1c"):
        load_network(saved, get_model("2c", default_protocol("2c")))


class CountingCache(NetworkCache):
    def __init__(self, folder):
        super().__init__(folder)
        self.trained = 0

    def get(self, estimator, progress=False):
        original = estimator.fit

        def counting_fit(*args, **kwargs):
            self.trained += 1
            return original(*args, **kwargs)

        estimator.fit = counting_fit
        return super().get(estimator, progress)


def test_cache_trains_once_per_key_even_concurrently(tmp_path, model_1c):
    cache = CountingCache(tmp_path / "cache")
    opts = {**SMALL_NETWORK, "n_samples": 2000, "max_epochs": 2}
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        cache.get(get_estimator("supervised", model_1c, **opts)))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.trained == 1 and len(results) == 2
    assert results[0].network_sha256_ == results[1].network_sha256_
    again = cache.get(get_estimator("supervised", model_1c, **opts))
    assert cache.trained == 1 and again.network_sha256_ == results[0].network_sha256_
    other_protocol = get_model("1c", Protocol(1.8, [1.0, 1.5, 2.0, 2.5]))
    other = cache.get(get_estimator("supervised", other_protocol, **opts))
    assert cache.trained == 2 and other.network_sha256_ != results[0].network_sha256_
    cache.get(get_estimator("supervised", model_1c, **{**opts, "seed": 5}))
    assert cache.trained == 3
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3


def test_damaged_cache_entry_is_retrained(tmp_path, model_1c):
    cache = CountingCache(tmp_path)
    opts = {**SMALL_NETWORK, "n_samples": 2000, "max_epochs": 2}
    first = cache.get(get_estimator("supervised", model_1c, **opts))
    path = cache.path(first)
    path.write_bytes(path.read_bytes()[:-50])
    cache.get(get_estimator("supervised", model_1c, **opts))
    assert cache.trained == 2
    load_network(path, model_1c)


def test_default_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ASLBATCH_CACHE_DIR", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("ASLBATCH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "aslbatch"


def test_card_describes_the_uncertainty_arrays(saved):
    card = read_card(saved)
    assert card["format"] == "aslbatch.network/2"
    assert card["uncertainty"]["array_prefixes"] == ["se_", "sesnr_"]
    assert card["uncertainty"]["interval_levels"] == [0.6826894921370859, 0.95]
    with np.load(saved, allow_pickle=False) as data:
        names = set(data.files)
    main = {n for n in names if n.startswith(("weight_", "bias_"))}
    assert {"se_" + n for n in main} <= names and {"sesnr_" + n for n in main} <= names
    assert {"se_levels", "sesnr_levels"} <= names


def test_file_without_interval_levels_gives_standard_errors_only(saved, tmp_path, model_1c):
    """A training-version-3 file (variance networks without half-widths) still loads: the same standard
    errors from the log-variance outputs, no intervals; levels that do not divide the outputs are refused."""
    from aslbatch.estimators import store

    with np.load(saved, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    card = json.loads(str(arrays.pop("card")))
    arrays.pop("checksum")
    n_params = model_1c.n_params
    for prefix in ("se_", "sesnr_"):  # keep the log-variance outputs only, as version 3 wrote them
        del arrays[prefix + "levels"]
        last = max(int(k[len(prefix) + 7:]) for k in arrays if k.startswith(prefix + "weight_"))
        for name in (f"weight_{last}", f"bias_{last}", "out_shift", "out_scale"):
            arrays[prefix + name] = arrays[prefix + name][..., :n_params].copy()
    del card["uncertainty"]["interval_levels"]

    def written(arrays, name):
        text = json.dumps(card)
        np.savez(tmp_path / name, card=np.array(text), checksum=np.array(store._checksum(arrays, text)), **arrays)
        return tmp_path / name

    signals = simulate(model_1c, 200, 5.0, seed=3).signals
    old = load_network(written(arrays, "v3.npz"), model_1c).predict(signals)
    new = load_network(saved, model_1c).predict(signals)
    assert old.intervals is None and old.interval_levels == ()
    np.testing.assert_array_equal(old.stderr, new.stderr)
    with pytest.raises(NetworkFileError, match="multiple"):
        load_network(written({**arrays, "se_levels": np.array([0.5, 0.9])}, "odd.npz"), model_1c)


def test_cache_key_changes_with_the_training_version(monkeypatch, tmp_path, model_1c):
    """Networks cached by code without variance networks (training version 2) are not reused."""
    from aslbatch.estimators import store

    cache = NetworkCache(tmp_path)
    estimator = get_estimator("supervised", model_1c, **SMALL_NETWORK)
    now = cache.path(estimator)
    monkeypatch.setattr(store, "TRAINING_VERSION", 2)
    assert cache.path(estimator) != now


def test_format_1_file_is_read_without_standard_errors(saved, tmp_path, model_1c, caplog):
    """A file of the previous format (no variance networks) still predicts, with stderr None and a warning."""
    from aslbatch.estimators import store

    with np.load(saved, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if not k.startswith(("se_", "sesnr_"))}
    card = json.loads(str(arrays.pop("card")))
    arrays.pop("checksum")
    card["format"] = "aslbatch.network/1"
    del card["uncertainty"]
    text = json.dumps(card)
    old = tmp_path / "old.npz"
    np.savez(old, card=np.array(text), checksum=np.array(store._checksum(arrays, text)), **arrays)
    signals = simulate(model_1c, 200, 5.0, seed=3).signals
    with caplog.at_level("WARNING", logger="aslbatch.networks"):
        loaded = load_network(old, model_1c)
    assert "no standard errors" in caplog.text
    estimate = loaded.predict(signals)
    assert estimate.stderr is None
    np.testing.assert_array_equal(estimate.params, load_network(saved, model_1c).predict(signals).params)
    # variance arrays without the card's entry are inconsistent
    arrays_with_se = {**arrays, "se_bias_0": np.zeros(3)}
    odd = tmp_path / "odd.npz"
    np.savez(odd, card=np.array(text), checksum=np.array(store._checksum(arrays_with_se, text)), **arrays_with_se)
    with pytest.raises(NetworkFileError, match="uncertainty"):
        load_network(odd, model_1c)
