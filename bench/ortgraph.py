"""Build small ONNX Runtime graphs with in-memory weights, for microbenchmarks and one-layer timings.

Data flow: :class:`GraphBuilder` collects nodes and numpy initializers -> :meth:`GraphBuilder.session` declares
every initializer as external and hands the arrays to ORT through ``SessionOptions.add_external_initializers``
(no protobuf copy of hundreds of MB) -> an ``InferenceSession`` on the CPU provider.

Linear layers come in the precisions the bundles use on the host: fp32 / fp16 ``MatMul``, int8 dynamic
quantization (``DynamicQuantizeLinear`` + ``MatMulInteger``, what ``quantize_dynamic`` emits) and int4
weight-only ``MatMulNBits`` (block 128, accuracy_level 4). Weight values are random: timing does not depend on them.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from nora_edge.errors import InputError

INT4_BLOCK = 128
INLINE_BYTES = 1024  # smaller arrays (shapes, scalars) are stored in the graph, as exporters do
_ONNX_TYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8,
}


class GraphBuilder:
    """Accumulates an ONNX graph whose weights live in numpy arrays.

    Args:
        float_type: activation dtype (float32 or float16).
        seed: weight RNG seed.
    """

    def __init__(self, float_type: type = np.float32, seed: int = 0) -> None:
        self.float_type = np.dtype(float_type)
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inputs: list = []
        self.outputs: list = []
        self.weights: dict[str, np.ndarray] = {}
        self._count = 0

    def fresh(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def add_input(self, name: str, shape: list, dtype: type | None = None) -> str:
        self.inputs.append(
            helper.make_tensor_value_info(name, _ONNX_TYPES[np.dtype(dtype or self.float_type)], shape)
        )
        return name

    def add_output(self, name: str, dtype: type | None = None) -> None:
        self.outputs.append(
            helper.make_tensor_value_info(name, _ONNX_TYPES[np.dtype(dtype or self.float_type)], None)
        )

    def weight(self, prefix: str, array: np.ndarray) -> str:
        name = self.fresh(prefix)
        self.weights[name] = np.ascontiguousarray(array)
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, domain=domain or None, **attrs))
        return outs

    def const(self, values: list | np.ndarray, dtype: type = np.int64) -> str:
        return self.weight("const", np.asarray(values, dtype=dtype))

    def linear(self, x: str, k: int, n: int, precision: str, bias: bool = False) -> str:
        """y (..., n) = x (..., k) @ W (k, n) [+ b] in ``precision`` (fp32 | fp16 | int8 | int4)."""
        if precision in ("fp32", "fp16"):
            w = self.weight("w", (self.rng.standard_normal((k, n)) * k**-0.5).astype(self.float_type))
            (y,) = self.op("MatMul", [x, w])
        elif precision == "int8":
            xq, xs, xz = self.op("DynamicQuantizeLinear", [x], n_out=3)
            wq = self.weight("wq", self.rng.integers(-127, 128, (k, n), dtype=np.int8))
            wz = self.weight("wz", np.zeros((), np.int8))
            (acc,) = self.op("MatMulInteger", [xq, wq, xz, wz])
            (accf,) = self.op("Cast", [acc], to=_ONNX_TYPES[self.float_type])
            (scale,) = self.op("Mul", [xs, self.weight("ws", np.asarray(k**-0.5 / 127, np.float32))])
            (y,) = self.op("Mul", [accf, scale])
        elif precision == "int4":
            blocks = -(-k // INT4_BLOCK)
            packed = self.weight(
                "wq4", self.rng.integers(0, 256, (n, blocks, INT4_BLOCK // 2), dtype=np.uint8)
            )
            scales = self.weight("ws4", np.full((n * blocks,), k**-0.5 / 8, dtype=self.float_type))
            (y,) = self.op(
                "MatMulNBits",
                [x, packed, scales],
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=INT4_BLOCK,
                accuracy_level=4,
            )
        else:
            raise InputError(f"linear precision {precision!r}; expected fp32, fp16, int8 or int4")
        if bias:
            (y,) = self.op("Add", [y, self.weight("b", np.zeros(n, self.float_type))])
        return y

    def weight_bytes(self) -> int:
        return sum(a.nbytes for a in self.weights.values())

    def model(self, inline_small: bool = True) -> onnx.ModelProto:
        """The graph as a ModelProto; weights over 1 KB (all weights if not ``inline_small``) carry dims and
        dtype only, their data stays in numpy."""
        limit = INLINE_BYTES if inline_small else -1
        inits = [numpy_helper.from_array(a, n) for n, a in self.weights.items() if a.nbytes <= limit]
        for name, arr in self.weights.items():
            if arr.nbytes <= limit:
                continue
            t = TensorProto(name=name, data_type=_ONNX_TYPES[arr.dtype], dims=list(arr.shape))
            t.data_location = TensorProto.EXTERNAL
            entry = t.external_data.add()
            entry.key, entry.value = "location", f"in-memory/{name}"
            inits.append(t)
        graph = helper.make_graph(self.nodes, "bench", self.inputs, self.outputs, inits)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        )
        model.ir_version = 9
        return model

    def session(self, threads: int | None = None) -> ort.InferenceSession:
        """An ORT CPU session over the graph; weights handed over in memory."""
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        names = [n for n, a in self.weights.items() if a.nbytes > INLINE_BYTES]
        values = [ort.OrtValue.ortvalue_from_numpy(self.weights[n]) for n in names]
        opts.add_external_initializers(names, values)
        model = self.model().SerializeToString()
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def time_session(sess: ort.InferenceSession, feeds: dict, reps: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        sess.run(None, feeds)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        out.append(time.perf_counter() - t0)
    return out
