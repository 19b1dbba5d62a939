"""Study parameters: the ASL values a DICOM series lacks, supplied by the user per vendor and series.

As ExploreASL's study parameters, a file (JSON or TOML) lists entries, each matched to a series
by ``Manufacturer`` (case-insensitive, ``Siemens`` matches ``SIEMENS``) and ``SeriesDescription``
(a shell pattern, case-insensitive; ``*`` matches all); every other key is a BIDS ASL field in
BIDS units (seconds) that the entry supplies. An optional ``subjects`` table maps a DICOM
PatientID to the BIDS subject label::

    [subjects]
    "Phantom02" = "01"

    [[series]]
    Manufacturer = "Philips"
    SeriesDescription = "SOURCE - 3D_pCASL_6mm"
    ArterialSpinLabelingType = "PCASL"
    PostLabelingDelay = 2.0
    LabelingDuration = 1.8
    BackgroundSuppression = true

The first matching entry applies. Keys starting with ``_`` are comments and are ignored.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["StudyParameters", "StudyParameterError", "load_study_parameters"]

MATCH_KEYS = ("Manufacturer", "SeriesDescription")


class StudyParameterError(ValueError):
    """The study parameter file cannot be read or is malformed; the message names the file."""


@dataclass(frozen=True)
class StudyParameters:
    """Entries of a study parameter file (none when no file is given), with the file's path and digest."""

    entries: tuple[dict[str, Any], ...] = ()
    subjects: dict[str, str] = field(default_factory=dict)
    path: str | None = None
    digest: str | None = None

    def for_series(self, manufacturer: str, description: str) -> dict[str, Any]:
        """The BIDS fields the first entry matching the series supplies ({} when none matches)."""
        for entry in self.entries:
            vendor = str(entry.get("Manufacturer", "*")).lower()
            if vendor != "*" and vendor not in manufacturer.lower():
                continue
            if not fnmatch.fnmatchcase(description.lower(), str(entry.get("SeriesDescription", "*")).lower()):
                continue
            return {k: v for k, v in entry.items() if k not in MATCH_KEYS and not k.startswith("_")}
        return {}


def load_study_parameters(path: str | os.PathLike | None) -> StudyParameters:
    """Read a study parameter file (``.json`` or ``.toml``); None gives no parameters."""
    if path is None:
        return StudyParameters()
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StudyParameterError(f"{path}: cannot read the study parameter file ({exc.strerror})") from None
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(raw.decode("utf-8"))
        else:
            data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StudyParameterError(f"{path}: not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'} ({exc})") from None
    if not isinstance(data, dict):
        raise StudyParameterError(f"{path}: must hold a table with a 'series' list")
    unknown = set(data) - {"series", "subjects"} - {k for k in data if k.startswith("_")}
    if unknown:
        raise StudyParameterError(f"{path}: unknown key(s) {sorted(unknown)}; known: series, subjects")
    entries = data.get("series", [])
    if not (isinstance(entries, list) and all(isinstance(e, dict) for e in entries)):
        raise StudyParameterError(f"{path}: 'series' must be a list of tables")
    subjects = data.get("subjects", {})
    if not (isinstance(subjects, dict) and all(isinstance(v, str) and v.isalnum() for v in subjects.values())):
        raise StudyParameterError(f"{path}: 'subjects' must map PatientID to an alphanumeric subject label")
    return StudyParameters(tuple(entries), dict(subjects), str(path), hashlib.sha256(raw).hexdigest())
