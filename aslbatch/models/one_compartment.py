"""One-compartment (Buxton 1998 general kinetic) model for PCASL: parameters cbf, att.

ΔM/M0t = 0 before the bolus arrives (t < att), A (1 - e^(-(t-att)/T1')) while it
arrives, A e^(-(t-τ-att)/T1') (1 - e^(-τ/T1')) once delivered, with
A = 2 α α_BS f T1' e^(-att/T1b) / λ and f = cbf / 6000 (ASL_MODELS.md).
"""

import math

from numba import prange

from .._numba import parallel, serial
from .base import (
    CBF_SCALE,
    DELIVERED,
    EXP_TIME,
    LABEL,
    LAMBDA,
    PLD,
    T1B,
    T1_TISSUE,
    T1T,
    TAU,
    TIME,
    KineticModel,
    Parameter,
)


@serial
def tissue_point_blood(cbf, att, e_att, tau, t, exp_t, delivered, amp, t1b):
    """Tissue signal of one volume with T1' = T1b and its derivatives: (s, ds/dcbf, ds/datt).

    cbf in mL/100 g/min, att in s, e_att = exp(-att/T1b); tau, t = tau + pld (s); the volume's
    precomputed exp_t = exp(-t/T1b) and delivered = exp(-pld/T1b)(1 - exp(-tau/T1b));
    amp = 2 α α_BS T1b / (λ 6000). Arriving: amp cbf (e^(-att/T1b) - e^(-t/T1b));
    delivered: amp cbf e^(-w/T1b) (1 - e^(-τ/T1b)), independent of att.
    Derivatives per mL/100 g/min and per s.
    """
    if t < att:
        return 0.0, 0.0, 0.0
    if t < att + tau:
        shape = e_att - exp_t
        return amp * cbf * shape, amp * shape, -amp * cbf * e_att / t1b
    return amp * cbf * delivered, amp * delivered, 0.0


@serial
def tissue_point_buxton(cbf, att, e_att, tau, pld, t, label, t1b, t1t, lam):
    """Tissue signal of one volume with Buxton's T1' (1/T1' = 1/T1t + f/λ): (s, ds/dcbf, ds/datt).

    S = K e^(-att/T1b) f g(k), k = 1/T1', arriving g = (1 - e^(-k u))/k with u = t - att,
    delivered g = e^(-k d)(1 - e^(-k τ))/k with d = pld - att; label = K = 2 α α_BS / λ.
    Units as in :func:`tissue_point_blood`; t1t in s, lam in mL/g.
    """
    if t < att:
        return 0.0, 0.0, 0.0
    f = cbf / CBF_SCALE
    k = 1.0 / t1t + f / lam
    pre = label * e_att
    if t < att + tau:
        u = t - att
        e_u = math.exp(-k * u)
        g = -math.expm1(-k * u) / k
        dg_dk = (u * e_u - g) / k
        dg_datt = -e_u
    else:
        d = pld - att
        e_d = math.exp(-k * d)
        g = e_d * -math.expm1(-k * tau) / k
        dg_dk = -d * g - g / k + e_d * tau * math.exp(-k * tau) / k
        dg_datt = k * g
    s = pre * f * g
    return s, pre * (g + f * dg_dk / lam) / CBF_SCALE, -s / t1b + pre * f * dg_datt


@serial
def tissue_voxel(cbf, att, vol, const, sig, jac, j_cbf, j_att, with_jac):
    """Tissue signal of one voxel into ``sig``; cbf in mL/100 g/min, att in s.

    With ``with_jac``, d sig/d cbf (per mL/100 g/min) goes to ``jac[:, j_cbf]`` and
    d sig/d att (per s) to ``jac[:, j_att]``.
    """
    label, t1b = const[LABEL], const[T1B]
    e_att = math.exp(-att / t1b)
    if const[T1_TISSUE] == 0.0:
        amp = label * t1b / CBF_SCALE
        for v in range(vol.shape[0]):
            s, d_cbf, d_att = tissue_point_blood(cbf, att, e_att, vol[v, TAU], vol[v, TIME], vol[v, EXP_TIME],
                                                 vol[v, DELIVERED], amp, t1b)
            sig[v] = s
            if with_jac:
                jac[v, j_cbf] = d_cbf
                jac[v, j_att] = d_att
        return
    t1t, lam = const[T1T], const[LAMBDA]
    for v in range(vol.shape[0]):
        s, d_cbf, d_att = tissue_point_buxton(cbf, att, e_att, vol[v, TAU], vol[v, PLD], vol[v, TIME], label, t1b,
                                              t1t, lam)
        sig[v] = s
        if with_jac:
            jac[v, j_cbf] = d_cbf
            jac[v, j_att] = d_att


# --- what Levenberg–Marquardt needs of this model (see aslbatch.estimators.lm) ----------------
# LM's internal parameters q are the model's, (cbf, att).


@serial
def lm_normal_equations(q, y, vol, const):
    """Least-squares quantities of the 1C model at q = (cbf, att) for data ``y`` (ΔM/M0t), in one
    pass (no signal arrays): (cost, A, g) with cost = |y - s|², A = JᵀJ's upper triangle
    (a00, a01, a11) and g = Jᵀ(y - s) = (g0, g1), J = (ds/dcbf, ds/datt) per mL/100 g/min and per s.
    """
    cbf, att = q[0], q[1]
    label, t1b = const[LABEL], const[T1B]
    e_att = math.exp(-att / t1b)
    cost = 0.0
    a00 = 0.0
    a01 = 0.0
    a11 = 0.0
    g0 = 0.0
    g1 = 0.0
    blood = const[T1_TISSUE] == 0.0
    amp = label * t1b / CBF_SCALE
    t1t, lam = const[T1T], const[LAMBDA]
    for v in range(vol.shape[0]):
        if blood:
            s, j0, j1 = tissue_point_blood(cbf, att, e_att, vol[v, TAU], vol[v, TIME], vol[v, EXP_TIME],
                                           vol[v, DELIVERED], amp, t1b)
        else:
            s, j0, j1 = tissue_point_buxton(cbf, att, e_att, vol[v, TAU], vol[v, PLD], vol[v, TIME], label, t1b,
                                            t1t, lam)
        r = y[v] - s
        cost += r * r
        a00 += j0 * j0
        a01 += j0 * j1
        a11 += j1 * j1
        g0 += j0 * r
        g1 += j1 * r
    return cost, (a00, a01, a11), (g0, g1)


@serial
def lm_start(cbf, abv, abat, att, lower, upper):
    """LM's start q from a grid point (cbf in mL/100 g/min, att in s; abv and abat unused),
    clipped into the model bounds ``lower``/``upper`` (tuples)."""
    return min(max(cbf, lower[0]), upper[0]), min(max(att, lower[1]), upper[1])


@serial
def lm_att_offset(q):
    """att (s) = q[1] + this offset: q holds att itself."""
    return 0.0


@serial
def lm_project(q, att_max):
    """q made feasible after a step: the bounds already are, nothing else to enforce."""
    return q


@serial
def lm_params(q):
    """Model parameters (cbf, att) from LM's q: the same."""
    return q


@serial
def lm_stderr(cov, free):
    """Standard errors (mL/100 g/min, s) from the covariance ``cov`` of q (NaN where not estimable)."""
    return (math.sqrt(cov[0][0]) if cov[0][0] >= 0.0 else math.nan,
            math.sqrt(cov[1][1]) if cov[1][1] >= 0.0 else math.nan)


@serial
def one_compartment_voxel(params, vol, const, sig, jac, with_jac):
    """1C signal (and Jacobian) of one voxel; params = (cbf, att)."""
    tissue_voxel(params[0], params[1], vol, const, sig, jac, 0, 1, with_jac)


@parallel
def batch_one_compartment(params, vol, const, sig, jac, with_jac):
    """1C over voxels: params (n, 2) -> sig (n, n_vol) [and jac (n, n_vol, 2)]."""
    for i in prange(params.shape[0]):
        one_compartment_voxel(params[i], vol, const, sig[i], jac[i], with_jac)


class OneCompartmentModel(KineticModel):
    """One-compartment PCASL model: cbf (mL/100 g/min) and att (s)."""

    name = "1c"
    title = "the one-compartment (1C) kinetic model"
    parameters = (
        Parameter("cbf", "mL/100 g/min", "cerebral blood flow (CBF)", "",
                  bounds=(0.0, 300.0), training_range=(0.0, 150.0), display=(0.0, 100.0), cmap="inferno",
                  se_display=20.0),
        Parameter("att", "s", "arterial transit time (ATT)",
                  ", the time from the start of labeling until the labeled blood reaches the tissue",
                  bounds=(0.0, 5.0), training_range=(0.5, 3.5), display=(0.5, 3.5), cmap="viridis",
                  se_display=1.0),
    )
    kernel_id = 0  # aslbatch.models.kernels.ONE_COMPARTMENT
    _batch_kernel = staticmethod(batch_one_compartment)
