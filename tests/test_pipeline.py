"""End to end: phantom BIDS datasets through `aslbatch run`, checked against their ground truth."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from aslbatch import bids
from aslbatch.estimators import base as estimators_base
from aslbatch.cli import EXIT_FAILED, EXIT_NOTHING, EXIT_USAGE, app
from aslbatch.models import get_model
from aslbatch.phantom import default_groundtruth_dir, write_bids_dataset
from aslbatch.pipeline import Settings, estimate_maps, process_session
from aslbatch.preprocess import PreparedData
from aslbatch.protocol import Constants, Protocol, default_protocol

runner = CliRunner()
SHAPE = (14, 16, 6)


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float64)


def _truth(raw: Path, subject: str, name: str) -> np.ndarray:
    return _load(default_groundtruth_dir(raw) / f"sub-{subject}" / f"sub-{subject}_{name}.nii.gz")


@pytest.fixture(scope="module")
def noise_free_1c(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e1c")
    raw = write_bids_dataset(root / "raw", subjects=2, model="1c", snr=np.inf, seed=3, shape=SHAPE, dtype="float64",
                             m0_type="Included")
    result = runner.invoke(app, ["run", str(raw), str(root / "out"), "--method", "lm", "--method", "lut"])
    return raw, root / "out", result


def test_run_recovers_noise_free_1c_maps_exactly_where_identifiable(noise_free_1c):
    raw, out, result = noise_free_1c
    assert result.exit_code == 0, result.output
    for subject in ("01", "02"):
        cbf = _load(out / f"sub-{subject}" / "perf" / f"sub-{subject}_desc-lm_cbf.nii.gz")
        att = _load(out / f"sub-{subject}" / "perf" / f"sub-{subject}_desc-lm_att.nii.gz")
        true_cbf, true_att = _truth(raw, subject, "cbf"), _truth(raw, subject, "att")
        mask = _truth(raw, subject, "mask") > 0
        # identifiable: att above the shortest PLD (1.0 s) — below it the delivered signal is flat in att
        ok = mask & (true_att > 1.05)
        assert ok.sum() > 100
        np.testing.assert_allclose(cbf[ok], true_cbf[ok], rtol=1e-4)
        np.testing.assert_allclose(att[ok], true_att[ok], rtol=1e-4)
        # cbf is exact even where att is not identifiable
        np.testing.assert_allclose(cbf[mask], true_cbf[mask], rtol=1e-4)
        assert np.isnan(cbf[~mask]).all()
        # the LUT lands within one grid step (0.05 s) of the truth
        lut_att = _load(out / f"sub-{subject}" / "perf" / f"sub-{subject}_desc-lut_att.nii.gz")
        assert np.abs(lut_att[ok] - true_att[ok]).max() <= 0.05 + 1e-6


def test_outputs_are_bids_derivatives_with_sidecars(noise_free_1c):
    raw, out, _ = noise_free_1c
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "aslbatch"
    perf = out / "sub-01" / "perf"
    sidecar = json.loads((perf / "sub-01_desc-lm_cbf.json").read_text())
    assert sidecar["Units"] == "mL/100 g/min"
    assert "cerebral blood flow" in sidecar["Description"].lower()
    att_sidecar = json.loads((perf / "sub-01_desc-lm_att.json").read_text())
    assert att_sidecar["Units"] == "s" and "arterial transit time" in att_sidecar["Description"].lower()
    image = nib.load(perf / "sub-01_desc-lm_cbf.nii.gz")
    source = nib.load(next((raw / "sub-01" / "perf").glob("*_asl.nii.gz")))
    assert image.get_data_dtype() == np.float32
    np.testing.assert_allclose(image.affine, source.affine)
    assert image.shape == source.shape[:3]
    assert (perf / "sub-01_provenance.json").exists()


def test_run_2c_pair_recovers_cbf_and_att(tmp_path):
    raw = write_bids_dataset(tmp_path / "raw", subjects=1, model="2c", snr=np.inf, seed=5, shape=SHAPE, dtype="float64")
    result = runner.invoke(app, ["run", "--method", "lm", str(raw), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    perf = tmp_path / "out" / "sub-01" / "perf"
    names = {p.name for p in perf.glob("*.nii.gz")}
    assert {"sub-01_desc-lm_cbf.nii.gz", "sub-01_desc-lm_abv.nii.gz", "sub-01_desc-lm_abat.nii.gz",
            "sub-01_desc-lm_att.nii.gz"} <= names
    mask = _truth(raw, "01", "mask") > 0
    cbf = _load(perf / "sub-01_desc-lm_cbf.nii.gz")
    # hard arterial edges: cbf is identified wherever a tissue kink separates abat and att (most voxels)
    rel = np.abs(cbf[mask] / _truth(raw, "01", "cbf")[mask] - 1)
    assert np.median(rel) < 1e-4 and (rel < 1e-3).mean() > 0.9


def test_noisy_maps_match_truth_within_what_the_snr_allows(tmp_path):
    """At SNR 20 the median CBF error in grey matter is a few percent (bounded by noise)."""
    raw = write_bids_dataset(tmp_path / "raw", subjects=1, model="1c", snr=20, seed=8, shape=SHAPE)
    session = bids.find_sessions(raw)[0]
    [result] = process_session(session, tmp_path / "out", Settings(methods=("lm",)))
    assert result.status == "done", result.error
    cbf = _load(tmp_path / "out" / "sub-01" / "perf" / "sub-01_desc-lm_cbf.nii.gz")
    grey = _load(default_groundtruth_dir(raw) / "sub-01" / "sub-01_dseg.nii.gz") == 1
    true = _truth(raw, "01", "cbf")
    rel = np.abs(cbf[grey] - true[grey]) / true[grey]
    # σ/S_ref = 1/20 per volume over 5 volumes: a few percent typical CBF error
    assert np.median(rel) < 0.08


def test_per_slice_timing_is_used_exactly():
    """2D readout: voxels of slice k are read SliceTiming[k] after the PLD; fitting each slice
    with its own shifted protocol recovers the truth, ignoring the offsets does not."""
    model = get_model("1c", default_protocol("1c"))
    rng = np.random.default_rng(0)
    n = 300
    truth = np.column_stack([rng.uniform(20, 100, n), rng.uniform(1.2, 2.5, n)])
    offsets = rng.choice([0.0, 0.04, 0.08, 0.12], n)
    signals = np.vstack([get_model("1c", Protocol(1.8, model.protocol.pld + o)).signal(p)
                         for p, o in zip(truth, offsets)])
    mask = np.zeros((n, 1, 1), bool)
    mask[:] = True
    prepared = PreparedData(signals=signals, protocol=model.protocol, mask=mask, affine=np.eye(4), shape=(n, 1, 1),
                            slice_offsets=offsets, m0=np.ones((n, 1, 1)), constants=Constants(), notes=(),
                            source_files=(), model="1c", source_name="sub-x")
    est = estimate_maps(model, prepared, "lm", {})
    np.testing.assert_allclose(est.params, truth, rtol=1e-6)
    ignored = estimate_maps(model, PreparedData(**{**prepared.__dict__, "slice_offsets": np.zeros(n)}), "lm", {})
    assert np.abs(ignored.params[:, 1] - truth[:, 1]).max() > 0.03


def test_a_broken_subject_does_not_stop_the_others(tmp_path):
    raw = write_bids_dataset(tmp_path / "raw", subjects=2, model="1c", snr=10, seed=2, shape=SHAPE)
    (raw / "sub-02" / "perf" / "sub-02_asl.json").write_text("{ not json")
    result = runner.invoke(app, ["run", "--method", "lm", str(raw), str(tmp_path / "out")])
    assert result.exit_code == EXIT_FAILED
    assert "sub-02: failed" in result.output and "cannot read JSON" in result.output
    assert (tmp_path / "out" / "sub-01" / "perf" / "sub-01_provenance.json").exists()
    assert not (tmp_path / "out" / "sub-02" / "perf" / "sub-02_provenance.json").exists()


def test_validate_reports_every_problem_and_run_needs_something(tmp_path):
    raw = write_bids_dataset(tmp_path / "raw", subjects=2, model="1c", snr=10, seed=2, shape=SHAPE)
    ok = runner.invoke(app, ["validate", str(raw)])
    assert ok.exit_code == 0, ok.output
    meta = json.loads((raw / "sub-01" / "perf" / "sub-01_asl.json").read_text())
    meta["PostLabelingDelay"] = [v * 1000 for v in meta["PostLabelingDelay"]]
    (raw / "sub-01" / "perf" / "sub-01_asl.json").write_text(json.dumps(meta))
    (raw / "sub-02" / "perf" / "sub-02_aslcontext.tsv").write_text("volume_type\ncontrol\n")
    bad = runner.invoke(app, ["validate", str(raw)])
    assert bad.exit_code == EXIT_FAILED
    assert "sub-01_asl.json" in bad.output and "PostLabelingDelay" in bad.output
    assert "sub-02" in bad.output and "aslcontext" in bad.output
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.9.0"}))
    assert runner.invoke(app, ["run", "--method", "lm", str(empty)]).exit_code == EXIT_NOTHING
    assert runner.invoke(app, ["run", "--method", "lm", str(tmp_path / "missing")]).exit_code == EXIT_USAGE


def test_config_file_and_bad_settings(tmp_path):
    raw = write_bids_dataset(tmp_path / "raw", subjects=1, model="1c", snr=10, seed=2, shape=SHAPE)
    config = tmp_path / "settings.toml"
    config.write_text('methods = ["lut"]\n[constants]\nt1t = 1.4\n')
    result = runner.invoke(app, ["run", str(raw), str(tmp_path / "out"), "--config", str(config)])
    assert result.exit_code == 0, result.output
    provenance = json.loads((tmp_path / "out" / "sub-01" / "perf" / "sub-01_provenance.json").read_text())
    assert json.dumps(provenance).count('"t1t": 1.4') >= 1
    assert (tmp_path / "out" / "sub-01" / "perf" / "sub-01_desc-lut_cbf.nii.gz").exists()
    config.write_text('methods = ["lut"]\ncolour = "blue"\n')
    bad = runner.invoke(app, ["run", str(raw), "--config", str(config)])
    assert bad.exit_code == EXIT_USAGE and "unknown setting" in bad.output
    bad = runner.invoke(app, ["run", "--method", "lm", str(raw), "--labeling-efficiency", "1.5"])
    assert bad.exit_code == EXIT_USAGE and "alpha" in bad.output


def test_demo_runs_and_scores_against_ground_truth(tmp_path):
    result = runner.invoke(app, ["demo", str(tmp_path / "demo"), "--snr", "20"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if line.startswith("subject"))
    body = [line for line in lines if line.split(" ", 1)[0] in ("sub-01", "sub-02", "sub-03")]  # not the log lines
    # aligned columns, "supervised" (10 characters) included: each cell starts under its header
    for word in ("model", "method", "map", "unit"):  # left-aligned
        start = header.index(word)
        assert all(line[start - 1] == " " and line[start] != " " for line in body), word
    for word in ("median |error|", "median error"):  # right-aligned numbers
        end = header.index(word) + len(word)
        assert all(line[end - 1].isdigit() and line[end] == " " for line in body), word
    rows = [line.split() for line in body]
    table = {(r[0], r[2], r[3]): float(r[4]) for r in rows if r[4] != "(failed)"}
    assert {k[0] for k in table} == {"sub-01", "sub-02", "sub-03"}
    assert ("sub-03", "lm", "abv") in table and ("sub-01", "lut", "att") in table
    # at SNR 20 the median CBF error in the brain is a few mL/100 g/min
    assert all(table[(s, "lm", "cbf")] < 8.0 for s in ("sub-01", "sub-02", "sub-03"))
    again = runner.invoke(app, ["demo", str(tmp_path / "demo"), "--snr", "20"])
    assert again.exit_code == 0, again.output
    assert "0 done, 3 up to date" in again.output  # identical dataset: nothing redone


def test_2d_dataset_with_slice_timing_and_sessions_end_to_end(tmp_path):
    """A 2D readout (SliceTiming) in two sessions: each slice fitted with its own timing
    recovers the noise-free truth; a fit that ignored SliceTiming would miss att by ~offset."""
    timing = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25]
    raw = write_bids_dataset(tmp_path / "raw", subjects=1, model="1c", snr=np.inf, seed=4, shape=SHAPE,
                             dtype="float64", sessions=["a", "b"], slice_timing=timing)
    assert runner.invoke(app, ["validate", str(raw)]).exit_code == 0
    result = runner.invoke(app, ["run", "--method", "lm", str(raw), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    true_att, true_cbf = _truth(raw, "01", "att"), _truth(raw, "01", "cbf")
    mask = _truth(raw, "01", "mask") > 0
    slice_offset = np.broadcast_to(np.asarray(timing), SHAPE)
    ok = mask & (true_att > 1.05 + slice_offset)  # identifiable: past the slice's shortest effective PLD
    for session in ("a", "b"):
        perf = tmp_path / "out" / "sub-01" / f"ses-{session}" / "perf"
        att = _load(perf / f"sub-01_ses-{session}_desc-lm_att.nii.gz")
        cbf = _load(perf / f"sub-01_ses-{session}_desc-lm_cbf.nii.gz")
        np.testing.assert_allclose(att[ok], true_att[ok], rtol=1e-4)
        np.testing.assert_allclose(cbf[ok], true_cbf[ok], rtol=1e-4)


def test_user_mask_template_replaces_the_computed_mask(tmp_path):
    raw = write_bids_dataset(tmp_path / "raw", subjects=2, model="1c", snr=10, seed=6, shape=SHAPE)
    # a user mask per subject: the phantom's true mask minus its first slice
    for subject in ("01", "02"):
        truth = nib.load(default_groundtruth_dir(raw) / f"sub-{subject}" / f"sub-{subject}_mask.nii.gz")
        data = np.asarray(truth.dataobj).copy()
        data[..., 0] = 0
        nib.save(nib.Nifti1Image(data, truth.affine), tmp_path / f"mask-{subject}.nii.gz")
    template = str(tmp_path / "mask-{subject}.nii.gz")
    result = runner.invoke(app, ["run", "--method", "lm", str(raw), str(tmp_path / "out"), "--mask", template])
    assert result.exit_code == 0, result.output
    for subject in ("01", "02"):
        written = _load(tmp_path / "out" / f"sub-{subject}" / "perf" / f"sub-{subject}_desc-brain_mask.nii.gz") > 0
        given = _load(tmp_path / f"mask-{subject}.nii.gz") > 0
        np.testing.assert_array_equal(written, given)
        cbf = _load(tmp_path / "out" / f"sub-{subject}" / "perf" / f"sub-{subject}_desc-lm_cbf.nii.gz")
        assert np.isnan(cbf[..., 0]).all() and np.isfinite(cbf[given]).all()
    bad = runner.invoke(app, ["run", "--method", "lm", str(raw), str(tmp_path / "out2"), "--mask", str(tmp_path / "missing.nii.gz")])
    # a mask that is missing for the sessions is a usage error found before any session runs (issue 14)
    assert bad.exit_code == EXIT_USAGE and "missing.nii.gz" in bad.output and not (tmp_path / "out2").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"methods": ()}, "at least one method"),
        ({"methods": ("lm", "lm")}, "methods repeat"),
        ({"methods": ("nope",)}, "unknown method"),
        ({"model": "3c"}, "model must be"),
        ({"constants": {"t1_blood": 1.6}}, "unknown constant"),
        ({"constants": {"alpha": 2.0}}, "alpha must be in"),
        ({"method_options": {"lut": {}}}, "not requested"),
    ],
)
def test_settings_validation_names_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Settings(**kwargs)


def test_chunked_fitting_behind_the_progress_bar_gives_the_same_maps(monkeypatch):
    model = get_model("1c", default_protocol("1c"))
    rng = np.random.default_rng(3)
    n = 1000
    truth = np.column_stack([rng.uniform(20, 100, n), rng.uniform(1.2, 2.5, n)])
    signals = model.signal(truth) + rng.normal(0, 1e-3, (n, 5))
    mask = np.ones((n, 1, 1), bool)
    prepared = PreparedData(signals=signals, protocol=model.protocol, mask=mask, affine=np.eye(4), shape=(n, 1, 1),
                            slice_offsets=np.zeros(n), m0=np.ones((n, 1, 1)), constants=Constants(), notes=(),
                            source_files=(), model="1c", source_name="sub-x")
    whole = estimate_maps(model, prepared, "lm", {})
    monkeypatch.setattr(estimators_base, "PROGRESS_CHUNK", 128)
    chunked = estimate_maps(model, prepared, "lm", {}, progress=True)
    np.testing.assert_array_equal(chunked.params, whole.params)
    np.testing.assert_array_equal(chunked.status, whole.status)
