"""Whole-process cost of the command line (issue 12: the process, not the fit, was the cost).

Each benchmark runs a fresh interpreter as the ``aslbatch`` script does: ``aslbatch --help``,
``aslbatch validate`` of a small phantom dataset, and ``aslbatch fit --method lm`` on 400 000
one-compartment voxels, whose voxels/s (whole process) is in ``extra_info`` beside the
in-process kernel's voxels/s measured in the same run. Warm: numba's cache is filled by a
first untimed call.
"""

import os
import subprocess
import sys
import time

import pytest

from aslbatch.estimators import get_estimator
from aslbatch.models import get_model
from aslbatch.phantom import write_bids_dataset
from aslbatch.protocol import default_protocol
from aslbatch.simulate import simulate

N_FIT = 400_000
SCRIPT = [sys.executable, "-c", "import sys; from aslbatch.cli import app; sys.exit(app())"]


#: one core: numba's and BLAS's threads
ONE_CORE = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _run(args, env=None):
    done = subprocess.run(SCRIPT + list(args), capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    return write_bids_dataset(tmp_path_factory.mktemp("startup") / "raw", subjects=2, shape=(16, 16, 6), seed=1)


@pytest.fixture(scope="module")
def fit_set(tmp_path_factory):
    path = tmp_path_factory.mktemp("fit") / "set.npz"
    model = get_model("1c", default_protocol("1c"))
    data = simulate(model, N_FIT, 5.0, seed=0)
    data.save(path)
    return model, data, path


def test_help(benchmark):
    _run(["--help"])
    benchmark.group = "startup"
    benchmark.pedantic(_run, args=(["--help"],), rounds=5, iterations=1)


def test_validate(benchmark, small_dataset):
    _run(["validate", str(small_dataset)])
    benchmark.group = "startup"
    benchmark.pedantic(_run, args=(["validate", str(small_dataset)],), rounds=5, iterations=1)


def test_fit_lm_whole_process(benchmark, fit_set, tmp_path):
    model, data, path = fit_set
    args = ["fit", "--in", str(path), "--out", str(tmp_path / "fit.npz"), "--method", "lm",
            "--model", "1c"]
    _run(args, ONE_CORE)  # numba's cache filled
    estimator = get_estimator("lm", model).fit()
    estimator.predict(data.signals[:100])
    import numba

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    t0 = time.perf_counter()
    estimator.predict(data.signals)
    kernel_s = time.perf_counter() - t0
    numba.set_num_threads(threads)
    benchmark.group = "startup"
    benchmark.extra_info["voxels"] = N_FIT
    benchmark.extra_info["kernel_voxels_per_s"] = N_FIT / kernel_s
    benchmark.pedantic(_run, args=(args, ONE_CORE), rounds=3, iterations=1)
    benchmark.extra_info["whole_process_voxels_per_s"] = N_FIT / benchmark.stats.stats.mean
