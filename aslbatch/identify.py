"""Which kinetic model each acquisition gets: the pipeline's decision, not the BIDS reader's.

:func:`aslbatch.bids.pair_series` says which series of a session belong together (a
non-crushed series and its crushed twin); :func:`choose_model` decides, from the
crushing of the volumes the acquisition holds and the model the user asked for, which
model is fitted; :func:`group_acquisitions` applies both to a session.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .bids.layout import MODELS, Acquisition, AslSeries, Session, pair_series
from .bids.metadata import BidsError, vascular_crushing

__all__ = ["choose_model", "group_acquisitions", "undetermined_reason"]

#: volume types whose timing the kinetic models use
_TIMED_TYPES = ("control", "label", "deltam")


def choose_model(crushed: Sequence[bool] | np.ndarray, requested: str = "auto") -> str:
    """The kinetic model to fit to an acquisition: ``"1c"`` or ``"2c"``.

    ``crushed``: the VascularCrushing of each volume (``Protocol.crushed``) or of each
    series of the acquisition. ``requested``: ``"auto"`` gives ``"2c"`` when both
    crushed and non-crushed volumes are present (the two-compartment model needs the
    crushed volumes to separate the arterial signal) and ``"1c"`` otherwise; ``"1c"``
    and ``"2c"`` are taken as asked, and ``"2c"`` without both kinds raises ValueError.
    """
    if requested not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {requested!r}")
    flags = np.asarray(crushed, dtype=bool)
    both = bool(flags.any() and not flags.all())
    if requested == "2c" and not both:
        raise ValueError("model 2c needs crushed and non-crushed volumes in one acquisition")
    if requested == "auto":
        return "2c" if both else "1c"
    return requested


def undetermined_reason(acquisition: Acquisition, records: Sequence) -> str | None:
    """Why the acquisition's protocol cannot determine what every model fits, or None.

    ``records``: the :class:`~aslbatch.bids.SeriesMetadata` of each series of the acquisition.
    Every kinetic model estimates an arrival time beside CBF, which needs at least two
    readout times (τ + PLD) over the label, control and ΔM volumes of all its series; with one,
    only CBF is determined (assuming the label arrived before the PLD), and a fit would report
    an arbitrary arrival time, and a CBF scaled by it, as converged.
    """
    times = set()
    for record in records:
        for kind, tau, pld in zip(record.volume_types, record.label_duration, record.pld):
            if kind in _TIMED_TYPES:
                times.add(round(float(tau) + float(pld), 6))
    if len(times) != 1:
        return None
    record = next(r for r in records if any(k in _TIMED_TYPES for k in r.volume_types))
    first = next(i for i, k in enumerate(record.volume_types) if k in _TIMED_TYPES)
    return (f"{acquisition.source_name}: every label/control volume is read at one time (PLD "
            f"{record.pld[first]:g} s after a {record.label_duration[first]:g} s label): a single-delay "
            "acquisition determines CBF only, under the assumption that the label arrived before the PLD, "
            "not the arrival time every kinetic model of aslbatch fits beside it; refused rather than "
            "quantified wrongly (single-delay white-paper quantification is not in this version)")


def _crushing(series: Sequence[AslSeries]) -> list[bool]:
    return [vascular_crushing(item.metadata) for item in series]


def group_acquisitions(session: Session, model: str = "auto") -> list[Acquisition]:
    """The acquisitions of a session, each with its model (:func:`choose_model`), sorted by source name.

    ``"auto"`` and ``"2c"``: two series that differ only in vascular crushing (same
    entities except acq, VascularCrushing true in one and false in the other, same
    spatial shape) form one acquisition; every other series is its own. With ``"2c"``
    every series must be in such a pair, else BidsError (naming why it has none).
    ``"1c"``: every series alone.
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if model == "1c":
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
