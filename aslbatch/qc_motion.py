"""The motion section of an acquisition's QC page and its words in the run index (:mod:`aslbatch.qc`).

Per ASL series, from the files the provenance lists (:mod:`aslbatch.confounds`): a plot of the
translations (mm), rotations (degrees) and framewise displacement (mm) against the volume, with
the volumes whose pair was excluded from the average marked; montages of the mean control image
and of the mean ΔM before and after correction (and exclusion); the share of ΔM volumes excluded;
and the provenance's motion figures (max and mean FD, excessive motion). matplotlib draws the plot.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .confounds import read_confounds
from .report import escape, figure_png, html_table, img, new_figure

__all__ = ["motion_index_text", "motion_section"]

def motion_index_text(provenance: Mapping[str, Any]) -> str:
    """One line for the run index: max / mean FD, excluded pairs, and the excessive-motion flag ("" without motion data)."""
    parts = []
    for summary in provenance.get("motion") or []:
        text = []
        if "max_fd_mm" in summary:
            text.append(f"FD max {summary['max_fd_mm']:.2f} mm, mean {summary['mean_fd_mm']:.2f} mm")
        text.append(f"{summary['excluded_deltam_volumes']}/{summary['deltam_volumes']} ΔM excluded")
        if summary.get("excessive_motion"):
            text.append("EXCESSIVE MOTION")
        parts.append(", ".join(text))
    return "; ".join(parts)


def _plot(columns: Mapping[str, list], title: str) -> str:
    """Translations, rotations and FD against the volume (matplotlib), excluded volumes marked."""
    params = np.array([columns[c] for c in ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")],
                      dtype=np.float64).T
    fd = np.asarray(columns["framewise_displacement"], dtype=np.float64)
    excluded = np.flatnonzero(np.asarray(columns["excluded"], dtype=np.float64) > 0)
    volumes = np.arange(params.shape[0])
    figure = new_figure(7.5, 5.2, dpi=90)
    axes = figure.subplots(3, 1, sharex=True)
    panels = ((axes[0], params[:, :3], ("x", "y", "z"), "translation (mm)"),
              (axes[1], np.degrees(params[:, 3:]), ("x", "y", "z"), "rotation (°)"),
              (axes[2], fd[:, None], ("FD",), "FD (mm)"))
    for ax, values, names, label in panels:
        for j, name in enumerate(names):
            ax.plot(volumes, values[:, j], linewidth=1.1, label=name)
        for k in excluded:
            ax.axvspan(k - 0.5, k + 0.5, color="#e41a1c", alpha=0.25, linewidth=0)
        ax.set_ylabel(label)
        ax.grid(True, color="#e2e2e2")
        ax.legend(loc="upper left", fontsize=7, ncol=3, frameon=False)
    axes[0].set_title(title, fontsize=9)
    axes[2].set_xlabel("volume (acquisition order); red: excluded from the average")
    return img(figure_png(figure), f"motion of {title}")


def _montages(path: Path, grid) -> list[str]:
    """Mean control and mean ΔM before / after, at the page's slices: grey between the 1st and 99th
    percentile in the mask, ΔM diverging (RdBu_r) symmetric about 0 at the 99th percentile of |ΔM|."""
    from .qc import Scale, _montage, _mosaic, _scale_palette, _scale_pixels

    image = nib.as_closest_canonical(nib.load(path))
    data = np.asarray(image.dataobj, dtype=np.float64)
    if data.ndim != 4 or data.shape[:3] != grid.mask.shape or not np.allclose(image.affine, grid.affine, atol=1e-4):
        return [f'<p class="warn">{escape(path.name)}: not on the brain mask\'s grid; not shown</p>']
    inside = _mosaic(grid.mask, grid.slices, False)
    out = []
    for pair, label, cmap in ((data[..., :2], "mean control", "gray"), (data[..., 2:], "mean ΔM", "RdBu_r")):
        finite = pair[grid.mask][np.isfinite(pair[grid.mask])]
        if cmap == "gray":
            low, high = (float(v) for v in np.percentile(finite, [1, 99])) if finite.size else (0.0, 1.0)
        else:
            high = float(np.percentile(np.abs(finite), 99)) if finite.size else 1.0
            low = -high
        scale = Scale(low, high if high > low else low + 1.0, cmap)
        for k, when in enumerate(("before", "after")):
            pixels = _scale_pixels(_mosaic(pair[..., k], grid.slices, np.nan), inside, scale)
            side = f'<div class="bar">{escape(label)} {when}<br>{low:.4g} … {high:.4g}</div>'
            out.append(_montage(pixels, _scale_palette(cmap), grid, f"{label} {when} correction", side))
    return out


def motion_section(provenance: Mapping[str, Any], folder: Path, grid) -> list[str]:
    """HTML of the motion section (empty when the provenance records no motion data)."""
    summaries = provenance.get("motion") or []
    if not summaries:
        return []
    outputs = [Path(str(item["path"])).name for item in provenance.get("outputs", [])]
    body = ['<h2 id="motion">Motion and robust averaging</h2>']
    rows = []
    for s in summaries:
        rows.append([s["source"], "yes" if s.get("motion_corrected") else "no", s.get("max_fd_mm", "—"),
                     s.get("mean_fd_mm", "—"),
                     f"{100 * s['fraction_above_threshold']:.0f} %" if "fraction_above_threshold" in s else "—",
                     f"{s['excluded_deltam_volumes']} / {s['deltam_volumes']} ({100 * s['excluded_fraction']:.0f} %)",
                     "EXCESSIVE" if s.get("excessive_motion") else "no"])
    threshold = next((s["fd_threshold_mm"] for s in summaries if "fd_threshold_mm" in s), None)
    body.append(html_table(["series", "corrected", "max FD (mm)", "mean FD (mm)",
                            f"FD > {threshold:g} mm" if threshold is not None else "FD above threshold",
                            "ΔM volumes excluded", "excessive motion"], rows))
    for name in outputs:
        if name.endswith("_desc-confounds_timeseries.tsv") and (folder / name).is_file():
            columns = read_confounds(folder / name)
            if np.isfinite(np.asarray(columns["trans_x"], dtype=np.float64)).any() or any(columns["excluded"]):
                body.append(f"<figure>{_plot(columns, name)}<figcaption>{escape(name)}</figcaption></figure>")
        elif name.endswith("_desc-motioncheck_qc.nii.gz") and (folder / name).is_file():
            body += _montages(folder / name, grid)
    return body
