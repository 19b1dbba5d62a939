"""The estimator interface shared by every method, and the Estimate it returns.

scikit-learn's contract: ``__init__`` stores the model and options only;
options are validated in ``fit`` (or on first ``predict`` for methods that do not
train); learned state ends in ``_``. Every method returns the same
:class:`Estimate`, so pipeline, evaluation and benchmarks treat all alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

import numpy as np

from ..models import KineticModel

__all__ = ["Estimate", "Estimator", "Status", "check_signals"]


class Status(IntEnum):
    """Per-voxel outcome of an estimate (stored as int8 in :attr:`Estimate.status`)."""

    #: the fit converged inside the bounds (relative step or cost change below tolerance)
    CONVERGED = 0
    #: the iteration limit was reached before convergence; parameters are the best found
    MAX_ITERATIONS = 1
    #: converged (or chosen) with at least one parameter on a bound (or clipped to it)
    AT_BOUND = 2
    #: the input was unusable (NaN or Inf in any volume, or all zeros): parameters are NaN
    INVALID_INPUT = 3


@dataclass(frozen=True)
class Estimate:
    """Parameters estimated from ``n`` voxels by one method.

    Attributes
    ----------
    params : (n, n_params) in API units (cbf mL/100 g/min, times s, abv mL/mL); NaN
        where ``status`` is INVALID_INPUT.
    status : (n,) int8 :class:`Status` codes.
    stderr : (n, n_params) standard errors in API units, NaN where a parameter is not
        estimable (fixed, or not identifiable at this protocol); None for methods
        without uncertainty.
    rss : (n,) residual sum of squares of the fitted signal, (ΔM/M0t)².
    param_names : names of the columns of ``params``.
    method : the estimator's registry name.
    """

    params: np.ndarray
    status: np.ndarray
    stderr: np.ndarray | None
    rss: np.ndarray
    param_names: tuple[str, ...]
    method: str
    info: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        """The column of ``params`` for parameter ``name`` (a read-only view)."""
        try:
            j = self.param_names.index(name)
        except ValueError:
            raise KeyError(f"no parameter {name!r}; have {self.param_names}") from None
        view = self.params[:, j]
        view.flags.writeable = False
        return view

    @property
    def n_voxels(self) -> int:
        """Number of voxels."""
        return int(self.params.shape[0])

    def status_counts(self) -> dict[str, int]:
        """Number of voxels per status name."""
        codes, counts = np.unique(self.status, return_counts=True)
        return {Status(int(c)).name.lower(): int(k) for c, k in zip(codes, counts)}


def check_signals(signals: Any, model: KineticModel) -> np.ndarray:
    """``signals`` as contiguous float64 (n_voxels, n_volumes) ΔM/M0t, or a ValueError."""
    arr = np.asarray(signals)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"signals must be numbers (ΔM/M0t), got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[np.newaxis, :]
    if arr.ndim != 2 or arr.shape[1] != model.n_volumes:
        raise ValueError(
            f"signals must have shape (n_voxels, {model.n_volumes}) for this protocol's "
            f"{model.n_volumes} volumes, got shape {np.shape(signals)}"
        )
    return np.ascontiguousarray(arr, dtype=np.float64)


class Estimator:
    """Base of all estimators: ``fit`` (training, where there is any) then ``predict``."""

    #: registry name
    name: ClassVar[str]

    def __init__(self, model: KineticModel) -> None:
        self.model = model

    def options(self) -> dict[str, Any]:
        """The options that define this estimator's behaviour (for provenance)."""
        return {}

    def fit(self, signals: np.ndarray | None = None) -> "Estimator":
        """Train where the method trains; conventional methods only validate their options."""
        return self

    def predict(self, signals: np.ndarray) -> Estimate:  # pragma: no cover - abstract
        """Estimate parameters from ``signals`` (n_voxels, n_volumes) ΔM/M0t."""
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({self.model.name}{', ' if opts else ''}{opts})"
