"""Synthetic Philips classic DICOM written with pydicom, modelled on the real Philips 3D pCASL headers
(Ingenia Elition X, dcm_qa_philips_asl): one file per slice, the label type in tag (2005,1429), the
dynamic in TemporalPositionIdentifier, a first dynamic without background suppression, and optionally
the scanner's clipped control − label image (ImageType PERFUSION) as its own series.

The images are small (16 x 16 x 4) with known truth: a disk of tissue whose ΔM = control − label is
``perfusion`` (scanner units) inside the disk and 0 outside."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHAPE = (16, 16, 4)
STATIC = 800.0       # background-suppressed tissue signal (stored units)
UNSUPPRESSED = 2.5   # the first dynamic is this many times brighter
PERFUSION = 12.0     # ΔM in the disk (stored units)
NOISE = 0.5          # standard deviation of each raw image (stored units)
REF_NOISE = 0.3      # standard deviation of the scanner difference image


def tissue() -> np.ndarray:
    """Boolean disk of 'brain' (x, y, z)."""
    x, y = np.mgrid[: SHAPE[0], : SHAPE[1]]
    disk = (x - 7.5) ** 2 + (y - 7.5) ** 2 < 6.0 ** 2
    return np.repeat(disk[..., None], SHAPE[2], axis=2)


def perfusion_map() -> np.ndarray:
    """ΔM (x, y, z): a left-right gradient inside the disk, so that a correlation has a pattern to follow."""
    x = np.arange(SHAPE[0])[:, None, None] * np.ones(SHAPE)
    return np.where(tissue(), PERFUSION * (0.5 + x / SHAPE[0]), 0.0)


def _dataset(uid: str, study: str, description: str, image_type: list[str], number: int):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    ds.Modality = "MR"
    ds.Manufacturer = "Philips"
    ds.ManufacturerModelName = "Ingenia Elition X"
    ds.SoftwareVersions = "5.7.1"
    ds.PatientID = "Phantom02"
    ds.PatientName = "Dynamic ASL"
    ds.StudyDate = "20210804"
    ds.StudyTime = "164111"
    ds.SeriesTime = "164111"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = uid
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    ds.ProtocolName = description
    ds.ImageType = image_type
    ds.MagneticFieldStrength = 3
    ds.PatientPosition = "HFS"
    ds.MRAcquisitionType = "3D"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "SK"
    ds.RepetitionTime = 4234.06
    ds.EchoTime = 12.1
    ds.FlipAngle = 90
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [3, 3]
    ds.SliceThickness = 6
    ds.SpacingBetweenSlices = 6
    ds.Rows, ds.Columns = SHAPE[1], SHAPE[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = 0
    return ds


def write_philips_pcasl(folder: Path, *, swap_labels: bool = False, scanner_image: bool = True,
                        suppressed: bool = True, label_tags: bool = True, label_first: bool = False,
                        seed: int = 0) -> dict:
    """Write the raw series (16 volumes: 8 dynamics x control/label) and, when ``scanner_image``, the
    scanner's difference series into ``folder``; returns the UIDs and the true ΔM. ``suppressed``
    False: no background suppression, so no dynamic stands out (and there is no M0). ``label_tags``
    False: no tag (2005,1429), as an export that does not record control and label; ``label_first``:
    each dynamic's label image is written (instance numbers) before its control."""
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    study = generate_uid()
    raw_uid = generate_uid()
    disk = tissue()
    static = np.where(disk, STATIC, 0.0)
    deltam = perfusion_map()
    n_dyn = 8
    raw = folder / "raw"
    raw.mkdir(parents=True)
    instance = 0
    for dynamic in range(1, n_dyn + 1):
        scale = UNSUPPRESSED if dynamic == 1 and suppressed else 1.0
        for kind in (("LABEL", "CONTROL") if label_first else ("CONTROL", "LABEL")):
            image = static * scale + (0.0 if kind == "CONTROL" else -deltam) + rng.normal(0, NOISE, SHAPE) + 20.0
            tag = {"CONTROL": "LABEL", "LABEL": "CONTROL"}[kind] if swap_labels else kind
            for z in range(SHAPE[2]):
                instance += 1
                ds = _dataset(raw_uid, study, "SOURCE - 3D_pCASL_6mm", ["ORIGINAL", "PRIMARY", "M", "SE"], 402)
                ds.SOPInstanceUID = generate_uid()
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.InstanceNumber = instance
                ds.AcquisitionNumber = 1
                ds.TemporalPositionIdentifier = dynamic
                ds.NumberOfTemporalPositions = n_dyn
                ds.ImagePositionPatient = [0.0, 0.0, 6.0 * z]
                ds.SliceLocation = 6.0 * z
                if label_tags:
                    ds.add_new((0x2005, 0x0010), "LO", "Philips MR Imaging DD 001")
                    ds.add_new((0x2005, 0x1429), "CS", tag)
                ds.add_new((0x2001, 0x0010), "LO", "Philips Imaging DD 001")
                ds.add_new((0x2001, 0x100A), "IS", z + 1)
                ds.PixelData = np.clip(np.round(image[:, :, z].T), 0, 65535).astype(np.uint16).tobytes()
                ds.save_as(raw / f"{instance:04d}.dcm", enforce_file_format=True)
    uids = {"study": study, "raw": raw_uid, "deltam": deltam}
    if scanner_image:
        uid = generate_uid()
        ref = folder / "scanner"
        ref.mkdir()
        clipped = np.clip(deltam + rng.normal(0, REF_NOISE, SHAPE), 0, None)
        for z in range(SHAPE[2]):
            ds = _dataset(uid, study, "3D_pCASL_6mm", ["ORIGINAL", "PRIMARY", "PERFUSION", "FFE"], 401)
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = z + 1
            ds.ImagePositionPatient = [0.0, 0.0, 6.0 * z]
            ds.SliceLocation = 6.0 * z
            ds.RescaleSlope = 0.1
            ds.PixelData = np.round(clipped[:, :, z].T * 10).astype(np.uint16).tobytes()
            ds.save_as(ref / f"{z + 1:04d}.dcm", enforce_file_format=True)
        uids["scanner"] = uid
    return uids
