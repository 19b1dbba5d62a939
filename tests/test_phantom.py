"""aslbatch.phantom: the ground truth stays in the models' training ranges, the written dataset
is valid BIDS that aslbatch.bids reads and groups as intended, ΔM/M0t re-derived from the
written control/label/M0 images is the model signal of the ground truth (exactly without
noise, at the stated SNR with it), and everything is determined by the seed.

ΔM/M0t is re-derived here independently of aslbatch's preprocessing: straight from the
images, the aslcontext and the sidecars."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from aslbatch.bids import constants_from_metadata, find_sessions, group_acquisitions, validate_dataset
from aslbatch.models import get_model
from aslbatch.phantom import (
    M0_BACKGROUND,
    default_groundtruth_dir,
    make_phantom,
    write_bids_dataset,
)
from aslbatch.protocol import Constants, default_protocol
from aslbatch.simulate import reference_signal_level

SHAPE = (16, 20, 6)


# --- helpers ------------------------------------------------------------------------------


def load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)


def derive_signal(series) -> np.ndarray:
    """ΔM/M0t (*shape, n_plds) of one series: mean control − label per (τ, PLD), over the M0."""
    data = load(series.path)
    types = np.array(series.volume_types)
    meta = series.metadata
    if meta["M0Type"] == "Separate":
        m0 = load(series.m0scan.path)
        m0 = m0.mean(axis=-1) if m0.ndim == 4 else m0
    else:
        m0 = data[..., types == "m0scan"].mean(axis=-1)
    control, label = np.flatnonzero(types == "control"), np.flatnonzero(types == "label")
    keys = [(meta["LabelingDuration"][i], meta["PostLabelingDelay"][i]) for i in control]
    order = list(dict.fromkeys(keys))  # first appearance: the series' PLD order
    diffs = data[..., control] - data[..., label]
    mean = np.stack([diffs[..., [k == key for k in keys]].mean(axis=-1) for key in order], axis=-1)
    return mean / m0[..., None]


def derive_acquisition(acquisition) -> np.ndarray:
    return np.concatenate([derive_signal(series) for series in acquisition.series], axis=-1)


def truth_signal(truth_dir: Path, subject: str, model) -> tuple[np.ndarray, np.ndarray]:
    """Model signal of the written ground-truth maps inside the written mask, and the mask."""
    folder = truth_dir / f"sub-{subject}"
    mask = load(folder / f"sub-{subject}_mask.nii.gz") > 0
    params = np.stack([load(folder / f"sub-{subject}_{name}.nii.gz")[mask] for name in model.param_names], axis=-1)
    return model.signal(params), mask


def file_bytes(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


# --- the phantom ----------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["1c", "2c"])
def test_ground_truth_inside_training_ranges_and_defined_outside(model_name):
    model = get_model(model_name, default_protocol(model_name))
    for seed in range(4):
        phantom = make_phantom(SHAPE, model_name, seed)
        inside, outside = phantom.mask, ~phantom.mask
        assert inside.sum() > 0.3 * inside.size and outside.any()
        for name, (low, high) in model.training_ranges.items():
            values = getattr(phantom, name)
            assert values.dtype == np.float32
            assert np.isfinite(values[inside]).all()
            assert low <= values[inside].min() and values[inside].max() <= high, name
        # documented outside the mask: cbf and abv 0, times NaN; M0 a small pedestal
        assert (phantom.cbf[outside] == 0).all()
        assert np.isnan(phantom.att[outside]).all()
        if model_name == "2c":
            assert (phantom.abv[outside] == 0).all() and np.isnan(phantom.abat[outside]).all()
            gap = phantom.att[inside] - phantom.abat[inside]
            assert gap.min() >= 0.0 and gap.max() <= 1.5  # the 2C training range of att − abat
            assert phantom.abat[inside].min() >= 0.3
        np.testing.assert_array_equal(phantom.m0[outside], M0_BACKGROUND)
        # the prolonged-transit territory exists, with reduced CBF
        late = inside & (phantom.att > 2.2)
        assert late.sum() >= 20
        assert np.median(phantom.cbf[late & (phantom.tissue == 1)]) < np.median(phantom.cbf[~late & (phantom.tissue == 1)])
        # grey matter at the surface with fast flow, white matter inside with slower, later flow
        gm, wm = phantom.tissue == 1, phantom.tissue == 2
        normal = inside & (phantom.territory < 0.05)
        assert gm.any() and wm.any() and set(np.unique(phantom.tissue[outside])) == {0}
        assert 50 < np.median(phantom.cbf[gm & normal]) < 70 and 15 < np.median(phantom.cbf[wm & normal]) < 30
        assert np.median(phantom.att[gm & normal]) < np.median(phantom.att[wm & normal])
        assert 800 < np.median(phantom.m0[inside]) < 1200


def test_phantom_is_determined_by_the_seed_and_shared_by_both_models():
    a, b, c = make_phantom(SHAPE, "2c", 7), make_phantom(SHAPE, "2c", 7), make_phantom(SHAPE, "2c", 8)
    for name in ("cbf", "att", "abv", "abat", "m0", "tissue", "territory"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.cbf, c.cbf)
    one = make_phantom(SHAPE, "1c", 7)
    np.testing.assert_array_equal(one.cbf, a.cbf)
    np.testing.assert_array_equal(one.att, a.att)
    assert one.abv is None and one.param_names == ("cbf", "att")
    # a healthy variant: same anatomy, no delayed territory
    healthy = make_phantom(SHAPE, "1c", 7, prolonged_transit=False)
    assert np.nanmax(healthy.att) < 2.2 and (healthy.territory == 0).all()


# --- the dataset ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_name, m0_type, repeats, sessions",
    [("1c", "Separate", 1, None), ("1c", "Included", 2, ["1", "2"]), ("2c", "Separate", 2, None), ("2c", "Included", 1, None)],
)
def test_dataset_is_valid_bids_and_noise_free_signal_is_the_model_signal(tmp_path, model_name, m0_type, repeats, sessions):
    root = write_bids_dataset(
        tmp_path / "bids", subjects=2, model=model_name, snr=math.inf, seed=3, m0_type=m0_type,
        repeats=repeats, sessions=sessions, shape=SHAPE, dtype="float64",
    )
    assert validate_dataset(root) == []
    assert validate_dataset(root, model=model_name) == []
    description = json.loads((root / "dataset_description.json").read_text())
    assert description["BIDSVersion"] and description["Name"] and description["DatasetType"] == "raw"
    assert (root / "participants.tsv").read_text().split() == ["participant_id", "sub-01", "sub-02"]
    truth_dir = default_groundtruth_dir(root)
    assert truth_dir == tmp_path / "bids_groundtruth" and not any(root.rglob("*_cbf.nii.gz"))

    model = get_model(model_name, default_protocol(model_name))
    sessions_found = find_sessions(root)
    assert [(s.subject, s.session) for s in sessions_found] == [
        (sub, ses) for sub in ("01", "02") for ses in (sessions or [None])
    ]
    for session in sessions_found:
        (acquisition,) = group_acquisitions(session)
        assert acquisition.model == model_name
        assert acquisition.source_name == session.name
        if model_name == "2c":
            assert [s.entities.get("acq") for s in acquisition.series] == ["nocrush", "dante"]
            assert [s.metadata["VascularCrushing"] for s in acquisition.series] == [False, True]
        for series in acquisition.series:
            meta = series.metadata
            assert constants_from_metadata(meta) == Constants()  # the physics the data was made with
            assert meta["TotalAcquiredPairs"] == series.volume_types.count("control")
            assert meta["M0Type"] == m0_type and series.n_volumes == len(meta["PostLabelingDelay"])
            assert nib.load(str(series.path)).header.get_zooms()[:3] == (3.0, 3.0, 3.0)
        clean, mask = truth_signal(truth_dir, session.subject, model)
        derived = derive_acquisition(acquisition)
        assert derived.shape == (*SHAPE, model.n_volumes)
        np.testing.assert_allclose(derived[mask], clean, rtol=1e-5, atol=1e-12)
        # zero perfusion outside the brain
        assert np.abs(derived[~mask]).max() < 1e-12


def test_float32_images_keep_the_signal_to_about_1e5_of_the_reference_level(tmp_path):
    # control and label (~M0t, up to ~1100) rounded to float32: half an ulp each, <= 6.1e-5, so ΔM/M0t is
    # off by <= 1.2e-4 / M0t ~ 1.2e-7 absolute, 1.3e-5 of S_ref at worst (1e-5 in practice)
    root = write_bids_dataset(tmp_path / "bids", subjects=1, model="2c", snr=math.inf, seed=1, shape=SHAPE)
    model = get_model("2c", default_protocol("2c"))
    (session,) = find_sessions(root)
    (acquisition,) = group_acquisitions(session)
    assert nib.load(str(acquisition.series[0].path)).get_data_dtype() == np.float32
    clean, mask = truth_signal(default_groundtruth_dir(root), "01", model)
    error = np.abs(derive_acquisition(acquisition)[mask] - clean).max()
    assert 0 < error < 2e-5 * reference_signal_level(model)


@pytest.mark.parametrize("model_name, noise, repeats", [("1c", "gaussian", 1), ("2c", "gaussian", 3), ("1c", "rician", 2)])
def test_noise_of_the_derived_signal_matches_the_stated_snr(tmp_path, model_name, noise, repeats):
    snr = 5.0
    root = write_bids_dataset(
        tmp_path / "bids", subjects=2, model=model_name, snr=snr, seed=11, noise=noise, repeats=repeats, shape=SHAPE
    )
    model = get_model(model_name, default_protocol(model_name))
    residuals = []
    for session in find_sessions(root):
        (acquisition,) = group_acquisitions(session)
        clean, mask = truth_signal(default_groundtruth_dir(root), session.subject, model)
        residuals.append((derive_acquisition(acquisition)[mask] - clean).ravel())
    residual = np.concatenate(residuals)
    s_ref = reference_signal_level(model)
    # ~2 × 700 brain voxels × 5-9 volumes: the std is estimated to ~1.5 %
    assert residual.std() / s_ref == pytest.approx(1.0 / snr, rel=0.06)
    assert abs(residual.mean()) < 4 * residual.std() / math.sqrt(residual.size)  # no Rician bias in ΔM
    truth = json.loads((default_groundtruth_dir(root) / "groundtruth.json").read_text())
    assert truth["sigma"] == pytest.approx(s_ref / snr) and truth["noise"] == noise and truth["repeats"] == repeats


def test_same_seed_same_files_other_seed_other_data(tmp_path):
    options = dict(subjects=2, model="2c", snr=8.0, shape=SHAPE)
    first = write_bids_dataset(tmp_path / "a", seed=5, **options)
    again = write_bids_dataset(tmp_path / "b", seed=5, **options)
    other = write_bids_dataset(tmp_path / "c", seed=6, **options)
    assert file_bytes(first) == file_bytes(again)
    assert file_bytes(default_groundtruth_dir(first)) == file_bytes(default_groundtruth_dir(again))
    a, c = file_bytes(first), file_bytes(other)
    assert a.keys() == c.keys()
    for name in a:
        if name.endswith(".nii.gz"):
            assert a[name] != c[name], name
    assert (file_bytes(default_groundtruth_dir(first))["sub-01/sub-01_cbf.nii.gz"]
            != file_bytes(default_groundtruth_dir(other))["sub-01/sub-01_cbf.nii.gz"])
    # subjects differ from each other; sub-XX is make_phantom(shape, model, seed=(seed, k))
    truth = default_groundtruth_dir(first)
    cbf1, cbf2 = load(truth / "sub-01/sub-01_cbf.nii.gz"), load(truth / "sub-02/sub-02_cbf.nii.gz")
    assert not np.array_equal(cbf1, cbf2)
    np.testing.assert_array_equal(cbf2, make_phantom(SHAPE, "2c", (5, 1)).cbf)


def test_layout_sidecars_and_ground_truth(tmp_path):
    truth_dir = tmp_path / "elsewhere" / "truth"
    root = write_bids_dataset(
        tmp_path / "bids", subjects=1, model="2c", snr=10.0, seed=0, shape=SHAPE, groundtruth_dir=truth_dir
    )
    perf = root / "sub-01" / "perf"
    assert sorted(path.name for path in perf.iterdir()) == sorted([
        "sub-01_acq-nocrush_asl.nii.gz", "sub-01_acq-nocrush_asl.json", "sub-01_acq-nocrush_aslcontext.tsv",
        "sub-01_acq-dante_asl.nii.gz", "sub-01_acq-dante_asl.json", "sub-01_acq-dante_aslcontext.tsv",
        "sub-01_acq-nocrush_m0scan.nii.gz", "sub-01_acq-nocrush_m0scan.json",
        "sub-01_acq-dante_m0scan.nii.gz", "sub-01_acq-dante_m0scan.json",
    ])
    dante = json.loads((perf / "sub-01_acq-dante_asl.json").read_text())
    assert dante["PostLabelingDelay"] == [1.0, 1.0, 1.6, 1.6, 2.2, 2.2, 2.8, 2.8]
    assert dante["LabelingDuration"] == [1.8] * 8 and dante["VascularCrushing"] is True
    assert dante["ArterialSpinLabelingType"] == "PCASL" and dante["MRAcquisitionType"] == "3D"
    assert dante["LabelingEfficiency"] == 0.85 and dante["BackgroundSuppression"] is False
    assert dante["RepetitionTimePreparation"] > 1.8 + 2.8  # the longest label + delay fits in the TR
    context = (perf / "sub-01_acq-dante_aslcontext.tsv").read_text().split()
    assert context == ["volume_type"] + ["control", "label"] * 4
    for acq in ("nocrush", "dante"):
        m0 = json.loads((perf / f"sub-01_acq-{acq}_m0scan.json").read_text())
        assert m0["RepetitionTimePreparation"] == 6.0
        assert m0["IntendedFor"] == [f"bids::sub-01/perf/sub-01_acq-{acq}_asl.nii.gz"]
    (session,) = find_sessions(root)
    assert [series.m0scan.relpath for series in session.series] == [
        "sub-01/perf/sub-01_acq-dante_m0scan.nii.gz", "sub-01/perf/sub-01_acq-nocrush_m0scan.nii.gz"]
    # the M0 image is M0t with noise: ~1000 in the brain, near zero outside; each series its own noise
    m0_image = load(perf / "sub-01_acq-dante_m0scan.nii.gz")
    assert m0_image.shape == SHAPE
    assert not np.array_equal(m0_image, load(perf / "sub-01_acq-nocrush_m0scan.nii.gz"))

    assert not default_groundtruth_dir(root).exists()
    subject = truth_dir / "sub-01"
    phantom = make_phantom(SHAPE, "2c", (0, 0))
    for name in ("cbf", "abv", "abat", "att", "m0", "territory"):
        image = nib.load(str(subject / f"sub-01_{name}.nii.gz"))
        assert image.get_data_dtype() == np.float32
        np.testing.assert_array_equal(np.asarray(image.dataobj), getattr(phantom, name))
        np.testing.assert_array_equal(image.affine, nib.load(str(perf / "sub-01_acq-dante_asl.nii.gz")).affine)
    units = {name: json.loads((subject / f"sub-01_{name}.json").read_text())["Units"] for name in ("cbf", "abv", "abat", "att")}
    assert units == {"cbf": "mL/100 g/min", "abv": "mL/mL", "abat": "s", "att": "s"}
    mask = load(subject / "sub-01_mask.nii.gz") > 0
    np.testing.assert_array_equal(mask, phantom.mask)
    assert abs(np.median(m0_image[mask]) - np.median(phantom.m0[mask])) < 10
    assert np.abs(m0_image[~mask]).max() < 0.05 * np.median(m0_image[mask])
    labels = json.loads((subject / "sub-01_dseg.json").read_text())["Labels"]
    assert labels["1"] == "grey matter" and labels["2"] == "white matter"
    truth = json.loads((truth_dir / "groundtruth.json").read_text())
    assert truth["model"] == "2c" and truth["protocol"] == default_protocol("2c").to_dict()
    entry = truth["subjects"]["sub-01"]
    assert {k: entry[k] for k in ("phantom_seed", "prolonged_transit_side")} == {
        "phantom_seed": [0, 0], "prolonged_transit_side": phantom.side}
    assert entry["model"] == truth["model"] and entry["sigma"] == truth["sigma"]
    assert entry["protocol"] == truth["protocol"]


def test_refuses_bad_arguments_and_occupied_folders(tmp_path):
    with pytest.raises(ValueError, match="must not be inside the dataset"):
        write_bids_dataset(tmp_path / "bids", shape=SHAPE, groundtruth_dir=tmp_path / "bids" / "truth")
    with pytest.raises(ValueError, match="model must be"):
        write_bids_dataset(tmp_path / "x", model="3c", shape=SHAPE)
    with pytest.raises(ValueError, match="SNR must be > 0"):
        write_bids_dataset(tmp_path / "y", snr=0.0, shape=SHAPE)
    with pytest.raises(ValueError, match="needs a protocol with both"):
        write_bids_dataset(tmp_path / "z", model="2c", protocol=default_protocol("1c"), shape=SHAPE)
    with pytest.raises(ValueError, match="sessions must be alphanumeric"):
        write_bids_dataset(tmp_path / "w", sessions=["a-1"], shape=SHAPE)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "file.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        write_bids_dataset(occupied, shape=SHAPE)
    assert (occupied / "file.txt").read_text() == "keep me"
    root = write_bids_dataset(occupied, subjects=1, shape=SHAPE, exist_ok=True)
    assert validate_dataset(root) == []



def test_mixed_models_per_subject(tmp_path):
    """One dataset with 1C subjects and a 2C (non-crushed + DANTE) subject."""
    from aslbatch import bids

    root = write_bids_dataset(tmp_path / "mix", subjects=3, model=["1c", "1c", "2c"], snr=5, seed=1, shape=(12, 14, 5))
    assert bids.validate_dataset(root) == []
    found = {s.name: [a.model for a in bids.group_acquisitions(s)] for s in bids.find_sessions(root)}
    assert found == {"sub-01": ["1c"], "sub-02": ["1c"], "sub-03": ["2c"]}
    truth = json.loads((default_groundtruth_dir(root) / "groundtruth.json").read_text())
    assert [truth["subjects"][f"sub-0{k}"]["model"] for k in (1, 2, 3)] == ["1c", "1c", "2c"]
    assert (default_groundtruth_dir(root) / "sub-03" / "sub-03_abv.nii.gz").exists()
    with pytest.raises(ValueError, match="one of them per subject"):
        write_bids_dataset(tmp_path / "bad", subjects=2, model=["1c"], snr=5)
