"""Digital phantoms with spatial structure and known truth, for judging estimators that use neighbourhoods.

:func:`make_spatial_phantom` builds a stack of axial slices (in-plane 64×64 voxels by default)
whose ground truth has every kind of structure a spatial method can blur or keep:

- **smooth fields**: each tissue's values vary by a low-frequency field (peak ±15 % cbf,
  ±8 % att, ±30 % abv, as :func:`aslbatch.phantom.make_phantom`);
- **sharp GM/WM edges**: a cortical ribbon (grey matter within ~4 voxels of the brain's
  edge, with a gyral wobble), two deep grey-matter discs (radius 7 voxels) and a straight
  grey-matter band 4 voxels wide across the white matter;
- **small lesions**: a 2×2-voxel square (exactly on the grid, no partial volume) at the
  centre of each disc, with half the CBF of the grey matter around it;
- **a delayed-transit territory**: one quadrant behind straight boundaries, att + 0.8 s and
  cbf × 0.7 (2C: abv × 1.3), up to the 2C phantom's limit att ≤ 2.9 s.

Tissue values are :data:`aslbatch.phantom.TISSUE_PROPERTIES` (GM cbf 60, att 1.2 s; WM cbf 22,
att 1.6 s); 2C: abat = att − gap, gap a smooth field in 0.2–0.8 s, abat in [0.3, 1.45] s.
Partial volume: every value is the mean over 4×4 sub-voxels of the value at each sub-voxel
(a blend of the parameters, as :func:`aslbatch.phantom.make_phantom` blends tissues), so
boundaries not along the grid give one-voxel blends. The mask is the voxels whose centre lies
in the brain's ellipse. Region labels (tissue × territory × lesion, per sub-voxel) give the
voxel classes the metrics use (:class:`SpatialPhantom`): *interior* (the 5×5 in-plane
neighbourhood inside the mask and of one label: no boundary within 2 voxels), *edge* (a label
boundary within one voxel: the voxel mixed or an in-plane 3×3 neighbour labelled otherwise)
and *border* (within one voxel of the mask's edge, not edge).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .phantom import TISSUE_PROPERTIES, MODULATION

__all__ = ["LESION_CBF_RATIO", "TERRITORY_ATT_DELAY_S", "SpatialPhantom", "make_spatial_phantom"]

#: sub-voxels per voxel edge (partial volume)
SUPERSAMPLE = 4
#: lesion CBF relative to the grey matter around it
LESION_CBF_RATIO = 0.5
#: the delayed-transit territory: added arrival time (s), CBF and abv factors
TERRITORY_ATT_DELAY_S, TERRITORY_CBF_FACTOR, TERRITORY_ABV_FACTOR = 0.8, 0.7, 1.3
#: cortical ribbon depth (voxels) and its relative wobble
RIBBON_VOXELS, RIBBON_WOBBLE = 4.0, 0.3
#: radius (voxels) of the deep grey-matter discs
DISC_RADIUS = 7.0
#: 2C limits as the brain phantom's (s)
GAP_RANGE_S, ABAT_LIMITS_S, ATT_MAX_S = (0.2, 0.8), (0.3, 1.45), 2.9
#: labels of the regions (tissue + TERRITORY_LABEL inside the territory)
GM, WM, LESION, TERRITORY_LABEL = 1, 2, 3, 10


@dataclass(frozen=True, eq=False)
class SpatialPhantom:
    """Ground truth of a spatial phantom (arrays of the grid's shape (nx, ny, nz); axes 0 and 1 in-plane).

    Attributes
    ----------
    model : ``"1c"`` or ``"2c"``.
    param_names : names of the last axis of ``params``.
    params : (nx, ny, nz, n_params) in API units (cbf mL/100 g/min, times s, abv mL/mL), NaN outside ``mask``.
    mask : the brain (bool).
    label : the majority region of each voxel: GM 1, WM 2, lesion 3, + 10 in the territory; 0 outside.
    interior, edge, border : voxel classes (bool, see the module docstring).
    lesions : (n_lesions, nx, ny, nz) bool, one map per lesion.
    surround : (n_lesions, nx, ny, nz) bool: the interior grey matter 2-3 voxels (in-plane
        chessboard distance) from each lesion, against which its contrast is measured.
    """

    model: str
    param_names: tuple[str, ...]
    params: np.ndarray
    mask: np.ndarray
    label: np.ndarray
    interior: np.ndarray
    edge: np.ndarray
    border: np.ndarray
    lesions: np.ndarray
    surround: np.ndarray

    def __getitem__(self, name: str) -> np.ndarray:
        """The truth map of parameter ``name``."""
        return self.params[..., self.param_names.index(name)]

    def tissue(self, which: int) -> np.ndarray:
        """Voxels whose majority label is the tissue ``which`` (GM or WM), in or out of the territory."""
        return self.mask & (self.label % TERRITORY_LABEL == which)


def _smooth(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, n_terms: int = 4) -> np.ndarray:
    """A smooth field in [-1, 1] over the plane (x, y in [-1, 1]): a sum of low-frequency plane cosines."""
    field = np.zeros_like(x)
    for _ in range(n_terms):
        fx, fy = rng.uniform(-0.8, 0.8, 2)
        field += np.cos(np.pi * (fx * x + fy * y) + rng.uniform(0.0, 2.0 * np.pi))
    return field / max(np.abs(field).max(), 1e-12)


def _slice(model: str, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Sub-voxel maps of one slice (n·SUPERSAMPLE square): region label, inside, and each parameter."""
    m = n * SUPERSAMPLE
    c = (np.arange(m) + 0.5) / SUPERSAMPLE - n / 2.0  # sub-voxel centres, voxels from the grid centre
    x, y = np.meshgrid(c, c, indexing="ij")
    ax, ay = 0.46 * n, 0.43 * n
    r = np.hypot(x / ax, y / ay)
    inside = r <= 1.0
    theta = np.arctan2(y / ay, x / ax)
    depth = (1.0 - r) * np.hypot(ax * np.cos(theta), ay * np.sin(theta))
    wobble = RIBBON_VOXELS * (1.0 + RIBBON_WOBBLE * np.cos(int(rng.integers(5, 9)) * theta + rng.uniform(0, 2 * np.pi)))
    gm = depth < wobble
    discs = [(-0.2 * n + rng.uniform(-1, 1), 0.12 * n + rng.uniform(-1, 1)),
             (0.05 * n + rng.uniform(-1, 1), -0.2 * n + rng.uniform(-1, 1))]
    for cx, cy in discs:
        gm |= np.hypot(x - cx, y - cy) <= DISC_RADIUS
    angle = rng.uniform(0.2, 0.5) * np.pi
    band = np.abs(np.cos(angle) * (x - 0.18 * n) + np.sin(angle) * (y - 0.1 * n)) <= 2.0
    gm |= band & (depth > 6.0)
    label = np.where(gm, GM, WM)
    lesion = np.zeros_like(gm)
    for cx, cy in discs:  # 2x2 voxels on the grid: their corner nearest the disc's centre
        x0, y0 = np.round(cx), np.round(cy)
        lesion |= (x >= x0 - 1) & (x < x0 + 1) & (y >= y0 - 1) & (y < y0 + 1)
    label = np.where(lesion, LESION, label)
    territory = (x > 0.08 * n) & (y > 0.02 * n)
    label = np.where(territory, label + TERRITORY_LABEL, label)
    fields = {name: _smooth(rng, x / (n / 2), y / (n / 2)) for name in ("cbf", "att", "abv", "gap")}
    props = {t: TISSUE_PROPERTIES[t] for t in ("gm", "wm")}

    def tissue_value(name: str) -> np.ndarray:
        base = np.where(gm, props["gm"][name], props["wm"][name])
        return base * (1.0 + MODULATION[name] * fields[name])

    cbf = tissue_value("cbf") * np.where(lesion, LESION_CBF_RATIO, 1.0)
    att = tissue_value("att")
    abv = tissue_value("abv")
    cbf = np.where(territory, cbf * TERRITORY_CBF_FACTOR, cbf)
    att = np.minimum(np.where(territory, att + TERRITORY_ATT_DELAY_S, att), ATT_MAX_S)
    abv = np.where(territory, abv * TERRITORY_ABV_FACTOR, abv)
    gap = GAP_RANGE_S[0] + (GAP_RANGE_S[1] - GAP_RANGE_S[0]) * 0.5 * (1.0 + fields["gap"])
    abat = np.clip(att - gap, *ABAT_LIMITS_S)
    maps = {"cbf": cbf, "att": att} if model == "1c" else {"cbf": cbf, "abv": abv, "abat": abat, "att": att}
    return {"label": label, "inside": inside, **maps}


def _blocks(values: np.ndarray) -> np.ndarray:
    """(n, n, SUPERSAMPLE²) sub-voxel values of each voxel."""
    n = values.shape[0] // SUPERSAMPLE
    return values.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE).transpose(0, 2, 1, 3).reshape(n, n, SUPERSAMPLE**2)


def _any_differs(label: np.ndarray, mask: np.ndarray, reach: int) -> np.ndarray:
    """Voxels with an in-plane neighbour within ``reach`` (chessboard) labelled otherwise, or outside ``mask``."""
    from scipy import ndimage

    size = (2 * reach + 1, 2 * reach + 1, 1)
    lo = ndimage.minimum_filter(np.where(mask, label, -1), size=size, mode="constant", cval=-1)
    hi = ndimage.maximum_filter(np.where(mask, label, -1), size=size, mode="constant", cval=-1)
    return (lo != hi) | (lo < 0)


def make_spatial_phantom(model: str = "1c", n: int = 64, n_slices: int = 4, seed: int = 0) -> SpatialPhantom:
    """A spatial phantom (module docstring) of ``n_slices`` slices of ``n``×``n`` voxels for ``model``
    (``"1c"`` or ``"2c"``); each slice's layout and smooth fields are drawn from ``seed``."""
    from scipy import ndimage

    if model not in ("1c", "2c"):
        raise ValueError(f"model must be '1c' or '2c', got {model!r}")
    if not (isinstance(n, int) and n >= 32 and isinstance(n_slices, int) and n_slices >= 1):
        raise ValueError(f"n must be an integer >= 32 and n_slices >= 1, got {n!r}, {n_slices!r}")
    rng = np.random.default_rng(seed)
    names = ("cbf", "att") if model == "1c" else ("cbf", "abv", "abat", "att")
    shape = (n, n, n_slices)
    params = np.full(shape + (len(names),), np.nan)
    label = np.zeros(shape, dtype=np.int16)
    mixed = np.zeros(shape, dtype=bool)
    mask = np.zeros(shape, dtype=bool)
    for k in range(n_slices):
        sub = _slice(model, n, rng)
        inside = _blocks(sub["inside"])
        lab = _blocks(sub["label"])
        centre = (SUPERSAMPLE // 2) * SUPERSAMPLE + SUPERSAMPLE // 2  # a sub-voxel at the voxel's centre
        mask[..., k] = inside[..., centre]
        weight = inside / np.maximum(inside.sum(axis=2, keepdims=True), 1)
        for j, name in enumerate(names):
            params[..., k, j] = (_blocks(sub[name]) * weight).sum(axis=2)
        values = np.sort(lab, axis=2)
        majority = np.array([np.bincount(v).argmax() for v in lab.reshape(-1, SUPERSAMPLE**2)]).reshape(n, n)
        label[..., k] = majority
        mixed[..., k] = values[..., 0] != values[..., -1]
    params[~mask] = np.nan
    label[~mask] = 0
    outside_near = ndimage.binary_dilation(~mask, structure=np.ones((3, 3, 1), bool)) & mask
    inner_mask = mask & ~outside_near
    edge = mask & (mixed | _label_edge(label, mask))
    border = outside_near & ~edge
    interior = inner_mask & ~_any_differs(label, mask, 2) & ~mixed
    lesion_maps, surround_maps = _lesions(label, mask & ~edge)
    return SpatialPhantom(model, names, params, mask, label, interior, edge, border, lesion_maps, surround_maps)


def _label_edge(label: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mask voxels with an in-plane 3×3 neighbour inside the mask labelled otherwise."""
    from scipy import ndimage

    big = np.iinfo(np.int16).max
    lo = ndimage.minimum_filter(np.where(mask, label, big), size=(3, 3, 1), mode="constant", cval=big)
    hi = ndimage.maximum_filter(np.where(mask, label, -1), size=(3, 3, 1), mode="constant", cval=-1)
    return mask & ((lo != label) | (hi != label))


def _lesions(label: np.ndarray, clear: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per lesion (in-plane connected 2×2 squares, one per slice and disc): its voxels, and its
    surround: grey matter of ``clear`` (no boundary within one voxel) 2-3 voxels (in-plane
    chessboard distance) from it."""
    from scipy import ndimage

    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    pieces, count = ndimage.label(label % TERRITORY_LABEL == LESION, structure=in_plane)
    lesions = np.stack([pieces == i for i in range(1, count + 1)]) if count else np.zeros((0,) + label.shape, bool)
    grey = clear & (label % TERRITORY_LABEL == GM)
    surround = np.zeros_like(lesions)
    for i, lesion in enumerate(lesions):
        near3 = ndimage.binary_dilation(lesion, structure=np.ones((7, 7, 1), bool))
        near1 = ndimage.binary_dilation(lesion, structure=np.ones((3, 3, 1), bool))
        surround[i] = near3 & ~near1 & grey
    return lesions, surround
