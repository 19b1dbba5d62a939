"""Fault catalogue, reading (issue 14.4): a file that cannot be parsed, met during discovery,
planning or processing, fails its own session with a named error; the other subjects finish,
the summary and the QC index are written, the raw dataset is unchanged, no stray file remains."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from aslbatch import bids
from aslbatch.batch import run_batch
from aslbatch.exitcodes import EXIT_FAILED
from aslbatch.phantom import write_bids_dataset
from aslbatch.pipeline import Settings

from .faults import assert_no_stray_files, assert_untouched, tree_digest

SETTINGS = Settings(methods=("lut",))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_bids_dataset(tmp_path_factory.mktemp("faults") / "raw", subjects=3, shape=(8, 8, 4), seed=1)


@pytest.fixture
def raw(base, tmp_path):
    copy = tmp_path / "raw"
    shutil.copytree(base, copy)
    return copy


def _nested_json(raw):
    path = raw / "sub-02" / "perf" / "sub-02_asl.json"
    text = json.dumps(json.loads(path.read_text()))
    path.write_text(text[:-1] + ', "VendorJunk": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return "sub-02/perf/sub-02_asl.json: cannot read JSON: nested deeper than the parser allows"


def _nan_intercept(raw):
    path = raw / "sub-02" / "perf" / "sub-02_asl.nii.gz"
    image = nib.load(path)
    broken = nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, image.header)
    broken.header["scl_slope"], broken.header["scl_inter"] = 1.0, np.nan
    nib.save(broken, path)
    return "sub-02/perf/sub-02_asl.nii.gz: cannot read the NIfTI header: Valid slope but invalid intercept nan"


def _malformed_entity(raw):
    folder = raw / "sub-02" / "perf"
    for path in list(folder.glob("sub-02_asl*")):
        path.rename(folder / path.name.replace("sub-02_asl", "sub-02_acq-a-b_asl"))
    return "file name part 'acq-a-b' is not an entity key-label pair"


def _garbage_nifti(raw):
    (raw / "sub-02" / "perf" / "sub-02_asl.nii.gz").write_bytes(b"not a NIfTI image at all" * 10)
    return "sub-02/perf/sub-02_asl.nii.gz: cannot read the NIfTI header"


def _integer_too_long_for_json(raw):
    path = raw / "sub-02" / "perf" / "sub-02_asl.json"
    text = json.dumps(json.loads(path.read_text()))
    path.write_text(text[:-1] + ', "VendorCounter": ' + "9" * 5000 + "}")
    return "sub-02/perf/sub-02_asl.json: cannot read JSON"


@pytest.mark.parametrize("damage", [_nested_json, _nan_intercept, _malformed_entity, _garbage_nifti,
                                    _integer_too_long_for_json])
def test_an_unparsable_file_fails_its_session_only(raw, tmp_path, damage):
    expected = damage(raw)
    before = tree_digest(raw)
    out = tmp_path / "out"
    report = run_batch(raw, out, SETTINGS)
    outcomes = {o.session: o for o in report.outcomes}
    assert report.exit_code == EXIT_FAILED
    assert outcomes["sub-01"].status == outcomes["sub-03"].status == "done"
    assert outcomes["sub-02"].status == "failed" and expected in outcomes["sub-02"].reason
    summary = json.loads((out / "logs" / "latest_summary.json").read_text())
    assert {s["session"]: s["status"] for s in summary["sessions"]} == {"sub-01": "done", "sub-02": "failed",
                                                                        "sub-03": "done"}
    assert "sub-02" in (out / "qc.html").read_text(encoding="utf-8")
    assert_untouched(raw, before)
    assert_no_stray_files(out)
    problems = [str(p) for p in bids.validate_dataset(raw)]  # validate names it too, without a traceback
    assert any(expected in p for p in problems)
    if damage is _nested_json:  # the fields of an unreadable sidecar are unknown, not reported missing
        assert not [p for p in problems if "is missing" in p], problems


def test_a_reader_failing_in_an_unforeseen_way_fails_its_series_only(raw, tmp_path, monkeypatch):
    """Discovery isolates every series: an exception no reader anticipated (here RuntimeError from
    the aslcontext reader of one subject) becomes that series' problem."""
    from aslbatch.bids import layout

    real = layout.read_aslcontext

    def flaky(path, display):
        if "sub-02" in str(path):
            raise RuntimeError("disk hiccup")
        return real(path, display)

    monkeypatch.setattr(layout, "read_aslcontext", flaky)
    before = tree_digest(raw)
    report = run_batch(raw, tmp_path / "out", SETTINGS)
    outcomes = {o.session: o for o in report.outcomes}
    assert outcomes["sub-02"].status == "failed" and "RuntimeError: disk hiccup" in outcomes["sub-02"].reason
    assert outcomes["sub-01"].status == outcomes["sub-03"].status == "done"
    assert (tmp_path / "out" / "logs" / "latest_summary.tsv").is_file()
    assert_untouched(raw, before)


def test_planning_failing_in_an_unforeseen_way_fails_its_session_only(raw, tmp_path, monkeypatch):
    from aslbatch import batch

    real = batch.hash_inputs

    def flaky(acquisition, known=None):
        if acquisition.subject == "02":
            raise RuntimeError("hash failed")
        return real(acquisition, known)

    monkeypatch.setattr(batch, "hash_inputs", flaky)
    monkeypatch.setattr("aslbatch.pipeline.hash_inputs", flaky)
    report = run_batch(raw, tmp_path / "out", SETTINGS)
    outcomes = {o.session: o for o in report.outcomes}
    assert outcomes["sub-02"].status == "failed" and "hash failed" in outcomes["sub-02"].reason
    assert outcomes["sub-01"].status == outcomes["sub-03"].status == "done"
    assert (tmp_path / "out" / "logs" / "latest_summary.json").is_file() and (tmp_path / "out" / "qc.html").is_file()


@pytest.mark.parametrize("field", ["LabelingEfficiency", "MagneticFieldStrength", "PostLabelingDelay"])
def test_an_integer_beyond_the_float_range_is_a_named_error(raw, tmp_path, field):
    """JSON allows integers of any size; one beyond the float range is refused by name (it used to
    end in an OverflowError traceback)."""
    path = raw / "sub-02" / "perf" / "sub-02_asl.json"
    meta = json.loads(path.read_text())
    meta[field] = 10**400
    path.write_text(json.dumps(meta))
    problems = [str(p) for p in bids.validate_dataset(raw)]
    assert any(p.startswith(f"sub-02/perf/sub-02_asl.json: {field} must be") for p in problems), problems
    report = run_batch(raw, tmp_path / "out", SETTINGS)
    outcomes = {o.session: o for o in report.outcomes}
    assert outcomes["sub-02"].status == "failed" and f"{field} must be" in outcomes["sub-02"].reason
    assert outcomes["sub-01"].status == outcomes["sub-03"].status == "done"
