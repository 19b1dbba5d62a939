"""Kinetic models of ASL: the physics and nothing else.

``get_model("1c" | "2c", protocol, constants, **options)`` returns a model bound
to the acquisition.
"""

from __future__ import annotations

from ..protocol import Constants, Protocol
from .base import KineticModel
from .one_compartment import OneCompartmentModel
from .two_compartment import TwoCompartmentModel

MODELS: dict[str, type[KineticModel]] = {
    OneCompartmentModel.name: OneCompartmentModel,
    TwoCompartmentModel.name: TwoCompartmentModel,
}

__all__ = ["MODELS", "KineticModel", "OneCompartmentModel", "TwoCompartmentModel", "get_model"]


def get_model(name: str, protocol: Protocol, constants: Constants | None = None, **options) -> KineticModel:
    """The kinetic model ``name`` ("1c" or "2c") bound to ``protocol`` and ``constants``.

    options: model options, e.g. ``arterial_edge_s`` (s) for "2c".
    """
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
    return cls(protocol, constants, **options)
