"""Fault catalogue (issue 14 points 3, 5, 6): images on different grids, implausible sessions,
duplicate series, and what ``validate`` finds from headers and sidecars.

Every case asserts the exit code, the named message, that the other subjects finished, that the
raw dataset is byte-for-byte unchanged and that no stray file remains (tests/faults.py).

The grid cases use a phantom whose M0 is a smooth analytic field g(world) and whose ASL series
is scaled to it (ΔM/M0t, hence CBF, unchanged): an M0 on any grid is then g sampled at that
grid's voxel centres, the truth a correct pipeline must reproduce. Flipped and permuted storage
is made with nibabel's ``as_reoriented``, independently of aslbatch's code (not with ``slicer[::-1]``:
nibabel 5.4's slicer gives a reversed axis without a start the wrong affine).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from aslbatch.cli import app
from aslbatch.exitcodes import EXIT_FAILED, EXIT_OK
from aslbatch.phantom import write_bids_dataset

from .faults import assert_no_stray_files, assert_untouched, tree_digest

runner = CliRunner()
SHAPE = (16, 18, 6)


def smooth_m0(world: np.ndarray) -> np.ndarray:
    """M0t at world points (3, ...) in mm: 1000 with ±30 % smooth, asymmetric variation
    (length scales of 25-40 mm, several voxels of 3 mm)."""
    x, y, z = world
    return 1000.0 * (1.0 + 0.2 * np.sin(x / 25.0 + 0.4) + 0.1 * np.cos(y / 30.0) + 0.05 * z / 10.0 + 0.002 * x)


def world_of(affine: np.ndarray, shape) -> np.ndarray:
    index = np.indices(tuple(shape), dtype=np.float64)
    return np.tensordot(affine[:3, :3], index, axes=1) + affine[:3, 3].reshape(3, 1, 1, 1)


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(np.asarray(data, dtype=np.float64), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def m0_path(root: Path, subject: str = "01") -> Path:
    return root / f"sub-{subject}" / "perf" / f"sub-{subject}_m0scan.nii.gz"


def asl_path(root: Path, subject: str = "01") -> Path:
    return root / f"sub-{subject}" / "perf" / f"sub-{subject}_asl.nii.gz"


@pytest.fixture()
def dataset(tmp_path) -> Path:
    """Three noise-free 1C phantom subjects, float64, each with the smooth M0 of :func:`smooth_m0`."""
    root = write_bids_dataset(tmp_path / "raw", subjects=3, model="1c", snr=np.inf, seed=5, shape=SHAPE,
                              dtype="float64", groundtruth_dir=tmp_path / "truth")
    for subject in ("01", "02", "03"):
        asl, m0 = nib.load(str(asl_path(root, subject))), nib.load(str(m0_path(root, subject)))
        g = smooth_m0(world_of(asl.affine, SHAPE))
        ratio = np.asarray(asl.dataobj) / np.asarray(m0.dataobj)[..., None]  # ΔM/M0t and control/M0t
        save(asl_path(root, subject), ratio * g[..., None], asl.affine)
        save(m0_path(root, subject), g, m0.affine)
    return root


@pytest.fixture()
def phantom(tmp_path) -> Path:
    """Three noise-free 1C phantom subjects with the phantom's own M0 (tissue contrast: the brain
    mask drawn from it is the brain)."""
    return write_bids_dataset(tmp_path / "raw", subjects=3, model="1c", snr=np.inf, seed=5, shape=SHAPE,
                              dtype="float64", groundtruth_dir=tmp_path / "truth")


def run(root: Path, out: Path, *extra: str):
    return runner.invoke(app, ["run", "--method", "lm", str(root), str(out), *extra])


def cbf(out: Path, subject: str = "01") -> np.ndarray:
    return np.asarray(nib.load(str(out / f"sub-{subject}" / "perf" / f"sub-{subject}_desc-lm_cbf.nii.gz")).dataobj,
                      dtype=np.float64)


def provenance(out: Path, subject: str = "01") -> dict:
    return json.loads((out / f"sub-{subject}" / "perf" / f"sub-{subject}_provenance.json").read_text())


def summary(out: Path) -> dict:
    return {s["session"]: s for s in json.loads((out / "logs" / "latest_summary.json").read_text())["sessions"]}


def other_grid_affine(affine: np.ndarray) -> np.ndarray:
    """2 mm voxels (the series: 3 mm), rotated 5° about z and shifted 1.3 mm: nothing in common."""
    angle = np.deg2rad(5.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rotation @ np.diag([2.0, 2.0, 2.0])
    out[:3, 3] = rotation @ affine[:3, 3] + np.array([-1.3, 0.7, -1.0])
    return out


@pytest.fixture()
def reference(dataset, tmp_path) -> np.ndarray:
    """CBF of sub-01 with its M0 on the series' grid (copied, so the raw tree stays as given)."""
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    result = run(copy, tmp_path / "ref", "--participant-label", "01")
    assert result.exit_code == EXIT_OK, result.output
    return cbf(tmp_path / "ref")


def _check_others_and_tree(root: Path, out: Path, before: dict) -> None:
    sessions = summary(out)
    assert sessions["sub-02"]["status"] == sessions["sub-03"]["status"] == "done"
    assert_untouched(root, before)
    assert_no_stray_files(out)


# --- point 3: grids ------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["flipped", "permuted"])
def test_m0_stored_flipped_or_permuted_gives_the_same_cbf_exactly(dataset, reference, tmp_path, storage):
    """The same physical grid stored with other axes is reoriented exactly: CBF equal to the
    original's to float precision (before: divided voxel by voxel, errors of tens of mL/100 g/min)."""
    image = nib.load(str(m0_path(dataset)))
    if storage == "flipped":
        stored = image.as_reoriented(np.array([[0, -1], [1, 1], [2, -1]]))  # x and z reversed
    else:
        stored = image.as_reoriented(np.array([[1, 1], [0, -1], [2, 1]]))  # x<->y swapped, one flipped
    assert stored.shape != image.shape or not np.allclose(stored.affine, image.affine)
    save(m0_path(dataset), np.asarray(stored.dataobj), stored.affine)
    before = tree_digest(dataset)
    out = tmp_path / "out"
    result = run(dataset, out)
    assert result.exit_code == EXIT_OK, result.output
    mine = cbf(out)
    finite = np.isfinite(reference)
    np.testing.assert_array_equal(np.isfinite(mine), finite)
    np.testing.assert_allclose(mine[finite], reference[finite], rtol=1e-6, atol=1e-6)
    notes = provenance(out)["preprocessing"]["notes"]
    assert any("sub-01_m0scan.nii.gz: the m0scan is the ASL series' grid stored with other axes" in n and
               "reoriented exactly" in n for n in notes)
    _check_others_and_tree(dataset, out, before)


def test_m0_on_another_grid_is_resampled_with_a_warning_and_a_note(dataset, reference, tmp_path):
    """M0 at 2 mm, rotated 5° and shifted (the physical g sampled there): resampled onto the
    ASL grid, CBF within 1 % of the original in 95 % of the brain (trilinear interpolation of g)."""
    asl = nib.load(str(asl_path(dataset)))
    affine = other_grid_affine(asl.affine)
    shape = (28, 30, 12)  # covers the series' field of view
    save(m0_path(dataset), smooth_m0(world_of(affine, shape)), affine)
    before = tree_digest(dataset)
    out = tmp_path / "out"
    result = run(dataset, out)
    assert result.exit_code == EXIT_OK, result.output
    mine = cbf(out)
    both = np.isfinite(reference) & np.isfinite(mine) & (reference > 5)
    assert both.sum() >= 0.95 * (np.isfinite(reference) & (reference > 5)).sum()
    error = np.abs(mine[both] / reference[both] - 1)
    assert np.percentile(error, 95) < 0.01 and error.max() < 0.03
    notes = provenance(out)["preprocessing"]["notes"]
    assert any("sub-01_m0scan.nii.gz: the m0scan is on another grid" in n and "resampled onto the ASL grid" in n
               for n in notes)
    log = next((out / "logs").glob("run-*.log")).read_text()
    assert "WARNING sub-01/perf/sub-01_m0scan.nii.gz: the m0scan is on another grid" in log
    _check_others_and_tree(dataset, out, before)


def test_m0_on_another_grid_is_refused_with_the_option(dataset, tmp_path):
    asl = nib.load(str(asl_path(dataset)))
    affine = other_grid_affine(asl.affine)
    save(m0_path(dataset), smooth_m0(world_of(affine, (28, 30, 12))), affine)
    before = tree_digest(dataset)
    out = tmp_path / "out"
    result = run(dataset, out, "--on-grid-mismatch", "refuse")
    assert result.exit_code == EXIT_FAILED, result.output
    reason = summary(out)["sub-01"]["reason"]
    assert "sub-01/perf/sub-01_m0scan.nii.gz: the m0scan is on another grid (shape (28, 30, 12), voxel 2x2x2 mm" \
        in reason and "refused" in reason
    assert not (out / "sub-01" / "perf" / "sub-01_provenance.json").exists()
    _check_others_and_tree(dataset, out, before)


def test_user_mask_flipped_is_reoriented_and_on_another_grid_is_resampled(dataset, tmp_path):
    """A mask file stored flipped selects exactly the voxels it names; on a 1.5 mm grid it is
    resampled by nearest neighbour (the voxel centres it covers)."""
    asl = nib.load(str(asl_path(dataset)))
    wanted = np.zeros(SHAPE, dtype=np.uint8)
    wanted[3:11, 4:9, 1:4] = 1
    flipped = nib.Nifti1Image(wanted, asl.affine).as_reoriented(np.array([[0, -1], [1, -1], [2, 1]]))
    mask_file = tmp_path / "mask_flipped.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(flipped.dataobj), flipped.affine), str(mask_file))
    before = tree_digest(dataset)
    out = tmp_path / "out"
    result = run(dataset, out, "--mask", str(mask_file))
    assert result.exit_code == EXIT_OK, result.output
    written = np.asarray(nib.load(str(out / "sub-01" / "perf" / "sub-01_desc-brain_mask.nii.gz")).dataobj)
    np.testing.assert_array_equal(written, wanted)
    # the same box on a 1.5 mm grid: a box in world space, whose nearest-neighbour resampling is that box
    fine = asl.affine.copy()
    fine[:3, :3] /= 2
    fine[:3, 3] -= 0.75  # fine voxel centres at ±0.75 mm of the coarse ones
    fine_mask = np.zeros((32, 36, 12), dtype=np.uint8)
    fine_mask[6:22, 8:18, 2:8] = 1  # the same 8x5x3 coarse voxels
    mask_fine = tmp_path / "mask_fine.nii.gz"
    nib.save(nib.Nifti1Image(fine_mask, fine), str(mask_fine))
    out2 = tmp_path / "out2"
    result = run(dataset, out2, "--mask", str(mask_fine))
    assert result.exit_code == EXIT_OK, result.output
    written = np.asarray(nib.load(str(out2 / "sub-01" / "perf" / "sub-01_desc-brain_mask.nii.gz")).dataobj)
    np.testing.assert_array_equal(written, wanted)
    assert any("the mask is on another grid" in n for n in provenance(out2)["preprocessing"]["notes"])
    result = run(dataset, tmp_path / "out3", "--mask", str(mask_fine), "--on-grid-mismatch", "refuse")
    assert result.exit_code == EXIT_FAILED
    assert "mask_fine.nii.gz: the mask is on another grid" in summary(tmp_path / "out3")["sub-01"]["reason"]
    assert_untouched(dataset, before)
    for folder in (out, out2, tmp_path / "out3"):
        assert_no_stray_files(folder)


# --- point 5: plausibility ---------------------------------------------------------------------


def _scale_series(root: Path, factor: float) -> None:
    image = nib.load(str(asl_path(root)))
    save(asl_path(root), np.asarray(image.dataobj) * factor, image.affine)


def _swap_labels(root: Path) -> None:
    context = root / "sub-01" / "perf" / "sub-01_aslcontext.tsv"
    swap = {"control": "label", "label": "control"}
    lines = context.read_text().splitlines()
    context.write_text("\n".join(lines[:1] + [swap.get(line, line) for line in lines[1:]]) + "\n")


def _scale_m0(root: Path, factor: float) -> None:
    image = nib.load(str(m0_path(root)))
    save(m0_path(root), np.asarray(image.dataobj) * factor, image.affine)


@pytest.mark.parametrize("how, message", [
    ("zero", "sub-01/perf/sub-01_asl.nii.gz: every map would be invalid: ΔM = control − label is zero in every "
             "brain voxel"),
    ("nan", "sub-01/perf/sub-01_asl.nii.gz: every map would be invalid: ΔM/M0t is NaN or infinite in every brain "
            "voxel"),
])
def test_a_series_whose_maps_would_all_be_invalid_fails_with_the_reason(dataset, tmp_path, how, message):
    """An all-zero or all-NaN series (before: all-NaN maps and "done", exit 0)."""
    _scale_series(dataset, 0.0 if how == "zero" else np.nan)
    before = tree_digest(dataset)
    out = tmp_path / "out"
    result = run(dataset, out)
    assert result.exit_code == EXIT_FAILED, result.output
    assert message in summary(out)["sub-01"]["reason"]
    assert not (out / "sub-01" / "perf" / "sub-01_provenance.json").exists()
    assert "Traceback" not in result.output and "RuntimeWarning" not in result.output
    _check_others_and_tree(dataset, out, before)


@pytest.mark.parametrize("how, cause", [
    ("swapped", "ΔM = control − label is negative in 100% of brain voxels: labels and controls swapped"),
    ("m0_small", "is implausibly high (> 200): M0 too small for the ASL series (scaled wrongly"),
    ("m0_large", "is implausibly low (< 5): M0 too large for the ASL series (scaled wrongly)"),
])
def test_an_implausible_session_is_done_but_flagged_with_the_likely_cause(phantom, tmp_path, how, cause):
    """Labels and controls swapped, or the M0 scaled by 1/100 or 100 (the CBF scales by its inverse):
    done (exit 0), flagged in the summary (JSON and TSV), the provenance, the QC page and the run
    index; the untouched subjects are not flagged."""
    {"swapped": _swap_labels, "m0_small": lambda r: _scale_m0(r, 0.01),
     "m0_large": lambda r: _scale_m0(r, 100.0)}[how](phantom)
    dataset = phantom
    before = tree_digest(dataset)
    out = tmp_path / "out"
    result = run(dataset, out)
    assert result.exit_code == EXIT_OK, result.output
    sessions = summary(out)
    assert sessions["sub-01"]["status"] == "done"
    (flag,) = sessions["sub-01"]["flags"]
    assert flag.startswith("sub-01: implausible result: ") and cause in flag
    assert sessions["sub-02"]["flags"] == sessions["sub-03"]["flags"] == []
    rows = {line.split("\t")[0]: line.split("\t") for line in (out / "logs" / "latest_summary.tsv").read_text().splitlines()}
    assert rows["session"][-1] == "flags" and cause in rows["sub-01"][-1] and rows["sub-02"][-1] == ""
    judgement = provenance(out)["plausibility"]
    assert judgement["flagged"] and cause in judgement["message"]
    assert not provenance(out, "02")["plausibility"]["flagged"]
    page = (out / "sub-01" / "perf" / "sub-01_qc.html").read_text()
    assert "Flagged:" in page and "implausible result" in page
    assert "Flagged:" not in (out / "sub-02" / "perf" / "sub-02_qc.html").read_text()
    index = (out / "qc.html").read_text()
    assert index.count("flagged: implausible result") == 1
    _check_others_and_tree(dataset, out, before)


def test_plausibility_thresholds_against_status_counts():
    """judge() against hand-made estimates: 60 % at a bound is flagged, 40 % is not; the median
    CBF rule; invalid voxels count with those at a bound."""
    from aslbatch.estimators.base import Estimate, Status
    from aslbatch.plausibility import judge, unusable_reason

    def estimate(cbf, status):
        n = len(cbf)
        return Estimate(np.column_stack([cbf, np.full(n, 1.2)]), np.asarray(status, dtype=np.int8), None,
                        np.zeros(n), ("cbf", "att"), "lm")

    signals = np.full((10, 3), 0.01)
    ok = judge(signals, {"lm": estimate([50.0] * 10, [Status.CONVERGED] * 6 + [Status.AT_BOUND] * 4)})
    assert not ok.flagged and ok.share_at_bound_or_invalid == {"lm": 0.4} and ok.message() == ""
    bad = judge(signals, {"lm": estimate([50.0] * 10, [Status.CONVERGED] * 4 + [Status.AT_BOUND] * 3
                                         + [Status.INVALID_INPUT] * 3)})
    assert bad.flagged and "60% of brain voxels end at a bound or invalid" in bad.message()
    high = judge(signals, {"lm": estimate([250.0] * 10, [Status.CONVERGED] * 10)})
    assert high.flagged and high.median_cbf == {"lm": 250.0} and "implausibly high" in high.message()
    # ΔM negative in 70 % of the voxels: no perfusion signal (a phantom) is named before a swap, and
    # flags even when the median CBF looks plausible; 90 %: swapped; 30 %: not flagged
    mixed = np.where(np.arange(10)[:, None] < 7, -0.01, 0.01) * np.ones((10, 3))
    noise = judge(mixed, {"lm": estimate([50.0] * 10, [Status.CONVERGED] * 10)})
    assert noise.flagged and noise.negative_share == 0.7 and "no perfusion signal" in noise.message()
    swapped = judge(np.where(np.arange(10)[:, None] < 9, -0.01, 0.01) * np.ones((10, 3)),
                    {"lm": estimate([50.0] * 10, [Status.CONVERGED] * 10)})
    assert swapped.flagged and "swapped in the aslcontext" in swapped.message()
    relative = Estimate(np.ones((10, 2)), np.zeros(10, dtype=np.int8), None, np.zeros(10), ("rcbf", "deltam"),
                        "whitepaper")
    assert judge(mixed, {"whitepaper": relative}).flagged  # a map without cbf is judged by its ΔM
    fewer = np.where(np.arange(10)[:, None] < 3, -0.01, 0.01) * np.ones((10, 3))  # 30 % negative
    assert not judge(fewer, {"lm": estimate([50.0] * 10, [Status.CONVERGED] * 10)}).flagged
    assert unusable_reason(signals) is None
    assert "zero in every brain voxel" in unusable_reason(np.zeros((4, 3)))
    assert "NaN or infinite" in unusable_reason(np.full((4, 3), np.nan))


# --- duplicates and what validate finds (point 6) --------------------------------------------------


def _duplicate(root: Path) -> None:
    import gzip

    asl_path(root).with_suffix("").write_bytes(gzip.decompress(asl_path(root).read_bytes()))  # sub-01_asl.nii


def _unpairable(root: Path) -> None:
    context = root / "sub-01" / "perf" / "sub-01_aslcontext.tsv"
    lines = context.read_text().splitlines()
    lines[1], lines[2] = "control", "control"
    lines[3], lines[4] = "label", "label"
    context.write_text("\n".join(lines) + "\n")


def _nan_scl_inter(root: Path) -> None:
    image = nib.load(str(asl_path(root)))
    broken = nib.Nifti1Image(np.asarray(image.dataobj).astype(np.int16), image.affine)
    broken.header["scl_slope"] = 2.0
    broken.header["scl_inter"] = np.nan
    nib.save(broken, str(asl_path(root)))


def _m0_other_grid(root: Path) -> None:
    affine = other_grid_affine(nib.load(str(asl_path(root))).affine)
    save(m0_path(root), smooth_m0(world_of(affine, (28, 30, 12))), affine)


VALIDATE_CASES = {
    "duplicate": (_duplicate, (), "sub-01/perf/sub-01_asl.nii: sub-01 exists both as .nii and .nii.gz; keep one"),
    "unpairable": (_unpairable, (), "sub-01/perf/sub-01_aslcontext.tsv: volumes 0 and 1 (counting from 0) are both "
                                    "control: control/label pair 0 cannot be formed"),
    "nan_scl_inter": (_nan_scl_inter, (), "sub-01/perf/sub-01_asl.nii.gz: cannot read the NIfTI header: Valid slope "
                                          "but invalid intercept nan"),
    "m0_grid_refused": (_m0_other_grid, ("--on-grid-mismatch", "refuse"),
                        "sub-01/perf/sub-01_m0scan.nii.gz: the m0scan is on another grid (shape (28, 30, 12)"),
}


@pytest.mark.parametrize("case", sorted(VALIDATE_CASES))
def test_validate_finds_what_run_refuses_and_run_fails_only_that_session(dataset, tmp_path, case):
    """Each fault knowable from headers and sidecars: validate reports it (exit 1) in one line
    naming the file (and the field), without a traceback or a numpy warning, and run fails that
    session with the same file named while the others finish."""
    damage, options, message = VALIDATE_CASES[case]
    damage(dataset)
    before = tree_digest(dataset)
    checked = runner.invoke(app, ["validate", str(dataset), *options])
    assert checked.exit_code == EXIT_FAILED, checked.output
    lines = [line for line in checked.output.splitlines() if line.startswith("sub-01/")]
    assert any(line.startswith(message) for line in lines), checked.output
    assert not any(line.startswith(("sub-02/", "sub-03/")) for line in checked.output.splitlines())
    assert "Traceback" not in checked.output and "Warning" not in checked.output
    out = tmp_path / "out"
    result = run(dataset, out, *options)
    assert result.exit_code == EXIT_FAILED, result.output
    sessions = summary(out)
    assert sessions["sub-01"]["status"] == "failed" and message.split(":")[0] in sessions["sub-01"]["reason"]
    assert not list(out.glob("sub-01/perf/*_provenance.json"))
    _check_others_and_tree(dataset, out, before)


def test_validate_passes_an_m0_run_would_resample_or_reorient(dataset):
    """With the default policy an M0 on another grid is resampled by run: not a validate problem."""
    _m0_other_grid(dataset)
    checked = runner.invoke(app, ["validate", str(dataset)])
    assert checked.exit_code == EXIT_OK, checked.output


def test_a_pair_on_two_grids_with_2d_slice_timing_is_found_by_validate_and_refused_by_run(tmp_path):
    """The crushed series of a 2D pair (and its M0) shifted 2 mm: its slice times cannot follow
    a resampling, so validate reports it and run fails that session; the other subject finishes."""
    root = write_bids_dataset(tmp_path / "raw", subjects=2, model="2c", snr=np.inf, seed=2, shape=(12, 14, 4),
                              groundtruth_dir=tmp_path / "truth", slice_timing=[0.0, 0.04, 0.08, 0.12])
    for name in ("sub-01_acq-dante_asl", "sub-01_acq-dante_m0scan"):
        path = root / "sub-01" / "perf" / f"{name}.nii.gz"
        image = nib.load(str(path))
        affine = image.affine.copy()
        affine[0, 3] += 2.0
        save(path, np.asarray(image.dataobj), affine)
    before = tree_digest(root)
    message = ("sub-01/perf/sub-01_acq-dante_asl.nii.gz: the series (paired with sub-01/perf/sub-01_acq-nocrush_asl"
               ".nii.gz) is on another grid")
    checked = runner.invoke(app, ["validate", str(root)])
    assert checked.exit_code == EXIT_FAILED and message in checked.output, checked.output
    assert "its 2D slice timing cannot follow a resampling" in checked.output
    assert "sub-02/" not in checked.output and "Traceback" not in checked.output
    out = tmp_path / "out"
    result = run(root, out)
    assert result.exit_code == EXIT_FAILED, result.output
    sessions = summary(out)
    assert "sub-01/perf/sub-01_acq-dante_asl.nii.gz: the series is on another grid" in sessions["sub-01"]["reason"]
    assert sessions["sub-02"]["status"] == "done"
    assert_untouched(root, before)
    assert_no_stray_files(out)


def test_the_grid_policy_is_a_setting_in_the_digest_the_config_and_refused_when_unknown(dataset, tmp_path):
    """on_grid_mismatch enters the settings digest (a changed policy reprocesses), is read from the
    TOML config, and an unknown value is a usage error before anything runs."""
    from aslbatch.pipeline import Settings

    assert Settings(methods=("lm",)).to_dict()["on_grid_mismatch"] == "resample"
    assert Settings(methods=("lm",)).digest() != Settings(methods=("lm",), on_grid_mismatch="refuse").digest()
    with pytest.raises(ValueError, match="on_grid_mismatch must be one of"):
        Settings(methods=("lm",), on_grid_mismatch="nearest")
    _m0_other_grid(dataset)
    before = tree_digest(dataset)
    config = tmp_path / "settings.toml"
    config.write_text('methods = ["lm"]\non_grid_mismatch = "refuse"\n')
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(dataset), str(out), "--config", str(config)])
    assert result.exit_code == EXIT_FAILED, result.output
    assert "the m0scan is on another grid" in summary(out)["sub-01"]["reason"]
    config.write_text('methods = ["lm"]\non_grid_mismatch = "sometimes"\n')
    result = runner.invoke(app, ["run", str(dataset), str(tmp_path / "out2"), "--config", str(config)])
    assert result.exit_code == 2 and "on_grid_mismatch must be one of" in result.output
    assert not (tmp_path / "out2").exists()
    result = runner.invoke(app, ["run", str(dataset), str(tmp_path / "out2"), "--on-grid-mismatch", "sometimes"])
    assert result.exit_code == 2
    _check_others_and_tree(dataset, out, before)
