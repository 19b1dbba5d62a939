"""aslbatch import on synthetic Philips DICOM (tests/dicom_fixtures.py: known roles and ΔM) and the
volume-role rules on arrays with known truth. Every import test checks the DICOM tree is unchanged
(tests/faults.py) and leaves no temporary behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom")

from aslbatch.bids import inspect_dataset, validate_dataset  # noqa: E402
from aslbatch.dicom import import_dicom  # noqa: E402
from aslbatch.dicom.roles import RoleError, check_m0_brighter, siemens_roles  # noqa: E402
from aslbatch.dicom.sidecar import SidecarDraft, check_labeling_duration  # noqa: E402

from .dicom_fixtures import NOISE, REF_NOISE, tissue, write_philips_pcasl  # noqa: E402
from .faults import assert_no_stray_files, assert_untouched, tree_digest  # noqa: E402

PARAMS = {"series": [{"Manufacturer": "Philips", "SeriesDescription": "SOURCE - 3D_pCASL*",
                      "ArterialSpinLabelingType": "PCASL", "PostLabelingDelay": 2.0, "LabelingDuration": 1.8,
                      "BackgroundSuppression": True}]}


def _params(tmp_path: Path, drop: str | None = None) -> Path:
    entry = dict(PARAMS["series"][0])
    if drop:
        entry.pop(drop)
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"series": [entry]}))
    return path


@pytest.fixture
def dicom(tmp_path):
    folder = tmp_path / "dicom"
    truth = write_philips_pcasl(folder)
    return folder, truth


def _perf_files(bids: Path) -> list[Path]:
    return sorted(p for p in bids.glob("sub-*/ses-*/perf/*") if p.is_file())


def test_philips_import_is_valid_bids_with_roles_and_provenance(dicom, tmp_path):
    folder, truth = dicom
    before = tree_digest(folder)
    bids = tmp_path / "bids"
    report = import_dicom(folder, bids, _params(tmp_path))
    assert report.exit_code == 0, [(o.status, o.reason) for o in report.outcomes]
    assert_untouched(folder, before)
    assert_no_stray_files(bids)
    assert validate_dataset(bids) == []
    context = next(bids.glob("sub-*/ses-*/perf/*_aslcontext.tsv")).read_text().split()
    # the fixture wrote dynamic 1 unsuppressed (control then label), then 7 suppressed pairs
    assert context == ["volume_type", "m0scan", "n/a"] + ["control", "label"] * 7
    sidecar = json.loads(next(bids.glob("sub-*/ses-*/perf/*_asl.json")).read_text())
    provenance = sidecar["ImportProvenance"]
    assert {"LabelingDuration", "PostLabelingDelay", "BackgroundSuppression"} <= set(provenance["SuppliedByStudyParameters"])
    assert {"MagneticFieldStrength", "MRAcquisitionType", "RepetitionTimePreparation"} <= set(provenance["ReadFromDICOM"])
    assert sidecar["M0Type"] == "Included" and sidecar["LabelingDuration"] == 1.8


def test_scanner_image_kept_out_of_raw_data_and_correlated(dicom, tmp_path):
    folder, truth = dicom
    bids = tmp_path / "bids"
    import_dicom(folder, bids, _params(tmp_path))
    names = [p.name for p in _perf_files(bids)]
    assert not any("scanner" in n for n in names)
    kept = list((bids / "sourcedata" / "scanner").rglob("*_desc-scanner_deltam.nii.gz"))
    assert len(kept) == 1
    sidecar = json.loads(next(bids.glob("sub-*/ses-*/perf/*_asl.json")).read_text())
    assert sidecar["ImportProvenance"]["ScannerReference"] == kept[0].relative_to(bids).as_posix()
    # expected r from the fixture's construction: signal spread of the true ΔM in the disk against the
    # noise of the mean of 7 differences (plus integer rounding) and of the scanner's image
    signal = truth["deltam"][tissue()].std()
    noise2 = 2 * (NOISE**2 + 1 / 12) / 7 + REF_NOISE**2 + 0.1**2 / 12
    expected = signal / np.sqrt(signal**2 + noise2)
    r = sidecar["ImportProvenance"]["ScannerReferenceCorrelation"]
    assert r >= 0.95 and abs(r - expected) < 0.02


def test_rerun_imports_nothing_and_keeps_files(dicom, tmp_path):
    folder, _ = dicom
    bids = tmp_path / "bids"
    params = _params(tmp_path)
    import_dicom(folder, bids, params)
    first = tree_digest(bids / "sub-Phantom02")
    again = import_dicom(folder, bids, params)
    assert again.outcomes == [] and again.exit_code == 0
    assert tree_digest(bids / "sub-Phantom02") == first


def test_missing_study_parameter_is_refused_by_name(dicom, tmp_path):
    folder, _ = dicom
    before = tree_digest(folder)
    bids = tmp_path / "bids"
    report = import_dicom(folder, bids, _params(tmp_path, drop="LabelingDuration"))
    refused = [o for o in report.outcomes if o.status == "refused"]
    assert report.exit_code == 1 and len(refused) == 1
    assert "LabelingDuration" in refused[0].reason and "PostLabelingDelay" not in refused[0].reason
    assert _perf_files(bids) == []
    assert_untouched(folder, before)
    # no study parameters at all: every value the Philips header lacks is named
    report = import_dicom(folder, tmp_path / "bids2")
    reason = next(o.reason for o in report.outcomes if o.status == "refused")
    for field in ("ArterialSpinLabelingType", "PostLabelingDelay", "BackgroundSuppression"):
        assert field in reason


def test_label_tags_contradicted_by_the_data_are_refused(tmp_path):
    folder = tmp_path / "dicom"
    write_philips_pcasl(folder, swap_labels=True, scanner_image=False)
    report = import_dicom(folder, tmp_path / "bids", _params(tmp_path))
    refused = [o for o in report.outcomes if o.status == "refused"]
    assert len(refused) == 1 and "negative" in refused[0].reason
    assert _perf_files(tmp_path / "bids") == []


def test_unsuppressed_series_without_m0_takes_the_mean_control(tmp_path):
    folder = tmp_path / "dicom"
    write_philips_pcasl(folder, scanner_image=False, suppressed=False)
    params = tmp_path / "study.json"
    params.write_text(json.dumps({"series": [{**PARAMS["series"][0], "BackgroundSuppression": False}]}))
    bids = tmp_path / "bids"
    report = import_dicom(folder, bids, params)
    assert report.exit_code == 0, [(o.status, o.reason) for o in report.outcomes]
    sidecar = json.loads(next(bids.glob("sub-*/ses-*/perf/*_asl.json")).read_text())
    assert sidecar["M0Type"] == "Absent"
    assert any("mean control" in note for note in sidecar["ImportProvenance"]["Decided"])
    assert next(bids.glob("sub-*/ses-*/perf/*_aslcontext.tsv")).read_text().split()[1:] == ["control", "label"] * 8
    assert validate_dataset(bids) == []


def test_suppressed_series_without_m0_is_imported_for_relative_maps_only(tmp_path):
    """Background suppressed and no M0: imported with M0Type Absent and the reason; validate
    decides the relative model (rcbf, deltam), never absolute CBF."""
    folder = tmp_path / "dicom"
    write_philips_pcasl(folder, scanner_image=False, suppressed=False)  # no bright dynamic to serve as M0
    report = import_dicom(folder, tmp_path / "bids", _params(tmp_path))  # but the parameters say suppressed
    assert report.exit_code == 0, [(o.status, o.reason) for o in report.outcomes]
    sidecar = json.loads(next((tmp_path / "bids").glob("sub-*/ses-*/perf/*_asl.json")).read_text())
    assert sidecar["M0Type"] == "Absent" and sidecar["BackgroundSuppression"] is True
    decided = " ".join(sidecar["ImportProvenance"]["Decided"])
    assert "background suppressed" in decided and "never absolute CBF" in decided
    problems, verdicts = inspect_dataset(tmp_path / "bids")
    assert problems == [] and [v.decision.model for v in verdicts] == ["relative"]


@pytest.mark.parametrize("label_first", [False, True])
def test_philips_order_without_label_tags_is_decided_by_the_data(tmp_path, label_first):
    folder = tmp_path / "dicom"
    write_philips_pcasl(folder, scanner_image=False, suppressed=False, label_tags=False, label_first=label_first)
    params = tmp_path / "study.json"
    params.write_text(json.dumps({"series": [{**PARAMS["series"][0], "BackgroundSuppression": False}]}))
    bids = tmp_path / "bids"
    report = import_dicom(folder, bids, params)
    assert report.exit_code == 0, [(o.status, o.reason) for o in report.outcomes]
    pair = ["label", "control"] if label_first else ["control", "label"]  # the order the fixture acquired
    assert next(bids.glob("sub-*/ses-*/perf/*_aslcontext.tsv")).read_text().split()[1:] == pair * 8
    decided = json.loads(next(bids.glob("sub-*/ses-*/perf/*_asl.json")).read_text())["ImportProvenance"]["Decided"]
    assert any("decided from the data" in note for note in decided)


def test_lock_held_refuses_a_second_import(dicom, tmp_path):
    from aslbatch.batch import LockHeld, output_lock

    folder, _ = dicom
    bids = tmp_path / "bids"
    with output_lock(bids):
        with pytest.raises(LockHeld):
            import_dicom(folder, bids, _params(tmp_path))


def test_cli_import_exit_codes(dicom, tmp_path):
    from typer.testing import CliRunner

    from aslbatch.cli import app

    folder, _ = dicom
    runner = CliRunner()
    done = runner.invoke(app, ["import", str(folder), str(tmp_path / "bids"), "--study-params", str(_params(tmp_path))])
    assert done.exit_code == 0, done.output
    refused = runner.invoke(app, ["import", str(folder), str(tmp_path / "b2")])
    assert refused.exit_code == 1 and "refused" in refused.output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert runner.invoke(app, ["import", str(empty), str(tmp_path / "b3")]).exit_code == 3
    assert runner.invoke(app, ["import", str(tmp_path / "nowhere"), str(tmp_path / "b4")]).exit_code == 2


# --- the rules on arrays with known roles -----------------------------------------------------


def _series(order: tuple[str, str], m0: bool, pairs: int = 6, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.zeros((10, 10, 3), bool)
    mask[2:8, 2:8] = True
    static = np.where(mask, 500.0, 5.0)
    volumes = [static * 3] if m0 else []
    for _ in range(pairs):
        for kind in order:
            volumes.append(static - (10.0 * mask if kind == "label" else 0) + rng.normal(0, 3, mask.shape))
    return np.stack(volumes, axis=3), mask


def test_siemens_ep2d_label_first_with_m0():
    data, mask = _series(("label", "control"), m0=True)
    roles = siemens_roles(data, mask, "%SiemensSeq%\\ep2d_pasl", m0_included=True)
    assert roles.volume_types == ("m0scan",) + ("label", "control") * 6 and not roles.decided


def test_siemens_tgse_m0_decided_and_odd_volume_unpaired():
    data, mask = _series(("control", "label"), m0=True)
    data = np.concatenate([data, data[..., 1:2]], axis=3)  # a trailing control without its label
    roles = siemens_roles(data, mask, "tgse_pcasl", m0_included=None)
    assert roles.volume_types == ("m0scan",) + ("control", "label") * 6 + ("n/a",) and roles.decided


def test_siemens_order_contradicted_by_data_fails():
    data, mask = _series(("control", "label"), m0=False)
    with pytest.raises(RoleError, match="negative"):
        siemens_roles(data, mask, "ep2d_pasl", m0_included=None)  # ep2d says label first


def test_claimed_m0_matching_controls_is_not_an_m0():
    with pytest.raises(RoleError, match="not an M0"):
        check_m0_brighter(np.array([111.3, 104.8]), 110.5, True)  # the real pasl_3d_m0 brain means
    assert "2.50" in check_m0_brighter(np.array([250.0]), 100.0, True)


def test_labeling_duration_equal_to_pld_is_corrected_from_rf_blocks():
    draft = SidecarDraft({"LabelingDuration": 1.2, "PostLabelingDelay": 1.2, "NumRFBlocks": 82},
                         read={"LabelingDuration", "PostLabelingDelay"})
    assert check_labeling_duration(draft) is None
    assert draft.fields["LabelingDuration"] == pytest.approx(82 * 18.4e-3, abs=1e-4)  # 1.5088 s
    assert "LabelingDuration" in draft.decided and "LabelingDuration" not in draft.read
    unknown = SidecarDraft({"LabelingDuration": 1.2, "PostLabelingDelay": 1.2}, read={"LabelingDuration"})
    assert "NumRFBlocks" in check_labeling_duration(unknown)
    supplied = SidecarDraft({"LabelingDuration": 1.2, "PostLabelingDelay": 1.2}, supplied={"LabelingDuration"})
    assert check_labeling_duration(supplied) is None and supplied.fields["LabelingDuration"] == 1.2


def test_run_after_import_reports_the_scanner_correlation(dicom, tmp_path):
    from typer.testing import CliRunner

    from aslbatch.cli import app

    folder, _ = dicom
    bids, out = tmp_path / "bids", tmp_path / "maps"
    import_dicom(folder, bids, _params(tmp_path))
    done = CliRunner().invoke(app, ["run", str(bids), str(out), "--method", "lm", "--no-report"])
    assert done.exit_code == 0, done.output
    provenance = json.loads(next(out.rglob("*_provenance.json")).read_text())
    text = json.dumps(provenance, ensure_ascii=False)
    recorded = json.loads(next(bids.glob("sub-*/ses-*/perf/*_asl.json")).read_text())["ImportProvenance"]
    assert f"r = {recorded['ScannerReferenceCorrelation']}" in text
    assert "M0 from the 1 m0scan volume(s)" in text


def test_killed_import_leftovers_are_removed_under_the_lock(dicom, tmp_path):
    folder, _ = dicom
    bids = tmp_path / "bids"
    perf = bids / "sub-Phantom02" / "ses-20210804" / "perf"
    perf.mkdir(parents=True)
    (perf / ".x_asl.nii.gz.abc.aslbatch-tmp").write_bytes(b"half")
    import_dicom(folder, bids, _params(tmp_path))
    assert_no_stray_files(bids)


# --- Siemens header values (the real dcm2niix sidecars and protocol of ../shared/realdata) ---------


def test_siemens_protocol_block_is_parsed():
    from aslbatch.dicom.series import siemens_protocol

    raw = (b"junk### ASCCONV BEGIN object=MrProtDataImpl@MrProtocolData ###\n"
           b'tSequenceFileName\t = \t""%CustomerSeq%\\tgse_pcasl_ve11c""\n'
           b"sAsl.ulSuppressionMode\t = \t2\nsWipMemBlock.adFree[2]\t = \t1200000.0\n### ASCCONV END ###")
    protocol = siemens_protocol(raw)
    assert protocol["sAsl.ulSuppressionMode"] == "2"
    assert protocol["sWipMemBlock.adFree[2]"] == "1200000.0"
    assert protocol["tSequenceFileName"].endswith("tgse_pcasl_ve11c")


def test_siemens_pasl_fields_become_bids():
    from aslbatch.dicom.sidecar import draft_sidecar, missing_fields

    converted = {"ArterialSpinLabelingType": "PASL", "InversionTime": 2, "BolusDuration": 0.8, "PASLType": "PICORE",
                 "M0Type": "Included", "RepetitionTime": 3.1, "MagneticFieldStrength": 3, "MRAcquisitionType": "2D",
                 "SliceTiming": [0.0, 0.04]}
    draft = draft_sidecar("Siemens", converted, {"sAsl.ulSuppressionMode": "1"}, {})
    assert draft.fields["PostLabelingDelay"] == 2 and draft.fields["BolusCutOffDelayTime"] == 0.8
    assert draft.fields["BolusCutOffFlag"] is True and draft.fields["BackgroundSuppression"] is False
    assert draft.fields["RepetitionTimePreparation"] == 3.1
    assert "InversionTime" not in draft.fields and "M0Type" not in draft.fields  # M0Type is decided, not copied
    assert missing_fields(draft.fields) == [] and draft.supplied == set()
    unknown_mode = draft_sidecar("Siemens", converted, {"sAsl.ulSuppressionMode": "7"}, {})
    assert missing_fields(unknown_mode.fields) == ["BackgroundSuppression"]  # a mode whose meaning is unknown


def test_siemens_pcasl_pld_from_protocol_and_supplied_values_win():
    from aslbatch.dicom.sidecar import draft_sidecar

    converted = {"ArterialSpinLabelingType": "PCASL", "LabelingDuration": 1.2, "NumRFBlocks": 82,
                 "RepetitionTimeExcitation": 3.48, "RepetitionTimePreparation": 13929.4, "MagneticFieldStrength": 3,
                 "MRAcquisitionType": "3D"}
    protocol = {"tSequenceFileName": "%CustomerSeq%\\tgse_pcasl_ve11c", "sWipMemBlock.adFree[2]": "1200000.0",
                "sAsl.ulSuppressionMode": "2"}
    draft = draft_sidecar("Siemens", converted, protocol, {"LabelingDuration": 1.5})
    assert draft.fields["PostLabelingDelay"] == pytest.approx(1.2) and "PostLabelingDelay" in draft.read
    assert draft.fields["RepetitionTimePreparation"] == 3.48  # not dcm2niix's 13929.4 (ms)
    assert draft.fields["LabelingDuration"] == 1.5 and "LabelingDuration" in draft.supplied
    assert "LabelingDuration" not in draft.read


def test_study_parameters_toml_matching_and_errors(tmp_path):
    from aslbatch.dicom.params import StudyParameterError, load_study_parameters

    path = tmp_path / "study.toml"
    path.write_text('[subjects]\n"Phantom02" = "01"\n\n[[series]]\nManufacturer = "Philips"\n'
                    'SeriesDescription = "SOURCE - 3D*"\n_comment = "site protocol"\nPostLabelingDelay = 2.0\n')
    params = load_study_parameters(path)
    assert params.for_series("Philips Medical Systems", "source - 3d_pcasl_6mm") == {"PostLabelingDelay": 2.0}
    assert params.for_series("SIEMENS", "SOURCE - 3D_pCASL") == {}
    assert params.subjects == {"Phantom02": "01"}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(StudyParameterError, match=r"bad.json: not valid JSON"):
        load_study_parameters(bad)
    bad.write_text(json.dumps({"serie": []}))
    with pytest.raises(StudyParameterError, match=r"unknown key\(s\) \['serie'\]"):
        load_study_parameters(bad)
