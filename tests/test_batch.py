"""The batch layer: up-to-date plan, lock, isolation, parallel workers, logs and summaries."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from aslbatch.batch import LockHeld, output_lock, run_batch
from aslbatch.cli import app
from aslbatch.exitcodes import EXIT_FAILED, EXIT_LOCKED, EXIT_OK
from aslbatch.phantom import write_bids_dataset
from aslbatch.pipeline import Settings

runner = CliRunner()
SHAPE = (10, 12, 4)


@pytest.fixture()
def dataset(tmp_path):
    return write_bids_dataset(tmp_path / "raw", subjects=3, model="1c", snr=10, seed=11, shape=SHAPE)


def _summary(out: Path) -> dict:
    return json.loads((out / "logs" / "latest_summary.json").read_text())


def test_rerun_skips_up_to_date_sessions_and_redoes_exactly_what_changed(dataset, tmp_path):
    out = tmp_path / "out"
    first = run_batch(dataset, out, Settings(methods=("lm",)))
    assert first.counts() == {"done": 3, "skipped": 0, "failed": 0} and first.exit_code == EXIT_OK
    again = run_batch(dataset, out, Settings(methods=("lm",)))
    assert again.counts() == {"done": 0, "skipped": 3, "failed": 0}
    # changed input bytes: only that session
    sidecar = dataset / "sub-02" / "perf" / "sub-02_asl.json"
    meta = json.loads(sidecar.read_text())
    meta["LabelingEfficiency"] = 0.8
    sidecar.write_text(json.dumps(meta))
    changed = run_batch(dataset, out, Settings(methods=("lm",)))
    assert {o.session: o.status for o in changed.outcomes} == {"sub-01": "skipped", "sub-02": "done", "sub-03": "skipped"}
    # changed settings: everything; --force: everything; a deleted output: that session
    assert run_batch(dataset, out, Settings(methods=("lut",))).counts()["done"] == 3
    assert run_batch(dataset, out, Settings(methods=("lut",)), force=True).counts()["done"] == 3
    (out / "sub-03" / "perf" / "sub-03_desc-lut_cbf.nii.gz").unlink()
    redo = run_batch(dataset, out, Settings(methods=("lut",)))
    assert {o.session for o in redo.outcomes if o.status == "done"} == {"sub-03"}


def test_dry_run_plans_without_writing(dataset, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", "--method", "lm", str(dataset), str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "sub-01: not processed yet" in result.output
    assert not list(out.glob("sub-*"))


def test_a_failing_session_is_recorded_and_the_others_finish(dataset, tmp_path):
    out = tmp_path / "out"
    (dataset / "sub-01" / "perf" / "sub-01_asl.nii.gz").write_bytes(b"\x1f\x8b truncated")
    report = run_batch(dataset, out, Settings(methods=("lm",)))
    status = {o.session: o for o in report.outcomes}
    assert status["sub-01"].status == "failed" and "sub-01_asl.nii.gz" in status["sub-01"].reason
    assert status["sub-02"].status == status["sub-03"].status == "done"
    assert report.exit_code == EXIT_FAILED
    summary = _summary(out)
    assert summary["counts"] == {"done": 2, "skipped": 0, "failed": 1}
    rows = (out / "logs" / "latest_summary.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:3] == ["session", "status", "reason"] and len(rows) == 4
    log = (out / "logs" / f"run-{report.run_id}.log").read_text()
    assert "sub-01: failed" in log and "sub-02: done" in log


def test_lock_blocks_a_second_run_and_dies_with_its_holder(dataset, tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        with pytest.raises(LockHeld, match="another aslbatch run holds the lock"):
            run_batch(dataset, out, Settings(methods=("lm",)))
        result = runner.invoke(app, ["run", "--method", "lm", str(dataset), str(out)])
        assert result.exit_code == EXIT_LOCKED and "holds the lock" in result.output
    # a holder killed with SIGKILL leaves the lock file but not the lock
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('locked', flush=True); time.sleep(60)"), str(out / ".aslbatch.lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(LockHeld):
        run_batch(dataset, out, Settings(methods=("lm",)))
    holder.kill()
    holder.wait()
    assert run_batch(dataset, out, Settings(methods=("lm",))).counts()["done"] == 3


def test_parallel_workers_give_the_same_maps_as_one_process(dataset, tmp_path):
    one = run_batch(dataset, tmp_path / "one", Settings(methods=("lm",)))
    two = run_batch(dataset, tmp_path / "two", Settings(methods=("lm",)), jobs=2, threads=1)
    assert one.counts()["done"] == two.counts()["done"] == 3
    import nibabel as nib

    for subject in ("01", "02", "03"):
        name = f"sub-{subject}/perf/sub-{subject}_desc-lm_cbf.nii.gz"
        a = np.asarray(nib.load(tmp_path / "one" / name).dataobj)
        b = np.asarray(nib.load(tmp_path / "two" / name).dataobj)
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_run_killed_mid_session_is_completed_by_the_rerun(dataset, tmp_path, signal_name):
    """A signal while sessions are being written, then a rerun: every session done, none lost."""
    import signal
    out = tmp_path / "out"
    stray = out / "sub-01" / "perf" / ".sub-01_desc-lm_cbf.nii.gz.x1y2.aslbatch-tmp.nii.gz"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"half a file")  # what kill -9 leaves mid-write
    code = ("import sys; from pathlib import Path; from aslbatch.batch import run_batch; "
            "from aslbatch.pipeline import Settings; run_batch(Path(sys.argv[1]), Path(sys.argv[2]), Settings(methods=('lm',)))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(dataset), str(out)])
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("sub-*/perf/*.nii.gz")):
        time.sleep(0.01)
    proc.send_signal(getattr(signal, signal_name))
    proc.wait(timeout=60)
    report = run_batch(dataset, out, Settings(methods=("lm",)))
    assert report.exit_code == EXIT_OK
    assert report.counts()["done"] + report.counts()["skipped"] == 3
    assert not list(out.rglob("*aslbatch-tmp*")), "temporaries of the killed run were not cleaned up"
    for subject in ("01", "02", "03"):
        assert (out / f"sub-{subject}" / "perf" / f"sub-{subject}_provenance.json").exists()


@pytest.mark.parametrize("label", ["../raw", "/etc", "01/../../x", ".."])
def test_participant_labels_with_path_tricks_are_refused(dataset, tmp_path, label):
    result = runner.invoke(app, ["run", "--method", "lm", str(dataset), str(tmp_path / "out"), "--participant-label", label])
    assert result.exit_code == 2 and "not found" in result.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("sub-*"))


def _break(dataset: Path, how: str) -> str:
    """Break sub-02 of ``dataset`` in one way; returns text the failure reason must contain."""
    import nibabel as nib

    perf = dataset / "sub-02" / "perf"
    asl = perf / "sub-02_asl.nii.gz"
    sidecar = perf / "sub-02_asl.json"
    meta = json.loads(sidecar.read_text())
    image = nib.load(asl)
    if how == "truncated":
        asl.write_bytes(asl.read_bytes()[:200])
        return "sub-02_asl.nii.gz"
    if how == "3d":
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[..., 0], image.affine), asl)
        return "sub-02_asl.nii.gz"
    if how == "nan_voxels":  # valid input: those voxels get status 3, the session is done
        data = np.asarray(image.dataobj).copy()
        data[0, 0, 0, :] = np.nan
        nib.save(nib.Nifti1Image(data, image.affine), asl)
        return ""
    if how == "zero_m0":
        m0 = perf / "sub-02_m0scan.nii.gz"
        m0_image = nib.load(m0)
        nib.save(nib.Nifti1Image(np.zeros(m0_image.shape, np.float32), m0_image.affine), m0)
        return "M0"
    if how == "missing_sidecar":
        sidecar.unlink()
        return "sub-02"
    if how == "missing_m0scan":
        (perf / "sub-02_m0scan.nii.gz").unlink()
        return "M0"
    if how == "aslcontext_rows":
        (perf / "sub-02_aslcontext.tsv").write_text("volume_type\ncontrol\nlabel\n")
        return "aslcontext"
    if how == "pld_ms":
        meta["PostLabelingDelay"] = [v * 1000 for v in meta["PostLabelingDelay"]]
    elif how == "pasl":
        meta["ArterialSpinLabelingType"] = "PASL"
    sidecar.write_text(json.dumps(meta))
    return {"pld_ms": "milliseconds", "pasl": "PASL"}[how]


@pytest.mark.parametrize("how", ["truncated", "3d", "zero_m0", "missing_sidecar", "missing_m0scan",
                                 "aslcontext_rows", "pld_ms", "pasl", "nan_voxels"])
def test_bad_input_fails_its_session_only_with_a_clear_reason(dataset, tmp_path, how):
    expected = _break(dataset, how)
    out = tmp_path / "out"
    report = run_batch(dataset, out, Settings(methods=("lm",)))
    status = {o.session: o for o in report.outcomes}
    assert status["sub-01"].status == status["sub-03"].status == "done"
    if not expected:
        assert status["sub-02"].status == "done" and report.exit_code == EXIT_OK
        return
    assert status["sub-02"].status == "failed" and expected in status["sub-02"].reason, status["sub-02"].reason
    assert report.exit_code == EXIT_FAILED
    assert "Traceback" not in status["sub-02"].reason
    assert expected in (out / "logs" / f"run-{report.run_id}.log").read_text()
    assert _summary(out)["sessions"][[o["session"] for o in _summary(out)["sessions"]].index("sub-02")]["status"] == "failed"


def test_disk_full_while_writing_fails_the_session_and_leaves_nothing_half_written(dataset, tmp_path, monkeypatch):
    import errno

    import aslbatch.derivatives as derivatives

    real_save = derivatives.nib.save
    calls = {"n": 0}

    def save(image, path):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(image, path)

    monkeypatch.setattr(derivatives.nib, "save", save)
    out = tmp_path / "out"
    report = run_batch(dataset, out, Settings(methods=("lm",)))
    failed = [o for o in report.outcomes if o.status == "failed"]
    assert len(failed) == 1 and "No space left on device" in failed[0].reason
    assert not list(out.rglob("*aslbatch-tmp*"))
    name = failed[0].session
    assert not (out / name / "perf" / f"{name}_provenance.json").exists()
    monkeypatch.setattr(derivatives.nib, "save", real_save)
    assert run_batch(dataset, out, Settings(methods=("lm",))).counts() == {"done": 1, "skipped": 2, "failed": 0}


def test_unwritable_output_folder_is_a_clear_usage_error(dataset, tmp_path):
    """An output folder that cannot be created or written (here: below a regular file, which
    fails even for root) is reported in one line, before any session runs."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    result = runner.invoke(app, ["run", "--method", "lm", str(dataset), str(blocker / "out")])
    assert result.exit_code == 2 and "cannot write outputs" in result.output
    assert "Traceback" not in result.output


def test_dask_local_cluster_gives_the_same_outputs_and_summary(dataset, tmp_path):
    distributed = pytest.importorskip("distributed", reason="the test extra installs dask[distributed]")
    import nibabel as nib

    local = run_batch(dataset, tmp_path / "local", Settings(methods=("lm",)))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        result = runner.invoke(app, ["run", "--method", "lm", str(dataset), str(tmp_path / "dask"), "--scheduler", cluster.scheduler_address])
        assert result.exit_code == 0, result.output
        again = run_batch(dataset, tmp_path / "dask", Settings(methods=("lm",)), scheduler=cluster.scheduler_address)
        assert again.counts() == {"done": 0, "skipped": 3, "failed": 0}
    assert _summary(tmp_path / "dask")["counts"] == {"done": 0, "skipped": 3, "failed": 0}
    for subject in ("01", "02", "03"):
        name = f"sub-{subject}/perf/sub-{subject}_desc-lm_cbf.nii.gz"
        np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "local" / name).dataobj),
                                      np.asarray(nib.load(tmp_path / "dask" / name).dataobj))
    assert local.counts()["done"] == 3


def test_unreachable_scheduler_is_a_clear_error(dataset, tmp_path, monkeypatch):
    pytest.importorskip("distributed", reason="the test extra installs dask[distributed]")
    import aslbatch.batch

    monkeypatch.setattr(aslbatch.batch, "SCHEDULER_TIMEOUT_S", 1)
    result = runner.invoke(app, ["run", "--method", "lm", str(dataset), str(tmp_path / "out"), "--scheduler", "tcp://127.0.0.1:9"])
    assert result.exit_code == 2 and "cannot reach the Dask scheduler" in result.output


def test_fifty_sessions_with_two_jobs_then_a_rerun_skips_all_and_a_touch_redoes_one(tmp_path):
    raw = write_bids_dataset(tmp_path / "raw", subjects=50, model="1c", snr=10, seed=21, shape=(8, 8, 3))
    out = tmp_path / "out"
    first = run_batch(raw, out, Settings(methods=("lm",)), jobs=2, threads=1)
    assert first.counts() == {"done": 50, "skipped": 0, "failed": 0}
    assert all(set(o.timings) == {"inputs", "prepare", "fit", "write", "report"} for o in first.outcomes)
    again = run_batch(raw, out, Settings(methods=("lm",)), jobs=2, threads=1)
    assert again.counts() == {"done": 0, "skipped": 50, "failed": 0}
    context = raw / "sub-37" / "perf" / "sub-37_aslcontext.tsv"
    context.write_text(context.read_text() + "\n")  # new bytes, same meaning
    touched = run_batch(raw, out, Settings(methods=("lm",)), jobs=2, threads=1)
    assert [o.session for o in touched.outcomes if o.status == "done"] == ["sub-37"]



def test_symlinked_subject_folder_is_read_and_outputs_stay_inside_out(tmp_path):
    """Subjects symlinked to storage elsewhere are followed for reading (documented); every
    output lands under OUT and nothing is written next to the link's target."""
    raw = write_bids_dataset(tmp_path / "raw", subjects=2, model="1c", snr=10, seed=13, shape=SHAPE)
    elsewhere = tmp_path / "archive"
    elsewhere.mkdir()
    (raw / "sub-02").rename(elsewhere / "sub-02")
    (raw / "sub-02").symlink_to(elsewhere / "sub-02", target_is_directory=True)
    before = sorted(p.relative_to(elsewhere) for p in elsewhere.rglob("*"))
    out = tmp_path / "out"
    report = run_batch(raw, out, Settings(methods=("lm",)))
    assert report.counts()["done"] == 2
    assert (out / "sub-02" / "perf" / "sub-02_provenance.json").exists()
    assert sorted(p.relative_to(elsewhere) for p in elsewhere.rglob("*")) == before


def test_qc_pages_written_by_default_skipped_with_no_report_and_never_fail_a_run(dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run_batch(dataset, out, Settings(methods=("lm",), report=False)).exit_code == EXIT_OK
    assert not (out / "qc.html").exists() and not list(out.rglob("*_qc.html"))
    # a rerun with reports: sessions are up to date, their missing pages are made
    again = run_batch(dataset, out, Settings(methods=("lm",)))
    assert again.counts()["skipped"] == 3
    pages = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_qc.html"))
    assert pages == [f"sub-0{k}/perf/sub-0{k}_qc.html" for k in (1, 2, 3)]
    index = (out / "qc.html").read_text()
    assert all(page in index for page in pages)
    assert {"*_qc.html", "/qc.html", "/logs/"} <= set((out / ".bidsignore").read_text().splitlines())

    import aslbatch.qc

    def broken(path):
        raise RuntimeError("no display today")

    monkeypatch.setattr(aslbatch.qc, "write_session_report", broken)
    forced = run_batch(dataset, out, Settings(methods=("lm",)), force=True)
    assert forced.counts()["done"] == 3
    log = next((out / "logs").glob(f"run-{forced.run_id}.log")).read_text()
    assert "QC page for" in log and "no display today" in log
    assert not list(out.rglob("*_qc.html"))  # pages of replaced outputs do not outlive them


def test_an_in_process_run_restores_the_callers_thread_settings(dataset, tmp_path):
    import numba
    from threadpoolctl import threadpool_info

    before_numba = numba.get_num_threads()
    before_blas = [pool["num_threads"] for pool in threadpool_info()]
    report = run_batch(dataset, tmp_path / "out", Settings(methods=("lm",), report=False), threads=1)
    assert report.exit_code == EXIT_OK
    assert numba.get_num_threads() == before_numba
    assert [pool["num_threads"] for pool in threadpool_info()] == before_blas


def test_an_unexpected_error_in_one_acquisition_fails_only_that_acquisition(tmp_path, monkeypatch):
    """Two acquisitions in one session: a numerical error (not a ValueError) in the first one is
    recorded with its type, logged with its traceback, and the second is still written."""
    import aslbatch.pipeline as pipeline

    raw = write_bids_dataset(tmp_path / "raw", subjects=1, model="1c", snr=10, seed=2, shape=SHAPE)
    perf = raw / "sub-01" / "perf"
    for path in list(perf.glob("sub-01_asl*")) + list(perf.glob("sub-01_aslcontext*")):
        (perf / path.name.replace("sub-01_", "sub-01_run-2_")).write_bytes(path.read_bytes())
    for path in perf.glob("sub-01_m0scan*"):
        (perf / path.name.replace("sub-01_", "sub-01_run-2_")).write_bytes(path.read_bytes())
    real = pipeline.prepare_acquisition

    def broken(acquisition, *args, **kwargs):
        if "run-2" not in acquisition.source_name:
            raise FloatingPointError("overflow in a kernel")
        return real(acquisition, *args, **kwargs)

    monkeypatch.setattr(pipeline, "prepare_acquisition", broken)
    report = run_batch(raw, tmp_path / "out", Settings(methods=("lm",), report=False))
    assert report.exit_code == EXIT_FAILED
    summary = _summary(tmp_path / "out")["sessions"][0]
    assert "FloatingPointError: overflow in a kernel" in summary["reason"]
    assert (tmp_path / "out" / "sub-01" / "perf" / "sub-01_run-2_desc-lm_cbf.nii.gz").is_file()
    log = next((tmp_path / "out" / "logs").glob("run-*.log")).read_text()
    assert "Traceback" in log and "FloatingPointError" in log


def test_a_run_groups_each_session_once_and_hashes_each_input_once(dataset, tmp_path, monkeypatch):
    import hashlib

    import aslbatch.batch as batch
    import aslbatch.pipeline as pipeline

    hashed, grouped = [], []
    real_hash, real_group = pipeline.sha256_file, batch.group_acquisitions

    def counting_hash(path):
        hashed.append(Path(path).relative_to(dataset).as_posix())
        return real_hash(path)

    def counting_group(session, model):
        grouped.append(session.name)
        return real_group(session, model)

    monkeypatch.setattr(pipeline, "sha256_file", counting_hash)
    monkeypatch.setattr(batch, "group_acquisitions", counting_group)
    monkeypatch.setattr(pipeline, "group_acquisitions", counting_group)
    out = tmp_path / "out"
    report = run_batch(dataset, out, Settings(methods=("lm",)))
    assert report.counts()["done"] == 3
    assert sorted(grouped) == ["sub-01", "sub-02", "sub-03"]
    assert len(hashed) == len(set(hashed))  # planning hashed each input; processing reused the digests
    recorded = {}
    for subject in ("01", "02", "03"):
        provenance = json.loads((out / f"sub-{subject}" / "perf" / f"sub-{subject}_provenance.json").read_text())
        recorded.update({item["path"]: item["sha256"] for item in provenance["inputs"]})
    assert set(recorded) == set(hashed)
    for path, digest in recorded.items():  # and they are the digests of the bytes on disk
        assert digest == hashlib.sha256((dataset / path).read_bytes()).hexdigest()


def test_an_image_changed_after_planning_is_hashed_again_and_recorded_as_read(dataset, tmp_path):
    import hashlib

    import nibabel as nib

    from aslbatch.batch import _run_session, plan_sessions
    from aslbatch.bids import find_sessions

    out = tmp_path / "out"
    settings = Settings(methods=("lm",), report=False)
    (plan,) = plan_sessions(find_sessions(dataset, ["01"]), out, settings)
    nifti = dataset / "sub-01" / "perf" / "sub-01_asl.nii.gz"
    planned = plan.inputs["sub-01"].sha256["sub-01/perf/sub-01_asl.nii.gz"]
    image = nib.load(nifti)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj) * 1.01, image.affine, image.header), nifti)
    assert _run_session(plan, out, settings).status == "done"
    provenance = json.loads((out / "sub-01" / "perf" / "sub-01_provenance.json").read_text())
    recorded = {item["path"]: item["sha256"] for item in provenance["inputs"]}
    assert recorded["sub-01/perf/sub-01_asl.nii.gz"] == hashlib.sha256(nifti.read_bytes()).hexdigest() != planned
    # the next run sees the digests it recorded: up to date
    assert run_batch(dataset, out, settings, participant_labels=["01"]).counts()["skipped"] == 1
