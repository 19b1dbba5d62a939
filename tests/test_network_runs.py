"""Networks in the batch: trained once into the cache, given as files, checked against each
acquisition's protocol, slice timing as an input, and recorded in provenance."""

import json

import nibabel as nib
import numpy as np
from typer.testing import CliRunner

from aslbatch.batch import run_batch
from aslbatch.cli import app
from aslbatch.derivatives import read_provenance
from aslbatch.estimators import get_estimator
from aslbatch.estimators.store import file_sha256, read_card, save_network
from aslbatch.exitcodes import EXIT_FAILED, EXIT_OK
from aslbatch.models import get_model
from aslbatch.phantom import default_groundtruth_dir, write_bids_dataset
from aslbatch.pipeline import Settings
from aslbatch.protocol import Protocol

from .conftest import SMALL_NETWORK

runner = CliRunner()
SHAPE = (10, 12, 4)
#: the small test network, at the SNR of the phantoms
OPTIONS = {**SMALL_NETWORK, "snr_range": (5.0, 50.0)}


def _provenance(out, subject):
    return read_provenance(next((out / subject / "perf").glob("*_provenance.json")))


def test_cache_trains_once_and_provenance_names_the_network(tmp_path):
    raw = write_bids_dataset(tmp_path / "raw", subjects=2, model="1c", snr=20, seed=3, shape=SHAPE)
    out, cache = tmp_path / "out", tmp_path / "cache"
    settings = Settings(methods=("lm", "supervised"), method_options={"supervised": OPTIONS}, cache_dir=str(cache))
    report = run_batch(raw, out, settings)
    assert report.exit_code == EXIT_OK, report.outcomes
    [network_file] = cache.glob("*.npz")
    for subject in ("sub-01", "sub-02"):
        options = _provenance(out, subject)["estimator_options"]["supervised"]
        assert options["network_sha256"] == file_sha256(network_file)
        assert options["hidden_layers"] == list(OPTIONS["hidden_layers"])
    mtime = network_file.stat().st_mtime_ns
    assert run_batch(raw, out, settings).counts()["skipped"] == 2
    # the network's cbf beats a trivial map and is close to LM's at this SNR
    truth_dir = default_groundtruth_dir(raw)
    mask = np.asarray(nib.load(truth_dir / "sub-01" / "sub-01_mask.nii.gz").dataobj) > 0
    truth = np.asarray(nib.load(truth_dir / "sub-01" / "sub-01_cbf.nii.gz").dataobj)[mask]
    errors = {}
    for method in ("lm", "supervised"):
        cbf = np.asarray(nib.load(out / "sub-01" / "perf" / f"sub-01_desc-{method}_cbf.nii.gz").dataobj)[mask]
        errors[method] = np.nanmedian(np.abs(cbf - truth))
    assert errors["supervised"] < 2 * errors["lm"] and errors["supervised"] < 0.3 * np.median(np.abs(truth - truth.mean()))
    assert network_file.stat().st_mtime_ns == mtime  # the cached network was not retrained


def test_given_network_used_and_mismatch_fails_only_that_session(tmp_path, model_1c):
    raw = write_bids_dataset(tmp_path / "raw", subjects=1, model="1c", snr=20, seed=4, shape=SHAPE)
    other = write_bids_dataset(tmp_path / "raw2", subjects=1, model="1c", snr=20, seed=4, shape=SHAPE,
                               protocol=Protocol(1.8, [1.0, 1.5, 2.0, 2.5]))
    good = tmp_path / "good.npz"
    save_network(get_estimator("supervised", model_1c, **{**OPTIONS, "n_samples": 3000, "max_epochs": 3}).fit(), good)
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(raw), str(out), "--network", str(good), "--cache-dir",
                                 str(tmp_path / "empty-cache")])
    assert result.exit_code == EXIT_OK, result.output
    options = _provenance(out, "sub-01")["estimator_options"]["supervised"]
    assert options["network_sha256"] == file_sha256(good) and options["network_file"] == str(good)
    assert not (tmp_path / "empty-cache").exists()
    mismatch = runner.invoke(app, ["run", str(other), str(tmp_path / "out2"), "--network", str(good)])
    assert mismatch.exit_code == EXIT_FAILED
    summary = json.loads((tmp_path / "out2" / "logs" / "latest_summary.json").read_text())
    assert ("was trained for other data: 5 volumes with PLD [1.0, 1.5, 2.0, 2.5, 3.0] s (data: 4 volumes with "
            "PLD [1.0, 1.5, 2.0, 2.5] s)") in \
        summary["sessions"][0]["reason"]
    # retraining the given file makes the outputs stale
    save_network(get_estimator("supervised", model_1c, **{**OPTIONS, "n_samples": 3000, "max_epochs": 3,
                                                          "seed": 9}).fit(), good)
    again = runner.invoke(app, ["run", str(raw), str(out), "--network", str(good), "--dry-run"])
    assert "settings changed" in again.output


def test_slice_timing_trains_over_the_dataset_offsets(tmp_path):
    timing = [0.0, 0.05, 0.10, 0.15]
    raw = write_bids_dataset(tmp_path / "raw", subjects=1, model="1c", snr=20, seed=5, shape=SHAPE,
                             slice_timing=timing)
    out, cache = tmp_path / "out", tmp_path / "cache"
    report = run_batch(raw, out, Settings(methods=("supervised",), method_options={"supervised": OPTIONS},
                                          cache_dir=str(cache)))
    assert report.exit_code == EXIT_OK, report.outcomes
    [network_file] = cache.glob("*.npz")
    assert read_card(network_file)["options"]["slice_offsets"] == timing
    assert _provenance(out, "sub-01")["estimator_options"]["supervised"]["slice_offsets"] == timing
    # a network without slice timing is refused for these data, not used silently
    model = get_model("1c", Protocol(1.8, [1.0, 1.5, 2.0, 2.5, 3.0]))
    plain = tmp_path / "plain.npz"
    save_network(get_estimator("supervised", model, **{**OPTIONS, "n_samples": 2000, "max_epochs": 2}).fit(), plain)
    refused = run_batch(raw, tmp_path / "out2", Settings(methods=("supervised",), networks={"supervised": str(plain)}))
    assert refused.exit_code == EXIT_FAILED
    assert "trained without slice timing" in refused.outcomes[0].reason


def test_train_command_reads_bids_sidecars(tmp_path):
    timing = [0.0, 0.04, 0.08, 0.12]
    raw = write_bids_dataset(tmp_path / "raw", subjects=1, model="2c", snr=20, seed=6, shape=SHAPE,
                             slice_timing=timing)
    sidecars = sorted((raw / "sub-01" / "perf").glob("*_asl.json"))
    assert len(sidecars) == 2
    out = tmp_path / "net.npz"
    args = ["train", "--model", "2c", "--out", str(out), "--n-samples", "2000", "--max-epochs", "2"]
    for path in sidecars:
        args += ["--protocol", str(path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    card = read_card(out)
    assert card["options"]["slice_offsets"] == timing
    assert card["model"]["protocol"]["pld"] == [0.2, 0.5, 0.8, 1.1, 1.4, 1.0, 1.6, 2.2, 2.8]
    assert card["model"]["protocol"]["crushed"] == [False] * 5 + [True] * 4
    # the same protocol the run prepares from the images: the run accepts the file
    run = runner.invoke(app, ["run", str(raw), str(tmp_path / "out"), "--network", str(out)])
    assert run.exit_code == EXIT_OK, run.output


def test_train_command_errors(tmp_path):
    bad = tmp_path / "bad_asl.json"
    bad.write_text("{}")
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "x.npz"), "--protocol", str(bad)])
    assert result.exit_code == 2 and "aslcontext" in result.output
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "x.npz"), "--hidden-layers", "a,b"])
    assert result.exit_code == 2 and "--hidden-layers" in result.output
    result = runner.invoke(app, ["run", str(tmp_path), "--network", str(bad)])
    assert result.exit_code == 2 and "bad_asl.json" in result.output


def test_unsupervised_trained_on_each_acquisition_or_refused_for_slice_timing(tmp_path):
    raw = write_bids_dataset(tmp_path / "raw", subjects=1, model="1c", snr=20, seed=8, shape=SHAPE)
    out, cache = tmp_path / "out", tmp_path / "cache"
    options = {"unsupervised": {**OPTIONS, "train_on_data": True, "max_epochs": 10}}
    report = run_batch(raw, out, Settings(methods=("unsupervised",), method_options=options, cache_dir=str(cache)))
    assert report.exit_code == EXIT_OK, report.outcomes
    assert not cache.exists()  # trained on the voxels at hand, nothing cached
    recorded = _provenance(out, "sub-01")["estimator_options"]["unsupervised"]
    assert recorded["train_on_data"] is True and "network_sha256" not in recorded
    sliced = write_bids_dataset(tmp_path / "raw2", subjects=1, model="1c", snr=20, seed=8, shape=SHAPE,
                                slice_timing=[0.0, 0.05, 0.1, 0.15])
    refused = run_batch(sliced, tmp_path / "out2", Settings(methods=("lm", "unsupervised"), method_options=options))
    assert refused.exit_code == EXIT_FAILED
    assert "slice timing (2D readouts) is not supported" in refused.outcomes[0].reason
