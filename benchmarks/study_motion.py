"""Motion correction and robust averaging on the phantom: the figures of issue 15's "done when".

Run: ``python benchmarks/study_motion.py [--shape 64 64 20] [--repeats 8] [--seed 3] [--psf-fwhm 2]``. One
1C phantom (default protocol: 5 PLDs, ``repeats`` control/label pairs each: 80 volumes at 8), SNR 10,
Rician noise, a separate M0, fitted with LM; GM = the phantom's grey-matter voxels inside the brain mask.
Every dataset, still or moving, is imaged with the same point-spread function (``--psf-fwhm`` voxels,
:func:`aslbatch.phantom.band_limit`; 0: the phantom's voxels, edges one voxel sharp).

Cases (each a dataset written by :func:`aslbatch.phantom.write_bids_dataset`):

- **still**: no motion; GM CBF NRMSE without and with correction, and the change of the median GM CBF;
- **moving**: ``--motion 3`` (drift plus jerks, up to 3 mm / 3°); registration error of every volume
  against the applied transforms (after removing the one common offset between the phantom's frame and
  the estimate's reference, the median of P_v⁻¹ T_v), and NRMSE without and with correction;
- **jerk**: still head, but in two pairs the label volume is corrupted by a 4 mm jerk *during* its
  readout (half the volume at the old position, half 4 mm away: a rigid transform cannot undo it);
  NRMSE with correction, without and with robust averaging.

Prints a Markdown table; the README's "Motion" section quotes it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from aslbatch.bids import find_sessions, group_acquisitions
from aslbatch.estimators import get_estimator
from aslbatch.metrics import accuracy
from aslbatch.models import get_model
from aslbatch.motion import rigid_matrix, rigid_params
from aslbatch.phantom import PSF_FWHM_VOXELS, apply_rigid_motion, make_phantom, write_bids_dataset
from aslbatch.pipeline import estimate_maps
from aslbatch.preprocess import prepare_acquisition


def _acquisition(raw: Path):
    (session,) = find_sessions(raw)
    (acquisition,) = group_acquisitions(session, "1c")
    return acquisition


def _fit(raw: Path, gm: np.ndarray, truth: np.ndarray, **options) -> dict:
    """Prepare (timed) and fit with LM; GM CBF NRMSE and median (``gm`` and ``truth`` in the frame the
    maps are in)."""
    t0 = time.perf_counter()
    prepared = prepare_acquisition(_acquisition(raw), **options)
    seconds = time.perf_counter() - t0
    model = get_model("1c", prepared.protocol, prepared.constants)
    estimate = estimate_maps(model, prepared, "lm", {}, estimator=get_estimator("lm", model).fit())
    cbf = prepared.unmask(estimate.params[:, 0])
    inside = gm & prepared.mask
    return {"prepared": prepared, "seconds": seconds, "nrmse": accuracy(cbf[inside], truth[inside]).nrmse,
            "median": float(np.nanmedian(cbf[inside])), "cbf": cbf}


def common_offset(estimated: np.ndarray, applied: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Q (params, mm and rad) with T_v = P_v Q⁻¹: the estimate's reference frame against the phantom's,
    the median over volumes of the parameters of P_v⁻¹ T_v, inverted."""
    offsets = rigid_params(np.linalg.inv(rigid_matrix(applied, centre)) @ rigid_matrix(estimated, centre), centre)
    return rigid_params(np.linalg.inv(rigid_matrix(np.median(offsets, axis=0), centre)), centre)


def registration_errors(estimated: np.ndarray, applied: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Per volume, the largest translation error (mm) and rotation error (degrees) of ``estimated``
    against ``applied`` (both (n, 6), mm and rad), after removing their one common offset (the
    estimate's reference is not the phantom's frame: T_v = P_v Q⁻¹ for one Q, taken as the median
    of the parameters of P_v⁻¹ T_v)."""
    offsets = rigid_params(np.linalg.inv(rigid_matrix(applied, centre)) @ rigid_matrix(estimated, centre), centre)
    common = np.median(offsets, axis=0)
    expected = rigid_params(rigid_matrix(applied, centre) @ rigid_matrix(common, centre), centre)
    error = np.abs(estimated - expected)
    return np.stack([error[:, :3].max(axis=1), np.degrees(error[:, 3:].max(axis=1))], axis=1)


def pair_errors(estimated: np.ndarray, applied: np.ndarray, centre: np.ndarray, volume_types) -> np.ndarray:
    """Per control/label pair (a control and the label after it), the largest translation error (mm) and
    rotation error (degrees) of the label's transform relative to its control's, against the applied
    ones: E_v = P_v⁻¹ T_v, the pair's error E_control⁻¹ E_label (the common offset of the estimate's frame
    cancels). What ΔM feels: 0.02 mm at a band-limited edge is ~30 % of ΔM."""
    error = np.linalg.inv(rigid_matrix(applied, centre)) @ rigid_matrix(estimated, centre)
    types = list(volume_types)
    pairs = [(v, v + 1) for v in range(len(types) - 1) if types[v] == "control" and types[v + 1] == "label"]
    relative = rigid_params(np.stack([np.linalg.inv(error[c]) @ error[lab] for c, lab in pairs]), centre)
    return np.stack([np.abs(relative[:, :3]).max(axis=1), np.degrees(np.abs(relative[:, 3:]).max(axis=1))], axis=1)


def _corrupt_labels(raw: Path, pairs: tuple[int, ...], jerk_mm: float) -> None:
    """In the given pairs, the label volume becomes half at its position, half moved ``jerk_mm`` along x."""
    path = next(raw.rglob("*_asl.nii.gz"))
    image = nib.load(path)
    data = np.asarray(image.dataobj, dtype=np.float64)
    shift = np.zeros((1, 6))
    shift[0, 0] = jerk_mm
    for pair in pairs:
        label = 2 * pair + 1
        moved = apply_rigid_motion(data[..., label:label + 1], shift)[..., 0]
        data[..., label] = 0.5 * (data[..., label] + moved)
    out = nib.Nifti1Image(data.astype(np.float32), image.affine, image.header)
    nib.save(out, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 64, 20))
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--motion", type=float, default=3.0)
    parser.add_argument("--psf-fwhm", type=float, default=PSF_FWHM_VOXELS)
    args = parser.parse_args()
    shape = tuple(args.shape)
    phantom = make_phantom(shape, "1c", seed=(args.seed, 0))
    gm = phantom.tissue == 1
    truth = phantom.cbf.astype(np.float64)
    on = {"motion_correction": True, "robust_averaging": False}
    off = {"motion_correction": False, "robust_averaging": False}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        common = {"subjects": 1, "model": "1c", "snr": 10.0, "seed": args.seed, "shape": shape, "repeats": args.repeats,
                  "psf_fwhm": args.psf_fwhm}
        still = write_bids_dataset(Path(tmp) / "still", **common)
        moving = write_bids_dataset(Path(tmp) / "moving", motion=args.motion, **common)
        jerk = write_bids_dataset(Path(tmp) / "jerk", **common)
        _corrupt_labels(jerk, pairs=(7, 23), jerk_mm=4.0)

        still_off, still_on = _fit(still, gm, truth, **off), _fit(still, gm, truth, **on)
        moving_off = _fit(moving, gm, truth, **off)
        # corrected maps are in the frame of the estimate's reference: the truth is moved there
        # (c = orig ∘ Q⁻¹ for the common offset Q, see registration_errors)
        table = np.loadtxt(Path(tmp) / "moving_groundtruth" / "sub-01" / "sub-01_motion.tsv", skiprows=1,
                           usecols=range(1, 7))
        centre = (np.asarray(shape) - 1) / 2 * 3.0
        probe = prepare_acquisition(_acquisition(moving), **on).motion[0]
        offset = common_offset(probe.params, table[1:], centre)
        gm_moved = apply_rigid_motion(gm[..., None].astype(np.float64), offset[None], order=0)[..., 0] > 0.5
        truth_moved = apply_rigid_motion(truth[..., None], offset[None], order=0)[..., 0]
        moving_on = _fit(moving, gm_moved, truth_moved, **on)
        # the same resampling with the applied transforms themselves (no registration error): what
        # interpolating the phantom twice (its motion, then the correction) costs on its own
        import aslbatch.motion as motion_module

        estimate = motion_module.estimate_series_motion
        motion_module.estimate_series_motion = lambda data, zooms, types, pld, **kw: motion_module.MotionEstimate(
            table[1:], centre, zooms, tuple(types), np.asarray(data)[..., 0], "the applied transforms")
        try:
            moving_oracle = _fit(moving, gm, truth, **on)
            # the applied transforms followed by the estimate's common offset: the oracle in the frame
            # the corrected maps are in (the truth moved there as for "corrected")
            in_frame = rigid_params(rigid_matrix(table[1:], centre) @ np.linalg.inv(rigid_matrix(offset, centre)), centre)
            motion_module.estimate_series_motion = lambda data, zooms, types, pld, **kw: motion_module.MotionEstimate(
                in_frame, centre, zooms, tuple(types), np.asarray(data)[..., 0], "the applied transforms")
            moving_oracle_frame = _fit(moving, gm_moved, truth_moved, **on)
        finally:
            motion_module.estimate_series_motion = estimate
        jerk_on = _fit(jerk, gm, truth, **on)
        jerk_robust = _fit(jerk, gm, truth, motion_correction=True, robust_averaging=True)
        jerk_robust_only = _fit(jerk, gm, truth, motion_correction=False, robust_averaging=True)
        still_robust = _fit(still, gm, truth, motion_correction=False, robust_averaging=True)

        record = moving_on["prepared"].motion[0]
        errors = registration_errors(record.params, table[1:], centre)
        m0_error = registration_errors(np.vstack([record.params, record.m0_params]), np.vstack([table[1:], table[:1]]),
                                       centre)[-1]  # the truth lists the separate M0 first
        n_volumes = record.params.shape[0]
        pairs = pair_errors(record.params, table[1:], centre, record.volume_types)

    base = still_off["nrmse"]
    rows += [
        ("still, not corrected", still_off["nrmse"], 0.0, still_off["seconds"]),
        ("still, corrected", still_on["nrmse"], 100 * (still_on["median"] / still_off["median"] - 1),
         still_on["seconds"]),
        (f"moving ≤ {args.motion:g} mm/°, not corrected", moving_off["nrmse"],
         100 * (moving_off["median"] / still_off["median"] - 1), moving_off["seconds"]),
        (f"moving ≤ {args.motion:g} mm/°, corrected", moving_on["nrmse"],
         100 * (moving_on["median"] / still_off["median"] - 1), moving_on["seconds"]),
        (f"moving ≤ {args.motion:g} mm/°, resampled with the applied transforms", moving_oracle["nrmse"],
         100 * (moving_oracle["median"] / still_off["median"] - 1), moving_oracle["seconds"]),
        (f"moving ≤ {args.motion:g} mm/°, the applied transforms and the estimate's common offset",
         moving_oracle_frame["nrmse"], 100 * (moving_oracle_frame["median"] / still_off["median"] - 1),
         moving_oracle_frame["seconds"]),
        ("2 pairs with a 4 mm jerk, corrected, plain average", jerk_on["nrmse"],
         100 * (jerk_on["median"] / still_off["median"] - 1), jerk_on["seconds"]),
        ("2 pairs with a 4 mm jerk, corrected, robust average", jerk_robust["nrmse"],
         100 * (jerk_robust["median"] / still_off["median"] - 1), jerk_robust["seconds"]),
        ("2 pairs with a 4 mm jerk, not corrected, robust average", jerk_robust_only["nrmse"],
         100 * (jerk_robust_only["median"] / still_off["median"] - 1), jerk_robust_only["seconds"]),
    ]
    print(f"phantom {shape}, PSF FWHM {args.psf_fwhm:g} voxels, {n_volumes} volumes, SNR 10, LM; GM voxels {int((gm & still_off['prepared'].mask).sum())}\n")
    print("| case | GM CBF NRMSE | vs still, not corrected | median GM CBF change | prepare (s) |")
    print("|---|---|---|---|---|")
    for name, nrmse, change, seconds in rows:
        print(f"| {name} | {nrmse:.4f} | {100 * (nrmse / base - 1):+.1f} % | {change:+.2f} % | {seconds:.1f} |")
    print(f"\ncommon offset of the estimate's frame: {np.round(offset[:3], 3).tolist()} mm, "
          f"{np.round(np.degrees(offset[3:]), 3).tolist()}°")
    print(f"\nregistration error over {n_volumes} volumes (after the common offset): median "
          f"{np.median(errors[:, 0]):.3f} mm / {np.median(errors[:, 1]):.3f}°, 90th percentile "
          f"{np.percentile(errors[:, 0], 90):.3f} mm / {np.percentile(errors[:, 1], 90):.3f}°, max "
          f"{errors[:, 0].max():.3f} mm / {errors[:, 1].max():.3f}°; M0: {m0_error[0]:.3f} mm / {m0_error[1]:.3f}°")
    print(f"label against its control (each pair's relative transform against the applied one's, {len(pairs)} "
          f"pairs): median {np.median(pairs[:, 0]):.4f} mm / {np.median(pairs[:, 1]):.4f}°, 90th percentile "
          f"{np.percentile(pairs[:, 0], 90):.4f} mm / {np.percentile(pairs[:, 1], 90):.4f}°")
    for name, result in (("jerk, corrected, robust", jerk_robust), ("still, robust", still_robust)):
        record = result["prepared"].motion[0]
        labels = np.array([t == "label" for t in record.volume_types])
        pairs = (np.flatnonzero(record.excluded & labels) // 2).tolist()
        print(f"{name}: pairs excluded {pairs}" + (" (corrupted: [7, 23])" if "jerk" in name else ""))

if __name__ == "__main__":
    main()
