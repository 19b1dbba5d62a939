"""One acquisition end to end: validate, prepare, fit every requested method, write derivatives.

:func:`process_session` runs every acquisition of a BIDS session (grouped by
:func:`aslbatch.identify.group_acquisitions`) with the :class:`Settings`; the batch layer calls
it once per session, with the grouping and input digests of its plan. Before any fit,
:func:`aslbatch.identify.decide` chooses from the checked metadata the model whose parameters
the protocol determines (or refuses the acquisition with the reason), and the methods that
serve it run (:func:`methods_for`). Per-slice timing of 2D readouts is honoured exactly: voxels
are grouped by their slice's time offset and each group is fitted with the protocol's
PLDs shifted by that offset.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import bids
from .derivatives import run_settings_digest, sha256_file, write_session_outputs
from .estimators import ESTIMATORS, Estimate, Estimator, get_estimator, served_methods
from .estimators.base import Status
from .identify import decide, group_acquisitions
from .models import MODELS, KineticModel, get_model
from .motion import EXCESSIVE_FD_MM, EXCESSIVE_FRACTION
from .plausibility import judge, unusable_reason
from .preprocess import DEFAULT_GRID_POLICY, GRID_POLICIES, PreparedData, prepare_acquisition
from .protocol import MAX_TIME_S, Constants

__all__ = ["AcquisitionResult", "InputDigests", "Settings", "estimate_maps", "hash_inputs",
           "network_estimator", "process_acquisition", "process_session", "provenance_options", "write_report"]

log = logging.getLogger("aslbatch.pipeline")


@dataclass(frozen=True)
class Settings:
    """What to compute, shared by every session of a run.

    methods : estimator names, each written as ``desc-<method>`` maps; default the supervised
        network, the most accurate at clinical SNR in ``aslbatch evaluate`` (README).
    model : ``"auto"`` (the model each acquisition's protocol determines: :func:`aslbatch.identify.decide`)
        or a model's name (:data:`~aslbatch.models.MODELS`), refused where the protocol calls for another.
    constants : overrides of :class:`~aslbatch.protocol.Constants` fields (their units).
    background_suppression_correction : apply α_BS = 0.95 per pulse (ASL_MODELS.md: off).
    arterial_edge_s : the 2C model's smoothed arterial window (s); 0 = hard edges.
    bolus_duration : PASL bolus duration τ_b (s) instead of the sidecars' BolusCutOffDelayTime;
        the only way to quantify PASL without a bolus cut-off. None: from the sidecars.
    method_options : ``{method: {option: value}}`` passed to the estimators.
    mask : a brain mask NIfTI for every acquisition instead of the one computed from M0; a
        path template where ``{subject}`` and ``{session}`` (empty without sessions) are
        replaced by the acquisition's labels.
    networks : ``{method: network file}``: trained networks to use instead of the cache
        (their sha256 is part of the settings, so a retrained file reprocesses the sessions).
    cache_dir : folder of trained networks (default: $ASLBATCH_CACHE_DIR or the per-user
        cache); where networks live does not change the outputs, so it is not in ``to_dict``.
    report : write each acquisition's QC page and the run's index (:mod:`aslbatch.qc`);
        not in ``to_dict`` either (pages are regenerated without refitting).
    on_grid_mismatch : an M0, mask or paired series on another grid than the ASL series (not the
        same grid stored with other axes, which is reoriented exactly): ``"resample"`` (with a
        warning and a note) or ``"refuse"`` (:func:`aslbatch.preprocess.onto_grid`).
    motion_correction : realign every volume and the M0 (rigid, :mod:`aslbatch.motion`) before pairing.
    robust_averaging : leave outlier ΔM volumes out of the average (:mod:`aslbatch.pair_outliers`).
    motion_fd_threshold_mm, motion_max_fraction : an acquisition whose framewise displacement
        exceeds the threshold (mm) in more than that fraction of its volumes is flagged (not failed).
    """

    methods: tuple[str, ...] = ("supervised",)
    model: str = "auto"
    constants: Mapping[str, Any] = field(default_factory=dict)
    background_suppression_correction: bool = False
    arterial_edge_s: float = 0.0
    bolus_duration: float | None = None
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    mask: str | None = None
    networks: Mapping[str, str] = field(default_factory=dict)
    cache_dir: str | None = None
    report: bool = True
    on_grid_mismatch: str = DEFAULT_GRID_POLICY
    motion_correction: bool = True
    robust_averaging: bool = True
    motion_fd_threshold_mm: float = EXCESSIVE_FD_MM
    motion_max_fraction: float = EXCESSIVE_FRACTION

    def __post_init__(self) -> None:
        if self.on_grid_mismatch not in GRID_POLICIES:
            raise ValueError(f"on_grid_mismatch must be one of {list(GRID_POLICIES)}, got {self.on_grid_mismatch!r}")
        if not (isinstance(self.motion_fd_threshold_mm, (int, float)) and self.motion_fd_threshold_mm > 0):
            raise ValueError(f"motion_fd_threshold_mm must be a distance in mm > 0, got {self.motion_fd_threshold_mm!r}")
        if not (isinstance(self.motion_max_fraction, (int, float)) and 0 <= self.motion_max_fraction <= 1):
            raise ValueError(f"motion_max_fraction must be a fraction in [0, 1], got {self.motion_max_fraction!r}")
        if not self.methods:
            raise ValueError("at least one method is needed")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods repeat: {list(self.methods)}")
        unknown_methods = [m for m in self.methods if m not in ESTIMATORS]
        if unknown_methods:
            raise ValueError(f"unknown method(s) {unknown_methods}; choose from {sorted(ESTIMATORS)}")
        unknown_constants = set(self.constants) - set(Constants.__dataclass_fields__)
        if unknown_constants:
            raise ValueError(f"unknown constant(s) {sorted(unknown_constants)}; "
                             f"known: {sorted(Constants.__dataclass_fields__)}")
        Constants(**self.constants)  # each value checked, with a message naming the field
        if self.bolus_duration is not None and not (isinstance(self.bolus_duration, (int, float))
                                                    and not isinstance(self.bolus_duration, bool)
                                                    and 0 < self.bolus_duration <= MAX_TIME_S):
            raise ValueError(f"bolus_duration must be a time in seconds in (0, {MAX_TIME_S:g}], "
                             f"got {self.bolus_duration!r}")
        if self.model != "auto" and self.model not in MODELS:
            raise ValueError(f"model must be auto or one of {list(MODELS)}, got {self.model!r}")
        unknown = set(self.method_options) - set(self.methods)
        if unknown:
            raise ValueError(f"options given for methods not requested: {sorted(unknown)}")
        for method, path in self.networks.items():
            if method not in self.methods:
                raise ValueError(f"a network is given for {method}, which is not among the methods {list(self.methods)}")
            if not ESTIMATORS[method].trains:
                raise ValueError(f"method {method} does not use a trained network")
            if not Path(path).is_file():
                raise ValueError(f"{path}: no such network file")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (for logs and the batch's settings digest)."""
        return {
            "methods": list(self.methods),
            "model": self.model,
            "constants": dict(self.constants),
            "background_suppression_correction": self.background_suppression_correction,
            "arterial_edge_s": self.arterial_edge_s,
            "bolus_duration": self.bolus_duration,
            "method_options": {k: dict(v) for k, v in self.method_options.items()},
            "mask": self.mask,
            "networks": {m: {"path": str(p), "sha256": sha256_file(p)} for m, p in sorted(self.networks.items())},
            "on_grid_mismatch": self.on_grid_mismatch,
            "motion_correction": self.motion_correction,
            "robust_averaging": self.robust_averaging,
            "motion_fd_threshold_mm": self.motion_fd_threshold_mm,
            "motion_max_fraction": self.motion_max_fraction,
        }

    def mask_path(self, subject: str, session: str | None) -> Path | None:
        """The user's mask for one acquisition (None: compute it from M0)."""
        if self.mask is None:
            return None
        try:
            return Path(self.mask.format(subject=subject, session=session or ""))
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"mask template {self.mask!r}: only {{subject}} and {{session}} can be filled ({exc})")

    def digest(self) -> str:
        """sha256 of :meth:`to_dict` (as recorded in every provenance: ``run_settings_digest``)."""
        return run_settings_digest(self.to_dict())


@dataclass(frozen=True)
class AcquisitionResult:
    """Outcome of one acquisition: ``status`` "done" or "failed" (with ``error``)."""

    source_name: str
    subject: str
    session: str | None
    model: str
    status: str
    duration_s: float
    outputs: tuple[str, ...] = ()
    error: str | None = None
    status_counts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    #: seconds spent per stage: "inputs" (reading and hashing the input files), "prepare"
    #: (loading images and preprocessing), "fit" (every method), "write" (outputs) and
    #: "report" (the QC page)
    timings: Mapping[str, float] = field(default_factory=dict)
    #: why a done acquisition's result is implausible (:mod:`aslbatch.plausibility`) or moved too much;
    #: empty when neither
    flags: tuple[str, ...] = ()
    #: max and mean framewise displacement (mm) and excluded ΔM volumes (:func:`_motion_totals`)
    motion: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InputDigests:
    """The sha256 of every input file of an acquisition (``sha256``: ``{dataset-relative
    path: hex digest}``) and each file's ``(size in bytes, modification time in ns)`` taken
    just before it was hashed (``stamps``), so a later check re-hashes only changed files."""

    sha256: Mapping[str, str]
    stamps: Mapping[str, tuple[int, int]]


def _stamp(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


def hash_inputs(acquisition: bids.Acquisition, known: InputDigests | None = None) -> InputDigests:
    """sha256 of every file the acquisition depends on (the NIfTI series, their aslcontext, every
    JSON sidecar that supplied metadata, separate M0 scans with theirs), keyed by dataset-relative
    path, with the files' stamps; a file whose size and modification time still match ``known``
    (hashed earlier, e.g. by the batch's plan) keeps its digest unread."""
    sha256, stamps = {}, {}
    for rel, path in _input_files(acquisition).items():
        stamps[rel] = _stamp(path)  # before reading: a change while hashing shows in the next check
        if known is not None and known.stamps.get(rel) == stamps[rel] and rel in known.sha256:
            sha256[rel] = known.sha256[rel]
        else:
            sha256[rel] = sha256_file(path)
    return InputDigests(sha256, stamps)


def _input_files(acquisition: bids.Acquisition) -> dict[str, Path]:
    """Every file the acquisition depends on (see :func:`hash_inputs`), sorted by relative path."""
    files: dict[str, Path] = {}
    for series in acquisition.series:
        root = series.bids_dir
        files[series.relpath] = series.path
        if series.aslcontext is not None:
            files[series.aslcontext.relative_to(root).as_posix()] = series.aslcontext
        metas = [series.metadata]
        if series.m0scan is not None:
            files[series.m0scan.relpath] = series.m0scan.path
            metas.append(series.m0scan.metadata)
        for meta in metas:
            for rel in meta.files:
                path = root / rel
                if path.is_file():
                    files[rel] = path
    return dict(sorted(files.items()))


def network_estimator(method: str, model: KineticModel, options: Mapping[str, Any], settings: Settings,
                      signals: np.ndarray, slice_offsets: np.ndarray, progress: bool = False) -> Estimator:
    """The trained network for ``method``: the user's file (checked against ``model``), one
    trained on ``signals`` (ΔM/M0t) when the options say ``train_on_data``, or the cache's
    (trained now if missing), trained over the acquisition's slice offsets (s)."""
    from .estimators.store import NetworkCache, load_network

    if method in settings.networks:
        return load_network(settings.networks[method], model)
    if options.get("train_on_data"):  # a network for these voxels alone: not cached
        if np.any(slice_offsets):
            options = {**options, "slice_offsets": tuple(np.unique(np.round(slice_offsets, 4)))}
        return get_estimator(method, model, **options).fit(signals, progress)
    offsets = np.unique(np.round(slice_offsets, 4))
    options = {**options, "slice_offsets": tuple(float(o) for o in offsets)} if np.any(offsets) else dict(options)
    return NetworkCache(settings.cache_dir).get(get_estimator(method, model, **options), progress)


def provenance_options(estimator: Estimator) -> dict[str, Any]:
    """The estimator's options as recorded in provenance (plus the network's file and sha256)."""
    options = estimator.options()
    if getattr(estimator, "network_sha256_", None):
        options["network_file"] = estimator.network_file_
        options["network_sha256"] = estimator.network_sha256_
    return options


def estimate_maps(model: KineticModel, prepared: PreparedData, method: str, options: Mapping[str, Any],
                  progress: bool = False, estimator: Estimator | None = None) -> Estimate:
    """Fit ``method`` (or the given, already fitted ``estimator``) to every voxel of ``prepared``,
    each with its slice's own timing; ``progress`` shows a bar over voxels."""
    if estimator is None:
        estimator = get_estimator(method, model, **options).fit()
    return estimator.predict_image(prepared.signals, prepared.mask, slice_offsets=prepared.slice_offsets,
                                   progress=progress, label=prepared.source_name, signal_se=prepared.signal_se)


def methods_for(model_name: str, requested: Sequence[str], source_name: str = "") -> tuple[str, ...]:
    """The methods run for an acquisition decided to be ``model_name``: the requested ones that
    serve it, in order; where none does (a closed-form model such as ``single``), the methods that
    do, each requested method logged as answered by them (LM or a lookup table would reduce to
    the closed form exactly; a network trained on one input value is no better than it)."""
    model = MODELS[model_name]
    kept = tuple(m for m in requested if ESTIMATORS[m].serves(model))
    answer = kept or tuple(served_methods(model_name))
    for method in requested:
        if method not in kept:
            why = ("a network trained on one readout time is no better than the formula: not applicable"
                   if ESTIMATORS[method].trains else "it would reduce to that closed form exactly")
            log.info("%s: method %s does not serve the %s model (%s); written instead: %s", source_name, method,
                     model_name, why, ", ".join(f"desc-{m}" for m in answer))
    return answer


def process_acquisition(acquisition: bids.Acquisition, out_dir: str | Path, settings: Settings,
                        progress: bool = False, *, inputs: InputDigests | None = None) -> AcquisitionResult:
    """Validate, prepare, fit and write one acquisition; raises on any problem (nothing
    under final output names is left half-written, and the provenance is written last).
    ``progress``: a bar over voxels while fitting (for a terminal). ``inputs``: the input
    digests the batch's plan computed; files unchanged since (size, modification time)
    are not hashed again, so the provenance records the digests of the bytes read here.

    Each series' metadata is read and checked once (:func:`aslbatch.bids.check_series`)
    and the records are handed to :func:`~aslbatch.preprocess.prepare_acquisition`."""
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    records, problems = [], []
    for series in acquisition.series:
        record, series_problems = bids.check_series(
            series, overrides=settings.constants,
            background_suppression_correction=settings.background_suppression_correction,
            bolus_duration=settings.bolus_duration)
        records.append(record)
        problems.extend(series_problems)
    if problems:
        raise bids.BidsError("; ".join(str(p) for p in problems))
    decision = decide(acquisition, records, settings.model)
    acquisition = replace(acquisition, model=decision.model)
    log.info("%s: %s model, estimating %s: %s", acquisition.source_name, decision.model,
             ", ".join(decision.parameters), decision.reason)
    methods = methods_for(decision.model, settings.methods, acquisition.source_name)
    timings = {}
    mark = time.perf_counter()
    digests = dict(hash_inputs(acquisition, inputs).sha256)
    timings["inputs"], mark = time.perf_counter() - mark, time.perf_counter()
    prepared = prepare_acquisition(acquisition, records, overrides=settings.constants,
                                   mask_path=settings.mask_path(acquisition.subject, acquisition.session),
                                   background_suppression_correction=settings.background_suppression_correction,
                                   on_grid_mismatch=settings.on_grid_mismatch,
                                   motion_correction=settings.motion_correction,
                                   robust_averaging=settings.robust_averaging)
    motion = [record.summary(settings.motion_fd_threshold_mm, settings.motion_max_fraction)
              for record in prepared.motion]
    motion_flags = tuple(_motion_flag(summary) for summary in motion if summary.get("excessive_motion"))
    for flag in motion_flags:
        log.warning("%s: %s", acquisition.source_name, flag)
    timings["prepare"], mark = time.perf_counter() - mark, time.perf_counter()
    unusable = unusable_reason(prepared.signals)
    if unusable is not None:
        raise bids.BidsError(unusable, path=acquisition.series[0].relpath, field="NIfTI data")
    options = dict(decision.options)
    if "arterial_edge_s" in MODELS[decision.model].option_names:
        options["arterial_edge_s"] = settings.arterial_edge_s
    model = get_model(decision.model, prepared.protocol, prepared.constants, **options)
    estimates: dict[str, Estimate] = {}
    estimator_options: dict[str, dict[str, Any]] = {}
    for method in methods:
        method_options = dict(settings.method_options.get(method, {}))
        if ESTIMATORS[method].trains:
            estimator = network_estimator(method, model, method_options, settings, prepared.signals,
                                          prepared.slice_offsets, progress)
        else:
            estimator = get_estimator(method, model, **method_options).fit()
        estimates[method] = estimate_maps(model, prepared, method, method_options, progress, estimator)
        estimator_options[method] = provenance_options(estimator)
    timings["fit"], mark = time.perf_counter() - mark, time.perf_counter()
    if all((np.asarray(e.status) == Status.INVALID_INPUT).all() for e in estimates.values()):
        raise bids.BidsError("every map is invalid: no brain voxel had a usable ΔM/M0t",
                             path=acquisition.series[0].relpath, field="NIfTI data")
    plausibility = judge(prepared.signals, estimates)
    if plausibility.flagged:
        log.warning("%s: %s", acquisition.source_name, plausibility.message())
    outputs = write_session_outputs(out_dir, prepared, estimates, model, estimator_options, digests,
                                    bids_dir=acquisition.series[0].bids_dir, started_at=started,
                                    run_settings=settings.to_dict(), decision=decision.to_dict(),
                                    plausibility=plausibility.to_dict(), motion=motion)
    timings["write"], mark = time.perf_counter() - mark, time.perf_counter()
    if settings.report:
        write_report(outputs[-1])
        timings["report"] = time.perf_counter() - mark
    return AcquisitionResult(
        source_name=acquisition.source_name,
        subject=acquisition.subject,
        session=acquisition.session,
        model=decision.model,
        status="done",
        duration_s=time.perf_counter() - t0,
        outputs=tuple(str(p) for p in outputs),
        status_counts={m: e.status_counts() for m, e in estimates.items()},
        timings=timings,
        flags=((plausibility.message(),) if plausibility.flagged else ()) + motion_flags,
        motion=_motion_totals(motion),
    )


def _motion_flag(summary: Mapping[str, Any]) -> str:
    """The run index's words for a series that moved too much."""
    return (f"excessive motion: framewise displacement > {summary['fd_threshold_mm']:g} mm in "
            f"{summary['fraction_above_threshold']:.0%} of the volumes of {summary['source']} "
            f"(more than {summary['max_fraction_above_threshold']:.0%}; max {summary['max_fd_mm']:.2f} mm)")


def _motion_totals(motion: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """An acquisition's motion figures over its series: max and mean FD (mm, the mean weighted by
    nothing: series have similar lengths) and the ΔM volumes excluded (count, of how many)."""
    if not motion:
        return {}
    fds = [m for m in motion if "max_fd_mm" in m]
    totals: dict[str, Any] = {"excluded_deltam_volumes": sum(m["excluded_deltam_volumes"] for m in motion),
                              "deltam_volumes": sum(m["deltam_volumes"] for m in motion)}
    if fds:
        totals["max_fd_mm"] = max(m["max_fd_mm"] for m in fds)
        totals["mean_fd_mm"] = round(float(np.mean([m["mean_fd_mm"] for m in fds])), 4)
    return totals


def write_report(provenance_path: Path) -> Path | None:
    """The acquisition's QC page; a failure is logged, never raised (the maps are written)."""
    from .qc import write_session_report  # matplotlib: imported only where pages are made

    try:
        return write_session_report(provenance_path)
    except Exception as exc:  # a report must never fail the fits it describes
        log.warning("QC page for %s not written: %s: %s", provenance_path, type(exc).__name__, exc)
        return None


def process_session(session: bids.Session, out_dir: str | Path, settings: Settings, progress: bool = False, *,
                    acquisitions: Sequence[bids.Acquisition] | None = None,
                    inputs: Mapping[str, InputDigests] | None = None) -> list[AcquisitionResult]:
    """Every acquisition of ``session``; a failing acquisition (any exception: an unexpected one
    is logged with its traceback) is recorded and the rest go on.

    ``acquisitions``: the session's grouping (:func:`aslbatch.identify.group_acquisitions`
    with ``settings.model``) when the caller has it already; ``inputs``: input digests
    by source name, reused by :func:`process_acquisition`."""
    results = []
    if acquisitions is None:
        try:
            acquisitions = group_acquisitions(session, settings.model)
        except bids.BidsError as exc:
            return [AcquisitionResult(session.name, session.subject, session.session, settings.model, "failed", 0.0,
                                      error=str(exc))]
    inputs = inputs or {}
    duplicated = {problem.path: problem for problem in bids.duplicate_series(session.series)}
    for acquisition in acquisitions:
        t0 = time.perf_counter()
        twice = [duplicated[s.relpath] for s in acquisition.series if s.relpath in duplicated]
        if twice:  # a .nii beside a .nii.gz of one name: never processed twice into the same outputs
            results.append(AcquisitionResult(acquisition.source_name, acquisition.subject, acquisition.session,
                                             acquisition.model, "failed", 0.0,
                                             error=f"BidsError: {'; '.join(str(p) for p in twice)}"))
            continue
        try:
            results.append(process_acquisition(acquisition, out_dir, settings, progress,
                                               inputs=inputs.get(acquisition.source_name)))
        except Exception as exc:  # isolation: one acquisition's failure never stops the others
            if not isinstance(exc, (bids.BidsError, ValueError, OSError, MemoryError)):
                log.error("%s failed unexpectedly", acquisition.source_name, exc_info=True)
            results.append(AcquisitionResult(acquisition.source_name, acquisition.subject, acquisition.session,
                                             acquisition.model, "failed", time.perf_counter() - t0,
                                             error=f"{type(exc).__name__}: {exc}"))
    return results
