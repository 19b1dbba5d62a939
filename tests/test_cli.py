"""The command line: version, simulate output against the library, clear usage errors."""

import json

import numpy as np
from typer.testing import CliRunner

from aslbatch import __version__
from aslbatch.cli import EXIT_USAGE, app
from aslbatch.models import get_model
from aslbatch.protocol import default_protocol
from aslbatch.simulate import SimulatedSet, noise_sigma

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"aslbatch {__version__}"


def test_simulate_writes_a_set_that_matches_the_library(tmp_path):
    out = tmp_path / "sim.npz"
    result = runner.invoke(
        app, ["simulate", "--model", "2c", "--n", "40", "--snr", "4", "--noise", "gaussian", "--repeats", "3", "--seed", "5", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["rows"] == 120 and summary["model"] == "2c"
    data = SimulatedSet.load(out)
    model = get_model("2c", default_protocol("2c"))
    assert data.model.to_dict() == model.to_dict()
    np.testing.assert_allclose(data.clean, model.signal(data.params), rtol=1e-14)
    np.testing.assert_allclose(data.sigma, noise_sigma(model, 4.0))
    again = tmp_path / "again.npz"
    runner.invoke(app, ["simulate", "--model", "2c", "--n", "40", "--snr", "4", "--noise", "gaussian", "--repeats", "3", "--seed", "5", "--out", str(again)])
    np.testing.assert_array_equal(SimulatedSet.load(again).signals, data.signals)


def test_simulate_with_protocol_file_and_tissue_t1(tmp_path):
    prot = tmp_path / "protocol.json"
    prot.write_text(json.dumps({"label_duration": [1.5, 1.5, 1.5], "pld": [0.5, 1.5, 2.5]}))
    out = tmp_path / "sim.npz"
    result = runner.invoke(app, ["simulate", "--protocol", str(prot), "--t1-prime", "tissue", "--n", "10", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = SimulatedSet.load(out)
    assert data.model.protocol.pld.tolist() == [0.5, 1.5, 2.5]
    assert data.model.constants.t1_prime == "tissue"


def test_usage_errors_name_the_problem_and_write_nothing(tmp_path):
    out = tmp_path / "sim.npz"
    prot = tmp_path / "ms.json"
    prot.write_text(json.dumps({"label_duration": 1800, "pld": [1000, 2000]}))
    cases = [
        (["simulate", "--snr", "0", "--out", str(out)], "--snr must be > 0"),
        (["simulate", "--protocol", str(prot), "--out", str(out)], "look like milliseconds"),
        (["simulate", "--protocol", str(tmp_path / "missing.json"), "--out", str(out)], "missing.json: cannot read"),
        (["simulate", "--arterial-edge-s", "0.1", "--out", str(out)], "2c model only"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == EXIT_USAGE, (args, result.output)
        assert message in result.output
        assert not out.exists()


def test_fit_runs_an_estimator_on_a_simulated_set(tmp_path):
    sim = tmp_path / "sim.npz"
    out = tmp_path / "fit.npz"
    assert runner.invoke(app, ["simulate", "--n", "200", "--snr", "1000", "--noise", "gaussian", "--out", str(sim)]).exit_code == 0
    result = runner.invoke(app, ["fit", "--model", "1c", "--method", "lm", "--in", str(sim), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with np.load(out, allow_pickle=False) as fitted:
        params, truth, names = fitted["params"], fitted["truth"], fitted["param_names"].tolist()
    data = SimulatedSet.load(sim)
    np.testing.assert_array_equal(truth, data.params)
    assert names == ["cbf", "att"]
    # at SNR 1000 voxels with an identifiable arrival (att above the 1.0 s first PLD) fit closely
    ok = truth[:, 1] > 1.1
    np.testing.assert_allclose(params[ok, 0], truth[ok, 0], rtol=0.05, atol=1.0)
    summary = json.loads(result.output)
    assert summary["voxels"] == 200 and summary["method"] == "lm"


def test_fit_refuses_a_model_mismatch_and_a_missing_file(tmp_path):
    sim = tmp_path / "sim.npz"
    runner.invoke(app, ["simulate", "--model", "2c", "--n", "10", "--out", str(sim)])
    result = runner.invoke(app, ["fit", "--model", "1c", "--in", str(sim), "--out", str(tmp_path / "o.npz")])
    assert result.exit_code == EXIT_USAGE and "simulated with model '2c'" in result.output
    result = runner.invoke(app, ["fit", "--in", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "o.npz")])
    assert result.exit_code == EXIT_USAGE and "nope.npz: no such file" in result.output
    assert not (tmp_path / "o.npz").exists()


def test_evaluate_and_bench_commands(tmp_path):
    result = runner.invoke(app, ["evaluate", "--out", str(tmp_path / "e"), "--method", "lm", "--method", "lut",
                                 "--snr", "5", "--snr", "10", "--n-sets", "20", "--repeats", "2"])
    assert result.exit_code == 0, result.output
    metrics = (tmp_path / "e" / "metrics.tsv").read_text().splitlines()
    assert metrics[0].split("\t")[:4] == ["method", "parameter", "snr", "metric"]
    assert {line.split("\t")[0] for line in metrics[1:]} >= {"lm", "lut"}
    bad = runner.invoke(app, ["evaluate", "--out", str(tmp_path / "x"), "--method", "magic"])
    assert bad.exit_code == 2 and "magic" in bad.output
    result = runner.invoke(app, ["bench", "--out", str(tmp_path / "b"), "--quick", "--model", "1c", "--method", "lm",
                                 "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "| 1c | lm | 1 |" in result.output and (tmp_path / "b" / "bench.png").is_file()


def test_fit_writes_interval_half_widths(tmp_path):
    from aslbatch.estimators import get_estimator
    from aslbatch.estimators.store import load_network, save_network

    sim = tmp_path / "sim.npz"
    assert runner.invoke(app, ["simulate", "--n", "300", "--snr", "5", "--out", str(sim)]).exit_code == 0
    # LM: the Gaussian intervals ± 1 and ± 1.96 of its standard errors
    out = tmp_path / "lm.npz"
    assert runner.invoke(app, ["fit", "--method", "lm", "--in", str(sim), "--out", str(out)]).exit_code == 0
    with np.load(out, allow_pickle=False) as fitted:
        stderr, intervals, levels = fitted["stderr"], fitted["intervals"], fitted["interval_levels"]
    np.testing.assert_allclose(levels, [0.6826894921370859, 0.95])  # 2Φ(1) − 1
    np.testing.assert_array_equal(intervals[..., 0], stderr)
    np.testing.assert_allclose(intervals[..., 1], 1.959963984540054 * stderr)  # Φ⁻¹(0.975)
    assert np.isfinite(stderr[:, 0]).mean() > 0.9
    # a network that learns its own half-widths: those, as the network file predicts them
    model = get_model("1c", default_protocol("1c"))
    network = tmp_path / "net.npz"
    save_network(get_estimator("supervised", model, n_samples=3000, hidden_layers=(8,), max_epochs=3).fit(), network)
    out = tmp_path / "net_fit.npz"
    result = runner.invoke(app, ["fit", "--method", "supervised", "--network", str(network), "--in", str(sim),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    expected = load_network(network).predict(SimulatedSet.load(sim).signals)
    assert expected.intervals is not None
    with np.load(out, allow_pickle=False) as fitted:
        np.testing.assert_array_equal(fitted["intervals"], expected.intervals)
        np.testing.assert_array_equal(fitted["interval_levels"], expected.interval_levels)
        assert fitted["intervals"].shape == (300, 2, 2)
