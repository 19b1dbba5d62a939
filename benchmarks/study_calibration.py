"""Calibration of every method's standard errors, the cost of the networks' uncertainty, and the
prior-dominated flag on a low-SNR long-transit phantom (issue 16).

1. ``aslbatch evaluate`` (Rician noise, SNR 3, 5 and 10, default 1C and 2C protocols, the
   evaluation's default network options) of supervised, unsupervised and lm: coverage of the
   68 % and 95 % intervals, z-score spread and the share of prior-dominated rows per parameter
   and SNR. The networks are given the test SNR's noise SD; for the supervised network the
   same table without it (the marginal variance network, averaged over the training SNRs) and
   for an ensemble (the SD over the evaluation's retrained networks, the other option measured).
2. Cost: training time of the network and of its two variance networks (from the cards), and
   the prediction time with and without the standard errors (interleaved, best of repeats).
3. Long transit: the supervised network (the pipeline's default options) on the 1C protocol at
   SNR 3, Rician, att uniform in a delayed territory (``TERRITORIES``), cbf 20-60: per flag
   threshold (× the training prior's SD), the share of voxels with |att error| > 0.5 s that the
   flag catches and the share of flagged voxels whose att was within 0.5 s; the same for lm.

Run: ``python -m benchmarks.study_calibration [--cache-dir DIR] [--out DIR] [--n-samples N]
[--retrainings K] [--n-sets N] [--models 1c,2c]`` (the evaluation's default 200 000-sample networks
take about an hour on 2 busy cores from an empty cache; the networks are cached).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from aslbatch.calibration import calibration
from aslbatch.estimators import get_estimator
from aslbatch.estimators.prior import PRIOR_SHARE, prior_dominated, prior_sd
from aslbatch.estimators.store import NetworkCache
from aslbatch.evaluate import monte_carlo_sets, run_evaluation
from aslbatch.models import get_model
from aslbatch.protocol import default_protocol
from aslbatch.simulate import noise_sigma, simulate

SNRS = (3.0, 5.0, 10.0)
METHODS = ("supervised", "unsupervised", "lm")
REPEATS = 10
TERRITORIES = {"att 2.0-2.6 s (study_long_transit)": (2.0, 2.6), "att 2.8-3.4 s": (2.8, 3.4)}
THRESHOLDS = (0.6, 0.7, 0.8, 0.9)
ATT_ERROR_S = 0.5


def coverage_tables(out: Path, cache_dir: str | None, models: list[str], n_sets: int, retrainings: int,
                    network_options: dict) -> None:
    for model_name in models:
        t0 = time.perf_counter()
        ev = run_evaluation(out / model_name, model_name=model_name, methods=METHODS, snrs=SNRS, n_sets=n_sets,
                            repeats=REPEATS, retrainings=retrainings, cache_dir=cache_dir,
                            network_options=network_options or None)
        table = {(r["method"], r["parameter"], r["snr"], r["metric"]): r["value"] for r in ev.rows}
        model = get_model(model_name, default_protocol(model_name))
        print(f"\n## {model_name}: coverage of the 68 % / 95 % intervals, z SD, prior-dominated share "
              f"({n_sets} sets x {REPEATS} repeats per SNR, Rician; networks {ev.settings['network_options']}; "
              f"evaluate took {time.perf_counter() - t0:.0f} s)")
        print("method        param  SNR   68 %    95 %    z SD   z IQR/1.349  prior-dom.")
        for method in METHODS:
            for param in model.param_names:
                for snr in SNRS:
                    g = lambda m: table.get((method, param, snr, m), np.nan)  # noqa: E731
                    print(f"{method:13s} {param:5s} {snr:4g}  {g('coverage_68'):.3f}  {g('coverage_95'):.3f}  "
                          f"{g('z_sd'):5.2f}  {g('z_robust_sd'):5.2f}        {g('prior_dominated'):.3f}")
        networks = [r for r in ev.settings["networks"] if r["method"] == "supervised"]
        options = {k: v for k, v in networks[0]["options"].items() if k != "seed"}
        other_options(model, options, cache_dir, n_sets, retrainings)


def other_options(model, options: dict, cache_dir: str | None, n_sets: int, retrainings: int) -> None:
    """The supervised network without the noise SD (marginal), the ensemble's spread, and the cost."""
    cache = NetworkCache(cache_dir)
    nets = [cache.get(get_estimator("supervised", model, **options, seed=s)) for s in range(retrainings)]
    sets = monte_carlo_sets(model, SNRS, n_sets=n_sets, repeats=REPEATS)
    print(f"\nsupervised {model.name}, other options: marginal variance network (noise SD not given) and the "
          f"ensemble of {retrainings} networks (SD over them, each its own seed)")
    print("option      param  SNR   68 %    95 %    z SD")
    for data in sets:
        snr = float(data.snr[0])
        marginal = nets[0].predict(data.signals)
        stack = np.stack([n.predict(data.signals).params for n in nets])
        for label, params, se in (("marginal", marginal.params, marginal.stderr),
                                  ("ensemble", stack[0], stack.std(axis=0, ddof=1))):
            for j, param in enumerate(model.param_names):
                c = calibration(params[:, j], se[:, j], data.params[:, j])
                print(f"{label:11s} {param:5s} {snr:4g}  {c.coverage_68:.3f}  {c.coverage_95:.3f}  {c.z_sd:5.2f}")
    training = nets[0].training_
    variance = training["variance"]
    print(f"\ncost ({model.name}, {options['n_samples']} samples): network {training['training_seconds']:.1f} s "
          f"({training['epochs']} epochs), variance networks {variance['marginal']['training_seconds']:.1f} s + "
          f"{variance['at_snr']['training_seconds']:.1f} s ({variance['marginal']['epochs']} and "
          f"{variance['at_snr']['epochs']} epochs on {variance['samples']} samples); an ensemble of K costs K networks")
    data = sets[1]
    noise = noise_sigma(model, float(data.snr[0]))
    uncertainty = nets[0].uncertainty_
    best = {"without": np.inf, "with": np.inf, "with, noise SD given": np.inf}
    for _ in range(7):  # interleaved: the machine's load hits both alike
        for label in best:
            nets[0].uncertainty_ = None if label == "without" else uncertainty
            t0 = time.perf_counter()
            nets[0].predict(data.signals, noise_sd=noise if label.endswith("given") else None)
            best[label] = min(best[label], time.perf_counter() - t0)
    nets[0].uncertainty_ = uncertainty
    print(f"prediction of {data.signals.shape[0]} rows (best of 7): " + ", ".join(
        f"{k} {v * 1e3:.1f} ms" for k, v in best.items())
        + f"; ratio with/without {best['with'] / best['without']:.2f}, "
        f"{best['with, noise SD given'] / best['without']:.2f}")


def long_transit(cache_dir: str | None, voxels: int) -> None:
    model = get_model("1c", default_protocol("1c"))
    net = NetworkCache(cache_dir).get(get_estimator("supervised", model))
    lm = get_estimator("lm", model).fit()
    sd = prior_sd(model)
    j = model.param_names.index("att")
    print(f"\n## long transit, 1C default protocol, SNR 3 Rician, cbf 20-60, {voxels} voxels; prior SD of att "
          f"{sd[j]:.3f} s; flag: se > threshold x prior SD (or undefined); the default threshold is {PRIOR_SHARE:g}")
    for name, att_range in TERRITORIES.items():
        data = simulate(model, voxels, 3.0, noise="rician", seed=7, ranges={"cbf": (20.0, 60.0), "att": att_range})
        for label, estimate in (("supervised", net.predict(data.signals, noise_sd=noise_sigma(model, 3.0))),
                                ("lm", lm.predict(data.signals))):
            wrong = np.abs(estimate.params[:, j] - data.params[:, j]) > ATT_ERROR_S
            print(f"{name}, {label}: {wrong.mean():.1%} of voxels with |att error| > {ATT_ERROR_S} s")
            for share in THRESHOLDS:
                flagged = prior_dominated(model, estimate.params, estimate.stderr, share)[:, j]
                caught = np.mean(flagged[wrong]) if wrong.any() else np.nan
                accurate = np.mean(~wrong[flagged]) if flagged.any() else np.nan
                print(f"  threshold {share:.1f}: flagged {flagged.mean():.1%}, catches {caught:.1%} of the wrong, "
                      f"{accurate:.1%} of the flagged were accurate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default="study_calibration_out")
    parser.add_argument("--voxels", type=int, default=20000)
    parser.add_argument("--models", default="1c,2c", help="models of the coverage tables (empty: none)")
    parser.add_argument("--n-sets", type=int, default=1000, help="parameter sets per SNR (x 10 repeats)")
    parser.add_argument("--retrainings", type=int, default=3, help="networks per method (the ensemble's size)")
    parser.add_argument("--n-samples", type=int, default=None,
                        help="training samples of the evaluation's networks (default: the evaluation's 200 000)")
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--skip-long-transit", action="store_true")
    args = parser.parse_args()
    if not args.skip_long_transit:
        long_transit(args.cache_dir, args.voxels)
    options = {k: v for k, v in (("n_samples", args.n_samples), ("max_epochs", args.max_epochs)) if v is not None}
    models = [m for m in args.models.split(",") if m]
    coverage_tables(Path(args.out), args.cache_dir, models, args.n_sets, args.retrainings, options)


if __name__ == "__main__":
    main()
