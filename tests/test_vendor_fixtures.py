"""Datasets modelled on real product sequences (issue 13.7), each quantified end to end by
``aslbatch run`` (the command line's Python entry) and checked against its known truth.

The datasets (:mod:`tests.vendor_fixtures`): GE 3D spiral PCASL (deltam + M0 in one series,
one PLD), Philips 2D EPI PCASL (one PLD, slice timing, M0 named by a relative IntendedFor),
Siemens 3D GRASE PCASL (one PLD, M0 the first volume), Siemens 3D GRASE multi-TI FAIR PASL
with Q2TIPS, Siemens 2D EPI single-TI PICORE PASL, Siemens 2D EPI multi-PLD PCASL with a
reversed-phase-encoding M0 in fmap/, and the same with its only M0 images in fmap/.

What a correct quantification gives: CBF within 3 % of the truth (60 mL/100 g/min in grey
matter, 25 in white) in both tissues; single-delay data (one PLD or TI) a white-paper CBF map
``desc-whitepaper_cbf`` (with its standard error when the pairs were repeated) and no arrival
time map; multi-delay data cbf and att per method.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from aslbatch.cli import app
from tests.vendor_fixtures import CBF, DEFAULT_ALPHA, KINDS, LAMBDA, T1B, T1T, VendorTruth, make_vendor_dataset

runner = CliRunner()
METHODS = ("lm", "lut")
TOLERANCE = 0.03  # relative, on CBF
SINGLE_DELAY_METHOD = "whitepaper"


def run(truth: VendorTruth, out: Path, methods=METHODS):
    args = ["run", str(truth.root), str(out)]
    for method in methods:
        args += ["--method", method]
    return runner.invoke(app, args)


def load(path: Path) -> np.ndarray:
    assert path.is_file(), f"{path.name} is missing"
    return np.asarray(nib.load(path).dataobj, dtype=np.float64)


def check_cbf(cbf: np.ndarray, truth: VendorTruth, name: str, *, every_voxel: bool = True) -> None:
    """The median CBF of each tissue within 3 % of the truth (and, noise-free, 95 % of its voxels)."""
    for region, value in ((truth.grey, CBF["gm"]), (truth.white, CBF["wm"])):
        values = cbf[region]
        assert np.isfinite(values).all(), f"{name}: {np.isnan(values).sum()} tissue voxel(s) without CBF"
        error = np.median(values) / value - 1
        assert abs(error) <= TOLERANCE, f"{name}: median CBF {np.median(values):.4g}, truth {value:g} ({error:+.1%})"
        if every_voxel:
            assert np.mean(np.abs(values / value - 1) <= TOLERANCE) >= 0.95, name


@pytest.mark.parametrize("kind", KINDS)
def test_generated_sidecars_pass_validation(kind, tmp_path):
    truth = make_vendor_dataset(kind, tmp_path / "bids")
    result = runner.invoke(app, ["validate", str(truth.root)])
    assert result.exit_code == 0, result.output
    assert "0 problem(s)" in result.output


@pytest.mark.parametrize("kind", KINDS)
def test_vendor_dataset_end_to_end(kind, tmp_path):
    truth = make_vendor_dataset(kind, tmp_path / "bids")
    out = tmp_path / "out"
    result = run(truth, out)
    assert result.exit_code == 0, result.output
    perf = out / "sub-01" / "perf"
    names = {path.name for path in perf.glob("*.nii.gz")}
    stem = truth.source_name
    if truth.single_delay:
        assert f"{stem}_desc-{SINGLE_DELAY_METHOD}_cbf.nii.gz" in names, sorted(names)
        assert not [name for name in names if "_att" in name], "single-delay data determine no arrival time"
        se = f"{stem}_desc-{SINGLE_DELAY_METHOD}_cbfse.nii.gz"
        assert (se in names) == truth.repeated, f"{se}: expected {'present' if truth.repeated else 'absent'}"
        check_cbf(load(perf / f"{stem}_desc-{SINGLE_DELAY_METHOD}_cbf.nii.gz"), truth, SINGLE_DELAY_METHOD)
    else:
        for method in METHODS:
            check_cbf(load(perf / f"{stem}_desc-{method}_cbf.nii.gz"), truth, method)
            att = load(perf / f"{stem}_desc-{method}_att.nii.gz")
            for region in (truth.grey, truth.white):
                assert np.median(att[region]) == pytest.approx(np.median(truth.att[region]), abs=0.05), method
    provenance = json.loads((perf / f"{stem}_provenance.json").read_text())
    inputs = {item["path"] for item in provenance["inputs"]}
    m0_files = {path for path in inputs if "_m0scan." in path and path.endswith(".nii.gz")}
    assert m0_files == ({truth.m0_file} if truth.m0_file else set())  # the right M0, and only it


@pytest.mark.parametrize("kind", KINDS)
def test_vendor_dataset_at_high_snr(kind, tmp_path):
    # SNR 50 (the peak grey-matter ΔM over the noise σ of one difference): CBF still within 3 %
    truth = make_vendor_dataset(kind, tmp_path / "bids", snr=50.0, seed=3)
    result = run(truth, tmp_path / "out", methods=("lm",))
    assert result.exit_code == 0, result.output
    method = SINGLE_DELAY_METHOD if truth.single_delay else "lm"
    cbf = load(tmp_path / "out" / "sub-01" / "perf" / f"{truth.source_name}_desc-{method}_cbf.nii.gz")
    check_cbf(cbf, truth, method, every_voxel=False)


# --- the fixtures themselves, against the consensus formula (no aslbatch code) ------------------


def _read_series(root: Path) -> tuple[dict, list[str], np.ndarray]:
    perf = root / "sub-01" / "perf"
    sidecar = json.loads((perf / "sub-01_asl.json").read_text())
    context = (perf / "sub-01_aslcontext.tsv").read_text().split()[1:]
    return sidecar, context, np.asarray(nib.load(perf / "sub-01_asl.nii.gz").dataobj, dtype=np.float64)


def _m0t(root: Path, truth: VendorTruth, sidecar: dict, context: list[str], data: np.ndarray) -> np.ndarray:
    """Tissue M0 undoing the saturation recovery of an M0 read at TR < 5 s (1 − e^(−TR/T1t))."""
    if truth.m0_file:
        image = np.asarray(nib.load(root / truth.m0_file).dataobj, dtype=np.float64)
        tr = json.loads((root / truth.m0_file.replace(".nii.gz", ".json")).read_text())["RepetitionTimePreparation"]
    else:
        index = context.index("m0scan")
        image = data[..., index]
        tr = sidecar["RepetitionTimePreparation"]
        tr = tr[index] if isinstance(tr, list) else tr
    return image / (-math.expm1(-tr / T1T) if tr < 5 else 1.0)


@pytest.mark.parametrize(
    "kind", ["ge_3d_spiral_pcasl", "philips_2d_epi_pcasl", "siemens_3d_grase_pcasl", "siemens_2d_epi_pasl_single_ti"])
def test_single_delay_fixtures_follow_the_white_paper_formula(kind, tmp_path):
    # Alsop 2015: PCASL CBF = 6000 λ ΔM e^(PLD/T1b) / (2 α T1b M0 (1 − e^(−τ/T1b)));
    # PASL CBF = 6000 λ ΔM e^(TI/T1b) / (2 α TI1 M0); PLD and TI per slice in 2D (SliceTiming)
    truth = make_vendor_dataset(kind, tmp_path)
    assert truth.single_delay
    sidecar, context, data = _read_series(tmp_path)
    control = [i for i, kind_v in enumerate(context) if kind_v == "control"]
    label = [i for i, kind_v in enumerate(context) if kind_v == "label"]
    if control:
        deltam = data[..., control].mean(axis=-1) - data[..., label].mean(axis=-1)
    else:
        deltam = data[..., context.index("deltam")]
    m0t = _m0t(tmp_path, truth, sidecar, context, data)
    delays = sidecar["PostLabelingDelay"]
    delay = max(delays) if isinstance(delays, list) else delays
    slices = (np.array(sidecar["SliceTiming"]) if sidecar["MRAcquisitionType"] == "2D" else np.zeros(data.shape[2]))
    effective = delay + slices - slices.min()
    labeling = sidecar["ArterialSpinLabelingType"]
    alpha = sidecar.get("LabelingEfficiency", DEFAULT_ALPHA[labeling])
    if labeling == "PASL":
        bolus = sidecar["BolusCutOffDelayTime"][0]
        scale = 6000 * LAMBDA * np.exp(effective / T1B) / (2 * alpha * bolus)
    else:
        tau = sidecar["LabelingDuration"]
        tau = max(tau) if isinstance(tau, list) else tau
        scale = 6000 * LAMBDA * np.exp(effective / T1B) / (2 * alpha * T1B * -math.expm1(-tau / T1B))
    inside = truth.tissue > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        cbf = deltam / m0t * scale[None, None, :]
    np.testing.assert_allclose(cbf[inside], truth.cbf[inside], rtol=1e-4)  # images are float32


@pytest.mark.parametrize("kind", KINDS)
def test_fixture_sidecars_follow_the_bids_dependency_table(kind, tmp_path):
    # the ASL field dependencies of the BIDS specification (MRI, "ASL": the table after the m0scan fields)
    truth = make_vendor_dataset(kind, tmp_path)
    sidecar, context, data = _read_series(tmp_path)
    assert len(context) == data.shape[3]
    if sidecar["MRAcquisitionType"] == "2D":
        assert len(sidecar["SliceTiming"]) == data.shape[2]
    else:
        assert "SliceTiming" not in sidecar
    if sidecar["ArterialSpinLabelingType"] == "PASL":
        assert "LabelingDuration" not in sidecar and sidecar["BolusCutOffFlag"] is True
        assert sidecar["BolusCutOffTechnique"] == "Q2TIPS" and len(sidecar["BolusCutOffDelayTime"]) == 2
    else:
        assert "LabelingDuration" in sidecar and "BolusCutOffFlag" not in sidecar
    for field in ("PostLabelingDelay", "LabelingDuration", "RepetitionTimePreparation"):
        if isinstance(sidecar.get(field), list):
            assert len(sidecar[field]) == len(context), field
    if sidecar["M0Type"] == "Included":
        assert "m0scan" in context and truth.m0_file is None
    else:
        assert sidecar["M0Type"] == "Separate" and "m0scan" not in context
        m0 = json.loads((tmp_path / truth.m0_file.replace(".nii.gz", ".json")).read_text())
        assert "IntendedFor" in m0 and "RepetitionTimePreparation" in m0 and "EchoTime" in m0
        assert truth.m0_file.split("/")[1] in ("perf", "fmap")
        if truth.m0_file.split("/")[1] == "fmap":  # BIDS: an fmap/ m0scan is a pepolar image, with dir
            assert "_dir-" in truth.m0_file
    if not sidecar["BackgroundSuppression"]:
        assert "BackgroundSuppressionNumberPulses" not in sidecar
