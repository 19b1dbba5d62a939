"""PASL end to end: a multi-TI FAIR Q2TIPS phantom dataset through `aslbatch run --model pasl`,
checked against its ground truth; the bolus duration from the sidecar or from the user
(--bolus-duration, the config key), the refusal without either, and the run settings."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from aslbatch.cli import EXIT_FAILED, EXIT_USAGE, app
from aslbatch.phantom import default_groundtruth_dir, write_bids_dataset
from aslbatch.pipeline import Settings

runner = CliRunner()
SHAPE = (14, 16, 6)
SIDECAR = Path("sub-01") / "perf" / "sub-01_asl.json"


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float64)


def _truth(raw: Path, name: str) -> np.ndarray:
    return _load(default_groundtruth_dir(raw) / "sub-01" / f"sub-01_{name}.nii.gz")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """A noise-free PASL phantom (default protocol: τ_b 0.7 s, TI 0.3-3.0 s), float64 images."""
    return write_bids_dataset(tmp_path_factory.mktemp("pasl") / "raw", subjects=1, model="pasl", snr=np.inf, seed=4,
                              shape=SHAPE, dtype="float64")


def _without_cut_off(raw: Path, tmp_path: Path) -> Path:
    """A copy of ``raw`` whose sidecar says BolusCutOffFlag false (no BolusCutOffDelayTime)."""
    import shutil

    copy = tmp_path / "raw"
    shutil.copytree(raw, copy)
    meta = json.loads((copy / SIDECAR).read_text())
    meta["BolusCutOffFlag"] = False
    del meta["BolusCutOffDelayTime"], meta["BolusCutOffTechnique"]
    (copy / SIDECAR).write_text(json.dumps(meta))
    return copy


def test_phantom_sidecar_is_a_siemens_like_multi_ti_fair_q2tips_series(raw):
    meta = json.loads((raw / SIDECAR).read_text())
    assert meta["ArterialSpinLabelingType"] == "PASL" and "LabelingDuration" not in meta
    assert meta["BolusCutOffFlag"] is True and meta["BolusCutOffDelayTime"] == [0.7, 1.6]
    assert sorted(set(meta["PostLabelingDelay"])) == pytest.approx([0.3 * k for k in range(1, 11)])
    assert meta["LabelingEfficiency"] == 0.98


def test_run_recovers_noise_free_pasl_maps(raw, tmp_path):
    result = runner.invoke(app, ["run", str(raw), str(tmp_path / "out"), "--method", "lm", "--method", "lut"])
    assert result.exit_code == 0, result.output  # --model auto: the protocol (ten TIs) calls for pasl
    perf = tmp_path / "out" / "sub-01" / "perf"
    mask = _truth(raw, "mask") > 0
    true_cbf, true_att = _truth(raw, "cbf"), _truth(raw, "att")
    # both parameters are determined where at least two TIs see the arriving or delivered bolus
    ok = mask & (true_att < 2.65)
    assert ok.sum() > 100
    cbf, att = _load(perf / "sub-01_desc-lm_cbf.nii.gz"), _load(perf / "sub-01_desc-lm_att.nii.gz")
    np.testing.assert_allclose(cbf[ok], true_cbf[ok], rtol=1e-4)
    np.testing.assert_allclose(att[ok], true_att[ok], rtol=1e-4)
    lut_att = _load(perf / "sub-01_desc-lut_att.nii.gz")
    assert np.abs(lut_att[ok] - true_att[ok]).max() <= 0.05 + 1e-6
    provenance = json.loads((perf / "sub-01_provenance.json").read_text())
    text = json.dumps(provenance)
    assert '"alpha": 0.98' in text and '"bolus_duration": null' in text
    assert provenance["decision"]["model"] == "pasl" and provenance["decision"]["parameters"] == ["cbf", "att"]
    page = (perf / "sub-01_qc.html").read_text(encoding="utf-8")  # PASL's protocol is τ_b and TI
    assert "<th>bolus duration τ_b (s)</th>" in page and "<th>TI (s)</th>" in page and "<th>PLD (s)</th>" not in page


def test_pasl_data_need_the_pasl_model(raw, tmp_path):
    result = runner.invoke(app, ["run", str(raw), str(tmp_path / "out"), "--model", "1c", "--method", "lut"])
    assert result.exit_code == EXIT_FAILED
    log = next((tmp_path / "out" / "logs").glob("run-*.log")).read_text()
    assert "the 1c model was asked for, but this acquisition's protocol calls for the pasl model" in log


def test_without_bolus_cut_off_refused_with_the_reason_unless_the_user_gives_the_duration(raw, tmp_path):
    copy = _without_cut_off(raw, tmp_path)
    reason = "BolusCutOffFlag is false: this PASL series has no bolus cut-off"
    checked = runner.invoke(app, ["validate", str(copy), "--model", "pasl"])
    assert checked.exit_code == EXIT_FAILED and reason in checked.output
    assert runner.invoke(app, ["validate", str(copy), "--model", "pasl", "--bolus-duration", "0.7"]).exit_code == 0
    bad = runner.invoke(app, ["validate", str(copy), "--bolus-duration", "700"])
    assert bad.exit_code == EXIT_USAGE and "--bolus-duration must be a time in seconds" in bad.output

    refused = runner.invoke(app, ["run", str(copy), str(tmp_path / "refused"), "--model", "pasl", "--method", "lut"])
    assert refused.exit_code == EXIT_FAILED
    assert reason in next((tmp_path / "refused" / "logs").glob("run-*.log")).read_text()

    given = runner.invoke(app, ["run", str(copy), str(tmp_path / "given"), "--model", "pasl", "--method", "lut",
                                "--bolus-duration", "0.7"])
    assert given.exit_code == 0, given.output
    config = tmp_path / "settings.toml"
    config.write_text('methods = ["lut"]\nmodel = "pasl"\nbolus_duration = 0.7\n')
    configured = runner.invoke(app, ["run", str(copy), str(tmp_path / "configured"), "--config", str(config)])
    assert configured.exit_code == 0, configured.output
    cbf = [_load(tmp_path / out / "sub-01" / "perf" / "sub-01_desc-lut_cbf.nii.gz") for out in ("given", "configured")]
    from_sidecar = runner.invoke(app, ["run", str(raw), str(tmp_path / "sidecar"), "--model", "pasl", "--method",
                                       "lut"])
    assert from_sidecar.exit_code == 0, from_sidecar.output
    reference = _load(tmp_path / "sidecar" / "sub-01" / "perf" / "sub-01_desc-lut_cbf.nii.gz")
    np.testing.assert_array_equal(cbf[0], reference)
    np.testing.assert_array_equal(cbf[1], reference)
    provenance = (tmp_path / "configured" / "sub-01" / "perf" / "sub-01_provenance.json").read_text()
    assert '"bolus_duration": 0.7' in provenance


def test_bolus_duration_is_a_setting_of_the_run():
    assert Settings(methods=("lm",)).to_dict()["bolus_duration"] is None
    given = Settings(methods=("lm",), bolus_duration=0.8)
    assert given.to_dict()["bolus_duration"] == 0.8 and given.digest() != Settings(methods=("lm",)).digest()
    for bad in (0.0, -0.7, 700.0, True, "0.7"):
        with pytest.raises(ValueError, match="bolus_duration must be a time in seconds"):
            Settings(methods=("lm",), bolus_duration=bad)



def test_evaluate_runs_on_the_pasl_model(tmp_path):
    """aslbatch evaluate --model pasl --quick (small): every method's metrics, LM's recomputed from
    an LM fit of the same Monte Carlo sets here, and the 1C/2C research's findings not checked."""
    from aslbatch.estimators import get_estimator
    from aslbatch.evaluate import monte_carlo_sets
    from aslbatch.models import get_model
    from aslbatch.protocol import default_protocol

    result = runner.invoke(app, ["evaluate", "--model", "pasl", "--quick", "--out", str(tmp_path / "e"), "--method",
                                 "lm", "--method", "lut", "--method", "supervised", "--snr", "10", "--n-sets", "40",
                                 "--repeats", "2", "--n-samples", "2000", "--seed", "3"])
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in (tmp_path / "e" / "metrics.tsv").read_text().splitlines()[1:]]
    nrmse = {(m, p): float(v) for m, p, snr, metric, v in rows if metric == "nrmse"}
    assert {(m, p) for m in ("lm", "lut", "supervised") for p in ("cbf", "att")} <= set(nrmse)
    assert all(np.isfinite(v) and v > 0 for v in nrmse.values())
    model = get_model("pasl", default_protocol("pasl"))
    [data] = monte_carlo_sets(model, (10.0,), n_sets=40, repeats=2, seed=3)
    estimates = get_estimator("lm", model).fit().predict(data.signals).params
    for j, param in enumerate(model.param_names):
        err = estimates[:, j] - data.params[:, j]
        assert nrmse[("lm", param)] == pytest.approx(np.sqrt(np.mean(err ** 2)) / data.params[:, j].mean(), rel=1e-12)
    assert "not checked: One-compartment model" in result.output
