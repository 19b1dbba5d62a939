"""Many sessions unattended: plan, lock, isolate, run (in-process or worker processes), report.

- **Plan**: a session is skipped only when, for every one of its acquisitions, the
  provenance file records the same aslbatch version, the same run-settings digest and the
  same input digest (sha256 of every NIfTI, JSON and TSV input), and every output it lists
  still exists. ``force`` reprocesses everything.
- **Lock**: one run per output folder (``fcntl.flock`` on ``OUT/.aslbatch.lock``,
  non-blocking). The kernel drops the lock when its process dies, so a killed run never
  blocks the next.
- **Isolation**: every session runs inside its own ``try``; a failure is recorded with its
  reason and the batch goes on. Outputs are written atomically with the provenance last
  (:mod:`aslbatch.derivatives`), so an interrupted session is simply redone next time; the
  temporary files a killed run leaves behind are removed by the next run, under the lock.
- **Parallelism**: ``jobs`` worker processes (spawned, so no numba threads are forked),
  each with ``threads`` numba threads (default: the cores divided among the workers); or the
  workers of a Dask distributed cluster (``scheduler``), with the same outputs and reports.
- **Reporting**: a log per run ``OUT/logs/run-<id>.log``, a summary
  ``OUT/logs/run-<id>_summary.json`` and ``.tsv`` with stable ``latest_summary`` copies,
  progress over sessions (tqdm on a terminal, plain lines otherwise) and, in-process on a
  terminal, over the voxels of each fit.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from tqdm import tqdm

from . import bids
from ._version import __version__
from .atomic import atomic_open, stale_temporaries
from .derivatives import inputs_digest, output_paths, read_provenance
from .pipeline import write_report
from .exitcodes import EXIT_FAILED, EXIT_NOTHING, EXIT_OK
from .identify import group_acquisitions
from .pipeline import InputDigests, Settings, hash_inputs, process_session

__all__ = [
    "BatchReport", "LockHeld", "SessionOutcome", "SessionPlan", "output_lock", "plan_sessions", "run_batch",
]

LOCK_NAME = ".aslbatch.lock"
PACKAGE_LOGGER = "aslbatch"
#: logger of network training (a line on stderr too: it can take minutes)
NETWORK_LOGGER = "aslbatch.networks"
#: how long to try to reach a Dask scheduler before giving up (s)
SCHEDULER_TIMEOUT_S = 20
log = logging.getLogger("aslbatch.batch")


class LockHeld(RuntimeError):
    """Another aslbatch run holds the output folder's lock."""


@contextlib.contextmanager
def output_lock(out_dir: Path) -> Iterator[Path]:
    """Hold the non-blocking exclusive lock of ``out_dir`` for the duration of the block."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise LockHeld(f"{out_dir}: another aslbatch run holds the lock ({holder})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n")
        handle.flush()
        yield path
    finally:
        handle.close()  # closing drops the lock


@dataclass(frozen=True)
class SessionOutcome:
    """One session of a run: ``status`` done, skipped or failed, with the reason."""

    session: str
    status: str
    reason: str
    duration_s: float = 0.0
    outputs: tuple[str, ...] = ()
    #: seconds per stage, summed over the session's acquisitions (see AcquisitionResult.timings)
    timings: dict = field(default_factory=dict)
    #: why a done session's results are implausible, per acquisition (AcquisitionResult.flags)
    flags: tuple[str, ...] = ()
    #: max and mean framewise displacement (mm) and excluded ΔM volumes over the session's acquisitions
    motion: dict = field(default_factory=dict)


@dataclass
class BatchReport:
    """What a run did; ``exit_code`` as in :mod:`aslbatch.exitcodes`."""

    run_id: str
    out_dir: str
    outcomes: list[SessionOutcome] = field(default_factory=list)
    planned: list[tuple[str, str]] = field(default_factory=list)
    exit_code: int = EXIT_OK

    def counts(self) -> dict[str, int]:
        """Number of sessions per status."""
        counts = {"done": 0, "skipped": 0, "failed": 0}
        for outcome in self.outcomes:
            counts[outcome.status] += 1
        return counts

    def one_line(self) -> str:
        """The final summary line."""
        c = self.counts()
        return (f"aslbatch run {self.run_id}: {c['done']} done, {c['skipped']} up to date, {c['failed']} failed; "
                f"outputs in {self.out_dir}")


@dataclass(frozen=True)
class SessionPlan:
    """One session as planned: ``reason`` it needs processing (None: up to date), its
    ``acquisitions`` (None when they cannot be grouped; processing then reports why) and
    the ``inputs`` digests of each acquisition by source name, which processing reuses."""

    session: bids.Session
    reason: str | None
    acquisitions: tuple[bids.Acquisition, ...] | None = None
    inputs: Mapping[str, InputDigests] = field(default_factory=dict)


def _why_stale(acquisition: bids.Acquisition, out_dir: Path, settings: Settings,
               inputs: InputDigests) -> str | None:
    """Why ``acquisition`` needs processing, or None when its outputs are up to date."""
    path = output_paths(out_dir, acquisition.source_name, acquisition.model, settings.methods)["provenance"]
    try:
        provenance = read_provenance(path)
    except FileNotFoundError:
        return "not processed yet"
    except ValueError as exc:
        return f"unreadable provenance ({exc})"
    if provenance.get("aslbatch_version") != __version__:
        return f"made by aslbatch {provenance.get('aslbatch_version')}"
    if provenance.get("run_settings_digest") != settings.digest():
        return "settings changed"
    if provenance.get("input_digest") != inputs_digest(inputs.sha256):
        return "inputs changed"
    missing = [o["path"] for o in provenance.get("outputs", []) if not (out_dir / o["path"]).is_file()]
    if missing:
        return f"{len(missing)} output(s) missing"
    return None


def plan_sessions(sessions: Sequence[bids.Session], out_dir: Path, settings: Settings,
                  force: bool = False) -> list[SessionPlan]:
    """Each session with the reason it needs processing (None when it is up to date), its
    acquisitions (grouped once here) and their input digests (hashed once here)."""
    planned = []
    for session in sessions:
        acquisitions, inputs = None, {}
        try:
            acquisitions = tuple(group_acquisitions(session, settings.model))
            for acquisition in acquisitions:
                inputs[acquisition.source_name] = hash_inputs(acquisition)
            reasons = ["forced"] if force else [
                r for r in (_why_stale(a, out_dir, settings, inputs[a.source_name]) for a in acquisitions) if r]
        except (bids.BidsError, OSError) as exc:
            reasons = ["forced"] if force else [f"cannot be checked ({exc})"]
        except Exception as exc:  # isolation: a file no check foresaw fails its session, not the plan
            log.error("planning %s failed unexpectedly", session.name, exc_info=True)
            acquisitions, reasons = None, [f"cannot be checked ({type(exc).__name__}: {exc})"]
        planned.append(SessionPlan(session, "; ".join(reasons) if reasons else None, acquisitions, inputs))
    return planned


def _run_session(plan: SessionPlan, out_dir: Path, settings: Settings, progress: bool = False) -> SessionOutcome:
    """One session, isolated: every exception becomes a failed outcome with its reason."""
    session = plan.session
    t0 = time.perf_counter()
    try:
        results = process_session(session, out_dir, settings, progress, acquisitions=plan.acquisitions,
                                  inputs=plan.inputs)
    except Exception as exc:  # isolation: one bad session never stops the batch
        return SessionOutcome(session.name, "failed", f"{type(exc).__name__}: {exc}", time.perf_counter() - t0)
    failed = [r for r in results if r.status != "done"]
    outputs = tuple(o for r in results for o in r.outputs)
    timings: dict[str, float] = {}
    for r in results:
        for stage, seconds in r.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
    flags = tuple(f"{r.source_name}: {flag}" for r in results for flag in r.flags)
    motion = _session_motion([r.motion for r in results if r.motion])
    if failed:
        reason = "; ".join(f"{r.source_name}: {r.error}" for r in failed)
        return SessionOutcome(session.name, "failed", reason, time.perf_counter() - t0, outputs, timings, flags,
                              motion)
    return SessionOutcome(session.name, "done", "", time.perf_counter() - t0, outputs, timings, flags, motion)


def _session_motion(acquisitions: Sequence[Mapping]) -> dict:
    """A session's motion figures from its acquisitions' (AcquisitionResult.motion): the largest
    max FD, the mean of the mean FDs (mm), and the ΔM volumes excluded of all."""
    if not acquisitions:
        return {}
    out = {"excluded_deltam_volumes": sum(a["excluded_deltam_volumes"] for a in acquisitions),
           "deltam_volumes": sum(a["deltam_volumes"] for a in acquisitions)}
    moved = [a for a in acquisitions if "max_fd_mm" in a]
    if moved:
        out["max_fd_mm"] = max(a["max_fd_mm"] for a in moved)
        out["mean_fd_mm"] = round(sum(a["mean_fd_mm"] for a in moved) / len(moved), 4)
    return out


def _log_handlers(log_file: Path) -> list[logging.Handler]:
    """The run log (every aslbatch logger) and, for network training, a line on stderr."""
    to_file = logging.FileHandler(log_file, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setFormatter(logging.Formatter("aslbatch: %(message)s"))
    to_stderr.addFilter(lambda record: record.name == NETWORK_LOGGER)
    return [to_file, to_stderr]


@contextlib.contextmanager
def thread_limits(threads: int) -> Iterator[None]:
    """numba's and BLAS's thread counts set to ``threads`` inside the block, restored after it
    (an in-process run must not change its caller's settings)."""
    import numba
    from threadpoolctl import threadpool_limits

    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        with threadpool_limits(threads):  # BLAS of network inference and training: the same share of cores
            yield
    finally:
        numba.set_num_threads(before)


def _init_worker(threads: int, log_file: Path | None = None) -> None:
    """A worker process's threads (for its lifetime) and its log handlers."""
    import numba
    from threadpoolctl import threadpool_limits

    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    threadpool_limits(threads)
    if log_file is not None:  # worker processes: their network log lines join the run's log
        package = logging.getLogger(PACKAGE_LOGGER)
        for handler in _log_handlers(log_file):
            package.addHandler(handler)
        package.setLevel(logging.INFO)


def _write_reports(report: BatchReport, logs: Path) -> None:
    summary = {
        "run_id": report.run_id,
        "aslbatch_version": __version__,
        "out_dir": report.out_dir,
        "exit_code": report.exit_code,
        "counts": report.counts(),
        "sessions": [asdict(o) for o in report.outcomes],
    }
    text = json.dumps(summary, indent=2)
    rows = io.StringIO()
    writer = csv.writer(rows, delimiter="\t", lineterminator="\n")
    writer.writerow(["session", "status", "reason", "duration_s", "n_outputs", "max_fd_mm", "mean_fd_mm",
                     "excluded_deltam_volumes", "flags"])
    for o in report.outcomes:
        m = o.motion
        excluded = f"{m['excluded_deltam_volumes']}/{m['deltam_volumes']}" if m else "n/a"
        writer.writerow([o.session, o.status, o.reason, f"{o.duration_s:.2f}", len(o.outputs),
                         m.get("max_fd_mm", "n/a"), m.get("mean_fd_mm", "n/a"), excluded, "; ".join(o.flags)])
    for name, content in ((f"run-{report.run_id}_summary.json", text), (f"run-{report.run_id}_summary.tsv", rows.getvalue()),
                          ("latest_summary.json", text), ("latest_summary.tsv", rows.getvalue())):
        with atomic_open(logs / name, "w", encoding="utf-8") as fh:
            fh.write(content)


def run_batch(bids_dir: Path, out_dir: Path, settings: Settings, *, participant_labels: Sequence[str] | None = None,
              jobs: int = 1, threads: int | None = None, force: bool = False, dry_run: bool = False,
              scheduler: str | None = None) -> BatchReport:
    """Process every session of ``bids_dir`` that is not up to date into ``out_dir``.

    ``scheduler``: the address of a Dask distributed scheduler; sessions then run on its
    workers (which must see ``bids_dir`` and ``out_dir`` at the same paths) instead of
    local processes. Planning, locking and reports stay on this machine.

    Raises :class:`aslbatch.bids.BidsError` for a missing dataset or unknown participant,
    ValueError for an ``out_dir`` among the raw dataset's files (anywhere inside ``bids_dir`` but
    below ``derivatives/``, or containing it: :func:`aslbatch.config.output_folder_problem`) and
    :class:`LockHeld` when another run holds ``out_dir``; everything else is in the report.
    With ``jobs`` > 1 the workers are spawned and import the caller's main module, so a
    script calling this must guard its entry point with ``if __name__ == "__main__":``
    (the ``aslbatch`` command does).
    """
    from .config import output_folder_problem

    refused = output_folder_problem(bids_dir, out_dir)  # the raw dataset's files are never written
    if refused is not None:
        raise ValueError(refused)
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    cores = os.cpu_count() or 1
    threads = threads if threads is not None else max(1, cores // jobs)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"
    report = BatchReport(run_id, str(out_dir))
    sessions = bids.find_sessions(bids_dir, participant_labels)
    if not sessions:
        report.exit_code = EXIT_NOTHING
        return report
    with output_lock(out_dir):
        logs = out_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_file = logs / f"run-{run_id}.log"
        package = logging.getLogger(PACKAGE_LOGGER)
        handlers = _log_handlers(log_file)
        for handler in handlers:
            package.addHandler(handler)
        level = package.level
        package.setLevel(logging.INFO)
        try:
            log.info("aslbatch %s run %s: %s -> %s, settings %s, jobs %d x %d threads", __version__, run_id,
                     bids_dir, out_dir, json.dumps(settings.to_dict()), jobs, threads)
            # under the lock nobody else writes here: temporaries are leftovers of killed runs
            for stale in stale_temporaries(out_dir):
                stale.unlink()
                log.info("removed %s, left by an interrupted run", stale.relative_to(out_dir))
            planned = plan_sessions(sessions, out_dir, settings, force)
            report.planned = [(p.session.name, p.reason or "up to date") for p in planned]
            for name, reason in report.planned:
                log.info("plan %s: %s", name, reason)
            if dry_run:
                return report
            todo = [p for p in planned if p.reason is not None]
            report.outcomes = [SessionOutcome(p.session.name, "skipped", "up to date") for p in planned
                               if p.reason is None]
            try:
                _execute(todo, out_dir, settings, jobs, threads, report, scheduler, log_file)
            finally:  # the summary and the index, of whatever finished, are always written
                report.exit_code = EXIT_FAILED if report.counts()["failed"] else EXIT_OK
                if settings.report:
                    _write_qc_index(planned, out_dir, settings, report)
                log.info("%s", report.one_line())
                _write_reports(report, logs)
        finally:
            for handler in handlers:
                package.removeHandler(handler)
                handler.close()
            package.setLevel(level)
    return report


def _write_qc_index(planned: Sequence[SessionPlan], out_dir: Path, settings: Settings, report: BatchReport) -> None:
    """The run's QC index over every session; pages missing for up-to-date sessions are made.
    Failures are logged: the maps are what the run is for."""
    from .qc import IndexEntry, session_report_path, write_run_index

    outcomes = {o.session: o for o in report.outcomes}
    entries = []
    for plan in planned:
        session, acquisitions = plan.session, plan.acquisitions or ()
        outcome = outcomes.get(session.name)
        if outcome is None:
            continue
        provenance = []
        for acquisition in acquisitions:
            try:
                provenance.append(output_paths(out_dir, acquisition.source_name, acquisition.model,
                                               settings.methods)["provenance"])
            except (bids.BidsError, ValueError) as exc:  # a name no output can carry: its session failed
                log.warning("no QC page for %s: %s", acquisition.source_name, exc)
        for path in provenance:
            if outcome.status == "skipped" and path.is_file() and not session_report_path(path).is_file():
                write_report(path)
        entries.append(IndexEntry(session.name, outcome.status, outcome.reason, tuple(provenance)))
    try:
        path = write_run_index(out_dir, entries, run_id=report.run_id)
        log.info("QC index: %s", path)
    except Exception as exc:  # never fail a run over its report
        log.warning("QC index not written: %s: %s", type(exc).__name__, exc)


def _record(report: BatchReport, outcome: SessionOutcome, bar: tqdm) -> None:
    report.outcomes.append(outcome)
    line = f"{outcome.session}: {outcome.status}" + (f" ({outcome.reason})" if outcome.reason else "") + \
        f" in {outcome.duration_s:.1f} s"
    (log.error if outcome.status == "failed" else log.info)("%s", line)
    if bar.disable:
        print(line, file=sys.stderr, flush=True)
    bar.update(1)


def _execute_distributed(todo: list[SessionPlan], out_dir: Path, settings: Settings, scheduler: str,
                         report: BatchReport, bar: tqdm) -> None:
    """Submit every session to the Dask cluster at ``scheduler``; collect outcomes as they finish."""
    try:
        from distributed import Client, as_completed as dask_completed
    except ImportError:
        raise ValueError("--scheduler needs the 'distributed' extra: pip install 'aslbatch[distributed]'") from None
    try:
        client = Client(scheduler, timeout=f"{SCHEDULER_TIMEOUT_S}s")
    except (OSError, TimeoutError) as exc:
        raise ValueError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
    with client:
        futures = {client.submit(_run_session, p, out_dir, settings, key=f"aslbatch-{report.run_id}-{p.session.name}",
                                 pure=False): p.session for p in todo}
        for future in dask_completed(futures):
            session = futures[future]
            try:
                outcome = future.result()
            except Exception as exc:  # a worker died or the task was lost
                outcome = SessionOutcome(session.name, "failed", f"Dask task failed: {type(exc).__name__}: {exc}")
            _record(report, outcome, bar)


def _execute(todo: list[SessionPlan], out_dir: Path, settings: Settings, jobs: int, threads: int,
             report: BatchReport, scheduler: str | None = None, log_file: Path | None = None) -> None:
    bar = tqdm(total=len(todo), desc="sessions", unit="session", disable=not sys.stderr.isatty(), file=sys.stderr)
    try:
        if scheduler is not None:
            _execute_distributed(todo, out_dir, settings, scheduler, report, bar)
            return
        if jobs == 1 or len(todo) <= 1:
            with thread_limits(threads):
                for plan in todo:
                    _record(report, _run_session(plan, out_dir, settings, progress=not bar.disable), bar)
            return
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(threads, log_file)) as pool:
            futures = {pool.submit(_run_session, p, out_dir, settings): p.session for p in todo}
            for future in as_completed(futures):
                session = futures[future]
                try:
                    outcome = future.result()
                except BrokenProcessPool as exc:  # a worker died (killed, out of memory)
                    outcome = SessionOutcome(session.name, "failed", f"worker process died: {exc}")
                _record(report, outcome, bar)
    finally:
        bar.close()
