"""One entry point to every model's serial kernel, for estimators that work on any model.

``kernel_id`` of a model class selects its kernel inside compiled code, so an
estimator kernel (LM, networks) is compiled once and cached for all models.
"""

from .._numba import serial
from .one_compartment import one_compartment_voxel
from .two_compartment import two_compartment_voxel

ONE_COMPARTMENT = 0
TWO_COMPARTMENT = 1


@serial
def model_voxel(kernel_id, params, vol, const, sig, jac, with_jac):
    """Signal (and Jacobian) of one voxel for the model ``kernel_id`` (see the model classes)."""
    if kernel_id == ONE_COMPARTMENT:
        one_compartment_voxel(params, vol, const, sig, jac, with_jac)
    else:
        two_compartment_voxel(params, vol, const, sig, jac, with_jac)
