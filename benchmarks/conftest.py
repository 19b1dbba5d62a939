"""Shared fixtures of the benchmark suites (run with ``python -m pytest benchmarks/``).

Figures are reported by pytest-benchmark; ratios between methods measured in the same
run are what the closing notes quote. Nothing here asserts a wall-clock time.
"""

import numba
import pytest
from threadpoolctl import threadpool_limits


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Run the benchmark with numba and BLAS limited to 1, then 2 threads (capped at the machine)."""
    n = min(request.param, numba.config.NUMBA_NUM_THREADS)
    if n < request.param:
        pytest.skip(f"machine has {numba.config.NUMBA_NUM_THREADS} thread(s)")
    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    with threadpool_limits(n):
        yield n
    numba.set_num_threads(previous)
