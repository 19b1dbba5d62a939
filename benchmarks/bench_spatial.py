"""The spatial network's inference on a 10^6-voxel image against the voxelwise supervised network's
and LM's in one run (1 and 2 threads): the issue's target is >= 10^6 voxels/s on 2 cores.

Both networks have their default architecture (the weights do not change the time); the spatial one
gathers each voxel's in-plane neighbourhood (5x5 for 1C, 3x3 for 2C) from the mask (``predict_image``).
Each network runs with its standard errors as the batch asks for them (``signal_se``: the variance network at each voxel's SNR);
``spatial-no-se`` is the spatial network without its variance networks (the cost of the standard errors).
"""

import copy

import numpy as np
import pytest

from aslbatch.estimators import get_estimator
from aslbatch.models import get_model
from aslbatch.protocol import default_protocol
from aslbatch.simulate import noise_sigma, simulate

SHAPE = (128, 128, 80)


@pytest.fixture(scope="module", params=["1c", "2c"])
def case(request):
    model = get_model(request.param, default_protocol(request.param))
    index = np.indices(SHAPE, dtype=float)
    centre = (np.array(SHAPE, dtype=float) - 1) / 2
    mask = (((index - centre[:, None, None, None]) / (0.62 * np.array(SHAPE))[:, None, None, None]) ** 2).sum(0) <= 1
    data = simulate(model, int(mask.sum()), 5.0, seed=0)
    networks = {name: get_estimator(name, model, n_samples=5000, max_epochs=1).fit() for name in ("spatial", "supervised")}
    return model, mask, data.signals, networks


@pytest.mark.parametrize("method", ["spatial", "spatial-no-se", "supervised", "lm"])
def test_image_inference(benchmark, case, threads, method):
    model, mask, signals, networks = case
    if method == "spatial-no-se":
        est = copy.copy(networks["spatial"])
        est.uncertainty_ = None
    else:
        est = networks.get(method) or get_estimator(method, model).fit()
    signal_se = np.full(signals.shape, noise_sigma(model, 5.0))
    est.predict_image(signals[:1000], np.isin(np.arange(mask.size), np.flatnonzero(mask)[:1000]).reshape(mask.shape),
                      signal_se=signal_se[:1000])
    benchmark.group = f"image inference {model.name}, {signals.shape[0]} voxels"
    benchmark.extra_info["voxels"] = int(signals.shape[0])
    benchmark.pedantic(est.predict_image, args=(signals, mask), kwargs={"signal_se": signal_se}, rounds=3, iterations=1)
