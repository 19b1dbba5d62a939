"""aslbatch.derivatives: exact output names (1C series, 2C pair with the shared source name, with
and without session), maps on the source grid with known values, the status and mask maps,
every sidecar field, dataset_description.json and .bidsignore, the provenance's content and
its place as the last file written (an interrupted write leaves no provenance, no partial file
under a final name and no temporary file).

The acquisitions are real: tiny noise-free phantom datasets read by aslbatch.bids and
aslbatch.preprocess. The estimates are fakes with known values, so every voxel written can be
checked against what was given."""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import nibabel as nib
import numpy as np

from aslbatch.atomic import stale_temporaries
import pytest

from aslbatch import __version__
from aslbatch import derivatives as der
from aslbatch.bids import find_sessions, group_acquisitions
from aslbatch.estimators import Estimate, Status
from aslbatch.models import MODELS, get_model
from aslbatch.phantom import write_bids_dataset
from aslbatch.preprocess import prepare_acquisition

SHAPE = (12, 14, 5)
LM_OPTIONS = {"grid_step_s": 0.1, "max_iter": 100, "xtol": 1e-8, "ftol": 1e-10, "fast_path": True}
LUT_OPTIONS = {"resolution_s": 0.05}


# --- fixtures ------------------------------------------------------------------------------------


def _prepare(tmp: Path, model: str, sessions=None):
    raw = write_bids_dataset(tmp / "raw", subjects=1, model=model, sessions=sessions, shape=SHAPE,
                             snr=float("inf"))
    (acquisition,) = group_acquisitions(find_sessions(raw)[0])
    return raw, prepare_acquisition(acquisition)


@pytest.fixture(scope="module")
def data_1c(tmp_path_factory):
    """A 1C series without session: (raw dir, PreparedData, model)."""
    raw, prepared = _prepare(tmp_path_factory.mktemp("d1c"), "1c")
    return raw, prepared, get_model("1c", prepared.protocol, prepared.constants)


@pytest.fixture(scope="module")
def data_2c(tmp_path_factory):
    """A 2C non-crushed + crushed pair in session 1: (raw dir, PreparedData, model)."""
    raw, prepared = _prepare(tmp_path_factory.mktemp("d2c"), "2c", sessions=["1"])
    return raw, prepared, get_model("2c", prepared.protocol, prepared.constants)


def fake_estimate(prepared, model, method: str, stderr: bool = True) -> Estimate:
    """Known values: column j of voxel i is (j + 1) * 10 + i / 1000; status cycles 0..3 (params NaN
    where invalid); stderr is a hundredth of the value, NaN in every 5th voxel."""
    n = prepared.n_voxels
    i = np.arange(n, dtype=np.float64)
    params = np.stack([(j + 1) * 10.0 + i / 1000.0 for j in range(model.n_params)], axis=1)
    status = (np.arange(n) % 4).astype(np.int8)
    params[status == Status.INVALID_INPUT] = np.nan
    se = None
    if stderr:
        se = params / 100.0
        se[::5, -1] = np.nan
    return Estimate(params, status, se, np.zeros(n), model.param_names, method)


def write(out, raw, prepared, model, methods=("lm", "lut"), **kwargs):
    estimates = {m: fake_estimate(prepared, model, m, stderr=(m == "lm")) for m in methods}
    options = {"lm": LM_OPTIONS, "lut": LUT_OPTIONS}
    written = der.write_session_outputs(out, prepared, estimates, model, {m: options[m] for m in methods},
                                        bids_dir=raw, **kwargs)
    return estimates, written


def load(path: Path):
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image


def sidecar(path: Path) -> dict:
    return json.loads(der.sidecar_path(path).read_text(encoding="utf-8"))


def leftovers(folder: Path) -> list[Path]:
    """Temporary files of aslbatch.atomic left under ``folder``."""
    return stale_temporaries(folder)


# --- names ---------------------------------------------------------------------------------------


def test_names_1c_series_without_session(data_1c, tmp_path):
    raw, prepared, model = data_1c
    assert prepared.source_name == "sub-01"
    paths = der.output_paths(tmp_path, prepared, "1c", ["lm", "lut"], stderr_methods=["lm"])
    folder = tmp_path / "sub-01" / "perf"
    assert {key: p.relative_to(folder).as_posix() for key, p in paths.items()} == {
        "desc-brain_mask": "sub-01_desc-brain_mask.nii.gz",
        "desc-lm_cbf": "sub-01_desc-lm_cbf.nii.gz",
        "desc-lm_att": "sub-01_desc-lm_att.nii.gz",
        "desc-lut_cbf": "sub-01_desc-lut_cbf.nii.gz",
        "desc-lut_att": "sub-01_desc-lut_att.nii.gz",
        "desc-lm_cbfse": "sub-01_desc-lm_cbfse.nii.gz",
        "desc-lm_attse": "sub-01_desc-lm_attse.nii.gz",
        "desc-lm_status": "sub-01_desc-lm_status.nii.gz",
        "desc-lm_priordominated": "sub-01_desc-lm_priordominated.nii.gz",
        "desc-lut_status": "sub-01_desc-lut_status.nii.gz",
        "provenance": "sub-01_provenance.json",
    }
    assert der.sidecar_path(paths["desc-lm_cbf"]) == folder / "sub-01_desc-lm_cbf.json"


def test_names_2c_pair_with_session_use_the_shared_entities(data_2c, tmp_path):
    raw, prepared, model = data_2c
    # the pair is sub-01_ses-1_acq-nocrush_asl + sub-01_ses-1_acq-dante_asl: acq differs
    assert prepared.source_name == "sub-01_ses-1"
    _, written = write(tmp_path, raw, prepared, model, methods=("lm",))
    folder = tmp_path / "sub-01" / "ses-1" / "perf"
    names = sorted(p.name for p in folder.iterdir())
    stems = ["desc-brain_mask"] + [f"desc-lm_{p}" for p in ("cbf", "abv", "abat", "att")] + \
        [f"desc-lm_{p}se" for p in ("cbf", "abv", "abat", "att")] + ["desc-lm_status", "desc-lm_priordominated"]
    expected = sorted([f"sub-01_ses-1_{s}{ext}" for s in stems for ext in (".nii.gz", ".json")]
                      + ["sub-01_ses-1_provenance.json"])
    assert names == expected
    assert written[-1] == folder / "sub-01_ses-1_provenance.json"
    assert set(written) >= {folder / name for name in expected}


def test_output_paths_refuses_bad_names(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        der.output_paths(tmp_path, "", "1c", ["lm"])
    with pytest.raises(ValueError, match="sub-"):
        der.output_paths(tmp_path, "ses-1_acq-x", "1c", ["lm"])
    with pytest.raises(ValueError, match="alphanumeric"):
        der.output_paths(tmp_path, "sub-01", "1c", ["l_m"])
    with pytest.raises(ValueError, match="unknown model"):
        der.output_paths(tmp_path, "sub-01", "3c", ["lm"])
    with pytest.raises(ValueError, match="stderr_methods"):
        der.output_paths(tmp_path, "sub-01", "1c", ["lm"], stderr_methods=["lut"])


# --- maps ----------------------------------------------------------------------------------------


def test_maps_are_float32_on_the_source_grid_with_the_values_given(data_1c, tmp_path):
    raw, prepared, model = data_1c
    estimates, _ = write(tmp_path, raw, prepared, model)
    paths = der.output_paths(tmp_path, prepared, "1c", ["lm", "lut"], stderr_methods=["lm"])
    outside = ~prepared.mask
    for method, estimate in estimates.items():
        for j, param in enumerate(model.param_names):
            keys = [(f"desc-{method}_{param}", estimate.params[:, j])]
            if estimate.stderr is not None:
                keys.append((f"desc-{method}_{param}se", estimate.stderr[:, j]))
            for key, values in keys:
                data, image = load(paths[key])
                assert data.dtype == np.float32, key
                assert data.shape == prepared.shape
                np.testing.assert_array_equal(image.affine, prepared.affine)
                np.testing.assert_array_equal(image.header.get_sform(), prepared.affine)
                assert np.isnan(data[outside]).all(), key
                np.testing.assert_array_equal(data[prepared.mask], values.astype(np.float32))
    assert "desc-lut_cbfse" not in paths  # lut gives no standard errors
    assert not (paths["desc-lut_cbf"].parent / "sub-01_desc-lut_cbfse.nii.gz").exists()


def test_status_map_codes_and_outside_value(data_1c, tmp_path):
    raw, prepared, model = data_1c
    estimates, _ = write(tmp_path, raw, prepared, model, methods=("lm",))
    path = der.output_paths(tmp_path, prepared, "1c", ["lm"])["desc-lm_status"]
    data, image = load(path)
    assert data.dtype == np.uint8 and data.shape == prepared.shape
    np.testing.assert_array_equal(image.affine, prepared.affine)
    assert der.OUTSIDE_STATUS == 255
    assert (data[~prepared.mask] == 255).all()
    np.testing.assert_array_equal(data[prepared.mask], estimates["lm"].status)
    meta = sidecar(path)
    assert meta["Levels"] == {str(k): v for k, v in der.STATUS_LEVELS.items()}
    for code in Status:
        assert meta["Levels"][str(int(code))].startswith(code.name.lower())
    assert "outside the brain mask" in meta["Levels"]["255"]
    assert meta["OutsideMask"] == 255


def test_mask(data_1c, tmp_path):
    raw, prepared, model = data_1c
    write(tmp_path, raw, prepared, model, methods=("lut",))
    path = tmp_path / "sub-01" / "perf" / "sub-01_desc-brain_mask.nii.gz"
    data, image = load(path)
    assert data.dtype == np.uint8
    np.testing.assert_array_equal(data, prepared.mask.astype(np.uint8))
    np.testing.assert_array_equal(image.affine, prepared.affine)
    meta = sidecar(path)
    assert meta["Type"] == "Brain"
    assert meta["Sources"] == ["bids:raw:" + f for f in prepared.source_files]


# --- sidecars ------------------------------------------------------------------------------------


def test_sidecars_1c(data_1c, tmp_path):
    raw, prepared, model = data_1c
    write(tmp_path, raw, prepared, model)
    paths = der.output_paths(tmp_path, prepared, "1c", ["lm", "lut"], stderr_methods=["lm"])
    cbf, att = sidecar(paths["desc-lm_cbf"]), sidecar(paths["desc-lm_att"])
    assert cbf["Units"] == "mL/100 g/min" and att["Units"] == "s"
    assert cbf["Description"].startswith("Cerebral blood flow (CBF), in mL/100 g/min, estimated by")
    assert att["Description"].startswith("Arterial transit time (ATT)")
    assert "tissue transit time" not in att["Description"].lower()
    for meta in (cbf, att):
        assert meta["Description"].count(". ") == 0 and meta["Description"].endswith(".")  # one sentence
        assert "Levenberg–Marquardt" in meta["Description"] and "one-compartment" in meta["Description"]
        assert meta["Method"] == "lm"
        assert meta["EstimatorOptions"] == LM_OPTIONS
        assert meta["Model"] == json.loads(json.dumps(model.to_dict()))
        assert meta["Model"]["model"] == "1c"
        assert meta["Model"]["constants"] == prepared.constants.to_dict()
        assert meta["Sources"] == (
            [f"bids:raw:sub-01/perf/sub-01_{s}" for s in ("asl.nii.gz", "aslcontext.tsv", "m0scan.nii.gz")]
            + ["bids::sub-01/perf/sub-01_desc-brain_mask.nii.gz"]
        )
        assert meta["OutsideMask"] == "NaN"
    lut = sidecar(paths["desc-lut_att"])
    assert lut["Method"] == "lut" and lut["EstimatorOptions"] == LUT_OPTIONS
    assert "lookup-table" in lut["Description"]
    se = sidecar(paths["desc-lm_attse"])
    assert se["Units"] == "s"
    assert se["Description"].startswith("Standard error of the arterial transit time (ATT)")
    assert "J^T J" in se["StandardErrorMethod"]


def test_sidecars_2c_say_which_research_term(data_2c, tmp_path):
    raw, prepared, model = data_2c
    write(tmp_path, raw, prepared, model, methods=("lm",))
    paths = der.output_paths(tmp_path, prepared, "2c", ["lm"], stderr_methods=["lm"])
    meta = {p: sidecar(paths[f"desc-lm_{p}"]) for p in model.param_names}
    assert {p: m["Units"] for p, m in meta.items()} == {"cbf": "mL/100 g/min", "abv": "mL/mL", "abat": "s",
                                                       "att": "s"}
    att, abat, abv = meta["att"]["Description"], meta["abat"]["Description"], meta["abv"]["Description"]
    assert att.startswith("Tissue transit time (the research's TTT)")
    assert "arterial transit time" not in att.lower()
    assert abat.startswith("Arterial bolus arrival time (the research's ATT")
    assert abv.startswith("Arterial cerebral blood volume (aCBV)") and "fraction" in abv and "mL/mL" in abv
    assert "two-compartment" in meta["cbf"]["Description"]
    assert sidecar(paths["desc-lm_attse"])["Description"].startswith(
        "Standard error of the tissue transit time (the research's TTT)")
    assert meta["att"]["Model"]["protocol"] == prepared.protocol.to_dict()
    assert len(meta["att"]["Sources"]) == 7  # 2 x (asl, aslcontext, m0scan) + the mask


def test_tables_agree_with_the_models_and_status():
    table = der.parameter_table()
    assert set(table) == {p for cls in MODELS.values() for p in cls.param_names}
    for name, cls in MODELS.items():
        for param, units in zip(cls.param_names, cls.param_units):
            assert table[param].units == units, (name, param)
            assert name in table[param].names
    assert table["att"].names["1c"] != table["att"].names["2c"]  # att is the ATT in 1C, the TTT in 2C
    assert set(der.STATUS_LEVELS) == {int(code) for code in Status} | {der.OUTSIDE_STATUS}


# --- dataset files -------------------------------------------------------------------------------


def test_dataset_description_and_bidsignore(data_1c, data_2c, tmp_path):
    raw, prepared, model = data_1c
    write(tmp_path, raw, prepared, model)
    description = json.loads((tmp_path / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "aslbatch"
    assert description["GeneratedBy"][0]["Version"] == __version__
    assert description["BIDSVersion"] == der.BIDS_VERSION
    assert description["DatasetLinks"]["raw"] == Path(raw).resolve().as_uri()

    lines = (tmp_path / ".bidsignore").read_text().splitlines()
    assert lines == der.bidsignore_patterns()
    raw2, prepared2, model2 = data_2c
    write(tmp_path, raw2, prepared2, model2, methods=("lm",))
    files = [p for p in tmp_path.rglob("sub-*") if p.is_file()]
    for path in files:
        ignored = any(fnmatch.fnmatch(path.name, pattern) for pattern in lines)
        assert ignored == ("desc-brain_mask" not in path.name), path.name  # only the mask is standard BIDS


def test_dataset_files_not_rewritten_when_identical_outputs_reproducible(data_1c, tmp_path):
    raw, prepared, model = data_1c
    write(tmp_path, raw, prepared, model)
    description, ignore = tmp_path / "dataset_description.json", tmp_path / ".bidsignore"
    inode = description.stat().st_ino
    ignore.write_text("figures/\n" + ignore.read_text())
    ignore_inode = ignore.stat().st_ino
    provenance = tmp_path / "sub-01" / "perf" / "sub-01_provenance.json"
    first = {i["path"]: i["sha256"] for i in der.read_provenance(provenance)["outputs"]}
    _, written = write(tmp_path, raw, prepared, model)
    assert description.stat().st_ino == inode and ignore.stat().st_ino == ignore_inode
    # the same inputs and settings give byte-identical outputs
    assert {i["path"]: i["sha256"] for i in der.read_provenance(provenance)["outputs"]} == first
    assert description not in written and ignore not in written
    # a changed description (e.g. another raw dataset) is replaced atomically; foreign lines stay
    ignore.write_text("figures/\n")
    _, written = write(tmp_path, raw, prepared, model, started_at=None)
    assert ignore in written
    assert ignore.read_text().splitlines() == ["figures/"] + der.bidsignore_patterns()


# --- provenance ----------------------------------------------------------------------------------


def test_provenance_content(data_1c, tmp_path):
    raw, prepared, model = data_1c
    started = datetime(2020, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    estimates, written = write(tmp_path, raw, prepared, model, started_at=started)
    path = tmp_path / "sub-01" / "perf" / "sub-01_provenance.json"
    assert written[-1] == path
    prov = der.read_provenance(path)
    assert prov["aslbatch_version"] == __version__
    assert prov["versions"]["numpy"] == np.__version__ and prov["versions"]["nibabel"] == nib.__version__
    assert prov["versions"]["numba"]
    assert (prov["source_name"], prov["subject"], prov["session"]) == ("sub-01", "01", None)
    assert prov["methods"] == ["lm", "lut"]
    assert prov["model"] == json.loads(json.dumps(model.to_dict()))
    assert prov["estimator_options"] == {"lm": LM_OPTIONS, "lut": LUT_OPTIONS}
    # inputs: the raw files with their sha256
    assert [item["path"] for item in prov["inputs"]] == list(prepared.source_files)
    for item in prov["inputs"]:
        assert item["sha256"] == hashlib.sha256((raw / item["path"]).read_bytes()).hexdigest()
        assert item["uri"] == "bids:raw:" + item["path"]
    assert prov["input_digest"] == der.inputs_digest({i["path"]: i["sha256"] for i in prov["inputs"]})
    assert len(prov["input_digest"]) == 64
    # settings: model + every method's options; changes with any of them
    digest = der.settings_digest(model, {"lm": LM_OPTIONS, "lut": LUT_OPTIONS})
    assert prov["settings_digest"] == digest
    assert der.settings_digest(model, {"lut": LUT_OPTIONS, "lm": dict(LM_OPTIONS)}) == digest  # key order
    assert der.settings_digest(model, {"lm": LM_OPTIONS, "lut": {"resolution_s": 0.1}}) != digest
    other = get_model("1c", prepared.protocol, replace(prepared.constants, t1b=1.35))
    assert der.settings_digest(other, {"lm": LM_OPTIONS, "lut": LUT_OPTIONS}) != digest
    # times and counts
    assert prov["started"] == "2020-01-02T03:04:05.000Z"
    assert prov["finished"] > prov["started"] and prov["finished"].endswith("Z") and prov["duration_s"] > 0
    for method, estimate in estimates.items():
        assert prov["status_counts"][method] == estimate.status_counts()
        assert sum(prov["status_counts"][method].values()) == prepared.n_voxels
    # outputs: every session file but the provenance itself, with its sha256
    session = {p for p in written if p.parent == path.parent and p != path}
    assert {tmp_path / item["path"] for item in prov["outputs"]} == session
    for item in prov["outputs"]:
        assert item["sha256"] == der.sha256_file(tmp_path / item["path"])
        assert item["sha256"] == hashlib.sha256((tmp_path / item["path"]).read_bytes()).hexdigest()
    kinds = {(i["kind"], i["method"], i["param"]) for i in prov["outputs"] if not i["kind"].endswith("_sidecar")}
    assert ("stderr", "lm", "att") in kinds and ("status", "lut", None) in kinds and ("mask", None, None) in kinds


def test_input_digests_given_by_the_caller_are_recorded(data_1c, tmp_path):
    raw, prepared, model = data_1c
    given = {"sub-01/perf/sub-01_asl.nii.gz": "a" * 64, "sub-01/perf/sub-01_asl.json": "b" * 64}
    write(tmp_path, raw, prepared, model, methods=("lut",), input_digests=given)
    prov = der.read_provenance(tmp_path / "sub-01" / "perf" / "sub-01_provenance.json")
    assert {i["path"]: i["sha256"] for i in prov["inputs"]} == given
    assert prov["input_digest"] == der.inputs_digest(given)
    assert der.inputs_digest({"x": None}) is None


def test_read_provenance_refuses_other_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        der.read_provenance(tmp_path / "missing.json")
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        der.read_provenance(bad)
    bad.write_text(json.dumps({"Units": "s"}))
    with pytest.raises(ValueError, match="not an aslbatch provenance"):
        der.read_provenance(bad)
    bad.write_text(json.dumps({"format": der.PROVENANCE_FORMAT}))
    with pytest.raises(ValueError, match="lacks"):
        der.read_provenance(bad)


def test_interrupted_write_leaves_no_provenance_no_partial_and_no_temporary(data_1c, tmp_path, monkeypatch):
    raw, prepared, model = data_1c
    write(tmp_path, raw, prepared, model)  # a finished earlier run: its provenance must not survive
    provenance = tmp_path / "sub-01" / "perf" / "sub-01_provenance.json"
    assert provenance.exists()
    real_save = nib.save
    calls = []

    def failing_save(image, filename):
        calls.append(Path(filename))
        if len(calls) == 3:
            Path(filename).write_bytes(b"\x1f\x8b half a NIfTI")  # partial bytes, then the crash
            raise OSError("disk full")
        real_save(image, filename)

    monkeypatch.setattr(nib, "save", failing_save)
    folder = tmp_path / "sub-01" / "perf"
    for p in folder.iterdir():
        p.unlink()  # start from an empty session folder, but for the stale provenance
    provenance.write_text(json.dumps({"format": der.PROVENANCE_FORMAT}))
    with pytest.raises(OSError, match="disk full"):
        write(tmp_path, raw, prepared, model)
    assert len(calls) == 3
    assert all(call.name.endswith(".nii.gz") and call.name.startswith(".") for call in calls)  # temporaries
    assert not provenance.exists()
    assert leftovers(tmp_path) == []
    # the two NIfTI files written before the crash are complete; the third never reached its final name
    niftis = sorted(folder.glob("*.nii.gz"))
    assert [p.name for p in niftis] == ["sub-01_desc-brain_mask.nii.gz", "sub-01_desc-lm_cbf.nii.gz"]
    for path in niftis:
        assert load(path)[0].shape == prepared.shape
    assert not (folder / "sub-01_desc-lm_att.nii.gz").exists()


def test_inconsistent_estimates_raise_before_anything_is_written(data_1c, tmp_path):
    raw, prepared, model = data_1c
    good = fake_estimate(prepared, model, "lm")
    cases = {
        "made by method": {"lut": good},
        "params have shape": {"lm": replace(good, params=good.params[:-1])},
        "unknown status": {"lm": replace(good, status=np.full(prepared.n_voxels, 7, dtype=np.int8))},
        "stderr has shape": {"lm": replace(good, stderr=good.stderr[:, :1])},
    }
    for message, estimates in cases.items():
        options = {m: {} for m in estimates}
        with pytest.raises(ValueError, match=message):
            der.write_session_outputs(tmp_path, prepared, estimates, model, options)
    with pytest.raises(ValueError, match="no estimator options"):
        der.write_session_outputs(tmp_path, prepared, {"lm": good}, model, {})
    with pytest.raises(ValueError, match="has parameters"):
        der.write_session_outputs(tmp_path, prepared, {"lm": good}, get_model("2c", prepared.protocol),
                                  {"lm": {}})
    assert list(tmp_path.iterdir()) == []


def test_interval_maps_are_written_with_their_levels(data_1c, tmp_path):
    """An estimate with interval half-widths gets <param>ci68/ci95 maps holding them, with sidecars naming the
    nominal coverage; inconsistent intervals are refused before anything is written."""
    raw, prepared, model = data_1c
    good = fake_estimate(prepared, model, "lm")
    levels = tuple(sorted(der.INTERVAL_KINDS))
    half = np.stack([good.stderr * 1.1, good.stderr * 2.3], axis=2)
    with_intervals = replace(good, intervals=half, interval_levels=levels)
    der.write_session_outputs(tmp_path, prepared, {"lm": with_intervals}, model, {"lm": LM_OPTIONS}, bids_dir=raw)
    paths = der.output_paths(tmp_path, prepared, "1c", ["lm"], stderr_methods=["lm"], interval_methods=["lm"])
    for k, suffix in enumerate(("ci68", "ci95")):
        for j, param in enumerate(model.param_names):
            data, _ = load(paths[f"desc-lm_{param}{suffix}"])
            assert data.dtype == np.float32 and np.isnan(data[~prepared.mask]).all()
            np.testing.assert_array_equal(data[prepared.mask], half[:, j, k].astype(np.float32))
            meta = sidecar(paths[f"desc-lm_{param}{suffix}"])
            assert meta["NominalCoverage"] == levels[k] and meta["Units"] == sidecar(paths[f"desc-lm_{param}"])["Units"]
            assert ("68 %" if k == 0 else "95 %") in meta["Description"] and meta["IntervalMethod"]
    assert "*_cbfci95.*" in der.bidsignore_patterns()
    for message, bad in {"intervals have shape": replace(with_intervals, intervals=half[:, :1]),
                         "interval levels": replace(with_intervals, interval_levels=(0.5, 0.9))}.items():
        with pytest.raises(ValueError, match=message):
            der.write_session_outputs(tmp_path / "bad", prepared, {"lm": bad}, model, {"lm": {}})
    assert not (tmp_path / "bad").exists()
