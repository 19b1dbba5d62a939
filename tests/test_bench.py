"""``aslbatch.bench``: the files, their content and its internal consistency, argument checks.

One run with the smallest sizes feeds most tests. No wall-clock time is asserted: on a
shared machine a timing check against an independent measurement would be flaky, so the
tests check that every figure is there, positive and finite, and that the ratios, rates and
per-session splits are the quotients and sums of the figures reported beside them.
"""

import itertools
import json
import math

import matplotlib.image
import numba
import numpy as np
import pytest
from threadpoolctl import threadpool_info

from aslbatch.atomic import stale_temporaries
from aslbatch.bench import (ROUGH_TRAINING_SAMPLES_PER_S, _config, coarse_start, expected_seconds, run_bench,
                            scipy_loop, thread_limit)

MODELS = ("1c", "2c", "pasl", "single")  # every registered model: the bench's default
METHODS = ("lm", "lut", "spatial", "supervised", "unsupervised", "whitepaper")
#: the closed form serves the single-delay model only, every other method the time-resolved ones
SERVED = [(m, e) for m in MODELS for e in METHODS if (m == "single") == (e == "whitepaper")]
SIZES = (200, 1000)
THREADS = tuple(t for t in (1, 2) if t <= numba.config.NUMBA_NUM_THREADS)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    result = run_bench(out, quick=True, sizes=SIZES, scipy_voxels=5, training_samples=2000, training_epochs=1,
                       batch_sessions=1, batch_shape=(16, 16, 8))
    return out, result, json.loads((out / "bench.json").read_text(encoding="utf-8"))


def test_files_are_written_atomically(bench):
    out, result, _ = bench
    assert {p.name for p in out.iterdir()} == {"bench.json", "bench.md", "bench.png"}
    assert result.paths == {"png": out / "bench.png", "md": out / "bench.md", "json": out / "bench.json"}
    assert stale_temporaries(out) == []


def test_json_is_the_result(bench):
    _, result, data = bench
    assert data == json.loads(json.dumps(result.to_dict()))
    assert data["format"] == "aslbatch.bench/1"
    machine = data["machine"]
    assert machine["cpu_count"] >= 1 and machine["numba_threads"] >= 1 and machine["threading_layer"]
    assert {"aslbatch", "python", "numpy", "scipy", "numba"} <= set(machine["versions"])
    assert machine["date"].endswith("+00:00")


def test_every_combination_asked_for_has_a_positive_rate(bench):
    _, _, data = bench
    rows = data["throughput"]
    keys = [(r["model"], r["method"], r["threads"], r["voxels"]) for r in rows]
    assert sorted(keys) == sorted((m, e, t, n) for (m, e), t, n in itertools.product(SERVED, THREADS, SIZES))
    for r in rows:
        assert math.isfinite(r["voxels_per_s"]) and r["voxels_per_s"] > 0
        assert r["rounds"] >= 3
    assert [r["model"] for r in data["scipy"]] == list(MODELS)
    assert all(r["voxels"] == 5 and r["voxels_per_s"] > 0 for r in data["scipy"])


def test_rates_and_ratios_are_the_quotients_of_the_reported_figures(bench):
    _, _, data = bench
    scipy = {r["model"]: r for r in data["scipy"]}
    lm = {(r["model"], r["threads"], r["voxels"]): r["voxels_per_s"] for r in data["throughput"] if r["method"] == "lm"}
    for r in data["throughput"]:
        assert r["voxels_per_s"] == pytest.approx(r["voxels"] / r["seconds"], rel=1e-12)
        assert r["vs_scipy"] == pytest.approx(r["voxels_per_s"] / scipy[r["model"]]["voxels_per_s"], rel=1e-12)
        if r["model"] == "single":  # LM does not serve the single-delay model: no ratio to it
            assert r["vs_lm"] is None
        else:
            assert r["vs_lm"] == pytest.approx(r["voxels_per_s"] / lm[r["model"], r["threads"], r["voxels"]], rel=1e-12)
    for r in data["scipy"]:
        assert r["seconds_per_voxel"] * r["voxels_per_s"] == pytest.approx(1.0, rel=1e-12)


def test_training_rows(bench):
    _, _, data = bench
    rows = data["training"]
    assert sorted((r["model"], r["method"]) for r in rows) == sorted(itertools.product(MODELS[:3], METHODS[2:5]))
    for r in rows:
        assert r["samples"] == 2000 and r["epochs"] == 1 and r["threads"] == max(THREADS)
        assert r["options"]["max_epochs"] == 1 and r["options"]["hidden_layers"]
        assert r["samples_per_s"] == pytest.approx(r["epochs"] * r["samples"] / r["training_seconds"], rel=1e-12)
        assert 0 < r["training_seconds"] <= r["seconds"]


def test_batch_split_adds_up(bench):
    _, _, data = bench
    assert [r["model"] for r in data["batch"]] == list(MODELS)
    for r in data["batch"]:
        split, stages = r["per_session_s"], r["stages_s"]
        assert set(stages) == {"inputs", "prepare", "fit", "write", "report"}
        assert all(v > 0 for v in stages.values())
        assert split["io"] == pytest.approx(stages["inputs"] + stages["write"])
        assert split["total"] == pytest.approx(sum(stages.values()))


def test_markdown_lists_every_method_and_section(bench):
    out, _, data = bench
    text = (out / "bench.md").read_text(encoding="utf-8")
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith(tuple(f"| {m} |" for m in MODELS))]
    listed = {(cells[0].strip(), cells[1].strip()) for cells in rows}
    assert set(SERVED) <= listed
    for heading in ("## Throughput", "## Training", "## Batch"):
        assert heading in text
    assert len([c for c in rows if len(c) == 7]) == len(data["throughput"])


def test_png_decodes_and_is_not_blank(bench):
    out, _, _ = bench
    png = out / "bench.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(png)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    colours = np.unique(pixels[..., :3].reshape(-1, 3), axis=0)
    assert len(colours) > 20 and pixels[..., :3].std() > 0.01


def test_thread_counts_beyond_the_machine_are_skipped_and_said(tmp_path):
    too_many = numba.config.NUMBA_NUM_THREADS + 1
    result = run_bench(tmp_path, models="1c", methods=("lut",), sizes=(100,), threads=(1, too_many), scipy_voxels=2,
                       batch_sessions=0, quick=True)
    assert result.settings["threads"] == [1] and result.settings["skipped_threads"] == [too_many]
    assert [r["threads"] for r in result.throughput] == [1]
    assert result.throughput[0]["vs_lm"] is None and result.training == [] and result.batch == []
    assert f"Thread counts [{too_many}] skipped" in (tmp_path / "bench.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("kwargs, message", [
    ({"models": ("3c",)}, "models"),
    ({"methods": ()}, "methods"),
    ({"methods": ("lm", "lm")}, "methods"),
    ({"methods": ("fast",)}, "methods"),
    ({"sizes": (0, 10)}, "sizes"),
    ({"sizes": (10, 10)}, "sizes"),
    ({"sizes": (1.5,)}, "sizes"),
    ({"threads": (0,)}, "threads"),
    ({"threads": (10**6,)}, "at most"),
    ({"scipy_voxels": 0}, "scipy_voxels"),
    ({"training_samples": 10}, "training_samples"),
    ({"training_epochs": 0}, "training_epochs"),
    ({"batch_sessions": -1}, "batch_sessions"),
    ({"training_epochs": 2, "early_stopping": True}, "exclude"),
    ({"batch_shape": (4, 4, 4)}, "batch_shape"),
    ({"batch_shape": (16, 16)}, "batch_shape"),
    ({"seed": "0"}, "seed"),
])
def test_invalid_arguments_raise_before_anything_runs(tmp_path, kwargs, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run_bench(out, quick=True, **kwargs)
    assert not out.exists()


def test_progress_states_the_expected_duration_and_counts_every_step(tmp_path, capsys):
    run_bench(tmp_path, models="1c", methods=("lut",), sizes=(100, 200), threads=(1,), scipy_voxels=2,
              batch_sessions=0, quick=True, progress=True)
    err = capsys.readouterr().err
    assert "bench: expected duration about" in err
    assert "3/3" in err  # the scipy loop, then lut at two sizes


def test_expected_duration_grows_with_the_work_asked_for():
    def expected(**options):
        settings = {"models": ("1c", "2c"), "methods": ("lm", "lut", "supervised", "unsupervised"), "sizes": None,
                    "threads": (1, 2), "scipy_voxels": None, "training_samples": None, "training_epochs": None,
                    "early_stopping": False, "batch_sessions": None, "batch_shape": None, "quick": False, "seed": 0}
        return expected_seconds(_config(**{**settings, **options}))

    default, quick = expected(), expected(quick=True)
    assert quick < default < expected(early_stopping=True)
    assert expected(models=("1c",)) < default and expected(threads=(1,)) < default
    # training: two networks per model, epochs x samples at the model's rate
    extra = expected(training_samples=2 * 10**6) - default
    assert extra == pytest.approx(sum(2 * 3 * 10**6 / ROUGH_TRAINING_SAMPLES_PER_S[m] for m in ("1c", "2c")))


def test_thread_limit_restores_numba_and_blas():
    before_numba = numba.get_num_threads()
    before_blas = [lib["num_threads"] for lib in threadpool_info()]
    with thread_limit(1):
        assert numba.get_num_threads() == 1
        assert all(lib["num_threads"] == 1 for lib in threadpool_info())
    assert numba.get_num_threads() == before_numba
    assert [lib["num_threads"] for lib in threadpool_info()] == before_blas


def test_scipy_loop_recovers_noise_free_parameters(model_1c):
    truth = np.array([[60.0, 1.4], [25.0, 1.9], [90.0, 2.4]])
    signals = model_1c.signal(truth)
    start = coarse_start(model_1c, signals)
    np.testing.assert_allclose(scipy_loop(model_1c, signals, start), truth, rtol=1e-5)
