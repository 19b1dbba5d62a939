"""Pulsed ASL (Buxton 1998 general kinetic model; FAIR, EPISTAR, PICORE with a QUIPSS II /
Q2TIPS bolus cut-off): parameters cbf, att.

A slab of blood is inverted at t = 0 and the bolus is cut to a duration τ_b (BIDS: the first
``BolusCutOffDelayTime``); the readout time is t = TI (BIDS ``PostLabelingDelay`` for PASL).
The protocol of a PASL model therefore holds τ_b as ``label_duration`` and TI as ``pld``;
its per-volume table has TIME = TI and PLD = TI − τ_b (the readout's delay after the bolus
end, where the signal has its second kink: Levenberg–Marquardt's kink handling reads it).
With f = cbf/6000, 1/T1' the tissue relaxation rate (T1b, or Buxton's 1/T1t + f/λ),
k = 1/T1' − 1/T1b and t_hi = min(t, att + τ_b) (ASL_MODELS.md, PASL):

    ΔM/M0t = 0                                                     t < att
           = (2 α α_BS f / λ) e^(−t/T1') (e^(k t_hi) − e^(k att)) / k   t ≥ att

written here as (2 α α_BS f / λ) e^(−t/T1b) e^(−k u0) φ(k, d), with φ(k, d) =
(1 − e^(−k d))/k (→ d as k → 0), d = t_hi − att and u0 = t − t_hi: stable for every k.
"""

import math

import numpy as np
from numba import prange

from .._numba import parallel, serial
from .base import CBF_SCALE, DELIVERED, EXP_TIME, LABEL, LAMBDA, PLD, T1B, T1_TISSUE, T1T, TAU, TIME, KineticModel, \
    Parameter, volume_table
# LM's other five functions: q = (cbf, att) as for the one-compartment model (see below)
from .one_compartment import lm_att_offset, lm_params, lm_project, lm_start, lm_stderr  # noqa: F401

#: |k d| below which φ and dφ/dk use their Taylor series (relative error < 1e-16)
SERIES_KD = 1e-5


@serial
def relaxation_factor(k, d):
    """φ(k, d) = (1 − e^(−k d))/k and dφ/dk, for d >= 0 s and k in 1/s (φ → d as k → 0)."""
    kd = k * d
    if abs(kd) < SERIES_KD:
        return d * (1.0 - 0.5 * kd + kd * kd / 6.0), d * d * (-0.5 + kd / 3.0)
    e = math.exp(-kd)
    phi = -math.expm1(-kd) / k
    return phi, (d * e - phi) / k


@serial
def pasl_point(cbf, att, tau, t, exp_t, label, t1b, t1t, lam, buxton):
    """ΔM/M0t of one volume and its derivatives: (s, ds/dcbf per mL/100 g/min, ds/datt per s).

    cbf in mL/100 g/min, att, tau (bolus duration τ_b) and t (TI) in s, exp_t = exp(−t/T1b),
    label = 2 α α_BS / λ, t1b and t1t in s, lam in mL/g; ``buxton``: 1/T1' = 1/T1t + f/λ,
    else T1' = T1b.
    """
    if t < att:
        return 0.0, 0.0, 0.0
    f = cbf / CBF_SCALE
    arriving = t < att + tau
    d = t - att if arriving else tau
    if not buxton:  # k = 0: φ = d, no exponential left to evaluate
        h = exp_t * d
        return label * f * h, label * h / CBF_SCALE, -label * f * exp_t if arriving else 0.0
    k = 1.0 / t1t + f / lam - 1.0 / t1b
    u0 = 0.0 if arriving else t - att - tau
    phi, dphi_dk = relaxation_factor(k, d)
    e0 = math.exp(-k * u0) if u0 > 0.0 else 1.0
    h = exp_t * e0 * phi
    dh_dk = exp_t * e0 * (dphi_dk - u0 * phi)
    dh_datt = -exp_t * math.exp(-k * d) if arriving else k * h
    d_cbf = label * (h + f * dh_dk / lam) / CBF_SCALE
    return label * f * h, d_cbf, label * f * dh_datt


@serial
def pasl_voxel(params, vol, const, sig, jac, with_jac):
    """PASL signal (and Jacobian) of one voxel; params = (cbf, att)."""
    buxton = const[T1_TISSUE] != 0.0
    for v in range(vol.shape[0]):
        s, d_cbf, d_att = pasl_point(params[0], params[1], vol[v, TAU], vol[v, TIME], vol[v, EXP_TIME], const[LABEL],
                                     const[T1B], const[T1T], const[LAMBDA], buxton)
        sig[v] = s
        if with_jac:
            jac[v, 0] = d_cbf
            jac[v, 1] = d_att


# --- what Levenberg–Marquardt needs of this model (see aslbatch.estimators.lm) ----------------
# LM's internal parameters q are the model's, (cbf, att), as for the one-compartment model, whose
# other five functions (start, att offset, projection, parameters, standard errors; imported
# above) serve as they are.


@serial
def lm_normal_equations(q, y, vol, const):
    """Least-squares quantities of the PASL model at q = (cbf, att) for data ``y`` (ΔM/M0t), in one
    pass: (cost, A, g) with cost = |y − s|², A = JᵀJ's upper triangle (a00, a01, a11) and
    g = Jᵀ(y − s), J = (ds/dcbf, ds/datt) per mL/100 g/min and per s."""
    cbf, att = q[0], q[1]
    buxton = const[T1_TISSUE] != 0.0
    label, t1b, t1t, lam = const[LABEL], const[T1B], const[T1T], const[LAMBDA]
    cost = 0.0
    a00 = 0.0
    a01 = 0.0
    a11 = 0.0
    g0 = 0.0
    g1 = 0.0
    for v in range(vol.shape[0]):
        s, j0, j1 = pasl_point(cbf, att, vol[v, TAU], vol[v, TIME], vol[v, EXP_TIME], label, t1b, t1t, lam, buxton)
        r = y[v] - s
        cost += r * r
        a00 += j0 * j0
        a01 += j0 * j1
        a11 += j1 * j1
        g0 += j0 * r
        g1 += j1 * r
    return cost, (a00, a01, a11), (g0, g1)


@parallel
def batch_pasl(params, vol, const, sig, jac, with_jac):
    """PASL over voxels: params (n, 2) -> sig (n, n_vol) [and jac (n, n_vol, 2)]."""
    for i in prange(params.shape[0]):
        pasl_voxel(params[i], vol, const, sig[i], jac[i], with_jac)


def pasl_volume_table(protocol, constants) -> np.ndarray:
    """The per-volume table of a PASL protocol: TAU = τ_b, TIME = TI, PLD = TI − τ_b (s; the kinks
    of the signal are at att = TIME and att = PLD, as for PCASL), EXP_TIME = exp(−TI/T1b),
    DELIVERED = τ_b exp(−TI/T1b) (the fully delivered bolus for T1' = T1b)."""
    vol = volume_table(protocol, constants).copy()
    ti = protocol.pld
    vol[:, PLD] = ti - protocol.label_duration
    vol[:, TIME] = ti
    vol[:, EXP_TIME] = np.exp(-ti / constants.t1b)
    vol[:, DELIVERED] = protocol.label_duration * vol[:, EXP_TIME]
    vol.setflags(write=False)
    return vol


class PulsedModel(KineticModel):
    """Pulsed ASL (Buxton) model: cbf (mL/100 g/min) and att (s); the protocol's
    ``label_duration`` is the bolus duration τ_b and its ``pld`` the inversion time TI."""

    name = "pasl"
    title = "the pulsed-ASL (PASL, Buxton) kinetic model with a QUIPSS II / Q2TIPS bolus cut-off"
    parameters = (
        Parameter("cbf", "mL/100 g/min", "cerebral blood flow (CBF)", "",
                  bounds=(0.0, 300.0), training_range=(0.0, 150.0), display=(0.0, 100.0), cmap="inferno",
                  se_display=20.0),
        Parameter("att", "s", "arterial transit time (ATT)",
                  ", the time from the labeling inversion until the labeled blood reaches the tissue",
                  bounds=(0.0, 5.0), training_range=(0.2, 2.5), display=(0.2, 2.5), cmap="viridis",
                  se_display=1.0),
    )
    #: the white paper's PASL labeling efficiency (Alsop 2015), when no constants are given
    default_alpha = 0.98
    # the short bolus read every 0.3 s gives the cost several local minima in att: from a 0.1 s
    # start grid LM reached the optimum of the multi-start scipy oracle of
    # tests/test_pasl_estimators.py in 92-98 % of 200 voxels at SNR 3-10, from 0.025 s in
    # 98.5-100 %, for about a quarter of its voxels/s
    lm_grid_step_s = 0.025
    kernel_id = 2  # aslbatch.models.kernels.PULSED
    _batch_kernel = staticmethod(batch_pasl)
    _volume_table = staticmethod(pasl_volume_table)
