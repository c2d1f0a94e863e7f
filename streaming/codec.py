"""Feature vectors on the wire: base64 float32, or a plain JSON list of numbers.

The compact form is ``{"dtype": "float32", "shape": [n], "b64": "..."}`` where
``b64`` holds the ``n`` little-endian float32 values in standard base64. A plain
list of numbers is accepted too (hand-written events, other languages' producers).

Decoding checks everything a dead letter could be about and raises `VectorError`
with a machine-readable reason; it does not know the model's dimensions (the
caller compares the length with what the model expects).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = ["VectorError", "VectorProblem", "decode_vector", "encode_vector"]

# A subset of streaming.events.DeadLetterReason, kept as plain strings so that this
# module stays below events.py (which imports it) and has no import cycle.
VectorProblem = Literal["bad_base64", "wrong_dimension", "non_finite", "invalid"]

_WIRE_DTYPE = np.dtype("<f4")  # float32, little-endian whatever the host's byte order
_ENCODED_KEYS = frozenset({"dtype", "shape", "b64"})


class VectorError(ValueError):
    """A feature vector that cannot be used.

    Attributes:
        reason: why, as a dead-letter reason ("bad_base64", "wrong_dimension",
            "non_finite" or "invalid").
        detail: a short human-readable explanation.
    """

    def __init__(self, reason: VectorProblem, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: VectorProblem = reason
        self.detail = detail


def encode_vector(values: npt.ArrayLike) -> dict[str, Any]:
    """Encode a 1-D vector in the compact wire form.

    Args:
        values: anything numpy reads as a 1-D array of numbers; it is cast to float32.

    Returns:
        ``{"dtype": "float32", "shape": [n], "b64": "..."}``, ready for ``json.dumps``.

    Raises:
        ValueError: if ``values`` is not one-dimensional.
    """
    array = np.asarray(values, dtype=_WIRE_DTYPE)
    if array.ndim != 1:
        raise ValueError(f"expected a 1-D vector, got shape {array.shape}")
    return {
        "dtype": "float32",
        "shape": [int(array.shape[0])],
        "b64": base64.b64encode(array.tobytes()).decode("ascii"),
    }


def decode_vector(obj: object) -> npt.NDArray[np.float32]:
    """Decode a vector from its wire form (the compact dict or a list of numbers).

    Args:
        obj: the JSON value as parsed: a dict with exactly ``dtype``, ``shape`` and
            ``b64``, or a list of ints and floats (booleans are not numbers here).

    Returns:
        A 1-D float32 array with finite values (read-only when decoded from base64).

    Raises:
        VectorError: ``bad_base64`` for invalid base64 or a payload whose length does
            not match ``shape``; ``non_finite`` for NaN, Inf or values beyond float32;
            ``invalid`` for any other malformed value.
    """
    if isinstance(obj, Mapping):
        array = _decode_encoded(obj)
    elif isinstance(obj, list):
        array = _decode_list(obj)
    else:
        raise VectorError("invalid", f"expected an encoded vector or a list, got {_kind(obj)}")
    if not np.isfinite(array).all():
        raise VectorError("non_finite", "vector holds NaN or Inf")
    return array


def _decode_encoded(obj: Mapping[Any, Any]) -> npt.NDArray[np.float32]:
    if set(obj) != _ENCODED_KEYS:
        # An unknown key could change what the bytes mean (a scale, a byte order):
        # refuse it rather than guess.
        raise VectorError("invalid", f"encoded vector keys must be {sorted(_ENCODED_KEYS)}")
    if obj["dtype"] != "float32":
        raise VectorError("invalid", f"unsupported dtype {obj['dtype']!r}, expected 'float32'")
    shape = obj["shape"]
    if not (
        isinstance(shape, list) and len(shape) == 1 and type(shape[0]) is int and shape[0] >= 0
    ):
        raise VectorError("invalid", f"shape must be [n] with n >= 0, got {shape!r}")
    text = obj["b64"]
    if not isinstance(text, str):
        raise VectorError("invalid", f"b64 must be a string, got {_kind(text)}")
    try:
        payload = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: non-ASCII characters
        raise VectorError("bad_base64", f"invalid base64: {exc}") from exc
    if len(payload) != 4 * shape[0]:
        raise VectorError(
            "bad_base64",
            f"payload has {len(payload)} bytes, shape [{shape[0]}] needs {4 * shape[0]}",
        )
    return np.frombuffer(payload, dtype=_WIRE_DTYPE).astype(np.float32, copy=False)


def _decode_list(values: list[Any]) -> npt.NDArray[np.float32]:
    for index, value in enumerate(values):
        if type(value) not in (int, float):  # excludes bool, a subclass of int
            raise VectorError("invalid", f"element {index} is {_kind(value)}, not a number")
    try:
        # Values beyond float32 become Inf, which the caller reports as non_finite.
        with np.errstate(over="ignore"):
            return np.array(values, dtype=np.float32)
    except OverflowError as exc:  # an integer too large even for float64
        raise VectorError("non_finite", "a value is too large for float32") from exc


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__
