"""The ``aslbatch`` command line: thin typer commands over the library modules.

Commands: ``simulate`` (a simulated set with known parameters) and ``fit`` (run an
estimator on such a set).

Exit codes: 0 success; 2 usage or configuration error (bad option, unreadable
or invalid input file).
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._version import __version__

app = typer.Typer(
    name="aslbatch",
    help="Quantitative perfusion maps (CBF, ATT, aCBV) from multi-delay ASL MRI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: exit code for usage or configuration errors
EXIT_USAGE = 2


class ModelName(str, Enum):
    one = "1c"
    two = "2c"


class T1PrimeName(str, Enum):
    blood = "blood"
    tissue = "tissue"


class MethodName(str, Enum):
    lm = "lm"
    lut = "lut"


class NoiseName(str, Enum):
    rician = "rician"
    gaussian = "gaussian"


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print ``aslbatch: error: message`` on stderr and exit with ``code``."""
    typer.echo(f"aslbatch: error: {message}", err=True)
    raise typer.Exit(code)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"aslbatch {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Quantitative perfusion maps (CBF, ATT, aCBV) from multi-delay ASL MRI."""


def _load_protocol(path: Optional[Path], model: str):
    from .protocol import Protocol, ProtocolError, default_protocol

    if path is None:
        return default_protocol(model)
    try:
        return Protocol.from_json(path.read_text())
    except OSError as exc:
        fail(f"{path}: cannot read protocol file ({exc.strerror})")
    except ProtocolError as exc:
        fail(f"{path}: {exc}")


@app.command()
def simulate(
    out: Annotated[Path, typer.Option("--out", help="Output .npz file (written atomically).")],
    model: Annotated[ModelName, typer.Option(help="Kinetic model: 1c (cbf, att) or 2c (cbf, abv, abat, att).")] = ModelName.one,
    n: Annotated[int, typer.Option("--n", min=1, help="Number of parameter sets.")] = 10000,
    snr: Annotated[float, typer.Option(help="SNR = S_ref / σ (S_ref: peak signal of a cbf 60, att 1.2 s voxel).")] = 5.0,
    noise: Annotated[NoiseName, typer.Option(help="Noise model of the magnitude data.")] = NoiseName.rician,
    repeats: Annotated[int, typer.Option(min=1, help="Noise realisations per parameter set.")] = 1,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same data.")] = 0,
    protocol: Annotated[
        Optional[Path],
        typer.Option(help="Protocol JSON {label_duration, pld, crushed} in s; default: the model's default protocol."),
    ] = None,
    t1_prime: Annotated[T1PrimeName, typer.Option(help="T1' of the tissue signal: blood (consensus) or tissue (Buxton).")] = T1PrimeName.blood,
    arterial_edge_s: Annotated[float, typer.Option(help="2C only: width (s) of the smoothed arterial window; 0 = hard edges.")] = 0.0,
) -> None:
    """Simulate ASL signals (ΔM/M0t) with known parameters and noise at a stated SNR.

    The .npz holds params (API units: cbf mL/100 g/min, times s, abv mL/mL),
    clean and noisy signals, sigma, snr, group, the protocol and constants.
    """
    from .models import get_model
    from .protocol import Constants, ProtocolError
    from .simulate import set_summary
    from .simulate import simulate as run_simulation

    if not snr > 0:
        fail(f"--snr must be > 0, got {snr}")
    prot = _load_protocol(protocol, model.value)
    try:
        constants = Constants(t1_prime=t1_prime.value)
        options = {"arterial_edge_s": arterial_edge_s} if model is ModelName.two else {}
        if model is ModelName.one and arterial_edge_s:
            fail("--arterial-edge-s applies to the 2c model only")
        kinetic = get_model(model.value, prot, constants, **options)
    except (ProtocolError, ValueError) as exc:
        fail(str(exc))
    data = run_simulation(kinetic, n, snr, noise=noise.value, repeats=repeats, seed=seed)
    try:
        data.save(out)
    except OSError as exc:
        fail(f"{out}: cannot write ({exc.strerror})")
    typer.echo(json.dumps({"out": str(out), **set_summary(data)}))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())


@app.command()
def fit(
    input_path: Annotated[Path, typer.Option("--in", help="Simulated set (.npz) from 'aslbatch simulate'.")],
    out: Annotated[Path, typer.Option("--out", help="Output .npz file (written atomically).")],
    model: Annotated[ModelName, typer.Option(help="Kinetic model to fit; must match the input set.")] = ModelName.one,
    method: Annotated[MethodName, typer.Option(help="Estimator: lm (Levenberg-Marquardt) or lut (lookup table).")] = MethodName.lm,
) -> None:
    """Estimate parameters from a simulated set and write them with the truth beside them.

    The .npz holds params (API units), status, stderr (NaN where not available), rss,
    param_names, method, and truth (the set's true params). A summary with the median
    absolute error per parameter is printed as JSON.
    """
    import numpy as np

    from .atomic import atomic_path
    from .estimators import get_estimator
    from .simulate import SimulatedSet

    try:
        data = SimulatedSet.load(input_path)
    except ValueError as exc:
        fail(str(exc))
    if data.model.name != model.value:
        fail(f"{input_path}: the set was simulated with model {data.model.name!r}, not {model.value!r}")
    estimator = get_estimator(method.value, data.model).fit()
    estimate = estimator.predict(data.signals)
    stderr = estimate.stderr if estimate.stderr is not None else np.full_like(estimate.params, np.nan)
    try:
        with atomic_path(out, suffix=".npz") as tmp:
            np.savez(
                tmp,
                params=estimate.params,
                status=estimate.status,
                stderr=stderr,
                rss=estimate.rss,
                param_names=np.array(estimate.param_names),
                method=np.array(estimate.method),
                truth=data.params,
            )
    except OSError as exc:
        fail(f"{out}: cannot write ({exc.strerror})")
    error = np.nanmedian(np.abs(estimate.params - data.params), axis=0)
    typer.echo(json.dumps({
        "out": str(out),
        "method": estimate.method,
        "voxels": estimate.n_voxels,
        "status": estimate.status_counts(),
        "median_abs_error": dict(zip(estimate.param_names, map(float, error))),
    }))
