"""Trained networks on disk: plain arrays plus a JSON card, and the per-user cache.

File format (``.npz`` written by ``numpy.savez``, read with ``allow_pickle=False``):

- the network's arrays (``weight_<k>``, ``bias_<k>``, ``in_shift``, ``in_scale``,
  ``out_shift``, ``out_scale``; float64);
- its variance networks' arrays (the same names prefixed ``se_`` and ``sesnr_``;
  :mod:`.variance`), which give the standard errors; the card's ``uncertainty`` describes
  them (null: none);
- ``card``: JSON text: format, method, model (name, protocol, constants, options),
  parameters with units, training ranges, the estimator's options (architecture, loss,
  SNR range, noise model, sample count, seed, slice offsets), training history and
  validation metrics, output transform, versions (aslbatch, numpy, scikit-learn, numba,
  python), creation time, and ``arrays_sha256`` (the arrays alone);
- ``checksum``: sha256 over the arrays and the card text together.

Loading verifies the checksum before anything is used, rebuilds the registered
estimator class named in the card from its JSON options and the arrays (no pickle, no
code from the file is executed) and, given the model of the data, refuses a network
trained for another model, protocol or constants.

Format ``aslbatch.network/2`` (training version 3) added the variance networks; training version 4
added their interval half-widths (``se_levels`` and ``sesnr_levels``: the nominal coverages; files
without them give standard errors only). Files of
format ``aslbatch.network/1`` are still read: their estimates have no standard errors
(a warning says so; retrain for them). The cache key holds the training version, so a
cached network of older code is trained again.

:class:`NetworkCache` keeps one file per (method, model, protocol, constants, training
options) in a per-user folder, trains on a miss, and serialises concurrent trainings of
the same network with a file lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sys
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .._version import versions
from ..atomic import atomic_path
from ..derivatives import sha256_file as file_sha256
from ..models import KineticModel, get_model
from ..protocol import Constants, Protocol, ProtocolError
from .network import Network
from .neural import NeuralEstimator
from .variance import ARRAY_PREFIXES, Uncertainty

__all__ = [
    "CACHE_ENV", "FORMAT", "NetworkCache", "NetworkFileError", "NetworkMismatch", "default_cache_dir",
    "file_sha256", "load_network", "read_card", "save_network",
]

FORMAT = "aslbatch.network/2"
#: formats this aslbatch reads (the first has no variance network)
READABLE_FORMATS = ("aslbatch.network/1", FORMAT)
#: environment variable overriding the cache folder
CACHE_ENV = "ASLBATCH_CACHE_DIR"
#: bump when training changes so that cached networks of older code are not reused
TRAINING_VERSION = 4
#: the first bytes of a zip archive (an .npz file)
ZIP_MAGIC = b"PK\x03\x04"
#: protocol times (s) and constants closer than this are the same
MATCH_TOLERANCE = 1e-6
log = logging.getLogger("aslbatch.networks")


class NetworkFileError(ValueError):
    """A network file that cannot be used: unreadable, altered, or not an aslbatch network."""


class NetworkMismatch(ValueError):
    """A valid network trained for another model, protocol or constants than the data."""


def _arrays_digest(arrays: dict[str, np.ndarray]) -> "hashlib._Hash":
    digest = hashlib.sha256()
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return digest


def _checksum(arrays: dict[str, np.ndarray], card_text: str) -> str:
    digest = _arrays_digest(arrays)
    digest.update(card_text.encode())
    return digest.hexdigest()


def save_network(estimator: NeuralEstimator, path: str | os.PathLike) -> str:
    """Write ``estimator``'s trained network atomically to ``path`` (.npz); returns the file's sha256."""
    if estimator.network_ is None:
        raise ValueError(f"{estimator.name} estimator has no trained network to save")
    model = estimator.model
    arrays = estimator.network_.to_arrays()
    uncertainty = estimator.uncertainty_
    if uncertainty is not None:
        arrays.update(uncertainty.to_arrays())
    lower, upper = model.bounds
    card = {
        "format": FORMAT,
        "method": estimator.name,
        "model": model.to_dict(),
        "parameters": [{"name": n, "unit": u, "bounds": [float(lo), float(hi)]}
                       for n, u, lo, hi in zip(model.param_names, model.param_units, lower, upper)],
        "training_ranges": {k: list(v) for k, v in model.training_ranges.items()},
        "ordered_times": [[a, b, list(gap)] for a, b, gap in model.ordered_times],
        "options": estimator.options(),
        "training": estimator.training_,
        "output_transform": estimator.network_.output_transform,
        "uncertainty": None if uncertainty is None else {
            "method": "variance networks", "description": estimator.stderr_method,
            "hidden_layers": list(uncertainty.marginal.hidden_layers), "array_prefixes": list(ARRAY_PREFIXES),
            "interval_levels": list(uncertainty.levels)},
        "training_version": TRAINING_VERSION,
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "arrays_sha256": _arrays_digest(arrays).hexdigest(),
    }
    card_text = json.dumps(card, indent=1, sort_keys=True, allow_nan=False)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, card=np.array(card_text), checksum=np.array(_checksum(arrays, card_text)), **arrays)
    return file_sha256(path)


def _read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The verified card and arrays of a network file, or a NetworkFileError naming the file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except FileNotFoundError:
        raise NetworkFileError(f"{path}: no such network file") from None
    except OSError as exc:
        raise NetworkFileError(f"{path}: cannot read network file ({exc.strerror or exc})") from None
    if head[:len(ZIP_MAGIC)] != ZIP_MAGIC:  # np.load would take anything else for a pickle
        raise NetworkFileError(f"{path}: not an aslbatch network file: {_kind_of_file(path, head)}, not the .npz "
                               f"archive 'aslbatch train' writes")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise NetworkFileError(f"{path}: no such network file") from None
    except ValueError as exc:
        if "pickle" in str(exc):
            raise NetworkFileError(f"{path}: holds an array of Python objects (pickled), which aslbatch never "
                                   f"loads; not a network written by 'aslbatch train'") from None
        raise NetworkFileError(f"{path}: not a readable network file ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, UnicodeError) as exc:
        raise NetworkFileError(f"{path}: not a readable network file ({type(exc).__name__}: {exc})") from None
    card_arr, checksum = arrays.pop("card", None), arrays.pop("checksum", None)
    if card_arr is None or checksum is None or card_arr.dtype.kind != "U" or checksum.dtype.kind != "U":
        raise NetworkFileError(f"{path}: not an aslbatch network file (no card or checksum)")
    card_text = str(card_arr)
    if _checksum(arrays, card_text) != str(checksum):
        raise NetworkFileError(f"{path}: checksum mismatch: the file was altered or damaged after it was written; "
                               f"retrain it (aslbatch train) or restore the original")
    try:
        card = json.loads(card_text)
    except json.JSONDecodeError as exc:
        raise NetworkFileError(f"{path}: card is not valid JSON ({exc})") from None
    if not isinstance(card, dict) or card.get("format") not in READABLE_FORMATS:
        raise NetworkFileError(f"{path}: not an aslbatch network (format {card.get('format') if isinstance(card, dict) else None!r}, "
                               f"expected one of {list(READABLE_FORMATS)})")
    return card, arrays


def _kind_of_file(path: Path, head: bytes) -> str:
    """What a file that is not a zip archive looks like, from its first bytes (for messages)."""
    if not head:
        return "the file is empty"
    if head.startswith(b"\x93NUMPY"):
        return "a single numpy array (.npy)"
    if head[:1] == b"\x80":
        return "a Python pickle, which aslbatch never loads"
    with open(path, "rb") as fh:
        sample = fh.read(4096)
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError:
        return "a binary file of unknown kind"
    return "a text file"


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """The verified JSON card of a network file."""
    return _read(Path(path))[0]


def _differences(card_model: dict[str, Any], model: KineticModel) -> list[str]:
    """How the card's model differs from ``model``, in words (empty if they match)."""
    have = model.to_dict()
    if card_model.get("model") != have["model"]:
        return [f"model {card_model.get('model')} (data: {have['model']})"]
    problems = []
    trained, data = card_model.get("protocol", {}), have["protocol"]
    if len(trained.get("pld", [])) != len(data["pld"]):
        return [f"{len(trained.get('pld', []))} volumes with PLD {trained.get('pld')} s "
                f"(data: {len(data['pld'])} volumes with PLD {data['pld']} s)"]
    for key, unit in (("label_duration", " s"), ("pld", " s"), ("crushed", "")):
        a, b = np.asarray(trained.get(key, []), dtype=float), np.asarray(data[key], dtype=float)
        if a.shape != b.shape or not np.allclose(a, b, rtol=0.0, atol=MATCH_TOLERANCE):
            problems.append(f"{key} {trained.get(key)}{unit} (data: {data[key]}{unit})")
    for key, value in have["constants"].items():
        other = card_model.get("constants", {}).get(key)
        same = (other == value) if isinstance(value, str) else (
            isinstance(other, (int, float)) and abs(other - value) <= MATCH_TOLERANCE * max(1.0, abs(value)))
        if not same:
            problems.append(f"constant {key} {other} (data: {value})")
    if card_model.get("options", {}) != have["options"]:
        problems.append(f"model options {card_model.get('options')} (data: {have['options']})")
    return problems


def load_network(path: str | os.PathLike, model: KineticModel | None = None) -> NeuralEstimator:
    """The trained estimator stored at ``path``, ready to ``predict``.

    ``model``: the model of the data it will be used on; a network trained for another
    model, protocol or constants raises :class:`NetworkMismatch`. Without it, the model is
    rebuilt from the card. A damaged or altered file raises :class:`NetworkFileError`.
    """
    from . import ESTIMATORS  # the registry imports this module's users

    path = Path(path)
    card, arrays = _read(path)
    try:
        method = card["method"]
        cls = ESTIMATORS.get(method)
        if cls is None or not getattr(cls, "trains", False):
            raise NetworkFileError(f"{path}: method {method!r} is not a network estimator of this aslbatch")
        card_model = card["model"]
        if model is None:
            model = get_model(card_model["model"], Protocol.from_dict(card_model["protocol"]),
                              Constants.from_dict(card_model["constants"]), **card_model["options"])
        else:
            problems = _differences(card_model, model)
            if problems:
                raise NetworkMismatch(f"{path} was trained for other data: " + "; ".join(problems) +
                                      ". Train a network for this protocol (aslbatch train) or let aslbatch run "
                                      "train one (omit --network).")
        estimator = cls(model, **card["options"])
        estimator.options()  # validates every option read from the file
        uncertainty = None
        if card.get("uncertainty") is not None:
            uncertainty = Uncertainty.from_arrays(arrays)
        elif any(name.startswith(ARRAY_PREFIXES) for name in arrays):
            raise ValueError(f"arrays {list(ARRAY_PREFIXES)}* without an uncertainty entry in the card")
        main = {name: arr for name, arr in arrays.items() if not name.startswith(ARRAY_PREFIXES)}
        estimator.set_network(Network.from_arrays(main, card["output_transform"]), card.get("training", {}),
                              uncertainty)
        if uncertainty is None:
            log.warning("%s: written by an older aslbatch (format %s) without a variance network: its estimates "
                        "have no standard errors; retrain it (aslbatch train) for them", path, card.get("format"))
    except (NetworkFileError, NetworkMismatch):
        raise
    except (KeyError, TypeError, ValueError, ProtocolError) as exc:
        raise NetworkFileError(f"{path}: card or arrays are inconsistent ({type(exc).__name__}: {exc})") from None
    estimator.network_file_ = str(path)
    estimator.network_sha256_ = file_sha256(path)
    return estimator


def default_cache_dir() -> Path:
    """``$ASLBATCH_CACHE_DIR``, else the per-user cache: ``$XDG_CACHE_HOME/aslbatch`` or
    ``~/.cache/aslbatch`` (``~/Library/Caches/aslbatch`` on macOS)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "aslbatch"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "aslbatch"


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Blocking exclusive ``flock`` on ``lock_path`` (released when the block ends or the process dies)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is training the same network (%s)", lock_path.stem)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


class NetworkCache:
    """Trained networks keyed by method + model + protocol + constants + training options.

    ``folder``: where to keep them (default :func:`default_cache_dir`).
    """

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else default_cache_dir()

    def key(self, estimator: NeuralEstimator) -> str:
        """sha256 of everything that defines the trained network."""
        identity = {"method": estimator.name, "model": estimator.model.to_dict(), "options": estimator.options(),
                    "training_version": TRAINING_VERSION}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def path(self, estimator: NeuralEstimator) -> Path:
        """The cache file of ``estimator``'s network."""
        return self.folder / f"{estimator.name}-{estimator.model.name}-{self.key(estimator)[:20]}.npz"

    def get(self, estimator: NeuralEstimator, progress: bool = False) -> NeuralEstimator:
        """The trained network for ``estimator`` (untrained, options set): from the cache, or
        trained now and stored (once, even when several processes ask at the same time)."""
        path = self.path(estimator)
        with _exclusive(path.with_suffix(".lock")):
            if path.is_file():
                try:
                    return load_network(path, estimator.model)
                except NetworkFileError as exc:
                    log.warning("cached network unusable, training it again: %s", exc)
            opts = estimator.options()
            log.info("training a %s %s network for this protocol: this happens once, later runs reuse %s; "
                     "%d samples, hidden layers %s, up to %d epochs (about %s)", estimator.name,
                     estimator.model.name, path, opts["n_samples"], opts["hidden_layers"], opts["max_epochs"],
                     _rough_duration(estimator))
            t0 = time.perf_counter()
            estimator.fit(progress=progress)
            save_network(estimator, path)
            log.info("trained in %.0f s (%d epochs), stored %s", time.perf_counter() - t0,
                     estimator.training_.get("epochs", 0), path)
            return load_network(path, estimator.model)


def _rough_duration(estimator: NeuralEstimator) -> str:
    """A rough training time from the multiply-adds per sample (measured ~8e9 per second
    for forward + backward on 2 cores), assuming early stopping ends at ~40 epochs."""
    opts = estimator.options()
    n_inputs = getattr(estimator, "n_inputs", estimator.model.n_volumes + (1 if opts["slice_offsets"] else 0))
    widths = [n_inputs, *opts["hidden_layers"], estimator.model.n_params]
    macs = 3 * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    seconds = macs * opts["n_samples"] * min(opts["max_epochs"], 40) / 8e9
    return f"{max(1, round(seconds / 60))} min" if seconds >= 60 else f"{max(1, round(seconds))} s"
