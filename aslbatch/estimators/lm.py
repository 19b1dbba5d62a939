"""Levenberg–Marquardt in numba: one algorithm, one compiled kernel per kinetic model.

Algorithm (per voxel):
- start: the best point of a coarse lookup-table grid over the arrival times with
  closed-form amplitudes within their bounds (:mod:`aslbatch.estimators.lookup`), so the start is
  global, not one fixed guess. Where the grid's best points form a flat run (a direction
  the data do not inform), a second start just past the run lets LM leave it; a fit whose
  tissue arrival ends on a kink of the model (att at a PLD or readout time, where the
  Jacobian is one-sided; a fit stops as soon as a step is rejected there) is re-fitted with
  att held on the kink, then on each smooth side whose one-sided gradient offers descent,
  with att bounded by the kink; repeated if that ends on another kink (at most
  KINK_ROUNDS times). The lowest cost wins;
- step: solve (JᵀJ + μ D) h = Jᵀr (closed form for 2 parameters, an unrolled Cholesky for
  4), D = running max of diag(JᵀJ) (Moré's scaling, so cbf and abv of very different
  magnitudes are treated alike); μ updated with Nielsen's rule and floored at 1e-12 so it
  never underflows;
- bounds by an active set and truncated steps: a parameter on a bound whose descent
  direction points outward is held for the step; otherwise the step is followed only up
  to the first bound it meets, landing exactly on it. A trial is accepted when it lowers
  the cost;
- stop: relative step below ``xtol`` (|Δp_i| <= xtol (|p_i| + xtol) for every parameter),
  relative cost decrease below ``ftol`` (achieved, or predicted by the linearised model for
  the next step, which then is not evaluated), or an exact fit;
- standard errors: sqrt(diag((JᵀJ)⁻¹) · RSS / (n_volumes − n_estimated)) at the solution,
  NaN for a parameter the data do not inform (zero Jacobian column) or that is held fixed.
  Where each voxel's noise SD σ is known (``predict(noise_sd=...)``; ``predict_image`` takes it
  from ``signal_se``, the repeats' spread), sqrt(diag((JᵀJ)⁻¹)) · σ instead
  (:func:`known_noise_stderr`): RSS / (n − p) has 3 degrees of freedom for 1C's 5 volumes, and
  measured against the truth (benchmarks/study_calibration.py) the known σ raised the 95 %
  coverage from 58-85 % to 74-92 %; the rest of the miss is the linearisation at low SNR.

Two-compartment with hard arterial edges: the signal depends on abat only through which
non-crushed volumes fall inside [abat, abat + τ) and through abv·e^(−abat/T1b), so abat
is only bracketed between readout times and abv is identified only together with abat.
LM then holds abat at the midpoint of the bracket chosen by the grid (standard error NaN)
and fits cbf, abv and att. With ``arterial_edge_s`` > 0 all four parameters are fitted.

How a model serves LM
---------------------
The algorithm above is written once (:func:`_fit`, :func:`_fit_chunk`) on LM's internal
parameters q, a tuple held in registers. Its model-specific part comes from the model's
module (``aslbatch/models/<model>.py``) as six ``@njit`` functions, the model's scalar physics:

- ``lm_normal_equations(q, y, vol, const) -> (cost, A, g)``: |y − s|², the upper triangle
  of A = JᵀJ (row by row) and g = Jᵀ(y − s) with respect to q, in one pass over the volumes
  (fused: no signal or Jacobian arrays). Write the loop in this function itself: every
  further call that passes the arrays on costs atomic reference counts (~25 % of 1C's time);
- ``lm_start(cbf, abv, abat, att, lower, upper) -> q``: the start from a grid point
  (amplitudes cbf, abv; times abat, att in s), clipped into the model bounds;
- ``lm_att_offset(q) -> s``: att = q[j_att] + offset, where j_att is att's index in the
  model's parameters (0 when q holds att itself; abat when q holds the gap att − abat);
- ``lm_project(q, att_max) -> q``: feasibility beyond the bounds after a step (att <= att_max);
- ``lm_params(q) -> p`` and ``lm_stderr(cov, free) -> se``: model parameters and their
  standard errors from q and its covariance (a nested tuple, NaN where not estimable).

q has the model's parameter order; a model with ``ordered_times`` (abat before att) holds
the gap att − abat at att's index, so the order is the bound gap >= 0. Supported sizes of q
are 2 and 4 (the dense solves of :func:`_damped_solve`). A model is registered in
``_LM_KERNELS`` below with a compiled entry naming its module's six functions (an entry per
model keeps ``cache=True`` working: functions passed as arguments from Python would
recompile in every process). The PASL model (cbf, att) has its own ``lm_normal_equations``;
its other five functions are those of the one-compartment model.
The start grid (:func:`aslbatch.estimators.lookup.build_time_grid`) reads the model: its tissue
basis comes from ``model.tissue_model()``, and an arterial basis is added for models with abat.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
from numba import prange, types
from numba.extending import intrinsic, overload

from .._numba import parallel, serial
from ..models import KineticModel
from ..models import one_compartment as one_c
from ..models import pasl
from ..models import two_compartment as two_c
from ..models.base import PLD, TIME
from .base import Estimate, Estimator, Status, check_signals, flag_undetermined, noise_sd_from_signal_se
from .lookup import build_time_grid, check_grid_step, grid_search_voxel, is_invalid, n_chunks_for

MU_START = 1e-3
MU_FLOOR = 1e-12
MU_CEILING = 1e20
#: att within this many seconds of a kink counts as on it (LM stalls up to ~1e-6 s away)
KINK_S = 1e-4
#: the fits of each side of a kink start this far (s) inside their side
KINK_SIDE_S = 0.01
#: one-sided gradients at a kink are taken this far (s) from it
KINK_PROBE_S = 1e-6
#: a side fit may end on another kink: kinks are handled this many times per voxel at most
KINK_ROUNDS = 3
# status codes as plain ints, frozen into the compiled kernels
_CONVERGED = int(Status.CONVERGED)
_MAX_ITERATIONS = int(Status.MAX_ITERATIONS)
_AT_BOUND = int(Status.AT_BOUND)
_INVALID_INPUT = int(Status.INVALID_INPUT)


# --- tuples as small vectors (kept in registers once the loops over them are unrolled) ---------
@intrinsic
def _set(typingctx, tup, index, value):
    """A copy of the homogeneous tuple ``tup`` with item ``index`` replaced by ``value``."""
    if not isinstance(tup, types.UniTuple) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        # a select per item rather than a store through memory: stays in registers
        tup_v, index_v, value_v = args
        value_v = context.cast(builder, value_v, signature.args[2], tup.dtype)
        index_v = context.cast(builder, index_v, signature.args[1], types.intp)
        out = tup_v
        for k in range(len(tup)):
            hit = builder.icmp_signed("==", index_v, context.get_constant(types.intp, k))
            out = builder.insert_value(out, builder.select(hit, value_v, builder.extract_value(tup_v, k)), k)
        return out

    return tup(tup, index, value), codegen


@intrinsic
def _full(typingctx, like, value):
    """A homogeneous tuple as long as ``like`` with every item ``value``."""
    if not isinstance(like, types.BaseTuple):
        return None
    item_type = types.unliteral(value)
    result = types.UniTuple(item_type, len(like))

    def codegen(context, builder, signature, args):
        item = context.cast(builder, args[1], signature.args[1], item_type)
        return context.make_tuple(builder, result, [item] * len(like))

    return result(like, value), codegen


@serial
def _from_array(like, values):
    """The first len(like) items of the array ``values`` as a tuple of like's type."""
    out = like
    for i in range(len(like)):
        out = _set(out, i, values[i])
    return out


@serial
def _tri(i, j, n):
    """Index of entry (i, j) of a symmetric n x n matrix in its upper triangle stored row by row."""
    if i > j:
        i, j = j, i
    return i * n - i * (i - 1) // 2 + j - i


# --- dense algebra for 2 and 4 parameters ------------------------------------------------------
@serial
def _solve_2x2(a00, a01, a11, g0, g1, mu, d0, d1, held0, held1):
    """(solved, h0, h1): (A + μ D) h = g over the parameters not held (held ones get h = 0)."""
    if held0 and held1:
        return True, 0.0, 0.0
    if held0:
        m11 = a11 + mu * d1
        if not m11 > 0.0:
            return False, 0.0, 0.0
        return True, 0.0, g1 / m11
    m00 = a00 + mu * d0
    if held1:
        if not m00 > 0.0:
            return False, 0.0, 0.0
        return True, g0 / m00, 0.0
    m11 = a11 + mu * d1
    det = m00 * m11 - a01 * a01
    if not (m00 > 0.0 and det > 0.0):
        return False, 0.0, 0.0
    return True, (m11 * g0 - a01 * g1) / det, (m00 * g1 - a01 * g0) / det


@serial
def _cholesky_4x4(m00, m10, m11, m20, m21, m22, m30, m31, m32, m33):
    """Cholesky factor L (m = L Lᵀ) of a symmetric 4 x 4 matrix given by its lower triangle.

    Returns (positive definite, l00, l10, l11, l20, l21, l22, l30, l31, l32, l33); L is
    undefined when m is not positive definite.
    """
    s = m00
    if not s > 0.0:
        return False, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    l00 = math.sqrt(s)
    l10 = m10 / l00
    l20 = m20 / l00
    l30 = m30 / l00
    s = m11 - l10 * l10
    if not s > 0.0:
        return False, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    l11 = math.sqrt(s)
    l21 = (m21 - l20 * l10) / l11
    l31 = (m31 - l30 * l10) / l11
    s = m22 - l20 * l20 - l21 * l21
    if not s > 0.0:
        return False, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    l22 = math.sqrt(s)
    l32 = (m32 - l30 * l20 - l31 * l21) / l22
    s = m33 - l30 * l30 - l31 * l31 - l32 * l32
    if not s > 0.0:
        return False, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    return True, l00, l10, l11, l20, l21, l22, l30, l31, l32, math.sqrt(s)


@serial
def _cholesky_solve_4(l00, l10, l11, l20, l21, l22, l30, l31, l32, l33, b0, b1, b2, b3):
    """x with L Lᵀ x = b for the factor of :func:`_cholesky_4x4`: (x0, x1, x2, x3)."""
    x0 = b0 / l00
    x1 = (b1 - l10 * x0) / l11
    x2 = (b2 - l20 * x0 - l21 * x1) / l22
    x3 = (b3 - l30 * x0 - l31 * x1 - l32 * x2) / l33
    x3 = x3 / l33
    x2 = (x2 - l32 * x3) / l22
    x1 = (x1 - l21 * x2 - l31 * x3) / l11
    x0 = (x0 - l10 * x1 - l20 * x2 - l30 * x3) / l00
    return x0, x1, x2, x3


@serial
def _solve_4x4(a00, a01, a02, a03, a11, a12, a13, a22, a23, a33, g0, g1, g2, g3, mu, d0, d1, d2, d3, held0, held1,
               held2, held3):
    """(solved, h0, h1, h2, h3): (A + μ D) h = g over the parameters not held (held ones get h = 0).

    A held parameter's row and column are those of the identity, with a zero right-hand side.
    """
    ok, l00, l10, l11, l20, l21, l22, l30, l31, l32, l33 = _cholesky_4x4(
        1.0 if held0 else a00 + mu * d0,
        0.0 if (held1 or held0) else a01,
        1.0 if held1 else a11 + mu * d1,
        0.0 if (held2 or held0) else a02,
        0.0 if (held2 or held1) else a12,
        1.0 if held2 else a22 + mu * d2,
        0.0 if (held3 or held0) else a03,
        0.0 if (held3 or held1) else a13,
        0.0 if (held3 or held2) else a23,
        1.0 if held3 else a33 + mu * d3)
    if not ok:
        return False, 0.0, 0.0, 0.0, 0.0
    h0, h1, h2, h3 = _cholesky_solve_4(l00, l10, l11, l20, l21, l22, l30, l31, l32, l33, 0.0 if held0 else g0,
                                       0.0 if held1 else g1, 0.0 if held2 else g2, 0.0 if held3 else g3)
    return True, h0, h1, h2, h3


@serial
def _covariance_2x2(a00, a01, a11, used0, used1, cost, n_vol):
    """cov(q) = A⁻¹ · cost / dof over the used parameters, NaN elsewhere: ((c00, c01), (c01, c11))."""
    c00 = np.nan
    c01 = np.nan
    c11 = np.nan
    dof = n_vol - (1 if used0 else 0) - (1 if used1 else 0)
    if dof > 0:
        s2 = cost / dof
        if used0 and used1:
            det = a00 * a11 - a01 * a01
            if det > 0.0:
                c00 = a11 / det * s2
                c11 = a00 / det * s2
                c01 = -a01 / det * s2
        elif used0:
            c00 = s2 / a00
        elif used1:
            c11 = s2 / a11
    return (c00, c01), (c01, c11)


@serial
def _covariance_4x4(a00, a01, a02, a03, a11, a12, a13, a22, a23, a33, used0, used1, used2, used3, cost, n_vol):
    """cov(q) = A⁻¹ · cost / dof over the used parameters, NaN elsewhere, as a nested 4 x 4 tuple."""
    nan4 = (np.nan, np.nan, np.nan, np.nan)
    dof = n_vol - (1 if used0 else 0) - (1 if used1 else 0) - (1 if used2 else 0) - (1 if used3 else 0)
    if dof <= 0:
        return nan4, nan4, nan4, nan4
    s2 = cost / dof
    ok, l00, l10, l11, l20, l21, l22, l30, l31, l32, l33 = _cholesky_4x4(
        a00 if used0 else 1.0,
        a01 if (used1 and used0) else 0.0,
        a11 if used1 else 1.0,
        a02 if (used2 and used0) else 0.0,
        a12 if (used2 and used1) else 0.0,
        a22 if used2 else 1.0,
        a03 if (used3 and used0) else 0.0,
        a13 if (used3 and used1) else 0.0,
        a23 if (used3 and used2) else 0.0,
        a33 if used3 else 1.0)
    if not ok:
        return nan4, nan4, nan4, nan4
    nan = np.nan
    x0 = _cholesky_solve_4(l00, l10, l11, l20, l21, l22, l30, l31, l32, l33, 1.0, 0.0, 0.0, 0.0) if used0 else nan4
    x1 = _cholesky_solve_4(l00, l10, l11, l20, l21, l22, l30, l31, l32, l33, 0.0, 1.0, 0.0, 0.0) if used1 else nan4
    x2 = _cholesky_solve_4(l00, l10, l11, l20, l21, l22, l30, l31, l32, l33, 0.0, 0.0, 1.0, 0.0) if used2 else nan4
    x3 = _cholesky_solve_4(l00, l10, l11, l20, l21, l22, l30, l31, l32, l33, 0.0, 0.0, 0.0, 1.0) if used3 else nan4
    # cov[i][j] = (A⁻¹ e_j)[i] s²
    return ((x0[0] * s2 if used0 else nan, x1[0] * s2 if used0 else nan, x2[0] * s2 if used0 else nan,
             x3[0] * s2 if used0 else nan),
            (x0[1] * s2 if used1 else nan, x1[1] * s2 if used1 else nan, x2[1] * s2 if used1 else nan,
             x3[1] * s2 if used1 else nan),
            (x0[2] * s2 if used2 else nan, x1[2] * s2 if used2 else nan, x2[2] * s2 if used2 else nan,
             x3[2] * s2 if used2 else nan),
            (x0[3] * s2 if used3 else nan, x1[3] * s2 if used3 else nan, x2[3] * s2 if used3 else nan,
             x3[3] * s2 if used3 else nan))


def _damped_solve(a, g, mu, d, held):
    """(solved, h): (A + μ D) h = g over the parameters not held, A as :func:`_tri` stores it.
    Compiled code only; implemented per number of parameters by the overload below."""
    raise NotImplementedError


def _predicted_decrease(a, g, h):
    """|r|² − |r − J h|² = 2 hᵀg − hᵀA h, the cost decrease the linearised model predicts for h.
    Compiled code only."""
    raise NotImplementedError


def _covariance(a, free, cost, n_vol):
    """cov(q) over the free, informed parameters (NaN elsewhere) as a nested tuple. Compiled code only."""
    raise NotImplementedError


@overload(_damped_solve, jit_options={"error_model": "numpy"})
def _damped_solve_for(a, g, mu, d, held):
    if len(g) == 2:
        def solve_2(a, g, mu, d, held):
            ok, h0, h1 = _solve_2x2(a[0], a[1], a[2], g[0], g[1], mu, d[0], d[1], held[0], held[1])
            return ok, (h0, h1)
        return solve_2
    if len(g) == 4:
        def solve_4(a, g, mu, d, held):
            ok, h0, h1, h2, h3 = _solve_4x4(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], g[0], g[1],
                                            g[2], g[3], mu, d[0], d[1], d[2], d[3], held[0], held[1], held[2], held[3])
            return ok, (h0, h1, h2, h3)
        return solve_4
    return None


@overload(_predicted_decrease, jit_options={"error_model": "numpy"})
def _predicted_decrease_for(a, g, h):
    if len(g) == 2:
        def pred_2(a, g, h):
            return 2.0 * (h[0] * g[0] + h[1] * g[1]) - (h[0] * (a[0] * h[0] + a[1] * h[1])
                                                        + h[1] * (a[1] * h[0] + a[2] * h[1]))
        return pred_2
    if len(g) == 4:
        def pred_4(a, g, h):
            ah0 = a[0] * h[0] + a[1] * h[1] + a[2] * h[2] + a[3] * h[3]
            ah1 = a[1] * h[0] + a[4] * h[1] + a[5] * h[2] + a[6] * h[3]
            ah2 = a[2] * h[0] + a[5] * h[1] + a[7] * h[2] + a[8] * h[3]
            ah3 = a[3] * h[0] + a[6] * h[1] + a[8] * h[2] + a[9] * h[3]
            return (2.0 * h[0] * g[0] - h[0] * ah0) + (2.0 * h[1] * g[1] - h[1] * ah1) + (
                2.0 * h[2] * g[2] - h[2] * ah2) + (2.0 * h[3] * g[3] - h[3] * ah3)
        return pred_4
    return None


@overload(_covariance, jit_options={"error_model": "numpy"})
def _covariance_for(a, free, cost, n_vol):
    if len(free) == 2:
        def covariance_2(a, free, cost, n_vol):
            return _covariance_2x2(a[0], a[1], a[2], free[0] and a[0] > 0.0, free[1] and a[2] > 0.0, cost, n_vol)
        return covariance_2
    if len(free) == 4:
        def covariance_4(a, free, cost, n_vol):
            return _covariance_4x4(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9],
                                   free[0] and a[0] > 0.0, free[1] and a[4] > 0.0, free[2] and a[7] > 0.0,
                                   free[3] and a[9] > 0.0, cost, n_vol)
        return covariance_4
    return None


# --- the algorithm, written once -----------------------------------------------------------------
@serial
def _fraction_to_bound(x, h, lo, hi):
    """Largest step fraction in [0, 1] keeping x + frac h inside [lo, hi] (1.0 if h stays inside)."""
    if h == 0.0:
        return 1.0
    target = x + h
    if target < lo:
        return (lo - x) / h
    if target > hi:
        return (hi - x) / h
    return 1.0


@serial
def _on_bound(x, lo, hi):
    """True when x lies within 1e-9 of the range [lo, hi] from one of its ends."""
    span = 1e-9 * (hi - lo)
    return x <= lo + span or x >= hi - span


@serial
def kink_near(att, vol):
    """The kink of the model that the tissue arrival ``att`` (s) sits on, else NaN: a readout
    time t = τ + w (arrival) or a PLD w = t − τ (end of the bolus; PASL: TI and TI − τ_b),
    where the Jacobian is one-sided."""
    for v in range(vol.shape[0]):
        if abs(att - vol[v, TIME]) <= KINK_S:
            return vol[v, TIME]
        if abs(att - vol[v, PLD]) <= KINK_S:
            return vol[v, PLD]
    return np.nan


@serial
def _hold(a, g, free):
    """A (as :func:`_tri` stores it) and g with the rows and columns of parameters not free set to zero.

    Takes tuples only: the model's normal equations are called directly by the algorithm, as
    every array passed through a further call costs atomic reference counting.
    """
    n = len(g)
    for i in range(n):
        if not free[i]:
            g = _set(g, i, 0.0)
            for j in range(n):
                a = _set(a, _tri(i, j, n), 0.0)
    return a, g


@serial
def _fit(lm_normal_equations, lm_att_offset, lm_project, y, q, free, lower, upper, j_att, att_max, vol, const,
         max_iter, xtol, ftol):
    """Fit one voxel from the start ``q`` (LM's internal parameters, a tuple) within the bounds
    ``lower``/``upper`` (tuples); parameters not ``free`` stay at their start.

    Returns (q, status code, cost = RSS, number of model evaluations, A = JᵀJ at q).
    """
    n = len(q)
    cost, a, g = lm_normal_equations(q, y, vol, const)
    a, g = _hold(a, g, free)
    d = g
    for i in range(n):
        d = _set(d, i, a[_tri(i, i, n)])
    mu = MU_START
    nu = 2.0
    status = _MAX_ITERATIONS
    n_eval = 1
    for _ in range(max_iter):
        if cost == 0.0:
            status = _CONVERGED
            break
        # active set: a parameter on a bound whose descent direction points outward is held
        held = _full(q, False)
        for i in range(n):
            held = _set(held, i, not (free[i] and d[i] > 0.0) or (q[i] <= lower[i] and g[i] <= 0.0) or (
                q[i] >= upper[i] and g[i] >= 0.0))
        solved = False
        h = _full(q, 0.0)
        frac = 1.0
        blocking = -1
        for _attempt in range(n + 1):
            solved, h = _damped_solve(a, g, mu, d, held)
            if not solved:
                break
            # truncated step: follow h up to the first bound it meets, and land exactly on it
            frac = 1.0
            blocking = -1
            for i in range(n):
                f_i = _fraction_to_bound(q[i], h[i], lower[i], upper[i])
                if f_i < frac:
                    frac = f_i
                    blocking = i
            if frac > 0.0:
                break
            # the step leaves through a bound the parameter already sits on: hold it, solve again
            held = _set(held, blocking, True)
        if not solved:
            mu *= nu
            nu *= 2.0
            if mu > MU_CEILING:
                status = _CONVERGED
                break
            continue
        q_try = q
        for i in range(n):
            q_try = _set(q_try, i, q[i] + frac * h[i])
        if blocking >= 0:
            q_try = _set(q_try, blocking, lower[blocking] if h[blocking] < 0.0 else upper[blocking])
        q_try = lm_project(q_try, att_max)
        small = True
        for i in range(n):
            h = _set(h, i, q_try[i] - q[i])
            if abs(h[i]) > xtol * (abs(q[i]) + xtol):
                small = False
        if small:
            status = _CONVERGED
            break
        # predicted decrease of the linearised model for the (truncated) step h: if even that
        # is below ftol, the fit has converged without evaluating the step
        pred = _predicted_decrease(a, g, h)
        if 0.0 <= pred <= ftol * cost:
            status = _CONVERGED
            break
        cost_try, a_try, g_try = lm_normal_equations(q_try, y, vol, const)
        a_try, g_try = _hold(a_try, g_try, free)
        n_eval += 1
        if cost_try < cost:
            rho = (cost - cost_try) / pred if pred > 0.0 else 1.0
            done = cost - cost_try <= ftol * cost
            q = q_try
            cost = cost_try
            a = a_try
            g = g_try
            for i in range(n):
                if a[_tri(i, i, n)] > d[i]:
                    d = _set(d, i, a[_tri(i, i, n)])
            x = 2.0 * rho - 1.0
            mu *= max(1.0 / 3.0, 1.0 - x * x * x)
            if mu < MU_FLOOR:
                mu = MU_FLOOR
            nu = 2.0
            if done:
                status = _CONVERGED
                break
        else:
            # a rejected step with att on a kink: its one-sided Jacobian cannot see past the
            # kink, so stop; the caller's kink handling (att held, one-sided probes, side fits)
            # decides (not when that kink bounds this fit: a side fit cannot see past its own bound)
            offset = lm_att_offset(q)
            kink = kink_near(q[j_att] + offset, vol)
            if (not math.isnan(kink) and abs(kink - lower[j_att] - offset) > KINK_S
                    and abs(kink - upper[j_att] - offset) > KINK_S):
                status = _CONVERGED
                break
            mu *= nu
            nu *= 2.0
            if mu > MU_CEILING:
                status = _CONVERGED
                break
    if status == _CONVERGED:
        for i in range(n):
            if free[i] and _on_bound(q[i], lower[i], upper[i]):
                status = _AT_BOUND
    return q, status, cost, n_eval, a


@serial
def _fit_chunk(lm_normal_equations, lm_start, lm_att_offset, lm_project, lm_params, lm_stderr, chunk, n_chunks,
               signals, grid, starts, from_grid, bounds, j_att, att_max, vol, const, options, out):
    """Start and fit the voxels of work item ``chunk`` of ``n_chunks``, with second starts.

    ``grid`` is the start grid's arrays (tissue_by_volume, arterial, norms, pair_abat, pair_att,
    pair_alt, pairs, amp_max, att, abat); with ``from_grid`` False the starts are the rows of
    ``starts`` = (start, alt_start) instead, internal parameters, NaN rows for none.
    ``bounds`` = (model lower, model upper, internal lower, internal upper, free);
    ``options`` = (max_iter, xtol, ftol); ``out`` = (params, stderr, status, rss, n_eval).
    """
    tissue_by_volume, arterial, norms, pair_abat, pair_att, pair_alt, pairs, amp_max, att_grid, abat_grid = grid
    model_lower, model_upper, lower_arr, upper_arr, free_arr = bounds
    max_iter, xtol, ftol = options
    params, stderr, status, rss, n_eval = out
    like = lm_start(0.0, 0.0, 0.0, 0.0, model_lower, model_upper)
    # bounds as tuples: no array (and its reference count) passed per voxel
    model_lo = _from_array(lm_params(like), model_lower)
    model_hi = _from_array(lm_params(like), model_upper)
    lower = _from_array(like, lower_arr)
    upper = _from_array(like, upper_arr)
    free = _from_array(_full(like, True), free_arr)
    n = signals.shape[0]
    n_vol = signals.shape[1]
    ty = np.empty(tissue_by_volume.shape[1])
    ay = np.empty(max(tissue_by_volume.shape[1], arterial.shape[0]))
    for i in range(chunk * n // n_chunks, (chunk + 1) * n // n_chunks):
        y = signals[i]
        if is_invalid(y) or (not from_grid and math.isnan(starts[0][i, 0])):
            for j in range(params.shape[1]):
                params[i, j] = np.nan
                stderr[i, j] = np.nan
            status[i] = _INVALID_INPUT
            rss[i] = np.nan
            n_eval[i] = 0
            continue
        if from_grid:
            k, alt, c, a_amp, _ = grid_search_voxel(y, tissue_by_volume, arterial, norms, pair_abat, pair_att,
                                                    pair_alt, pairs, amp_max, ty, ay)
            q0 = lm_start(c, a_amp, abat_grid[pair_abat[k]] if pair_abat[k] >= 0 else 0.0, att_grid[pair_att[k]],
                          model_lo, model_hi)
            has_alt = alt >= 0
            q_alt = q0
            if has_alt:
                # the alternative pair's times with the best pair's amplitudes
                q_alt = lm_start(c, a_amp, abat_grid[pair_abat[alt]] if pair_abat[alt] >= 0 else 0.0,
                                 att_grid[pair_att[alt]], model_lo, model_hi)
        else:
            q0 = _from_array(like, starts[0][i])
            has_alt = not math.isnan(starts[1][i, 0])
            q_alt = _from_array(like, starts[1][i]) if has_alt else q0
        q, code, cost, evals, a = _fit(lm_normal_equations, lm_att_offset, lm_project, y, q0, free, lower, upper,
                                       j_att, att_max, vol, const, max_iter, xtol, ftol)
        # second starts: past a flat run of the grid; and where the fit ended on a kink, the
        # other parameters re-fitted with att held on it, then each side that offers descent
        kink = np.nan
        for attempt in range(1 + 3 * KINK_ROUNDS):
            stage = 0 if attempt == 0 else (attempt - 1) % 3 + 1  # 1 att held, 2 left side, 3 right side
            side_lower = lower
            side_upper = upper
            q2 = q
            if attempt == 0:
                if not has_alt:
                    continue
                q2 = q_alt
            else:
                offset = lm_att_offset(q)
                if stage == 1:
                    new_kink = kink_near(q[j_att] + offset, vol)
                    if math.isnan(new_kink) or new_kink == kink:
                        break
                    kink = new_kink
                # the kink in internal units (q[j_att] + offset = att)
                edge = min(max(kink - offset, lower[j_att]), upper[j_att])
                if stage == 1:
                    side_lower = _set(side_lower, j_att, edge)
                    side_upper = _set(side_upper, j_att, edge)
                    q2 = _set(q2, j_att, edge)
                else:
                    # one-sided att gradient (g = Jᵀr: positive means cost falls as att grows)
                    probe = edge - KINK_PROBE_S if stage == 2 else edge + KINK_PROBE_S
                    g_att = lm_normal_equations(_set(q, j_att, probe), y, vol, const)[2][j_att]
                    evals += 1
                    if (stage == 2 and not g_att < 0.0) or (stage == 3 and not g_att > 0.0):
                        continue
                    if stage == 2:
                        side_upper = _set(side_upper, j_att, edge)
                        q2 = _set(q2, j_att, max(edge - KINK_SIDE_S, lower[j_att]))
                    else:
                        side_lower = _set(side_lower, j_att, edge)
                        q2 = _set(q2, j_att, min(edge + KINK_SIDE_S, upper[j_att]))
            q2, code2, cost2, evals2, a2 = _fit(lm_normal_equations, lm_att_offset, lm_project, y, q2, free,
                                                side_lower, side_upper, j_att, att_max, vol, const, max_iter, xtol,
                                                ftol)
            evals += evals2
            if cost2 < cost * (1.0 - 1e-12):
                # on a side bound that is not a bound of the model, the fit is still converged
                if code2 == _AT_BOUND and attempt > 0:
                    code2 = _CONVERGED
                    for j in range(len(q2)):
                        if free[j] and _on_bound(q2[j], lower[j], upper[j]):
                            code2 = _AT_BOUND
                q, code, cost, a = q2, code2, cost2, a2
        p = lm_params(q)
        se = lm_stderr(_covariance(a, free, cost, n_vol), free)
        for j in range(len(p)):
            params[i, j] = p[j]
            stderr[i, j] = se[j]
        status[i] = code
        rss[i] = cost
        n_eval[i] = evals


# --- one compiled kernel per model (cache=True needs the model's functions named, not passed) ---
@parallel
def _lm_one_compartment(signals, grid, starts, from_grid, bounds, j_att, att_max, vol, const, options, n_chunks, out):
    """LM over voxels for the 1C model: a chunk of voxels per work item (see :func:`_fit_chunk`)."""
    for chunk in prange(n_chunks):
        _fit_chunk(one_c.lm_normal_equations, one_c.lm_start, one_c.lm_att_offset, one_c.lm_project,
                   one_c.lm_params, one_c.lm_stderr, chunk, n_chunks, signals, grid, starts, from_grid, bounds,
                   j_att, att_max, vol, const, options, out)


@parallel
def _lm_two_compartment(signals, grid, starts, from_grid, bounds, j_att, att_max, vol, const, options, n_chunks, out):
    """LM over voxels for the 2C model: a chunk of voxels per work item (see :func:`_fit_chunk`)."""
    for chunk in prange(n_chunks):
        _fit_chunk(two_c.lm_normal_equations, two_c.lm_start, two_c.lm_att_offset, two_c.lm_project,
                   two_c.lm_params, two_c.lm_stderr, chunk, n_chunks, signals, grid, starts, from_grid, bounds,
                   j_att, att_max, vol, const, options, out)


@parallel
def _lm_pasl(signals, grid, starts, from_grid, bounds, j_att, att_max, vol, const, options, n_chunks, out):
    """LM over voxels for the PASL model: a chunk of voxels per work item (see :func:`_fit_chunk`)."""
    for chunk in prange(n_chunks):
        _fit_chunk(pasl.lm_normal_equations, pasl.lm_start, pasl.lm_att_offset, pasl.lm_project, pasl.lm_params,
                   pasl.lm_stderr, chunk, n_chunks, signals, grid, starts, from_grid, bounds, j_att, att_max, vol,
                   const, options, out)


#: model name -> its compiled LM kernel
_LM_KERNELS = {"1c": _lm_one_compartment, "2c": _lm_two_compartment, "pasl": _lm_pasl}


def known_noise_stderr(stderr: np.ndarray, rss: np.ndarray, n_volumes: int, noise_sd: np.ndarray) -> np.ndarray:
    """Standard errors (n, n_params), API units, with the noise SD known: LM's ``stderr`` =
    sqrt(diag((JᵀJ)⁻¹) · RSS / dof) rescaled by σ / sqrt(RSS / dof), i.e. sqrt(diag((JᵀJ)⁻¹)) · σ, with
    dof = ``n_volumes`` − the parameters with a finite se (those estimated). ``noise_sd`` (n,) σ in
    ΔM/M0t; rows where it is not finite and > 0, or with RSS = 0 (an exact fit), keep their se."""
    se = np.array(stderr, dtype=np.float64)
    dof = n_volumes - np.isfinite(se).sum(axis=1)
    sd = np.asarray(noise_sd, dtype=np.float64)
    usable = np.isfinite(sd) & (sd > 0) & (dof > 0) & np.isfinite(rss) & (rss > 0)
    if usable.any():
        se[usable] *= (sd[usable] / np.sqrt(rss[usable] / dof[usable]))[:, None]
    return se


def _internal_bounds(model: KineticModel) -> tuple[np.ndarray, np.ndarray, int, float]:
    """(lower, upper) of LM's internal parameters, att's index and att's upper bound (s).

    With ordered arrival times (abat before att) q holds the gap att − abat at att's index:
    0 <= gap <= upper att − lower abat.
    """
    names = model.param_names
    lower, upper = model.bounds
    j_att = names.index("att")
    att_max = float(upper[j_att])
    if "abat" in names:
        lower[j_att], upper[j_att] = 0.0, att_max - lower[names.index("abat")]
    return lower, upper, j_att, att_max


def _empty_grid(n_volumes: int) -> tuple:
    """Start-grid arrays of the right types for a run from given starts (not read)."""
    ints = np.zeros(0, dtype=np.int64)
    return (np.zeros((n_volumes, 0)), np.zeros((0, n_volumes)), np.zeros((4, 0)), ints, ints.copy(), ints.copy(),
            np.zeros((2, 0)), np.zeros(2), np.zeros(0), np.zeros(0))


def _run(model: KineticModel, y: np.ndarray, grid: tuple, starts: tuple, from_grid: bool, free: np.ndarray,
         max_iter: int, xtol: float, ftol: float) -> Estimate:
    """Run the model's compiled LM kernel on validated signals ``y`` (n, n_volumes)."""
    try:
        kernel = _LM_KERNELS[model.name]
    except KeyError:
        raise ValueError(f"Levenberg–Marquardt has no kernel for model {model.name!r}; "
                         f"it serves {sorted(_LM_KERNELS)}") from None
    n, n_p = y.shape[0], model.n_params
    model_lower, model_upper = model.bounds
    lower, upper, j_att, att_max = _internal_bounds(model)
    params = np.empty((n, n_p))
    stderr = np.empty((n, n_p))
    status = np.empty(n, dtype=np.int8)
    rss = np.empty(n)
    n_eval = np.empty(n, dtype=np.int64)
    kernel(y, grid, starts, from_grid, (model_lower, model_upper, lower, upper, np.asarray(free, dtype=np.bool_)),
           j_att, att_max, model.vol, model.const, (int(max_iter), float(xtol), float(ftol)), n_chunks_for(n),
           (params, stderr, status, rss, n_eval))
    return Estimate(params, status, stderr, rss, model.param_names, "lm", info={"n_eval": n_eval})


def levenberg_marquardt(model: KineticModel, signals: np.ndarray, start: np.ndarray, *,
                        alt_start: np.ndarray | None = None, free: np.ndarray | None = None,
                        max_iter: int = 100, xtol: float = 1e-8, ftol: float = 1e-10) -> Estimate:
    """Fit ``signals`` (n, n_volumes) ΔM/M0t from ``start`` (n, n_params), API units.

    ``alt_start`` (rows of NaN for none) adds a second start per voxel; ``free`` (n_params
    booleans) holds parameters fixed at their start where False. Bounds are the model's;
    for 2C, abat <= att. Start values are clipped into the feasible set. Rows whose
    signal has a NaN/Inf or is all zeros get status INVALID_INPUT and NaN outputs; values the
    data do not determine get their status (:func:`~aslbatch.estimators.base.flag_undetermined`).
    """
    y = check_signals(signals, model)
    names = model.param_names
    n_p = model.n_params
    lower, upper = model.bounds
    free_arr = np.ones(n_p, dtype=np.bool_) if free is None else np.asarray(free, dtype=np.bool_)
    order = (names.index("abat"), names.index("att")) if "abat" in names else None

    def internal(values: np.ndarray) -> np.ndarray:
        q = np.clip(np.array(values, dtype=np.float64, ndmin=2), lower, upper)
        if order is not None:
            q[:, order[1]] = np.maximum(q[:, order[1]] - q[:, order[0]], 0.0)
        return np.ascontiguousarray(q)

    q_start = internal(start)
    if q_start.shape != (y.shape[0], n_p):
        raise ValueError(f"start must have shape ({y.shape[0]}, {n_p}), got {np.shape(start)}")
    q_alt = np.full_like(q_start, np.nan) if alt_start is None else internal(alt_start)
    estimate = _run(model, y, _empty_grid(model.n_volumes), (q_start, q_alt), False, free_arr, max_iter, xtol, ftol)
    flag_undetermined(model, estimate.params, estimate.status)
    return estimate


class LevenbergMarquardtEstimator(Estimator):
    """Bounded Levenberg–Marquardt least squares from a global grid start.

    Parameters
    ----------
    model : the kinetic model (with its protocol).
    grid_step_s : step (s) of the start grid over the arrival times (default: the model's
        ``lm_grid_step_s``, 0.1 s; PASL 0.025 s).
    max_iter : iteration limit per voxel (default 100).
    xtol : relative step tolerance (default 1e-8).
    ftol : relative cost-decrease tolerance (default 1e-10).
    fast_path : kept so that recorded settings stay valid; both values run the same kernel
        (there is one LM algorithm, compiled per model).
    """

    name = "lm"
    title = "Levenberg–Marquardt least-squares fitting (lm)"
    flags_prior_dominated = True
    takes_noise_sd = True
    stderr_method = ("sqrt(diag((J^T J)^-1)) * sigma at the solution, with J the model Jacobian and sigma the voxel's "
                     "noise SD from the spread of its repeats (where a volume was read once: sigma^2 estimated as "
                     "RSS / (n_volumes - n_estimated), the residual sum of squares); a Gaussian linearisation, too "
                     "small at low SNR (evaluate's calibration); NaN where a parameter is held fixed or the data do "
                     "not inform it (e.g. 2C abat with hard arterial edges, 1C att below the shortest PLD)")

    def __init__(self, model: KineticModel, *, grid_step_s: float | None = None, max_iter: int = 100,
                 xtol: float = 1e-8, ftol: float = 1e-10, fast_path: bool = True) -> None:
        super().__init__(model)
        self.grid_step_s = model.lm_grid_step_s if grid_step_s is None else grid_step_s
        self.max_iter = max_iter
        self.xtol = xtol
        self.ftol = ftol
        self.fast_path = fast_path

    def options(self) -> dict[str, Any]:
        return {"grid_step_s": self.grid_step_s, "max_iter": self.max_iter, "xtol": self.xtol, "ftol": self.ftol,
                "fast_path": self.fast_path}

    def check_options(self) -> None:
        if isinstance(self.max_iter, bool) or not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise ValueError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        for name in ("xtol", "ftol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value < 1):
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        check_grid_step("grid_step_s", self.grid_step_s)

    def _fit(self, signals: np.ndarray | None, progress: bool) -> None:
        """Validate the options and build the start grid (no training)."""
        super()._fit(signals, progress)
        self.check_options()
        self.grid_ = build_time_grid(self.model, float(self.grid_step_s))
        names = self.model.param_names
        self.free_ = np.ones(self.model.n_params, dtype=np.bool_)
        if "abat" in names and self.model.options()["arterial_edge_s"] == 0.0:
            self.free_[names.index("abat")] = False

    def predict(self, signals: np.ndarray, *, slice_offsets: np.ndarray | float | None = None,
                noise_sd: np.ndarray | float | None = None) -> Estimate:
        """As :meth:`Estimator.predict`; ``noise_sd`` (ΔM/M0t, a scalar or one per voxel; NaN: not known):
        each voxel's noise SD, which the standard errors then use instead of RSS / (n − p)
        (:func:`known_noise_stderr`)."""
        estimate = super().predict(signals, slice_offsets=slice_offsets)
        if noise_sd is None:
            return estimate
        sd = np.asarray(noise_sd, dtype=np.float64)
        if sd.ndim > 1 or (sd.ndim == 1 and sd.shape[0] != estimate.n_voxels):
            raise ValueError(f"noise_sd must be a scalar or have one value per voxel ({estimate.n_voxels}), "
                             f"got shape {sd.shape}")
        return replace(estimate, stderr=known_noise_stderr(estimate.stderr, estimate.rss, self.model.n_volumes,
                                                           np.broadcast_to(sd, (estimate.n_voxels,))))

    def predict_image(self, signals: np.ndarray, mask: np.ndarray, *, slice_offsets: np.ndarray | None = None,
                      progress: bool = False, label: str = "", signal_se: np.ndarray | None = None) -> Estimate:
        """As :meth:`Estimator.predict_image`; ``signal_se`` (n, n_volumes) gives each voxel's noise SD
        (:func:`~.base.noise_sd_from_signal_se`) for its standard errors."""
        estimate = super().predict_image(signals, mask, slice_offsets=slice_offsets, progress=progress, label=label)
        if signal_se is None:
            return estimate
        noise = noise_sd_from_signal_se(signal_se, np.shape(signals))
        return replace(estimate, stderr=known_noise_stderr(estimate.stderr, estimate.rss, self.model.n_volumes,
                                                           noise))

    def _predict(self, y: np.ndarray, slice_offsets: None) -> Estimate:
        """Fit every voxel of ``y`` (n_voxels, n_volumes) ΔM/M0t from the grid start."""
        g = self.grid_
        grid = (g.tissue_by_volume, g.arterial, g.norms, g.pair_abat, g.pair_att, g.pair_alt, g.pairs, g.amp_max, g.att,
                g.abat)
        no_starts = np.empty((0, self.model.n_params))
        return _run(self.model, y, grid, (no_starts, no_starts), True, self.free_, self.max_iter, self.xtol,
                    self.ftol)
