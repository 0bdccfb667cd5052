"""openpi's msgpack-numpy wire codec, decoded defensively (no pickle, no object arrays, limits enforced).

Data flow: WebSocket binary frame (bytes) --msgpack (no ext types, str/bytes map keys)--> Python objects in which
every map ``{b"__ndarray__": True, b"data": bytes, b"dtype": str, b"shape": [int, ...]}`` becomes a read-only
numpy array (and ``{b"__npgeneric__": True, b"data": x, b"dtype": str}`` a numpy scalar) --> observation dict.
Replies go the other way with the same two map shapes, which is what ``openpi_client.msgpack_numpy.unpackb``
turns back into arrays (openpi repo, ``packages/openpi-client/src/openpi_client/msgpack_numpy.py``).

Safety: msgpack itself never runs code; array maps are checked before numpy sees them: the dtype string must be a
plain bool/int/uint/float type (never object, void, structured, string or datetime), the shape a list of at most
:data:`MAX_NDIM` non-negative ints whose product times the item size equals the byte length of ``data``, and the
array is a read-only view of the received bytes (``np.frombuffer``), never ``np.ndarray(buffer=...)`` with a
client-chosen dtype. Everything wrong raises :class:`ServeProtocolError` naming the problem.
"""

from __future__ import annotations

import re

import msgpack
import numpy as np

from nora_edge.errors import InputError

__all__ = ["MAX_NDIM", "ServeInputError", "ServeProtocolError", "pack", "unpack"]

MAX_NDIM = 8  # deepest array shape accepted (camera frames are 3-D)
_DTYPE_RE = re.compile(r"^[<>|=]?[biuf][1248]$")  # numpy dtype.str of bool/int/uint/float, e.g. "|u1", "<f4"


class ServeInputError(InputError):
    """An observation the server refuses (missing key, wrong frame shape/dtype, over-long instruction, ...)."""


class ServeProtocolError(ServeInputError):
    """A message that is not an openpi msgpack-numpy map (not msgpack, a text frame, a malformed array map)."""


def _dtype(spec: object, where: str) -> np.dtype:
    if isinstance(spec, bytes):
        spec = spec.decode("ascii", "replace")
    if not isinstance(spec, str) or not _DTYPE_RE.match(spec):
        raise ServeProtocolError(
            f"{where}: dtype {spec!r} is not accepted (only bool, int, uint and float arrays, e.g. '|u1', '<f4')"
        )
    return np.dtype(spec)


def _ndarray(obj: dict) -> np.ndarray:
    dtype = _dtype(obj.get(b"dtype"), "ndarray")
    shape, data = obj.get(b"shape"), obj.get(b"data")
    if not isinstance(data, bytes):
        raise ServeProtocolError(f"ndarray: 'data' must be bytes, got {type(data).__name__}")
    if not isinstance(shape, list | tuple) or len(shape) > MAX_NDIM:
        raise ServeProtocolError(f"ndarray: 'shape' must be a list of at most {MAX_NDIM} ints, got {shape!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
        raise ServeProtocolError(f"ndarray: 'shape' must hold non-negative ints, got {shape!r}")
    count = 1
    for s in shape:
        count *= s  # Python ints: no overflow
    if count * dtype.itemsize != len(data):
        raise ServeProtocolError(
            f"ndarray: shape {list(shape)} of {dtype.str} needs {count * dtype.itemsize} bytes, data has {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)  # read-only view of the message bytes


def _generic(obj: dict) -> np.generic:
    dtype = _dtype(obj.get(b"dtype"), "npgeneric")
    value = obj.get(b"data")
    if not isinstance(value, bool | int | float):
        raise ServeProtocolError(f"npgeneric: 'data' must be a number, got {type(value).__name__}")
    try:
        return dtype.type(value)
    except (OverflowError, ValueError, TypeError) as e:
        raise ServeProtocolError(f"npgeneric: {value!r} does not fit {dtype.str} ({e})") from e


def _object_hook(obj: dict) -> object:
    if b"__ndarray__" in obj:
        return _ndarray(obj)
    if b"__npgeneric__" in obj:
        return _generic(obj)
    return obj


def _no_ext(code: int, data: bytes) -> object:
    raise ServeProtocolError(f"msgpack extension type {code} is not accepted")


def unpack(data: bytes | str) -> dict:
    """Decode one request frame into an observation dict.

    Args:
        data: the WebSocket message (a text frame arrives as str and is refused).

    Returns:
        dict with str keys; arrays are read-only numpy views of ``data``.

    Raises:
        ServeProtocolError: a text frame, not msgpack, trailing bytes, an extension type, a malformed array map,
            or a top-level value that is not a map with str keys.
    """
    if isinstance(data, str):
        raise ServeProtocolError("expected a binary msgpack frame, got a text frame")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ServeProtocolError(f"expected bytes, got {type(data).__name__}")
    try:
        obj = msgpack.unpackb(
            data, raw=False, object_hook=_object_hook, ext_hook=_no_ext, strict_map_key=True, timestamp=0
        )
    except ServeProtocolError:
        raise
    except Exception as e:  # msgpack's ExtraData, FormatError, StackError, UnicodeDecodeError, ValueError
        raise ServeProtocolError(f"message is not valid msgpack ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ServeProtocolError(
            f"the message must be a msgpack map (an observation dict), got {type(obj).__name__}"
        )
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise ServeProtocolError(f"observation keys must be str, got {bad[:3]!r}")
    return obj


def _pack_default(obj: object) -> object:
    if isinstance(obj, np.ndarray | np.generic) and obj.dtype.kind not in "biuf":
        raise TypeError(f"cannot send a {obj.dtype} array")
    if isinstance(obj, np.ndarray):
        return {
            b"__ndarray__": True,
            b"data": obj.tobytes(),
            b"dtype": obj.dtype.str,
            b"shape": list(obj.shape),
        }
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send a {type(obj).__name__}")


def pack(obj: object) -> bytes:
    """Encode a reply (or the metadata) the way openpi's ``msgpack_numpy.packb`` does.

    Args:
        obj: dicts, lists, str, numbers, None and numeric numpy arrays / scalars.

    Raises:
        TypeError: an object or a numpy dtype the wire format does not carry.
    """
    return msgpack.packb(obj, default=_pack_default, use_bin_type=True)
