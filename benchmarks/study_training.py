"""The study behind the supervised network's training: time against accuracy, variant by variant.

Each variant trains a supervised network for the default protocol from scratch (simulation
of the training data included, as on a first run) and is scored on the same held-out Rician
data at SNR 3, 5 and 10 (20 000 voxels each, as ``study_networks.py``): NRMSE per parameter.
Variants:

- ``sklearn``: the training of TRAINING_VERSION 1: scikit-learn's MLPRegressor (Adam) fed
  epoch by epoch with ``partial_fit``, the validation loss watched after each epoch, the
  same early stopping as :func:`aslbatch.estimators.trainer.train_network`; kept here as
  the reference the current training is measured against;
- ``numba``: the current training (:mod:`aslbatch.estimators.trainer`), with the options
  given (defaults unless overridden).

The variants run back to back, the reference first and again at the end (the machine's
load drifts), ``--repeats`` times each; or, with ``--concurrent`` (a machine busy with other
work, whose load would drift between sequential runs), all at the same time, one process
each, so that they share the same load. Each line reports wall and CPU seconds (CPU: all
threads of the process), epochs and the test NRMSE; the summary gives each variant's speed-up
over the reference (wall and CPU) and its NRMSE minus the reference's. Run:
``python benchmarks/study_training.py 1c|2c [--repeats R] [--concurrent] [--variants sklearn,numba,...]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time
from typing import Any

import numba
import numpy as np

from aslbatch.estimators import get_estimator
from aslbatch.estimators.supervised import SupervisedEstimator
from aslbatch.estimators.trainer import IMPROVEMENT
from aslbatch.models import get_model
from aslbatch.protocol import default_protocol
from aslbatch.simulate import simulate

SNRS = (3.0, 5.0, 10.0)
#: variant name -> (trainer, option overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "sklearn": ("sklearn", {"n_samples": 500_000}),  # the training of TRAINING_VERSION 1, its defaults
    "numba-500k": ("numba", {"n_samples": 500_000}),
    "numba-250k": ("numba", {"n_samples": 250_000}),  # the defaults of TRAINING_VERSION 2
}

class SklearnSupervised(SupervisedEstimator):
    """The supervised training of TRAINING_VERSION 1 (MLPRegressor.partial_fit per epoch)."""

    def _train(self, train, val, opts, rng, progress):
        from sklearn.neural_network import MLPRegressor
        from sklearn.preprocessing import StandardScaler

        from aslbatch.estimators.network import Network

        x_scaler, y_scaler = StandardScaler().fit(train.inputs), StandardScaler().fit(train.params)
        x, y = x_scaler.transform(train.inputs), y_scaler.transform(train.params)
        x_val, y_val = x_scaler.transform(val.inputs), y_scaler.transform(val.params)
        mlp = MLPRegressor(hidden_layer_sizes=tuple(opts["hidden_layers"]), activation="relu", solver="adam",
                           alpha=opts["alpha"], batch_size=opts["batch_size"],
                           learning_rate_init=opts["learning_rate"], shuffle=True,
                           random_state=np.random.RandomState(opts["seed"]))
        best_loss, best, stale, epoch = np.inf, None, 0, 0
        for epoch in range(opts["max_epochs"]):
            mlp.partial_fit(x, y)
            val_loss = float(np.mean((mlp.predict(x_val) - y_val) ** 2))
            stale = 0 if val_loss < best_loss * (1.0 - IMPROVEMENT) else stale + 1
            if val_loss < best_loss:
                best_loss, best = val_loss, ([w.copy() for w in mlp.coefs_], [b.copy() for b in mlp.intercepts_],
                                             epoch + 1)
            if stale >= opts["patience"]:
                break
        weights, biases, best_epoch = best
        network = Network(tuple(weights), tuple(biases), x_scaler.mean_, x_scaler.scale_, y_scaler.mean_,
                          y_scaler.scale_)
        return network, {"epochs": epoch + 1, "best_epoch": best_epoch, "validation_loss": best_loss}


def nrmse(estimate: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """NRMSE per parameter (RMSE over the mean truth)."""
    return np.sqrt(np.nanmean((estimate - truth) ** 2, axis=0)) / truth.mean(axis=0)


def test_sets(model) -> dict[float, Any]:
    """The held-out Rician data, 20 000 voxels per SNR (fixed seeds)."""
    return {snr: simulate(model, 20_000, snr, seed=100 + int(snr)) for snr in SNRS}


def run(model, variant: str, tests: dict | None = None) -> dict[str, Any]:
    """Train one variant from scratch; its times, epochs and test NRMSE per SNR."""
    tests = test_sets(model) if tests is None else tests
    trainer, options = VARIANTS[variant]
    est = SklearnSupervised(model, **options) if trainer == "sklearn" else get_estimator("supervised", model, **options)
    wall, cpu = time.perf_counter(), time.process_time()
    est.fit()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    scores = {str(s): np.round(nrmse(est.predict(d.signals).params, d.params), 4).tolist() for s, d in tests.items()}
    return {"variant": variant, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "epochs": est.training_["epochs"],
            "best_epoch": est.training_["best_epoch"], "threads": numba.get_num_threads(),
            "load": round(os.getloadavg()[0], 1), **scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=["1c", "2c"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--concurrent", action="store_true", help="run the variants at the same time")
    args = parser.parse_args()
    model = get_model(args.model, default_protocol(args.model))
    tests = test_sets(model)
    get_estimator("supervised", model, n_samples=2000, max_epochs=1).fit()  # compile or load the numba cache
    chosen = args.variants.split(",")
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    names = [v for v in chosen if v != "sklearn"]
    results = []
    for _ in range(args.repeats):
        if args.concurrent:
            order = (["sklearn"] if "sklearn" in chosen else []) + names
            context = multiprocessing.get_context("spawn")  # numba's threads are not fork-safe
            with concurrent.futures.ProcessPoolExecutor(len(order), mp_context=context) as pool:
                futures = [pool.submit(run, model, variant) for variant in order]
                for future in futures:
                    results.append(future.result())
                    print(json.dumps(results[-1]), flush=True)
            continue
        order = ["sklearn", *names, "sklearn"] if "sklearn" in chosen else names
        for variant in order:
            results.append(run(model, variant, tests))
            print(json.dumps(results[-1]), flush=True)
    reference = [r for r in results if r["variant"] == "sklearn"]
    if reference:
        base_wall, base_cpu = np.mean([r["wall_s"] for r in reference]), np.mean([r["cpu_s"] for r in reference])
        for variant in dict.fromkeys(r["variant"] for r in results):
            rows = [r for r in results if r["variant"] == variant]
            summary = {"variant": variant, "mean_wall_s": round(float(np.mean([r["wall_s"] for r in rows])), 1),
                       "speedup_wall": round(float(base_wall / np.mean([r["wall_s"] for r in rows])), 2),
                       "speedup_cpu": round(float(base_cpu / np.mean([r["cpu_s"] for r in rows])), 2)}
            for snr in SNRS:
                mean = np.mean([r[str(snr)] for r in rows], axis=0)
                ref = np.mean([r[str(snr)] for r in reference], axis=0)
                summary[f"d_nrmse_{snr:g}"] = np.round(mean - ref, 4).tolist()
            print(json.dumps(summary), flush=True)
    print(f"# load {os.getloadavg()}", file=sys.stderr)


if __name__ == "__main__":
    main()
