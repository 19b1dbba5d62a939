"""Two-compartment model with vascular crushing: parameters cbf, abv, abat, att.

ΔM/M0t = tissue(t) + arterial(t) for volumes without crushing, tissue(t) alone
for crushed volumes (DANTE or bipolar gradients). tissue is the one-compartment
signal with cbf and att (the research's tissue transit time, TTT); arterial is
2 α α_BS abv e^(-abat/T1b) / λ · W(t), with W the plug-flow window
[abat, abat + τ) (Chappell 2010), optionally smoothed by a Gaussian of width
``arterial_edge_s`` (ASL_MODELS.md).
"""

import math

from numba import prange

from .._numba import parallel, serial
from .base import (
    CBF_SCALE,
    CRUSHED,
    DELIVERED,
    EDGE_S,
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
from .one_compartment import tissue_point_blood, tissue_point_buxton, tissue_voxel

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)


@serial
def arterial_point(abv, abat, tau, t, amp, t1b, s_edge):
    """Arterial signal of one non-crushed volume and its derivatives: (s, ds/dabv, ds/dabat).

    abv in mL/mL, abat in s; tau, t = tau + pld (s); amp = 2 α α_BS e^(-abat/T1b) / λ.
    Hard edges (s_edge = 0): W = 1 for abat <= t < abat + τ, else 0, and d/d abat is only
    the decay term (the window's own derivative is zero almost everywhere). Smooth edges
    (s_edge > 0, s): W = Φ((t-abat)/s) - Φ((t-abat-τ)/s).
    """
    if s_edge == 0.0:
        window = 1.0 if (abat <= t and t < abat + tau) else 0.0
        dwindow = 0.0
    else:
        a = (t - abat) / s_edge
        b = (t - abat - tau) / s_edge
        window = 0.5 * (math.erf(a * _INV_SQRT_2) - math.erf(b * _INV_SQRT_2))
        dwindow = (math.exp(-0.5 * b * b) - math.exp(-0.5 * a * a)) * _INV_SQRT_2PI / s_edge
    return amp * abv * window, amp * window, amp * abv * (dwindow - window / t1b)


@serial
def arterial_voxel(abv, abat, vol, const, sig, jac, j_abv, j_abat, with_jac):
    """Add the arterial signal of one voxel to ``sig`` (see :func:`arterial_point`).

    With ``with_jac``, writes d/d abv and d/d abat (zero for crushed volumes).
    """
    t1b = const[T1B]
    s_edge = const[EDGE_S]
    amp = const[LABEL] * math.exp(-abat / t1b)
    for v in range(vol.shape[0]):
        if vol[v, CRUSHED] != 0.0:
            if with_jac:
                jac[v, j_abv] = 0.0
                jac[v, j_abat] = 0.0
            continue
        s, d_abv, d_abat = arterial_point(abv, abat, vol[v, TAU], vol[v, TIME], amp, t1b, s_edge)
        sig[v] += s
        if with_jac:
            jac[v, j_abv] = d_abv
            jac[v, j_abat] = d_abat


# --- what Levenberg–Marquardt needs of this model (see aslbatch.estimators.lm) ----------------
# LM's internal parameters are q = (cbf, abv, abat, gap = att - abat), so that the order
# abat <= att is the plain bound gap >= 0.


@serial
def lm_normal_equations(q, y, vol, const):
    """(cost, A, g) at q = (cbf, abv, abat, gap) for data ``y`` (ΔM/M0t), in one pass (no signal arrays).

    cost = |y - s|², A = JᵀJ's upper triangle (a00, a01, a02, a03, a11, a12, a13, a22, a23, a33)
    and g = Jᵀ(y - s), with respect to q: J = ds/d(cbf, abv, abat, att) per mL/100 g/min, per
    mL/mL, per s and per s, then abat's column becomes d/dabat + d/datt (the gap held).
    """
    cbf, abv, abat = q[0], q[1], q[2]
    att = abat + q[3]
    label, t1b = const[LABEL], const[T1B]
    s_edge = const[EDGE_S]
    e_att = math.exp(-att / t1b)
    amp_art = label * math.exp(-abat / t1b)
    blood = const[T1_TISSUE] == 0.0
    amp = label * t1b / CBF_SCALE
    t1t, lam = const[T1T], const[LAMBDA]
    cost = 0.0
    a00 = 0.0
    a01 = 0.0
    a02 = 0.0
    a03 = 0.0
    a11 = 0.0
    a12 = 0.0
    a13 = 0.0
    a22 = 0.0
    a23 = 0.0
    a33 = 0.0
    g0 = 0.0
    g1 = 0.0
    g2 = 0.0
    g3 = 0.0
    for v in range(vol.shape[0]):
        tau = vol[v, TAU]
        t = vol[v, TIME]
        if blood:
            s, j0, j3 = tissue_point_blood(cbf, att, e_att, tau, t, vol[v, EXP_TIME], vol[v, DELIVERED], amp, t1b)
        else:
            s, j0, j3 = tissue_point_buxton(cbf, att, e_att, tau, vol[v, PLD], t, label, t1b, t1t, lam)
        j1 = 0.0
        j2 = 0.0
        if vol[v, CRUSHED] == 0.0:
            s_a, j1, j2 = arterial_point(abv, abat, tau, t, amp_art, t1b, s_edge)
            s += s_a
        r = y[v] - s
        cost += r * r
        g0 += j0 * r
        g1 += j1 * r
        g2 += j2 * r
        g3 += j3 * r
        a00 += j0 * j0
        a01 += j0 * j1
        a02 += j0 * j2
        a03 += j0 * j3
        a11 += j1 * j1
        a12 += j1 * j2
        a13 += j1 * j3
        a22 += j2 * j2
        a23 += j2 * j3
        a33 += j3 * j3
    # abat's row and column gain att's (row first, then column)
    g2 += g3
    a22 = (a22 + a23) + (a23 + a33)
    a02 += a03
    a12 += a13
    a23 += a33
    return cost, (a00, a01, a02, a03, a11, a12, a13, a22, a23, a33), (g0, g1, g2, g3)


@serial
def lm_start(cbf, abv, abat, att, lower, upper):
    """LM's start q = (cbf, abv, abat, gap) from a grid point (mL/100 g/min, mL/mL, s, s),
    clipped into the model bounds ``lower``/``upper`` (tuples, model order) with abat <= att."""
    abat0 = min(max(abat, lower[2]), upper[2])
    gap0 = max(min(max(att, lower[3]), upper[3]) - abat0, 0.0)
    return min(max(cbf, lower[0]), upper[0]), min(max(abv, lower[1]), upper[1]), abat0, gap0


@serial
def lm_att_offset(q):
    """att (s) = q[3] + this offset: abat (q[3] is the gap)."""
    return q[2]


@serial
def lm_project(q, att_max):
    """q made feasible after a step: att = abat + gap capped at ``att_max`` (s)."""
    if q[2] + q[3] > att_max:
        return q[0], q[1], q[2], max(att_max - q[2], 0.0)
    return q


@serial
def lm_params(q):
    """Model parameters (cbf, abv, abat, att) from LM's q = (cbf, abv, abat, gap)."""
    return q[0], q[1], q[2], q[2] + q[3]


@serial
def lm_stderr(cov, free):
    """Standard errors of (cbf, abv, abat, att) from the covariance ``cov`` of q (NaN where not
    estimable): var(att) = var(abat) + var(gap) + 2 cov(abat, gap) when abat is free, else var(gap)."""
    se = (math.sqrt(cov[0][0]) if cov[0][0] >= 0.0 else math.nan,
          math.sqrt(cov[1][1]) if cov[1][1] >= 0.0 else math.nan,
          math.sqrt(cov[2][2]) if cov[2][2] >= 0.0 else math.nan,
          math.sqrt(cov[3][3]) if cov[3][3] >= 0.0 else math.nan)
    if not free[2]:
        return se
    var = cov[2][2] + cov[3][3] + 2.0 * cov[2][3]
    return se[0], se[1], se[2], math.sqrt(var) if var >= 0.0 else math.nan


@serial
def two_compartment_voxel(params, vol, const, sig, jac, with_jac):
    """2C signal (and Jacobian) of one voxel; params = (cbf, abv, abat, att)."""
    tissue_voxel(params[0], params[3], vol, const, sig, jac, 0, 3, with_jac)
    arterial_voxel(params[1], params[2], vol, const, sig, jac, 1, 2, with_jac)


@parallel
def batch_two_compartment(params, vol, const, sig, jac, with_jac):
    """2C over voxels: params (n, 4) -> sig (n, n_vol) [and jac (n, n_vol, 4)]."""
    for i in prange(params.shape[0]):
        two_compartment_voxel(params[i], vol, const, sig[i], jac[i], with_jac)


class TwoCompartmentModel(KineticModel):
    """Two-compartment (tissue + arterial) model with per-volume vascular crushing.

    Parameters
    ----------
    protocol, constants : as for every :class:`KineticModel`.
    arterial_edge_s : width (s) of the Gaussian smoothing of the arterial window;
        0 (default) = hard edges.
    """

    name = "2c"
    title = "the two-compartment (2C) kinetic model with vascular crushing"
    parameters = (
        Parameter("cbf", "mL/100 g/min", "cerebral blood flow (CBF)", "",
                  bounds=(0.0, 300.0), training_range=(0.0, 150.0), display=(0.0, 100.0), cmap="inferno",
                  se_display=20.0),
        Parameter("abv", "mL/mL", "arterial cerebral blood volume (aCBV)", " as a fraction of the voxel (0.01 = 1 %)",
                  bounds=(0.0, 0.1), training_range=(0.0, 0.03), display=(0.0, 0.03), cmap="inferno",
                  se_display=0.01),
        Parameter("abat", "s", "arterial bolus arrival time (the research's ATT in the two-compartment model)",
                  ", the time from the start of labeling until the labeled blood reaches the arteries of the voxel",
                  bounds=(0.0, 3.0), training_range=(0.3, 1.5), display=(0.3, 1.5), cmap="viridis",
                  se_display=0.5),
        Parameter("att", "s", "tissue transit time (the research's TTT)",
                  ", the time from the start of labeling until the labeled blood reaches the tissue "
                  "(in this model the research's ATT is abat)",
                  bounds=(0.0, 5.0), training_range=(0.3, 3.0), display=(0.5, 3.5), cmap="viridis",
                  se_display=1.0),
    )
    ordered_times = (("abat", "att", (0.0, 1.5)),)
    option_names = ("arterial_edge_s",)
    kernel_id = 1  # aslbatch.models.kernels.TWO_COMPARTMENT
    _batch_kernel = staticmethod(batch_two_compartment)

    def __init__(self, protocol, constants=None, *, arterial_edge_s: float = 0.0) -> None:
        edge = float(arterial_edge_s)
        if not math.isfinite(edge) or edge < 0:
            raise ValueError(f"arterial_edge_s must be a finite number >= 0 s, got {arterial_edge_s!r}")
        if edge > 1.0:
            raise ValueError(f"arterial_edge_s must be in seconds; {edge} s looks like milliseconds")
        self.arterial_edge_s = edge
        super().__init__(protocol, constants)

    def _edge_s(self) -> float:
        return self.arterial_edge_s

    def options(self):
        return {"arterial_edge_s": self.arterial_edge_s}

    def tissue_model(self):
        """The one-compartment model of the tissue term (cbf, att)."""
        from .one_compartment import OneCompartmentModel

        return OneCompartmentModel(self.protocol, self.constants)
