"""Everything that turns signals into parameters, behind one interface.

``get_estimator(name, model, **options)`` returns an :class:`Estimator`; call
``fit()`` (training, where the method trains) then ``predict(signals)`` for an
:class:`Estimate`.
"""

from __future__ import annotations

from ..models import KineticModel
from .base import Estimate, Estimator, Status
from .lm import LevenbergMarquardtEstimator
from .lookup import LookupTableEstimator
from .supervised import SupervisedEstimator
from .unsupervised import UnsupervisedEstimator

ESTIMATORS: dict[str, type[Estimator]] = {
    LevenbergMarquardtEstimator.name: LevenbergMarquardtEstimator,
    LookupTableEstimator.name: LookupTableEstimator,
    SupervisedEstimator.name: SupervisedEstimator,
    UnsupervisedEstimator.name: UnsupervisedEstimator,
}

__all__ = ["ESTIMATORS", "Estimate", "Estimator", "Status", "get_estimator"]


def get_estimator(name: str, model: KineticModel, **options) -> Estimator:
    """The estimator ``name`` ("lm", "lut", "supervised", "unsupervised") for ``model``, with method ``options``."""
    try:
        cls = ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(ESTIMATORS)}") from None
    try:
        return cls(model, **options)
    except TypeError as exc:
        raise ValueError(f"invalid option for method {name!r}: {exc}") from None
