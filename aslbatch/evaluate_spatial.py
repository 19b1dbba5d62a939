"""Spatial evaluation (``aslbatch evaluate --spatial``): estimators on phantoms with structure and known truth.

Every method estimates the same noisy images of a :func:`~aslbatch.spatial_phantom.make_spatial_phantom`
phantom (``repeats`` noise realisations per SNR, the acquisition's noise model, σ = S_ref / SNR as
:mod:`aslbatch.simulate`), each through :meth:`~aslbatch.estimators.base.Estimator.predict_image`
with the phantom's mask, so a method that uses the neighbourhood gets it. Methods (:data:`METHODS`):
every registered one by its name (networks from the cache, trained on a miss with their
defaults), and the naive baseline ``smooth-lm``: the signals smoothed in-plane by a Gaussian of
FWHM :data:`SMOOTH_FWHM_VOXELS` voxels within the mask (normalised convolution:
``scipy.ndimage.gaussian_filter`` of the masked signals over that of the mask), then LM.

Metrics, per method, SNR and parameter, pooled over the repeats (fractions, not %):

- ``nrmse`` / ``bias`` in each region: interior grey matter (``interior_gm``) and white matter
  (``interior_wm``), ``edge`` (within one voxel of a label boundary) and ``border`` (within one
  voxel of the mask's edge): RMSE / mean truth and mean error / mean truth over the region;
- ``lesion_contrast`` (cbf): the share of a lesion's contrast kept: the estimate's contrast
  1 − mean(lesion) / mean(surround) over the truth's, averaged over the lesions of a noise image,
  median over the images (1: kept; 0: smoothed away);
- for methods that give standard errors, in each region: ``coverage_68`` / ``coverage_95`` (share of
  voxels whose truth lies within the method's 68 % / 95 % interval half-widths of the estimate, else
  within 1 / 1.96 se; with half-widths the ± se coverage is ``coverage_68_se`` / ``coverage_95_se``:
  :mod:`aslbatch.calibration`), ``z_sd``, ``z_robust_sd`` and ``prior_dominated`` (share flagged, :mod:`aslbatch.estimators.prior`). Every method
  is given the noise SD of the SNR (``signal_se``), so the networks' se are those at that SNR.

Outputs in ``out``: ``metrics.tsv`` (method, parameter, snr, region, metric, value), ``report.md``
(tables, ratios to the voxelwise ``supervised`` network) and ``figures/`` (maps and error maps side
by side; profiles across a lesion and the territory's edge), each written atomically.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .atomic import atomic_open
from .calibration import calibration_rows
from .estimators import ESTIMATORS, Estimator, get_estimator
from .estimators.prior import prior_dominated
from .evaluate import _check_snrs
from .models import KineticModel, get_model
from .protocol import Constants, Protocol, default_protocol
from .simulate import NOISE_MODELS, add_noise, noise_sigma
from .spatial_phantom import GM, WM, SpatialPhantom, make_spatial_phantom

__all__ = ["BASELINE", "METHODS", "REGIONS", "SMOOTH_FWHM_VOXELS", "SpatialEvaluation", "edge_error",
           "lesion_contrast", "region_errors", "run_spatial_evaluation", "smooth_signals"]

#: the naive spatial baseline: Gaussian smoothing of the signals, then LM
BASELINE = "smooth-lm"
SMOOTH_FWHM_VOXELS = 1.5
#: the methods compared by default (the voxelwise ones, the baseline, the spatial network)
METHODS = ("lm", "supervised", "unsupervised", BASELINE, "spatial")
#: the regions of the metrics, in report order
REGIONS = ("interior_gm", "interior_wm", "edge", "border")
#: reference of the ratios in the report: the voxelwise supervised network
REFERENCE = "supervised"


@dataclass(frozen=True)
class SpatialEvaluation:
    """``rows``: one dict per value (method, parameter, snr, region, metric, value); ``paths``: files written."""

    rows: list[dict[str, Any]]
    paths: dict[str, Path]

    def value(self, method: str, parameter: str, snr: float, region: str, metric: str) -> float:
        """One value of ``rows`` (NaN when absent)."""
        for r in self.rows:
            if (r["method"], r["parameter"], r["snr"], r["region"], r["metric"]) == (method, parameter, snr, region,
                                                                                      metric):
                return float(r["value"])
        return math.nan


# --- the pieces ---------------------------------------------------------------------------------


def smooth_signals(signals: np.ndarray, mask: np.ndarray, fwhm_voxels: float = SMOOTH_FWHM_VOXELS) -> np.ndarray:
    """``signals`` (n, n_vol) ΔM/M0t of the voxels of ``mask`` smoothed in-plane (axes 0 and 1) by a
    Gaussian of ``fwhm_voxels`` within the mask (normalised convolution); same shape."""
    from scipy import ndimage

    sigma = (fwhm_voxels / (2.0 * math.sqrt(2.0 * math.log(2.0))),) * 2 + (0.0,)
    weight = ndimage.gaussian_filter(mask.astype(np.float64), sigma, mode="constant")[mask]
    out = np.empty_like(signals, dtype=np.float64)
    volume = np.zeros(mask.shape)
    for v in range(signals.shape[1]):
        volume[mask] = signals[:, v]
        out[:, v] = ndimage.gaussian_filter(volume, sigma, mode="constant")[mask] / weight
    return out


def region_errors(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(NRMSE, relative bias) of ``estimate`` against ``truth`` (same shape, any units): RMSE / mean
    truth and mean error / mean truth, over every finite pair (NaN when the region is empty)."""
    est, tru = np.asarray(estimate, dtype=np.float64).ravel(), np.asarray(truth, dtype=np.float64).ravel()
    if est.size == 0:
        return math.nan, math.nan
    error = est - tru
    mean = float(np.mean(tru))
    return float(np.sqrt(np.mean(error**2)) / mean), float(np.mean(error) / mean)


def edge_error(estimate: np.ndarray, truth: np.ndarray, edge: np.ndarray) -> tuple[float, float]:
    """(NRMSE, relative bias) over the voxels ``edge`` (bool, the maps' shape) of ``estimate``
    maps ((repeats,) + shape or shape) against ``truth`` (shape)."""
    est = np.asarray(estimate)
    est = est.reshape((-1,) + truth.shape)
    return region_errors(est[:, edge], np.broadcast_to(truth[edge], (est.shape[0], int(edge.sum()))))


def lesion_contrast(estimate: np.ndarray, truth: np.ndarray, lesions: np.ndarray, surround: np.ndarray) -> float:
    """Share of the lesions' CBF contrast an estimate keeps: per noise image (``estimate``
    (repeats,) + shape, or shape for one image) the mean over lesions of the estimate's contrast
    1 − mean(lesion) / mean(surround) over the truth's (``truth``, shape), then the median over
    the images (1: kept; 0: smoothed away; robust to an image whose surround the noise pulls
    towards zero)."""
    est = np.asarray(estimate, dtype=np.float64).reshape((-1,) + truth.shape)
    if not lesions.shape[0]:
        return math.nan
    kept = np.zeros(est.shape[0])
    for lesion, ring in zip(lesions, surround):
        true = 1.0 - truth[lesion].mean() / truth[ring].mean()
        kept += (1.0 - est[:, lesion].mean(axis=1) / est[:, ring].mean(axis=1)) / true
    return float(np.median(kept / lesions.shape[0]))


def _estimator(name: str, model: KineticModel, cache_dir: str | Path | None, network_options: dict[str, Any],
               progress: bool) -> Estimator:
    from .estimators.store import NetworkCache

    if name == BASELINE:
        name = "lm"
    if not ESTIMATORS[name].trains:
        return get_estimator(name, model).fit()
    return NetworkCache(cache_dir).get(get_estimator(name, model, **network_options), progress)


def _check(methods: Sequence[str], snrs: Sequence[float], repeats: int, noise: str) -> tuple[list[str], list[float]]:
    known = [m for m in ESTIMATORS] + [BASELINE]
    labels = list(methods)
    unknown = [m for m in labels if m not in known]
    if unknown or not labels or len(set(labels)) != len(labels):
        raise ValueError(f"methods must be distinct names among {known}, got {labels}")
    values = _check_snrs(snrs)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if noise not in NOISE_MODELS:
        raise ValueError(f"noise must be one of {NOISE_MODELS}, got {noise!r}")
    return labels, values


# --- the evaluation -------------------------------------------------------------------------------


def run_spatial_evaluation(out: str | Path, *, model_name: str = "1c", protocol: Protocol | None = None,
                           constants: Constants | None = None, methods: Sequence[str] | None = None,
                           snrs: Sequence[float] = (3.0, 5.0), repeats: int = 8, noise: str = "rician",
                           seed: int = 0, cache_dir: str | Path | None = None,
                           network_options: dict[str, Any] | None = None, progress: bool = False,
                           extra: dict[str, Any] | None = None) -> SpatialEvaluation:
    """Evaluate ``methods`` (default :data:`METHODS` that serve the model) on the spatial phantom of
    ``model_name`` (``"1c"`` or ``"2c"``) with ``protocol`` (default the model's) at ``snrs``; files
    into ``out`` (module docstring). ``network_options``: options of every trained network;
    ``extra``: ``{label: callable(model, signals, mask) -> params (n, n_params)}`` estimators
    outside the registry (studies)."""
    model = get_model(model_name, protocol if protocol is not None else default_protocol(model_name), constants)
    wanted = [m for m in METHODS if m == BASELINE or ESTIMATORS[m].serves(type(model))] if methods is None else methods
    labels, snr_values = _check(wanted, snrs, repeats, noise)
    phantom = make_spatial_phantom(model_name, seed=seed)
    mask = phantom.mask
    truth = phantom.params[mask]
    clean = model.signal(truth)
    estimators = {m: _estimator(m, model, cache_dir, dict(network_options or {}), progress) for m in labels}
    labels = labels + list(extra or {})
    maps: dict[tuple[str, float], np.ndarray] = {}
    errors: dict[tuple[str, float], tuple[np.ndarray, np.ndarray | None, tuple[float, ...]]] = {}
    rng = np.random.default_rng([seed, 17])
    for snr in snr_values:
        sigma = noise_sigma(model, snr)
        noisy = [add_noise(clean, sigma, noise, rng) for _ in range(repeats)]
        noise_sd = np.full(clean.shape, float(sigma))
        for label in labels:
            stack = np.full((repeats,) + phantom.params.shape, np.nan)
            se_stack = np.full_like(stack, np.nan)
            half_stack, levels = None, ()
            for r, signals in enumerate(noisy):
                if label in (extra or {}):
                    params = extra[label](model, signals, mask)
                else:
                    data = smooth_signals(signals, mask) if label == BASELINE else signals
                    estimate = estimators[label].predict_image(data, mask, signal_se=noise_sd)
                    params = estimate.params
                    if estimate.stderr is not None:
                        se_stack[r][mask] = estimate.stderr
                    if estimate.intervals is not None:
                        levels = estimate.interval_levels
                        if half_stack is None:
                            half_stack = np.full(stack.shape + (len(levels),), np.nan)
                        half_stack[r][mask] = estimate.intervals
                stack[r][mask] = params
            maps[(label, snr)] = stack
            if np.isfinite(se_stack).any():
                errors[(label, snr)] = (se_stack, half_stack, levels)
    rows = _rows(phantom, maps, labels, snr_values) + _calibration_rows(phantom, maps, errors, model)
    figures = _figures(phantom, maps, labels, snr_values[0])
    return SpatialEvaluation(rows, _write(Path(out), rows, figures, _report(rows, labels, snr_values, model,
                                                                            repeats, noise, figures)))


def _rows(phantom: SpatialPhantom, maps: dict[tuple[str, float], np.ndarray], labels: list[str],
          snrs: list[float]) -> list[dict[str, Any]]:
    regions = _regions(phantom)
    rows = []
    for label in labels:
        for snr in snrs:
            stack = maps[(label, snr)]
            for j, name in enumerate(phantom.param_names):
                for region, where in regions.items():
                    nrmse, bias = edge_error(stack[..., j], phantom.params[..., j], where)
                    rows += [dict(method=label, parameter=name, snr=snr, region=region, metric="nrmse", value=nrmse),
                             dict(method=label, parameter=name, snr=snr, region=region, metric="bias", value=bias)]
            if phantom.lesions.shape[0]:
                value = lesion_contrast(stack[..., 0], phantom["cbf"], phantom.lesions, phantom.surround)
                rows.append(dict(method=label, parameter="cbf", snr=snr, region="lesion", metric="lesion_contrast",
                                 value=value))
    return rows


def _regions(phantom: SpatialPhantom) -> dict[str, np.ndarray]:
    """The regions of the metrics (:data:`REGIONS`) as boolean maps."""
    return {"interior_gm": phantom.interior & phantom.tissue(GM), "interior_wm": phantom.interior & phantom.tissue(WM),
            "edge": phantom.edge, "border": phantom.border}


def _calibration_rows(phantom: SpatialPhantom, maps: dict[tuple[str, float], np.ndarray],
                      errors: dict[tuple[str, float], tuple[np.ndarray, np.ndarray | None, tuple[float, ...]]],
                      model: KineticModel) -> list[dict[str, Any]]:
    """Coverage, z SD and prior-dominated share per region of every (method, SNR) with standard errors:
    ``errors`` holds (se like the maps, interval half-widths (..., n_params, len(levels)) or None, levels);
    with intervals, ``coverage_68``/``coverage_95`` are theirs and the ± se ones ``coverage_68_se``/``_95_se``
    (:func:`aslbatch.calibration.calibration_rows`, as ``aslbatch evaluate``)."""
    rows = []
    p = model.n_params
    for (label, snr), (se, half, levels) in errors.items():
        stack = maps[(label, snr)]
        truth = np.broadcast_to(phantom.params, stack.shape)
        for region, where in _regions(phantom).items():
            est, err, tru = (a[:, where].reshape(-1, p) for a in (stack, se, truth))
            intervals = None if half is None else half[:, where].reshape(-1, p, len(levels))
            flagged = prior_dominated(model, est, err)
            kept = [r for r in calibration_rows(est, err, tru, phantom.param_names, intervals, levels)
                    if r["metric"] not in ("calibration_rows", "se_undefined")]
            kept += [{"parameter": name, "metric": "prior_dominated", "value": float(flagged[:, j].mean())}
                     for j, name in enumerate(phantom.param_names)]
            rows += [dict(method=label, snr=snr, region=region, **r) for r in kept]
    return rows


# --- figures and report ------------------------------------------------------------------------------

#: display range per parameter (API units) and error range (± the same fraction of it)
_DISPLAY = {"cbf": (0.0, 90.0), "att": (0.5, 2.9), "abv": (0.0, 0.025), "abat": (0.3, 1.6)}


def _figures(phantom: SpatialPhantom, maps: dict[tuple[str, float], np.ndarray], labels: list[str],
             snr: float) -> dict[str, tuple[bytes, str]]:
    from .report import figure_png, new_figure

    k = int(np.argmax(phantom.lesions.sum(axis=(0, 1, 2)))) if phantom.lesions.shape[0] else 0
    figures = {}
    for j, name in enumerate(phantom.param_names):
        if name not in ("cbf", "att"):
            continue
        lo, hi = _DISPLAY[name]
        span = 0.5 * (hi - lo)
        fig = new_figure(2.0 * (len(labels) + 1), 4.1, dpi=110)
        axes = fig.subplots(2, len(labels) + 1, squeeze=False)
        true = phantom.params[:, :, k, j]
        axes[0, 0].imshow(true.T, origin="lower", vmin=lo, vmax=hi, cmap="viridis")
        axes[0, 0].set_title("truth", fontsize=8)
        axes[1, 0].imshow(np.where(phantom.mask[:, :, k], 0.0, np.nan).T, origin="lower", cmap="gray")
        for c, label in enumerate(labels, start=1):
            est = maps[(label, snr)][0, :, :, k, j]
            axes[0, c].imshow(est.T, origin="lower", vmin=lo, vmax=hi, cmap="viridis")
            axes[0, c].set_title(label, fontsize=8)
            image = axes[1, c].imshow((est - true).T, origin="lower", vmin=-span, vmax=span, cmap="RdBu_r")
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(image, ax=axes[1, :].tolist(), shrink=0.8, label=f"error ({name})")
        figures[f"maps_{name}"] = (figure_png(fig), f"{name} at SNR {snr:g}, slice {k}, one noise realisation: "
                                                    f"estimates (top, {lo:g}-{hi:g}) and errors (bottom, ±{span:g}).")
    figures["profiles"] = (_profiles(phantom, maps, labels, snr), f"Profiles at SNR {snr:g}, mean over the repeats: "
                                                                  "across a lesion (left) and across the delayed-"
                                                                  "transit territory's edge (right); black: truth.")
    return figures


def _profiles(phantom: SpatialPhantom, maps: dict[tuple[str, float], np.ndarray], labels: list[str],
              snr: float) -> bytes:
    from .report import figure_png, new_figure

    lesion = phantom.lesions[0]
    xs, ys, zs = np.nonzero(lesion)
    k, y = int(zs[0]), int(ys.min())
    x0 = int(xs.min())
    line_a = (slice(max(x0 - 10, 0), x0 + 12), y, k)
    territory = phantom.label[:, :, k] >= 10
    tx = np.nonzero(territory.any(axis=1))[0]
    column = int(tx[len(tx) // 2])
    ty = int(np.nonzero(territory[column])[0].min())
    line_b = (column, slice(max(ty - 10, 0), ty + 10), k)
    fig = new_figure(9.0, 5.0, dpi=110)
    axes = fig.subplots(2, 2, squeeze=False)
    for col, line in enumerate((line_a, line_b)):
        for row, name in enumerate(("cbf", "att")):
            j = phantom.param_names.index(name)
            ax = axes[row, col]
            ax.plot(phantom.params[line + (j,)], color="black", linewidth=2, label="truth")
            for i, label in enumerate(labels):
                ax.plot(np.nanmean(maps[(label, snr)][(slice(None),) + line + (j,)], axis=0), color=f"C{i}",
                        label=label, linewidth=1)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
    axes[0, 0].set_title("across a lesion (voxels along axis 0)", fontsize=9)
    axes[0, 1].set_title("across the territory's edge (voxels along axis 1)", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    return figure_png(fig)


def _report(rows: list[dict[str, Any]], labels: list[str], snrs: list[float], model: KineticModel, repeats: int,
            noise: str, figures: dict[str, tuple[bytes, str]]) -> str:
    from .report import markdown_table

    table = {(r["method"], r["parameter"], r["snr"], r["region"], r["metric"]): r["value"] for r in rows}
    lines = [f"# Spatial evaluation: {model.name} ({model.title})", "",
             f"Spatial phantom (aslbatch.spatial_phantom), {repeats} {noise} noise realisations per SNR; "
             f"NRMSE = RMSE / mean truth, bias = mean error / mean truth, pooled over the repeats; ratios are "
             f"to the voxelwise {REFERENCE} network (its NRMSE = 1).", ""]
    for snr in snrs:
        lines += [f"## SNR {snr:g}", ""]
        header = ["method"] + [f"{p} {reg} NRMSE" for p in model.param_names for reg in REGIONS] + \
                 [f"{p} edge bias" for p in model.param_names] + ["cbf lesion contrast"]
        body = []
        for label in labels:
            row = [label]
            for p in model.param_names:
                for reg in REGIONS:
                    value = table.get((label, p, snr, reg, "nrmse"), math.nan)
                    ref = table.get((REFERENCE, p, snr, reg, "nrmse"), math.nan)
                    row.append(f"{value:.3f}" + (f" ({value / ref:.2f}×)" if math.isfinite(ref) and label != REFERENCE
                                                 else ""))
            row += [f"{table.get((label, p, snr, 'edge', 'bias'), math.nan):+.3f}" for p in model.param_names]
            row.append(f"{table.get((label, 'cbf', snr, 'lesion', 'lesion_contrast'), math.nan):.2f}")
            body.append(row)
        lines += [markdown_table(header, body), ""]
        calibrated = [label for label in labels if (label, "cbf", snr, "edge", "coverage_95") in table]
        if calibrated:
            lines += [f"Standard errors at SNR {snr:g}: coverage of the 68 % / 95 % intervals per region (nominal "
                      f"0.68 / 0.95) and the share flagged prior-dominated.", ""]
            header = ["method", "parameter"] + [f"{reg} 68/95" for reg in REGIONS] + ["prior-dominated"]
            body = [[label, p] + [f"{table[(label, p, snr, reg, 'coverage_68')]:.2f} / "
                                  f"{table[(label, p, snr, reg, 'coverage_95')]:.2f}" for reg in REGIONS]
                    + [f"{table[(label, p, snr, 'interior_gm', 'prior_dominated')]:.2f} (GM)"]
                    for label in calibrated for p in model.param_names]
            lines += [markdown_table(header, body), ""]
    for name, (_, caption) in figures.items():
        lines += [f"![{name}](figures/{name}.png)", "", caption, ""]
    return "\n".join(lines)


def _write(out: Path, rows: list[dict[str, Any]], figures: dict[str, tuple[bytes, str]], report: str) -> dict[str, Path]:
    """Every file written atomically (the report last); returns their paths."""
    paths = {"metrics": out / "metrics.tsv"}
    with atomic_open(paths["metrics"], "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(["method", "parameter", "snr", "region", "metric", "value"])
        for r in rows:
            writer.writerow([r["method"], r["parameter"], f"{r['snr']:g}", r["region"], r["metric"], repr(float(r["value"]))])
    for name, (png, _) in figures.items():
        paths[f"figure_{name}"] = out / "figures" / f"{name}.png"
        with atomic_open(paths[f"figure_{name}"], "wb") as fh:
            fh.write(png)
    paths["report_md"] = out / "report.md"
    with atomic_open(paths["report_md"], "w", encoding="utf-8") as fh:
        fh.write(report)
    return paths
