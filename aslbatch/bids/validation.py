"""Checking BIDS ASL input, and the checked metadata of each series, read once.

:func:`check_series` runs every metadata reader of :mod:`aslbatch.bids.metadata` on a
series found by :mod:`aslbatch.bids.layout`, collects every problem (it never stops at
the first) and returns a :class:`SeriesMetadata`: the per-volume timing, the M0 and
slice timing and the model constants that preprocessing consumes, so no sidecar is
parsed twice. :func:`validate_series`, :func:`validate_session` and
:func:`validate_dataset` return the problems alone (``aslbatch validate``).

Every problem is a :class:`~aslbatch.bids.metadata.BidsError` whose message starts with
the dataset-relative path of the file to fix, e.g. ``sub-01/perf/sub-01_asl.json:
PostLabelingDelay has 10 values but the series has 12 volumes``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .layout import AslSeries, Session, _rel, find_sessions, pair_series
from .metadata import (
    ASL_VOLUME_TYPES,
    VOLUME_TYPES,
    BackgroundSuppression,
    BidsError,
    _error,
    background_suppression,
    constants_from_metadata,
    label_durations,
    labeling_type,
    m0_estimate,
    m0_from_controls,
    m0_type,
    magnetic_field_strength,
    post_labeling_delays,
    repetition_time_preparation,
    slice_axis,
    slice_offsets,
    vascular_crushing,
)
from ..protocol import Constants

__all__ = [
    "AcquisitionVerdict",
    "SeriesMetadata",
    "check_series",
    "duplicate_series",
    "inspect_dataset",
    "inspect_session",
    "m0_repetition_time",
    "series_metadata",
    "validate_dataset",
    "validate_series",
    "validate_session",
]


@dataclass(frozen=True, eq=False)
class SeriesMetadata:
    """The checked metadata of one ASL series, as :func:`check_series` read it.

    Attributes
    ----------
    volume_types : the aslcontext ``volume_type`` of every volume.
    label_duration : τ per volume (s), float64 ``(n_volumes,)``: LabelingDuration for (P)CASL,
        the bolus duration τ_b on every volume for PASL.
    pld : PostLabelingDelay per volume (s), float64 ``(n_volumes,)``: the PLD for (P)CASL, the
        inversion time TI for PASL (there the readout time is ``pld``, not τ + PLD).
    crushed : VascularCrushing of the series.
    labeling_type : ``"PCASL"``, ``"CASL"`` or ``"PASL"``.
    m0_type : ``"Separate"``, ``"Included"``, ``"Estimate"`` or ``"Absent"`` (without
        background suppression the mean control image is the M0; with it there is none:
        :attr:`has_m0`).
    m0_estimate : M0Estimate (the M0 of blood, scanner units) for Estimate, else None.
    m0_repetition_time : RepetitionTimePreparation (s) of the M0 volumes, None for Estimate
        and without M0.
    slice_axis : the image axis (0, 1, 2) slices are stacked along.
    slice_offsets : per slice along ``slice_axis`` (s), the time after the PLD the slice
        was read (zeros for 3D readouts).
    constants : the model constants from the metadata and the user's overrides.
    background_suppression : BackgroundSuppression and its number of pulses as the sidecar
        states them (None where it does not).
    import_notes : what ``aslbatch import`` recorded for the QC (the correlation of ΔM with the
        scanner's own difference image), from the sidecar's ImportProvenance; empty otherwise.
    """

    volume_types: tuple[str, ...]
    label_duration: np.ndarray
    pld: np.ndarray
    crushed: bool
    labeling_type: str
    m0_type: str
    m0_estimate: float | None
    m0_repetition_time: float | None
    slice_axis: int
    slice_offsets: np.ndarray
    constants: Constants
    background_suppression: BackgroundSuppression = BackgroundSuppression(None, None)
    import_notes: tuple[str, ...] = ()

    @property
    def n_volumes(self) -> int:
        """Number of volumes of the series."""
        return len(self.volume_types)

    @property
    def has_m0(self) -> bool:
        """False for M0Type Absent with background suppression: no image or value scales ΔM to
        ΔM/M0t (the suppressed controls are no M0), so CBF can only be relative."""
        return not (self.m0_type == "Absent" and self.background_suppression.used is not False)


def m0_repetition_time(series: AslSeries) -> float | None:
    """RepetitionTimePreparation (s) of the M0 volumes, None for M0Type Estimate and for a series
    without any M0 (Absent with background suppression).

    Separate: from the m0scan's sidecar; Included: at the m0scan volumes of the
    series; Absent without background suppression: at its control volumes. The M0
    volumes must share one value.
    """
    kind = m0_type(series.metadata)
    if kind == "Estimate" or (kind == "Absent" and not m0_from_controls(series.metadata)):
        return None
    if kind == "Separate":
        if series.m0scan is None:
            raise _error(series.metadata, "M0Type", "M0Type is Separate but the series has no m0scan")
        meta, n = series.m0scan.metadata, series.m0scan.n_volumes or 1
        values = repetition_time_preparation(meta, n)
    else:
        meta = series.metadata
        role = "control" if kind == "Absent" else "m0scan"  # Absent: the controls serve as M0
        index = [i for i, volume in enumerate(series.volume_types) if volume == role]
        if not index:
            raise _error(
                meta, "M0Type", f"M0Type is {kind} but the aslcontext of {series.relpath} lists no {role} volume"
            )
        values = repetition_time_preparation(meta, series.n_volumes or len(series.volume_types))[index]
    if np.ptp(values) > 0:
        raise _error(
            meta, "RepetitionTimePreparation",
            f"RepetitionTimePreparation differs between the M0 volumes: {sorted(set(values.tolist()))}",
        )
    return float(values[0])


def _unique(errors: Sequence[BidsError]) -> list[BidsError]:
    seen: set[str] = set()
    out = []
    for error in errors:
        if str(error) not in seen:
            seen.add(str(error))
            out.append(error)
    return out


def check_series(
    series: AslSeries,
    *,
    overrides: Mapping[str, Any] | None = None,
    background_suppression_correction: bool = False,
    bolus_duration: float | None = None,
    on_grid_mismatch: str = "resample",
) -> tuple[SeriesMetadata | None, list[BidsError]]:
    """Read and check a series' metadata once: its :class:`SeriesMetadata` and every problem.

    The problems, besides the reading ones: required fields, per-volume lengths, units,
    aslcontext rows == NIfTI volumes, as many control as label volumes, τ > 0 on
    labeled volumes, the M0 by M0Type, slice timing and the constants. The record is
    None when a value it holds could not be read; it can exist beside problems that do
    not enter it (e.g. unpaired control volumes, or a missing MagneticFieldStrength when
    ``overrides`` give t1b). ``overrides`` and ``background_suppression_correction`` are
    those of :func:`~aslbatch.bids.metadata.constants_from_metadata`; invalid overrides
    (the user's settings, not the data) raise ProtocolError. ``bolus_duration`` (s): the
    user's PASL bolus duration, which wins over the sidecar's
    (:func:`~aslbatch.bids.metadata.bolus_duration`); unused for (P)CASL. ``on_grid_mismatch``
    (:data:`aslbatch.preprocess.GRID_POLICIES`): with ``"refuse"``, a separate m0scan on
    another grid than the series (from the headers; not one reoriented exactly) is a problem.
    """
    problems = list(series.problems)
    meta, n = series.metadata, series.n_volumes

    def attempt(function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except BidsError as exc:
            problems.append(exc)
            return None

    labeling = attempt(labeling_type, meta)
    kind = attempt(m0_type, meta)
    crushed = attempt(vascular_crushing, meta)
    attempt(magnetic_field_strength, meta)
    suppression = attempt(background_suppression, meta)
    constants = attempt(
        constants_from_metadata, meta, overrides, background_suppression_correction=background_suppression_correction
    )

    pld = tau = axis = offsets = repetition_time = estimate = None
    types = series.volume_types
    if n is not None:
        pld = attempt(post_labeling_delays, meta, n)
        tau = attempt(label_durations, meta, n, bolus_duration)
        attempt(repetition_time_preparation, meta, n)
        axis = attempt(slice_axis, meta)
        if axis is not None and series.shape is not None:
            offsets = attempt(slice_offsets, meta, series.shape[axis])
        context = _rel(series.aslcontext, series.bids_dir) if series.aslcontext else None
        if types and len(types) != n:
            problems.append(BidsError(
                f"volume_type has {len(types)} rows but {series.relpath} has {n} volumes",
                path=context, field="volume_type",
            ))
        elif types:
            problems.extend(_check_volume_types(series, tau, context, pld))
            if kind in ("Included", "Absent"):
                repetition_time = attempt(m0_repetition_time, series)

    if kind == "Separate" and series.m0scan is not None and series.m0scan.n_volumes is not None:
        repetition_time = attempt(m0_repetition_time, series)
        if on_grid_mismatch == "refuse":
            problems.extend(_grid_problems(series.path, series.relpath, series.m0scan.path, series.m0scan.relpath,
                                           "the m0scan"))
    if kind == "Estimate":
        estimate = attempt(m0_estimate, meta)
    unreadable = {p.path for p in series.problems if p.field == "JSON"}
    if unreadable:  # a sidecar that could not be read: its fields are unknown, not missing
        problems = [p for p in problems if not (p.path in unreadable and p.message.endswith(" is missing (required "
                                                                                              "by BIDS for ASL)"))]
    problems = _unique(problems)

    read = (labeling, kind, crushed, constants, pld, tau, axis, offsets, suppression)
    if kind == "Estimate":
        m0_read = estimate is not None
    else:  # a series without M0 (Absent, background suppressed) has no M0 to read
        m0_read = repetition_time is not None or (kind == "Absent" and not m0_from_controls(meta))
    if any(value is None for value in read) or not m0_read or not types or len(types) != n:
        return None, problems
    record = SeriesMetadata(
        volume_types=tuple(types), label_duration=tau, pld=pld, crushed=crushed, labeling_type=labeling,
        m0_type=kind, m0_estimate=estimate, m0_repetition_time=repetition_time, slice_axis=axis,
        slice_offsets=offsets, constants=constants, background_suppression=suppression,
        import_notes=_import_notes(meta),
    )
    return record, problems


def _import_notes(meta) -> tuple[str, ...]:
    imported = meta.get("ImportProvenance")
    if not (isinstance(imported, dict) and isinstance(imported.get("ScannerReferenceCorrelation"), (int, float))):
        return ()
    return (f"ΔM against the scanner's own difference image {imported.get('ScannerReference')}: "
            f"r = {imported['ScannerReferenceCorrelation']} in the brain (aslbatch import)",)


def _header_grid(path: Path, display: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """(affine, spatial shape) from a NIfTI header; BidsError naming ``display``."""
    import nibabel as nib
    from nibabel.spatialimages import HeaderDataError

    try:
        image = nib.load(str(path))
        return np.asarray(image.affine, dtype=np.float64), tuple(int(n) for n in image.shape[:3])
    except (OSError, EOFError, ValueError, HeaderDataError, nib.filebasedimages.ImageFileError) as exc:
        raise BidsError(f"cannot read the NIfTI header: {exc}", path=display, field="NIfTI header") from None


def _grid_problems(asl: Path, asl_display: str, other: Path, other_display: str, what: str,
                   *, resampling_possible: bool = True) -> list[BidsError]:
    """The problem of an image (``other``) on another grid than the ASL series (``asl``), from the
    headers: none when the grids agree or one is the other stored with permuted or flipped axes
    (:func:`aslbatch.preprocess.reorientation`); one BidsError naming ``other`` otherwise, as run
    would refuse it (with ``--on-grid-mismatch refuse``, or always where ``resampling_possible``
    is False: a 2D readout's slice timing)."""
    from ..preprocess import _grid_text, reorientation, same_grid  # preprocess builds on this package

    try:
        target_affine, target_shape = _header_grid(asl, asl_display)
        affine, shape = _header_grid(other, other_display)
    except BidsError as exc:
        return [exc]
    if same_grid(affine, shape, target_affine, target_shape) or \
            reorientation(affine, shape, target_affine, target_shape) is not None:
        return []
    why = ("refused (--on-grid-mismatch refuse)" if resampling_possible else
           "its 2D slice timing cannot follow a resampling: the series of a pair must share one grid")
    return [BidsError(f"{what} is on another grid ({_grid_text(affine, shape)}) than the ASL series "
                      f"{asl_display} ({_grid_text(target_affine, target_shape)}): {why}",
                      path=other_display, field="affine")]


def series_metadata(
    series: AslSeries,
    *,
    overrides: Mapping[str, Any] | None = None,
    background_suppression_correction: bool = False,
    bolus_duration: float | None = None,
) -> SeriesMetadata:
    """The :class:`SeriesMetadata` of :func:`check_series`; its first problem (BidsError)
    when the record cannot be read."""
    record, problems = check_series(
        series, overrides=overrides, background_suppression_correction=background_suppression_correction,
        bolus_duration=bolus_duration,
    )
    if record is None:
        raise problems[0] if problems else BidsError("metadata cannot be read", path=series.relpath)
    return record


def validate_series(
    series: AslSeries,
    *,
    overrides: Mapping[str, Any] | None = None,
    background_suppression_correction: bool = False,
    bolus_duration: float | None = None,
) -> list[BidsError]:
    """Every problem of one series (:func:`check_series` without the record)."""
    return check_series(
        series, overrides=overrides, background_suppression_correction=background_suppression_correction,
        bolus_duration=bolus_duration,
    )[1]


def _check_volume_types(series: AslSeries, tau: np.ndarray | None, context: str | None,
                        pld: np.ndarray | None = None) -> list[BidsError]:
    types = series.volume_types
    problems = []
    counts = {name: types.count(name) for name in VOLUME_TYPES}
    if counts["control"] != counts["label"]:
        problems.append(BidsError(
            f"volume_type has {counts['control']} control but {counts['label']} label volumes; "
            "control and label volumes come in pairs",
            path=context, field="volume_type",
        ))
    if not (counts["control"] and counts["label"]) and not counts["deltam"]:
        problems.append(BidsError(
            "volume_type lists no control/label pair and no deltam volume: nothing to fit",
            path=context, field="volume_type",
        ))
    index = [i for i, name in enumerate(types) if name in ("control", "label")]
    for k in range(len(index) // 2 if counts["control"] == counts["label"] else 0):
        first, second = index[2 * k], index[2 * k + 1]
        if types[first] == types[second]:
            problems.append(BidsError(
                f"volumes {first} and {second} (counting from 0) are both {types[first]}: control/label pair {k} "
                "cannot be formed; each label must be next to its control (control first or label first)",
                path=context, field="volume_type",
            ))
            break
        if tau is not None and pld is not None and tau[first] > 0 and tau[second] > 0 and not np.array_equal(
                np.round([tau[first], pld[first]], 6), np.round([tau[second], pld[second]], 6)):
            problems.append(_error(
                series.metadata, "PostLabelingDelay",
                f"volumes {first} and {second} form control/label pair {k} but have different LabelingDuration "
                f"({tau[first]:g} s, {tau[second]:g} s) or PostLabelingDelay ({pld[first]:g} s, {pld[second]:g} s)",
            ))
            break
    if tau is not None:
        labeled = np.array([name in ASL_VOLUME_TYPES for name in types])
        bad = np.flatnonzero(labeled & (tau <= 0))
        if bad.size:
            problems.append(_error(
                series.metadata, "LabelingDuration",
                f"LabelingDuration must be > 0 s for {', '.join(ASL_VOLUME_TYPES)} volumes; "
                f"it is 0 at volume(s) {bad.tolist()}",
            ))
    return problems


@dataclass(frozen=True)
class AcquisitionVerdict:
    """What ``run`` would do with one acquisition: ``decision`` (an
    :class:`aslbatch.identify.Decision`: the model and the parameters estimated) or ``refusal``
    (why it is not quantified); both None when its series have problems of their own."""

    source_name: str
    decision: Any = None
    refusal: BidsError | None = None


def validate_session(
    session: Session,
    *,
    model: str = "auto",
    overrides: Mapping[str, Any] | None = None,
    background_suppression_correction: bool = False,
    bolus_duration: float | None = None,
    on_grid_mismatch: str = "resample",
) -> list[BidsError]:
    """Every problem of a session's series, plus those of grouping them for ``model``."""
    return inspect_session(session, model=model, overrides=overrides,
                           background_suppression_correction=background_suppression_correction,
                           bolus_duration=bolus_duration, on_grid_mismatch=on_grid_mismatch)[0]


def inspect_session(
    session: Session,
    *,
    model: str = "auto",
    overrides: Mapping[str, Any] | None = None,
    background_suppression_correction: bool = False,
    bolus_duration: float | None = None,
    on_grid_mismatch: str = "resample",
) -> tuple[list[BidsError], list[AcquisitionVerdict]]:
    """The problems of :func:`validate_session` (refusals included) and what ``run`` would do
    with each acquisition (:class:`AcquisitionVerdict`)."""
    problems: list[BidsError] = []
    records = {}
    for series in session.series:
        record, series_problems = check_series(
            series, overrides=overrides, background_suppression_correction=background_suppression_correction,
            bolus_duration=bolus_duration, on_grid_mismatch=on_grid_mismatch,
        )
        records[series.relpath] = None if series_problems else record
        problems.extend(series_problems)
    verdicts = _verdicts(session, model, records, on_grid_mismatch)
    problems.extend(v.refusal for v in verdicts if v.refusal is not None)
    problems.extend(duplicate_series(session.series))
    if model == "2c":
        problems.extend(reason for _, reason in pair_series(session.series)[1] if reason is not None)
    return _unique(problems), verdicts


def duplicate_series(series: Sequence[AslSeries]) -> list[BidsError]:
    """One problem per series whose name another series shares (``.nii`` beside ``.nii.gz``):
    both would be written to the same outputs, so run fails them and validate reports them."""
    names = [item.name for item in series]
    return [BidsError(f"{item.name} exists both as .nii and .nii.gz; keep one", path=item.relpath,
                      field="file name") for item in series if names.count(item.name) > 1]


def _verdicts(session: Session, model: str, records: Mapping[str, SeriesMetadata | None],
              on_grid_mismatch: str = "resample") -> list[AcquisitionVerdict]:
    """The decision on each acquisition (:func:`aslbatch.identify.decide`), judged once every
    series of the acquisition reads without a problem (``records`` not None); a pair whose
    series are on grids that run would refuse (:func:`_grid_problems`) is refused."""
    from ..identify import decide, group_acquisitions  # identify builds on this package

    try:
        acquisitions = group_acquisitions(session, model)
    except (BidsError, ValueError):
        return []  # the grouping's own problems are reported by validate_session
    verdicts = []
    for acquisition in acquisitions:
        found = [records.get(series.relpath) for series in acquisition.series]
        if any(record is None for record in found):
            verdicts.append(AcquisitionVerdict(acquisition.source_name))
            continue
        first = acquisition.series[0]
        grid = [problem for other, record in zip(acquisition.series[1:], found[1:])
                for problem in _grid_problems(
                    first.path, first.relpath, other.path, other.relpath, f"the series (paired with {first.relpath})",
                    resampling_possible=on_grid_mismatch == "resample" and not (
                        record.slice_offsets.any() or found[0].slice_offsets.any()))
                if on_grid_mismatch == "refuse" or record.slice_offsets.any() or found[0].slice_offsets.any()]
        if grid:
            verdicts.append(AcquisitionVerdict(acquisition.source_name, refusal=grid[0]))
            continue
        try:
            verdicts.append(AcquisitionVerdict(acquisition.source_name, decision=decide(acquisition, found, model)))
        except BidsError as exc:
            verdicts.append(AcquisitionVerdict(acquisition.source_name, refusal=exc))
    return verdicts


def inspect_dataset(
    bids_dir: str | Path,
    participant_labels: Sequence[str] | None = None,
    *,
    model: str = "auto",
    overrides: Mapping[str, Any] | None = None,
    background_suppression_correction: bool = False,
    bolus_duration: float | None = None,
    on_grid_mismatch: str = "resample",
) -> tuple[list[BidsError], list[AcquisitionVerdict]]:
    """:func:`validate_dataset`'s problems and every acquisition's :class:`AcquisitionVerdict`."""
    from ..identify import _check_requested

    _check_requested(model)
    try:
        sessions = find_sessions(bids_dir, participant_labels)
    except BidsError as exc:
        return [exc], []
    if not sessions:
        return [BidsError(
            "no ASL series found (expected sub-<label>[/ses-<label>]/perf/*_asl.nii[.gz])",
            path=str(bids_dir), field="asl",
        )], []
    problems: list[BidsError] = []
    verdicts: list[AcquisitionVerdict] = []
    for session in sessions:
        found, session_verdicts = inspect_session(
            session, model=model, overrides=overrides,
            background_suppression_correction=background_suppression_correction, bolus_duration=bolus_duration,
            on_grid_mismatch=on_grid_mismatch,
        )
        problems.extend(found)
        verdicts.extend(session_verdicts)
    return _unique(problems), verdicts


def validate_dataset(
    bids_dir: str | Path,
    participant_labels: Sequence[str] | None = None,
    *,
    model: str = "auto",
    overrides: Mapping[str, Any] | None = None,
    background_suppression_correction: bool = False,
    bolus_duration: float | None = None,
    on_grid_mismatch: str = "resample",
) -> list[BidsError]:
    """Every input problem in a dataset (empty when it is ready to process).

    Collects, without stopping at the first: a missing folder or participant,
    no ASL series, unreadable JSON, missing or inconsistent aslcontext, missing
    required fields, per-volume lengths and units, the M0 by M0Type (including a
    missing m0scan for Separate), control/label rows that cannot pair, images on grids run would
    refuse (``on_grid_mismatch``, from the headers), duplicate series and, with ``model="2c"``,
    series left unpaired.
    ``overrides`` and ``background_suppression_correction`` are those of
    :func:`constants_from_metadata`, ``bolus_duration`` that of :func:`check_series`.
    """
    return inspect_dataset(bids_dir, participant_labels, model=model, overrides=overrides,
                           background_suppression_correction=background_suppression_correction,
                           bolus_duration=bolus_duration, on_grid_mismatch=on_grid_mismatch)[0]
