"""The ``aslbatch`` command line: thin typer commands over the library modules.

Commands: ``run`` (a BIDS dataset to BIDS derivatives), ``validate`` (check inputs),
``demo`` (a phantom dataset, processed and scored against its ground truth),
``simulate-dataset`` (a phantom BIDS dataset), ``simulate`` and ``fit`` (voxel sets
without images), ``train`` (a network for a protocol, saved as a file), ``evaluate``
(every method on a Monte Carlo set, with a report) and ``bench`` (throughput tables).

Exit codes (:mod:`aslbatch.exitcodes`): 0 success; 1 some sessions failed (run) or
problems found (validate); 2 usage or configuration error; 3 nothing found to process;
4 another run holds the output folder's lock.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._version import __version__
from .estimators import ESTIMATORS
from .exitcodes import EXIT_FAILED, EXIT_LOCKED, EXIT_NOTHING, EXIT_USAGE
from .models import MODELS

app = typer.Typer(
    name="aslbatch",
    help="Quantitative perfusion maps (CBF, ATT, aCBV) from multi-delay ASL MRI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _choices(name: str, values) -> type[Enum]:
    """A str Enum of ``values`` (typer's choices), each member named and valued by the string."""
    return Enum(name, {value: value for value in values}, type=str)


#: the choices of the command line, from the registries (models, methods)
ModelName = _choices("ModelName", MODELS)
ModelChoice = _choices("ModelChoice", ["auto", *MODELS])
MethodName = _choices("MethodName", ESTIMATORS)
#: aslbatch.preprocess.GRID_POLICIES (not imported here: nibabel stays out of --help)
GridPolicy = _choices("GridPolicy", ["resample", "refuse"])


class T1PrimeName(str, Enum):
    blood = "blood"
    tissue = "tissue"


class LossName(str, Enum):
    mse = "mse"
    mae = "mae"


class NoiseName(str, Enum):
    rician = "rician"
    gaussian = "gaussian"


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print ``aslbatch: error: message`` on stderr and exit with ``code``."""
    typer.echo(f"aslbatch: error: {message}", err=True)
    raise typer.Exit(code)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"aslbatch {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Quantitative perfusion maps (CBF, ATT, aCBV) from multi-delay ASL MRI."""


def _edge_option(model: str, arterial_edge_s: float) -> dict:
    """``{"arterial_edge_s": s}`` for models with an arterial window; an error if given for others."""
    if "arterial_edge_s" in MODELS[model].option_names:
        return {"arterial_edge_s": arterial_edge_s}
    if arterial_edge_s:
        with_edge = [name for name in MODELS if "arterial_edge_s" in MODELS[name].option_names]
        fail(f"--arterial-edge-s applies to the {', '.join(with_edge)} model only, not {model}")
    return {}


def _load_protocol(path: Optional[Path], model: str):
    from .protocol import Protocol, ProtocolError, default_protocol

    if path is None:
        return default_protocol(model)
    try:
        return Protocol.from_json(path.read_text())
    except OSError as exc:
        fail(f"{path}: cannot read protocol file ({exc.strerror})")
    except ProtocolError as exc:
        fail(f"{path}: {exc}")


@app.command()
def simulate(
    out: Annotated[Path, typer.Option("--out", help="Output .npz file (written atomically).")],
    model: Annotated[ModelName, typer.Option(help="Kinetic model (README: The models).")] = ModelName["1c"],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of parameter sets.")] = 10000,
    snr: Annotated[float, typer.Option(help="SNR = S_ref / σ (S_ref: peak signal of a cbf 60, att 1.2 s voxel).")] = 5.0,
    noise: Annotated[NoiseName, typer.Option(help="Noise model of the magnitude data.")] = NoiseName.rician,
    repeats: Annotated[int, typer.Option(min=1, help="Noise realisations per parameter set.")] = 1,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same data.")] = 0,
    protocol: Annotated[
        Optional[Path],
        typer.Option(help="Protocol JSON {label_duration, pld, crushed} in s; default: the model's default protocol."),
    ] = None,
    t1_prime: Annotated[T1PrimeName, typer.Option(help="T1' of the tissue signal: blood (consensus) or tissue (Buxton).")] = T1PrimeName.blood,
    arterial_edge_s: Annotated[float, typer.Option(help="2C only: width (s) of the smoothed arterial window; 0 = hard edges.")] = 0.0,
) -> None:
    """Simulate ASL signals (ΔM/M0t) with known parameters and noise at a stated SNR.

    The .npz holds params (API units: cbf mL/100 g/min, times s, abv mL/mL),
    clean and noisy signals, sigma, snr, group, the protocol and constants.
    """
    from .models import get_model
    from .protocol import ProtocolError
    from .simulate import set_summary
    from .simulate import simulate as run_simulation

    if not snr > 0:
        fail(f"--snr must be > 0, got {snr}")
    prot = _load_protocol(protocol, model.value)
    try:
        constants = MODELS[model.value].default_constants(t1_prime=t1_prime.value)
        kinetic = get_model(model.value, prot, constants, **_edge_option(model.value, arterial_edge_s))
        data = run_simulation(kinetic, n, snr, noise=noise.value, repeats=repeats, seed=seed)
    except (ProtocolError, ValueError) as exc:
        fail(str(exc))
    try:
        data.save(out)
    except OSError as exc:
        fail(f"{out}: cannot write ({exc.strerror})")
    typer.echo(json.dumps({"out": str(out), **set_summary(data)}))


@app.command()
def fit(
    input_path: Annotated[Path, typer.Option("--in", help="Simulated set (.npz) from 'aslbatch simulate'.")],
    out: Annotated[Path, typer.Option("--out", help="Output .npz file (written atomically).")],
    model: Annotated[ModelName, typer.Option(help="Kinetic model to fit; must match the input set.")] = ModelName["1c"],
    method: Annotated[MethodName, typer.Option(help="Estimator (README: Methods).")] = MethodName["lm"],
    network: Annotated[Optional[Path], typer.Option(help="Trained network file (aslbatch train) for a network method; default: the cache's, trained once if missing.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Folder of cached networks (default $ASLBATCH_CACHE_DIR or the per-user cache).")] = None,
) -> None:
    """Estimate parameters from a simulated set and write them with the truth beside them.

    The .npz holds params (API units), status, stderr (NaN where not available), rss,
    param_names, method, intervals (n, n_params, levels: half-widths in API units of the intervals
    params ± half-width, the networks' own where they learn them, else ± 1 and ± 1.96 stderr),
    interval_levels (their nominal coverages, fractions) and truth (the set's true params). A summary with the median
    absolute error per parameter is printed as JSON.
    """
    import numpy as np

    from .atomic import atomic_path
    from .calibration import LEVEL_68, LEVEL_95, Z_68, Z_95
    from .simulate import SimulatedSet

    try:
        data = SimulatedSet.load(input_path)
    except ValueError as exc:
        fail(str(exc))
    if data.model.name != model.value:
        fail(f"{input_path}: the set was simulated with model {data.model.name!r}, not {model.value!r}")
    if network is not None and not ESTIMATORS[method.value].trains:
        fail(f"--network is for network methods, not {method.value}")
    estimator = _network_or_fit(method.value, data.model, network, cache_dir)
    estimate = estimator.predict(data.signals)
    stderr = estimate.stderr if estimate.stderr is not None else np.full_like(estimate.params, np.nan)
    intervals, levels = estimate.intervals, estimate.interval_levels
    if intervals is None:  # the Gaussian intervals the standard errors state
        intervals, levels = stderr[..., None] * np.array([Z_68, Z_95]), (LEVEL_68, LEVEL_95)
    try:
        with atomic_path(out, suffix=".npz") as tmp:
            np.savez(
                tmp,
                params=estimate.params,
                status=estimate.status,
                stderr=stderr,
                rss=estimate.rss,
                intervals=intervals,
                interval_levels=np.asarray(levels, dtype=np.float64),
                param_names=np.array(estimate.param_names),
                method=np.array(estimate.method),
                truth=data.params,
            )
    except OSError as exc:
        fail(f"{out}: cannot write ({exc.strerror})")
    typer.echo(json.dumps({
        "out": str(out),
        "method": estimate.method,
        "voxels": estimate.n_voxels,
        "status": estimate.status_counts(),
        # over the voxels with an estimate; null where there is none (JSON has no NaN)
        "median_abs_error": dict(zip(estimate.param_names, _finite_medians(np.abs(estimate.params - data.params)))),
    }))


def _finite_medians(values) -> list:
    """Each column's median over its finite entries (None where it has none): no numpy warning."""
    import numpy as np

    medians = []
    for column in np.asarray(values, dtype=float).T:
        finite = column[np.isfinite(column)]
        medians.append(float(np.median(finite)) if finite.size else None)
    return medians


def _network_or_fit(method: str, model, network: Optional[Path], cache_dir: Optional[Path]):
    """The estimator ready to predict: a network from its file or the cache, else fitted."""
    from .estimators import get_estimator

    try:
        if network is None and not ESTIMATORS[method].trains:
            return get_estimator(method, model).fit()
        from .estimators.store import NetworkCache, load_network

        if network is not None:
            estimator = load_network(network, model)
            if estimator.name != method:
                fail(f"{network} is a {estimator.name} network, not {method}: give a network trained with "
                     f"'aslbatch train --method {method}', or --method {estimator.name}")
            return estimator
        return NetworkCache(cache_dir).get(get_estimator(method, model), progress=sys.stderr.isatty())
    except (ValueError, OSError) as exc:
        fail(str(exc))


def fail_all(problems: list[str], code: int = EXIT_USAGE) -> None:
    """Print every problem as ``aslbatch: error: problem`` (one line each) and exit with ``code``."""
    for problem in problems:
        typer.echo(f"aslbatch: error: {problem}", err=True)
    raise typer.Exit(code)


@app.command()
def run(
    bids_dir: Annotated[Path, typer.Argument(help="The raw BIDS dataset.")],
    out_dir: Annotated[Optional[Path], typer.Argument(help="Output folder (default BIDS_DIR/derivatives/aslbatch).")] = None,
    method: Annotated[Optional[list[MethodName]], typer.Option(help="Estimator; repeat for several (default supervised: trained once per protocol).")] = None,
    participant_label: Annotated[Optional[list[str]], typer.Option(help="Process only these subjects (repeatable).")] = None,
    model: Annotated[Optional[ModelChoice], typer.Option(help="auto: 2c for a crushed + non-crushed pair, else 1c.")] = None,
    t1_blood: Annotated[Optional[float], typer.Option(help="T1 of blood (s); default from the field strength.")] = None,
    t1_tissue: Annotated[Optional[float], typer.Option(help="T1 of tissue (s); default 1.3.")] = None,
    t1_prime: Annotated[Optional[T1PrimeName], typer.Option(help="T1' of the tissue signal (default blood).")] = None,
    labeling_efficiency: Annotated[Optional[float], typer.Option(help="α; default from the sidecar, else 0.85 (PCASL).")] = None,
    partition_coefficient: Annotated[Optional[float], typer.Option(help="λ (mL/g); default 0.9.")] = None,
    background_suppression_correction: Annotated[Optional[bool], typer.Option(help="α_BS = 0.95 per pulse (default off).")] = None,
    arterial_edge_s: Annotated[Optional[float], typer.Option(help="2c: smoothed arterial window (s); 0 = hard edges.")] = None,
    bolus_duration: Annotated[Optional[float], typer.Option(help="PASL: bolus duration (s) instead of the sidecar's first BolusCutOffDelayTime; needed for PASL without bolus cut-off.")] = None,
    mask: Annotated[Optional[str], typer.Option(help="Brain mask NIfTI instead of the one from M0; {subject} and {session} are filled in.")] = None,
    jobs: Annotated[int, typer.Option(min=1, help="Sessions processed at once, in worker processes.")] = 1,
    threads: Annotated[Optional[int], typer.Option(min=1, help="Numba threads per job (default: cores / jobs).")] = None,
    force: Annotated[bool, typer.Option(help="Reprocess sessions that are up to date.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print which sessions would be processed, and why, then exit.")] = False,
    scheduler: Annotated[Optional[str], typer.Option(help="Dask scheduler address (e.g. tcp://10.0.0.5:8786): run sessions on its workers.")] = None,
    network: Annotated[Optional[list[Path]], typer.Option(help="Trained network file (aslbatch train) for its method (repeatable); without it, networks come from the cache and are trained once per protocol.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Folder of cached networks (default $ASLBATCH_CACHE_DIR or the per-user cache).")] = None,
    report: Annotated[Optional[bool], typer.Option(help="QC pages: one per acquisition beside its maps and OUT_DIR/qc.html for the run (default on).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML file with the same settings (options given here win).")] = None,
    on_grid_mismatch: Annotated[Optional[GridPolicy], typer.Option(help="An M0, mask or paired series on another grid than the ASL series (the same grid stored flipped or permuted is reoriented exactly): resample it (default; a warning and a note) or refuse the acquisition.")] = None,
    motion_correction: Annotated[Optional[bool], typer.Option(help="Realign every ASL volume and the M0 (rigid, 6 dof) before pairing (default on); motion parameters and framewise displacement go to *_desc-confounds_timeseries.tsv.")] = None,
    robust_averaging: Annotated[Optional[bool], typer.Option(help="Leave outlier control/label pairs out of the average (robust z of their mean ΔM or of their correlation with the median ΔM; default on).")] = None,
    motion_fd_threshold: Annotated[Optional[float], typer.Option(help="Excessive motion: framewise displacement above this (mm; default 0.5) ...")] = None,
    motion_max_fraction: Annotated[Optional[float], typer.Option(help="... in more than this share of the volumes (default 0.2) flags the acquisition in the run index (it is not failed).")] = None,
) -> None:
    """Process every session of a BIDS ASL dataset into BIDS-derivative perfusion maps.

    Sessions whose outputs are up to date (same inputs, settings and aslbatch version in
    their provenance) are skipped. Logs and a summary of every run go to OUT_DIR/logs; the
    QC pages to OUT_DIR/qc.html and beside each acquisition's maps.

    Network methods (supervised) use --network files, or networks from the cache that are
    trained once per protocol, constants and slice timing (the first run takes minutes).

    Exit codes: 0 every session done or up to date; 1 some failed (the others are done);
    2 usage or configuration error; 3 nothing found to process; 4 another run holds the
    output folder's lock.
    """
    from . import bids
    from .batch import LockHeld, run_batch
    from .config import SettingsError, check_dataset_settings, merge_run_settings, output_folder_problem, read_config
    from .config import validate_run_config

    # every setting checked before anything runs: all problems reported, one line each
    try:
        from_file = read_config(config) if config is not None else {}
    except SettingsError as exc:
        fail_all(exc.problems)
    values, origin, problems = merge_run_settings(
        from_file, str(config) if config is not None else None,
        options={
            "methods": ([m.value for m in method] if method else None, "--method"),
            "model": (model.value if model else None, "--model"),
            "participant_label": (list(participant_label) if participant_label else None, "--participant-label"),
            "background_suppression_correction": (background_suppression_correction,
                                                  "--background-suppression-correction"),
            "arterial_edge_s": (arterial_edge_s, "--arterial-edge-s"),
            "bolus_duration": (bolus_duration, "--bolus-duration"),
            "mask": (mask, "--mask"),
            "cache_dir": (str(cache_dir) if cache_dir is not None else None, "--cache-dir"),
            "report": (report, "--report"),
            "on_grid_mismatch": (on_grid_mismatch.value if on_grid_mismatch else None, "--on-grid-mismatch"),
            "motion_correction": (motion_correction, "--motion-correction"),
            "robust_averaging": (robust_averaging, "--robust-averaging"),
            "motion_fd_threshold_mm": (motion_fd_threshold, "--motion-fd-threshold"),
            "motion_max_fraction": (motion_max_fraction, "--motion-max-fraction"),
        },
        constants={"t1b": (t1_blood, "--t1-blood"), "t1t": (t1_tissue, "--t1-tissue"),
                   "t1_prime": (t1_prime.value if t1_prime else None, "--t1-prime"),
                   "alpha": (labeling_efficiency, "--labeling-efficiency"),
                   "lam": (partition_coefficient, "--partition-coefficient")},
        network_files=[str(p) for p in network or []])
    checked, found = validate_run_config(values, origin)
    problems += found
    out = out_dir if out_dir is not None else bids_dir / "derivatives" / "aslbatch"
    where = output_folder_problem(bids_dir, out)
    if where is not None:
        problems.append(where)
    settings = None
    if checked is not None and not found:
        try:
            settings = checked.settings()
        except ValueError as exc:
            problems.append(str(exc))
    labels = checked.participant_label if checked is not None else None
    if settings is not None:
        try:
            problems += check_dataset_settings(settings, bids.find_sessions(bids_dir, labels), origin)
        except bids.BidsError as exc:
            problems.append(str(exc))
    if problems:
        fail_all(problems)
    try:
        report = run_batch(bids_dir, out, settings, participant_labels=labels, jobs=jobs, threads=threads,
                           force=force, dry_run=dry_run, scheduler=scheduler)
    except (bids.BidsError, ValueError) as exc:
        fail(str(exc))
    except LockHeld as exc:
        fail(str(exc), EXIT_LOCKED)
    except OSError as exc:
        fail(f"{out}: cannot write outputs ({exc.strerror or exc})")
    if report.exit_code == EXIT_NOTHING:
        typer.echo(f"aslbatch: nothing to process: no ASL series found in {bids_dir}", err=True)
        raise typer.Exit(EXIT_NOTHING)
    if dry_run:
        for name, reason in report.planned:
            typer.echo(f"{name}: {reason}")
        return
    typer.echo(report.one_line(), err=True)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


def _training_model(model: ModelName, protocol: Optional[list[Path]], t1_prime: T1PrimeName,
                    arterial_edge_s: float):
    """The model to train for, and the slice offsets (s) of a 2D readout, from the --protocol files."""
    import numpy as np

    from .bids import BidsError
    from .models import get_model
    from .preprocess import protocol_from_sidecars
    from .protocol import ProtocolError

    files = protocol or []
    offsets: tuple[float, ...] = ()
    try:
        if files and all(p.name.endswith("_asl.json") for p in files):
            found = protocol_from_sidecars(files, {"t1_prime": t1_prime.value})
            prot, constants = found.protocol, found.constants
            offsets = tuple(float(o) for o in np.unique(np.round(found.offsets, 4))) if np.any(found.offsets) else ()
        elif len(files) > 1:
            fail("give one protocol JSON, or the *_asl.json sidecar(s) of one acquisition")
        else:
            prot = _load_protocol(files[0] if files else None, model.value)
            constants = MODELS[model.value].default_constants(t1_prime=t1_prime.value)
        return get_model(model.value, prot, constants, **_edge_option(model.value, arterial_edge_s)), offsets
    except (BidsError, ProtocolError, ValueError) as exc:
        fail(str(exc))


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", help="Network file to write (.npz: arrays + JSON card; atomic).")],
    model: Annotated[ModelName, typer.Option(help="Kinetic model (README: The models).")] = ModelName["1c"],
    protocol: Annotated[Optional[list[Path]], typer.Option(help="A protocol JSON {label_duration, pld, crushed} in s, or the *_asl.json sidecar(s) of one acquisition (aslcontext beside; repeat for a non-crushed + DANTE pair; constants and SliceTiming come from them). Default: the model's default protocol.")] = None,
    method: Annotated[MethodName, typer.Option(help="Network estimator to train: supervised (loss on the parameters) or unsupervised (physics-informed: loss on the signal).")] = MethodName["supervised"],
    loss: Annotated[LossName, typer.Option(help="Mean squared (mse) or mean absolute (mae) error.")] = LossName.mse,
    n_samples: Annotated[Optional[int], typer.Option(min=100, help="Simulated training samples (default: the method's, supervised 250 000, unsupervised 500 000).")] = None,
    hidden_layers: Annotated[Optional[str], typer.Option(help="Hidden layer widths, comma-separated (default per model).")] = None,
    snr_min: Annotated[float, typer.Option(help="Lowest training SNR (S_ref / σ).")] = 2.0,
    snr_max: Annotated[float, typer.Option(help="Highest training SNR.")] = 50.0,
    noise: Annotated[NoiseName, typer.Option(help="Training noise model.")] = NoiseName.rician,
    max_epochs: Annotated[int, typer.Option(min=1, help="Epochs at most (early stopping usually ends sooner).")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the simulation and training.")] = 0,
    t1_prime: Annotated[T1PrimeName, typer.Option(help="T1' of the tissue signal: blood (consensus) or tissue (Buxton).")] = T1PrimeName.blood,
    arterial_edge_s: Annotated[float, typer.Option(help="2C only: width (s) of the smoothed arterial window; 0 = hard edges.")] = 0.0,
) -> None:
    """Train a network for one protocol and save it (use it with aslbatch run --network).

    Prints the network's card summary (validation NRMSE per parameter on held-out
    simulated data over the training SNR range) as JSON.
    """
    from .estimators import get_estimator
    from .estimators.store import save_network

    if not ESTIMATORS[method.value].trains:
        fail(f"{method.value} does not train a network; choose one of "
             f"{[m for m in ESTIMATORS if ESTIMATORS[m].trains]}")
    kinetic, offsets = _training_model(model, protocol, t1_prime, arterial_edge_s)
    try:
        hidden = [int(v) for v in hidden_layers.split(",")] if hidden_layers else None
    except ValueError:
        fail(f"--hidden-layers must be comma-separated integers, got {hidden_layers!r}")
    try:
        samples = {"n_samples": n_samples} if n_samples is not None else {}
        estimator = get_estimator(method.value, kinetic, hidden_layers=hidden, snr_range=(snr_min, snr_max),
                                  noise=noise.value, max_epochs=max_epochs, seed=seed, slice_offsets=offsets,
                                  loss=loss.value, **samples)
        n_samples = estimator.options()["n_samples"]
    except ValueError as exc:
        fail(str(exc))
    typer.echo(f"training a {method.value} {model.value} network on {n_samples} simulated samples"
               + (f" over {len(offsets)} slice offsets" if offsets else ""), err=True)
    estimator.fit(progress=sys.stderr.isatty())
    try:
        digest = save_network(estimator, out)
    except OSError as exc:
        fail(f"{out}: cannot write ({exc.strerror})")
    training = estimator.training_
    typer.echo(json.dumps({
        "out": str(out), "sha256": digest, "method": method.value, "model": model.value,
        "protocol": kinetic.protocol.to_dict(), "slice_offsets": list(offsets),
        "epochs": training["epochs"], "training_seconds": round(training["training_seconds"], 1),
        "validation_nrmse": {k: round(v["nrmse"], 4) for k, v in training["validation"].items()},
    }))


@app.command()
def evaluate(
    out: Annotated[Path, typer.Option("--out", help="Folder of metrics.tsv, report.md, report.html and figures/.")] = Path("aslbatch-evaluation"),
    model: Annotated[ModelName, typer.Option(help="Kinetic model (README: The models).")] = ModelName["1c"],
    protocol: Annotated[Optional[list[Path]], typer.Option(help="A protocol JSON, or the *_asl.json sidecar(s) of one acquisition (as for train). Default: the model's default protocol.")] = None,
    method: Annotated[Optional[list[str]], typer.Option(help="A method, or a network method with its loss (supervised-mae...): repeatable; default all.")] = None,
    snr: Annotated[Optional[list[float]], typer.Option(help="Test SNRs (repeatable; default 2 3 5 10 20 50, quick 3 5 10).")] = None,
    noise: Annotated[NoiseName, typer.Option(help="Test noise model.")] = NoiseName.rician,
    n_sets: Annotated[Optional[int], typer.Option(help="Parameter sets per SNR.")] = None,
    repeats: Annotated[Optional[int], typer.Option(help="Noise realisations per parameter set (noise immunity).")] = None,
    retrainings: Annotated[Optional[int], typer.Option(help="Networks per network method, different seeds (CV_Net).")] = None,
    n_samples: Annotated[Optional[int], typer.Option(help="Training samples of every network.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Folder of cached networks (default $ASLBATCH_CACHE_DIR or the per-user cache).")] = None,
    quick: Annotated[bool, typer.Option(help="A small run: 3 SNRs, small networks, under 3 minutes on 2 cores from an empty cache.")] = False,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the data and the first network.")] = 0,
    spatial: Annotated[bool, typer.Option("--spatial", help="Score on spatial phantoms instead (smooth fields, GM/WM edges, lesions, a delayed territory): interior, edge and lesion errors of lm, the networks, smoothing + LM and the spatial network (1c or 2c; default SNR 3 5; --repeats noise images, default 8).")] = False,
) -> None:
    """Compare methods on a Monte Carlo set: bias, NMAE, NRMSE, CoV over noise realisations,
    CV_Net, SD against the Cramér-Rao bound, time per voxel; and whether the research's
    findings hold for this protocol. Networks are trained once into the cache: with them
    cached a run takes about a minute on 2 cores; the first run trains twelve (minutes; it
    states its expected duration before starting). --quick: under 3 minutes."""
    from .evaluate import run_evaluation

    kinetic, offsets = _training_model(model, protocol, T1PrimeName.blood, 0.0)
    if spatial:
        _evaluate_spatial(out, model.value, kinetic, method, snr, noise.value, repeats, seed, cache_dir, n_samples)
        return
    try:
        result = run_evaluation(
            out, model_name=model.value, protocol=kinetic.protocol, constants=kinetic.constants,
            methods=tuple(method) if method else None, snrs=snr, noise=noise.value, n_sets=n_sets,
            repeats=repeats, retrainings=retrainings,
            network_options={"n_samples": n_samples} if n_samples is not None else None,
            cache_dir=cache_dir, quick=quick, seed=seed, progress=True)
    except ValueError as exc:
        fail(str(exc))
    for finding in result.findings:
        typer.echo(f"{finding.verdict}: {finding.claim} ({finding.evidence})")
    typer.echo(f"evaluate: {result.paths['report_html']}", err=True)


def _evaluate_spatial(out: Path, model: str, kinetic, methods, snrs, noise: str, repeats: Optional[int], seed: int,
                      cache_dir: Optional[Path], n_samples: Optional[int]) -> None:
    """``evaluate --spatial``: :func:`aslbatch.evaluate_spatial.run_spatial_evaluation`."""
    from .evaluate_spatial import run_spatial_evaluation

    try:
        result = run_spatial_evaluation(
            out, model_name=model, protocol=kinetic.protocol, constants=kinetic.constants,
            methods=tuple(methods) if methods else None, snrs=snrs or (3.0, 5.0), noise=noise,
            repeats=repeats if repeats is not None else 8, seed=seed, cache_dir=cache_dir,
            network_options={"n_samples": n_samples} if n_samples is not None else None, progress=True)
    except ValueError as exc:
        fail(str(exc))
    typer.echo(f"evaluate --spatial: {result.paths['report_md']}", err=True)


@app.command()
def bench(
    out: Annotated[Path, typer.Option("--out", help="Folder of bench.json, bench.md and bench.png.")] = Path("aslbatch-bench"),
    model: Annotated[Optional[list[ModelName]], typer.Option(help="Models (repeatable; default every model but relative, which has no prior to draw from).")] = None,
    method: Annotated[Optional[list[MethodName]], typer.Option(help="Methods (repeatable; default all).")] = None,
    threads: Annotated[Optional[list[int]], typer.Option(help="Thread counts (repeatable; default 1 and 2).")] = None,
    quick: Annotated[bool, typer.Option(help="Small sizes, for a smoke test (under a minute on 2 cores).")] = False,
    early_stopping: Annotated[bool, typer.Option(help="Train each network to early stopping (the whole training: several minutes more) instead of 3 epochs.")] = False,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the data, networks and phantoms.")] = 0,
) -> None:
    """Throughput of every method (voxels/s, 10^3 to 10^6 voxels, every model, 1 and 2 threads)
    beside a per-voxel scipy least_squares loop, network training speed (3 epochs of 10^6
    samples), and per-session batch time split into I/O, preprocessing, estimation and report.
    States its expected duration (about 3 minutes on 2 cores) before it starts."""
    from .bench import run_bench

    try:
        result = run_bench(out, models=tuple(m.value for m in model) if model else None,
                           methods=tuple(m.value for m in method) if method else tuple(ESTIMATORS),
                           threads=tuple(threads) if threads else (1, 2), early_stopping=early_stopping, quick=quick,
                           seed=seed, progress=True)
    except ValueError as exc:
        fail(str(exc))
    typer.echo(Path(result.paths["md"]).read_text(encoding="utf-8"))


@app.command()
def validate(
    bids_dir: Annotated[Path, typer.Argument(help="The raw BIDS dataset.")],
    participant_label: Annotated[Optional[list[str]], typer.Option(help="Check only these subjects (repeatable).")] = None,
    model: Annotated[ModelChoice, typer.Option(help="The model the run would use.")] = ModelChoice["auto"],
    bolus_duration: Annotated[Optional[float], typer.Option(help="PASL: the bolus duration (s) the run would be given (--bolus-duration).")] = None,
    on_grid_mismatch: Annotated[GridPolicy, typer.Option(help="The run's --on-grid-mismatch: with refuse, images on another grid than their ASL series are problems.")] = GridPolicy["resample"],
) -> None:
    """Check a BIDS ASL dataset and print, per acquisition, the model and the parameters a run
    would estimate (or that it is refused), then every problem found, without processing anything.

    Exit codes: 0 no problem; 1 problems found; 2 usage error (e.g. no such folder).
    """
    from . import bids
    from .protocol import MAX_TIME_S

    if bolus_duration is not None and not 0 < bolus_duration <= MAX_TIME_S:
        fail(f"--bolus-duration must be a time in seconds in (0, {MAX_TIME_S:g}], got {bolus_duration!r}")
    try:
        problems, verdicts = bids.inspect_dataset(bids_dir, participant_label, model=model.value,
                                                  bolus_duration=bolus_duration,
                                                  on_grid_mismatch=on_grid_mismatch.value)
    except bids.BidsError as exc:
        fail(str(exc))
    for verdict in verdicts:
        if verdict.decision is not None:
            decision = verdict.decision
            typer.echo(f"{verdict.source_name}: model {decision.model}: {decision.reason}")
        elif verdict.refusal is not None:
            typer.echo(f"{verdict.source_name}: refused")
    for problem in problems:
        typer.echo(str(problem))
    typer.echo(f"aslbatch validate: {len(problems)} problem(s) in {bids_dir}", err=True)
    if problems:
        raise typer.Exit(EXIT_FAILED)


@app.command("import")
def import_(
    dicom_dir: Annotated[Path, typer.Argument(help="Folder of DICOM files (any layout; only read).")],
    bids_dir: Annotated[Path, typer.Argument(help="The BIDS dataset to add the new ASL series to (created if absent).")],
    study_params: Annotated[Optional[Path], typer.Option(help="JSON or TOML file of the ASL values the DICOM lacks, per vendor and series description.")] = None,
) -> None:
    """Import the new DICOM ASL series (by SeriesInstanceUID) of DICOM_DIR into BIDS_DIR.

    Each series is converted with dcm2niix, its volume roles read from the vendor's tags and
    conventions and checked against the data, and written as BIDS ASL; a series that lacks a
    needed value is refused with the list. Scanner-made images go to BIDS_DIR/sourcedata/scanner.

    Exit codes: 0 nothing refused; 1 some series refused (the others are imported); 2 usage
    error; 3 no DICOM series found; 4 another import holds BIDS_DIR's lock.
    """
    from .batch import LockHeld
    from .dicom import import_dicom

    try:
        report = import_dicom(dicom_dir, bids_dir, study_params)
    except LockHeld as exc:
        fail(str(exc), EXIT_LOCKED)
    except ValueError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{bids_dir}: cannot write ({exc.strerror or exc})")
    for outcome in report.outcomes:
        typer.echo(f"{outcome.status}: {outcome.description} ({outcome.uid}): {outcome.reason}")
    typer.echo(report.one_line(), err=True)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


@app.command("simulate-dataset")
def simulate_dataset(
    out_dir: Annotated[Path, typer.Argument(help="Folder of the new BIDS dataset (must be empty or absent).")],
    subjects: Annotated[int, typer.Option(min=1, help="Number of subjects.")] = 2,
    model: Annotated[ModelName, typer.Option(help="1c: one multi-PLD series; 2c: a non-crushed + DANTE pair; pasl: one multi-TI FAIR Q2TIPS series; single: one single-PLD series (PLD 1.8 s).")] = ModelName["1c"],
    snr: Annotated[float, typer.Option(help="SNR of ΔM/M0t (S_ref / σ, ASL_MODELS.md).")] = 10.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    noise: Annotated[NoiseName, typer.Option(help="Noise of the magnitude images.")] = NoiseName.rician,
    motion: Annotated[float, typer.Option(min=0, help="Head motion: every image moved rigidly along a random drift with a few jerks, up to this many mm and degrees (0: none); the applied parameters go to the ground truth.")] = 0.0,
    psf_fwhm: Annotated[float, typer.Option(min=0, help="Image every volume through a Gaussian point-spread function of this FWHM (voxels; 2 is about a Hann-filtered readout's), after its motion and before the noise, as a scanner band-limits its images (0: the phantom's voxels, edges one voxel sharp). Compare a moving phantom with a still one written with the same value.")] = 0.0,
) -> None:
    """Write a BIDS ASL dataset of brain-like digital phantoms; the ground truth goes beside it."""
    from .phantom import default_groundtruth_dir, phantom_for, write_bids_dataset

    if not snr > 0:
        fail(f"--snr must be > 0, got {snr}")
    try:
        phantom, protocol = phantom_for(model.value)
        path = write_bids_dataset(out_dir, subjects=subjects, model=phantom, snr=snr, seed=seed, noise=noise.value,
                                  protocol=protocol, motion=motion, psf_fwhm=psf_fwhm)
    except (FileExistsError, ValueError) as exc:
        fail(str(exc))
    typer.echo(json.dumps({"dataset": str(path), "groundtruth": str(default_groundtruth_dir(path))}))


@app.command()
def demo(
    folder: Annotated[Path, typer.Argument(help="Where to put the demo dataset and its outputs.")] = Path("aslbatch-demo"),
    snr: Annotated[float, typer.Option(help="SNR of ΔM/M0t.")] = 5.0,
    jobs: Annotated[int, typer.Option(min=1, help="Sessions processed at once.")] = 1,
) -> None:
    """The whole job on built-in data: about half a minute on 2 quiet cores the first time (most
    of it training the two supervised networks once into the cache), seconds after that.

    Writes a phantom BIDS dataset into FOLDER/bids (two one-compartment multi-PLD subjects and
    a two-compartment non-crushed + DANTE subject, 40x48x12 voxels, Rician noise at --snr, a
    moyamoya-like delayed territory each), processes it with the batch of 'aslbatch run'
    (Levenberg-Marquardt, the lookup table and the supervised network) into
    FOLDER/bids/derivatives/aslbatch with a QC page per session, and prints each map's median
    error against the ground truth (FOLDER/bids_groundtruth). Run again, it is up to date."""
    import numpy as np
    import nibabel as nib

    from .batch import run_batch
    from .phantom import default_groundtruth_dir, write_bids_dataset
    from .pipeline import Settings
    from .report import text_table

    if not snr > 0:
        fail(f"--snr must be > 0, got {snr}")
    raw = folder / "bids"
    models = ("1c", "1c", "2c")
    write_bids_dataset(raw, subjects=len(models), model=list(models), snr=snr, seed=1, exist_ok=True)
    truth_dir = default_groundtruth_dir(raw)
    out = raw / "derivatives" / "aslbatch"
    settings = Settings(methods=("lm", "lut", "supervised"))
    typer.echo(f"demo: phantom dataset in {raw} (SNR {snr:g}), ground truth in {truth_dir}", err=True)
    report = run_batch(raw, out, settings, jobs=jobs)
    typer.echo(report.one_line(), err=True)
    rows = []
    for k, name in enumerate(models, start=1):
        subject = f"sub-{k:02d}"
        mask = np.asarray(nib.load(truth_dir / subject / f"{subject}_mask.nii.gz").dataobj) > 0
        for method in settings.methods:
            for param, unit in zip(MODELS[name].param_names, MODELS[name].param_units):
                path = out / subject / "perf" / f"{subject}_desc-{method}_{param}.nii.gz"
                if not path.exists():
                    rows.append([subject, name, method, param, "(failed)", "", unit])
                    continue
                error = (np.asarray(nib.load(path).dataobj, dtype=float)[mask]
                         - np.asarray(nib.load(truth_dir / subject / f"{subject}_{param}.nii.gz").dataobj)[mask])
                absolute, signed = _finite_medians(np.column_stack([np.abs(error), error]))
                rows.append([subject, name, method, param, "(none)" if absolute is None else f"{absolute:.4g}",
                             "" if signed is None else f"{signed:.3g}", unit])
    typer.echo(text_table(["subject", "model", "method", "map", "median |error|", "median error", "unit"], rows,
                          align="llllrrl"))
    typer.echo(f"demo: outputs in {out}, QC pages from {out / 'qc.html'}, logs in {out / 'logs'}", err=True)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
