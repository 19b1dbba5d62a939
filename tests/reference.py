"""Slow, obviously-correct reference implementations of the ASL kinetic models.

Written directly from the equations of ``shared/ASL_MODELS.md``, independently of
``aslbatch.models`` (nothing is imported from it): plain Python scalars and ``math``,
one voxel and one volume at a time, each case of the piecewise model spelled out as
the document writes it. Used by the tests as an oracle; never import it from the package.

Units: cbf in mL/100 g/min (f = cbf / 6000 in mL/g/s), times in s, abv a fraction
of the voxel (mL/mL); signals are ΔM/M0t.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

#: (mL/100 g/min) per (mL/g/s)
CBF_PER_F = 6000.0


def t1_prime_value(f: float, *, t1b: float, t1t: float, lam: float, t1_prime: str) -> float:
    """T1' (s): T1b for ``"blood"``; Buxton's 1/T1' = 1/T1t + f/λ for ``"tissue"``."""
    if t1_prime == "blood":
        return t1b
    if t1_prime == "tissue":
        return 1.0 / (1.0 / t1t + f / lam)
    raise ValueError(f"unknown t1_prime {t1_prime!r}")


def tissue_point(
    cbf: float,
    att: float,
    tau: float,
    pld: float,
    *,
    t1b: float,
    t1t: float,
    alpha: float,
    alpha_bs: float,
    lam: float,
    t1_prime: str,
) -> float:
    """One-compartment ΔM/M0t of one volume (label duration tau, PLD pld)."""
    f = cbf / CBF_PER_F
    t1p = t1_prime_value(f, t1b=t1b, t1t=t1t, lam=lam, t1_prime=t1_prime)
    t = tau + pld
    a = 2.0 * alpha * alpha_bs * f * t1p * math.exp(-att / t1b) / lam
    if t < att:
        return 0.0
    if t < att + tau:
        return a * (1.0 - math.exp(-(t - att) / t1p))
    return a * math.exp(-(t - tau - att) / t1p) * (1.0 - math.exp(-tau / t1p))


def normal_cdf(x: float) -> float:
    """Φ(x), the standard normal cumulative distribution."""
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def arterial_window(t: float, abat: float, tau: float, edge_s: float) -> float:
    """W(t): 1 on [abat, abat + τ) for hard edges (edge_s = 0), else Φ((t-abat)/s) - Φ((t-abat-τ)/s)."""
    if edge_s == 0.0:
        return 1.0 if abat <= t < abat + tau else 0.0
    return normal_cdf((t - abat) / edge_s) - normal_cdf((t - abat - tau) / edge_s)


def arterial_point(
    abv: float, abat: float, tau: float, pld: float, *, t1b: float, alpha: float, alpha_bs: float, lam: float, edge_s: float
) -> float:
    """Arterial (macrovascular) ΔM/M0t of one non-crushed volume."""
    t = tau + pld
    return 2.0 * alpha * alpha_bs * abv * math.exp(-abat / t1b) / lam * arterial_window(t, abat, tau, edge_s)


def _per_volume(tau: float | Sequence[float], pld: Sequence[float]) -> tuple[list[float], list[float]]:
    plds = [float(w) for w in np.atleast_1d(pld)]
    taus = [float(x) for x in np.atleast_1d(tau)]
    if len(taus) == 1:
        taus = taus * len(plds)
    if len(taus) != len(plds):
        raise ValueError("tau and pld lengths differ")
    return taus, plds


def signal_1c(
    cbf: float,
    att: float,
    tau: float | Sequence[float],
    pld: Sequence[float],
    *,
    t1b: float = 1.65,
    t1t: float = 1.3,
    alpha: float = 0.85,
    alpha_bs: float = 1.0,
    lam: float = 0.9,
    t1_prime: str = "blood",
) -> np.ndarray:
    """One-compartment ΔM/M0t for every volume (per-volume tau and pld)."""
    taus, plds = _per_volume(tau, pld)
    return np.array(
        [
            tissue_point(cbf, att, x, w, t1b=t1b, t1t=t1t, alpha=alpha, alpha_bs=alpha_bs, lam=lam, t1_prime=t1_prime)
            for x, w in zip(taus, plds)
        ]
    )


def signal_2c(
    cbf: float,
    abv: float,
    abat: float,
    att: float,
    tau: float | Sequence[float],
    pld: Sequence[float],
    crushed: Sequence[bool],
    *,
    t1b: float = 1.65,
    t1t: float = 1.3,
    alpha: float = 0.85,
    alpha_bs: float = 1.0,
    lam: float = 0.9,
    t1_prime: str = "blood",
    edge_s: float = 0.0,
) -> np.ndarray:
    """Two-compartment ΔM/M0t: tissue + arterial, tissue only where crushed."""
    taus, plds = _per_volume(tau, pld)
    crushed = [bool(c) for c in np.atleast_1d(crushed)]
    if len(crushed) == 1:
        crushed = crushed * len(plds)
    out = []
    for x, w, c in zip(taus, plds, crushed):
        s = tissue_point(cbf, att, x, w, t1b=t1b, t1t=t1t, alpha=alpha, alpha_bs=alpha_bs, lam=lam, t1_prime=t1_prime)
        if not c:
            s += arterial_point(abv, abat, x, w, t1b=t1b, alpha=alpha, alpha_bs=alpha_bs, lam=lam, edge_s=edge_s)
        out.append(s)
    return np.array(out)


def pasl_point(
    cbf: float, att: float, tau_b: float, ti: float, *, t1b: float, t1t: float, alpha: float, alpha_bs: float,
    lam: float, t1_prime: str,
) -> float:
    """Pulsed-ASL (Buxton) ΔM/M0t of one volume read at TI = ``ti``, bolus duration ``tau_b``,
    as ASL_MODELS.md writes it: (2 α α_BS f/λ) e^(−t/T1') (e^(k t_hi) − e^(k att))/k, or
    (2 α α_BS f/λ)(t_hi − att) e^(−t/T1b) when k = 0."""
    f = cbf / CBF_PER_F
    t1p = t1_prime_value(f, t1b=t1b, t1t=t1t, lam=lam, t1_prime=t1_prime)
    k = 1.0 / t1p - 1.0 / t1b
    t = ti
    if t < att:
        return 0.0
    t_hi = min(t, att + tau_b)
    amp = 2.0 * alpha * alpha_bs * f / lam
    if k == 0.0:
        return amp * (t_hi - att) * math.exp(-t / t1b)
    return amp * math.exp(-t / t1p) * (math.exp(k * t_hi) - math.exp(k * att)) / k


def signal_pasl(cbf: float, att: float, tau_b: float | Sequence[float], ti: Sequence[float], *, t1b: float = 1.65,
                t1t: float = 1.3, alpha: float = 0.98, alpha_bs: float = 1.0, lam: float = 0.9,
                t1_prime: str = "blood") -> np.ndarray:
    """PASL ΔM/M0t for every volume (per-volume bolus duration and TI)."""
    taus, tis = _per_volume(tau_b, ti)
    return np.array([pasl_point(cbf, att, x, t, t1b=t1b, t1t=t1t, alpha=alpha, alpha_bs=alpha_bs, lam=lam,
                                t1_prime=t1_prime) for x, t in zip(taus, tis)])


def constants_kwargs(constants) -> dict:
    """Keyword arguments of signal_1c / signal_2c from an object with the Constants attributes."""
    return {
        "t1b": constants.t1b,
        "t1t": constants.t1t,
        "alpha": constants.alpha,
        "alpha_bs": constants.alpha_bs,
        "lam": constants.lam,
        "t1_prime": constants.t1_prime,
    }


def signals(
    model_name: str,
    params: np.ndarray,
    tau: Sequence[float],
    pld: Sequence[float],
    crushed: Sequence[bool] | None = None,
    *,
    edge_s: float = 0.0,
    **constants,
) -> np.ndarray:
    """Many voxels: params (n, 2) = (cbf, att) for "1c", (n, 4) = (cbf, abv, abat, att) for "2c".

    Returns (n, n_volumes).
    """
    params = np.asarray(params, dtype=np.float64)
    rows = []
    if model_name == "1c":
        for cbf, att in params.tolist():
            rows.append(signal_1c(cbf, att, tau, pld, **constants))
    elif model_name == "2c":
        if crushed is None:
            crushed = [False] * len(pld)
        for cbf, abv, abat, att in params.tolist():
            rows.append(signal_2c(cbf, abv, abat, att, tau, pld, crushed, edge_s=edge_s, **constants))
    else:
        raise ValueError(f"unknown model {model_name!r}")
    return np.array(rows).reshape(len(params), len(pld))


def central_difference_jacobian(fun: Callable[[np.ndarray], np.ndarray], params: Sequence[float] | np.ndarray, h: float | Sequence[float]) -> np.ndarray:
    """Central differences (fun(p + h_j e_j) - fun(p - h_j e_j)) / (2 h_j) for every parameter j.

    ``params`` has the parameters on its last axis, shape (..., n_params); ``fun`` maps such an
    array to outputs (..., n_out). ``h`` is one step or one step per parameter. Returns
    (..., n_out, n_params).
    """
    p = np.array(params, dtype=np.float64)
    n_params = p.shape[-1]
    steps = np.broadcast_to(np.asarray(h, dtype=np.float64), (n_params,))
    cols = []
    for j in range(n_params):
        up = p.copy()
        down = p.copy()
        up[..., j] += steps[j]
        down[..., j] -= steps[j]
        diff = np.asarray(fun(up), dtype=np.float64) - np.asarray(fun(down), dtype=np.float64)
        cols.append(diff / (2.0 * steps[j]))
    return np.stack(cols, axis=-1)


def signals_numpy(
    model_name: str,
    params: np.ndarray,
    tau: Sequence[float],
    pld: Sequence[float],
    crushed: Sequence[bool] | None = None,
    *,
    edge_s: float = 0.0,
    t1b: float,
    t1t: float,
    alpha: float,
    alpha_bs: float,
    lam: float,
    t1_prime: str,
) -> np.ndarray:
    """Vectorised numpy version of :func:`signals` (same equations, whole arrays at once).

    The speed baseline of the benchmarks: what a careful numpy implementation costs.
    """
    from scipy.special import ndtr

    params = np.asarray(params, dtype=np.float64)
    tau = np.broadcast_to(np.asarray(tau, dtype=np.float64), (len(pld),))
    w = np.asarray(pld, dtype=np.float64)
    t = tau + w
    cbf = params[:, :1]
    att = params[:, -1:]
    f = cbf / CBF_PER_F
    t1p = np.full_like(f, t1b) if t1_prime == "blood" else 1.0 / (1.0 / t1t + f / lam)
    amp = 2.0 * alpha * alpha_bs * f * t1p * np.exp(-att / t1b) / lam
    arriving = amp * (1.0 - np.exp(-(t - att) / t1p))
    delivered = amp * np.exp(-(t - tau - att) / t1p) * (1.0 - np.exp(-tau / t1p))
    out = np.where(t < att, 0.0, np.where(t < att + tau, arriving, delivered))
    if model_name == "1c":
        return out
    abv = params[:, 1:2]
    abat = params[:, 2:3]
    if edge_s == 0.0:
        window = ((abat <= t) & (t < abat + tau)).astype(np.float64)
    else:
        window = ndtr((t - abat) / edge_s) - ndtr((t - abat - tau) / edge_s)
    arterial = 2.0 * alpha * alpha_bs * abv * np.exp(-abat / t1b) / lam * window
    open_vols = ~np.asarray(crushed if crushed is not None else [False] * len(w), dtype=bool)
    return out + arterial * open_vols
