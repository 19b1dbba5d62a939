"""Lookup table (grid search): the research's conventional two-compartment method, and LM's start.

For fixed arrival times the amplitudes are linear: the signal is
cbf · T(att) [+ abv · A(abat)], with T the tissue signal per mL/100 g/min and A the
arterial signal per unit abv. So a grid over the time parameters, with a
closed-form least-squares solve for the amplitudes at each grid point, each between 0 and
its upper bound, finds the globally best grid point of the bounded problem without any
iteration. (Unbounded above, a noise fit could choose an arrival near the last readout with a
cbf far above 300 that the clip to the bound then made a poor fit, and LM started from it.)

Grids (all in s, inside the model's bounds):
- att: uniform with step ``resolution_s``.
- abat (2C): with hard arterial edges the residual is piecewise constant in abat, with
  breaks where abat or abat + τ crosses a non-crushed readout time t = τ + w. The grid is
  then one point per piece (its midpoint): exact enumeration, every distinct arterial
  window tried once. With smoothed edges (``arterial_edge_s`` = s > 0) abat is uniform with
  step min(``resolution_s``, s/2), since the window changes within ~s.
- 2C pairs keep abat <= att.

Flat directions: where several consecutive grid points fit exactly equally well (e.g. 1C
with T1' = T1b and att below the shortest PLD, where every volume sees the fully
delivered bolus and the signal does not depend on att), the middle of that run is chosen.
For 1C, runs of bit-identical basis signals are merged into that middle point when the
grid is built, so the search does not revisit them.

With Buxton's T1' (``t1_prime="tissue"``) the tissue signal is not exactly linear in cbf;
the basis is then evaluated at cbf = 60 mL/100 g/min, an approximation that LM refines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import get_num_threads, prange

from .._numba import parallel, serial
from ..models import KineticModel
from ..models.base import CRUSHED, TAU, TIME
from .base import Estimate, Estimator, Status

#: cbf (mL/100 g/min) at which the tissue basis is evaluated when it is not exactly linear
BASIS_CBF = 60.0
#: grid residuals closer than this fraction of |y|² are ties (a flat direction, up to rounding)
TIE_TOLERANCE = 1e-12


@dataclass(frozen=True)
class TimeGrid:
    """Precomputed grid and basis signals (ΔM/M0t per unit amplitude) for a model.

    ``norms`` and ``pairs`` pack the data-independent parts of every grid pair's 2 x 2
    least-squares solve, so the kernels multiply instead of divide.
    """

    att: np.ndarray  #: (n_att,) s
    tissue: np.ndarray  #: (n_att, n_volumes) per mL/100 g/min
    tissue_by_volume: np.ndarray  #: (n_volumes, n_att): ``tissue`` transposed, contiguous per volume
    abat: np.ndarray  #: (n_abat,) s; empty for 1C
    arterial: np.ndarray  #: (n_abat, n_volumes) per unit abv (mL/mL)
    norms: np.ndarray  #: (4, max(n_att, n_abat)): |T|², 1/|T|² over att; |A|², 1/|A|² over abat (0 if undefined)
    pair_abat: np.ndarray  #: (n_pairs,) index into abat, -1 for 1C
    pair_att: np.ndarray  #: (n_pairs,) index into att
    pair_alt: np.ndarray  #: (n_pairs,) for a point standing for a collapsed flat run, the next pair; else -1
    pairs: np.ndarray  #: (2, n_pairs): T·A and 1/(|T|²|A|² - (T·A)²) (0 where near-singular)
    amp_max: np.ndarray  #: (2,) upper bounds of the amplitudes: cbf (mL/100 g/min) and abv (mL/mL; inf for 1C)

    @property
    def n_pairs(self) -> int:
        return int(self.pair_att.size)


def _uniform(lo: float, hi: float, step: float) -> np.ndarray:
    n = int(math.floor((hi - lo) / step + 1e-9)) + 1
    grid = lo + step * np.arange(n)
    if hi - grid[-1] > 1e-9:
        grid = np.append(grid, hi)
    return grid


def _arterial_pieces(model: KineticModel, lo: float, hi: float) -> np.ndarray:
    """Midpoints of the abat intervals over which the hard arterial window does not change."""
    vol = model.vol
    open_vols = vol[:, CRUSHED] == 0.0
    breaks = np.concatenate([vol[open_vols, TIME], vol[open_vols, TIME] - vol[open_vols, TAU], [lo, hi]])
    breaks = np.unique(np.clip(breaks, lo, hi))
    if breaks.size == 1:
        return breaks
    return 0.5 * (breaks[:-1] + breaks[1:])


def _collapse_identical(att: np.ndarray, basis: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge runs of consecutive grid points with bit-identical basis rows (a flat direction).

    Each run becomes one point at the middle of its att range, which is what a search over
    the run would return; its alternative (the LM's second start) is the next point.
    Returns (att, basis, alternative index or -1).
    """
    new_run = np.r_[True, ~(basis[1:] == basis[:-1]).all(axis=1)]
    first = np.flatnonzero(new_run)
    last = np.r_[first[1:] - 1, att.size - 1]
    merged_att = 0.5 * (att[first] + att[last])
    alt = np.where((last > first) & (np.arange(first.size) + 1 < first.size), np.arange(first.size) + 1, -1)
    return merged_att, basis[first], alt.astype(np.int64)


def check_grid_step(name: str, step_s: Any) -> None:
    """ValueError unless ``step_s`` (option ``name``) is a grid step: a finite number of seconds > 0."""
    if isinstance(step_s, bool) or not isinstance(step_s, (int, float, np.integer, np.floating)) \
            or not (math.isfinite(step_s) and step_s > 0):
        raise ValueError(f"{name} must be a positive number of seconds, got {step_s!r}")


def build_time_grid(model: KineticModel, resolution_s: float) -> TimeGrid:
    """The grid and basis signals for ``model`` at ``resolution_s`` (s) between its bounds."""
    check_grid_step("grid resolution", resolution_s)
    lower, upper = model.bounds
    names = model.param_names
    j_att = names.index("att")
    att = _uniform(lower[j_att], upper[j_att], resolution_s)
    tissue_model = model.tissue_model()
    ref_cbf = 1.0 if model.constants.t1_prime == "blood" else BASIS_CBF
    tissue = tissue_model.signal(np.column_stack([np.full(att.size, ref_cbf), att])) / ref_cbf
    n_vol = model.n_volumes
    if "abat" not in names:  # tissue only: one linear amplitude (cbf) per arrival time
        att, tissue, pair_alt = _collapse_identical(att, tissue)
        abat = np.empty(0)
        arterial = np.empty((0, n_vol))
        pair_abat = np.full(att.size, -1, dtype=np.int64)
        pair_att = np.arange(att.size, dtype=np.int64)
    else:
        j_abat = names.index("abat")
        edge_s = model.options()["arterial_edge_s"]
        if edge_s == 0.0:
            abat = _arterial_pieces(model, lower[j_abat], upper[j_abat])
        else:
            # a smoothed edge changes the signal within ~s: sample abat at least every s/2
            abat = _uniform(lower[j_abat], upper[j_abat], min(resolution_s, edge_s / 2))
        # arterial only: cbf = 0, abv = 1, att irrelevant
        arterial = model.signal(np.column_stack([np.zeros(abat.size), np.ones(abat.size), abat, np.full(abat.size, upper[j_att])]))
        ii, jj = np.meshgrid(np.arange(abat.size), np.arange(att.size), indexing="ij")
        keep = abat[ii] <= att[jj] + 1e-12
        pair_abat = ii[keep].astype(np.int64)
        pair_att = jj[keep].astype(np.int64)
        pair_alt = np.full(pair_att.size, -1, dtype=np.int64)
    tissue_norm = np.einsum("kv,kv->k", tissue, tissue)
    arterial_norm = np.einsum("kv,kv->k", arterial, arterial)
    norms = np.zeros((4, max(att.size, abat.size)))
    norms[0, : att.size] = tissue_norm
    norms[1, : att.size] = np.divide(1.0, tissue_norm, out=np.zeros_like(tissue_norm), where=tissue_norm > 0)
    norms[2, : abat.size] = arterial_norm
    norms[3, : abat.size] = np.divide(1.0, arterial_norm, out=np.zeros_like(arterial_norm), where=arterial_norm > 0)
    pairs = np.zeros((2, pair_att.size))
    if abat.size:
        tn, an = tissue_norm[pair_att], arterial_norm[pair_abat]
        cross = np.einsum("kv,kv->k", tissue[pair_att], arterial[pair_abat])
        det = tn * an - cross * cross
        pairs[0] = cross
        pairs[1] = np.divide(1.0, det, out=np.zeros_like(det), where=det > 1e-12 * tn * an)
    amp_max = np.array([upper[names.index("cbf")], upper[names.index("abv")] if "abv" in names else np.inf])
    return TimeGrid(
        att=att,
        tissue=np.ascontiguousarray(tissue),
        tissue_by_volume=np.ascontiguousarray(tissue.T),
        abat=abat,
        arterial=np.ascontiguousarray(arterial),
        norms=norms,
        pair_abat=pair_abat,
        pair_att=pair_att,
        pair_alt=pair_alt,
        pairs=pairs,
        amp_max=amp_max,
    )


@serial
def _orthant_amplitudes(yy, ty, tn, inv_tn, ay, an, inv_an, tx, inv_det, two):
    """Non-negative least-squares amplitudes (c, a) and residual for one grid pair.

    yy = y·y, ty = T·y, tn = T·T, ay = A·y, an = A·A, tx = T·A, with the precomputed
    inv_tn = 1/tn, inv_an = 1/an and inv_det = 1/(tn an - tx²) (each 0 where undefined);
    ``two`` False for 1C. The joint solve comes first; single bases only when it is negative.
    """
    if two and inv_det > 0.0:
        c = (an * ty - tx * ay) * inv_det
        a = (tn * ay - tx * ty) * inv_det
        if c >= 0.0 and a >= 0.0:
            return c, a, yy - c * ty - a * ay
    c_only = ty * inv_tn if ty > 0.0 else 0.0
    rss_c = yy - c_only * ty
    if not two:
        return c_only, 0.0, rss_c
    a_only = ay * inv_an if ay > 0.0 else 0.0
    rss_a = yy - a_only * ay
    if rss_c <= rss_a:
        return c_only, 0.0, rss_c
    return 0.0, a_only, rss_a


@serial
def _residual(yy, ty, tn, ay, an, tx, c, a):
    """|y − c T − a A|² from the projections (see :func:`_orthant_amplitudes`)."""
    return yy - 2.0 * (c * ty + a * ay) + c * c * tn + a * a * an + 2.0 * c * a * tx


@serial
def _boxed_amplitudes(yy, ty, tn, inv_tn, ay, an, inv_an, tx, inv_det, two, c_max, a_max):
    """Least-squares amplitudes (c, a) within 0 <= c <= c_max, 0 <= a <= a_max and residual for
    one grid pair (arguments as :func:`_orthant_amplitudes`). The non-negative optimum when it
    lies inside the box; else the best of the box's edges, each solved in closed form (the
    problem is convex, so that is the box optimum)."""
    c, a, rss = _orthant_amplitudes(yy, ty, tn, inv_tn, ay, an, inv_an, tx, inv_det, two)
    if c <= c_max and a <= a_max:
        return c, a, rss
    best_c = min(max(ty * inv_tn, 0.0), c_max)
    best_a = 0.0
    best = _residual(yy, ty, tn, ay, an, tx, best_c, best_a)
    if not two:
        return best_c, best_a, best
    for edge in range(3):
        if edge == 0:  # c = 0
            c = 0.0
            a = min(max(ay * inv_an, 0.0), a_max)
        elif edge == 1:  # c = c_max
            c = c_max
            a = min(max((ay - c_max * tx) * inv_an, 0.0), a_max)
        else:  # a = a_max
            if not math.isfinite(a_max):
                continue
            a = a_max
            c = min(max((ty - a_max * tx) * inv_tn, 0.0), c_max)
        rss = _residual(yy, ty, tn, ay, an, tx, c, a)
        if rss < best:
            best_c, best_a, best = c, a, rss
    return best_c, best_a, best


@serial
def _pair_orthant(k, yy, ty, ay, norms, pair_abat, pair_att, pairs, two, amp_max):
    """Non-negative amplitudes and residual at grid pair ``k`` from the projections ty, ay (see TimeGrid)."""
    i = pair_att[k]
    if two:
        j = pair_abat[k]
        return _orthant_amplitudes(yy, ty[i], norms[0, i], norms[1, i], ay[j], norms[2, j], norms[3, j], pairs[0, k],
                                   pairs[1, k], True)
    return _orthant_amplitudes(yy, ty[i], norms[0, i], norms[1, i], 0.0, 0.0, 0.0, 0.0, 0.0, False)


@serial
def _pair_boxed(k, yy, ty, ay, norms, pair_abat, pair_att, pairs, two, amp_max):
    """Amplitudes within (0, amp_max) and residual at grid pair ``k`` (see :func:`_pair_orthant`)."""
    i = pair_att[k]
    if two:
        j = pair_abat[k]
        return _boxed_amplitudes(yy, ty[i], norms[0, i], norms[1, i], ay[j], norms[2, j], norms[3, j], pairs[0, k],
                                 pairs[1, k], True, amp_max[0], amp_max[1])
    return _boxed_amplitudes(yy, ty[i], norms[0, i], norms[1, i], 0.0, 0.0, 0.0, 0.0, 0.0, False, amp_max[0],
                             amp_max[1])


@serial
def _best_run_1c(rss, n_att, tie):
    """(first, last) of the run of grid points within ``tie`` of the lowest ``rss``, around its
    first occurrence."""
    k = 0
    for i in range(1, n_att):
        if rss[i] < rss[k]:
            k = i
    first = k
    while first > 0 and rss[first - 1] <= rss[k] + tie:
        first -= 1
    last = k
    while last + 1 < n_att and rss[last + 1] <= rss[k] + tie:
        last += 1
    return first, last


@serial
def _best_run_pairs(boxed, yy, ty, ay, norms, pair_abat, pair_att, pairs, amp_max, tie):
    """(first, last) of the first run of consecutive pairs within ``tie`` of the lowest residual,
    with amplitudes from :func:`_pair_boxed` if ``boxed``, else :func:`_pair_orthant`."""
    best = np.inf
    first = 0
    last = 0
    for k in range(pair_att.shape[0]):
        if boxed:
            c, a, rss = _pair_boxed(k, yy, ty, ay, norms, pair_abat, pair_att, pairs, True, amp_max)
        else:
            c, a, rss = _pair_orthant(k, yy, ty, ay, norms, pair_abat, pair_att, pairs, True, amp_max)
        if rss < best - tie:
            best = rss
            first = k
            last = k
        elif rss <= best + tie and last == k - 1:
            last = k
            best = min(best, rss)
    return first, last


@serial
def grid_search_voxel(y, tissue_by_volume, arterial, norms, pair_abat, pair_att, pair_alt, pairs, amp_max, ty, ay):
    """Best grid pair for signal ``y``: returns (pair index, alternative pair, c, a, rss), with the
    amplitudes within their bounds ``amp_max`` (c, a), so the choice is a bounded least-squares one.

    ``ty`` and ``ay`` are scratch arrays of lengths n_att and max(n_att, n_abat). Ties (within
    TIE_TOLERANCE |y|²) over consecutive pairs (flat directions) resolve to the middle of
    the run; the alternative is then the first pair past the run (else -1), for a second
    local start. The search runs on non-negative amplitudes first (fast); only when an amplitude
    of the chosen run exceeds its bound is it repeated with bounded ones. That gives the bounded
    search's answer: bounding raises no residual of the run and lowers none elsewhere.
    """
    n_vol = y.shape[0]
    two = arterial.shape[0] > 0
    yy = 0.0
    for v in range(n_vol):
        yy += y[v] * y[v]
    # residuals within rounding of each other (relative to the signal energy) are ties
    tie = TIE_TOLERANCE * yy
    # tissue projections over the att grid volume by volume: independent sums, vectorised
    n_att = tissue_by_volume.shape[1]
    for i in range(n_att):
        ty[i] = 0.0
    for v in range(n_vol):
        yv = y[v]
        for i in range(n_att):
            ty[i] += tissue_by_volume[v, i] * yv
    for j in range(arterial.shape[0]):
        s = 0.0
        for v in range(n_vol):
            s += arterial[j, v] * y[v]
        ay[j] = s
    c_max = amp_max[0]
    if not two:
        # one basis (pair k = att k): every residual in a branch-free loop, then the minimum
        # and the run of ties around it (scratch ``ay`` holds the residuals)
        for k in range(n_att):
            ay[k] = yy - max(ty[k], 0.0) * norms[1, k] * ty[k]
        first, last = _best_run_1c(ay, n_att, tie)
        exceeded = False
        for k in range(first, last + 1):
            exceeded = exceeded or max(ty[k], 0.0) * norms[1, k] > c_max
        if exceeded:
            for k in range(n_att):
                c = max(ty[k], 0.0) * norms[1, k]
                ay[k] = yy - c * ty[k] if c <= c_max else yy - c_max * (2.0 * ty[k] - c_max * norms[0, k])
            first, last = _best_run_1c(ay, n_att, tie)
        k = (first + last) // 2
        alt = last + 1 if last > first and last + 1 < n_att else pair_alt[k]
        c, a, rss = _pair_boxed(k, yy, ty, ay, norms, pair_abat, pair_att, pairs, False, amp_max)
        return k, alt, c, a, max(rss, 0.0)
    first, last = _best_run_pairs(False, yy, ty, ay, norms, pair_abat, pair_att, pairs, amp_max, tie)
    exceeded = False
    for k in range(first, last + 1):
        c, a, _ = _pair_orthant(k, yy, ty, ay, norms, pair_abat, pair_att, pairs, True, amp_max)
        exceeded = exceeded or c > c_max or a > amp_max[1]
    if exceeded:
        first, last = _best_run_pairs(True, yy, ty, ay, norms, pair_abat, pair_att, pairs, amp_max, tie)
    k = (first + last) // 2
    # the first pair past a flat run, on the same abat: a start from which LM can leave it
    alt = last + 1 if last > first and last + 1 < pair_att.shape[0] and pair_abat[last + 1] == pair_abat[last] else -1
    if alt < 0:
        alt = pair_alt[k]
    c, a, rss = _pair_boxed(k, yy, ty, ay, norms, pair_abat, pair_att, pairs, True, amp_max)
    return k, alt, c, a, max(rss, 0.0)


@serial
def is_invalid(y):
    """True when ``y`` has a NaN or Inf, or is all zeros."""
    nonzero = False
    for v in range(y.shape[0]):
        if not math.isfinite(y[v]):
            return True
        if y[v] != 0.0:
            nonzero = True
    return not nonzero


@parallel
def lookup_batch(signals, tissue_by_volume, arterial, norms, pair_abat, pair_att, pair_alt, pairs, amp_max, n_chunks,
                 best_pair, alt_pair, amp, rss, invalid):
    """Grid search over voxels (chunks of voxels per thread): best and alternative pair, amplitudes (c, a), rss."""
    n = signals.shape[0]
    for chunk in prange(n_chunks):
        ty = np.empty(tissue_by_volume.shape[1])
        ay = np.empty(max(tissue_by_volume.shape[1], arterial.shape[0]))
        for i in range(chunk * n // n_chunks, (chunk + 1) * n // n_chunks):
            if is_invalid(signals[i]):
                invalid[i] = True
                best_pair[i] = -1
                alt_pair[i] = -1
                continue
            invalid[i] = False
            k, alt, c, a, r = grid_search_voxel(signals[i], tissue_by_volume, arterial, norms, pair_abat, pair_att,
                                                pair_alt, pairs, amp_max, ty, ay)
            best_pair[i] = k
            alt_pair[i] = alt
            amp[i, 0] = c
            amp[i, 1] = a
            rss[i] = r


def n_chunks_for(n: int) -> int:
    """Number of work chunks for ``n`` voxels: a few per thread, so slow voxels even out."""
    return max(1, min(n, 8 * get_num_threads()))


def grid_search(grid: TimeGrid, signals: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run the grid search over ``signals`` (n, n_volumes).

    Returns the best pair index (-1 if invalid), the alternative pair past a flat run
    (-1 if none), amplitudes (n, 2) at the best pair, the grid rss and the invalid mask.
    """
    n = signals.shape[0]
    best_pair = np.empty(n, dtype=np.int64)
    alt_pair = np.empty(n, dtype=np.int64)
    amp = np.zeros((n, 2))
    rss = np.full(n, np.nan)
    invalid = np.empty(n, dtype=np.bool_)
    lookup_batch(signals, grid.tissue_by_volume, grid.arterial, grid.norms, grid.pair_abat, grid.pair_att, grid.pair_alt,
                 grid.pairs, grid.amp_max, n_chunks_for(n), best_pair, alt_pair, amp, rss, invalid)
    return best_pair, alt_pair, amp, rss, invalid


def grid_params(model: KineticModel, grid: TimeGrid, best_pair: np.ndarray, amp: np.ndarray) -> np.ndarray:
    """Parameters (n, n_params) in API units from grid-search results (NaN where best_pair < 0)."""
    n = best_pair.size
    params = np.full((n, model.n_params), np.nan)
    ok = best_pair >= 0
    k = best_pair[ok]
    names = model.param_names
    params[ok, names.index("cbf")] = amp[ok, 0]
    params[ok, names.index("att")] = grid.att[grid.pair_att[k]]
    if "abat" in names:
        params[ok, names.index("abv")] = amp[ok, 1]
        params[ok, names.index("abat")] = grid.abat[grid.pair_abat[k]]
    return params


class LookupTableEstimator(Estimator):
    """Lookup table: dense grid over the arrival times, closed-form amplitudes.

    Parameters
    ----------
    model : the kinetic model (with its protocol).
    resolution_s : grid step of the arrival times (s), default 0.05 s. On noise-free data
        in the identifiable region the time error is within one step (finer grid, smaller
        error); amplitudes follow from the chosen times.
    """

    name = "lut"
    title = "a lookup-table grid search (lut)"

    def __init__(self, model: KineticModel, *, resolution_s: float = 0.05) -> None:
        super().__init__(model)
        self.resolution_s = resolution_s

    def options(self) -> dict[str, Any]:
        return {"resolution_s": self.resolution_s}

    def check_options(self) -> None:
        check_grid_step("resolution_s", self.resolution_s)

    def _fit(self, signals: np.ndarray | None, progress: bool) -> None:
        """Build the grid (no training)."""
        super()._fit(signals, progress)
        self.grid_ = build_time_grid(self.model, float(self.resolution_s))

    def _predict(self, y: np.ndarray, slice_offsets: None) -> Estimate:
        """Best grid point per voxel; amplitudes above their upper bound are clipped (AT_BOUND)."""
        best_pair, _, amp, rss, invalid = grid_search(self.grid_, y)
        params = grid_params(self.model, self.grid_, best_pair, amp)
        lower, upper = self.model.bounds
        status = np.full(y.shape[0], Status.CONVERGED, dtype=np.int8)
        with np.errstate(invalid="ignore"):
            at_bound = ((params <= lower) | (params >= upper)).any(axis=1)
        np.clip(params, lower, upper, out=params)
        status[at_bound] = Status.AT_BOUND
        status[invalid] = Status.INVALID_INPUT
        # the residual of the reported parameters, free of the grid's cancellation (yy - c T·y)
        valid = ~invalid
        rss[valid] = np.sum((y[valid] - self.model.signal(params[valid])) ** 2, axis=1)
        return Estimate(params, status, None, rss, self.model.param_names, self.name)
