"""In-plane neighbourhoods: which voxels they hold, the network input they make, and their prior.

The ``spatial`` network (:mod:`aslbatch.estimators.spatial`) reads a voxel's signals with
those of its in-plane neighbours: the (2r + 1)² patch of *radius* r around it (r = 1: the 3×3
patch and its 8 neighbours; r = 2: 5×5 and 24). In-plane (perpendicular to the slice axis) because a 2D
readout reads one slice at one time: every voxel of the patch then shares the centre's slice
offset, so one offset input serves the whole patch.

Input layout (one row per voxel)
--------------------------------
``[centre (n_vol), neighbour 1 .. K (K × n_vol), present 1 .. K (0/1), log amplitude]`` with the K
neighbours in the order of :func:`neighbour_offsets` (row-major; :data:`NEIGHBOURS` for r = 1). A
neighbour outside the mask or the grid, or whose signals are unusable (NaN/Inf or all zero), is
*absent*: its block holds the centre's own signals and its ``present`` flag is 0, so the network
sees the voxel as it would with fewer neighbours and never a made-up value. The signals (ΔM/M0t)
are divided by the patch's *amplitude*, the mean |signal| over the volumes of the centre and its
present neighbours (at least :data:`AMPLITUDE_FLOOR`), whose natural log is the last value: the
network reads the patch's pattern apart from its scale, which spans CBF's decades (a small lesion
is a relative dip; on raw signals the 1C network kept 0.70 of a 2×2 lesion's contrast at SNR 3
where the posterior mean of its prior keeps 0.90-0.94, normalised 0.76:
``benchmarks/study_spatial_lesion.py``).

The prior of the training patches (:func:`simulate_patches`)
------------------------------------------------------------
Each patch is two regions, A (holding the centre, unless the boundary runs through it) and B,
each with parameters drawn uniformly over the model's training ranges (the voxelwise networks'
prior), independently of each other, except that in a share :data:`SHARED_TIMING` of patches B
takes A's arrival times (:data:`TIMING`: a tissue boundary within one vascular territory; the rest
are a territory's edge), and then (5×5 patch only), where B is in the patch and not a lesion, the
region of lower CBF arrives U(0, :data:`TISSUE_STEP_S`) s later (white matter behind the grey matter
of its territory; clipped to the training range; the centre's marginal prior is otherwise the
voxelwise one). Per sample one geometry (shares :data:`SHARES` of the patch's radius):

- **smooth**: region A alone;
- **edge**: a straight boundary at a uniform angle, at a distance U(−r − 0.5, r + 0.5) voxels
  from the centre; B beyond it;
- **island**: a disc of radius U(0.5, 1.5) voxels centred U(−1, 1)² voxels from the centre
  holds B (a vessel, a sulcus seen in section);
- **lesion**: a grid-aligned rectangle of 1 or 2 voxels along each axis that holds the centre or
  lies just beside it (on either side, along each axis) is B, which is A with its CBF times a
  factor log-uniform over :data:`LESION_CBF` of the patch's radius (a small focal lesion: arrival
  and the rest unchanged).

Partial volume: the share of B in a voxel is clip(0.5 + signed distance into B, 0, 1) (exact
for a straight boundary along a grid axis), and the voxel's parameters are the shares' blend
of A's and B's (as :func:`aslbatch.phantom.make_phantom` blends tissues). Within each region
the parameters vary smoothly: a gradient of up to :data:`GRADIENT` of the training range per
voxel in a uniform direction, plus independent texture of :data:`TEXTURE` of the range per
voxel. Everything is clipped to the training ranges (and abat <= att kept, 2C).
Mask edges: a share :data:`EDGE_OF_MASK` of patches lose the neighbours beyond a straight line
U(0.5, r + 0.6) voxels from the centre, and a share :data:`ISOLATED` lose them all.
Noise: the acquisition's model (Rician by default), σ = S_ref / SNR with one SNR per patch
drawn log-uniformly over ``snr_range``, independent per voxel and volume; with slice offsets,
one offset per patch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numba import prange

from .._numba import parallel, serial
from ..models import KineticModel
from ..simulate import add_noise, noise_sigma, sample_parameters

__all__ = ["NEIGHBOURS", "PRIOR_VERSION", "gather_patches", "n_patch_inputs", "neighbour_offsets", "neighbour_rows",
           "normalise_patches", "plane_axes", "simulate_patches", "usable_rows"]

#: version of the training prior below and of what a spatial training makes (a spatial network's option:
#: networks of another version are retrained); 3: the prior of 2, with variance networks (standard errors);
#: 4: CBF learnt as log(cbf + 5) (:mod:`aslbatch.estimators.spatial`); 5: 1C reads the 5×5 patch (radius 2:
#: :attr:`aslbatch.estimators.spatial.SpatialEstimator.radius`) with its own prior (half the patches lesions,
#: their CBF × 0.2-2, the tissue step :data:`TISSUE_STEP_S`); the 3×3 patch (2C) and its prior as in version 4;
#: 6: the CBF output still log(cbf + 5), its error taken on CBF (the estimate the posterior mean of CBF again,
#: :mod:`aslbatch.estimators.spatial`); 7: a lesion beside the centre lies on either side of it along each axis
#: (versions 2-6: only on the negative side); 8: the patch's signals divided by its amplitude, whose log is an
#: input (module docstring)
PRIOR_VERSION = 8
#: smallest patch amplitude (ΔM/M0t) the signals are divided by (far below any perfused tissue's signal)
AMPLITUDE_FLOOR = 1e-6


def neighbour_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """In-plane offsets (row, column), voxels, of the neighbours of the patch of ``radius`` (1 or more):
    its (2·radius + 1)² positions row-major, without the centre (the input order)."""
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 1:
        raise ValueError(f"radius must be an integer >= 1, got {radius!r}")
    span = range(-radius, radius + 1)
    return tuple((a, b) for a in span for b in span if (a, b) != (0, 0))


#: in-plane offsets (row, column) of the 8 neighbours of the 3×3 patch, in input order
NEIGHBOURS = neighbour_offsets(1)
#: share of training patches per geometry (smooth, straight edge, island, lesion) by patch radius: lesions
#: are half the 5×5 patches (it keeps a 2×2 lesion's contrast less than the 3×3 patch with 30 % did)
SHARES = {1: {"smooth": 0.25, "edge": 0.3, "island": 0.15, "lesion": 0.3},
          2: {"smooth": 0.2, "edge": 0.2, "island": 0.1, "lesion": 0.5}}
#: a lesion's CBF relative to its surround: log-uniform over this range (below and above 1), by patch
#: radius: the 5×5 patch's lesions are mostly hypoperfused (the focal finding a perfusion map looks for)
LESION_CBF = {1: (0.3, 1.0 / 0.3), 2: (0.2, 2.0)}
#: share of patches whose two regions share their arrival times (a tissue boundary
#: within one vascular territory), the rest drawn independently (a territory's edge)
SHARED_TIMING = 0.9
#: the arrival-time parameters (s) that a shared timing copies
TIMING = ("att", "abat")
#: largest delay (s) of the region of lower CBF behind the other across a shared-arrival boundary
#: (the step is U(0, this)), by patch radius (0: no step); tissue values put white matter 0.3-0.5 s
#: behind grey matter
TISSUE_STEP_S = {1: 0.0, 2: 0.6}
#: largest smooth gradient (fraction of the training range per voxel) and texture (its SD, same unit)
GRADIENT, TEXTURE = 0.04, 0.015
#: share of training patches cut by the mask's edge, and of isolated voxels (no neighbour)
EDGE_OF_MASK, ISOLATED = 0.2, 0.05


def n_patch_inputs(n_volumes: int, radius: int = 1) -> int:
    """Width of a patch input row (no slice offset): the (2·radius + 1)² voxels' signals, a presence
    flag per neighbour and the log amplitude (9 voxels, 8 flags and 1 for radius 1)."""
    k = len(neighbour_offsets(radius))
    return (k + 1) * n_volumes + k + 1


def _radius_of(n_neighbours: int) -> int:
    """The radius of a patch of ``n_neighbours`` neighbours (8: 1, 24: 2, ...); ValueError for other counts."""
    radius = (round(np.sqrt(n_neighbours + 1)) - 1) // 2
    if radius < 1 or (2 * radius + 1) ** 2 != n_neighbours + 1:
        raise ValueError(f"a patch has (2r + 1)^2 - 1 neighbours (8, 24, ...), got {n_neighbours}")
    return radius


def plane_axes(mask_shape: Sequence[int], slice_offsets: np.ndarray | None, mask: np.ndarray) -> tuple[int, int]:
    """The two in-plane axes of a 3-D grid: those across which the slice offsets (s, one per mask
    voxel) do not vary; axes (0, 1) (slice axis 2, as stored by most scanners) when all
    offsets are equal (3D readouts). A ValueError when the offsets vary along more than one axis."""
    if slice_offsets is None or np.ptp(slice_offsets) == 0.0:
        return 0, 1
    coords = np.nonzero(mask)
    for axis in (2, 0, 1):
        others = [a for a in range(3) if a != axis]
        grid = np.full(tuple(mask_shape), np.nan)
        grid[coords] = slice_offsets
        with np.errstate(invalid="ignore"):
            spread = np.nanmax(grid, axis=tuple(others)) - np.nanmin(grid, axis=tuple(others))
        if np.all(~(spread > 1e-6)):  # NaN: an empty plane
            return tuple(others)  # type: ignore[return-value]
    raise ValueError("slice offsets vary along more than one axis of the grid: no in-plane neighbourhood")


def neighbour_rows(mask: np.ndarray, axes: tuple[int, int] = (0, 1), radius: int = 1) -> np.ndarray:
    """(n_voxels, K) int64: the row (in ``mask.nonzero()`` C order) of each in-plane neighbour (K of the
    patch of ``radius``) of every mask voxel, in :func:`neighbour_offsets` order along ``axes``; -1
    outside the mask or the grid."""
    mask = np.ascontiguousarray(mask, dtype=np.bool_)
    if mask.ndim != 3 or sorted(axes) not in ([0, 1], [0, 2], [1, 2]):
        raise ValueError(f"mask must be 3-D and axes two distinct axes of it, got shape {mask.shape}, axes {axes}")
    offsets = neighbour_offsets(radius)
    steps = np.zeros((len(offsets), 3), dtype=np.int64)
    for k, (d0, d1) in enumerate(offsets):
        steps[k, axes[0]] = d0
        steps[k, axes[1]] = d1
    out = np.empty((int(mask.sum()), len(offsets)), dtype=np.int64)
    _neighbour_table(mask, steps, out)
    return out


@serial
def _neighbour_table(mask, steps, out):
    """Fill ``out`` (n_voxels, n_steps) with the row of the voxel at each step (3 ints) from every mask voxel."""
    nx, ny, nz = mask.shape
    index = np.full((nx, ny, nz), -1, dtype=np.int64)
    count = 0
    for x in range(nx):
        for y in range(ny):
            for z in range(nz):
                if mask[x, y, z]:
                    index[x, y, z] = count
                    count += 1
    row = 0
    for x in range(nx):
        for y in range(ny):
            for z in range(nz):
                if not mask[x, y, z]:
                    continue
                for k in range(steps.shape[0]):
                    a = x + steps[k, 0]
                    b = y + steps[k, 1]
                    c = z + steps[k, 2]
                    inside = 0 <= a < nx and 0 <= b < ny and 0 <= c < nz
                    out[row, k] = index[a, b, c] if inside else -1
                row += 1


@serial
def _scale_row(row, n_signals, at, mean_abs):
    """Divide the first ``n_signals`` values of ``row`` by the patch's amplitude, ``mean_abs`` (the mean |signal|
    over its present voxels' volumes) held at least AMPLITUDE_FLOOR, and write the amplitude's log at
    ``row[at]``, in place."""
    amplitude = max(mean_abs, AMPLITUDE_FLOOR)
    scale = 1.0 / amplitude  # a multiply per value vectorises; a division per value cost 1.4x the inference time
    for i in range(n_signals):
        row[i] = row[i] * scale
    row[at] = np.log(amplitude)


@serial
def _normalise_row(row, n_vol, n_nb):
    """Divide the signals of the patch input ``row`` (raw ΔM/M0t, flags set) by the patch's amplitude and
    write its log after the flags (module docstring), in place."""
    flags = (1 + n_nb) * n_vol
    total = 0.0
    for v in range(n_vol):
        total += abs(row[v])
    count = n_vol
    for k in range(n_nb):
        if row[flags + k] > 0.5:
            base = (1 + k) * n_vol
            for v in range(n_vol):
                total += abs(row[base + v])
            count += n_vol
    _scale_row(row, flags, flags + n_nb, total / count)


@parallel
def _normalise_rows(rows, n_vol, n_nb):
    """:func:`_normalise_row` of every row of ``rows``, spread over the threads."""
    for r in prange(rows.shape[0]):
        _normalise_row(rows[r], n_vol, n_nb)


def normalise_patches(rows: np.ndarray, n_volumes: int, n_neighbours: int) -> None:
    """Divide the signals of raw patch input rows (n, :func:`n_patch_inputs`) float64, the signals ΔM/M0t and
    the flags set, by each patch's amplitude and write its log in the last column, in place (the module
    docstring's layout; :func:`gather_patches` and :func:`simulate_patches` return normalised rows)."""
    width = (n_neighbours + 1) * n_volumes + n_neighbours + 1
    if rows.ndim != 2 or rows.shape[1] != width or rows.dtype != np.float64 or not rows.flags.c_contiguous:
        raise ValueError(f"rows must be C-contiguous float64 of shape (n, {width}), got {rows.dtype} {rows.shape}")
    _normalise_rows(rows, n_volumes, n_neighbours)


@serial
def _gather_row(signals, usable, neighbours, i, row):
    """Patch input of voxel ``i`` into ``row`` (see the module docstring for the layout)."""
    n_vol = signals.shape[1]
    n_nb = neighbours.shape[1]
    flags = (1 + n_nb) * n_vol
    total = 0.0  # |signal| summed over the present voxels as they are copied (the amplitude of _normalise_row)
    for v in range(n_vol):
        row[v] = signals[i, v]
        total += abs(signals[i, v])
    count = n_vol
    for k in range(n_nb):
        j = neighbours[i, k]
        present = j >= 0 and usable[j]
        base = (1 + k) * n_vol
        if present:
            for v in range(n_vol):
                row[base + v] = signals[j, v]
                total += abs(signals[j, v])
            count += n_vol
        else:
            for v in range(n_vol):
                row[base + v] = signals[i, v]
        row[flags + k] = 1.0 if present else 0.0
    _scale_row(row, flags, flags + n_nb, total / count)


@parallel
def _gather(signals, usable, neighbours, rows, out):
    """Patch inputs of voxels ``rows`` into ``out``, rows spread over the threads."""
    for r in prange(rows.shape[0]):
        _gather_row(signals, usable, neighbours, rows[r], out[r])


@serial
def _gather_serial(signals, usable, neighbours, rows, out):
    """:func:`_gather` in the calling thread (for callers that spread blocks of rows over threads themselves)."""
    for r in range(rows.shape[0]):
        _gather_row(signals, usable, neighbours, rows[r], out[r])


def usable_rows(signals: np.ndarray) -> np.ndarray:
    """(n,) bool: rows whose signals are all finite and not all zero."""
    magnitude = np.abs(signals).sum(axis=1)
    return np.isfinite(magnitude) & (magnitude > 0.0)


def gather_patches(signals: np.ndarray, neighbours: np.ndarray, rows: np.ndarray | None = None, *,
                   slice_offsets: np.ndarray | None = None, usable: np.ndarray | None = None,
                   dtype: type = np.float32, one_thread: bool = False) -> np.ndarray:
    """Patch input rows (len(rows), :func:`n_patch_inputs` [+1]) of the voxels ``rows`` (default all)
    from ``signals`` (n, n_vol) ΔM/M0t and ``neighbours`` (n, K) from :func:`neighbour_rows`; with
    ``slice_offsets`` (n,) s, each row's offset as a last column. ``usable``: :func:`usable_rows`
    of ``signals`` when the caller has it; ``one_thread``: gather in the calling thread (no parallel region)."""
    signals = np.ascontiguousarray(signals, dtype=np.float64)
    neighbours = np.ascontiguousarray(neighbours, dtype=np.int64)
    if neighbours.ndim != 2 or neighbours.shape[0] != signals.shape[0]:
        raise ValueError(f"neighbours must have shape ({signals.shape[0]}, K), got {neighbours.shape}")
    rows = np.arange(signals.shape[0]) if rows is None else np.ascontiguousarray(rows, dtype=np.int64)
    width = n_patch_inputs(signals.shape[1], _radius_of(neighbours.shape[1]))
    out = np.empty((rows.shape[0], width + (slice_offsets is not None)), dtype=dtype)
    (_gather_serial if one_thread else _gather)(signals, usable_rows(signals) if usable is None else usable, neighbours,
                                            rows, out)
    if slice_offsets is not None:
        out[:, width] = np.asarray(slice_offsets)[rows]
    return out


# --- the training prior ---------------------------------------------------------------------

def _positions(radius: int) -> np.ndarray:
    """(P, 2) in-plane position (voxels) of the centre and of each neighbour of the patch, in input order."""
    return np.array([(0, 0), *neighbour_offsets(radius)], dtype=np.float64)


def _region_fields(model: KineticModel, base: np.ndarray, rng: np.random.Generator,
                   positions: np.ndarray) -> np.ndarray:
    """(n, P, n_params): ``base`` (n, n_params) varied smoothly over the patch's ``positions`` (P, 2)
    (gradient and texture)."""
    n = base.shape[0]
    ranges = np.array([model.training_ranges[p] for p in model.param_names])
    width = ranges[:, 1] - ranges[:, 0]
    angle = rng.uniform(0.0, 2.0 * np.pi, (n, model.n_params))
    slope = rng.uniform(0.0, GRADIENT, (n, model.n_params)) * width
    along = (np.cos(angle)[:, None, :] * positions[None, :, 0, None]
             + np.sin(angle)[:, None, :] * positions[None, :, 1, None])
    field = base[:, None, :] + slope[:, None, :] * along
    field += rng.standard_normal(field.shape) * (TEXTURE * width)
    field[:, 0, :] = base  # the centre keeps the drawn value: alone, its prior is the voxelwise one
    return field


def _b_share(n: int, rng: np.random.Generator, radius: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(n, P) share of region B in each voxel of each patch of ``radius``, and (n,) bool: the patches
    whose B is a lesion of A (see the module docstring)."""
    positions = _positions(radius)
    names = ("smooth", "edge", "island", "lesion")
    kind = rng.choice(4, n, p=[SHARES[radius][k] for k in names])
    share = np.zeros((n, positions.shape[0]))
    edge = kind == 1
    angle = rng.uniform(0.0, 2.0 * np.pi, n)
    offset = rng.uniform(-radius - 0.5, radius + 0.5, n)
    distance = np.cos(angle)[:, None] * positions[:, 0] + np.sin(angle)[:, None] * positions[:, 1] - offset[:, None]
    share[edge] = np.clip(0.5 + distance[edge], 0.0, 1.0)
    island = kind == 2
    centre = rng.uniform(-1.0, 1.0, (n, 2))
    disc = rng.uniform(0.5, 1.5, n)  # the island's radius (voxels)
    from_centre = np.hypot(positions[:, 0] - centre[:, :1], positions[:, 1] - centre[:, 1:])
    share[island] = np.clip(0.5 + disc[:, None] - from_centre, 0.0, 1.0)[island]
    lesion = kind == 3
    size = rng.integers(1, 3, (n, 2))  # 1 or 2 voxels along each axis
    first = -rng.integers(0, size + 1)  # the centre inside (or, for size + 1, just beside) the rectangle
    beside = first == -size
    first[beside & (rng.random((n, 2)) < 0.5)] = 1  # beside on either side of the centre
    inside = np.all((positions[None] >= first[:, None, :]) & (positions[None] < (first + size)[:, None, :]), axis=2)
    share[lesion] = inside[lesion]
    return share, lesion


def _tie_regions(model: KineticModel, base_a: np.ndarray, base_b: np.ndarray, lesion: np.ndarray,
                 two_regions: np.ndarray, rng: np.random.Generator, radius: int) -> None:
    """Tie the parameters of regions A and B (``base_a``, ``base_b``: (n, n_params), API units, changed in
    place) as the module docstring says: B takes A's arrival times in a share :data:`SHARED_TIMING` of
    patches, and all but a CBF scaled over :data:`LESION_CBF` in the lesion patches (``lesion`` (n,) bool);
    then in the patches of shared arrival where B is present (``two_regions`` (n,) bool) and not a lesion,
    the region of lower CBF arrives U(0, :data:`TISSUE_STEP_S`) s later (no step, and no draw, for 0);
    both constants those of the patch's ``radius``."""
    n = lesion.shape[0]
    timing = [model.param_names.index(p) for p in TIMING if p in model.param_names]
    same_arrival = rng.uniform(size=n) < SHARED_TIMING
    shared = same_arrival[:, None] & np.isin(np.arange(model.n_params), timing)[None, :]
    base_b[shared] = base_a[shared]
    base_b[lesion] = base_a[lesion]
    lo_ratio, hi_ratio = LESION_CBF[radius]
    cbf = model.param_names.index("cbf")
    base_b[lesion, cbf] *= np.exp(rng.uniform(np.log(lo_ratio), np.log(hi_ratio), int(lesion.sum())))
    step_s = TISSUE_STEP_S[radius]
    if step_s <= 0.0:
        return
    step = rng.uniform(0.0, step_s, n)
    stepped = same_arrival & two_regions & ~lesion
    b_later = stepped & (base_b[:, cbf] < base_a[:, cbf])
    a_later = stepped & ~b_later
    for j in timing:
        upper = model.training_ranges[model.param_names[j]][1]
        base_b[b_later, j] = np.minimum(base_b[b_later, j] + step[b_later], upper)
        base_a[a_later, j] = np.minimum(base_a[a_later, j] + step[a_later], upper)


def _present(n: int, rng: np.random.Generator, radius: int = 1) -> np.ndarray:
    """(n, K) bool: which neighbours of the patch of ``radius`` lie inside the mask (module docstring:
    mask edges)."""
    positions = _positions(radius)[1:]
    present = np.ones((n, positions.shape[0]), dtype=bool)
    u = rng.uniform(size=n)
    cut = u < EDGE_OF_MASK
    angle = rng.uniform(0.0, 2.0 * np.pi, n)
    offset = rng.uniform(0.5, radius + 0.6, n)
    beyond = (np.cos(angle)[:, None] * positions[:, 0] + np.sin(angle)[:, None] * positions[:, 1]) > offset[:, None]
    present[cut] = ~beyond[cut]
    present[(u >= EDGE_OF_MASK) & (u < EDGE_OF_MASK + ISOLATED)] = False
    return present


def simulate_patches(model: KineticModel, n: int, snr_range: tuple[float, float], noise: str,
                     slice_offsets: Sequence[float], rng: np.random.Generator,
                     radius: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` training patches of ``radius`` from the prior of the module docstring: (inputs (n, n_inputs
    [+1 slice offset s]) float64, centre parameters (n, n_params) API units, SNR of each patch (n,))."""
    from .neural import model_signal

    n_vol, n_par = model.n_volumes, model.n_params
    positions = _positions(radius)
    n_pos = positions.shape[0]
    base_a, base_b = sample_parameters(model, n, rng), sample_parameters(model, n, rng)
    share, lesion = _b_share(n, rng, radius)
    _tie_regions(model, base_a, base_b, lesion, share.max(axis=1) > 0.0, rng, radius)
    a = _region_fields(model, base_a, rng, positions)
    b = _region_fields(model, base_b, rng, positions)
    share = share[:, :, None]
    params = (1.0 - share) * a + share * b
    ranges = np.array([model.training_ranges[p] for p in model.param_names])
    np.clip(params, ranges[:, 0], ranges[:, 1], out=params)
    for earlier, later, _ in model.ordered_times:
        i, j = model.param_names.index(earlier), model.param_names.index(later)
        np.minimum(params[..., i], params[..., j], out=params[..., i])
    lo, hi = snr_range
    snr = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    sigma = np.repeat(np.asarray(noise_sigma(model, snr), dtype=np.float64), n_pos)
    offsets = None
    if slice_offsets:
        offsets = np.asarray(slice_offsets, dtype=np.float64)[rng.integers(0, len(slice_offsets), n)]
    clean = model_signal(model, params.reshape(n * n_pos, n_par),
                         None if offsets is None else np.repeat(offsets, n_pos))
    noisy = add_noise(clean, sigma, noise, rng).reshape(n, n_pos, n_vol)
    present = _present(n, rng, radius)
    patch = np.where(np.concatenate([np.ones((n, 1), bool), present], axis=1)[:, :, None], noisy, noisy[:, :1, :])
    inputs = np.concatenate([patch.reshape(n, n_pos * n_vol), present.astype(np.float64), np.zeros((n, 1))], axis=1)
    normalise_patches(inputs, n_vol, n_pos - 1)
    if offsets is not None:
        inputs = np.column_stack([inputs, offsets])
    return inputs, params[:, 0, :].copy(), snr
