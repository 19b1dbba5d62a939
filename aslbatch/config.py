"""The settings of ``aslbatch run``, from its command line and a TOML file, validated whole
before anything runs.

One pydantic schema (:class:`RunConfig`, strict) declares every key's type and range:
booleans are booleans (the string ``"false"`` is refused, never read as true), tables are
tables, lists are lists, numbers are finite numbers in their range. Beyond the types:

- each method's options are checked against the options its estimator declares (the keywords
  of its ``__init__`` with their annotated types, then the estimator's own
  :meth:`~aslbatch.estimators.base.Estimator.check_options` for values and ranges);
- network files are read (card and checksum) and must be networks of the method they are
  given for;
- the ``mask`` template may use ``{subject}`` and ``{session}`` only, and for every session of
  the dataset names an existing 3-D NIfTI;
- the output folder is never among the raw dataset's files (:func:`output_folder_problem`).

Every problem is collected and :class:`SettingsError` holds them, one line each, each naming
where the value came from (the option, or the config file and key).
"""

from __future__ import annotations

import inspect
import os
import string
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from .estimators import ESTIMATORS
from .models import MODELS
from .motion import EXCESSIVE_FD_MM, EXCESSIVE_FRACTION
from .preprocess import DEFAULT_GRID_POLICY, GRID_POLICIES
from .protocol import MAX_TIME_S, Constants, ProtocolError

__all__ = ["RunConfig", "SettingsError", "check_dataset_settings", "merge_run_settings", "method_option_problems", "network_file_problem",
           "output_folder_problem", "read_config", "validate_run_config"]

#: options an estimator takes from the data, never from the user
DATA_OPTIONS = {"slice_offsets": "set from each acquisition's slice timing"}
#: the placeholders a mask template may use
MASK_FIELDS = ("subject", "session")

MethodName = Literal[tuple(ESTIMATORS)]  # type: ignore[valid-type]
ModelChoice = Literal[("auto", *MODELS)]  # type: ignore[valid-type]


class SettingsError(ValueError):
    """Settings that cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class ConstantsTable(_Strict):
    """The ``[constants]`` table: overrides of :class:`~aslbatch.protocol.Constants` (s, mL/g)."""

    t1b: Optional[float] = Field(None, gt=0, le=MAX_TIME_S, description="T1 of arterial blood (s)")
    t1t: Optional[float] = Field(None, gt=0, le=MAX_TIME_S, description="T1 of tissue (s)")
    alpha: Optional[float] = Field(None, gt=0, le=1, description="labeling efficiency")
    alpha_bs: Optional[float] = Field(None, gt=0, le=1, description="background-suppression efficiency per pulse")
    lam: Optional[float] = Field(None, gt=0, description="blood-brain partition coefficient (mL/g)")
    t1_prime: Optional[Literal["blood", "tissue"]] = None


class RunConfig(_Strict):
    """Every setting of ``aslbatch run`` (TOML keys; the command line's options map onto them)."""

    methods: Optional[list[MethodName]] = Field(None, min_length=1)
    model: ModelChoice = "auto"
    participant_label: Optional[list[str]] = Field(None, min_length=1)
    constants: ConstantsTable = ConstantsTable()
    background_suppression_correction: bool = False
    arterial_edge_s: float = Field(0.0, ge=0, le=1, description="2C smoothed arterial window (s)")
    bolus_duration: Optional[float] = Field(None, gt=0, le=MAX_TIME_S, description="PASL bolus duration (s)")
    method_options: dict[MethodName, dict[str, Any]] = {}
    mask: Optional[str] = Field(None, min_length=1)
    networks: dict[MethodName, str] = {}
    cache_dir: Optional[str] = Field(None, min_length=1)
    report: bool = True
    on_grid_mismatch: Literal[GRID_POLICIES] = DEFAULT_GRID_POLICY  # type: ignore[valid-type]
    motion_correction: bool = True
    robust_averaging: bool = True
    motion_fd_threshold_mm: float = Field(EXCESSIVE_FD_MM, gt=0, le=100, description="excessive-motion FD threshold (mm)")
    motion_max_fraction: float = Field(EXCESSIVE_FRACTION, ge=0, le=1,
                                       description="excessive motion: the share of volumes above the FD threshold")

    def settings(self):
        """The :class:`~aslbatch.pipeline.Settings` of this config (its cross-checks raise
        ValueError); methods default to those of the given networks, else the Settings default."""
        from .pipeline import Settings

        return Settings(
            methods=tuple(self.methods or (sorted(self.networks) if self.networks else Settings.methods)),
            model=self.model,
            constants=self.constants.model_dump(exclude_none=True),
            background_suppression_correction=self.background_suppression_correction,
            arterial_edge_s=self.arterial_edge_s,
            bolus_duration=self.bolus_duration,
            method_options=self.method_options,
            mask=self.mask,
            networks=self.networks,
            cache_dir=self.cache_dir,
            report=self.report,
            on_grid_mismatch=self.on_grid_mismatch,
            motion_correction=self.motion_correction,
            robust_averaging=self.robust_averaging,
            motion_fd_threshold_mm=self.motion_fd_threshold_mm,
            motion_max_fraction=self.motion_max_fraction,
        )

    @field_validator("methods")
    @classmethod
    def _no_repeats(cls, methods: Optional[list[str]]) -> Optional[list[str]]:
        if methods is not None and len(set(methods)) != len(methods):
            raise ValueError(f"must not name a method twice, got {methods}")
        return methods

    @field_validator("mask")
    @classmethod
    def _mask_template(cls, template: Optional[str]) -> Optional[str]:
        if template is None:
            return None
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        except ValueError as exc:
            raise ValueError(f"must be a path template ({exc}; write literal braces as {{{{ and }}}}), got {template!r}")
        wrong = [name for name in fields if name not in MASK_FIELDS]
        if wrong:
            raise ValueError(f"must use only the placeholders {{subject}} and {{session}}, not "
                             f"{', '.join('{' + n + '}' for n in wrong)} (template {template!r})")
        return template


_TYPE_WORDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "a table", type(None): "nothing"}


def _describe(value: Any) -> str:
    """``value`` with its TOML type in words, for messages: ``a string ('false')``."""
    kind = _TYPE_WORDS.get(type(value), type(value).__name__)
    shown = repr(value)
    return f"{kind} ({shown[:60] + '...' if len(shown) > 60 else shown})"


def _message(error: Mapping[str, Any]) -> str:
    """One pydantic error in words."""
    kind, got = error["type"], error.get("input")
    expected = {"bool_type": "true or false", "float_type": "a number", "int_type": "an integer",
                "string_type": "a string", "list_type": "a list", "dict_type": "a table",
                "model_type": "a table",
                "is_instance_of": "a list"}.get(kind)  # the only instance checks: Sequence options
    if expected is not None:
        return f"must be {expected}, got {_describe(got)}"
    if kind == "finite_number":
        return f"must be a finite number, got {got!r}"
    if kind == "extra_forbidden":
        return "unknown setting"
    if kind == "literal_error":
        return f"must be one of {error['ctx']['expected']}, got {_describe(got)}"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(error["ctx"].values()))
        return f"must be {bounds[kind]} {limit:g}, got {got!r}"
    if kind == "too_short":
        return f"must not be empty, got {got!r}"
    message = error["msg"].removeprefix("Value error, ")
    return message if message.startswith("must") else f"is invalid: {message}"


def _key(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc)


def merge_run_settings(from_file: Mapping[str, Any], config_name: str | None,
                       options: Mapping[str, tuple[Any, str]], constants: Mapping[str, tuple[Any, str]],
                       network_files: Sequence[str]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """The settings of a run as :class:`RunConfig` keys: the config file's (``from_file``, read
    from ``config_name``), overridden by the command line's ``options`` and ``constants``
    (``{key: (value or None, option name)}``) and ``network_files`` (each under the method its
    card names). Returns the values, where each key came from (for messages) and the problems
    of reading the network files."""
    from .estimators.store import read_card

    values = dict(from_file)
    origin: dict[str, str] = {}
    for key, value in from_file.items():
        origin[key] = f"{config_name}: {key}"
        for sub in value if isinstance(value, dict) else ():
            origin[f"{key}.{sub}"] = f"{config_name}: {key}.{sub}"
    problems = []
    networks = values.get("networks", {})
    networks = dict(networks) if isinstance(networks, dict) else None  # else: a type error, reported later
    for path in network_files:
        try:
            method = read_card(path)["method"]
        except ValueError as exc:
            problems.append(f"--network: {exc}")
            continue
        if networks is not None:
            networks[method] = path
        origin[f"networks.{method}"] = f"--network {path}"
    if networks is not None and (networks or "networks" in values):
        values["networks"] = networks
    for key, (value, option) in options.items():
        if value is not None:
            values[key], origin[key] = value, option
    if isinstance(values.get("constants", {}), dict):
        table = dict(values.get("constants", {}))
        for name, (value, option) in constants.items():
            if value is not None:
                table[name], origin[f"constants.{name}"] = value, f"{option} (constant {name})"
        if table or "constants" in values:
            values["constants"] = table
    return values, origin, problems


def validate_run_config(values: Mapping[str, Any], origin: Mapping[str, str]) -> tuple[RunConfig | None, list[str]]:
    """``values`` (TOML keys, command-line values merged in) checked against :class:`RunConfig`,
    each method's declared options and each network file; ``origin`` names where each key came
    from (``--t1-blood``, ``settings.toml: constants.t1b``). Returns the config (None if a type
    is wrong) and every problem found, one line each."""
    problems = []
    config = None
    try:
        config = RunConfig.model_validate(dict(values))
    except ValidationError as exc:
        for error in exc.errors():
            key = _key(error["loc"])
            where = origin.get(key) or origin.get(key.split(".")[0], key)
            if error["type"] == "extra_forbidden" and "." not in key:
                problems.append(f"{where}: unknown setting; known: {sorted(RunConfig.model_fields)}")
            elif error["type"] == "extra_forbidden" and key.startswith("constants."):
                problems.append(f"{where}: unknown constant; known: {sorted(ConstantsTable.model_fields)}")
            else:
                problems.append(f"{where} {_message(error)}")  # "settings.toml: report must be true or false..."
    model = values.get("model") if isinstance(values.get("model"), str) and values["model"] in MODELS else "auto"
    method_options = values.get("method_options")
    for method, options in (method_options.items() if isinstance(method_options, dict) else ()):
        if method in ESTIMATORS and isinstance(options, dict):
            where = origin.get(f"method_options.{method}", f"method_options.{method}")
            problems += [f"{where}: {p}" for p in method_option_problems(method, options, model)]
    networks = values.get("networks")
    for method, path in (networks.items() if isinstance(networks, dict) else ()):
        if method in ESTIMATORS and isinstance(path, str):
            why = network_file_problem(method, path)
            if why is not None:
                problems.append(f"{origin.get(f'networks.{method}', f'networks.{method}')}: {why}")
    if config is not None:
        try:
            Constants(**config.constants.model_dump(exclude_none=True))  # the constants' own cross-checks
        except ProtocolError as exc:
            problems.append(f"{origin.get('constants', 'constants')}: {exc}")
    return (config if not problems else None), problems


def network_file_problem(method: str, path: str | os.PathLike) -> str | None:
    """Why the file ``path`` cannot serve as the network of ``method`` (None: it can): unreadable,
    damaged, not a network, or a network of another method."""
    from .estimators.store import read_card

    if not ESTIMATORS[method].trains:
        return f"{method} does not use a trained network"
    try:
        card = read_card(path)
    except ValueError as exc:
        return str(exc)
    if card.get("method") != method:
        return f"{path} is a network of method {card.get('method')}, not {method} (aslbatch train --method {method})"
    return None


def method_option_problems(method: str, options: Mapping[str, Any], model: str = "auto") -> list[str]:
    """What is wrong with ``options`` for ``method``, one line per option: keys its estimator does
    not declare, values of the wrong type (its ``__init__`` annotations, strictly) and values its
    :meth:`~aslbatch.estimators.base.Estimator.check_options` refuses (each option alone, then
    together), on the default protocol of ``model`` (with ``"auto"``: of every model the method serves)."""
    from .estimators import get_estimator
    from .models import get_model
    from .protocol import default_protocol

    cls = ESTIMATORS[method]
    hints = typing.get_type_hints(cls.__init__)
    declared = {name: param.default for name, param in inspect.signature(cls.__init__).parameters.items()
                if name not in ("self", "model") and param.kind is not inspect.Parameter.VAR_KEYWORD}
    problems = []
    for name in options:
        if name in DATA_OPTIONS:
            problems.append(f"{name}: cannot be given ({DATA_OPTIONS[name]})")
        elif name not in declared:
            known = sorted(set(declared) - set(DATA_OPTIONS))
            problems.append(f"{name}: not an option of {method}; its options: {known or 'none'}")
    schema = create_model(f"{method}_options", __config__=ConfigDict(strict=True, extra="ignore",
                                                                     allow_inf_nan=False),
                          **{name: (hints.get(name, Any), default) for name, default in declared.items()})
    mistyped = {name for name in options if name in DATA_OPTIONS or name not in declared}
    try:
        schema.model_validate(dict(options))
    except ValidationError as exc:
        problems += [f"{_key(e['loc'])} {_message(e)}" for e in exc.errors()]
        mistyped |= {e["loc"][0] for e in exc.errors()}
    served = [name for name in MODELS if cls.serves(MODELS[name])]
    kinetics = [get_model(name, default_protocol(name)) for name in ([model] if model in served else served)]
    found: dict[str, None] = {}  # each message once, in order, whichever models it applies to
    for given in [{name: value} for name, value in options.items() if name not in mistyped]:  # one line each
        for kinetic in kinetics:
            try:
                get_estimator(method, kinetic, **given).check_options()
            except (ValueError, TypeError) as exc:
                found[str(exc)] = None
    if not problems and not found:  # then together, for the options that constrain each other
        for kinetic in kinetics:
            try:
                get_estimator(method, kinetic, **options).check_options()
            except (ValueError, TypeError) as exc:
                found[f"{exc} (for the {kinetic.name} model)"] = None
    return problems + list(found)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The TOML file at ``path`` as a dict; SettingsError if it cannot be read or parsed."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise SettingsError([f"{path}: cannot read config ({exc.strerror or exc})"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError([f"{path}: not valid TOML ({exc})"]) from None


def output_folder_problem(bids_dir: str | os.PathLike, out_dir: str | os.PathLike) -> str | None:
    """Why ``out_dir`` cannot hold a run's outputs for the raw dataset ``bids_dir`` (None: it can).

    Refused: the dataset itself, any folder inside it other than below ``derivatives/``, and a
    folder that contains the dataset (a run tidies temporaries below its output folder).
    Both paths are compared with symbolic links resolved."""
    raw, out = Path(os.path.realpath(bids_dir)), Path(os.path.realpath(out_dir))
    if out == raw:
        return f"output folder {out_dir} is the raw dataset itself; give another folder " \
               f"(default: {Path(bids_dir) / 'derivatives' / 'aslbatch'})"
    if raw in out.parents:
        relative = out.relative_to(raw)
        if relative.parts[0] != "derivatives" or len(relative.parts) < 2:
            return (f"output folder {out_dir} is inside the raw dataset {bids_dir}; outputs may go only below "
                    f"its derivatives/ folder (e.g. {Path(bids_dir) / 'derivatives' / 'aslbatch'}) or outside it")
    elif out in raw.parents:
        return f"output folder {out_dir} contains the raw dataset {bids_dir}; give a folder beside or below derivatives/"
    return None


def _mask_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable mask file (None: an existing 3-D NIfTI, or 4-D with one volume)."""
    import nibabel as nib

    if not path.is_file():
        return "no such file"
    try:
        shape = nib.load(path).shape  # the header only
    except Exception as exc:  # nibabel raises many kinds for a damaged header
        return f"not a readable NIfTI image ({type(exc).__name__}: {exc})"
    if len(shape) == 3 or (len(shape) == 4 and shape[3] == 1):
        return None
    return f"a mask must be a 3-D image, this one has shape {tuple(shape)}"


def check_dataset_settings(settings, sessions: Sequence[Any], origin: Mapping[str, str]) -> list[str]:
    """Problems of ``settings`` (:class:`~aslbatch.pipeline.Settings`) against the dataset's
    ``sessions``: the mask file of every session exists and is a 3-D NIfTI."""
    problems = []
    if settings.mask is not None:
        where = origin.get("mask", "mask")
        users: dict[Path, list[str]] = {}  # each file once, with the sessions that would read it
        for session in sessions:
            users.setdefault(settings.mask_path(session.subject, session.session), []).append(session.name)
        for path, names in users.items():
            why = _mask_problem(path)
            if why is not None:
                problems.append(f"{where}: {path} (for {', '.join(names)}): {why}")
    return problems

