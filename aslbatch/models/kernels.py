"""One entry point to every model's kernels, for estimators that work on any model.

``kernel_id`` of a model class selects its kernel inside compiled code, so an
estimator kernel (LM, networks) is compiled once and cached for all models.
"""

from .._numba import serial
from .one_compartment import normal_equations_into as one_compartment_normal_equations
from .one_compartment import one_compartment_voxel
from .two_compartment import normal_equations_voxel as two_compartment_normal_equations
from .two_compartment import two_compartment_voxel

ONE_COMPARTMENT = 0
TWO_COMPARTMENT = 1


@serial
def model_normal_equations(kernel_id, params, y, vol, const, a, g):
    """cost = |y - s|², A = JᵀJ into ``a`` and Jᵀ(y - s) into ``g`` for the model ``kernel_id``."""
    if kernel_id == ONE_COMPARTMENT:
        return one_compartment_normal_equations(params, y, vol, const, a, g)
    return two_compartment_normal_equations(params, y, vol, const, a, g)


@serial
def model_signal_jacobian(kernel_id, params, vol, const, sig, jac):
    """Signal and Jacobian of one voxel for the model ``kernel_id``.

    ΔM/M0t into ``sig`` (n_volumes,), d sig/d params per API unit into ``jac`` (n_volumes, n_params).
    """
    if kernel_id == ONE_COMPARTMENT:
        one_compartment_voxel(params, vol, const, sig, jac, True)
    else:
        two_compartment_voxel(params, vol, const, sig, jac, True)
