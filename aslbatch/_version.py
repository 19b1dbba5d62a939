"""The single source of the package version, and the versions of what it runs on."""

from __future__ import annotations

import platform
from importlib import metadata

__version__ = "0.1.0"

#: the packages whose versions every provenance, network card and report records
RECORDED_PACKAGES = ("numpy", "numba", "llvmlite", "scipy", "scikit-learn", "nibabel", "matplotlib", "threadpoolctl")


def versions() -> dict[str, str | None]:
    """aslbatch, Python and each of RECORDED_PACKAGES (None where not installed)."""
    out: dict[str, str | None] = {"aslbatch": __version__, "python": platform.python_version()}
    for package in RECORDED_PACKAGES:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out
