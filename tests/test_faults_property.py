"""Fault catalogue, property-based (issue 14): sidecars whose fields aslbatch reads hold random
types and values; every outcome is a session done or failed with a named input error (a
BidsError or ProtocolError naming the file), never an unforeseen exception, and the raw dataset
is never modified."""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from aslbatch.batch import run_batch
from aslbatch.phantom import write_bids_dataset
from aslbatch.pipeline import Settings

from .faults import assert_no_stray_files, assert_untouched, tree_digest

#: every field of the ASL sidecar that aslbatch reads
FIELDS = ("ArterialSpinLabelingType", "M0Type", "MagneticFieldStrength", "PostLabelingDelay", "LabelingDuration",
          "RepetitionTimePreparation", "MRAcquisitionType", "BackgroundSuppression",
          "BackgroundSuppressionNumberPulses", "LabelingEfficiency", "VascularCrushing", "SliceTiming",
          "SliceEncodingDirection", "M0Estimate", "BolusCutOffFlag", "BolusCutOffDelayTime",
          "BolusCutOffTechnique", "IntendedFor", "RepetitionTime")

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**30, max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0]),
    st.text(max_size=12),
    st.sampled_from(["PCASL", "PASL", "CASL", "Separate", "Included", "Estimate", "Absent", "3D", "2D", "i", "k-",
                     "Q2TIPS", "ms", "1.8", "true", "false"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=12),
                                                       st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=20)
changes = st.dictionaries(st.sampled_from(FIELDS), st.one_of(values, st.just("__delete__")), min_size=1, max_size=4)

_BASE = Path(tempfile.mkdtemp(prefix="aslbatch-property-")) / "raw"
write_bids_dataset(_BASE, subjects=1, shape=(4, 4, 2), seed=2)
SIDECAR = Path("sub-01") / "perf" / "sub-01_asl.json"
#: a failure names its file (BidsError) or the invalid constant (ProtocolError)
NAMED = r"(sub-01: )?(BidsError: sub-01/|ProtocolError: )"


def _json_text(meta):
    """As a scanner's converter may write it: NaN and Infinity are accepted by Python's reader."""
    return json.dumps(meta, allow_nan=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=changes)
def test_random_sidecar_fields_give_done_or_a_named_error(changes, tmp_path_factory):
    work = tmp_path_factory.mktemp("case")
    raw = work / "raw"
    shutil.copytree(_BASE, raw)
    meta = json.loads((raw / SIDECAR).read_text())
    for key, value in changes.items():
        if value == "__delete__":
            meta.pop(key, None)
        else:
            meta[key] = value
    (raw / SIDECAR).write_text(_json_text(meta))
    before = tree_digest(raw)
    report = run_batch(raw, work / "out", Settings(methods=("lut",), report=False))
    (outcome,) = report.outcomes
    assert outcome.status in ("done", "failed")
    if outcome.status == "failed":
        assert re.match(NAMED, outcome.reason), outcome.reason
    else:
        assert report.exit_code == 0
    log = next((work / "out" / "logs").glob("run-*.log")).read_text()
    assert "Traceback" not in log and "unexpectedly" not in log, log
    assert_untouched(raw, before)
    assert_no_stray_files(work / "out")


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    shutil.rmtree(_BASE.parent, ignore_errors=True)
