"""Visual quality control: one HTML page per acquisition beside its maps, one index per run.

Everything is read from the files on disk (the provenance JSON lists them), so a page
can be written right after a fit or regenerated later for an existing output folder.

Where the pages go
------------------
::

    OUT/qc.html                                   the run's index: every session, its status, a
                                                  thumbnail, converged shares and a link to each
                                                  acquisition's page
    OUT/sub-<l>[/ses-<l>]/perf/<src>_qc.html      one page per acquisition, beside its maps

``<src>_qc.html`` follows ``<src>_provenance.json``: one file per acquisition covering
every method, named by its content, without ``desc-`` (which, in this dataset, names the
method of a map, or the BIDS ``brain`` mask). Images are PNG embedded as data URIs (the
styles inline too), so each page is one self-contained file: readable from the file
system, copied or mailed without breaking, written atomically in one piece, and nothing
to clean up when the methods change. Neither name is BIDS: ``.bidsignore`` needs ``*_qc.html`` and
``/qc.html`` (:data:`aslbatch.derivatives.OTHER_BIDSIGNORE`, written with the outputs).

Display conventions
-------------------
Per parameter and method: its map, its standard error (``<param>se``) and, for a method that
learns them, its 95 % interval's half-width (``<param>ci95``: the truth lies within the map ±
this with probability 0.95), each where the method writes it.
Axial slices of the image reoriented to RAS, in radiological convention (the patient's
right on the left, anterior at the top), at most :data:`MAX_SLICES` slices spread over
those holding brain. Every quantity has a fixed colour scale (:data:`SCALES`, API units)
so pages compare day to day; values beyond it take the end colours. A quantity in the
scanner's units (ΔM without an M0), which no fixed scale fits, is shown from 0 to its 99th
percentile in the brain, said in the caption. White: outside the
brain mask; grey: inside the mask without a value (NaN: invalid input, or a standard
error the data do not inform). Histograms and the median / IQR table use the finite
values inside the mask.

The images hold pixels only (a montage: :data:`SCALE_COLOURS` steps of its colour map
in an indexed PNG, whole pixels per voxel; a histogram: step lines on a grid); slice
positions, orientation, colour bars (CSS gradients), ticks and legends are HTML laid
over and beside them. Drawing no text and making no matplotlib axes keeps a page to a
fraction of a second, so one can follow every fit.

Each page records the sha256 of the provenance it was made from
(``<meta name="aslbatch-provenance-sha256">``); the index flags a page whose
provenance has changed since (outputs rewritten, page not).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import matplotlib
import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from matplotlib.colors import to_hex, to_rgb
from matplotlib.lines import Line2D
from matplotlib.patches import StepPatch
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import Bbox, BboxTransformFrom

from ._version import __version__
from .atomic import atomic_open
from .calibration import Z_95
from .derivatives import (OUTPUTS, OUTSIDE_STATUS, QC_INDEX_NAME, QC_PAGE_SUFFIX, STATUS_LEVELS, parameter_table,
                          read_provenance, sha256_file)
from .estimators.base import Status
from .estimators.prior import PRIOR_SHARE, bits_to_flags
from .models import MODELS
from .report import escape, figure_png, html_page, html_table, img, indexed_png, new_figure

__all__ = [
    "IndexEntry",
    "MAX_SLICES",
    "SCALES",
    "Scale",
    "session_report_path",
    "write_run_index",
    "write_session_report",
]

#: most slices in a montage (spread evenly over the slices holding brain)
MAX_SLICES = 12
#: tiles per montage row
MONTAGE_COLUMNS = 6
#: the name of each status code, as in a provenance's ``status_counts``
STATUS_NAMES = {int(code): code.name.lower() for code in Status}
#: colour of each status code in the status montages (outside the mask: background)
STATUS_COLOURS = {
    int(Status.CONVERGED): "#c8c8c8",
    int(Status.MAX_ITERATIONS): "#ff7f00",
    int(Status.AT_BOUND): "#377eb8",
    int(Status.INVALID_INPUT): "#e41a1c",
    int(Status.ATT_UNDETERMINED): "#4daf4a",
    int(Status.CBF_UNDETERMINED): "#984ea3",
}
BACKGROUND = "#ffffff"  # outside the brain mask
NO_VALUE = "#8c8c8c"  # inside the mask, NaN
#: colours of a map's scale in its montages (the colour map resampled; with NO_VALUE and
#: BACKGROUND, a full PNG palette)
SCALE_COLOURS = 254
#: colour stops of a colour bar's CSS gradient
COLOUR_BAR_STOPS = 33
#: bins of a histogram over its fixed scale, and its image size (px)
HISTOGRAM_BINS = 50
HISTOGRAM_SIZE = (400, 130)
GRID_COLOUR = "#e2e2e2"  # a histogram's grid lines
PROVENANCE_SUFFIX = next(f"_{k.name}{k.extension}" for k in OUTPUTS if k.kind == "provenance")
_META = "aslbatch-provenance-sha256"
_META_RE = re.compile(rf'<meta name="{_META}" content="([0-9a-f]{{64}})">')
_STATUS_TEXT = {"done": "done", "skipped": "up to date", "failed": "failed"}


@dataclass(frozen=True)
class Scale:
    """Fixed display range ``[lo, hi]`` in the quantity's API units, and a matplotlib colour map."""

    lo: float
    hi: float
    cmap: str


def _display_scales() -> dict[str, Scale]:
    """The display scale of every parameter of every registered model (from its
    :class:`~aslbatch.models.Parameter`), of its standard error (``<param>se``) and of its 95 %
    interval's half-width (``<param>ci95``: 1.96 times the standard error's)."""
    scales: dict[str, Scale] = {}
    for model_name in MODELS:
        for spec in MODELS[model_name].parameters:
            scales.setdefault(spec.name, Scale(*spec.display, spec.cmap))
            scales.setdefault(spec.name + "se", Scale(0.0, spec.se_display, SE_CMAP))
            scales.setdefault(spec.name + "ci95", Scale(0.0, Z_95 * spec.se_display, SE_CMAP))
    return scales


#: colour map of every standard-error montage
SE_CMAP = "cividis"
#: display scale of every parameter and of its standard error (``<param>se``)
SCALES: dict[str, Scale] = _display_scales()


@dataclass(frozen=True)
class IndexEntry:
    """One session of a run, as the index lists it.

    session : the session's name, ``sub-<l>[_ses-<l>]`` (``SessionOutcome.session``).
    status : ``"done"``, ``"skipped"`` (up to date) or ``"failed"`` (``SessionOutcome.status``).
    reason : why it failed (shown for every status when not empty).
    provenance : the provenance JSON of each of its acquisitions (``<src>_provenance.json``);
        a path that does not exist (an acquisition that failed) is listed as without outputs.
    """

    session: str
    status: str
    reason: str = ""
    provenance: tuple[str | os.PathLike, ...] = ()


def session_report_path(provenance_path: str | os.PathLike) -> Path:
    """The QC page of an acquisition: ``<src>_qc.html`` beside ``<src>_provenance.json``."""
    path = Path(provenance_path)
    if not path.name.endswith(PROVENANCE_SUFFIX):
        raise ValueError(f"{path}: not a provenance file (<source>{PROVENANCE_SUFFIX})")
    return path.with_name(path.name[: -len(PROVENANCE_SUFFIX)] + QC_PAGE_SUFFIX)


# --- reading the outputs ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """The acquisition's brain mask reoriented to RAS: what every map is checked against."""

    mask: np.ndarray  # bool (x, y, z), RAS
    affine: np.ndarray  # of the RAS image
    zooms: tuple[float, float, float]  # mm
    slices: tuple[int, ...]  # shown in montages


def _load(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """A 3-D NIfTI in RAS orientation: data (float64), affine, voxel size (mm)."""
    image = nib.as_closest_canonical(nib.load(path))
    if len(image.shape) != 3:
        raise ValueError(f"{path}: expected a 3-D image, got shape {image.shape}")
    return np.asarray(image.dataobj, dtype=np.float64), image.affine, tuple(float(z) for z in image.header.get_zooms()[:3])


def _chosen_slices(mask: np.ndarray) -> tuple[int, ...]:
    """At most MAX_SLICES axial slices, evenly spread over those holding brain (all if none do)."""
    holding = np.flatnonzero(mask.any(axis=(0, 1)))
    if holding.size == 0:
        holding = np.arange(mask.shape[2])
    if holding.size <= MAX_SLICES:
        return tuple(int(k) for k in holding)
    picks = np.round(np.linspace(0, holding.size - 1, MAX_SLICES)).astype(int)
    return tuple(int(holding[i]) for i in picks)


def _grid(mask_path: Path) -> _Grid:
    data, affine, zooms = _load(mask_path)
    mask = data > 0
    return _Grid(mask, affine, zooms, _chosen_slices(mask))


def _load_on(grid: _Grid, path: Path) -> np.ndarray:
    data, affine, _ = _load(path)
    if data.shape != grid.mask.shape or not np.allclose(affine, grid.affine, atol=1e-4):
        raise ValueError(f"{path}: not on the brain mask's grid (shape {data.shape}, mask {grid.mask.shape})")
    return data


def _session_files(provenance: Mapping[str, Any], folder: Path) -> dict[tuple[str, str | None, str | None], Path]:
    """``{(kind, method, param): path}`` of every output the provenance lists (its folder, its name)."""
    files = {}
    for item in provenance["outputs"]:
        name = Path(str(item["path"])).name
        files[(str(item["kind"]), item.get("method"), item.get("param"))] = folder / name
    return files


def _methods(files: Mapping[tuple[str, str | None, str | None], Path]) -> list[str]:
    """The methods with outputs, in the order they were written."""
    return list(dict.fromkeys(str(k[1]) for k in files if k[1] is not None))


# --- images ----------------------------------------------------------------------------------
#
# Every word and number around an image is HTML placed in percent of the image (see the module
# docstring): the PNGs are made from numpy arrays (montages) or a few artists on a bare Figure
# (histograms).


def _rgb(colours: Sequence[Any]) -> np.ndarray:
    """Matplotlib colours (names, hex, RGB[A] floats) as a palette: n × 3 uint8."""
    return np.round(np.array([to_rgb(c) for c in colours]) * 255).astype(np.uint8)


def _hex(rgb: np.ndarray) -> str:
    return "#" + bytes(rgb[:3]).hex()


@functools.lru_cache(maxsize=None)
def _scale_palette(cmap: str) -> np.ndarray:
    """The colour map resampled to SCALE_COLOURS entries, then NO_VALUE and BACKGROUND (256 × 3 uint8)."""
    colours = matplotlib.colormaps[cmap].resampled(SCALE_COLOURS)(np.arange(SCALE_COLOURS))
    palette = _rgb([*colours, NO_VALUE, BACKGROUND])
    palette.flags.writeable = False  # shared by every caller
    return palette


def _scale_pixels(values: np.ndarray, inside: np.ndarray, scale: Scale) -> np.ndarray:
    """Indices into ``_scale_palette(scale.cmap)``: values binned over the fixed scale as a colour
    map looks them up (beyond it: the end colours), NO_VALUE for NaN inside, BACKGROUND outside."""
    finite = np.isfinite(values)
    level = np.floor((np.where(finite, values, scale.lo) - scale.lo) * (SCALE_COLOURS / (scale.hi - scale.lo)))
    pixels = np.clip(level, 0, SCALE_COLOURS - 1).astype(np.uint8)
    pixels[inside & ~finite] = SCALE_COLOURS
    pixels[~inside] = SCALE_COLOURS + 1
    return pixels


def _tile(volume: np.ndarray, k: int) -> np.ndarray:
    """Axial slice ``k`` of a RAS volume (x, y, z[, c]) as displayed: anterior up, patient's right left."""
    return np.swapaxes(volume[:, :, k], 0, 1)[::-1, ::-1]


def _mosaic(volume: np.ndarray, slices: Sequence[int], fill: Any) -> np.ndarray:
    """The chosen slices of a volume tiled MONTAGE_COLUMNS wide, one ``fill`` voxel apart."""
    tiles = [_tile(volume, k) for k in slices]
    rows_n = math.ceil(len(tiles) / MONTAGE_COLUMNS)
    cols_n = min(len(tiles), MONTAGE_COLUMNS)
    h, w = tiles[0].shape[:2]
    out = np.full(((h + 1) * rows_n - 1, (w + 1) * cols_n - 1), fill, dtype=volume.dtype)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, MONTAGE_COLUMNS)
        out[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = tile
    return out


def _enlarge(pixels: np.ndarray, px: int, height: int) -> np.ndarray:
    """``px`` pixels per column, ``height`` rows (each the nearest source row)."""
    rows = (2 * np.arange(height) + 1) * pixels.shape[0] // (2 * height)
    return pixels[rows].repeat(px, axis=1)


def _ticks(lo: float, hi: float) -> list[float]:
    """The ends of ``[lo, hi]`` and the round values between them at least a tenth of it from either."""
    margin = 0.1 * (hi - lo)
    inner = MaxNLocator(5, steps=[1, 2, 5, 10]).tick_values(lo, hi)
    return [lo, *(float(t) for t in inner if lo + margin <= t <= hi - margin), hi]


def _frame(png: bytes, alt: str, width: int, height: int, labels: Sequence[str], cls: str = "frame") -> str:
    """The image at its size with ``labels`` (absolutely placed spans) over and around it."""
    return f'<div class="{cls}">{img(png, alt, width, height)}{"".join(labels)}</div>'


def _montage(mosaic: np.ndarray, palette: np.ndarray, grid: _Grid, alt: str, side: str) -> str:
    """The mosaic (palette indices) at whole pixels per voxel, rows for the voxels' aspect; slice
    positions (z, mm) on the tiles and the orientation (R, L) under the first column; ``side``
    (a colour bar or a legend) on the right."""
    h, w = mosaic.shape
    px = max(1, min(8, 1000 // w))
    width, height = w * px, max(1, round(h * px * grid.zooms[1] / grid.zooms[0]))
    nx, ny = grid.mask.shape[:2]  # a tile is ny rows by nx columns
    labels = []
    for i, k in enumerate(grid.slices):
        r, c = divmod(i, MONTAGE_COLUMNS)
        z = (grid.affine @ np.array([(nx - 1) / 2, (ny - 1) / 2, k, 1.0]))[2]
        labels.append(f'<span class="z" style="left:{_pct(c * (nx + 1) / w)};top:{_pct(r * (ny + 1) / h)}">'
                      f"z {z:.0f}</span>")
    labels += ['<span class="under" style="left:0">R</span>',
               f'<span class="under" style="right:{_pct(1 - nx / w)}">L</span>']
    png = indexed_png(_enlarge(mosaic, px, height), palette)
    return f'<div class="plot">{_frame(png, alt, width, height, labels)}{side}</div>'


@functools.lru_cache(maxsize=None)
def _colour_bar(scale: Scale) -> str:
    """The scale's colours as a CSS gradient, its ticks in HTML, and end caps in its end colours
    (values beyond the scale take them)."""
    palette = _scale_palette(scale.cmap)
    stops = ", ".join(f"{_hex(palette[i])} {_pct((i + 0.5) / SCALE_COLOURS)}"
                      for i in np.linspace(0, SCALE_COLOURS - 1, COLOUR_BAR_STOPS).round().astype(int))
    ticks = "".join(f'<span style="bottom:{_pct((t - scale.lo) / (scale.hi - scale.lo))}">{t:.4g}</span>'
                    for t in _ticks(scale.lo, scale.hi))
    return (f'<div class="cap" style="background:{_hex(palette[SCALE_COLOURS - 1])}"></div>'
            f'<div class="ramp" style="background:linear-gradient(to top, {stops})">{ticks}</div>'
            f'<div class="cap low" style="background:{_hex(palette[0])}"></div>')


def _data_scale(quantity: str, values: np.ndarray) -> Scale:
    """The quantity's fixed scale; for one in the scanner's units (no fixed upper end, e.g. ΔM
    without an M0) 0 to the 99th percentile of ``values`` (finite in-mask values of its first map)."""
    scale = SCALES[quantity]
    if math.isfinite(scale.hi):
        return scale
    top = float(np.percentile(values, 99)) if values.size else math.nan
    return Scale(scale.lo, top if math.isfinite(top) and top > scale.lo else scale.lo + 1.0, scale.cmap)


def _map_montage(values: np.ndarray, grid: _Grid, quantity: str, units: str, alt: str,
                 scale: Scale | None = None) -> str:
    scale = SCALES[quantity] if scale is None else scale
    values = _mosaic(values, grid.slices, np.nan)
    inside = _mosaic(grid.mask, grid.slices, False)
    bar = f'<div class="bar"><div>{escape(quantity)} ({escape(units)})</div>{_colour_bar(scale)}</div>'
    return _montage(_scale_pixels(values, inside, scale), _scale_palette(scale.cmap), grid, alt, bar)


def _status_montage(codes: np.ndarray, grid: _Grid, alt: str) -> str:
    known = sorted(STATUS_COLOURS)  # codes are checked against STATUS_COLOURS by the caller
    palette = _rgb([STATUS_COLOURS[c] for c in known] + [BACKGROUND])
    pixels = np.searchsorted(known, _mosaic(codes, grid.slices, known[0]))
    pixels[~_mosaic(grid.mask, grid.slices, False)] = len(known)
    legend = "".join(f'<div><span class="box" style="background:{STATUS_COLOURS[c]}"></span>'
                     f"{escape(STATUS_NAMES[c])}</div>" for c in known)
    return _montage(pixels, palette, grid, alt, f'<div class="legend">{legend}</div>')


def _histogram(samples: Mapping[str, np.ndarray], quantity: str, alt: str, scale: Scale | None = None) -> str:
    """Step histograms (one per method, HISTOGRAM_BINS over the fixed scale) of finite in-mask
    values; ticks, legend and the share beyond the scale in HTML."""
    scale = SCALES[quantity] if scale is None else scale
    width, height = HISTOGRAM_SIZE
    counts = {m: np.histogram(v, bins=HISTOGRAM_BINS, range=(scale.lo, scale.hi))[0] for m, v in samples.items()}
    highest = max((int(c.max()) for c in counts.values()), default=0)
    top = 1.05 * highest if highest else 1.0
    xs = _ticks(scale.lo, scale.hi)
    ys = [float(t) for t in MaxNLocator(3, integer=True).tick_values(0, top) if 0 < t <= top] if highest else []
    figure = new_figure(width / 100, height / 100, dpi=100, layout=None)
    to_pixels = BboxTransformFrom(Bbox([[scale.lo, 0], [scale.hi, top]])) + figure.transFigure
    grid_lines = [([x, x], [0, top]) for x in xs[1:-1]] + [([scale.lo, scale.hi], [y, y]) for y in ys]
    for x, y in grid_lines:
        figure.add_artist(Line2D(x, y, color=GRID_COLOUR, linewidth=1, transform=to_pixels))
    edges = np.linspace(scale.lo, scale.hi, HISTOGRAM_BINS + 1)
    legend = []
    for i, (method, values) in enumerate(samples.items()):
        colour = to_hex(f"C{i}")
        if values.size == 0:
            legend.append(f'<div><span class="line"></span>{escape(method)}: no finite value</div>')
            continue
        figure.add_artist(StepPatch(counts[method], edges, fill=False, edgecolor=colour, linewidth=1.3,
                                    transform=to_pixels))
        beyond = np.count_nonzero((values < scale.lo) | (values > scale.hi)) / values.size
        note = f" ({100 * beyond:.0f} % beyond the scale)" if beyond > 0 else ""
        legend.append(f'<div><span class="line" style="background:{colour}"></span>'
                      f"{escape(method)}{escape(note)}</div>")
    labels = [f'<span class="x" style="left:{_pct((x - scale.lo) / (scale.hi - scale.lo))}">{x:.4g}</span>'
              for x in xs]
    labels += [f'<span class="y" style="bottom:{_pct(y / top)}">{y:.0f}</span>' for y in ys]
    labels.append('<span class="title">voxels</span>')
    if not highest:
        labels.append('<span class="empty">no finite value in the brain mask</span>')
    frame = _frame(figure_png(figure), alt, width, height, labels, cls="frame hist")
    return f'<div class="plot">{frame}<div class="legend">{"".join(legend)}</div></div>'


# --- HTML ------------------------------------------------------------------------------------

#: the pages' rules after the shared stylesheet (aslbatch.report.CSS): montages, colour bars, histograms
_CSS = """
.failed { background: #fde0dc; }
.thumbs div { display: inline-block; margin: 0 0.6em 0.3em 0; text-align: center; font-size: 0.85em; }
.plot { display: flex; align-items: center; gap: 16px; margin-bottom: 1.4em; font-size: 11px; }
.frame { position: relative; flex: none; line-height: 0; }
.frame img { display: block; image-rendering: pixelated; }
.frame span, .ramp span { position: absolute; line-height: 1.2; white-space: nowrap; }
.frame .z { background: rgba(255, 255, 255, 0.7); padding: 0 2px; }
.frame .under { top: 100%; font-weight: bold; font-size: 12px; }
.hist { border: 1px solid #888; margin: 1.3em 0 0 4em; }
.hist .x { top: 100%; transform: translateX(-50%); padding-top: 2px; }
.hist .y { right: 100%; transform: translateY(50%); padding-right: 4px; }
.hist .title { bottom: 100%; right: 100%; padding: 0 4px 2px 0; }
.hist .empty { top: 45%; width: 100%; text-align: center; color: #777; }
.bar { min-width: 7em; }
.ramp { position: relative; width: 14px; height: 130px; }
.ramp span { left: 100%; transform: translateY(50%); padding-left: 7px; }
.ramp span::before { content: ""; position: absolute; left: 0; top: 50%; width: 4px; border-top: 1px solid #222; }
.cap { width: 14px; height: 9px; margin-top: 4px; clip-path: polygon(50% 0, 100% 100%, 0 100%); }
.cap.low { margin: 0; clip-path: polygon(0 0, 100% 0, 50% 100%); }
.legend div { margin: 2px 0; }
.box, .line { display: inline-block; width: 11px; height: 11px; margin-right: 5px; vertical-align: middle; }
.line { width: 18px; height: 2px; }
.ramp, .cap, .box, .line { print-color-adjust: exact; -webkit-print-color-adjust: exact; }
"""


def _href(relative: str) -> str:
    return escape(quote(relative))


def _number(value: float) -> str:
    return "—" if not math.isfinite(value) else f"{value:.4g}"


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


def _stats(values: np.ndarray) -> tuple[int, float, float, float]:
    """Number of finite values, median, first and third quartiles."""
    if values.size == 0:
        return 0, math.nan, math.nan, math.nan
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return int(values.size), float(median), float(q1), float(q3)


def _json_block(value: Any) -> str:
    return f"<pre>{escape(json.dumps(value, indent=2, ensure_ascii=False))}</pre>"


# --- the session page ------------------------------------------------------------------------


def _suppression_section(summary: Mapping[str, Any]) -> list[str]:
    """The page's background-suppression table (:func:`aslbatch.bids.background_suppression_summary`)."""
    if not summary:
        return []

    def shown(value: Any) -> str:
        if value is None:
            return "not stated in the input"
        if isinstance(value, bool):
            return "yes" if value else "no"
        return ", ".join(map(str, value)) if isinstance(value, list) else str(value)

    rows = [
        ["used in the acquisition (BackgroundSuppression)", shown(summary.get("BackgroundSuppression"))],
        ["pulses (BackgroundSuppressionNumberPulses)", shown(summary.get("BackgroundSuppressionNumberPulses"))],
        ["correction applied", shown(summary.get("BackgroundSuppressionCorrection"))],
        ["α_BS in the model", _number(float(summary.get("BackgroundSuppressionFactor", 1.0)))],
    ]
    return ['<h2 id="background-suppression">Background suppression</h2>', html_table(None, rows),
            f"<p>{escape(str(summary.get('BackgroundSuppressionCorrectionDescription', '')))}</p>"]


def _timing_headers(model: dict) -> tuple[str, str]:
    """The protocol table's two timing columns: PASL's protocol holds the bolus duration and TI."""
    pulsed = model.get("model") == "pasl" or (model.get("options") or {}).get("labeling") == "pasl"
    return ("bolus duration τ_b (s)", "TI (s)") if pulsed else ("label duration τ (s)", "PLD (s)")


def write_session_report(provenance_path: str | os.PathLike) -> Path:
    """Write the QC page of one acquisition beside its maps; returns its path (``<src>_qc.html``).

    Reads the provenance (:func:`aslbatch.derivatives.read_provenance`) and the files it
    lists, which must sit in the provenance's folder. The page shows, per parameter of
    the model: montages of each method's map and standard error on :data:`SCALES`, and
    histograms within the brain mask; the median and IQR of every map within the mask;
    the share of mask voxels per status code per method and status montages; the
    protocol (per volume τ, PLD in s, crushing), constants, background suppression (used,
    pulses, whether α_BS was applied and its value), estimator options and run
    settings; the inputs; relative links to every output. A listed file that is missing
    is reported as missing on the page. Raises FileNotFoundError for a missing
    provenance or brain mask, ValueError for an unreadable provenance or a map off the
    mask's grid (nothing is written then).
    """
    provenance_path = Path(provenance_path)
    page_path = session_report_path(provenance_path)
    provenance = read_provenance(provenance_path)
    folder = provenance_path.parent
    files = _session_files(provenance, folder)
    model = provenance.get("model") or {}
    model_name = str(model.get("model", ""))
    methods = _methods(files)
    params = list(dict.fromkeys(str(k[2]) for k in files if k[0] == "map"))  # in the model's order
    unknown = [p for p in params if p not in SCALES or p not in parameter_table()]
    if unknown:
        raise ValueError(f"{provenance_path}: no display scale for parameter(s) {unknown}")
    mask_path = files.get(("mask", None, None))
    if mask_path is None:
        raise ValueError(f"{provenance_path}: lists no brain mask")
    if not mask_path.is_file():
        raise FileNotFoundError(f"{mask_path}: the brain mask is missing; no QC page without it")
    grid = _grid(mask_path)
    n_mask = int(grid.mask.sum())
    source = str(provenance["source_name"])

    missing: list[str] = []
    stats_rows: list[list[Any]] = []
    sections: list[str] = []
    for param in params:
        units = parameter_table()[param].units
        name = parameter_table()[param].names.get(model_name, param)
        parts = [f'<h3 id="{escape(param)}">{escape(param)}: {escape(name)} ({escape(units)})</h3>']
        for quantity, kind in ((param, "map"), (param + "se", "stderr"), (param + "ci95", "ci95")):
            samples: dict[str, np.ndarray] = {}
            scale = None
            for method in methods:
                path = files.get((kind, method, param))
                if path is None:
                    continue  # the method gives no standard errors or intervals
                label = f"{method} {quantity}"
                if not path.is_file():
                    missing.append(path.name)
                    parts.append(f'<p class="warn">{escape(label)}: {escape(path.name)} is missing</p>')
                    continue
                values = _load_on(grid, path)
                inside = values[grid.mask]
                samples[method] = inside[np.isfinite(inside)]
                scale = _data_scale(quantity, samples[method]) if scale is None else scale
                n, median, q1, q3 = _stats(samples[method])
                stats_rows.append([method, quantity, units, f"{n} / {n_mask}", _number(median), _number(q1),
                                   _number(q3), _number(q3 - q1)])
                fitted = "" if scale is SCALES[quantity] else " (its 99th percentile in the brain)"
                caption = f"{label} ({units}), scale {scale.lo:g}–{scale.hi:.4g}{fitted}; {path.name}"
                parts.append(f"<figure>{_map_montage(values, grid, quantity, units, label, scale)}"
                             f"<figcaption>{escape(caption)}</figcaption></figure>")
            if samples:
                parts.append(f"<figure>{_histogram(samples, quantity, quantity + ' histogram', scale)}"
                             f"<figcaption>{escape(quantity)} ({escape(units)}) within the brain mask, finite "
                             f"values: voxels per bin ({HISTOGRAM_BINS} over the scale)</figcaption></figure>")
        sections.append("\n".join(parts))

    status_rows, status_figures = [], []
    for method in methods:
        counts = provenance["status_counts"].get(method, {})
        per_code = [int(counts.get(STATUS_NAMES[c], 0)) for c in sorted(STATUS_NAMES)]
        total = sum(per_code)
        status_rows.append([method, total] + [f"{100 * k / total:.1f} % ({k})" if total else "—" for k in per_code])
        path = files.get(("status", method, None))
        if path is None:
            continue
        if not path.is_file():
            missing.append(path.name)
            status_figures.append(f'<p class="warn">{escape(method)} status: {escape(path.name)} is missing</p>')
            continue
        codes = _load_on(grid, path)
        inside_codes = set(np.unique(codes[grid.mask]).astype(int).tolist())
        if not inside_codes <= set(STATUS_COLOURS):
            raise ValueError(f"{path}: unknown status code(s) {sorted(inside_codes - set(STATUS_COLOURS))} "
                             f"inside the mask ({OUTSIDE_STATUS} is for outside only)")
        status_figures.append(f"<figure>{_status_montage(codes, grid, method + ' status')}"
                              f"<figcaption>{escape(method)} fit status per voxel; {escape(path.name)}"
                              "</figcaption></figure>")

    prior_rows = _prior_dominated_rows(files, methods, params, grid, missing)

    preprocessing = provenance.get("preprocessing") or {}
    protocol = preprocessing.get("protocol", {})
    taus, plds, crushed = (protocol.get(k, []) for k in ("label_duration", "pld", "crushed"))
    protocol_rows = [[i + 1, _number(float(t)), _number(float(w)), "yes" if c else "no"]
                     for i, (t, w, c) in enumerate(zip(taus, plds, crushed))]
    constants = preprocessing.get("constants", {})

    links = []
    for item in provenance["outputs"]:
        name = Path(str(item["path"])).name
        state = "" if (folder / name).is_file() else ' <span class="warn">(missing)</span>'
        links.append(f'<li><a href="{_href(name)}">{escape(name)}</a>{state}</li>')
    links.append(f'<li><a href="{_href(provenance_path.name)}">{escape(provenance_path.name)}</a></li>')

    session = provenance.get("session")
    header = [
        ("source", source), ("subject", provenance.get("subject")), ("session", session if session else "—"),
        ("model", model_name), ("methods", ", ".join(methods)), ("brain mask voxels", n_mask),
        ("shape", " × ".join(str(s) for s in grid.mask.shape)),
        ("voxel size (mm)", " × ".join(f"{z:g}" for z in grid.zooms)),
        ("processed", f"{provenance.get('started')} → {provenance.get('finished')} ({provenance.get('duration_s')} s)"),
        ("aslbatch", provenance.get("aslbatch_version")),
    ]
    status_header = ["method", "voxels"] + [f"{c} {STATUS_NAMES[c]}" for c in sorted(STATUS_NAMES)]
    body = [
        f"<h1>QC: {escape(source)}</h1>",
        html_table(None, header),
        *([f"<p><b>What the protocol determines:</b> {escape(str(provenance['decision'].get('reason')))}</p>"]
          if provenance.get("decision") else []),
        "<p>" + " · ".join(f'<a href="#{escape(p)}">{escape(p)}</a>' for p in params)
        + ' · <a href="#status">status</a> · <a href="#protocol">protocol</a> · '
        '<a href="#background-suppression">background suppression</a> · <a href="#files">files</a></p>',
        '<p class="muted">Axial slices, radiological convention (R on the left), z = slice position in mm. '
        "White: outside the brain mask; grey: no value (NaN). Fixed colour scales; values beyond a scale "
        "take its end colours.</p>",
    ]
    if missing:
        body.append(f'<p class="warn">Missing output file(s): {escape(", ".join(missing))}</p>')
    if _plausibility_flag(provenance):
        body.append(f'<p class="warn"><b>Flagged:</b> {escape(_plausibility_flag(provenance))}</p>')
    body += [
        "<h2>Fit status (share of the brain mask)</h2>",
        html_table(status_header, status_rows),
        "<ul>" + "".join(f"<li>{escape(code)}: {escape(text)}</li>" for code, text in STATUS_LEVELS.items()) + "</ul>",
        *(["<h2>Prior-dominated values (share of the brain mask)</h2>",
           html_table(["method", *params], prior_rows),
           '<p class="muted">Voxels whose standard error of the parameter is undefined or above '
           f"{PRIOR_SHARE:g} × the SD of the training prior: the value there comes from the prior (for a network, "
           "the middle of its training range) rather than the data; bit masks in *_priordominated.nii.gz.</p>"]
          if prior_rows else []),
        "<h2>Within the brain mask: median and interquartile range</h2>",
        html_table(["method", "map", "units", "finite / mask", "median", "Q1", "Q3", "IQR"], stats_rows),
        "<h2>Maps</h2>", *sections,
        '<h2 id="status">Status maps</h2>', *status_figures,
        *_motion_section(provenance, folder, grid),
        '<h2 id="protocol">Protocol</h2>',
        html_table(["volume", *_timing_headers(model), "crushed"], protocol_rows),
        *([f"<p>Notes: {escape('; '.join(str(n) for n in preprocessing['notes']))}</p>"]
          if preprocessing.get("notes") else []),
        "<h2>Constants</h2>", html_table(["constant", "value"], [[k, v] for k, v in constants.items()]),
        *_suppression_section(preprocessing.get("background_suppression") or {}),
        "<h2>Settings</h2>",
        "<h3>Model options</h3>", _json_block(model.get("options", {})),
        "<h3>Estimator options</h3>", _json_block(provenance.get("estimator_options", {})),
        "<h3>Run settings</h3>", _json_block(provenance.get("run_settings")),
        f"<p>settings digest {escape(provenance.get('settings_digest'))}; "
        f"versions {escape(', '.join(f'{k} {v}' for k, v in (provenance.get('versions') or {}).items()))}</p>",
        "<h2>Inputs</h2>",
        html_table(["file", "sha256"],
                   [[i.get("path"), i.get("sha256") or "—"] for i in provenance.get("inputs", [])]),
        '<h2 id="files">Files</h2>', f"<ul>{''.join(links)}</ul>",
        f'<p class="muted">Page written by aslbatch {escape(__version__)} on {escape(_now())}.</p>',
    ]
    meta = f'<meta name="{_META}" content="{sha256_file(provenance_path)}">'
    with atomic_open(page_path, "w", encoding="utf-8") as fh:
        fh.write(html_page(f"QC {source}", "\n".join(body), head=meta, extra_css=_CSS))
    return page_path


def _prior_dominated_rows(files: Mapping[tuple[str, str | None, str | None], Path], methods: Sequence[str],
                          params: Sequence[str], grid: _Grid, missing: list[str]) -> list[list[Any]]:
    """Per method with a prior-dominated bit mask: the share of the mask flagged per parameter (bit j:
    the j-th of ``params``, the model's order); a missing file is added to ``missing``."""
    rows = []
    for method in methods:
        path = files.get(("flags", method, None))
        if path is None:
            continue
        if not path.is_file():
            missing.append(path.name)
            rows.append([method] + ["missing"] * len(params))
            continue
        flags = bits_to_flags(_load_on(grid, path)[grid.mask], len(params))
        rows.append([method] + [_pct(float(flags[:, j].mean())) if flags.size else "—" for j in range(len(params))])
    return rows


# --- the run index ---------------------------------------------------------------------------


def _motion_section(provenance: Mapping[str, Any], folder: Path, grid: _Grid) -> list[str]:
    """The motion plot, before/after montages and excluded share (:mod:`aslbatch.qc_motion`)."""
    from .qc_motion import motion_section

    return motion_section(provenance, folder, grid)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _page_is_current(page: Path, provenance_path: Path) -> bool:
    """The page was made from this provenance (its recorded sha256 matches)."""
    with open(page, encoding="utf-8", errors="replace") as fh:
        found = _META_RE.search(fh.read(4096))
    return found is not None and found.group(1) == sha256_file(provenance_path)


def _thumbnail(provenance: Mapping[str, Any], folder: Path) -> bytes:
    """A central axial slice of the first method's cbf on its fixed scale, ~128 px wide."""
    files = _session_files(provenance, folder)
    methods = _methods(files)
    path = files.get(("map", methods[0] if methods else None, "cbf"))
    if path is None:
        raise ValueError("no cbf map listed")
    values = _load(path)[0]
    finite = np.isfinite(values)
    holding = np.flatnonzero(finite.any(axis=(0, 1)))
    k = int(holding[holding.size // 2]) if holding.size else values.shape[2] // 2
    pixels = _scale_pixels(_tile(values, k), _tile(finite, k), SCALES["cbf"])
    px = max(1, 128 // pixels.shape[1])
    return indexed_png(_enlarge(pixels, px, pixels.shape[0] * px), _scale_palette(SCALES["cbf"].cmap))


def _plausibility_flag(provenance: Mapping[str, Any]) -> str:
    """Why the provenance flags the result as implausible (:mod:`aslbatch.plausibility`), or ""."""
    judgement = provenance.get("plausibility") or {}
    return str(judgement.get("message") or "flagged") if judgement.get("flagged") else ""


def _converged(provenance: Mapping[str, Any]) -> str:
    """Share of the mask converged, per method (from the provenance's status counts)."""
    shares = []
    for method, counts in provenance["status_counts"].items():
        total = sum(int(v) for v in counts.values())
        converged = int(counts.get(STATUS_NAMES[int(Status.CONVERGED)], 0))
        shares.append(f"{method} {100 * converged / total:.0f} % converged" if total else f"{method}: no voxel")
    return ", ".join(shares)


def _acquisition_cell(provenance_path: Path, out_dir: Path) -> str:
    """Thumbnail, converged shares and link of one acquisition; problems are shown in the cell."""
    name = provenance_path.name[: -len(PROVENANCE_SUFFIX)]
    if not provenance_path.is_file():
        return f'<div><span class="muted">{escape(name)}: no outputs</span></div>'
    try:
        provenance = read_provenance(provenance_path)
        thumb = img(_thumbnail(provenance, provenance_path.parent), f"{name} cbf")
        flag = _plausibility_flag(provenance)
        from .qc_motion import motion_index_text

        motion = motion_index_text(provenance)
        label = f"{escape(name)}<br>{escape(_converged(provenance))}" + (
            f'<br><span class="warn">flagged: {escape(flag)}</span>' if flag else "") + (
            f'<br><span class="{"warn" if "EXCESSIVE" in motion else "muted"}">{escape(motion)}</span>' if motion else "")
    except (OSError, ValueError, ImageFileError) as exc:
        thumb, label = f'<span class="warn">no thumbnail ({escape(exc)})</span>', escape(name)
    page = session_report_path(provenance_path)
    if not page.is_file():
        return f'<div>{thumb}<br>{label} <span class="warn">(no QC page)</span></div>'
    href = os.path.relpath(os.path.abspath(page), os.path.abspath(out_dir)).replace(os.sep, "/")
    stale = "" if _page_is_current(page, provenance_path) else ' <span class="warn">(page out of date)</span>'
    return f'<div><a href="{_href(href)}">{thumb}<br>{label}</a>{stale}</div>'


def write_run_index(out_dir: str | os.PathLike, entries: Sequence[IndexEntry], *, run_id: str | None = None) -> Path:
    """Write ``OUT/qc.html``: every session with its status, failures first; returns its path.

    Each row: the session, its status (done / up to date / failed) and reason, and per
    acquisition a thumbnail (a central axial cbf slice of the first method, 0–100
    mL/100 g/min) and each method's share of converged voxels, linking to its QC page
    by a relative link. A missing provenance, page or map, and a page older than its
    provenance, are noted in its row, never an error. ``run_id`` goes into the title. Raises ValueError for an unknown
    status or a path not named ``<src>_provenance.json``, OSError if the page cannot be
    written.
    """
    out_dir = Path(out_dir)
    for entry in entries:
        for path in entry.provenance:
            session_report_path(path)  # a provenance file name, or ValueError
        if entry.status not in _STATUS_TEXT:
            raise ValueError(f"session {entry.session!r}: status must be one of {sorted(_STATUS_TEXT)}, "
                             f"got {entry.status!r}")
    ordered = sorted(entries, key=lambda e: e.status != "failed")  # stable: failures first, then as given
    counts = {status: sum(e.status == status for e in entries) for status in _STATUS_TEXT}
    rows = []
    for entry in ordered:
        cells = "".join(_acquisition_cell(Path(p), out_dir) for p in entry.provenance)
        cls = ' class="failed"' if entry.status == "failed" else ""
        rows.append(f"<tr{cls}><td>{escape(entry.session)}</td><td>{escape(_STATUS_TEXT[entry.status])}</td>"
                    f'<td>{escape(entry.reason)}</td><td class="thumbs">{cells}</td></tr>')
    title = "aslbatch QC" + (f" — run {run_id}" if run_id else "")
    body = "\n".join([
        f"<h1>{escape(title)}</h1>",
        f"<p>{counts['done']} done, {counts['skipped']} up to date, {counts['failed']} failed; "
        f"written {escape(_now())} by aslbatch {escape(__version__)}.</p>",
        '<p class="muted">Thumbnails: a central axial slice of cbf (first method), 0–100 mL/100 g/min, '
        "radiological convention. Click one for the acquisition's QC page.</p>",
        "<table><tr><th>session</th><th>status</th><th>reason</th><th>acquisitions</th></tr>",
        *rows,
        "</table>",
    ])
    path = out_dir / QC_INDEX_NAME
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(html_page(title, body, extra_css=_CSS))
    return path
