"""A brain-like digital phantom and a writer of BIDS ASL datasets with known ground truth.

:func:`make_phantom` builds 3-D ground-truth maps in API units (cbf mL/100 g/min,
att and abat s, abv mL/mL) on a grid of 3 mm isotropic voxels: an ellipsoidal
brain with a cortical grey-matter ribbon, white matter inside, a CSF-like centre
of low M0, smooth low-frequency variation drawn from the seed, and a territory
of prolonged transit such as moyamoya disease gives (the anterior two thirds of
one hemisphere: arrival times up to ~2.8 s, CBF reduced by up to 40 %).

:func:`write_bids_dataset` turns one phantom per subject into a raw BIDS dataset
that :mod:`aslbatch.bids` reads: control and label volumes interleaved as a
scanner writes them, per-volume ``_asl.json`` metadata, ``_aslcontext.tsv`` and
an M0 (a separate ``_m0scan`` or volumes included in the series). The ground
truth goes *beside* the dataset (default ``<out_dir>_groundtruth``, see
:func:`default_groundtruth_dir`), never inside it.

Noise model (exactly what :func:`write_bids_dataset` does)
------------------------------------------------------------
σ = S_ref / SNR in ΔM/M0t units (:func:`aslbatch.simulate.noise_sigma`: S_ref
is the peak 1C signal of the grey-matter reference voxel over the whole
protocol; for 2C both series together). With R = ``repeats`` control/label pairs
per PLD, every control, label and M0 image gets, at voxel v, independent noise of
standard deviation

    σ_img(v) = σ · M0t(v) · sqrt(R / 2)            (image units)

Gaussian: image = clean + σ_img·n1; Rician (default): image = |clean + σ_img·(n1 + i n2)|,
the magnitude of a complex image, with n1, n2 ~ N(0, 1). Averaging the R
control − label differences of a PLD gives ΔM with noise σ·M0t(v), so ΔM/M0t has
noise σ at every voxel, brain or background: the stated SNR. Noise scales with
the voxel's M0t (not one absolute level in image units) so that every voxel sees
the SNR ASL_MODELS.md defines; the background has a small M0 pedestal
(:data:`M0_BACKGROUND`) so that ΔM/M0t is defined there too. The clean control
is M0t(v)·(1 − e^(−t/T1t)) with t = τ + PLD (saturation recovery from a
pre-saturation at the start of labeling); the clean label is control − ΔM with
ΔM = model.signal(params)·M0t. Control and label are ~1000 σ_img, so the Rician
magnitude is Gaussian but for a bias σ_img²/(2·control) that cancels in ΔM. The M0 images are M0t itself (RepetitionTimePreparation
6 s: fully relaxed, no saturation correction) plus the same σ_img noise, whose
effect on ΔM/M0t is second order (relative σ·sqrt(R/2) ~ 1e-3 of the signal).
SNR = inf writes noise-free images.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from ._version import __version__
from .atomic import atomic_open, atomic_path
from .models import MODELS, KineticModel, get_model
from .protocol import MAX_TIME_S, Constants, Protocol, default_protocol
from .simulate import NOISE_MODELS, add_noise, noise_sigma, reference_signal_level

__all__ = [
    "GROUNDTRUTH_SUFFIX",
    "M0_BACKGROUND",
    "TISSUE_CLASSES",
    "Phantom",
    "default_groundtruth_dir",
    "make_phantom",
    "apply_rigid_motion",
    "band_limit",
    "motion_trajectory",
    "phantom_affine",
    "write_bids_dataset",
]

#: voxel edge (mm) of the phantom grid
VOXEL_SIZE_MM = 3.0
#: tissue class labels of :attr:`Phantom.tissue`
TISSUE_CLASSES = {0: "background", 1: "grey matter", 2: "white matter", 3: "CSF-like centre"}
#: per tissue: cbf (mL/100 g/min), att (s), abv (mL/mL), M0t (a.u.) before modulation.
#: The CSF-like centre is ventricles in partial volume with periventricular tissue:
#: low M0t and low, late perfusion.
TISSUE_PROPERTIES = {
    "gm": {"cbf": 60.0, "att": 1.2, "abv": 0.015, "m0": 1050.0},
    "wm": {"cbf": 22.0, "att": 1.6, "abv": 0.005, "m0": 900.0},
    "csf": {"cbf": 10.0, "att": 1.8, "abv": 0.002, "m0": 600.0},
}
#: relative amplitude of the smooth modulation of each property (peak, over the grid)
MODULATION = {"cbf": 0.15, "att": 0.08, "abv": 0.30, "m0": 0.06}
#: M0 (a.u.) outside the head: a small pedestal so ΔM/M0t is defined everywhere
M0_BACKGROUND = 10.0
#: arrival time (s) the prolonged-transit territory tends to at full severity
PROLONGED_ATT_S = 2.8
#: relative CBF loss and relative abv gain (collaterals) at full severity
PROLONGED_CBF_LOSS = 0.40
PROLONGED_ABV_GAIN = 0.30
#: 2C: att − abat in normal tissue (s); abat is kept in ABAT_LIMITS_S (s), so in the
#: prolonged-transit territory the gap widens (up to ~1.4 s, inside the 2C training range)
GAP_RANGE_S = (0.2, 0.8)
ABAT_LIMITS_S = (0.3, 1.45)
#: 2C: upper limit of att (s), below the 2C training range's 3.0 s
ATT_MAX_2C_S = 2.9
#: cortical ribbon thickness (mm) and its relative gyral wobble
GM_THICKNESS_MM = 9.0
GM_WOBBLE = 0.4

#: the default ground-truth folder is the dataset folder's name plus this
GROUNDTRUTH_SUFFIX = "_groundtruth"
BIDS_VERSION = "1.9.0"
#: acq labels of the non-crushed and crushed series of a 2C subject
ACQ_LABELS = {False: "nocrush", True: "dante"}
ECHO_TIME_S = 0.012
#: RepetitionTimePreparation (s) of M0 images: long enough that M0 is fully relaxed
M0_TR_S = 6.0
#: time (s) after the latest readout until the next preparation (readout, presaturation)
READOUT_S = 0.7
FIELD_STRENGTH_T = 3
MANUFACTURER = "aslbatch (digital phantom)"
PULSE_SEQUENCE_DETAILS = "simulated sequential multi-delay PCASL, aslbatch.phantom"
PASL_SEQUENCE_DETAILS = "simulated multi-TI FAIR PASL with Q2TIPS bolus cut-off, aslbatch.phantom"
#: Q2TIPS saturates the labeled slab from τ_b to τ_b + this (s): BIDS example asl003 gives [0.7, 1.6]
Q2TIPS_TRAIN_S = 0.9
#: the models a phantom can be written for
PHANTOM_MODELS = ("1c", "2c", "pasl")
M0_SIDECAR = {"Units": "arbitrary units", "Description": "tissue M0 (M0t) without noise: the m0scan images are this plus noise"}


# --- the phantom -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Phantom:
    """Ground truth of one digital brain (3-D maps on one grid, RAS+ world, mm).

    Attributes
    ----------
    model : ``"1c"`` or ``"2c"``; a 2C phantom also has ``abv`` and ``abat``.
    cbf : mL/100 g/min (float32); 0 outside ``mask``.
    att : s (float32); NaN outside ``mask`` (no flow, no arrival).
    abv : mL/mL (float32, 2C only, else None); 0 outside ``mask``.
    abat : s (float32, 2C only, else None); NaN outside ``mask``.
    m0 : tissue M0t (float32, arbitrary units): ~1000 in the brain, lower in the
        CSF-like centre, :data:`M0_BACKGROUND` outside.
    mask : brain mask (bool); zero perfusion outside.
    tissue : tissue class per voxel (uint8, :data:`TISSUE_CLASSES`), largest fraction wins.
    territory : weight (float32, 0..1) of the prolonged-transit territory.
    side : hemisphere of that territory, ``"left"`` or ``"right"``.
    affine : voxel-to-world (mm) affine, 3 mm isotropic voxels, centred on the grid.
    seed : the seed the maps were drawn from.
    """

    model: str
    cbf: np.ndarray
    att: np.ndarray
    abv: np.ndarray | None
    abat: np.ndarray | None
    m0: np.ndarray
    mask: np.ndarray
    tissue: np.ndarray
    territory: np.ndarray
    side: str
    affine: np.ndarray
    seed: Any

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape (3 ints)."""
        return tuple(self.mask.shape)  # type: ignore[return-value]

    @property
    def param_names(self) -> tuple[str, ...]:
        """The parameters of the phantom's model, in the model's order."""
        return MODELS[self.model].param_names

    def maps(self) -> dict[str, np.ndarray]:
        """The parameter maps by name, in the model's order."""
        return {name: getattr(self, name) for name in self.param_names}

    def params(self, names: Sequence[str] | None = None) -> np.ndarray:
        """Parameters of the brain voxels, float64 (n_mask_voxels, len(names)), C order of the mask.

        ``names`` default to :attr:`param_names`; a 2C phantom also serves a 1C
        model with ``names=("cbf", "att")``.
        """
        names = self.param_names if names is None else tuple(names)
        missing = [name for name in names if getattr(self, name, None) is None]
        if missing:
            raise ValueError(f"a {self.model} phantom has no map for {missing}")
        return np.stack([getattr(self, name)[self.mask] for name in names], axis=-1).astype(np.float64)

    def clean_signal(self, model: KineticModel, slice_timing: Sequence[float] | None = None) -> np.ndarray:
        """Noise-free ΔM/M0t for ``model``, float64 (*shape, n_volumes); 0 outside the mask.

        ``slice_timing`` (s, one per slice along the last axis): a 2D readout, where slice k
        is read ``slice_timing[k]`` after each PLD.
        """
        out = np.zeros((*self.shape, model.n_volumes), dtype=np.float64)
        if slice_timing is None:
            out[self.mask] = model.signal(self.params(model.param_names))
            return out
        params = np.zeros((*self.shape, model.n_params))
        params[self.mask] = self.params(model.param_names)
        for k, offset in enumerate(slice_timing):
            slice_model = model.shifted(offset)
            inside = self.mask[..., k]
            out[..., k, :][inside] = slice_model.signal(params[..., k, :][inside])
        return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _smooth_field(rng: np.random.Generator, u: np.ndarray, n_terms: int = 4, max_freq: float = 0.8) -> np.ndarray:
    """A smooth random field in [-1, 1]: a sum of plane cosines of low frequency.

    ``u``: head-normalised coordinates (3, *shape), the head spanning [-1, 1]; the
    frequencies are at most ``max_freq`` half-cycles per unit.
    """
    field = np.zeros(u.shape[1:])
    for _ in range(n_terms):
        freq = rng.uniform(-max_freq, max_freq, 3)
        phase = rng.uniform(0.0, 2.0 * np.pi)
        field += np.cos(np.pi * np.tensordot(freq, u, axes=1) + phase)
    peak = np.abs(field).max()
    return field / peak if peak > 0 else field


def phantom_affine(shape: Sequence[int], voxel_size_mm: float = VOXEL_SIZE_MM) -> np.ndarray:
    """RAS+ affine of ``voxel_size_mm`` isotropic voxels with the grid centre at (0, 0, 0) mm.

    Axis 0 runs left → right, 1 posterior → anterior, 2 inferior → superior.
    """
    affine = np.diag([voxel_size_mm] * 3 + [1.0])
    affine[:3, 3] = -voxel_size_mm * (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    return affine


def make_phantom(
    shape: Sequence[int] = (40, 48, 12),
    model: str = "1c",
    seed: int | Sequence[int] = 0,
    *,
    voxel_size_mm: float = VOXEL_SIZE_MM,
    prolonged_transit: bool = True,
) -> Phantom:
    """A brain-like phantom with ground-truth maps for ``model`` (``"1c"``, ``"2c"`` or ``"pasl"``,
    whose maps are the 1C phantom's: cbf and att).

    Geometry (world mm, grid centre at 0): an ellipsoidal brain (semi-axes about
    0.43, 0.45 and 0.8 of the grid's extent, the last larger than the slab so that
    every slice is a full axial section) jittered per seed. In each axial slice,
    voxels within ~9 mm (with a gyral wobble) of the brain's edge are grey matter,
    deeper ones white matter, and an ellipsoid at the centre is CSF-like; the
    boundaries are one voxel wide partial-volume blends.

    Values: GM cbf 60, att 1.2 s, abv 0.015; WM cbf 22, att 1.6 s, abv 0.005;
    CSF-like centre cbf 10, att 1.8 s, abv 0.002, each modulated by a smooth field
    drawn from the seed (peak ±15 % cbf, ±8 % att, ±30 % abv); M0t 1050 / 900 / 600
    with a ±6 % smooth bias. The prolonged-transit territory (``prolonged_transit``,
    the anterior two thirds of one hemisphere, side drawn from the seed, severity
    0.85–1) pulls att towards 2.8 s, lowers cbf by up to 40 % and raises abv by up
    to 30 % (collaterals). 2C: abat = att − gap, gap a smooth field in 0.2–0.8 s,
    abat kept in [0.3, 1.45] s (so in the delayed territory the gap widens, up to
    1.4 s) and att ≤ 2.9 s: every brain voxel is inside the 2C training ranges;
    a 1C phantom's att lies in 1.0–2.9 s, inside 1C's 0.5–3.5 s.

    Outside the mask cbf and abv are 0 and att and abat NaN. The same seed gives
    the same phantom; for one seed, the 1C and 2C phantoms share cbf, att, m0 and
    the geometry. ``seed`` is an int or a sequence of ints (numpy ``default_rng``).
    """
    if model not in PHANTOM_MODELS:
        raise ValueError(f"model must be one of {PHANTOM_MODELS}, got {model!r}")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive ints, got {shape}")
    if not (math.isfinite(voxel_size_mm) and voxel_size_mm > 0):
        raise ValueError(f"voxel_size_mm must be > 0, got {voxel_size_mm!r}")
    rng = np.random.default_rng(seed)
    # every draw happens in the same order whatever the options: same seed, same maps
    centre = rng.uniform(-0.5, 0.5, 3) * voxel_size_mm
    semi_axes = np.array([0.43, 0.45, 0.8]) * np.array(shape) * voxel_size_mm * rng.uniform(0.95, 1.03, 3)
    wobble_cycles = int(rng.integers(6, 10))
    wobble_phase = rng.uniform(0.0, 2.0 * np.pi)
    side_sign = float(rng.choice([-1.0, 1.0]))  # -1: left (x < 0 in RAS)
    severity = rng.uniform(0.85, 1.0)

    affine = phantom_affine(shape, voxel_size_mm)
    index = np.indices(shape, dtype=np.float64)
    world = np.tensordot(affine[:3, :3], index, axes=1) + affine[:3, 3].reshape(3, 1, 1, 1)
    u = (world - centre.reshape(3, 1, 1, 1)) / semi_axes.reshape(3, 1, 1, 1)
    f_cbf, f_att, f_abv, f_gap, f_m0 = (_smooth_field(rng, u) for _ in range(5))

    radius = np.sqrt((u**2).sum(axis=0))
    mask = radius <= 1.0

    # in-plane depth below the brain's edge (mm), along the ray from the slice's centre
    section = np.sqrt(np.clip(1.0 - u[2] ** 2, 1e-6, None))  # the slice's ellipse, relative size
    rho = np.hypot(u[0], u[1]) / section
    theta = np.arctan2(u[1] * semi_axes[1], u[0] * semi_axes[0])
    ray_length = section / np.hypot(np.cos(theta) / semi_axes[0], np.sin(theta) / semi_axes[1])
    depth = (1.0 - rho) * ray_length
    thickness = GM_THICKNESS_MM * (1.0 + GM_WOBBLE * np.cos(wobble_cycles * theta + wobble_phase + 0.1 * world[2]))
    edge_mm = 0.35 * voxel_size_mm
    gm = _sigmoid((thickness - depth) / edge_mm)
    centre_radius = np.sqrt((u[0] / 0.15) ** 2 + ((u[1] - 0.05) / 0.38) ** 2 + (u[2] / 0.7) ** 2)
    csf = _sigmoid((1.0 - centre_radius) / 0.12)
    fractions = {"gm": (1.0 - csf) * gm, "wm": (1.0 - csf) * (1.0 - gm), "csf": csf}

    def blend(name: str, modulation: np.ndarray) -> np.ndarray:
        base = sum(fractions[t] * TISSUE_PROPERTIES[t][name] for t in fractions)
        return base * (1.0 + MODULATION[name] * modulation)

    cbf = blend("cbf", f_cbf)
    att = blend("att", f_att)
    abv = blend("abv", f_abv)
    m0 = blend("m0", f_m0)

    territory = np.zeros(shape)
    if prolonged_transit:
        territory = severity * _sigmoid(side_sign * u[0] / 0.07) * _sigmoid((u[1] + 0.3) / 0.1)
    late_att = PROLONGED_ATT_S * (1.0 + 0.03 * f_att)
    att = att + territory * (late_att - att)
    cbf = cbf * (1.0 - PROLONGED_CBF_LOSS * territory)
    abv = abv * (1.0 + PROLONGED_ABV_GAIN * territory)
    att = np.clip(att, 0.5, ATT_MAX_2C_S)
    gap_mid, gap_half = sum(GAP_RANGE_S) / 2.0, (GAP_RANGE_S[1] - GAP_RANGE_S[0]) / 2.0
    abat = np.clip(att - (gap_mid + gap_half * f_gap), *ABAT_LIMITS_S)

    tissue = np.zeros(shape, dtype=np.uint8)
    stacked = np.stack([fractions["gm"], fractions["wm"], fractions["csf"]])
    tissue[mask] = (np.argmax(stacked, axis=0) + 1)[mask].astype(np.uint8)

    def finish(values: np.ndarray, outside: float) -> np.ndarray:
        return np.where(mask, values, outside).astype(np.float32)

    two = model == "2c"
    return Phantom(
        model=model,
        cbf=finish(cbf, 0.0),
        att=finish(att, np.nan),
        abv=finish(abv, 0.0) if two else None,
        abat=finish(abat, np.nan) if two else None,
        m0=finish(m0, M0_BACKGROUND),
        mask=mask,
        tissue=tissue,
        territory=finish(territory, 0.0),
        side="left" if side_sign < 0 else "right",
        affine=affine,
        seed=seed if isinstance(seed, int) else [int(s) for s in seed],
    )


# --- motion ---------------------------------------------------------------------------------

#: sudden position changes ("jerks") in a simulated motion trajectory, on top of the drift
MOTION_JERKS = 3


def motion_trajectory(n_volumes: int, max_motion: float, rng: np.random.Generator, *,
                      jerks: int = MOTION_JERKS) -> np.ndarray:
    """A head's rigid motion over ``n_volumes``: (n, 6) trans_x, trans_y, trans_z (mm), rot_x, rot_y,
    rot_z (rad), as :func:`aslbatch.motion.rigid_matrix` reads them. A random drift (a smoothed
    random walk) plus ``jerks`` sudden steps that persist, scaled so that the largest translation
    is ``max_motion`` mm and the largest rotation ``max_motion`` degrees. 0 gives no motion."""
    if not (math.isfinite(max_motion) and max_motion >= 0):
        raise ValueError(f"max_motion must be a number of mm >= 0, got {max_motion!r}")
    params = np.zeros((n_volumes, 6))
    if max_motion == 0 or n_volumes == 0:
        return params
    walk = np.cumsum(rng.normal(size=(n_volumes, 6)), axis=0)
    kernel = np.ones(5) / 5.0
    drift = np.stack([np.convolve(np.pad(walk[:, j], 2, mode="edge"), kernel, mode="valid") for j in range(6)], 1)
    steps = np.zeros((n_volumes, 6))
    for start in rng.integers(1, max(n_volumes, 2), size=jerks):
        steps[start:] += rng.normal(scale=2.0 * drift.std(axis=0) + 1e-12, size=6)
    params = drift + steps
    params -= params[0]
    for block, limit in ((slice(0, 3), max_motion), (slice(3, 6), math.radians(max_motion))):
        peak = np.abs(params[:, block]).max()
        params[:, block] *= limit / peak if peak > 0 else 0.0
    return params


def apply_rigid_motion(volumes: np.ndarray, params: np.ndarray, voxel_size_mm: float = VOXEL_SIZE_MM, *,
                       order: int = 3) -> np.ndarray:
    """The head of ``volumes`` (x, y, z, n) moved by ``params`` (n, 6) (mm, rad): volume k becomes
    ``moved(P_k(x)) = volumes(x)``, P_k the rigid transform about the grid centre of
    :func:`aslbatch.motion.rigid_matrix`; spline resampling of ``order`` (scipy.ndimage.affine_transform;
    3 cubic, 0 nearest for labels), points outside the grid take the nearest edge value (a slab: the
    head continues beyond it)."""
    from scipy import ndimage

    from .motion import grid_centre, rigid_matrix

    volumes = np.asarray(volumes, dtype=np.float64)
    scale = np.full(3, float(voxel_size_mm))
    inverse = np.linalg.inv(rigid_matrix(params, grid_centre(volumes.shape, scale)))
    out = np.empty_like(volumes)
    for k in range(volumes.shape[3]):
        # output voxel o at x = S o comes from P^-1(x) in the still head: index S^-1 P^-1 S o
        matrix = inverse[k, :3, :3] * scale[None, :] / scale[:, None]
        offset = inverse[k, :3, 3] / scale
        out[..., k] = ndimage.affine_transform(volumes[..., k], matrix, offset, order=order, mode="nearest")
    return out


#: full width at half maximum (voxels) of the imaging point-spread function :func:`band_limit` applies
#: when asked (``write_bids_dataset(psf_fwhm=...)``): about that of a Hann-filtered k-space readout
PSF_FWHM_VOXELS = 2.0


def band_limit(volumes: np.ndarray, fwhm_voxels: float) -> np.ndarray:
    """``volumes`` (x, y, z[, n]) as a scanner would image them: each 3-D volume convolved with a
    Gaussian point-spread function of ``fwhm_voxels`` (voxels, full width at half maximum, along
    each of the three axes; scipy.ndimage.gaussian_filter, edges continued by the nearest voxel: a
    slab). The phantom's tissue classes jump from one voxel to the next (M0 ~1000 to 10 at the
    brain's edge); real images are band-limited by the k-space they were sampled from (a Hann
    window's PSF is ~2 voxels wide), so their edges spread over a few voxels and resampling them
    (motion, its correction) interpolates smooth data. 0 returns a copy."""
    from scipy import ndimage

    if not (math.isfinite(fwhm_voxels) and fwhm_voxels >= 0):
        raise ValueError(f"fwhm_voxels must be a number of voxels >= 0, got {fwhm_voxels!r}")
    volumes = np.asarray(volumes, dtype=np.float64)
    if fwhm_voxels == 0:
        return volumes.copy()
    sigma = fwhm_voxels / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    sigmas = (sigma, sigma, sigma) + (0.0,) * (volumes.ndim - 3)
    return ndimage.gaussian_filter(volumes, sigmas, mode="nearest")


# --- writing ------------------------------------------------------------------------------


def default_groundtruth_dir(out_dir: str | os.PathLike) -> Path:
    """Where :func:`write_bids_dataset` puts the ground truth by default: ``<out_dir>_groundtruth``."""
    out = Path(out_dir).resolve()
    return out.with_name(out.name + GROUNDTRUTH_SUFFIX)


def _write_json(path: Path, data: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=2, allow_nan=False) + "\n")


def _write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, tr_s: float | None = None) -> None:
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
    if data.ndim == 4 and tr_s is not None:
        image.header.set_zooms((*image.header.get_zooms()[:3], tr_s))
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(image, str(tmp))


def _check_empty(path: Path, what: str, exist_ok: bool) -> None:
    if not exist_ok and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{what} {path} exists and is not empty (pass exist_ok=True to write over it)")


def _series_plan(model: str, protocol: Protocol) -> list[tuple[str | None, np.ndarray, bool]]:
    """(acq label or None, indices into the protocol, crushed) of each series of a subject."""
    parts = [(flag, np.flatnonzero(protocol.crushed == flag)) for flag in (False, True)]
    parts = [(flag, idx) for flag, idx in parts if idx.size]
    if model == "2c":
        if len(parts) != 2:
            raise ValueError("model 2c needs a protocol with both non-crushed and crushed volumes")
        return [(ACQ_LABELS[flag], idx, flag) for flag, idx in parts]
    if len(parts) != 1:
        raise ValueError(f"model {model} needs a protocol whose volumes are all crushed or all non-crushed")
    flag, idx = parts[0]
    return [(None, idx, flag)]


def _noisy(clean: np.ndarray, sigma_img: np.ndarray, noise: str, rng: np.random.Generator) -> np.ndarray:
    """``clean`` (*shape, n) with per-voxel noise σ_img (*shape) added to every volume."""
    if not np.any(sigma_img > 0):
        return clean
    flat = clean.reshape(-1, clean.shape[-1])
    sig = np.broadcast_to(sigma_img.reshape(-1, 1), flat.shape)
    return add_noise(flat, sig, noise, rng).reshape(clean.shape)


def phantom_for(model_name: str) -> tuple[str, Protocol | None]:
    """The phantom model and protocol that stand for the model ``model_name`` in a dataset: the
    model itself at its default protocol (None) when it is time-resolved; for a closed-form model
    (``single``), its time-resolved tissue model read at the closed form's default protocol. A model
    that is not ``calibrated`` (``relative``) has none: ValueError."""
    from .models import MODELS, get_model
    from .protocol import default_protocol

    cls = MODELS.get_class(model_name)
    if not cls.calibrated:
        raise ValueError(f"the {model_name} model has no phantom: its outputs are relative to each dataset's own "
                         "reference; aslbatch run decides it for a single-delay series without M0 (M0Type Absent, "
                         "background suppressed)")
    if cls.time_resolved:
        return model_name, None
    protocol = default_protocol(model_name)
    return get_model(model_name, protocol).tissue_model().name, protocol


def write_bids_dataset(
    out_dir: str | os.PathLike,
    *,
    subjects: int = 2,
    model: str | Sequence[str] = "1c",
    snr: float = 10.0,
    seed: int = 0,
    noise: str = "rician",
    m0_type: str = "Separate",
    sessions: Sequence[str | int] | None = None,
    repeats: int = 1,
    shape: Sequence[int] = (40, 48, 12),
    protocol: Protocol | None = None,
    groundtruth_dir: str | os.PathLike | None = None,
    m0_volumes: int = 1,
    dtype: str = "float32",
    prolonged_transit: bool = True,
    exist_ok: bool = False,
    slice_timing: Sequence[float] | None = None,
    motion: float = 0.0,
    psf_fwhm: float = 0.0,
) -> Path:
    """Write a raw BIDS ASL dataset of digital phantoms; returns the dataset folder.

    Parameters
    ----------
    out_dir : the dataset folder (created; must be empty unless ``exist_ok``).
    subjects : number of subjects ``sub-01`` … ; subject k (0-based) is
        ``make_phantom(shape, model, seed=(seed, k))``.
    model : ``"1c"``: one series per subject (the default 1C protocol, PLD 1.0–3.0 s,
        τ 1.8 s). ``"pasl"``: one multi-TI FAIR Q2TIPS series (the default PASL protocol:
        PostLabelingDelay = TI, BolusCutOffDelayTime [τ_b, τ_b + 0.9 s]).
        ``"2c"``: two series, ``acq-nocrush`` (the protocol's non-crushed
        volumes) and ``acq-dante`` (its crushed volumes, VascularCrushing true),
        which :func:`aslbatch.identify.group_acquisitions` pairs into one 2C acquisition.
    snr : S_ref / σ of ΔM/M0t after averaging the repeats (module docstring); ``inf``: no noise.
    seed : non-negative int; the same seed writes byte-identical files.
    noise : ``"rician"`` (magnitude images) or ``"gaussian"``.
    m0_type : ``"Separate"`` (each series ``<name>_asl`` has its own ``<name>_m0scan``,
        IntendedFor it, with its own noise) or ``"Included"`` (``m0_volumes`` M0
        volumes first in each series).
    sessions : session labels (``ses-<label>`` folders; each session a new noise
        realisation of the same subject), or None for none.
    repeats : control/label pairs per PLD; the series loops the PLDs ``repeats`` times,
        control then label at each.
    shape : phantom grid (3 mm voxels).
    protocol : per-volume τ, PLD, crushing; default ``default_protocol(model)``.
    groundtruth_dir : where the ground truth goes (default :func:`default_groundtruth_dir`);
        must not be inside ``out_dir``.
    m0_volumes : number of M0 volumes (m0scan image or included volumes).
    dtype : NIfTI data type of the ASL and M0 images: ``"float32"`` (default; rounding
        the ~M0t-sized control and label leaves ΔM/M0t exact to ~1e-7 absolute, about
        1e-5 of S_ref) or ``"float64"`` (exact to ~1e-12, for bit-level checks).
    prolonged_transit : give every phantom its delayed (moyamoya-like) territory.
    exist_ok : write into non-empty folders (files of the same name are replaced;
        other files are left alone).
    slice_timing : a 2D readout: one time (s) per slice along the last axis, the delay
        after each PLD at which that slice is read (``SliceTiming``); None: 3D.
    motion : the head moves: every image (M0 first, then the series' volumes in order) is the
        phantom moved rigidly along :func:`motion_trajectory` (up to ``motion`` mm and degrees;
        :func:`apply_rigid_motion`) before noise is added; the applied parameters go to the ground
        truth as ``<series>_motion.tsv`` (columns trans_x … rot_z, mm and rad, one row per
        volume; M0 rows first, marked in a ``volume`` column). 0: no motion.
    psf_fwhm : the images are band-limited as a scanner's are: every image, after its motion and
        before the noise (white, of the σ ``snr`` defines), is convolved with a Gaussian
        point-spread function of this full width at half maximum (voxels; :func:`band_limit`,
        :data:`PSF_FWHM_VOXELS` is a Hann-filtered readout's). The phantom's tissue classes jump
        from one voxel to the next, so moving it and correcting the motion interpolates its edges
        twice and leaves errors larger than ΔM on grey matter (README "Motion"); compare a moving
        phantom with a still one written with the same ``psf_fwhm``. The ground-truth maps stay
        the phantom's own (not blurred). 0: the images are the phantom's voxels.

    Ground truth layout: ``<groundtruth_dir>/groundtruth.json`` (model, protocol,
    constants, snr, σ, S_ref, noise model, seeds, per subject the phantom seed and
    delayed side) and, per subject, ``sub-XX/sub-XX_<name>.nii.gz`` + ``.json``
    (Units, Description) for each model parameter (float32; cbf and abv 0, att
    and abat NaN outside the mask), ``m0`` (noise-free M0t, float32), ``mask``
    (uint8), ``dseg`` (uint8 tissue classes, labels in its JSON) and ``territory``
    (float32 weight of the delayed territory). Sessions share their subject's truth.
    """
    models = [model] * int(subjects) if isinstance(model, str) else [str(m) for m in model]
    if len(models) != subjects or not all(m in PHANTOM_MODELS for m in models):
        raise ValueError(f"model must be one of {PHANTOM_MODELS}, or one of them per subject ({subjects}), "
                         f"got {model!r}")
    if protocol is not None and len(set(models)) > 1:
        raise ValueError("a protocol can only be given when every subject has the same model")
    model = models[0]  # the dataset-level description names the first subject's model
    if noise not in NOISE_MODELS:
        raise ValueError(f"noise must be one of {NOISE_MODELS}, got {noise!r}")
    if m0_type not in ("Separate", "Included"):
        raise ValueError(f"m0_type must be 'Separate' or 'Included', got {m0_type!r}")
    if not (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    for name, value in (("subjects", subjects), ("repeats", repeats), ("m0_volumes", m0_volumes)):
        if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    seed, subjects, repeats, m0_volumes = int(seed), int(subjects), int(repeats), int(m0_volumes)
    if slice_timing is not None:
        slice_timing = [float(v) for v in slice_timing]
        if len(slice_timing) != int(shape[2]) or not all(0.0 <= v < MAX_TIME_S for v in slice_timing):
            raise ValueError(f"slice_timing must give one time in [0, {MAX_TIME_S:g}) s per slice "
                             f"({int(shape[2])}), got {slice_timing!r}")
    snr = float(snr)
    if not (isinstance(motion, (int, float)) and not isinstance(motion, bool) and math.isfinite(motion)
            and motion >= 0):
        raise ValueError(f"motion must be a number of mm >= 0, got {motion!r}")
    if not (isinstance(psf_fwhm, (int, float)) and not isinstance(psf_fwhm, bool) and math.isfinite(psf_fwhm)
            and psf_fwhm >= 0):
        raise ValueError(f"psf_fwhm must be a number of voxels >= 0, got {psf_fwhm!r}")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    session_labels: list[str | None] = [None] if sessions is None else [str(s) for s in sessions]
    if sessions is not None and (not session_labels or not all(s.isalnum() for s in session_labels)):
        raise ValueError(f"sessions must be alphanumeric labels, got {sessions!r}")
    if len(set(session_labels)) != len(session_labels):
        raise ValueError(f"sessions must be distinct, got {sessions!r}")

    # what aslbatch.bids derives from the sidecars written below (α 0.98 for PASL)
    constants = MODELS[model].default_constants()
    given_protocol = protocol

    def acquisition(name: str) -> tuple[Protocol, KineticModel, list, float, float]:
        """Protocol, model, series plan, σ and S_ref of a subject with model ``name``."""
        prot = given_protocol if given_protocol is not None else default_protocol(name)
        kin = get_model(name, prot, MODELS[name].default_constants())
        return prot, kin, _series_plan(name, prot), (0.0 if snr == math.inf else float(noise_sigma(kin, snr))), \
            reference_signal_level(kin)

    protocol, kinetic, plan, sigma, s_ref = acquisition(model)

    root = Path(out_dir).resolve()
    truth_root = default_groundtruth_dir(root) if groundtruth_dir is None else Path(groundtruth_dir).resolve()
    if truth_root == root or truth_root.is_relative_to(root):
        raise ValueError(f"groundtruth_dir {truth_root} must not be inside the dataset {root}")
    _check_empty(root, "dataset folder", exist_ok)
    _check_empty(truth_root, "ground-truth folder", exist_ok)
    root.mkdir(parents=True, exist_ok=True)
    truth_root.mkdir(parents=True, exist_ok=True)

    width = max(2, len(str(subjects)))
    labels = [f"{k + 1:0{width}d}" for k in range(subjects)]
    snr_text = "inf" if snr == math.inf else f"{snr:g}"
    _write_json(root / "dataset_description.json", {
        "Name": f"aslbatch digital phantom ({model.upper()}, SNR {snr_text}, {noise} noise)",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["aslbatch"],
        "GeneratedBy": [{
            "Name": "aslbatch",
            "Version": __version__,
            "Description": f"aslbatch.phantom.write_bids_dataset(model={model!r}, snr={snr_text}, "
            f"noise={noise!r}, seed={seed}, repeats={repeats}, m0_type={m0_type!r})",
        }],
    })
    _write_text(root / "participants.tsv", "participant_id\n" + "".join(f"sub-{label}\n" for label in labels))
    _write_text(root / "README", (
        "Digital ASL phantoms written by aslbatch.phantom.write_bids_dataset.\n"
        f"Model {model}, SNR {snr_text} (S_ref / sigma of deltaM/M0t), {noise} noise, seed {seed}.\n"
        "The ground truth is outside this dataset, in the folder named in the generator's "
        f"documentation (by default this folder's name + '{GROUNDTRUTH_SUFFIX}').\n"
    ))

    subject_info = {}
    for k, label in enumerate(labels):
        sub_protocol, sub_kinetic, sub_plan, sub_sigma, sub_s_ref = acquisition(models[k])
        phantom = make_phantom(shape, models[k], seed=(seed, k), prolonged_transit=prolonged_transit)
        subject_info[f"sub-{label}"] = {"phantom_seed": [seed, k], "prolonged_transit_side": phantom.side,
                                        "model": models[k], "protocol": sub_protocol.to_dict(), "sigma": sub_sigma,
                                        "reference_signal": sub_s_ref}
        _write_groundtruth(truth_root / f"sub-{label}", f"sub-{label}", phantom)
        delta = phantom.clean_signal(sub_kinetic, slice_timing)  # ΔM/M0t (*shape, n_volumes)
        for s_index, session in enumerate(session_labels):
            _write_session(
                root, label, session, phantom, delta, sub_protocol, sub_plan,
                sigma=sub_sigma, noise=noise, m0_type=m0_type, repeats=repeats, m0_volumes=m0_volumes,
                dtype=np.dtype(dtype), seed_key=(seed, k, s_index), constants=sub_kinetic.constants,
                slice_timing=slice_timing, pulsed=models[k] == "pasl", motion=float(motion),
                psf_fwhm=float(psf_fwhm),
                truth_dir=truth_root / f"sub-{label}",
            )

    _write_json(truth_root / "groundtruth.json", {
        "model": model,
        "model_options": kinetic.options(),
        "param_names": list(kinetic.param_names),
        "param_units": list(kinetic.param_units),
        "protocol": protocol.to_dict(),
        "constants": constants.to_dict(),
        "snr": None if snr == math.inf else float(snr),
        "sigma": sigma,
        "reference_signal": s_ref,
        "noise": noise,
        "noise_model": (
            "sigma = reference_signal / snr in deltaM/M0t units; every control, label and M0 image gets "
            "noise of std sigma * M0t(v) * sqrt(repeats / 2) per voxel (gaussian: added; rician: magnitude "
            "of clean + complex noise); the mean over repeats of control - label, over M0t, has noise sigma"
        ),
        "outside_mask": "cbf and abv 0; att and abat NaN; M0t " + f"{M0_BACKGROUND:g}",
        "seed": seed,
        "repeats": repeats,
        "m0_type": m0_type,
        "m0_volumes": m0_volumes,
        "sessions": None if sessions is None else session_labels,
        "shape": list(phantom.shape),
        "voxel_size_mm": VOXEL_SIZE_MM,
        "dtype": dtype,
        "motion_mm": float(motion),
        "psf_fwhm_voxels": float(psf_fwhm),
        "subjects": subject_info,
        "generator": f"aslbatch {__version__}",
    })
    return root


def _write_groundtruth(folder: Path, prefix: str, phantom: Phantom) -> None:
    outside = {"cbf": "0", "abv": "0", "att": "NaN", "abat": "NaN"}
    for name in phantom.param_names:
        spec = MODELS[phantom.model].parameter(name)
        _write_nifti(folder / f"{prefix}_{name}.nii.gz", getattr(phantom, name), phantom.affine)
        _write_json(folder / f"{prefix}_{name}.json", {
            "Units": spec.units,
            "Description": spec.title[:1].upper() + spec.title[1:] + spec.definition,
            "OutsideMask": outside[name],
        })
    _write_nifti(folder / f"{prefix}_m0.nii.gz", phantom.m0, phantom.affine)
    _write_json(folder / f"{prefix}_m0.json", M0_SIDECAR)
    _write_nifti(folder / f"{prefix}_mask.nii.gz", phantom.mask.astype(np.uint8), phantom.affine)
    _write_json(folder / f"{prefix}_mask.json", {"Description": "brain mask (1 brain, 0 background)"})
    _write_nifti(folder / f"{prefix}_dseg.nii.gz", phantom.tissue, phantom.affine)
    _write_json(folder / f"{prefix}_dseg.json", {
        "Description": "tissue class with the largest fraction", "Labels": {str(k): v for k, v in TISSUE_CLASSES.items()},
    })
    _write_nifti(folder / f"{prefix}_territory.nii.gz", phantom.territory, phantom.affine)
    _write_json(folder / f"{prefix}_territory.json", {
        "Units": "1",
        "Description": f"weight (0..1) of the prolonged-transit (moyamoya-like) territory, {phantom.side} hemisphere",
    })


def _readout(slice_timing: Sequence[float] | None) -> dict[str, Any]:
    """Sidecar fields of the readout: 3D GRASE, or 2D EPI with its SliceTiming (s)."""
    if slice_timing is None:
        return {"MRAcquisitionType": "3D", "PulseSequenceType": "3D_GRASE"}
    return {"MRAcquisitionType": "2D", "PulseSequenceType": "2D_EPI", "SliceTiming": list(slice_timing),
            "SliceEncodingDirection": "k"}


def _write_session(
    root: Path,
    label: str,
    session: str | None,
    phantom: Phantom,
    delta: np.ndarray,
    protocol: Protocol,
    plan: list[tuple[str | None, np.ndarray, bool]],
    *,
    sigma: float,
    noise: str,
    m0_type: str,
    repeats: int,
    m0_volumes: int,
    dtype: np.dtype,
    seed_key: tuple[int, int, int],
    constants: Constants,
    slice_timing: Sequence[float] | None = None,
    pulsed: bool = False,
    motion: float = 0.0,
    psf_fwhm: float = 0.0,
    truth_dir: Path | None = None,
) -> None:
    """The ASL series (and m0scan) of one subject and session; ``pulsed``: PASL, whose protocol
    holds the bolus duration as τ and TI as PLD."""
    subject_dir = root / f"sub-{label}"
    folder = (subject_dir / f"ses-{session}" if session is not None else subject_dir) / "perf"
    stem = f"sub-{label}" + (f"_ses-{session}" if session is not None else "")
    rel_folder = folder.relative_to(root).as_posix()
    m0t = phantom.m0.astype(np.float64)
    sigma_img = sigma * m0t * math.sqrt(repeats / 2.0)
    voxel = [VOXEL_SIZE_MM] * 3
    for s_index, (acq, idx, crushed) in enumerate(plan):
        name = stem + (f"_acq-{acq}" if acq else "")
        tau = protocol.label_duration[idx]
        pld = protocol.pld[idx]
        readout = pld if pulsed else tau + pld
        baseline = -np.expm1(-readout / constants.t1t)  # control / M0t: saturation recovery since labeling began
        control = m0t[..., None] * baseline
        label_img = control - m0t[..., None] * delta[..., idx]
        # volume order: [M0 ...], then per repeat, per PLD: control, label
        pairs = np.stack([control, label_img], axis=-1).reshape(*phantom.shape, 2 * idx.size)
        volumes = [np.tile(pairs, (1, 1, 1, repeats))]
        types = ["control", "label"] * (idx.size * repeats)
        vol_pld = np.repeat(pld, 2).tolist() * repeats
        vol_tau = np.repeat(tau, 2).tolist() * repeats
        tr_asl = math.ceil(round((float(readout.max()) + READOUT_S) * 10.0, 6)) / 10.0
        vol_tr: list[float] = [tr_asl] * len(types)
        if m0_type == "Included":
            volumes.insert(0, np.repeat(m0t[..., None], m0_volumes, axis=-1))
            types = ["m0scan"] * m0_volumes + types
            vol_pld = [0.0] * m0_volumes + vol_pld
            vol_tau = [0.0] * m0_volumes + vol_tau
            vol_tr = [M0_TR_S] * m0_volumes + vol_tr
        clean = np.concatenate(volumes, axis=-1)
        m0_clean = np.repeat(m0t[..., None], m0_volumes, axis=-1)
        if motion > 0:
            n_m0 = m0_volumes if m0_type == "Separate" else 0
            trajectory = motion_trajectory(n_m0 + clean.shape[-1], motion, np.random.default_rng([*seed_key, s_index, 3]))
            clean = apply_rigid_motion(clean, trajectory[n_m0:])
            if n_m0:
                m0_clean = apply_rigid_motion(m0_clean, trajectory[:n_m0])
            rows = ["m0scan\t" if i < n_m0 else f"{types[i - n_m0]}\t" for i in range(len(trajectory))]
            _write_text(truth_dir / f"{name}_motion.tsv", "volume\ttrans_x\ttrans_y\ttrans_z\trot_x\trot_y\trot_z\n" + "".join(
                row + "\t".join(f"{v:.8g}" for v in values) + "\n" for row, values in zip(rows, trajectory)))
        if psf_fwhm > 0:  # imaged after moving: the scanner's point-spread function (band_limit)
            clean, m0_clean = band_limit(clean, psf_fwhm), band_limit(m0_clean, psf_fwhm)
        # noise streams: [seed, subject, session, series, 1 (ASL) | 2 (M0)]; the last word is
        # nonzero because numpy's SeedSequence treats a trailing 0 as absent
        rng = np.random.default_rng([*seed_key, s_index, 1])
        data = _noisy(clean, sigma_img, noise, rng).astype(dtype)
        _write_nifti(folder / f"{name}_asl.nii.gz", data, phantom.affine, tr_s=tr_asl)
        _write_text(folder / f"{name}_aslcontext.tsv", "volume_type\n" + "".join(f"{t}\n" for t in types))
        if pulsed:
            tau_b = float(tau[0])
            labeling = {"ArterialSpinLabelingType": "PASL", "PASLType": "FAIR", "BolusCutOffFlag": True,
                        "BolusCutOffTechnique": "Q2TIPS", "BolusCutOffDelayTime": [tau_b, tau_b + Q2TIPS_TRAIN_S]}
        else:
            labeling = {"ArterialSpinLabelingType": "PCASL", "PCASLType": "balanced"}
        _write_json(folder / f"{name}_asl.json", {
            **labeling,
            **_readout(slice_timing),
            "PulseSequenceDetails": PASL_SEQUENCE_DETAILS if pulsed else PULSE_SEQUENCE_DETAILS,
            "Manufacturer": MANUFACTURER,
            "MagneticFieldStrength": FIELD_STRENGTH_T,
            "EchoTime": ECHO_TIME_S,
            "FlipAngle": 90,
            "RepetitionTimePreparation": vol_tr if m0_type == "Included" else tr_asl,
            "M0Type": m0_type,
            "PostLabelingDelay": [float(v) for v in vol_pld],
            **({} if pulsed else {"LabelingDuration": [float(v) for v in vol_tau]}),
            "BackgroundSuppression": False,
            "VascularCrushing": bool(crushed),
            "LabelingEfficiency": constants.alpha,
            "TotalAcquiredPairs": int(idx.size * repeats),
            "AcquisitionVoxelSize": voxel,
        })
        if m0_type == "Separate":
            # one M0 per series, named like it: readers that pair them by name (the BIDS
            # validator 1.x requires it) and readers that follow IntendedFor both find it
            m0_rng = np.random.default_rng([*seed_key, s_index, 2])
            m0_data = _noisy(m0_clean, sigma_img, noise, m0_rng).astype(dtype)
            if m0_volumes == 1:
                m0_data = m0_data[..., 0]
            _write_nifti(folder / f"{name}_m0scan.nii.gz", m0_data, phantom.affine, tr_s=M0_TR_S)
            _write_json(folder / f"{name}_m0scan.json", {
                **_readout(slice_timing),
                "PulseSequenceDetails": PULSE_SEQUENCE_DETAILS,
                "Manufacturer": MANUFACTURER,
                "MagneticFieldStrength": FIELD_STRENGTH_T,
                "EchoTime": ECHO_TIME_S,
                "FlipAngle": 90,
                "RepetitionTimePreparation": M0_TR_S,
                "AcquisitionVoxelSize": voxel,
                "IntendedFor": [f"bids::{rel_folder}/{name}_asl.nii.gz"],
            })
