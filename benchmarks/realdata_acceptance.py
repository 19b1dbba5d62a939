"""Acceptance on real scanner DICOM (issue 19): every series of ../shared/realdata through
``aslbatch import`` and ``aslbatch run``, with the figures the closing note reports.

    python benchmarks/realdata_acceptance.py [REALDATA_DIR] [WORK_DIR]

REALDATA_DIR defaults to ``../shared/realdata`` beside the repository (the folder CI lays out);
where it does not exist the script says so and exits 0 (nothing to check). WORK_DIR (default a
temporary folder) receives the BIDS dataset and the maps.

Checks, each computed here independently of aslbatch's code paths:
- the DICOM tree's sha256 digest is unchanged by the import;
- every series is imported into BIDS that ``aslbatch validate`` accepts, or refused with a reason;
- a second import imports nothing;
- Philips 3D pCASL: Pearson r between ΔM (mean control − mean label of the aslcontext, clipped at
  0 as the scanner writes it) and the scanner's own difference image, in the run's brain mask: >= 0.95;
- Siemens 2D PASL: median CBF in the brain of aslbatch's white-paper map against the white-paper
  formula (Alsop 2015) evaluated here: CBF = 6000 λ ΔM exp(TI_z / T1b) / (2 α TI1 M0), with
  M0 = volume 0 / (1 − exp(−TR / T1t)), TI_z = TI + the slice's acquisition time: within 10 %;
- Siemens 3D PASL (background suppressed, no M0 exported): no absolute CBF map; in a second run
  with the data as stored (``--no-motion-correction --no-robust-averaging``, so that the images
  read here are those averaged) its ΔM map equals mean control − mean label computed here (to 1e-4
  relative) and its relative CBF is that ΔM over its brain median (3D: one readout time); the
  correlation of the default run's relative CBF with the same subject's 3D pCASL CBF is reported
  (raw and after smoothing with σ = 2 voxels).
Exit status 1 when a check fails.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PARAMS = Path(__file__).with_name("realdata_study_params.toml")


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def aslbatch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from aslbatch.cli import app; app()", *args],
                          capture_output=True, text=True, cwd=REPO)


def canonical(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.as_closest_canonical(nib.load(path)).get_fdata(dtype=np.float64))


def context(asl: Path) -> list[str]:
    return asl.with_name(asl.name.replace("_asl.nii.gz", "_aslcontext.tsv")).read_text().split()[1:]


def philips_r(bids: Path, out: Path) -> float:
    asl = next(bids.glob("sub-*/ses-*/perf/*pCASL*_asl.nii.gz"))
    meta = json.loads(asl.with_name(asl.name.replace(".nii.gz", ".json")).read_text())
    scanner = canonical(bids / meta["ImportProvenance"]["ScannerReference"])
    data, types = canonical(asl), context(asl)
    control = data[..., [i for i, t in enumerate(types) if t == "control"]].mean(axis=3)
    label = data[..., [i for i, t in enumerate(types) if t == "label"]].mean(axis=3)
    mask = canonical(next(out.rglob(asl.name.replace("_asl.nii.gz", "_desc-brain_mask.nii.gz")))) > 0
    return float(np.corrcoef(np.clip(control - label, 0, None)[mask], scanner[mask])[0, 1])


def pasl_2d_ratio(bids: Path, out: Path) -> tuple[float, float]:
    import nibabel as nib

    asl = next(bids.glob("sub-*/ses-*/perf/*pasl2d*_asl.nii.gz"))
    meta = json.loads(asl.with_name(asl.name.replace(".nii.gz", ".json")).read_text())
    data, types = np.asarray(nib.load(asl).get_fdata(dtype=np.float64)), context(asl)
    lam, alpha, t1b, t1t = 0.9, 0.98, 1.65, 1.3   # white paper (Alsop 2015), 3 T; PASL α 0.98
    ti, ti1, tr = meta["PostLabelingDelay"], meta["BolusCutOffDelayTime"], meta["RepetitionTimePreparation"]
    slice_time = np.asarray(meta["SliceTiming"]) - min(meta["SliceTiming"])
    m0 = data[..., types.index("m0scan")] / (1 - np.exp(-tr / t1t))
    deltam = (data[..., [i for i, t in enumerate(types) if t == "control"]].mean(axis=3)
              - data[..., [i for i, t in enumerate(types) if t == "label"]].mean(axis=3))
    with np.errstate(divide="ignore", invalid="ignore"):
        cbf = 6000 * lam * deltam * np.exp((ti + slice_time[None, None, :]) / t1b) / (2 * alpha * ti1 * m0)
    stem = asl.name.replace("_asl.nii.gz", "")
    ours = np.asarray(nib.load(next(out.rglob(f"{stem}_desc-whitepaper_cbf.nii.gz"))).get_fdata())
    mask = np.asarray(nib.load(next(out.rglob(f"{stem}_desc-brain_mask.nii.gz"))).get_fdata()) > 0
    return float(np.nanmedian(ours[mask])), float(np.nanmedian(cbf[mask]))


def pasl_3d_relative(bids: Path, out: Path) -> tuple[float, float, float, float]:
    """(largest relative ΔM difference, largest rcbf difference, r raw, r smoothed) for the 3D PASL
    series without M0 (see the module doc); raises AssertionError if an absolute CBF map exists."""
    import nibabel as nib
    from scipy.ndimage import gaussian_filter

    asl = next(bids.glob("sub-*/ses-*/perf/*pasl3d*_asl.nii.gz"))
    stem = asl.name.replace("_asl.nii.gz", "")
    assert not list(out.rglob(f"{stem}_*_cbf.nii.gz")), "an absolute CBF map was written without an M0"
    data, types = np.asarray(nib.load(asl).get_fdata(dtype=np.float64)), context(asl)
    deltam = (data[..., [i for i, t in enumerate(types) if t == "control"]].mean(axis=3)
              - data[..., [i for i, t in enumerate(types) if t == "label"]].mean(axis=3))
    load = lambda name: np.asarray(nib.load(next(out.rglob(f"{name}.nii.gz"))).get_fdata())  # noqa: E731
    mask = load(f"{stem}_desc-brain_mask") > 0
    ours, rcbf = load(f"{stem}_desc-whitepaper_deltam"), load(f"{stem}_desc-whitepaper_rcbf")
    fitted = mask & np.isfinite(ours)  # not the voxels whose every pair is exactly 0 (invalid input)
    d_deltam = float(np.max(np.abs(ours[fitted] - deltam[fitted])) / np.max(np.abs(deltam[fitted])))
    d_rcbf = float(np.max(np.abs(rcbf[fitted] - deltam[fitted] / np.median(deltam[fitted]))))
    pcasl = next(out.rglob("*pcasl3d*_desc-whitepaper_cbf.nii.gz"))
    other_mask = np.asarray(nib.load(pcasl.with_name(pcasl.name.replace("whitepaper_cbf", "brain_mask"))).get_fdata()) > 0
    both = mask & other_mask
    a, b = np.nan_to_num(rcbf) * both, np.nan_to_num(np.asarray(nib.load(pcasl).get_fdata())) * both
    raw = float(np.corrcoef(a[both], b[both])[0, 1])
    smooth = float(np.corrcoef(gaussian_filter(a, 2)[both], gaussian_filter(b, 2)[both])[0, 1])
    return d_deltam, d_rcbf, raw, smooth


def main(argv: list[str]) -> int:
    realdata = Path(argv[1]) if len(argv) > 1 else REPO.parent / "shared" / "realdata"
    if not realdata.is_dir():
        print(f"{realdata}: no real scanner data here; nothing to check")
        return 0
    work = Path(argv[2]) if len(argv) > 2 else Path(tempfile.mkdtemp(prefix="aslbatch-realdata-"))
    bids, out = work / "bids", work / "maps"
    failures = []
    before = digest(realdata)
    done = aslbatch("import", str(realdata), str(bids), "--study-params", str(PARAMS))
    print(done.stdout, end="")
    print(done.stderr, end="")
    rerun = aslbatch("import", str(realdata), str(bids), "--study-params", str(PARAMS))
    if "nothing" not in rerun.stderr:
        failures.append(f"a second import was not empty: {rerun.stderr.strip()}")
    if digest(realdata) != before:
        failures.append("the DICOM tree changed")
    manifest = json.loads((bids / "sourcedata" / "aslbatch-import" / "manifest.json").read_text())
    for record in manifest["series"].values():
        if record["status"] == "refused" and not record["reason"]:
            failures.append(f"{record['description']}: refused without a reason")
    check = aslbatch("validate", str(bids))
    print(check.stdout, end="")
    if check.returncode != 0:
        failures.append(f"aslbatch validate found problems: {check.stdout.strip()}")
    run = aslbatch("run", str(bids), str(out), "--method", "lm")
    print(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "")
    if run.returncode != 0:
        failures.append(f"aslbatch run failed: {run.stderr.strip()[-500:]}")
    else:
        r = philips_r(bids, out)
        print(f"Philips 3D pCASL: r(ΔM, scanner difference image) = {r:.3f} (needs >= 0.95)")
        if r < 0.95:
            failures.append(f"Philips r = {r:.3f} < 0.95")
        ours, formula = pasl_2d_ratio(bids, out)
        print(f"Siemens 2D PASL: median CBF {ours:.2f} (aslbatch) vs {formula:.2f} mL/100 g/min (white-paper "
              f"formula here): ratio {ours / formula:.3f} (needs within 10 %)")
        if abs(ours / formula - 1) > 0.10:
            failures.append(f"2D PASL CBF ratio {ours / formula:.3f} off by more than 10 %")
        as_stored = work / "maps-as-stored"
        plain = aslbatch("run", str(bids), str(as_stored), "--method", "lm", "--no-motion-correction",
                         "--no-robust-averaging")
        try:
            if plain.returncode != 0:
                raise AssertionError(f"the run with the data as stored failed: {plain.stderr.strip()[-300:]}")
            d_deltam, d_rcbf, _, _ = pasl_3d_relative(bids, as_stored)
            _, _, raw, smooth = pasl_3d_relative(bids, out)
        except AssertionError as exc:
            failures.append(f"Siemens 3D PASL: {exc}")
        else:
            print(f"Siemens 3D PASL without M0 (data as stored): ΔM map vs mean control − mean label here: largest "
                  f"relative difference {d_deltam:.1e}; rcbf vs ΔM / its brain median: {d_rcbf:.1e} (both need < 1e-4); "
                  f"r(rcbf, the pCASL CBF of the same subject) = {raw:.2f} raw, {smooth:.2f} smoothed (σ 2 voxels)")
            if not (d_deltam < 1e-4 and d_rcbf < 1e-4):
                failures.append("Siemens 3D PASL: ΔM or relative CBF differ from the computation here")
    for failure in failures:
        print("FAILED:", failure)
    print(f"realdata acceptance: {'failed' if failures else 'passed'} ({work})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
