"""Prior-dominated values: where a parameter's standard error is close to the spread of the prior.

A network trained on simulated data returns, where the data say little about a
parameter, a value near the middle of its training distribution, and its standard error
(the posterior SD, :mod:`.variance`) approaches that distribution's SD: the answer comes
from the prior, not from the data. A value is **prior-dominated** when its standard error
is undefined (NaN: the method could not estimate it, e.g. LM where the Jacobian is
singular) or exceeds :data:`PRIOR_SHARE` × the SD of the training prior (the parameters
drawn uniformly over the model's training ranges, :func:`aslbatch.simulate.sample_parameters`).
The same rule serves every method that reports standard errors (LM included: an se that
large means the data did not narrow the value below the plausible range).

Stored per voxel as a bit mask (:func:`flag_bits`): bit j (value 2**j) set when parameter j
(the model's ``param_names`` order) is prior-dominated; 0 everywhere else, including voxels
without an estimate.

The threshold 0.8: ``benchmarks/study_calibration.py`` measures, for the supervised network on
a long-transit phantom at low SNR, the share of voxels with an att error over 0.5 s that each
threshold catches and the share of flagged voxels that were accurate.
"""

from __future__ import annotations

import functools
import json

import numpy as np

from ..models import KineticModel
from ..simulate import sample_parameters

__all__ = ["PRIOR_SHARE", "bits_to_flags", "flag_bits", "prior_dominated", "prior_sd"]

#: a value is prior-dominated when its se exceeds this share of the prior's SD
PRIOR_SHARE = 0.8
#: draws of the training prior that give its SD (the SD's relative error ~0.2 %)
PRIOR_DRAWS = 100_000


@functools.lru_cache(maxsize=32)
def _prior_sd(model_json: str, model: KineticModel) -> tuple[float, ...]:
    draws = sample_parameters(model, PRIOR_DRAWS, np.random.default_rng(0))
    return tuple(float(v) for v in draws.std(axis=0))


def prior_sd(model: KineticModel) -> np.ndarray:
    """SD (n_params,) of each parameter under the training prior, API units."""
    key = json.dumps({"model": model.name, "ranges": model.training_ranges,
                      "ordered": [list(map(str, t)) for t in model.ordered_times]}, sort_keys=True, default=str)
    return np.array(_prior_sd(key, model))


def prior_dominated(model: KineticModel, params: np.ndarray, stderr: np.ndarray,
                    share: float = PRIOR_SHARE) -> np.ndarray:
    """(n, n_params) bool: finite estimate in ``params`` (API units) whose ``stderr`` (same units)
    is NaN or above ``share`` × :func:`prior_sd`."""
    params, stderr = np.asarray(params, dtype=np.float64), np.asarray(stderr, dtype=np.float64)
    if params.shape != stderr.shape or params.ndim != 2 or params.shape[1] != model.n_params:
        raise ValueError(f"params and stderr must both have shape (n, {model.n_params}), got {params.shape} "
                         f"and {stderr.shape}")
    if not share > 0:
        raise ValueError(f"share must be > 0, got {share!r}")
    with np.errstate(invalid="ignore"):
        wide = ~(stderr <= share * prior_sd(model))  # NaN se counts as wide
    return wide & np.isfinite(params)


def flag_bits(flags: np.ndarray) -> np.ndarray:
    """(n,) uint8 bit mask of ``flags`` (n, n_params <= 8) bool: bit j set where column j is."""
    flags = np.asarray(flags, dtype=bool)
    if flags.ndim != 2 or flags.shape[1] > 8:
        raise ValueError(f"flags must have shape (n, <= 8), got {flags.shape}")
    weights = (1 << np.arange(flags.shape[1])).astype(np.uint8)
    return (flags.astype(np.uint8) * weights).sum(axis=1, dtype=np.uint8)


def bits_to_flags(bits: np.ndarray, n_params: int) -> np.ndarray:
    """Inverse of :func:`flag_bits`: (..., n_params) bool from a uint8 bit mask of any shape."""
    bits = np.asarray(bits).astype(np.uint8)
    return ((bits[..., None] >> np.arange(n_params, dtype=np.uint8)) & 1).astype(bool)
