"""Rigid (6 degrees of freedom) motion correction of an ASL series, and framewise displacement.

The registration is SimpleITK's (``ImageRegistrationMethod``, Euler3D transform, regular-step
gradient descent, two resolution levels); this module chooses the references and the costs,
composes the transforms and resamples each volume once (README "Motion"). SimpleITK is imported
only inside the functions that register or resample.

**References** (:func:`estimate_series_motion`). The volumes are grouped by contrast
(:func:`contrast_groups`: volume type and PLD), so that neither the label/control difference
(ΔM is ~1 % of the control) nor the change of contrast with PLD biases the estimate:

1. each volume is registered to the voxelwise median of its own group (mean-squares cost: same
   contrast; the median, so a corrupted volume does not move the template), starting from the
   transform of the group's volume before it;
2. each group's median, corrected, is registered to the reference image (Mattes mutual
   information: the contrasts differ), the mean of the first group (control at the first PLD,
   else the first group in :data:`GROUP_ORDER`) unless a reference frame is given (the first
   series of a 2C pair, so that both series end in one frame); a label group is placed by its
   PLD's control group and the step between the two templates (3., 4.);
3. the step the head's path gives, from the within-group transforms alone
   (:func:`template_positions`): the head moves smoothly, so each volume's position is about the
   mean of its neighbours' (which belong to other groups); one median per pattern of neighbouring
   groups, least squares, with standard errors. A label template sits where the head was, on
   average, when the labels were acquired: on a drifting head a step away from the control template
   (moving phantom: 0.02–0.15 mm, up to 0.12°), an offset of every label against its control that
   costs far more GM CBF accuracy than the per-volume errors; the path gives it to within its own
   irregularity (0.01–0.02 mm on the phantom, README "Motion");
4. the label template registered to its control template from that step
   (:func:`register_label_template`), blind to the smooth part of ΔM (fitting the label mean to the
   control mean by plain mean squares would fit the ΔM pattern: a 4:1 hemispheric perfusion
   asymmetry moved the labels 0.04 mm towards hiding it, and on a real series a label/control zigzag
   of 0.1° in every pair), kept within :data:`_PATH_TOLERANCE` standard errors of the path's step;

a volume's transform is the composition of the two. The M0 image of a separate m0scan is
registered to the same reference (mutual information) by :func:`register_image`.

**Parameters**. Rotations about the centre of the grid, in the axes of the image array
(x, y, z = the NIfTI's first three array axes, scaled by the voxel sizes: mm), transform
x ↦ R (x − c) + c + t mapping a point of the reference frame to the same anatomy in the volume,
R = Rz Ry Rx (:func:`rigid_matrix`). Translations in mm, rotations in radians, as fMRIPrep and
ASLPrep write ``trans_x`` … ``rot_z``. Framewise displacement (:func:`framewise_displacement`)
is Power et al. (2012): |Δtx| + |Δty| + |Δtz| + r (|Δrx| + |Δry| + |Δrz|), r = 50 mm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CONFOUND_COLUMNS",
    "FD_RADIUS_MM",
    "MotionEstimate",
    "apply_motion",
    "contrast_groups",
    "estimate_series_motion",
    "excessive_motion",
    "framewise_displacement",
    "polynomial_field_basis",
    "register_image",
    "register_label_template",
    "rigid_matrix",
    "rigid_params",
    "template_positions",
    "voxel_sizes",
]

#: the motion columns of a confounds file, fMRIPrep's names: mm, mm, mm, rad, rad, rad, mm
CONFOUND_COLUMNS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "framewise_displacement")
#: the head radius (mm) turning rotations into displacements (Power et al. 2012)
FD_RADIUS_MM = 50.0
#: order in which volume types provide the reference group
GROUP_ORDER = ("control", "m0scan", "label", "deltam")
#: a session moves too much when FD exceeds this (mm) ...
EXCESSIVE_FD_MM = 0.5
#: ... in more than this fraction of its volumes
EXCESSIVE_FRACTION = 0.2
#: optimiser settings (regular-step gradient descent): learning rate and minimum step (in the
#: optimiser's physical-shift scaled units, mm), the step's shrink at each change of direction,
#: iterations per level (README "Motion": measured on the phantom; minimum step 2e-4 and shrink
#: 0.8 took twice the iterations for 0.01 mm / 0.01° better median error)
_LEARNING_RATE, _MIN_STEP, _RELAXATION, _ITERATIONS = 1.0, 1e-3, 0.6, 200
#: voxels the cost samples (on a regular grid): this many, at least 5 % of the image and at most all
#: (20000 cost twice as much for the same median error; 5000 lost 0.015 mm, README "Motion")
_SAMPLES = 10000
#: shrink factors and smoothing sigmas (voxels) of the two resolution levels
_SHRINK, _SMOOTH = (2, 1), (1.0, 0.0)
#: fixed seed of the metric's voxel sampling: the same data give the same transforms
_SEED = 12345
#: the label/control difference during a label template's registration (:func:`register_label_template`):
#: a multiplicative field, a polynomial of this degree in the grid's coordinates (README "Motion": with a
#: 4:1 hemispheric perfusion asymmetry degree 2 left the labels 0.017 mm off, 3 0.008 mm, 5 began to
#: absorb the motion, 0.01 mm off without any asymmetry) ...
_FIELD_DEGREE = 3
#: ... then the registration starts with a step of this size (mm: it starts from the path's step, within
#: ~0.1 mm; 1 mm took twice the time for the same answer) and goes down to this one (one registration per
#: label group, where 0.01 mm matters; README "Motion": 1e-3 left rotations 0.2-0.3° off)
_FIELD_FIRST_STEP, _FIELD_MIN_STEP = 0.2, 1e-4
#: the field is fitted where the control template exceeds this fraction of its 99th percentile (the head)
_FIELD_SUPPORT = 0.05
#: the registration moves a label group's step at most this many standard errors of the step the head's
#: path gives (:func:`template_positions`): on small sharp images the templates' registration is off by
#: more than the path (README "Motion")
_PATH_TOLERANCE = 2.0
#: equations of :func:`template_positions` with fewer volumes than this are dropped: their medians are
#: outvoted by jerks (a 12-volume series with 3 jerks: 3 of the 5 values of one equation hit)
_MIN_CLASS = 6
#: a volume :func:`template_positions` fits worse than this many robust standard deviations is left out
_OUTLIER = 4.0
#: a grid smaller than this (voxels along each of the first two axes, and slices) is not registered:
#: too few voxels at the coarse level for a six-parameter fit
MIN_GRID = (16, 16, 4)


@dataclass(frozen=True)
class MotionEstimate:
    """The rigid transforms of one series' volumes.

    params : (n_volumes, 6) trans_x, trans_y, trans_z (mm), rot_x, rot_y, rot_z (rad), in
        acquisition order (module doc for the convention).
    centre : (3,) the centre of rotation, mm in array axes (the grid's centre).
    zooms : (3,) voxel sizes, mm.
    groups : the contrast group of each volume (its name, e.g. ``"control PLD 1.8 s"``).
    reference : the image all volumes were aligned to (3-D, float64, on the series' grid).
    reference_name : what that image is, for notes.
    """

    params: np.ndarray
    centre: np.ndarray
    zooms: np.ndarray
    groups: tuple[str, ...]
    reference: np.ndarray
    reference_name: str

    def framewise_displacement(self) -> np.ndarray:
        """Power FD of every volume (mm; NaN for the first), :func:`framewise_displacement`."""
        return framewise_displacement(self.params)


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes (mm) along the three array axes of a 4×4 voxel-to-world ``affine``."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def grid_centre(shape: Sequence[int], zooms: np.ndarray) -> np.ndarray:
    """The centre of a grid (mm in array axes, the first voxel's centre at 0)."""
    return np.asarray(zooms, dtype=np.float64) * (np.asarray(shape[:3], dtype=np.float64) - 1.0) / 2.0


def _rotation(angles: np.ndarray) -> np.ndarray:
    """R = Rz Ry Rx of angles (..., 3) in rad: (..., 3, 3)."""
    ax, ay, az = np.moveaxis(np.asarray(angles, dtype=np.float64), -1, 0)
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    one, zero = np.ones_like(ax), np.zeros_like(ax)
    rx = np.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).reshape(ax.shape + (3, 3))
    ry = np.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(ax.shape + (3, 3))
    rz = np.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).reshape(ax.shape + (3, 3))
    return rz @ ry @ rx


def rigid_matrix(params: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """4×4 homogeneous matrices (..., 4, 4) of rigid ``params`` (..., 6) (mm, rad) about ``centre`` (mm):
    x ↦ R (x − c) + c + t, R = Rz Ry Rx (SimpleITK's Euler3DTransform with ComputeZYX)."""
    params = np.asarray(params, dtype=np.float64)
    centre = np.asarray(centre, dtype=np.float64)
    rotation = _rotation(params[..., 3:])
    out = np.zeros(params.shape[:-1] + (4, 4))
    out[..., :3, :3] = rotation
    out[..., :3, 3] = params[..., :3] + centre - rotation @ centre
    out[..., 3, 3] = 1.0
    return out


def rigid_params(matrix: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """The inverse of :func:`rigid_matrix`: params (..., 6) (mm, rad) of rigid 4×4 ``matrix`` (..., 4, 4)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rotation = matrix[..., :3, :3]
    ry = -np.arcsin(np.clip(rotation[..., 2, 0], -1.0, 1.0))
    rx = np.arctan2(rotation[..., 2, 1], rotation[..., 2, 2])
    rz = np.arctan2(rotation[..., 1, 0], rotation[..., 0, 0])
    centre = np.asarray(centre, dtype=np.float64)
    translation = matrix[..., :3, 3] - centre + rotation @ centre
    return np.concatenate([translation, np.stack([rx, ry, rz], -1)], axis=-1)


def framewise_displacement(params: np.ndarray, radius_mm: float = FD_RADIUS_MM) -> np.ndarray:
    """Power et al. (2012) framewise displacement (mm) of each volume from the one before:
    Σ|Δ translation| (mm) + ``radius_mm`` · Σ|Δ rotation| (rad); NaN for the first volume
    (fMRIPrep writes it n/a). ``params``: (n, 6) mm and rad."""
    params = np.asarray(params, dtype=np.float64)
    out = np.full(params.shape[0], np.nan)
    if params.shape[0] > 1:
        step = np.abs(np.diff(params, axis=0))
        out[1:] = step[:, :3].sum(axis=1) + radius_mm * step[:, 3:].sum(axis=1)
    return out


def excessive_motion(fd: np.ndarray, threshold_mm: float = EXCESSIVE_FD_MM,
                     max_fraction: float = EXCESSIVE_FRACTION) -> tuple[bool, float]:
    """Whether a series moved too much: FD > ``threshold_mm`` (mm) in more than ``max_fraction`` of
    the volumes with an FD; returns (flag, that fraction)."""
    fd = np.asarray(fd, dtype=np.float64)
    fd = fd[np.isfinite(fd)]
    fraction = float((fd > threshold_mm).mean()) if fd.size else 0.0
    return fraction > max_fraction, fraction


def contrast_groups(volume_types: Sequence[str], pld: np.ndarray, decimals: int = 6) -> list[tuple[str, np.ndarray]]:
    """The volumes of one contrast, (name, indices), for every (type, PLD) present: control, m0scan,
    label and deltam volumes (:data:`GROUP_ORDER`; other types are not registered), ascending PLD
    (s) within a type. The first group is the reference."""
    types = list(volume_types)
    pld = np.round(np.asarray(pld, dtype=np.float64), decimals)
    groups = []
    for kind in GROUP_ORDER:
        index = np.array([i for i, t in enumerate(types) if t == kind], dtype=np.int64)
        values = [None] if kind == "m0scan" else sorted(set(pld[index].tolist()))
        for value in values:
            chosen = index if value is None else index[pld[index] == value]
            if chosen.size:
                name = kind if value is None else f"{kind} PLD {value:g} s"
                groups.append((name, chosen))
    return groups


def _image(volume: np.ndarray, zooms: np.ndarray, pixel=None):
    """A SimpleITK image of a 3-D array (array axis 0 = image x), spacing ``zooms`` mm, origin 0."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(volume, dtype=pixel or np.float32).T))
    image.SetSpacing([float(z) for z in zooms])
    return image


def _array(image) -> np.ndarray:
    import SimpleITK as sitk

    return np.ascontiguousarray(sitk.GetArrayFromImage(image).T)


def register_image(moving: np.ndarray, fixed: np.ndarray, zooms: np.ndarray, *, cost: str = "mean_squares",
                   initial: np.ndarray | None = None, threads: int | None = None,
                   min_step: float = _MIN_STEP, first_step: float = _LEARNING_RATE) -> np.ndarray:
    """The rigid transform (params (6,), mm and rad, about the grid centre) mapping points of
    ``fixed`` to the same anatomy in ``moving`` (both 3-D on one grid of voxel sizes ``zooms``, mm).

    ``cost``: ``"mean_squares"`` (images of one contrast and scale: a volume and its group's mean),
    ``"correlation"`` (one contrast, any scale) or ``"mutual_information"`` (Mattes, 32 bins:
    images of different contrast). SimpleITK's regular-step gradient descent, rotations scaled by
    :data:`FD_RADIUS_MM` (a radian counts as that many mm), two resolution levels (shrink 2 then 1), :data:`_SAMPLES` voxels (at least
    5 %, at most all) sampled on a regular grid (fixed seed), steps from ``first_step`` down to ``min_step`` (mm;
    a radian is :data:`FD_RADIUS_MM` of them). ``initial``: params to start from (default: identity). The answer is kept
    only when its cost (every voxel, full resolution) is below that of the start; else the start
    (images without structure to register leave the optimiser wandering).
    ``threads``: SimpleITK threads of this registration (default: SimpleITK's global default)."""
    import SimpleITK as sitk

    zooms = np.asarray(zooms, dtype=np.float64)
    fixed_image, moving_image = _image(fixed, zooms), _image(moving, zooms)
    transform = sitk.Euler3DTransform()
    transform.SetComputeZYX(True)
    transform.SetCenter([float(c) for c in grid_centre(fixed.shape, zooms)])
    if initial is not None:
        transform.SetParameters([float(v) for v in np.asarray(initial)[[3, 4, 5, 0, 1, 2]]])
    method = sitk.ImageRegistrationMethod()
    if cost == "mean_squares":
        method.SetMetricAsMeanSquares()
    elif cost == "correlation":
        method.SetMetricAsCorrelation()
    elif cost == "mutual_information":
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    else:
        raise ValueError(f"cost must be 'mean_squares', 'correlation' or 'mutual_information', got {cost!r}")
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(float(np.clip(_SAMPLES / fixed.size, 0.05, 1.0)), _SEED)
    _gradients_at_samples(method)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=first_step, minStep=min_step,
                                                    numberOfIterations=_ITERATIONS, relaxationFactor=_RELAXATION,
                                                    gradientMagnitudeTolerance=1e-10)
    # rotations weighed by the head's radius (Power's 50 mm: a radian moves the cortex 50 mm), not by
    # the grid's farthest corner (SimpleITK's scales from physical shift): with those the rotations
    # moved ~8 times slower than the translations and stopped short (median 0.44° against 0.09°)
    method.SetOptimizerScales([FD_RADIUS_MM**2] * 3 + [1.0] * 3)
    method.SetShrinkFactorsPerLevel(list(_SHRINK))
    method.SetSmoothingSigmasPerLevel(list(_SMOOTH))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(transform, inPlace=True)
    if threads is not None:
        method.SetNumberOfThreads(threads)
    start = np.zeros(6) if initial is None else np.asarray(initial, dtype=np.float64)
    if not (np.ptp(fixed) > 0 and np.ptp(moving) > 0):
        return start  # a constant image (an all-zero series): nothing to register
    try:
        method.Execute(fixed_image, moving_image)
    except RuntimeError:  # ITK gives up (too few samples overlapping): keep the start
        return start
    rx, ry, rz, tx, ty, tz = transform.GetParameters()
    found = np.array([tx, ty, tz, rx, ry, rz])
    # keep the optimiser's answer only if it fits better than where it started (images without
    # structure to register, e.g. a constant phantom, leave it wandering); the first volume of a
    # chain starts from no motion (one full-resolution cost fewer per volume than also checking it)
    candidates = [found, start]
    costs = [_cost(fixed_image, moving_image, params, cost, zooms, fixed.shape, threads) for params in candidates]
    return candidates[int(np.argmin(costs))]


def _gradients_at_samples(method) -> None:
    """The metric's image gradients computed at the sampled points only, not filtered over the whole
    image first (SimpleITK's default smooths both images into gradient images at every call: half
    of a series' registration time went there, and the cost checks of :func:`register_image`
    evaluate no gradient at all)."""
    method.SetMetricUseFixedImageGradientFilter(False)
    method.SetMetricUseMovingImageGradientFilter(False)


def _cost(fixed_image, moving_image, params: np.ndarray, cost: str, zooms: np.ndarray, shape,
          threads: int | None = None) -> float:
    """The registration cost (lower is better) of rigid ``params`` at full resolution, every voxel."""
    import SimpleITK as sitk

    transform = sitk.Euler3DTransform()
    transform.SetComputeZYX(True)
    transform.SetCenter([float(c) for c in grid_centre(shape, zooms)])
    transform.SetParameters([float(v) for v in np.asarray(params)[[3, 4, 5, 0, 1, 2]]])
    method = sitk.ImageRegistrationMethod()
    {"mean_squares": method.SetMetricAsMeanSquares, "correlation": method.SetMetricAsCorrelation,
     "mutual_information": lambda: method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)}[cost]()
    method.SetInterpolator(sitk.sitkLinear)
    _gradients_at_samples(method)
    method.SetInitialTransform(transform)
    if threads is not None:
        method.SetNumberOfThreads(threads)
    try:
        return float(method.MetricEvaluate(fixed_image, moving_image))
    except RuntimeError:  # e.g. no sample left inside the moving image
        return math.inf


def polynomial_field_basis(points: np.ndarray, degree: int) -> np.ndarray:
    """(n, n_terms) the monomials of total degree <= ``degree`` of ``points`` (n, 3) (dimensionless
    coordinates; n_terms = (d+1)(d+2)(d+3)/6, the constant first)."""
    from itertools import combinations_with_replacement

    points = np.asarray(points, dtype=np.float64)
    columns = [np.ones(points.shape[0])]
    for total in range(1, degree + 1):
        for combo in combinations_with_replacement(range(3), total):
            columns.append(np.prod(points[:, list(combo)], axis=1))
    return np.stack(columns, axis=1)


def register_label_template(label: np.ndarray, control: np.ndarray, zooms: np.ndarray, *,
                            initial: np.ndarray | None = None, threads: int | None = 1) -> np.ndarray:
    """The rigid transform (params (6,), mm and rad, :func:`register_image`'s convention) mapping points
    of a control template to the same anatomy in the label template of the same condition (3-D, one grid
    of voxel sizes ``zooms`` mm, image units), blind to the smooth part of the label/control difference.

    The label is modelled as control · (1 − f): ΔM is a fraction f of the control signal (~1 % without
    background suppression) that varies across the head (perfusion asymmetries; magnetisation transfer and
    slab profiles that differ between label and control), f a polynomial of degree :data:`_FIELD_DEGREE`
    in the grid's coordinates. Mean squares against the control itself would fit the gradient-like part
    of ΔM by moving the label (a 4:1 hemispheric asymmetry: 0.04 mm towards hiding it); with f fitted,
    only the part of ΔM that no smooth field explains (its tissue pattern) pulls (0.008 mm, README
    "Motion"). f is fitted by linear least squares (numpy) on the head's voxels (the control above
    :data:`_FIELD_SUPPORT` of its 99th percentile) to control − label (the label resampled at ``initial``,
    linear interpolation), beside the six images a small further motion would add (the label's gradients
    along the translations and rotations), so that f does not take up what is left of the misregistration
    (a field fitted alone did: each round of fitting and registering moved only half-way from the start);
    then :func:`register_image` registers the label to control · (1 − f) from ``initial``
    (steps from :data:`_FIELD_FIRST_STEP` down to :data:`_FIELD_MIN_STEP`; its answer is kept only where it
    lowers the cost). ``initial``: where to start (default no motion)."""
    label = np.asarray(label, dtype=np.float64)
    control = np.asarray(control, dtype=np.float64)
    params = np.zeros(6) if initial is None else np.asarray(initial, dtype=np.float64)
    support = control > _FIELD_SUPPORT * np.percentile(control, 99)
    if not support.any():
        return params
    index = np.nonzero(support)
    voxels = np.stack(index, axis=1).astype(np.float64)
    shape = np.array(control.shape, dtype=np.float64)
    position = (voxels - (shape - 1) / 2) * np.asarray(zooms)  # mm from the grid's centre
    # f · control on the head's voxels, f = basis @ coefficients, the coordinates scaled to [-1, 1]
    weighted = polynomial_field_basis(voxels / np.maximum(shape - 1, 1) * 2 - 1, _FIELD_DEGREE) * control[index][:, None]
    moved = apply_motion(label[..., None], params[None], zooms, order=1, threads=threads)[..., 0]
    # what a small further motion would change (the label's gradient along each translation and rotation)
    # is fitted beside the field, so the field does not take up the misregistration (units apart: only
    # the field's coefficients are kept; the registration does the moving)
    gx, gy, gz = (g[index] for g in np.gradient(moved, *zooms))
    x, y, z = position.T
    design = np.concatenate([weighted, np.stack([gx, gy, gz, y * gz - z * gy, z * gx - x * gz, x * gy - y * gx],
                                                axis=1)], axis=1)
    scale = np.linalg.norm(design, axis=0)
    scale[scale == 0] = 1.0
    design /= scale  # unit columns: the normal equations (26 × 26 for degree 3) stay well conditioned
    solution = np.linalg.lstsq(design.T @ design, design.T @ (control - moved)[index], rcond=None)[0]
    expected = control.copy()
    expected[index] -= weighted @ (solution / scale)[:weighted.shape[1]]
    return register_image(label, expected, zooms, initial=params, threads=threads, min_step=_FIELD_MIN_STEP,
                          first_step=_FIELD_FIRST_STEP)


def apply_motion(data: np.ndarray, params: np.ndarray, zooms: np.ndarray, *, order: int = 3,
                 threads: int | None = None) -> np.ndarray:
    """Each volume of ``data`` (x, y, z, n) resampled into the reference frame with its rigid
    ``params`` (n, 6) (mm, rad; :func:`rigid_matrix`), float64; points that fall outside the volume
    take the nearest voxel's value (a slab's edge slices stay filled). ``order`` 3: cubic B-spline
    (the default: linear interpolation blurs each volume by its own sub-voxel shift, so control and
    label differ in blur, which biases ΔM: +15 % mean ΔM on a real series, README "Motion");
    1: linear (registration targets only). ``threads``: volumes resampled side by side (default
    :func:`_workers`), each on one thread."""
    import SimpleITK as sitk

    data = np.asarray(data, dtype=np.float64)
    params = np.asarray(params, dtype=np.float64)
    zooms = np.asarray(zooms, dtype=np.float64)
    matrices = rigid_matrix(params, grid_centre(data.shape, zooms))
    out = np.empty_like(data)

    def resample(k: int) -> None:
        image = _image(data[..., k], zooms, np.float64)
        resampler = sitk.ResampleImageFilter()
        resampler.SetReferenceImage(image)
        resampler.SetTransform(sitk.AffineTransform(matrices[k, :3, :3].ravel().tolist(), matrices[k, :3, 3].tolist()))
        resampler.SetInterpolator({1: sitk.sitkLinear, 3: sitk.sitkBSpline}[order])
        resampler.SetOutputPixelType(sitk.sitkFloat64)
        resampler.SetUseNearestNeighborExtrapolator(True)
        resampler.SetNumberOfThreads(1)
        out[..., k] = _array(resampler.Execute(image))

    _in_parallel(resample, range(data.shape[3]), threads)
    return out


def _workers() -> int:
    """Threads running registrations or resamplings side by side: SimpleITK's global default (the
    machine's cores, or ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``)."""
    import SimpleITK as sitk

    return max(1, int(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()))


def _in_parallel(function, items, workers: int | None = None) -> list:
    """``function`` of every item, in order, on ``workers`` threads (default :func:`_workers`). Each
    call is single-threaded in SimpleITK, which releases the GIL: a 64×64×20 volume is too small for
    ITK's own threads (two of them finish a registration only 1.5 times faster than one, measured),
    whole registrations and resamplings side by side use the cores fully."""
    from concurrent.futures import ThreadPoolExecutor

    items = list(items)
    workers = min(workers or _workers(), len(items))
    if workers <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(function, items))


def _median_volume(volumes: np.ndarray) -> np.ndarray:
    """The voxelwise median of ``volumes`` (x, y, z, n), equal to ``np.median(volumes, axis=3)``: one
    sort along the last axis, 4 times faster than np.median's partition for a group's few volumes
    (NaN anywhere: np.median itself, which propagates it)."""
    if not np.isfinite(volumes).all():
        return np.median(volumes, axis=3)
    ordered = np.sort(volumes, axis=3)
    half = ordered.shape[3] // 2
    return ordered[..., half] if ordered.shape[3] % 2 else (ordered[..., half - 1] + ordered[..., half]) / 2


def template_positions(within: np.ndarray, group_of: np.ndarray, n_groups: int):
    """Where each contrast group's template sits, from the within-group transforms alone: (templates,
    standard_error). ``within`` (n, 6): each volume's transform to its group's template (mm, rad);
    ``group_of`` (n,): its group's index (-1: not registered). ``templates`` (n_groups, 6): the
    template positions G_g (mm, rad, up to one common offset), the head's position in volume v being
    P_v = W_v G_g; ``standard_error(g, h)``: (6,) standard errors of G_g − G_h (mm, rad; inf where the
    equations do not determine it).

    The head moves smoothly from one volume to the next, so P_v ≈ (P_{v-1} + P_{v+1}) / 2 (to first
    order in the small offsets: w_v + g_{G(v)} ≈ the mean of the neighbours' w + g). Each volume
    between two registered ones gives s_v = w_v − (w_{v-1} + w_{v+1}) / 2 ≈ (g_{G(v-1)} +
    g_{G(v+1)}) / 2 − g_{G(v)}; the volumes with the same three groups share one equation, its
    right side the median of their s_v (at least :data:`_MIN_CLASS` of them); the equations are
    solved by least squares (numpy), weighted by the square root of their counts. A second solve
    leaves out the volumes the first fits worse than :data:`_OUTLIER` robust standard deviations
    (1.4826 · MAD of all residuals; a jerk, a volume corrupted during its readout). Standard errors:
    the median's 1.25 σ / √count, σ that robust standard deviation, propagated through the solve.
    No image of one contrast is registered to another."""
    n_params = within.shape[1]
    keys, values = [], []
    for v in range(1, within.shape[0] - 1):
        key = (int(group_of[v - 1]), int(group_of[v]), int(group_of[v + 1]))
        if min(key) >= 0 and not key[0] == key[1] == key[2]:  # three volumes of one group say nothing about G
            keys.append(key)
            values.append(within[v] - (within[v - 1] + within[v + 1]) / 2)
    unknown = (np.zeros((n_groups, n_params)), lambda g, h: np.full(n_params, np.inf))
    if not keys:
        return unknown
    values = np.array(values)

    def solve(kept: np.ndarray):
        """The equations of the kept volumes, their least-squares templates, and every volume's
        residual (absolute, (n_equations, 6)); None when no equation has enough volumes."""
        classes: dict[tuple[int, int, int], list[int]] = {}
        for i in np.flatnonzero(kept):
            classes.setdefault(keys[i], []).append(i)
        classes = {key: members for key, members in classes.items() if len(members) >= _MIN_CLASS}
        if not classes:
            return None
        rows, sides = np.zeros((len(classes), n_groups)), np.zeros((len(classes), n_params))
        for row, ((a, b, c), members) in enumerate(classes.items()):
            weight = math.sqrt(len(members))
            rows[row, [a, c]] += weight / 2
            rows[row, b] -= weight
            sides[row] = weight * np.median(values[members], axis=0)
        inverse = np.linalg.pinv(rows)
        templates = inverse @ sides
        model = np.array([(templates[a] + templates[c]) / 2 - templates[b] for a, b, c in keys])
        return rows, inverse, templates, np.abs(values - model)

    kept = np.ones(len(keys), dtype=bool)
    first = solve(kept)
    if first is None:
        return unknown
    scale = 1.4826 * np.median(first[3], axis=0)
    # no spread (a still head whose registrations all kept their start): nothing to judge
    kept = np.all((first[3] <= _OUTLIER * scale) | (scale == 0), axis=1)
    second = solve(kept)
    if second is None:
        return unknown
    rows, inverse, templates, residual = second
    scale = 1.4826 * np.median(residual[kept], axis=0)
    _, singular, basis = np.linalg.svd(rows)
    null = basis[int(np.sum(singular > 1e-9 * singular[0])):]  # directions the equations do not fix

    def standard_error(g: int, h: int) -> np.ndarray:
        """(6,) standard errors of G_g − G_h (mm, rad); inf when the equations leave it open."""
        difference = np.zeros(n_groups)
        difference[[g, h]] = (1.0, -1.0)
        if np.any(np.abs(null @ difference) > 1e-9):
            return np.full(n_params, np.inf)
        # each row's right side: √count · median, its standard error √count · 1.25 σ / √count
        return 1.2533 * scale * np.sqrt(((difference @ inverse) ** 2).sum())

    return templates, standard_error


def estimate_series_motion(data: np.ndarray, zooms: np.ndarray, volume_types: Sequence[str], pld: np.ndarray, *,
                           frame: np.ndarray | None = None, frame_name: str = "") -> MotionEstimate:
    """Rigid transforms of every volume of one series (module doc: each volume to its contrast
    group's mean, each group mean to the reference). ``data`` (x, y, z, n); ``zooms`` voxel sizes
    (mm); ``volume_types`` and ``pld`` (s) per volume. ``frame``: a reference image on this grid
    (another series' reference) to align to instead of the first group's mean, named ``frame_name``.
    Volumes of other types (cbf, noRF, n/a) keep the identity."""
    data = np.asarray(data, dtype=np.float64)
    zooms = np.asarray(zooms, dtype=np.float64)
    centre = grid_centre(data.shape, zooms)
    n = data.shape[3]
    groups = contrast_groups(volume_types, pld)
    if not groups:
        raise ValueError("no control, label, m0scan or deltam volume to register")
    names = ["not registered"] * n
    within = np.zeros((n, 6))

    def register_group(group: tuple[str, np.ndarray]) -> np.ndarray:
        """The group's volumes registered to its median (rows of ``within``); its corrected median."""
        name, index = group
        # the voxelwise median: a volume corrupted by a jerk does not drag the group's template (a mean
        # would, and every volume of the group would follow it: measured, 0.2 mm shifts of whole groups)
        mean = _median_volume(data[..., index])
        start = None
        for k in index:
            names[k] = name
            if index.size > 1:  # each volume starts from the one before it: heads drift slowly
                within[k] = start = register_image(data[..., k], mean, zooms, initial=start, threads=1)
        if index.size == 1:
            return mean
        return _median_volume(apply_motion(data[..., index], within[index], zooms, order=1, threads=1))

    # the groups side by side (:func:`_in_parallel`), each on one thread
    means = _in_parallel(register_group, groups)
    if frame is None:
        reference, reference_name = means[0], f"mean {groups[0][0]} volume"
    else:
        reference, reference_name = np.asarray(frame, dtype=np.float64), frame_name
    names_only = [name for name, _ in groups]
    twins = ["control" + name[len("label"):] if name.startswith("label") else None for name in names_only]
    registered = [g for g, twin in enumerate(twins) if twin not in names_only and (g > 0 or frame is not None)]
    group_of = np.full(n, -1)
    for g, (_, index) in enumerate(groups):
        group_of[index] = g
    templates, standard_error = template_positions(within, group_of, len(groups))
    # a label group's step from its control group (module doc, 3. and 4.): the path's, refined by the
    # templates' registration within the path's standard errors; where the path does not determine it (too
    # few volumes) no step and no refinement (the templates' registration alone is off by more than the
    # path on small images, README "Motion")
    labels = {}  # label group: (its control group, the path's step, how far the images may move it)
    for g, twin in enumerate(twins):
        if twin in names_only:
            c = names_only.index(twin)
            bound = _PATH_TOLERANCE * standard_error(g, c)
            labels[g] = (c, templates[g] - templates[c], bound) if np.isfinite(bound).all() else \
                (c, np.zeros(6), np.zeros(6))

    def place(job: tuple[str, int]) -> np.ndarray:
        """A group template's transform: to the reference (mutual information), or a label group's step."""
        kind, g = job
        if kind == "reference":
            return register_image(means[g], reference, zooms, cost="mutual_information", threads=1)
        c, path, bound = labels[g]
        if not bound.any():  # the path leaves no room (a still head) or says nothing: nothing to refine
            return path
        return path + np.clip(register_label_template(means[g], means[c], zooms, initial=path) - path, -bound, bound)

    # the registrations side by side (:func:`_in_parallel`), each on one thread
    jobs = [("reference", g) for g in registered] + [("label", g) for g in labels]
    placed = dict(zip(jobs, _in_parallel(place, jobs)))
    between: list[np.ndarray] = []
    for g in range(len(groups)):
        if g in labels:
            step = placed["label", g]
            between.append(rigid_params(rigid_matrix(step, centre) @ rigid_matrix(between[labels[g][0]], centre), centre))
        else:  # the reference group itself stays where it is
            between.append(placed.get(("reference", g), np.zeros(6)))
    params = np.zeros((n, 6))
    for (name, index), group_params in zip(groups, between):
        # reference point x -> group-mean frame (between) -> the volume (within)
        combined = rigid_matrix(within[index], centre) @ rigid_matrix(group_params, centre)
        params[index] = rigid_params(combined, centre)
    return MotionEstimate(params, centre, zooms, tuple(names), reference, reference_name)


@dataclass(frozen=True, eq=False)
class SeriesMotion:
    """What motion correction and robust averaging did to one ASL series (for the confounds file,
    the provenance and the QC page).

    source : the series (dataset-relative path).
    volume_types : the type of every volume, in acquisition order.
    params : (n, 6) rigid parameters of every volume (mm, rad; :class:`MotionEstimate`), or None
        when motion was not corrected.
    excluded : (n,) bool, the volume's ΔM (its pair's) left out of the average.
    m0_params : (6,) the separate M0 image's parameters (mm, rad), or None.
    reference_name : what the volumes were aligned to ("" without correction).
    images : (x, y, z, 4) mean control (or M0, or ΔM without either) image before and after
        correction, then the mean ΔM before (every pair) and after (correction and exclusion), image units.
    """

    source: str
    volume_types: tuple[str, ...]
    params: np.ndarray | None
    excluded: np.ndarray
    m0_params: np.ndarray | None
    reference_name: str
    images: np.ndarray

    @property
    def fd(self) -> np.ndarray | None:
        """Framewise displacement of every volume (mm, NaN for the first), or None."""
        return None if self.params is None else framewise_displacement(self.params)

    def summary(self, threshold_mm: float = EXCESSIVE_FD_MM, max_fraction: float = EXCESSIVE_FRACTION) -> dict:
        """JSON-ready figures: max and mean FD (mm), the fraction of volumes with FD above
        ``threshold_mm``, whether that fraction exceeds ``max_fraction`` (excessive motion), and the
        ΔM volumes excluded from the average (count and share)."""
        # one ΔM per control (its pair) and per deltam volume
        counted = np.array([t in ("control", "deltam") for t in self.volume_types], dtype=bool)
        n_deltam, n_excluded = int(counted.sum()), int((self.excluded & counted).sum())
        out = {"source": self.source, "motion_corrected": self.params is not None,
               "reference": self.reference_name or None,
               "deltam_volumes": n_deltam, "excluded_deltam_volumes": n_excluded,
               "excluded_fraction": round(n_excluded / n_deltam, 4) if n_deltam else 0.0}
        fd = self.fd
        if fd is not None and np.isfinite(fd).any():
            flag, fraction = excessive_motion(fd, threshold_mm, max_fraction)
            out.update({"max_fd_mm": round(float(np.nanmax(fd)), 4), "mean_fd_mm": round(float(np.nanmean(fd)), 4),
                        "fd_threshold_mm": threshold_mm, "fraction_above_threshold": round(fraction, 4),
                        "max_fraction_above_threshold": max_fraction, "excessive_motion": flag})
        return out
