"""BIDS ASL metadata: small pure functions of a sidecar dict, one per field.

Each reader takes the merged sidecar metadata of one series (a :class:`Sidecar`, or any
mapping) and returns one checked value, or raises a :class:`BidsError` that names the
file that set the field and the field itself (ASLPrep's habit, ``utils/asl.py``):
per-volume timing (:func:`post_labeling_delays`, :func:`label_durations`: the
LabelingDuration of (P)CASL or the bolus duration of PASL, :func:`repetition_time_preparation`),
the labeling and M0 kinds, vascular crushing, slice timing (:func:`slice_offsets`), background
suppression (:func:`background_suppression`, and what the outputs say of it:
:func:`background_suppression_summary`) and the model constants
(:func:`constants_from_metadata`). Nothing here touches the file system.

Units: every time is in seconds (BIDS convention); values above
:data:`aslbatch.protocol.MAX_TIME_S` (10 s) in a PLD, label duration or slice
time are taken for milliseconds and refused. Field strength is in tesla.
"""

from __future__ import annotations

import math
import posixpath
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..protocol import MAX_TIME_S, Constants, ProtocolError

__all__ = [
    "ASL_VOLUME_TYPES",
    "BackgroundSuppression",
    "BidsError",
    "M0_TYPES",
    "Sidecar",
    "VOLUME_TYPES",
    "background_suppression",
    "background_suppression_factor",
    "background_suppression_summary",
    "blood_t1",
    "bolus_duration",
    "constants_from_metadata",
    "intended_for",
    "label_durations",
    "labeling_durations",
    "labeling_efficiency",
    "labeling_type",
    "m0_estimate",
    "m0_from_controls",
    "m0_type",
    "magnetic_field_strength",
    "post_labeling_delays",
    "repetition_time_preparation",
    "slice_axis",
    "slice_offsets",
    "vascular_crushing",
]


#: the values BIDS allows in the ``volume_type`` column of ``_aslcontext.tsv``
VOLUME_TYPES = ("control", "label", "m0scan", "deltam", "cbf", "noRF", "n/a")
#: volume types acquired after labeling (or its control): they need a label duration > 0
ASL_VOLUME_TYPES = ("control", "label", "deltam", "cbf")
#: the values of the ``M0Type`` field
M0_TYPES = ("Separate", "Included", "Estimate", "Absent")
#: labeling schemes the kinetic models describe: a bolus of duration LabelingDuration ((P)CASL)
#: or, for PASL, a bolus cut to a known duration by QUIPSS II / Q2TIPS
SUPPORTED_LABELING = ("PCASL", "CASL", "PASL")
#: T1 of arterial blood (s) by field strength (T), ASL_MODELS.md / Alsop 2015
T1B_BY_FIELD = {3.0: 1.65, 1.5: 1.35}
#: a field strength within this many tesla of a key of T1B_BY_FIELD counts as it
#: (Siemens 3 T systems report 2.89 T)
FIELD_TOLERANCE_T = 0.15
#: labeling efficiency α when the sidecar has no LabelingEfficiency (ASLPrep's
#: defaults: PCASL and PASL from Alsop 2015, CASL from Wang 2005)
DEFAULT_LABELING_EFFICIENCY = {"PCASL": 0.85, "CASL": 0.68, "PASL": 0.98}
#: efficiency per background-suppression pulse (the common 0.95 convention)
BS_PULSE_EFFICIENCY = 0.95
#: a RepetitionTimePreparation above this (s) is taken for milliseconds
MAX_TR_S = 100.0


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
    """An int or float (not a bool); an int beyond the float range (JSON allows any) is not."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (
        isinstance(value, float) or abs(value) <= sys.float_info.max)


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
    """PostLabelingDelay per volume (s), float64 (n_volumes,): the delay after the end of the
    labeling for (P)CASL, the inversion time TI (from the labeling pulse to the readout) for PASL.

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


def bolus_duration(meta: Mapping[str, Any], given: float | None = None) -> float:
    """The PASL bolus duration τ_b (s): the first BolusCutOffDelayTime when BolusCutOffFlag is true.

    BIDS: BolusCutOffDelayTime is the time from the labeling pulse to the (first) bolus
    cut-off saturation pulse: one value for QUIPSS II, [first, last] for Q2TIPS; the bolus
    is cut at the first. ``given`` (s, the user's ``--bolus-duration``) wins over the sidecar
    and is the only way to quantify a series without a bolus cut-off (BolusCutOffFlag false),
    whose bolus duration is unknown: such a series is refused with that reason.
    """
    if given is not None:
        return float(given)
    flag = _require(meta, "BolusCutOffFlag", "required by BIDS for PASL")
    if not isinstance(flag, bool):
        raise _error(meta, "BolusCutOffFlag", f"BolusCutOffFlag must be true or false, got {_short(flag)}")
    if not flag:
        raise _error(
            meta, "BolusCutOffFlag",
            "BolusCutOffFlag is false: this PASL series has no bolus cut-off (QUIPSS II or Q2TIPS), so the "
            "duration of its labeled bolus is unknown and CBF cannot be quantified; give it in seconds with "
            "--bolus-duration (or bolus_duration in the config) if it is known",
        )
    value = _require(meta, "BolusCutOffDelayTime", "required by BIDS when BolusCutOffFlag is true")
    values = [value] if _is_number(value) else value
    if not (isinstance(values, list) and values and all(_is_number(v) and math.isfinite(v) for v in values)):
        raise _error(meta, "BolusCutOffDelayTime",
                     f"BolusCutOffDelayTime must be a number or a list of numbers, got {_short(value)}")
    times = _check_seconds(meta, "BolusCutOffDelayTime", np.array(values, dtype=np.float64), unit="pulse")
    if (np.diff(times) < 0).any():
        raise _error(meta, "BolusCutOffDelayTime",
                     f"BolusCutOffDelayTime must increase from the first bolus cut-off pulse to the last, got {values}")
    if not times[0] > 0:
        raise _error(meta, "BolusCutOffDelayTime",
                     f"BolusCutOffDelayTime must start after the labeling (> 0 s), got {values}")
    return float(times[0])


def label_durations(meta: Mapping[str, Any], n_volumes: int, bolus: float | None = None) -> np.ndarray:
    """The label duration τ per volume (s), float64 (n_volumes,), by ArterialSpinLabelingType:
    LabelingDuration for (P)CASL (:func:`labeling_durations`), the bolus duration τ_b for PASL
    (:func:`bolus_duration`; ``bolus``, s, the user's value, wins) on every volume."""
    if labeling_type(meta) == "PASL":
        return np.full(n_volumes, bolus_duration(meta, bolus))
    return labeling_durations(meta, n_volumes)


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
    """ArterialSpinLabelingType as ``"PCASL"``, ``"CASL"`` or ``"PASL"``; others are refused."""
    value = _require(meta, "ArterialSpinLabelingType")
    name = value.upper() if isinstance(value, str) else value
    if name not in SUPPORTED_LABELING:
        raise _error(
            meta, "ArterialSpinLabelingType",
            f"ArterialSpinLabelingType must be PCASL, CASL or PASL, got {_short(value)}",
        )
    return name


def m0_type(meta: Mapping[str, Any]) -> str:
    """M0Type as one of ``Separate``, ``Included``, ``Estimate``, ``Absent`` (case-insensitive).

    ``Absent`` has two consequences, both decided later from the checked metadata: without
    background suppression the mean control image serves as M0 (:func:`m0_from_controls`);
    with it there is no M0, and only ΔM and relative CBF can be given (the ``relative`` model
    of :func:`aslbatch.identify.decide`, single-delay acquisitions only).
    """
    value = _require(meta, "M0Type")
    name = {t.lower(): t for t in M0_TYPES}.get(value.lower()) if isinstance(value, str) else None
    if name is None:
        raise _error(meta, "M0Type", f"M0Type must be one of {', '.join(M0_TYPES)}, got {_short(value)}")
    return name


def m0_from_controls(meta: Mapping[str, Any]) -> bool:
    """True when M0Type is Absent and BackgroundSuppression is false: the controls then hold the
    unsuppressed tissue magnetisation and their mean, saturation-recovery corrected, serves as M0
    (ExploreASL's and ASLPrep's practice). With background suppression (or unstated) it does not."""
    value = meta.get("M0Type")
    return isinstance(value, str) and value.lower() == "absent" and meta.get("BackgroundSuppression") is False


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
    """Labeling efficiency α: LabelingEfficiency if given, else 0.85 (PCASL), 0.68 (CASL) or 0.98 (PASL)."""
    if meta.get("LabelingEfficiency") is not None:
        value = _number(meta, "LabelingEfficiency", meta["LabelingEfficiency"])
        if not 0 < value <= 1:
            raise _error(meta, "LabelingEfficiency", f"LabelingEfficiency must be in (0, 1], got {value!r}")
        return value
    return DEFAULT_LABELING_EFFICIENCY[labeling_type(meta)]


@dataclass(frozen=True)
class BackgroundSuppression:
    """Background suppression of a series as its sidecar states it.

    used : BackgroundSuppression (None when the sidecar does not say; BIDS requires it).
    pulses : BackgroundSuppressionNumberPulses (a whole number >= 0), None when not given
        or when ``used`` is not True (BIDS defines it only with background suppression).
    """

    used: bool | None
    pulses: int | None

    def factor(self) -> float | None:
        """α_BS = 0.95 ** pulses with background suppression, 1.0 without; None when unknown."""
        if self.used is False:
            return 1.0
        return BS_PULSE_EFFICIENCY**self.pulses if self.pulses is not None else None


def background_suppression(meta: Mapping[str, Any]) -> BackgroundSuppression:
    """BackgroundSuppression and BackgroundSuppressionNumberPulses of a series (see
    :class:`BackgroundSuppression`); a value of the wrong type raises BidsError."""
    enabled = meta.get("BackgroundSuppression")
    if enabled is not None and not isinstance(enabled, bool):
        raise _error(meta, "BackgroundSuppression", f"BackgroundSuppression must be true or false, got {_short(enabled)}")
    pulses = meta.get("BackgroundSuppressionNumberPulses") if enabled else None
    if pulses is not None and not (isinstance(pulses, int) and not isinstance(pulses, bool) and pulses >= 0):
        raise _error(
            meta, "BackgroundSuppressionNumberPulses",
            f"BackgroundSuppressionNumberPulses must be a whole number >= 0, got {_short(pulses)}",
        )
    return BackgroundSuppression(enabled, pulses)


def background_suppression_factor(meta: Mapping[str, Any]) -> float:
    """α_BS = 0.95 ** BackgroundSuppressionNumberPulses, 1.0 without background suppression.

    Both fields are then required: BackgroundSuppression, and the number of pulses when it is true.
    """
    _require(meta, "BackgroundSuppression")
    found = background_suppression(meta)
    if found.used:
        _require(meta, "BackgroundSuppressionNumberPulses", "needed for the background-suppression correction")
    return found.factor()


def background_suppression_summary(
    states: Sequence[BackgroundSuppression], alpha_bs: float, *, correction: bool, user_factor: bool = False
) -> dict[str, Any]:
    """What an acquisition's outputs say about background suppression (JSON-ready, BIDS-style keys).

    ``states``: each series' :class:`BackgroundSuppression` (empty: not known); ``alpha_bs``:
    the α_BS of the model's Constants; ``correction``: the ``background_suppression_correction``
    setting; ``user_factor``: α_BS was given as the constant ``alpha_bs``. Keys:
    ``BackgroundSuppression`` and ``BackgroundSuppressionNumberPulses`` as the input states them
    (None when not stated; a list, one per series, when the series of a pair differ),
    ``BackgroundSuppressionCorrection`` (α_BS ≠ 1 entered the model), ``BackgroundSuppressionFactor``
    (α_BS, dimensionless: 0.95 ** pulses when the correction is applied, else 1) and
    ``BackgroundSuppressionCorrectionDescription`` (one sentence).
    """
    def common(values: list[Any]) -> Any:
        if not values:
            return None
        return values[0] if all(v == values[0] for v in values) else values

    used = common([state.used for state in states])
    pulses = common([state.pulses for state in states])
    applied = alpha_bs != 1.0
    if applied and user_factor:
        text = f"applied: α_BS = {alpha_bs:.4g}, given as the constant alpha_bs, multiplies the labeling efficiency"
    elif applied:
        text = (f"applied (background_suppression_correction on): α_BS = {BS_PULSE_EFFICIENCY:g}^{pulses} = "
                f"{alpha_bs:.4g} ({BS_PULSE_EFFICIENCY:g} per background-suppression pulse) multiplies the "
                f"labeling efficiency, so CBF is {1 / alpha_bs:.4g} times the uncorrected value")
    elif used is None:
        text = "not applied (α_BS = 1): the input does not state BackgroundSuppression"
    elif used is False:
        text = "not applicable (α_BS = 1): the acquisition used no background suppression"
    else:
        counts = pulses if isinstance(pulses, list) else [pulses]
        would = ", ".join(f"{1 / BS_PULSE_EFFICIENCY ** n:.4g}" for n in counts if n is not None)
        text = ("not applied (background_suppression_correction off, the default): α_BS = 1, the label is "
                "taken as not attenuated by the background-suppression pulses")
        text += (f"; with the correction ({BS_PULSE_EFFICIENCY:g} per pulse, as ASLPrep applies it) CBF would be "
                 f"{would} times this" if would else "; the number of pulses is not stated")
    return {
        "BackgroundSuppression": used,
        "BackgroundSuppressionNumberPulses": pulses,
        "BackgroundSuppressionCorrection": applied,
        "BackgroundSuppressionFactor": float(alpha_bs),
        "BackgroundSuppressionCorrectionDescription": text,
    }


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
