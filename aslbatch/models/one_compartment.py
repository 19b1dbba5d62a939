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
)


@serial
def tissue_voxel(cbf, att, vol, const, sig, jac, j_cbf, j_att, with_jac):
    """Tissue signal of one voxel into ``sig``; cbf in mL/100 g/min, att in s.

    With ``with_jac``, d sig/d cbf (per mL/100 g/min) goes to ``jac[:, j_cbf]`` and
    d sig/d att (per s) to ``jac[:, j_att]``.
    """
    n_vol = vol.shape[0]
    t1b = const[T1B]
    f = cbf / CBF_SCALE
    e_att = math.exp(-att / t1b)
    if const[T1_TISSUE] == 0.0:
        # T1' = T1b: arriving  K f T1b (e^(-att/T1b) - e^(-t/T1b));
        #            delivered K f T1b e^(-w/T1b) (1 - e^(-τ/T1b)), independent of att
        amp = const[LABEL] * t1b / CBF_SCALE
        for v in range(n_vol):
            t = vol[v, TIME]
            if t < att:
                sig[v] = 0.0
                if with_jac:
                    jac[v, j_cbf] = 0.0
                    jac[v, j_att] = 0.0
            elif t < att + vol[v, TAU]:
                shape = e_att - vol[v, EXP_TIME]
                sig[v] = amp * cbf * shape
                if with_jac:
                    jac[v, j_cbf] = amp * shape
                    jac[v, j_att] = -amp * cbf * e_att / t1b
            else:
                sig[v] = amp * cbf * vol[v, DELIVERED]
                if with_jac:
                    jac[v, j_cbf] = amp * vol[v, DELIVERED]
                    jac[v, j_att] = 0.0
        return
    # Buxton's T1': k = 1/T1' = 1/T1t + f/λ depends on flow. S = K e^(-att/T1b) f g(k) with
    # arriving g = (1 - e^(-k u))/k, u = t - att; delivered g = e^(-k d)(1 - e^(-k τ))/k, d = w - att.
    lam = const[LAMBDA]
    k = 1.0 / const[T1T] + f / lam
    pre = const[LABEL] * e_att
    for v in range(n_vol):
        t = vol[v, TIME]
        tau = vol[v, TAU]
        if t < att:
            sig[v] = 0.0
            if with_jac:
                jac[v, j_cbf] = 0.0
                jac[v, j_att] = 0.0
            continue
        if t < att + tau:
            u = t - att
            e_u = math.exp(-k * u)
            g = -math.expm1(-k * u) / k
            dg_dk = (u * e_u - g) / k
            dg_datt = -e_u
        else:
            d = vol[v, PLD] - att
            e_d = math.exp(-k * d)
            g = e_d * -math.expm1(-k * tau) / k
            dg_dk = -d * g - g / k + e_d * tau * math.exp(-k * tau) / k
            dg_datt = k * g
        s = pre * f * g
        sig[v] = s
        if with_jac:
            jac[v, j_cbf] = pre * (g + f * dg_dk / lam) / CBF_SCALE
            jac[v, j_att] = -s / t1b + pre * f * dg_datt


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
    param_names = ("cbf", "att")
    param_units = ("mL/100 g/min", "s")
    param_descriptions = (
        "cerebral blood flow (CBF)",
        "arterial transit time (ATT): arrival of the label in the tissue",
    )
    default_bounds = ((0.0, 0.0), (300.0, 5.0))
    default_training_ranges = {"cbf": (0.0, 150.0), "att": (0.5, 3.5)}
    kernel_id = 0  # aslbatch.models.kernels.ONE_COMPARTMENT
    _batch_kernel = staticmethod(batch_one_compartment)
