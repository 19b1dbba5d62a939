"""Which kinetic model each acquisition gets: the pipeline's decision, not the BIDS reader's.

:func:`aslbatch.bids.pair_series` says which series of a session belong together (a
non-crushed series and its crushed twin); :func:`group_acquisitions` groups a session's
series so, each with a provisional model from its crushing (:func:`choose_model`);
:func:`decide` then makes the decision from the checked metadata, before any fit: the
model whose parameters the protocol determines (and only those), or a refusal with the
reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .bids.layout import Acquisition, AslSeries, Session, pair_series
from .bids.metadata import BidsError, vascular_crushing

__all__ = ["ARTERIAL_ARRIVAL_MAX_S", "Decision", "TIME_DECIMALS", "choose_model", "decide", "group_acquisitions", "readout_times"]

#: volume types whose timing the kinetic models use
_TIMED_TYPES = ("control", "label", "deltam")
#: times (s) are compared rounded to this many decimals (as repeats are averaged)
TIME_DECIMALS = 6
#: the latest arterial arrival (abat, s) of the two-compartment model's prior, the upper end of its
#: training range (a test holds the two equal; written here so that deciding imports no kernel)
ARTERIAL_ARRIVAL_MAX_S = 1.5


def _check_requested(requested: str) -> None:
    from .models import MODELS

    if requested != "auto" and requested not in MODELS:
        raise ValueError(f"model must be auto or one of {list(MODELS)}, got {requested!r}")


def choose_model(crushed: Sequence[bool] | np.ndarray, requested: str = "auto") -> str:
    """The model an acquisition's crushing suggests: ``"2c"`` or ``"1c"`` (provisional:
    :func:`decide` makes the decision from the whole protocol).

    ``crushed``: the VascularCrushing of each volume (``Protocol.crushed``) or of each
    series of the acquisition. ``requested``: ``"auto"`` gives ``"2c"`` when both
    crushed and non-crushed volumes are present (the two-compartment model needs the
    crushed volumes to separate the arterial signal) and ``"1c"`` otherwise; a model
    name is taken as asked, and ``"2c"`` without both kinds raises ValueError.
    """
    _check_requested(requested)
    flags = np.asarray(crushed, dtype=bool)
    both = bool(flags.any() and not flags.all())
    if requested == "2c" and not both:
        raise ValueError("model 2c needs crushed and non-crushed volumes in one acquisition")
    if requested == "auto":
        return "2c" if both else "1c"
    return requested


@dataclass(frozen=True)
class Decision:
    """What an acquisition's protocol determines, decided before any fit (:func:`decide`).

    model : the registry name of the kinetic model fitted (:data:`aslbatch.models.MODELS`).
    options : the model's options that follow from the protocol (e.g. ``labeling`` "pasl").
    reason : why, in words: the readout times, the crushing, what is estimated, the assumptions.
    """

    model: str
    options: Mapping[str, Any]
    reason: str

    @property
    def parameters(self) -> tuple[str, ...]:
        """The parameters estimated: the model's, only those the protocol determines (this imports
        the model's module, and with it numba: ``validate`` reports the reason instead)."""
        from .models import MODELS

        return MODELS[self.model].param_names

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (sidecars and provenance)."""
        return {"model": self.model, "options": dict(self.options), "parameters": list(self.parameters),
                "reason": self.reason}


def readout_times(record) -> np.ndarray:
    """The readout time of every label, control or ΔM volume of a series (s, rounded to
    :data:`TIME_DECIMALS`): TI (``pld``) for PASL, τ + PLD for (P)CASL."""
    timed = np.array([kind in _TIMED_TYPES for kind in record.volume_types], dtype=bool)
    times = record.pld if record.labeling_type == "PASL" else record.label_duration + record.pld
    return np.round(np.asarray(times, dtype=np.float64)[timed], TIME_DECIMALS)


def _seconds(values: Iterable[float]) -> str:
    return ", ".join(f"{v:g}" for v in sorted(set(values))) + " s"


def decide(acquisition: Acquisition, records: Sequence, requested: str = "auto") -> Decision:
    """The model and parameters the acquisition's protocol determines, or a BidsError saying why none.

    ``records``: the :class:`~aslbatch.bids.SeriesMetadata` of each series of the acquisition;
    ``requested``: ``"auto"`` or a model name the user asked for (refused, with the reason, when
    the protocol cannot determine its parameters). The rules (ASL_MODELS.md, "What a protocol can
    determine"):

    - one readout time over all label/control/ΔM volumes (one PLD, or one TI for PASL, however
      many pairs; also several (τ, PLD) read at the same time): CBF only, by the white-paper
      formula, the bolus assumed delivered (model ``single``); without an M0 (M0Type Absent with
      background suppression) CBF relative to its brain median and ΔM (model ``relative``), and
      a time course without an M0 is refused;
    - PASL with two or more TIs: ``pasl`` (cbf, att);
    - crushed and non-crushed volumes, with a non-crushed PLD shorter than the latest arterial
      arrival of the 2C model's prior (the upper end of its abat training range): ``2c``; without one the arterial signal is
      never sampled, aCBV and abat are not determined, and the tissue model ``1c`` is fitted to
      every volume (its crushed and late non-crushed volumes hold tissue signal only);
    - otherwise ``1c`` (cbf, att).
    """
    _check_requested(requested)
    where = acquisition.series[0].relpath
    labelings = {record.labeling_type for record in records}
    if len(labelings) > 1:
        raise BidsError(f"its series mix labeling schemes {sorted(labelings)}; one acquisition has one",
                        path=where, field="ArterialSpinLabelingType")
    pulsed = labelings == {"PASL"}
    times = np.concatenate([readout_times(record) for record in records])
    if times.size == 0:
        raise BidsError("no label, control or deltam volume to quantify", path=where, field="aslcontext")
    distinct = np.unique(times)
    without_m0 = [series.relpath for series, record in zip(acquisition.series, records) if not record.has_m0]
    if without_m0 and distinct.size > 1:
        raise BidsError(
            f"M0Type is Absent and the series is background suppressed: there is no M0 to scale ΔM to ΔM/M0t, and "
            f"with {distinct.size} readout times ({_seconds(distinct)}) aslbatch does not fit a time course without "
            "it (its estimators' priors are in absolute CBF); add the M0 scan (M0Type Separate or Included) or a "
            "value (M0Type Estimate with M0Estimate)", path=without_m0[0], field="M0Type")
    if distinct.size == 1:
        chosen, options = "relative" if without_m0 else "single", {"labeling": "pasl" if pulsed else "pcasl"}
        record = next(r for r in records if readout_times(r).size)
        first = next(i for i, k in enumerate(record.volume_types) if k in _TIMED_TYPES)
        if pulsed:
            timing = f"every label/control volume is read at TI {record.pld[first]:g} s"
            assumption = f"the whole {record.label_duration[first]:g} s bolus arrived before the TI"
        else:
            timing = (f"every label/control volume is read at one time (PLD {record.pld[first]:g} s after a "
                      f"{record.label_duration[first]:g} s label)")
            assumption = "the label arrived before the PLD"
        reason = (f"{timing}, {times.size} volume(s): a single-delay acquisition determines CBF only, "
                  f"under the assumption that {assumption}; estimates cbf by the white-paper formula, no arrival "
                  "time")
        if without_m0:
            reason = (f"{timing}, {times.size} volume(s), and no M0 (M0Type Absent with background suppression: the "
                      "suppressed controls are no M0): CBF is determined up to one unknown factor, under the "
                      f"assumption that {assumption}; estimates rcbf, CBF relative to its brain median by the "
                      "white-paper formula, and deltam, the mean ΔM in scanner units; never absolute CBF")
    elif pulsed:
        chosen, options = "pasl", {}
        reason = f"PASL read at {distinct.size} inversion times ({_seconds(distinct)}): estimates cbf and att"
    else:
        chosen, options, reason = _pcasl_model(records)
    if requested not in ("auto", chosen):
        raise BidsError(
            f"the {requested} model was asked for, but this acquisition's protocol calls for the {chosen} model "
            f"({reason}); refused rather than fitted with a model its data do not fit (use --model auto)",
            path=where, field="model")
    return Decision(chosen, options, reason)


def _pcasl_model(records: Sequence) -> tuple[str, dict[str, Any], str]:
    """(model, options, reason) for (P)CASL read at two or more times."""
    plain, crushed = [], []
    for record in records:
        for kind, pld in zip(record.volume_types, record.pld):
            if kind in _TIMED_TYPES:
                (crushed if record.crushed else plain).append(round(float(pld), TIME_DECIMALS))
    times = np.unique(np.concatenate([readout_times(record) for record in records]))
    if not (plain and crushed):
        return "1c", {}, f"(P)CASL read at {times.size} times (PLDs {_seconds(plain or crushed)}): estimates cbf and att"
    latest_arrival = ARTERIAL_ARRIVAL_MAX_S
    if min(plain) < latest_arrival:
        return "2c", {}, (f"non-crushed PLDs {_seconds(plain)} and crushed PLDs {_seconds(crushed)}: the non-crushed "
                          f"PLDs below {latest_arrival:g} s (the latest arterial arrival of the 2C model's prior) "
                          "sample the arterial signal: estimates cbf, abv, abat and att")
    return "1c", {}, (f"crushed and non-crushed volumes, but no non-crushed PLD below {latest_arrival:g} s (the "
                      f"latest arterial arrival of the 2C model's prior; non-crushed PLDs {_seconds(plain)}): the "
                      "arterial signal is never sampled, so aCBV and the arterial arrival time are not determined; the "
                      "one-compartment model is fitted to every volume: estimates cbf and att")


def _crushing(series: Sequence[AslSeries]) -> list[bool]:
    return [vascular_crushing(item.metadata) for item in series]


def group_acquisitions(session: Session, model: str = "auto") -> list[Acquisition]:
    """The acquisitions of a session, each with its model (:func:`choose_model`), sorted by source name.

    ``"auto"`` and ``"2c"``: two series that differ only in vascular crushing (same
    entities except acq, VascularCrushing true in one and false in the other, same
    spatial shape) form one acquisition; every other series is its own. With ``"2c"``
    every series must be in such a pair, else BidsError (naming why it has none).
    Any other model: every series alone.
    """
    _check_requested(model)
    if model not in ("auto", "2c"):
        groups = [((item,), item.name) for item in session.series]
    else:
        pairs, alone = pair_series(session.series)
        if model == "2c" and alone:
            item, reason = alone[0]
            raise reason or BidsError(
                "model 2c needs VascularCrushing to pair the series", path=item.relpath, field="VascularCrushing"
            )
        groups = [(pair, _shared_name(*pair)) for pair in pairs] + [((item,), item.name) for item, _ in alone]
    acquisitions = []
    for series, name in groups:
        # a series whose VascularCrushing is unreadable is alone and fails validation later
        try:
            flags = _crushing(series)
        except BidsError:
            flags = [False]
        acquisitions.append(Acquisition(series, choose_model(flags, model), name))
    return sorted(acquisitions, key=lambda acquisition: acquisition.source_name)


def _shared_name(plain: AslSeries, crushed: AslSeries) -> str:
    """The entities both series of a pair share: the source name of their outputs."""
    return "_".join(f"{k}-{v}" for k, v in plain.entities.items() if crushed.entities.get(k) == v)
