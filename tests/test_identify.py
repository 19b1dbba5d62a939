"""aslbatch.identify: the model each acquisition gets, decided from its crushing, and the
grouping of a session's series (pairs from aslbatch.bids.pair_series)."""

from __future__ import annotations

import numpy as np
import pytest

from aslbatch import bids
from aslbatch.identify import choose_model, decide, group_acquisitions
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
    with pytest.raises(ValueError, match="model must be auto or one of"):
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
def _decide(session, requested="auto"):
    records = {s.relpath: bids.check_series(s)[0] for s in session.series}
    (acquisition,) = group_acquisitions(session, requested)
    return decide(acquisition, [records[s.relpath] for s in acquisition.series], requested)


@pytest.mark.parametrize("plds, taus, model", [
    (1.5, 1.8, "single"),                                        # one PLD, four pairs: CBF only
    ([1.0, 1.0, 1.5, 1.5, 2.0, 2.0, 2.5, 2.5], 1.8, "1c"),      # four delays: CBF and arrival time
    # two labels read at the same time (τ + PLD = 3.3 s): fully delivered, att still undetermined
    ([1.5, 1.5, 1.5, 1.5, 2.0, 2.0, 2.0, 2.0], [1.8] * 4 + [1.3] * 4, "single"),
])
def test_the_model_follows_from_the_readout_times(root, plds, taus, model):  # noqa: F811
    add_series(root, PostLabelingDelay=plds, LabelingDuration=taus)
    decision = _decide(bids.find_sessions(root)[0])
    assert decision.model == model
    assert decision.parameters == (("cbf",) if model == "single" else ("cbf", "att"))
    if model == "single":
        assert decision.options == {"labeling": "pcasl"}
        assert "CBF only" in decision.reason and "arrived before the PLD" in decision.reason


def _estimated(reason):
    """The parameter names after "estimates" in a decision's reason."""
    import re

    words = re.search(r"estimates ([a-z, ]+?)(?: by|$)", reason).group(1)
    return tuple(w for w in re.split(r", | and ", words) if w)


def test_the_reason_names_exactly_the_models_parameters_and_the_2c_prior_sets_the_threshold(root):  # noqa: F811
    from aslbatch.identify import ARTERIAL_ARRIVAL_MAX_S
    from aslbatch.models import MODELS

    assert ARTERIAL_ARRIVAL_MAX_S == MODELS["2c"].parameter("abat").training_range[1]
    add_series(root, "sub-01_acq-nocrush", PostLabelingDelay=1.0, VascularCrushing=False)
    add_series(root, "sub-01_acq-dante", PostLabelingDelay=2.0, VascularCrushing=True)
    add_series(root, "sub-02", PostLabelingDelay=1.8)
    add_series(root, "sub-03", PostLabelingDelay=[1.0, 1.0, 1.5, 1.5, 2.0, 2.0, 2.5, 2.5])
    _, verdicts = bids.inspect_dataset(root)
    assert sorted(v.decision.model for v in verdicts) == ["1c", "2c", "single"]
    for verdict in verdicts:
        assert _estimated(verdict.decision.reason) == verdict.decision.parameters


def test_a_single_delay_reason_names_the_delay(root):  # noqa: F811
    add_series(root, PostLabelingDelay=1.5)
    assert "PLD 1.5 s after a 1.8 s label" in _decide(bids.find_sessions(root)[0]).reason


@pytest.mark.parametrize("plain_pld, model", [(1.0, "2c"), (1.8, "1c")])
def test_a_crushed_pair_needs_a_short_non_crushed_pld_for_the_arterial_compartment(root, plain_pld, model):  # noqa: F811
    """The arterial signal is seen only at non-crushed PLDs before the arterial arrival (abat ≤ 1.5 s
    in the 2C prior): without one, aCBV and abat are not determined and the tissue model is fitted."""
    add_series(root, "sub-01_acq-nocrush", PostLabelingDelay=plain_pld, VascularCrushing=False)
    add_series(root, "sub-01_acq-dante", PostLabelingDelay=2.0, VascularCrushing=True)
    decision = _decide(bids.find_sessions(root)[0])
    assert decision.model == model
    if model == "1c":
        assert "aCBV and the arterial arrival time are not determined" in decision.reason


def test_a_model_the_protocol_cannot_determine_is_refused_when_asked_for(root):  # noqa: F811
    add_series(root, "sub-01_acq-nocrush", PostLabelingDelay=1.8, VascularCrushing=False)
    add_series(root, "sub-01_acq-dante", PostLabelingDelay=2.0, VascularCrushing=True)
    with pytest.raises(bids.BidsError, match="the 2c model was asked for.*use --model auto"):
        _decide(bids.find_sessions(root)[0], "2c")


def test_a_single_delay_series_is_refused_for_a_time_resolved_model(root):  # noqa: F811
    add_series(root, PostLabelingDelay=1.8)
    with pytest.raises(bids.BidsError, match="the 1c model was asked for.*CBF only"):
        _decide(bids.find_sessions(root)[0], "1c")
    assert _decide(bids.find_sessions(root)[0], "single").model == "single"


def test_validate_reports_each_acquisitions_model_and_parameters(root):  # noqa: F811
    add_series(root, "sub-01", PostLabelingDelay=1.8)
    add_series(root, "sub-02", PostLabelingDelay=[1.0, 1.0, 1.5, 1.5, 2.0, 2.0, 2.5, 2.5])
    problems, verdicts = bids.inspect_dataset(root)
    assert problems == []
    found = {v.source_name: (v.decision.model, v.decision.parameters) for v in verdicts}
    assert found == {"sub-01": ("single", ("cbf",)), "sub-02": ("1c", ("cbf", "att"))}


def _white_paper_cbf(deltam_over_m0, pld, tau, constants):
    """The consensus formula as Alsop et al. 2015 print it (independent of aslbatch's models)."""
    c = constants
    return (6000 * c.lam * deltam_over_m0 * np.exp(pld / c.t1b)
            / (2 * c.alpha * c.alpha_bs * c.t1b * (1 - np.exp(-tau / c.t1b))))


def test_a_single_delay_dataset_gets_the_white_paper_cbf_and_its_spread(tmp_path):
    """Every method name on single-delay data gives one desc-whitepaper CBF map, no arrival time;
    the map is the white-paper formula applied to the mean control − label over M0 (computed here
    from the raw images), and its standard error is the spread of the pairs through the formula."""
    import json

    import nibabel as nib

    from aslbatch.batch import run_batch
    from aslbatch.phantom import write_bids_dataset
    from aslbatch.pipeline import Settings
    from aslbatch.protocol import Constants, Protocol

    raw = write_bids_dataset(tmp_path / "raw", subjects=1, shape=(8, 8, 4), protocol=Protocol(1.8, [1.8]),
                             repeats=4, seed=3, snr=5.0, noise="gaussian")
    report = run_batch(raw, tmp_path / "out", Settings(methods=("lm", "supervised"), report=False))
    assert report.exit_code == 0
    perf = tmp_path / "out" / "sub-01" / "perf"
    written = sorted(p.name for p in perf.glob("*.nii.gz"))
    assert written == ["sub-01_desc-brain_mask.nii.gz", "sub-01_desc-whitepaper_cbf.nii.gz",
                       "sub-01_desc-whitepaper_cbfse.nii.gz", "sub-01_desc-whitepaper_status.nii.gz"]
    series = nib.load(raw / "sub-01" / "perf" / "sub-01_asl.nii.gz").get_fdata()
    kinds = (raw / "sub-01" / "perf" / "sub-01_aslcontext.tsv").read_text().split()[1:]
    m0 = nib.load(raw / "sub-01" / "perf" / "sub-01_m0scan.nii.gz").get_fdata()
    m0 = m0.mean(axis=3) if m0.ndim == 4 else m0
    control = series[..., [i for i, k in enumerate(kinds) if k == "control"]]
    label = series[..., [i for i, k in enumerate(kinds) if k == "label"]]
    pairs = (control - label) / m0[..., None]
    mask = nib.load(perf / "sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
    sidecar = json.loads((raw / "sub-01" / "perf" / "sub-01_asl.json").read_text())
    constants = Constants(alpha=sidecar["LabelingEfficiency"])
    expected = _white_paper_cbf(pairs.mean(axis=3), 1.8, 1.8, constants)[mask]
    expected_se = _white_paper_cbf(pairs.std(axis=3, ddof=1) / 2.0, 1.8, 1.8, constants)[mask]
    cbf = nib.load(perf / "sub-01_desc-whitepaper_cbf.nii.gz").get_fdata()[mask]
    se = nib.load(perf / "sub-01_desc-whitepaper_cbfse.nii.gz").get_fdata()[mask]
    np.testing.assert_allclose(cbf, expected, rtol=1e-5, atol=1e-3)  # float32 maps
    np.testing.assert_allclose(se, expected_se, rtol=1e-5, atol=1e-3)
    meta = json.loads((perf / "sub-01_desc-whitepaper_cbf.json").read_text())
    assert meta["Identifiability"]["parameters"] == ["cbf"]
    assert "att < PLD" in meta["ModelAssumptions"] and "λ = 0.9 mL/g" in meta["ModelAssumptions"]
    provenance = json.loads((perf / "sub-01_provenance.json").read_text())
    assert provenance["decision"]["model"] == "single" and provenance["methods"] == ["whitepaper"]
