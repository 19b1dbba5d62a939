"""One DICOM series to one NIfTI image and its sidecar, with dcm2niix (the PyPI package's binary).

The series' files are linked (symlinks; copies where links are impossible) into a scratch folder
so that dcm2niix sees that series only; the DICOM tree is read, never written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["ConversionError", "dcm2niix_binary", "convert_series"]

#: a conversion taking longer than this (s) is stopped
TIMEOUT_S = 600


class ConversionError(RuntimeError):
    """dcm2niix is missing, failed, or did not give exactly one image for a series."""


def dcm2niix_binary() -> str:
    """Path of the dcm2niix executable: the ``dcm2niix`` Python package's, else one on PATH."""
    try:
        import dcm2niix

        if Path(dcm2niix.bin).is_file():
            return str(dcm2niix.bin)
    except ImportError:
        pass
    found = shutil.which("dcm2niix")
    if found is None:
        raise ConversionError("dcm2niix is not installed: pip install 'aslbatch[dicom]'")
    return found


def convert_series(files: list[Path], scratch: Path) -> tuple[Path, dict]:
    """Convert the DICOM ``files`` of one series into ``scratch``: the .nii.gz path and its JSON sidecar."""
    source = scratch / "dicom"
    out = scratch / "nifti"
    source.mkdir(parents=True)
    out.mkdir()
    for i, path in enumerate(files):
        link = source / f"{i:06d}.dcm"
        try:
            os.symlink(path.resolve(), link)
        except OSError:
            shutil.copyfile(path, link)
    done = subprocess.run(
        [dcm2niix_binary(), "-b", "y", "-z", "y", "-f", "series", "-o", str(out), str(source)],
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    images = sorted(out.glob("*.nii.gz"))
    if done.returncode != 0 or len(images) != 1:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ConversionError(f"dcm2niix gave {len(images)} image(s) (exit {done.returncode}) where one was "
                              f"expected: {' / '.join(tail)}")
    sidecar = images[0].with_name(images[0].name[: -len(".nii.gz")] + ".json")
    return images[0], json.loads(sidecar.read_text()) if sidecar.exists() else {}
