"""The tool's speed in one run: estimator throughput beside a per-voxel scipy loop, network
training, and the batch's time per session, written as ``bench.json``, ``bench.md`` and ``bench.png``.

What is measured (:func:`run_bench`)
------------------------------------
- **Throughput** (voxels/s): ``predict`` of every method on the first N voxels of one
  simulated set per model (SNR 5, Rician, the model's training ranges), with numba and BLAS
  limited to each thread count. Each figure is the fastest of at least :data:`MIN_ROUNDS`
  calls (more while they fit in :data:`ROUND_BUDGET_S`) after a warm-up call, so numba's
  compile or cache-load time is excluded. Networks have the default architecture, briefly
  trained: inference time does not depend on the weights.
- **scipy reference**: :func:`scipy_loop`, a bounded ``scipy.optimize.least_squares`` (trf,
  analytic Jacobian) per voxel in a Python loop, the way peer tools fit, from
  :func:`coarse_start`, on the first ``scipy_voxels`` voxels, on 1 thread, timed like the
  methods (after a one-voxel warm-up) and reported per voxel. Ratios: a method's voxels/s
  over the scipy loop's, and over LM's at the same model, thread count and size.
- **Training**: each network method trained with its default options on
  ``training_samples`` simulated samples on the largest thread count, for exactly
  ``training_epochs`` epochs (the default: the speed per epoch at full size, in seconds) or,
  with ``early_stopping``, until early stopping ends it (the whole training: minutes per
  network); samples/s = epochs × samples / seconds of the epoch loop (validation after each
  epoch included).
- **Batch**: :func:`aslbatch.batch.run_batch` (LM, QC pages on, one job on the largest thread
  count) on a phantom dataset per model, once to warm up, then timed with ``force``; the
  per-session mean of its stages: I/O (reading and hashing inputs + writing outputs),
  preprocessing, estimation and the QC report.

Wall-clock figures on a shared machine vary with its load: ``bench.json`` records the load
average before and after. With ``progress``, the run states its expected duration before it
starts (:func:`expected_seconds`) and shows a bar over its steps.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numba
import numpy as np
from scipy.optimize import least_squares
from threadpoolctl import threadpool_info, threadpool_limits
from tqdm import tqdm

from ._version import versions
from .atomic import atomic_open
from .batch import run_batch
from .estimators import ESTIMATORS, Estimator, get_estimator
from .models import MODELS, KineticModel, calibrated_models, get_model
from .phantom import phantom_for, write_bids_dataset
from .pipeline import Settings
from .protocol import default_protocol
from .report import figure_png, markdown_table, new_figure
from .simulate import simulate

__all__ = ["FULL", "QUICK", "BenchResult", "best_time", "coarse_start", "expected_seconds", "machine_info", "markdown",
           "plot", "run_bench", "scipy_loop", "thread_limit", "write_outputs"]

#: identifies the layout of bench.json
FORMAT = "aslbatch.bench/1"
#: SNR and noise of the simulated throughput data
SNR = 5.0
NOISE = "rician"
#: throughput: at least this many timed calls, more while their total stays under ROUND_BUDGET_S (s)
MIN_ROUNDS = 3
MAX_ROUNDS = 50
ROUND_BUDGET_S = 0.3
#: the networks timed for inference: default architecture, trained this briefly
INFERENCE_TRAINING = {"samples": 5000, "epochs": 1}
#: batch datasets: control/label pairs per PLD of the phantom series
BATCH_REPEATS = 4
#: the issue's training target, quoted in bench.md: samples, seconds, cores
TRAINING_TARGET = (10**6, 180.0, 2)
#: settings that ``quick`` changes; None arguments of :func:`run_bench` take these. Training runs
#: 3 epochs of 10^6 samples: the speed per epoch at full size; to early stopping (``early_stopping``)
#: the four networks took most of the 215 s of a default run before (issue 12)
FULL = {"sizes": (10**3, 10**4, 10**5, 10**6), "scipy_voxels": 200, "training_samples": 10**6,
        "training_epochs": 3, "batch_sessions": 4, "batch_shape": (64, 64, 20)}
QUICK = {"sizes": (10**3, 10**4), "scipy_voxels": 20, "training_samples": 2000, "training_epochs": 2,
         "batch_sessions": 2, "batch_shape": (24, 24, 8)}
@dataclass(frozen=True)
class BenchResult:
    """What :func:`run_bench` measured (the content of ``bench.json``) and where it wrote it.

    throughput : rows model, method, threads, voxels, seconds (fastest call), rounds,
        voxels_per_s, vs_scipy, vs_lm (None without LM).
    scipy : rows model, voxels, seconds (fastest pass), rounds, seconds_per_voxel, voxels_per_s.
    training : rows model, method, threads, samples, epochs, best_epoch, seconds (the whole
        fit, simulation included), training_seconds, seconds_per_epoch, samples_per_s, options.
    batch : rows model, method, sessions, shape, threads, per_session_s (io, prepare, fit,
        report, total) and stages_s (the run's own stages: inputs, prepare, fit, write, report),
        seconds per session.
    """

    machine: dict[str, Any]
    settings: dict[str, Any]
    throughput: list[dict[str, Any]]
    scipy: list[dict[str, Any]]
    training: list[dict[str, Any]]
    batch: list[dict[str, Any]]
    duration_s: float
    paths: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready content of ``bench.json``."""
        out = asdict(self)
        del out["paths"]
        return {"format": FORMAT, **out}


# --- measuring ---------------------------------------------------------------------------


@contextlib.contextmanager
def thread_limit(threads: int) -> Iterator[None]:
    """Limit numba and the BLAS/OpenMP pools to ``threads`` inside the block; restored afterwards."""
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        with threadpool_limits(threads):
            yield
    finally:
        numba.set_num_threads(previous)


def best_time(call: Callable[[], Any]) -> tuple[float, int]:
    """Fastest duration (s) of repeated ``call()`` and the number of calls (see MIN_ROUNDS)."""
    times: list[float] = []
    while len(times) < MIN_ROUNDS or (sum(times) < ROUND_BUDGET_S and len(times) < MAX_ROUNDS):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return min(times), len(times)


def coarse_start(model: KineticModel, signals: np.ndarray) -> np.ndarray:
    """Start of the scipy loop (n, n_params), API units: the lookup table at LM's start-grid step,
    inside the bounds (LM starts from the same grid); zero for a closed-form model."""
    if not model.time_resolved:
        return np.zeros((signals.shape[0], model.n_params))
    step = get_estimator("lm", model).grid_step_s
    params = get_estimator("lut", model, resolution_s=step).fit().predict(signals).params
    return np.clip(params, *model.bounds)


def scipy_loop(model: KineticModel, signals: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Per-voxel bounded ``least_squares`` (trf, the model's analytic Jacobian) from ``start``;
    returns (n, n_params) in API units. 2C: scipy cannot express abat <= att, which is not enforced."""
    lower, upper = model.bounds

    def residual(p: np.ndarray, y: np.ndarray) -> np.ndarray:
        return model.signal(p)[0] - y

    def jacobian(p: np.ndarray, y: np.ndarray) -> np.ndarray:
        return model.jacobian(p)[0]

    out = np.empty_like(start)
    for i, y in enumerate(signals):
        out[i] = least_squares(residual, start[i], jac=jacobian, bounds=(lower, upper), method="trf", args=(y,)).x
    return out


def _network(method: str, model: KineticModel, samples: int, epochs: int | None, seed: int) -> Estimator:
    """A network estimator of the default architecture for ``samples`` simulated samples: default early stopping,
    or exactly ``epochs`` epochs (2C unsupervised then without its arterial-window schedule, which
    changes the loss, not the work per epoch)."""
    options: dict[str, Any] = {"n_samples": samples, "seed": seed}
    if epochs is not None:
        options.update(max_epochs=epochs, patience=epochs)
        if method == "unsupervised":
            options["edge_epochs"] = 0
    return get_estimator(method, model, **options)


def _is_network(method: str) -> bool:
    return ESTIMATORS[method].trains


def _scipy_reference(model: KineticModel, signals: np.ndarray) -> dict[str, Any]:
    """The scipy loop's row: the fastest pass over ``signals`` on 1 thread, after a one-voxel warm-up."""
    start = coarse_start(model, signals)
    with thread_limit(1):
        scipy_loop(model, signals[:1], start[:1])
        seconds, rounds = best_time(partial(scipy_loop, model, signals, start))
    n = signals.shape[0]
    return {"model": model.name, "voxels": n, "seconds": seconds, "rounds": rounds, "seconds_per_voxel": seconds / n,
            "voxels_per_s": n / seconds}


def _throughput(model: KineticModel, signals: np.ndarray, cfg: dict[str, Any], say: Callable[[str], None]
                ) -> list[dict[str, Any]]:
    """Throughput rows of every method, thread count and size on the first rows of ``signals``."""
    rows = []
    for method in _served(cfg, model.name):
        if _is_network(method):
            est = _network(method, model, **INFERENCE_TRAINING, seed=cfg["seed"])
        else:
            est = get_estimator(method, model)
        est.fit()
        for threads in cfg["threads"]:
            with thread_limit(threads):
                est.predict(signals[:cfg["sizes"][0]])
                for n in cfg["sizes"]:
                    seconds, rounds = best_time(partial(est.predict, signals[:n]))
                    rows.append({"model": model.name, "method": method, "threads": threads, "voxels": n,
                                 "seconds": seconds, "rounds": rounds, "voxels_per_s": n / seconds})
                    say(f"{model.name} {method}, {_threads(threads)}, {n} voxels: {n / seconds:.4g} voxels/s")
    return rows


def _add_ratios(rows: list[dict[str, Any]], scipy_row: dict[str, Any]) -> None:
    """Set vs_scipy and vs_lm (None without LM rows) of one model's throughput rows."""
    lm = {(r["threads"], r["voxels"]): r["voxels_per_s"] for r in rows if r["method"] == "lm"}
    for r in rows:
        r["vs_scipy"] = r["voxels_per_s"] / scipy_row["voxels_per_s"]
        r["vs_lm"] = r["voxels_per_s"] / lm[r["threads"], r["voxels"]] if lm else None


def _training(model: KineticModel, method: str, cfg: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Train one network method as configured and time it (after a warm-up fit of the inference network's size)."""
    threads = max(cfg["threads"])
    samples, epochs = cfg["training_samples"], cfg["training_epochs"]
    with thread_limit(threads):
        _network(method, model, **INFERENCE_TRAINING, seed=cfg["seed"]).fit()
        est = _network(method, model, samples, epochs, cfg["seed"])
        t0 = time.perf_counter()
        est.fit(progress=progress)
        seconds = time.perf_counter() - t0
    history = est.training_
    n_epochs, loop_s = int(history["epochs"]), float(history["training_seconds"])
    return {"model": model.name, "method": method, "threads": threads, "samples": samples, "epochs": n_epochs,
            "best_epoch": int(history["best_epoch"]), "seconds": seconds, "training_seconds": loop_s,
            "seconds_per_epoch": loop_s / n_epochs, "samples_per_s": n_epochs * samples / loop_s,
            "options": est.options()}


def _batch(name: str, cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """Per-session stage times of an LM batch over a phantom dataset of ``name`` subjects."""
    sessions, shape, threads = cfg["batch_sessions"], cfg["batch_shape"], max(cfg["threads"])
    phantom, protocol = phantom_for(name)
    raw = write_bids_dataset(work / f"raw-{name}", subjects=sessions, model=phantom, snr=SNR, seed=cfg["seed"],
                             shape=shape, repeats=BATCH_REPEATS, groundtruth_dir=work / f"truth-{name}",
                             protocol=protocol)
    # the model named, not "auto": the phantom is written for it
    out, settings = work / f"out-{name}", Settings(methods=("lm",), model=name)
    with thread_limit(threads):  # run_batch sets the numba and BLAS threads of this process
        run_batch(raw, out, settings, jobs=1, threads=threads)
        report = run_batch(raw, out, settings, jobs=1, threads=threads, force=True)
    failed = [f"{o.session}: {o.reason}" for o in report.outcomes if o.status != "done"]
    if failed or len(report.outcomes) != sessions:
        raise RuntimeError(f"the {name} benchmark batch did not process every session: {failed}")
    stages: dict[str, float] = {}
    for outcome in report.outcomes:
        for stage, seconds in outcome.timings.items():
            stages[stage] = stages.get(stage, 0.0) + seconds / sessions
    split = {"io": stages.get("inputs", 0.0) + stages.get("write", 0.0), "prepare": stages.get("prepare", 0.0),
             "fit": stages.get("fit", 0.0), "report": stages.get("report", 0.0)}
    split["total"] = sum(split.values())
    return {"model": name, "method": "lm", "sessions": sessions, "shape": list(shape), "threads": threads,
            "per_session_s": split, "stages_s": stages}


# --- arguments and machine ---------------------------------------------------------------


def _served(cfg: dict[str, Any], model_name: str) -> list[str]:
    """The configured methods that serve the model ``model_name`` (in their order)."""
    return [m for m in cfg["methods"] if ESTIMATORS[m].serves(MODELS[model_name])]


def _names(value: str | Sequence[str], known: Sequence[str], what: str) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else tuple(value)
    unknown = [n for n in names if n not in known]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"{what} must be distinct names from {sorted(known)}, got {list(names)}")
    return names


def _integers(value: Sequence[int], what: str, low: int) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, Iterable) and not isinstance(value, str) else (value,)
    if not values or len(set(values)) != len(values) or not all(_is_int(v) and v >= low for v in values):
        raise ValueError(f"{what} must be distinct integers >= {low}, got {value!r}")
    return tuple(sorted(int(v) for v in values))


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _config(models: Any, methods: Any, sizes: Any, threads: Any, scipy_voxels: Any, training_samples: Any,
            training_epochs: Any, early_stopping: bool, batch_sessions: Any, batch_shape: Any, quick: bool,
            seed: Any) -> dict[str, Any]:
    """Validated settings, with None arguments taken from QUICK or FULL."""
    preset = QUICK if quick else FULL
    if early_stopping and training_epochs is not None:
        raise ValueError(f"training_epochs ({training_epochs!r}) and early_stopping exclude each other")
    given = {"sizes": sizes, "scipy_voxels": scipy_voxels, "training_samples": training_samples,
             "training_epochs": training_epochs, "batch_sessions": batch_sessions, "batch_shape": batch_shape}
    cfg = {k: preset[k] if v is None else v for k, v in given.items()}
    if early_stopping:
        cfg["training_epochs"] = None
    asked = _integers(threads, "threads", 1)
    available = numba.config.NUMBA_NUM_THREADS
    usable = tuple(t for t in asked if t <= available)
    if not usable:
        raise ValueError(f"threads {list(asked)}: this machine runs at most {available} numba thread(s)")
    for key, low in (("scipy_voxels", 1), ("training_samples", 100), ("batch_sessions", 0)):
        if not _is_int(cfg[key]) or cfg[key] < low:
            raise ValueError(f"{key} must be an integer >= {low}, got {cfg[key]!r}")
    epochs = cfg["training_epochs"]
    if epochs is not None and not (_is_int(epochs) and epochs >= 1):
        raise ValueError(f"training_epochs must be None (early stopping) or an integer >= 1, got {epochs!r}")
    shape = cfg["batch_shape"]
    shape = tuple(shape) if isinstance(shape, Iterable) and not isinstance(shape, str) else (shape,)
    if not (len(shape) == 3 and all(_is_int(v) and v >= 8 for v in shape)):
        raise ValueError(f"batch_shape must be 3 integers >= 8 (voxels), got {shape!r}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return {
        "models": _names(calibrated_models() if models is None else models, calibrated_models(), "models"),
        "methods": _names(methods, tuple(ESTIMATORS), "methods"),
        "sizes": _integers(cfg["sizes"], "sizes", 1),
        "threads": usable,
        "skipped_threads": [t for t in asked if t > available],
        "scipy_voxels": int(cfg["scipy_voxels"]),
        "training_samples": int(cfg["training_samples"]),
        "training_epochs": None if epochs is None else int(epochs),
        "batch_sessions": int(cfg["batch_sessions"]),
        "batch_shape": tuple(int(v) for v in shape),
        "quick": bool(quick),
        "seed": int(seed),
        "snr": SNR,
        "noise": NOISE,
    }


def machine_info() -> dict[str, Any]:
    """The machine and software the figures come from (date in UTC)."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "blas": [{k: lib.get(k) for k in ("internal_api", "version", "num_threads")} for lib in threadpool_info()],
        "versions": versions(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


#: rough speeds on 2 quiet cores for the duration a run states before it starts: voxels/s of
#: ``predict`` at 10^6 voxels (any thread count: the 1-thread figure, conservative) and of the
#: scipy loop (both as in the README), training samples/s and epochs to early stopping (with the rest,
#: the 215 s of a default run that trained to early stopping, issue 12), s per batch session of
#: FULL's grid (each run twice), and start-up (imports, numba cache loads, simulation)
ROUGH_VOXELS_PER_S = {"1c": {"lm": 3.0e6, "lut": 2.9e6, "network": 4.3e6},
                      "2c": {"lm": 4.5e5, "lut": 3.1e5, "network": 2.3e6},
                      "pasl": {"lm": 1.8e6, "lut": 2.3e6, "network": 3.2e6},
                      "single": {"whitepaper": 3.0e7}}
ROUGH_SCIPY_PER_S = {"1c": 2500.0, "2c": 1500.0, "pasl": 2800.0, "single": 4000.0}
ROUGH_TRAINING_SAMPLES_PER_S = {"1c": 1.5e6, "2c": 8e5, "pasl": 1.5e6}
ROUGH_EARLY_STOPPING_EPOCHS = 40
ROUGH_SESSION_S = 1.5
ROUGH_FIXED_S = 20.0


def expected_seconds(cfg: dict[str, Any]) -> float:
    """Rough wall time (s) of a run with the validated settings ``cfg`` on 2 quiet cores (ROUGH_*)."""
    total = ROUGH_FIXED_S
    for name in cfg["models"]:
        total += MIN_ROUNDS * cfg["scipy_voxels"] / ROUGH_SCIPY_PER_S[name]
        for method in _served(cfg, name):
            rate = ROUGH_VOXELS_PER_S[name]["network" if _is_network(method) else method]
            for n in cfg["sizes"]:
                total += len(cfg["threads"]) * max(MIN_ROUNDS * n / rate, ROUND_BUDGET_S)
            if _is_network(method):
                epochs = cfg["training_epochs"] or ROUGH_EARLY_STOPPING_EPOCHS
                total += epochs * cfg["training_samples"] / ROUGH_TRAINING_SAMPLES_PER_S[name]
        cells = math.prod(cfg["batch_shape"]) / math.prod(FULL["batch_shape"])
        total += 2 * cfg["batch_sessions"] * ROUGH_SESSION_S * max(cells, 0.1)
    return total


# --- the run -----------------------------------------------------------------------------


def run_bench(out_dir: str | os.PathLike, *, models: Sequence[str] | None = None,
              methods: Sequence[str] = tuple(ESTIMATORS),
              sizes: Sequence[int] | None = None, threads: Sequence[int] = (1, 2), scipy_voxels: int | None = None,
              training_samples: int | None = None, training_epochs: int | None = None,
              early_stopping: bool = False, batch_sessions: int | None = None,
              batch_shape: Sequence[int] | None = None, quick: bool = False, seed: int = 0,
              progress: bool = False) -> BenchResult:
    """Measure (module docstring) and write ``bench.json``, ``bench.md`` and ``bench.png`` into ``out_dir``.

    models, methods : what to time (models None: every calibrated model,
        :func:`~aslbatch.models.calibrated_models`); training covers the network methods among ``methods``.
    sizes : voxels per ``predict`` call. threads : numba/BLAS thread counts; counts above the
        machine's numba threads are skipped and listed in ``settings["skipped_threads"]``.
    scipy_voxels : voxels of the scipy loop. training_samples : simulated training samples.
    training_epochs : epochs each network trains (None: the preset's). early_stopping : train to
        early stopping instead (the whole training; excludes ``training_epochs``).
    batch_sessions : phantom sessions per model (0 skips the batch); batch_shape : their grid (voxels).
    quick : the QUICK presets (seconds, for CI) for the arguments left None, else FULL.
    seed : of the simulated data, the networks and the phantoms. progress : on stderr, the expected
        duration before starting, a bar over the steps (each figure, training, batch) with a line
        per figure, and training bars (run_batch prints its line per session either way).
    Invalid arguments raise ValueError before anything is measured.
    """
    cfg = _config(models, methods, sizes, threads, scipy_voxels, training_samples, training_epochs, early_stopping,
                  batch_sessions, batch_shape, quick, seed)
    out = Path(out_dir)
    steps = sum(1 + len(_served(cfg, name)) * len(cfg["threads"]) * len(cfg["sizes"])
                + sum(map(_is_network, _served(cfg, name))) + bool(cfg["batch_sessions"]) for name in cfg["models"])
    bar = tqdm(total=steps, desc="bench", unit="step", disable=not progress, file=sys.stderr)

    def say(line: str) -> None:
        """One step done: its figure as a line above the bar."""
        bar.update()
        if not bar.disable:
            bar.write(f"bench: {line}", file=sys.stderr)

    if progress:
        bar.write(f"bench: expected duration about {expected_seconds(cfg) / 60:.1f} min on 2 quiet cores"
                  + ("" if quick else "; --quick: under a minute"), file=sys.stderr)
    machine = machine_info()
    t0 = time.perf_counter()
    throughput, scipy_rows, training, batch = [], [], [], []
    for name in cfg["models"]:
        model = get_model(name, default_protocol(name))
        data = simulate(model, max(max(cfg["sizes"]), cfg["scipy_voxels"]), SNR, noise=NOISE, seed=cfg["seed"])
        scipy_rows.append(_scipy_reference(model, data.signals[:cfg["scipy_voxels"]]))
        say(f"{name} scipy loop: {scipy_rows[-1]['voxels_per_s']:.4g} voxels/s")
        rows = _throughput(model, data.signals, cfg, say)
        _add_ratios(rows, scipy_rows[-1])
        throughput += rows
        for method in filter(_is_network, _served(cfg, name)):
            training.append(_training(model, method, cfg, progress))
            say(f"{name} {method} training: {training[-1]['seconds']:.1f} s, {training[-1]['epochs']} epoch(s)")
    if cfg["batch_sessions"]:
        with tempfile.TemporaryDirectory(prefix="aslbatch-bench-") as work:
            for name in cfg["models"]:
                batch.append(_batch(name, cfg, Path(work)))
                say(f"{name} batch: {batch[-1]['per_session_s']['total']:.2f} s per session")
    bar.close()
    machine["threading_layer"] = numba.threading_layer()
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result = BenchResult(machine, {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}, throughput,
                         scipy_rows, training, batch, time.perf_counter() - t0)
    return write_outputs(result, out)


# --- outputs -----------------------------------------------------------------------------


def write_outputs(result: BenchResult, out_dir: Path) -> BenchResult:
    """Write bench.png, bench.md, then bench.json (each atomically); returns ``result`` with the paths."""
    paths = {"png": out_dir / "bench.png", "md": out_dir / "bench.md", "json": out_dir / "bench.json"}
    with atomic_open(paths["png"], "wb") as fh:
        fh.write(plot(result))
    with atomic_open(paths["md"], "w", encoding="utf-8") as fh:
        fh.write(markdown(result))
    with atomic_open(paths["json"], "w", encoding="utf-8") as fh:
        json.dump(result.to_dict(), fh, indent=1)
        fh.write("\n")
    return replace(result, paths=paths)


def _num(value: float | None) -> str:
    """A figure for the tables: thousands separators from 100 up, else 3 significant digits."""
    if value is None:
        return "–"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def markdown(result: BenchResult) -> str:
    """bench.md: the machine, then the throughput, scipy, training and batch tables."""
    m, s = result.machine, result.settings
    v = m["versions"]
    lines = [
        "# aslbatch bench", "",
        f"{m['date']}, aslbatch {v['aslbatch']}, Python {v['python']}, numpy {v.get('numpy')}, "
        f"numba {v.get('numba')} ({m['threading_layer']} threading layer), scipy {v.get('scipy')}, "
        f"scikit-learn {v.get('scikit-learn')}; {m['processor']}, {m['cpu_count']} CPUs, "
        f"{m['numba_threads']} numba threads; load average {_load(m['load_average_start'])} at the start, "
        f"{_load(m['load_average_end'])} at the end; {result.duration_s:.0f} s"
        + (" (quick)" if s["quick"] else "") + ".", "",
        "## Throughput", "",
        f"`predict` on the same simulated voxels (SNR {s['snr']:g}, {s['noise']}), numba and BLAS limited to the "
        f"thread count; fastest of >= {MIN_ROUNDS} calls after a warm-up call (numba compile time excluded). "
        f"× scipy and × LM: voxels/s over the scipy loop's and over LM's at the same model, threads and size.", "",
    ]
    lines.append(markdown_table(["model", "method", "threads", "voxels", "voxels/s", "× scipy", "× LM"], [
        (r["model"], r["method"], r["threads"], f"{r['voxels']:,}", _num(r["voxels_per_s"]), _num(r["vs_scipy"]),
         _num(r["vs_lm"])) for r in result.throughput]))
    if s["skipped_threads"]:
        lines += ["", f"Thread counts {s['skipped_threads']} skipped: more than this machine's numba threads."]
    lines += ["", "scipy reference: bounded `least_squares` (trf, analytic Jacobian) per voxel in a Python loop, "
              "from the lookup table at LM's start-grid step, 1 thread, fastest pass over the voxels:", ""]
    lines.append(markdown_table(["model", "voxels", "s/voxel", "voxels/s"], [
        (r["model"], r["voxels"], f"{r['seconds_per_voxel']:.3g}", _num(r["voxels_per_s"])) for r in result.scipy]))
    if result.training:
        samples, seconds, cores = TRAINING_TARGET
        epochs = s["training_epochs"]
        stop = "early stopping" if epochs is None else f"exactly {epochs} epoch{'s' * (epochs != 1)}"
        lines += ["", "## Training", "", f"Default architecture and options ({stop}); s = the whole fit "
                  f"(simulation included), samples/s = epochs × samples / s of the epochs. Issue target: "
                  f"{samples:,} samples in < {seconds:.0f} s on {cores} cores"
                  + ("." if epochs is None else ": a whole training takes s/epoch × the epochs to early stopping "
                     "(`aslbatch bench --early-stopping` measures it)."), ""]
        lines.append(markdown_table(["model", "method", "threads", "samples", "epochs", "s", "s/epoch", "samples/s"], [
            (r["model"], r["method"], r["threads"], f"{r['samples']:,}", r["epochs"], f"{r['seconds']:.3g}",
             f"{r['seconds_per_epoch']:.3g}", _num(r["samples_per_s"])) for r in result.training]))
    if result.batch:
        lines += ["", "## Batch", "", f"`run_batch` (LM, QC pages, 1 job) on phantom sessions ({BATCH_REPEATS} "
                  "control/label pairs per PLD), after a warm-up run; mean seconds per session. I/O = reading and "
                  "hashing the inputs + writing the outputs.", ""]
        lines.append(markdown_table(["model", "sessions", "grid", "threads", "I/O s", "preprocessing s",
                                     "estimation s", "report s", "total s"], [
            (r["model"], r["sessions"], "×".join(map(str, r["shape"])), r["threads"],
             *(f"{r['per_session_s'][k]:.3g}" for k in ("io", "prepare", "fit", "report", "total")))
            for r in result.batch]))
    return "\n".join(lines) + "\n"


def _threads(n: int) -> str:
    return "1 thread" if n == 1 else f"{n} threads"


def _load(values: list[float] | None) -> str:
    return "n/a" if values is None else "/".join(f"{x:.2f}" for x in values)


def plot(result: BenchResult) -> bytes:
    """bench.png: voxels/s against voxels per call, log-log, a panel per model, a line per method
    and thread count, the scipy loop as a horizontal line."""
    models = result.settings["models"]
    methods = result.settings["methods"]
    styles = ["-", "--", "-.", ":"]
    figure = new_figure(4.5 * len(models) + 2.0, 4.0, dpi=100)
    axes = figure.subplots(1, len(models), squeeze=False)[0]
    for ax, name in zip(axes, models):
        for i, method in enumerate(methods):
            for j, threads in enumerate(result.settings["threads"]):
                rows = [r for r in result.throughput
                        if (r["model"], r["method"], r["threads"]) == (name, method, threads)]
                ax.plot([r["voxels"] for r in rows], [r["voxels_per_s"] for r in rows], color=f"C{i}",
                        linestyle=styles[j % len(styles)], marker="o", label=f"{method}, {_threads(threads)}")
        for r in result.scipy:
            if r["model"] == name:
                ax.axhline(r["voxels_per_s"], color="0.35", linestyle=(0, (1, 2)), label="scipy loop, 1 thread")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("voxels per call")
        ax.set_ylabel("voxels/s")
        ax.set_title(f"{name.upper()} model")
        ax.grid(True, which="major", alpha=0.3)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    return figure_png(figure)
