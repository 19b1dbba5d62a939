"""Does a better approximation of the 1C spatial network's posterior mean keep more of a small lesion's
contrast at SNR 3 (issue 17's lesion target)? Same prior, same loss; only the approximation changes.

For each variant (hidden layers, training patches, seed, learning rate, patience) the 1C ``spatial`` network
is trained (network only, no variance networks; ``current``: the cached default network, not retrained) and
scored:

- on the spatial phantom (:func:`aslbatch.evaluate_spatial.run_spatial_evaluation`, ``--repeats`` noise
  images per SNR, the same images for every variant): lesion contrast kept at SNR 3 and 5, interior GM
  NRMSE of cbf and att over the voxelwise supervised network's, edge NRMSE, white-matter cbf bias;
- on 200 000 fresh patches of the current prior (:func:`aslbatch.estimators.patches.simulate_patches`):
  the RMSE of cbf and att (the prior-averaged error, which the posterior mean minimises: the measure of
  the approximation) and the calibration gap truth − estimate of cbf (mL/100 g/min) binned on the
  estimate (15-25, 30-40, 55-65) at SNR 4-6 and 8-12 (0 for the posterior mean).

Diagnostics of approximation error (``--diagnostics``): the first variant averaged over in-plane
symmetries of its patch (2: identity and transpose, the only symmetries of the priors before version 7, whose
lesions lay beside the centre only on the negative side of each axis; 8: the square's dihedral group, every
symmetry of the prior since), and the
ensemble mean of all variants' networks: both lower the prior-averaged error without a new prior.

Run: ``python benchmarks/study_spatial_capacity.py [--repeats R] [--diagnostics] VARIANT ...`` with
``VARIANT`` ``current`` or ``NAME=LAYERS:SAMPLES[:option=value,...]``, e.g. ``w96=96x96:3e6`` or
``seed1=64x64:1e6:seed=1`` (options of :class:`~aslbatch.estimators.spatial.SpatialEstimator`).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from aslbatch.estimators import get_estimator
from aslbatch.estimators.neural import constrain
from aslbatch.estimators.patches import gather_patches, neighbour_offsets, neighbour_rows, simulate_patches, usable_rows
from aslbatch.estimators.spatial import SpatialEstimator
from aslbatch.estimators.store import NetworkCache
from aslbatch.evaluate_spatial import BASELINE, run_spatial_evaluation
from aslbatch.models import get_model
from aslbatch.protocol import default_protocol

SNRS = (3.0, 5.0)
#: (SNR range, estimate range) bins of the calibration gap, as in the lead's lesion-weight study
GAP_SNR, GAP_CBF = ((4, 6), (8, 12)), ((15, 25), (30, 40), (55, 65))


def trained(model, spec: str) -> tuple[str, SpatialEstimator, float]:
    """The variant ``spec`` (module docstring), trained, and its training time (s, simulation excluded)."""
    if spec == "current":
        est = NetworkCache().get(get_estimator("spatial", model))
        return spec, est, float(est.training_["training_seconds"])
    name, recipe = spec.split("=", 1)
    layers, samples, *rest = recipe.split(":")
    options: dict = {}
    for item in (rest[0].split(",") if rest else []):
        key, value = item.split("=")
        options[key] = int(value) if key in ("seed", "patience", "max_epochs", "batch_size") else float(value)
    est = SpatialEstimator(model, hidden_layers=tuple(int(w) for w in layers.split("x")),
                           n_samples=int(float(samples)), **options)
    opts, rng, n_val = est._training_start(None)
    train, val = (est._simulated(k, opts, rng) for k in (opts["n_samples"], n_val))
    t0 = time.perf_counter()
    est.network_, est.training_ = est._train(train, val, opts, rng, False)
    est.fitted_ = True
    return name, est, time.perf_counter() - t0


def symmetries(radius: int, order: int) -> list[np.ndarray]:
    """Neighbour permutations of the patch of ``radius``: identity and transpose (``order`` 2) or the
    8 symmetries of the square; entry k is the neighbour whose signals take neighbour k's place."""
    offsets = neighbour_offsets(radius)
    index = {o: k for k, o in enumerate(offsets)}
    maps = [(s, t, swap) for s in (1, -1) for t in (1, -1) for swap in (False, True)]
    maps = maps if order == 8 else [(1, 1, False), (1, 1, True)]
    return [np.array([index[(t * b, s * a) if swap else (s * a, t * b)] for a, b in offsets]) for s, t, swap in maps]


def permuted(inputs: np.ndarray, perm: np.ndarray, n_volumes: int) -> np.ndarray:
    """Patch input rows with neighbour ``perm[k]``'s signals and presence flag in neighbour k's place."""
    k = perm.size
    out = inputs.copy()
    blocks = inputs[:, n_volumes:n_volumes * (k + 1)].reshape(len(inputs), k, n_volumes)
    out[:, n_volumes:n_volumes * (k + 1)] = blocks[:, perm].reshape(len(inputs), -1)
    flags = n_volumes * (k + 1)
    out[:, flags:flags + k] = inputs[:, flags + perm]
    return out


def averaged(networks: list[SpatialEstimator], order: int = 1):
    """Raw estimates (n, n_params) of patch inputs: the mean over ``networks`` and, for ``order`` 2 or 8,
    over the patch's symmetries."""
    def raw(inputs: np.ndarray) -> np.ndarray:
        perms = [None] if order == 1 else symmetries(networks[0].radius, order)
        nv = networks[0].model.n_volumes
        return np.mean([e._raw_predict(inputs if p is None else permuted(inputs, p, nv))
                        for e in networks for p in perms], axis=0)
    return raw


def image_method(raw, radius: int):
    """An ``extra`` method of :func:`run_spatial_evaluation` from raw estimates of patch inputs."""
    def estimate(model, signals, mask):
        params = raw(gather_patches(signals, neighbour_rows(mask, (0, 1), radius)))
        constrain(model, params)
        params[~usable_rows(signals)] = np.nan
        return params
    return estimate


def prior_scores(model, raw, patches) -> tuple[np.ndarray, list[float]]:
    """RMSE (n_params,) on the fresh patches and the cbf calibration gaps (mL/100 g/min) in the bins."""
    inputs, truth, snr = patches
    est = raw(inputs)
    cbf = model.param_names.index("cbf")
    gaps = []
    for lo, hi in GAP_SNR:
        for c0, c1 in GAP_CBF:
            sel = (snr > lo) & (snr < hi) & (est[:, cbf] > c0) & (est[:, cbf] < c1)
            gaps.append(float(truth[sel, cbf].mean() - est[sel, cbf].mean()))
    return np.sqrt(np.mean((est - truth) ** 2, axis=0)), gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--diagnostics", action="store_true")
    parser.add_argument("--out", default="study-spatial-capacity")
    args = parser.parse_args()
    model = get_model("1c", default_protocol("1c"))
    patches = simulate_patches(model, 200_000, (2.0, 50.0), "rician", (), np.random.default_rng(11), 2)
    networks, methods = {}, {}
    for spec in args.variants:
        name, est, seconds = trained(model, spec)
        networks[name] = est
        methods[name] = averaged([est])
        print(f"{name}: {est.network_.hidden_layers}, {est.options()['n_samples']} patches, trained in {seconds:.0f} s, "
              f"{est.training_['epochs']} epochs (load {os.getloadavg()[0]:.1f})", flush=True)
    if args.diagnostics:
        first = next(iter(networks.values()))
        methods["sym2"], methods["sym8"] = averaged([first], 2), averaged([first], 8)
        if len(networks) > 1:
            methods["ensemble"] = averaged(list(networks.values()))
    radius = next(iter(networks.values())).radius
    extra = {name: image_method(raw, radius) for name, raw in methods.items()}
    result = run_spatial_evaluation(Path(args.out), model_name="1c", methods=["supervised", BASELINE], snrs=SNRS,
                                    repeats=args.repeats, extra=extra)
    v = result.value
    print(f"\n{args.repeats} noise images per SNR; gap: truth − estimate of cbf at SNR {GAP_SNR} × estimate {GAP_CBF}")
    for name in ["supervised", BASELINE, *methods]:
        row = []
        for snr in SNRS:
            ratio = [v(name, p, snr, "interior_gm", "nrmse") / v("supervised", p, snr, "interior_gm", "nrmse")
                     for p in ("cbf", "att")]
            row.append(f"SNR {snr:g} lesion {v(name, 'cbf', snr, 'lesion', 'lesion_contrast'):.3f} GM {ratio[0]:.2f}/"
                       f"{ratio[1]:.2f}x edge {v(name, 'cbf', snr, 'edge', 'nrmse'):.3f}/"
                       f"{v(name, 'att', snr, 'edge', 'nrmse'):.3f}")
        if name in methods:
            rmse, gaps = prior_scores(model, methods[name], patches)
            row.append(f"patch RMSE {rmse[0]:.3f}/{rmse[1]:.4f} gap " + " ".join(f"{g:+.1f}" for g in gaps))
        print(f"{name:>12}: " + "; ".join(row))


if __name__ == "__main__":
    main()
