"""Low-SNR long-transit territory (issue 13.4): CBF error and status shares of LM and the LUT
against an exact bounded least-squares grid fit.

Phantom: the default 1C protocol (PCASL, τ 1.8 s, PLD 1.0–3.0 s by 0.5, so readouts at
t = 2.8–4.8 s), a delayed territory with att uniform in 2.0–2.6 s and cbf uniform in 20–60
mL/100 g/min, SNR 3 (σ from :func:`aslbatch.simulate.noise_sigma`), Gaussian noise (subtracted
ΔM) and Rician noise (the research's default), ``--voxels`` voxels each.

Oracle: for each att on a 1 ms grid over [0, t_max] (t_max the last readout time) the signal is
linear in cbf (T1' = T1b), so cbf is solved in closed form and clipped to [0, 300]; the
minimum-cost pair wins. It uses nothing of aslbatch's estimators.

"before" rows run today's code with the start grid's (LM) or table's (LUT) amplitudes unbounded
above, as they were, and show the estimator's own status (no undetermined flags); "after" rows
are the estimators as they are. A hot spot is a voxel with cbf on its 300 bound; "conv." means
status converged; "cost <= oracle": share of voxels whose residual is no higher than the oracle's.

Run: ``python -m benchmarks.study_long_transit [--voxels 40000] [--seed 1]``.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from aslbatch.estimators import Status, get_estimator
from aslbatch.models import get_model
from aslbatch.models.base import TIME
from aslbatch.protocol import default_protocol
from aslbatch.simulate import simulate

TERRITORY = {"cbf": (20.0, 60.0), "att": (2.0, 2.6)}
SNR = 3.0
#: cbf (mL/100 g/min) 2.5 times the territory's highest: a high value below the bound
HIGH_CBF = 150.0
#: att step (s) of the oracle's grid
ORACLE_STEP_S = 0.001


def grid_oracle(model, y: np.ndarray, step_s: float = ORACLE_STEP_S, chunk: int = 2000):
    """Exact bounded least squares over att in [0, t_max] on a ``step_s`` grid, cbf in closed form
    clipped to its bounds: (cbf, att, cost) per voxel."""
    t_max = float(model.vol[:, TIME].max())
    att = np.linspace(0.0, t_max, int(round(t_max / step_s)) + 1)
    cbf_lo, cbf_hi = model.bounds[0][0], model.bounds[1][0]
    basis = model.signal(np.column_stack([np.ones_like(att), att]))  # per mL/100 g/min (linear for T1' = T1b)
    bb = np.einsum("gv,gv->g", basis, basis)
    cbf, best_att, cost = np.empty(len(y)), np.empty(len(y)), np.empty(len(y))
    for s in range(0, len(y), chunk):
        block = y[s:s + chunk]
        yb = block @ basis.T
        c = np.clip(np.divide(yb, bb, out=np.zeros_like(yb), where=bb > 0), cbf_lo, cbf_hi)
        costs = np.einsum("iv,iv->i", block, block)[:, None] - 2.0 * c * yb + c * c * bb
        k = np.argmin(costs, axis=1)
        rows = np.arange(block.shape[0])
        cbf[s:s + chunk], best_att[s:s + chunk], cost[s:s + chunk] = c[rows, k], att[k], costs[rows, k]
    return cbf, best_att, cost


def _unbounded(estimator):
    """``estimator`` (fitted) with its grid's amplitudes unbounded above: the choice before issue 13.4."""
    estimator.grid_ = dataclasses.replace(estimator.grid_, amp_max=np.full(2, np.inf))
    return estimator


def _row(label, cbf, truth, status, rss=None, oracle_cost=None):
    hot = cbf >= 300.0 - 1e-9
    n = truth.size
    share = {code: np.count_nonzero(status == code) / n for code in Status if code != Status.INVALID_INPUT}
    no_worse = "" if rss is None else f"{np.mean(rss <= oracle_cost * (1 + 1e-9)):.4f}"
    converged = status == Status.CONVERGED
    return [label, f"{np.sqrt(np.mean((cbf - truth) ** 2)) / truth.mean():.3f}", f"{np.mean(cbf - truth):+.1f}",
            f"{np.sqrt(np.mean((cbf[converged] - truth[converged]) ** 2)) / truth[converged].mean():.3f}"
            if converged.any() else "-",
            f"{hot.mean():.2%}", f"{np.mean(hot & converged):.2%}", f"{np.mean((cbf > HIGH_CBF) & converged):.2%}",
            no_worse,
            *(f"{share[code]:.1%}" for code in share)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxels", type=int, default=40_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    model = get_model("1c", default_protocol("1c"))
    codes = [code.name.lower() for code in Status if code != Status.INVALID_INPUT]
    header = ["method", "NRMSE cbf", "bias", "NRMSE conv.", "hot spots", "hot & conv.", f">{HIGH_CBF:g} & conv.",
              "cost <= oracle", *codes]
    for noise in ("gaussian", "rician"):
        data = simulate(model, args.voxels, SNR, noise=noise, seed=args.seed, ranges=TERRITORY)
        y, truth = data.signals, data.params[:, 0]
        o_cbf, o_att, o_cost = grid_oracle(model, y)
        rows = [_row("grid oracle (att <= t_max)", o_cbf, truth, np.zeros(y.shape[0], np.int8))]
        for method in ("lm", "lut"):
            before = _unbounded(get_estimator(method, model).fit())._predict(y, None)
            after = get_estimator(method, model).fit().predict(y)
            for label, est in (("before", before), ("after", after)):
                rows.append(_row(f"{method} {label}", est["cbf"], truth, est.status, est.rss, o_cost))
        print(f"\n1C default protocol, territory cbf {TERRITORY['cbf']} att {TERRITORY['att']} s, SNR {SNR:g} "
              f"({noise}), {args.voxels} voxels; oracle att > 4.3 s in {np.mean(o_att > 4.3):.2%}")
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            print("  ".join(str(v).rjust(w) for v, w in zip(r, widths)))


if __name__ == "__main__":
    main()
