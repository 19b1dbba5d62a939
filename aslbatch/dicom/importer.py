"""``aslbatch import``: a folder of DICOM series into a BIDS ASL dataset, unattended.

For every series not yet imported (by SeriesInstanceUID, recorded in
``BIDS_DIR/sourcedata/aslbatch-import/manifest.json``): convert with dcm2niix, read the vendor
tags, take the missing values from the study parameters, establish and check the volume roles
(:mod:`.roles`) and write ``_asl.nii.gz``, ``_asl.json``, ``_aslcontext.tsv`` (and ``_m0scan``
with ``IntendedFor``) atomically, under the lock of BIDS_DIR. A series that cannot be imported
is refused with the reason (the missing fields listed); nothing is guessed. Scanner-made images
(ImageType PERFUSION) are kept beside the raw data, in ``sourcedata/scanner``, and the ASL
sidecar names them. The DICOM tree is only read.

Identifiers: the subject is the ``subjects`` mapping of the study parameters for the DICOM
PatientID, else the PatientID with every non-alphanumeric character removed; the session is
the StudyDate (``ses-YYYYMMDD``); ``acq`` is the series description made alphanumeric and
``run`` the SeriesNumber.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_open, atomic_path, stale_temporaries
from .params import StudyParameters, load_study_parameters
from .roles import RoleError, brain_means, check_m0_brighter, philips_roles, scanner_correlation, siemens_roles
from .series import DicomSeries, find_series, pixel_key
from .sidecar import check_labeling_duration, draft_sidecar, missing_fields

__all__ = ["ImportReport", "SeriesOutcome", "import_dicom", "MANIFEST"]

MANIFEST = Path("sourcedata") / "aslbatch-import" / "manifest.json"
SCANNER_DIR = Path("sourcedata") / "scanner"
#: manifest statuses that a rerun does not revisit
FINAL = ("imported", "reference", "not ASL", "m0")
_M0_SUFFIX = re.compile(r"[ _-]*m0$", re.I)


@dataclass
class SeriesOutcome:
    """What the import did with one series: status imported, refused, reference, m0, not ASL or known."""

    uid: str
    description: str
    status: str
    reason: str = ""
    files: list[str] = field(default_factory=list)
    read: list[str] = field(default_factory=list)
    supplied: list[str] = field(default_factory=list)
    decided: list[str] = field(default_factory=list)


@dataclass
class ImportReport:
    """Every series' outcome; ``exit_code`` 0 when nothing was refused, 1 otherwise, 3 when no DICOM was found."""

    outcomes: list[SeriesOutcome]
    found: int

    @property
    def exit_code(self) -> int:
        if not self.found:
            return 3
        return 1 if any(o.status == "refused" for o in self.outcomes) else 0

    def one_line(self) -> str:
        counts: dict[str, int] = {}
        for outcome in self.outcomes:
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
        parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        return f"aslbatch import: {self.found} series found: {parts or 'nothing'}"


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", text)


def _load_manifest(bids_dir: Path) -> dict[str, Any]:
    path = bids_dir / MANIFEST
    if not path.exists():
        return {"series": {}}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: the import manifest is not valid JSON ({exc}); move it away to reimport all") from None


def _write_json(path: Path, data: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False, default=_plain)
        fh.write("\n")


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, set):
        return sorted(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def _copy(source: Path, final: Path) -> None:
    with atomic_path(final, suffix=".nii.gz") as tmp:
        shutil.copyfile(source, tmp)


class _Refused(Exception):
    pass


@dataclass
class _Converted:
    series: DicomSeries
    nifti: Path
    sidecar: dict
    data: np.ndarray


def _convert(series: DicomSeries, scratch: Path) -> _Converted:
    import nibabel as nib

    from .convert import ConversionError, convert_series

    try:
        nifti, sidecar = convert_series(series.files, scratch / series.uid)
    except (ConversionError, OSError, ValueError) as exc:
        raise _Refused(f"conversion failed: {exc}") from None
    data = np.asarray(nib.load(nifti).get_fdata(dtype=np.float64))
    return _Converted(series, nifti, sidecar, data)


def _philips_volume_tags(converted: _Converted) -> tuple[list, list]:
    """Label type and dynamic of each volume dcm2niix stacked, matched by the fingerprints of the stored pixels."""
    import nibabel as nib

    raw = np.asarray(nib.load(converted.nifti).dataobj.get_unscaled())
    if raw.ndim == 3:
        raw = raw[..., None]
    by_key: dict[str, list] = {}
    for item in converted.series.philips_slices:
        by_key.setdefault(item.pixel_key, []).append((item.label_type, item.dynamic))
    labels, dynamics = [], []
    for v in range(raw.shape[3]):
        found = {tag for z in range(raw.shape[2])
                 for tag in by_key.get(pixel_key(raw[:, :, z, v]), [(None, None)])}
        if len(found) != 1:
            raise _Refused(f"volume {v}: its slices cannot be tied to one label type and dynamic of the DICOM files")
        label, dynamic = found.pop()
        labels.append(label)
        dynamics.append(dynamic)
    return labels, dynamics


def _on_grid(image, target) -> np.ndarray | None:
    """``image``'s data turned to ``target``'s axis orientation (dcm2niix may flip one series and not
    another); None when the two do not then share the voxel grid (affine within 0.01 mm)."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    turn = ornt_transform(io_orientation(image.affine), io_orientation(target.affine))
    data = apply_orientation(np.asarray(image.get_fdata(dtype=np.float64)), turn)
    affine = image.affine @ inv_ornt_aff(turn, image.shape[:3])
    if data.shape[:3] != target.shape[:3] or not np.allclose(affine, target.affine, atol=1e-2):
        return None
    return data.reshape(data.shape[:3])


def _entities(series: DicomSeries, params: StudyParameters) -> tuple[str, str]:
    """The series' folder (``sub-X[/ses-Y]/perf``) and file stem, as the module docstring describes."""
    subject = params.subjects.get(series.patient_id) or _label(series.patient_id) or "unknown"
    session = _label(series.study_date)
    acq = _label(series.description)[:40] or "asl"
    stem = f"sub-{subject}" + (f"_ses-{session}" if session else "") + f"_acq-{acq}_run-{series.series_number}"
    folder = f"sub-{subject}" + (f"/ses-{session}" if session else "") + "/perf"
    return folder, stem


def _import_asl(
    converted: _Converted, m0_claim: _Converted | None, reference: tuple[Path, str] | None,
    params: StudyParameters, bids_dir: Path,
) -> tuple[SeriesOutcome, SeriesOutcome | None]:
    from ..preprocess import brain_mask

    series = converted.series
    outcome = SeriesOutcome(series.uid, series.description, "refused")
    m0_outcome = SeriesOutcome(m0_claim.series.uid, m0_claim.series.description, "refused") if m0_claim else None
    supplied = params.for_series(series.manufacturer, series.description)
    draft = draft_sidecar(series.vendor, converted.sidecar, series.siemens_protocol, supplied)
    outcome.read, outcome.supplied = sorted(draft.read), sorted(draft.supplied)
    try:
        missing = missing_fields(draft.fields)
        if missing:
            raise _Refused(f"missing {', '.join(missing)} (not in the DICOM"
                           + (", nor supplied by the study parameters" if params.path else "; no study parameter file given")
                           + ")")
        refusal = check_labeling_duration(draft)
        if refusal:
            raise _Refused(refusal)
        data = converted.data
        if data.ndim != 4 or data.shape[3] < 2:
            raise _Refused(f"the image has {1 if data.ndim == 3 else data.shape[3]} volume(s): no label/control pair")
        suppressed = bool(draft.fields["BackgroundSuppression"])
        mask = brain_mask(data.mean(axis=3), source=f"series {series.description}")
        try:
            if series.vendor == "Siemens":
                sequence = str(converted.sidecar.get("PulseSequenceDetails") or series.siemens_protocol.get(
                    "tSequenceFileName", ""))
                roles = siemens_roles(data, mask, sequence, converted.sidecar.get("M0Type") == "Included")
            elif series.vendor == "Philips":
                if len(series.files) == 1:
                    raise _Refused("Philips enhanced (multi-frame) DICOM is not supported: export classic DICOM")
                labels, dynamics = _philips_volume_tags(converted)
                roles = philips_roles(data, mask, labels, dynamics, suppressed)
            else:
                raise _Refused(f"vendor {series.manufacturer!r}: aslbatch imports Siemens and Philips ASL series only")
        except RoleError as exc:
            raise _Refused(str(exc)) from None
        types = list(roles.volume_types)
        outcome.decided.extend(roles.notes)
        controls = [i for i, t in enumerate(types) if t == "control"]
        control_mean = float(brain_means(data[..., controls], mask).mean())
        m0_index = [i for i, t in enumerate(types) if t == "m0scan"]
        m0_file = None
        if m0_index:
            try:
                note = check_m0_brighter(brain_means(data[..., m0_index], mask), control_mean, suppressed)
            except RoleError as exc:
                raise _Refused(str(exc)) from None
            draft.decide("M0Type", "Included", f"m0scan volume(s) {m0_index} of the series; {note}")
        if m0_claim is not None:
            claim = m0_claim.data if m0_claim.data.ndim == 4 else m0_claim.data[..., None]
            if claim.shape[:3] != data.shape[:3]:
                m0_outcome.reason = f"its grid {claim.shape[:3]} differs from the ASL series' {data.shape[:3]}"
            else:
                try:
                    note = check_m0_brighter(brain_means(claim, mask), control_mean, suppressed)
                    if not m0_index:
                        draft.decide("M0Type", "Separate", f"M0 from series {m0_claim.series.description!r}; {note}")
                        m0_file = m0_claim
                except RoleError as exc:
                    m0_outcome.reason = f"not used as the M0 of {series.description!r}: {exc}"
                    outcome.decided.append(f"series {m0_claim.series.description!r} {m0_outcome.reason}")
        if "M0Type" not in draft.fields:
            if suppressed:
                draft.decide("M0Type", "Absent", "no M0 volume or series was found"
                             + (f" ({m0_outcome.reason})" if m0_outcome and m0_outcome.reason else "")
                             + " and the series is background suppressed, so its controls are no M0: aslbatch run "
                             "gives ΔM and CBF relative to its brain median (never absolute CBF) for a single-delay "
                             "series and refuses a multi-delay one; give M0Type Estimate and M0Estimate in the study "
                             "parameters if an M0 value is known")
            else:
                draft.decide("M0Type", "Absent", "no M0 was exported and the series is not background suppressed: "
                             "aslbatch run takes the mean control image, saturation-recovery corrected, as M0")
        folder, stem = _entities(series, params)
        out = bids_dir / folder
        asl_name = f"{folder}/{stem}_asl.nii.gz"
        written = []
        if m0_file is not None:
            m0_sidecar = {k: v for k, v in m0_file.sidecar.items() if k not in ("M0Type", "RepetitionTimePreparation")}
            tr = m0_file.sidecar.get("RepetitionTimeExcitation", m0_file.sidecar.get("RepetitionTime"))
            m0_sidecar.update({"RepetitionTimePreparation": tr, "IntendedFor": f"bids::{asl_name}",
                               "ImportProvenance": {"SourceSeriesInstanceUID": m0_file.series.uid}})
            _copy(m0_file.nifti, out / f"{stem}_m0scan.nii.gz")
            _write_json(out / f"{stem}_m0scan.json", m0_sidecar)
            written += [f"{folder}/{stem}_m0scan.nii.gz", f"{folder}/{stem}_m0scan.json"]
            m0_outcome.status, m0_outcome.reason = "m0", f"imported as the M0 of {asl_name}"
        outcome.decided.extend(f"{key}: {reason}" for key, reason in draft.decided.items())
        outcome.read = sorted(draft.read)  # a decided value (e.g. a corrected LabelingDuration) is no longer "read"
        provenance = {
            "SourceSeriesInstanceUID": series.uid, "SourceSeriesDescription": series.description,
            "SourceSeriesNumber": series.series_number,
            "ReadFromDICOM": sorted(draft.read), "SuppliedByStudyParameters": sorted(draft.supplied),
            "StudyParameterFile": params.path, "Decided": outcome.decided,
        }
        if reference is not None:
            import nibabel as nib

            provenance["ScannerReference"] = reference[1]
            scanner = _on_grid(nib.load(reference[0]), nib.load(converted.nifti))
            if scanner is None:
                outcome.decided.append("the scanner's difference image is on another grid: not compared")
            else:
                r = scanner_correlation(data, types, scanner, mask)
                provenance["ScannerReferenceCorrelation"] = round(r, 4)
                outcome.decided.append(f"ΔM against the scanner's own difference image: r = {r:.3f} in the brain")
        fields = dict(draft.fields)
        fields["ImportProvenance"] = provenance
        _copy(converted.nifti, out / f"{stem}_asl.nii.gz")
        _write_json(out / f"{stem}_asl.json", fields)
        with atomic_open(out / f"{stem}_aslcontext.tsv", "w", encoding="utf-8") as fh:
            fh.write("volume_type\n" + "".join(f"{t}\n" for t in types))
        written += [asl_name, f"{folder}/{stem}_asl.json", f"{folder}/{stem}_aslcontext.tsv"]
        outcome.status, outcome.files = "imported", written
        outcome.reason = "; ".join(roles.notes[-1:])
    except _Refused as exc:
        outcome.reason = str(exc)
        if m0_outcome is not None and not m0_outcome.reason:
            m0_outcome.reason = f"its ASL series {series.description!r} was refused"
    return outcome, m0_outcome


def _is_asl(series: DicomSeries) -> bool:
    """An ASL series by its tags (Siemens ImageType ASL, Philips label types), or for other vendors and
    Philips images without label types, by an ASL name in its description (then refused with the reason)."""
    if series.vendor == "Siemens":
        return "ASL" in series.image_type
    if series.vendor == "Philips" and any(s.label_type in ("CONTROL", "LABEL") for s in series.philips_slices):
        return True
    return bool(re.search(r"asl|pcasl|pasl", series.description, re.I)) and not series.is_scanner_perfusion


def _reference_target(reference: DicomSeries, candidates: list[DicomSeries]) -> DicomSeries | None:
    """The raw ASL series a scanner-made image was computed from: same study, and the description
    prefixed ``SOURCE - `` (Philips) or the next series number."""
    same_study = [c for c in candidates if c.study_uid == reference.study_uid]
    for c in same_study:
        if c.description.lower() == f"source - {reference.description}".lower():
            return c
    following = [c for c in same_study if c.series_number == reference.series_number + 1]
    return following[0] if len(following) == 1 else None


def import_dicom(dicom_dir: str | os.PathLike, bids_dir: str | os.PathLike,
                 study_parameters: str | os.PathLike | None = None) -> ImportReport:
    """Import every new DICOM ASL series below ``dicom_dir`` into the BIDS dataset ``bids_dir``.

    Raises ValueError (unreadable study parameters, manifest or folder) and
    :class:`aslbatch.batch.LockHeld` when another import holds BIDS_DIR's lock.
    """
    from ..batch import output_lock

    bids = Path(bids_dir)
    params = load_study_parameters(study_parameters)
    dicom = Path(dicom_dir)
    if not dicom.is_dir():
        raise ValueError(f"{dicom}: not a folder of DICOM files")
    if bids.resolve().is_relative_to(dicom.resolve()):
        raise ValueError(f"{bids}: the BIDS folder is inside the DICOM folder {dicom}, which is never written")
    with output_lock(bids):
        manifest = _load_manifest(bids)
        known = manifest.setdefault("series", {})
        for folder in [*bids.glob("sub-*"), bids / "sourcedata"]:  # a killed import's leftovers, not run's
            for stale in stale_temporaries(folder) if folder.is_dir() else []:
                stale.unlink(missing_ok=True)
        done = frozenset(uid for uid, entry in known.items() if entry.get("status") in FINAL)
        found = find_series(dicom, done)
        outcomes: list[SeriesOutcome] = []
        new = []
        for series in found:
            entry = known.get(series.uid)
            unchanged_refusal = (entry and entry.get("status") == "refused"
                                 and entry.get("study_parameters") == params.digest
                                 and entry.get("n_files") == len(series.files))
            if entry and (entry.get("status") in FINAL or unchanged_refusal):
                continue
            new.append(series)
        asl = [s for s in new if _is_asl(s) and not s.is_scanner_perfusion]
        references = [s for s in new if s.is_scanner_perfusion]
        claims = {s.uid: s for s in asl if s.vendor == "Siemens" and _M0_SUFFIX.search(s.description)}
        for series in new:
            if series not in asl and series not in references:
                outcomes.append(SeriesOutcome(series.uid, series.description, "not ASL",
                                              f"ImageType {'/'.join(series.image_type)}"))
        with tempfile.TemporaryDirectory(prefix="aslbatch-import-") as scratch_name:
            scratch = Path(scratch_name)
            targets = {}
            for reference in references:
                target = _reference_target(reference, [s for s in found if _is_asl(s)])
                outcome = SeriesOutcome(reference.uid, reference.description, "refused")
                if target is None:
                    outcome.reason = "scanner-made image whose raw series was not found; kept out of the raw data"
                    outcomes.append(outcome)
                    continue
                try:
                    converted = _convert(reference, scratch)
                except _Refused as exc:
                    outcome.reason = str(exc)
                    outcomes.append(outcome)
                    continue
                folder, stem = _entities(target, params)
                rel = (SCANNER_DIR / folder / f"{stem}_desc-scanner_deltam.nii.gz").as_posix()
                targets[target.uid] = (converted.nifti, rel)
                _copy(converted.nifti, bids / rel)
                outcome.status, outcome.files = "reference", [rel, rel.replace(".nii.gz", ".json")]
                outcome.reason = f"scanner-made image of {target.description!r}, kept in {SCANNER_DIR.as_posix()}"
                _write_json(bids / rel.replace(".nii.gz", ".json"),
                            {**converted.sidecar, "Sources": [f"DICOM series {target.uid}"],
                             "Description": "the scanner's own perfusion (control − label) image; not raw data"})
                outcomes.append(outcome)
            claim_uids = set(claims)
            for series in asl:
                if series.uid in claim_uids:
                    continue
                claim_series = next((c for c in claims.values() if c.study_uid == series.study_uid and
                                     _M0_SUFFIX.sub("", c.description).lower() == series.description.lower()), None)
                try:
                    converted = _convert(series, scratch)
                    claim = _convert(claim_series, scratch) if claim_series is not None else None
                except _Refused as exc:
                    outcomes.append(SeriesOutcome(series.uid, series.description, "refused", str(exc)))
                    continue
                outcome, m0_outcome = _import_asl(converted, claim, targets.get(series.uid), params, bids)
                outcomes.append(outcome)
                if m0_outcome is not None:
                    outcomes.append(m0_outcome)
                    claims.pop(claim_series.uid)
            for claim_series in claims.values():
                outcomes.append(SeriesOutcome(claim_series.uid, claim_series.description, "refused",
                                              "named as an M0 but no ASL series of that name was found"))
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        n_files = {s.uid: len(s.files) for s in found}
        for outcome in outcomes:
            record = asdict(outcome)
            record.update({"when": stamp, "n_files": n_files.get(outcome.uid), "study_parameters": params.digest})
            known[outcome.uid] = record
        description = bids / "dataset_description.json"
        if not description.exists():
            _write_json(description, {"Name": "imported by aslbatch import", "BIDSVersion": "1.9.0",
                                      "DatasetType": "raw"})
        _write_json(bids / MANIFEST, manifest)
        log = bids / MANIFEST.parent / "logs" / f"import-{stamp.replace(':', '')}.json"
        _write_json(log, {"dicom_dir": str(dicom), "study_parameters": params.path,
                          "outcomes": [asdict(o) for o in outcomes]})
    return ImportReport(outcomes, len(found))
