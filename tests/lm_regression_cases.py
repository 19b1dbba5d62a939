"""The voxels and models of the LM regression pin (tests/test_lm_regression.py).

``regression_signals`` builds the input signals deterministically; the pinned outputs in
tests/data/lm_regression.npz were produced by the LM of commit 0da1647 (before the fast
paths became one algorithm) with ``python -m tests.lm_regression_cases`` and are only ever
regenerated on purpose, after a deliberate change of LM's results.
"""

from __future__ import annotations

import numpy as np

from aslbatch import Constants
from aslbatch.models import get_model
from aslbatch.protocol import Protocol, default_protocol
from aslbatch.simulate import simulate

#: readout shift (s) of a 2D slice acquired after the first: every PLD grows by it
SLICE_SHIFT_S = 0.35


def regression_models() -> dict:
    """name -> model: 1C and 2C on the default protocols, and non-default variants
    (slice-shifted PLDs, T1' of tissue, smooth arterial edges)."""
    p1, p2 = default_protocol("1c"), default_protocol("2c")
    shifted_1c = Protocol(p1.label_duration, p1.pld + SLICE_SHIFT_S)
    shifted_2c = Protocol(p2.label_duration, p2.pld + SLICE_SHIFT_S, p2.crushed)
    tissue = Constants(t1_prime="tissue")
    return {
        "1c_default": get_model("1c", p1),
        "1c_shifted_tissue": get_model("1c", shifted_1c, tissue),
        "2c_default": get_model("2c", p2),
        "2c_edge_shifted_tissue": get_model("2c", shifted_2c, tissue, arterial_edge_s=0.1),
        "2c_edge_default": get_model("2c", p2, arterial_edge_s=0.05),
    }


def regression_signals(model, seed: int) -> np.ndarray:
    """~320 voxels: SNR inf, 20, 5, 2 and 1 (Gaussian and Rician), arrival beyond the
    sampled range, signals far above the cbf bound, negative voxels and invalid rows."""
    rng = np.random.default_rng(seed)
    parts = []
    for k, snr in enumerate((np.inf, 20.0, 5.0, 2.0, 1.0)):
        noise = "gaussian" if k % 2 else "rician"
        parts.append(simulate(model, 50, snr, noise=noise, seed=seed + k).signals)
    late = {"att": (3.5, 5.0)}
    if "abat" in model.param_names:
        late["abat"] = (1.5, 3.0)
    parts.append(simulate(model, 20, 5.0, noise="gaussian", seed=seed + 10, ranges=late).signals)
    lo, hi = model.bounds
    top = simulate(model, 10, np.inf, seed=seed + 11).params
    top[:, 0] = hi[0]
    parts.append(3.0 * model.signal(top))
    parts.append(-np.abs(simulate(model, 10, 5.0, noise="gaussian", seed=seed + 12).signals))
    parts.append(rng.normal(0.0, 1e-3, (10, model.n_volumes)))
    invalid = np.ones((3, model.n_volumes)) * 1e-3
    invalid[0, 1] = np.nan
    invalid[1, -1] = np.inf
    invalid[2] = 0.0
    parts.append(invalid)
    return np.ascontiguousarray(np.concatenate(parts))


def main() -> None:
    from pathlib import Path

    from aslbatch.estimators import get_estimator

    out = {}
    for k, (name, model) in enumerate(regression_models().items()):
        y = regression_signals(model, 1000 + 100 * k)
        est = get_estimator("lm", model).fit().predict(y)
        out[f"{name}/signals"] = y
        out[f"{name}/params"] = est.params
        out[f"{name}/stderr"] = est.stderr
        out[f"{name}/rss"] = est.rss
        out[f"{name}/status"] = est.status.astype(np.float64)
        out[f"{name}/n_eval"] = est.info["n_eval"].astype(np.float64)
    np.savez_compressed(Path(__file__).parent / "data" / "lm_regression.npz", **out)


if __name__ == "__main__":
    main()
