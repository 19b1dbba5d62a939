"""From one BIDS acquisition to what the estimators fit: ΔM/M0t per voxel and volume.

:func:`prepare_acquisition` takes a :class:`~aslbatch.bids.Acquisition` (one series
for the one-compartment model, a non-crushed + crushed pair for the two-compartment
model) and returns a :class:`PreparedData`: the signals ``(n_voxels, n_volumes)`` as
ΔM/M0t inside a brain mask, the :class:`~aslbatch.protocol.Protocol` of those
volumes, the mask, the source grid (affine, shape), per-voxel slice-timing offsets,
the M0 map, the model :class:`~aslbatch.protocol.Constants` and notes on what was
done. The steps, each a small pure function that can be tested alone:

1. **ΔM** (:func:`pair_difference`). ΔM = control − label. Control and label
   volumes (in acquisition order, other volume types skipped) are taken two by two:
   each pair must be one control and one label, in either order (control first or
   label first, even mixed within a series), with the same label duration and PLD.
   ``deltam`` volumes are used as they are; ``cbf``, ``noRF`` and ``n/a`` volumes are
   ignored (with a note); ``m0scan`` volumes are the M0 when M0Type is Included and
   ignored otherwise.
2. **Repeats** (:func:`average_repeats`). Volumes with the same (τ, PLD, crushed),
   times compared to :data:`TIME_DECIMALS` decimals of a second, are averaged. The
   output volumes are ordered by (crushed, PLD, τ), each ascending: for a 2C pair the
   non-crushed series' conditions come first, then the crushed ones (the order of
   the default 2C protocol), each in ascending PLD, ties in ascending τ.
3. **M0** (:func:`m0_from_series`), by the series' M0Type:

   - ``Separate``: the m0scan image, averaged over its volumes;
   - ``Included``: the series' m0scan volumes, averaged;
   - ``Estimate``: the sidecar's M0Estimate, one value for every voxel. BIDS defines
     M0Estimate as the M0 of *blood*, so the tissue M0t the models divide by is
     λ · M0Estimate (ASL_MODELS.md: M0b = M0t/λ);
   - ``Absent`` without background suppression: the mean control image;
   - ``Absent`` with background suppression: none. M0t = 1 in every voxel, so the signals are
     ΔM in the scanner's units, and only the ``relative`` model (relative CBF and ΔM) is
     decided for them (:func:`aslbatch.identify.decide`).

   An M0 image acquired with a short recovery time, RepetitionTimePreparation TR
   below :data:`M0_SHORT_TR_S` (5 s, as ASLPrep after Alsop 2015), has not fully
   recovered: it is divided by the saturation-recovery factor 1 − e^(−TR/T1t), with
   the tissue T1 of the Constants (:func:`saturation_recovery_factor`). Included
   M0 volumes use the series' TR at those volumes. Background suppression is *not*
   corrected in the data: with ``background_suppression_correction`` the Constants
   carry α_BS (:func:`aslbatch.bids.constants_from_metadata`), and it enters the
   kinetic model through ``Constants.alpha_bs``.
4. **Brain mask** (:func:`brain_mask`), from the M0 image when no mask is given
   (for M0Type Estimate and a series without M0, which have no M0 image, from the mean
   control image, or the mean ΔM without control volumes): Otsu's threshold on the histogram of the image
   (:func:`otsu_threshold`), then the largest 6-connected component, then holes
   filled slice by slice (both scipy.ndimage). An image with no contrast to split (a
   constant M0, as numerical phantoms have) gives every finite voxel > 0, with a
   warning and a note. A given mask is a NIfTI, non-zero = inside. Voxels whose M0 is
   ≤ 0 or not finite (in any series of the acquisition) are removed from either mask,
   with a note of how many.
5. **Signals**: each series' ΔM divided by its own M0 (a pair may have two M0
   scans), voxels in the mask in C order (``mask.nonzero()``), averaged repeats,
   float64. Per-voxel slice offsets (s, to add to the PLD) come from
   :func:`aslbatch.bids.slice_offsets` along the slice axis (zeros for 3D
   readouts); the two series of a pair must share them.

**Grids** (:func:`onto_grid`). Every image combined with the (first) ASL series, a separate M0,
a user's mask and the other series of a pair (with its M0), is brought onto the series' grid
first, never used voxel by voxel on another one: the same grid (shape equal, affines within
:data:`AFFINE_TOLERANCE` mm) as it is; the same physical grid stored with permuted or flipped
axes reoriented exactly (nibabel's orientation tools, the affine checked after); any other
grid resampled (trilinear, masks nearest neighbour; outside the image's field of view: no
value, so those voxels leave the mask) with a warning and a note, or refused, by
``on_grid_mismatch`` (:data:`GRID_POLICIES`). A pair with 2D slice timing on two grids is
refused: the timing cannot follow a resampling.

The per-volume timing, M0 kind and slice timing come read and checked, one
:class:`~aslbatch.bids.SeriesMetadata` per series (:func:`aslbatch.bids.check_series`,
run once by the pipeline): preparing parses no sidecar itself (only
:func:`protocol_from_sidecars`, for sidecar files outside a dataset, does).

Every input problem raises :class:`~aslbatch.bids.BidsError` naming the file.
scipy is imported only when a mask is computed.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field as dataclass_field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from . import bids
from .bids import Acquisition, AslSeries, BidsError, SeriesMetadata
from .protocol import Constants, Protocol, ProtocolError

__all__ = [
    "DEFAULT_GRID_POLICY",
    "GRID_POLICIES",
    "M0_SHORT_TR_S",
    "PreparedData",
    "SidecarProtocol",
    "TIME_DECIMALS",
    "average_repeats",
    "repeat_standard_error",
    "brain_mask",
    "load_mask",
    "onto_grid",
    "reorientation",
    "m0_from_series",
    "m0_from_volumes",
    "otsu_threshold",
    "pair_difference",
    "prepare_acquisition",
    "protocol_from_sidecars",
    "saturation_recovery_factor",
]

#: an M0 with RepetitionTimePreparation below this (s) gets the saturation-recovery
#: correction (ASLPrep's rule, after Alsop et al. 2015, p. 113)
M0_SHORT_TR_S = 5.0
#: label durations and PLDs equal to this many decimals of a second are the same condition
TIME_DECIMALS = 6
#: histogram bins of Otsu's threshold
OTSU_BINS = 256
#: no contrast to split when the mean of Otsu's dark class is within this fraction of the
#: bright class's (phantom M0 and mean ΔM down to SNR 2: the dark mean is <= 13 % of the bright one;
#: a constant M0 with noise at M0 SNR 3 still has its class means within ~40 %)
MIN_CONTRAST = 0.5
#: ... or when Otsu's bright class holds fewer than this fraction of the finite voxels
MIN_BRIGHT_FRACTION = 0.01
#: volume types that are neither ΔM nor M0: skipped with a note
IGNORED_VOLUME_TYPES = ("cbf", "noRF", "n/a")
#: affines further apart than this (mm, any element) count as different grids
AFFINE_TOLERANCE = 1e-3
#: what happens to an image (M0, user mask, the other series of a pair) on another grid than the ASL
#: series once exact reorientation cannot map it there: resampled (with a warning and a note) or refused
GRID_POLICIES = ("resample", "refuse")
#: default policy: resample, as ASLPrep and ExploreASL do with M0 (a smooth image; measured on a phantom:
#: README "Images on different grids")
DEFAULT_GRID_POLICY = "resample"

log = logging.getLogger("aslbatch.preprocess")

_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError,
                nib.spatialimages.HeaderDataError)


# --- the result ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PreparedData:
    """One acquisition ready to fit.

    Attributes
    ----------
    signals : ΔM/M0t, float64 ``(n_voxels, n_volumes)``; voxels are ``mask.nonzero()``
        (C order), volumes follow ``protocol``.
    protocol : τ, PLD and crushed flag of every output volume.
    mask : 3-D bool, the voxels in ``signals``.
    affine : 4×4 voxel-to-world affine of the ASL series.
    shape : spatial shape (3 ints) of the ASL series.
    slice_offsets : per voxel (n_voxels,), s: the time after the PLD at which the
        voxel's slice was read (0 for 3D readouts); the voxel's effective PLD of
        volume v is ``protocol.pld[v] + slice_offsets[voxel]``.
    m0 : 3-D M0t map (float64) of the first series (the non-crushed one of a pair),
        after any saturation-recovery correction, over the whole grid.
    constants : model constants, from the metadata with the user's overrides.
    notes : what was done and what was skipped, one sentence each.
    source_files : the files read (dataset-relative for BIDS files).
    model : ``"1c"`` or ``"2c"`` (the acquisition's).
    source_name : the base of output names (the acquisition's).
    signal_se : standard error of each averaged signal from the spread of its repeats
        (:func:`repeat_standard_error`), like ``signals``; NaN where a condition was read once.
    background_suppression : what the outputs say about background suppression: whether the
        acquisition used it, its pulses, whether α_BS entered the model and its value
        (:func:`aslbatch.bids.background_suppression_summary`; empty when not known).
    """

    signals: np.ndarray
    protocol: Protocol
    mask: np.ndarray
    affine: np.ndarray
    shape: tuple[int, int, int]
    slice_offsets: np.ndarray
    m0: np.ndarray
    constants: Constants
    notes: tuple[str, ...]
    source_files: tuple[str, ...]
    model: str = "1c"
    source_name: str = ""
    signal_se: np.ndarray | None = None
    background_suppression: Mapping[str, Any] = dataclass_field(default_factory=dict)
    #: per series, what motion correction and robust averaging did (:class:`aslbatch.motion.SeriesMotion`);
    #: empty when neither ran
    motion: tuple[Any, ...] = ()

    @property
    def n_voxels(self) -> int:
        """Number of voxels in the mask."""
        return int(self.signals.shape[0])

    def unmask(self, values: np.ndarray, fill: float = np.nan) -> np.ndarray:
        """Scatter per-voxel ``values`` ``(n_voxels, ...)`` back to the grid ``(*shape, ...)``."""
        values = np.asarray(values)
        if values.shape[:1] != (self.n_voxels,):
            raise ValueError(f"values must have {self.n_voxels} rows (one per voxel), got shape {values.shape}")
        out = np.full(self.shape + values.shape[1:], fill, dtype=np.result_type(values.dtype, np.asarray(fill)))
        out[self.mask] = values
        return out


# --- small pure helpers -----------------------------------------------------------------------


def pair_difference(
    data: np.ndarray, volume_types: Sequence[str], *, source: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """ΔM = control − label of every control/label pair, along the last axis of ``data``.

    The control and label volumes, in acquisition order (other volume types are
    skipped), are taken two by two; each two must be one control and one label, in
    either order. Returns ``(deltam (..., n_pairs), pairs (n_pairs, 2))`` with the
    (control, label) volume indices of each pair. ``source`` names the file in
    errors (BidsError: unequal counts, or two controls or two labels side by side).
    """
    data = np.asarray(data)
    types = list(volume_types)
    if data.shape[-1:] != (len(types),):
        raise BidsError(
            f"volume_type has {len(types)} rows but the data has {data.shape[-1] if data.ndim else 0} volumes",
            path=source, field="volume_type",
        )
    index = [i for i, kind in enumerate(types) if kind in ("control", "label")]
    n_control = sum(types[i] == "control" for i in index)
    n_label = len(index) - n_control
    if n_control != n_label:
        raise BidsError(
            f"volume_type has {n_control} control but {n_label} label volumes; control and label volumes "
            "come in pairs",
            path=source, field="volume_type",
        )
    pairs = np.empty((len(index) // 2, 2), dtype=np.int64)
    for k in range(len(index) // 2):
        first, second = index[2 * k], index[2 * k + 1]
        if types[first] == types[second]:
            raise BidsError(
                f"volumes {first} and {second} (counting from 0) are both {types[first]}: control/label pair "
                f"{k} cannot be formed; each label must be next to its control (control first or label first)",
                path=source, field="volume_type",
            )
        pairs[k] = (first, second) if types[first] == "control" else (second, first)
    deltam = data[..., pairs[:, 0]] - data[..., pairs[:, 1]]
    return deltam, pairs


def _conditions(n: int, label_duration, pld, crushed, decimals: int):
    """Group ``n`` volumes by (crushed, PLD, τ) rounded to ``decimals`` decimals of a second:
    ``(inverse (n,) condition of each volume, protocol, counts)``, conditions sorted ascending."""
    tau = np.broadcast_to(np.asarray(label_duration, dtype=np.float64), (n,))
    delay = np.broadcast_to(np.asarray(pld, dtype=np.float64), (n,))
    flags = np.broadcast_to(np.asarray(crushed, dtype=bool), (n,))
    if n == 0:
        raise ProtocolError("no volume to average: a protocol needs at least one volume")
    keys = np.stack([flags.astype(np.float64), np.round(delay, decimals), np.round(tau, decimals)])
    # np.unique sorts rows lexicographically: (crushed, PLD, τ) ascending
    _, first, inverse, counts = np.unique(keys.T, axis=0, return_index=True, return_inverse=True,
                                          return_counts=True)
    return inverse.reshape(-1), Protocol(tau[first], delay[first], flags[first]), counts


def average_repeats(
    volumes: np.ndarray,
    label_duration: Sequence[float] | np.ndarray,
    pld: Sequence[float] | np.ndarray,
    crushed: Sequence[bool] | np.ndarray | bool = False,
    *,
    decimals: int = TIME_DECIMALS,
) -> tuple[np.ndarray, Protocol, np.ndarray]:
    """Mean of the volumes (last axis) that share (τ, PLD, crushed).

    Times are compared rounded to ``decimals`` decimals of a second. Returns
    ``(averaged (..., n_conditions), protocol, counts (n_conditions,))``, conditions
    ordered by (crushed, PLD, τ), each ascending: non-crushed before crushed, then
    ascending PLD, ties by ascending τ. The protocol holds each condition's τ and
    PLD as first met. Raises ProtocolError for τ ≤ 0.
    """
    volumes = np.asarray(volumes, dtype=np.float64)
    inverse, protocol, counts = _conditions(volumes.shape[-1], label_duration, pld, crushed, decimals)
    averaged = np.stack([volumes[..., inverse == k].mean(axis=-1) for k in range(counts.size)], axis=-1)
    return averaged, protocol, counts


def repeat_standard_error(
    volumes: np.ndarray,
    label_duration: Sequence[float] | np.ndarray,
    pld: Sequence[float] | np.ndarray,
    crushed: Sequence[bool] | np.ndarray | bool = False,
    *,
    decimals: int = TIME_DECIMALS,
) -> np.ndarray:
    """Standard error of each mean of :func:`average_repeats`, from the spread of its repeats:
    sample SD (ddof 1) / √n, same units as ``volumes``, (..., n_conditions) in the same order;
    NaN for a condition read once."""
    volumes = np.asarray(volumes, dtype=np.float64)
    inverse, _, counts = _conditions(volumes.shape[-1], label_duration, pld, crushed, decimals)
    out = np.full(volumes.shape[:-1] + (counts.size,), np.nan)
    for k in np.flatnonzero(counts > 1):
        out[..., k] = volumes[..., inverse == k].std(axis=-1, ddof=1) / np.sqrt(counts[k])
    return out


def saturation_recovery_factor(repetition_time: float | None, t1t: float, *, short_tr: float = M0_SHORT_TR_S) -> float:
    """The factor M0 images are divided by: 1 − e^(−TR/T1t) when TR < ``short_tr``, else 1.

    A saturation-recovery M0 read TR after its preparation holds
    M0t (1 − e^(−TR/T1t)); TR None (no M0 image) gives 1.
    """
    if repetition_time is None or repetition_time >= short_tr:
        return 1.0
    return -math.expm1(-repetition_time / t1t)


def m0_from_volumes(volumes: np.ndarray, repetition_time: float | None, t1t: float) -> np.ndarray:
    """M0t map: the mean over the last axis of ``volumes`` (x, y, z[, n]) divided by
    :func:`saturation_recovery_factor` (a 3-D image is one volume)."""
    volumes = np.asarray(volumes, dtype=np.float64)
    mean = volumes.mean(axis=-1) if volumes.ndim == 4 else volumes
    return mean / saturation_recovery_factor(repetition_time, t1t)


def otsu_threshold(values: np.ndarray, bins: int = OTSU_BINS) -> float:
    """Otsu's threshold of the finite ``values``: the histogram split that maximises the
    between-class variance (the middle of the empty gap when several splits tie). Values
    above the 99.9th percentile are clipped to it (so a few bright outliers do not squash
    the histogram). A constant input returns its value. Same units as ``values``."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("otsu_threshold needs at least one finite value")
    low, high = float(values.min()), float(np.percentile(values, 99.9))
    if not high > low:
        return low
    hist, edges = np.histogram(np.clip(values, low, high), bins=bins, range=(low, high))
    hist = hist.astype(np.float64)
    centers = 0.5 * (edges[:-1] + edges[1:])
    weight_low = np.cumsum(hist)[:-1]
    weight_high = hist.sum() - weight_low
    sum_low = np.cumsum(hist * centers)[:-1]
    sum_high = (hist * centers).sum() - sum_low
    with np.errstate(divide="ignore", invalid="ignore"):
        between = weight_low * weight_high * (sum_low / weight_low - sum_high / weight_high) ** 2
    between[(weight_low == 0) | (weight_high == 0)] = -1.0
    # empty bins between the classes give the same split: take the middle of that gap
    best = np.flatnonzero(between >= between.max() * (1 - 1e-12))
    return float(0.5 * (edges[best[0] + 1] + edges[best[-1] + 1]))


def _no_contrast(values: np.ndarray, threshold: float) -> str | None:
    """Why Otsu's split of the finite ``values`` at ``threshold`` separates no brain from
    background (a clause for the log), or None when it does."""
    bright = values > threshold
    if not bright.any():
        return "all values are equal"
    if bright.mean() < MIN_BRIGHT_FRACTION:
        return f"the bright class holds {bright.mean():.2%} of the voxels (< {MIN_BRIGHT_FRACTION:.0%})"
    dark_mean, bright_mean = float(values[~bright].mean()), float(values[bright].mean())
    if bright_mean - dark_mean < MIN_CONTRAST * abs(bright_mean):
        return (f"the dark class's mean {dark_mean:.6g} is within {MIN_CONTRAST:.0%} of the bright class's "
                f"{bright_mean:.6g}")
    return None


def brain_mask(image: np.ndarray, *, slice_axis: int = 2, source: str = "the image") -> np.ndarray:
    """Brain mask (3-D bool) of an M0 (or other proton-density weighted) 3-D image, any units.

    1. voxels above Otsu's threshold (:func:`otsu_threshold`) of the finite values
       (and > 0): background noise sits in the low class, the brain in the high one;
    2. the largest 6-connected component (``scipy.ndimage.label``; of equal ones the
       first in C order): drops noise specks and disconnected bright structures;
    3. holes filled slice by slice along ``slice_axis`` (``scipy.ndimage.binary_fill_holes``
       in each slice, 4-connected): dark regions enclosed by brain in a slice stay in.

    An image without contrast to split (constant, or Otsu's classes within
    :data:`MIN_CONTRAST` of each other, or a bright class under :data:`MIN_BRIGHT_FRACTION`
    of the voxels: a numerical phantom's constant M0) gives every finite voxel > 0,
    with a warning on the ``aslbatch.preprocess`` logger naming ``source``.
    """
    return _brain_mask(image, slice_axis, source)[0]


def _brain_mask(image: np.ndarray, slice_axis: int, source: str) -> tuple[np.ndarray, str]:
    """:func:`brain_mask` and how it was drawn (a clause for the notes)."""
    from scipy import ndimage

    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 3:
        raise ValueError(f"brain_mask needs a 3-D image, got shape {image.shape}")
    finite = np.isfinite(image)
    with np.errstate(invalid="ignore"):
        positive = finite & (image > 0)
    if not finite.any():
        return positive, "no finite value"
    values = image[finite]
    threshold = otsu_threshold(values)
    reason = _no_contrast(values, threshold)
    if reason is not None:
        method = f"no contrast to split ({reason}): every finite voxel > 0"
        log.warning("brain mask of %s: %s (%d voxel(s))", source, method, int(positive.sum()))
        return positive, method
    foreground = positive & (image > threshold)
    labels, n = ndimage.label(foreground)  # default structure: the 6 face neighbours
    mask = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:])) if n else foreground
    for plane in np.moveaxis(mask, slice_axis, 0):  # views: filled in place
        plane[...] = ndimage.binary_fill_holes(plane)
    return mask, "Otsu threshold, largest 6-connected component, holes filled per slice"


# --- reading ----------------------------------------------------------------------------------


def _relpath(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _load_image(path: Path, display: str) -> tuple[np.ndarray, np.ndarray]:
    """Image data as float64 (scaling applied) and the affine; BidsError naming ``display``."""
    try:
        image = nib.load(str(path))
        data = np.asarray(image.get_fdata(dtype=np.float64, caching="unchanged"))
        affine = np.asarray(image.affine, dtype=np.float64)
    except _READ_ERRORS as exc:
        raise BidsError(f"cannot read the NIfTI data: {exc}", path=display, field="NIfTI data") from exc
    if data.ndim > 4:
        if any(n != 1 for n in data.shape[4:]):
            raise BidsError(
                f"image has shape {data.shape}: expected 3 spatial dimensions and volumes along the 4th",
                path=display, field="NIfTI data",
            )
        data = data.reshape(data.shape[:4])
    if data.ndim < 3:
        raise BidsError(f"image has shape {data.shape}: expected 3 spatial dimensions", path=display,
                        field="NIfTI data")
    return data, affine


def _header_affine(path: Path, display: str) -> np.ndarray:
    """The voxel-to-world affine of a NIfTI file from its header alone (BidsError naming ``display``)."""
    try:
        return np.asarray(nib.load(str(path)).affine, dtype=np.float64)
    except _READ_ERRORS as exc:
        raise BidsError(f"cannot read the NIfTI header: {exc}", path=display, field="NIfTI header") from exc


# --- grids -------------------------------------------------------------------------------------


def same_grid(affine: np.ndarray, shape: Sequence[int], target_affine: np.ndarray, target_shape: Sequence[int],
              tolerance: float = AFFINE_TOLERANCE) -> bool:
    """Whether two grids are one: equal spatial shapes and affines within ``tolerance`` (mm, any element)."""
    return (tuple(int(n) for n in shape[:3]) == tuple(int(n) for n in target_shape[:3])
            and np.allclose(affine, target_affine, rtol=0, atol=tolerance))


def reorientation(affine: np.ndarray, shape: Sequence[int], target_affine: np.ndarray,
                  target_shape: Sequence[int]) -> np.ndarray | None:
    """The axis permutation and flips (a nibabel orientation array ``(3, 2)``) that store an image
    of grid (``affine``, ``shape``) exactly on the target grid, or None when no permutation and
    flip does (another voxel size, position or rotation: a different grid, not the same one
    stored differently). Found with :func:`nibabel.orientations.ornt_transform` between the
    grids' :func:`~nibabel.orientations.io_orientation`, then checked: the reoriented affine
    must equal ``target_affine`` within :data:`AFFINE_TOLERANCE` (mm)."""
    from nibabel.orientations import inv_ornt_aff, io_orientation, ornt_transform

    shape = tuple(int(n) for n in shape[:3])
    ornt = ornt_transform(io_orientation(affine), io_orientation(target_affine))
    moved = [0, 0, 0]
    for axis, (new_axis, _) in enumerate(ornt):
        moved[int(new_axis)] = shape[axis]
    if tuple(moved) != tuple(int(n) for n in target_shape[:3]):
        return None
    reoriented = np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(ornt, shape)
    return ornt if np.allclose(reoriented, target_affine, rtol=0, atol=AFFINE_TOLERANCE) else None


def _grid_text(affine: np.ndarray, shape: Sequence[int]) -> str:
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return (f"shape {tuple(int(n) for n in shape[:3])}, voxel {'x'.join(f'{z:.3g}' for z in zooms)} mm, "
            f"origin ({', '.join(f'{v:.4g}' for v in np.asarray(affine)[:3, 3])}) mm")


def onto_grid(data: np.ndarray, affine: np.ndarray, target_affine: np.ndarray, target_shape: Sequence[int], *,
              source: str, what: str, policy: str = DEFAULT_GRID_POLICY, order: int = 1,
              field: str = "affine") -> tuple[np.ndarray, str | None]:
    """``data`` (x, y, z[, n]) of grid ``affine`` on the target grid (``target_affine``,
    ``target_shape``: the ASL series'), and a note of what was done (None: already there).

    The same grid (:func:`same_grid`) is used as it is; the same physical grid stored with
    permuted or flipped axes is reoriented exactly (:func:`reorientation`,
    :func:`nibabel.orientations.apply_orientation`: no value changes); any other grid is,
    by ``policy``, resampled (:func:`nibabel.processing.resample_from_to`, spline ``order``:
    1 trilinear for images, 0 nearest for masks; voxels outside the source image become
    NaN), with a warning on the ``aslbatch.preprocess`` logger, or refused (BidsError naming
    ``source`` and ``field``). ``what`` names the image in notes ("the m0scan").
    """
    if policy not in GRID_POLICIES:
        raise ValueError(f"grid policy must be one of {GRID_POLICIES}, got {policy!r}")
    data = np.asarray(data)
    shape = data.shape[:3]
    target_shape = tuple(int(n) for n in target_shape[:3])
    if same_grid(affine, shape, target_affine, target_shape):
        return data, None
    ornt = reorientation(affine, shape, target_affine, target_shape)
    if ornt is not None:
        from nibabel.orientations import apply_orientation

        moved = np.ascontiguousarray(apply_orientation(data, ornt))
        order_text = ", ".join(f"axis {i} -> {int(a)}{' flipped' if f < 0 else ''}" for i, (a, f) in enumerate(ornt))
        return moved, (f"{source}: {what} is the ASL series' grid stored with other axes ({order_text}): "
                       "reoriented exactly (no interpolation)")
    mismatch = (f"{what} is on another grid ({_grid_text(affine, shape)}) than the ASL series "
                f"({_grid_text(target_affine, target_shape)})")
    if policy == "refuse":
        raise BidsError(f"{mismatch}; refused (--on-grid-mismatch refuse); resample it onto the ASL grid, or run "
                        "with --on-grid-mismatch resample", path=source, field=field)
    from nibabel.processing import resample_from_to

    volumes = data[..., None] if data.ndim == 3 else data.reshape(shape + (-1,))
    out = np.empty(target_shape + (volumes.shape[3],), dtype=np.float64)
    for k in range(volumes.shape[3]):
        image = nib.Nifti1Image(np.asarray(volumes[..., k], dtype=np.float64), affine)
        out[..., k] = resample_from_to(image, (target_shape, target_affine), order=order, mode="constant",
                                       cval=np.nan, out_class=None).get_fdata()
    out = out[..., 0] if data.ndim == 3 else out.reshape(target_shape + data.shape[3:])
    method = "trilinear" if order == 1 else ("nearest-neighbour" if order == 0 else f"order-{order} spline")
    text = f"{mismatch}: resampled onto the ASL grid ({method}; outside its field of view: no value)"
    log.warning("%s: %s", source, text)
    return out, f"{source}: {text}"


def load_mask(path: str | Path, shape: Sequence[int], affine: np.ndarray | None = None, *,
              on_grid_mismatch: str = DEFAULT_GRID_POLICY) -> tuple[np.ndarray, str | None]:
    """A user's mask (NIfTI, non-zero and finite = inside; 3-D or one volume) as a bool
    array of the ASL grid (spatial ``shape``, ``affine``; None: the mask's own affine, so the
    shapes must agree) and a note of any reorientation or resampling (:func:`onto_grid`, nearest
    neighbour). BidsError naming the file otherwise."""
    display = str(path)
    if not Path(path).is_file():
        raise BidsError("mask file does not exist", path=display, field="mask")
    data, mask_affine = _load_image(Path(path), display)
    if data.ndim == 4:
        if data.shape[3] != 1:
            raise BidsError(f"mask has {data.shape[3]} volumes; give a 3-D mask", path=display, field="mask")
        data = data[..., 0]
    inside = (np.isfinite(data) & (data != 0)).astype(np.float64)
    target = mask_affine if affine is None else affine
    if affine is None and tuple(data.shape) != tuple(shape):
        raise BidsError(
            f"mask has shape {tuple(data.shape)} but the ASL series has spatial shape {tuple(shape)}",
            path=display, field="mask",
        )
    moved, note = onto_grid(inside, mask_affine, target, shape, source=display, what="the mask",
                            policy=on_grid_mismatch, order=0, field="mask")
    with np.errstate(invalid="ignore"):
        return np.asarray(moved > 0.5), note


def _aslcontext_name(series: AslSeries) -> str:
    return _relpath(series.aslcontext, series.bids_dir) if series.aslcontext is not None else series.relpath


def m0_from_series(
    series: AslSeries, metadata: SeriesMetadata, *, asl_data: np.ndarray | None = None,
    asl_affine: np.ndarray | None = None, on_grid_mismatch: str = DEFAULT_GRID_POLICY,
) -> tuple[np.ndarray, list[str], list[str]]:
    """M0t map of a series by its M0Type, and the notes and files behind it.

    ``metadata``: the series' checked metadata (:func:`aslbatch.bids.check_series`).
    Separate: the m0scan image averaged over its volumes; Included: the series'
    m0scan volumes (``asl_data`` (x, y, z, n), loaded when not given) averaged; Absent
    without background suppression: the series' control volumes averaged (with it there is
    no M0: ones, the signals stay ΔM in scanner units);
    all divided by :func:`saturation_recovery_factor` of their
    RepetitionTimePreparation (s) and the constants' T1t (s). Estimate: λ · M0Estimate
    in every voxel (M0Estimate is the M0 of blood). The map is on the series' grid: a
    separate m0scan on another one (``asl_affine``: the series', read from its header when
    None) is reoriented or resampled onto it, or refused, by ``on_grid_mismatch``
    (:func:`onto_grid`; BidsError naming the m0scan).
    """
    kind, constants = metadata.m0_type, metadata.constants
    shape = tuple(series.shape)
    notes: list[str] = []
    files: list[str] = []
    if not metadata.has_m0:
        notes.append(f"{series.relpath}: M0Type Absent with background suppression: no M0 (the suppressed controls "
                     "are none); M0t = 1, the signals are ΔM in the scanner's units, CBF only relative to its median")
        return np.ones(shape), notes, files
    if kind == "Estimate":
        value = metadata.m0_estimate
        notes.append(
            f"{series.relpath}: M0Type Estimate: M0t = λ · M0Estimate = {constants.lam:g} × {value:g} in every "
            "voxel (BIDS M0Estimate is the M0 of blood)"
        )
        return np.full(shape, constants.lam * value), notes, files
    repetition_time = metadata.m0_repetition_time
    if kind == "Separate":
        m0scan = series.m0scan
        data, m0_affine = _load_image(m0scan.path, m0scan.relpath)
        if asl_affine is None:
            asl_affine = _header_affine(series.path, series.relpath)
        n_volumes = data.shape[3] if data.ndim == 4 else 1
        data, moved = onto_grid(data.mean(axis=3) if data.ndim == 4 else data, m0_affine, asl_affine, shape, source=m0scan.relpath,
                                what="the m0scan", policy=on_grid_mismatch)
        if moved is not None:
            notes.append(moved)
        files.append(m0scan.relpath)
        origin = f"M0 from {m0scan.relpath} (mean of {n_volumes} volume(s))"
    else:  # Included, or Absent without background suppression (validated): the mean control
        if asl_data is None:
            asl_data, _ = _load_image(series.path, series.relpath)
        role = "control" if kind == "Absent" else "m0scan"
        index = [i for i, kind_ in enumerate(metadata.volume_types) if kind_ == role]
        data = asl_data[..., index] if asl_data.ndim == 4 else asl_data[..., None]
        origin = (f"M0 from the {len(index)} m0scan volume(s) of the series (M0Type Included)" if role == "m0scan" else
                  f"M0Type Absent without background suppression: M0 from the mean of the {len(index)} control "
                  "volume(s)")
    factor = saturation_recovery_factor(repetition_time, constants.t1t)
    m0 = m0_from_volumes(data, repetition_time, constants.t1t)
    if factor != 1.0:
        origin += (
            f"; RepetitionTimePreparation {repetition_time:g} s < {M0_SHORT_TR_S:g} s: divided by the "
            f"saturation-recovery factor 1 − exp(−TR/T1t) = {factor:.4f} (T1t {constants.t1t:g} s)"
        )
    notes.append(f"{series.relpath}: {origin}")
    return m0, notes, files


# --- one series -------------------------------------------------------------------------------


@dataclass
class _SeriesDeltaM:
    series: AslSeries
    deltam: np.ndarray  # (x, y, z, k)
    tau: np.ndarray
    pld: np.ndarray
    crushed: bool
    m0: np.ndarray
    mask_reference: np.ndarray  # image the computed mask is drawn from
    mask_reference_name: str
    affine: np.ndarray
    offsets: np.ndarray  # per slice
    axis: int
    m0_source: str  # the file the M0 comes from (m0scan or the series itself)
    notes: list[str]
    files: list[str]
    series_types: tuple[str, ...] = ()  # the type of every volume of the series
    volume_index: np.ndarray | None = None  # (k, 2): the source volumes (control, label) of each ΔM; deltam twice
    motion: Any = None  # aslbatch.motion.MotionEstimate when corrected
    m0_params: np.ndarray | None = None  # the separate M0's rigid parameters when corrected
    raw_means: np.ndarray | None = None  # (x, y, z, 2) mean control-like image and mean ΔM before correction
    corrected_mean: np.ndarray | None = None  # (x, y, z) the mean control-like image after correction


def _series_deltam(series: AslSeries, metadata: SeriesMetadata,
                   on_grid_mismatch: str = DEFAULT_GRID_POLICY, *, motion_correction: bool = False,
                   frame: np.ndarray | None = None) -> _SeriesDeltaM:
    """ΔM, timing, M0 (on the series' grid) and mask reference of one series; its metadata come
    read and checked. ``motion_correction``: every volume realigned first (:func:`_realign`; to
    ``frame``, another series' reference image on this grid, when given)."""
    meta = series.metadata
    context = _aslcontext_name(series)
    types = list(metadata.volume_types)
    data, affine = _load_image(series.path, series.relpath)
    if data.ndim == 3:
        data = data[..., None]
    n = data.shape[3]
    if len(types) != n:
        raise BidsError(f"volume_type has {len(types)} rows but {series.relpath} has {n} volumes",
                        path=context, field="volume_type")
    if series.shape is not None and tuple(data.shape[:3]) != tuple(series.shape):
        raise BidsError(f"the image has spatial shape {tuple(data.shape[:3])} but its header gave {series.shape} "
                        "when the dataset was read: the file changed", path=series.relpath, field="NIfTI data")
    pld, tau, crushed = metadata.pld, metadata.label_duration, metadata.crushed
    notes: list[str] = []
    realigned = _realign(series, data, affine, types, pld, frame) if motion_correction else None
    if isinstance(realigned, str):  # why it was not corrected
        notes.append(realigned)
        realigned = None
    if realigned is not None:
        data, motion, raw_means, corrected_mean, note = realigned
        notes.append(note)

    parts, taus, plds, index_parts = [], [], [], []
    if "control" in types or "label" in types:
        difference, pairs = pair_difference(data, types, source=context)
        for control, label in pairs:
            if not np.array_equal(np.round([tau[control], pld[control]], TIME_DECIMALS),
                                  np.round([tau[label], pld[label]], TIME_DECIMALS)):
                raise BidsError(
                    f"control volume {control} and label volume {label} form a pair but have different "
                    f"LabelingDuration ({tau[control]:g} s, {tau[label]:g} s) or PostLabelingDelay "
                    f"({pld[control]:g} s, {pld[label]:g} s)",
                    path=context, field="volume_type",
                )
        order = "control first" if (pairs[:, 0] < pairs[:, 1]).all() else (
            "label first" if (pairs[:, 0] > pairs[:, 1]).all() else "mixed order")
        notes.append(f"{series.relpath}: ΔM = control − label from {len(pairs)} pair(s) ({order})")
        parts.append(difference)
        index_parts.append(pairs)
        taus.append(tau[pairs[:, 0]])
        plds.append(pld[pairs[:, 0]])
    deltam_index = [i for i, kind in enumerate(types) if kind == "deltam"]
    if deltam_index:
        parts.append(data[..., deltam_index])
        index_parts.append(np.repeat(np.asarray(deltam_index, dtype=np.int64)[:, None], 2, axis=1))
        taus.append(tau[deltam_index])
        plds.append(pld[deltam_index])
        notes.append(f"{series.relpath}: {len(deltam_index)} deltam volume(s) used as they are")
    for kind in IGNORED_VOLUME_TYPES:
        count = types.count(kind)
        if count:
            notes.append(f"{series.relpath}: {count} {kind} volume(s) ignored (aslbatch fits ΔM)")
    if not parts:
        raise BidsError("volume_type lists no control/label pair and no deltam volume: nothing to fit",
                        path=context, field="volume_type")
    deltam = np.concatenate(parts, axis=3)
    tau_out = np.concatenate(taus)
    pld_out = np.concatenate(plds)
    if (tau_out <= 0).any():
        raise BidsError(
            f"LabelingDuration must be > 0 s for control, label and deltam volumes; it is "
            f"{sorted(set(tau_out[tau_out <= 0].tolist()))} for some",
            path=meta.source("LabelingDuration"), field="LabelingDuration",
        )

    kind = metadata.m0_type
    if kind != "Included" and "m0scan" in types:
        notes.append(f"{series.relpath}: {types.count('m0scan')} m0scan volume(s) ignored (M0Type is {kind})")
    m0, m0_notes, files = m0_from_series(series, metadata, asl_data=data, asl_affine=affine,
                                         on_grid_mismatch=on_grid_mismatch)
    notes.extend(m0_notes)
    m0_params = None
    if realigned is not None and kind == "Separate":
        m0, m0_params, note = _realign_m0(series, m0, affine, motion)
        notes.append(note)
    notes.extend(f"{series.relpath}: {note}" for note in metadata.import_notes)
    if kind == "Estimate" or not metadata.has_m0:
        control_index = [i for i, t in enumerate(types) if t == "control"]
        if control_index:
            reference, reference_name = data[..., control_index].mean(axis=3), "mean control"
        else:
            reference, reference_name = deltam.mean(axis=3), "mean ΔM"
    else:
        reference, reference_name = m0, "M0"

    axis, offsets = metadata.slice_axis, metadata.slice_offsets
    files = [series.relpath, context, *files]
    m0_source = series.m0scan.relpath if kind == "Separate" else series.relpath
    part = _SeriesDeltaM(
        series, deltam, tau_out, pld_out, crushed, m0, reference, reference_name, affine, offsets, axis, m0_source,
        notes, files, series_types=tuple(types), volume_index=np.concatenate(index_parts),
    )
    if realigned is not None:
        part = replace(part, motion=motion, m0_params=m0_params, raw_means=raw_means, corrected_mean=corrected_mean)
    return part


def _control_like(data: np.ndarray, types: Sequence[str]) -> np.ndarray:
    """The mean of the control volumes of ``data`` (x, y, z, n), else of the m0scan volumes,
    else of every volume (a deltam-only series): the anatomy shown before/after correction."""
    for kind in ("control", "m0scan"):
        index = [i for i, t in enumerate(types) if t == kind]
        if index:
            return data[..., index].mean(axis=3)
    return data.mean(axis=3)


def _realign(series: AslSeries, data: np.ndarray, affine: np.ndarray, types: Sequence[str], pld: np.ndarray,
             frame: np.ndarray | None):
    """Every volume of ``data`` (x, y, z, n) realigned (:func:`aslbatch.motion.estimate_series_motion`,
    then one resampling each): (corrected data, the motion estimate, the mean control-like image
    and mean ΔM before, the mean control-like image after, a note); None when there is nothing to
    fit, or a note saying why the series was not corrected (a grid under :data:`aslbatch.motion.MIN_GRID`,
    non-finite values)."""
    from .motion import MIN_GRID, apply_motion, estimate_series_motion, framewise_displacement, voxel_sizes

    if not any(t in ("control", "label", "deltam") for t in types):
        return None  # nothing to fit: refused below
    if any(n < least for n, least in zip(data.shape[:3], MIN_GRID)):
        log.warning("%s: grid %s smaller than %s voxels: not motion corrected", series.relpath, data.shape[:3], MIN_GRID)
        return f"{series.relpath}: grid {tuple(data.shape[:3])} smaller than {MIN_GRID} voxels: not motion corrected"
    if not np.isfinite(data).all():
        log.warning("%s: NaN or infinite voxel values: not motion corrected", series.relpath)
        return f"{series.relpath}: the series has NaN or infinite voxel values: not motion corrected"
    zooms = voxel_sizes(affine)
    motion = estimate_series_motion(data, zooms, types, pld, frame=frame, frame_name="the first series' reference")
    paired = [t in ("control", "label") for t in types]
    raw_deltam = (pair_difference(data, types)[0] if any(paired) else
                  data[..., [i for i, t in enumerate(types) if t == "deltam"]]).mean(axis=3)
    raw_means = np.stack([_control_like(data, types), raw_deltam], axis=3)
    corrected = apply_motion(data, motion.params, zooms)
    fd = framewise_displacement(motion.params)
    largest = np.abs(motion.params)
    note = (f"{series.relpath}: motion corrected (rigid, 6 dof; SimpleITK) to the {motion.reference_name}: "
            f"largest translation {largest[:, :3].max():.2f} mm, rotation {np.degrees(largest[:, 3:].max()):.2f}°, "
            f"framewise displacement max {np.nanmax(fd, initial=0.0):.2f} mm, "
            f"mean {np.nanmean(fd) if np.isfinite(fd).any() else 0.0:.2f} mm")
    return corrected, motion, raw_means, _control_like(corrected, types), note


def _realign_m0(series: AslSeries, m0: np.ndarray, affine: np.ndarray, motion) -> tuple[np.ndarray, np.ndarray | None, str]:
    """The separate M0 image registered to the series' reference (mutual information: another
    contrast) and resampled: (M0, its parameters (mm, rad), a note); left as it is, with a note,
    when it has non-finite voxels (outside a resampled field of view)."""
    from .motion import apply_motion, register_image, voxel_sizes

    if not np.isfinite(m0).all():
        return m0, None, (f"{series.m0scan.relpath}: the M0 image has voxels without a value (outside a resampled "
                          "field of view): not motion corrected")
    zooms = voxel_sizes(affine)
    params = register_image(m0, motion.reference, zooms, cost="mutual_information")
    moved = apply_motion(m0[..., None], params[None], zooms)[..., 0]
    return moved, params, (f"{series.m0scan.relpath}: M0 registered to the series' {motion.reference_name} (mutual "
                           f"information): translation {np.abs(params[:3]).max():.2f} mm, rotation "
                           f"{np.degrees(np.abs(params[3:]).max()):.2f}°")


def _onto_first(first: _SeriesDeltaM, other: _SeriesDeltaM, policy: str) -> _SeriesDeltaM:
    """The other series of a pair (its ΔM, M0 and slice timing) on the first series' grid
    (:func:`onto_grid`: as it is, reoriented exactly, or resampled or refused by ``policy``),
    after which both must share the slice timing. A 2D readout's slice timing cannot follow
    a resampling: such a pair is refused whatever the policy."""
    a, b = first.series, other.series
    shape = first.deltam.shape[:3]
    ornt = None
    if not same_grid(other.affine, other.deltam.shape, first.affine, shape):
        ornt = reorientation(other.affine, other.deltam.shape, first.affine, shape)
        if ornt is None and other.offsets.any():
            raise BidsError(
                f"the series is on another grid ({_grid_text(other.affine, other.deltam.shape)}) than {a.relpath} "
                f"({_grid_text(first.affine, shape)}) and has 2D slice timing, which a resampling cannot carry: "
                "the two series of a pair must share one grid", path=b.relpath, field="affine")
    deltam, note = onto_grid(other.deltam, other.affine, first.affine, shape, source=b.relpath,
                             what=f"the series (paired with {a.relpath})", policy=policy)
    m0, _ = onto_grid(other.m0, other.affine, first.affine, shape, source=b.relpath, what="its M0", policy=policy)
    axis, offsets = other.axis, other.offsets
    if ornt is not None:  # the slice axis moves (and is reversed when flipped) with the image
        axis, flip = int(ornt[other.axis, 0]), ornt[other.axis, 1] < 0
        offsets = offsets[::-1] if flip else offsets
    moved = replace(other, deltam=deltam, m0=m0, axis=axis, offsets=offsets, affine=first.affine,
                    notes=other.notes + ([note] if note else []))
    _check_pair(first, moved)
    return moved


def _check_pair(first: _SeriesDeltaM, other: _SeriesDeltaM) -> None:
    """The series of a pair, on one grid, must share the slice timing."""
    a, b = first.series, other.series
    both_zero = not first.offsets.any() and not other.offsets.any()  # 3D readouts: the axis does not matter
    same = first.axis == other.axis and np.allclose(first.offsets, other.offsets, rtol=0, atol=1e-6)
    if not (both_zero or same):
        field = "SliceTiming" if "SliceTiming" in b.metadata else "MRAcquisitionType"
        raise BidsError(
            f"slice timing (axis {other.axis}, offsets {np.round(other.offsets, 4).tolist()} s) differs from that "
            f"of {a.relpath} (axis {first.axis}, offsets {np.round(first.offsets, 4).tolist()} s); the two series "
            "of a pair must share it",
            path=b.metadata.source(field), field=field,
        )


# --- the acquisition --------------------------------------------------------------------------


def _check_labeling(acquisition: Acquisition, metadata: Sequence[SeriesMetadata]) -> None:
    """PASL data go to the PASL model and only they do: the protocol's times mean different
    things (PASL: ``pld`` is TI, the readout time; (P)CASL: the readout is at τ + PLD). The
    single-delay models (single, relative) serve both: their ``labeling`` option is decided from
    the same records (:func:`aslbatch.identify.decide`). A series without M0 goes to the
    relative model and only it does: its ΔM in scanner units must never become absolute CBF."""
    for series, record in zip(acquisition.series, metadata):
        if record.has_m0 == (acquisition.model == "relative"):
            raise BidsError(
                f"the acquisition was given the {acquisition.model} model, but " + (
                    "the series has no M0 (M0Type Absent with background suppression): only the relative model "
                    "(relative CBF, ΔM) applies" if not record.has_m0 else
                    "the relative model is for series without M0, and this one has an M0"),
                path=series.metadata.source("M0Type"), field="M0Type")
        pulsed = record.labeling_type == "PASL"
        if acquisition.model not in ("single", "relative") and pulsed != (acquisition.model == "pasl"):
            raise BidsError(
                f"ArterialSpinLabelingType is {record.labeling_type} but the acquisition was given the "
                f"{acquisition.model} model; " + ("PASL data need the pasl model" if pulsed else
                                                   "the pasl model describes PASL data only"),
                path=series.metadata.source("ArterialSpinLabelingType"), field="ArterialSpinLabelingType",
            )


def prepare_acquisition(
    acquisition: Acquisition,
    metadata: Sequence[SeriesMetadata] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    mask_path: str | Path | None = None,
    background_suppression_correction: bool = False,
    bolus_duration: float | None = None,
    on_grid_mismatch: str = DEFAULT_GRID_POLICY,
    motion_correction: bool = False,
    robust_averaging: bool = False,
) -> PreparedData:
    """Signals (ΔM/M0t), protocol, mask and constants of one acquisition (see the module doc).

    ``metadata``: the checked metadata of each series, in order (as
    :func:`aslbatch.bids.check_series` returns them: the pipeline reads and validates
    once and passes them on); None reads them here (:func:`aslbatch.bids.series_metadata`)
    with ``overrides``, the Constants fields that win over the metadata (invalid ones
    raise ProtocolError), and ``background_suppression_correction``, α_BS from the
    metadata into ``constants.alpha_bs`` (the data are not rescaled; a note says so), and
    ``bolus_duration`` (s), the user's PASL bolus duration. ``mask_path``: a NIfTI brain mask; None computes one from M0
    (:func:`brain_mask`). Every image combined with the (first) ASL series, the M0, the mask
    and the other series of a pair, is brought onto its grid by :func:`onto_grid` with
    ``on_grid_mismatch`` (:data:`GRID_POLICIES`): never used voxel by voxel on another grid.
    ``motion_correction``: every volume and the M0 realigned before pairing (:mod:`aslbatch.motion`;
    the other series of a pair to the first one's reference when both share a grid);
    ``robust_averaging``: outlier ΔM volumes left out of the average (:mod:`aslbatch.pair_outliers`).
    Both off (the default here; the pipeline's Settings turn them on) leaves the data as stored.
    """
    series_list = list(acquisition.series)
    if not series_list:
        raise ValueError("the acquisition has no series")
    if metadata is None:
        for series in series_list:
            if series.problems:
                raise series.problems[0]
        metadata = [bids.series_metadata(series, overrides=overrides,
                                         background_suppression_correction=background_suppression_correction,
                                         bolus_duration=bolus_duration)
                    for series in series_list]
    elif len(metadata) != len(series_list):
        raise ValueError(f"{len(metadata)} metadata records for {len(series_list)} series")
    _check_labeling(acquisition, metadata)
    constants = None
    for series, record in zip(series_list, metadata):
        these = record.constants
        if constants is None:
            constants = these
        elif these != constants:
            raise BidsError(
                f"its metadata give the model constants {these.to_dict()} but {series_list[0].relpath} gives "
                f"{constants.to_dict()}; the series of a pair are fitted with one set of constants",
                path=series.relpath, field="constants",
            )
    parts = []
    for series, record in zip(series_list, metadata):
        frame = None
        if motion_correction and parts and parts[0].motion is not None and same_grid(
                parts[0].affine, parts[0].deltam.shape, _header_affine(series.path, series.relpath), series.shape):
            frame = parts[0].motion.reference
        parts.append(_series_deltam(series, record, on_grid_mismatch, motion_correction=motion_correction,
                                    frame=frame))
    first = parts[0]
    parts[1:] = [_onto_first(first, other, on_grid_mismatch) for other in parts[1:]]
    shape = tuple(int(n) for n in first.deltam.shape[:3])
    notes: list[str] = [note for part in parts for note in part.notes]
    files: list[str] = [path for part in parts for path in part.files]
    if background_suppression_correction:
        notes.append(
            f"background-suppression correction: α_BS = {constants.alpha_bs:.4g} enters the model through "
            "Constants.alpha_bs; the data are not rescaled"
        )

    # mask
    if mask_path is not None:
        mask, moved = load_mask(mask_path, shape, first.affine, on_grid_mismatch=on_grid_mismatch)
        files.append(str(mask_path))
        if moved is not None:
            notes.append(moved)
        notes.append(f"mask from {mask_path}: {int(mask.sum())} voxel(s)")
    else:
        source = f"the {first.mask_reference_name} image of {first.series.relpath}"
        mask, method = _brain_mask(first.mask_reference, first.axis, source)
        notes.append(f"brain mask computed from {source} ({method}): {int(mask.sum())} voxel(s)")
        if first.mask_reference_name == "mean ΔM":
            notes.append("no M0 image and no control volume: the mask comes from the mean ΔM; consider giving one")
    valid = np.ones(shape, dtype=bool)
    for part in parts:
        with np.errstate(invalid="ignore"):
            valid &= np.isfinite(part.m0) & (part.m0 > 0)
    excluded = int((mask & ~valid).sum())
    if excluded:
        notes.append(f"{excluded} voxel(s) of the mask excluded: M0 <= 0 or not finite")
    mask = mask & valid
    if not mask.any():
        where = str(mask_path) if mask_path is not None else first.m0_source
        raise BidsError("no voxel left in the brain mask (M0 > 0 and finite)", path=where, field="mask")

    # signals
    ratios = [part.deltam[mask] / part.m0[mask][:, None] for part in parts]
    volumes = np.concatenate(ratios, axis=1)
    tau = np.concatenate([part.tau for part in parts])
    pld = np.concatenate([part.pld for part in parts])
    crushed = np.concatenate([np.full(part.tau.size, part.crushed) for part in parts])
    excluded = np.zeros(volumes.shape[1], dtype=bool)
    if robust_averaging:
        from .pair_outliers import outlier_volumes

        excluded = outlier_volumes(volumes, _conditions(volumes.shape[1], tau, pld, crushed, TIME_DECIMALS)[0])
        if excluded.any():
            notes.append(f"robust averaging: {int(excluded.sum())} of {excluded.size} ΔM volume(s) left out as "
                         "outliers (robust z of their mean or of their correlation with the median ΔM > "
                         f"3; README \"Motion\")")
            volumes, tau, pld, crushed = volumes[:, ~excluded], tau[~excluded], pld[~excluded], crushed[~excluded]
    try:
        signals, protocol, counts = average_repeats(volumes, tau, pld, crushed)
    except ProtocolError as exc:  # not expected after the checks above
        raise BidsError(str(exc), path=first.series.relpath, field="protocol") from exc
    signals = np.ascontiguousarray(signals, dtype=np.float64)
    signal_se = repeat_standard_error(volumes, tau, pld, crushed)
    notes.append(
        f"{volumes.shape[1]} ΔM volume(s) averaged into {protocol.n_volumes} condition(s) (τ, PLD, crushed), "
        f"ordered non-crushed first then by ascending PLD; repeats per condition {counts.tolist()}"
    )
    bad = int((~np.isfinite(signals)).any(axis=1).sum())
    if bad:
        notes.append(f"{bad} voxel(s) have non-finite ΔM in some volume")

    motion = _motion_records(parts, excluded) if (motion_correction or robust_averaging) else ()
    offsets_grid = np.broadcast_to(
        np.expand_dims(first.offsets, [axis for axis in range(3) if axis != first.axis]), shape
    )
    return PreparedData(
        signals=signals,
        protocol=protocol,
        mask=mask,
        affine=first.affine,
        shape=shape,
        slice_offsets=np.ascontiguousarray(offsets_grid[mask], dtype=np.float64),
        m0=first.m0,
        constants=constants,
        notes=tuple(notes),
        source_files=tuple(dict.fromkeys(files)),
        model=acquisition.model,
        source_name=acquisition.source_name,
        signal_se=signal_se,
        background_suppression=bids.background_suppression_summary(
            [record.background_suppression for record in metadata], constants.alpha_bs,
            correction=background_suppression_correction, user_factor="alpha_bs" in (overrides or {})),
        motion=motion,
    )


def _motion_records(parts: Sequence[_SeriesDeltaM], excluded: np.ndarray) -> tuple[Any, ...]:
    """One :class:`aslbatch.motion.SeriesMotion` per series: its parameters, the source volumes
    whose ΔM was ``excluded`` (over the ΔM volumes of every series, in order), and the before/after
    images (QC page)."""
    from .motion import SeriesMotion

    records, start = [], 0
    for part in parts:
        n_types = len(part.series_types)
        count = part.deltam.shape[3]
        mine = excluded[start:start + count]
        start += count
        flags = np.zeros(n_types, dtype=bool)
        flags[part.volume_index[mine].ravel()] = True
        after_deltam = part.deltam[..., ~mine].mean(axis=3)
        if part.motion is None:  # robust averaging alone: the anatomy did not change
            images = np.stack([part.mask_reference, part.mask_reference, part.deltam.mean(axis=3), after_deltam],
                              axis=3)
        else:
            images = np.stack([part.raw_means[..., 0], part.corrected_mean, part.raw_means[..., 1], after_deltam],
                              axis=3)
        records.append(SeriesMotion(
            source=part.series.relpath, volume_types=part.series_types,
            params=None if part.motion is None else part.motion.params, excluded=flags, m0_params=part.m0_params,
            reference_name="" if part.motion is None else part.motion.reference_name, images=images))
    return tuple(records)


@dataclass(frozen=True)
class SidecarProtocol:
    """What ``aslbatch run`` would fit for a series, read from its metadata alone:
    ``protocol`` (after pairing and averaging, as :func:`prepare_acquisition` orders it),
    ``constants`` and the slice ``offsets`` (s; zeros for 3D readouts)."""

    protocol: Protocol
    constants: Constants
    offsets: np.ndarray


def protocol_from_sidecars(paths: Sequence[str | Path], overrides: Mapping[str, Any] | None = None,
                           background_suppression_correction: bool = False,
                           bolus_duration: float | None = None) -> SidecarProtocol:
    """The protocol of one acquisition from its ``*_asl.json`` sidecar(s) (two for a
    non-crushed + crushed pair), each with its ``*_aslcontext.tsv`` beside it; no image is read.

    Only the sidecar's own fields are used (no inheritance from higher folders); PASL: τ is the
    bolus duration (``bolus_duration``, s, the user's, wins) and PLD the TI. Errors (BidsError)
    name the file and the field.
    """
    if not paths:
        raise ValueError("at least one *_asl.json is needed")
    taus, plds, flags, offsets, constants = [], [], [], None, None
    for raw in paths:
        path = Path(raw)
        if not path.name.endswith("_asl.json"):
            raise BidsError("expected a BIDS ASL sidecar named *_asl.json", path=str(path), field="path")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BidsError(f"cannot read the sidecar ({exc})", path=str(path), field="sidecar") from None
        if not isinstance(data, dict):
            raise BidsError("the sidecar must hold a JSON object", path=str(path), field="sidecar")
        meta = bids.Sidecar(data, {key: str(path) for key in data}, default_source=str(path), data_file=str(path))
        context = path.with_name(path.name[: -len("_asl.json")] + "_aslcontext.tsv")
        types = list(bids.read_aslcontext(context))
        n = len(types)
        pld, tau = bids.post_labeling_delays(meta, n), bids.label_durations(meta, n, bolus_duration)
        chosen = [i for i, kind in enumerate(types) if kind == "deltam"]
        if "control" in types or "label" in types:
            chosen = list(pair_difference(np.zeros((1, n)), types, source=str(context))[1][:, 0]) + chosen
        if not chosen:
            raise BidsError("volume_type lists no control/label pair and no deltam volume: nothing to fit",
                            path=str(context), field="volume_type")
        taus.append(tau[chosen])
        plds.append(pld[chosen])
        flags.append(np.full(len(chosen), bids.vascular_crushing(meta)))
        these = bids.constants_from_metadata(meta, overrides,
                                             background_suppression_correction=background_suppression_correction)
        if constants is not None and these != constants:
            raise BidsError(f"gives the model constants {these.to_dict()}, the first sidecar {constants.to_dict()}",
                            path=str(path), field="constants")
        constants = these
        timing = meta.get("SliceTiming")
        n_slices = len(timing) if isinstance(timing, list) and str(meta.get("MRAcquisitionType")).upper() == "2D" else 1
        these_offsets = bids.slice_offsets(meta, n_slices)
        if offsets is not None and not np.allclose(these_offsets, offsets):
            raise BidsError("SliceTiming differs from the first sidecar's; the series of a pair share one grid",
                            path=str(path), field="SliceTiming")
        offsets = these_offsets
    _, protocol, _ = average_repeats(np.zeros((1, sum(t.size for t in taus))), np.concatenate(taus),
                                     np.concatenate(plds), np.concatenate(flags))
    return SidecarProtocol(protocol, constants, offsets)
