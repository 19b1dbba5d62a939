"""The motion outputs of one acquisition: a BIDS derivatives confounds file per ASL series and the
images the QC page shows before and after correction.

``<series>_desc-confounds_timeseries.tsv`` (+ ``.json``), as fMRIPrep and ASLPrep name them: one
row per volume of the series in acquisition order, columns ``volume_type``, ``trans_x``,
``trans_y``, ``trans_z`` (mm), ``rot_x``, ``rot_y``, ``rot_z`` (rad), ``framewise_displacement``
(mm; n/a for the first volume, as fMRIPrep writes it) and ``excluded`` (1: the volume's ΔM was
left out of the average by robust averaging). Motion columns are n/a when motion was not corrected.

``<series>_desc-motioncheck_qc.nii.gz`` (+ ``.json``): four volumes on the ASL grid, the mean
control image before and after correction and the mean ΔM before and after correction and
exclusion (image units), for the QC page.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from .atomic import atomic_open, atomic_path
from .motion import CONFOUND_COLUMNS, FD_RADIUS_MM, SeriesMotion

__all__ = ["CONFOUNDS_SIDECAR", "MOTIONCHECK_SUFFIX", "CONFOUNDS_SUFFIX", "read_confounds", "series_stem",
           "write_motion_outputs"]

CONFOUNDS_SUFFIX = "_desc-confounds_timeseries"
MOTIONCHECK_SUFFIX = "_desc-motioncheck_qc"
#: the volumes of the motion-check image, in order
MOTIONCHECK_VOLUMES = ("mean control before correction", "mean control after correction",
                       "mean ΔM before correction", "mean ΔM after correction and exclusion")

_AXES = {"x": "first", "y": "second", "z": "third"}
CONFOUNDS_SIDECAR = {
    "volume_type": {"Description": "The volume's type, from the series' aslcontext.tsv."},
    **{f"trans_{a}": {"Description": f"Translation along the image's {w} array axis (mm) that maps the reference "
                                     "frame onto the volume (rigid registration, aslbatch.motion).", "Units": "mm"}
       for a, w in _AXES.items()},
    **{f"rot_{a}": {"Description": f"Rotation about the image's {w} array axis through the grid centre (rad); "
                                   "R = Rz Ry Rx.", "Units": "rad"}
       for a, w in _AXES.items()},
    "framewise_displacement": {
        "Description": "Framewise displacement from the previous volume (Power et al. 2012): sum of absolute "
                       f"translation changes plus {FD_RADIUS_MM:g} mm times the sum of absolute rotation changes; "
                       "n/a for the first volume.", "Units": "mm"},
    "excluded": {"Description": "1 when the ΔM of the volume's control/label pair (or the deltam volume) was left "
                                "out of the average by robust averaging (aslbatch.pair_outliers), else 0.",
                 "Levels": {"0": "used", "1": "excluded"}},
}


def series_stem(source: str) -> str:
    """The BIDS base name of an ASL series (``sub-01_acq-x_asl.nii.gz`` → ``sub-01_acq-x``)."""
    name = Path(source).name
    for suffix in ("_asl.nii.gz", "_asl.nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name.split(".")[0]


def _cell(value: float, fmt: str = ".8g") -> str:
    return "n/a" if not np.isfinite(value) else format(float(value) + 0.0, fmt)  # + 0.0: no "-0"


def confounds_text(record: SeriesMotion) -> str:
    """The TSV of one series (module doc)."""
    n = len(record.volume_types)
    params = record.params if record.params is not None else np.full((n, 6), np.nan)
    fd = record.fd if record.fd is not None else np.full(n, np.nan)
    lines = ["\t".join(("volume_type", *CONFOUND_COLUMNS, "excluded"))]
    for k in range(n):
        lines.append("\t".join([record.volume_types[k], *(_cell(v) for v in params[k]), _cell(fd[k]),
                                str(int(record.excluded[k]))]))
    return "\n".join(lines) + "\n"


def read_confounds(path: str | Path) -> dict[str, list]:
    """A confounds TSV as ``{column: values}`` (numbers as floats, n/a as NaN; volume_type as text)."""
    rows = Path(path).read_text(encoding="utf-8").splitlines()
    header = rows[0].split("\t")
    columns: dict[str, list] = {name: [] for name in header}
    for row in rows[1:]:
        for name, value in zip(header, row.split("\t")):
            columns[name].append(value if name == "volume_type" else (np.nan if value == "n/a" else float(value)))
    return columns


def write_motion_outputs(folder: Path, records: Sequence[SeriesMotion], affine: np.ndarray,
                         summaries: Sequence[dict]) -> list[tuple[str, Path]]:
    """Write each series' confounds TSV + JSON and motion-check image + JSON into ``folder``
    (atomically) when it was motion corrected or had a volume excluded; returns ``(kind, path)`` of
    every file. ``summaries``: each series'
    :meth:`SeriesMotion.summary`, recorded in the TSV's sidecar."""
    written = []
    for record, summary in zip(records, summaries):
        if record.params is None and not record.excluded.any():
            continue  # neither corrected nor averaged robustly with an exclusion: nothing to show
        stem = series_stem(record.source)
        tsv = folder / f"{stem}{CONFOUNDS_SUFFIX}.tsv"
        with atomic_open(tsv, "w", encoding="utf-8") as fh:
            fh.write(confounds_text(record))
        sidecar = {**CONFOUNDS_SIDECAR, "Sources": [f"bids:raw:{record.source}"], "MotionSummary": summary}
        if record.m0_params is not None:
            sidecar["M0Motion"] = {"Description": "the separate M0 image's rigid parameters (trans mm, rot rad)",
                                   **dict(zip(CONFOUND_COLUMNS[:6], (round(float(v), 8) for v in record.m0_params)))}
        written += [("confounds", tsv), ("confounds_sidecar", _write_json(tsv.with_suffix(".json"), sidecar))]
        image = folder / f"{stem}{MOTIONCHECK_SUFFIX}.nii.gz"
        nifti = nib.Nifti1Image(np.asarray(record.images, dtype=np.float32), affine)
        nifti.header.set_xyzt_units("mm")
        with atomic_path(image, suffix=".nii.gz") as tmp:
            nib.save(nifti, str(tmp))
        written += [("motioncheck", image), ("motioncheck_sidecar", _write_json(
            folder / f"{stem}{MOTIONCHECK_SUFFIX}.json",
            {"Description": "Images for the QC page: the volumes are, in order, " + "; ".join(MOTIONCHECK_VOLUMES),
             "Units": "arbitrary (image units)", "Sources": [f"bids:raw:{record.source}"]}))]
    return written


def _write_json(path: Path, data: dict) -> Path:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return path
