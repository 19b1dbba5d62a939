"""In-plane 3×3 neighbourhoods: which voxels they hold, the network input they make, and their prior.

The ``spatial`` network (:mod:`aslbatch.estimators.spatial`) reads a voxel's signals with
those of its 8 in-plane neighbours. In-plane (perpendicular to the slice axis) because a 2D
readout reads one slice at one time: every voxel of the patch then shares the centre's slice
offset, so one offset input serves the whole patch.

Input layout (one row per voxel, ΔM/M0t unless said)
-----------------------------------------------------
``[centre (n_vol), neighbour 1 .. 8 (8 × n_vol), present 1 .. 8 (0/1)]`` with the neighbours in
the order of :data:`NEIGHBOURS`. A neighbour outside the mask or the grid, or whose signals
are unusable (NaN/Inf or all zero), is *absent*: its block holds the centre's own signals and
its ``present`` flag is 0, so the network sees the voxel as it would with fewer neighbours
and never a made-up value.

The prior of the training patches (:func:`simulate_patches`)
------------------------------------------------------------
Each patch is two regions, A (holding the centre, unless the boundary runs through it) and B,
each with parameters drawn uniformly over the model's training ranges (the voxelwise networks'
prior, so the centre's marginal prior is theirs), independently of each other, except that in a
share :data:`SHARED_TIMING` of patches B takes A's arrival times (:data:`TIMING`: a tissue boundary
within one vascular territory, where CBF jumps and arrival does not; the rest are a territory's
edge). Per sample one geometry (shares :data:`SHARES`):

- **smooth**: region A alone;
- **edge**: a straight boundary at a uniform angle, at a distance U(−1.5, 1.5) voxels from
  the centre; B beyond it;
- **island**: a disc of radius U(0.5, 1.5) voxels centred U(−1, 1)² voxels from the centre
  holds B (a vessel, a sulcus seen in section);
- **lesion**: a grid-aligned rectangle of 1 or 2 voxels along each axis that holds the centre or
  lies just beside it is B, which is A with its CBF times a factor log-uniform over
  :data:`LESION_CBF` (a small focal lesion: arrival and the rest unchanged).

Partial volume: the share of B in a voxel is clip(0.5 + signed distance into B, 0, 1) (exact
for a straight boundary along a grid axis), and the voxel's parameters are the shares' blend
of A's and B's (as :func:`aslbatch.phantom.make_phantom` blends tissues). Within each region
the parameters vary smoothly: a gradient of up to :data:`GRADIENT` of the training range per
voxel in a uniform direction, plus independent texture of :data:`TEXTURE` of the range per
voxel. Everything is clipped to the training ranges (and abat <= att kept, 2C).
Mask edges: a share :data:`EDGE_OF_MASK` of patches lose the neighbours beyond a straight line
U(0.5, 1.6) voxels from the centre, and a share :data:`ISOLATED` lose all eight.
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

__all__ = ["NEIGHBOURS", "PRIOR_VERSION", "gather_patches", "n_patch_inputs", "neighbour_rows", "plane_axes", "simulate_patches",
           "usable_rows"]

#: version of the training prior below and of what a spatial training makes (a spatial network's option:
#: networks of another version are retrained); 3: the prior of 2, with variance networks (standard errors);
#: 4: CBF learnt as log(cbf + 5) (:mod:`aslbatch.estimators.spatial`); 6: the CBF output still log(cbf + 5), its
#: error taken on CBF (the estimate the posterior mean of CBF again)
PRIOR_VERSION = 6
#: in-plane offsets (row, column) of the 8 neighbours, in input order
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
#: share of training patches per geometry (smooth, straight edge, island, lesion)
SHARES = {"smooth": 0.25, "edge": 0.3, "island": 0.15, "lesion": 0.3}
#: a lesion's CBF relative to its surround: log-uniform over this range (below and above 1)
LESION_CBF = (0.3, 1.0 / 0.3)
#: share of patches whose two regions share their arrival times (a tissue boundary
#: within one vascular territory), the rest drawn independently (a territory's edge)
SHARED_TIMING = 0.9
#: the arrival-time parameters (s) that a shared timing copies
TIMING = ("att", "abat")
#: largest smooth gradient (fraction of the training range per voxel) and texture (its SD, same unit)
GRADIENT, TEXTURE = 0.04, 0.015
#: share of training patches cut by the mask's edge, and of isolated voxels (no neighbour)
EDGE_OF_MASK, ISOLATED = 0.2, 0.05


def n_patch_inputs(n_volumes: int) -> int:
    """Width of a patch input row (no slice offset): 9 voxels' signals and 8 presence flags."""
    return 9 * n_volumes + len(NEIGHBOURS)


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


def neighbour_rows(mask: np.ndarray, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """(n_voxels, 8) int64: the row (in ``mask.nonzero()`` C order) of each in-plane neighbour of
    every mask voxel, in :data:`NEIGHBOURS` order along ``axes``; -1 outside the mask or the grid."""
    mask = np.ascontiguousarray(mask, dtype=np.bool_)
    if mask.ndim != 3 or sorted(axes) not in ([0, 1], [0, 2], [1, 2]):
        raise ValueError(f"mask must be 3-D and axes two distinct axes of it, got shape {mask.shape}, axes {axes}")
    steps = np.zeros((len(NEIGHBOURS), 3), dtype=np.int64)
    for k, (d0, d1) in enumerate(NEIGHBOURS):
        steps[k, axes[0]] = d0
        steps[k, axes[1]] = d1
    out = np.empty((int(mask.sum()), len(NEIGHBOURS)), dtype=np.int64)
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
def _gather_row(signals, usable, neighbours, i, row):
    """Patch input of voxel ``i`` into ``row`` (see the module docstring for the layout)."""
    n_vol = signals.shape[1]
    n_nb = neighbours.shape[1]
    for v in range(n_vol):
        row[v] = signals[i, v]
    for k in range(n_nb):
        j = neighbours[i, k]
        present = j >= 0 and usable[j]
        src = j if present else i
        base = (1 + k) * n_vol
        for v in range(n_vol):
            row[base + v] = signals[src, v]
        row[(1 + n_nb) * n_vol + k] = 1.0 if present else 0.0


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
    from ``signals`` (n, n_vol) ΔM/M0t and ``neighbours`` (n, 8) from :func:`neighbour_rows`; with
    ``slice_offsets`` (n,) s, each row's offset as a last column. ``usable``: :func:`usable_rows`
    of ``signals`` when the caller has it; ``one_thread``: gather in the calling thread (no parallel region)."""
    signals = np.ascontiguousarray(signals, dtype=np.float64)
    neighbours = np.ascontiguousarray(neighbours, dtype=np.int64)
    if neighbours.shape != (signals.shape[0], len(NEIGHBOURS)):
        raise ValueError(f"neighbours must have shape ({signals.shape[0]}, {len(NEIGHBOURS)}), got {neighbours.shape}")
    rows = np.arange(signals.shape[0]) if rows is None else np.ascontiguousarray(rows, dtype=np.int64)
    width = n_patch_inputs(signals.shape[1])
    out = np.empty((rows.shape[0], width + (slice_offsets is not None)), dtype=dtype)
    (_gather_serial if one_thread else _gather)(signals, usable_rows(signals) if usable is None else usable, neighbours,
                                            rows, out)
    if slice_offsets is not None:
        out[:, width] = np.asarray(slice_offsets)[rows]
    return out


# --- the training prior ---------------------------------------------------------------------

#: in-plane position (voxels) of the centre and of each neighbour, in input order
_POSITIONS = np.array([(0, 0), *NEIGHBOURS], dtype=np.float64)


def _region_fields(model: KineticModel, base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, 9, n_params): ``base`` (n, n_params) varied smoothly over the patch (gradient and texture)."""
    n = base.shape[0]
    ranges = np.array([model.training_ranges[p] for p in model.param_names])
    width = ranges[:, 1] - ranges[:, 0]
    angle = rng.uniform(0.0, 2.0 * np.pi, (n, model.n_params))
    slope = rng.uniform(0.0, GRADIENT, (n, model.n_params)) * width
    along = np.cos(angle)[:, None, :] * _POSITIONS[None, :, 0, None] + np.sin(angle)[:, None, :] * _POSITIONS[None, :, 1, None]
    field = base[:, None, :] + slope[:, None, :] * along
    field += rng.standard_normal(field.shape) * (TEXTURE * width)
    field[:, 0, :] = base  # the centre keeps the drawn value: alone, its prior is the voxelwise one
    return field


def _b_share(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n, 9) share of region B in each voxel of each patch, and (n,) bool: the patches whose B is a
    lesion of A (see the module docstring)."""
    names = ("smooth", "edge", "island", "lesion")
    kind = rng.choice(4, n, p=[SHARES[k] for k in names])
    share = np.zeros((n, 9))
    edge = kind == 1
    angle = rng.uniform(0.0, 2.0 * np.pi, n)
    offset = rng.uniform(-1.5, 1.5, n)
    distance = np.cos(angle)[:, None] * _POSITIONS[:, 0] + np.sin(angle)[:, None] * _POSITIONS[:, 1] - offset[:, None]
    share[edge] = np.clip(0.5 + distance[edge], 0.0, 1.0)
    island = kind == 2
    centre = rng.uniform(-1.0, 1.0, (n, 2))
    radius = rng.uniform(0.5, 1.5, n)
    from_centre = np.hypot(_POSITIONS[:, 0] - centre[:, :1], _POSITIONS[:, 1] - centre[:, 1:])
    share[island] = np.clip(0.5 + radius[:, None] - from_centre, 0.0, 1.0)[island]
    lesion = kind == 3
    size = rng.integers(1, 3, (n, 2))  # 1 or 2 voxels along each axis
    first = -rng.integers(0, size + 1)  # the centre inside (or, for size + 1, just beside) the rectangle
    inside = np.all((_POSITIONS[None] >= first[:, None, :]) & (_POSITIONS[None] < (first + size)[:, None, :]), axis=2)
    share[lesion] = inside[lesion]
    return share, lesion


def _tie_regions(model: KineticModel, base_a: np.ndarray, base_b: np.ndarray, lesion: np.ndarray,
                 rng: np.random.Generator) -> None:
    """Make region B's parameters ``base_b`` (n, n_params, API units, changed in place) share A's
    (``base_a``) as the module docstring says: arrival times in a share :data:`SHARED_TIMING` of
    patches, and all but a scaled CBF in the lesion patches (``lesion`` (n,) bool)."""
    n = lesion.shape[0]
    timing = [model.param_names.index(p) for p in TIMING if p in model.param_names]
    shared = (rng.uniform(size=n) < SHARED_TIMING)[:, None] & np.isin(np.arange(model.n_params), timing)[None, :]
    base_b[shared] = base_a[shared]
    base_b[lesion] = base_a[lesion]
    lo_ratio, hi_ratio = LESION_CBF
    base_b[lesion, model.param_names.index("cbf")] *= np.exp(rng.uniform(np.log(lo_ratio), np.log(hi_ratio),
                                                                           int(lesion.sum())))


def _present(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 8) bool: which neighbours lie inside the mask (module docstring: mask edges)."""
    present = np.ones((n, len(NEIGHBOURS)), dtype=bool)
    u = rng.uniform(size=n)
    cut = u < EDGE_OF_MASK
    angle = rng.uniform(0.0, 2.0 * np.pi, n)
    offset = rng.uniform(0.5, 1.6, n)
    beyond = (np.cos(angle)[:, None] * _POSITIONS[1:, 0] + np.sin(angle)[:, None] * _POSITIONS[1:, 1]) > offset[:, None]
    present[cut] = ~beyond[cut]
    present[(u >= EDGE_OF_MASK) & (u < EDGE_OF_MASK + ISOLATED)] = False
    return present


def simulate_patches(model: KineticModel, n: int, snr_range: tuple[float, float], noise: str,
                     slice_offsets: Sequence[float], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` training patches from the prior of the module docstring: (inputs (n, n_inputs [+1 slice
    offset s]) float64, centre parameters (n, n_params) API units, SNR of each patch (n,))."""
    from .neural import model_signal

    n_vol, n_par = model.n_volumes, model.n_params
    base_a, base_b = sample_parameters(model, n, rng), sample_parameters(model, n, rng)
    share, lesion = _b_share(n, rng)
    _tie_regions(model, base_a, base_b, lesion, rng)
    a = _region_fields(model, base_a, rng)
    b = _region_fields(model, base_b, rng)
    share = share[:, :, None]
    params = (1.0 - share) * a + share * b
    ranges = np.array([model.training_ranges[p] for p in model.param_names])
    np.clip(params, ranges[:, 0], ranges[:, 1], out=params)
    for earlier, later, _ in model.ordered_times:
        i, j = model.param_names.index(earlier), model.param_names.index(later)
        np.minimum(params[..., i], params[..., j], out=params[..., i])
    lo, hi = snr_range
    snr = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    sigma = np.repeat(np.asarray(noise_sigma(model, snr), dtype=np.float64), 9)
    offsets = None
    if slice_offsets:
        offsets = np.asarray(slice_offsets, dtype=np.float64)[rng.integers(0, len(slice_offsets), n)]
    clean = model_signal(model, params.reshape(n * 9, n_par), None if offsets is None else np.repeat(offsets, 9))
    noisy = add_noise(clean, sigma, noise, rng).reshape(n, 9, n_vol)
    present = _present(n, rng)
    patch = np.where(np.concatenate([np.ones((n, 1), bool), present], axis=1)[:, :, None], noisy, noisy[:, :1, :])
    inputs = np.concatenate([patch.reshape(n, 9 * n_vol), present.astype(np.float64)], axis=1)
    if offsets is not None:
        inputs = np.column_stack([inputs, offsets])
    return inputs, params[:, 0, :].copy(), snr
