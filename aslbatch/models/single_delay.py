"""Single-delay quantification (Alsop 2015 white paper): cbf only, for data read at one time.

An acquisition whose label/control volumes are all read at one time (one PLD for (P)CASL,
one TI for PASL, however many pairs) determines CBF only, and only under the assumption
that the whole bolus has arrived (att < PLD; for PASL att + τ_b < TI). The signal is
then linear in CBF (ASL_MODELS.md, "What a protocol can determine"):

    (P)CASL  ΔM/M0t = cbf · 2 α α_BS T1b e^(−w/T1b) (1 − e^(−τ/T1b)) / (6000 λ)
    PASL     ΔM/M0t = cbf · 2 α α_BS τ_b e^(−TI/T1b) / (6000 λ)

which are the one-compartment and PASL models with T1' = T1b at a fully delivered point,
inverted exactly by the white-paper formulas. ``t1_prime`` does not enter: the consensus
formula uses the T1 of blood.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..protocol import Constants, Protocol
from .base import CBF_SCALE, KineticModel, Parameter

__all__ = ["LABELING_SCHEMES", "SingleDelayModel"]

#: labeling schemes the formula serves: "pcasl" (also CASL: the same bolus shape) and "pasl"
LABELING_SCHEMES = ("pcasl", "pasl")


def _gain(protocol: Protocol, constants: Constants, labeling: str) -> np.ndarray:
    """ΔM/M0t per mL/100 g/min of each volume, (n_volumes,), for a fully delivered bolus."""
    label = 2.0 * constants.alpha * constants.alpha_bs / (constants.lam * CBF_SCALE)
    tau, w, t1b = protocol.label_duration, protocol.pld, constants.t1b
    if labeling == "pasl":  # pld holds TI, label_duration the bolus duration τ_b
        return label * tau * np.exp(-w / t1b)
    return label * t1b * np.exp(-w / t1b) * -np.expm1(-tau / t1b)


class SingleDelayModel(KineticModel):
    """CBF (mL/100 g/min) from volumes read at one time, the bolus assumed fully delivered.

    Parameters
    ----------
    protocol : the acquisition (τ or τ_b and PLD or TI per volume, s).
    constants : physical constants (t1_prime is not used: T1' = T1b by the formula's definition).
    labeling : ``"pcasl"`` (also CASL) or ``"pasl"``.
    """

    name = "single"
    title = "the single-delay white-paper quantification (Alsop 2015; the bolus assumed fully delivered)"
    parameters = (
        Parameter("cbf", "mL/100 g/min", "cerebral blood flow (CBF)", "",
                  bounds=(-np.inf, np.inf), training_range=(0.0, 150.0), display=(0.0, 100.0), cmap="inferno",
                  se_display=20.0),
    )
    option_names = ("labeling",)
    time_resolved = False

    def __init__(self, protocol: Protocol, constants: Constants | None = None, labeling: str = "pcasl") -> None:
        if labeling not in LABELING_SCHEMES:
            raise ValueError(f"labeling must be one of {LABELING_SCHEMES}, got {labeling!r}")
        self.labeling = labeling
        super().__init__(protocol, constants)
        self.gain = _gain(self.protocol, self.constants, labeling)
        self.gain.setflags(write=False)

    def options(self) -> dict[str, Any]:
        """The labeling scheme (recorded in provenance)."""
        return {"labeling": self.labeling}

    def tissue_model(self) -> KineticModel:
        """The time-resolved model whose fully delivered signal this is (1C or PASL; for SNR levels)."""
        from . import get_model

        return get_model("pasl" if self.labeling == "pasl" else "1c", self.protocol, self.constants)

    def quantities(self, cbf: np.ndarray, cbf_se: np.ndarray | None, signals: np.ndarray,
                   signal_se: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """The output parameters (n, n_params) and their standard errors from the white-paper estimate
        ``cbf`` (n,) and its se (n, 1) or None: cbf itself (mL/100 g/min). ``signals`` and
        ``signal_se``, the averaged ΔM/M0t, serve models whose outputs are more (the relative model)."""
        return cbf[:, np.newaxis], cbf_se

    def _batch_kernel(self, params: np.ndarray, vol: np.ndarray, const: np.ndarray, sig: np.ndarray,
                      jac: np.ndarray, want_jac: bool) -> None:
        sig[:] = params[:, :1] * self.gain
        if want_jac:
            jac[:, :, 0] = self.gain

    def assumptions(self) -> str:
        """The assumption the estimate rests on, in words, with the formula and its constants."""
        c = self.constants
        if self.labeling == "pasl":
            formula = "CBF = 6000 λ (ΔM/M0t) e^(TI/T1b) / (2 α α_BS τ_b)"
            arrival = "the whole bolus arrived before the readout (att + τ_b < TI)"
        else:
            formula = "CBF = 6000 λ (ΔM/M0t) e^(PLD/T1b) / (2 α α_BS T1b (1 − e^(−τ/T1b)))"
            arrival = "the label arrived in the tissue before the readout (att < PLD)"
        return (f"{formula} (Alsop et al. 2015), with λ = {c.lam:g} mL/g, α = {c.alpha:g}, α_BS = {c.alpha_bs:.4g}, "
                f"T1b = {c.t1b:g} s; it assumes {arrival}: with one readout time the arrival time is not determined")
