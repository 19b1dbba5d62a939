"""KineticModel: a kinetic model bound to an acquisition Protocol and Constants.

dipy's Model idea: the model holds everything that does not depend on the data
(the per-volume timing, the constants, the options) and is reused for every
voxel. The physics lives in module-level numba kernels (``one_compartment.py``,
``two_compartment.py``) that take the acquisition as a per-volume table ``vol``
and a constant vector ``const``, both built here once per model.

Units at this API: cbf in mL/100 g/min, times (att, abat) in s, abv in mL/mL
(a fraction of the voxel); signals are ΔM/M0t (dimensionless).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..protocol import Constants, Protocol

# --- columns of the per-volume table ``vol`` --------------------------------------
TAU = 0  #: label duration τ (s)
PLD = 1  #: post-labeling delay w (s)
TIME = 2  #: t = τ + w (s)
CRUSHED = 3  #: 1.0 where vascular crushing removes the arterial signal, else 0.0
EXP_TIME = 4  #: exp(-t / T1b)
DELIVERED = 5  #: exp(-w / T1b) (1 - exp(-τ / T1b)): fully-delivered bolus factor for T1' = T1b
N_VOL_COLUMNS = 6

# --- entries of the constant vector ``const`` -------------------------------------
T1B = 0  #: T1 of blood (s)
T1T = 1  #: T1 of tissue (s)
LABEL = 2  #: 2 α α_BS / λ (g/mL): label delivered per unit flow, per M0t
LAMBDA = 3  #: λ (mL/g)
T1_TISSUE = 4  #: 1.0 for Buxton's T1' (1/T1' = 1/T1t + f/λ), 0.0 for T1' = T1b
EDGE_S = 5  #: width s of the smoothed arterial window (s); 0 = hard edges
N_CONST = 6

#: (mL/100 g/min) per (mL/g/s)
CBF_SCALE = 6000.0


def volume_table(protocol: Protocol, constants: Constants) -> np.ndarray:
    """The per-volume table ``vol`` (n_volumes, N_VOL_COLUMNS) read by the kernels."""
    tau = protocol.label_duration
    w = protocol.pld
    vol = np.empty((protocol.n_volumes, N_VOL_COLUMNS), dtype=np.float64)
    vol[:, TAU] = tau
    vol[:, PLD] = w
    vol[:, TIME] = tau + w
    vol[:, CRUSHED] = protocol.crushed
    vol[:, EXP_TIME] = np.exp(-(tau + w) / constants.t1b)
    vol[:, DELIVERED] = np.exp(-w / constants.t1b) * -np.expm1(-tau / constants.t1b)
    vol.setflags(write=False)
    return vol


def constant_vector(constants: Constants, arterial_edge_s: float = 0.0) -> np.ndarray:
    """The constant vector ``const`` (N_CONST,) read by the kernels."""
    const = np.empty(N_CONST, dtype=np.float64)
    const[T1B] = constants.t1b
    const[T1T] = constants.t1t
    const[LABEL] = 2.0 * constants.alpha * constants.alpha_bs / constants.lam
    const[LAMBDA] = constants.lam
    const[T1_TISSUE] = 1.0 if constants.t1_prime == "tissue" else 0.0
    const[EDGE_S] = arterial_edge_s
    const.setflags(write=False)
    return const


@dataclass(frozen=True)
class Parameter:
    """Everything known about one parameter of a model, in API units.

    name : column name (``cbf``, ``att``...), also the map's BIDS suffix.
    units : as in ASL_MODELS.md.
    title : what it is, in words and in the research's terms (e.g. "arterial transit time (ATT)").
    definition : continuation of the sidecar's sentence (may be empty).
    bounds : (lower, upper) bounds of estimates.
    training_range : (low, high) of simulated training and evaluation data.
    display : (low, high) fixed colour scale of QC pages.
    cmap : the matplotlib colour map of that scale.
    se_display : upper end of the QC colour scale of its standard error (from 0).
    """

    name: str
    units: str
    title: str
    definition: str
    bounds: tuple[float, float]
    training_range: tuple[float, float]
    display: tuple[float, float]
    cmap: str
    se_display: float


class KineticModel:
    """Base of the kinetic models. Subclasses set ``name``, ``title``, ``parameters`` and ``_batch_kernel``.

    ``param_names``, ``param_units``, ``default_bounds`` and ``default_training_ranges`` are
    derived from ``parameters`` when the subclass is defined.

    Parameters
    ----------
    protocol : the acquisition, one entry per (subtracted) volume.
    constants : physical constants; if None, ``Constants()`` (ASL_MODELS.md defaults) with the
        model's ``default_alpha`` (0.98 for PASL).
    """

    #: registry name ("1c", "2c")
    name: ClassVar[str]
    #: the model in words, for sidecars and reports
    title: ClassVar[str]
    #: the parameters, in the order of the last axis of every parameter array
    parameters: ClassVar[tuple[Parameter, ...]]
    #: (earlier, later, (min gap, max gap)): ordered arrival times sampled as later = earlier + gap
    ordered_times: ClassVar[tuple[tuple[str, str, tuple[float, float]], ...]] = ()
    #: labeling efficiency α of the constants used when none are given (PCASL: Constants' 0.85)
    default_alpha: ClassVar[float] = Constants.alpha
    #: default step (s) of Levenberg–Marquardt's start grid over the arrival times
    lm_grid_step_s: ClassVar[float] = 0.1
    #: keyword options of the constructor that change the physics (e.g. ``arterial_edge_s``)
    option_names: ClassVar[tuple[str, ...]] = ()
    #: the parameters are read from a time course (several readout times), as the fitting
    #: methods and networks need; False for a closed form at one readout time
    time_resolved: ClassVar[bool] = True
    #: the parameters are absolute quantities a prior can be drawn for (simulated, trained on,
    #: evaluated, benchmarked); False for outputs relative to the data's own reference (``relative``)
    calibrated: ClassVar[bool] = True
    #: derived from ``parameters``: names, units, (lower, upper) bounds, training ranges
    param_names: ClassVar[tuple[str, ...]]
    param_units: ClassVar[tuple[str, ...]]
    default_bounds: ClassVar[tuple[tuple[float, ...], tuple[float, ...]]]
    default_training_ranges: ClassVar[dict[str, tuple[float, float]]]

    #: builds the per-volume table ``vol`` read by the kernels from (protocol, constants)
    _volume_table = staticmethod(volume_table)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        specs = cls.__dict__.get("parameters")
        if specs is None:
            return
        cls.param_names = tuple(p.name for p in specs)
        cls.param_units = tuple(p.units for p in specs)
        cls.default_bounds = (tuple(p.bounds[0] for p in specs), tuple(p.bounds[1] for p in specs))
        cls.default_training_ranges = {p.name: p.training_range for p in specs}

    @classmethod
    def parameter(cls, name: str) -> Parameter:
        """The :class:`Parameter` called ``name``, or a KeyError."""
        for spec in cls.parameters:
            if spec.name == name:
                return spec
        raise KeyError(f"the {cls.name} model has no parameter {name!r}; it has {cls.param_names}")

    def __init__(self, protocol: Protocol, constants: Constants | None = None) -> None:
        if not isinstance(protocol, Protocol):
            raise TypeError(f"protocol must be an aslbatch.Protocol, got {type(protocol).__name__}")
        constants = self.default_constants() if constants is None else constants
        if not isinstance(constants, Constants):
            raise TypeError(f"constants must be an aslbatch.Constants, got {type(constants).__name__}")
        self.protocol = protocol
        self.constants = constants
        self.vol = self._volume_table(protocol, constants)
        self.const = constant_vector(constants, self._edge_s())

    @classmethod
    def default_constants(cls, **fields: Any) -> Constants:
        """:class:`Constants` with ``fields`` and, unless given, the model's ``default_alpha``."""
        return Constants(**{"alpha": cls.default_alpha, **fields})

    def _edge_s(self) -> float:
        return 0.0

    # --- description ------------------------------------------------------------
    @property
    def n_params(self) -> int:
        """Number of parameters."""
        return len(self.param_names)

    @property
    def n_volumes(self) -> int:
        """Number of volumes of the bound protocol."""
        return self.protocol.n_volumes

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) bounds of estimates, float64 arrays of length n_params (API units)."""
        lower, upper = self.default_bounds
        return np.array(lower, dtype=np.float64), np.array(upper, dtype=np.float64)

    @property
    def training_ranges(self) -> dict[str, tuple[float, float]]:
        """Default (low, high) of each parameter for simulated data (API units)."""
        return dict(self.default_training_ranges)

    def shifted(self, offset_s: float) -> "KineticModel":
        """This model for voxels read ``offset_s`` s after the nominal PLD (2D readouts)."""
        return type(self)(self.protocol.shifted(offset_s), self.constants, **self.options())

    def tissue_model(self) -> "KineticModel":
        """The model of the tissue signal alone (parameters cbf, att): this model unless it adds
        other compartments."""
        return self

    def options(self) -> dict[str, Any]:
        """Model options that change the physics (recorded in provenance)."""
        return {}

    def assumptions(self) -> str | None:
        """What the estimates assume beyond the data, in words (maps' sidecars), or None."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """Everything that defines this model's physics, JSON-ready."""
        return {
            "model": self.name,
            "protocol": self.protocol.to_dict(),
            "constants": self.constants.to_dict(),
            "options": self.options(),
        }

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({self.protocol!r}, {self.constants!r}{opts})"

    # --- evaluation ---------------------------------------------------------------
    def check_params(self, params: Any) -> np.ndarray:
        """``params`` as a contiguous float64 (n_voxels, n_params) array, or a ValueError."""
        arr = np.asarray(params, dtype=np.float64)
        if arr.ndim == 1:
            arr = arr[np.newaxis, :]
        if arr.ndim != 2 or arr.shape[1] != self.n_params:
            raise ValueError(
                f"{self.name} params must have shape (n_voxels, {self.n_params}) with columns "
                f"{self.param_names}, got shape {np.shape(params)}"
            )
        return np.ascontiguousarray(arr)

    def signal(self, params: Any) -> np.ndarray:
        """Noise-free ΔM/M0t, shape (n_voxels, n_volumes), for params (n_voxels, n_params)."""
        p = self.check_params(params)
        sig = np.empty((p.shape[0], self.n_volumes), dtype=np.float64)
        jac = np.empty((p.shape[0], 0, 0), dtype=np.float64)
        self._batch_kernel(p, self.vol, self.const, sig, jac, False)
        return sig

    def jacobian(self, params: Any) -> np.ndarray:
        """d(ΔM/M0t)/d(param) in API units, shape (n_voxels, n_volumes, n_params)."""
        return self.signal_and_jacobian(params)[1]

    def signal_and_jacobian(self, params: Any) -> tuple[np.ndarray, np.ndarray]:
        """Both :meth:`signal` and :meth:`jacobian` in one pass."""
        p = self.check_params(params)
        sig = np.empty((p.shape[0], self.n_volumes), dtype=np.float64)
        jac = np.empty((p.shape[0], self.n_volumes, self.n_params), dtype=np.float64)
        self._batch_kernel(p, self.vol, self.const, sig, jac, True)
        return sig, jac
