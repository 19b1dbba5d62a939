"""The BIDS ASL sidecar of an imported series: what was read from the DICOM, what the study
parameters supplied, what aslbatch decided, and what is still missing.

Pure functions of dicts. Times in seconds (BIDS); Siemens protocol values (ASCCONV) are in µs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SIEMENS_RF_BLOCK_S", "SidecarDraft", "draft_sidecar", "missing_fields", "check_labeling_duration",
]

#: duration of one labeling RF block of the Siemens (Wang) pCASL sequences, s: LabelingDuration =
#: NumRFBlocks × 18.4 ms (the convention ExploreASL and the ASL BIDS tools use for them)
SIEMENS_RF_BLOCK_S = 0.0184
#: two times closer than this (s) count as equal
SAME_TIME_S = 1e-3
#: Siemens sAsl.ulSuppressionMode values whose meaning is known (protocol printouts: 1 none, 2 GRAY-WHITE)
SIEMENS_SUPPRESSION = {"1": False, "2": True}
#: dcm2niix fields replaced by their BIDS ASL counterparts (or by decided values)
REPLACED = ("InversionTime", "BolusDuration", "PostLabelDelay", "LabelingDuration", "M0Type",
            "RepetitionTimePreparation", "PASLType", "NumRFBlocks", "RFGap")


@dataclass
class SidecarDraft:
    """The sidecar being built: ``fields`` (BIDS), and which keys were ``read``, ``supplied`` or ``decided``."""

    fields: dict[str, Any]
    read: set[str] = field(default_factory=set)
    supplied: set[str] = field(default_factory=set)
    decided: dict[str, str] = field(default_factory=dict)

    def set_read(self, key: str, value: Any) -> None:
        self.fields[key] = value
        self.read.add(key)

    def decide(self, key: str, value: Any, reason: str) -> None:
        self.fields[key] = value
        self.decided[key] = reason
        self.read.discard(key)


def draft_sidecar(vendor: str, converted: Mapping[str, Any], protocol: Mapping[str, str],
                  supplied: Mapping[str, Any]) -> SidecarDraft:
    """The sidecar from dcm2niix's JSON (``converted``), the Siemens protocol and the study parameters.

    Supplied values win over read ones (the user knows the protocol); both are recorded.
    """
    draft = SidecarDraft({k: v for k, v in converted.items() if k not in REPLACED})
    for key in ("MagneticFieldStrength", "MRAcquisitionType", "SliceTiming", "ArterialSpinLabelingType"):
        if key in converted:
            draft.read.add(key)
    tr = converted.get("RepetitionTimeExcitation", converted.get("RepetitionTime"))
    if tr is not None:
        draft.set_read("RepetitionTimePreparation", tr)
    if vendor == "Siemens":
        labeling = str(converted.get("ArterialSpinLabelingType", "")).upper()
        if labeling == "PASL":
            if "InversionTime" in converted:
                draft.set_read("PostLabelingDelay", converted["InversionTime"])
            if "BolusDuration" in converted:
                draft.set_read("BolusCutOffFlag", True)
                draft.set_read("BolusCutOffDelayTime", converted["BolusDuration"])
                kind = str(converted.get("PASLType", "")).upper()
                technique = "QUIPSSII" if "QII" in kind else ("Q2TIPS" if "Q2T" in kind else None)
                if technique:
                    draft.set_read("BolusCutOffTechnique", technique)
        elif labeling in ("PCASL", "CASL"):
            if "LabelingDuration" in converted:
                draft.set_read("LabelingDuration", converted["LabelingDuration"])
            if "PostLabelDelay" in converted:
                draft.set_read("PostLabelingDelay", converted["PostLabelDelay"])
            elif "sWipMemBlock.adFree[2]" in protocol and "tgse_pcasl" in protocol.get("tSequenceFileName", ""):
                draft.set_read("PostLabelingDelay", float(protocol["sWipMemBlock.adFree[2]"]) / 1e6)
            for key in ("NumRFBlocks", "RFGap"):
                if key in converted:
                    draft.fields[key] = converted[key]
        mode = protocol.get("sAsl.ulSuppressionMode")
        if mode in SIEMENS_SUPPRESSION:
            draft.set_read("BackgroundSuppression", SIEMENS_SUPPRESSION[mode])
    for key, value in supplied.items():
        draft.fields[key] = value
        draft.supplied.add(key)
        draft.read.discard(key)
    return draft


def missing_fields(fields: Mapping[str, Any]) -> list[str]:
    """The BIDS ASL fields aslbatch needs that ``fields`` lacks, by labeling type and acquisition."""
    needed = ["ArterialSpinLabelingType", "PostLabelingDelay", "BackgroundSuppression", "RepetitionTimePreparation",
              "MagneticFieldStrength", "MRAcquisitionType"]
    labeling = str(fields.get("ArterialSpinLabelingType", "")).upper()
    if labeling in ("PCASL", "CASL"):
        needed.append("LabelingDuration")
    elif labeling == "PASL":
        needed.append("BolusCutOffFlag")
        if fields.get("BolusCutOffFlag"):
            needed.append("BolusCutOffDelayTime")
    if str(fields.get("MRAcquisitionType", "")).upper() == "2D":
        needed.append("SliceTiming")
    return [key for key in needed if fields.get(key) is None]


def check_labeling_duration(draft: SidecarDraft) -> str | None:
    """Catch a (P)CASL LabelingDuration read from the DICOM that equals the PLD (dcm2niix's reading of
    the Siemens WIP pCASL protocol) and correct it from NumRFBlocks × 18.4 ms; returns the refusal
    reason when it cannot be corrected, else None. A supplied LabelingDuration is left as given."""
    if "LabelingDuration" not in draft.read or "PostLabelingDelay" not in draft.fields:
        return None
    tau, pld = draft.fields["LabelingDuration"], draft.fields["PostLabelingDelay"]
    if not (isinstance(tau, (int, float)) and isinstance(pld, (int, float)) and abs(tau - pld) < SAME_TIME_S):
        return None
    blocks = draft.fields.get("NumRFBlocks")
    if not isinstance(blocks, (int, float)) or blocks <= 0:
        return (f"LabelingDuration read from the DICOM ({tau:g} s) equals the PostLabelingDelay ({pld:g} s), which "
                "is how dcm2niix misreads this protocol, and NumRFBlocks is not recorded to correct it: give "
                "LabelingDuration in the study parameters")
    corrected = round(blocks * SIEMENS_RF_BLOCK_S, 4)
    draft.decide("LabelingDuration", corrected,
                 f"dcm2niix wrote LabelingDuration {tau:g} s, equal to the PostLabelingDelay {pld:g} s; corrected to "
                 f"NumRFBlocks × 18.4 ms = {blocks:g} × 0.0184 s = {corrected:g} s")
    return None
