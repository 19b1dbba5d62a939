"""Is an acquisition's result believable? Garbage in must not come out as "done".

Two judgements, both from the prepared signals and the estimates alone (no I/O):

- :func:`unusable_reason`, before any fit: when no brain voxel has a usable ΔM/M0t (NaN or
  infinite in some volume, or zero in every volume: an all-NaN or all-zero series), every
  map would be invalid; the acquisition fails with that reason.
- :func:`judge`, after the fits: an acquisition is done but **flagged** when, for some method,
  more than :data:`MAX_SHARE_AT_BOUND_OR_INVALID` of the brain-mask voxels end at a parameter
  bound or with invalid input, or when the median CBF over the brain lies outside
  :data:`PLAUSIBLE_MEDIAN_CBF`, or when ΔM is negative in over :data:`NEGATIVE_SHARE` of the brain
  (also for maps without CBF, such as relative CBF); the flag names the likely cause: labels and controls swapped
  (ΔM = control − label negative in most brain voxels), M0 scaled wrongly (median CBF
  implausibly high: M0 too small; implausibly low: M0 too large), else the protocol's timing
  or the constants.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .estimators.base import Estimate, Status

__all__ = ["MAX_SHARE_AT_BOUND_OR_INVALID", "NEGATIVE_SHARE", "PLAUSIBLE_MEDIAN_CBF", "Plausibility", "SWAPPED_SHARE",
           "judge", "unusable_reason"]

#: a done acquisition is flagged when more than this share of its brain voxels ends at a bound or
#: invalid, for any method (a good acquisition has a few %: edge voxels, noise at SNR ~2)
MAX_SHARE_AT_BOUND_OR_INVALID = 0.5
#: median CBF over the brain mask (mL/100 g/min) outside which the result is implausible: adult grey
#: and white matter together lie around 20-80; a wrong M0 scaling moves it by its factor
PLAUSIBLE_MEDIAN_CBF = (5.0, 200.0)
#: share of brain voxels (of those with a non-zero mean ΔM/M0t) with a negative mean above which the
#: result is flagged: perfusion makes ΔM positive in the brain, so over half negative is no perfusion signal
NEGATIVE_SHARE = 0.5
#: above this share labels and controls are likely swapped; between NEGATIVE_SHARE and it, ΔM is mostly
#: noise and artefact (no labeling, or an object without perfusion: the Philips QA series is a phantom
#: sphere, 68 % negative)
SWAPPED_SHARE = 0.8

_BAD = (int(Status.AT_BOUND), int(Status.INVALID_INPUT))


def unusable_reason(signals: np.ndarray) -> str | None:
    """Why no voxel of ``signals`` (ΔM/M0t, ``(n_voxels, n_volumes)``) can be fitted, or None
    when some voxel can: a voxel is unusable when a volume is NaN or infinite, or every volume
    is zero (the estimators' INVALID_INPUT)."""
    signals = np.asarray(signals, dtype=np.float64)
    if signals.size == 0:
        return "no brain voxel to fit"
    finite = np.isfinite(signals).all(axis=1)
    nonzero = (signals != 0).any(axis=1)
    if (finite & nonzero).any():
        return None
    if not finite.any():
        return ("every map would be invalid: ΔM/M0t is NaN or infinite in every brain voxel "
                "(an all-NaN series or M0, or NaN volumes)")
    if not nonzero[finite].any():
        return ("every map would be invalid: ΔM = control − label is zero in every brain voxel "
                "(an all-zero or constant series: control and label images identical)")
    return "every map would be invalid: each brain voxel has a NaN, infinite or all-zero ΔM/M0t"


@dataclass(frozen=True)
class Plausibility:
    """The judgement of one acquisition (:func:`judge`).

    flagged : whether the result is implausible (the acquisition is still done).
    share_at_bound_or_invalid : per method, the share (0-1) of brain voxels with status
        AT_BOUND or INVALID_INPUT.
    median_cbf : per method, the median finite CBF over the brain (mL/100 g/min); absent for
        methods without a cbf map.
    negative_share : share (0-1) of the brain voxels with a non-zero mean ΔM/M0t over the volumes
        whose mean is < 0.
    causes : the likely causes, one sentence each (empty when not flagged).
    """

    flagged: bool
    share_at_bound_or_invalid: Mapping[str, float]
    median_cbf: Mapping[str, float]
    negative_share: float
    causes: tuple[str, ...] = field(default_factory=tuple)

    def message(self) -> str:
        """One line: what is implausible and why (empty when not flagged)."""
        return "implausible result: " + "; ".join(self.causes) if self.flagged else ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (as recorded in the provenance's ``plausibility``)."""
        return {"flagged": self.flagged, "message": self.message(),
                "share_at_bound_or_invalid": {k: round(float(v), 4) for k, v in self.share_at_bound_or_invalid.items()},
                "median_cbf": {k: round(float(v), 3) for k, v in self.median_cbf.items()},
                "negative_share": round(float(self.negative_share), 4), "causes": list(self.causes),
                "thresholds": {"max_share_at_bound_or_invalid": MAX_SHARE_AT_BOUND_OR_INVALID,
                               "plausible_median_cbf": list(PLAUSIBLE_MEDIAN_CBF), "negative_share": NEGATIVE_SHARE}}


def judge(signals: np.ndarray, estimates: Mapping[str, Estimate]) -> Plausibility:
    """Judge the fits ``estimates`` (``{method: Estimate}``) of the brain voxels whose ΔM/M0t are
    ``signals`` ``(n_voxels, n_volumes)`` (see the module doc for the rules and thresholds)."""
    signals = np.asarray(signals, dtype=np.float64)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row has no mean: not negative
        mean = np.nanmean(signals, axis=1) if signals.size else np.zeros(0)
    signed = mean[np.isfinite(mean) & (mean != 0)]
    negative_share = float(np.mean(signed < 0)) if signed.size else 0.0
    shares, medians = {}, {}
    for method, estimate in estimates.items():
        status = np.asarray(estimate.status)
        shares[method] = float(np.isin(status, _BAD).mean()) if status.size else 1.0
        if "cbf" in estimate.param_names:
            cbf = np.asarray(estimate["cbf"], dtype=np.float64)
            cbf = cbf[np.isfinite(cbf)]
            if cbf.size:
                medians[method] = float(np.median(cbf))
    worst = max(shares.values(), default=0.0)
    low, high = PLAUSIBLE_MEDIAN_CBF
    causes = []
    if negative_share > SWAPPED_SHARE:
        causes.append(f"ΔM = control − label is negative in {negative_share:.0%} of brain voxels: labels and "
                      "controls swapped in the aslcontext (or the series' volume order)?")
    elif negative_share > NEGATIVE_SHARE:
        causes.append(f"ΔM = control − label is negative in {negative_share:.0%} of brain voxels: no perfusion "
                      "signal above noise and artefacts (labeling failed or absent, an object without perfusion "
                      "such as a phantom), or labels and controls swapped?")
    high_methods = [m for m, v in medians.items() if v > high]
    low_methods = [m for m, v in medians.items() if v < low]
    if high_methods and not causes:
        causes.append(f"median CBF {medians[high_methods[0]]:.4g} mL/100 g/min ({high_methods[0]}) is implausibly "
                      f"high (> {high:g}): M0 too small for the ASL series (scaled wrongly: another scaling or "
                      "units than the series, or a wrong M0Estimate)?")
    if low_methods and not causes:
        causes.append(f"median CBF {medians[low_methods[0]]:.4g} mL/100 g/min ({low_methods[0]}) is implausibly "
                      f"low (< {low:g}): M0 too large for the ASL series (scaled wrongly), or no labeling?")
    if worst > MAX_SHARE_AT_BOUND_OR_INVALID:
        method = max(shares, key=shares.get)
        text = (f"{worst:.0%} of brain voxels end at a bound or invalid ({method}; flagged above "
                f"{MAX_SHARE_AT_BOUND_OR_INVALID:.0%})")
        causes.append(text if causes else text + ": check the timing (PostLabelingDelay, LabelingDuration), "
                      "the M0 and the constants")
    flagged = (worst > MAX_SHARE_AT_BOUND_OR_INVALID or bool(high_methods or low_methods)
               or negative_share > NEGATIVE_SHARE)
    return Plausibility(flagged, shares, medians, negative_share, tuple(causes) if flagged else ())
