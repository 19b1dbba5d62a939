"""One entry point to every model's fitting kernel, for estimators that work on any model.

``kernel_id`` of a model class selects its kernel inside compiled code, so an
estimator kernel (LM, networks) is compiled once and cached for all models.
"""

from .._numba import serial
from .one_compartment import normal_equations_into as one_compartment_normal_equations
from .two_compartment import normal_equations_voxel as two_compartment_normal_equations

ONE_COMPARTMENT = 0
TWO_COMPARTMENT = 1


@serial
def model_normal_equations(kernel_id, params, y, vol, const, a, g):
    """cost = |y - s|², A = JᵀJ into ``a`` and Jᵀ(y - s) into ``g`` for the model ``kernel_id``."""
    if kernel_id == ONE_COMPARTMENT:
        return one_compartment_normal_equations(params, y, vol, const, a, g)
    return two_compartment_normal_equations(params, y, vol, const, a, g)
