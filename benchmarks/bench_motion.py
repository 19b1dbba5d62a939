"""The cost of motion correction: per volume and per session at 64×64×20 with 80 volumes (5 PLDs × 8
control/label pairs, a separate M0, motion up to 3 mm / 3°), and its share of a whole session with the
supervised network (issue 15's target: under 5 s per session and under 20 % of the session).

- ``test_realign_series``: :func:`aslbatch.motion.estimate_series_motion` then
  :func:`aslbatch.motion.apply_motion` on the series (what ``prepare_acquisition`` adds); extra_info
  gives seconds per session and per volume.
- ``test_session_with_and_without_correction``: :func:`aslbatch.batch.run_batch` with the supervised
  network (from the cache; trained once if missing), motion correction on and off, interleaved in one
  run; extra_info gives both session times and the share of the session that correction takes.
"""

import time

import nibabel as nib
import numpy as np
import pytest

from aslbatch.batch import run_batch
from aslbatch.motion import apply_motion, estimate_series_motion, voxel_sizes
from aslbatch.phantom import write_bids_dataset
from aslbatch.pipeline import Settings

SHAPE = (64, 64, 20)
REPEATS = 8  # 5 PLDs × 8 pairs = 80 volumes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("motion")
    return write_bids_dataset(root / "raw", subjects=1, model="1c", snr=10, seed=3, shape=SHAPE, repeats=REPEATS,
                              motion=3.0), root


def test_realign_series(benchmark, dataset):
    raw, _ = dataset
    path = raw / "sub-01" / "perf" / "sub-01_asl.nii.gz"
    image = nib.load(path)
    data = np.asarray(image.dataobj, dtype=np.float64)
    types = (raw / "sub-01" / "perf" / "sub-01_aslcontext.tsv").read_text().split()[1:]
    import json

    pld = np.array(json.loads((raw / "sub-01" / "perf" / "sub-01_asl.json").read_text())["PostLabelingDelay"])
    zooms = voxel_sizes(image.affine)

    def realign():
        estimate = estimate_series_motion(data, zooms, types, pld)
        return apply_motion(data, estimate.params, zooms)

    benchmark.pedantic(realign, rounds=2, iterations=1)
    best = benchmark.stats.stats.min
    benchmark.extra_info["volumes"] = int(data.shape[3])
    benchmark.extra_info["seconds_per_session"] = round(best, 3)
    benchmark.extra_info["seconds_per_volume"] = round(best / data.shape[3], 4)


def test_session_with_and_without_correction(benchmark, dataset):
    raw, root = dataset
    settings = {flag: Settings(methods=("supervised",), motion_correction=flag, robust_averaging=flag)
                for flag in (True, False)}
    run_batch(raw, root / "warm", settings[False])  # the network from the cache (trained once if missing)
    times: dict[bool, list[float]] = {True: [], False: []}

    def both():
        for flag in (True, False):  # interleaved: the machine's load hits both alike
            t0 = time.perf_counter()
            report = run_batch(raw, root / f"out-{flag}", settings[flag], force=True)
            times[flag].append(time.perf_counter() - t0)
            assert report.counts()["done"] == 1

    benchmark.pedantic(both, rounds=2, iterations=1)
    on, off = min(times[True]), min(times[False])
    benchmark.extra_info["session_s_corrected"] = round(on, 3)
    benchmark.extra_info["session_s_not_corrected"] = round(off, 3)
    benchmark.extra_info["correction_share_of_session"] = round((on - off) / on, 3)
