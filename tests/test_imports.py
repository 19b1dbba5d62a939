"""Imports on demand: the command line, validation and a conventional (LM/LUT) run load neither
scikit-learn nor matplotlib, and ``aslbatch --help`` does not load numba.

Each check runs a fresh interpreter and reads its ``sys.modules`` after the work is done (the
independent record of what was imported)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

#: what neither the command line nor validation needs (scipy and PIL are left out: nibabel loads
#: them itself when it reads an image)
HEAVY = ("sklearn", "matplotlib", "dask", "SimpleITK", "numba")


def _modules_after(code: str, cwd: Path) -> set[str]:
    """Top-level packages in sys.modules after running ``code`` in a fresh interpreter."""
    probe = code + "\nimport sys, json\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    done = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_help_loads_no_numerics(tmp_path):
    code = ("from typer.testing import CliRunner\nfrom aslbatch.cli import app\n"
            "assert CliRunner().invoke(app, ['--help']).exit_code == 0\n"
            "assert CliRunner().invoke(app, ['run', '--help']).exit_code == 0")
    loaded = _modules_after(code, tmp_path)
    assert "aslbatch" in loaded
    assert not loaded & {"scipy", *HEAVY}, loaded & {"scipy", *HEAVY}


def test_validate_loads_no_heavy_library(tmp_path):
    from aslbatch.phantom import write_bids_dataset

    raw = write_bids_dataset(tmp_path / "raw", subjects=1, shape=(8, 8, 4), seed=1)
    code = (f"from typer.testing import CliRunner\nfrom aslbatch.cli import app\n"
            f"r = CliRunner().invoke(app, ['validate', {str(raw)!r}])\nassert r.exit_code == 0, r.output")
    loaded = _modules_after(code, tmp_path)
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


@pytest.mark.parametrize("method", ["lm", "lut"])
def test_conventional_run_loads_no_network_or_plotting_library(tmp_path, method):
    from aslbatch.phantom import write_bids_dataset

    raw = write_bids_dataset(tmp_path / "raw", subjects=1, shape=(8, 8, 4), seed=1)
    code = (f"from typer.testing import CliRunner\nfrom aslbatch.cli import app\n"
            f"r = CliRunner().invoke(app, ['run', {str(raw)!r}, {str(tmp_path / 'out')!r}, '--method', {method!r}, "
            f"'--no-report'])\nassert r.exit_code == 0, r.output")
    loaded = _modules_after(code, tmp_path)
    assert (tmp_path / "out" / "sub-01" / "perf" / f"sub-01_desc-{method}_cbf.nii.gz").is_file()
    assert not loaded & {"sklearn", "matplotlib", "dask", "SimpleITK"}, loaded


@pytest.mark.parametrize("flag", [[], ["--no-motion-correction"]], ids=["corrected", "not-corrected"])
def test_simpleitk_is_loaded_only_to_correct_motion(tmp_path, flag):
    from aslbatch.phantom import write_bids_dataset

    raw = write_bids_dataset(tmp_path / "raw", subjects=1, shape=(16, 16, 4), seed=1)  # big enough to register
    code = (f"from typer.testing import CliRunner\nfrom aslbatch.cli import app\n"
            f"r = CliRunner().invoke(app, ['run', {str(raw)!r}, {str(tmp_path / 'out')!r}, '--method', 'lm', "
            f"'--no-report', *{flag!r}])\nassert r.exit_code == 0, r.output")
    loaded = _modules_after(code, tmp_path)
    assert ("SimpleITK" in loaded) == (not flag), loaded & {"SimpleITK"}
