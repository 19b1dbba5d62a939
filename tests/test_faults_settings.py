"""Fault catalogue, settings classes (issue 14 points 1 and 2, and the misleading messages):
wrong settings are refused whole before anything runs (exit 2, one line per problem naming
where the value came from, nothing processed), the output folder is never among the raw
dataset's files, and messages say what a file is. Every test checks that the raw dataset is
byte-for-byte unchanged and that no temporary remains (tests/faults.py)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from aslbatch.batch import run_batch
from aslbatch.cli import app
from aslbatch.config import RunConfig, validate_run_config
from aslbatch.estimators import get_estimator
from aslbatch.estimators.store import save_network
from aslbatch.exitcodes import EXIT_OK, EXIT_USAGE
from aslbatch.phantom import write_bids_dataset
from aslbatch.pipeline import Settings

from .faults import assert_no_stray_files, assert_untouched, tree_digest

runner = CliRunner()
SHAPE = (8, 10, 4)


@pytest.fixture()
def raw(tmp_path):
    """A two-subject one-compartment phantom dataset."""
    return write_bids_dataset(tmp_path / "raw", subjects=2, model="1c", snr=10, seed=3, shape=SHAPE)


@pytest.fixture(scope="module")
def supervised_file(tmp_path_factory, model_1c):
    """A (poor, quickly trained) supervised network file for the default 1C protocol."""
    estimator = get_estimator("supervised", model_1c, n_samples=2000, hidden_layers=(8,), max_epochs=2).fit()
    path = tmp_path_factory.mktemp("networks") / "supervised.npz"
    save_network(estimator, path)
    return path


def _errors(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("aslbatch: error: ")]


def _run_refused(raw: Path, out: Path, *args: str) -> list[str]:
    """``aslbatch run raw out *args``: exit 2, nothing written anywhere, the raw tree unchanged;
    returns the error lines."""
    before = tree_digest(raw)
    result = runner.invoke(app, ["run", str(raw), str(out), *args])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "Traceback" not in result.output
    assert not out.exists(), "a refused run must not create its output folder"
    assert not (raw / "derivatives").exists()
    assert_untouched(raw, before)
    assert_no_stray_files(raw)
    return _errors(result)


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(text)
    return path


# --- point 1: settings of the wrong type or range, all reported at once ---------------------

def test_config_values_of_the_wrong_type_are_each_named_and_nothing_runs(raw, tmp_path):
    config = _config(tmp_path, 'methods = "lm"\n'  # a string where a list is expected
                               'background_suppression_correction = "false"\n'  # a string, not a boolean
                               'constants = "x"\n'  # a string where a table is expected
                               'report = 1\n'  # an integer, not a boolean
                               'participant_label = 1\n'  # an integer where a list is expected
                               'colour = "blue"\n'
                               '[method_options]\nlm = 3\n')
    errors = _run_refused(raw, tmp_path / "out", "--config", str(config))
    expected = [
        f"{config}: methods must be a list, got a string ('lm')",
        f"{config}: background_suppression_correction must be true or false, got a string ('false')",
        f"{config}: constants must be a table, got a string ('x')",
        f"{config}: report must be true or false, got an integer (1)",
        f"{config}: participant_label must be a list, got an integer (1)",
        f"{config}: method_options.lm must be a table, got an integer (3)",
    ]
    for line in expected:
        assert f"aslbatch: error: {line}" in errors, errors
    assert any(line.startswith(f"aslbatch: error: {config}: colour: unknown setting") for line in errors)
    assert len(errors) == len(expected) + 1  # one line per problem, nothing else


def test_a_boolean_setting_is_read_as_the_boolean_it_is(raw, tmp_path):
    """``false`` and ``true`` (TOML booleans) reach the provenance as such, and with four
    background-suppression pulses declared the corrected CBF is the uncorrected one / 0.95**4
    (α_BS per pulse, ASL_MODELS.md) voxel by voxel."""
    sidecar = raw / "sub-01" / "perf" / "sub-01_asl.json"
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "BackgroundSuppression": True, "BackgroundSuppressionNumberPulses": 4}))
    before = tree_digest(raw)
    cbf = {}
    for value in ("false", "true"):
        config = _config(tmp_path, f'methods = ["lut"]\nbackground_suppression_correction = {value}\nreport = false\n')
        out = tmp_path / f"out-{value}"
        result = runner.invoke(app, ["run", str(raw), str(out), "--config", str(config)])
        assert result.exit_code == EXIT_OK, result.output
        provenance = json.loads((out / "sub-01" / "perf" / "sub-01_provenance.json").read_text())
        assert provenance["run_settings"]["background_suppression_correction"] is (value == "true")
        cbf[value] = np.asarray(nib.load(out / "sub-01" / "perf" / "sub-01_desc-lut_cbf.nii.gz").dataobj, float)
        assert_no_stray_files(out)
    assert_untouched(raw, before)
    inside = np.isfinite(cbf["false"]) & (cbf["false"] > 1) & (cbf["true"] < 0.9 * np.nanmax(cbf["true"]))
    assert inside.sum() > 50
    np.testing.assert_allclose(cbf["true"][inside], cbf["false"][inside] / 0.95 ** 4, rtol=1e-5)


def test_command_line_values_out_of_range_are_named_by_their_option(raw, tmp_path):
    errors = _run_refused(raw, tmp_path / "out", "--method", "lm", "--t1-tissue", "-3", "--arterial-edge-s", "-1",
                          "--labeling-efficiency", "1.5", "--bolus-duration", "0")
    assert set(errors) == {
        "aslbatch: error: --t1-tissue (constant t1t) must be > 0, got -3.0",
        "aslbatch: error: --arterial-edge-s must be >= 0, got -1.0",
        "aslbatch: error: --labeling-efficiency (constant alpha) must be <= 1, got 1.5",
        "aslbatch: error: --bolus-duration must be > 0, got 0.0",
    }


def test_constants_table_types_ranges_and_unknown_keys(raw, tmp_path):
    config = _config(tmp_path, 'methods = ["lm"]\n[constants]\nt1b = "1.6"\nlam = -0.9\nt1_prime = "arterial"\n'
                               'foo = 2\n')
    errors = _run_refused(raw, tmp_path / "out", "--config", str(config))
    assert f"aslbatch: error: {config}: constants.t1b must be a number, got a string ('1.6')" in errors
    assert f"aslbatch: error: {config}: constants.lam must be > 0, got -0.9" in errors
    assert any(f"{config}: constants.t1_prime must be one of 'blood' or 'tissue'" in line for line in errors)
    assert any(f"{config}: constants.foo: unknown constant" in line for line in errors)
    assert len(errors) == 4


def test_method_options_are_checked_against_each_estimators_declared_options(raw, tmp_path):
    config = _config(tmp_path, 'methods = ["lm", "lut", "unsupervised"]\n'
                               '[method_options.lm]\nmax_iter = 0\nxtol = true\nbogus = 1\n'
                               '[method_options.lut]\nresolution_s = -1\n'
                               '[method_options.unsupervised]\nhidden_layers = 5\nslice_offsets = [0.1]\n'
                               'snr_range = [5, 2]\ntrain_on_data = "yes"\n')
    errors = _run_refused(raw, tmp_path / "out", "--config", str(config))
    lm, lut, net = (f"aslbatch: error: {config}: method_options.{m}: " for m in ("lm", "lut", "unsupervised"))
    assert set(errors) == {
        lm + "bogus: not an option of lm; its options: ['fast_path', 'ftol', 'grid_step_s', 'max_iter', 'xtol']",
        lm + "xtol must be a number, got a boolean (True)",
        lm + "max_iter must be an integer >= 1, got 0",
        lut + "resolution_s must be a positive number of seconds, got -1",
        net + "slice_offsets: cannot be given (set from each acquisition's slice timing)",
        net + "hidden_layers must be a list, got an integer (5)",
        net + "train_on_data must be true or false, got a string ('yes')",
        net + "unsupervised: snr_range must be (low, high) with 0 < low <= high, got [5.0, 2.0]",
    }, errors


def test_options_that_constrain_each_other_are_checked_together(raw, tmp_path):
    config = _config(tmp_path, 'methods = ["unsupervised"]\n[method_options.unsupervised]\n'
                               'edge_epochs = 20\nmax_epochs = 10\n')
    errors = _run_refused(raw, tmp_path / "out", "--config", str(config))
    # the arterial-edge annealing (edge_epochs) runs for the two-compartment model only
    assert errors == [f"aslbatch: error: {config}: method_options.unsupervised: unsupervised: edge_epochs must be an "
                      f"integer in [0, max_epochs), got 20"]


def test_unreadable_and_invalid_toml_are_named(raw, tmp_path):
    broken = _config(tmp_path, 'methods = ["lm"\n')
    errors = _run_refused(raw, tmp_path / "out", "--config", str(broken))
    assert len(errors) == 1 and errors[0].startswith(f"aslbatch: error: {broken}: not valid TOML")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00methods")
    errors = _run_refused(raw, tmp_path / "out", "--config", str(binary))
    assert len(errors) == 1 and errors[0].startswith(f"aslbatch: error: {binary}: not valid TOML")
    errors = _run_refused(raw, tmp_path / "out", "--config", str(tmp_path / "missing.toml"))
    assert errors == [f"aslbatch: error: {tmp_path / 'missing.toml'}: cannot read config (No such file or directory)"]


# --- point 1: the mask template resolved against the dataset up front ----------------------

def _mask_image(path: Path, raw: Path, shape=SHAPE) -> None:
    """A mask of ones on the grid of the dataset's ASL series."""
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = nib.load(raw / "sub-01" / "perf" / "sub-01_asl.nii.gz").affine
    nib.save(nib.Nifti1Image(np.ones(shape, np.uint8), affine), path)


def test_mask_template_with_an_unknown_placeholder_is_refused(raw, tmp_path):
    errors = _run_refused(raw, tmp_path / "out", "--method", "lm", "--mask", str(tmp_path / "m" / "{subj}.nii.gz"))
    assert errors == [f"aslbatch: error: --mask must use only the placeholders {{subject}} and {{session}}, not {{subj}} "
                      f"(template '{tmp_path / 'm' / '{subj}.nii.gz'}')"]


def test_mask_missing_or_not_3d_for_any_session_is_refused_before_any_session_runs(raw, tmp_path):
    masks = tmp_path / "masks"
    _mask_image(masks / "sub-01.nii.gz", raw, SHAPE + (3,))  # three volumes
    template = str(masks / "sub-{subject}.nii.gz")
    errors = _run_refused(raw, tmp_path / "out", "--method", "lm", "--mask", template)
    assert errors == [
        f"aslbatch: error: --mask: {masks / 'sub-01.nii.gz'} (for sub-01): a mask must be a 3-D image, this one has "
        f"shape {SHAPE + (3,)}",
        f"aslbatch: error: --mask: {masks / 'sub-02.nii.gz'} (for sub-02): no such file",
    ]
    (masks / "sub-02.nii.gz").write_text("not an image")
    errors = _run_refused(raw, tmp_path / "out", "--method", "lm", "--mask", template)
    assert errors[1].startswith(f"aslbatch: error: --mask: {masks / 'sub-02.nii.gz'} (for sub-02): not a readable "
                                f"NIfTI image")
    # one file for every session: named once, with the sessions that would read it
    errors = _run_refused(raw, tmp_path / "out", "--method", "lm", "--mask", str(masks / "all.nii.gz"))
    assert errors == [f"aslbatch: error: --mask: {masks / 'all.nii.gz'} (for sub-01, sub-02): no such file"]
    # both masks valid: the run goes ahead and uses them (every voxel inside: all fitted)
    _mask_image(masks / "sub-01.nii.gz", raw)
    _mask_image(masks / "sub-02.nii.gz", raw)
    before = tree_digest(raw)
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(raw), str(out), "--method", "lut", "--mask", template, "--no-report"])
    assert result.exit_code == EXIT_OK, result.output
    cbf = np.asarray(nib.load(out / "sub-02" / "perf" / "sub-02_desc-lut_cbf.nii.gz").dataobj)
    assert np.isfinite(cbf).all()
    assert_untouched(raw, before)
    assert_no_stray_files(out)


# --- point 2: the output folder is never among the raw dataset's files ----------------------

@pytest.mark.parametrize("where", ["raw", "raw/sub-01", "raw/derivatives", "raw/newfolder", "parent"])
def test_output_folder_among_the_raw_files_is_refused(raw, tmp_path, where):
    out = {"raw": raw, "raw/sub-01": raw / "sub-01", "raw/derivatives": raw / "derivatives",
           "raw/newfolder": raw / "newfolder", "parent": tmp_path}[where]
    before = tree_digest(raw)
    description = (raw / "dataset_description.json").read_bytes()
    result = runner.invoke(app, ["run", str(raw), str(out), "--method", "lm"])
    assert result.exit_code == EXIT_USAGE, result.output
    errors = _errors(result)
    assert len(errors) == 1 and f"output folder {out} " in errors[0]
    assert ("is the raw dataset itself" if where == "raw" else
            "contains the raw dataset" if where == "parent" else "is inside the raw dataset") in errors[0]
    assert (raw / "dataset_description.json").read_bytes() == description
    assert not (raw / "newfolder").exists() and not (raw / "derivatives").exists()
    assert not list(raw.rglob(".aslbatch.lock")) and not list(raw.rglob("logs"))
    assert_untouched(raw, before)
    assert_no_stray_files(raw)


def test_a_symlink_to_the_raw_dataset_is_the_raw_dataset(raw, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(raw, target_is_directory=True)
    errors = _run_refused(raw, link / "sub-01" / "x", "--method", "lm")
    assert len(errors) == 1 and "is inside the raw dataset" in errors[0]


def test_the_library_refuses_the_raw_dataset_as_output_too(raw):
    before = tree_digest(raw)
    with pytest.raises(ValueError, match="is the raw dataset itself"):
        run_batch(raw, raw, Settings(methods=("lm",)))
    assert_untouched(raw, before)


def test_below_derivatives_is_allowed_and_the_raw_files_stay_unchanged(raw, tmp_path):
    before = tree_digest(raw)
    out = raw / "derivatives" / "aslbatch"
    result = runner.invoke(app, ["run", str(raw), "--method", "lut", "--no-report"])
    assert result.exit_code == EXIT_OK, result.output
    assert (out / "sub-02" / "perf" / "sub-02_desc-lut_cbf.nii.gz").is_file()
    assert sorted(p.name for p in (raw / "derivatives").iterdir()) == ["aslbatch"]
    assert_untouched(raw, before)
    assert_no_stray_files(out)


# --- misleading messages ------------------------------------------------------------------

def _simulated_set(tmp_path: Path) -> Path:
    path = tmp_path / "set.npz"
    result = runner.invoke(app, ["simulate", "--n", "50", "--out", str(path)])
    assert result.exit_code == 0, result.output
    return path


def test_a_text_file_given_as_a_network_is_called_a_text_file(raw, tmp_path):
    text = tmp_path / "net.npz"
    text.write_text("weights = [1, 2, 3]\n")
    result = runner.invoke(app, ["fit", "--in", str(_simulated_set(tmp_path)), "--out", str(tmp_path / "o.npz"),
                                 "--method", "supervised", "--network", str(text)])
    assert result.exit_code == EXIT_USAGE
    assert _errors(result) == [f"aslbatch: error: {text}: not an aslbatch network file: a text file, not the .npz "
                               f"archive 'aslbatch train' writes"]
    assert "pickle" not in result.output and not (tmp_path / "o.npz").exists()
    errors = _run_refused(raw, tmp_path / "out", "--method", "supervised", "--network", str(text))
    assert errors == [f"aslbatch: error: --network: {text}: not an aslbatch network file: a text file, not the .npz "
                      f"archive 'aslbatch train' writes"]


def test_an_empty_or_npy_file_given_as_a_network_is_called_what_it_is(tmp_path):
    from aslbatch.estimators.store import NetworkFileError, load_network

    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(NetworkFileError, match="the file is empty"):
        load_network(empty)
    array = tmp_path / "array.npy"
    np.save(array, np.zeros(3))
    with pytest.raises(NetworkFileError, match=r"a single numpy array \(.npy\)"):
        load_network(array)


def test_fit_refuses_a_network_of_another_method(tmp_path, supervised_file):
    out = tmp_path / "o.npz"
    result = runner.invoke(app, ["fit", "--in", str(_simulated_set(tmp_path)), "--out", str(out),
                                 "--method", "unsupervised", "--network", str(supervised_file)])
    assert result.exit_code == EXIT_USAGE
    assert _errors(result) == [f"aslbatch: error: {supervised_file} is a supervised network, not unsupervised: give "
                               f"a network trained with 'aslbatch train --method unsupervised', or --method supervised"]
    assert not out.exists()


def test_a_config_network_of_another_method_is_refused_up_front(raw, tmp_path, supervised_file):
    config = _config(tmp_path, f'methods = ["unsupervised"]\n[networks]\nunsupervised = "{supervised_file}"\n'
                               f'lm = "{supervised_file}"\n')
    errors = _run_refused(raw, tmp_path / "out", "--config", str(config))
    assert errors == [
        f"aslbatch: error: {config}: networks.unsupervised: {supervised_file} is a network of method supervised, not "
        f"unsupervised (aslbatch train --method unsupervised)",
        f"aslbatch: error: {config}: networks.lm: lm does not use a trained network",
    ]


def test_fit_on_all_invalid_signals_prints_no_numpy_warning_and_valid_json(tmp_path):
    path = _simulated_set(tmp_path)
    data = dict(np.load(path, allow_pickle=False))
    data["signals"][:] = np.nan
    bad = tmp_path / "nan.npz"
    np.savez(bad, **data)
    out = tmp_path / "fit.npz"
    result = runner.invoke(app, ["fit", "--in", str(bad), "--out", str(out), "--method", "lm"])
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.output
    summary = json.loads(result.output.strip().splitlines()[-1])  # strict JSON: NaN would not parse as null
    assert summary["median_abs_error"] == {"cbf": None, "att": None}
    assert summary["status"] == {"invalid_input": 50}
    assert_no_stray_files(tmp_path)


# --- property: any TOML-like value of any key is a named problem or a valid setting ---------

_toml_scalars = st.one_of(st.booleans(), st.integers(), st.integers(min_value=10 ** 300, max_value=10 ** 400),
                          st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
_toml_values = st.recursive(_toml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=12)
_keys = st.sampled_from(sorted(RunConfig.model_fields) + ["colour"])
_option_names = st.sampled_from(["max_iter", "xtol", "grid_step_s", "resolution_s", "hidden_layers", "n_samples",
                                 "snr_range", "train_on_data", "edge_epochs", "slice_offsets", "bogus"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.dictionaries(_keys, _toml_values, max_size=5),
       options=st.dictionaries(st.sampled_from(["lm", "lut", "supervised", "unsupervised", "magic"]),
                               st.dictionaries(_option_names, _toml_values, max_size=3), max_size=2))
def test_any_config_is_either_valid_settings_or_named_problems_never_an_exception(values, options):
    """Random TOML-like values (booleans, integers beyond the float range, NaN, strings, lists,
    tables) for every key: the validation returns problems naming their key, or a config whose
    Settings are built or refused with a ValueError: no other exception escapes."""
    if options:
        values = {**values, "method_options": options}
    origin = {key: f"settings.toml: {key}" for key in values}
    origin.update({f"method_options.{method}": f"settings.toml: method_options.{method}" for method in options})
    config, problems = validate_run_config(values, origin)
    assert (config is None) == bool(problems)
    for line in problems:
        assert line.startswith("settings.toml: ") and "\n" not in line
    if config is not None:
        try:
            config.settings()
        except ValueError as exc:
            assert str(exc)
