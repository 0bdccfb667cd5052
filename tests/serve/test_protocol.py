"""The wire codec against openpi's published one (``openpi_client.msgpack_numpy``), and what it refuses."""

from __future__ import annotations

import pickle
from pathlib import Path

import msgpack
import numpy as np
import pytest
from openpi_client import msgpack_numpy as openpi_codec

from nora_edge.errors import InputError
from nora_edge.serve import Metrics, ServeConfig, ServeInputError, ServeProtocolError
from nora_edge.serve.protocol import pack, unpack

DTYPES = (np.uint8, np.int8, np.int32, np.int64, np.uint16, np.float16, np.float32, np.float64, np.bool_)


def _sample() -> dict:
    rng = np.random.default_rng(0)
    obs = {f"a_{np.dtype(t).name}": (rng.random((3, 4, 2)) * 100).astype(t) for t in DTYPES}
    obs["nested"] = {"image": rng.integers(0, 256, (5, 6, 3), dtype=np.uint8), "empty": np.zeros((0, 3))}
    obs["scalar"] = np.float32(1.5)
    obs["prompt"] = "pick up the cup"
    obs["list"] = [1, 2.5, "x", None]
    return obs


def _assert_same(a, b) -> int:
    """Deep equality with dtypes and shapes; returns how many arrays were compared."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b)
        return sum(_assert_same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray | np.generic):
        assert isinstance(b, type(a)) and a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)
        return 1
    assert a == b
    return 0


def test_openpi_packed_decodes_exactly():
    obs = _sample()
    assert _assert_same(obs, unpack(openpi_codec.packb(obs))) == len(DTYPES) + 3


def test_reply_decodes_with_openpi_client():
    obs = _sample()
    assert _assert_same(obs, openpi_codec.unpackb(pack(obs))) == len(DTYPES) + 3


def test_arrays_are_read_only_views():
    arr = unpack(openpi_codec.packb({"x": np.arange(6, dtype=np.int32)}))["x"]
    assert not arr.flags.writeable


def _array_map(dtype, shape, data) -> dict:
    return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}


BAD = [
    ("not msgpack", b"\xc1\xc1\xc1", "not valid msgpack"),
    ("truncated", openpi_codec.packb({"prompt": "x" * 40})[:-5], "not valid msgpack"),
    ("trailing bytes", openpi_codec.packb({"a": 1}) + b"\x01", "not valid msgpack"),
    ("top-level list", msgpack.packb([1, 2]), "must be a msgpack map"),
    ("int map key", msgpack.packb({1: 2}), "not valid msgpack"),
    ("ext type", msgpack.packb({"a": msgpack.ExtType(5, b"xx")}), "extension type 5"),
    ("object dtype", msgpack.packb({"a": _array_map("|O", [1], b"\0" * 8)}), "dtype '|O'"),
    ("unicode dtype", msgpack.packb({"a": _array_map("<U2", [1], b"\0" * 8)}), "dtype '<U2'"),
    ("void dtype", msgpack.packb({"a": _array_map("|V8", [1], b"\0" * 8)}), "dtype '|V8'"),
    (
        "structured dtype",
        msgpack.packb({"a": _array_map("[('a','<f4')]", [1], b"\0" * 4)}),
        "is not accepted",
    ),
    ("complex dtype", msgpack.packb({"a": _array_map("<c8", [1], b"\0" * 8)}), "dtype '<c8'"),
    (
        "size mismatch",
        msgpack.packb({"a": _array_map("|u1", [2, 3], b"\0" * 5)}),
        "needs 6 bytes, data has 5",
    ),
    ("negative dim", msgpack.packb({"a": _array_map("|u1", [-1], b"")}), "non-negative ints"),
    ("shape not a list", msgpack.packb({"a": _array_map("|u1", 3, b"\0" * 3)}), "'shape' must be a list"),
    ("too many dims", msgpack.packb({"a": _array_map("|u1", [1] * 9, b"\0")}), "at most 8"),
    ("data not bytes", msgpack.packb({"a": _array_map("|u1", [1], "x")}), "'data' must be bytes"),
    (
        "generic not a number",
        msgpack.packb({"a": {b"__npgeneric__": True, b"data": "1", b"dtype": "<f4"}}),
        "number",
    ),
    ("text frame", "{}", "text frame"),
]


@pytest.mark.parametrize(("data", "needle"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_messages_are_refused_by_name(data, needle):
    with pytest.raises(ServeProtocolError) as e:
        unpack(data)
    assert needle in str(e.value)
    assert isinstance(e.value, ServeInputError) and isinstance(e.value, InputError)


class _Touch:
    """Unpickling this creates a file: the proof that nothing was unpickled is that the file never appears."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_nothing_is_unpickled(tmp_path: Path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Touch(marker))
    pickle.loads(payload)  # the payload does what it says ...
    assert marker.exists()
    marker.unlink()
    messages = [
        payload,  # a bare pickle
        msgpack.packb({"image": _array_map("|O", [1], payload), "prompt": "x"}),  # an object array of it
        msgpack.packb({"image": {b"__npgeneric__": True, b"data": payload, b"dtype": "|O"}}),
    ]
    for data in messages:  # ... and the codec refuses every carrier of it
        with pytest.raises(ServeProtocolError):
            unpack(data)
    assert not marker.exists()


def test_pack_refuses_object_arrays():
    with pytest.raises(TypeError, match="object"):
        pack({"a": np.array([object()])})


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_connections": 0}, "max_connections must be an int >= 1, got 0"),
        ({"max_message_bytes": 1.5}, "max_message_bytes must be an int >= 1, got 1.5"),
        ({"max_frame_pixels": True}, "max_frame_pixels must be an int >= 1, got True"),
        ({"workers": -2}, "workers must be an int >= 1, got -2"),
        ({"image_key": ""}, "image_key must be a non-empty str"),
        ({"prompt_key": "unnorm_key"}, "prompt_key must be a non-empty str other than 'unnorm_key'"),
        ({"image_key": "prompt"}, "image_key and prompt_key are both 'prompt'"),
        ({"api_key": "has space"}, "api_key must be a non-empty printable str without spaces"),
        ({"api_key": ""}, "api_key must be a non-empty"),
    ],
)
def test_config_names_the_bad_value(kwargs, needle):
    with pytest.raises(InputError) as e:
        ServeConfig(**kwargs)
    assert needle in str(e.value)
    assert "has space" not in str(e.value)  # the key is never echoed
    assert "has space" not in repr(ServeConfig(api_key="secret-1"))


def test_metrics_text_format():
    m = Metrics()
    samples = [0.0004, 0.003, 0.003, 0.2, 40.0]
    for s in samples:
        m.observe("vision", s)
    m.request(True)
    m.request(False)
    m.error('Odd"Type')
    text = m.render()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    p = "nora_edge_serve_"
    assert lines[f'{p}requests_total{{outcome="ok"}}'] == "1"
    assert lines[f'{p}errors_total{{type="Odd\\"Type"}}'] == "1"
    # cumulative buckets against a count by hand
    for le in ("0.0005", "0.005", "0.25", "30.0", "+Inf"):
        bound = float("inf") if le == "+Inf" else float(le)
        assert int(lines[f'{p}stage_seconds_bucket{{stage="vision",le="{le}"}}']) == sum(
            s <= bound for s in samples
        )
    assert int(lines[f'{p}stage_seconds_count{{stage="vision"}}']) == len(samples)
    assert float(lines[f'{p}stage_seconds_sum{{stage="vision"}}']) == pytest.approx(sum(samples))
