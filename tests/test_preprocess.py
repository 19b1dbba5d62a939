"""aslbatch.preprocess: ΔM from control/label pairs in either order, repeats, M0 by M0Type
(with the saturation-recovery correction), the brain mask, 2C pairs and slice timing.

Every dataset is written in tmp_path with a known ΔM/M0t per voxel and volume: the data are
noise-free where a test checks exact recovery, so signals must equal the truth to rounding.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from skimage.filters import threshold_otsu

from aslbatch.bids import BidsError, find_sessions, group_acquisitions
from aslbatch.phantom import make_phantom
from aslbatch.preprocess import (
    M0_SHORT_TR_S,
    PreparedData,
    average_repeats,
    brain_mask,
    m0_from_volumes,
    otsu_threshold,
    pair_difference,
    prepare_acquisition,
    saturation_recovery_factor,
)

SHAPE = (12, 12, 4)
TAU = 1.8
#: a valid PCASL sidecar (3D readout, separate M0 written by the tests)
BASE = {
    "ArterialSpinLabelingType": "PCASL",
    "MRAcquisitionType": "3D",
    "MagneticFieldStrength": 3,
    "M0Type": "Separate",
    "LabelingDuration": TAU,
    "RepetitionTimePreparation": 4.5,
    "BackgroundSuppression": False,
    "VascularCrushing": False,
}
M0_TR = 8.0  # a long M0 TR: no saturation-recovery correction


# --- phantom ------------------------------------------------------------------------------------


def sphere(shape=SHAPE) -> np.ndarray:
    """The 'brain': an ellipsoid filling 80 % of the grid along each axis."""
    grid = np.indices(shape, dtype=np.float64)
    center = (np.array(shape, dtype=np.float64) - 1) / 2
    radii = 0.4 * np.array(shape, dtype=np.float64)
    distance = np.sqrt(sum(((grid[i] - center[i]) / radii[i]) ** 2 for i in range(3)))
    return distance <= 1.0


def tissue_m0(shape=SHAPE, seed=0) -> np.ndarray:
    """M0t: 1000-1200 in the sphere, small positive values (20-30) outside."""
    rng = np.random.default_rng(seed)
    inside = sphere(shape)
    return np.where(inside, 1000 + 200 * rng.random(shape), 20 + 10 * rng.random(shape))


def truth(n_conditions: int, shape=SHAPE, seed=1) -> np.ndarray:
    """Known ΔM/M0t (x, y, z, n_conditions), 0.002-0.012, different in every voxel and volume."""
    rng = np.random.default_rng(seed)
    return 0.002 + 0.01 * rng.random((*shape, n_conditions))


def pair_volumes(signal: np.ndarray, m0t: np.ndarray, plds, order="control-label", repeats=1):
    """Control/label volumes with ΔM = signal · m0t per condition (pld k ↔ signal[..., k]).

    Returns (volumes (x, y, z, n), volume types, PLD per volume)."""
    volumes, types, delays = [], [], []
    for _ in range(repeats):
        for k, pld in enumerate(plds):
            control = 0.9 * m0t
            label = control - signal[..., k] * m0t
            first, second = (("control", control), ("label", label)) if order == "control-label" else (
                ("label", label), ("control", control))
            for kind, volume in (first, second):
                volumes.append(volume)
                types.append(kind)
                delays.append(pld)
    return np.stack(volumes, axis=-1), types, delays


# --- writing BIDS -------------------------------------------------------------------------------


def write_nifti(path: Path, data: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(data)
    data = data if data.dtype.kind in "iu" else data.astype(np.float64)  # float64: exact noise-free data
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def perf(root: Path) -> Path:
    return root / "sub-01" / "perf"


def write_series(root: Path, name: str, volumes: np.ndarray, types, plds, **fields) -> Path:
    """``<name>_asl.nii.gz`` with its sidecar (BASE + fields, None removes) and aslcontext."""
    folder = perf(root)
    nifti = write_nifti(folder / f"{name}_asl.nii.gz", volumes)
    meta = {k: v for k, v in {**BASE, "PostLabelingDelay": list(plds), **fields}.items() if v is not None}
    (folder / f"{name}_asl.json").write_text(json.dumps(meta))
    (folder / f"{name}_aslcontext.tsv").write_text("\n".join(["volume_type", *types]) + "\n")
    return nifti


def write_m0(root: Path, name: str, data: np.ndarray, repetition_time=M0_TR) -> Path:
    folder = perf(root)
    (folder / f"{name}_m0scan.json").write_text(json.dumps({"RepetitionTimePreparation": repetition_time}))
    return write_nifti(folder / f"{name}_m0scan.nii.gz", data)


def acquisition(root: Path, model="1c"):
    (session,) = find_sessions(root)
    (acq,) = group_acquisitions(session, model)
    return acq


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.10.0"}))
    return tmp_path


def one_series(root: Path, *, plds=(1.0, 2.0, 3.0), order="control-label", repeats=1, m0_tr=M0_TR, **fields):
    """A 1C dataset with a separate M0; returns (signal truth in ascending PLD, m0t)."""
    m0t = tissue_m0()
    signal = truth(len(plds))
    volumes, types, delays = pair_volumes(signal, m0t, plds, order, repeats)
    write_series(root, "sub-01", volumes, types, delays, **fields)
    write_m0(root, "sub-01", m0t * (1 - math.exp(-m0_tr / 1.3)) if m0_tr < M0_SHORT_TR_S else m0t, m0_tr)
    return signal[..., np.argsort(plds)], m0t


def check_recovers(prepared: PreparedData, signal: np.ndarray) -> None:
    np.testing.assert_allclose(prepared.signals, signal[prepared.mask], rtol=1e-5, atol=1e-9)


# --- pure helpers -------------------------------------------------------------------------------


def test_pair_difference_either_order():
    rng = np.random.default_rng(3)
    control, label = rng.random((2, 5, 3))
    cl = np.stack([control[:, 0], label[:, 0], control[:, 1], label[:, 1], control[:, 2], label[:, 2]], axis=-1)
    lc = np.stack([label[:, 0], control[:, 0], label[:, 1], control[:, 1], label[:, 2], control[:, 2]], axis=-1)
    mixed = np.stack([control[:, 0], label[:, 0], label[:, 1], control[:, 1], control[:, 2], label[:, 2]], axis=-1)
    expected = control - label
    for data, types in (
        (cl, ["control", "label"] * 3),
        (lc, ["label", "control"] * 3),
        (mixed, ["control", "label", "label", "control", "control", "label"]),
    ):
        deltam, pairs = pair_difference(data, types)
        np.testing.assert_array_equal(deltam, expected)
        assert [types[i] for i in pairs[:, 0]] == ["control"] * 3
    # other volume types in between are skipped
    data = np.concatenate([np.zeros((5, 1)), lc], axis=-1)
    deltam, pairs = pair_difference(data, ["m0scan", *(["label", "control"] * 3)])
    np.testing.assert_array_equal(deltam, expected)
    assert pairs.tolist() == [[2, 1], [4, 3], [6, 5]]


def test_pair_difference_errors_name_the_file():
    data = np.zeros((2, 3))
    with pytest.raises(BidsError, match=r"^x_aslcontext.tsv: volume_type has 2 control but 1 label volumes"):
        pair_difference(data, ["control", "label", "control"], source="x_aslcontext.tsv")
    with pytest.raises(BidsError, match=r"^ctx.tsv: volumes 0 and 1 \(counting from 0\) are both control"):
        pair_difference(np.zeros((2, 4)), ["control", "control", "label", "label"], source="ctx.tsv")
    with pytest.raises(BidsError, match="volume_type has 3 rows but the data has 4 volumes"):
        pair_difference(np.zeros((2, 4)), ["control", "label", "deltam"], source="ctx.tsv")


def test_average_repeats_order_and_means():
    rng = np.random.default_rng(4)
    volumes = rng.random((7, 6))
    tau = [1.8, 1.8, 1.8, 1.8, 1.5, 1.8]
    pld = [2.0, 1.0, 2.0, 1.0 + 1e-9, 1.0, 0.5]
    crushed = [True, False, True, False, False, False]
    averaged, protocol, counts = average_repeats(volumes, tau, pld, crushed)
    # non-crushed first, ascending PLD, ties by ascending τ; crushed after
    assert protocol.to_dict() == {
        "label_duration": [1.8, 1.5, 1.8, 1.8], "pld": [0.5, 1.0, 1.0, 2.0], "crushed": [False, False, False, True]}
    assert counts.tolist() == [1, 1, 2, 2]
    np.testing.assert_array_equal(averaged[:, 0], volumes[:, 5])
    np.testing.assert_array_equal(averaged[:, 1], volumes[:, 4])
    np.testing.assert_allclose(averaged[:, 2], volumes[:, [1, 3]].mean(axis=1))
    np.testing.assert_allclose(averaged[:, 3], volumes[:, [0, 2]].mean(axis=1))
    # a NaN stays in its own condition
    volumes[0, 5] = np.nan
    averaged, _, _ = average_repeats(volumes, tau, pld, crushed)
    assert np.isnan(averaged[0, 0]) and np.isfinite(averaged[0, 1:]).all()


def test_saturation_recovery_factor_closed_form():
    assert saturation_recovery_factor(3.0, 1.3) == pytest.approx(1 - math.exp(-3.0 / 1.3), rel=1e-15)
    assert saturation_recovery_factor(M0_SHORT_TR_S, 1.3) == 1.0
    assert saturation_recovery_factor(None, 1.3) == 1.0
    volumes = np.full((2, 2, 2, 3), 10.0)
    volumes[..., 1] = 40.0
    np.testing.assert_allclose(m0_from_volumes(volumes, 2.0, 1.2), 20.0 / (1 - math.exp(-2.0 / 1.2)))
    np.testing.assert_allclose(m0_from_volumes(volumes[..., 0], 6.0, 1.2), 10.0)


def test_otsu_threshold_splits_two_classes():
    rng = np.random.default_rng(7)
    values = np.concatenate([rng.normal(10, 2, 5000), rng.normal(100, 5, 1000)])
    assert 25 < otsu_threshold(values) < 85
    assert otsu_threshold(np.full(10, 3.0)) == 3.0


def test_otsu_threshold_matches_scikit_image():
    """skimage.filters.threshold_otsu on the same clipped values and 256 bins returns the
    centre of the dark class's last bin: ours is that bin's upper edge (half a bin higher), or
    further up the empty gap when the classes are apart; either way the same split."""
    rng = np.random.default_rng(12)
    for k in range(40):
        dark = rng.normal(rng.uniform(0, 50), rng.uniform(1, 20), int(rng.integers(500, 5000)))
        bright = rng.normal(rng.uniform(60, 900), rng.uniform(5, 80), int(rng.integers(200, 3000)))
        values = np.concatenate([dark, bright])
        clipped = np.clip(values, values.min(), np.percentile(values, 99.9))
        edge = threshold_otsu(clipped, nbins=256) + 0.5 * (clipped.max() - clipped.min()) / 256
        ours = otsu_threshold(values)
        np.testing.assert_array_equal(values > ours, values > edge)
        gap = values[(values > edge) & (values <= ours)]
        assert ours == pytest.approx(edge, rel=1e-12) or (ours > edge and gap.size == 0)


def noisy_image(foreground: np.ndarray, seed: int, level=1000.0, sigma=30.0) -> np.ndarray:
    """``level`` inside ``foreground``, 0 outside, plus Rician noise of ``sigma``."""
    rng = np.random.default_rng(seed)
    clean = np.where(foreground, level, 0.0)
    return np.hypot(clean + sigma * rng.standard_normal(clean.shape), sigma * rng.standard_normal(clean.shape))


def test_brain_mask_keeps_the_largest_of_two_components():
    shape = (30, 20, 8)
    big, small = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    big[12:27, 3:17, 1:7] = True
    small[2:7, 5:10, 2:6] = True  # separated from the big box by background
    np.testing.assert_array_equal(brain_mask(noisy_image(big | small, 13)), big)
    # touching only along an edge (not a face) is two components under 6-connectivity
    diagonal = np.zeros(shape, dtype=bool)
    diagonal[7:12, 0:3, 1:7] = True  # shares the edge x 11|12, y 2|3 with the big box
    np.testing.assert_array_equal(brain_mask(noisy_image(big | diagonal, 14)), big)
    # two equal boxes: the one met first in C order
    first, second = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    first[2:8, 2:8, 1:5] = True
    second[15:21, 2:8, 1:5] = True
    np.testing.assert_array_equal(brain_mask(noisy_image(first | second, 15)), first)


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_brain_mask_fills_holes_slice_by_slice(slice_axis):
    """A bright box with a dark tunnel running through it along the slice axis: in every slice
    the tunnel is a hole enclosed by brain (filled), though in 3-D it reaches the box's
    faces; a dark notch open to the box's side in a slice stays out."""
    shape = [16, 18, 14]
    box = np.zeros(shape, dtype=bool)
    box[2:14, 3:15, 2:12] = True
    dark = np.zeros(shape, dtype=bool)
    tunnel = [slice(7, 10), slice(8, 11), slice(6, 9)]
    tunnel[slice_axis] = slice(None)  # along the slice axis, through the whole grid
    dark[tuple(tunnel)] = True
    notch = [slice(2, 6), slice(3, 7), slice(2, 6)]  # a corner of the box, open in every plane
    dark[tuple(notch)] = True
    mask = brain_mask(noisy_image(box & ~dark, 16), slice_axis=slice_axis)
    expected = box.copy()
    expected[tuple(notch)] = False
    np.testing.assert_array_equal(mask, expected)
    other = (slice_axis + 1) % 3  # across another axis the tunnel is no hole: it stays out
    np.testing.assert_array_equal(brain_mask(noisy_image(box & ~dark, 16), slice_axis=other), box & ~dark)


def test_brain_mask_of_a_phantom_is_its_brain():
    for model, seed in (("1c", 0), ("2c", 3)):
        phantom = make_phantom((32, 36, 10), model, seed=seed)
        np.testing.assert_array_equal(brain_mask(phantom.m0), phantom.mask)


def test_brain_mask_excludes_background_noise_and_keeps_the_sphere(caplog):
    shape = (32, 32, 14)
    rng = np.random.default_rng(8)
    inside = sphere(shape)
    m0 = np.where(inside, 900 + 300 * rng.random(shape), 0.0)
    m0[inside & (rng.random(shape) < 0.02)] = 150.0  # dark specks inside the brain
    sigma = 40.0  # Rician noise everywhere
    noisy = np.hypot(m0 + sigma * rng.standard_normal(shape), sigma * rng.standard_normal(shape))
    noisy[0, 0, 0] = 5000.0  # a bright outlier in the background (its own component)
    with caplog.at_level(logging.INFO, logger="aslbatch.preprocess"):
        mask = brain_mask(noisy)
    dice = 2 * (mask & inside).sum() / (mask.sum() + inside.sum())
    assert dice > 0.95
    assert not mask[0, 0, 0]
    far = ~ndimage.binary_dilation(inside, iterations=1)
    assert not (mask & far).any()  # no background voxel away from the brain
    assert not caplog.records  # a brain has contrast: nothing to say


def test_constant_image_gives_every_finite_positive_voxel(caplog):
    """Issue 13 point 5: a constant M0 has no contrast for Otsu to split; the mask is every
    finite voxel > 0, with a warning naming the image."""
    shape = (10, 12, 5)
    image = np.full(shape, 7.0)
    image[1, 2, 3] = image[4, 4, 0] = np.nan
    with caplog.at_level(logging.WARNING, logger="aslbatch.preprocess"):
        np.testing.assert_array_equal(brain_mask(image, source="the M0 of x.nii.gz"), np.isfinite(image))
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and record.name == "aslbatch.preprocess"
    assert "the M0 of x.nii.gz" in record.getMessage() and "no contrast" in record.getMessage()
    assert f"({image.size - 2} voxel(s))" in record.getMessage()
    assert brain_mask(np.full(shape, 7.0)).all()
    assert not brain_mask(np.full(shape, np.nan)).any()
    # zero or negative voxels at the grid's edge: Otsu splits them off, the rest is the mask (the
    # NaN voxels are holes in their slices: filled; prepare_acquisition drops them with M0 <= 0)
    image[0, 0, 0], image[9, 5, 4] = 0.0, -2.0
    expected = np.ones(shape, dtype=bool)
    expected[0, 0, 0] = expected[9, 5, 4] = False
    np.testing.assert_array_equal(brain_mask(image), expected)


@pytest.mark.parametrize("variation", ["few voxels", "noise"])
def test_near_constant_image_gives_every_finite_positive_voxel(variation):
    rng = np.random.default_rng(17)
    shape = (14, 12, 6)
    image = np.full(shape, 1000.0)
    if variation == "few voxels":  # a few voxels a noise level away: Otsu splits them off
        image.flat[rng.choice(image.size, 5, replace=False)] += 1.0
    else:  # Rician noise at an M0 SNR of 5 (σ = 200): unimodal, no background to split off
        image = np.hypot(image + 200 * rng.standard_normal(shape), 200 * rng.standard_normal(shape))
    assert brain_mask(image).all()


# --- ΔM and repeats through prepare_acquisition --------------------------------------------------


@pytest.mark.parametrize("order", ["control-label", "label-control"])
def test_control_label_in_either_order(root, order):
    signal, m0t = one_series(root, order=order)
    prepared = prepare_acquisition(acquisition(root))
    np.testing.assert_array_equal(prepared.mask, sphere())
    check_recovers(prepared, signal)
    assert prepared.protocol.to_dict() == {"label_duration": [TAU] * 3, "pld": [1.0, 2.0, 3.0], "crushed": [False] * 3}
    assert prepared.signals.dtype == np.float64 and prepared.signals.flags.c_contiguous
    assert any(("control first" if order == "control-label" else "label first") in note for note in prepared.notes)
    np.testing.assert_allclose(prepared.m0, m0t, rtol=1e-6)
    assert prepared.shape == SHAPE and prepared.slice_offsets.shape == (prepared.n_voxels,)
    assert not prepared.slice_offsets.any()  # 3D readout
    assert prepared.source_files == (
        "sub-01/perf/sub-01_asl.nii.gz", "sub-01/perf/sub-01_aslcontext.tsv", "sub-01/perf/sub-01_m0scan.nii.gz")
    assert (prepared.model, prepared.source_name) == ("1c", "sub-01")
    back = prepared.unmask(prepared.signals)
    assert back.shape == (*SHAPE, 3) and np.isnan(back[~prepared.mask]).all()


def test_repeats_are_averaged(root):
    rng = np.random.default_rng(9)
    m0t = tissue_m0()
    plds = [2.0, 1.0]
    volumes, types, delays = pair_volumes(truth(2), m0t, plds, repeats=3)
    volumes = volumes + rng.normal(0, 5, volumes.shape)  # every repeat differs
    write_series(root, "sub-01", volumes, types, delays)
    write_m0(root, "sub-01", m0t)
    prepared = prepare_acquisition(acquisition(root))
    mask = prepared.mask
    deltam = volumes[..., 0::2] - volumes[..., 1::2]  # control first
    per_pair = deltam[mask] / m0t[mask][:, None]
    pair_pld = np.array(delays[0::2])
    expected = np.stack([per_pair[:, pair_pld == pld].mean(axis=1) for pld in (1.0, 2.0)], axis=1)
    np.testing.assert_allclose(prepared.signals, expected, rtol=1e-5, atol=1e-9)
    assert prepared.protocol.pld.tolist() == [1.0, 2.0]
    assert any("repeats per condition [3, 3]" in note for note in prepared.notes)


def test_deltam_volumes_used_and_cbf_norf_ignored(root):
    m0t = tissue_m0()
    signal = truth(3)
    deltam = signal * m0t[..., None]
    junk = np.full((*SHAPE, 1), 1e6)  # cbf / noRF volumes must not reach the signals
    volumes = np.concatenate([m0t[..., None], deltam[..., [2]], junk, deltam[..., [0, 1]], junk], axis=-1)
    types = ["m0scan", "deltam", "cbf", "deltam", "deltam", "noRF"]
    plds = [0.0, 2.5, 2.5, 0.5, 1.5, 0.0]
    write_series(root, "sub-01", volumes, types, plds, M0Type="Included",
                 LabelingDuration=[0, TAU, TAU, TAU, TAU, 0], RepetitionTimePreparation=M0_TR)
    prepared = prepare_acquisition(acquisition(root))
    check_recovers(prepared, signal)
    assert prepared.protocol.pld.tolist() == [0.5, 1.5, 2.5]
    notes = "\n".join(prepared.notes)
    assert "3 deltam volume(s) used as they are" in notes
    assert "1 cbf volume(s) ignored" in notes and "1 noRF volume(s) ignored" in notes


def test_mixed_pairs_and_deltam_are_combined(root):
    m0t = tissue_m0()
    signal = truth(2)
    pairs, types, plds = pair_volumes(signal, m0t, [1.0, 2.0])
    volumes = np.concatenate([pairs, (signal[..., [1]] * m0t[..., None])], axis=-1)
    write_series(root, "sub-01", volumes, [*types, "deltam"], [*plds, 2.0])
    write_m0(root, "sub-01", m0t)
    prepared = prepare_acquisition(acquisition(root))
    check_recovers(prepared, signal)  # the deltam repeat of PLD 2 s averages with the pair: the same value


# --- M0 by M0Type -------------------------------------------------------------------------------


@pytest.mark.parametrize("m0_type", ["Separate", "Included", "Estimate"])
def test_m0_types_recover_the_truth(root, m0_type):
    signal = truth(2)
    plds = [1.5, 0.5]
    if m0_type == "Estimate":
        m0_blood = 1234.0
        m0t = np.full(SHAPE, 0.9 * m0_blood)  # M0t = λ · M0Estimate
        image = tissue_m0()  # the control image carries the anatomy for the mask
        volumes, types, delays = pair_volumes(signal, m0t, plds)
        volumes[..., [i for i, t in enumerate(types) if t == "control"]] = image[..., None] + 1e3
        volumes[..., [i for i, t in enumerate(types) if t == "label"]] = (
            image[..., None] + 1e3 - signal * m0t[..., None])
        write_series(root, "sub-01", volumes, types, delays, M0Type="Estimate", M0Estimate=m0_blood)
    else:
        m0t = tissue_m0()
        volumes, types, delays = pair_volumes(signal, m0t, plds)
        if m0_type == "Included":
            volumes = np.concatenate([m0t[..., None], m0t[..., None], volumes], axis=-1)
            types, delays = ["m0scan", "m0scan", *types], [0.0, 0.0, *delays]
            write_series(root, "sub-01", volumes, types, delays, M0Type="Included",
                         LabelingDuration=[0, 0] + [TAU] * 4, RepetitionTimePreparation=M0_TR)
        else:
            write_series(root, "sub-01", volumes, types, delays)
            write_m0(root, "sub-01", np.stack([m0t * 0.98, m0t * 1.02], axis=-1))  # averaged
    prepared = prepare_acquisition(acquisition(root))
    np.testing.assert_array_equal(prepared.mask, sphere())
    check_recovers(prepared, signal[..., [1, 0]])
    np.testing.assert_allclose(prepared.m0, m0t, rtol=1e-6)


@pytest.mark.parametrize("m0_type", ["Separate", "Included"])
def test_short_m0_tr_gets_the_saturation_recovery_correction(root, m0_type):
    tr, t1t = 2.5, 1.4
    m0t = tissue_m0()
    measured = m0t * (1 - math.exp(-tr / t1t))  # saturation recovery
    signal = truth(2)
    volumes, types, delays = pair_volumes(signal, m0t, [1.0, 2.0])
    if m0_type == "Separate":
        write_series(root, "sub-01", volumes, types, delays)
        write_m0(root, "sub-01", measured, repetition_time=tr)
    else:
        write_series(root, "sub-01", np.concatenate([measured[..., None], volumes], axis=-1), ["m0scan", *types],
                     [0.0, *delays], M0Type="Included", LabelingDuration=[0] + [TAU] * 4,
                     RepetitionTimePreparation=[tr] + [4.5] * 4)
    prepared = prepare_acquisition(acquisition(root), overrides={"t1t": t1t})
    stored = np.asarray(nib.load(str(perf(root) / (
        "sub-01_m0scan.nii.gz" if m0_type == "Separate" else "sub-01_asl.nii.gz"))).dataobj, dtype=np.float64)
    stored = stored if stored.ndim == 3 else stored[..., 0]
    np.testing.assert_allclose(prepared.m0, stored / (1 - math.exp(-tr / t1t)), rtol=1e-12)
    check_recovers(prepared, signal)
    assert any("saturation-recovery factor" in note for note in prepared.notes)


def test_long_m0_tr_is_not_corrected(root):
    signal, m0t = one_series(root, m0_tr=6.0)
    prepared = prepare_acquisition(acquisition(root))
    np.testing.assert_allclose(prepared.m0, m0t, rtol=1e-6)
    assert not any("saturation-recovery" in note for note in prepared.notes)


def test_m0_shape_mismatch_names_the_m0scan_when_refused_and_is_resampled_by_default(root):
    """Issue 14.3: an M0 of another shape is another grid: refused naming the m0scan, or (the
    default) resampled onto the ASL grid; with one more slice on the same voxel positions the
    resampled M0 is the original's first four slices exactly."""
    m0t = tissue_m0()
    signal = truth(1)
    volumes, types, delays = pair_volumes(signal, m0t, [1.0])
    write_series(root, "sub-01", volumes, types, delays)
    write_m0(root, "sub-01", np.concatenate([m0t, m0t[..., :1]], axis=2))  # shape (12, 12, 5)
    with pytest.raises(BidsError, match=r"^sub-01/perf/sub-01_m0scan.nii.gz: the m0scan is on another grid "
                                        r"\(shape \(12, 12, 5\).*refused"):
        prepare_acquisition(acquisition(root), on_grid_mismatch="refuse")
    prepared = prepare_acquisition(acquisition(root))
    np.testing.assert_allclose(prepared.m0, m0t, rtol=1e-12)
    check_recovers(prepared, signal)
    assert any("resampled onto the ASL grid" in note for note in prepared.notes)


def test_nonpositive_m0_voxels_are_excluded_with_a_note(root, tmp_path):
    m0t = tissue_m0()
    m0t[5, 5, 1] = 0.0
    m0t[6, 5, 1] = -3.0
    volumes, types, delays = pair_volumes(truth(1), m0t, [1.0])
    write_series(root, "sub-01", volumes, types, delays)
    write_m0(root, "sub-01", m0t)
    mask_file = write_nifti(tmp_path / "mask.nii.gz", sphere().astype(np.uint8))
    prepared = prepare_acquisition(acquisition(root), mask_path=mask_file)
    assert not prepared.mask[5, 5, 1] and not prepared.mask[6, 5, 1]
    assert prepared.mask.sum() == sphere().sum() - 2
    assert "2 voxel(s) of the mask excluded: M0 <= 0 or not finite" in prepared.notes
    assert np.isfinite(prepared.signals).all()


def test_background_suppression_enters_only_the_constants(root):
    signal, _ = one_series(root, BackgroundSuppression=True, BackgroundSuppressionNumberPulses=4)
    plain = prepare_acquisition(acquisition(root))
    corrected = prepare_acquisition(acquisition(root), background_suppression_correction=True)
    assert plain.constants.alpha_bs == 1.0
    assert corrected.constants.alpha_bs == pytest.approx(0.95**4)
    np.testing.assert_array_equal(corrected.signals, plain.signals)  # the data are not rescaled
    check_recovers(corrected, signal)
    assert any("Constants.alpha_bs" in note for note in corrected.notes)


def test_estimate_deltam_only_draws_the_mask_from_the_mean_deltam(root):
    m0_blood = 800.0
    signal = truth(2) * sphere()[..., None]  # no perfusion outside the brain
    deltam = signal * 0.9 * m0_blood
    write_series(root, "sub-01", deltam, ["deltam", "deltam"], [1.0, 2.0], M0Type="Estimate", M0Estimate=m0_blood)
    prepared = prepare_acquisition(acquisition(root))
    inside = sphere()
    assert not (prepared.mask & ~inside).any()
    assert 2 * (prepared.mask & inside).sum() / (prepared.mask.sum() + inside.sum()) > 0.95
    check_recovers(prepared, signal)
    assert any("mask comes from the mean ΔM" in note for note in prepared.notes)


# --- masks --------------------------------------------------------------------------------------


def test_computed_mask_through_prepare_excludes_noise(root):
    shape = (24, 24, 10)
    rng = np.random.default_rng(10)
    inside = sphere(shape)
    sigma = 30.0
    m0 = np.where(inside, 1000 + 200 * rng.random(shape), 0.0)
    m0 = np.hypot(m0 + sigma * rng.standard_normal(shape), sigma * rng.standard_normal(shape))
    signal = truth(2, shape)
    volumes, types, delays = pair_volumes(signal, m0, [1.0, 2.0])
    write_series(root, "sub-01", volumes, types, delays)
    write_m0(root, "sub-01", m0)
    prepared = prepare_acquisition(acquisition(root))
    dice = 2 * (prepared.mask & inside).sum() / (prepared.mask.sum() + inside.sum())
    assert dice > 0.95
    check_recovers(prepared, signal)
    assert any(note.startswith("brain mask computed from the M0 image of sub-01/perf/sub-01_asl.nii.gz")
               for note in prepared.notes)


def test_constant_included_m0_gives_every_voxel_with_a_note(root, caplog):
    """Issue 13 point 5: deltam volumes with one constant included M0 (a numerical phantom)
    used to fail with 'no voxel left in the brain mask'; every voxel is fitted now."""
    signal = truth(2)
    m0t = np.full(SHAPE, 1500.0)
    volumes = np.concatenate([m0t[..., None], signal * m0t[..., None]], axis=-1)
    write_series(root, "sub-01", volumes, ["m0scan", "deltam", "deltam"], [0.0, 1.0, 2.0], M0Type="Included",
                 LabelingDuration=[0, TAU, TAU], RepetitionTimePreparation=M0_TR)
    with caplog.at_level(logging.WARNING, logger="aslbatch.preprocess"):
        prepared = prepare_acquisition(acquisition(root))
    assert prepared.mask.all()
    check_recovers(prepared, signal)
    (note,) = [note for note in prepared.notes if note.startswith("brain mask computed")]
    assert note == ("brain mask computed from the M0 image of sub-01/perf/sub-01_asl.nii.gz (no contrast to split "
                    f"(all values are equal): every finite voxel > 0): {math.prod(SHAPE)} voxel(s)")
    assert any("sub-01/perf/sub-01_asl.nii.gz" in r.getMessage() and "no contrast" in r.getMessage()
               for r in caplog.records)


def test_given_mask_is_used_and_a_wrong_shape_names_the_file(root, tmp_path):
    signal, _ = one_series(root)
    given = np.zeros(SHAPE, dtype=np.uint8)
    given[2:5, 3:7, 1:3] = 1
    mask_file = write_nifti(tmp_path / "mask.nii.gz", given)
    prepared = prepare_acquisition(acquisition(root), mask_path=mask_file)
    np.testing.assert_array_equal(prepared.mask, given.astype(bool))
    check_recovers(prepared, signal)
    assert str(mask_file) in prepared.source_files
    wrong = write_nifti(tmp_path / "wrong.nii.gz", np.ones((12, 12, 3)))
    with pytest.raises(BidsError, match=rf"^{wrong}: the mask is on another grid \(shape \(12, 12, 3\).*than the "
                                        r"ASL series \(shape \(12, 12, 4\).*refused"):
        prepare_acquisition(acquisition(root), mask_path=wrong, on_grid_mismatch="refuse")
    # resampled (the default, nearest neighbour): slices 0-2 inside, slice 3 outside the mask's field of view
    resampled = prepare_acquisition(acquisition(root), mask_path=wrong)
    np.testing.assert_array_equal(resampled.mask[..., :3], True)
    assert not resampled.mask[..., 3].any()
    with pytest.raises(BidsError, match=r"nope.nii.gz: mask file does not exist"):
        prepare_acquisition(acquisition(root), mask_path=tmp_path / "nope.nii.gz")
    empty = write_nifti(tmp_path / "empty.nii.gz", np.zeros(SHAPE))
    with pytest.raises(BidsError, match=rf"^{empty}: no voxel left in the brain mask"):
        prepare_acquisition(acquisition(root), mask_path=empty)


# --- 2C pairs and slice timing ------------------------------------------------------------------


def write_pair(root: Path, plain_fields=None, crushed_fields=None):
    """A non-crushed series (PLDs 0.5, 0.2, repeated twice) and a crushed one (PLDs 1.6, 1.0),
    label first in the crushed one; returns the truth in the documented output order."""
    m0t = tissue_m0()
    plain_signal, crushed_signal = truth(2, seed=11), truth(2, seed=12)
    volumes, types, delays = pair_volumes(plain_signal, m0t, [0.5, 0.2], repeats=2)
    write_series(root, "sub-01_acq-nocrush", volumes, types, delays, **(plain_fields or {}))
    write_m0(root, "sub-01_acq-nocrush", m0t)
    volumes, types, delays = pair_volumes(crushed_signal, m0t, [1.6, 1.0], order="label-control")
    write_series(root, "sub-01_acq-dante", volumes, types, delays, VascularCrushing=True, **(crushed_fields or {}))
    write_m0(root, "sub-01_acq-dante", m0t)
    return np.concatenate([plain_signal[..., [1, 0]], crushed_signal[..., [1, 0]]], axis=-1)


def test_2c_pair_in_the_documented_order(root):
    expected = write_pair(root)
    acq = acquisition(root, "2c")
    prepared = prepare_acquisition(acq)
    assert prepared.protocol.to_dict() == {
        "label_duration": [TAU] * 4, "pld": [0.2, 0.5, 1.0, 1.6], "crushed": [False, False, True, True]}
    check_recovers(prepared, expected)
    assert prepared.model == "2c" and prepared.source_name == "sub-01"
    assert "sub-01/perf/sub-01_acq-dante_m0scan.nii.gz" in prepared.source_files


def test_2c_pair_on_different_grids_or_constants_raises(root, tmp_path):
    write_pair(root)
    nifti = perf(root) / "sub-01_acq-dante_asl.nii.gz"
    image = nib.load(str(nifti))
    shifted = image.affine.copy()
    shifted[0, 3] += 2.0
    write_nifti(nifti, np.asarray(image.dataobj), shifted)
    m0_file = perf(root) / "sub-01_acq-dante_m0scan.nii.gz"
    write_nifti(m0_file, np.asarray(nib.load(str(m0_file)).dataobj), shifted)  # its M0 on its grid
    with pytest.raises(BidsError, match=r"^sub-01/perf/sub-01_acq-dante_asl.nii.gz: the series \(paired with "
                                        r"sub-01/perf/sub-01_acq-nocrush_asl.nii.gz\) is on another grid"):
        prepare_acquisition(acquisition(root, "2c"), on_grid_mismatch="refuse")
    other = tmp_path / "other"
    other.mkdir()
    write_pair(other, crushed_fields={"MagneticFieldStrength": 1.5})
    with pytest.raises(BidsError, match=r"^sub-01/perf/sub-01_acq-dante_asl.nii.gz: its metadata give the model "
                                        r"constants .*'t1b': 1.35"):
        prepare_acquisition(acquisition(other, "2c"))


def test_2d_slice_timing_gives_per_voxel_offsets(root):
    timing = [0.0, 0.04, 0.08, 0.12]
    write_pair(root, {"MRAcquisitionType": "2D", "SliceTiming": timing},
               {"MRAcquisitionType": "2D", "SliceTiming": timing})
    prepared = prepare_acquisition(acquisition(root, "2c"))
    z = np.nonzero(prepared.mask)[2]
    np.testing.assert_allclose(prepared.slice_offsets, np.array(timing)[z])
    grid = prepared.unmask(prepared.slice_offsets)
    for k in range(SHAPE[2]):
        assert np.allclose(grid[..., k][prepared.mask[..., k]], timing[k])


def test_slice_timing_along_another_axis(root):
    timing = [0.03 * i for i in range(SHAPE[0])][::-1]
    one_series(root, MRAcquisitionType="2D", SliceTiming=timing, SliceEncodingDirection="i")
    prepared = prepare_acquisition(acquisition(root))
    x = np.nonzero(prepared.mask)[0]
    np.testing.assert_allclose(prepared.slice_offsets, np.array(timing)[x] - min(timing))


def test_2c_pair_with_different_slice_timing_raises(root):
    write_pair(root, {"MRAcquisitionType": "2D", "SliceTiming": [0.0, 0.04, 0.08, 0.12]},
               {"MRAcquisitionType": "2D", "SliceTiming": [0.0, 0.05, 0.10, 0.15]})
    with pytest.raises(BidsError, match=r"^sub-01/perf/sub-01_acq-dante_asl.json: slice timing .* differs from that "
                                        r"of sub-01/perf/sub-01_acq-nocrush_asl.nii.gz"):
        prepare_acquisition(acquisition(root, "2c"))


# --- input errors -------------------------------------------------------------------------------


def test_unpaired_control_label_counts_name_the_aslcontext(root):
    m0t = tissue_m0()
    volumes, types, delays = pair_volumes(truth(2), m0t, [1.0, 2.0])
    write_series(root, "sub-01", volumes[..., :3], types[:3], delays[:3])
    write_m0(root, "sub-01", m0t)
    with pytest.raises(BidsError, match=r"^sub-01/perf/sub-01_aslcontext.tsv: volume_type has 2 control but 1 "
                                        r"label volumes"):
        prepare_acquisition(acquisition(root))


def test_neighbours_of_the_same_type_name_the_aslcontext(root):
    m0t = tissue_m0()
    volumes, _, delays = pair_volumes(truth(2), m0t, [1.0, 1.0])
    write_series(root, "sub-01", volumes, ["control", "control", "label", "label"], delays)
    write_m0(root, "sub-01", m0t)
    with pytest.raises(BidsError, match=r"^sub-01/perf/sub-01_aslcontext.tsv: volumes 0 and 1 .* both control"):
        prepare_acquisition(acquisition(root))


def test_pair_with_different_plds_names_the_aslcontext(root):
    m0t = tissue_m0()
    volumes, types, _ = pair_volumes(truth(1), m0t, [1.0])
    write_series(root, "sub-01", volumes, types, [1.0, 1.5])
    write_m0(root, "sub-01", m0t)
    with pytest.raises(BidsError, match=r"^sub-01/perf/sub-01_aslcontext.tsv: control volume 0 and label volume 1 "
                                        r"form a pair but have different"):
        prepare_acquisition(acquisition(root))


def test_nothing_to_fit_and_unreadable_data(root):
    m0t = tissue_m0()
    write_series(root, "sub-01", np.stack([m0t, m0t], axis=-1), ["cbf", "noRF"], [1.0, 0.0])
    write_m0(root, "sub-01", m0t)
    with pytest.raises(BidsError, match=r"^sub-01/perf/sub-01_aslcontext.tsv: volume_type lists no control/label "
                                        r"pair and no deltam volume"):
        prepare_acquisition(acquisition(root))
    volumes, types, delays = pair_volumes(truth(1), m0t, [1.0])
    nifti = write_series(root, "sub-01", volumes, types, delays)
    acq = acquisition(root)
    data = nifti.read_bytes()
    nifti.write_bytes(data[: len(data) // 2])  # truncated after the header was read
    with pytest.raises(BidsError, match=r"^sub-01/perf/sub-01_asl.nii.gz: cannot read the NIfTI data"):
        prepare_acquisition(acq)


def test_missing_metadata_names_the_sidecar(root):
    one_series(root, MagneticFieldStrength=None)
    with pytest.raises(BidsError, match=r"^sub-01/perf/sub-01_asl.json: MagneticFieldStrength is missing"):
        prepare_acquisition(acquisition(root))
    prepared = prepare_acquisition(acquisition(root), overrides={"t1b": 1.6})  # the override needs no field
    assert prepared.constants.t1b == 1.6


def test_prepare_with_checked_metadata_reads_no_sidecar(root, monkeypatch):
    """The pipeline reads each sidecar once (bids.check_series) and hands the records on:
    preparing with them gives the same data without a single sidecar lookup."""
    from aslbatch import bids

    timing = [0.0, 0.04, 0.08, 0.12]
    write_pair(root, {"MRAcquisitionType": "2D", "SliceTiming": timing},
               {"MRAcquisitionType": "2D", "SliceTiming": timing})
    acq = acquisition(root, "2c")
    reference = prepare_acquisition(acq)
    records = [bids.series_metadata(series) for series in acq.series]

    def no_lookup(self, key):
        raise AssertionError(f"sidecar field {key} read during preprocessing")

    monkeypatch.setattr(bids.Sidecar, "__getitem__", no_lookup)
    prepared = prepare_acquisition(acq, records)
    np.testing.assert_array_equal(prepared.signals, reference.signals)
    np.testing.assert_array_equal(prepared.slice_offsets, reference.slice_offsets)
    np.testing.assert_array_equal(prepared.mask, reference.mask)
    assert prepared.protocol == reference.protocol and prepared.constants == reference.constants
    assert prepared.notes == reference.notes
    with pytest.raises(ValueError, match="1 metadata records for 2 series"):
        prepare_acquisition(acq, records[:1])


def test_2c_pair_stored_with_other_axes_is_reoriented_exactly_with_its_slice_timing(root, tmp_path):
    """Issue 14.3: the crushed series and its M0 stored with x and y swapped and z reversed (and
    its SliceTiming in that stored order) give exactly the signals and per-voxel slice offsets
    of the pair stored alike; the same series shifted 2 mm cannot be resampled with 2D slice
    timing and is refused whatever the policy."""
    timing = [0.0, 0.04, 0.08, 0.12]
    fields = {"MRAcquisitionType": "2D", "SliceTiming": timing}
    expected = write_pair(root, fields, fields)
    reference = prepare_acquisition(acquisition(root, "2c"))
    check_recovers(reference, expected)
    ornt = np.array([[1, 1], [0, 1], [2, -1]])  # x -> y, y -> x, z reversed
    for name in ("sub-01_acq-dante_asl", "sub-01_acq-dante_m0scan"):
        path = perf(root) / f"{name}.nii.gz"
        stored = nib.load(str(path)).as_reoriented(ornt)
        write_nifti(path, np.asarray(stored.dataobj), stored.affine)
    sidecar = perf(root) / "sub-01_acq-dante_asl.json"
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "SliceTiming": timing[::-1]}))
    prepared = prepare_acquisition(acquisition(root, "2c"), on_grid_mismatch="refuse")
    np.testing.assert_array_equal(prepared.mask, reference.mask)
    np.testing.assert_array_equal(prepared.signals, reference.signals)
    np.testing.assert_array_equal(prepared.slice_offsets, reference.slice_offsets)
    assert any("sub-01_acq-dante_asl.nii.gz: the series (paired with sub-01/perf/sub-01_acq-nocrush_asl.nii.gz) "
               "is the ASL series' grid stored with other axes" in note for note in prepared.notes)
    for name in ("sub-01_acq-dante_asl", "sub-01_acq-dante_m0scan"):
        path = perf(root) / f"{name}.nii.gz"
        image = nib.load(str(path))
        shifted = image.affine.copy()
        shifted[0, 3] += 2.0
        write_nifti(path, np.asarray(image.dataobj), shifted)
    with pytest.raises(BidsError, match=r"^sub-01/perf/sub-01_acq-dante_asl.nii.gz: the series is on another grid .* "
                                        r"has 2D slice timing, which a resampling cannot carry"):
        prepare_acquisition(acquisition(root, "2c"))
