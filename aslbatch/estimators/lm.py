"""Levenberg–Marquardt in numba: one voxel per work item, analytic Jacobians, projected bounds.

Algorithm (per voxel):
- start: the best point of a coarse lookup-table grid over the arrival times with
  closed-form non-negative amplitudes (:mod:`aslbatch.estimators.lookup`), so the start is
  global, not one fixed guess. Where the grid's best points form a flat run (a direction
  the data do not inform), a second start just past the run lets LM leave it; a fit whose
  tissue arrival ends on a kink of the model (att at a PLD or readout time, where the
  Jacobian is one-sided; a fit stops as soon as a step is rejected there) is re-fitted with
  att held on the kink, then on each smooth side whose one-sided gradient offers descent,
  with att bounded by the kink; repeated if that ends on another kink (at most
  KINK_ROUNDS times). The lowest cost wins;
- step: solve (JᵀJ + μ D) h = Jᵀr by Cholesky, D = running max of diag(JᵀJ)
  (Moré's scaling, so cbf and abv of very different magnitudes are treated alike);
  μ updated with Nielsen's rule and floored at 1e-12 so it never underflows;
- bounds by an active set and truncated steps: a parameter on a bound whose descent
  direction points outward is held for the step; otherwise the step is followed only up
  to the first bound it meets, landing exactly on it. For 2C, LM works internally with
  gap = att − abat, so the order abat <= att is the plain bound gap >= 0. A trial is
  accepted when it lowers the cost;
- stop: relative step below ``xtol`` (|Δp_i| <= xtol (|p_i| + xtol) for every parameter),
  relative cost decrease below ``ftol`` (achieved, or predicted by the linearised model for
  the next step, which then is not evaluated), or an exact fit;
- standard errors: sqrt(diag((JᵀJ)⁻¹) · RSS / (n_volumes − n_estimated)) at the solution,
  NaN for a parameter the data do not inform (zero Jacobian column) or that is held fixed.

Two-compartment with hard arterial edges: the signal depends on abat only through which
non-crushed volumes fall inside [abat, abat + τ) and through abv·e^(−abat/T1b), so abat
is only bracketed between readout times and abv is identified only together with abat.
LM then holds abat at the midpoint of the bracket chosen by the grid (standard error NaN)
and fits cbf, abv and att. With ``arterial_edge_s`` > 0 all four parameters are fitted.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import prange

from .._numba import parallel, serial
from ..models import KineticModel
from ..models.base import PLD, TIME
from ..models.kernels import ONE_COMPARTMENT, TWO_COMPARTMENT, model_normal_equations
from ..models.one_compartment import normal_equations_voxel
from ..models.two_compartment import normal_equations_scalars
from .base import Estimate, Estimator, Status, check_signals
from .lookup import build_time_grid, grid_params, grid_search, grid_search_voxel, is_invalid, n_chunks_for

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


@serial
def cholesky_solve(m, b, x, n):
    """Solve m x = b for symmetric positive-definite m (n x n; overwritten by its factor).

    Returns False (x undefined) when m is not positive definite.
    """
    for j in range(n):
        s = m[j, j]
        for k in range(j):
            s -= m[j, k] * m[j, k]
        if not s > 0.0:
            return False
        d = math.sqrt(s)
        m[j, j] = d
        for i in range(j + 1, n):
            s = m[i, j]
            for k in range(j):
                s -= m[i, k] * m[j, k]
            m[i, j] = s / d
    for i in range(n):
        s = b[i]
        for k in range(i):
            s -= m[i, k] * x[k]
        x[i] = s / m[i, i]
    for i in range(n - 1, -1, -1):
        s = x[i]
        for k in range(i + 1, n):
            s -= m[k, i] * x[k]
        x[i] = s / m[i, i]
    return True


@serial
def _to_model(q, order_lo, order_hi, p):
    """Model parameters p from internal ones q (q[order_hi] is the gap att - abat)."""
    for i in range(q.shape[0]):
        p[i] = q[i]
    if order_lo >= 0:
        p[order_hi] = q[order_lo] + q[order_hi]


@serial
def _normal_equations(kernel_id, q, order_lo, order_hi, free, y, vol, const, p, a, g):
    """Cost |y - s|² at internal parameters q, with A = JᵀJ and g = Jᵀ(y - s) with respect to q.

    With an arrival order, q[order_hi] is the gap att - abat, so the Jacobian column of abat
    becomes d/dabat + d/datt. Rows and columns of parameters that are not free are zero.
    """
    _to_model(q, order_lo, order_hi, p)
    cost = model_normal_equations(kernel_id, p, y, vol, const, a, g)
    n_p = q.shape[0]
    if order_lo >= 0:
        g[order_lo] += g[order_hi]
        for j in range(n_p):
            a[order_lo, j] += a[order_hi, j]
        for i in range(n_p):
            a[i, order_lo] += a[i, order_hi]
    for i in range(n_p):
        if not free[i]:
            g[i] = 0.0
            for j in range(n_p):
                a[i, j] = 0.0
                a[j, i] = 0.0
    return cost


@serial
def _standard_errors(a, free, cost, n_vol, order_lo, order_hi, m, e, x, cov, se):
    """Standard errors of the model parameters from the internal normal matrix ``a``.

    cov(q) = a⁻¹ · cost / dof over the informed free parameters; att = abat + gap then has
    var = var(abat) + var(gap) + 2 cov(abat, gap). NaN where not estimable.
    """
    n_p = a.shape[0]
    n_used = 0
    for i in range(n_p):
        if free[i] and a[i, i] > 0.0:
            n_used += 1
    dof = n_vol - n_used
    for i in range(n_p):
        se[i] = np.nan
        for j in range(n_p):
            cov[i, j] = np.nan
    if dof <= 0:
        return
    s2 = cost / dof
    for target in range(n_p):
        if not (free[target] and a[target, target] > 0.0):
            continue
        for i in range(n_p):
            used_i = free[i] and a[i, i] > 0.0
            for j in range(n_p):
                used_j = free[j] and a[j, j] > 0.0
                if used_i and used_j:
                    m[i, j] = a[i, j]
                else:
                    m[i, j] = 1.0 if i == j else 0.0
            e[i] = 1.0 if i == target else 0.0
        if not cholesky_solve(m, e, x, n_p):
            return
        for i in range(n_p):
            if free[i] and a[i, i] > 0.0:
                cov[i, target] = x[i] * s2
    for i in range(n_p):
        if cov[i, i] >= 0.0:
            se[i] = math.sqrt(cov[i, i])
    if order_lo >= 0:
        if not free[order_lo]:
            return  # abat held: att = abat + gap has the gap's error
        var = cov[order_lo, order_lo] + cov[order_hi, order_hi] + 2.0 * cov[order_lo, order_hi]
        se[order_hi] = math.sqrt(var) if var >= 0.0 else np.nan


@serial
def kink_near(att, vol):
    """The kink of the model that the tissue arrival ``att`` (s) sits on, else NaN: a readout
    time t = τ + w (arrival) or a PLD w (end of the bolus), where the Jacobian is one-sided."""
    for v in range(vol.shape[0]):
        if abs(att - vol[v, TIME]) <= KINK_S:
            return vol[v, TIME]
        if abs(att - vol[v, PLD]) <= KINK_S:
            return vol[v, PLD]
    return np.nan


@serial
def lm_voxel(y, q, lower, upper, free, order_lo, order_hi, j_att, att_max, kernel_id, vol, const, max_iter, xtol,
             ftol, p, q_try, a, g, a_try, g_try, d, m, h, rhs, held):
    """Fit one voxel in place: ``q`` holds the start and receives the result.

    ``q`` are the internal parameters: the model's, except that with an arrival order
    (order_lo >= 0) q[order_hi] is the gap att - abat >= 0, so the order is a bound;
    ``att_max`` caps abat + gap. ``lower``/``upper`` bound q. Returns (status code,
    cost = RSS, number of model evaluations). The other arrays are scratch space:
    p, q_try, g, g_try, d, h, rhs (n_p); held (n_p booleans); a, a_try, m (n_p, n_p).
    """
    n_p = q.shape[0]
    cost = _normal_equations(kernel_id, q, order_lo, order_hi, free, y, vol, const, p, a, g)
    for i in range(n_p):
        d[i] = a[i, i]
    mu = MU_START
    nu = 2.0
    status = _MAX_ITERATIONS
    n_eval = 1
    for _ in range(max_iter):
        if cost == 0.0:
            status = _CONVERGED
            break
        # active set: a parameter on a bound whose descent direction points outward is held
        for i in range(n_p):
            held[i] = not (free[i] and d[i] > 0.0) or (q[i] <= lower[i] and g[i] <= 0.0) or (
                q[i] >= upper[i] and g[i] >= 0.0)
        solved = False
        frac = 1.0
        blocking = -1
        for _attempt in range(n_p + 1):
            for i in range(n_p):
                rhs[i] = 0.0 if held[i] else g[i]
                for j in range(n_p):
                    m[i, j] = 0.0 if (held[i] or held[j]) else a[i, j]
                m[i, i] = 1.0 if held[i] else m[i, i] + mu * d[i]
            solved = cholesky_solve(m, rhs, h, n_p)
            if not solved:
                break
            # truncated step: follow h up to the first bound it meets, and land exactly on it
            frac = 1.0
            blocking = -1
            for i in range(n_p):
                if h[i] != 0.0:
                    target = q[i] + h[i]
                    if target < lower[i]:
                        f_i = (lower[i] - q[i]) / h[i]
                    elif target > upper[i]:
                        f_i = (upper[i] - q[i]) / h[i]
                    else:
                        continue
                    if f_i < frac:
                        frac = f_i
                        blocking = i
            if frac > 0.0:
                break
            # the step leaves through a bound the parameter already sits on: hold it, solve again
            held[blocking] = True
        if not solved:
            mu *= nu
            nu *= 2.0
            if mu > MU_CEILING:
                status = _CONVERGED
                break
            continue
        for i in range(n_p):
            q_try[i] = q[i] + frac * h[i]
        if blocking >= 0:
            q_try[blocking] = lower[blocking] if h[blocking] < 0.0 else upper[blocking]
        if order_lo >= 0 and q_try[order_lo] + q_try[order_hi] > att_max:
            q_try[order_hi] = max(att_max - q_try[order_lo], 0.0)
        small = True
        for i in range(n_p):
            h[i] = q_try[i] - q[i]
            if abs(h[i]) > xtol * (abs(q[i]) + xtol):
                small = False
        if small:
            status = _CONVERGED
            break
        # predicted decrease of the linearised model for the (truncated) step h: if even that
        # is below ftol, the fit has converged without evaluating the step
        pred = 0.0
        for i in range(n_p):
            ah = 0.0
            for j in range(n_p):
                ah += a[i, j] * h[j]
            pred += 2.0 * h[i] * g[i] - h[i] * ah
        if 0.0 <= pred <= ftol * cost:
            status = _CONVERGED
            break
        cost_try = _normal_equations(kernel_id, q_try, order_lo, order_hi, free, y, vol, const, p, a_try, g_try)
        n_eval += 1
        if cost_try < cost:
            rho = (cost - cost_try) / pred if pred > 0.0 else 1.0
            done = cost - cost_try <= ftol * cost
            cost = cost_try
            for i in range(n_p):
                q[i] = q_try[i]
                g[i] = g_try[i]
                for j in range(n_p):
                    a[i, j] = a_try[i, j]
            for i in range(n_p):
                if a[i, i] > d[i]:
                    d[i] = a[i, i]
            mu *= max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
            if mu < MU_FLOOR:
                mu = MU_FLOOR
            nu = 2.0
            if done:
                status = _CONVERGED
                break
        else:
            # a rejected step with att on a kink: its one-sided Jacobian cannot see past the
            # kink, so stop; the caller's kink handling (att held, one-sided probes, side fits) decides
            # (not when that kink bounds this fit: a side fit cannot see past its own bound anyway)
            if j_att >= 0:
                shift = q[order_lo] if order_lo >= 0 else 0.0
                kink = kink_near(q[j_att] + shift, vol)
                if (not math.isnan(kink) and abs(kink - lower[j_att] - shift) > KINK_S
                        and abs(kink - upper[j_att] - shift) > KINK_S):
                    status = _CONVERGED
                    break
            mu *= nu
            nu *= 2.0
            if mu > MU_CEILING:
                status = _CONVERGED
                break
    if status == _CONVERGED:
        for i in range(n_p):
            span = 1e-9 * (upper[i] - lower[i])
            if free[i] and (q[i] <= lower[i] + span or q[i] >= upper[i] - span):
                status = _AT_BOUND
    return status, cost, n_eval


@parallel
def lm_batch(signals, start, alt_start, lower, upper, free, order_lo, order_hi, j_att, att_max, kernel_id, vol,
             const, max_iter, xtol, ftol, n_chunks, params, stderr, status, rss, n_eval):
    """LM over voxels, a chunk of voxels per work item.

    ``start``, ``alt_start`` and ``params`` hold internal parameters (see :func:`lm_voxel`).
    Rows of ``start`` with NaN (invalid input) get NaN outputs and status INVALID_INPUT; a
    row of ``alt_start`` without NaN is a second start, and a fit whose tissue arrival
    (internal index ``j_att``) ends on a kink is restarted from either side of it; the fit
    with the lowest cost wins.
    """
    n, n_p = start.shape
    n_vol = signals.shape[1]
    for chunk in prange(n_chunks):
        p = np.empty(n_p)
        q2 = np.empty(n_p)
        a_try = np.empty((n_p, n_p))
        g_try = np.empty(n_p)
        q_try = np.empty(n_p)
        g = np.empty(n_p)
        d = np.empty(n_p)
        h = np.empty(n_p)
        e = np.empty(n_p)
        rhs = np.empty(n_p)
        held = np.empty(n_p, dtype=np.bool_)
        lower2 = np.empty(n_p)
        upper2 = np.empty(n_p)
        a_probe = np.empty((n_p, n_p))
        g_probe = np.empty(n_p)
        a = np.empty((n_p, n_p))
        a2 = np.empty((n_p, n_p))
        m = np.empty((n_p, n_p))
        cov = np.empty((n_p, n_p))
        for i in range(chunk * n // n_chunks, (chunk + 1) * n // n_chunks):
            q = params[i]
            if math.isnan(start[i, 0]):
                for j in range(n_p):
                    q[j] = np.nan
                    stderr[i, j] = np.nan
                status[i] = _INVALID_INPUT
                rss[i] = np.nan
                n_eval[i] = 0
                continue
            for j in range(n_p):
                q[j] = start[i, j]
            code, cost, evals = lm_voxel(signals[i], q, lower, upper, free, order_lo, order_hi, j_att, att_max, kernel_id,
                                         vol, const, max_iter, xtol, ftol, p, q_try, a, g, a_try, g_try, d, m, h,
                                         rhs, held)
            # second starts: past a flat run of the grid; and where the fit ended on a kink, the
            # other parameters re-fitted with att held on it, then each side that offers descent
            kink = np.nan
            for attempt in range(1 + 3 * KINK_ROUNDS):
                stage = 0 if attempt == 0 else (attempt - 1) % 3 + 1  # 1 att held, 2 left side, 3 right side
                for j in range(n_p):
                    lower2[j] = lower[j]
                    upper2[j] = upper[j]
                    q2[j] = q[j]
                if attempt == 0:
                    if math.isnan(alt_start[i, 0]):
                        continue
                    for j in range(n_p):
                        q2[j] = alt_start[i, j]
                else:
                    if stage == 1:
                        _to_model(q, order_lo, order_hi, p)
                        new_kink = kink_near(p[j_att], vol)
                        if math.isnan(new_kink) or new_kink == kink:
                            break
                        kink = new_kink
                    # the kink in internal units (for 2C: a gap from the current abat)
                    edge = min(max(kink - q[order_lo] if order_lo >= 0 else kink, lower[j_att]), upper[j_att])
                    if stage == 1:
                        lower2[j_att] = edge
                        upper2[j_att] = edge
                        q2[j_att] = edge
                    else:
                        # one-sided att gradient (g = Jᵀr: positive means cost falls as att grows)
                        q2[j_att] = edge - KINK_PROBE_S if stage == 2 else edge + KINK_PROBE_S
                        _normal_equations(kernel_id, q2, order_lo, order_hi, free, signals[i], vol, const, p,
                                          a_probe, g_probe)
                        evals += 1
                        if (stage == 2 and not g_probe[j_att] < 0.0) or (stage == 3 and not g_probe[j_att] > 0.0):
                            continue
                        if stage == 2:
                            upper2[j_att] = edge
                            q2[j_att] = max(edge - KINK_SIDE_S, lower[j_att])
                        else:
                            lower2[j_att] = edge
                            q2[j_att] = min(edge + KINK_SIDE_S, upper[j_att])
                for j in range(n_p):
                    for k in range(n_p):
                        a2[j, k] = a[j, k]
                code2, cost2, evals2 = lm_voxel(signals[i], q2, lower2, upper2, free, order_lo, order_hi, j_att, att_max,
                                                kernel_id, vol, const, max_iter, xtol, ftol, p, q_try, a, g, a_try,
                                                g_try, d, m, h, rhs, held)
                evals += evals2
                if cost2 < cost * (1.0 - 1e-12):
                    # on a side bound that is not a bound of the model, the fit is still converged
                    if code2 == _AT_BOUND and attempt > 0:
                        code2 = _CONVERGED
                        for j in range(n_p):
                            span = 1e-9 * (upper[j] - lower[j])
                            if free[j] and (q2[j] <= lower[j] + span or q2[j] >= upper[j] - span):
                                code2 = _AT_BOUND
                    code = code2
                    cost = cost2
                    for j in range(n_p):
                        q[j] = q2[j]
                else:
                    for j in range(n_p):
                        for k in range(n_p):
                            a[j, k] = a2[j, k]
            status[i] = code
            rss[i] = cost
            n_eval[i] = evals
            _standard_errors(a, free, cost, n_vol, order_lo, order_hi, m, e, h, cov, stderr[i])
            _to_model(q, order_lo, order_hi, p)
            for j in range(n_p):
                q[j] = p[j]


# --- fast path: the one-compartment model with scalar state ---------------------------------
# The same algorithm as lm_voxel / lm_batch, for the two 1C parameters held in registers: the
# normal equations come fused with the model (one pass over the volumes, no signal arrays),
# 2x2 systems are solved in closed form, and grid search and fits run in one kernel per voxel.


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
def lm_one_compartment_voxel(y, cbf, att, lo0, hi0, lo1, hi1, vol, const, max_iter, xtol, ftol):
    """Fit (cbf, att) of one voxel from a start; :func:`lm_voxel` with scalar state.

    Returns (cbf, att, status code, cost, number of evaluations, a00, a01, a11) with
    A = JᵀJ at the result (for standard errors).
    """
    cost, a00, a01, a11, g0, g1 = normal_equations_voxel(cbf, att, y, vol, const)
    d0 = a00
    d1 = a11
    mu = MU_START
    nu = 2.0
    status = _MAX_ITERATIONS
    n_eval = 1
    for _ in range(max_iter):
        if cost == 0.0:
            status = _CONVERGED
            break
        held0 = not d0 > 0.0 or (cbf <= lo0 and g0 <= 0.0) or (cbf >= hi0 and g0 >= 0.0)
        held1 = not d1 > 0.0 or (att <= lo1 and g1 <= 0.0) or (att >= hi1 and g1 >= 0.0)
        solved = False
        h0 = 0.0
        h1 = 0.0
        frac = 1.0
        blocking = -1
        for _attempt in range(3):
            solved, h0, h1 = _solve_2x2(a00, a01, a11, g0, g1, mu, d0, d1, held0, held1)
            if not solved:
                break
            f0 = _fraction_to_bound(cbf, h0, lo0, hi0)
            f1 = _fraction_to_bound(att, h1, lo1, hi1)
            frac = 1.0
            blocking = -1
            if f0 < frac:
                frac = f0
                blocking = 0
            if f1 < frac:
                frac = f1
                blocking = 1
            if frac > 0.0:
                break
            if blocking == 0:
                held0 = True
            else:
                held1 = True
        if not solved:
            mu *= nu
            nu *= 2.0
            if mu > MU_CEILING:
                status = _CONVERGED
                break
            continue
        cbf_try = cbf + frac * h0
        att_try = att + frac * h1
        if blocking == 0:
            cbf_try = lo0 if h0 < 0.0 else hi0
        elif blocking == 1:
            att_try = lo1 if h1 < 0.0 else hi1
        h0 = cbf_try - cbf
        h1 = att_try - att
        if abs(h0) <= xtol * (abs(cbf) + xtol) and abs(h1) <= xtol * (abs(att) + xtol):
            status = _CONVERGED
            break
        pred = 2.0 * (h0 * g0 + h1 * g1) - (h0 * (a00 * h0 + a01 * h1) + h1 * (a01 * h0 + a11 * h1))
        if 0.0 <= pred <= ftol * cost:
            status = _CONVERGED
            break
        cost_try, b00, b01, b11, f0, f1 = normal_equations_voxel(cbf_try, att_try, y, vol, const)
        n_eval += 1
        if cost_try < cost:
            rho = (cost - cost_try) / pred if pred > 0.0 else 1.0
            done = cost - cost_try <= ftol * cost
            cbf = cbf_try
            att = att_try
            cost = cost_try
            a00 = b00
            a01 = b01
            a11 = b11
            g0 = f0
            g1 = f1
            d0 = max(d0, a00)
            d1 = max(d1, a11)
            x = 2.0 * rho - 1.0
            mu *= max(1.0 / 3.0, 1.0 - x * x * x)
            if mu < MU_FLOOR:
                mu = MU_FLOOR
            nu = 2.0
            if done:
                status = _CONVERGED
                break
        else:
            # a rejected step with att on a kink that does not bound this fit: stop, as in lm_voxel
            kink = kink_near(att, vol)
            if not math.isnan(kink) and abs(kink - lo1) > KINK_S and abs(kink - hi1) > KINK_S:
                status = _CONVERGED
                break
            mu *= nu
            nu *= 2.0
            if mu > MU_CEILING:
                status = _CONVERGED
                break
    if status == _CONVERGED:
        if (cbf <= lo0 + 1e-9 * (hi0 - lo0) or cbf >= hi0 - 1e-9 * (hi0 - lo0)
                or att <= lo1 + 1e-9 * (hi1 - lo1) or att >= hi1 - 1e-9 * (hi1 - lo1)):
            status = _AT_BOUND
    return cbf, att, status, cost, n_eval, a00, a01, a11


@parallel
def lm_one_compartment_batch(signals, tissue_by_volume, arterial, norms, pair_abat, pair_att, pair_alt, pairs, att_grid,
                             lower, upper, vol, const, max_iter, xtol, ftol, n_chunks, params, stderr, status, rss, n_eval):
    """Grid start and LM fit of every voxel for the 1C model (what :func:`lm_batch` does from
    :func:`grid_search` starts), with the same second starts and standard errors."""
    n = signals.shape[0]
    n_vol = signals.shape[1]
    lo0, hi0, lo1, hi1 = lower[0], upper[0], lower[1], upper[1]
    for chunk in prange(n_chunks):
        ty = np.empty(tissue_by_volume.shape[1])
        ay = np.empty(max(tissue_by_volume.shape[1], arterial.shape[0]))
        for i in range(chunk * n // n_chunks, (chunk + 1) * n // n_chunks):
            y = signals[i]
            if is_invalid(y):
                params[i, 0] = np.nan
                params[i, 1] = np.nan
                stderr[i, 0] = np.nan
                stderr[i, 1] = np.nan
                status[i] = _INVALID_INPUT
                rss[i] = np.nan
                n_eval[i] = 0
                continue
            k, alt, c, _, _ = grid_search_voxel(y, tissue_by_volume, arterial, norms, pair_abat, pair_att,
                                                pair_alt, pairs, ty, ay)
            cbf0 = min(max(c, lo0), hi0)
            cbf, att, code, cost, evals, a00, a01, a11 = lm_one_compartment_voxel(
                y, cbf0, min(max(att_grid[pair_att[k]], lo1), hi1), lo0, hi0, lo1, hi1, vol, const, max_iter, xtol,
                ftol)
            # second starts: past a flat run of the grid; and where the fit ended on a kink, the
            # other parameters re-fitted with att held on it, then each side that offers descent
            kink = np.nan
            for attempt in range(1 + 3 * KINK_ROUNDS):
                stage = 0 if attempt == 0 else (attempt - 1) % 3 + 1  # 1 att held, 2 left side, 3 right side
                side_lo = lo1
                side_hi = hi1
                if attempt == 0:
                    if alt < 0:
                        continue
                    start_cbf = cbf0
                    start_att = min(max(att_grid[pair_att[alt]], lo1), hi1)
                elif stage == 1:
                    new_kink = kink_near(att, vol)
                    if math.isnan(new_kink) or new_kink == kink:
                        break
                    kink = new_kink
                    edge = min(max(kink, lo1), hi1)
                    side_lo = edge
                    side_hi = edge
                    start_cbf = cbf
                    start_att = edge
                else:
                    # one-sided att gradients at the kink (g = Jᵀr: positive means cost falls as att grows)
                    probe = edge - KINK_PROBE_S if stage == 2 else edge + KINK_PROBE_S
                    g_att = normal_equations_voxel(cbf, probe, y, vol, const)[5]
                    evals += 1
                    if (stage == 2 and not g_att < 0.0) or (stage == 3 and not g_att > 0.0):
                        continue
                    if stage == 2:
                        side_hi = edge
                        start_att = max(edge - KINK_SIDE_S, lo1)
                    else:
                        side_lo = edge
                        start_att = min(edge + KINK_SIDE_S, hi1)
                    start_cbf = cbf
                cbf2, att2, code2, cost2, evals2, b00, b01, b11 = lm_one_compartment_voxel(
                    y, start_cbf, start_att, lo0, hi0, side_lo, side_hi, vol, const, max_iter, xtol, ftol)
                evals += evals2
                if cost2 < cost * (1.0 - 1e-12):
                    if code2 == _AT_BOUND and attempt > 0:
                        code2 = _CONVERGED
                        if (cbf2 <= lo0 + 1e-9 * (hi0 - lo0) or cbf2 >= hi0 - 1e-9 * (hi0 - lo0)
                                or att2 <= lo1 + 1e-9 * (hi1 - lo1) or att2 >= hi1 - 1e-9 * (hi1 - lo1)):
                            code2 = _AT_BOUND
                    cbf, att, code, cost = cbf2, att2, code2, cost2
                    a00, a01, a11 = b00, b01, b11
            params[i, 0] = cbf
            params[i, 1] = att
            status[i] = code
            rss[i] = cost
            n_eval[i] = evals
            # standard errors over the informed parameters (as _standard_errors)
            stderr[i, 0] = np.nan
            stderr[i, 1] = np.nan
            used0 = a00 > 0.0
            used1 = a11 > 0.0
            dof = n_vol - (1 if used0 else 0) - (1 if used1 else 0)
            if dof > 0:
                s2 = cost / dof
                if used0 and used1:
                    det = a00 * a11 - a01 * a01
                    if det > 0.0:
                        stderr[i, 0] = math.sqrt(a11 / det * s2)
                        stderr[i, 1] = math.sqrt(a00 / det * s2)
                elif used0:
                    stderr[i, 0] = math.sqrt(s2 / a00)
                elif used1:
                    stderr[i, 1] = math.sqrt(s2 / a11)


# --- fast path: the two-compartment model with scalar state ---------------------------------
# The same algorithm as lm_voxel / lm_batch for 2C, on the internal parameters
# q = (cbf, abv, abat, gap = att − abat) held in registers: A = JᵀJ as its 10 unique entries,
# the normal equations fused with the model, the 4 x 4 Cholesky unrolled on scalars with held
# rows and columns set to the identity as the generic kernel sets them. Each operation is the
# generic kernel's, in its order, so both paths round alike.


@serial
def _normal_equations_2c(cbf, abv, abat, gap, free_abat, y, vol, const):
    """:func:`_normal_equations` for 2C on scalars, at q = (cbf, abv, abat, gap = att − abat).

    Returns (cost, a00, a01, a02, a03, a11, a12, a13, a22, a23, a33, g0, g1, g2, g3): the
    upper triangle of A = JᵀJ and g = Jᵀ(y - s) with respect to q (abat's column is
    d/dabat + d/datt at a fixed gap), abat's row and column zero unless ``free_abat``.
    """
    cost, a00, a01, a02, a03, a11, a12, a13, a22, a23, a33, g0, g1, g2, g3 = normal_equations_scalars(
        cbf, abv, abat, abat + gap, y, vol, const)
    # abat's row and column gain att's, summed in the order of _normal_equations
    g2 += g3
    a22 = (a22 + a23) + (a23 + a33)
    a02 += a03
    a12 += a13
    a23 += a33
    if not free_abat:
        g2 = 0.0
        a02 = 0.0
        a12 = 0.0
        a22 = 0.0
        a23 = 0.0
    return cost, a00, a01, a02, a03, a11, a12, a13, a22, a23, a33, g0, g1, g2, g3


@serial
def _cholesky_4x4(m00, m10, m11, m20, m21, m22, m30, m31, m32, m33):
    """Cholesky factor L (m = L Lᵀ) of a symmetric 4 x 4 matrix given by its lower triangle.

    Returns (positive definite, l00, l10, l11, l20, l21, l22, l30, l31, l32, l33), computed
    as :func:`cholesky_solve` does (L undefined when not positive definite).
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
def _on_bound(x, lo, hi):
    """True when x lies within 1e-9 of the range [lo, hi] from one of its ends."""
    span = 1e-9 * (hi - lo)
    return x <= lo + span or x >= hi - span


@serial
def lm_two_compartment_voxel(y, cbf, abv, abat, gap, free_abat, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, att_max, vol,
                             const, max_iter, xtol, ftol):
    """Fit q = (cbf, abv, abat, gap = att − abat) of one voxel from a start; :func:`lm_voxel` with scalar state.

    cbf in mL/100 g/min, abv in mL/mL, abat and gap in s, bounded by lo_i <= q_i <= hi_i;
    att = abat + gap is capped at ``att_max`` (s); abat stays at its start unless
    ``free_abat``. Returns (cbf, abv, abat, gap, status code, cost, number of evaluations,
    a00, a01, a02, a03, a11, a12, a13, a22, a23, a33) with A = JᵀJ with respect to q at the
    result (for standard errors).
    """
    cost, a00, a01, a02, a03, a11, a12, a13, a22, a23, a33, g0, g1, g2, g3 = _normal_equations_2c(
        cbf, abv, abat, gap, free_abat, y, vol, const)
    d0 = a00
    d1 = a11
    d2 = a22
    d3 = a33
    mu = MU_START
    nu = 2.0
    status = _MAX_ITERATIONS
    n_eval = 1
    for _ in range(max_iter):
        if cost == 0.0:
            status = _CONVERGED
            break
        held0 = not d0 > 0.0 or (cbf <= lo0 and g0 <= 0.0) or (cbf >= hi0 and g0 >= 0.0)
        held1 = not d1 > 0.0 or (abv <= lo1 and g1 <= 0.0) or (abv >= hi1 and g1 >= 0.0)
        held2 = not (free_abat and d2 > 0.0) or (abat <= lo2 and g2 <= 0.0) or (abat >= hi2 and g2 >= 0.0)
        held3 = not d3 > 0.0 or (gap <= lo3 and g3 <= 0.0) or (gap >= hi3 and g3 >= 0.0)
        solved = False
        h0 = 0.0
        h1 = 0.0
        h2 = 0.0
        h3 = 0.0
        frac = 1.0
        blocking = -1
        for _attempt in range(5):
            solved, h0, h1, h2, h3 = _solve_4x4(a00, a01, a02, a03, a11, a12, a13, a22, a23, a33, g0, g1, g2, g3,
                                                mu, d0, d1, d2, d3, held0, held1, held2, held3)
            if not solved:
                break
            f0 = _fraction_to_bound(cbf, h0, lo0, hi0)
            f1 = _fraction_to_bound(abv, h1, lo1, hi1)
            f2 = _fraction_to_bound(abat, h2, lo2, hi2)
            f3 = _fraction_to_bound(gap, h3, lo3, hi3)
            frac = 1.0
            blocking = -1
            if f0 < frac:
                frac = f0
                blocking = 0
            if f1 < frac:
                frac = f1
                blocking = 1
            if f2 < frac:
                frac = f2
                blocking = 2
            if f3 < frac:
                frac = f3
                blocking = 3
            if frac > 0.0:
                break
            if blocking == 0:
                held0 = True
            elif blocking == 1:
                held1 = True
            elif blocking == 2:
                held2 = True
            else:
                held3 = True
        if not solved:
            mu *= nu
            nu *= 2.0
            if mu > MU_CEILING:
                status = _CONVERGED
                break
            continue
        cbf_try = cbf + frac * h0
        abv_try = abv + frac * h1
        abat_try = abat + frac * h2
        gap_try = gap + frac * h3
        if blocking == 0:
            cbf_try = lo0 if h0 < 0.0 else hi0
        elif blocking == 1:
            abv_try = lo1 if h1 < 0.0 else hi1
        elif blocking == 2:
            abat_try = lo2 if h2 < 0.0 else hi2
        elif blocking == 3:
            gap_try = lo3 if h3 < 0.0 else hi3
        if abat_try + gap_try > att_max:
            gap_try = max(att_max - abat_try, 0.0)
        h0 = cbf_try - cbf
        h1 = abv_try - abv
        h2 = abat_try - abat
        h3 = gap_try - gap
        if (abs(h0) <= xtol * (abs(cbf) + xtol) and abs(h1) <= xtol * (abs(abv) + xtol)
                and abs(h2) <= xtol * (abs(abat) + xtol) and abs(h3) <= xtol * (abs(gap) + xtol)):
            status = _CONVERGED
            break
        # predicted decrease of the linearised model for the (truncated) step h
        ah0 = a00 * h0 + a01 * h1 + a02 * h2 + a03 * h3
        ah1 = a01 * h0 + a11 * h1 + a12 * h2 + a13 * h3
        ah2 = a02 * h0 + a12 * h1 + a22 * h2 + a23 * h3
        ah3 = a03 * h0 + a13 * h1 + a23 * h2 + a33 * h3
        pred = (2.0 * h0 * g0 - h0 * ah0) + (2.0 * h1 * g1 - h1 * ah1) + (2.0 * h2 * g2 - h2 * ah2) + (
            2.0 * h3 * g3 - h3 * ah3)
        if 0.0 <= pred <= ftol * cost:
            status = _CONVERGED
            break
        cost_try, b00, b01, b02, b03, b11, b12, b13, b22, b23, b33, f0, f1, f2, f3 = _normal_equations_2c(
            cbf_try, abv_try, abat_try, gap_try, free_abat, y, vol, const)
        n_eval += 1
        if cost_try < cost:
            rho = (cost - cost_try) / pred if pred > 0.0 else 1.0
            done = cost - cost_try <= ftol * cost
            cbf = cbf_try
            abv = abv_try
            abat = abat_try
            gap = gap_try
            cost = cost_try
            a00, a01, a02, a03, a11, a12, a13, a22, a23, a33 = b00, b01, b02, b03, b11, b12, b13, b22, b23, b33
            g0, g1, g2, g3 = f0, f1, f2, f3
            if a00 > d0:
                d0 = a00
            if a11 > d1:
                d1 = a11
            if a22 > d2:
                d2 = a22
            if a33 > d3:
                d3 = a33
            mu *= max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
            if mu < MU_FLOOR:
                mu = MU_FLOOR
            nu = 2.0
            if done:
                status = _CONVERGED
                break
        else:
            # a rejected step with att on a kink that does not bound this fit: stop, as in lm_voxel
            kink = kink_near(abat + gap, vol)
            if not math.isnan(kink) and abs(kink - lo3 - abat) > KINK_S and abs(kink - hi3 - abat) > KINK_S:
                status = _CONVERGED
                break
            mu *= nu
            nu *= 2.0
            if mu > MU_CEILING:
                status = _CONVERGED
                break
    if status == _CONVERGED:
        if (_on_bound(cbf, lo0, hi0) or _on_bound(abv, lo1, hi1) or (free_abat and _on_bound(abat, lo2, hi2))
                or _on_bound(gap, lo3, hi3)):
            status = _AT_BOUND
    return cbf, abv, abat, gap, status, cost, n_eval, a00, a01, a02, a03, a11, a12, a13, a22, a23, a33


@serial
def _standard_errors_2c(a00, a01, a02, a03, a11, a12, a13, a22, a23, a33, free_abat, cost, n_vol):
    """:func:`_standard_errors` on scalars: (se cbf, se abv, se abat, se att) in API units from
    A = JᵀJ with respect to q = (cbf, abv, abat, gap); NaN where not estimable."""
    used0 = a00 > 0.0
    used1 = a11 > 0.0
    used2 = free_abat and a22 > 0.0
    used3 = a33 > 0.0
    dof = n_vol - (1 if used0 else 0) - (1 if used1 else 0) - (1 if used2 else 0) - (1 if used3 else 0)
    if dof <= 0:
        return np.nan, np.nan, np.nan, np.nan
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
        return np.nan, np.nan, np.nan, np.nan
    # the diagonal of cov(q) = A⁻¹ s² column by column, and cov(abat, gap) for att = abat + gap
    var0 = np.nan
    var1 = np.nan
    var2 = np.nan
    var3 = np.nan
    cov23 = np.nan
    if used0:
        var0 = _cholesky_solve_4(l00, l10, l11, l20, l21, l22, l30, l31, l32, l33, 1.0, 0.0, 0.0, 0.0)[0] * s2
    if used1:
        var1 = _cholesky_solve_4(l00, l10, l11, l20, l21, l22, l30, l31, l32, l33, 0.0, 1.0, 0.0, 0.0)[1] * s2
    if used2:
        var2 = _cholesky_solve_4(l00, l10, l11, l20, l21, l22, l30, l31, l32, l33, 0.0, 0.0, 1.0, 0.0)[2] * s2
    if used3:
        _, _, x2, x3 = _cholesky_solve_4(l00, l10, l11, l20, l21, l22, l30, l31, l32, l33, 0.0, 0.0, 0.0, 1.0)
        var3 = x3 * s2
        if used2:
            cov23 = x2 * s2
    se0 = math.sqrt(var0) if var0 >= 0.0 else np.nan
    se1 = math.sqrt(var1) if var1 >= 0.0 else np.nan
    se2 = math.sqrt(var2) if var2 >= 0.0 else np.nan
    se3 = math.sqrt(var3) if var3 >= 0.0 else np.nan
    if free_abat:
        var = var2 + var3 + 2.0 * cov23
        se3 = math.sqrt(var) if var >= 0.0 else np.nan
    return se0, se1, se2, se3


@parallel
def lm_two_compartment_batch(signals, tissue_by_volume, arterial, norms, pair_abat, pair_att, pair_alt, pairs, att_grid,
                             abat_grid, lower, upper, free_abat, vol, const, max_iter, xtol, ftol, n_chunks, params,
                             stderr, status, rss, n_eval):
    """Grid start and LM fit of every voxel for the 2C model (what :func:`lm_batch` does from
    :func:`grid_search` starts), with the same second starts and standard errors.

    ``lower``/``upper`` are the model's bounds (cbf, abv, abat, att); abat is held at the grid's
    value unless ``free_abat``.
    """
    n = signals.shape[0]
    n_vol = signals.shape[1]
    lo0, hi0, lo1, hi1, lo2, hi2 = lower[0], upper[0], lower[1], upper[1], lower[2], upper[2]
    lo_att, att_max = lower[3], upper[3]
    # internal: gap = att - abat in [0, upper att - lower abat]
    lo3 = 0.0
    hi3 = att_max - lo2
    for chunk in prange(n_chunks):
        ty = np.empty(tissue_by_volume.shape[1])
        ay = np.empty(max(tissue_by_volume.shape[1], arterial.shape[0]))
        for i in range(chunk * n // n_chunks, (chunk + 1) * n // n_chunks):
            y = signals[i]
            if is_invalid(y):
                for j in range(4):
                    params[i, j] = np.nan
                    stderr[i, j] = np.nan
                status[i] = _INVALID_INPUT
                rss[i] = np.nan
                n_eval[i] = 0
                continue
            k, alt, c, a, _ = grid_search_voxel(y, tissue_by_volume, arterial, norms, pair_abat, pair_att,
                                                pair_alt, pairs, ty, ay)
            cbf0 = min(max(c, lo0), hi0)
            abv0 = min(max(a, lo1), hi1)
            abat0 = min(max(abat_grid[pair_abat[k]], lo2), hi2)
            gap0 = max(min(max(att_grid[pair_att[k]], lo_att), att_max) - abat0, 0.0)
            (cbf, abv, abat, gap, code, cost, evals, a00, a01, a02, a03, a11, a12, a13, a22, a23,
             a33) = lm_two_compartment_voxel(y, cbf0, abv0, abat0, gap0, free_abat, lo0, hi0, lo1, hi1, lo2, hi2, lo3,
                                             hi3, att_max, vol, const, max_iter, xtol, ftol)
            # second starts: past a flat run of the grid; and where the fit ended on a kink, the
            # other parameters re-fitted with att held on it, then each side that offers descent
            kink = np.nan
            for attempt in range(1 + 3 * KINK_ROUNDS):
                stage = 0 if attempt == 0 else (attempt - 1) % 3 + 1  # 1 att held, 2 left side, 3 right side
                side_lo = lo3
                side_hi = hi3
                start_cbf = cbf
                start_abv = abv
                start_abat = abat
                start_gap = gap
                if attempt == 0:
                    if alt < 0:
                        continue
                    # the alternative pair's times with the best pair's amplitudes
                    start_cbf = cbf0
                    start_abv = abv0
                    start_abat = min(max(abat_grid[pair_abat[alt]], lo2), hi2)
                    start_gap = max(min(max(att_grid[pair_att[alt]], lo_att), att_max) - start_abat, 0.0)
                else:
                    if stage == 1:
                        new_kink = kink_near(abat + gap, vol)
                        if math.isnan(new_kink) or new_kink == kink:
                            break
                        kink = new_kink
                    # the kink as a gap from the current abat
                    edge = min(max(kink - abat, lo3), hi3)
                    if stage == 1:
                        side_lo = edge
                        side_hi = edge
                        start_gap = edge
                    else:
                        # one-sided att gradient (g = Jᵀr: positive means cost falls as att grows)
                        probe = edge - KINK_PROBE_S if stage == 2 else edge + KINK_PROBE_S
                        g_att = _normal_equations_2c(cbf, abv, abat, probe, free_abat, y, vol, const)[14]
                        evals += 1
                        if (stage == 2 and not g_att < 0.0) or (stage == 3 and not g_att > 0.0):
                            continue
                        if stage == 2:
                            side_hi = edge
                            start_gap = max(edge - KINK_SIDE_S, lo3)
                        else:
                            side_lo = edge
                            start_gap = min(edge + KINK_SIDE_S, hi3)
                (cbf2, abv2, abat2, gap2, code2, cost2, evals2, b00, b01, b02, b03, b11, b12, b13, b22, b23,
                 b33) = lm_two_compartment_voxel(y, start_cbf, start_abv, start_abat, start_gap, free_abat, lo0, hi0,
                                                 lo1, hi1, lo2, hi2, side_lo, side_hi, att_max, vol, const, max_iter,
                                                 xtol, ftol)
                evals += evals2
                if cost2 < cost * (1.0 - 1e-12):
                    # on a side bound that is not a bound of the model, the fit is still converged
                    if code2 == _AT_BOUND and attempt > 0:
                        code2 = _CONVERGED
                        if (_on_bound(cbf2, lo0, hi0) or _on_bound(abv2, lo1, hi1)
                                or (free_abat and _on_bound(abat2, lo2, hi2)) or _on_bound(gap2, lo3, hi3)):
                            code2 = _AT_BOUND
                    cbf, abv, abat, gap, code, cost = cbf2, abv2, abat2, gap2, code2, cost2
                    a00, a01, a02, a03, a11, a12, a13, a22, a23, a33 = b00, b01, b02, b03, b11, b12, b13, b22, b23, b33
            params[i, 0] = cbf
            params[i, 1] = abv
            params[i, 2] = abat
            params[i, 3] = abat + gap
            status[i] = code
            rss[i] = cost
            n_eval[i] = evals
            stderr[i, 0], stderr[i, 1], stderr[i, 2], stderr[i, 3] = _standard_errors_2c(
                a00, a01, a02, a03, a11, a12, a13, a22, a23, a33, free_abat, cost, n_vol)


def levenberg_marquardt(model: KineticModel, signals: np.ndarray, start: np.ndarray, *,
                        alt_start: np.ndarray | None = None, free: np.ndarray | None = None,
                        max_iter: int = 100, xtol: float = 1e-8, ftol: float = 1e-10) -> Estimate:
    """Fit ``signals`` (n, n_volumes) ΔM/M0t from ``start`` (n, n_params), API units.

    ``alt_start`` (rows of NaN for none) adds a second start per voxel; ``free`` (n_params
    booleans) holds parameters fixed at their start where False. Bounds are the model's;
    for 2C, abat <= att. Start values are clipped into the feasible set. Rows whose
    signal has a NaN/Inf or is all zeros get status INVALID_INPUT and NaN outputs.
    """
    y = check_signals(signals, model)
    names = model.param_names
    n_p = model.n_params
    lower, upper = model.bounds
    free_arr = np.ones(n_p, dtype=np.bool_) if free is None else np.asarray(free, dtype=np.bool_)
    order_lo, order_hi = (names.index("abat"), names.index("att")) if "abat" in names else (-1, -1)
    att_max = float(upper[names.index("att")])

    def internal(values: np.ndarray) -> np.ndarray:
        q = np.clip(np.array(values, dtype=np.float64, ndmin=2), lower, upper)
        if order_lo >= 0:
            q[:, order_hi] = np.maximum(q[:, order_hi] - q[:, order_lo], 0.0)
        return np.ascontiguousarray(q)

    q_start = internal(start)
    if q_start.shape != (y.shape[0], n_p):
        raise ValueError(f"start must have shape ({y.shape[0]}, {n_p}), got {np.shape(start)}")
    invalid = ~np.isfinite(y).all(axis=1) | ~(y != 0).any(axis=1)
    q_start[invalid] = np.nan
    q_alt = np.full_like(q_start, np.nan) if alt_start is None else internal(alt_start)
    q_lower, q_upper = lower.copy(), upper.copy()
    if order_lo >= 0:
        # internal parameter: gap = att - abat >= 0
        q_lower[order_hi], q_upper[order_hi] = 0.0, upper[order_hi] - lower[order_lo]
    n = y.shape[0]
    params = np.empty((n, n_p))
    stderr = np.empty((n, n_p))
    status = np.empty(n, dtype=np.int8)
    rss = np.empty(n)
    n_eval = np.empty(n, dtype=np.int64)
    lm_batch(y, q_start, q_alt, q_lower, q_upper, free_arr, order_lo, order_hi, names.index("att"), att_max,
             model.kernel_id,
             model.vol, model.const, int(max_iter), float(xtol), float(ftol), n_chunks_for(n),
             params, stderr, status, rss, n_eval)
    return Estimate(params, status, stderr, rss, names, "lm", info={"n_eval": n_eval})


class LevenbergMarquardtEstimator(Estimator):
    """Bounded Levenberg–Marquardt least squares from a global grid start.

    Parameters
    ----------
    model : the kinetic model (with its protocol).
    grid_step_s : step (s) of the start grid over the arrival times (default 0.1 s).
    max_iter : iteration limit per voxel (default 100).
    xtol : relative step tolerance (default 1e-8).
    ftol : relative cost-decrease tolerance (default 1e-10).
    fast_path : use the scalar kernels of the 1C and 2C models (default True); False runs the
        generic kernel, the same algorithm (kept as the reference the fast paths are tested against).
    """

    name = "lm"
    title = "Levenberg–Marquardt least-squares fitting (lm)"
    stderr_method = ("sqrt(diag((J^T J)^-1) * RSS / (n_volumes - n_estimated)) at the solution, with J the model "
                     "Jacobian and RSS the residual sum of squares; NaN where a parameter is held fixed or the data "
                     "do not inform it (e.g. 2C abat with hard arterial edges, 1C att below the shortest PLD)")

    def __init__(self, model: KineticModel, *, grid_step_s: float = 0.1, max_iter: int = 100,
                 xtol: float = 1e-8, ftol: float = 1e-10, fast_path: bool = True) -> None:
        super().__init__(model)
        self.grid_step_s = grid_step_s
        self.max_iter = max_iter
        self.xtol = xtol
        self.ftol = ftol
        self.fast_path = fast_path

    def options(self) -> dict[str, Any]:
        return {"grid_step_s": self.grid_step_s, "max_iter": self.max_iter, "xtol": self.xtol, "ftol": self.ftol,
                "fast_path": self.fast_path}

    def _fit(self, signals: np.ndarray | None, progress: bool) -> None:
        """Validate the options and build the start grid (no training)."""
        super()._fit(signals, progress)
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise ValueError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        for name in ("xtol", "ftol"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < 1):
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        self.grid_ = build_time_grid(self.model, float(self.grid_step_s))
        names = self.model.param_names
        self.free_ = np.ones(self.model.n_params, dtype=np.bool_)
        if "abat" in names and self.model.options()["arterial_edge_s"] == 0.0:
            self.free_[names.index("abat")] = False

    def _predict(self, y: np.ndarray, slice_offsets: None) -> Estimate:
        """Fit every voxel of ``y`` (n_voxels, n_volumes) ΔM/M0t from the grid start."""
        if self.fast_path and self.model.kernel_id == ONE_COMPARTMENT:
            return self._predict_one_compartment(y)
        if self.fast_path and self.model.kernel_id == TWO_COMPARTMENT:
            return self._predict_two_compartment(y)
        best_pair, alt_pair, amp, _, _ = grid_search(self.grid_, y)
        start = grid_params(self.model, self.grid_, best_pair, amp)
        alt_start = grid_params(self.model, self.grid_, np.where(alt_pair >= 0, alt_pair, -1), amp)
        return levenberg_marquardt(self.model, y, start, alt_start=alt_start, free=self.free_,
                                   max_iter=self.max_iter, xtol=self.xtol, ftol=self.ftol)

    def _predict_one_compartment(self, y: np.ndarray) -> Estimate:
        """The 1C fast path: grid start and fit in one scalar kernel per voxel."""
        n = y.shape[0]
        lower, upper = self.model.bounds
        params = np.empty((n, 2))
        stderr = np.empty((n, 2))
        status = np.empty(n, dtype=np.int8)
        rss = np.empty(n)
        n_eval = np.empty(n, dtype=np.int64)
        g = self.grid_
        lm_one_compartment_batch(y, g.tissue_by_volume, g.arterial, g.norms, g.pair_abat, g.pair_att, g.pair_alt, g.pairs,
                                 g.att, lower, upper, self.model.vol, self.model.const, self.max_iter, float(self.xtol),
                                 float(self.ftol), n_chunks_for(n), params, stderr, status, rss, n_eval)
        return Estimate(params, status, stderr, rss, self.model.param_names, self.name, info={"n_eval": n_eval})

    def _predict_two_compartment(self, y: np.ndarray) -> Estimate:
        """The 2C fast path: grid start and fit in one scalar kernel per voxel."""
        n = y.shape[0]
        lower, upper = self.model.bounds
        params = np.empty((n, 4))
        stderr = np.empty((n, 4))
        status = np.empty(n, dtype=np.int8)
        rss = np.empty(n)
        n_eval = np.empty(n, dtype=np.int64)
        g = self.grid_
        free_abat = bool(self.free_[self.model.param_names.index("abat")])
        lm_two_compartment_batch(y, g.tissue_by_volume, g.arterial, g.norms, g.pair_abat, g.pair_att, g.pair_alt,
                                 g.pairs, g.att, g.abat, lower, upper, free_abat, self.model.vol, self.model.const,
                                 self.max_iter, float(self.xtol), float(self.ftol), n_chunks_for(n), params, stderr,
                                 status, rss, n_eval)
        return Estimate(params, status, stderr, rss, self.model.param_names, self.name, info={"n_eval": n_eval})
