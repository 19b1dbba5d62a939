"""Raw BIDS ASL input, in three modules by responsibility.

- :mod:`~aslbatch.bids.metadata`: pure functions of a sidecar dict, one per field, each
  with an error naming the file and the field (PLDs, label durations, M0Type, slice
  timing, the model constants ...);
- :mod:`~aslbatch.bids.layout`: finding sessions, series, their sidecars (BIDS
  inheritance), aslcontext, NIfTI headers and M0 scans, and pairing crushed series;
- :mod:`~aslbatch.bids.validation`: every problem of a series, session or dataset, and
  the checked per-series metadata (:class:`SeriesMetadata`) that preprocessing uses.

Every input problem raises (or is collected as) a :class:`BidsError`, whose message
starts with the dataset-relative path of the file to fix. Nothing here reads image data.
The names below are re-exported so ``from aslbatch import bids; bids.X`` keeps working;
``group_acquisitions`` (which also chooses each acquisition's model) lives in
:mod:`aslbatch.identify` and is reachable here too.
"""

from __future__ import annotations

from typing import Any

from .layout import (
    NIFTI_EXTENSIONS,
    Acquisition,
    AslSeries,
    M0Scan,
    Session,
    find_sessions,
    pair_series,
    parse_filename,
    read_aslcontext,
    read_nifti_shape,
    read_series,
)
from .metadata import (
    ASL_VOLUME_TYPES,
    M0_TYPES,
    VOLUME_TYPES,
    BackgroundSuppression,
    BidsError,
    Sidecar,
    background_suppression,
    background_suppression_factor,
    background_suppression_summary,
    blood_t1,
    bolus_duration,
    constants_from_metadata,
    intended_for,
    label_durations,
    labeling_durations,
    labeling_efficiency,
    labeling_type,
    m0_estimate,
    m0_type,
    magnetic_field_strength,
    post_labeling_delays,
    repetition_time_preparation,
    slice_axis,
    slice_offsets,
    vascular_crushing,
)
from .validation import (
    AcquisitionVerdict,
    inspect_dataset,
    inspect_session,
    SeriesMetadata,
    check_series,
    duplicate_series,
    m0_repetition_time,
    series_metadata,
    validate_dataset,
    validate_series,
    validate_session,
)

__all__ = [
    "ASL_VOLUME_TYPES",
    "Acquisition",
    "AslSeries",
    "BackgroundSuppression",
    "BidsError",
    "M0Scan",
    "M0_TYPES",
    "NIFTI_EXTENSIONS",
    "SeriesMetadata",
    "Session",
    "Sidecar",
    "VOLUME_TYPES",
    "background_suppression",
    "background_suppression_factor",
    "background_suppression_summary",
    "blood_t1",
    "bolus_duration",
    "check_series",
    "duplicate_series",
    "constants_from_metadata",
    "find_sessions",
    "group_acquisitions",
    "intended_for",
    "label_durations",
    "labeling_durations",
    "labeling_efficiency",
    "labeling_type",
    "m0_estimate",
    "m0_repetition_time",
    "m0_type",
    "magnetic_field_strength",
    "pair_series",
    "parse_filename",
    "post_labeling_delays",
    "read_aslcontext",
    "read_nifti_shape",
    "read_series",
    "repetition_time_preparation",
    "series_metadata",
    "slice_axis",
    "slice_offsets",
    "validate_dataset",
    "AcquisitionVerdict",
    "inspect_dataset",
    "inspect_session",
    "validate_series",
    "validate_session",
    "vascular_crushing",
]


def __getattr__(name: str) -> Any:
    # aslbatch.identify imports this package: reach its grouping lazily (no import cycle)
    if name == "group_acquisitions":
        from ..identify import group_acquisitions

        return group_acquisitions
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
