"""Numba reductions over the rows of a voxels × volumes array, for the estimators' Python layer."""

from __future__ import annotations

import math

from numba import prange

from .._numba import parallel

__all__ = ["rms_of_finite"]


@parallel
def rms_of_finite(values, out):
    """Root mean square of the finite entries of each row of ``values`` (n, m) into ``out`` (n,); NaN
    for a row without one (one pass, no temporaries: 10^6 voxels' signal_se in milliseconds)."""
    for i in prange(values.shape[0]):
        total = 0.0
        count = 0
        for j in range(values.shape[1]):
            v = values[i, j]
            if math.isfinite(v):
                total += v * v
                count += 1
        out[i] = math.sqrt(total / count) if count > 0 else math.nan
