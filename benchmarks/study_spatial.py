"""The study behind the ``spatial`` network (issue 17): its accuracy on spatial phantoms, against the
voxelwise methods and the smoothing baseline; a physics-informed spatial variant; speed; training time.

For each model (1C and 2C, default protocols) :func:`aslbatch.evaluate_spatial.run_spatial_evaluation`
scores LM, the voxelwise supervised and unsupervised networks (cached, default options), the
baseline ``smooth-lm`` and ``spatial`` at SNR 3 and 5, ``--repeats`` noise realisations each; 1C also
scores two networks trained on each noisy image itself with the kinetic-model signal loss (the
``unsupervised`` head, :mod:`aslbatch.estimators._mlp`), the same trainer and options, differing only
in their input: ``physics-voxel`` (the voxel's signals) and ``physics-patch`` (its 3×3 patch input,
:mod:`aslbatch.estimators.patches`): does the neighbourhood help a network trained on the data?
Then the issue's targets are printed (ratios to the voxelwise supervised network), the spatial
networks' training time (from their cards), image inference in voxels/s for spatial and supervised
on a 1.1·10⁶-voxel image (1 and 2 threads, same run), and the refusal of another protocol.

Run: ``python benchmarks/study_spatial.py [--out DIR] [--repeats R] [--models 1c,2c] [--skip-physics]``; reports
(``report.md``, figures) go to ``DIR/<model>/``.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import numba
import numpy as np
from threadpoolctl import threadpool_limits

from aslbatch.estimators import get_estimator
from aslbatch.estimators.patches import gather_patches, neighbour_rows
from aslbatch.estimators.store import NetworkCache, NetworkMismatch, load_network
from aslbatch.evaluate_spatial import BASELINE, REGIONS, run_spatial_evaluation
from aslbatch.models import get_model
from aslbatch.protocol import Protocol, default_protocol
from aslbatch.simulate import noise_sigma, simulate

SNRS = (3.0, 5.0)
#: the issue's targets: spatial / supervised NRMSE in interior grey matter, per model and parameter
TARGETS = {"1c": {"cbf": 0.7, "att": 0.8}, "2c": {"cbf": 0.8, "att": 0.8}}
LESION_TARGET = 0.8


def physics_informed(neighbourhood: bool):
    """An estimator trained on the image itself through the kinetic model (1C): see the module docstring."""

    def estimate(model, signals, mask):
        from sklearn.preprocessing import StandardScaler

        from aslbatch.estimators import _mlp
        from aslbatch.estimators.network import Network
        from aslbatch.estimators.neural import constrain
        from aslbatch.estimators.trainer import train_network
        from aslbatch.estimators.unsupervised import UnsupervisedEstimator

        x = gather_patches(signals, neighbour_rows(mask), dtype=np.float64) if neighbourhood else signals
        reference = UnsupervisedEstimator(model)
        order = np.random.default_rng(0).permutation(x.shape[0])
        n_val = x.shape[0] // 10
        scaler = StandardScaler().fit(x)
        sizes = [x.shape[1], 64, 64, model.n_params]
        theta, _ = train_network(sizes, scaler.transform(x[order[n_val:]]), signals[order[n_val:]],
                                 scaler.transform(x[order[:n_val]]), signals[order[:n_val]],
                                 reference._head(_mlp.HEAD_SIGNAL_MSE, None), alpha=0.0, batch_size=256,
                                 learning_rate=1e-3, max_epochs=100, patience=8, seed=0)
        lower, upper = reference.output_bounds()
        layers = _mlp.unpack(theta, sizes)
        network = Network(tuple(w.copy() for w, _ in layers), tuple(b.copy() for _, b in layers), scaler.mean_,
                          scaler.scale_, lower, upper - lower, output_transform="sigmoid")
        params = network.predict(x)
        constrain(model, params)
        return params

    return estimate


def targets(result, model_name: str) -> None:
    """The issue's figures for one model."""
    v = result.value
    print(f"\n== {model_name}: targets (spatial / supervised NRMSE; edge NRMSE of spatial, supervised, {BASELINE})")
    for snr in SNRS:
        for param, target in TARGETS[model_name].items():
            sp, sup = v("spatial", param, snr, "interior_gm", "nrmse"), v("supervised", param, snr, "interior_gm", "nrmse")
            print(f"SNR {snr:g} {param}: interior GM NRMSE spatial {sp:.3f} supervised {sup:.3f} ratio {sp / sup:.2f} "
                  f"(target <= {target}) {'PASS' if sp / sup <= target else 'FAIL'}")
            edge = {m: v(m, param, snr, "edge", "nrmse") for m in ("spatial", "supervised", BASELINE)}
            bias = {m: v(m, param, snr, "edge", "bias") for m in ("spatial", "supervised", BASELINE)}
            print("    edge NRMSE " + ", ".join(f"{m} {e:.3f} (bias {bias[m]:+.3f})" for m, e in edge.items()) +
                  f": no worse than supervised {'PASS' if edge['spatial'] <= edge['supervised'] else 'FAIL'}, "
                  f"better than {BASELINE} {'PASS' if edge['spatial'] < edge[BASELINE] else 'FAIL'}")
        kept = {m: v(m, "cbf", snr, "lesion", "lesion_contrast") for m in ("spatial", "supervised", "lm", BASELINE)}
        print("    lesion contrast kept: " + ", ".join(f"{m} {k:.2f}" for m, k in kept.items()) +
              f" (target spatial >= {LESION_TARGET}) {'PASS' if kept['spatial'] >= LESION_TARGET else 'FAIL'}")
    print("spatial standard errors at the noise SD of the SNR: coverage 68 % / 95 % (z SD) per region; "
          "share flagged prior-dominated")
    for snr in SNRS:
        for param in result_params(result):
            print(f"SNR {snr:g} {param}: " + "; ".join(
                f"{region} {v('spatial', param, snr, region, 'coverage_68'):.3f}/{v('spatial', param, snr, region, 'coverage_95'):.3f}"
                f" ({v('spatial', param, snr, region, 'z_sd'):.2f})" for region in REGIONS)
                  + f"; flagged {v('spatial', param, snr, 'interior_gm', 'prior_dominated'):.3f} (GM) "
                  f"{v('spatial', param, snr, 'interior_wm', 'prior_dominated'):.3f} (WM)")
    for extra in ("physics-voxel", "physics-patch"):
        if np.isfinite(v(extra, "cbf", SNRS[0], "interior_gm", "nrmse")):
            print(f"{extra}: " + "; ".join(
                f"SNR {snr:g} interior GM cbf {v(extra, 'cbf', snr, 'interior_gm', 'nrmse'):.3f} att "
                f"{v(extra, 'att', snr, 'interior_gm', 'nrmse'):.3f} edge cbf {v(extra, 'cbf', snr, 'edge', 'nrmse'):.3f} "
                f"att {v(extra, 'att', snr, 'edge', 'nrmse'):.3f} lesion {v(extra, 'cbf', snr, 'lesion', 'lesion_contrast'):.2f}"
                for snr in SNRS))


def result_params(result) -> list[str]:
    """The parameters of an evaluation's rows, in order."""
    return list(dict.fromkeys(r["parameter"] for r in result.rows if r["metric"] == "coverage_95"))


def training_time(model_name: str) -> None:
    model = get_model(model_name, default_protocol(model_name))
    estimator = NetworkCache().get(get_estimator("spatial", model))
    t = estimator.training_
    variance = sum(h.get("training_seconds", 0.0) for h in t.get("variance", {}).values() if isinstance(h, dict))
    print(f"{model_name} spatial training (from its card): {t['training_seconds']:.0f} s, {t['epochs']} epochs, "
          f"and its variance networks {variance:.0f} s, "
          f"{estimator.options()['n_samples']} patches; validation NRMSE "
          + ", ".join(f"{k} {m['nrmse']:.3f}" for k, m in t["validation"].items()))
    other = get_model(model_name, Protocol(model.protocol.label_duration, model.protocol.pld + 0.25,
                                           model.protocol.crushed))
    try:
        load_network(estimator.network_file_, other)
    except NetworkMismatch as exc:
        print(f"another protocol refused: {exc}")


def speed(model_name: str, shape=(128, 128, 80)) -> None:
    model = get_model(model_name, default_protocol(model_name))
    index = np.indices(shape, dtype=float)
    centre = (np.array(shape, dtype=float) - 1) / 2
    mask = (((index - centre[:, None, None, None]) / (0.62 * np.array(shape))[:, None, None, None]) ** 2).sum(0) <= 1
    signals = simulate(model, int(mask.sum()), 5.0, seed=0).signals
    nets = {n: get_estimator(n, model, n_samples=5000, max_epochs=1).fit() for n in ("spatial", "supervised")}
    nets["spatial-no-se"] = copy.copy(nets["spatial"])
    nets["spatial-no-se"].uncertainty_ = None
    signal_se = np.full(signals.shape, noise_sigma(model, 5.0))  # se at each voxel's SNR, as the batch asks
    for threads in (1, 2):
        numba.set_num_threads(threads)
        best = {}
        with threadpool_limits(threads):
            for _ in range(3):  # interleaved, best of three
                for name, net in nets.items():
                    t0 = time.perf_counter()
                    net.predict_image(signals, mask, signal_se=signal_se)
                    best[name] = min(best.get(name, np.inf), time.perf_counter() - t0)
        print(f"{model_name} inference, {threads} thread(s), {signals.shape[0]} voxels: "
              + ", ".join(f"{n} {signals.shape[0] / s / 1e6:.2f} M voxels/s" for n, s in best.items())
              + f"; spatial takes {best['spatial'] / best['supervised']:.1f}x the supervised time and "
              f"{best['spatial'] / best['spatial-no-se']:.2f}x its own without standard errors "
              f"(load {os.getloadavg()[0]:.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="study-spatial")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--models", default="1c,2c")
    parser.add_argument("--skip-physics", action="store_true",
                        help="leave out the physics-informed 1C networks (trained on every noisy image: slow)")
    args = parser.parse_args()
    for name in args.models.split(","):
        print(f"load before {name}: {os.getloadavg()}")
        physics = name == "1c" and not args.skip_physics
        extra = {"physics-voxel": physics_informed(False), "physics-patch": physics_informed(True)} if physics else None
        methods = ["lm", "supervised", BASELINE, "spatial"] + (["unsupervised"] if name == "1c" else [])
        result = run_spatial_evaluation(Path(args.out) / name, model_name=name, methods=methods, snrs=SNRS,
                                        repeats=args.repeats, extra=extra, progress=True)
        print(Path(result.paths["report_md"]).read_text().split("![")[0])
        targets(result, name)
        training_time(name)
        speed(name)


if __name__ == "__main__":
    main()
