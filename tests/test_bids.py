"""aslbatch.bids: discovery, the inheritance principle, per-volume metadata, one test per
validation rule (the message names the file and the field), M0 by M0Type, constants and the
grouping of crushed / non-crushed series. Every dataset is a few tiny files in tmp_path."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from aslbatch.bids import (
    BackgroundSuppression,
    BidsError,
    Sidecar,
    background_suppression,
    background_suppression_factor,
    background_suppression_summary,
    blood_t1,
    constants_from_metadata,
    find_sessions,
    group_acquisitions,
    intended_for,
    labeling_durations,
    labeling_efficiency,
    labeling_type,
    m0_estimate,
    m0_repetition_time,
    m0_type,
    parse_filename,
    post_labeling_delays,
    read_series,
    repetition_time_preparation,
    slice_offsets,
    validate_dataset,
    vascular_crushing,
)
from aslbatch.protocol import Constants, ProtocolError

#: a complete, valid PCASL sidecar (3D readout, M0 given as a value)
BASE = {
    "ArterialSpinLabelingType": "PCASL",
    "MRAcquisitionType": "3D",
    "MagneticFieldStrength": 3,
    "M0Type": "Estimate",
    "M0Estimate": 1000.0,
    "PostLabelingDelay": [1.0, 1.0, 1.5, 1.5, 2.0, 2.0, 2.5, 2.5],  # four delays: CBF and arrival determined
    "LabelingDuration": 1.8,
    "RepetitionTimePreparation": 4.5,
    "BackgroundSuppression": False,
    "VascularCrushing": False,
}
PAIRS = ("control", "label") * 4
SHAPE = (4, 4, 3)


# --- building datasets ----------------------------------------------------------------------


def write_json(path: Path, data) -> Path:
    """Write ``data`` as JSON (a str is written as is, for broken files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def write_nifti(path: Path, shape) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype=np.int16), np.eye(4)), str(path))
    return path


def write_context(path: Path, volume_types, header="volume_type") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *volume_types]) + "\n")
    return path


def perf_dir(root: Path, name: str) -> Path:
    """The perf folder of a file-name stem such as ``sub-01_ses-1_acq-dante``."""
    entities, _, _ = parse_filename(name + "_asl.nii.gz")
    folder = root / f"sub-{entities['sub']}"
    if "ses" in entities:
        folder /= f"ses-{entities['ses']}"
    return folder / "perf"


def add_series(root: Path, name: str = "sub-01", *, context=PAIRS, n_volumes=None, shape=SHAPE,
               sidecar=True, ext=".nii.gz", **fields) -> Path:
    """Write ``<name>_asl<ext>`` in its perf folder with a sidecar and an aslcontext.

    ``fields`` update BASE (None removes a field); ``sidecar=False`` writes no JSON and a str
    writes that text; ``context=None`` writes no aslcontext; ``n_volumes`` defaults to its rows (8 without one).
    """
    folder = perf_dir(root, name)
    n = n_volumes or len(context or PAIRS)
    nifti = write_nifti(folder / f"{name}_asl{ext}", (*shape, n))
    if isinstance(sidecar, str):
        write_json(folder / f"{name}_asl.json", sidecar)
    elif sidecar:
        meta = {k: v for k, v in {**BASE, **fields}.items() if v is not None}
        write_json(folder / f"{name}_asl.json", meta)
    if context is not None:
        write_context(folder / f"{name}_aslcontext.tsv", context)
    return nifti


def add_m0(root: Path, name: str, perf_of: str = "sub-01", **fields) -> Path:
    """Write ``<name>_m0scan.nii.gz`` (one volume) and its sidecar in the perf folder of ``perf_of``."""
    folder = perf_dir(root, perf_of)
    write_json(folder / f"{name}_m0scan.json", {"RepetitionTimePreparation": 6.0, **fields})
    return write_nifti(folder / f"{name}_m0scan.nii.gz", SHAPE)


@pytest.fixture
def root(tmp_path) -> Path:
    write_json(tmp_path / "dataset_description.json", {"Name": "test", "BIDSVersion": "1.10.0"})
    return tmp_path


def only_series(root: Path):
    (session,) = find_sessions(root)
    (series,) = session.series
    return series


def messages(problems) -> list[str]:
    return [str(problem) for problem in problems]


# --- file names and discovery ---------------------------------------------------------------


def test_parse_filename():
    assert parse_filename("sub-01_ses-1_acq-dante_run-2_asl.nii.gz") == (
        {"sub": "01", "ses": "1", "acq": "dante", "run": "2"}, "asl", ".nii.gz")
    assert parse_filename("asl.json") == ({}, "asl", ".json")
    with pytest.raises(BidsError, match=r"part 'crush' is not an entity key-label pair"):
        parse_filename("sub-01_acq-no_crush_asl.nii.gz")


def test_discovery_without_sessions(root):
    add_series(root, "sub-02")
    add_series(root, "sub-01", ext=".nii")
    write_nifti(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz", SHAPE)  # not ASL
    sessions = find_sessions(root)
    assert [(s.subject, s.session, s.name) for s in sessions] == [("01", None, "sub-01"), ("02", None, "sub-02")]
    series = sessions[0].series[0]
    assert series.relpath == "sub-01/perf/sub-01_asl.nii"
    assert series.entities == {"sub": "01"}
    assert series.name == "sub-01" and series.subject == "01" and series.session is None
    assert series.n_volumes == 8 and series.shape == SHAPE
    assert series.volume_types == PAIRS
    assert series.problems == () and series.m0scan is None
    assert series.metadata["PostLabelingDelay"] == BASE["PostLabelingDelay"]


def test_discovery_with_sessions_is_sorted_and_filtered(root):
    for name in ("sub-02_ses-2", "sub-01_ses-2", "sub-01_ses-1_acq-dante", "sub-01_ses-1_acq-nocrush", "sub-02_ses-1"):
        add_series(root, name)
    sessions = find_sessions(root)
    assert [s.name for s in sessions] == ["sub-01_ses-1", "sub-01_ses-2", "sub-02_ses-1", "sub-02_ses-2"]
    assert [x.name for x in sessions[0].series] == ["sub-01_ses-1_acq-dante", "sub-01_ses-1_acq-nocrush"]
    assert sessions[0].series[1].entities == {"sub": "01", "ses": "1", "acq": "nocrush"}
    assert sessions[0].series[1].session == "1"
    assert [s.name for s in find_sessions(root, ["02"])] == ["sub-02_ses-1", "sub-02_ses-2"]
    assert [s.name for s in find_sessions(root, ["sub-01"])] == ["sub-01_ses-1", "sub-01_ses-2"]
    with pytest.raises(BidsError, match=r"participant label\(s\) \['99'\] not found"):
        find_sessions(root, ["01", "99"])
    assert [s.name for s in find_sessions(root)] == [s.name for s in sessions]  # deterministic


def test_header_is_read_without_the_data(root):
    nifti = add_series(root, ext=".nii", n_volumes=8)
    nifti.write_bytes(nifti.read_bytes()[:352])  # keep the header, drop the voxels
    series = only_series(root)
    assert (series.shape, series.n_volumes, series.problems) == (SHAPE, 8, ())


def test_missing_dataset_and_empty_dataset(root):
    assert messages(validate_dataset(root / "nope")) == [f"BIDS dataset folder {root / 'nope'} does not exist"]
    (problem,) = validate_dataset(root)
    assert "no ASL series found" in str(problem)


# --- inheritance ----------------------------------------------------------------------------


def test_inheritance_most_specific_wins(root):
    write_json(root / "asl.json", {**BASE, "LabelingDuration": 1.5, "BackgroundSuppression": True})
    write_json(root / "acq-dante_asl.json", {"VascularCrushing": True})
    write_json(root / "sub-01" / "sub-01_asl.json", {"LabelingDuration": 2.0})
    add_series(root, "sub-01_acq-dante", sidecar=False)
    add_series(root, "sub-01_acq-nocrush", sidecar=False)
    write_json(perf_dir(root, "sub-01") / "sub-01_acq-nocrush_asl.json", {"PostLabelingDelay": 1.8})
    dante, nocrush = find_sessions(root)[0].series
    assert dante.metadata["MagneticFieldStrength"] == 3  # dataset level
    assert dante.metadata["LabelingDuration"] == 2.0  # subject level overrides the dataset
    assert dante.metadata["VascularCrushing"] is True and nocrush.metadata["VascularCrushing"] is False
    assert nocrush.metadata["PostLabelingDelay"] == 1.8  # the sidecar beside the file is most specific
    assert dante.metadata["PostLabelingDelay"] == BASE["PostLabelingDelay"]
    assert nocrush.metadata.source("MagneticFieldStrength") == "asl.json"
    assert nocrush.metadata.source("LabelingDuration") == "sub-01/sub-01_asl.json"
    assert nocrush.metadata.source("PostLabelingDelay") == "sub-01/perf/sub-01_acq-nocrush_asl.json"
    assert dante.metadata.source("M0Estimate") == "asl.json"
    assert validate_dataset(root) == []


def test_inherited_aslcontext_and_error_names_the_inherited_file(root):
    write_json(root / "asl.json", {**BASE, "PostLabelingDelay": [1.0] * 6})
    write_context(root / "sub-01" / "sub-01_aslcontext.tsv", PAIRS)
    add_series(root, "sub-01", sidecar=False, context=None)
    series = only_series(root)
    assert series.volume_types == PAIRS
    assert messages(validate_dataset(root)) == [
        "asl.json: PostLabelingDelay has 6 values but sub-01/perf/sub-01_asl.nii.gz has 8 volumes"
    ]


# --- per-volume metadata ----------------------------------------------------------------------


def test_scalar_and_per_volume_timing():
    meta = {"PostLabelingDelay": 1.5, "LabelingDuration": 1.8}
    np.testing.assert_array_equal(post_labeling_delays(meta, 3), [1.5, 1.5, 1.5])
    np.testing.assert_array_equal(labeling_durations(meta, 3), [1.8, 1.8, 1.8])
    meta = {"PostLabelingDelay": [0, 1.0, 1.0, 2.0], "LabelingDuration": [0, 1.8, 1.8, 1.5]}
    np.testing.assert_array_equal(post_labeling_delays(meta, 4), [0.0, 1.0, 1.0, 2.0])
    np.testing.assert_array_equal(labeling_durations(meta, 4), [0.0, 1.8, 1.8, 1.5])
    assert post_labeling_delays(meta, 4).dtype == np.float64
    with pytest.raises(BidsError, match=r"^sidecar: PostLabelingDelay has 4 values but the series has 5 volumes$"):
        post_labeling_delays(meta, 5)
    np.testing.assert_array_equal(repetition_time_preparation({"RepetitionTimePreparation": [6, 4.5]}, 2), [6.0, 4.5])


def test_sidecar_messages_name_the_file():
    meta = Sidecar({"PostLabelingDelay": [1.0] * 10}, {"PostLabelingDelay": "sub-01/perf/sub-01_asl.json"},
                   "sub-01/perf/sub-01_asl.json", "sub-01/perf/sub-01_asl.nii.gz")
    with pytest.raises(BidsError) as info:
        post_labeling_delays(meta, 12)
    assert str(info.value) == "sub-01/perf/sub-01_asl.json: PostLabelingDelay has 10 values but the series has 12 volumes"
    assert (info.value.path, info.value.field) == ("sub-01/perf/sub-01_asl.json", "PostLabelingDelay")
    with pytest.raises(BidsError, match=r"^sub-01/perf/sub-01_asl.json: LabelingDuration is missing"):
        labeling_durations(meta, 12)
    copy = pickle.loads(pickle.dumps(info.value))
    assert (str(copy), copy.path, copy.field) == (str(info.value), info.value.path, info.value.field)


@pytest.mark.parametrize("function", [post_labeling_delays, labeling_durations])
def test_milliseconds_are_refused(function):
    field = "PostLabelingDelay" if function is post_labeling_delays else "LabelingDuration"
    with pytest.raises(BidsError, match=rf"{field} must be in seconds; value\(s\) \[1800.0\] exceed 10 s and look like milliseconds"):
        function({field: 1800}, 2)


def test_labeling_type_and_crushing():
    assert labeling_type({"ArterialSpinLabelingType": "PCASL"}) == "PCASL"
    assert labeling_type({"ArterialSpinLabelingType": "CASL"}) == "CASL"
    assert labeling_type({"ArterialSpinLabelingType": "PASL"}) == "PASL"
    with pytest.raises(BidsError, match="ArterialSpinLabelingType must be PCASL, CASL or PASL, got 'VSASL'"):
        labeling_type({"ArterialSpinLabelingType": "VSASL"})
    with pytest.raises(BidsError, match="ArterialSpinLabelingType is missing"):
        labeling_type({})
    assert vascular_crushing({"VascularCrushing": True}) is True
    assert vascular_crushing({}) is False


def test_m0_types():
    assert m0_type({"M0Type": "Separate"}) == "Separate"
    assert m0_type({"M0Type": "included"}) == "Included"
    assert m0_estimate({"M0Type": "Estimate", "M0Estimate": 812.5}) == 812.5
    assert m0_type({"M0Type": "absent"}) == "Absent"  # what it implies is decided later (tests/test_m0_absent.py)


def test_slice_offsets_2d_and_3d():
    np.testing.assert_array_equal(slice_offsets({"MRAcquisitionType": "3D"}, 3), [0.0, 0.0, 0.0])
    meta = {"MRAcquisitionType": "2D", "SliceTiming": [0.1, 0.14, 0.18]}
    np.testing.assert_allclose(slice_offsets(meta, 3), [0.0, 0.04, 0.08])
    # negative slice encoding: the last entry is slice 0
    np.testing.assert_allclose(slice_offsets({**meta, "SliceEncodingDirection": "k-"}, 3), [0.08, 0.04, 0.0])
    with pytest.raises(BidsError, match=r"SliceTiming has 3 values but the image has 4 slices"):
        slice_offsets(meta, 4)
    with pytest.raises(BidsError, match=r"SliceTiming is missing \(required by BIDS when MRAcquisitionType is 2D\)"):
        slice_offsets({"MRAcquisitionType": "2D"}, 3)
    with pytest.raises(BidsError, match=r"SliceTiming must be in seconds.*milliseconds"):
        slice_offsets({"MRAcquisitionType": "2D", "SliceTiming": [0, 40, 80]}, 3)


# --- constants ----------------------------------------------------------------------------------


def test_constants_by_field_strength_and_overrides():
    meta = {"ArterialSpinLabelingType": "PCASL", "MagneticFieldStrength": 3, "BackgroundSuppression": True,
            "BackgroundSuppressionNumberPulses": 4}
    assert constants_from_metadata(meta) == Constants(t1b=1.65, alpha=0.85, alpha_bs=1.0)
    assert blood_t1({"MagneticFieldStrength": 2.89}) == 1.65  # Siemens "3 T"
    assert constants_from_metadata({**meta, "MagneticFieldStrength": 1.5}).t1b == 1.35
    with pytest.raises(BidsError, match=r"MagneticFieldStrength is 7 T: .*give the T1 of arterial blood .*t1b"):
        constants_from_metadata({**meta, "MagneticFieldStrength": 7})
    assert constants_from_metadata({**meta, "MagneticFieldStrength": 7}, {"t1b": 2.1}).t1b == 2.1
    assert constants_from_metadata({**meta, "LabelingEfficiency": 0.72}).alpha == 0.72
    assert labeling_efficiency({"ArterialSpinLabelingType": "CASL"}) == 0.68
    assert constants_from_metadata(meta, background_suppression_correction=True).alpha_bs == pytest.approx(0.95**4)
    assert background_suppression_factor({"BackgroundSuppression": False}) == 1.0
    overridden = constants_from_metadata(meta, {"alpha": 0.9, "alpha_bs": 0.8, "lam": 0.98, "t1_prime": "tissue"},
                                         background_suppression_correction=True)
    assert (overridden.alpha, overridden.alpha_bs, overridden.lam, overridden.t1_prime) == (0.9, 0.8, 0.98, "tissue")
    with pytest.raises(BidsError, match="BackgroundSuppressionNumberPulses is missing"):
        constants_from_metadata({**meta, "BackgroundSuppressionNumberPulses": None}, background_suppression_correction=True)
    with pytest.raises(BidsError, match="MagneticFieldStrength is missing"):
        constants_from_metadata({"ArterialSpinLabelingType": "PCASL"})
    with pytest.raises(ProtocolError, match="unknown Constants field"):
        constants_from_metadata(meta, {"T1b": 1.6})


def test_background_suppression_as_the_sidecar_states_it():
    assert background_suppression({"BackgroundSuppression": True, "BackgroundSuppressionNumberPulses": 4}) == \
        BackgroundSuppression(True, 4)
    assert background_suppression({"BackgroundSuppression": True}) == BackgroundSuppression(True, None)
    # BIDS defines the number of pulses only with background suppression
    assert background_suppression({"BackgroundSuppression": False, "BackgroundSuppressionNumberPulses": 2}) == \
        BackgroundSuppression(False, None)
    assert background_suppression({}) == BackgroundSuppression(None, None)
    assert BackgroundSuppression(True, 3).factor() == pytest.approx(0.95**3)
    assert BackgroundSuppression(False, None).factor() == 1.0 and BackgroundSuppression(True, None).factor() is None
    with pytest.raises(BidsError, match="BackgroundSuppressionNumberPulses must be a whole number >= 0, got 2.5"):
        background_suppression({"BackgroundSuppression": True, "BackgroundSuppressionNumberPulses": 2.5})
    with pytest.raises(BidsError, match="BackgroundSuppression must be true or false, got 'yes'"):
        background_suppression({"BackgroundSuppression": "yes"})
    with pytest.raises(BidsError, match="BackgroundSuppression is missing"):
        background_suppression_factor({})


def test_background_suppression_summary_says_what_the_model_used():
    with_bs = [BackgroundSuppression(True, 4)]
    off = background_suppression_summary(with_bs, 1.0, correction=False)
    assert {k: off[k] for k in list(off)[:4]} == {
        "BackgroundSuppression": True, "BackgroundSuppressionNumberPulses": 4,
        "BackgroundSuppressionCorrection": False, "BackgroundSuppressionFactor": 1.0}
    assert off["BackgroundSuppressionCorrectionDescription"].startswith("not applied")
    assert f"{1 / 0.95**4:.4g} times" in off["BackgroundSuppressionCorrectionDescription"]
    on = background_suppression_summary(with_bs, 0.95**4, correction=True)
    assert on["BackgroundSuppressionCorrection"] is True and on["BackgroundSuppressionFactor"] == 0.95**4
    assert on["BackgroundSuppressionCorrectionDescription"].startswith("applied (background_suppression_correction on)")
    none = background_suppression_summary([BackgroundSuppression(False, None)], 1.0, correction=True)
    assert none["BackgroundSuppression"] is False and none["BackgroundSuppressionNumberPulses"] is None
    assert none["BackgroundSuppressionCorrection"] is False
    assert none["BackgroundSuppressionCorrectionDescription"].startswith("not applicable")
    user = background_suppression_summary(with_bs, 0.8, correction=False, user_factor=True)
    assert user["BackgroundSuppressionFactor"] == 0.8 and "constant alpha_bs" in user["BackgroundSuppressionCorrectionDescription"]
    pair = background_suppression_summary([BackgroundSuppression(True, 4), BackgroundSuppression(True, 2)], 1.0,
                                          correction=False)
    assert pair["BackgroundSuppression"] is True and pair["BackgroundSuppressionNumberPulses"] == [4, 2]
    unknown = background_suppression_summary([], 1.0, correction=False)
    assert unknown["BackgroundSuppression"] is None and "does not state" in unknown[
        "BackgroundSuppressionCorrectionDescription"]


# --- validation: one rule at a time ---------------------------------------------------------------

JSON = "sub-01/perf/sub-01_asl.json"
NIFTI = "sub-01/perf/sub-01_asl.nii.gz"
TSV = "sub-01/perf/sub-01_aslcontext.tsv"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"PostLabelingDelay": [1.0] * 6}, f"{JSON}: PostLabelingDelay has 6 values but the series has 8 volumes"),
        ({"LabelingDuration": [1.8] * 9}, f"{JSON}: LabelingDuration has 9 values but the series has 8 volumes"),
        ({"RepetitionTimePreparation": [4.5] * 2}, f"{JSON}: RepetitionTimePreparation has 2 values but the series has 8 volumes"),
        ({"PostLabelingDelay": 1500}, f"{JSON}: PostLabelingDelay must be in seconds; value(s) [1500.0] exceed 10 s and look like milliseconds"),
        ({"LabelingDuration": 1800}, f"{JSON}: LabelingDuration must be in seconds; value(s) [1800.0] exceed 10 s and look like milliseconds"),
        ({"PostLabelingDelay": [1.0, -0.5] * 4}, f"{JSON}: PostLabelingDelay must be >= 0 s; negative value(s) at volume(s) [1, 3, 5, 7]"),
        ({"PostLabelingDelay": "1.5"}, f"{JSON}: PostLabelingDelay must be a number or a list of numbers"),
        ({"ArterialSpinLabelingType": None}, f"{JSON}: ArterialSpinLabelingType is missing (required by BIDS for ASL)"),
        ({"PostLabelingDelay": None}, f"{JSON}: PostLabelingDelay is missing (required by BIDS for ASL)"),
        ({"LabelingDuration": None}, f"{JSON}: LabelingDuration is missing (required by BIDS for (P)CASL)"),
        ({"M0Type": None}, f"{JSON}: M0Type is missing (required by BIDS for ASL)"),
        ({"MagneticFieldStrength": None}, f"{JSON}: MagneticFieldStrength is missing (required by BIDS for ASL)"),
        ({"RepetitionTimePreparation": None}, f"{JSON}: RepetitionTimePreparation is missing (required by BIDS for ASL)"),
        ({"MRAcquisitionType": None}, f"{JSON}: MRAcquisitionType is missing (required by BIDS for ASL)"),
        ({"ArterialSpinLabelingType": "PASL"}, f"{JSON}: BolusCutOffFlag is missing (required by BIDS for PASL)"),
        ({"ArterialSpinLabelingType": "PASL", "BolusCutOffFlag": False},
         f"{JSON}: BolusCutOffFlag is false: this PASL series has no bolus cut-off (QUIPSS II or Q2TIPS), so the "
         "duration of its labeled bolus is unknown and CBF cannot be quantified; give it in seconds with "
         "--bolus-duration (or bolus_duration in the config) if it is known"),
        ({"ArterialSpinLabelingType": "PASL", "BolusCutOffFlag": True},
         f"{JSON}: BolusCutOffDelayTime is missing (required by BIDS when BolusCutOffFlag is true)"),
        ({"ArterialSpinLabelingType": "PASL", "BolusCutOffFlag": True, "BolusCutOffDelayTime": [1.6, 0.7]},
         f"{JSON}: BolusCutOffDelayTime must increase from the first bolus cut-off pulse to the last"),
        ({"ArterialSpinLabelingType": "PASL", "BolusCutOffFlag": True, "BolusCutOffDelayTime": [700, 1600]},
         f"{JSON}: BolusCutOffDelayTime must be in seconds; value(s) [700.0, 1600.0] exceed 10 s"),
        ({"ArterialSpinLabelingType": "PASL", "BolusCutOffFlag": True, "BolusCutOffDelayTime": "0.7"},
         f"{JSON}: BolusCutOffDelayTime must be a number or a list of numbers, got '0.7'"),
        ({"M0Type": "Sometimes"}, f"{JSON}: M0Type must be one of Separate, Included, Estimate, Absent, got 'Sometimes'"),
        ({"M0Estimate": None}, f"{JSON}: M0Estimate is missing (required by BIDS when M0Type is Estimate)"),
        ({"M0Type": "Separate"}, f"{JSON}: M0Type is Separate but no m0scan was found for {NIFTI}: expected sub-01/perf/sub-01_m0scan.nii.gz"),
        ({"M0Type": "Included"}, f"{JSON}: M0Type is Included but the aslcontext of {NIFTI} lists no m0scan volume"),
        ({"MRAcquisitionType": "2D"}, f"{JSON}: SliceTiming is missing (required by BIDS when MRAcquisitionType is 2D)"),
        ({"MRAcquisitionType": "2D", "SliceTiming": [0.0, 0.05]}, f"{JSON}: SliceTiming has 2 values but the image has 3 slices"),
        ({"VascularCrushing": "yes"}, f"{JSON}: VascularCrushing must be true or false, got 'yes'"),
        ({"MagneticFieldStrength": 7}, f"{JSON}: MagneticFieldStrength is 7 T: aslbatch has a default T1 of blood only at 1.5 T and 3 T"),
        ({"LabelingEfficiency": 1.5}, f"{JSON}: LabelingEfficiency must be in (0, 1], got 1.5"),
        ({"LabelingDuration": [1.8, 0.0] * 4}, f"{JSON}: LabelingDuration must be > 0 s for control, label, deltam, cbf volumes; it is 0 at volume(s) [1, 3, 5, 7]"),
        ({"PostLabelingDelay": 1.5, "n_volumes": 10}, f"{TSV}: volume_type has 8 rows but {NIFTI} has 10 volumes"),
        ({"PostLabelingDelay": 1.5, "context": ("control", "label", "label", "label")}, f"{TSV}: volume_type has 1 control but 3 label volumes"),
        ({"PostLabelingDelay": 1.5, "context": ("control", "lable")}, f"{TSV}: volume_type has invalid value(s) 'lable' (line 3); allowed: control, label, m0scan, deltam, cbf, noRF, n/a"),
        ({"PostLabelingDelay": 1.5, "context": ("cbf",)}, f"{TSV}: volume_type lists no control/label pair and no deltam volume: nothing to fit"),
        ({"context": None}, f"{NIFTI}: no aslcontext.tsv applies to this series (expected {TSV})"),
    ],
)
def test_each_rule_names_the_file_and_the_field(root, kwargs, message):
    add_series(root, **kwargs)
    problems = messages(validate_dataset(root))
    assert len(problems) == 1, problems
    assert problems[0].startswith(message), problems


def test_an_aslcontext_without_volume_type_column(root):
    add_series(root)
    write_context(perf_dir(root, "sub-01") / "sub-01_aslcontext.tsv", PAIRS, header="type")
    (problem,) = validate_dataset(root)
    assert str(problem).startswith(f"{TSV}: volume_type column is missing")
    assert problem.field == "volume_type"


def test_unreadable_json_and_nifti(root):
    add_series(root, sidecar='{"ArterialSpinLabelingType": "PCASL",, }')
    problems = messages(validate_dataset(root))
    assert problems[0].startswith(f"{JSON}: cannot read JSON: Expecting property name enclosed in double quotes: line 1")
    (root / NIFTI).write_bytes(b"not a nifti")
    assert any(p.startswith(f"{NIFTI}: cannot read the NIfTI header") for p in messages(validate_dataset(root)))


def test_validate_dataset_collects_every_problem(root):
    write_json(root / "asl.json", BASE)  # every series inherits a complete sidecar
    add_series(root, "sub-01", PostLabelingDelay=[1.0] * 6)
    add_series(root, "sub-02", sidecar='{"PostLabelingDelay": 1.5')  # broken, but the dataset level supplies all
    add_series(root, "sub-03", context=None)
    add_series(root, "sub-04", M0Type="Separate")
    add_series(root, "sub-05")  # fine
    problems = validate_dataset(root)
    assert [(p.path, p.field) for p in problems] == [
        ("sub-01/perf/sub-01_asl.json", "PostLabelingDelay"),
        ("sub-02/perf/sub-02_asl.json", "JSON"),
        ("sub-03/perf/sub-03_asl.nii.gz", "aslcontext"),
        ("sub-04/perf/sub-04_asl.json", "M0Type"),
    ]
    assert "Expecting ',' delimiter" in str(problems[1])
    assert validate_dataset(root, ["05"]) == []


# --- M0 ------------------------------------------------------------------------------------------


def test_separate_m0_with_the_same_entities(root):
    add_series(root, M0Type="Separate")
    add_m0(root, "sub-01")
    series = only_series(root)
    assert series.m0scan.relpath == "sub-01/perf/sub-01_m0scan.nii.gz"
    assert (series.m0scan.shape, series.m0scan.n_volumes) == (SHAPE, 1)
    assert m0_repetition_time(series) == 6.0
    assert validate_dataset(root) == []


@pytest.mark.parametrize(
    "name, target",
    [
        ("sub-01", "perf/sub-01_asl.nii.gz"),  # relative to the subject folder (older BIDS)
        ("sub-01", "bids::sub-01/perf/sub-01_asl.nii.gz"),  # BIDS URI
        ("sub-01_ses-1", "ses-1/perf/sub-01_ses-1_asl.nii.gz"),
        ("sub-01_ses-1", ["bids::sub-01/ses-1/perf/sub-01_ses-1_acq-other_asl.nii.gz",
                          "bids::sub-01/ses-1/perf/sub-01_ses-1_asl.nii.gz"]),
    ],
)
def test_separate_m0_named_by_intended_for(root, name, target):
    add_series(root, name, M0Type="Separate")
    add_m0(root, f"{name}_acq-calib", perf_of=name, IntendedFor=target)
    series = only_series(root)
    assert series.m0scan.relpath == f"{perf_dir(root, name).relative_to(root).as_posix()}/{name}_acq-calib_m0scan.nii.gz"
    assert validate_dataset(root) == []


def test_intended_for_elsewhere_is_not_the_m0(root):
    add_series(root, M0Type="Separate")
    add_m0(root, "sub-01_acq-calib", IntendedFor="bids::sub-01/perf/sub-01_acq-other_asl.nii.gz")
    assert only_series(root).m0scan is None
    (problem,) = validate_dataset(root)
    assert "M0Type is Separate but no m0scan was found" in str(problem)
    assert intended_for({"IntendedFor": "bids:other:sub-01/perf/x.nii.gz"}, "01") == []


def test_two_m0_scans_pick_the_matching_phase_encoding(root):
    add_series(root, M0Type="Separate", PhaseEncodingDirection="j-")
    add_m0(root, "sub-01_dir-AP", IntendedFor="perf/sub-01_asl.nii.gz", PhaseEncodingDirection="j-")
    add_m0(root, "sub-01_dir-PA", IntendedFor="perf/sub-01_asl.nii.gz", PhaseEncodingDirection="j")
    assert only_series(root).m0scan.entities == {"sub": "01", "dir": "AP"}
    write_json(perf_dir(root, "sub-01") / "sub-01_dir-PA_m0scan.json",
               {"RepetitionTimePreparation": 6.0, "IntendedFor": "perf/sub-01_asl.nii.gz", "PhaseEncodingDirection": "j-"})
    (problem,) = validate_dataset(root)
    assert str(problem).startswith(f"{NIFTI}: IntendedFor of several m0scan files names this series")


def add_fmap_m0(root: Path, name: str, **fields) -> Path:
    """Write ``sub-01/fmap/<name>_m0scan.nii.gz`` (a pepolar M0: BIDS requires its dir entity) and its sidecar."""
    folder = root / "sub-01" / "fmap"
    write_json(folder / f"{name}_m0scan.json", {"RepetitionTimePreparation": 6.0, **fields})
    return write_nifti(folder / f"{name}_m0scan.nii.gz", SHAPE)


def test_m0_of_a_pepolar_pair_in_fmap(root):
    # BIDS: an m0scan may be stored in fmap/ (with a dir entity) when the pepolar approach is used
    add_series(root, M0Type="Separate", PhaseEncodingDirection="j-")
    target = "bids::sub-01/perf/sub-01_asl.nii.gz"
    add_fmap_m0(root, "sub-01_dir-PA", IntendedFor=target, PhaseEncodingDirection="j")
    add_fmap_m0(root, "sub-01_dir-AP", IntendedFor=target, PhaseEncodingDirection="j-")
    # the image read with the series' phase encoding (distorted as the series is) is its M0
    assert only_series(root).m0scan.relpath == "sub-01/fmap/sub-01_dir-AP_m0scan.nii.gz"
    assert validate_dataset(root) == []
    # an m0scan in perf/ comes first, whatever fmap/ holds
    add_m0(root, "sub-01_acq-calib", IntendedFor="perf/sub-01_asl.nii.gz", PhaseEncodingDirection="j")
    assert only_series(root).m0scan.relpath == "sub-01/perf/sub-01_acq-calib_m0scan.nii.gz"


def test_fmap_m0_that_names_another_file_is_not_the_m0(root):
    # bids-examples asl004: the reversed-phase-encoding M0 in fmap/ names the perf/ M0 (distortion correction)
    add_series(root, M0Type="Separate")
    add_fmap_m0(root, "sub-01_dir-PA", IntendedFor="perf/sub-01_m0scan.nii.gz", PhaseEncodingDirection="j")
    assert only_series(root).m0scan is None
    (problem,) = validate_dataset(root)
    assert "no m0scan was found" in str(problem) and "fmap/" in str(problem)
    add_m0(root, "sub-01", PhaseEncodingDirection="j-")
    assert only_series(root).m0scan.relpath == "sub-01/perf/sub-01_m0scan.nii.gz"


def test_two_fmap_m0_alike_are_ambiguous(root):
    add_series(root, M0Type="Separate", PhaseEncodingDirection="j-")
    for name in ("sub-01_dir-AP_run-1", "sub-01_dir-AP_run-2"):
        add_fmap_m0(root, name, IntendedFor="perf/sub-01_asl.nii.gz", PhaseEncodingDirection="j-")
    assert only_series(root).m0scan is None
    (problem,) = validate_dataset(root)
    assert str(problem).startswith(f"{NIFTI}: IntendedFor of several m0scan files names this series")


def test_included_m0(root):
    context = ("m0scan", *PAIRS)
    add_series(root, context=context, M0Type="Included", PostLabelingDelay=[0.0] + BASE["PostLabelingDelay"],
               LabelingDuration=[0.0] + [1.8] * 8, RepetitionTimePreparation=[6.0] + [4.5] * 8)
    series = only_series(root)
    assert series.volume_types[0] == "m0scan" and series.m0scan is None
    assert m0_repetition_time(series) == 6.0
    assert validate_dataset(root) == []


def test_deltam_series_with_included_m0(root):
    add_series(root, context=("m0scan", "deltam", "deltam"), M0Type="Included", PostLabelingDelay=[0, 1.0, 2.0],
               LabelingDuration=[0, 1.8, 1.8])
    assert validate_dataset(root) == []


def test_estimate_m0(root):
    add_series(root)
    series = only_series(root)
    assert m0_estimate(series.metadata) == 1000.0 and m0_repetition_time(series) is None
    assert validate_dataset(root) == []


# --- grouping --------------------------------------------------------------------------------------


def test_crushed_pair_forms_one_2c_acquisition(root):
    add_series(root, "sub-01_ses-1_acq-nocrush", VascularCrushing=False)
    add_series(root, "sub-01_ses-1_acq-dante", VascularCrushing=True)
    add_series(root, "sub-01_ses-1_acq-pcasl_run-2")  # differs in more than acq: alone
    (session,) = find_sessions(root)
    pair, lone = group_acquisitions(session)
    assert (pair.model, pair.source_name) == ("2c", "sub-01_ses-1")
    assert [s.name for s in pair.series] == ["sub-01_ses-1_acq-nocrush", "sub-01_ses-1_acq-dante"]  # non-crushed first
    assert (lone.model, lone.source_name, len(lone.series)) == ("1c", "sub-01_ses-1_acq-pcasl_run-2", 1)
    assert (pair.subject, pair.session) == ("01", "1")
    forced = group_acquisitions(session, model="1c")
    assert [(a.model, a.source_name) for a in forced] == [
        ("1c", "sub-01_ses-1_acq-dante"), ("1c", "sub-01_ses-1_acq-nocrush"), ("1c", "sub-01_ses-1_acq-pcasl_run-2")]
    with pytest.raises(BidsError, match=r"^sub-01/ses-1/perf/sub-01_ses-1_acq-pcasl_run-2_asl.nii.gz: model 2c needs a non-crushed \+ crushed pair"):
        group_acquisitions(session, model="2c")
    problems = validate_dataset(root, model="2c")
    assert [p.path for p in problems] == ["sub-01/ses-1/perf/sub-01_ses-1_acq-pcasl_run-2_asl.nii.gz"]
    assert validate_dataset(root) == []


def test_lone_series_and_only_crushed_series_use_1c(root):
    add_series(root, "sub-01")
    add_series(root, "sub-02_acq-dante_run-1", VascularCrushing=True)
    add_series(root, "sub-02_acq-dante_run-2", VascularCrushing=True)
    one, two = find_sessions(root)
    assert [(a.model, a.source_name) for a in group_acquisitions(one)] == [("1c", "sub-01")]
    assert [a.model for a in group_acquisitions(two)] == ["1c", "1c"]
    with pytest.raises(BidsError, match="model 2c needs a non-crushed \\+ crushed pair of series: no other series"):
        group_acquisitions(one, model="2c")


@pytest.mark.parametrize(
    "series, reason",
    [
        ({"sub-01_acq-a": True, "sub-01_acq-b": True}, "both it and sub-01/perf/sub-01_acq-b_asl.nii.gz have VascularCrushing True"),
        ({"sub-01_acq-a": False, "sub-01_acq-b": True, "sub-01_acq-c": False}, "3 series differ only in acq"),
    ],
)
def test_no_pair_when_crushing_does_not_tell(root, series, reason):
    for name, crushed in series.items():
        add_series(root, name, VascularCrushing=crushed)
    (session,) = find_sessions(root)
    assert {a.model for a in group_acquisitions(session)} == {"1c"}
    with pytest.raises(BidsError, match=reason):
        group_acquisitions(session, model="2c")


def test_no_pair_when_shapes_differ(root):
    add_series(root, "sub-01_acq-nocrush")
    add_series(root, "sub-01_acq-dante", VascularCrushing=True, shape=(4, 4, 2))
    (session,) = find_sessions(root)
    assert [a.model for a in group_acquisitions(session)] == ["1c", "1c"]
    with pytest.raises(ValueError, match="model must be auto or one of"):
        group_acquisitions(session, model="3c")


def test_read_series_directly(root):
    nifti = add_series(root, "sub-01_ses-1")
    series = read_series(root, nifti)
    assert series.relpath == "sub-01/ses-1/perf/sub-01_ses-1_asl.nii.gz" and series.problems == ()
    with pytest.raises(BidsError, match="is not inside the dataset"):
        read_series(root / "sub-01", nifti.parent.parent.parent.parent / "elsewhere_asl.nii.gz")


# --- the checked metadata of a series, read once ------------------------------------------------


def test_check_series_record_holds_what_each_reader_returns(root):
    from aslbatch.bids import check_series, slice_axis

    context = ("m0scan", *PAIRS)
    add_series(root, context=context, M0Type="Included", PostLabelingDelay=[0.0] + [1.0, 1.0, 2.0, 2.0] * 2,
               LabelingDuration=[0.0] + [1.8] * 8, RepetitionTimePreparation=[4.0] + [4.5] * 8,
               MRAcquisitionType="2D", SliceTiming=[0.1, 0.15, 0.2], VascularCrushing=True, MagneticFieldStrength=1.5)
    series = only_series(root)
    record, problems = check_series(series, overrides={"lam": 0.98})
    assert problems == []
    meta = series.metadata
    np.testing.assert_array_equal(record.pld, post_labeling_delays(meta, 9))
    np.testing.assert_array_equal(record.label_duration, labeling_durations(meta, 9))
    np.testing.assert_allclose(record.slice_offsets, slice_offsets(meta, SHAPE[slice_axis(meta)]))
    assert record.volume_types == context and record.n_volumes == 9
    assert (record.crushed, record.labeling_type, record.m0_type) == (True, "PCASL", "Included")
    assert (record.m0_repetition_time, record.m0_estimate, record.slice_axis) == (4.0, None, 2)
    assert record.constants == constants_from_metadata(meta, {"lam": 0.98}) == Constants(t1b=1.35, lam=0.98)


def test_check_series_without_a_record_when_a_value_it_holds_is_unreadable(root):
    from aslbatch.bids import check_series, series_metadata

    add_series(root, MagneticFieldStrength=None)
    series = only_series(root)
    record, problems = check_series(series)
    assert record is None and messages(problems) == [f"{JSON}: MagneticFieldStrength is missing (required by BIDS for ASL)"]
    with pytest.raises(BidsError, match="MagneticFieldStrength is missing"):
        series_metadata(series)
    # t1b given: the constants no longer need the field, the record exists, the problem stays
    record, problems = check_series(series, overrides={"t1b": 1.6})
    assert record.constants.t1b == 1.6 and len(problems) == 1
    assert series_metadata(series, overrides={"t1b": 1.6}).constants.t1b == 1.6


# --- PASL ----------------------------------------------------------------------------------------

#: the BIDS example dataset asl003 (bids-examples, sub-Sub1_asl.json): Siemens 3D GRASE multi-TI
#: FAIR with Q2TIPS; PostLabelingDelay is TI (0.3 to 3.0 s, a control and a label at each)
ASL003 = {
    "Manufacturer": "Siemens", "MagneticFieldStrength": 3, "MRAcquisitionType": "3D", "PulseSequenceType": "3Dgrase",
    "RepetitionTimePreparation": 3.5, "ArterialSpinLabelingType": "PASL",
    "PostLabelingDelay": [0.3, 0.3, 0.6, 0.6, 0.9, 0.9, 1.2, 1.2, 1.5, 1.5, 1.8, 1.8, 2.1, 2.1, 2.4, 2.4, 2.7, 2.7,
                          3, 3],
    "BackgroundSuppression": True, "M0Type": "Separate", "TotalAcquiredPairs": 10, "VascularCrushing": False,
    "BackgroundSuppressionNumberPulses": 2, "BackgroundSuppressionPulseTime": [0.15, 0.2], "PASLType": "FAIR",
    "LabelingSlabThickness": 115.5, "BolusCutOffFlag": True, "BolusCutOffDelayTime": [0.7, 1.6],
    "BolusCutOffTechnique": "Q2TIPS",
}
ASL003_TI = [0.3, 0.6, 0.9, 1.2, 1.5, 1.8, 2.1, 2.4, 2.7, 3.0]


def add_pasl(root: Path, **fields) -> None:
    """The asl003 series (``fields`` update its sidecar; None removes a field) with its m0scan
    (RepetitionTimePreparation 6 s, as asl003's)."""
    meta = {**{k: None for k in BASE}, **ASL003, **fields}
    add_series(root, context=("control", "label") * 10, **meta)
    add_m0(root, "sub-01")


def test_pasl_sidecar_of_the_bids_example_reads_ti_and_the_q2tips_bolus(root):
    from aslbatch.bids import check_series

    add_pasl(root)
    assert validate_dataset(root) == []
    record, problems = check_series(only_series(root))
    assert problems == [] and record.labeling_type == "PASL"
    # PostLabelingDelay is TI, the readout time; τ_b is the first Q2TIPS BolusCutOffDelayTime
    np.testing.assert_array_equal(record.pld, np.repeat(ASL003_TI, 2))
    np.testing.assert_array_equal(record.label_duration, np.full(20, 0.7))
    # no LabelingEfficiency: the white paper's PASL α; background suppression off by default
    assert record.constants == Constants(alpha=0.98)
    record, _ = check_series(only_series(root), background_suppression_correction=True)
    assert record.constants.alpha_bs == pytest.approx(0.95 ** 2)


def test_pasl_quipss_ii_scalar_cut_off_and_labeling_efficiency_from_the_sidecar(root):
    from aslbatch.bids import check_series

    add_pasl(root, BolusCutOffTechnique="QUIPSSII", BolusCutOffDelayTime=0.8, LabelingEfficiency=0.95)
    record, problems = check_series(only_series(root))
    assert problems == []
    np.testing.assert_array_equal(record.label_duration, np.full(20, 0.8))
    assert record.constants.alpha == 0.95


def test_pasl_without_bolus_cut_off_is_refused_unless_the_user_gives_the_bolus_duration(root):
    from aslbatch.bids import bolus_duration, check_series

    add_pasl(root, BolusCutOffFlag=False, BolusCutOffDelayTime=None, BolusCutOffTechnique=None)
    series = only_series(root)
    record, problems = check_series(series)
    assert record is None
    assert messages(problems) == [
        f"{JSON}: BolusCutOffFlag is false: this PASL series has no bolus cut-off (QUIPSS II or Q2TIPS), so the "
        "duration of its labeled bolus is unknown and CBF cannot be quantified; give it in seconds with "
        "--bolus-duration (or bolus_duration in the config) if it is known"]
    assert problems[0].field == "BolusCutOffFlag"
    assert messages(validate_dataset(root)) == messages(problems)
    assert validate_dataset(root, bolus_duration=0.75) == []
    record, problems = check_series(series, bolus_duration=0.75)
    assert problems == []
    np.testing.assert_array_equal(record.label_duration, np.full(20, 0.75))
    # the user's value also wins over a sidecar's cut-off
    assert bolus_duration(ASL003, 0.65) == 0.65 and bolus_duration(ASL003) == 0.7


def test_labeling_duration_is_neither_required_nor_read_for_pasl(root):
    from aslbatch.bids import check_series, label_durations

    add_pasl(root, LabelingDuration=1.8)  # a stray (P)CASL field: ignored
    record, problems = check_series(only_series(root))
    assert problems == [] and np.all(record.label_duration == 0.7)
    np.testing.assert_array_equal(label_durations({**BASE}, 8), labeling_durations(BASE, 8))
