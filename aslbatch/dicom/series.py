"""Find the DICOM series of a folder tree and read, with pydicom, the header values aslbatch needs.

One :class:`DicomSeries` per SeriesInstanceUID: its files, the identifiers (patient, study,
series), the vendor, the description, the ImageType, and the vendor values that dcm2niix does
not export: the Siemens protocol (ASCCONV block of the CSA series header: the
background-suppression mode ``sAsl.ulSuppressionMode``) and, for Philips, each file's label
type (private tag 2005,1429: CONTROL or LABEL) and dynamic (TemporalPositionIdentifier) with
the sum of its stored pixels, which ties each file to the volume dcm2niix stacks it in.

Only headers are read (``stop_before_pixels``) except for Philips ASL files, whose pixel sums
are needed. Files that are not DICOM are skipped; nothing below the folder is ever written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DicomSeries", "PhilipsSlice", "find_series", "pixel_key", "siemens_protocol"]

#: Philips private tag of the image's ASL label type (CONTROL / LABEL)
PHILIPS_LABEL_TYPE = (0x2005, 0x1429)
#: Siemens CSA series header (holds the ASCCONV protocol text)
SIEMENS_CSA_SERIES = (0x0029, 0x1020)
_ASCCONV = re.compile(r"### ASCCONV BEGIN[^\n]*\n(.*?)### ASCCONV END", re.S)


@dataclass(frozen=True)
class PhilipsSlice:
    """One Philips classic-DICOM file: its label type, dynamic number and :func:`pixel_key`."""

    label_type: str | None
    dynamic: int | None
    pixel_key: str


@dataclass
class DicomSeries:
    """The files and header values of one DICOM series (all times in the DICOM's own units)."""

    uid: str
    files: list[Path]
    manufacturer: str
    description: str
    image_type: tuple[str, ...]
    patient_id: str
    study_uid: str
    study_date: str
    series_number: int
    siemens_protocol: dict[str, str] = field(default_factory=dict)
    philips_slices: list[PhilipsSlice] = field(default_factory=list)

    @property
    def vendor(self) -> str:
        """``Siemens``, ``Philips``, ``GE`` or the Manufacturer as written."""
        name = self.manufacturer.lower()
        for vendor in ("Siemens", "Philips", "GE"):
            if vendor.lower() in name:
                return vendor
        return self.manufacturer

    @property
    def is_scanner_perfusion(self) -> bool:
        """A scanner-made perfusion image (ImageType contains PERFUSION), not raw label/control data."""
        return "PERFUSION" in self.image_type


def pixel_key(pixels) -> str:
    """A fingerprint of an image's stored values that ignores their arrangement (dcm2niix may flip rows):
    the sha1 of the sorted values as int64."""
    import hashlib

    import numpy as np

    return hashlib.sha1(np.sort(np.asarray(pixels, dtype=np.int64), axis=None).tobytes()).hexdigest()


def siemens_protocol(raw: bytes) -> dict[str, str]:
    """The ``key = value`` lines of the ASCCONV block of a Siemens CSA series header (values as text)."""
    text = raw.decode("latin-1", errors="replace")
    match = _ASCCONV.search(text)
    if not match:
        return {}
    values = {}
    for line in match.group(1).splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip('"')
    return values


def _read_header(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, TypeError):
        return None


def find_series(dicom_dir: str | os.PathLike, known: frozenset[str] = frozenset()) -> list[DicomSeries]:
    """Every DICOM series below ``dicom_dir`` (read only), ordered by study, then series number.

    Series whose UID is in ``known`` (imported before) get their files listed but no pixel data read.
    Raises ValueError naming the folder when it does not exist.
    """
    import pydicom

    root = Path(dicom_dir)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder of DICOM files")
    found: dict[str, DicomSeries] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        header = _read_header(path)
        if header is None or "SeriesInstanceUID" not in header:
            continue
        uid = str(header.SeriesInstanceUID)
        series = found.get(uid)
        if series is None:
            series = DicomSeries(
                uid=uid, files=[], manufacturer=str(header.get("Manufacturer", "")),
                description=str(header.get("SeriesDescription", "") or header.get("ProtocolName", "")),
                image_type=tuple(str(v).upper() for v in (header.get("ImageType") or [])),
                patient_id=str(header.get("PatientID", "")), study_uid=str(header.get("StudyInstanceUID", "")),
                study_date=str(header.get("StudyDate", "")), series_number=int(header.get("SeriesNumber", 0) or 0),
            )
            if SIEMENS_CSA_SERIES in header:
                series.siemens_protocol = siemens_protocol(bytes(header[SIEMENS_CSA_SERIES].value))
            found[uid] = series
        series.files.append(path)
        if series.vendor == "Philips" and not series.is_scanner_perfusion and uid not in known:
            full = pydicom.dcmread(path)
            label = full[PHILIPS_LABEL_TYPE].value if PHILIPS_LABEL_TYPE in full else None
            dynamic = full.get("TemporalPositionIdentifier")
            series.philips_slices.append(PhilipsSlice(
                str(label).strip().upper() if label is not None else None,
                int(dynamic) if dynamic is not None else None,
                pixel_key(full.pixel_array),
            ))
    return sorted(found.values(), key=lambda s: (s.study_uid, s.series_number, s.uid))
