"""aslbatch: quantitative perfusion maps from multi-delay arterial spin labeling MRI.

Public API: :class:`Protocol` and :class:`Constants` (the acquisition and the
physics constants), :func:`get_model` (the kinetic models) and
:mod:`aslbatch.simulate` (simulated data at a stated SNR). The names are imported
on first use, so ``import aslbatch`` (and ``aslbatch --help``) loads neither numpy
nor numba.
"""

from importlib import import_module

from ._version import __version__

#: public name -> the module that defines it
_PUBLIC = {
    "Constants": "aslbatch.protocol",
    "Protocol": "aslbatch.protocol",
    "ProtocolError": "aslbatch.protocol",
    "default_protocol": "aslbatch.protocol",
    "get_model": "aslbatch.models",
}

__all__ = ["Constants", "Protocol", "ProtocolError", "__version__", "default_protocol", "get_model"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'aslbatch' has no attribute {name!r}")
