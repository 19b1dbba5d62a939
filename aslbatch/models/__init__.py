"""Kinetic models of ASL: the physics and nothing else.

``get_model(name, protocol, constants, **options)`` returns a model bound to the
acquisition. :data:`MODELS` is the registry: one line per model, the only place its
name is written; everything that offers or describes models reads it.
"""

from __future__ import annotations

from ..protocol import Constants, Protocol
from ..registry import Registry
from .base import KineticModel, Parameter

#: every kinetic model: name -> where its class lives (imported on first use)
MODELS: Registry[KineticModel] = Registry("model", {
    "1c": "aslbatch.models.one_compartment:OneCompartmentModel",
    "2c": "aslbatch.models.two_compartment:TwoCompartmentModel",
    "pasl": "aslbatch.models.pasl:PulsedModel",
    "single": "aslbatch.models.single_delay:SingleDelayModel",
    "relative": "aslbatch.models.relative:RelativeModel",
})

__all__ = ["MODELS", "KineticModel", "Parameter", "calibrated_models", "get_model"]


def get_model(name: str, protocol: Protocol, constants: Constants | None = None, **options) -> KineticModel:
    """The kinetic model ``name`` (a key of :data:`MODELS`) bound to ``protocol`` and ``constants``.

    options: model options, e.g. ``arterial_edge_s`` (s) for "2c".
    """
    return MODELS.get_class(name)(protocol, constants, **options)


def calibrated_models() -> tuple[str, ...]:
    """The models whose parameters are absolute (``KineticModel.calibrated``): those a prior is drawn
    for, so simulated, trained on, evaluated and benchmarked (imports every model's module)."""
    return tuple(name for name in MODELS if MODELS[name].calibrated)
