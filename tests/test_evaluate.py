"""The Monte Carlo evaluation: a complete TSV, numbers recomputed independently, reports that parse."""

import base64
import csv
import io
import math
from html.parser import HTMLParser

import matplotlib.image
import numpy as np
import PIL.Image
import pytest

from aslbatch.estimators import get_estimator
from aslbatch.evaluate import (CLAIMS, METHODS, ROUGH_FIXED_S, ROUGH_SCORING_S, ROUGH_TRAINING_S, _findings,
                               expected_seconds, monte_carlo_sets, run_evaluation)
from aslbatch.models import get_model
from aslbatch.protocol import default_protocol
from aslbatch.simulate import noise_sigma

LABELS = ("lm", "lut", "supervised")
SNRS = (3.0, 10.0)
N_SETS, REPEATS, SEED = 40, 4, 3
#: a network that trains in well under a second (the numbers are not the point here)
TINY_NETWORK = {"n_samples": 3000, "max_epochs": 3, "hidden_layers": (16,)}
PER_PARAMETER = ("n_valid", "n_invalid", "bias", "nmae", "nrmse", "cov", "cov_sets", "cov_excluded", "sd_over_crlb",
                 "sd_over_crlb_sets")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _evaluate(out, cache, **options):
    return run_evaluation(out, model_name="1c", methods=LABELS, snrs=SNRS, n_sets=N_SETS, repeats=REPEATS,
                          retrainings=2, network_options=TINY_NETWORK, cache_dir=cache, seed=SEED, **options)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("networks")


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, cache):
    return _evaluate(tmp_path_factory.mktemp("evaluation"), cache)


@pytest.fixture(scope="module")
def tsv(evaluation):
    with open(evaluation.paths["metrics"], newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        assert reader.fieldnames == ["method", "parameter", "snr", "metric", "value"]
        rows = list(reader)
    keys = [(r["method"], r["parameter"], r["snr"], r["metric"]) for r in rows]
    assert len(set(keys)) == len(keys), "one row per method, parameter, SNR and metric"
    return {key: float(r["value"]) for key, r in zip(keys, rows)}


def test_tsv_holds_every_method_parameter_snr_and_metric(tsv, evaluation):
    model = get_model("1c", default_protocol("1c"))
    for method in LABELS:
        metrics = PER_PARAMETER + (("cv_net", "cv_net_voxels") if method == "supervised" else ())
        for snr in ("3", "10"):
            for param in model.param_names:
                for metric in metrics:
                    assert (method, param, snr, metric) in tsv, (method, param, snr, metric)
                assert math.isfinite(tsv[(method, param, snr, "nrmse")])
                assert tsv[(method, param, snr, "n_valid")] == N_SETS * REPEATS
            assert tsv[(method, "", snr, "time_per_voxel_s")] > 0
    for snr in ("3", "10"):
        for param in model.param_names:
            for metric in ("sd", "cov", "finite_sets"):
                assert ("crlb", param, snr, metric) in tsv
    assert tsv[("supervised", "", "", "training_s")] > 0
    calibration = ("coverage_68", "coverage_95", "z_sd", "z_robust_sd", "se_undefined", "calibration_rows",
                   "prior_dominated")
    for method in LABELS:  # lut gives no standard errors
        assert all(((method, p, s, m) in tsv) == (method != "lut")
                   for p in model.param_names for s in ("3", "10") for m in calibration), method
    assert evaluation.paths["figure_calibration"].is_file()
    assert {k[0] for k in tsv} == set(LABELS) | {"crlb"}
    assert len(tsv) == len(evaluation.rows)


def test_tsv_agrees_with_an_independent_lm_fit_of_the_same_data(tsv):
    model = get_model("1c", default_protocol("1c"))
    sets = monte_carlo_sets(model, SNRS, n_sets=N_SETS, repeats=REPEATS, seed=SEED)
    for data, snr in zip(sets, ("3", "10")):
        # evaluate gives lm the test SNR's noise SD, as a run gives it the repeats' spread
        estimate = get_estimator("lm", model).fit().predict(data.signals, noise_sd=noise_sigma(model, float(snr)))
        estimates = estimate.params
        for j, param in enumerate(model.param_names):
            err = estimates[:, j] - data.params[:, j]
            se = estimate.stderr[:, j]
            has_se = np.isfinite(se)
            assert tsv[("lm", param, snr, "coverage_95")] == pytest.approx(
                np.mean(np.abs(err[has_se]) <= 1.959963984540054 * se[has_se]), rel=1e-12)
            assert tsv[("lm", param, snr, "coverage_68")] == pytest.approx(
                np.mean(np.abs(err[has_se]) <= se[has_se]), rel=1e-12)
            level = data.params[:, j].mean()
            assert tsv[("lm", param, snr, "nrmse")] == pytest.approx(np.sqrt(np.mean(err**2)) / level, rel=1e-12)
            assert tsv[("lm", param, snr, "nmae")] == pytest.approx(np.mean(np.abs(err)) / level, rel=1e-12)
            assert tsv[("lm", param, snr, "bias")] == pytest.approx(np.mean(err), rel=1e-12, abs=1e-15)
            by_set = estimates[:, j].reshape(N_SETS, REPEATS)  # rows are grouped by parameter set
            truth = data.params[::REPEATS, j]
            kept = truth >= 0.1 * truth.mean()
            cov = np.mean(by_set[kept].std(axis=1, ddof=1) / truth[kept])
            assert tsv[("lm", param, snr, "cov")] == pytest.approx(cov, rel=1e-12)


def test_crlb_scales_with_noise_sigma(tsv):
    # σ = S_ref / SNR and the bound is proportional to σ: SNR 3 to 10 multiplies it by 10/3
    for param in ("cbf", "att"):
        assert tsv[("crlb", param, "3", "sd")] == pytest.approx(tsv[("crlb", param, "10", "sd")] * 10 / 3, rel=1e-12)
        assert tsv[("crlb", param, "3", "finite_sets")] == tsv[("crlb", param, "10", "finite_sets")]


def test_monte_carlo_sets_share_parameters_and_do_not_depend_on_the_sweep():
    model = get_model("1c", default_protocol("1c"))
    both = monte_carlo_sets(model, (3.0, 10.0), n_sets=5, repeats=2, seed=1)
    alone = monte_carlo_sets(model, (10.0,), n_sets=5, repeats=2, seed=1)
    np.testing.assert_array_equal(both[0].params, both[1].params)
    np.testing.assert_array_equal(both[1].signals, alone[0].signals)
    assert np.all(both[0].group == np.repeat(np.arange(5), 2))
    other = monte_carlo_sets(model, (10.0,), n_sets=5, repeats=2, seed=2)
    assert not np.array_equal(other[0].params, alone[0].params)


class Page(HTMLParser):
    """Images, headings and text of a page; fails on a closing tag that closes nothing open."""

    VOID = {"meta", "img", "br", "hr", "link"}

    def __init__(self):
        super().__init__()
        self.open, self.images, self.headings, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()

    def handle_data(self, data):
        self.text.append(data)
        if self.open and self.open[-1] in ("h1", "h2", "h3"):
            self.headings.append(data)


def _check_png(png):
    assert png.startswith(PNG_SIGNATURE)
    pixels = np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB"), dtype=float)
    assert pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels.std() > 1.0, "a blank image"
    assert matplotlib.image.imread(io.BytesIO(png), format="png").shape[:2] == pixels.shape[:2]


def test_html_report_parses_and_its_images_decode(evaluation):
    page = Page()
    page.feed(evaluation.paths["report_html"].read_text(encoding="utf-8"))
    page.close()
    assert page.open == [], f"unclosed elements {page.open}"
    assert len(page.images) == 7  # nrmse, bias, cov, sd_over_crlb, cv_net, density, calibration
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        _check_png(base64.b64decode(src.split(",", 1)[1]))
    text = "".join(page.text)
    assert "Findings of the research" in page.headings
    assert "Calibration of the standard errors" in page.headings
    assert "Calibration at SNR 3" in page.headings
    for word in (*LABELS, "cbf", "att", "CRLB", "training", *(claim.text for claim in CLAIMS)):
        assert word in text, word


def test_markdown_report_names_everything_and_its_figures_exist(evaluation):
    text = evaluation.paths["report_md"].read_text(encoding="utf-8")
    assert "## Findings of the research" in text
    for word in (*LABELS, "cbf", "att", "n_samples", "seed"):
        assert word in text, word
    figures = [line.split("(", 1)[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert len(figures) == 7
    for relative in figures:
        _check_png((evaluation.paths["report_md"].parent / relative).read_bytes())


def test_findings_of_a_1c_run(evaluation, tsv):
    verdicts = {"reproduced", "partly reproduced", "not reproduced", "not checked"}
    assert [f.claim for f in evaluation.findings] == [c.text for c in CLAIMS]
    for finding in evaluation.findings:
        assert finding.verdict in verdicts
        if finding.model == "2c":
            assert finding.verdict == "not checked"
    cbf_accuracy = evaluation.findings[0]
    assert cbf_accuracy.verdict != "not checked"
    assert f"supervised {100 * tsv[('supervised', 'cbf', '3', 'nrmse')]:.3g} %" in cbf_accuracy.evidence
    unsupervised_att = evaluation.findings[3]
    assert unsupervised_att.verdict == "not checked" and "unsupervised" in unsupervised_att.evidence


def test_verdicts_follow_the_numbers():
    snrs = [3.0, 10.0]
    table = {}
    for m, cbf, att, t in (("lm", 0.3, 0.2, 1e-6), ("lut", 0.31, 0.21, 6e-6), ("supervised", 0.2, 0.25, 0.5e-6),
                           ("unsupervised", 0.4, 0.1, 0.9e-6)):
        for s in snrs:
            table.update({(m, "cbf", s, "nrmse"): cbf, (m, "att", s, "nrmse"): att if s == 3 else 0.15,
                          (m, "cbf", s, "cov"): cbf, (m, "att", s, "cov"): att, (m, "", s, "time_per_voxel_s"): t})
        table[(m, "", None, "training_s")] = 10.0
    found = {f.claim: f for f in _findings(table, "1c", ["lm", "lut", "supervised", "unsupervised"], snrs)}
    verdict = {c.text: found[c.text].verdict for c in CLAIMS}
    assert list(verdict.values())[:4] == ["reproduced", "reproduced", "not reproduced", "reproduced"]
    table[("supervised", "att", 10.0, "nrmse")] = 0.1  # now best at SNR 10 only
    assert _findings(table, "1c", ["lm", "supervised"], snrs)[2].verdict == "partly reproduced"
    time_finding = _findings(table, "2c", ["lut", "supervised"], snrs)[5]
    assert time_finding.verdict == "reproduced" and "0.0833 of lut" in time_finding.evidence
    assert _findings(table, "2c", ["lm", "supervised"], snrs)[5].verdict == "not checked"


def test_a_second_evaluation_reuses_the_cached_networks(evaluation, tsv, cache, tmp_path):
    again = _evaluate(tmp_path, cache)
    assert all(record["from_cache"] for record in again.settings["networks"])
    assert [r["file"] for r in again.settings["networks"]] == [r["file"] for r in evaluation.settings["networks"]]
    for row in again.rows:
        if row["metric"] not in ("time_per_voxel_s",):
            key = (row["method"], row["parameter"], "" if row["snr"] is None else f"{row['snr']:g}", row["metric"])
            assert row["value"] == pytest.approx(tsv[key], rel=1e-12, nan_ok=True), key


def test_progress_states_the_expected_duration_and_counts_the_networks_to_train(evaluation, cache, tmp_path, capsys):
    _evaluate(tmp_path / "warm", cache, progress=True)
    warm = capsys.readouterr().err
    assert "expected duration about" in warm and "(every network cached)" in warm
    steps = 2 + len(LABELS) * len(SNRS)  # two networks, then every method at every SNR
    assert f"{steps}/{steps}" in warm and "done in" in warm
    _evaluate(tmp_path / "cold", tmp_path / "empty-cache", progress=True)
    assert "(2 of 2 networks to train first, about" in capsys.readouterr().err


def test_expected_seconds_scale_with_the_work():
    options = {"n_samples": 100_000, "max_epochs": 100}
    training, rest = expected_seconds("2c", 6, 300_000, 12, options)
    assert expected_seconds("1c", 6, 300_000, 12, options)[0] == pytest.approx(12 * ROUGH_TRAINING_S[2] * 0.5)
    assert training == pytest.approx(12 * ROUGH_TRAINING_S[4] * 0.5)  # half the samples of ROUGH_SAMPLES
    assert rest == pytest.approx(ROUGH_FIXED_S + 6 * 3 * ROUGH_SCORING_S[4])
    assert expected_seconds("2c", 6, 300_000, 0, options)[0] == 0.0
    assert expected_seconds("2c", 6, 300_000, 12, {**options, "max_epochs": 25})[0] == pytest.approx(training / 2)


@pytest.mark.parametrize("options, message", [
    ({"methods": ("lm", "levenberg")}, "unknown method"),
    ({"methods": ("lm", "lm")}, "twice"),
    ({"methods": ()}, "no method"),
    ({"methods": ("supervised-mse",)}, "supervised-mae"),  # the valid labels are listed
    ({"snrs": (5, -1)}, "SNR"),
    ({"retrainings": 1}, "retrainings"),
    ({"repeats": 1}, "repeats"),
    ({"noise": "poisson"}, "noise"),
    ({"network_options": {"loss": "mae"}}, "loss"),
    ({"network_options": {"n_samples": 10}}, "n_samples"),
    ({"model_name": "3c"}, "3c"),
])
def test_bad_settings_raise_clear_errors_before_any_work(tmp_path, options, message):
    out = tmp_path / "out"
    settings = {"methods": ("lm", "supervised"), "snrs": (5,), "n_sets": 4, "repeats": 2, "cache_dir": tmp_path,
                **options}
    with pytest.raises(ValueError, match=message):
        run_evaluation(out, **settings)
    assert not out.exists()


def test_every_method_label_maps_to_an_estimator():
    for label, (name, fixed) in METHODS.items():
        model_name = "single" if name == "whitepaper" else "1c"  # the closed form serves single-delay data only
        estimator = get_estimator(name, get_model(model_name, default_protocol(model_name)), **fixed)
        assert estimator.name == name and estimator.options().get("loss", "mse") == fixed.get("loss", "mse")
