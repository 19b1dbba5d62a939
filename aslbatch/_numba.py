"""Compiler options for every numba kernel in aslbatch, kept in one place.

Kernels are module-level functions compiled with ``cache=True`` so that the
compile cost is paid once per machine, not once per process. ``fastmath`` stays
off: it would let LLVM assume no NaN/Inf, and the estimators rely on detecting
invalid voxels.
"""

from numba import njit

#: options for a serial kernel (one voxel, one unit of work)
SERIAL = {"cache": True, "nogil": True, "fastmath": False, "error_model": "numpy"}
#: options for a driver that spreads voxels over threads with ``prange``
PARALLEL = {"cache": True, "nogil": True, "fastmath": False, "parallel": True, "error_model": "numpy"}


def serial(func):
    """Compile ``func`` as a cached serial kernel."""
    return njit(**SERIAL)(func)


def parallel(func):
    """Compile ``func`` as a cached parallel driver (``prange`` over voxels)."""
    return njit(**PARALLEL)(func)
