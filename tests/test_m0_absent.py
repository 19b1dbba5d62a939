"""M0Type Absent (issue 19, point 4): without background suppression the mean control image,
saturation-recovery corrected, is the M0 (expected M0 computed here from the written volumes and
the closed form M0t = mean(control) / (1 − exp(−TR / T1t))); with background suppression there is
no M0: a single-delay series gives ΔM and CBF relative to its brain median (the relative model,
checked against both computed by hand from the raw images and the slice timing), never absolute
CBF (also when background suppression is unstated: suppressed controls are no M0), and a
multi-delay one is refused."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from typer.testing import CliRunner

from aslbatch import bids
from aslbatch.bids.validation import series_metadata
from aslbatch.cli import app
from aslbatch.identify import group_acquisitions
from aslbatch.preprocess import m0_from_series, prepare_acquisition
from tests.vendor_fixtures import T1B, make_vendor_dataset

SIDECAR = {"ArterialSpinLabelingType": "PCASL", "PostLabelingDelay": 1.8, "LabelingDuration": 1.8,
           "MagneticFieldStrength": 3, "MRAcquisitionType": "3D", "RepetitionTimePreparation": 4.0,
           "M0Type": "Absent"}


def _dataset(root, suppression):
    perf = root / "sub-01" / "perf"
    perf.mkdir(parents=True)
    rng = np.random.default_rng(3)
    control = 1000 + rng.normal(0, 5, (4, 4, 3, 3))
    label = control - 10
    data = np.stack([control[..., 0], label[..., 0], control[..., 1], label[..., 1], control[..., 2], label[..., 2]], 3)
    nib.save(nib.Nifti1Image(data, np.eye(4)), perf / "sub-01_asl.nii.gz")
    meta = dict(SIDECAR)
    if suppression is not None:
        meta["BackgroundSuppression"] = suppression
    (perf / "sub-01_asl.json").write_text(json.dumps(meta))
    (perf / "sub-01_aslcontext.tsv").write_text("volume_type\n" + "control\nlabel\n" * 3)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    return control.mean(axis=3)


def test_absent_without_suppression_uses_the_mean_control(tmp_path):
    mean_control = _dataset(tmp_path, False)
    assert bids.validate_dataset(tmp_path) == []
    series = bids.find_sessions(tmp_path)[0].series[0]
    metadata = series_metadata(series)
    m0, notes, _ = m0_from_series(series, metadata)
    t1t = metadata.constants.t1t
    np.testing.assert_allclose(m0, mean_control / (1 - np.exp(-4.0 / t1t)), rtol=1e-6)
    assert "mean of the 3 control" in notes[0]


@pytest.mark.parametrize("suppression", [True, None])
def test_absent_with_stated_or_unstated_suppression_gives_relative_maps_only(tmp_path, suppression):
    """Unstated suppression is the safe side: controls that may be suppressed are no M0."""
    _dataset(tmp_path, suppression)
    problems, verdicts = bids.inspect_dataset(tmp_path)
    assert problems == [] and verdicts[0].decision.model == "relative"


def _without_m0(root, snr=20.0):
    """The Philips 2D EPI PCASL fixture (one PLD, 4 pairs, slice timing, background suppressed)
    with its M0 scan removed and M0Type Absent: what a scanner sends when the M0 was not exported."""
    truth = make_vendor_dataset("philips_2d_epi_pcasl", root, snr=snr, seed=5)
    for path in (root / "sub-01").glob("perf/*m0scan*"):
        path.unlink()
    sidecar = root / "sub-01" / "perf" / "sub-01_asl.json"
    meta = json.loads(sidecar.read_text())
    meta["M0Type"] = "Absent"
    sidecar.write_text(json.dumps(meta))
    return truth, meta


def test_suppressed_single_delay_without_m0_gives_relative_cbf_and_deltam_only(tmp_path):
    truth, meta = _without_m0(tmp_path / "raw")
    problems, verdicts = bids.inspect_dataset(tmp_path / "raw")
    assert problems == []
    decision = verdicts[0].decision
    assert decision.model == "relative" and decision.parameters == ("rcbf", "deltam")
    assert "never absolute CBF" in decision.reason

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(tmp_path / "raw"), str(out), "--method", "lm"])
    assert result.exit_code == 0, result.output
    perf = out / "sub-01" / "perf"
    assert not list(perf.glob("*_cbf.nii.gz")) and not list(perf.glob("*_att.nii.gz"))
    load = lambda name: np.asarray(nib.load(perf / f"sub-01_{name}.nii.gz").dataobj, dtype=np.float64)  # noqa: E731
    mask = load("desc-brain_mask") > 0

    # by hand from the raw images: ΔM = control − label of each pair (label first), its mean and the
    # spread of the pairs; rcbf = ΔM e^(δ/T1b) / its median (the white-paper gain's only per-voxel
    # factor is the slice's delay δ), the se through the same formula
    raw = np.asarray(nib.load(tmp_path / "raw" / "sub-01" / "perf" / "sub-01_asl.nii.gz").dataobj, dtype=np.float64)
    pairs = raw[..., 1::2] - raw[..., 0::2]
    deltam = pairs.mean(axis=3)
    spread = pairs.std(axis=3, ddof=1) / np.sqrt(pairs.shape[3])
    delay = np.asarray(meta["SliceTiming"]) - min(meta["SliceTiming"])
    q = deltam * np.exp(delay / T1B)[None, None, :]
    reference = np.median(q[mask])
    np.testing.assert_allclose(load("desc-whitepaper_deltam")[mask], deltam[mask], rtol=1e-5)
    np.testing.assert_allclose(load("desc-whitepaper_rcbf")[mask], (q / reference)[mask], rtol=1e-5)
    q_se = spread * np.exp(delay / T1B)[None, None, :]
    np.testing.assert_allclose(load("desc-whitepaper_rcbfse")[mask], (q_se / reference)[mask], rtol=1e-5)
    np.testing.assert_allclose(load("desc-whitepaper_deltamse")[mask], spread[mask], rtol=1e-5)
    sidecar = json.loads((perf / "sub-01_desc-whitepaper_rcbf.json").read_text())
    assert sidecar["Units"] == "ratio to the brain median" and "never absolute CBF" in sidecar["Description"]


def test_suppressed_multi_delay_without_m0_is_refused_with_the_reason(tmp_path):
    make_vendor_dataset("siemens_2d_epi_pcasl_multi_pld", tmp_path, seed=1)
    sidecar = tmp_path / "sub-01" / "perf" / "sub-01_asl.json"
    meta = json.loads(sidecar.read_text())
    meta["M0Type"] = "Absent"
    sidecar.write_text(json.dumps(meta))
    problems, verdicts = bids.inspect_dataset(tmp_path)
    refusal = str(verdicts[0].refusal)
    assert verdicts[0].decision is None and "no M0" in refusal and "readout times" in refusal, refusal


@pytest.mark.parametrize("model", ["single", "1c"])
def test_an_absolute_model_asked_for_data_without_m0_is_refused(tmp_path, model):
    _without_m0(tmp_path)
    problems, verdicts = bids.inspect_dataset(tmp_path, model=model)
    assert verdicts[0].decision is None and "relative model" in str(verdicts[0].refusal)


def test_preparing_data_without_m0_for_an_absolute_model_is_refused(tmp_path):
    """The safety net below the decision: a caller that skips it cannot turn ΔM into CBF."""
    _without_m0(tmp_path)
    acquisition = group_acquisitions(bids.find_sessions(tmp_path)[0])[0]  # provisional model 1c
    with pytest.raises(bids.BidsError, match="no M0.*only the relative model"):
        prepare_acquisition(acquisition)


@pytest.mark.parametrize("command", [["simulate", "--out", "x.npz"], ["evaluate", "--out", "ev"],
                                     ["simulate-dataset", "ds"], ["bench", "--out", "be"]])
def test_commands_that_draw_from_a_prior_refuse_the_relative_model(tmp_path, command):
    """rcbf is relative to each dataset's own median: there is no prior to simulate, evaluate or
    benchmark it with; the command says so and writes nothing."""
    args = [str(tmp_path / a) if a in ("x.npz", "ev", "ds", "be") else a for a in command]
    result = CliRunner().invoke(app, [*args, "--model", "relative"])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert "relative" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []
