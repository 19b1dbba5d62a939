"""M0Type Absent (issue 19, point 4): without background suppression the mean control image,
saturation-recovery corrected, is the M0; with background suppression (or unstated) the series is
refused. The expected M0 is computed here from the written volumes and the closed form
M0t = mean(control) / (1 − exp(−TR / T1t))."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from aslbatch import bids
from aslbatch.bids.validation import series_metadata
from aslbatch.preprocess import m0_from_series

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
def test_absent_with_or_without_stated_suppression_is_refused(tmp_path, suppression):
    _dataset(tmp_path, suppression)
    problems = bids.validate_dataset(tmp_path)
    assert any("M0Type is Absent" in str(p) for p in problems)
