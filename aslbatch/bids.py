"""Raw BIDS ASL input: discovery, reading and validation, returning plain data.

A BIDS dataset holds ASL series as ``sub-<label>[/ses-<label>]/perf/*_asl.nii[.gz]``
with JSON sidecar metadata (merged by the BIDS inheritance principle), an
``_aslcontext.tsv`` naming every volume's type, and an M0 image or value as the
sidecar's ``M0Type`` says. This module finds the series (:func:`find_sessions`),
reads their metadata into per-volume arrays with small pure functions of the
sidecar dict (ASLPrep's habit: one function per field, each with an error that
names the file and the field), checks a whole dataset without stopping at the
first problem (:func:`validate_dataset`) and decides which series are fitted
together (:func:`group_acquisitions`). Nothing here reads image data: the NIfTI
header gives the number of volumes and the spatial shape.

Symlinked subject or session folders are followed: a file belongs to the dataset when its
path, as found (not resolved), lies inside the dataset folder.

Units: every time is in seconds (BIDS convention); values above
:data:`aslbatch.protocol.MAX_TIME_S` (10 s) in a PLD, label duration or slice
time are taken for milliseconds and refused. Field strength is in tesla.

Every input problem raises (or is collected as) a :class:`BidsError`, whose
message starts with the dataset-relative path of the file to fix, e.g.
``sub-01/perf/sub-01_asl.json: PostLabelingDelay has 10 values but the series has
12 volumes``.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .protocol import MAX_TIME_S, Constants, ProtocolError

__all__ = [
    "ASL_VOLUME_TYPES",
    "Acquisition",
    "AslSeries",
    "BidsError",
    "M0Scan",
    "M0_TYPES",
    "Session",
    "Sidecar",
    "VOLUME_TYPES",
    "background_suppression_factor",
    "blood_t1",
    "constants_from_metadata",
    "find_sessions",
    "group_acquisitions",
    "intended_for",
    "labeling_durations",
    "labeling_efficiency",
    "labeling_type",
    "m0_estimate",
    "m0_repetition_time",
    "m0_type",
    "magnetic_field_strength",
    "parse_filename",
    "post_labeling_delays",
    "read_aslcontext",
    "read_nifti_shape",
    "read_series",
    "repetition_time_preparation",
    "slice_axis",
    "slice_offsets",
    "validate_dataset",
    "validate_series",
    "validate_session",
    "vascular_crushing",
]

#: the values BIDS allows in the ``volume_type`` column of ``_aslcontext.tsv``
VOLUME_TYPES = ("control", "label", "m0scan", "deltam", "cbf", "noRF", "n/a")
#: volume types acquired after labeling (or its control): they need a label duration > 0
ASL_VOLUME_TYPES = ("control", "label", "deltam", "cbf")
#: the values of the ``M0Type`` field
M0_TYPES = ("Separate", "Included", "Estimate", "Absent")
#: labeling schemes the kinetic models describe (a bolus of duration LabelingDuration)
SUPPORTED_LABELING = ("PCASL", "CASL")
#: T1 of arterial blood (s) by field strength (T), ASL_MODELS.md / Alsop 2015
T1B_BY_FIELD = {3.0: 1.65, 1.5: 1.35}
#: a field strength within this many tesla of a key of T1B_BY_FIELD counts as it
#: (Siemens 3 T systems report 2.89 T)
FIELD_TOLERANCE_T = 0.15
#: labeling efficiency α when the sidecar has no LabelingEfficiency (ASLPrep's
#: defaults: PCASL from Alsop 2015, CASL from Wang 2005)
DEFAULT_LABELING_EFFICIENCY = {"PCASL": 0.85, "CASL": 0.68}
#: efficiency per background-suppression pulse (the common 0.95 convention)
BS_PULSE_EFFICIENCY = 0.95
#: a RepetitionTimePreparation above this (s) is taken for milliseconds
MAX_TR_S = 100.0
NIFTI_EXTENSIONS = (".nii.gz", ".nii")
MODELS = ("auto", "1c", "2c")


# --- errors and metadata ------------------------------------------------------------------


class BidsError(ValueError):
    """A problem with the input dataset; the message names the file and the field.

    Attributes: ``message`` (the text after the file name), ``path`` (the file to
    fix, relative to the dataset root, or None) and ``field`` (the metadata field,
    column or aspect concerned, or None).
    """

    def __init__(self, message: str, path: str | None = None, field: str | None = None) -> None:
        self.message = message
        self.path = path
        self.field = field
        super().__init__(f"{path}: {message}" if path else message)

    def __reduce__(self):  # keep path and field through pickling (process pools)
        return (type(self), (self.message, self.path, self.field))


class Sidecar(Mapping):
    """Read-only metadata of one data file, merged from its JSON sidecars.

    Behaves as a dict of the merged fields and remembers which file supplied each
    field, so errors name the file to fix. ``default_source`` is named for fields
    that are missing (the data file's own sidecar, or the data file itself), and
    ``data_file`` is the data file the metadata describes.
    """

    def __init__(
        self,
        data: Mapping[str, Any] | None = None,
        sources: Mapping[str, str] | None = None,
        default_source: str = "sidecar",
        data_file: str | None = None,
    ) -> None:
        self._data = dict(data or {})
        self._sources = dict(sources or {})
        self.default_source = default_source
        self.data_file = data_file

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def source(self, field: str) -> str:
        """The dataset-relative path of the file that set ``field`` (or ``default_source``)."""
        return self._sources.get(field, self.default_source)

    @property
    def files(self) -> tuple[str, ...]:
        """Dataset-relative paths of every JSON file that supplied a field, sorted."""
        return tuple(sorted(set(self._sources.values())))

    def __repr__(self) -> str:
        return f"Sidecar({self._data!r}, data_file={self.data_file!r})"


def _where(meta: Mapping[str, Any], field: str) -> str:
    return meta.source(field) if isinstance(meta, Sidecar) else "sidecar"


def _error(meta: Mapping[str, Any], field: str, message: str) -> BidsError:
    return BidsError(message, path=_where(meta, field), field=field)


def _series_ref(meta: Mapping[str, Any], field: str) -> str:
    """'the series' when the field sits in the series' own sidecar, else the series' path."""
    if isinstance(meta, Sidecar) and meta.data_file and meta.source(field) != meta.default_source:
        return meta.data_file
    return "the series"


def _require(meta: Mapping[str, Any], field: str, reason: str = "required by BIDS for ASL") -> Any:
    if field not in meta or meta[field] is None:
        raise _error(meta, field, f"{field} is missing ({reason})")
    return meta[field]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(meta: Mapping[str, Any], field: str, value: Any) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise _error(meta, field, f"{field} must be a finite number, got {_short(value)}")
    return float(value)


def _per_volume(meta: Mapping[str, Any], field: str, n_volumes: int) -> np.ndarray:
    """A scalar (every volume) or one number per volume, as float64 (n_volumes,)."""
    value = meta[field]
    if _is_number(value):
        values = np.full(n_volumes, float(value))
    elif isinstance(value, list) and all(_is_number(v) for v in value):
        if len(value) != n_volumes:
            raise _error(
                meta, field,
                f"{field} has {len(value)} values but {_series_ref(meta, field)} has {n_volumes} volumes",
            )
        values = np.array(value, dtype=np.float64)
    else:
        raise _error(meta, field, f"{field} must be a number or a list of numbers (one per volume), got {_short(value)}")
    if not np.isfinite(values).all():
        bad = np.flatnonzero(~np.isfinite(values)).tolist()
        raise _error(meta, field, f"{field} has non-finite value(s) at volume(s) {bad}")
    return values


def _check_seconds(
    meta: Mapping[str, Any], field: str, values: np.ndarray, limit: float = MAX_TIME_S, unit: str = "volume"
) -> np.ndarray:
    """Refuse negative values and values above ``limit`` s (milliseconds)."""
    if (values > limit).any():
        big = sorted(set(values[values > limit].tolist()))
        raise _error(
            meta, field,
            f"{field} must be in seconds; value(s) {big[:5]} exceed {limit:g} s and look like "
            "milliseconds (divide by 1000)",
        )
    if (values < 0).any():
        bad = np.flatnonzero(values < 0).tolist()
        raise _error(meta, field, f"{field} must be >= 0 s; negative value(s) at {unit}(s) {bad}")
    return values


# --- per-volume and per-series metadata: small pure functions of the sidecar ---------------


def post_labeling_delays(meta: Mapping[str, Any], n_volumes: int) -> np.ndarray:
    """PostLabelingDelay per volume (s), float64 (n_volumes,).

    A scalar applies to every volume; a list needs one value per volume (0 for
    m0scan volumes is allowed). Values above 10 s are refused as milliseconds.
    """
    _require(meta, "PostLabelingDelay")
    return _check_seconds(meta, "PostLabelingDelay", _per_volume(meta, "PostLabelingDelay", n_volumes))


def labeling_durations(meta: Mapping[str, Any], n_volumes: int) -> np.ndarray:
    """LabelingDuration τ per volume (s), float64 (n_volumes,); required for (P)CASL.

    A scalar applies to every volume; a list needs one value per volume (m0scan
    volumes have 0). Values above 10 s are refused as milliseconds.
    """
    _require(meta, "LabelingDuration", "required by BIDS for (P)CASL")
    return _check_seconds(meta, "LabelingDuration", _per_volume(meta, "LabelingDuration", n_volumes))


def repetition_time_preparation(meta: Mapping[str, Any], n_volumes: int) -> np.ndarray:
    """RepetitionTimePreparation per volume (s), float64 (n_volumes,), each > 0.

    The time for the magnetisation to recover between preparations: the M0
    saturation-recovery correction uses it. Values above 100 s are refused as
    milliseconds.
    """
    _require(meta, "RepetitionTimePreparation")
    values = _per_volume(meta, "RepetitionTimePreparation", n_volumes)
    _check_seconds(meta, "RepetitionTimePreparation", values, limit=MAX_TR_S)
    if (values <= 0).any():
        raise _error(
            meta, "RepetitionTimePreparation",
            f"RepetitionTimePreparation must be > 0 s; value(s) <= 0 at volume(s) {np.flatnonzero(values <= 0).tolist()}",
        )
    return values


def labeling_type(meta: Mapping[str, Any]) -> str:
    """ArterialSpinLabelingType as ``"PCASL"`` or ``"CASL"``; PASL and others are refused."""
    value = _require(meta, "ArterialSpinLabelingType")
    name = value.upper() if isinstance(value, str) else value
    if name == "PASL":
        raise _error(
            meta, "ArterialSpinLabelingType",
            "ArterialSpinLabelingType is PASL: PASL is not supported (aslbatch's kinetic models "
            "describe (P)CASL, a bolus of duration LabelingDuration)",
        )
    if name not in SUPPORTED_LABELING:
        raise _error(
            meta, "ArterialSpinLabelingType", f"ArterialSpinLabelingType must be PCASL or CASL, got {_short(value)}"
        )
    return name


def m0_type(meta: Mapping[str, Any], *, allow_absent: bool = False) -> str:
    """M0Type as one of ``Separate``, ``Included``, ``Estimate``, ``Absent`` (case-insensitive).

    ``Absent`` is refused unless ``allow_absent``: without an M0 image or value,
    ΔM cannot be expressed as ΔM/M0t, so CBF cannot be quantified.
    """
    value = _require(meta, "M0Type")
    name = {t.lower(): t for t in M0_TYPES}.get(value.lower()) if isinstance(value, str) else None
    if name is None:
        raise _error(meta, "M0Type", f"M0Type must be one of {', '.join(M0_TYPES)}, got {_short(value)}")
    if name == "Absent" and not allow_absent:
        raise _error(
            meta, "M0Type",
            "M0Type is Absent: aslbatch needs an M0 to scale ΔM to ΔM/M0t and quantify CBF; add an "
            "m0scan (M0Type Separate or Included) or a value (M0Type Estimate with M0Estimate)",
        )
    return name


def m0_estimate(meta: Mapping[str, Any]) -> float:
    """M0Estimate: one whole-brain M0 value (> 0) for M0Type Estimate.

    In the scanner's arbitrary units; BIDS defines it as the M0 of blood
    (M0b), so the tissue M0t of the models is λ·M0b.
    """
    value = _require(meta, "M0Estimate", "required by BIDS when M0Type is Estimate")
    number = _number(meta, "M0Estimate", value)
    if number <= 0:
        raise _error(meta, "M0Estimate", f"M0Estimate must be > 0, got {value!r}")
    return number


def vascular_crushing(meta: Mapping[str, Any]) -> bool:
    """VascularCrushing of the series (DANTE or bipolar gradients); False when absent."""
    value = meta.get("VascularCrushing", False)
    if not isinstance(value, bool):
        raise _error(meta, "VascularCrushing", f"VascularCrushing must be true or false, got {_short(value)}")
    return value


def slice_axis(meta: Mapping[str, Any]) -> int:
    """The image axis (0, 1 or 2) slices are stacked along: SliceEncodingDirection, default k (2)."""
    value = meta.get("SliceEncodingDirection", "k")
    axis = {"i": 0, "j": 1, "k": 2}.get(value.rstrip("-")) if isinstance(value, str) else None
    if axis is None or value.count("-") > 1:
        raise _error(
            meta, "SliceEncodingDirection", f"SliceEncodingDirection must be one of i, j, k, i-, j-, k-, got {_short(value)}"
        )
    return axis


def slice_offsets(meta: Mapping[str, Any], n_slices: int) -> np.ndarray:
    """Per-slice time (s) to add to the PLD, float64 (n_slices,), along :func:`slice_axis`.

    3D acquisitions (MRAcquisitionType ``3D``) read every slice at the PLD: zeros.
    2D acquisitions read slice s at SliceTiming[s] − min(SliceTiming) after the
    first slice, the one the PLD refers to; SliceTiming needs one value per slice
    and is reversed when SliceEncodingDirection is negative (BIDS: its last entry
    is then the time of slice 0).
    """
    value = _require(meta, "MRAcquisitionType")
    kind = value.upper() if isinstance(value, str) else value
    if kind == "3D":
        return np.zeros(n_slices)
    if kind != "2D":
        raise _error(meta, "MRAcquisitionType", f"MRAcquisitionType must be 2D or 3D, got {_short(value)}")
    timing = _require(meta, "SliceTiming", "required by BIDS when MRAcquisitionType is 2D")
    if not (isinstance(timing, list) and all(_is_number(t) for t in timing)):
        raise _error(meta, "SliceTiming", f"SliceTiming must be a list of numbers (one per slice), got {_short(timing)}")
    if len(timing) != n_slices:
        raise _error(meta, "SliceTiming", f"SliceTiming has {len(timing)} values but the image has {n_slices} slices")
    times = np.array(timing, dtype=np.float64)
    if not np.isfinite(times).all():
        raise _error(meta, "SliceTiming", "SliceTiming has non-finite value(s)")
    _check_seconds(meta, "SliceTiming", times, unit="slice")
    if str(meta.get("SliceEncodingDirection", "k")).endswith("-"):
        times = times[::-1]
    return times - times.min()


def magnetic_field_strength(meta: Mapping[str, Any]) -> float:
    """MagneticFieldStrength (T), > 0."""
    value = _number(meta, "MagneticFieldStrength", _require(meta, "MagneticFieldStrength"))
    if value <= 0:
        raise _error(meta, "MagneticFieldStrength", f"MagneticFieldStrength must be > 0 T, got {value!r}")
    return value


def blood_t1(meta: Mapping[str, Any]) -> float:
    """T1 of arterial blood (s) for the sidecar's MagneticFieldStrength: 3 T 1.65 s, 1.5 T 1.35 s.

    Other field strengths have no default: the user must give ``t1b``.
    """
    field = magnetic_field_strength(meta)
    for tesla, t1b in T1B_BY_FIELD.items():
        if abs(field - tesla) <= FIELD_TOLERANCE_T:
            return t1b
    raise _error(
        meta, "MagneticFieldStrength",
        f"MagneticFieldStrength is {field:g} T: aslbatch has a default T1 of blood only at 1.5 T and 3 T; "
        "give the T1 of arterial blood at this field (constant t1b, in s)",
    )


def labeling_efficiency(meta: Mapping[str, Any]) -> float:
    """Labeling efficiency α: LabelingEfficiency if given, else 0.85 (PCASL) or 0.68 (CASL)."""
    if meta.get("LabelingEfficiency") is not None:
        value = _number(meta, "LabelingEfficiency", meta["LabelingEfficiency"])
        if not 0 < value <= 1:
            raise _error(meta, "LabelingEfficiency", f"LabelingEfficiency must be in (0, 1], got {value!r}")
        return value
    return DEFAULT_LABELING_EFFICIENCY[labeling_type(meta)]


def background_suppression_factor(meta: Mapping[str, Any]) -> float:
    """α_BS = 0.95 ** BackgroundSuppressionNumberPulses, 1.0 without background suppression."""
    enabled = _require(meta, "BackgroundSuppression")
    if not isinstance(enabled, bool):
        raise _error(meta, "BackgroundSuppression", f"BackgroundSuppression must be true or false, got {_short(enabled)}")
    if not enabled:
        return 1.0
    pulses = _require(
        meta, "BackgroundSuppressionNumberPulses", "needed for the background-suppression correction"
    )
    if not (isinstance(pulses, int) and not isinstance(pulses, bool) and pulses >= 0):
        raise _error(
            meta, "BackgroundSuppressionNumberPulses",
            f"BackgroundSuppressionNumberPulses must be a whole number >= 0, got {_short(pulses)}",
        )
    return BS_PULSE_EFFICIENCY**pulses


def constants_from_metadata(
    meta: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    *,
    background_suppression_correction: bool = False,
) -> Constants:
    """The model :class:`~aslbatch.protocol.Constants` for a series.

    ``t1b`` from MagneticFieldStrength (:func:`blood_t1`), ``alpha`` from
    :func:`labeling_efficiency`, ``alpha_bs`` from :func:`background_suppression_factor`
    only when ``background_suppression_correction`` (off by default, ASL_MODELS.md),
    else 1.0; the other constants keep their defaults. ``overrides`` (Constants
    field names, units as in Constants) win over the metadata, and the metadata
    behind an overridden constant is not read.
    """
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(Constants.__dataclass_fields__)
    if unknown:
        raise ProtocolError(f"unknown Constants field(s) in overrides: {sorted(unknown)}")
    values: dict[str, Any] = {}
    if "t1b" not in overrides:
        values["t1b"] = blood_t1(meta)
    if "alpha" not in overrides:
        values["alpha"] = labeling_efficiency(meta)
    if "alpha_bs" not in overrides:
        values["alpha_bs"] = background_suppression_factor(meta) if background_suppression_correction else 1.0
    values.update(overrides)
    return Constants(**values)


def intended_for(meta: Mapping[str, Any], subject: str) -> list[str]:
    """The files an IntendedFor field names, as dataset-relative POSIX paths.

    Accepts a string or a list, each either a BIDS URI ``bids::<path from the
    dataset root>`` or (older BIDS) a path relative to the subject folder
    ``sub-<subject>``. URIs into other datasets (``bids:<name>:...``) are skipped.
    """
    value = meta.get("IntendedFor")
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not (isinstance(items, list) and all(isinstance(item, str) for item in items)):
        raise _error(meta, "IntendedFor", f"IntendedFor must be a path or a list of paths, got {_short(value)}")
    paths = []
    for item in items:
        if item.startswith("bids::"):
            path = item[len("bids::"):]
        elif item.startswith("bids:"):
            continue
        else:
            path = f"sub-{subject}/{item}"
        paths.append(posixpath.normpath(path.lstrip("/")))
    return paths


# --- files --------------------------------------------------------------------------------


def parse_filename(name: str) -> tuple[dict[str, str], str, str]:
    """Entities (in file-name order), suffix and extension of a BIDS file name.

    ``sub-01_ses-1_acq-dante_asl.nii.gz`` gives ``({"sub": "01", "ses": "1",
    "acq": "dante"}, "asl", ".nii.gz")``. Raises BidsError for a part that is
    not ``key-label`` with alphanumeric key and label, or a repeated key.
    """
    stem, dot, extension = name.partition(".")
    *parts, suffix = stem.split("_")
    entities: dict[str, str] = {}
    for part in parts:
        key, dash, label = part.partition("-")
        if not (dash and key.isalnum() and label.isalnum()):
            raise BidsError(f"file name part {part!r} is not an entity key-label pair", path=name, field="file name")
        if key in entities:
            raise BidsError(f"file name repeats the entity {key!r}", path=name, field="file name")
        entities[key] = label
    return entities, suffix, dot + extension


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _applicable(data_path: Path, root: Path, entities: Mapping[str, str], suffix: str, extension: str) -> list[Path]:
    """Files with ``suffix`` + ``extension`` that apply to a data file by the inheritance principle.

    A file applies when it sits in the data file's folder or a parent up to the
    dataset root and its entities are a subset of the data file's. Ordered least
    specific first: by folder depth, then by number of entities.
    """
    folders = [root]
    for part in data_path.parent.relative_to(root).parts:
        folders.append(folders[-1] / part)
    found: list[Path] = []
    for folder in folders:
        level = []
        for candidate in folder.glob(f"*{suffix}{extension}"):
            try:
                keys, cand_suffix, cand_extension = parse_filename(candidate.name)
            except BidsError:
                continue
            if (cand_suffix, cand_extension) != (suffix, extension) or not candidate.is_file():
                continue
            if all(entities.get(key) == label for key, label in keys.items()):
                level.append((len(keys), candidate.name, candidate))
        found.extend(path for *_, path in sorted(level))
    return found


def _load_json(path: Path, root: Path, cache: dict[Path, Any]) -> dict[str, Any]:
    if path not in cache:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise BidsError(f"must hold a JSON object, got {type(data).__name__}", path=_rel(path, root), field="JSON")
            cache[path] = data
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            cache[path] = BidsError(f"cannot read JSON: {exc}", path=_rel(path, root), field="JSON")
        except BidsError as exc:
            cache[path] = exc
    if isinstance(cache[path], BidsError):
        raise cache[path]
    return cache[path]


def _read_sidecar(
    data_path: Path, root: Path, entities: Mapping[str, str], suffix: str, cache: dict[Path, Any]
) -> tuple[Sidecar, list[BidsError]]:
    """Merged sidecar metadata of a data file (most specific JSON wins) and the JSON problems met."""
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    problems: list[BidsError] = []
    for path in _applicable(data_path, root, entities, suffix, ".json"):
        try:
            fields = _load_json(path, root, cache)
        except BidsError as exc:
            problems.append(exc)
            continue
        data.update(fields)
        sources.update(dict.fromkeys(fields, _rel(path, root)))
    own = data_path.parent / (_strip_extension(data_path.name) + ".json")
    default = _rel(own if own.is_file() else data_path, root)
    return Sidecar(data, sources, default, _rel(data_path, root)), problems


def _strip_extension(name: str) -> str:
    return name.partition(".")[0]


def read_aslcontext(path: Path, display: str | None = None) -> tuple[str, ...]:
    """The ``volume_type`` column of an ``_aslcontext.tsv``: one volume type per volume.

    ``display`` is the name used in errors (default: the path). Raises BidsError
    for an unreadable file, a missing column, or values outside :data:`VOLUME_TYPES`.
    """
    display = display or str(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BidsError(f"cannot read aslcontext: {exc}", path=display, field="volume_type") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    header = [cell.strip() for cell in lines[0].split("\t")] if lines else []
    if "volume_type" not in header:
        raise BidsError(
            f"volume_type column is missing (header: {_short(header)}); aslcontext.tsv needs a "
            "tab-separated header with a volume_type column",
            path=display, field="volume_type",
        )
    column = header.index("volume_type")
    types, bad = [], []
    for number, line in enumerate(lines[1:], start=2):
        cells = line.split("\t")
        value = cells[column].strip() if column < len(cells) else ""
        if value not in VOLUME_TYPES:
            bad.append(f"{value!r} (line {number})")
        types.append(value)
    if bad:
        raise BidsError(
            f"volume_type has invalid value(s) {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
            f"allowed: {', '.join(VOLUME_TYPES)}",
            path=display, field="volume_type",
        )
    return tuple(types)


def read_nifti_shape(path: Path, display: str | None = None) -> tuple[tuple[int, int, int], int]:
    """Spatial shape (3 ints) and number of volumes from a NIfTI header; the data is not read.

    A 3D image has 1 volume. ``display`` is the name used in errors.
    """
    display = display or str(path)
    try:
        shape = tuple(int(n) for n in nib.load(str(path)).header.get_data_shape())
    except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise BidsError(f"cannot read the NIfTI header: {exc}", path=display, field="NIfTI header") from exc
    if len(shape) < 3 or any(n != 1 for n in shape[4:]):
        raise BidsError(
            f"image has shape {shape}: expected 3 spatial dimensions and volumes along the 4th",
            path=display, field="NIfTI header",
        )
    return shape[:3], (shape[3] if len(shape) > 3 else 1)


# --- discovery ----------------------------------------------------------------------------


@dataclass(frozen=True)
class M0Scan:
    """A separate M0 image (``_m0scan.nii[.gz]``) and its merged sidecar metadata."""

    path: Path
    relpath: str
    entities: dict[str, str]
    metadata: Sidecar
    shape: tuple[int, int, int] | None
    n_volumes: int | None


@dataclass(frozen=True)
class AslSeries:
    """One ASL series (``_asl.nii[.gz]``) as found on disk; no image data is loaded.

    Attributes
    ----------
    path : the NIfTI file (absolute).
    bids_dir : the dataset root (absolute).
    relpath : its path relative to the dataset root (POSIX), used in messages.
    entities : entities parsed from the file name, in file-name order.
    metadata : merged sidecar metadata (:class:`Sidecar`, inheritance principle).
    aslcontext : the applicable ``_aslcontext.tsv`` (None if none was found).
    volume_types : its ``volume_type`` column, one entry per volume (empty if unreadable).
    shape : spatial shape from the header (None if unreadable).
    n_volumes : number of volumes from the header (None if unreadable).
    m0scan : the separate M0 image when M0Type is Separate (None otherwise or if not found).
    problems : input problems met while reading (files missing or unreadable).
    """

    path: Path
    bids_dir: Path
    relpath: str
    entities: dict[str, str]
    metadata: Sidecar
    aslcontext: Path | None
    volume_types: tuple[str, ...]
    shape: tuple[int, int, int] | None
    n_volumes: int | None
    m0scan: M0Scan | None
    problems: tuple[BidsError, ...] = ()

    @property
    def name(self) -> str:
        """The file name without ``_asl.nii[.gz]``: the source name of a series processed alone."""
        stem = _strip_extension(self.path.name)
        return stem[: -len("_asl")] if stem.endswith("_asl") else stem

    @property
    def subject(self) -> str:
        """Subject label (without ``sub-``)."""
        return Path(self.relpath).parts[0][len("sub-"):]

    @property
    def session(self) -> str | None:
        """Session label (without ``ses-``), or None."""
        folder = Path(self.relpath).parts[1]
        return folder[len("ses-"):] if folder.startswith("ses-") else None


@dataclass(frozen=True)
class Session:
    """The ASL series of one subject and session (``session`` None when the dataset has none)."""

    subject: str
    session: str | None
    series: tuple[AslSeries, ...]

    @property
    def name(self) -> str:
        """``sub-<subject>[_ses-<session>]``."""
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session is not None else "")


def _same_phase_encoding(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    direction = a.get("PhaseEncodingDirection")
    return direction is not None and direction == b.get("PhaseEncodingDirection")


def _find_m0scan(
    asl_path: Path, root: Path, entities: Mapping[str, str], meta: Sidecar, cache: dict[Path, Any]
) -> tuple[M0Scan | None, list[BidsError]]:
    """The M0 image for a series: the ``_m0scan`` with the same entities in the same folder,
    else the one whose IntendedFor names the series (ranked by shared entities, then by
    PhaseEncodingDirection equal to the series'). Returns it (or None) and the problems met."""
    relpath = _rel(asl_path, root)
    subject = Path(relpath).parts[0][len("sub-"):]
    candidates = sorted(
        path for extension in NIFTI_EXTENSIONS for path in asl_path.parent.glob(f"*_m0scan{extension}") if path.is_file()
    )
    problems: list[BidsError] = []
    named: list[tuple[M0Scan, list[BidsError]]] = []
    exact = None
    for path in candidates:
        try:
            m0_entities, _, _ = parse_filename(path.name)
        except BidsError:
            continue
        m0_meta, m0_problems = _read_sidecar(path, root, m0_entities, "m0scan", cache)
        m0 = M0Scan(path, _rel(path, root), m0_entities, m0_meta, None, None)
        if m0_entities == dict(entities):
            exact = (m0, m0_problems)
            break
        try:
            targets = intended_for(m0_meta, subject)
        except BidsError as exc:
            m0_problems.append(exc)
            targets = []
        if relpath in targets:
            named.append((m0, m0_problems))
        problems.extend(m0_problems)
    if exact is None and named:
        def rank(item: tuple[M0Scan, list[BidsError]]) -> tuple[int, bool]:
            m0 = item[0]
            shared = sum(entities.get(key) == label for key, label in m0.entities.items())
            return shared, _same_phase_encoding(m0.metadata, meta)

        named.sort(key=rank, reverse=True)
        if len(named) > 1 and rank(named[0]) == rank(named[1]):
            names = ", ".join(m0.relpath for m0, _ in named)
            return None, [BidsError(
                f"IntendedFor of several m0scan files names this series ({names}) and nothing tells "
                "which is its M0; name it in only one of them",
                path=relpath, field="IntendedFor",
            )]
        exact = named[0]
    if exact is None:
        return None, problems
    m0, m0_problems = exact
    shape = n_volumes = None
    try:
        shape, n_volumes = read_nifti_shape(m0.path, m0.relpath)
    except BidsError as exc:
        m0_problems = [*m0_problems, exc]
    return M0Scan(m0.path, m0.relpath, m0.entities, m0.metadata, shape, n_volumes), m0_problems


def read_series(bids_dir: str | Path, path: str | Path, *, cache: dict[Path, Any] | None = None) -> AslSeries:
    """Read one ASL series: entities, merged sidecar, aslcontext, header shape and M0 scan.

    Never raises for input problems: they are kept in ``AslSeries.problems``
    (:func:`validate_series` adds the metadata checks). ``cache`` shares parsed
    JSON files between calls.
    """
    # absolute but not resolved: a subject folder may be a symlink (followed for reading);
    # membership of the dataset is judged on the path as found in it
    root = Path(os.path.abspath(bids_dir))
    path = Path(os.path.abspath(path))
    cache = {} if cache is None else cache
    if not path.is_relative_to(root):
        raise BidsError(f"{path} is not inside the dataset {root}", field="path")
    relpath = _rel(path, root)
    problems: list[BidsError] = []
    try:
        entities, _, _ = parse_filename(path.name)
    except BidsError as exc:
        problems.append(BidsError(exc.message, path=relpath, field=exc.field))
        entities = {}
    folders = Path(relpath).parts[:-2]
    for folder in folders:
        key, _, label = folder.partition("-")
        if entities and entities.get(key) != label:
            problems.append(BidsError(
                f"the {key} entity ({entities.get(key)!r}) does not match the folder {folder}",
                path=relpath, field="file name",
            ))

    metadata, json_problems = _read_sidecar(path, root, entities, "asl", cache)
    problems.extend(json_problems)

    context_files = _applicable(path, root, entities, "aslcontext", ".tsv")
    aslcontext = context_files[-1] if context_files else None
    volume_types: tuple[str, ...] = ()
    if aslcontext is None:
        expected = _rel(path.parent / (_strip_extension(path.name)[: -len("asl")] + "aslcontext.tsv"), root)
        problems.append(BidsError(
            f"no aslcontext.tsv applies to this series (expected {expected}): the volume types are unknown",
            path=relpath, field="aslcontext",
        ))
    else:
        try:
            volume_types = read_aslcontext(aslcontext, _rel(aslcontext, root))
        except BidsError as exc:
            problems.append(exc)

    shape = n_volumes = None
    try:
        shape, n_volumes = read_nifti_shape(path, relpath)
    except BidsError as exc:
        problems.append(exc)

    m0scan = None
    try:
        separate = m0_type(metadata, allow_absent=True) == "Separate"
    except BidsError:
        separate = False  # validate_series reports the M0Type problem
    if separate:
        m0scan, m0_problems = _find_m0scan(path, root, entities, metadata, cache)
        problems.extend(m0_problems)
        if m0scan is None and not any(p.field == "IntendedFor" and p.path == relpath for p in m0_problems):
            expected = _rel(path.parent / (_strip_extension(path.name)[: -len("asl")] + "m0scan.nii.gz"), root)
            problems.append(_error(
                metadata, "M0Type",
                f"M0Type is Separate but no m0scan was found for {relpath}: expected {expected} "
                "or an m0scan whose IntendedFor names the series",
            ))
    return AslSeries(
        path, root, relpath, entities, metadata, aslcontext, volume_types, shape, n_volumes, m0scan, tuple(problems)
    )


def _asl_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        path for path in folder.iterdir()
        if not path.name.startswith(".") and path.name.endswith(tuple("_asl" + ext for ext in NIFTI_EXTENSIONS))
    )


def find_sessions(bids_dir: str | Path, participant_labels: Sequence[str] | None = None) -> list[Session]:
    """Every subject/session with ASL series, sorted by subject then session.

    Finds ``sub-<label>[/ses-<label>]/perf/*_asl.nii[.gz]``; series are sorted by
    file name. ``participant_labels`` (with or without ``sub-``) restricts the
    subjects; a label not in the dataset raises BidsError. Input problems of a
    series do not raise: they are in ``AslSeries.problems``.
    """
    root = Path(os.path.abspath(bids_dir))
    if not root.is_dir():
        raise BidsError(f"BIDS dataset folder {bids_dir} does not exist", field="bids_dir")
    subjects = sorted(path for path in root.glob("sub-*") if path.is_dir())
    if participant_labels is not None:
        wanted = [label[len("sub-"):] if label.startswith("sub-") else label for label in participant_labels]
        present = {path.name[len("sub-"):] for path in subjects}
        missing = [label for label in wanted if label not in present]
        if missing:
            raise BidsError(f"participant label(s) {missing} not found in {bids_dir}", field="participant_label")
        subjects = [path for path in subjects if path.name[len("sub-"):] in wanted]
    cache: dict[Path, Any] = {}
    sessions = []
    for subject_dir in subjects:
        folders = [(None, subject_dir / "perf")] + [
            (path.name[len("ses-"):], path / "perf") for path in sorted(subject_dir.glob("ses-*")) if path.is_dir()
        ]
        for session, folder in folders:
            files = _asl_files(folder)
            if files:
                series = tuple(read_series(root, path, cache=cache) for path in files)
                sessions.append(Session(subject_dir.name[len("sub-"):], session, series))
    return sessions


# --- validation ---------------------------------------------------------------------------


def m0_repetition_time(series: AslSeries) -> float | None:
    """RepetitionTimePreparation (s) of the M0 volumes, None for M0Type Estimate.

    Separate: from the m0scan's sidecar; Included: at the m0scan volumes of the
    series. The M0 volumes must share one value.
    """
    kind = m0_type(series.metadata)
    if kind == "Estimate":
        return None
    if kind == "Separate":
        if series.m0scan is None:
            raise _error(series.metadata, "M0Type", "M0Type is Separate but the series has no m0scan")
        meta, n = series.m0scan.metadata, series.m0scan.n_volumes or 1
        values = repetition_time_preparation(meta, n)
    else:
        meta = series.metadata
        index = [i for i, volume in enumerate(series.volume_types) if volume == "m0scan"]
        if not index:
            raise _error(
                meta, "M0Type", f"M0Type is Included but the aslcontext of {series.relpath} lists no m0scan volume"
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


def validate_series(
    series: AslSeries,
    *,
    overrides: Mapping[str, Any] | None = None,
    background_suppression_correction: bool = False,
) -> list[BidsError]:
    """Every problem of one series, by running each metadata reader the pipeline uses.

    Besides the reading problems: required fields, per-volume lengths, units,
    aslcontext rows == NIfTI volumes, as many control as label volumes, τ > 0 on
    labeled volumes, the M0 by M0Type, slice timing and the constants.
    """
    problems = list(series.problems)
    meta, n = series.metadata, series.n_volumes

    def attempt(function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except BidsError as exc:
            problems.append(exc)
            return None

    attempt(labeling_type, meta)
    kind = attempt(m0_type, meta)
    attempt(vascular_crushing, meta)
    attempt(magnetic_field_strength, meta)
    # ProtocolError (invalid overrides: the user's settings, not the data) propagates
    attempt(constants_from_metadata, meta, overrides, background_suppression_correction=background_suppression_correction)

    if n is not None:
        attempt(post_labeling_delays, meta, n)
        tau = attempt(labeling_durations, meta, n)
        attempt(repetition_time_preparation, meta, n)
        axis = attempt(slice_axis, meta)
        if axis is not None and series.shape is not None:
            attempt(slice_offsets, meta, series.shape[axis])
        types = series.volume_types
        context = _rel(series.aslcontext, series.bids_dir) if series.aslcontext else None
        if types and len(types) != n:
            problems.append(BidsError(
                f"volume_type has {len(types)} rows but {series.relpath} has {n} volumes",
                path=context, field="volume_type",
            ))
        elif types:
            problems.extend(_check_volume_types(series, tau, context))
            if kind == "Included":
                attempt(m0_repetition_time, series)

    if kind == "Separate" and series.m0scan is not None and series.m0scan.n_volumes is not None:
        attempt(m0_repetition_time, series)
    if kind == "Estimate":
        attempt(m0_estimate, meta)
    return _unique(problems)


def _check_volume_types(series: AslSeries, tau: np.ndarray | None, context: str | None) -> list[BidsError]:
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


def validate_session(
    session: Session,
    *,
    model: str = "auto",
    overrides: Mapping[str, Any] | None = None,
    background_suppression_correction: bool = False,
) -> list[BidsError]:
    """Every problem of a session's series, plus those of grouping them for ``model``."""
    problems: list[BidsError] = []
    for series in session.series:
        problems.extend(validate_series(
            series, overrides=overrides, background_suppression_correction=background_suppression_correction
        ))
    names = [series.name for series in session.series]
    for series in session.series:
        if names.count(series.name) > 1:
            problems.append(BidsError(
                f"{series.name} exists both as .nii and .nii.gz; keep one", path=series.relpath, field="file name"
            ))
    if model == "2c":
        problems.extend(reason for _, reason in _pairing(session.series)[1] if reason is not None)
    return _unique(problems)


def validate_dataset(
    bids_dir: str | Path,
    participant_labels: Sequence[str] | None = None,
    *,
    model: str = "auto",
    overrides: Mapping[str, Any] | None = None,
    background_suppression_correction: bool = False,
) -> list[BidsError]:
    """Every input problem in a dataset (empty when it is ready to process).

    Collects, without stopping at the first: a missing folder or participant,
    no ASL series, unreadable JSON, missing or inconsistent aslcontext, missing
    required fields, per-volume lengths and units, the M0 by M0Type (including a
    missing m0scan for Separate), and, with ``model="2c"``, series left unpaired.
    ``overrides`` and ``background_suppression_correction`` are those of
    :func:`constants_from_metadata`.
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    try:
        sessions = find_sessions(bids_dir, participant_labels)
    except BidsError as exc:
        return [exc]
    if not sessions:
        return [BidsError(
            "no ASL series found (expected sub-<label>[/ses-<label>]/perf/*_asl.nii[.gz])",
            path=str(bids_dir), field="asl",
        )]
    problems: list[BidsError] = []
    for session in sessions:
        problems.extend(validate_session(
            session, model=model, overrides=overrides,
            background_suppression_correction=background_suppression_correction,
        ))
    return _unique(problems)


# --- grouping -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Acquisition:
    """Series fitted together with one model.

    ``series``: one series (model ``"1c"``) or a non-crushed + crushed pair, in that
    order (model ``"2c"``); ``source_name``: the base of output names (a series'
    file name without ``_asl.nii[.gz]``; for a pair, the entities both share).
    """

    series: tuple[AslSeries, ...]
    model: str
    source_name: str

    @property
    def subject(self) -> str:
        return self.series[0].subject

    @property
    def session(self) -> str | None:
        return self.series[0].session


def _pairing(
    series: Sequence[AslSeries],
) -> tuple[list[tuple[AslSeries, AslSeries]], list[tuple[AslSeries, BidsError | None]]]:
    """Pairs (non-crushed, crushed) of series that differ only in acq and crushing, same shape;
    the other series, each with the reason it has no pair (None when its VascularCrushing is unreadable)."""
    groups: dict[Any, list[AslSeries]] = {}
    for item in series:
        key = (tuple((k, v) for k, v in item.entities.items() if k != "acq"), item.shape)
        groups.setdefault(key, []).append(item)
    pairs, alone = [], []
    for members in groups.values():
        try:
            flags = [vascular_crushing(item.metadata) for item in members]
        except BidsError:
            alone.extend((item, None) for item in members)
            continue
        if len(members) == 2 and sorted(flags) == [False, True] and members[0].shape is not None:
            plain, crushed = (members[0], members[1]) if not flags[0] else (members[1], members[0])
            pairs.append((plain, crushed))
            continue
        for item in members:
            if len(members) == 1:
                why = ("no other series of the session differs from it only in acq and VascularCrushing "
                       "with the same image shape")
            elif len(members) == 2:
                why = f"both it and {[m for m in members if m is not item][0].relpath} have VascularCrushing {flags[0]}"
            else:
                names = ", ".join(m.name for m in members)
                why = f"{len(members)} series differ only in acq ({names}): the pair is ambiguous"
            alone.append((item, BidsError(
                f"model 2c needs a non-crushed + crushed pair of series: {why}", path=item.relpath, field="VascularCrushing"
            )))
    return pairs, alone


def _shared_name(plain: AslSeries, crushed: AslSeries) -> str:
    return "_".join(f"{k}-{v}" for k, v in plain.entities.items() if crushed.entities.get(k) == v)


def group_acquisitions(session: Session, model: str = "auto") -> list[Acquisition]:
    """The acquisitions of a session, sorted by source name.

    ``"auto"``: two series that differ only in vascular crushing (same entities
    except acq, VascularCrushing true in one and false in the other, same spatial
    shape) form one two-compartment (``"2c"``) acquisition; every other series is
    its own ``"1c"`` acquisition. ``"1c"``: every series alone. ``"2c"``: every
    series must be in such a pair, else BidsError.
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if model == "1c":
        acquisitions = [Acquisition((item,), "1c", item.name) for item in session.series]
    else:
        pairs, alone = _pairing(session.series)
        if model == "2c" and alone:
            item, reason = alone[0]
            raise reason or BidsError(
                "model 2c needs VascularCrushing to pair the series", path=item.relpath, field="VascularCrushing"
            )
        acquisitions = [Acquisition(pair, "2c", _shared_name(*pair)) for pair in pairs]
        acquisitions += [Acquisition((item,), "1c", item.name) for item, _ in alone]
    return sorted(acquisitions, key=lambda acquisition: acquisition.source_name)
