"""aslbatch.identify: the model each acquisition gets, decided from its crushing, and the
grouping of a session's series (pairs from aslbatch.bids.pair_series)."""

from __future__ import annotations

import numpy as np
import pytest

from aslbatch import bids
from aslbatch.identify import choose_model, group_acquisitions
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
