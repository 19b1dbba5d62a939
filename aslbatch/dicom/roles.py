"""Volume roles of an ASL series (label, control, M0) from the vendor's conventions, checked against the data.

Pure functions of arrays: ``data`` is the series' 4-D image (x, y, z, volumes) as dcm2niix wrote
it, in the scanner's arbitrary units; ``mask`` a boolean brain mask (x, y, z). Each function
returns the roles (one BIDS ``volume_type`` per volume) and the sentences saying what was
taken from a convention, what was decided by the data, or raises :class:`RoleError` with the
reason the data disagree.

Checks (issue 19): ΔM = control − label is positive in the brain (a t statistic over the
pairs' brain means); an M0 volume is brighter than the background-suppressed volumes and is
not a copy of the controls' intensity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "RoleError", "Roles", "brain_means", "check_m0_brighter", "perfusion_t", "philips_roles", "siemens_roles",
]

#: |t| of the pairs' brain-mean ΔM above which its sign is taken as shown (dimensionless)
T_DECISIVE = 3.0
#: a single pair: fraction of brain voxels with ΔM > 0 above which ΔM counts as positive
SINGLE_PAIR_POSITIVE = 0.6
#: a first volume (or dynamic) this many times brighter than the median of the others is unsuppressed (M0-like)
BRIGHT_RATIO = 1.2
#: an M0 must be this many times brighter than the controls; below it, it is not an M0
M0_MIN_RATIO = 1.1


class RoleError(ValueError):
    """The volume roles cannot be established: the data disagree with the convention or show no contrast."""


@dataclass(frozen=True)
class Roles:
    """``volume_types`` (one per volume) and ``notes``: what was conventional, read or decided."""

    volume_types: tuple[str, ...]
    notes: tuple[str, ...]
    decided: bool = False


def brain_means(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of each volume inside the mask (scanner units), float64 (volumes,)."""
    return data[mask].mean(axis=0).astype(np.float64)


def perfusion_t(data: np.ndarray, mask: np.ndarray, pairs: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """(mean brain ΔM, evidence) of control − label over ``pairs`` of (control, label) volume indices.

    Evidence: the t statistic of the pairs' brain-mean ΔM for two or more pairs; for one pair,
    (fraction of brain voxels with ΔM > 0 − 0.5) scaled so that :data:`SINGLE_PAIR_POSITIVE`
    maps to :data:`T_DECISIVE`.
    """
    brain = data[mask]
    diffs = np.array([brain[:, c].mean() - brain[:, l].mean() for c, l in pairs], dtype=np.float64)
    if len(pairs) >= 2:
        spread = diffs.std(ddof=1)
        t = diffs.mean() / (spread / np.sqrt(len(diffs))) if spread > 0 else np.sign(diffs.mean()) * np.inf
    else:
        c, l = pairs[0]
        positive = float((brain[:, c] > brain[:, l]).mean())
        t = (positive - 0.5) / (SINGLE_PAIR_POSITIVE - 0.5) * T_DECISIVE
    return float(diffs.mean()), float(t)


def _verify_order(data, mask, types: list[str], convention: str, recorded: bool = False) -> list[str]:
    """Sentences confirming the roles by ΔM > 0 in the brain; RoleError when the data contradict them.

    ``recorded``: the roles were read from a per-image tag (Philips), not a convention: data
    that neither confirm nor contradict them (|t| < 3, e.g. a global offset of background-suppressed
    pairs) leave them standing, and the sentence says so."""
    pairs = _pairs(types)
    if not pairs:
        raise RoleError("no control/label pair in the series")
    mean, t = perfusion_t(data, mask, pairs)
    if t >= T_DECISIVE:
        return [f"ΔM = control − label is positive in the brain as the {convention} says "
                f"(mean {mean:.4g}, t = {t:.1f} over {len(pairs)} pair(s))"]
    if t <= -T_DECISIVE:
        raise RoleError(
            f"the {convention} gives ΔM = control − label negative in the brain (mean {mean:.4g}, t = {t:.1f} over "
            f"{len(pairs)} pair(s)): the volume order is not the one expected; not imported")
    if recorded:
        return [f"the brain-mean ΔM neither confirms nor contradicts the {convention} (mean {mean:.4g}, t = {t:.1f} "
                f"over {len(pairs)} pair(s)): the roles are the recorded ones"]
    raise RoleError(f"no perfusion contrast between the label and control volumes (t = {t:.1f} over {len(pairs)} "
                    f"pair(s), |t| < {T_DECISIVE:g}): their roles cannot be checked; not imported")


def _pairs(types: Sequence[str]) -> list[tuple[int, int]]:
    controls = [i for i, t in enumerate(types) if t == "control"]
    labels = [i for i, t in enumerate(types) if t == "label"]
    return list(zip(controls, labels))


def _first_is_bright(means: np.ndarray, count: int = 1) -> bool:
    rest = means[count:]
    return rest.size > 0 and float(means[:count].min()) > BRIGHT_RATIO * float(np.median(rest))


def siemens_roles(data: np.ndarray, mask: np.ndarray, sequence: str, m0_included: bool | None) -> Roles:
    """Roles of a Siemens product/WIP ASL series (mosaic, one volume per measurement).

    ``sequence``: the sequence file name (PulseSequenceDetails, e.g. ``ep2d_pasl``, ``tgse_pcasl``);
    ``m0_included``: dcm2niix's M0Type Included (True), else None. Conventions: ep2d (2D EPI)
    PASL acquires label then control, the 3D GRASE sequences (tgse) control then label; a first
    volume is an M0 when dcm2niix says so, or (tgse, which does not say) when the data show it
    brighter than the rest. A trailing unpaired volume is ``n/a``. The order is then verified.
    """
    n = data.shape[3]
    means = brain_means(data, mask)
    notes = []
    name = sequence.lower()
    if "ep2d" in name:
        order, convention = ("label", "control"), "convention of Siemens ep2d ASL (label then control)"
    elif "tgse" in name:
        order, convention = ("control", "label"), "convention of Siemens 3D GRASE ASL (tgse: control then label)"
    else:
        raise RoleError(f"Siemens sequence {sequence!r} is not one whose volume order aslbatch knows "
                        "(ep2d_pasl, ep2d_pcasl, tgse_pasl, tgse_pcasl)")
    decided = False
    bright = _first_is_bright(means)
    if m0_included:
        if not bright:
            raise RoleError(f"dcm2niix says the first volume is an M0 (M0Type Included) but it is not brighter than "
                            f"the others (brain mean {means[0]:.4g} vs median {np.median(means[1:]):.4g})")
        notes.append("volume 0 is the M0 (M0Type Included from the Siemens header, and brighter than the rest: "
                     f"brain mean {means[0]:.4g} vs {np.median(means[1:]):.4g})")
        start = 1
    elif bright:
        notes.append(f"volume 0 decided to be an M0 from the data: brain mean {means[0]:.4g} is "
                     f"{means[0] / np.median(means[1:]):.2f} times the median of the other volumes")
        start, decided = 1, True
    else:
        start = 0
    types = ["m0scan"] * start
    for i in range(start, n):
        types.append(order[(i - start) % 2])
    if (n - start) % 2:
        types[-1] = "n/a"
        notes.append(f"volume {n - 1} ({order[0]}) has no partner and is marked n/a (not used)")
    notes.extend(_verify_order(data, mask, types, convention))
    return Roles(tuple(types), tuple(notes), decided)


def philips_roles(
    data: np.ndarray, mask: np.ndarray, label_types: Sequence[str | None], dynamics: Sequence[int | None],
    background_suppression: bool,
) -> Roles:
    """Roles of a Philips ASL series from each volume's label type (tag 2005,1429) and dynamic.

    ``label_types``: CONTROL / LABEL per volume, or None where the tag is absent (then the
    order is decided by the data: the assignment giving ΔM positive in the brain, and recorded
    as decided). With background suppression, a first dynamic much brighter than the rest
    (Philips 3D pCASL acquires it without suppression) is not a background-suppressed pair:
    its control becomes the M0 (``m0scan``) and its label ``n/a``.
    """
    n = data.shape[3]
    means = brain_means(data, mask)
    notes = []
    decided = False
    if all(t in ("CONTROL", "LABEL") for t in label_types):
        types = [t.lower() for t in label_types]
        convention = "Philips label type (tag 2005,1429)"
        notes.append("label and control from the Philips label type of each image (tag 2005,1429)")
    elif any(label_types):
        raise RoleError("the Philips label type (tag 2005,1429) is missing on some images only")
    else:
        types = None
        convention = ""
    first = [i for i, d in enumerate(dynamics) if d == min(d for d in dynamics if d is not None)] if all(
        d is not None for d in dynamics) else []
    if background_suppression and first and len(first) < n:
        other = np.setdiff1d(np.arange(n), first)
        ratio = means[first].min() / np.median(means[other])
        if ratio > BRIGHT_RATIO:
            if types is None:
                raise RoleError("the first dynamic is unsuppressed but the label type tag is missing: "
                                "which of its volumes is the control cannot be read")
            for i in first:
                types[i] = "m0scan" if types[i] == "control" else "n/a"
            notes.append(f"dynamic {dynamics[first[0]]} is {ratio:.2f} times brighter than the background-suppressed "
                         "dynamics (acquired without suppression): its control is used as the M0, its label is n/a")
    if types is None:
        tried = []
        for order in (("control", "label"), ("label", "control")):
            candidate = [order[i % 2] for i in range(n)]
            if n % 2:
                candidate[-1] = "n/a"
            mean, t = perfusion_t(data, mask, _pairs(candidate))
            tried.append((t, candidate, order))
        t, types, order = max(tried, key=lambda item: item[0])
        if t < T_DECISIVE:
            raise RoleError(f"the label type is not recorded and neither order gives ΔM positive in the brain "
                            f"(best t = {t:.1f})")
        notes.append(f"the label type is not recorded: the order {order[0]} then {order[1]} was decided from the data "
                     f"(ΔM positive in the brain, t = {t:.1f})")
        decided = True
    else:
        notes.extend(_verify_order(data, mask, types, convention, recorded=True))
    return Roles(tuple(types), tuple(notes), decided)


def check_m0_brighter(m0_means: np.ndarray, control_mean: float, background_suppression: bool | None) -> str:
    """Refuse (RoleError) an M0 whose brain mean is not brighter than the controls'; else say how much brighter.

    ``m0_means``: brain means of the claimed M0 volumes; ``control_mean``: brain mean of the
    controls (same units). A claimed M0 matching the controls' intensity is another
    label/control image, not an M0.
    """
    ratio = float(np.min(m0_means)) / control_mean
    if ratio < M0_MIN_RATIO:
        suppressed = " background-suppressed" if background_suppression else ""
        raise RoleError(
            f"the claimed M0 is not an M0: its brain mean ({', '.join(f'{m:.4g}' for m in m0_means)}) matches the"
            f"{suppressed} controls' ({control_mean:.4g}, ratio {ratio:.2f} < {M0_MIN_RATIO:g})")
    return f"M0 brain mean is {ratio:.2f} times the controls'"


def scanner_correlation(data: np.ndarray, types: Sequence[str], reference: np.ndarray, mask: np.ndarray) -> float:
    """Pearson r, in the brain, between aslbatch's ΔM (mean control − mean label) and a scanner-made
    difference image (same grid). The scanner's image is clipped at 0 (Philips writes negative ΔM as 0),
    so ΔM is clipped alike before the comparison."""
    controls = [i for i, t in enumerate(types) if t == "control"]
    labels = [i for i, t in enumerate(types) if t == "label"]
    deltam = data[..., controls].mean(axis=3) - data[..., labels].mean(axis=3)
    if (reference >= 0).all():
        deltam = np.clip(deltam, 0.0, None)
    return float(np.corrcoef(deltam[mask], reference[mask])[0, 1])
