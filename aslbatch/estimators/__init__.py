"""Everything that turns signals into parameters, behind one interface.

``get_estimator(name, model, **options)`` returns an :class:`Estimator`; call
``fit()`` (validation, and training where the method trains) then
``predict(signals, slice_offsets=...)`` or ``predict_image(signals, mask, ...)`` for an
:class:`Estimate`. :data:`ESTIMATORS` is the registry: one line per method, the only
place its name is written; classes are imported on first use, so listing the methods
imports neither scikit-learn nor the network code.
"""

from __future__ import annotations

from ..models import KineticModel
from ..registry import Registry
from .base import Estimate, Estimator, Status

#: every method: name -> where its class lives (imported on first use)
ESTIMATORS: Registry[Estimator] = Registry("method", {
    "lm": "aslbatch.estimators.lm:LevenbergMarquardtEstimator",
    "lut": "aslbatch.estimators.lookup:LookupTableEstimator",
    "spatial": "aslbatch.estimators.spatial:SpatialEstimator",
    "supervised": "aslbatch.estimators.supervised:SupervisedEstimator",
    "unsupervised": "aslbatch.estimators.unsupervised:UnsupervisedEstimator",
    "whitepaper": "aslbatch.estimators.white_paper:WhitePaperEstimator",
})

__all__ = ["ESTIMATORS", "Estimate", "Estimator", "Status", "get_estimator", "served_methods"]


def served_methods(model_name: str) -> list[str]:
    """The registered methods that estimate the model ``model_name`` (a key of MODELS)."""
    from ..models import MODELS

    model = MODELS.get_class(model_name)
    return [name for name in ESTIMATORS if ESTIMATORS.get_class(name).serves(model)]


def get_estimator(name: str, model: KineticModel, **options) -> Estimator:
    """The estimator ``name`` (a key of :data:`ESTIMATORS`) for ``model``, with method ``options``."""
    cls = ESTIMATORS.get_class(name)
    if not cls.serves(type(model)):
        raise ValueError(f"method {name!r} does not serve the {model.name} model ({model.title}); "
                         f"methods that do: {served_methods(model.name)}")
    try:
        return cls(model, **options)
    except TypeError as exc:
        raise ValueError(f"invalid option for method {name!r}: {exc}") from None
