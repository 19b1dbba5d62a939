"""How much of a small lesion's contrast could the 1C spatial network keep? Its estimate against the Bayes
posterior mean on one exactly known case (issue 17's lesion target).

The case: a 5×5 patch of CBF 60 mL/100 g/min and arrival 1.2 s (the spatial phantom's grey matter) holding a
2×2-voxel lesion of half that CBF, the centre one of its voxels (two of the four placements, the others are
their mirror images), every neighbour present, Rician noise at the SNR (default protocol). Contrast kept =
(1 − estimate in the lesion / estimate without it) / 0.5.

- **network**: the cached ``spatial`` network (default options), mean estimate over ``--samples`` noise draws;
- **Bayes**: the posterior mean of the centre's CBF under the training prior's own terms for this case,
  computed on a grid with the exact Rician likelihood of all 25 voxels: the surround's CBF uniform over
  10–150, the arrival uniform over 0.5–3.5 s (shared by the patch), the noise level log-uniform over SNR
  2–50, and with probability 1/2 a lesion: a rectangle of 1–2 × 1–2 voxels holding the centre or beside it,
  placed as :func:`aslbatch.estimators.patches._b_share` places it, its CBF the surround's times a ratio
  log-uniform over the prior's 0.2–2 (:data:`aslbatch.estimators.patches.LESION_CBF`). It leaves out the
  prior's edges, islands, gradients and texture: a 2×2 dip is not a straight edge, and an island of another
  tissue arriving up to 0.6 s later (the prior's tissue step) changed the posterior mean by < 0.02 in a
  version of this computation with the surround known. What the network keeps below the Bayes value is
  approximation error, not missing information.

``--narrow``: the same network trained (10^6 patches, default options) on families of the case alone, to
see what the breadth of the prior costs the approximation: the surround's CBF U(40, 80), the arrival 1.2 s
and SNR 3 (``narrow``), then the SNR log-uniform over 2–50 (``snr``), the arrival U(0.5, 3.5) s (``att``),
and those with the CBF U(0, 150) (``all``), scored at SNR 3; in each, half the patches hold a lesion
placed and scaled as the prior places and scales it. Their Bayes values differ little from the case's
(the computation above with the surround known: 0.86–0.92).

``--seeds K``: the full prior's network trained with training seeds 0..K-1 (the default recipe otherwise),
the case's contrast kept by each: how much the training seed alone moves it.

``--check N``: where the network falls short of the Bayes value. The network trained on the family wide in
all three (``all``) against the posterior mean of that family's prior (:func:`posterior_mean_cbf`, the
surround's CBF 10-150, its grid's support) on N draws of the family and on N/5 draws of the case with and
without its lesion at SNR 3: root mean squared errors (mL/100 g/min) overall, where the centre is in a
lesion, and on the case, with the contrast each keeps.

Run: ``python benchmarks/study_spatial_lesion.py [--trials N] [--samples N] [--narrow] [--seeds K]
[--check N]`` (the Bayes part takes ~1.5 s per patch on each of two processes, each network ~2 min).
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

from aslbatch.estimators import get_estimator
from aslbatch.estimators.neural import TrainingSet
from aslbatch.estimators.patches import (LESION_CBF, gather_patches, neighbour_offsets, neighbour_rows,
                                      normalise_patches)
from aslbatch.estimators.spatial import SpatialEstimator
from aslbatch.estimators.store import NetworkCache
from aslbatch.models import get_model
from aslbatch.protocol import default_protocol
from aslbatch.simulate import add_noise, noise_sigma

SNRS = (3.0, 5.0)
SURROUND_CBF, LESION_RATIO, ATT_S = 60.0, 0.5, 1.2
#: two placements of the 2x2 lesion holding the centre (row, column offsets); the other two mirror them
PLACEMENTS = ({(0, 0), (0, 1), (1, 0), (1, 1)}, {(0, 0), (0, -1), (1, 0), (1, -1)})


def case_signals(model, cells: set, snr: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 25, n_volumes) noisy ΔM/M0t of the case's 5×5 patch (input order) with a lesion on ``cells``."""
    positions = [(0, 0), *neighbour_offsets(2)]
    cbf = np.array([SURROUND_CBF * (LESION_RATIO if p in cells else 1.0) for p in positions])
    clean = model.signal(np.column_stack([cbf, np.full(cbf.size, ATT_S)]))
    noisy = add_noise(np.tile(clean, (n, 1)), float(noise_sigma(model, snr)), "rician", rng)
    return noisy.reshape(n, len(positions), model.n_volumes)


def network_kept(estimator, snr: float, n: int) -> float:
    """Contrast kept by ``estimator`` (a 1C spatial network) on the case (mean over placements), each noise
    draw a 5×5 slice of a grid whose centre voxels :meth:`predict_image`'s gathering reads."""
    positions = [(0, 0), *neighbour_offsets(2)]
    mask = np.ones((5, 5, n), dtype=bool)
    neighbours = neighbour_rows(mask, (0, 1), 2)
    centres = np.ravel_multi_index((np.full(n, 2), np.full(n, 2), np.arange(n)), mask.shape)

    def mean_estimate(cells: set) -> float:
        patch = case_signals(estimator.model, cells, snr, n, np.random.default_rng(0))
        grid = np.empty((5, 5, n, estimator.model.n_volumes))
        for k, (a, b) in enumerate(positions):
            grid[2 + a, 2 + b] = patch[:, k]
        rows = gather_patches(grid.reshape(-1, estimator.model.n_volumes), neighbours, centres, dtype=np.float64)
        return float(np.mean(estimator._raw_predict(rows)[:, 0]))

    none = mean_estimate(set())
    return float(np.mean([(1.0 - mean_estimate(c) / none) / (1.0 - LESION_RATIO) for c in PLACEMENTS]))


def _lesion_hypotheses() -> list[tuple[list[int], float]]:
    """(voxel indices in input order, prior weight given a lesion) of every rectangle the prior places."""
    index = {p: i for i, p in enumerate([(0, 0), *neighbour_offsets(2)])}
    out = []
    for sa, sb in itertools.product((1, 2), (1, 2)):
        def firsts(s):  # first row/column: the centre inside, or the rectangle beside it on either side
            return [(-k, 1.0 / (s + 1)) for k in range(s)] + [(-s, 0.5 / (s + 1)), (1, 0.5 / (s + 1))]
        for (fa, wa), (fb, wb) in itertools.product(firsts(sa), firsts(sb)):
            out.append(([index[(a, b)] for a in range(fa, fa + sa) for b in range(fb, fb + sb)], 0.25 * wa * wb))
    return out


def posterior_mean_cbf(model, patches: np.ndarray, step: float = 0.04) -> np.ndarray:
    """Posterior mean of the centre's CBF (mL/100 g/min) for each patch of ``patches`` (n, 25, n_volumes) noisy
    ΔM/M0t in input order, under the prior of the module docstring (the Bayes computation)."""
    from scipy.special import i0e

    cbf = np.exp(np.arange(np.log(1.5), np.log(320.0), step))  # log grid: surround × ratio stays on it
    surround = np.flatnonzero((cbf >= 10.0) & (cbf <= 150.0))
    lo, hi = LESION_CBF[2]
    shifts = np.arange(int(round(np.log(lo) / step)), int(round(np.log(hi) / step)) + 1)
    atts = np.linspace(0.5, 3.5, 31)
    sigma2 = np.array([float(noise_sigma(model, s)) for s in np.exp(np.linspace(np.log(2.0), np.log(50.0), 17))])**2
    nu = cbf[:, None, None] * model.signal(np.column_stack([np.ones(atts.size), atts]))[None]  # (C, T, V)
    s2 = sigma2[:, None, None, None]
    log_prior = np.log(cbf[surround])[None, :, None]  # uniform CBF on a log grid: density ∝ CBF
    hypotheses = _lesion_hypotheses()
    estimates = np.empty(patches.shape[0])
    for i, patch in enumerate(patches):
        ll = np.stack([(np.log(m) - np.log(s2) - (m**2 + nu[None] ** 2) / (2 * s2) + np.log(i0e(m * nu[None] / s2))
                        + m * nu[None] / s2).sum(axis=3) for m in patch])  # (25, S, C, T)
        total = ll.sum(axis=0)
        evidence, means = [], []
        plain = total[:, surround, :] + log_prior
        top = plain.max()
        weight = np.exp(plain - top)
        evidence.append(np.log(0.5) + top + np.log(weight.sum()))
        means.append((weight.sum(axis=(0, 2)) * cbf[surround]).sum() / weight.sum())
        for cells, prior in hypotheses:
            inside = ll[cells].sum(axis=0)
            rest = total[:, surround, :] - inside[:, surround, :] + log_prior
            joint = rest[:, :, None, :] + np.stack([inside[:, surround + k, :] for k in shifts], axis=2)
            top = joint.max()
            weight = np.exp(joint - top)
            evidence.append(np.log(0.5 * prior / shifts.size) + top + np.log(weight.sum()))
            value = (cbf[surround][:, None] * np.exp(shifts * step)[None, :] if 0 in cells
                     else np.broadcast_to(cbf[surround][:, None], (surround.size, shifts.size)))
            means.append((weight.sum(axis=(0, 3)) * value).sum() / weight.sum())
        post = np.exp(np.array(evidence) - max(evidence))
        estimates[i] = float((post * np.array(means)).sum() / post.sum())
    return estimates


def _posterior_means_parallel(model, patches: np.ndarray, workers: int = 2) -> np.ndarray:
    """:func:`posterior_mean_cbf` over ``workers`` processes (the computation is ~1.5 s per patch; spawned:
    numba's OpenMP threads make fork unsafe)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    parts = np.array_split(patches, workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return np.concatenate(list(pool.map(posterior_mean_cbf, [model] * workers, parts)))


def bayes_kept(model, snr: float, trials: int) -> float:
    """Contrast kept by the posterior mean (module docstring) on ``trials`` noise draws of the case."""
    estimates = _posterior_means_parallel(model, case_signals(model, PLACEMENTS[0], snr, trials,
                                                              np.random.default_rng(1)))
    return (1.0 - float(np.mean(estimates)) / SURROUND_CBF) / (1.0 - LESION_RATIO)


#: the narrow families (``--narrow``): which of SNR, arrival and CBF range over the prior's ranges
FAMILIES = {"narrow": (), "snr": ("snr",), "att": ("att",), "all": ("snr", "att", "cbf")}


def family_draws(model, wide: tuple[str, ...], n: int, rng: np.random.Generator,
                 surround_cbf: tuple[float, float] = (0.0, 150.0)) -> tuple[np.ndarray, ...]:
    """``n`` patches of the family that is wide in ``wide`` (see ``--narrow``; with "cbf" the surround's
    CBF U(``surround_cbf``)): noisy ΔM/M0t (n, 25, n_volumes) in input order, the centre's CBF and arrival,
    the SNR and whether the centre is in the lesion."""
    hypotheses = _lesion_hypotheses()
    weights = np.array([w for _, w in hypotheses]) / sum(w for _, w in hypotheses)
    surround = rng.uniform(*(surround_cbf if "cbf" in wide else (40.0, 80.0)), n)
    att = rng.uniform(0.5, 3.5, n) if "att" in wide else np.full(n, ATT_S)
    snr = np.exp(rng.uniform(np.log(2.0), np.log(50.0), n)) if "snr" in wide else np.full(n, 3.0)
    cells = np.zeros((n, 25), dtype=bool)
    lesion = np.flatnonzero(rng.random(n) < 0.5)
    for row, h in zip(lesion, rng.choice(len(hypotheses), lesion.size, p=weights)):
        cells[row, hypotheses[h][0]] = True
    lo, hi = LESION_CBF[2]
    cbf = surround[:, None] * np.where(cells, np.exp(rng.uniform(np.log(lo), np.log(hi), n))[:, None], 1.0)
    clean = model.signal(np.column_stack([cbf.ravel(), np.repeat(att, 25)]))
    sigma = np.repeat(np.asarray(noise_sigma(model, snr), dtype=np.float64), 25)
    noisy = add_noise(clean, sigma, "rician", rng).reshape(n, 25, model.n_volumes)
    return noisy, cbf[:, 0], att, snr, cells[:, 0]


def patch_rows(model, patches: np.ndarray) -> np.ndarray:
    """Normalised network input rows of ``patches`` (n, 25, n_volumes), every neighbour present."""
    n = patches.shape[0]
    rows = np.ascontiguousarray(np.column_stack([patches.reshape(n, -1), np.ones((n, 24)), np.zeros(n)]))
    normalise_patches(rows, model.n_volumes, 24)
    return rows


def family_patches(model, wide: tuple[str, ...], n: int, rng: np.random.Generator) -> TrainingSet:
    """``n`` normalised training patches of the family that is wide in ``wide`` (see ``--narrow``)."""
    noisy, cbf, att, snr, _ = family_draws(model, wide, n, rng)
    return TrainingSet(patch_rows(model, noisy), np.column_stack([cbf, att]), snr)


def trained(estimator: SpatialEstimator, simulate) -> SpatialEstimator:
    """``estimator`` trained (its options) on the training and validation patches ``simulate(n, opts, rng)``."""
    opts, rng, n_val = estimator._training_start(None)
    train, val = (simulate(k, opts, rng) for k in (opts["n_samples"], n_val))
    estimator.network_, estimator.training_ = estimator._train(train, val, opts, rng, False)
    estimator.fitted_ = True
    return estimator


def family_network(model, wide: tuple[str, ...]) -> SpatialEstimator:
    """The spatial network (default options) trained on the family ``wide``."""
    return trained(SpatialEstimator(model), lambda n, _opts, rng: family_patches(model, wide, n, rng))


def seed_scatter(model, seeds: int, samples: int) -> None:
    """The exact case's contrast kept by the full prior's network trained with ``seeds`` training seeds."""
    for seed in range(seeds):
        estimator = SpatialEstimator(model, seed=seed)
        trained(estimator, estimator._simulated)
        kept = [network_kept(estimator, snr, samples) for snr in SNRS]
        print(f"training seed {seed}: validation loss {estimator.training_['validation_loss']:.5f}, contrast kept "
              + ", ".join(f"SNR {snr:g} {k:.3f}" for snr, k in zip(SNRS, kept)), flush=True)


def family_check(model, n: int) -> None:
    """The network trained on the family wide in all three (``--narrow``'s "all") against the Bayes posterior
    mean, which is its prior's (surround CBF 10-150: the grid's support), on ``n`` draws of the family and
    ``n // 5`` draws of the case with and without its lesion at SNR 3: root mean squared errors (mL/100 g/min)."""
    network = family_network(model, FAMILIES["all"])
    noisy, truth, _, _, in_lesion = family_draws(model, FAMILIES["all"], n, np.random.default_rng(7), (10.0, 150.0))
    bayes, net = _posterior_means_parallel(model, noisy), network._raw_predict(patch_rows(model, noisy))[:, 0]
    rmse = lambda e, t: float(np.sqrt(np.mean((e - t) ** 2)))  # noqa: E731
    paired = (net - truth) ** 2 - (bayes - truth) ** 2
    print(f"family draws ({n}): RMSE Bayes {rmse(bayes, truth):.2f}, network {rmse(net, truth):.2f} (difference of "
          f"the squared errors {paired.mean():.1f} ± {paired.std() / np.sqrt(n):.1f}); centre in a lesion "
          f"({in_lesion.sum()}): Bayes {rmse(bayes[in_lesion], truth[in_lesion]):.2f}, network "
          f"{rmse(net[in_lesion], truth[in_lesion]):.2f}", flush=True)
    means = {}
    for name, cells in (("lesion", PLACEMENTS[0]), ("none", set())):
        patches = case_signals(model, cells, 3.0, n // 5, np.random.default_rng(8))
        target = SURROUND_CBF * (LESION_RATIO if cells else 1.0)
        bayes, net = _posterior_means_parallel(model, patches), network._raw_predict(patch_rows(model, patches))[:, 0]
        means[name] = bayes.mean(), net.mean()
        print(f"case at SNR 3, {name}: mean (RMSE) Bayes {bayes.mean():.1f} ({rmse(bayes, target):.1f}), network "
              f"{net.mean():.1f} ({rmse(net, target):.1f})", flush=True)
    kept = [(1.0 - les / none) / (1.0 - LESION_RATIO) for les, none in zip(means["lesion"], means["none"])]
    print(f"contrast kept at SNR 3: Bayes {kept[0]:.3f}, network {kept[1]:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=300, help="noise draws of the Bayes computation (0: none)")
    parser.add_argument("--samples", type=int, default=20_000, help="noise draws of the network's mean")
    parser.add_argument("--narrow", action="store_true", help="also train on the narrow families")
    parser.add_argument("--seeds", type=int, default=0, help="also train the full prior's network with N seeds")
    parser.add_argument("--check", type=int, default=0, help="also compare the 'all' family's network with the "
                        "Bayes computation on N draws")
    args = parser.parse_args()
    model = get_model("1c", default_protocol("1c"))
    if args.seeds:
        seed_scatter(model, args.seeds, args.samples)
    if args.check:
        family_check(model, args.check)
    if args.narrow:
        for name, wide in FAMILIES.items():  # at SNR 3: the families narrow in SNR are trained there alone
            kept = network_kept(family_network(model, wide), 3.0, args.samples)
            print(f"family {name}: contrast kept at SNR 3 {kept:.3f}", flush=True)
    network = NetworkCache().get(get_estimator("spatial", model), progress=True)
    for snr in SNRS:
        bayes = f", by the Bayes posterior mean {bayes_kept(model, snr, args.trials):.3f}" if args.trials else ""
        kept = network_kept(network, snr, args.samples)
        print(f"SNR {snr:g}: contrast kept by the spatial network {kept:.3f}{bayes}", flush=True)


if __name__ == "__main__":
    main()
