"""aslbatch: quantitative perfusion maps from multi-delay arterial spin labeling MRI.

Public API: :class:`Protocol` and :class:`Constants` (the acquisition and the
physics constants), :func:`get_model` (the one- and two-compartment kinetic
models) and :mod:`aslbatch.simulate` (simulated data at a stated SNR).
"""

from ._version import __version__
from .models import get_model
from .protocol import Constants, Protocol, ProtocolError, default_protocol

__all__ = ["Constants", "Protocol", "ProtocolError", "__version__", "default_protocol", "get_model"]
