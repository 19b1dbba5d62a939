"""The acquisition (Protocol) and the physical constants (Constants) of an ASL scan.

A :class:`Protocol` lists, for every volume of the (decoded, control-label
subtracted) series, its label duration τ (s), post-labeling delay w (s) and
whether vascular crushing was applied. :class:`Constants` holds the physiology
and sequence constants of ``shared/ASL_MODELS.md`` with its defaults. Both are
immutable, validated on construction with errors that name the problem, hash to
a stable content digest and round-trip through JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = [
    "Constants",
    "Protocol",
    "ProtocolError",
    "default_protocol",
    "MAX_TIME_S",
]

#: Any label duration or PLD above this many seconds is taken for milliseconds.
#: The label has decayed to e^(-10/1.65) < 0.3 % by then: no ASL protocol uses it.
MAX_TIME_S = 10.0

T1_PRIME_CHOICES = ("blood", "tissue")


class ProtocolError(ValueError):
    """A protocol or constants description is invalid; the message says why."""


def _as_float_array(values: Any, name: str) -> np.ndarray:
    raw = np.array(values, ndmin=1)
    if raw.dtype.kind not in "iuf":
        raise ProtocolError(f"{name} must be numbers, got {values!r}")
    if raw.ndim != 1:
        raise ProtocolError(f"{name} must be one value per volume (1-D), got shape {raw.shape}")
    # + 0.0 turns -0.0 into 0.0, so equal protocols have equal digests
    return raw.astype(np.float64) + 0.0


def _canonical_json(obj: Any) -> str:
    """JSON with sorted keys and exact float reprs: the basis of the stable hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class Constants:
    """Physical constants of the kinetic models (ASL_MODELS.md defaults).

    Attributes
    ----------
    t1b : T1 of arterial blood (s); 1.65 s at 3 T, 1.35 s at 1.5 T.
    t1t : T1 of tissue (s).
    alpha : labeling efficiency α (dimensionless, 0.85 for PCASL).
    alpha_bs : background-suppression efficiency factor α_BS (dimensionless, 1 = none).
    lam : blood–brain partition coefficient λ (mL/g).
    t1_prime : ``"blood"`` (T1' = T1b, consensus) or ``"tissue"`` (Buxton: 1/T1' = 1/T1t + f/λ).
    """

    t1b: float = 1.65
    t1t: float = 1.3
    alpha: float = 0.85
    alpha_bs: float = 1.0
    lam: float = 0.9
    t1_prime: str = "blood"

    def __post_init__(self) -> None:
        for name in ("t1b", "t1t", "lam", "alpha", "alpha_bs"):
            value = getattr(self, name)
            # numbers, numpy scalars included; bool is not a number here
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ProtocolError(f"Constants.{name} must be a number, got {value!r}")
            value = float(value)
            if name in ("alpha", "alpha_bs"):
                if not (math.isfinite(value) and 0 < value <= 1):
                    raise ProtocolError(f"Constants.{name} must be in (0, 1], got {value!r}")
            elif not (math.isfinite(value) and value > 0):
                raise ProtocolError(f"Constants.{name} must be a finite positive number, got {value!r}")
            object.__setattr__(self, name, value)
        if self.t1b > MAX_TIME_S or self.t1t > MAX_TIME_S:
            raise ProtocolError(
                f"Constants T1 values must be in seconds; t1b={self.t1b}, t1t={self.t1t} look like milliseconds"
            )
        if self.t1_prime not in T1_PRIME_CHOICES:
            raise ProtocolError(f"Constants.t1_prime must be one of {T1_PRIME_CHOICES}, got {self.t1_prime!r}")

    def to_dict(self) -> dict[str, Any]:
        """The constants as a JSON-ready dict (units as in the attribute docs)."""
        return {
            "t1b": self.t1b,
            "t1t": self.t1t,
            "alpha": self.alpha,
            "alpha_bs": self.alpha_bs,
            "lam": self.lam,
            "t1_prime": self.t1_prime,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Constants":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ProtocolError(f"unknown Constants field(s): {sorted(unknown)}")
        return cls(**data)

    def digest(self) -> str:
        """Stable sha256 hex digest of the content."""
        return hashlib.sha256(_canonical_json(self.to_dict()).encode()).hexdigest()


@dataclass(frozen=True, eq=False)
class Protocol:
    """Per-volume acquisition timing of a (subtracted) multi-delay ASL series.

    Parameters
    ----------
    label_duration : τ per volume (s); a scalar applies to every volume.
    pld : post-labeling delay w per volume (s).
    crushed : per volume, True where vascular crushing (e.g. DANTE) removed the
        arterial signal; default all False. A scalar applies to every volume.
    """

    label_duration: np.ndarray
    pld: np.ndarray
    crushed: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __init__(
        self,
        label_duration: float | Sequence[float] | np.ndarray,
        pld: float | Sequence[float] | np.ndarray,
        crushed: bool | Sequence[bool] | np.ndarray | None = None,
    ) -> None:
        pld_arr = _as_float_array(pld, "pld")
        n = pld_arr.size
        if n == 0:
            raise ProtocolError("pld is empty: a protocol needs at least one volume")
        tau_arr = _as_float_array(label_duration, "label_duration")
        if tau_arr.size == 1 and n > 1:
            tau_arr = np.full(n, tau_arr[0])
        if tau_arr.size != n:
            raise ProtocolError(
                f"length mismatch: label_duration has {tau_arr.size} values but pld has {n}"
            )
        if crushed is None:
            crushed_arr = np.zeros(n, dtype=bool)
        else:
            raw = np.array(crushed, ndmin=1)
            if raw.dtype.kind not in "bi" or (raw.dtype.kind == "i" and not np.isin(raw, (0, 1)).all()):
                raise ProtocolError(f"crushed must be booleans, got {crushed!r}")
            if raw.ndim != 1:
                raise ProtocolError(f"crushed must be one flag per volume (1-D), got shape {raw.shape}")
            crushed_arr = raw.astype(bool)
            if crushed_arr.size == 1 and n > 1:
                crushed_arr = np.full(n, bool(crushed_arr[0]))
            if crushed_arr.size != n:
                raise ProtocolError(f"length mismatch: crushed has {crushed_arr.size} values but pld has {n}")
        for name, arr in (("label_duration", tau_arr), ("pld", pld_arr)):
            bad = ~np.isfinite(arr)
            if bad.any():
                raise ProtocolError(f"{name} has non-finite value(s) at volume(s) {np.flatnonzero(bad).tolist()}")
            if (arr > MAX_TIME_S).any():
                raise ProtocolError(
                    f"{name} must be in seconds; value(s) {arr[arr > MAX_TIME_S].tolist()} exceed "
                    f"{MAX_TIME_S:g} s and look like milliseconds (divide by 1000)"
                )
        if (pld_arr < 0).any():
            raise ProtocolError(f"pld must be >= 0 s; negative value(s) at volume(s) {np.flatnonzero(pld_arr < 0).tolist()}")
        if (tau_arr <= 0).any():
            raise ProtocolError(
                f"label_duration must be > 0 s; value(s) <= 0 at volume(s) {np.flatnonzero(tau_arr <= 0).tolist()}"
            )
        for arr in (tau_arr, pld_arr, crushed_arr):
            arr.setflags(write=False)
        object.__setattr__(self, "label_duration", tau_arr)
        object.__setattr__(self, "pld", pld_arr)
        object.__setattr__(self, "crushed", crushed_arr)

    @property
    def n_volumes(self) -> int:
        """Number of volumes."""
        return int(self.pld.size)

    @property
    def readout_time(self) -> np.ndarray:
        """t = τ + w per volume (s): time from the start of labeling to readout."""
        return self.label_duration + self.pld

    def shifted(self, offset_s: float) -> "Protocol":
        """The same protocol with every PLD later by ``offset_s`` (s): the timing of a slice of
        a 2D readout read ``offset_s`` after the first (τ and crushing unchanged)."""
        return Protocol(self.label_duration, self.pld + offset_s, self.crushed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``label_duration`` and ``pld`` in s, ``crushed`` as booleans."""
        return {
            "label_duration": [float(v) for v in self.label_duration],
            "pld": [float(v) for v in self.pld],
            "crushed": [bool(v) for v in self.crushed],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Protocol":
        """Inverse of :meth:`to_dict`."""
        unknown = set(data) - {"label_duration", "pld", "crushed"}
        if unknown:
            raise ProtocolError(f"unknown Protocol field(s): {sorted(unknown)}")
        missing = {"label_duration", "pld"} - set(data)
        if missing:
            raise ProtocolError(f"Protocol is missing field(s): {sorted(missing)}")
        return cls(data["label_duration"], data["pld"], data.get("crushed"))

    def to_json(self) -> str:
        """The protocol as a JSON string (see :meth:`to_dict`)."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Protocol":
        """Inverse of :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProtocolError(f"protocol JSON is malformed: {exc}") from exc
        if not isinstance(data, dict):
            raise ProtocolError("protocol JSON must be an object")
        return cls.from_dict(data)

    def digest(self) -> str:
        """Stable sha256 hex digest of the content (same protocol, same digest, any process)."""
        return hashlib.sha256(_canonical_json(self.to_dict()).encode()).hexdigest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Protocol):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.digest())

    def __repr__(self) -> str:
        return (
            f"Protocol(label_duration={self.label_duration.tolist()}, pld={self.pld.tolist()}, "
            f"crushed={self.crushed.tolist()})"
        )


def default_protocol(model: str) -> Protocol:
    """The default protocol of ``model``: ASL_MODELS.md's for ``"1c"`` and ``"2c"`` (PCASL,
    τ = 1.8 s), a multi-TI FAIR Q2TIPS protocol for ``"pasl"``, the white paper's for ``"single"`` (and ``"relative"``).

    1C: PLD 1.0, 1.5, 2.0, 2.5, 3.0 s. 2C: non-crushed PLD 0.2, 0.5, 0.8, 1.1, 1.4 s
    then crushed PLD 1.0, 1.6, 2.2, 2.8 s. PASL: bolus duration τ_b = 0.7 s (held in
    ``label_duration``), TI = 0.3, 0.6, ..., 3.0 s (held in ``pld``). Single: the white paper's
    recommended adult single-delay PCASL protocol, τ = PLD = 1.8 s (Alsop 2015).
    """
    if model in ("single", "relative"):
        return Protocol(1.8, [1.8])
    if model == "pasl":
        # the Siemens 3D GRASE multi-TI FAIR Q2TIPS protocol of the BIDS example dataset asl003
        # (BolusCutOffDelayTime [0.7, 1.6] s: τ_b = 0.7 s; PostLabelingDelay = TI 0.3 to 3.0 s by
        # 0.3 s) and of ASL_MODELS.md's PASL check values: the TIs span the arrival (att 0.2-2.5 s
        # in training) and the decay after the bolus has passed, every 0.3 s
        return Protocol(0.7, np.round(np.arange(1, 11) * 0.3, 10))
    if model == "1c":
        return Protocol(1.8, [1.0, 1.5, 2.0, 2.5, 3.0])
    if model == "2c":
        return Protocol(
            1.8,
            [0.2, 0.5, 0.8, 1.1, 1.4, 1.0, 1.6, 2.2, 2.8],
            [False] * 5 + [True] * 4,
        )
    raise ProtocolError(f"no default protocol for model {model!r}; choose '1c', '2c', 'pasl' or 'single'")
