"""One entry point to every model's kernels, for estimators that work on any model.

``kernel_id`` of a model class selects its kernel inside compiled code, so an
estimator kernel (the networks) is compiled once and cached for all models.
Levenberg–Marquardt instead compiles one kernel per model from the ``lm_*``
functions of each model module (:mod:`aslbatch.estimators.lm`).
"""

from .._numba import serial
from .one_compartment import one_compartment_voxel
from .pasl import pasl_voxel
from .two_compartment import two_compartment_voxel

ONE_COMPARTMENT = 0
TWO_COMPARTMENT = 1
PULSED = 2


@serial
def model_signal_jacobian(kernel_id, params, vol, const, sig, jac):
    """Signal and Jacobian of one voxel for the model ``kernel_id``.

    ΔM/M0t into ``sig`` (n_volumes,), d sig/d params per API unit into ``jac`` (n_volumes, n_params).
    """
    if kernel_id == ONE_COMPARTMENT:
        one_compartment_voxel(params, vol, const, sig, jac, True)
    elif kernel_id == PULSED:
        pasl_voxel(params, vol, const, sig, jac, True)
    else:
        two_compartment_voxel(params, vol, const, sig, jac, True)
