"""The spatial network and its evaluation: patch gathering against a direct loop, out-of-mask handling,
the training prior, the spatial phantom's designed truth, the edge and lesion metrics on hand-made
cases, the file round trip and the protocol refusal."""

import json

import numpy as np
import pytest

from aslbatch.estimators import get_estimator
from aslbatch.estimators.patches import (NEIGHBOURS, PRIOR_VERSION, gather_patches, n_patch_inputs, neighbour_offsets,
                                         neighbour_rows, normalise_patches, plane_axes, simulate_patches)
from aslbatch.estimators.store import NetworkMismatch, load_network, save_network
from aslbatch.evaluate import METHODS as VOXELWISE_METHODS
from aslbatch.evaluate_spatial import edge_error, lesion_contrast, region_errors, smooth_signals
from aslbatch.models import get_model
from aslbatch.protocol import Protocol, default_protocol
from aslbatch.spatial_phantom import LESION_CBF_RATIO, TERRITORY_LABEL, WM, make_spatial_phantom

TINY = {"n_samples": 3000, "max_epochs": 2, "hidden_layers": (8,)}


@pytest.fixture(scope="module")
def model():
    return get_model("1c", default_protocol("1c"))


@pytest.fixture(scope="module")
def tiny(model):
    return get_estimator("spatial", model, **TINY).fit()


def log_cbf_back(params):
    """The network's output has log(cbf + 5) in place of cbf (column 0): cbf = exp(output) - 5."""
    params[:, 0] = np.exp(params[:, 0]) - 5.0
    return params


def _random_mask(shape, seed):
    return np.random.default_rng(seed).uniform(size=shape) < 0.6


# --- gathering ----------------------------------------------------------------------------------


def test_neighbour_offsets_are_the_patch_row_major_without_its_centre():
    """The input order stored networks rely on: the 3x3 layout as documented, and 5x5 the same rule."""
    assert NEIGHBOURS == neighbour_offsets(1) == ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
    five = neighbour_offsets(2)
    assert len(five) == 24 and five[:5] == ((-2, -2), (-2, -1), (-2, 0), (-2, 1), (-2, 2)) and five[12] == (0, 1)
    assert n_patch_inputs(5, 1) == 9 * 5 + 8 + 1 and n_patch_inputs(5, 2) == 25 * 5 + 24 + 1
    with pytest.raises(ValueError, match="radius"):
        neighbour_offsets(0)


def test_1c_reads_the_5x5_patch_and_2c_the_3x3_patch(model):
    assert get_estimator("spatial", model).n_inputs == 25 * model.n_volumes + 24 + 1  # signals, flags, log amplitude
    two_c = get_model("2c", default_protocol("2c"))
    assert get_estimator("spatial", two_c).n_inputs == 9 * two_c.n_volumes + 8 + 1


@pytest.mark.parametrize("axes,radius", [((0, 1), 1), ((1, 2), 1), ((0, 2), 1), ((0, 1), 2), ((1, 2), 2)])
def test_neighbour_rows_match_a_direct_loop(axes, radius):
    mask = _random_mask((6, 5, 4), 1)
    rows = neighbour_rows(mask, axes, radius)
    coords = np.argwhere(mask)
    lookup = {tuple(c): i for i, c in enumerate(coords)}
    for i, c in enumerate(coords):
        for k, (d0, d1) in enumerate(neighbour_offsets(radius)):
            other = list(c)
            other[axes[0]] += d0
            other[axes[1]] += d1
            assert rows[i, k] == lookup.get(tuple(other), -1)


@pytest.mark.parametrize("radius", [1, 2])
def test_gathered_patches_match_a_direct_loop_with_absent_neighbours(radius):
    """Absent neighbours (outside the mask, or NaN/all-zero signals) hold the centre's signals and a 0 flag."""
    mask = _random_mask((5, 6, 3), 2)
    n, n_vol = int(mask.sum()), 3
    signals = np.random.default_rng(3).uniform(0.001, 0.01, (n, n_vol))
    signals[4] = np.nan
    signals[7] = 0.0
    nb = neighbour_rows(mask, radius=radius)
    offsets = np.linspace(0.0, 0.3, n)
    got = gather_patches(signals, nb, slice_offsets=offsets, dtype=np.float64)
    assert got.shape == (n, n_patch_inputs(n_vol, radius) + 1)
    for i in range(n):
        expected = list(signals[i])
        flags, used = [], [signals[i]]
        for k in range(len(neighbour_offsets(radius))):
            j = nb[i, k]
            present = j >= 0 and j not in (4, 7)
            expected += list(signals[j] if present else signals[i])
            flags.append(1.0 if present else 0.0)
            used += [signals[j]] if present else []
        amplitude = np.mean(np.abs(used))  # over the centre's and the present neighbours' volumes
        np.testing.assert_allclose(got[i], np.array(list(np.array(expected) / amplitude) + flags
                                                    + [np.log(amplitude), offsets[i]]), rtol=1e-12, atol=0)


def test_a_patch_is_read_apart_from_its_scale():
    """Signals scaled by c give the same normalised signals and log amplitude + log c; the float32 rows of
    inference agree with the float64 rows to float32 precision."""
    mask = _random_mask((6, 6, 2), 4)
    signals = np.random.default_rng(5).uniform(-0.002, 0.01, (int(mask.sum()), 4))
    nb = neighbour_rows(mask, radius=2)
    one, scaled = (gather_patches(signals * c, nb, dtype=np.float64) for c in (1.0, 37.0))
    np.testing.assert_allclose(scaled[:, :-1], one[:, :-1], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(scaled[:, -1], one[:, -1] + np.log(37.0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(gather_patches(signals, nb), one, rtol=2e-6, atol=2e-6)
    # raw rows normalised in place as the gathering normalises them
    raw = np.column_stack([signals[0], *[signals[j] if j >= 0 else signals[0] for j in nb[0]]]).T.ravel()
    row = np.concatenate([raw, (nb[0] >= 0).astype(float), [0.0]])[None].copy()
    normalise_patches(row, 4, 24)
    np.testing.assert_allclose(row[0], one[0], rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="shape"):
        normalise_patches(row[:, :-1].copy(), 4, 24)


def test_plane_axes_follow_the_slice_offsets():
    mask = np.ones((4, 5, 6), bool)
    along0 = np.broadcast_to(np.arange(4)[:, None, None] * 0.05, mask.shape)[mask]
    along2 = np.broadcast_to(np.arange(6)[None, None, :] * 0.05, mask.shape)[mask]
    assert plane_axes(mask.shape, along0, mask) == (1, 2)
    assert plane_axes(mask.shape, along2, mask) == (0, 1)
    assert plane_axes(mask.shape, None, mask) == (0, 1)
    with pytest.raises(ValueError, match="more than one axis"):
        plane_axes(mask.shape, np.random.default_rng(0).uniform(0, 1, mask.sum()), mask)


@pytest.mark.parametrize("radius", [1, 2])
def test_training_patches_follow_the_stated_prior(model, radius):
    inputs, params, snr = simulate_patches(model, 4000, (2.0, 50.0), "rician", (), np.random.default_rng(0), radius)
    n_vol, n_nb = model.n_volumes, len(neighbour_offsets(radius))
    assert inputs.shape == (4000, n_patch_inputs(n_vol, radius))
    lo, hi = np.array([model.training_ranges[p] for p in model.param_names]).T
    assert np.all(params >= lo) and np.all(params <= hi)
    assert np.all((snr >= 2.0) & (snr <= 50.0))
    flags = inputs[:, (n_nb + 1) * n_vol:-1]
    assert set(np.unique(flags)) == {0.0, 1.0}
    centre = inputs[:, :n_vol]
    for k in range(n_nb):  # an absent neighbour repeats the centre exactly
        absent = flags[:, k] == 0.0
        np.testing.assert_array_equal(inputs[absent, (1 + k) * n_vol:(2 + k) * n_vol], centre[absent])
    # the signals are over the patch's amplitude: their mean |value| over the present voxels is 1, and the
    # amplitude (the last value) is that of the model's signals at the patches' SNR (Rician: at least it)
    present = np.repeat(np.column_stack([np.ones(len(flags)), flags]), n_vol, axis=1)
    signal = np.abs(inputs[:, :(n_nb + 1) * n_vol])
    np.testing.assert_allclose((signal * present).sum(axis=1) / present.sum(axis=1), 1.0, rtol=1e-12)
    clean = np.abs(model.signal(params)).mean(axis=1)
    assert np.median(np.exp(inputs[:, -1]) / np.maximum(clean, 1e-9)) > 1.0
    isolated = np.mean(flags.sum(axis=1) == 0)
    assert 0.03 < isolated < 0.08  # ISOLATED = 5 %
    # neighbours resemble the centre more than a random voxel does (the fields are piecewise smooth)
    near = np.mean(np.abs(inputs[:, n_vol:2 * n_vol] - centre))
    far = np.mean(np.abs(np.roll(centre, 1, axis=0) - centre))
    assert near < 0.8 * far


def test_lesion_patches_are_small_rectangles_of_scaled_cbf(monkeypatch):
    from aslbatch.estimators import patches

    monkeypatch.setattr(patches, "SHARES", {1: {"smooth": 0.0, "edge": 0.0, "island": 0.0, "lesion": 1.0}})
    rng = np.random.default_rng(1)
    share, lesion = patches._b_share(3000, rng)
    assert lesion.all() and set(np.unique(share)) <= {0.0, 1.0}  # on the grid: no partial volume
    pos = np.array([(0, 0), *NEIGHBOURS])
    seen = set()
    for row in share.astype(bool):
        inside = pos[row]
        assert inside.size  # never outside the patch
        span = tuple(inside.max(axis=0) - inside.min(axis=0) + 1)
        assert span in {(1, 1), (1, 2), (2, 1), (2, 2)} and len(inside) == span[0] * span[1]  # a full rectangle
        # the centre inside it, or next to it (chessboard distance 1)
        assert np.abs(inside).max(axis=1).min() <= 1
        seen.add((span, bool(row[0])))
    assert {((1, 1), True), ((2, 2), True), ((1, 1), False), ((1, 2), False), ((1, 2), True)} <= seen
    # the prior is mirror-symmetric: a lesion's centroid lies as often on either side of the centre along
    # each axis (versions 2-6 put a lesion beside the centre only on the negative side)
    centroid = share @ pos / share.sum(axis=1, keepdims=True)
    for axis in (0, 1):
        above, below = int(np.sum(centroid[:, axis] > 0)), int(np.sum(centroid[:, axis] < 0))
        assert abs(above - below) < 4 * np.sqrt(above + below)
        assert np.sum(centroid[:, axis] >= 1) > 0.05 * len(share)  # wholly on the positive side
    # B is A with only the CBF scaled, by a factor within LESION_CBF (both below and above 1)
    two_c = get_model("2c", default_protocol("2c"))
    a = np.tile([[60.0, 0.01, 0.8, 1.3]], (2000, 1))
    b = np.tile([[20.0, 0.02, 0.5, 2.0]], (2000, 1))
    patches._tie_regions(two_c, a, b, np.ones(2000, bool), np.ones(2000, bool), rng, 1)
    ratio = b[:, 0] / a[:, 0]
    np.testing.assert_array_equal(b[:, 1:], a[:, 1:])
    lo, hi = patches.LESION_CBF[1]
    assert np.all((ratio >= lo) & (ratio <= hi)) and ratio.min() < 0.5 and ratio.max() > 2.0


def test_across_a_shared_arrival_boundary_the_lower_cbf_region_arrives_later(monkeypatch):
    """The tissue step: with every boundary of shared arrival, the region of lower CBF (either side) gets
    the other's att plus U(0, step) s (abat moved with it, both within their ranges); no step
    within a lesion or where B is not in the patch."""
    from aslbatch.estimators import patches

    monkeypatch.setattr(patches, "SHARED_TIMING", 1.0)
    two_c = get_model("2c", default_protocol("2c"))
    n = 4000
    a = np.tile([[60.0, 0.01, 0.8, 1.3]], (n, 1))
    b = np.tile([[20.0, 0.02, 0.5, 2.0]], (n, 1))
    b[n // 2:, 0] = 90.0  # B of higher CBF: A arrives later
    b[-1, 3] = a[-1, 3] = 2.9  # near the top of att's range (3.0 s): clipped there
    lesion = np.zeros(n, bool)
    lesion[:100] = True
    present = np.ones(n, bool)
    present[100:200] = False
    a0 = a.copy()
    patches._tie_regions(two_c, a, b, lesion, present, np.random.default_rng(2), 2)
    att, abat = 3, 2
    plain = np.arange(200, n // 2)  # B of lower CBF, stepped
    step = b[plain, att] - 1.3
    assert np.all((step >= 0.0) & (step <= patches.TISSUE_STEP_S[2])) and step.max() > 0.5 and step.min() < 0.1
    np.testing.assert_allclose(b[plain, abat] - 0.8, step)  # abat moved by the same step
    np.testing.assert_array_equal(a[:n // 2], a0[:n // 2])
    later_a = np.arange(n // 2, n - 1)
    assert np.all(a[later_a, att] >= 1.3) and a[later_a, att].max() > 1.8
    np.testing.assert_array_equal(b[later_a, att], np.full(later_a.size, 1.3))
    assert a[-1, att] <= 3.0 and b[-1, att] == 2.9
    np.testing.assert_array_equal(b[100:200, att], np.full(100, 1.3))  # B not in the patch: no step
    np.testing.assert_array_equal(b[:100, 1:], a[:100, 1:])  # a lesion: only CBF differs


def test_a_network_of_another_training_prior_is_refused(model):
    # the prior's version is an option, so it is in the card and the cache key (store.NetworkCache.key)
    assert get_estimator("spatial", model).options()["prior"] == PRIOR_VERSION
    with pytest.raises(ValueError, match="training prior"):
        get_estimator("spatial", model, prior=PRIOR_VERSION - 1).options()


def test_shared_timing_copies_only_the_arrival_times(monkeypatch):
    from aslbatch.estimators import patches

    two_c = get_model("2c", default_protocol("2c"))
    a = np.tile([[60.0, 0.01, 0.8, 1.3]], (4000, 1))
    b = np.tile([[20.0, 0.02, 0.5, 2.0]], (4000, 1))
    patches._tie_regions(two_c, a, b, np.zeros(4000, bool), np.zeros(4000, bool), np.random.default_rng(2), 2)
    shared = b[:, 3] == 1.3
    np.testing.assert_array_equal(b[shared, 2], 0.8)  # abat and att together
    np.testing.assert_array_equal(b[~shared, 2:], np.tile([[0.5, 2.0]], ((~shared).sum(), 1)))
    np.testing.assert_array_equal(b[:, :2], np.tile([[20.0, 0.02]], (4000, 1)))  # cbf and abv never
    assert abs(shared.mean() - patches.SHARED_TIMING) < 0.03


# --- the phantom ----------------------------------------------------------------------------------


def test_spatial_phantom_truth_is_as_designed():
    p = make_spatial_phantom("1c", n=48, n_slices=2, seed=1)
    assert not np.any(p.interior & p.edge) and not np.any(p.edge & p.border)
    assert p.lesions.shape[0] == 4 and all(lesion.sum() == 4 for lesion in p.lesions)
    for lesion, ring in zip(p.lesions, p.surround):
        assert ring.sum() > 10
        # a lesion is half its surround's CBF (the smooth field varies a little over the ring)
        assert abs(p["cbf"][lesion].mean() / p["cbf"][ring].mean() - LESION_CBF_RATIO) < 0.03
        assert np.all(p.edge[lesion])  # 2x2: every lesion voxel touches grey matter
    # the territory is delayed by 0.8 s: compare the interior white matter inside and outside it
    inside = p.interior & (p.label == WM + TERRITORY_LABEL)
    outside = p.interior & (p.label == WM)
    assert 0.6 < np.nanmean(p["att"][inside]) - np.nanmean(p["att"][outside]) < 1.0
    # interior voxels have a single label in their 5x5 in-plane neighbourhood; edges a mix in their 3x3
    for x, y, z in np.argwhere(p.interior)[::37]:
        assert np.unique(p.label[x - 2:x + 3, y - 2:y + 3, z]).size == 1
    for x, y, z in np.argwhere(p.edge & ~np.isin(p.label, [0]))[::41]:
        window = p.label[x - 1:x + 2, y - 1:y + 2, z]
        assert np.unique(window[window > 0]).size > 1 or np.ptp(p["cbf"][x - 1:x + 2, y - 1:y + 2, z][window > 0]) > 5
    assert np.all(np.isnan(p.params[~p.mask])) and np.all(np.isfinite(p.params[p.mask]))


def test_2c_phantom_keeps_the_arrival_order():
    p = make_spatial_phantom("2c", n=40, n_slices=1)
    assert p.param_names == ("cbf", "abv", "abat", "att")
    assert np.all(p["abat"][p.mask] <= p["att"][p.mask])


# --- metrics ----------------------------------------------------------------------------------------


def test_edge_error_and_lesion_contrast_on_hand_made_maps():
    truth = np.full((6, 6, 1), 50.0)
    truth[2:4, 2:4] = 25.0
    edge = np.zeros(truth.shape, bool)
    edge[1:5, 1:5] = True
    estimate = truth.copy()
    estimate[edge] += 5.0  # +5 on 16 edge voxels
    nrmse, bias = edge_error(estimate, truth, edge)
    mean = truth[edge].mean()
    assert bias == pytest.approx(5.0 / mean) and nrmse == pytest.approx(5.0 / mean)
    assert np.all(np.isnan(region_errors([], [])))  # an empty region has no error
    lesion = truth == 25.0
    ring = ~edge
    assert lesion_contrast(truth, truth, lesion[None], ring[None]) == pytest.approx(1.0)
    blurred = truth.copy()
    blurred[lesion] = 37.5  # half the contrast smoothed away
    assert lesion_contrast(np.stack([blurred, truth]), truth, lesion[None], ring[None]) == pytest.approx(0.75)
    # the contrast is relative (1 - lesion / surround), as the issue defines it: a global scale keeps it all
    assert lesion_contrast(2.0 * truth, truth, lesion[None], ring[None]) == pytest.approx(1.0)
    # the median over noise images: one wild image (its lesion estimated at 10x) does not move it
    wild = truth.copy()
    wild[lesion] = 250.0
    assert lesion_contrast(np.stack([blurred, truth, wild]), truth, lesion[None], ring[None]) == pytest.approx(0.5)
    # two lesions of one image are averaged: one kept (1), one half (0.5)
    other = np.zeros_like(lesion)
    other[0, 0] = True
    two = truth.copy()
    two[0, 0] = 25.0
    est = two.copy()
    est[lesion] = 37.5
    both = np.stack([lesion, other])
    assert lesion_contrast(est, two, both, np.stack([ring & ~other, ring & ~other])) == pytest.approx(0.75)


def test_smoothing_within_the_mask_matches_scipy_away_from_its_edge():
    from scipy import ndimage

    mask = np.zeros((20, 20, 2), bool)
    mask[3:17, 3:17] = True
    rng = np.random.default_rng(0)
    signals = rng.uniform(0.0, 1.0, (int(mask.sum()), 2))
    smoothed = smooth_signals(signals, mask, 1.5)
    constant = smooth_signals(np.ones_like(signals), mask, 1.5)
    np.testing.assert_allclose(constant, 1.0, rtol=1e-12)  # normalised: no darkening at the mask's edge
    volume = np.zeros(mask.shape)
    volume[mask] = signals[:, 0]
    sigma = 1.5 / (2 * np.sqrt(2 * np.log(2)))
    reference = ndimage.gaussian_filter(volume, (sigma, sigma, 0))
    deep = np.zeros_like(mask)
    deep[7:13, 7:13] = True
    np.testing.assert_allclose(smoothed[deep[mask], 0], reference[deep], rtol=1e-6)


# --- the estimator ----------------------------------------------------------------------------------


def test_spatial_is_not_among_the_voxelwise_evaluation_methods():
    assert "spatial" not in VOXELWISE_METHODS and "supervised" in VOXELWISE_METHODS


def test_rows_without_a_grid_are_isolated_voxels(tiny, model):
    """predict() on rows equals predict_image() on a mask where no two voxels are in-plane neighbours."""
    mask = np.zeros((9, 9, 2), bool)
    mask[::tiny.radius + 1, ::tiny.radius + 1, :] = True  # voxels radius + 1 apart: outside each other's patch
    rng = np.random.default_rng(1)
    truth = np.column_stack([rng.uniform(20, 90, mask.sum()), rng.uniform(0.8, 2.5, mask.sum())])
    signals = model.signal(truth)
    np.testing.assert_array_equal(tiny.predict(signals).params, tiny.predict_image(signals, mask).params)
    # with neighbours present, the estimate changes
    full = np.ones((4, 4, 2), bool)
    signals = model.signal(np.tile([60.0, 1.2], (32, 1)))
    assert not np.allclose(tiny.predict_image(signals, full).params, tiny.predict(signals).params)


def test_invalid_voxels_are_flagged_and_their_neighbours_go_on(tiny, model):
    mask = np.ones((4, 4, 1), bool)
    signals = model.signal(np.tile([60.0, 1.2], (16, 1)))
    signals[5] = np.nan
    est = tiny.predict_image(signals, mask)
    assert est.status[5] == 3 and np.all(np.isnan(est.params[5]))
    assert np.all(np.isfinite(np.delete(est.params, 5, axis=0)))


def _saved_and_loaded(estimator, model, path):
    """The estimator saved to ``path`` and loaded back, with a 5x4x2 image of known parameters to predict."""
    save_network(estimator, path)
    mask = np.ones((5, 4, 2), bool)
    signals = model.signal(np.column_stack([np.linspace(20, 90, 40), np.linspace(0.8, 2.5, 40)]))
    return load_network(path, model), mask, signals


def test_file_round_trip_and_protocol_refusal(tiny, model, tmp_path):
    path = tmp_path / "spatial.npz"
    loaded, mask, signals = _saved_and_loaded(tiny, model, path)
    np.testing.assert_array_equal(loaded.predict_image(signals, mask).params, tiny.predict_image(signals, mask).params)
    other = get_model("1c", Protocol(1.8, [1.0, 1.5, 2.0, 2.5, 3.5]))
    with pytest.raises(NetworkMismatch, match="pld"):
        load_network(path, other)
    with pytest.raises(ValueError, match="inputs"):  # a voxelwise network's arrays do not fit
        get_estimator("spatial", model).set_network(
            get_estimator("supervised", model, **TINY).fit().network_, {})


def test_image_estimate_is_the_network_of_the_gathered_patches(tiny, model):
    """predict_image (blocks gathered and passed through the network in threads) equals the parallel gather
    followed by the network's own predict, and its rss is the residual of the model signal."""
    from aslbatch.estimators.neural import constrain

    mask = _random_mask((9, 7, 3), 5)
    rng = np.random.default_rng(2)
    n = int(mask.sum())
    signals = model.signal(np.column_stack([rng.uniform(20, 90, n), rng.uniform(0.8, 2.5, n)]))
    est = tiny.predict_image(signals, mask)
    expected = log_cbf_back(tiny.network_.predict(gather_patches(signals, neighbour_rows(mask, radius=tiny.radius))))
    constrain(model, expected)
    # float32 sums over the 5x5 patch's 149 inputs, folded or not, then exp(.) - 5: 1e-5 mL/100 g/min apart
    np.testing.assert_allclose(est.params, expected, rtol=1e-6, atol=1e-4)
    residual = model.signal(est.params) - signals
    np.testing.assert_allclose(est.rss, (residual**2).sum(axis=1), rtol=1e-6, atol=1e-14)


def test_evaluate_spatial_on_the_command_line(tmp_path):
    """`evaluate --spatial` writes the metrics, report and figures; smoothing lowers LM's interior error
    (the baseline does what it says), and an unknown method is a usage error naming the choices."""
    import csv

    from typer.testing import CliRunner

    from aslbatch.cli import app

    out = tmp_path / "ev"
    result = CliRunner().invoke(app, ["evaluate", "--spatial", "--out", str(out), "--method", "lm", "--method",
                                      "smooth-lm", "--snr", "5", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "metrics.tsv"), delimiter="\t"))
    value = {(r["method"], r["parameter"], r["region"], r["metric"]): float(r["value"]) for r in rows}
    assert value[("smooth-lm", "cbf", "interior_gm", "nrmse")] < value[("lm", "cbf", "interior_gm", "nrmse")]
    assert {"maps_cbf.png", "maps_att.png", "profiles.png"} <= {p.name for p in (out / "figures").iterdir()}
    assert "smooth-lm" in (out / "report.md").read_text()
    # LM gives standard errors: their coverage per region is in the metrics and the report
    assert 0.0 < value[("lm", "cbf", "interior_gm", "coverage_95")] <= 1.0
    assert "coverage of the 68 % / 95 % intervals" in (out / "report.md").read_text()
    bad = CliRunner().invoke(app, ["evaluate", "--spatial", "--out", str(out), "--method", "nope"])
    assert bad.exit_code == 2 and "smooth-lm" in bad.output


def test_a_2d_readout_uses_the_slice_offset_and_the_plane_of_one_slice_time(model):
    """Trained over slice offsets: the offset is the last input, and neighbours are taken in the plane
    across which the offsets do not vary (here axes 1 and 2, slices along axis 0)."""
    from aslbatch.estimators.neural import constrain

    net = get_estimator("spatial", model, slice_offsets=(0.0, 0.05, 0.1), **TINY).fit()
    assert net.network_.n_inputs == n_patch_inputs(model.n_volumes, net.radius) + 1
    mask = np.ones((3, 4, 5), bool)
    offsets = np.broadcast_to(np.array([0.0, 0.05, 0.1])[:, None, None], mask.shape)[mask]
    signals = model.signal(np.tile([60.0, 1.2], (mask.sum(), 1))) * np.linspace(0.8, 1.2, mask.sum())[:, None]
    est = net.predict_image(signals, mask, slice_offsets=offsets)
    expected = log_cbf_back(net.network_.predict(gather_patches(signals, neighbour_rows(mask, (1, 2), net.radius),
                                                                slice_offsets=offsets)))
    constrain(model, expected)
    np.testing.assert_allclose(est.params, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        net.predict_image(signals, mask, slice_offsets=offsets + 0.5)


# --- standard errors ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(model):
    """A small network trained at high SNR (its variance networks learn within a few epochs there)."""
    return get_estimator("spatial", model, n_samples=20_000, hidden_layers=(32, 32), snr_range=(20.0, 60.0),
                         max_epochs=30, seed=3).fit()


def test_standard_errors_are_the_variance_network_of_the_gathered_patches(tiny, model):
    """predict_image's se (the variance network run block by block beside the network) equals
    Uncertainty.predict_se of the parallel gather: marginal without a noise SD, at each voxel's SNR with
    one, each row from its own network when only some voxels have one; invalid voxels get NaN."""
    from aslbatch.simulate import noise_sigma

    mask = _random_mask((9, 7, 3), 6)
    rng = np.random.default_rng(4)
    n = int(mask.sum())
    signals = model.signal(np.column_stack([rng.uniform(20, 90, n), rng.uniform(0.8, 2.5, n)]))
    patches = gather_patches(signals, neighbour_rows(mask, radius=tiny.radius))
    first = tiny.predict_image(signals, mask)
    marginal = first.stderr
    np.testing.assert_allclose(marginal, tiny.uncertainty_.predict_se(patches), rtol=1e-6)
    assert first.interval_levels == tiny.uncertainty_.levels and len(first.interval_levels) == 2
    np.testing.assert_allclose(first.intervals, tiny.uncertainty_.predict_intervals(patches)[1], rtol=1e-6)
    sd = rng.uniform(0.5, 2.0, n) * noise_sigma(model, 5.0)
    signal_se = np.repeat(sd[:, None], model.n_volumes, axis=1)
    signal_se[::4] = np.nan  # noise unknown in every fourth voxel
    snr = tiny._snr(np.where(np.isnan(signal_se[:, 0]), np.nan, sd), n)
    mixed = tiny.predict_image(signals, mask, signal_se=signal_se)
    at_snr = mixed.stderr
    np.testing.assert_allclose(at_snr, tiny.uncertainty_.predict_se(patches, snr), rtol=1e-6)
    np.testing.assert_allclose(mixed.intervals, tiny.uncertainty_.predict_intervals(patches, snr)[1], rtol=1e-6)
    np.testing.assert_allclose(at_snr[::4], marginal[::4], rtol=1e-6)
    assert not np.allclose(at_snr[1::4], marginal[1::4])
    signals[3] = np.nan
    est = tiny.predict_image(signals, mask)
    assert np.all(np.isnan(est.stderr[3])) and np.all(np.isfinite(np.delete(est.stderr, 3, axis=0)))
    assert np.all(np.isnan(est.intervals[3])) and np.all(np.isfinite(np.delete(est.intervals, 3, axis=0)))
    # rows without a grid: the isolated-voxel patch, at the given noise SD
    isolated = gather_patches(signals[:5], np.full((5, len(neighbour_offsets(tiny.radius))), -1))
    np.testing.assert_allclose(tiny.predict(signals[:5], noise_sd=sd[:5]).stderr,
                               tiny.uncertainty_.predict_se(isolated, tiny._snr(sd[:5], 5)), rtol=1e-6)


def test_standard_errors_are_calibrated_on_patches_of_the_prior(calibrated, model):
    """At an SNR inside the training range, the noise SD given, 95 % intervals cover about that share of
    fresh patches of the training prior and the errors over se have an SD near 1 (the calibration the
    variance networks promise; the 68 % interval is not checked: att's errors are heavier-tailed than a
    Gaussian, so its 68 % interval over-covers, as for the voxelwise networks)."""
    from aslbatch.calibration import calibration

    snr = 35.0
    inputs, truth, _ = simulate_patches(model, 20_000, (snr, snr), "rician", (), np.random.default_rng(9),
                                        calibrated.radius)
    raw = log_cbf_back(calibrated.network_.predict(inputs))
    from aslbatch.estimators.neural import constrain

    constrain(model, raw)
    se = calibrated.uncertainty_.predict_se(inputs, np.full(inputs.shape[0], snr))
    for j, name in enumerate(model.param_names):
        c = calibration(raw[:, j], se[:, j], truth[:, j])
        assert 0.91 <= c.coverage_95 <= 0.98 and 0.85 <= c.z_sd <= 1.15, (name, c)


def test_file_round_trip_keeps_the_standard_errors_and_refuses_damaged_variance_arrays(tiny, model, tmp_path):
    import zipfile

    from aslbatch.estimators.store import NetworkFileError, read_card

    path = tmp_path / "spatial.npz"
    loaded, mask, signals = _saved_and_loaded(tiny, model, path)
    se = np.full(signals.shape, 0.002)
    before, after = tiny.predict_image(signals, mask, signal_se=se), loaded.predict_image(signals, mask, signal_se=se)
    assert before.stderr is not None and np.isfinite(before.stderr).all()
    np.testing.assert_array_equal(before.stderr, after.stderr)
    np.testing.assert_array_equal(tiny.predict_image(signals, mask).stderr, loaded.predict_image(signals, mask).stderr)
    card = read_card(path)
    assert card["uncertainty"]["array_prefixes"] == ["se_", "sesnr_"] and card["options"]["prior"] == PRIOR_VERSION
    raw = path.read_bytes()
    for member in ("se_weight_0.npy", "sesnr_bias_1.npy"):
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(member)
        name_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little")
        extra_len = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
        damaged = bytearray(raw)
        damaged[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x01
        bad = tmp_path / "bad.npz"
        bad.write_bytes(bytes(damaged))
        with pytest.raises(NetworkFileError, match="bad.npz"):  # the zip's CRC or the checksum
            load_network(bad, model)
    # a voxelwise network's variance networks do not fit the patch input
    voxelwise = get_estimator("supervised", model, **TINY).fit()
    with pytest.raises(ValueError, match="variance network has 5 inputs"):
        get_estimator("spatial", model).set_network(tiny.network_, {}, voxelwise.uncertainty_)


def test_a_batch_run_writes_spatial_se_maps_and_the_prior_dominated_mask(tmp_path, model):
    """Through the batch, like the voxelwise networks: <param>se maps, the bit mask, and both on the QC page."""
    import nibabel as nib

    from aslbatch.batch import run_batch
    from aslbatch.estimators.prior import PRIOR_SHARE
    from aslbatch.exitcodes import EXIT_OK
    from aslbatch.phantom import write_bids_dataset
    from aslbatch.pipeline import Settings

    raw = write_bids_dataset(tmp_path / "raw", subjects=1, model="1c", snr=20, seed=3, shape=(10, 12, 4))
    out = tmp_path / "out"
    settings = Settings(methods=("spatial",), method_options={"spatial": TINY}, cache_dir=str(tmp_path / "cache"))
    report = run_batch(raw, out, settings)
    assert report.exit_code == EXIT_OK, report.outcomes
    perf = out / "sub-01" / "perf"
    cbf = np.asarray(nib.load(perf / "sub-01_desc-spatial_cbf.nii.gz").dataobj)
    cbfse = np.asarray(nib.load(perf / "sub-01_desc-spatial_cbfse.nii.gz").dataobj)
    att, attse = (np.asarray(nib.load(perf / f"sub-01_desc-spatial_{q}.nii.gz").dataobj) for q in ("att", "attse"))
    flags = np.asarray(nib.load(perf / "sub-01_desc-spatial_priordominated.nii.gz").dataobj)
    inside = np.isfinite(cbf)
    assert inside.any() and np.all(np.isfinite(cbfse[inside]) & (cbfse[inside] > 0))
    ci68, ci95 = (np.asarray(nib.load(perf / f"sub-01_desc-spatial_cbf{k}.nii.gz").dataobj) for k in ("ci68", "ci95"))
    assert np.all((ci68[inside] > 0) & np.isfinite(ci95[inside]))
    sidecar = json.loads((perf / "sub-01_desc-spatial_cbfci95.json").read_text())
    assert sidecar["NominalCoverage"] == 0.95 and "patches" in sidecar["IntervalMethod"]
    # the bit mask is the rule of estimators.prior applied to the written maps: se above 0.8 x the SD of the
    # 1C training prior, uniform over the training ranges (width / sqrt(12)); voxels near the threshold left out
    width = np.array([np.ptp(model.training_ranges[p]) for p in model.param_names])
    se_share = np.column_stack([cbfse[inside], attse[inside]]) / (width / np.sqrt(12.0))
    wide = se_share > PRIOR_SHARE
    clear = np.abs(se_share - PRIOR_SHARE).min(axis=1) > 0.01
    assert flags.dtype == np.uint8
    np.testing.assert_array_equal(flags[inside][clear], (wide[:, 0] + 2 * wide[:, 1])[clear])
    page = (perf / "sub-01_qc.html").read_text()
    assert "spatial cbfse" in page and "spatial attse" in page
    assert 'alt="spatial cbfci95"' in page and 'alt="spatial attci95"' in page
    shares = page.split("Prior-dominated values")[1].split("</table>")[0]
    assert "<td>spatial</td>" in shares.replace(" ", "")


def test_evaluate_spatial_calibration_rows_on_known_gaussian_errors(model):
    """Maps = truth + Gaussian errors of a known SD, reported with that SD as se: every region covers
    about 68 % / 95 % (the Gaussian's shares), z SD about 1; an se above 0.8 x the prior's SD is flagged
    in every voxel, a small one in none."""
    from aslbatch.calibration import LEVEL_68, LEVEL_95
    from aslbatch.evaluate_spatial import REGIONS, _calibration_rows

    phantom = make_spatial_phantom("1c")
    rng = np.random.default_rng(5)
    sd = np.array([5.0, 0.1])
    stack = phantom.params[None] + rng.standard_normal((20,) + phantom.params.shape) * sd
    se = np.broadcast_to(sd, stack.shape).copy()
    se[..., 1] = 10.0  # att: wider than the prior
    stack[..., 1] = phantom.params[..., 1]  # exact, so inside any interval
    rows = _calibration_rows(phantom, {("m", 3.0): stack}, {("m", 3.0): (se, None, ())}, model)
    value = {(r["parameter"], r["region"], r["metric"]): r["value"] for r in rows}
    for region in REGIONS:
        assert abs(value[("cbf", region, "coverage_68")] - 0.6827) < 0.04, region
        assert abs(value[("cbf", region, "coverage_95")] - 0.95) < 0.025, region
        assert abs(value[("cbf", region, "z_sd")] - 1.0) < 0.06, region
        assert value[("cbf", region, "prior_dominated")] == 0.0
        assert value[("att", region, "coverage_68")] == 1.0 and value[("att", region, "prior_dominated")] == 1.0
    # interval half-widths of 0.5 SD and 3 SD: their coverage is the Gaussian's (0.383, 0.997), the ± se one beside
    half = np.stack([0.5 * se, 3.0 * se], axis=-1)
    levels = (LEVEL_68, LEVEL_95)
    rows = _calibration_rows(phantom, {("m", 3.0): stack}, {("m", 3.0): (se, half, levels)}, model)
    value = {(r["parameter"], r["region"], r["metric"]): r["value"] for r in rows}
    for region in REGIONS:
        assert abs(value[("cbf", region, "coverage_68")] - 0.3829) < 0.04, region
        assert abs(value[("cbf", region, "coverage_95")] - 0.9973) < 0.01, region
        assert abs(value[("cbf", region, "coverage_68_se")] - 0.6827) < 0.04, region
