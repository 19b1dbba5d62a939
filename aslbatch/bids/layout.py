"""BIDS ASL layout: finding the series of a dataset and the files that go with them.

A BIDS dataset holds ASL series as ``sub-<label>[/ses-<label>]/perf/*_asl.nii[.gz]``
with JSON sidecar metadata (merged by the BIDS inheritance principle), an
``_aslcontext.tsv`` naming every volume's type, and an M0 image when the sidecar's
``M0Type`` is Separate (in ``perf/``, or in ``fmap/`` when it is one of a pepolar pair). This module finds the sessions and series
(:func:`find_sessions`), reads their sidecars, aslcontext and NIfTI headers
(:func:`read_series`; no image data), finds separate M0 scans and pairs a non-crushed
series with its crushed twin (:func:`pair_series`). Reading problems are kept in
``AslSeries.problems``; the metadata checks are :mod:`aslbatch.bids.validation`'s.

Symlinked subject or session folders are followed: a file belongs to the dataset when its
path, as found (not resolved), lies inside the dataset folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib

from .metadata import VOLUME_TYPES, BidsError, Sidecar, _error, _short, intended_for, m0_type, vascular_crushing

log = logging.getLogger("aslbatch.bids")

__all__ = [
    "Acquisition",
    "AslSeries",
    "M0Scan",
    "NIFTI_EXTENSIONS",
    "Session",
    "find_sessions",
    "pair_series",
    "parse_filename",
    "read_aslcontext",
    "read_nifti_shape",
    "read_series",
]

NIFTI_EXTENSIONS = (".nii.gz", ".nii")


# --- files --------------------------------------------------------------------------------


def parse_filename(name: str) -> tuple[dict[str, str], str, str]:
    """Entities (in file-name order), suffix and extension of a BIDS file name.

    ``sub-01_ses-1_acq-dante_asl.nii.gz`` gives ``({"sub": "01", "ses": "1",
    "acq": "dante"}, "asl", ".nii.gz")``. Raises BidsError for a part that is
    not ``key-label`` with alphanumeric key and label, or a repeated key.
    """
    stem, dot, extension = name.partition(".")
    *parts, suffix = stem.split("_")
    entities: dict[str, str] = {}
    for part in parts:
        key, dash, label = part.partition("-")
        if not (dash and key.isalnum() and label.isalnum()):
            raise BidsError(f"file name part {part!r} is not an entity key-label pair", path=name, field="file name")
        if key in entities:
            raise BidsError(f"file name repeats the entity {key!r}", path=name, field="file name")
        entities[key] = label
    return entities, suffix, dot + extension


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _applicable(data_path: Path, root: Path, entities: Mapping[str, str], suffix: str, extension: str) -> list[Path]:
    """Files with ``suffix`` + ``extension`` that apply to a data file by the inheritance principle.

    A file applies when it sits in the data file's folder or a parent up to the
    dataset root and its entities are a subset of the data file's. Ordered least
    specific first: by folder depth, then by number of entities.
    """
    folders = [root]
    for part in data_path.parent.relative_to(root).parts:
        folders.append(folders[-1] / part)
    found: list[Path] = []
    for folder in folders:
        level = []
        for candidate in folder.glob(f"*{suffix}{extension}"):
            try:
                keys, cand_suffix, cand_extension = parse_filename(candidate.name)
            except BidsError:
                continue
            if (cand_suffix, cand_extension) != (suffix, extension) or not candidate.is_file():
                continue
            if all(entities.get(key) == label for key, label in keys.items()):
                level.append((len(keys), candidate.name, candidate))
        found.extend(path for *_, path in sorted(level))
    return found


def _load_json(path: Path, root: Path, cache: dict[Path, Any]) -> dict[str, Any]:
    if path not in cache:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise BidsError(f"must hold a JSON object, got {type(data).__name__}", path=_rel(path, root), field="JSON")
            cache[path] = data
        except (OSError, ValueError) as exc:  # ValueError: undecodable bytes, bad JSON, an integer too long
            cache[path] = BidsError(f"cannot read JSON: {exc}", path=_rel(path, root), field="JSON")
        except RecursionError:
            cache[path] = BidsError("cannot read JSON: nested deeper than the parser allows", path=_rel(path, root),
                                    field="JSON")
        except BidsError as exc:
            cache[path] = exc
    if isinstance(cache[path], BidsError):
        raise cache[path]
    return cache[path]


def _read_sidecar(
    data_path: Path, root: Path, entities: Mapping[str, str], suffix: str, cache: dict[Path, Any]
) -> tuple[Sidecar, list[BidsError]]:
    """Merged sidecar metadata of a data file (most specific JSON wins) and the JSON problems met."""
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    problems: list[BidsError] = []
    for path in _applicable(data_path, root, entities, suffix, ".json"):
        try:
            fields = _load_json(path, root, cache)
        except BidsError as exc:
            problems.append(exc)
            continue
        data.update(fields)
        sources.update(dict.fromkeys(fields, _rel(path, root)))
    own = data_path.parent / (_strip_extension(data_path.name) + ".json")
    default = _rel(own if own.is_file() else data_path, root)
    return Sidecar(data, sources, default, _rel(data_path, root)), problems


def _strip_extension(name: str) -> str:
    return name.partition(".")[0]


def read_aslcontext(path: Path, display: str | None = None) -> tuple[str, ...]:
    """The ``volume_type`` column of an ``_aslcontext.tsv``: one volume type per volume.

    ``display`` is the name used in errors (default: the path). Raises BidsError
    for an unreadable file, a missing column, or values outside :data:`VOLUME_TYPES`.
    """
    display = display or str(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BidsError(f"cannot read aslcontext: {exc}", path=display, field="volume_type") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    header = [cell.strip() for cell in lines[0].split("\t")] if lines else []
    if "volume_type" not in header:
        raise BidsError(
            f"volume_type column is missing (header: {_short(header)}); aslcontext.tsv needs a "
            "tab-separated header with a volume_type column",
            path=display, field="volume_type",
        )
    column = header.index("volume_type")
    types, bad = [], []
    for number, line in enumerate(lines[1:], start=2):
        cells = line.split("\t")
        value = cells[column].strip() if column < len(cells) else ""
        if value not in VOLUME_TYPES:
            bad.append(f"{value!r} (line {number})")
        types.append(value)
    if bad:
        raise BidsError(
            f"volume_type has invalid value(s) {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
            f"allowed: {', '.join(VOLUME_TYPES)}",
            path=display, field="volume_type",
        )
    return tuple(types)


def read_nifti_shape(path: Path, display: str | None = None) -> tuple[tuple[int, int, int], int]:
    """Spatial shape (3 ints) and number of volumes from a NIfTI header; the data is not read.

    A 3D image has 1 volume. ``display`` is the name used in errors.
    """
    display = display or str(path)
    try:
        shape = tuple(int(n) for n in nib.load(str(path)).header.get_data_shape())
    except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError) as exc:
        raise BidsError(f"cannot read the NIfTI header: {exc}", path=display, field="NIfTI header") from exc
    if len(shape) < 3 or any(n != 1 for n in shape[4:]):
        raise BidsError(
            f"image has shape {shape}: expected 3 spatial dimensions and volumes along the 4th",
            path=display, field="NIfTI header",
        )
    return shape[:3], (shape[3] if len(shape) > 3 else 1)


# --- discovery ----------------------------------------------------------------------------


@dataclass(frozen=True)
class M0Scan:
    """A separate M0 image (``_m0scan.nii[.gz]``) and its merged sidecar metadata."""

    path: Path
    relpath: str
    entities: dict[str, str]
    metadata: Sidecar
    shape: tuple[int, int, int] | None
    n_volumes: int | None


@dataclass(frozen=True)
class AslSeries:
    """One ASL series (``_asl.nii[.gz]``) as found on disk; no image data is loaded.

    Attributes
    ----------
    path : the NIfTI file (absolute).
    bids_dir : the dataset root (absolute).
    relpath : its path relative to the dataset root (POSIX), used in messages.
    entities : entities parsed from the file name, in file-name order.
    metadata : merged sidecar metadata (:class:`Sidecar`, inheritance principle).
    aslcontext : the applicable ``_aslcontext.tsv`` (None if none was found).
    volume_types : its ``volume_type`` column, one entry per volume (empty if unreadable).
    shape : spatial shape from the header (None if unreadable).
    n_volumes : number of volumes from the header (None if unreadable).
    m0scan : the separate M0 image when M0Type is Separate (None otherwise or if not found).
    problems : input problems met while reading (files missing or unreadable).
    """

    path: Path
    bids_dir: Path
    relpath: str
    entities: dict[str, str]
    metadata: Sidecar
    aslcontext: Path | None
    volume_types: tuple[str, ...]
    shape: tuple[int, int, int] | None
    n_volumes: int | None
    m0scan: M0Scan | None
    problems: tuple[BidsError, ...] = ()

    @property
    def name(self) -> str:
        """The file name without ``_asl.nii[.gz]``: the source name of a series processed alone."""
        stem = _strip_extension(self.path.name)
        return stem[: -len("_asl")] if stem.endswith("_asl") else stem

    @property
    def subject(self) -> str:
        """Subject label (without ``sub-``)."""
        return Path(self.relpath).parts[0][len("sub-"):]

    @property
    def session(self) -> str | None:
        """Session label (without ``ses-``), or None."""
        folder = Path(self.relpath).parts[1]
        return folder[len("ses-"):] if folder.startswith("ses-") else None


@dataclass(frozen=True)
class Session:
    """The ASL series of one subject and session (``session`` None when the dataset has none)."""

    subject: str
    session: str | None
    series: tuple[AslSeries, ...]

    @property
    def name(self) -> str:
        """``sub-<subject>[_ses-<session>]``."""
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session is not None else "")


def _same_phase_encoding(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    direction = a.get("PhaseEncodingDirection")
    return direction is not None and direction == b.get("PhaseEncodingDirection")


def _m0scans_naming(
    folder: Path, root: Path, relpath: str, subject: str, entities: Mapping[str, str] | None, cache: dict[Path, Any]
) -> tuple[tuple[M0Scan, list[BidsError]] | None, list[tuple[M0Scan, list[BidsError]]], list[BidsError]]:
    """The ``_m0scan`` files of ``folder``: the one with exactly ``entities`` (None: no such
    match is looked for), those whose IntendedFor names the series ``relpath``, and the
    problems of the others."""
    candidates = sorted(
        path for extension in NIFTI_EXTENSIONS for path in folder.glob(f"*_m0scan{extension}") if path.is_file()
    )
    problems: list[BidsError] = []
    named: list[tuple[M0Scan, list[BidsError]]] = []
    for path in candidates:
        try:
            m0_entities, _, _ = parse_filename(path.name)
        except BidsError:
            continue
        m0_meta, m0_problems = _read_sidecar(path, root, m0_entities, "m0scan", cache)
        m0 = M0Scan(path, _rel(path, root), m0_entities, m0_meta, None, None)
        if entities is not None and m0_entities == dict(entities):
            return (m0, m0_problems), [], problems
        try:
            targets = intended_for(m0_meta, subject)
        except BidsError as exc:
            m0_problems.append(exc)
            targets = []
        if relpath in targets:
            named.append((m0, m0_problems))
        problems.extend(m0_problems)
    return None, named, problems


def _find_m0scan(
    asl_path: Path, root: Path, entities: Mapping[str, str], meta: Sidecar, cache: dict[Path, Any]
) -> tuple[M0Scan | None, list[BidsError]]:
    """The M0 image for a series: the ``_m0scan`` with the same entities in the same folder,
    else the one there whose IntendedFor names the series (ranked by shared entities, then by
    PhaseEncodingDirection equal to the series'), else one in the ``fmap/`` folder beside it
    whose IntendedFor names the series (BIDS stores an M0 there when it is one of a pepolar
    pair; ranked by PhaseEncodingDirection equal to the series' first: the image distorted as
    the series is, then by shared entities). Returns it (or None) and the problems met."""
    relpath = _rel(asl_path, root)
    subject = Path(relpath).parts[0][len("sub-"):]
    exact, named, problems = _m0scans_naming(asl_path.parent, root, relpath, subject, entities, cache)

    in_fmap = exact is None and not named
    if in_fmap:
        _, named, fmap_problems = _m0scans_naming(asl_path.parent.parent / "fmap", root, relpath, subject, None, cache)
        problems.extend(fmap_problems)

    def rank(item: tuple[M0Scan, list[BidsError]]) -> tuple[int, int]:
        m0 = item[0]
        shared = sum(entities.get(key) == label for key, label in m0.entities.items())
        same = int(_same_phase_encoding(m0.metadata, meta))
        return (same, shared) if in_fmap else (shared, same)

    if exact is None and named:
        named.sort(key=rank, reverse=True)
        if len(named) > 1 and rank(named[0]) == rank(named[1]):
            names = ", ".join(m0.relpath for m0, _ in named)
            return None, [BidsError(
                f"IntendedFor of several m0scan files names this series ({names}) and nothing tells "
                "which is its M0; name it in only one of them",
                path=relpath, field="IntendedFor",
            )]
        exact = named[0]
    if exact is None:
        return None, problems
    m0, m0_problems = exact
    shape = n_volumes = None
    try:
        shape, n_volumes = read_nifti_shape(m0.path, m0.relpath)
    except BidsError as exc:
        m0_problems = [*m0_problems, exc]
    return M0Scan(m0.path, m0.relpath, m0.entities, m0.metadata, shape, n_volumes), m0_problems


def read_series(bids_dir: str | Path, path: str | Path, *, cache: dict[Path, Any] | None = None) -> AslSeries:
    """Read one ASL series: entities, merged sidecar, aslcontext, header shape and M0 scan.

    Never raises for input problems: they are kept in ``AslSeries.problems``
    (:func:`validate_series` adds the metadata checks). ``cache`` shares parsed
    JSON files between calls.
    """
    # absolute but not resolved: a subject folder may be a symlink (followed for reading);
    # membership of the dataset is judged on the path as found in it
    root = Path(os.path.abspath(bids_dir))
    path = Path(os.path.abspath(path))
    cache = {} if cache is None else cache
    if not path.is_relative_to(root):
        raise BidsError(f"{path} is not inside the dataset {root}", field="path")
    relpath = _rel(path, root)
    problems: list[BidsError] = []
    try:
        entities, _, _ = parse_filename(path.name)
    except BidsError as exc:
        problems.append(BidsError(exc.message, path=relpath, field=exc.field))
        entities = {}
    folders = Path(relpath).parts[:-2]
    for folder in folders:
        key, _, label = folder.partition("-")
        if entities and entities.get(key) != label:
            problems.append(BidsError(
                f"the {key} entity ({entities.get(key)!r}) does not match the folder {folder}",
                path=relpath, field="file name",
            ))

    metadata, json_problems = _read_sidecar(path, root, entities, "asl", cache)
    problems.extend(json_problems)

    context_files = _applicable(path, root, entities, "aslcontext", ".tsv")
    aslcontext = context_files[-1] if context_files else None
    volume_types: tuple[str, ...] = ()
    if aslcontext is None:
        expected = _rel(path.parent / (_strip_extension(path.name)[: -len("asl")] + "aslcontext.tsv"), root)
        problems.append(BidsError(
            f"no aslcontext.tsv applies to this series (expected {expected}): the volume types are unknown",
            path=relpath, field="aslcontext",
        ))
    else:
        try:
            volume_types = read_aslcontext(aslcontext, _rel(aslcontext, root))
        except BidsError as exc:
            problems.append(exc)

    shape = n_volumes = None
    try:
        shape, n_volumes = read_nifti_shape(path, relpath)
    except BidsError as exc:
        problems.append(exc)

    m0scan = None
    try:
        separate = m0_type(metadata) == "Separate"
    except BidsError:
        separate = False  # validate_series reports the M0Type problem
    if separate:
        m0scan, m0_problems = _find_m0scan(path, root, entities, metadata, cache)
        problems.extend(m0_problems)
        if m0scan is None and not any(p.field == "IntendedFor" and p.path == relpath for p in m0_problems):
            expected = _rel(path.parent / (_strip_extension(path.name)[: -len("asl")] + "m0scan.nii.gz"), root)
            problems.append(_error(
                metadata, "M0Type",
                f"M0Type is Separate but no m0scan was found for {relpath}: expected {expected} "
                "or an m0scan (in perf/, or fmap/ for a pepolar pair) whose IntendedFor names the series",
            ))
    return AslSeries(
        path, root, relpath, entities, metadata, aslcontext, volume_types, shape, n_volumes, m0scan, tuple(problems)
    )


def _asl_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        path for path in folder.iterdir()
        if not path.name.startswith(".") and path.name.endswith(tuple("_asl" + ext for ext in NIFTI_EXTENSIONS))
    )


def find_sessions(bids_dir: str | Path, participant_labels: Sequence[str] | None = None) -> list[Session]:
    """Every subject/session with ASL series, sorted by subject then session.

    Finds ``sub-<label>[/ses-<label>]/perf/*_asl.nii[.gz]``; series are sorted by
    file name. ``participant_labels`` (with or without ``sub-``) restricts the
    subjects; a label not in the dataset raises BidsError. Input problems of a
    series do not raise: they are in ``AslSeries.problems``.
    """
    root = Path(os.path.abspath(bids_dir))
    if not root.is_dir():
        raise BidsError(f"BIDS dataset folder {bids_dir} does not exist", field="bids_dir")
    subjects = sorted(path for path in root.glob("sub-*") if path.is_dir())
    if participant_labels is not None:
        wanted = [label[len("sub-"):] if label.startswith("sub-") else label for label in participant_labels]
        present = {path.name[len("sub-"):] for path in subjects}
        missing = [label for label in wanted if label not in present]
        if missing:
            raise BidsError(f"participant label(s) {missing} not found in {bids_dir}", field="participant_label")
        subjects = [path for path in subjects if path.name[len("sub-"):] in wanted]
    cache: dict[Path, Any] = {}
    sessions = []
    for subject_dir in subjects:
        folders = [(None, subject_dir / "perf")] + [
            (path.name[len("ses-"):], path / "perf") for path in sorted(subject_dir.glob("ses-*")) if path.is_dir()
        ]
        for session, folder in folders:
            files = _asl_files(folder)
            if files:
                series = tuple(_read_isolated(root, path, cache) for path in files)
                sessions.append(Session(subject_dir.name[len("sub-"):], session, series))
    return sessions


def _read_isolated(root: Path, path: Path, cache: dict[Path, Any]) -> AslSeries:
    """:func:`read_series`, with any unexpected failure of a reader kept as the series' problem
    (discovery must never stop the run: the series' session fails with it, the others go on)."""
    try:
        return read_series(root, path, cache=cache)
    except Exception as exc:  # isolation: a file no reader foresaw fails its own series only
        log.error("%s could not be read", path, exc_info=True)
        relpath = _rel(path, root)
        return AslSeries(path, root, relpath, {}, Sidecar(data_file=relpath), None, (), None, None, None,
                         (BidsError(f"cannot be read: {type(exc).__name__}: {exc}", path=relpath, field="file"),))


# --- grouping -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Acquisition:
    """Series fitted together with one model (see :func:`aslbatch.identify.group_acquisitions`).

    ``series``: one series or a non-crushed + crushed pair, in that order; ``model``:
    the kinetic model chosen for them (:func:`aslbatch.identify.choose_model`);
    ``source_name``: the base of output names (a series' file name without
    ``_asl.nii[.gz]``; for a pair, the entities both share).
    """

    series: tuple[AslSeries, ...]
    model: str
    source_name: str

    @property
    def subject(self) -> str:
        return self.series[0].subject

    @property
    def session(self) -> str | None:
        return self.series[0].session


def pair_series(
    series: Sequence[AslSeries],
) -> tuple[list[tuple[AslSeries, AslSeries]], list[tuple[AslSeries, BidsError | None]]]:
    """The series that belong together: pairs (non-crushed, crushed) that differ only in acq and
    VascularCrushing and share the spatial shape; and the other series, each with the reason it
    has no pair (a BidsError naming it; None when its VascularCrushing is unreadable)."""
    groups: dict[Any, list[AslSeries]] = {}
    for item in series:
        key = (tuple((k, v) for k, v in item.entities.items() if k != "acq"), item.shape)
        groups.setdefault(key, []).append(item)
    pairs, alone = [], []
    for members in groups.values():
        try:
            flags = [vascular_crushing(item.metadata) for item in members]
        except BidsError:
            alone.extend((item, None) for item in members)
            continue
        if len(members) == 2 and sorted(flags) == [False, True] and members[0].shape is not None:
            plain, crushed = (members[0], members[1]) if not flags[0] else (members[1], members[0])
            pairs.append((plain, crushed))
            continue
        for item in members:
            if len(members) == 1:
                why = ("no other series of the session differs from it only in acq and VascularCrushing "
                       "with the same image shape")
            elif len(members) == 2:
                why = f"both it and {[m for m in members if m is not item][0].relpath} have VascularCrushing {flags[0]}"
            else:
                names = ", ".join(m.name for m in members)
                why = f"{len(members)} series differ only in acq ({names}): the pair is ambiguous"
            alone.append((item, BidsError(
                f"model 2c needs a non-crushed + crushed pair of series: {why}", path=item.relpath, field="VascularCrushing"
            )))
    return pairs, alone

