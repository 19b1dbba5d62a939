"""BIDS-derivative outputs of one acquisition: maps, sidecars, mask and provenance, written atomically.

What is written, and where
--------------------------
For an acquisition whose source name is ``<src>`` (the ASL file name without
``_asl.nii[.gz]``; for a non-crushed + crushed pair, the entities both series
share, e.g. ``sub-01_ses-1``), under the output folder ``OUT``::

    OUT/dataset_description.json                 DatasetType "derivative", GeneratedBy aslbatch
    OUT/.bidsignore                              patterns of the non-standard files below
    OUT/sub-<l>[/ses-<l>]/perf/
        <src>_desc-brain_mask.nii.gz (+ .json)   uint8, 1 = fitted voxel, 0 = outside
        <src>_desc-<method>_<param>.nii.gz       float32 parameter map, NaN outside the mask
        <src>_desc-<method>_<param>se.nii.gz     float32 standard error (methods that give one)
        <src>_desc-<method>_status.nii.gz        uint8 fit status (Status codes), 255 outside
        <src>_desc-<method>_priordominated.nii.gz  uint8 bit mask of prior-dominated parameters
                                                 (lm and the networks), 0 outside
        <src>_provenance.json                    written last: the commit marker

``<param>`` is a model parameter (``cbf``, ``att``, ``abat``, ``abv``: the names of
ASL_MODELS.md and ASLPrep), ``<method>`` the estimator's registry name (``lm``,
``lut``, ...). Every map has a JSON sidecar (same name, ``.json``) with ``Units``,
a one-sentence ``Description`` that names the research's term for the quantity,
``Sources``, ``Model`` (the model's :meth:`~aslbatch.models.KineticModel.to_dict`:
name, protocol, constants, options), ``Method``, ``EstimatorOptions`` and what was done
about background suppression (:func:`aslbatch.bids.background_suppression_summary`:
``BackgroundSuppression`` and ``BackgroundSuppressionNumberPulses`` as the input states
them, ``BackgroundSuppressionCorrection``, ``BackgroundSuppressionFactor`` α_BS and a
``BackgroundSuppressionCorrectionDescription``), so a map compares with another tool's
whichever convention it follows. Maps are on the source grid, with the source affine
(qform and sform, code 1).

Everything a writer needs is in one table, :data:`OUTPUTS` (one :class:`OutputKind`
per kind of file: name pattern, extension, dtype, units, description template,
value outside the mask, .bidsignore pattern), with the quantities in
:func:`parameter_table` (from the models) and the status codes in :data:`STATUS_LEVELS`. Writers and
:func:`output_paths` read these tables; nothing else spells a file name.

Naming choices
--------------
- **Standard errors** are ``_desc-<method>_<param>se``: the suffix names the quantity
  the map holds (``cbfse`` = standard error of cbf) and ``desc`` stays the method
  alone. Keeping the suffix ``cbf`` and moving "se" into ``desc`` (``desc-lmse_cbf``)
  would make every glob or BIDS query for ``*_cbf.nii.gz`` return uncertainty maps
  as if they were CBF maps; a new suffix cannot be mistaken for the parameter. The
  suffix is not in BIDS and is listed in ``.bidsignore``.
- **Prior-dominated parameters** are ``_desc-<method>_priordominated`` (uint8): bit j (value
  2**j) set where parameter j (the sidecar's ``Bits``) is prior-dominated
  (:mod:`aslbatch.estimators.prior`: its se undefined or above a share of the training
  prior's SD); one file per method rather than one per parameter, so that a voxel's flags
  are read together; non-standard, in ``.bidsignore``.
- **Status** is ``_desc-<method>_status`` (uint8; codes of
  :class:`aslbatch.estimators.Status`, 255 outside the mask), non-standard, in
  ``.bidsignore``.
- **The mask** is the BIDS common-derivative ``_desc-brain_mask`` (standard), one per
  acquisition: every method fits the same voxels.
- **Provenance** is one ``<src>_provenance.json`` per acquisition covering every
  method written by one :func:`write_session_outputs` call (one settings digest for
  the run, as the batch's up-to-date check reads it). It is removed before the
  first file of a call is written and written after the last, so an interrupted
  call leaves no provenance: nothing that looks finished. It lists every file it
  vouches for with its sha256; files of methods from earlier calls are not covered.
- The parameter suffixes ``cbf``, ``att``, ``abat``, ``abv`` are ASLPrep's de-facto
  names but not (yet) BIDS suffixes, so they are listed in ``.bidsignore`` too. The
  ``.bidsignore`` content is fixed by the tables (every parameter of every model),
  so it is the same whichever session writes it first; lines already in an
  existing ``.bidsignore`` are kept.

Sources
-------
``Sources`` are BIDS URIs: ``bids:raw:<path>`` for a file of the raw dataset
(``PreparedData.source_files`` holds dataset-relative paths), resolved through
``DatasetLinks["raw"]`` of ``dataset_description.json`` (written when
``bids_dir`` is given), ``bids::<path>`` for a file of this derivative dataset
(the mask, in the parameter maps' sources), and a ``file://`` URI for a file
outside the dataset (a user's mask).

Atomicity
---------
Every file goes to a temporary name in its own folder and is renamed onto its
final name once complete (:mod:`aslbatch.atomic`; NIfTI temporaries end in
``.nii.gz`` because nibabel picks the format from the extension). A file under a
final name is therefore always complete; ``dataset_description.json`` and
``.bidsignore`` are rewritten only when their content changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import functools
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import nibabel as nib
import numpy as np

from ._version import __version__, versions
from .atomic import atomic_open, atomic_path
from .bids import background_suppression_summary, parse_filename
from .estimators import ESTIMATORS
from .estimators.base import Estimate, Status
from .estimators.prior import PRIOR_SHARE, flag_bits, prior_dominated, prior_sd
from .models import MODELS, KineticModel
from .preprocess import PreparedData
from .protocol import _canonical_json

__all__ = [
    "BIDS_VERSION",
    "OUTPUTS",
    "OUTSIDE_STATUS",
    "OutputKind",
    "parameter_table",
    "PROVENANCE_FORMAT",
    "STATUS_LEVELS",
    "LOGS_DIR",
    "OTHER_BIDSIGNORE",
    "QC_INDEX_NAME",
    "QC_PAGE_SUFFIX",
    "bidsignore_patterns",
    "inputs_digest",
    "output_paths",
    "read_provenance",
    "session_folder",
    "settings_digest",
    "sha256_file",
    "sidecar_path",
    "write_session_outputs",
]

#: the BIDS version the outputs follow
BIDS_VERSION = "1.9.0"
#: value of the status map outside the brain mask (uint8)
OUTSIDE_STATUS = 255
#: ``format`` field of every provenance file (read_provenance refuses others)
PROVENANCE_FORMAT = "aslbatch-provenance-1"
#: the BIDS data type folder of every output
DATATYPE = "perf"
#: dataset-relative paths of the raw dataset become ``bids:<RAW_LINK>:<path>``
RAW_LINK = "raw"


# --- the tables -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Parameter:
    """A parameter as it appears in the outputs, over every model that has it.

    ``units`` (as in ASL_MODELS.md); ``names[model]``: what the parameter is in
    that model, in words and in the research's terms; ``definitions[model]``:
    the sentence's continuation (may be empty).
    """

    units: str
    names: Mapping[str, str]
    definitions: Mapping[str, str]


@functools.cache
def parameter_table() -> dict[str, Parameter]:
    """Every parameter of every registered model (:data:`~aslbatch.models.MODELS`), from the
    models' own :class:`~aslbatch.models.Parameter` facts; a suffix has one unit in every model."""
    table: dict[str, Parameter] = {}
    for model_name in MODELS:
        for spec in MODELS[model_name].parameters:
            known = table.setdefault(spec.name, Parameter(spec.units, {}, {}))
            if known.units != spec.units:
                raise RuntimeError(f"parameter {spec.name!r} is in {known.units} in one model and in "
                                   f"{spec.units} in {model_name}: one map suffix needs one unit")
            known.names[model_name] = spec.title
            known.definitions[model_name] = spec.definition
    return table


def _method_text(method: str | None) -> str:
    return ESTIMATORS[method].title if method in ESTIMATORS else f"the method {method}"


def _stderr_text(method: str) -> str:
    text = ESTIMATORS[method].stderr_method if method in ESTIMATORS else None
    return text or "as reported by the estimator (Estimate.stderr); NaN where not estimable"


#: what every :class:`~aslbatch.estimators.Status` code means, and the value outside the mask
STATUS_LEVELS: dict[int, str] = {
    int(Status.CONVERGED): "converged: the fit converged inside the bounds",
    int(Status.MAX_ITERATIONS): "max_iterations: the iteration limit was reached; the parameters are the best found",
    int(Status.AT_BOUND): "at_bound: converged (or chosen) with a parameter on a bound (or clipped to it, "
    "or abat = att)",
    int(Status.INVALID_INPUT): "invalid_input: NaN, Inf or all-zero signal; the parameters are NaN",
    int(Status.ATT_UNDETERMINED): "att_undetermined: with T1' = T1b the fitted att is at or before the shortest PLD "
    "(TI - bolus duration for PASL): every volume sees the fully delivered bolus, whose signal does not depend on "
    "att; cbf is determined, att is only known to be at most that time",
    int(Status.CBF_UNDETERMINED): "cbf_undetermined: the fitted att is at or after the second-latest readout time "
    "(label duration + PLD; TI for PASL): at most one readout sees the label, so cbf and att are not determined "
    "(any cbf fits once att passes the last readout); neither value is to be trusted (abv and abat still are)",
    OUTSIDE_STATUS: "outside the brain mask: not fitted",
}


@dataclass(frozen=True)
class OutputKind:
    """One kind of output file.

    Attributes
    ----------
    kind : ``"map"``, ``"stderr"``, ``"ci68"``, ``"ci95"`` (interval half-widths), ``"status"``,
        ``"flags"``, ``"mask"`` or ``"provenance"``.
    name : the file name after ``<src>_`` without extension; may use ``{method}``
        and ``{param}``. It is also the key of :func:`output_paths`.
    extension : ``".nii.gz"`` or ``".json"``.
    dtype : NIfTI data type (None for JSON).
    units : ``Units`` of the sidecar (``{units}``: the parameter's).
    description : template of the sidecar's one-sentence ``Description``.
    outside : value of voxels outside the brain mask (None for JSON).
    bidsignore : ``.bidsignore`` pattern (``{param}`` over every parameter), or None
        for files BIDS defines.
    """

    kind: str
    name: str
    extension: str
    dtype: str | None
    units: str | None
    description: str
    outside: float | int | None
    bidsignore: str | None

    @property
    def per_method(self) -> bool:
        """One file per method."""
        return "{method}" in self.name

    @property
    def per_param(self) -> bool:
        """One file per parameter."""
        return "{param}" in self.name


#: every kind of output, in the order a session writes them (provenance last)
OUTPUTS: tuple[OutputKind, ...] = (
    OutputKind(
        "mask", "desc-brain_mask", ".nii.gz", "uint8", "n/a",
        "Brain mask of the ASL acquisition (1 = voxel fitted, 0 = outside), on the ASL grid.",
        0, None,
    ),
    OutputKind(
        "map", "desc-{method}_{param}", ".nii.gz", "float32", "{units}",
        "{Name}{definition}, in {units}, estimated by {method_text} with {model_text}.",
        math.nan, "*_{param}.*",
    ),
    OutputKind(
        "stderr", "desc-{method}_{param}se", ".nii.gz", "float32", "{units}",
        "Standard error of the {name}, in {units}, as estimated by {method_text} with {model_text}.",
        math.nan, "*_{param}se.*",
    ),
    OutputKind(
        "ci68", "desc-{method}_{param}ci68", ".nii.gz", "float32", "{units}",
        "Half-width of the 68 % interval of the {name}, in {units}, as estimated by {method_text} with "
        "{model_text}: the map ± this value covers the truth with probability 0.683 (IntervalMethod).",
        math.nan, "*_{param}ci68.*",
    ),
    OutputKind(
        "ci95", "desc-{method}_{param}ci95", ".nii.gz", "float32", "{units}",
        "Half-width of the 95 % interval of the {name}, in {units}, as estimated by {method_text} with "
        "{model_text}: the map ± this value covers the truth with probability 0.95 (IntervalMethod).",
        math.nan, "*_{param}ci95.*",
    ),
    OutputKind(
        "status", "desc-{method}_status", ".nii.gz", "uint8", "n/a",
        "Fit status code of each voxel for {method_text} with {model_text} (meanings in Levels; "
        f"{OUTSIDE_STATUS} outside the brain mask).",
        OUTSIDE_STATUS, "*_status.*",
    ),
    OutputKind(
        "flags", "desc-{method}_priordominated", ".nii.gz", "uint8", "n/a",
        "Bit mask of the parameters whose value {method_text} with {model_text} took from the prior rather than "
        "the data (standard error undefined or above Threshold x the SD of the training prior): bit value in Bits, "
        "0 where none is (and outside the brain mask).",
        0, "*_priordominated.*",
    ),
    OutputKind(
        "provenance", "provenance", ".json", None, None,
        "Provenance of the outputs of one acquisition, written last.",
        None, "*_provenance.json",
    ),
)
_KINDS = {item.kind: item for item in OUTPUTS}
#: the output kind of each interval level (Estimate.interval_levels) written as a map
INTERVAL_KINDS = {0.6826894921370859: "ci68", 0.95: "ci95"}
#: each acquisition's QC page (aslbatch.qc), beside its maps: ``<src>_qc.html``
QC_PAGE_SUFFIX = "_qc.html"
#: the run's QC index page in the output folder
QC_INDEX_NAME = "qc.html"
#: the batch's logs and summaries in the output folder
LOGS_DIR = "logs"
#: ``.bidsignore`` lines of the files that are not per-acquisition outputs of :data:`OUTPUTS`
OTHER_BIDSIGNORE = (f"*{QC_PAGE_SUFFIX}", f"/{QC_INDEX_NAME}", f"/{LOGS_DIR}/", "*_desc-motioncheck_qc.*")


def _model_params(model_name: str) -> tuple[str, ...]:
    try:
        return MODELS[model_name].param_names
    except KeyError:
        raise ValueError(f"unknown model {model_name!r}; choose one of {sorted(MODELS)}") from None


def bidsignore_patterns() -> list[str]:
    """The ``.bidsignore`` lines: every non-standard kind of :data:`OUTPUTS`, each parameter,
    then the QC pages and the logs (:data:`OTHER_BIDSIGNORE`)."""
    params = list(parameter_table())
    lines: list[str] = []
    for item in OUTPUTS:
        if item.bidsignore is None:
            continue
        for param in params if "{param}" in item.bidsignore else [None]:
            line = item.bidsignore.format(param=param)
            if line not in lines:
                lines.append(line)
    return lines + list(OTHER_BIDSIGNORE)


def _description(item: OutputKind, model_name: str, method: str | None = None, param: str | None = None) -> str:
    fields: dict[str, str] = {
        "method_text": _method_text(method),
        "model_text": MODELS[model_name].title if model_name in MODELS else f"the {model_name} model",
    }
    if param is not None:
        spec = parameter_table()[param]
        name = spec.names[model_name]
        fields.update(name=name, Name=name[:1].upper() + name[1:], definition=spec.definitions[model_name],
                      units=spec.units)
    return item.description.format(**fields)


def _units(item: OutputKind, param: str | None) -> str | None:
    if item.units is None:
        return None
    return item.units.format(units=parameter_table()[param].units if param else "")


# --- names -------------------------------------------------------------------------------------


def _source_entities(source_name: str) -> dict[str, str]:
    if not source_name:
        raise ValueError("the source name is empty: PreparedData.source_name names every output")
    entities, _, _ = parse_filename(f"{source_name}_asl.nii.gz")
    if "sub" not in entities:
        raise ValueError(f"source name {source_name!r} has no sub- entity")
    return entities


def session_folder(out_dir: str | os.PathLike, source_name: str) -> Path:
    """``OUT/sub-<l>[/ses-<l>]/perf`` for the source name's subject and session."""
    entities = _source_entities(source_name)
    folder = Path(out_dir) / f"sub-{entities['sub']}"
    if "ses" in entities:
        folder = folder / f"ses-{entities['ses']}"
    return folder / DATATYPE


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of a NIfTI output (``.nii.gz`` → ``.json``)."""
    path = Path(path)
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + ".json")
    raise ValueError(f"{path} is not a NIfTI file name")


def _check_label(value: str, what: str) -> str:
    if not (isinstance(value, str) and value.isalnum() and value.isascii()):
        raise ValueError(f"{what} {value!r} must be an alphanumeric BIDS label")
    return value


def output_paths(
    out_dir: str | os.PathLike,
    source: str | PreparedData,
    model_name: str,
    methods: Sequence[str],
    *,
    stderr_methods: Collection[str] = (),
    flag_methods: Collection[str] | None = None,
    interval_methods: Collection[str] = (),
) -> dict[str, Path]:
    """Every output path of one acquisition, keyed by the name after ``<src>_``.

    ``source``: the source name (or a PreparedData, whose ``source_name`` is used);
    ``model_name``: ``"1c"`` or ``"2c"`` (its parameters name the maps); ``methods``:
    estimator names; ``stderr_methods``: those that give standard errors; ``flag_methods``: those
    of them that write a prior-dominated bit mask (None: those whose estimator class says so);
    ``interval_methods``: those of them that write interval half-widths (``ci68``, ``ci95``). Keys, e.g.
    for 1C and ``lm``: ``desc-brain_mask``, ``desc-lm_cbf``, ``desc-lm_att``,
    ``desc-lm_cbfse``, ``desc-lm_attse``, ``desc-lm_status``, ``provenance``. NIfTI
    sidecars are at :func:`sidecar_path`.
    """
    source_name = source.source_name if isinstance(source, PreparedData) else source
    folder = session_folder(out_dir, source_name)
    params = _model_params(model_name)
    for method in methods:
        _check_label(method, "method")
    unknown = set(stderr_methods) - set(methods)
    if unknown:
        raise ValueError(f"stderr_methods {sorted(unknown)} are not among the methods {list(methods)}")
    flags = [m for m in stderr_methods if m in ESTIMATORS and ESTIMATORS[m].flags_prior_dominated] \
        if flag_methods is None else list(flag_methods)
    if set(flags) - set(stderr_methods):
        raise ValueError(f"flag_methods {sorted(set(flags) - set(stderr_methods))} give no standard errors")
    if set(interval_methods) - set(stderr_methods):
        raise ValueError(f"interval_methods {sorted(set(interval_methods) - set(stderr_methods))} give no "
                         f"standard errors")
    paths: dict[str, Path] = {}
    for item in OUTPUTS:
        for method in methods if item.per_method else [None]:
            if item.kind == "stderr" and method not in stderr_methods:
                continue
            if item.kind == "flags" and method not in flags:
                continue
            if item.kind in INTERVAL_KINDS.values() and method not in interval_methods:
                continue
            for param in params if item.per_param else [None]:
                key = item.name.format(method=method, param=param)
                paths[key] = folder / f"{source_name}_{key}{item.extension}"
    return paths


def _uri(path: str) -> str:
    """BIDS URI of an input file (see the module doc)."""
    pure = PurePosixPath(path)
    if Path(path).is_absolute():
        return Path(path).as_uri()
    if pure.parts and pure.parts[0].startswith("sub-"):
        return f"bids:{RAW_LINK}:{pure.as_posix()}"
    return Path(path).resolve().as_uri()


# --- digests ---------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    """``value`` with numpy types, tuples and paths turned into JSON types; NaN/Inf as strings."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, str):
        return value
    return str(value)


def _settings(model: KineticModel, estimator_options: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return _jsonable({
        "model": model.to_dict(),
        "estimators": {method: dict(estimator_options[method]) for method in sorted(estimator_options)},
    })


def settings_digest(model: KineticModel, estimator_options: Mapping[str, Mapping[str, Any]]) -> str:
    """sha256 of the canonical JSON of the settings: the model (name, protocol, constants,
    options) and each method's estimator options. Equal settings give equal digests."""
    return hashlib.sha256(_canonical_json(_settings(model, estimator_options)).encode()).hexdigest()


def run_settings_digest(run_settings: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a run's settings (see ``Settings.to_dict``)."""
    return hashlib.sha256(_canonical_json(_jsonable(dict(run_settings))).encode()).hexdigest()


def inputs_digest(input_digests: Mapping[str, str | None]) -> str | None:
    """sha256 of the canonical JSON of ``{input path: sha256}``; None if any digest is unknown."""
    if not input_digests or any(value is None for value in input_digests.values()):
        return None
    return hashlib.sha256(_canonical_json(dict(input_digests)).encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- writers ---------------------------------------------------------------------------------


def _json_text(data: Any) -> str:
    return json.dumps(_jsonable(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _write_json(path: Path, data: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(_json_text(data))


def _write_text_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` atomically unless ``path`` already holds exactly it; True if written."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return True


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """A 3-D NIfTI-1 image with the source affine as qform and sform (code 1), atomically."""
    image = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    image.header.set_data_dtype(data.dtype)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(image, str(tmp))


def _dataset_description(bids_dir: str | os.PathLike | None) -> dict[str, Any]:
    description: dict[str, Any] = {
        "Name": "aslbatch perfusion maps",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": "aslbatch",
            "Version": __version__,
            "Description": "Multi-delay ASL perfusion quantification (CBF, arrival times, aCBV) with the one- "
            "and two-compartment kinetic models",
        }],
    }
    if bids_dir is not None:
        uri = Path(bids_dir).resolve().as_uri()
        description["SourceDatasets"] = [{"URL": uri}]
        description["DatasetLinks"] = {RAW_LINK: uri}
    return description


def _bidsignore_text(path: Path) -> str:
    """The standard lines, after any lines an existing ``.bidsignore`` already has."""
    try:
        existing = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (FileNotFoundError, UnicodeDecodeError):
        existing = []
    lines = existing + [line for line in bidsignore_patterns() if line not in existing]
    return "\n".join(lines) + "\n"


def _check_inputs(
    prepared: PreparedData,
    estimates: Mapping[str, Estimate],
    model: KineticModel,
    estimator_options: Mapping[str, Mapping[str, Any]],
) -> None:
    if not estimates:
        raise ValueError("no estimate to write")
    for name in model.param_names:
        if name not in parameter_table() or model.name not in parameter_table()[name].names:
            raise ValueError(f"no output description for parameter {name!r} of model {model.name!r}")
    valid_codes = {int(code) for code in Status}
    for method, estimate in estimates.items():
        _check_label(method, "method")
        where = f"estimate {method!r}"
        if estimate.method != method:
            raise ValueError(f"{where} was made by method {estimate.method!r}")
        if method not in estimator_options:
            raise ValueError(f"no estimator options for method {method!r} (give {{}} for none)")
        if tuple(estimate.param_names) != tuple(model.param_names):
            raise ValueError(f"{where} has parameters {estimate.param_names}, the model {model.param_names}")
        n, n_params = prepared.n_voxels, model.n_params
        if np.shape(estimate.params) != (n, n_params):
            raise ValueError(f"{where}: params have shape {np.shape(estimate.params)}, expected {(n, n_params)}")
        if np.shape(estimate.status) != (n,):
            raise ValueError(f"{where}: status has shape {np.shape(estimate.status)}, expected {(n,)}")
        if estimate.stderr is not None and np.shape(estimate.stderr) != (n, n_params):
            raise ValueError(f"{where}: stderr has shape {np.shape(estimate.stderr)}, expected {(n, n_params)}")
        if estimate.intervals is not None:
            levels = tuple(estimate.interval_levels)
            if estimate.stderr is None or np.shape(estimate.intervals) != (n, n_params, len(levels)):
                raise ValueError(f"{where}: intervals have shape {np.shape(estimate.intervals)}, expected "
                                 f"{(n, n_params, len(levels))} with standard errors")
            if set(levels) != set(INTERVAL_KINDS):
                raise ValueError(f"{where}: interval levels {levels}; maps exist for {sorted(INTERVAL_KINDS)}")
        codes = set(np.unique(np.asarray(estimate.status)).tolist())
        if not codes <= valid_codes:
            raise ValueError(f"{where}: unknown status code(s) {sorted(codes - valid_codes)}")
    unused = set(estimator_options) - set(estimates)
    if unused:
        raise ValueError(f"estimator options given for method(s) {sorted(unused)} without an estimate")


def _input_digests(
    prepared: PreparedData, input_digests: Mapping[str, str | None] | None, bids_dir: str | os.PathLike | None
) -> dict[str, str | None]:
    if input_digests is not None:
        return {str(k): v for k, v in input_digests.items()}
    digests: dict[str, str | None] = {}
    for name in prepared.source_files:
        path = Path(name)
        if not path.is_absolute() and bids_dir is not None and PurePosixPath(name).parts[0].startswith("sub-"):
            path = Path(bids_dir) / name
        digests[name] = sha256_file(path) if path.is_file() else None
    return digests


def write_session_outputs(
    out_dir: str | os.PathLike,
    prepared: PreparedData,
    estimates: Mapping[str, Estimate],
    model: KineticModel,
    estimator_options: Mapping[str, Mapping[str, Any]],
    input_digests: Mapping[str, str | None] | None = None,
    *,
    bids_dir: str | os.PathLike | None = None,
    started_at: datetime | None = None,
    run_settings: Mapping[str, Any] | None = None,
    decision: Mapping[str, Any] | None = None,
    plausibility: Mapping[str, Any] | None = None,
    motion: Sequence[Mapping[str, Any]] | None = None,
) -> list[Path]:
    """Write every output of one acquisition; returns the files written, provenance last.

    Parameters
    ----------
    out_dir : the derivative dataset folder ``OUT``.
    prepared : the acquisition (grid, mask, source name, source files, notes).
    estimates : ``{method: Estimate}`` over ``prepared``'s voxels, each made with ``model``.
    model : the kinetic model fitted (its ``to_dict`` goes into every sidecar).
    estimator_options : ``{method: options}`` (``Estimator.options()``) for every method.
    input_digests : ``{input path: sha256}`` of the files the acquisition depends on
        (the batch should include the JSON sidecars, which ``source_files`` does not
        list); None computes them for ``prepared.source_files`` (dataset-relative
        paths need ``bids_dir``; a file not found gets None, and then the
        provenance's ``input_digest`` is None).
    bids_dir : the raw dataset, for ``DatasetLinks`` / ``SourceDatasets`` of
        ``dataset_description.json`` and for computing input digests.
    started_at : when processing of the acquisition began (default: now).
    run_settings : the user's settings of the run (JSON-ready), recorded with their sha256
        as ``run_settings`` / ``run_settings_digest`` for the batch's up-to-date check.
    decision : what the protocol determines (:meth:`aslbatch.identify.Decision.to_dict`: model,
        parameters, reason), recorded in every map's sidecar (``Identifiability``) and the
        provenance (``decision``).
    plausibility : the judgement of the result (:meth:`aslbatch.plausibility.Plausibility.to_dict`),
        recorded as the provenance's ``plausibility`` (shown on the QC page and the run index).
    motion : each series' motion summary (:meth:`aslbatch.motion.SeriesMotion.summary` of
        ``prepared.motion``), recorded as the provenance's ``motion``; with ``prepared.motion``, the
        confounds files and motion-check images are written (:mod:`aslbatch.confounds`).

    The provenance (see :func:`read_provenance`) records: format, aslbatch version and
    the versions of python, numpy, numba and nibabel; source name, subject, session;
    the model (``to_dict``), methods, estimator options and :func:`settings_digest`;
    the inputs with their sha256 and :func:`inputs_digest`; the preprocessing
    (protocol, constants, shape, voxel count, background suppression as in the map
    sidecars, notes); start and end time; status
    counts per method; and every file of the acquisition written by this call
    (maps, sidecars, mask; not the dataset-level files) with its sha256. NIfTI files
    are byte-reproducible (nibabel writes gzip without a time stamp), so the same
    inputs and settings give the same output digests.

    Order: ``dataset_description.json`` and ``.bidsignore`` (only when their content
    changes), then the mask, then per method its maps, standard errors and status
    map (each NIfTI then its sidecar), and last the provenance. The acquisition's
    provenance is removed before the first write, so if anything fails no
    provenance exists; atomic writes mean no final-name file is partial.
    Inconsistent inputs raise ValueError before anything is written.
    """
    started_at = _now() if started_at is None else started_at
    if started_at.tzinfo is None:
        started_at = started_at.astimezone()  # naive: local time
    _check_inputs(prepared, estimates, model, estimator_options)
    methods = list(estimates)
    stderr_methods = [m for m in methods if estimates[m].stderr is not None]
    flag_methods = [m for m in stderr_methods if m in ESTIMATORS and ESTIMATORS[m].flags_prior_dominated]
    interval_methods = [m for m in stderr_methods if estimates[m].intervals is not None]
    paths = output_paths(out_dir, prepared, model.name, methods, stderr_methods=stderr_methods,
                         flag_methods=flag_methods, interval_methods=interval_methods)
    out = Path(out_dir)
    digests = _input_digests(prepared, input_digests, bids_dir)
    sources = [_uri(name) for name in prepared.source_files]
    model_dict = _jsonable(model.to_dict())
    suppression = _jsonable(dict(prepared.background_suppression) or background_suppression_summary(
        [], prepared.constants.alpha_bs, correction=False, user_factor=True))

    provenance_path = paths["provenance"]
    provenance_path.unlink(missing_ok=True)  # the old commit marker goes first
    provenance_path.with_name(prepared.source_name + QC_PAGE_SUFFIX).unlink(missing_ok=True)  # and its QC page

    written: list[Path] = []
    out.mkdir(parents=True, exist_ok=True)
    if _write_text_if_changed(out / "dataset_description.json", _json_text(_dataset_description(bids_dir))):
        written.append(out / "dataset_description.json")
    if _write_text_if_changed(out / ".bidsignore", _bidsignore_text(out / ".bidsignore")):
        written.append(out / ".bidsignore")

    session_files: list[tuple[str, str | None, str | None, Path]] = []  # (kind, method, param, path)

    def emit(item: OutputKind, key: str, data: np.ndarray, sidecar: dict[str, Any],
             method: str | None = None, param: str | None = None) -> None:
        path = paths[key]
        _write_nifti(path, data.astype(item.dtype, copy=False), prepared.affine)
        _write_json(sidecar_path(path), sidecar)
        written.extend([path, sidecar_path(path)])
        session_files.append((item.kind, method, param, path))
        session_files.append((item.kind + "_sidecar", method, param, sidecar_path(path)))

    # the brain mask
    mask_kind = _KINDS["mask"]
    mask_key = mask_kind.name
    emit(mask_kind, mask_key, prepared.mask.astype(np.uint8), {
        "Type": "Brain",
        "Units": mask_kind.units,
        "Description": _description(mask_kind, model.name),
        "Sources": sources,
        "Levels": {"0": "outside the brain mask", "1": "inside the brain mask (fitted)"},
    })
    mask_uri = f"bids::{paths[mask_key].relative_to(out).as_posix()}"

    for method in methods:
        estimate = estimates[method]
        options = _jsonable(dict(estimator_options[method]))
        common = {"Sources": sources + [mask_uri], "Method": method, "EstimatorOptions": options,
                  "Model": model_dict, **suppression}
        if decision is not None:
            common["Identifiability"] = _jsonable(dict(decision))
        if model.assumptions() is not None:
            common["ModelAssumptions"] = model.assumptions()
        for kind in ("map", "stderr"):
            item = _KINDS[kind]
            values = estimate.params if kind == "map" else estimate.stderr
            if values is None:
                continue
            for j, param in enumerate(model.param_names):
                column = np.asarray(values[:, j], dtype=np.float64)
                grid = prepared.unmask(column, fill=item.outside).astype(np.float32)
                sidecar = {
                    "Units": _units(item, param),
                    "Description": _description(item, model.name, method, param),
                    **common,
                    "OutsideMask": "NaN",
                }
                if kind == "stderr":
                    sidecar["StandardErrorMethod"] = _stderr_text(method)
                emit(item, item.name.format(method=method, param=param), grid, sidecar, method, param)
        if method in interval_methods:
            _emit_intervals(emit, model, estimate, prepared, common, method)
        if method in flag_methods:
            _emit_flags(emit, model, estimate, prepared, common, method)
        item = _KINDS["status"]
        status = np.asarray(estimate.status).astype(np.uint8)
        grid = prepared.unmask(status, fill=item.outside).astype(np.uint8)
        emit(item, item.name.format(method=method), grid, {
            "Units": item.units,
            "Description": _description(item, model.name, method),
            **common,
            "Levels": {str(code): text for code, text in STATUS_LEVELS.items()},
            "OutsideMask": item.outside,
        }, method)

    summaries = list(motion) if motion is not None else [record.summary() for record in prepared.motion]
    if prepared.motion:
        from .confounds import write_motion_outputs

        for kind, path in write_motion_outputs(paths[mask_key].parent, prepared.motion, prepared.affine, summaries):
            written.append(path)
            session_files.append((kind, None, None, path))

    # the commit marker, last
    finished_at = _now()
    provenance = {
        "format": PROVENANCE_FORMAT,
        "aslbatch_version": __version__,
        "versions": versions(),
        "source_name": prepared.source_name,
        "subject": _source_entities(prepared.source_name)["sub"],
        "session": _source_entities(prepared.source_name).get("ses"),
        "model": model_dict,
        "decision": _jsonable(dict(decision)) if decision is not None else None,
        "methods": methods,
        "estimator_options": {m: _jsonable(dict(estimator_options[m])) for m in methods},
        "settings_digest": settings_digest(model, {m: estimator_options[m] for m in methods}),
        "inputs": [{"path": name, "uri": _uri(name), "sha256": digest} for name, digest in digests.items()],
        "input_digest": inputs_digest(digests),
        "run_settings": _jsonable(dict(run_settings)) if run_settings is not None else None,
        "run_settings_digest": run_settings_digest(run_settings) if run_settings is not None else None,
        "preprocessing": {
            "protocol": prepared.protocol.to_dict(),
            "constants": prepared.constants.to_dict(),
            "shape": list(prepared.shape),
            "n_voxels": prepared.n_voxels,
            "background_suppression": suppression,
            "notes": list(prepared.notes),
        },
        "started": _iso(started_at),
        "finished": _iso(finished_at),
        "duration_s": round((finished_at - started_at).total_seconds(), 3),
        "status_counts": {m: estimates[m].status_counts() for m in methods},
        **({"plausibility": _jsonable(dict(plausibility))} if plausibility is not None else {}),
        **({"motion": _jsonable([dict(m) for m in summaries])} if summaries else {}),
        "outputs": [
            {"path": path.relative_to(out).as_posix(), "kind": kind, "method": method, "param": param,
             "sha256": sha256_file(path)}
            for kind, method, param, path in session_files
        ],
    }
    _write_json(provenance_path, provenance)
    written.append(provenance_path)
    return written


def _interval_text(method: str) -> str:
    text = ESTIMATORS[method].interval_method if method in ESTIMATORS else None
    return text or "as reported by the estimator (Estimate.intervals); NaN where not available"


def _emit_intervals(emit: Any, model: KineticModel, estimate: Estimate, prepared: PreparedData,
                    common: dict[str, Any], method: str) -> None:
    """Write the interval half-width maps of one method (:data:`OUTPUTS` kinds ``ci68``, ``ci95``)."""
    for k, level in enumerate(estimate.interval_levels):
        item = _KINDS[INTERVAL_KINDS[level]]
        for j, param in enumerate(model.param_names):
            column = np.asarray(estimate.intervals[:, j, k], dtype=np.float64)
            emit(item, item.name.format(method=method, param=param),
                 prepared.unmask(column, fill=item.outside).astype(np.float32), {
                     "Units": _units(item, param),
                     "Description": _description(item, model.name, method, param),
                     **common,
                     "NominalCoverage": level,
                     "IntervalMethod": _interval_text(method),
                     "OutsideMask": "NaN",
                 }, method, param)


def _emit_flags(emit: Any, model: KineticModel, estimate: Estimate, prepared: PreparedData, common: dict[str, Any],
                method: str) -> None:
    """Write the prior-dominated bit mask of one method (:data:`OUTPUTS` kind ``flags``)."""
    item = _KINDS["flags"]
    bits = flag_bits(prior_dominated(model, estimate.params, estimate.stderr))
    grid = prepared.unmask(bits, fill=item.outside).astype(np.uint8)
    emit(item, item.name.format(method=method), grid, {
        "Units": item.units,
        "Description": _description(item, model.name, method),
        **common,
        "Bits": {str(1 << j): name for j, name in enumerate(model.param_names)},
        "Threshold": PRIOR_SHARE,
        "PriorStandardDeviation": dict(zip(model.param_names, prior_sd(model).tolist())),
        "OutsideMask": item.outside,
    }, method)


# --- reading ---------------------------------------------------------------------------------

_PROVENANCE_KEYS = ("format", "aslbatch_version", "versions", "source_name", "settings_digest", "input_digest",
                    "inputs", "outputs", "started", "finished", "status_counts")


def read_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """The provenance written by :func:`write_session_outputs`.

    FileNotFoundError if absent; ValueError if the file is not JSON, not an
    aslbatch provenance (``format``) or lacks a required field.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON provenance file: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != PROVENANCE_FORMAT:
        raise ValueError(f"{path}: not an aslbatch provenance file (format must be {PROVENANCE_FORMAT!r})")
    missing = [key for key in _PROVENANCE_KEYS if key not in data]
    if missing:
        raise ValueError(f"{path}: provenance lacks {missing}")
    return data
