"""A trained fully connected network as plain arrays, and its forward pass for inference.

Every network estimator (supervised, unsupervised) ends as a :class:`Network`: the
input standardisation, the layers (ReLU between them, linear output) and the map
from the last layer's output to parameters in API units:

- ``"affine"``: params = output · ``out_scale`` + ``out_shift`` (targets scaled per
  parameter for training);
- ``"sigmoid"``: params = ``out_shift`` + ``out_scale`` · sigmoid(output), i.e. lower +
  (upper − lower) · sigmoid (outputs squashed into bounds);
- ``"exp"``: params = exp(output · ``out_scale`` + ``out_shift``), applied in float32 inside the
  forward pass (a folded variance network's standard deviations and half-widths, never stored).

Inference runs in float32 in row chunks through BLAS matrix products, the chunks spread
over numba's thread count
(``benchmarks/bench_networks.py`` measures the speed, and ``tests/test_supervised.py``
bounds the difference to a float64 pass far below the network's own error). The arrays
round-trip exactly through :meth:`Network.to_arrays` / :meth:`Network.from_arrays`,
which is what :mod:`aslbatch.estimators.store` saves.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numba
import numpy as np
from threadpoolctl import ThreadpoolController

__all__ = ["OUTPUT_TRANSFORMS", "Network", "predict_together"]

OUTPUT_TRANSFORMS = ("affine", "sigmoid", "exp")
#: largest exponent of an "exp" output (float32 exp overflows above 88.7)
EXP_LIMIT = 80.0
#: rows per matrix product at inference: keeps the activations in cache
INFERENCE_CHUNK = 4096


@functools.lru_cache(maxsize=1)
def _blas_threads() -> ThreadpoolController:
    """The process's thread pools, found once (a search per prediction cost ~25 ms)."""
    return ThreadpoolController()


@dataclass(frozen=True)
class Network:
    """Weights and scalings of a trained network.

    Attributes
    ----------
    weights : per layer, (n_in, n_out) float64 so that next = previous @ W + b.
    biases : per layer, (n_out,) float64.
    in_shift, in_scale : input standardisation, x' = (x − in_shift) / in_scale.
    out_shift, out_scale : see the module docstring (API units of each parameter).
    output_transform : "affine" or "sigmoid".
    """

    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    in_shift: np.ndarray
    in_scale: np.ndarray
    out_shift: np.ndarray
    out_scale: np.ndarray
    output_transform: str = "affine"

    def __post_init__(self) -> None:
        if self.output_transform not in OUTPUT_TRANSFORMS:
            raise ValueError(f"output_transform must be one of {OUTPUT_TRANSFORMS}, got {self.output_transform!r}")
        if not self.weights or len(self.weights) != len(self.biases):
            raise ValueError("a network needs at least one layer and one bias vector per layer")
        width = self.in_shift.shape[0]
        if self.in_scale.shape != (width,) or np.any(~(self.in_scale > 0)):
            raise ValueError("input scale must be positive, one value per input")
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            if w.ndim != 2 or w.shape[0] != width or b.shape != (w.shape[1],):
                raise ValueError(f"layer {k}: weights {w.shape} and bias {b.shape} do not chain from width {width}")
            width = w.shape[1]
        if self.out_shift.shape != (width,) or self.out_scale.shape != (width,):
            raise ValueError(f"output scalings must have the {width} outputs of the last layer")
        arrays = (*self.weights, *self.biases, self.in_shift, self.in_scale, self.out_shift, self.out_scale)
        if not all(np.all(np.isfinite(a)) for a in arrays):
            raise ValueError("network arrays contain NaN or Inf")
        # float32 copies for inference, made once
        object.__setattr__(self, "_weights32", tuple(np.ascontiguousarray(w, dtype=np.float32) for w in self.weights))
        object.__setattr__(self, "_biases32", tuple(np.ascontiguousarray(b, dtype=np.float32) for b in self.biases))
        object.__setattr__(self, "_shift32", self.in_shift.astype(np.float32))
        object.__setattr__(self, "_inv_scale32", (1.0 / self.in_scale).astype(np.float32))
        # identity scalings (a folded network) cost no pass over the rows
        object.__setattr__(self, "_standardises", bool(np.any(self.in_shift != 0.0) or np.any(self.in_scale != 1.0)))
        object.__setattr__(self, "_scales_output", self.output_transform == "sigmoid" or bool(
            np.any(self.out_shift != 0.0) or np.any(self.out_scale != 1.0)))
        if self.output_transform == "exp" and self._scales_output:
            raise ValueError("an exp output takes identity output scalings (fold them into the last layer)")

    @property
    def n_inputs(self) -> int:
        """Width of the input (volumes, plus one for a slice-offset input)."""
        return int(self.in_shift.shape[0])

    @property
    def n_outputs(self) -> int:
        """Number of parameters predicted."""
        return int(self.out_shift.shape[0])

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        """Widths of the hidden layers."""
        return tuple(int(w.shape[1]) for w in self.weights[:-1])

    def output_to_params(self, out: np.ndarray) -> np.ndarray:
        """Map last-layer outputs (n, n_outputs) to parameters in API units, in place."""
        if not self._scales_output:
            return out
        if self.output_transform == "exp":  # the exponential was taken in the forward pass
            return out
        if self.output_transform == "sigmoid":
            out = 0.5 * (1.0 + np.tanh(0.5 * out))  # sigmoid without overflow
        out *= self.out_scale.astype(out.dtype)
        out += self.out_shift.astype(out.dtype)
        return out

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Parameters (n, n_outputs) float64 in API units for finite ``inputs`` (n, n_inputs).

        Row chunks run on numba's thread count (threads of this pool, one BLAS thread each:
        BLAS's own threads gain little on these small products and contend with numba's)."""
        return predict_together([(self, None)], inputs)[0]

    def _forward_chunk(self, x: np.ndarray, out: np.ndarray, start: int, extra: np.ndarray | None = None) -> None:
        """Last-layer outputs of rows start:start + INFERENCE_CHUNK, float32, into ``out``; ``extra``
        (n,): a last input column appended to ``x``."""
        rows = x[start:start + INFERENCE_CHUNK]
        if self._standardises:  # scaled in place: one float32 copy of the rows (and the extra column)
            h = np.empty((rows.shape[0], rows.shape[1] + (extra is not None)), dtype=np.float32)
            h[:, :rows.shape[1]] = rows
            if extra is not None:
                h[:, -1] = extra[start:start + INFERENCE_CHUNK]
            h -= self._shift32
            h *= self._inv_scale32
            extra = None
        else:  # a folded network reads the rows as they are (float32 input: no copy)
            h = np.asarray(rows, dtype=np.float32)
        last = len(self._weights32) - 1
        for k, (w, b) in enumerate(zip(self._weights32, self._biases32)):
            if k == 0 and extra is not None:  # the extra column's weights as a rank-one update, not a copy of the rows
                h = h @ w[:-1]
                h += np.multiply.outer(extra[start:start + INFERENCE_CHUNK].astype(np.float32), w[-1])
            else:
                h = h @ w
            h += b
            if k < last:
                np.maximum(h, 0.0, out=h)
        if self.output_transform == "exp":  # float32: exp overflows above 88.7
            np.minimum(h, EXP_LIMIT, out=h)
            np.exp(h, out=h)
        out[start:start + INFERENCE_CHUNK] = h

    def folded(self, exp_of: np.ndarray | None = None) -> "Network":
        """The same function of the inputs with the input standardisation folded into the first layer and the
        affine output map into the last (identity scalings): two passes over the rows fewer at inference,
        outputs equal up to float32 rounding. Only for an affine output. ``exp_of`` (n_outputs,): factors c;
        the folded network's outputs are then exp(c · output) ("exp" transform, taken inside the forward pass)."""
        if self.output_transform != "affine":
            raise ValueError("only a network with an affine output can be folded")
        weights, biases = list(self.weights), list(self.biases)
        weights[0] = self.weights[0] / self.in_scale[:, None]
        biases[0] = self.biases[0] - (self.in_shift / self.in_scale) @ self.weights[0]
        factor = np.ones(self.n_outputs) if exp_of is None else np.asarray(exp_of, dtype=np.float64)
        weights[-1] = weights[-1] * (self.out_scale * factor)[None, :]
        biases[-1] = (biases[-1] * self.out_scale + self.out_shift) * factor
        width = self.n_inputs
        return Network(tuple(weights), tuple(biases), np.zeros(width), np.ones(width), np.zeros(self.n_outputs),
                       np.ones(self.n_outputs), output_transform="affine" if exp_of is None else "exp")

    def predict_float64(self, inputs: np.ndarray) -> np.ndarray:
        """The same as :meth:`predict` in float64 throughout (reference for the float32 pass)."""
        h = (np.asarray(inputs, dtype=np.float64) - self.in_shift) / self.in_scale
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = h @ w + b
            if k < len(self.weights) - 1:
                h = np.maximum(h, 0.0)
        return np.exp(np.minimum(h, EXP_LIMIT)) if self.output_transform == "exp" else self.output_to_params(h)

    # --- plain arrays (for storage) ------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Every array by name: ``weight_<k>``, ``bias_<k>``, ``in_shift``, ``in_scale``,
        ``out_shift``, ``out_scale`` (float64)."""
        arrays = {}
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            arrays[f"weight_{k}"] = np.ascontiguousarray(w, dtype=np.float64)
            arrays[f"bias_{k}"] = np.ascontiguousarray(b, dtype=np.float64)
        for name in ("in_shift", "in_scale", "out_shift", "out_scale"):
            arrays[name] = np.ascontiguousarray(getattr(self, name), dtype=np.float64)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], output_transform: str) -> "Network":
        """Rebuild from :meth:`to_arrays`; a KeyError/ValueError names what is missing or wrong."""
        n_layers = sum(1 for key in arrays if key.startswith("weight_"))
        weights = tuple(np.asarray(arrays[f"weight_{k}"], dtype=np.float64) for k in range(n_layers))
        biases = tuple(np.asarray(arrays[f"bias_{k}"], dtype=np.float64) for k in range(n_layers))
        return cls(weights, biases, *(np.asarray(arrays[name], dtype=np.float64)
                                      for name in ("in_shift", "in_scale", "out_shift", "out_scale")),
                   output_transform=output_transform)


def predict_together(networks: Sequence[tuple[Network, np.ndarray | None]], inputs: np.ndarray) -> list[np.ndarray]:
    """:meth:`Network.predict` of several networks on the same finite ``inputs`` (n, n_inputs) in one pass
    over row chunks (one thread pool, each chunk through every network): per ``(network, extra)``, its
    parameters (n, n_outputs) float64; ``extra`` (n,) or None: a last input column of that network only."""
    x = np.asarray(inputs)
    if x.ndim != 2:
        raise ValueError(f"network inputs must have shape (n, n_inputs), got {x.shape}")
    n = x.shape[0]
    for network, extra in networks:
        width = x.shape[1] + (0 if extra is None else 1)
        if width != network.n_inputs or (extra is not None and np.shape(extra) != (n,)):
            raise ValueError(f"network inputs must have shape (n, {network.n_inputs}), got {x.shape}"
                             + ("" if extra is None else f" and an extra column of shape {np.shape(extra)}"))
    outs = [np.empty((n, network.n_outputs), dtype=np.float64) for network, _ in networks]

    def chunk(start: int) -> None:
        for (network, extra), out in zip(networks, outs):
            network._forward_chunk(x, out, start, extra)

    starts = range(0, n, INFERENCE_CHUNK)
    workers = min(numba.get_num_threads(), len(starts))
    if workers <= 1:
        for start in starts:
            chunk(start)
    else:
        with _blas_threads().limit(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
            list(pool.map(chunk, starts))
    return [network.output_to_params(out) for (network, _), out in zip(networks, outs)]
