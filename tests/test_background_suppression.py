"""Background suppression end to end: every map's sidecar, the provenance and the QC page say whether
the acquisition used it (as the input sidecar states), how many pulses, whether the correction was
applied and with which α_BS; and the correction scales CBF by exactly 1/α_BS = 1/0.95^pulses.

Each case runs ``aslbatch run`` (the command line's Python entry) on the Siemens 2D multi-PLD
vendor fixture, its sidecar edited for the case; the expected fields are read from that sidecar."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from aslbatch.cli import app
from tests.vendor_fixtures import make_vendor_dataset

runner = CliRunner()
KIND = "siemens_2d_epi_pcasl_multi_pld"
FIELDS = ("BackgroundSuppression", "BackgroundSuppressionNumberPulses", "BackgroundSuppressionCorrection",
          "BackgroundSuppressionFactor")


def dataset(root: Path, **edits) -> dict:
    """The fixture with its asl.json updated by ``edits`` (None removes a field); returns that sidecar.
    Its images are made with α_BS = 1: without the correction, CBF is the truth."""
    truth = make_vendor_dataset(KIND, root)
    path = truth.root / "sub-01" / "perf" / "sub-01_asl.json"
    sidecar = {k: v for k, v in {**json.loads(path.read_text()), **edits}.items() if v is not None}
    path.write_text(json.dumps(sidecar))
    return sidecar


def run(root: Path, out: Path, correction: bool):
    flag = "--background-suppression-correction" if correction else "--no-background-suppression-correction"
    return runner.invoke(app, ["run", str(root), str(out), "--method", "lm", flag])


def expected_fields(sidecar: dict, correction: bool) -> dict:
    """What the outputs must say, from the input sidecar and the setting alone."""
    used = sidecar.get("BackgroundSuppression")
    pulses = sidecar.get("BackgroundSuppressionNumberPulses") if used else None
    applied = bool(correction and used)
    return {"BackgroundSuppression": used, "BackgroundSuppressionNumberPulses": pulses,
            "BackgroundSuppressionCorrection": applied,
            "BackgroundSuppressionFactor": 0.95**pulses if applied else 1.0}


def check_outputs(out: Path, expected: dict) -> np.ndarray:
    """Every map sidecar, the provenance and the QC page carry ``expected``; returns the lm CBF map."""
    perf = out / "sub-01" / "perf"
    sidecars = sorted(perf.glob("sub-01_desc-lm_*.json"))
    assert {p.name for p in sidecars} == {f"sub-01_desc-lm_{n}.json"
                                          for n in ("cbf", "att", "cbfse", "attse", "status", "priordominated")}
    for path in sidecars:
        found = json.loads(path.read_text())
        assert {k: found[k] for k in FIELDS} == pytest.approx(expected), path.name
        assert found["BackgroundSuppressionCorrectionDescription"]
    provenance = json.loads((perf / "sub-01_provenance.json").read_text())
    recorded = provenance["preprocessing"]["background_suppression"]
    assert {k: recorded[k] for k in FIELDS} == pytest.approx(expected)
    assert provenance["preprocessing"]["constants"]["alpha_bs"] == pytest.approx(expected["BackgroundSuppressionFactor"])
    page = (perf / "sub-01_qc.html").read_text()
    factor = f"{expected['BackgroundSuppressionFactor']:.4g}"
    assert f"<td>α_BS in the model</td><td>{factor}</td>" in page
    applied = "yes" if expected["BackgroundSuppressionCorrection"] else "no"
    assert f"<td>correction applied</td><td>{applied}</td>" in page
    return np.asarray(nib.load(perf / "sub-01_desc-lm_cbf.nii.gz").dataobj, dtype=np.float64)


@pytest.mark.parametrize(
    "edits",
    [
        {},  # BackgroundSuppression true with 2 pulses (the fixture's, after bids-examples asl004)
        {"BackgroundSuppression": False, "BackgroundSuppressionNumberPulses": None,
         "BackgroundSuppressionPulseTime": None},  # no background suppression: no pulses either
        {"BackgroundSuppression": False},  # a stale pulse count beside false is not reported
    ],
    ids=["with-2-pulses", "without", "without-stale-pulses"],
)
def test_sidecars_say_what_was_done_for_both_settings(tmp_path, edits):
    sidecar = dataset(tmp_path / "bids", **edits)
    maps = {}
    for correction in (False, True):
        out = tmp_path / f"out-{correction}"
        result = run(tmp_path / "bids", out, correction)
        assert result.exit_code == 0, result.output
        maps[correction] = check_outputs(out, expected_fields(sidecar, correction))
    inside = np.isfinite(maps[False])
    assert inside.any()
    # α_BS multiplies the labeling efficiency: CBF scales by exactly 1/α_BS (1 when not applied)
    factor = expected_fields(sidecar, True)["BackgroundSuppressionFactor"]
    np.testing.assert_allclose(maps[True][inside], maps[False][inside] / factor, rtol=1e-5)
    grey = make_vendor_dataset(KIND, tmp_path / "again").grey
    np.testing.assert_allclose(np.median(maps[False][grey]), 60.0, rtol=1e-3)  # uncorrected: the truth


def test_unknown_pulse_count_is_said_and_refused_only_for_the_correction(tmp_path):
    sidecar = dataset(tmp_path / "bids", BackgroundSuppressionNumberPulses=None)
    result = run(tmp_path / "bids", tmp_path / "off", False)
    assert result.exit_code == 0, result.output
    check_outputs(tmp_path / "off", expected_fields(sidecar, False))
    description = json.loads((tmp_path / "off" / "sub-01" / "perf" / "sub-01_desc-lm_cbf.json").read_text())[
        "BackgroundSuppressionCorrectionDescription"]
    assert "number of pulses is not stated" in description
    result = run(tmp_path / "bids", tmp_path / "on", True)
    assert result.exit_code == 1
    summary = (tmp_path / "on" / "logs" / "latest_summary.tsv").read_text()
    assert "BackgroundSuppressionNumberPulses is missing" in summary
    assert not (tmp_path / "on" / "sub-01" / "perf" / "sub-01_desc-lm_cbf.nii.gz").exists()
