"""The study behind the supervised network's defaults: architecture and training SNR range.

For each candidate, a network is trained on the default protocol and scored on held-out
Rician data at SNR 3, 5 and 10 (NRMSE per parameter, the research's accuracy metric)
beside LM on the same data. Run: ``python benchmarks/study_networks.py 1c|2c [N_SAMPLES]``;
prints one JSON line per candidate. The figures are quoted in the README and the issue notes.
"""

import json
import sys
import time

import numpy as np

from aslbatch.estimators import get_estimator
from aslbatch.models import get_model
from aslbatch.protocol import default_protocol
from aslbatch.simulate import simulate

CANDIDATES = {
    "1c": [{"hidden_layers": h} for h in ((32, 32), (64, 64), (128, 128), (64, 64, 64))]
    + [{"hidden_layers": (64, 64), "snr_range": r} for r in ((1.0, 100.0), (2.0, 20.0), (3.0, 30.0))],
    "2c": [{"hidden_layers": h} for h in ((64, 64), (128, 128), (64, 64, 64))],
}
SNRS = (3.0, 5.0, 10.0)


def nrmse(estimate, truth):
    return np.sqrt(np.nanmean((estimate - truth) ** 2, axis=0)) / truth.mean(axis=0)


def main(name: str, n_samples: int) -> None:
    model = get_model(name, default_protocol(name))
    tests = {snr: simulate(model, 20_000, snr, seed=100 + int(snr)) for snr in SNRS}
    lm = get_estimator("lm", model).fit()
    print(json.dumps({"method": "lm", **{str(s): np.round(nrmse(lm.predict(d.signals).params, d.params), 3).tolist()
                                        for s, d in tests.items()}}), flush=True)
    for options in CANDIDATES[name]:
        t0 = time.perf_counter()
        est = get_estimator("supervised", model, n_samples=n_samples, **options).fit()
        seconds = time.perf_counter() - t0
        x = tests[5.0].signals
        t1 = time.perf_counter()
        est.predict(np.repeat(x, 10, axis=0))
        rate = 10 * x.shape[0] / (time.perf_counter() - t1)
        scores = {str(s): np.round(nrmse(est.predict(d.signals).params, d.params), 3).tolist() for s, d in tests.items()}
        print(json.dumps({"options": options, "train_s": round(seconds, 1), "epochs": est.training_["epochs"],
                          "voxels_per_s": round(rate), **scores}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 500_000)
