"""aslbatch.identify: the model each acquisition gets, decided from its crushing, and the
grouping of a session's series (pairs from aslbatch.bids.pair_series)."""

from __future__ import annotations

import numpy as np
import pytest

from aslbatch import bids
from aslbatch.identify import choose_model, group_acquisitions, undetermined_reason
from aslbatch.protocol import default_protocol

from .test_bids import add_series, root  # noqa: F401  (the fixture)


@pytest.mark.parametrize(
    "crushed, requested, expected",
    [
        ([False, False, False], "auto", "1c"),
        ([True, True], "auto", "1c"),  # crushed volumes alone: no arterial signal to separate
        ([False, False, True], "auto", "2c"),
        ([False, True], "1c", "1c"),
        ([True, False], "2c", "2c"),
    ],
)
def test_choose_model_from_the_crushing(crushed, requested, expected):
    assert choose_model(crushed, requested) == expected


def test_choose_model_on_the_default_protocols_and_bad_requests():
    assert choose_model(default_protocol("1c").crushed) == "1c"
    assert choose_model(default_protocol("2c").crushed) == "2c"
    assert choose_model(np.array([False, True])) == "2c"
    with pytest.raises(ValueError, match="model 2c needs crushed and non-crushed volumes"):
        choose_model(default_protocol("1c").crushed, "2c")
    with pytest.raises(ValueError, match="model must be one of"):
        choose_model([False], "3c")


def test_grouping_gives_each_acquisition_the_chosen_model(root):  # noqa: F811
    add_series(root, "sub-01_acq-nocrush", VascularCrushing=False)
    add_series(root, "sub-01_acq-dante", VascularCrushing=True)
    add_series(root, "sub-01_acq-other_run-2", VascularCrushing=True)
    (session,) = bids.find_sessions(root)
    pairs, alone = bids.pair_series(session.series)
    assert [[s.name for s in pair] for pair in pairs] == [["sub-01_acq-nocrush", "sub-01_acq-dante"]]
    assert [s.name for s, _ in alone] == ["sub-01_acq-other_run-2"]
    found = group_acquisitions(session)
    assert [(a.source_name, a.model) for a in found] == [("sub-01", "2c"), ("sub-01_acq-other_run-2", "1c")]
    for acquisition in found:  # the model is choose_model's verdict on the series' crushing
        flags = [bids.vascular_crushing(s.metadata) for s in acquisition.series]
        assert acquisition.model == choose_model(flags)
    assert bids.group_acquisitions is group_acquisitions  # still reachable from aslbatch.bids


# --- what the protocol can determine ------------------------------------------------------------
def _records(session):
    return {s.relpath: bids.check_series(s)[0] for s in session.series}


@pytest.mark.parametrize("plds, refused", [
    (1.5, True),                                        # one PLD, four pairs: CBF only
    ([1.0, 1.0, 1.5, 1.5, 2.0, 2.0, 2.5, 2.5], False),  # four delays: CBF and arrival time
])
def test_an_acquisition_read_at_one_time_is_refused_with_its_reason(root, plds, refused):  # noqa: F811
    add_series(root, PostLabelingDelay=plds)
    session = bids.find_sessions(root)[0]
    (acquisition,) = group_acquisitions(session)
    reason = undetermined_reason(acquisition, [_records(session)[s.relpath] for s in acquisition.series])
    assert (reason is not None) == refused
    if refused:
        assert "PLD 1.5 s after a 1.8 s label" in reason and "CBF only" in reason


def test_a_crushed_pair_counts_the_readout_times_of_both_series(root):  # noqa: F811
    add_series(root, "sub-01_acq-nocrush", PostLabelingDelay=1.0, VascularCrushing=False)
    add_series(root, "sub-01_acq-dante", PostLabelingDelay=2.0, VascularCrushing=True)
    session = bids.find_sessions(root)[0]
    (acquisition,) = group_acquisitions(session)
    records = _records(session)
    assert undetermined_reason(acquisition, [records[s.relpath] for s in acquisition.series]) is None


def test_validate_and_run_refuse_a_single_delay_dataset_and_write_no_map(tmp_path):
    """A single-PLD phantom: validate names the reason; run fails the session with it, no CBF map
    (LM would otherwise report the arrival time arbitrarily and CBF scaled by it, as converged)."""
    from aslbatch.batch import run_batch
    from aslbatch.phantom import write_bids_dataset
    from aslbatch.pipeline import Settings
    from aslbatch.protocol import Protocol

    raw = write_bids_dataset(tmp_path / "raw", subjects=1, shape=(8, 8, 4), protocol=Protocol(1.8, [1.8]),
                             repeats=4, seed=3)
    problems = [str(p) for p in bids.validate_dataset(raw)]
    assert len(problems) == 1 and "single-delay acquisition determines CBF only" in problems[0]
    report = run_batch(raw, tmp_path / "out", Settings(methods=("lm",), report=False))
    assert report.exit_code != 0
    assert not list((tmp_path / "out").rglob("*_cbf.nii.gz"))
    assert "CBF only" in report.outcomes[0].reason
