"""Reduced-size study of the spatial network's training (issue 17: lesion contrast at SNR 3, 1C edge att).

Trains the ``spatial`` network (network only, no variance networks) at ``--samples`` patches for each variant
of its training (:mod:`aslbatch.estimators.patches` constants changed for the run) and scores every variant
on the spatial phantom (:func:`aslbatch.evaluate_spatial.run_spatial_evaluation`) beside the voxelwise
supervised network and the smoothing baseline: interior GM NRMSE ratios, interior WM att, edge NRMSE and
att bias, lesion contrast. Variants (``current`` is the training of this aslbatch: prior version 6, the
CBF output log(cbf + 5) with its error taken on CBF, the 5×5 patch for 1C):

- ``linear``: CBF learnt as itself (the training before version 4);
- ``v4``: the 3×3 patch and its prior (version 4's input and prior for 1C);
- ``v4-shares``: the 5×5 patch with the 3×3 patch's shares of the geometries (lesions 30 %);
- ``no-step``: the 5×5 patch without the tissue step (regions of shared arrival arrive together).

Run: ``python benchmarks/study_spatial_prior.py [--samples N] [--snr 3,5] [--repeats R] [--variants a,b]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

from aslbatch.estimators import get_estimator, patches
from aslbatch.evaluate_spatial import BASELINE, run_spatial_evaluation
from aslbatch.models import get_model
from aslbatch.protocol import default_protocol

VARIANTS = {
    "current": {},
    "linear": {"target": "linear"},
    "v4-shares": {"SHARES": {**patches.SHARES, 2: patches.SHARES[1]}},
    "no-step": {"TISSUE_STEP_S": {1: 0.0, 2: 0.0}},
    "v4": {"radius": 1},
}


@contextlib.contextmanager
def prior(changes: dict):
    """The constants of :mod:`aslbatch.estimators.patches` changed."""
    old = {k: getattr(patches, k) for k in changes}
    for k, v in changes.items():
        setattr(patches, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(patches, k, v)


def train(model, changes: dict, n: int, seed: int = 0):
    """The spatial network trained on ``n`` patches of the changed prior (no variance networks)."""
    from aslbatch.estimators.spatial import SpatialEstimator
    from aslbatch.estimators.supervised import SupervisedEstimator

    changes = dict(changes)
    radius = changes.pop("radius", None)
    if radius is None:
        est = get_estimator("spatial", model, n_samples=n, seed=seed)
    else:  # the network of another patch radius: a subclass fixing it
        est = type(f"SpatialRadius{radius}", (SpatialEstimator,), {"radius": radius})(model, n_samples=n, seed=seed)
    linear = changes.pop("target", None) == "linear"
    with prior(changes):
        opts, rng, n_val = est._training_start(None)
        sets = [est._simulated(k, opts, rng) for k in (n, n_val)]
        t0 = time.perf_counter()
        if linear:  # the supervised network's training: CBF itself as the target, the plain MSE loss
            est._loss_head = lambda o, t, y: SupervisedEstimator._loss_head(est, o, t, y)
            est.network_, history = SupervisedEstimator._train(est, sets[0], sets[1], opts, rng, False)
        else:
            est.network_, history = est._train(sets[0], sets[1], opts, rng, False)
    if linear:
        est._cbf_from_output = lambda params: params  # the network's output is CBF already
    est.training_, est.fitted_ = history, True
    return est, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="1c")
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--snr", default="3", help="SNRs, comma-separated")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default="study-spatial-prior")
    args = parser.parse_args()
    model = get_model(args.model, default_protocol(args.model))
    snrs = [float(v) for v in args.snr.split(",")]
    extra = {}
    for name in args.variants.split(","):
        est, seconds = train(model, VARIANTS[name], args.samples)
        print(f"{name}: trained in {seconds:.0f} s, {est.training_.get('epochs')} epochs (load {os.getloadavg()[0]:.1f})",
              flush=True)
        extra[name] = (lambda e: lambda m, signals, mask: e.predict_image(signals, mask).params)(est)
    result = run_spatial_evaluation(Path(args.out), model_name=args.model, methods=["supervised", BASELINE],
                                    snrs=snrs, repeats=args.repeats, extra=extra)
    v = result.value
    for snr in snrs:
        print(f"\nSNR {snr:g}, {args.repeats} noise images, {args.samples} patches")
        for label in ["supervised", BASELINE, *extra]:
            ratio = {p: v(label, p, snr, "interior_gm", "nrmse") / v("supervised", p, snr, "interior_gm", "nrmse")
                     for p in ("cbf", "att")}
            print(f"{label:>10}: GM ratio cbf {ratio['cbf']:.2f} att {ratio['att']:.2f}; WM att "
                  f"{v(label, 'att', snr, 'interior_wm', 'nrmse'):.3f}; edge cbf {v(label, 'cbf', snr, 'edge', 'nrmse'):.3f} "
                  f"att {v(label, 'att', snr, 'edge', 'nrmse'):.3f} (bias {v(label, 'att', snr, 'edge', 'bias'):+.3f}); "
                  f"lesion {v(label, 'cbf', snr, 'lesion', 'lesion_contrast'):.2f}")


if __name__ == "__main__":
    main()
