"""BIDS ASL datasets modelled on the product sequences of the three big vendors, with a known truth.

:func:`make_vendor_dataset` writes one of :data:`KINDS` into a folder: the sidecars follow the
BIDS specification's ASL section and its example datasets (bids-examples asl001 to asl005:
field names, values and the vendors' habits: GE's ``deltam`` + ``m0scan`` in one series with a
scalar PLD, Philips' separate M0 named by a relative ``IntendedFor``, Siemens' M0 as the first
volume of the series, Q2TIPS ``BolusCutOffDelayTime`` as [start, end], a pepolar M0 in
``fmap/``), and the images are made from the kinetic models of ``tests/reference.py`` (written
from ASL_MODELS.md, independently of ``aslbatch.models``) for a brain of grey matter (CBF 60
mL/100 g/min) around white matter (CBF 25), each with a realistic arrival time, M0 with grey /
white contrast, and slice timing where the readout is 2D (each slice read at its own PLD or TI).

The data are noise-free by default (``snr`` adds Gaussian noise to control and label images).
The labeling efficiency is the one aslbatch uses for the sidecar (LabelingEfficiency, else 0.85
for PCASL and 0.98 for PASL) and the label is not attenuated by background suppression (α_BS = 1):
the default quantification (no background-suppression correction) recovers the truth.
An M0 acquired with RepetitionTimePreparation below 5 s is made not fully recovered,
M0t (1 − e^(−TR/T1t)) with T1t 1.3 s, as aslbatch (and ASLPrep) undo it.

Units: CBF in mL/100 g/min, times in s, images in arbitrary scanner units.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from tests import reference

#: the datasets :func:`make_vendor_dataset` can write
KINDS = (
    "ge_3d_spiral_pcasl",  # single PLD; deltam + m0scan in one series (M0Type Included), scalar PLD
    "philips_2d_epi_pcasl",  # single PLD, 2D with SliceTiming; separate M0 named by a relative IntendedFor
    "siemens_3d_grase_pcasl",  # single PLD; M0 the first volume of the series (M0Type Included)
    "siemens_3d_grase_pasl_multi_ti",  # FAIR Q2TIPS, ten TIs; separate M0
    "siemens_2d_epi_pasl_single_ti",  # PICORE Q2TIPS, one TI, 2D; M0 the first volume, no background suppression
    "siemens_2d_epi_pcasl_multi_pld",  # six PLDs, 2D; M0 in perf/ plus a reversed-phase-encoding M0 in fmap/
    "siemens_2d_epi_pcasl_multi_pld_fmap_m0",  # the same with its only M0 images in fmap/ (pepolar pair)
)

#: CBF (mL/100 g/min) of grey and white matter
CBF = {"gm": 60.0, "wm": 25.0}
#: tissue M0t of grey and white matter (scanner units)
M0T = {"gm": 1000.0, "wm": 850.0}
#: T1 of arterial blood at 3 T and of tissue (s), the blood–brain partition coefficient (mL/g)
T1B, T1T, LAMBDA = 1.65, 1.3, 0.9
#: labeling efficiency aslbatch assumes when the sidecar gives none
DEFAULT_ALPHA = {"PCASL": 0.85, "PASL": 0.98}
#: image grid (voxels): a brain ellipsoid of grey matter around white matter, background outside
SHAPE = (20, 18, 8)


@dataclass(frozen=True)
class VendorTruth:
    """What :func:`make_vendor_dataset` wrote and what a correct quantification gives.

    root : the dataset folder; source_name : the base of aslbatch's output names.
    tissue : int8 map, 0 background, 1 grey matter, 2 white matter; cbf (mL/100 g/min) and
        att (s) : the true maps (NaN in the background).
    labeling : "PCASL" or "PASL"; single_delay : one PLD (or TI): CBF only, no arrival time;
    repeated : the ASL condition was acquired more than once (a per-voxel spread exists).
    m0_file : the dataset-relative path of the M0 image that quantifies the series (None when
        its M0 volumes are in the series).
    """

    kind: str
    root: Path
    source_name: str
    tissue: np.ndarray
    cbf: np.ndarray
    att: np.ndarray
    labeling: str
    single_delay: bool
    repeated: bool
    m0_file: str | None

    @property
    def grey(self) -> np.ndarray:
        return self.tissue == 1

    @property
    def white(self) -> np.ndarray:
        return self.tissue == 2


# --- sidecars ---------------------------------------------------------------------------------


def _slice_timing(n_slices: int, spacing: float) -> list[float]:
    """Ascending sequential slice times (s)."""
    return [round(k * spacing, 4) for k in range(n_slices)]


def _ge_3d_spiral_pcasl() -> dict[str, Any]:
    asl = {
        "Manufacturer": "GE", "ManufacturersModelName": "DISCOVERY_MR750",
        "SoftwareVersions": "24_LX_MR_Software_release:DV24.0_R02_1607.b", "MagneticFieldStrength": 3,
        "ReceiveCoilName": "32Ch_Head", "MRAcquisitionType": "3D", "PulseSequenceType": "spiral",
        "PulseSequenceDetails": "GE 3D spiral PCASL product sequence", "ScanningSequence": "RM",
        "SequenceVariant": "NONE", "ScanOptions": "EDR_GEMS_SPIRAL_GEMS", "EchoTime": 0.010528, "FlipAngle": 111,
        "RepetitionTimePreparation": 4.886, "ArterialSpinLabelingType": "PCASL", "PostLabelingDelay": 2.025,
        "BackgroundSuppression": True, "M0Type": "Included", "TotalAcquiredPairs": 3, "VascularCrushing": False,
        "AcquisitionVoxelSize": [4, 4, 8], "BackgroundSuppressionNumberPulses": 4,
        "BackgroundSuppressionPulseTime": [1.965, 2.6, 3.1, 3.38],
        "LabelingLocationDescription": "~8 cm below the circle of Willis, through the proximal V3 segment of "
        "the vertebral arteries",
        "LabelingDistance": 40, "LabelingDuration": 1.45,
    }
    return {"asl": asl, "context": ["deltam", "m0scan"], "voxel": (4.0, 4.0, 8.0),
            "att": {"gm": 1.3, "wm": 1.7}}


def _philips_2d_epi_pcasl() -> dict[str, Any]:
    n_pairs = 4
    timing = _slice_timing(SHAPE[2], 0.0385)
    common = {
        "Manufacturer": "Philips", "ManufacturersModelName": "Achieva", "SoftwareVersions": "5.1.7_5.1.7.2",
        "MagneticFieldStrength": 3, "ReceiveCoilName": "MULTI_COIL", "MRAcquisitionType": "2D",
        "PulseSequenceType": "EPI", "ScanningSequence": "GR", "SequenceVariant": "SK", "ScanOptions": "FS",
        "PulseSequenceDetails": "Philips 2D EPI PCASL product", "PartialFourier": 0.421875,
        "PhaseEncodingDirection": "j", "TotalReadoutTime": 0.0149, "EchoTime": 0.015, "SliceTiming": timing,
        "FlipAngle": 90,
    }
    asl = {
        **common, "RepetitionTimePreparation": 4.4, "ArterialSpinLabelingType": "PCASL", "PostLabelingDelay": 1.8,
        "BackgroundSuppression": True, "M0Type": "Separate", "TotalAcquiredPairs": n_pairs, "VascularCrushing": False,
        "AcquisitionVoxelSize": [3.75, 3.75, 5], "BackgroundSuppressionNumberPulses": 2,
        "BackgroundSuppressionPulseTime": [1.7, 2.9],
        "LabelingLocationDescription": "~8 cm below the circle of Willis, through the proximal V3 segment of "
        "the vertebral arteries",
        "LabelingDistance": 40, "LookLocker": False, "LabelingDuration": 1.8,
    }
    # the separate M0: other entities than the series, linked to it by a path relative to the subject folder
    m0 = {**common, "EchoTime": 0.015001, "RepetitionTimePreparation": 9,
          "IntendedFor": "perf/sub-01_asl.nii.gz"}
    return {"asl": asl, "context": ["label", "control"] * n_pairs, "voxel": (3.75, 3.75, 5.0),
            "m0": {"perf/sub-01_acq-m0_m0scan": (m0, 1.0)}, "att": {"gm": 1.2, "wm": 1.5}}


def _siemens_3d_grase_pcasl() -> dict[str, Any]:
    n_pairs = 4
    asl = {
        "Manufacturer": "Siemens", "ManufacturersModelName": "Prisma_fit", "SoftwareVersions": "syngo_MR_E11",
        "MagneticFieldStrength": 3, "ReceiveCoilName": "HeadNeck_64", "ReceiveCoilActiveElements": "HC1-6",
        "MRAcquisitionType": "3D", "PulseSequenceType": "3Dgrase", "ScanningSequence": "EP", "SequenceVariant": "SK",
        "ScanOptions": "SAT1_FS", "SequenceName": "tg818I3d1_6720",
        "PulseSequenceDetails": "Siemens 3D GRASE PCASL product sequence (WIP): tgse_csl_818", "NumberShots": 4,
        "PartialFourier": 1, "EchoTime": 0.01328, "FlipAngle": 130, "RepetitionTimePreparation": 4.6,
        "ArterialSpinLabelingType": "PCASL",
        # the M0 volume comes first: BIDS gives it PostLabelingDelay and LabelingDuration 0
        "PostLabelingDelay": [0.0] + [1.8] * (2 * n_pairs), "LabelingDuration": [0.0] + [1.8] * (2 * n_pairs),
        "BackgroundSuppression": True, "M0Type": "Included", "TotalAcquiredPairs": n_pairs,
        "VascularCrushing": False, "AcquisitionVoxelSize": [3.4, 3.4, 4], "BackgroundSuppressionNumberPulses": 4,
        "BackgroundSuppressionPulseTime": [2.29, 2.925, 3.425, 3.705],
        "LabelingLocationDescription": "~8 cm below the circle of Willis, through the proximal V3 segment of "
        "the vertebral arteries",
        "LabelingDistance": 40, "LookLocker": False,
    }
    return {"asl": asl, "context": ["m0scan"] + ["control", "label"] * n_pairs, "voxel": (3.4, 3.4, 4.0),
            "att": {"gm": 1.2, "wm": 1.5}}


def _siemens_3d_grase_pasl_multi_ti() -> dict[str, Any]:
    tis = [round(0.3 * k, 1) for k in range(1, 11)]
    common = {
        "Manufacturer": "Siemens", "ManufacturersModelName": "TrioTim", "SoftwareVersions": "N4_VB17A_LATEST_20090307",
        "MagneticFieldStrength": 3, "ReceiveCoilName": "32Ch_Head", "ReceiveCoilActiveElements": "C:HEA;HEP",
        "MRAcquisitionType": "3D", "PulseSequenceType": "3Dgrase", "ScanningSequence": "RM", "SequenceVariant": "SK",
        "ScanOptions": "SAT1_FS", "PartialFourier": 1, "PhaseEncodingDirection": "j-", "FlipAngle": 180,
    }
    asl = {
        **common, "SequenceName": "grs3d3d1_512t0",
        "PulseSequenceDetails": "Bremen sequence: fme_ASL_Collection_002A for TrioTim-syngo_MR_B17",
        "NumberShots": 2, "EffectiveEchoSpacing": 0.0005, "EchoTime": 0.01192, "RepetitionTimePreparation": 3.5,
        "ArterialSpinLabelingType": "PASL", "PostLabelingDelay": [ti for ti in tis for _ in range(2)],
        "BackgroundSuppression": True, "M0Type": "Separate", "TotalAcquiredPairs": len(tis),
        "VascularCrushing": False, "AcquisitionVoxelSize": [8, 4, 6], "BackgroundSuppressionNumberPulses": 2,
        "BackgroundSuppressionPulseTime": [0.15, 0.2],
        "LabelingLocationDescription": "Labeling slab parallel to the imaging volume with a 2cm gap",
        "LabelingDistance": 10, "PASLType": "FAIR", "LabelingSlabThickness": 115.5, "BolusCutOffFlag": True,
        "BolusCutOffDelayTime": [0.7, 1.6], "BolusCutOffTechnique": "Q2TIPS",
    }
    m0 = {**common, "SequenceName": "grs3d3d1_1152t0", "PulseSequenceDetails": "Bremen sequence: fme_ASL_Collection_002A",
          "EffectiveEchoSpacing": 0.00052, "TotalReadoutTime": 0.0104, "EchoTime": 0.01614,
          "RepetitionTimePreparation": 6, "IntendedFor": "perf/sub-01_asl.nii.gz"}
    return {"asl": asl, "context": ["control", "label"] * len(tis), "voxel": (4.0, 4.0, 6.0),
            "m0": {"perf/sub-01_m0scan": (m0, 1.0)}, "att": {"gm": 0.7, "wm": 0.9}}


def _siemens_2d_epi_pasl_single_ti() -> dict[str, Any]:
    n_pairs = 5
    n = 1 + 2 * n_pairs
    asl = {
        "Manufacturer": "Siemens", "ManufacturersModelName": "Skyra", "SoftwareVersions": "syngo_MR_E11",
        "MagneticFieldStrength": 3, "ReceiveCoilName": "Head_32", "MRAcquisitionType": "2D",
        "PulseSequenceType": "EPI", "ScanningSequence": "EP", "SequenceVariant": "SK", "ScanOptions": "FS",
        "SequenceName": "epfid2d1_64", "PulseSequenceDetails": "Siemens 2D EPI PASL product sequence: ep2d_pasl",
        "PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.0279, "EchoTime": 0.013, "FlipAngle": 90,
        "SliceTiming": _slice_timing(SHAPE[2], 0.0475), "RepetitionTimePreparation": 2.5,
        "ArterialSpinLabelingType": "PASL",
        # the M0 (first volume) is read without labeling: TI 0 there
        "PostLabelingDelay": [0.0] + [1.8] * (n - 1),
        "BackgroundSuppression": False, "M0Type": "Included", "TotalAcquiredPairs": n_pairs,
        "VascularCrushing": False, "AcquisitionVoxelSize": [3.4, 3.4, 6], "PASLType": "PICORE",
        "LabelingSlabThickness": 100, "BolusCutOffFlag": True, "BolusCutOffDelayTime": [0.7, 1.6],
        "BolusCutOffTechnique": "Q2TIPS",
    }
    return {"asl": asl, "context": ["m0scan"] + ["label", "control"] * n_pairs, "voxel": (3.4, 3.4, 6.0),
            "att": {"gm": 0.7, "wm": 0.9}}


def _siemens_2d_epi_pcasl_multi_pld(m0_in_fmap: bool) -> dict[str, Any]:
    plds = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    repeats = 2
    common = {
        "Manufacturer": "Siemens", "ManufacturersModelName": "TrioTim", "MagneticFieldStrength": 3,
        "MRAcquisitionType": "2D", "PulseSequenceType": "EPI", "TotalReadoutTime": 0.06, "EchoTime": 0.014,
        "SliceTiming": _slice_timing(SHAPE[2], 0.0452), "FlipAngle": 90,
    }
    asl = {
        **common, "PhaseEncodingDirection": "j-", "RepetitionTimePreparation": 4.05,
        "ArterialSpinLabelingType": "PCASL",
        "PostLabelingDelay": [pld for pld in plds for _ in range(2 * repeats)],
        "BackgroundSuppression": True, "M0Type": "Separate", "TotalAcquiredPairs": len(plds) * repeats,
        "VascularCrushing": False, "AcquisitionVoxelSize": [3.4375, 3.4375, 4.05],
        "BackgroundSuppressionNumberPulses": 2, "BackgroundSuppressionPulseTime": [1.428, 1.604],
        "LabelingLocationDescription": "~8 cm below the circle of Willis, through the proximal V3 segment of "
        "the vertebral arteries",
        "LookLocker": False, "LabelingEfficiency": 0.88, "PCASLType": "balanced", "LabelingDuration": 1.4,
        "LabelingPulseAverageGradient": 0.8, "LabelingPulseMaximumGradient": 6, "LabelingPulseDuration": 0.6,
        "LabelingPulseFlipAngle": 20, "LabelingPulseInterval": 1,
    }
    same = {**common, "PhaseEncodingDirection": "j-", "RepetitionTimePreparation": 4.8}
    reversed_pe = {**common, "PhaseEncodingDirection": "j", "RepetitionTimePreparation": 4.8}
    # the reversed-phase-encoding image is distorted the other way: its intensities differ (here by 0.8), so
    # quantifying with it would show
    if m0_in_fmap:  # the pepolar pair in fmap/ both name the series; the one read like the series is its M0
        target = "bids::sub-01/perf/sub-01_asl.nii.gz"
        m0 = {"fmap/sub-01_dir-ap_m0scan": ({**same, "IntendedFor": target}, 1.0),
              "fmap/sub-01_dir-pa_m0scan": ({**reversed_pe, "IntendedFor": target}, 0.8)}
    else:  # as bids-examples asl004: the M0 in perf/, its reversed twin in fmap/ for distortion correction
        m0 = {"perf/sub-01_m0scan": ({**same, "IntendedFor": "bids::sub-01/perf/sub-01_asl.nii.gz"}, 1.0),
              "fmap/sub-01_dir-pa_m0scan": ({**reversed_pe, "IntendedFor": "perf/sub-01_m0scan.nii.gz"}, 0.8)}
    return {"asl": asl, "context": ["control", "label"] * (len(plds) * repeats), "voxel": (3.4375, 3.4375, 4.05),
            "m0": m0, "att": {"gm": 1.0, "wm": 1.3}}


def _spec(kind: str) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"unknown vendor dataset {kind!r}; choose one of {KINDS}")
    builders = {
        "ge_3d_spiral_pcasl": _ge_3d_spiral_pcasl,
        "philips_2d_epi_pcasl": _philips_2d_epi_pcasl,
        "siemens_3d_grase_pcasl": _siemens_3d_grase_pcasl,
        "siemens_3d_grase_pasl_multi_ti": _siemens_3d_grase_pasl_multi_ti,
        "siemens_2d_epi_pasl_single_ti": _siemens_2d_epi_pasl_single_ti,
        "siemens_2d_epi_pcasl_multi_pld": lambda: _siemens_2d_epi_pcasl_multi_pld(False),
        "siemens_2d_epi_pcasl_multi_pld_fmap_m0": lambda: _siemens_2d_epi_pcasl_multi_pld(True),
    }
    return builders[kind]()


# --- images -------------------------------------------------------------------------------------


def tissue_map(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """0 background, 1 grey matter (the brain ellipsoid's outer shell), 2 white matter (its core)."""
    grid = np.indices(shape, dtype=np.float64)
    centre = [(n - 1) / 2 for n in shape]
    radii = [0.42 * shape[0], 0.42 * shape[1], 0.45 * shape[2]]
    r = np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, radii)))
    tissue = np.zeros(shape, dtype=np.int8)
    tissue[r <= 1.0] = 1
    tissue[r <= 0.55] = 2
    return tissue


def _saturation(repetition_time: float) -> float:
    """The fraction of M0t an M0 read at this TR shows (aslbatch undoes it below 5 s)."""
    return -math.expm1(-repetition_time / T1T) if repetition_time < 5.0 else 1.0


def _as_list(value: Any, n: int) -> list[float]:
    return [float(v) for v in value] if isinstance(value, list) else [float(value)] * n


def _signal(labeling: str, cbf: float, att: float, tau: float, delay: float, alpha: float) -> float:
    """ΔM/M0t of one volume: 1C PCASL (label duration τ, PLD) or Buxton PASL (bolus τ_b, TI)."""
    if labeling == "PASL":
        return float(reference.signal_pasl(cbf, att, tau, [delay], t1b=T1B, t1t=T1T, alpha=alpha, lam=LAMBDA)[0])
    return float(reference.signal_1c(cbf, att, tau, [delay], t1b=T1B, t1t=T1T, alpha=alpha, lam=LAMBDA)[0])


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def _write_nifti(path: Path, data: np.ndarray, voxel: tuple[float, float, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*voxel, 1.0])
    affine[:3, 3] = -np.array(voxel) * np.array(SHAPE) / 2
    image = nib.Nifti1Image(data.astype(np.float32), affine)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(path))


def make_vendor_dataset(kind: str, root: str | Path, snr: float | None = None, seed: int = 0) -> VendorTruth:
    """Write the BIDS dataset ``kind`` (one of :data:`KINDS`, subject ``01``) into ``root``; its truth.

    ``snr``: None for noise-free images, else Gaussian noise on every control and label image
    with σ = (the largest grey-matter ΔM/M0t of the series) · M0t_GM / ``snr`` on their difference.
    """
    spec = _spec(kind)
    root = Path(root)
    asl = spec["asl"]
    context: list[str] = spec["context"]
    n = len(context)
    labeling = asl["ArterialSpinLabelingType"]
    alpha = asl.get("LabelingEfficiency", DEFAULT_ALPHA[labeling])
    delays = _as_list(asl["PostLabelingDelay"], n)
    taus = ([float(asl["BolusCutOffDelayTime"][0])] * n if labeling == "PASL"
            else _as_list(asl["LabelingDuration"], n))
    offsets = (np.array(asl["SliceTiming"]) - min(asl["SliceTiming"]) if asl["MRAcquisitionType"] == "2D"
               else np.zeros(SHAPE[2]))
    tissue = tissue_map()
    names = {1: "gm", 2: "wm"}
    cbf = np.full(SHAPE, np.nan)
    att = np.full(SHAPE, np.nan)
    m0t = np.zeros(SHAPE)
    for code, name in names.items():
        cbf[tissue == code] = CBF[name]
        att[tissue == code] = spec["att"][name]
        m0t[tissue == code] = M0T[name]

    # ΔM/M0t per tissue, slice and volume (every voxel of a tissue in a slice has the same)
    ratio = np.zeros(SHAPE + (n,))
    for code, name in names.items():
        for z, offset in enumerate(offsets):
            for v, kind_v in enumerate(context):
                if kind_v in ("control", "label", "deltam"):
                    value = _signal(labeling, CBF[name], spec["att"][name], taus[v], delays[v] + offset, alpha)
                    ratio[tissue[:, :, z] == code, z, v] = value
    deltam = ratio * m0t[..., None]
    repetition_time = _as_list(asl["RepetitionTimePreparation"], n)
    baseline = (0.15 if asl.get("BackgroundSuppression") else 0.9) * m0t
    rng = np.random.default_rng(seed)
    sigma = 0.0
    if snr is not None:
        peak = max(_signal(labeling, CBF["gm"], spec["att"]["gm"], taus[v], delays[v], alpha)
                   for v in range(n) if context[v] != "m0scan")
        sigma = peak * M0T["gm"] / snr / math.sqrt(2.0)
    data = np.zeros(SHAPE + (n,))
    for v, kind_v in enumerate(context):
        if kind_v == "m0scan":
            data[..., v] = m0t * _saturation(repetition_time[v])
        elif kind_v == "deltam":
            data[..., v] = deltam[..., v] + (rng.normal(0.0, sigma * math.sqrt(2.0), SHAPE) if sigma else 0.0)
        else:
            image = baseline - (deltam[..., v] if kind_v == "label" else 0.0)
            data[..., v] = image + (rng.normal(0.0, sigma, SHAPE) if sigma else 0.0)

    voxel = spec["voxel"]
    perf = root / "sub-01" / "perf"
    _write_json(root / "dataset_description.json",
                {"Name": f"aslbatch vendor fixture: {kind}", "BIDSVersion": "1.9.0", "DatasetType": "raw"})
    _write_json(perf / "sub-01_asl.json", asl)
    (perf / "sub-01_aslcontext.tsv").write_text("\n".join(["volume_type", *context]) + "\n")
    _write_nifti(perf / "sub-01_asl.nii.gz", data, voxel)
    m0_file = None
    for stem, (meta, scale) in spec.get("m0", {}).items():
        if scale == 1.0:  # the M0 of the series (a reversed-phase-encoding twin is scaled)
            m0_file = f"sub-01/{stem}.nii.gz"
        path = root / "sub-01" / stem
        _write_json(path.with_name(path.name + ".json"), meta)
        image = scale * m0t * _saturation(float(meta["RepetitionTimePreparation"]))
        _write_nifti(path.with_name(path.name + ".nii.gz"), image, voxel)

    asl_delays = sorted({d for d, k in zip(delays, context) if k in ("control", "label", "deltam")})
    n_asl = sum(k in ("control", "label", "deltam") for k in context)
    per_condition = (n_asl // 2 if "control" in context else n_asl) // len(asl_delays)
    return VendorTruth(kind=kind, root=root, source_name="sub-01", tissue=tissue, cbf=cbf, att=att,
                       labeling=labeling, single_delay=len(asl_delays) == 1, repeated=per_condition > 1,
                       m0_file=m0_file)
