"""Batch throughput at a realistic size: 64x64x20 voxels, 5 PLDs x 4 control/label pairs, LM.

Reports sessions per minute with 1 and 2 jobs and the share of session time spent reading
and hashing inputs, loading and preprocessing, fitting and writing (extra_info).
"""

import pytest

from aslbatch.batch import run_batch
from aslbatch.phantom import write_bids_dataset
from aslbatch.pipeline import Settings

SESSIONS = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    return write_bids_dataset(root / "raw", subjects=SESSIONS, model="1c", snr=10, seed=3, shape=(64, 64, 20),
                              repeats=4), root


@pytest.mark.parametrize("jobs", [1, 2])
def test_sessions_per_minute(benchmark, dataset, jobs):
    raw, root = dataset
    out = root / f"out-{jobs}"
    run_batch(raw, out, Settings(methods=("lm",)), jobs=jobs)  # warm: worker start and the numba cache
    report = benchmark.pedantic(run_batch, args=(raw, out, Settings(methods=("lm",))), kwargs={"jobs": jobs, "force": True},
                                rounds=2, iterations=1)
    assert report.counts()["done"] == SESSIONS
    stages = {}
    for outcome in report.outcomes:
        for stage, seconds in outcome.timings.items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    total = sum(stages.values())
    benchmark.extra_info["sessions_per_minute"] = round(SESSIONS / benchmark.stats.stats.min * 60, 1)
    benchmark.extra_info["time_share"] = {k: round(v / total, 3) for k, v in stages.items()}
    benchmark.extra_info["session_time_s"] = {k: round(v / SESSIONS, 3) for k, v in stages.items()}
