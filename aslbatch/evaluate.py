"""Monte Carlo evaluation of the estimators (``aslbatch evaluate``): metrics, figures, report.

Every requested method estimates the same simulated Monte Carlo data: ``n_sets``
parameter sets drawn uniformly over the model's training ranges, each with ``repeats``
noise realisations, at every SNR of the sweep (SNR = S_ref / σ, :mod:`aslbatch.simulate`),
all from one seed (:func:`monte_carlo_sets`). The networks are trained once per method and
seed through the network cache (a second evaluation reuses them), on their default
training SNR range, independent of the test SNR, as a user's would be. ``retrainings``
(K) networks per method, seeds seed … seed + K − 1, give CV_Net; the first is the one
scored for accuracy and timed.

Outputs in ``out_dir``, each written atomically::

    metrics.tsv      one row per value: method, parameter, snr, metric, value
    report.md        the report; figures referenced from figures/
    report.html      the same report, self-contained (figures embedded as data URIs)
    figures/*.png    NRMSE, bias, CoV, SD/CRLB, CV_Net against SNR; estimate-vs-truth densities;
                     calibration of the standard errors

``metrics.tsv``: ``method`` is a label of :data:`METHODS`, or ``crlb`` for the bound itself;
``parameter`` a model parameter, empty for a value of the whole method; ``snr`` the test
SNR, empty for a value independent of it; ``value`` a number (``nan`` where undefined).
Units: API units (cbf mL/100 g/min, att and abat s, abv mL/mL), fractions (not %), s.

- every method, per parameter and SNR (:func:`aslbatch.metrics.metric_rows`): ``bias``
  (API units), ``nmae``, ``nrmse``, ``cov`` (noise immunity: SD over the repeats / true
  value, mean over the sets), ``sd_over_crlb`` (SD over the repeats / CRLB, mean over the
  sets with a finite bound) and the counts ``n_valid``, ``n_invalid``, ``cov_sets``,
  ``cov_excluded``, ``sd_over_crlb_sets``;
- networks also ``cv_net`` (SD over the K networks / true value, mean over the rows) and
  ``cv_net_voxels`` (rows included);
- every method, per SNR, parameter empty: ``time_per_voxel_s``, prediction only (best of
  :data:`TIMING_REPEATS`, s per voxel);
- networks, parameter and SNR empty: ``training_s``, training time per network as
  recorded when it was trained, mean over the K (s);
- every method that reports standard errors, per parameter and SNR (:mod:`aslbatch.calibration`):
  ``coverage_68`` and ``coverage_95`` (share of rows whose interval covers the truth: the interval
  half-widths the method writes (the networks' ``<param>ci68``/``ci95`` maps), else estimate ± 1 and
  ± 1.96 se; with half-widths, the ± se coverage is ``coverage_68_se``/``coverage_95_se``), ``z_sd``
  and ``z_robust_sd`` (spread of (estimate − truth) / se),
  ``se_undefined`` (share of finite estimates without a finite se), ``calibration_rows`` and
  ``prior_dominated`` (share of rows flagged, :mod:`aslbatch.estimators.prior`). The networks
  and lm are given the test SNR's noise SD (as a run with repeats gives each voxel's), so the
  networks' se is the posterior SD at that SNR under the training prior of the parameters, from
  which the parameter sets are drawn too, and lm's the linearised SD at the known σ;
- ``crlb``, per parameter and SNR: ``sd`` (median over the sets with a finite bound, API
  units), ``cov`` (mean over the sets of bound / true value, with the set exclusions of
  ``cov``, the floor of a method's CoV) and ``finite_sets``. It is the Gaussian-noise bound
  at each set's truth and the SNR's σ, computed also when the data are Rician.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numba
import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from ._version import versions
from .atomic import atomic_open
from .calibration import binned_error, calibration_rows, coverage_curve
from .estimators import ESTIMATORS, Estimate, Estimator, get_estimator
from .estimators.prior import PRIOR_SHARE, prior_dominated
from .estimators.store import NetworkCache
from .metrics import MIN_RELATIVE, crlb, cv_net, metric_rows
from .models import MODELS, KineticModel, get_model
from .protocol import Constants, Protocol, default_protocol
from .report import escape, figure_png, html_page, html_table, img, markdown_table, new_figure
from .simulate import NOISE_MODELS, SimulatedSet, noise_sigma, sample_parameters, simulate

__all__ = [
    "CLINICAL_SNRS",
    "DEFAULT_SIZES",
    "Evaluation",
    "Finding",
    "METHODS",
    "QUICK_SIZES",
    "Sizes",
    "expected_seconds",
    "monte_carlo_sets",
    "run_evaluation",
]

#: method label → (estimator name, the options the label fixes): every registered voxelwise method's
#: evaluation variants (e.g. ``supervised-mae``), from the registry (methods that use the neighbourhood
#: are judged on spatial phantoms: :mod:`aslbatch.evaluate_spatial`)
METHODS: dict[str, tuple[str, dict[str, str]]] = {
    label: (name, fixed) for name in ESTIMATORS if not ESTIMATORS[name].uses_neighbourhood
    for label, fixed in ESTIMATORS[name].evaluation_variants().items()}


@dataclass(frozen=True)
class Sizes:
    """The size of an evaluation: test ``snrs``, ``n_sets`` parameter sets × ``repeats`` noise
    realisations per SNR, ``retrainings`` networks per method, and the training options
    every network gets (``network_options``, merged under the caller's)."""

    snrs: tuple[float, ...]
    n_sets: int
    repeats: int
    retrainings: int
    network_options: dict[str, Any]


#: defaults: 50 000 rows per SNR and twelve networks of 200 000 samples. With the networks cached
#: a run takes seconds (2c: 12 s on 2 quiet cores); training them on an empty cache dominates a
#: first run (1c: 60 s, 2c: 249 s), which is why the run states its expected duration first
DEFAULT_SIZES = Sizes((2.0, 3.0, 5.0, 10.0, 20.0, 50.0), 2000, 25, 3, {"n_samples": 200_000})
#: ``quick=True``: a CI-sized run (small networks, three SNRs) under 3 minutes on 2 cores from an
#: empty cache: 2c 138 s and 1c 123 s (whole process) at load average 13-16, which slows them 2-3x
QUICK_SIZES = Sizes((3.0, 5.0, 10.0), 300, 10, 2, {"n_samples": 30_000, "max_epochs": 30})
#: rough wall times on 2 quiet cores for the duration a run states before it starts (s), by the
#: model's number of parameters (2: 1C, 4: 2C): training one network of ROUGH_SAMPLES samples to
#: early stopping; scoring 100 000 rows with one method (timing repeats and the other networks'
#: predictions included); start-up, simulation and report. Measured with the numba trainer
#: (training version 2) on an empty cache: 1c 60 s and 2c 249 s in all, 2c 12 s with the
#: networks cached. Scaled by samples and by max_epochs up to 50
ROUGH_TRAINING_S = {2: 4.0, 4: 20.0}
ROUGH_SAMPLES, ROUGH_EPOCHS = 200_000, 50
ROUGH_SCORING_S = {2: 0.25, 4: 0.35}
ROUGH_FIXED_S = 5.0
#: SNRs of the report's tables (those of the sweep; all of the sweep if it has none of them)
CLINICAL_SNRS = (3.0, 5.0, 10.0)
#: SNR of the estimate-vs-truth density plots (or the sweep's nearest, on a log scale)
DENSITY_SNR = 5.0
#: predictions timed per method and SNR; the fastest counts (the machine may be shared)
TIMING_REPEATS = 3
#: rows predicted once, untimed, before the timing (compilation, first-call set-up)
WARMUP_ROWS = 64
#: BLAS threads of network training and prediction. On a busy 2-core machine, 2 OpenBLAS
#: threads made scikit-learn's training ~10x slower than 1, and a network's forward pass
#: after a numba (OpenMP) region up to ~15x slower; 1 thread was never slower. The
#: networks are the same; their timing is the conservative one (1 core against 2 for lm, lut)
BLAS_THREADS = 1
#: SeedSequence streams of the Monte Carlo data (see :func:`monte_carlo_sets`)
PARAMETER_STREAM, NOISE_STREAM = 0, 1
#: the research's computation-time finding: supervised takes under this share of LUT's time
TIME_SHARE = 1.0 / 6.0
FIGURE_DPI = 100
DENSITY_BINS = 60


# --- data -------------------------------------------------------------------------------------


def _stream_seed(seed: int, *stream: int) -> int:
    """An integer seed for one stream of an evaluation seeded with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0])


def _snr_stream(snr: float) -> int:
    """The bits of ``snr`` as float64: the noise of an SNR does not depend on the rest of the sweep."""
    return int(np.float64(snr).view(np.uint64))


def monte_carlo_sets(model: KineticModel, snrs: Sequence[float], *, n_sets: int, repeats: int,
                     noise: str = "rician", seed: int = 0) -> list[SimulatedSet]:
    """The evaluation's data: one :class:`~aslbatch.simulate.SimulatedSet` per SNR of ``snrs``.

    Every set holds the same ``n_sets`` parameter sets (API units, uniform over the model's
    training ranges, drawn from ``SeedSequence([seed, 0])``), each repeated ``repeats``
    times (``group``), with ``noise`` ("rician" or "gaussian") of σ = S_ref / SNR drawn from
    ``SeedSequence([seed, 1, bits of the float64 SNR])``: the same SNR gives the same
    data whatever else the sweep holds.
    """
    params = sample_parameters(model, n_sets, np.random.default_rng(_stream_seed(seed, PARAMETER_STREAM)))
    return [simulate(model, n_sets, float(snr), noise=noise, repeats=repeats, params=params,
                     seed=_stream_seed(seed, NOISE_STREAM, _snr_stream(float(snr)))) for snr in snrs]


def _set_rows(data: SimulatedSet) -> np.ndarray:
    """The first row of each parameter set of ``data`` (sets in ``group`` order)."""
    return np.unique(data.group, return_index=True)[1]


# --- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One finding of the research, checked against this evaluation.

    model : "1c" or "2c", the model the finding is about.
    claim : the finding, in the research's words.
    verdict : "reproduced", "partly reproduced", "not reproduced" or "not checked".
    evidence : the numbers behind the verdict (or why it was not checked).
    """

    model: str
    claim: str
    verdict: str
    evidence: str


@dataclass(frozen=True)
class Evaluation:
    """What :func:`run_evaluation` computed and wrote.

    rows : the rows of ``metrics.tsv``: dicts with ``method``, ``parameter`` ("" for a whole
        method), ``snr`` (float, None when independent of it), ``metric``, ``value``
        (units: module docstring).
    findings : the research's findings checked against the numbers.
    paths : every file written: ``metrics``, ``report_md``, ``report_html`` and
        ``figure_<name>``.
    settings : the run's settings, JSON-ready (as in the report).
    durations : wall time per stage, s: ``simulation_s``, ``crlb_s``, ``networks_s`` (training
        or loading), ``prediction_s``, ``report_s``, ``total_before_report_s`` and ``total_s``.
    """

    rows: list[dict[str, Any]]
    findings: list[Finding]
    paths: dict[str, Path]
    settings: dict[str, Any]
    durations: dict[str, float]


# --- validation -------------------------------------------------------------------------------


def _check_methods(methods: Sequence[str]) -> list[str]:
    labels = [methods] if isinstance(methods, str) else list(methods)
    unknown = [m for m in labels if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if not labels:
        raise ValueError(f"no method to evaluate; choose from {list(METHODS)}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"methods listed twice: {labels}")
    return labels


def _check_snrs(snrs: Sequence[float]) -> list[float]:
    try:
        values = sorted(float(s) for s in snrs)
    except (TypeError, ValueError):
        raise ValueError(f"snrs must be numbers, got {snrs!r}") from None
    if not values or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"snrs must be one or more finite SNRs > 0, got {snrs!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"SNRs listed twice: {values}")
    return values


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _is_network(label: str) -> bool:
    return ESTIMATORS[METHODS[label][0]].trains


def _network_options(defaults: dict[str, Any], given: dict[str, Any] | None) -> dict[str, Any]:
    """The options every network gets: the size's defaults updated with ``given``."""
    given = dict(given or {})
    fixed = sorted(set(given) & {"loss", "seed"})
    if fixed:
        raise ValueError(f"network_options may not set {fixed}: the method label sets the loss and the "
                         f"evaluation the seeds (seed … seed + retrainings − 1)")
    return {**defaults, **given}


def _estimator(model: KineticModel, label: str, network_options: dict[str, Any], seed: int) -> Estimator:
    name, fixed = METHODS[label]
    if not _is_network(label):
        return get_estimator(name, model)
    return get_estimator(name, model, **network_options, **fixed, seed=seed)


# --- the evaluation ---------------------------------------------------------------------------


@contextlib.contextmanager
def _timed(durations: dict[str, float], stage: str) -> Iterator[None]:
    """Add the block's wall time (s) to ``durations[stage]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        durations[stage] = durations.get(stage, 0.0) + time.perf_counter() - t0


def _say(bar: tqdm, message: str) -> None:
    """A line on stderr above the progress bar (nothing when the bar is disabled)."""
    if not bar.disable:
        bar.write(f"aslbatch evaluate: {message}", file=sys.stderr)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{max(seconds, 1):.0f} s"


def expected_seconds(model_name: str, n_methods: int, rows: int, networks_to_train: int,
                     network_options: dict[str, Any]) -> tuple[float, float]:
    """Rough wall time (s) on 2 quiet cores of an evaluation of ``n_methods`` methods over ``rows``
    rows in all (every SNR) that trains ``networks_to_train`` networks with ``network_options``:
    (training, the rest). From ROUGH_TRAINING_S, ROUGH_SCORING_S and ROUGH_FIXED_S."""
    size = min(len(MODELS[model_name].param_names), 4)
    samples = network_options.get("n_samples", 500_000) / ROUGH_SAMPLES
    epochs = min(network_options.get("max_epochs", 100), ROUGH_EPOCHS) / ROUGH_EPOCHS
    training = networks_to_train * ROUGH_TRAINING_S.get(size, ROUGH_TRAINING_S[4]) * samples * epochs
    return training, ROUGH_FIXED_S + n_methods * ROUGH_SCORING_S.get(size, ROUGH_SCORING_S[4]) * rows / 100_000


def _networks(model: KineticModel, label: str, network_options: dict[str, Any], seeds: Sequence[int],
              cache: NetworkCache, bar: tqdm) -> tuple[list[Estimator], list[dict[str, Any]]]:
    """The trained networks of ``label``, one per seed, from ``cache`` (trained and stored on a miss),
    and a JSON-ready record of each."""
    estimators, records = [], []
    for seed in seeds:
        untrained = _estimator(model, label, network_options, seed)
        from_cache = cache.path(untrained).is_file()
        bar.set_postfix_str(f"{label} network {seed}: " + ("from the cache" if from_cache else "training"))
        t0 = time.perf_counter()
        trained = cache.get(untrained, not bar.disable)
        bar.update()
        history = trained.training_
        estimators.append(trained)
        records.append({"method": label, "seed": seed, "file": trained.network_file_,
                        "sha256": trained.network_sha256_, "from_cache": from_cache,
                        "epochs": history.get("epochs"), "best_epoch": history.get("best_epoch"),
                        "training_s": history.get("training_seconds", math.nan),
                        "wall_s": time.perf_counter() - t0, "options": trained.options()})
    return estimators, records


def _predict(estimator: Estimator, signals: np.ndarray, snr: float) -> Estimate:
    """The estimate of ``signals``; a method that takes it (the networks, lm) is given the noise SD of ``snr``
    (its se at that noise level, as a run gives each voxel the repeats' spread)."""
    if estimator.takes_noise_sd:
        return estimator.predict(signals, noise_sd=noise_sigma(estimator.model, snr))
    return estimator.predict(signals)


def _timed_predict(estimator: Estimator, signals: np.ndarray, snr: float) -> tuple[Estimate, float]:
    """The estimate and the fastest of TIMING_REPEATS predictions (s)."""
    _predict(estimator, signals[:WARMUP_ROWS], snr)
    best = math.inf
    for _ in range(TIMING_REPEATS):
        t0 = time.perf_counter()
        estimate = _predict(estimator, signals, snr)
        best = min(best, time.perf_counter() - t0)
    return estimate, best


def _method_rows(label: str, estimators: Sequence[Estimator], data: SimulatedSet, set_bounds: np.ndarray,
                 snr: float) -> tuple[list[dict[str, Any]], Estimate]:
    """The rows of one method at one SNR, and the scored (first) estimator's estimate."""
    names = data.model.param_names
    estimate, seconds = _timed_predict(estimators[0], data.signals, snr)
    params = estimate.params
    rows = metric_rows(params, data.params, names, group=data.group, bound=set_bounds[data.group])
    if estimate.stderr is not None:
        rows += calibration_rows(params, estimate.stderr, data.params, names, estimate.intervals,
                                 estimate.interval_levels)
        flagged = prior_dominated(data.model, params, estimate.stderr)
        rows += [{"parameter": name, "metric": "prior_dominated", "value": float(flagged[:, j].mean())}
                 for j, name in enumerate(names)]
    if len(estimators) > 1:
        stack = np.stack([params] + [_predict(e, data.signals, snr).params for e in estimators[1:]])
        for j, name in enumerate(names):
            spread = cv_net(stack[:, :, j], data.params[:, j])
            rows += [{"parameter": name, "metric": "cv_net", "value": spread.cov},
                     {"parameter": name, "metric": "cv_net_voxels", "value": spread.n_units}]
    rows.append({"parameter": "", "metric": "time_per_voxel_s", "value": seconds / data.signals.shape[0]})
    return [{"method": label, "snr": snr, **row} for row in rows], estimate


def _crlb_rows(data: SimulatedSet, set_bounds: np.ndarray, snr: float) -> list[dict[str, Any]]:
    """The bound itself per parameter at one SNR (method ``crlb``; module docstring)."""
    truth = data.params[_set_rows(data)]
    rows = []
    for j, name in enumerate(data.model.param_names):
        bound, level = set_bounds[:, j], truth[:, j]
        finite = np.isfinite(bound)
        kept = finite & (level > 0) & (level >= MIN_RELATIVE * level.mean())
        values = {"sd": float(np.median(bound[finite])) if finite.any() else math.nan,
                  "cov": float(np.mean(bound[kept] / level[kept])) if kept.any() else math.nan,
                  "finite_sets": int(finite.sum())}
        rows += [{"method": "crlb", "parameter": name, "snr": snr, "metric": k, "value": v} for k, v in values.items()]
    return rows


def _nearest(snrs: Sequence[float], target: float) -> float:
    return min(snrs, key=lambda s: abs(math.log(s / target)))


def run_evaluation(
    out_dir: str | os.PathLike,
    *,
    model_name: str = "1c",
    protocol: Protocol | None = None,
    constants: Constants | None = None,
    methods: Sequence[str] | None = None,
    snrs: Sequence[float] | None = None,
    noise: str = "rician",
    n_sets: int | None = None,
    repeats: int | None = None,
    retrainings: int | None = None,
    network_options: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    quick: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> Evaluation:
    """Evaluate ``methods`` on a Monte Carlo set and write ``metrics.tsv``, ``report.md``,
    ``report.html`` and ``figures/`` into ``out_dir`` (module docstring).

    Parameters
    ----------
    out_dir : output folder (created; files of an earlier evaluation are replaced).
    model_name : "1c" or "2c".
    protocol : the acquisition; the model's default protocol if None.
    constants : physical constants; ``Constants()`` if None.
    methods : labels of :data:`METHODS`; None: every one whose method serves the model.
    snrs : test SNRs (S_ref / σ); None: :data:`DEFAULT_SIZES` (``quick``: :data:`QUICK_SIZES`).
    noise : "rician" or "gaussian" test noise.
    n_sets, repeats : parameter sets and noise realisations of each per SNR (None: the sizes').
    retrainings : K >= 2 networks per network method, seeds seed … seed + K − 1 (None: the sizes').
    network_options : options of every network (e.g. ``n_samples``, ``hidden_layers``,
        ``max_epochs``), over the sizes' defaults; not ``loss`` or ``seed``.
    cache_dir : folder of trained networks (None: the per-user cache).
    quick : the CI-sized run of :data:`QUICK_SIZES` instead of :data:`DEFAULT_SIZES`.
    seed : integer >= 0 seeding the data and the first network.
    progress : on stderr: the expected duration before starting, a progress bar over the steps
        (networks loaded or trained, then each method at each SNR) with training bars, a line
        per method scored.

    Raises ValueError (with the reason) for an unknown method, model, noise or option.
    """
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    sizes = QUICK_SIZES if quick else DEFAULT_SIZES
    served = [label for label in METHODS if ESTIMATORS[METHODS[label][0]].serves(MODELS[model_name])] \
        if model_name in MODELS else list(METHODS)
    labels = _check_methods(served if methods is None else methods)
    unserved = [label for label in labels if label not in served]
    if unserved:
        raise ValueError(f"method(s) {unserved} do not serve the {model_name} model; those that do: {served}")
    snr_list = _check_snrs(sizes.snrs if snrs is None else snrs)
    n_sets = _check_int("n_sets", sizes.n_sets if n_sets is None else n_sets, 2)
    repeats = _check_int("repeats", sizes.repeats if repeats is None else repeats, 2)
    retrainings = _check_int("retrainings", sizes.retrainings if retrainings is None else retrainings, 2)
    seed = _check_int("seed", seed, 0)
    if noise not in NOISE_MODELS:
        raise ValueError(f"noise must be one of {NOISE_MODELS}, got {noise!r}")
    model = get_model(model_name, default_protocol(model_name) if protocol is None else protocol, constants)
    if not model.calibrated:
        raise ValueError(f"the {model_name} model has no prior to evaluate against: its outputs are relative to each "
                         "dataset's own reference (its brain median); evaluate the single model")
    net_opts = _network_options(sizes.network_options, network_options)
    for label in labels:  # every option checked before anything runs
        _estimator(model, label, net_opts, seed).options()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = NetworkCache(cache_dir)
    seeds = range(seed, seed + retrainings)
    nets = [label for label in labels if _is_network(label)]
    to_train = sum(not cache.path(_estimator(model, label, net_opts, s)).is_file() for label in nets for s in seeds)
    bar = tqdm(total=len(nets) * retrainings + len(labels) * len(snr_list), desc=f"evaluate {model.name}",
               unit="step", disable=not progress, file=sys.stderr)
    training_s, rest_s = expected_seconds(model.name, len(labels), len(snr_list) * n_sets * repeats, to_train,
                                          net_opts)
    _say(bar, f"{model.name} model, {len(labels)} methods, {len(snr_list)} SNRs x {n_sets} parameter sets x "
              f"{repeats} repeats; expected duration about {_duration(training_s + rest_s)} on 2 quiet cores"
              + (f" ({to_train} of {len(nets) * retrainings} networks to train first, about {_duration(training_s)}; "
                 f"the cache keeps them for later runs)" if to_train else " (every network cached)")
              + ("" if quick else "; --quick: under 3 minutes from an empty cache"))

    durations: dict[str, float] = {}
    with _timed(durations, "simulation_s"):
        sets = monte_carlo_sets(model, snr_list, n_sets=n_sets, repeats=repeats, noise=noise, seed=seed)
    with _timed(durations, "crlb_s"):
        jacobian = model.jacobian(sets[0].params[_set_rows(sets[0])])
        bounds = [crlb(jacobian, noise_sigma(model, snr)) for snr in snr_list]
    density_snr = _nearest(snr_list, DENSITY_SNR)
    rows: list[dict[str, Any]] = []
    networks: list[dict[str, Any]] = []
    density: dict[str, np.ndarray] = {}
    calibrated: dict[tuple[str, float], Estimate] = {}  # (label, snr) -> estimate with standard errors
    with threadpool_limits(BLAS_THREADS, user_api="blas"):
        for label in labels:
            if _is_network(label):
                with _timed(durations, "networks_s"):
                    estimators, records = _networks(model, label, net_opts, seeds, cache, bar)
                networks += records
                rows.append({"method": label, "parameter": "", "snr": None, "metric": "training_s",
                             "value": float(np.mean([r["training_s"] for r in records]))})
            else:
                estimators = [_estimator(model, label, net_opts, seed).fit()]
            with _timed(durations, "prediction_s"):
                for snr, data, set_bounds in zip(snr_list, sets, bounds):
                    bar.set_postfix_str(f"{label} at SNR {snr:g}")
                    method_rows, estimate = _method_rows(label, estimators, data, set_bounds, snr)
                    bar.update()
                    rows += method_rows
                    if snr == density_snr:
                        density[label] = estimate.params
                    if estimate.stderr is not None:
                        calibrated[(label, snr)] = estimate
            _say(bar, f"{label} scored at {len(snr_list)} SNRs")
    for snr, data, set_bounds in zip(snr_list, sets, bounds):
        rows += _crlb_rows(data, set_bounds, snr)

    bar.set_postfix_str("report")
    with _timed(durations, "report_s"):
        table = {(r["method"], r["parameter"], r["snr"], r["metric"]): r["value"] for r in rows}
        findings = _findings(table, model.name, labels, snr_list)
        settings = _settings(model, labels, snr_list, noise, n_sets, repeats, retrainings, seed, net_opts, cache,
                             networks, quick, density_snr, load_start)
        durations["total_before_report_s"] = time.perf_counter() - t_start
        figures = _figures(table, model, labels, snr_list, sets[snr_list.index(density_snr)], density)
        if calibrated:
            figures.append(_calibration_figure(model, sets, snr_list, calibrated))
        paths = _write(out, rows, figures, _document(table, model, labels, snr_list, findings, settings,
                                                     durations, figures))
    durations["total_s"] = time.perf_counter() - t_start
    bar.close()
    if progress:
        print(f"aslbatch evaluate: done in {durations['total_s']:.0f} s: {paths['report_html']}", file=sys.stderr)
    return Evaluation(rows, findings, paths, settings, durations)


# --- findings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Claim:
    """A finding of MISSION.md: ``family`` has the lowest ``metric`` of ``params`` (or, metric
    "time", under TIME_SHARE of LUT's time per voxel)."""

    model: str
    text: str
    family: str
    params: tuple[str, ...]
    metric: str


CLAIMS = (
    _Claim("1c", "One-compartment model: supervised DL had the best CBF accuracy.", "supervised", ("cbf",),
           "nrmse"),
    _Claim("1c", "One-compartment model: supervised DL had the best CBF noise immunity.", "supervised", ("cbf",),
           "cov"),
    _Claim("1c", "One-compartment model: supervised DL had the best ATT accuracy.", "supervised", ("att",), "nrmse"),
    _Claim("1c", "One-compartment model: unsupervised DL had the best ATT noise immunity.", "unsupervised",
           ("att",), "cov"),
    _Claim("2c", "Two-compartment model: supervised DL performed best (checked here as the best accuracy of every "
           "parameter: CBF, aCBV = abv, ATT = abat, TTT = att).", "supervised", ("cbf", "abv", "abat", "att"),
           "nrmse"),
    _Claim("2c", "Two-compartment model: supervised DL took under 1/6 of the conventional method's (LUT) "
           "computation time.", "supervised", (), "time"),
)
METRIC_WORDS = {"nrmse": "NRMSE", "cov": "CoV"}


def _family(label: str) -> str:
    """"supervised" for both supervised losses, "unsupervised" likewise; else the label."""
    return label.split("-")[0]


def _lowest(table: dict, methods: Sequence[str], param: str, snr: float, metric: str) -> tuple[str, float] | None:
    values = [(m, table.get((m, param, snr, metric), math.nan)) for m in methods]
    values = [(m, v) for m, v in values if math.isfinite(v)]
    return min(values, key=lambda mv: mv[1]) if values else None


def _verdict(wins: int, total: int) -> str:
    if total == 0:
        return "not checked"
    return "reproduced" if wins == total else "not reproduced" if wins == 0 else "partly reproduced"


def _judge_lowest(claim: _Claim, table: dict, family: list[str], others: list[str],
                  snrs: Sequence[float]) -> tuple[str, str]:
    wins, total, lines = 0, 0, []
    for param in claim.params:
        parts = []
        for snr in snrs:
            ours, theirs = (_lowest(table, group, param, snr, claim.metric) for group in (family, others))
            if ours is None or theirs is None:
                parts.append(f"SNR {snr:g}: undefined")
                continue
            total += 1
            wins += ours[1] < theirs[1]
            parts.append(f"SNR {snr:g}: {ours[0]} {_pct(ours[1])} {'<' if ours[1] < theirs[1] else '>='} "
                         f"{theirs[0]} {_pct(theirs[1])}")
        lines.append(f"{param} {METRIC_WORDS[claim.metric]} (best {claim.family} vs best other): " + "; ".join(parts))
    return _verdict(wins, total), f"{claim.family} lowest at {wins} of {total} comparisons. " + " | ".join(lines)


def _mean_time(table: dict, method: str, snrs: Sequence[float]) -> float:
    return float(np.mean([table[(method, "", s, "time_per_voxel_s")] for s in snrs]))


def _judge_time(table: dict, family: list[str], labels: list[str], snrs: Sequence[float]) -> tuple[str, str]:
    if "lut" not in labels:
        return "not checked", "needs lut among the methods"
    lut = _mean_time(table, "lut", snrs)
    parts, wins = [], 0
    for method in family:
        share = _mean_time(table, method, snrs) / lut
        wins += share < TIME_SHARE
        parts.append(f"{method} {_us(_mean_time(table, method, snrs))} per voxel = {share:.3g} of lut's "
                     f"{_us(lut)} ({'<' if share < TIME_SHARE else '>='} 1/6); training, once per protocol and "
                     f"cached: {table[(method, '', None, 'training_s')]:.0f} s per network")
    return _verdict(wins, len(family)), "Prediction time per voxel, mean over the SNRs: " + "; ".join(parts)


def _findings(table: dict, model_name: str, labels: list[str], snrs: Sequence[float]) -> list[Finding]:
    """Each finding of MISSION.md, with a verdict computed from ``table``."""
    out = []
    for claim in CLAIMS:
        family = [m for m in labels if _family(m) == claim.family]
        others = [m for m in labels if _family(m) != claim.family]
        if claim.model != model_name:
            verdict, evidence = "not checked", (f"a finding about the {claim.model} model; this evaluation ran "
                                                f"the {model_name} model (evaluate {claim.model} to check it)")
        elif not family:
            verdict, evidence = "not checked", f"needs {claim.family} or {claim.family}-mae among the methods"
        elif claim.metric == "time":
            verdict, evidence = _judge_time(table, family, labels, snrs)
        elif not others:
            verdict, evidence = "not checked", f"needs a method other than {claim.family} networks to compare with"
        else:
            verdict, evidence = _judge_lowest(claim, table, family, others, snrs)
        out.append(Finding(claim.model, claim.text, verdict, evidence))
    return out


# --- settings ---------------------------------------------------------------------------------


def _settings(model: KineticModel, labels: list[str], snrs: list[float], noise: str, n_sets: int, repeats: int,
              retrainings: int, seed: int, net_opts: dict[str, Any], cache: NetworkCache,
              networks: list[dict[str, Any]], quick: bool, density_snr: float, load_start: float) -> dict[str, Any]:
    """Everything that defines the run, and the machine it ran on, JSON-ready."""
    return {
        "model": model.to_dict(),
        "training_ranges": {k: list(v) for k, v in model.training_ranges.items()},
        "methods": {label: {"estimator": METHODS[label][0], **METHODS[label][1]} for label in labels},
        "snrs": snrs,
        "density_snr": density_snr,
        "noise": noise,
        "n_sets": n_sets,
        "repeats": repeats,
        "rows_per_snr": n_sets * repeats,
        "retrainings": retrainings,
        "quick": quick,
        "seed": seed,
        "data_seeds": {"parameters": _stream_seed(seed, PARAMETER_STREAM),
                       **{f"noise_snr_{s:g}": _stream_seed(seed, NOISE_STREAM, _snr_stream(s)) for s in snrs}},
        "network_seeds": list(range(seed, seed + retrainings)),
        "network_options": net_opts,
        "cache_dir": str(cache.folder),
        "networks": networks,
        "versions": versions(),
        "machine": {"cores": os.cpu_count(), "numba_threads": numba.get_num_threads(),
                    "blas_threads": BLAS_THREADS, "load_average_start": load_start,
                    "load_average_end": os.getloadavg()[0]},
    }


# --- figures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Png:
    name: str
    png: bytes
    caption: str


def _curve(table: dict, method: str, param: str, snrs: Sequence[float], metric: str) -> np.ndarray:
    values = np.array([table.get((method, param, s, metric), math.nan) for s in snrs], dtype=float)
    values[~np.isfinite(values)] = np.nan
    return values


def _against_snr(table: dict, model: KineticModel, methods: Sequence[str], snrs: Sequence[float], metric: str,
                 ylabel: str, *, scale: float = 1.0, log_y: bool = False, crlb_metric: str | None = None,
                 reference: float | None = None) -> bytes:
    """One panel per parameter, one line per method: ``metric`` × ``scale`` against SNR (log axis);
    the CRLB's ``crlb_metric`` dashed in black, a horizontal line at ``reference``."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    n = model.n_params
    figure = new_figure(3.3 * n, 3.0, dpi=FIGURE_DPI)
    for ax, param, unit in zip(figure.subplots(1, n, squeeze=False)[0], model.param_names, model.param_units):
        for i, method in enumerate(methods):
            ax.plot(snrs, scale * _curve(table, method, param, snrs, metric), marker="o", markersize=3,
                    color=f"C{i}", label=method)
        if crlb_metric is not None:
            ax.plot(snrs, scale * _curve(table, "crlb", param, snrs, crlb_metric), color="black", linestyle="--",
                    label="CRLB")
        if reference is not None:
            ax.axhline(reference, color="0.5", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xticks(snrs, [f"{s:g}" for s in snrs])
        ax.minorticks_off()
        if log_y:  # ticks at 1, 2, 5 x 10^k, written plainly
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{param} ({unit})", fontsize=10)
        ax.set_xlabel("SNR")
        ax.set_ylabel(ylabel.format(unit=unit))
        ax.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=7)
    return figure_png(figure)


def _density(model: KineticModel, data: SimulatedSet, estimates: dict[str, np.ndarray]) -> bytes:
    """2D histograms of estimate against truth, one row per method and one column per parameter,
    over the training range widened by 10 % (values beyond it in the edge bins)."""
    from matplotlib.colors import LogNorm

    rows, cols = len(estimates), model.n_params
    figure = new_figure(2.7 * cols, 2.4 * rows, dpi=FIGURE_DPI)
    axes = figure.subplots(rows, cols, squeeze=False)
    for r, (method, params) in enumerate(estimates.items()):
        for j, name in enumerate(model.param_names):
            lo, hi = model.training_ranges[name]
            lo, hi = lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo)
            est = params[:, j]
            finite = np.isfinite(est)
            counts, xe, ye = np.histogram2d(data.params[finite, j], np.clip(est[finite], lo, hi),
                                            bins=DENSITY_BINS, range=[[lo, hi], [lo, hi]])
            ax = axes[r, j]
            if counts.any():
                ax.pcolormesh(xe, ye, np.ma.masked_equal(counts.T, 0), norm=LogNorm(1, counts.max()),
                              cmap="viridis", rasterized=True)
            ax.plot([lo, hi], [lo, hi], color="red", linewidth=0.7, linestyle="--")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.set_title(f"{method}: {name}", fontsize=9)
            ax.tick_params(labelsize=7)
            if r == rows - 1:
                ax.set_xlabel(f"true {name}", fontsize=8)
            if j == 0:
                ax.set_ylabel("estimate", fontsize=8)
    return figure_png(figure)


def _figures(table: dict, model: KineticModel, labels: list[str], snrs: list[float], density_data: SimulatedSet,
             density: dict[str, np.ndarray]) -> list[_Png]:
    nets = [m for m in labels if _is_network(m)]
    snr = density_data.snr[0]
    figures = [
        _Png("nrmse", _against_snr(table, model, labels, snrs, "nrmse", "NRMSE (%)", scale=100.0, log_y=True),
             "Accuracy: NRMSE (RMSE / mean true value) against SNR."),
        _Png("bias", _against_snr(table, model, labels, snrs, "bias", "bias ({unit})", reference=0.0),
             "Bias (mean estimate − truth) against SNR, in the parameter's unit."),
        _Png("cov", _against_snr(table, model, labels, snrs, "cov", "CoV over repeats (%)", scale=100.0, log_y=True,
                                 crlb_metric="cov"),
             "Noise immunity: SD over the noise repeats / true value (CoV), mean over the parameter sets; "
             "dashed: the same ratio for the Cramér–Rao lower bound (sets where it is finite), the floor of an "
             "unbiased estimator under Gaussian noise; a method below it is biased (bounds, a network's pull "
             "towards its training distribution), not better than efficient. No dashed line: the bound is infinite "
             "in every set (the parameter does not move the signal locally, e.g. abat with hard arterial edges)."),
        _Png("sd_over_crlb", _against_snr(table, model, labels, snrs, "sd_over_crlb", "SD / CRLB", reference=1.0),
             "SD over the repeats / CRLB, mean over the sets with a finite bound (1: efficient; below 1 is possible "
             "for biased estimators, e.g. networks pulled towards the training mean)."),
    ]
    if nets:
        figures.append(_Png("cv_net", _against_snr(table, model, nets, snrs, "cv_net", "CV_Net (%)", scale=100.0,
                                                   log_y=True),
                            "CV_Net: SD over the networks trained with different seeds / true value, mean over "
                            "the rows."))
    figures.append(_Png("density", _density(model, density_data, density),
                        f"Estimate against truth at SNR {snr:g}: counts of rows (log colour scale), every noise "
                        f"repeat of every parameter set; dashed: identity."))
    return figures


#: nominal coverages of the calibration figure
NOMINAL_LEVELS = np.linspace(0.05, 0.99, 48)
#: bins of se in the calibration figure (equal numbers of rows)
SE_BINS = 12


def _calibration_figure(model: KineticModel, sets: Sequence[SimulatedSet], snrs: Sequence[float],
                        calibrated: dict[tuple[str, float], Estimate]) -> _Png:
    """Per parameter: observed against nominal coverage of the Gaussian intervals (top) and RMS error
    against RMS se in bins of se (bottom), one colour per method, one line style per SNR."""
    labels = list(dict.fromkeys(label for label, _ in calibrated))
    shown = [s for s in snrs if s in CLINICAL_SNRS] or list(snrs)
    styles = dict(zip(shown, ("-", "--", ":", "-.")))
    n = model.n_params
    figure = new_figure(3.0 * n, 5.6, dpi=FIGURE_DPI)
    axes = figure.subplots(2, n, squeeze=False)
    for j, (param, unit) in enumerate(zip(model.param_names, model.param_units)):
        top, bottom = axes[0, j], axes[1, j]
        top.plot([0, 1], [0, 1], color="0.5", linewidth=0.8)
        low, high = math.inf, 0.0
        for i, label in enumerate(labels):
            for snr in shown:
                estimate = calibrated.get((label, snr))
                if estimate is None or snr not in styles:
                    continue
                truth = sets[list(snrs).index(snr)].params[:, j]
                args = (estimate.params[:, j], estimate.stderr[:, j], truth)
                top.plot(NOMINAL_LEVELS, coverage_curve(*args, NOMINAL_LEVELS), color=f"C{i}",
                         linestyle=styles[snr], linewidth=1.1, label=f"{label} SNR {snr:g}")
                se, rms = binned_error(*args, n_bins=SE_BINS)
                if se.size:
                    bottom.plot(se, rms, color=f"C{i}", linestyle=styles[snr], marker="o", markersize=2.5,
                                linewidth=1.0)
                    low, high = min(low, se.min(), rms.min()), max(high, se.max(), rms.max())
        if high > 0 and math.isfinite(low):
            low = max(low, high * 1e-3)
            bottom.plot([low, high], [low, high], color="0.5", linewidth=0.8)
            bottom.set_xscale("log")
            bottom.set_yscale("log")
        top.set_title(f"{param} ({unit})", fontsize=10)
        top.set_xlabel("nominal coverage", fontsize=8)
        top.set_ylabel("observed coverage", fontsize=8)
        bottom.set_xlabel(f"RMS se ({unit}) in the bin", fontsize=8)
        bottom.set_ylabel(f"RMS error ({unit})", fontsize=8)
        for ax in (top, bottom):
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=6)
    return _Png("calibration", figure_png(figure),
                "Calibration of the standard errors. Top: share of rows whose Gaussian interval estimate ± z·se "
                "covers the truth against its nominal level (on the grey diagonal when calibrated; below: se too "
                "small). Bottom: RMS error against the RMS se in bins of se holding equal numbers of rows "
                "(log axes; on the diagonal when calibrated).")


# --- the report -------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return "—" if not math.isfinite(value) else f"{100 * value:.3g} %"


def _num(value: float) -> str:
    return "—" if not math.isfinite(value) else f"{value:.3g}"


def _us(seconds: float) -> str:
    return "—" if not math.isfinite(seconds) else f"{seconds * 1e6:.3g} µs"


METRIC_COLUMNS = (("bias", "bias ({unit})", _num), ("nmae", "NMAE", _pct), ("nrmse", "NRMSE", _pct),
                  ("cov", "CoV", _pct), ("cv_net", "CV_Net", _pct), ("sd_over_crlb", "SD/CRLB", _num))


def _metric_table(table: dict, labels: list[str], param: str, unit: str,
                  snr: float) -> tuple[list[str], list[list[str]]]:
    header = ["method"] + [title.format(unit=unit) for _, title, _ in METRIC_COLUMNS]
    rows = [[m] + [fmt(table.get((m, param, snr, metric), math.nan)) for metric, _, fmt in METRIC_COLUMNS]
            for m in labels]
    rows.append(["CRLB (bound)", "", "", "", _pct(table[("crlb", param, snr, "cov")]), "",
                 f"SD {_num(table[('crlb', param, snr, 'sd')])} (median)"])
    return header, rows


def _timing_table(table: dict, labels: list[str], snrs: list[float], networks: list[dict]) -> tuple[list, list]:
    lut = _mean_time(table, "lut", snrs) if "lut" in labels else math.nan
    rows = []
    for m in labels:
        t = _mean_time(table, m, snrs)
        mine = [r for r in networks if r["method"] == m]
        training = f"{np.mean([r['training_s'] for r in mine]):.1f} s x {len(mine)}" if mine else ""
        cached = f"{sum(r['from_cache'] for r in mine)} of {len(mine)}" if mine else ""
        rows.append([m, _us(t), f"{1 / t:,.0f}", _num(t / lut), training, cached])
    return ["method", "prediction per voxel", "voxels/s", "x lut", "training per network", "from cache"], rows


def _document(table: dict, model: KineticModel, labels: list[str], snrs: list[float], findings: list[Finding],
              settings: dict, durations: dict, figures: list[_Png]) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"h3", text), ("p", text), ("list", items),
    ("table", header, rows), ("figure", _Png), ("pre", text)."""
    clinical = [s for s in snrs if s in CLINICAL_SNRS] or snrs
    protocol, units = model.protocol, model.param_units
    rows_per_snr = settings["rows_per_snr"]
    doc: list[tuple] = [
        ("h1", f"aslbatch Monte Carlo evaluation: {model.name} model"),
        ("p", f"Methods {', '.join(labels)} on {settings['n_sets']} parameter sets x {settings['repeats']} "
              f"{settings['noise']} noise realisations ({rows_per_snr} rows) at each SNR of {_snr_list(snrs)}; "
              f"{settings['retrainings']} trainings (seeds {settings['network_seeds']}) per network method. "
              f"Ran {durations['total_before_report_s']:.0f} s before writing this report (networks "
              f"{durations.get('networks_s', 0.0):.0f} s, predictions {durations.get('prediction_s', 0.0):.0f} s) "
              f"on {settings['machine']['cores']} cores, load average {settings['machine']['load_average_start']:.1f} "
              f"at the start (a shared machine slows every time below)."),
        ("h2", "Findings of the research"),
        ("p", "Each finding of the research this project follows (MISSION.md), and whether this evaluation "
              "reproduces it, computed from the numbers below: accuracy is NRMSE, noise immunity the CoV over the "
              "noise repeats (lower is better for both), compared at every SNR of the sweep between the best of "
              "the named family (supervised = supervised and supervised-mae; unsupervised likewise) and the best "
              "of all other evaluated methods."),
        ("list", [f"**{f.verdict}** — {f.claim} {f.evidence}" for f in findings]),
        ("h2", "Metrics at the typical clinical SNRs"),
        ("p", "Bias in the parameter's unit; NMAE = mean |error| / mean truth, NRMSE = RMSE / mean truth; CoV = "
              "SD over the noise repeats / true value, mean over the sets (sets with a true value under "
              f"{MIN_RELATIVE:g} x the mean are left out); CV_Net = SD over the networks / true value; SD/CRLB = "
              "SD over the repeats / Cramér–Rao lower bound (Gaussian noise). The CRLB row gives the bound's CoV "
              "and its median SD."),
    ]
    for snr in clinical:
        for param, unit in zip(model.param_names, model.param_units):
            header, rows = _metric_table(table, labels, param, unit, snr)
            doc += [("h3", f"{param} at SNR {snr:g}"), ("table", header, rows)]
    doc += _calibration_section(table, model, labels, clinical)
    header, rows = _timing_table(table, labels, snrs, settings["networks"])
    doc += [("h2", "Computation time"),
            ("p", f"Prediction only (for a network: its forward pass and its variance network's at the test SNR, "
                  f"the clipping into the bounds and the "
                  f"residual of the model signal, as the estimator returns them), per voxel, mean over the SNRs, each "
                  f"the fastest of {TIMING_REPEATS} runs over {rows_per_snr} rows; lm and lut on "
                  f"{settings['machine']['numba_threads']} numba threads, networks on {BLAS_THREADS} BLAS thread "
                  f"(more were slower on this shared machine). Training: once per protocol and network, as recorded "
                  f"when it was trained."),
            ("table", header, rows),
            ("h2", "Figures")]
    doc += [("figure", f) for f in figures]
    doc += [
        ("h2", "Settings"),
        ("table", ["volume", "label duration (s)", "PLD (s)", "crushed"],
         [[str(i + 1), f"{t:g}", f"{w:g}", "yes" if c else "no"]
          for i, (t, w, c) in enumerate(zip(protocol.label_duration, protocol.pld, protocol.crushed))]),
        ("list", [f"Model: {model.name} ({', '.join(f'{n} [{u}]' for n, u in zip(model.param_names, units))}); "
                  f"model options {json.dumps(settings['model']['options'])}",
                  f"Constants: {json.dumps(settings['model']['constants'])}",
                  f"Parameter ranges of the sets (uniform): {json.dumps(settings['training_ranges'])}",
                  f"Noise: {settings['noise']}, σ = S_ref / SNR; SNRs {_snr_list(snrs)}; density plots at SNR "
                  f"{settings['density_snr']:g}",
                  f"Sizes: {settings['n_sets']} parameter sets x {settings['repeats']} repeats per SNR, "
                  f"{settings['retrainings']} networks per network method{' (quick run)' if settings['quick'] else ''}",
                  f"Seeds: evaluation seed {settings['seed']}; derived data seeds "
                  f"{json.dumps(settings['data_seeds'])}; "
                  f"network seeds {settings['network_seeds']}",
                  f"Network options given to every network: {json.dumps(settings['network_options'], default=str)} "
                  f"(the evaluation's defaults are {json.dumps(DEFAULT_SIZES.network_options)}, quick runs "
                  f"{json.dumps(QUICK_SIZES.network_options)}, instead of the estimators' own 500,000 samples, so "
                  f"that a 1c evaluation with training fits in 15 minutes on 2 cores; the rest are the estimators' "
                  f"defaults, listed per network below)",
                  f"Network cache: {settings['cache_dir']}",
                  f"Versions: {json.dumps(settings['versions'])}",
                  f"Machine: {json.dumps(settings['machine'])}",
                  f"Durations (s): {json.dumps({k: round(v, 1) for k, v in durations.items()})}"]),
    ]
    if settings["networks"]:
        doc += [("h3", "Networks used"),
                ("table", ["method", "seed", "file", "sha256", "from cache", "epochs (best)", "training (s)",
                           "this run (s)"],
                 [[r["method"], str(r["seed"]), r["file"], r["sha256"][:16],
                   "yes" if r["from_cache"] else "trained now", f"{r['epochs']} ({r['best_epoch']})",
                   f"{r['training_s']:.1f}", f"{r['wall_s']:.1f}"] for r in settings["networks"]]),
                ("p", "Options of each method's networks (the same for every seed but the seed):"),
                ("pre", "\n".join(f"{r['method']}: {json.dumps({k: v for k, v in r['options'].items() if k != 'seed'})}"
                                  for r in settings["networks"] if r["seed"] == settings["seed"]))]
    return doc


def _calibration_section(table: dict, model: KineticModel, labels: list[str], snrs: list[float]) -> list[tuple]:
    """The report's blocks on the calibration of the standard errors (none without a method that gives them)."""
    with_se = [m for m in labels if any(math.isfinite(table.get((m, p, s, "coverage_95"), math.nan))
                                        for p in model.param_names for s in snrs)]
    if not with_se:
        return []
    doc: list[tuple] = [
        ("h2", "Calibration of the standard errors"),
        ("p", "Share of rows whose 68.3 % and 95 % intervals cover the truth: for the networks the half-widths "
              "they write (ci68, ci95: quantiles of |error|), the ± 1 se and ± 1.96 se coverage in the next columns; "
              "for the other methods estimate ± 1 se and ± 1.96 se; z = (estimate − truth) / se, its SD and its IQR / 1.349 (both 1 when calibrated, above 1: "
              "se too small); se undefined: finite estimates without a finite se; prior-dominated: share of rows "
              f"flagged (se undefined or above {PRIOR_SHARE:g} × the SD of the training prior). The networks' se is "
              "the posterior SD under their training prior, given the noise SD of the test SNR: the parameter sets "
              "here are drawn from that same prior (uniform over the training ranges), so their coverage is "
              "measured under the prior they were trained for; on other distributions of parameters it can differ."),
    ]
    for snr in snrs:
        body = []
        for m in with_se:
            for p in model.param_names:
                get = lambda metric: table.get((m, p, snr, metric), math.nan)  # noqa: E731
                body.append([m, p, _pct(get("coverage_68")), _pct(get("coverage_95")), _pct(get("coverage_68_se")),
                             _pct(get("coverage_95_se")), _num(get("z_sd")), _num(get("z_robust_sd")),
                             _pct(get("se_undefined")), _pct(get("prior_dominated"))])
        doc += [("h3", f"Calibration at SNR {snr:g}"),
                ("table", ["method", "parameter", "68 % interval covers", "95 % interval covers", "± se covers",
                           "± 1.96 se covers", "z SD", "z IQR/1.349", "se undefined", "prior-dominated"], body)]
    return doc


def _snr_list(snrs: Sequence[float]) -> str:
    return ", ".join(f"{s:g}" for s in snrs)


#: the report's rules after the shared stylesheet (aslbatch.report.CSS)
_CSS = """
li { margin: 0.4em 0; } img { max-width: 100%; }
"""


def _html_text(text: str) -> str:
    """Escaped text with **bold** spans."""
    parts = escape(text).split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))


def _html(doc: list[tuple]) -> str:
    body = []
    for kind, *content in doc:
        if kind in ("h1", "h2", "h3", "p"):
            body.append(f"<{kind}>{_html_text(content[0])}</{kind}>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_html_text(item)}</li>" for item in content[0]) + "</ul>")
        elif kind == "table":
            body.append(html_table(*content))
        elif kind == "figure":
            fig = content[0]
            body.append(f"<figure>{img(fig.png, fig.name)}<figcaption>{escape(fig.caption)}</figcaption></figure>")
        else:
            body.append(f"<pre>{escape(content[0])}</pre>")
    return html_page(doc[0][1], "\n".join(body), extra_css=_CSS)


def _markdown(doc: list[tuple]) -> str:
    out = []
    for kind, *content in doc:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + content[0])
        elif kind == "p":
            out.append(content[0])
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in content[0]))
        elif kind == "table":
            out.append(markdown_table(*content))
        elif kind == "figure":
            fig = content[0]
            out.append(f"![{fig.name}](figures/{fig.name}.png)\n\n*{fig.caption}*")
        else:
            out.append("```\n" + content[0] + "\n```")
    return "\n\n".join(out) + "\n"


def _tsv_value(value: Any) -> str:
    return str(value) if isinstance(value, (int, np.integer)) else repr(float(value))


def _write(out: Path, rows: list[dict[str, Any]], figures: list[_Png], doc: list[tuple]) -> dict[str, Path]:
    """Write every file atomically (the report last); returns their paths."""
    paths = {"metrics": out / "metrics.tsv"}
    with atomic_open(paths["metrics"], "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(["method", "parameter", "snr", "metric", "value"])
        for r in rows:
            snr = "" if r["snr"] is None else f"{r['snr']:g}"
            writer.writerow([r["method"], r["parameter"], snr, r["metric"], _tsv_value(r["value"])])
    for fig in figures:
        paths[f"figure_{fig.name}"] = out / "figures" / f"{fig.name}.png"
        with atomic_open(paths[f"figure_{fig.name}"], "wb") as fh:
            fh.write(fig.png)
    paths["report_md"] = out / "report.md"
    with atomic_open(paths["report_md"], "w", encoding="utf-8") as fh:
        fh.write(_markdown(doc))
    paths["report_html"] = out / "report.html"
    with atomic_open(paths["report_html"], "w", encoding="utf-8") as fh:
        fh.write(_html(doc))
    return paths
