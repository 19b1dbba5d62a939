"""Simulated ASL data: parameter priors, noise at a stated SNR, Monte Carlo sets.

Noise follows ASL_MODELS.md: one absolute σ per dataset, σ = S_ref / SNR, with
S_ref the largest noise-free ΔM/M0t over the protocol's volumes of a reference
grey-matter voxel (cbf 60 mL/100 g/min, att 1.2 s, one-compartment tissue
signal, no arterial term). Rician noise (default) is |S + n1 + i n2|; Gaussian
noise is S + n1, with n1, n2 ~ N(0, σ²).

A :class:`SimulatedSet` holds parameters (API units), noise-free and noisy
signals (ΔM/M0t), and is saved as an ``.npz`` of plain arrays (format below).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from .atomic import atomic_path
from .models import KineticModel, get_model
from .protocol import Constants, Protocol

__all__ = [
    "NOISE_MODELS",
    "REFERENCE_VOXEL",
    "SimulatedSet",
    "add_noise",
    "noise_sigma",
    "reference_signal_level",
    "sample_parameters",
    "simulate",
]

NOISE_MODELS = ("rician", "gaussian")
#: the grey-matter voxel that defines S_ref: cbf (mL/100 g/min), att (s)
REFERENCE_VOXEL = {"cbf": 60.0, "att": 1.2}
#: identifies the .npz layout written by :meth:`SimulatedSet.save`
FORMAT = "aslbatch.simulated-set/1"


def _rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def sample_parameters(
    model: KineticModel,
    n: int,
    seed: int | np.random.Generator | None = None,
    ranges: dict[str, tuple[float, float]] | None = None,
) -> np.ndarray:
    """Draw ``n`` parameter vectors uniformly over the training ranges, shape (n, n_params).

    ``ranges`` overrides the model's ``training_ranges`` per parameter (API units). A model
    that is not ``calibrated`` (``relative``) has no prior: ValueError.
    Ordered arrival times (2C: abat <= att) are drawn as att = abat + U(gap range)
    and then clipped to att's own range.
    """
    rng = _rng(seed)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not model.calibrated:
        raise ValueError(f"the {model.name} model has no prior to draw from: its outputs are relative to each "
                         "dataset's own reference (its brain median); simulate, train and evaluate the single model")
    merged = model.training_ranges
    for name, rng_pair in (ranges or {}).items():
        if name not in merged:
            raise ValueError(f"unknown parameter {name!r} for model {model.name}; expected {model.param_names}")
        merged[name] = rng_pair
    for name, (lo, hi) in merged.items():
        if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
            raise ValueError(f"range of {name} must be finite with low <= high, got ({lo}, {hi})")
    index = {name: i for i, name in enumerate(model.param_names)}
    params = np.empty((n, model.n_params), dtype=np.float64)
    for name, (lo, hi) in merged.items():
        params[:, index[name]] = rng.uniform(lo, hi, n)
    for earlier, later, (gap_lo, gap_hi) in model.ordered_times:
        lo, hi = merged[later]
        later_values = params[:, index[earlier]] + rng.uniform(gap_lo, gap_hi, n)
        params[:, index[later]] = np.clip(later_values, np.maximum(lo, params[:, index[earlier]]), hi)
    return params


def reference_signal_level(model: KineticModel) -> float:
    """S_ref (ΔM/M0t): the largest noise-free tissue signal (the model's tissue model, 1C for
    PCASL) of the reference voxel over all volumes."""
    ref = model.tissue_model()
    return float(ref.signal([[REFERENCE_VOXEL["cbf"], REFERENCE_VOXEL["att"]]]).max())


def noise_sigma(model: KineticModel, snr: float | np.ndarray) -> float | np.ndarray:
    """σ (ΔM/M0t) = S_ref / SNR; SNR > 0 (``inf`` gives σ = 0)."""
    snr_arr = np.asarray(snr, dtype=np.float64)
    if np.any(~(snr_arr > 0)):
        raise ValueError(f"SNR must be > 0, got {snr!r}")
    sigma = reference_signal_level(model) / snr_arr
    return float(sigma) if sigma.ndim == 0 else sigma


def add_noise(
    signals: np.ndarray,
    sigma: float | np.ndarray,
    noise: str = "rician",
    seed: int | np.random.Generator | None = None,
) -> np.ndarray:
    """Noisy copy of ``signals`` (n, n_volumes); σ a scalar or one value per row (ΔM/M0t)."""
    if noise not in NOISE_MODELS:
        raise ValueError(f"noise must be one of {NOISE_MODELS}, got {noise!r}")
    rng = _rng(seed)
    clean = np.asarray(signals, dtype=np.float64)
    sig = np.asarray(sigma, dtype=np.float64)
    if sig.ndim == 1:
        sig = sig[:, np.newaxis]
    n1 = rng.standard_normal(clean.shape)
    n1 *= sig
    n1 += clean
    if noise == "gaussian":
        return n1
    n2 = rng.standard_normal(clean.shape)
    n2 *= sig
    return np.hypot(n1, n2, out=n1)


@dataclass(frozen=True)
class SimulatedSet:
    """A simulated dataset.

    Attributes
    ----------
    model : the kinetic model that generated it (with its protocol and constants).
    params : true parameters (n, n_params), API units (cbf mL/100 g/min, times s, abv mL/mL).
    clean : noise-free ΔM/M0t (n, n_volumes).
    signals : noisy ΔM/M0t (n, n_volumes).
    sigma : noise σ of each row (n,), ΔM/M0t.
    snr : SNR of each row (n,).
    group : index of the parameter set of each row (n,); rows of one group share the
        same parameters and differ only in noise (Monte Carlo repeats).
    noise : "rician" or "gaussian".
    seed : the integer seed used, or -1 if a Generator or no seed was given.
    """

    model: KineticModel
    params: np.ndarray
    clean: np.ndarray
    signals: np.ndarray
    sigma: np.ndarray
    snr: np.ndarray
    group: np.ndarray
    noise: str
    seed: int = -1

    def save(self, path: str | os.PathLike) -> None:
        """Write the set atomically as ``.npz`` (plain arrays, readable with allow_pickle=False).

        Keys: ``format``; ``model`` ("1c"/"2c"); ``protocol``, ``constants``,
        ``model_options`` (JSON text); ``param_names``; ``params``, ``clean``,
        ``signals``, ``sigma``, ``snr``, ``group``; ``noise``; ``seed``.
        """
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(
                tmp,
                format=np.array(FORMAT),
                model=np.array(self.model.name),
                protocol=np.array(self.model.protocol.to_json()),
                constants=np.array(json.dumps(self.model.constants.to_dict())),
                model_options=np.array(json.dumps(self.model.options())),
                param_names=np.array(self.model.param_names),
                params=self.params,
                clean=self.clean,
                signals=self.signals,
                sigma=self.sigma,
                snr=self.snr,
                group=self.group,
                noise=np.array(self.noise),
                seed=np.array(self.seed, dtype=np.int64),
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SimulatedSet":
        """Read a set written by :meth:`save`; errors name the file and the problem."""
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: not a readable .npz file ({exc})") from exc
        fmt = str(arrays.get("format", ""))
        if fmt != FORMAT:
            raise ValueError(f"{path}: not an aslbatch simulated set (format {fmt!r}, expected {FORMAT!r})")
        try:
            model = get_model(
                str(arrays["model"]),
                Protocol.from_json(str(arrays["protocol"])),
                Constants.from_dict(json.loads(str(arrays["constants"]))),
                **json.loads(str(arrays["model_options"])),
            )
            result = cls(
                model=model,
                params=arrays["params"],
                clean=arrays["clean"],
                signals=arrays["signals"],
                sigma=arrays["sigma"],
                snr=arrays["snr"],
                group=arrays["group"],
                noise=str(arrays["noise"]),
                seed=int(arrays["seed"]),
            )
        except KeyError as exc:
            raise ValueError(f"{path}: missing array {exc.args[0]!r}") from exc
        n = result.params.shape[0]
        expected = {
            "params": (n, model.n_params),
            "clean": (n, model.n_volumes),
            "signals": (n, model.n_volumes),
            "sigma": (n,),
            "snr": (n,),
            "group": (n,),
        }
        for key, shape in expected.items():
            if getattr(result, key).shape != shape:
                raise ValueError(f"{path}: array {key!r} has shape {getattr(result, key).shape}, expected {shape}")
        return result


def simulate(
    model: KineticModel,
    n: int,
    snr: float | tuple[float, float],
    *,
    noise: str = "rician",
    repeats: int = 1,
    seed: int | np.random.Generator | None = None,
    ranges: dict[str, tuple[float, float]] | None = None,
    params: np.ndarray | None = None,
) -> SimulatedSet:
    """Simulate ``n`` parameter sets, each with ``repeats`` noise realisations.

    Parameters
    ----------
    model : kinetic model bound to the protocol to simulate.
    n : number of parameter sets (ignored when ``params`` is given).
    snr : SNR (S_ref / σ), or a (low, high) range from which each parameter set
        draws its SNR log-uniformly; ``inf`` for noise-free signals.
    noise : "rician" (default) or "gaussian".
    repeats : noise realisations per parameter set (Monte Carlo noise immunity).
    seed : int seed or Generator; the same seed gives the same data.
    ranges : per-parameter (low, high) overriding the model's training ranges.
    params : explicit true parameters (n, n_params) instead of random draws.

    The result has n × repeats rows, grouped by parameter set (``group``).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    rng = _rng(seed)
    if params is None:
        base = sample_parameters(model, n, rng, ranges)
    else:
        base = model.check_params(params)
    n_sets = base.shape[0]
    if np.ndim(snr) == 0:
        snr_sets = np.full(n_sets, float(snr))
    else:
        lo, hi = (float(v) for v in snr)
        if not 0 < lo <= hi < np.inf:
            raise ValueError(f"SNR range must satisfy 0 < low <= high < inf, got {snr!r}")
        snr_sets = np.exp(rng.uniform(np.log(lo), np.log(hi), n_sets))
    group = np.repeat(np.arange(n_sets, dtype=np.int64), repeats)
    all_params = base[group]
    clean = model.signal(all_params)
    snr_rows = snr_sets[group]
    sigma = np.asarray(noise_sigma(model, snr_rows), dtype=np.float64).reshape(-1)
    noisy = add_noise(clean, sigma, noise, rng)
    return SimulatedSet(
        model=model,
        params=all_params,
        clean=clean,
        signals=noisy,
        sigma=sigma,
        snr=snr_rows,
        group=group,
        noise=noise,
        seed=seed if isinstance(seed, int) else -1,
    )


def set_summary(data: SimulatedSet) -> dict[str, Any]:
    """A short JSON-ready description of a simulated set (for logs and the CLI)."""
    return {
        "model": data.model.name,
        "rows": int(data.params.shape[0]),
        "parameter_sets": int(data.group.max() + 1) if data.group.size else 0,
        "volumes": data.model.n_volumes,
        "noise": data.noise,
        "snr_range": [float(data.snr.min()), float(data.snr.max())] if data.snr.size else [],
        "sigma_range": [float(data.sigma.min()), float(data.sigma.max())] if data.sigma.size else [],
    }
