"""The ONNX graph walker against independent references: torch's FlopCounterMode and parameter bytes of the
module a graph was exported from, numpy byte counts of hand-built ORT graphs, and the analytic layer model."""

from __future__ import annotations

import numpy as np
import pytest

from nora_edge.bench import layers
from nora_edge.bench.models import LmDims, VitDims
from nora_edge.bench.onnx_cost import graph_cost
from nora_edge.bench.ortgraph import GraphBuilder
from nora_edge.bench.roofline import PrecisionPlan, StageCost, lm_layer_ops, vit_ops
from nora_edge.errors import InputError

LM = LmDims(2, 256, 704, 4, 2, 64, 1000, tied=True, qkv_bias=True, head_rows=1000)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small conv + MLP + attention-like module exported with a dynamic 'seq' dim, and its torch twin."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 16, kernel_size=4, stride=4)
            self.fc1 = torch.nn.Linear(16, 64)
            self.fc2 = torch.nn.Linear(64, 32, bias=False)

        def forward(self, img, x):
            feat = self.conv(img).flatten(2).transpose(1, 2)  # (1, 64, 16)
            h = torch.relu(self.fc1(x))  # (1, S, 64)
            scores = h @ h.transpose(1, 2)  # (1, S, S)
            return self.fc2(scores.softmax(-1) @ h), feat

    net = Net().eval()
    path = tmp_path_factory.mktemp("onnx") / "net.onnx"
    img, x = torch.randn(1, 3, 32, 32), torch.randn(1, 7, 16)
    torch.onnx.export(
        net, (img, x), str(path), input_names=["img", "x"], dynamic_axes={"x": {1: "seq"}}, dynamo=False
    )
    return net, path


def _torch_flops(net, seq):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(torch.randn(1, 3, 32, 32), torch.randn(1, seq, 16))
    return fc.get_total_flops()


@pytest.mark.parametrize("seq", [5, 23])
def test_walker_flops_match_flop_counter(exported, seq):
    net, path = exported
    cost = graph_cost(path, {"seq": seq})
    assert cost.matmul_flops == _torch_flops(net, seq)


def test_walker_weight_bytes_are_the_parameters(exported):
    net, path = exported
    cost = graph_cost(path, {"seq": 9})
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    matmul_weights = sum(o.weight_bytes for o in cost.ops if o.kind == "matmul")
    assert params <= cost.weight_bytes < params + 256  # + the small shape constants
    assert matmul_weights == pytest.approx(params, abs=256)


def test_missing_dim_value_names_the_input_and_dim(exported):
    _, path = exported
    with pytest.raises(InputError, match="input 'x' has dynamic dim 'seq'"):
        graph_cost(path, {})


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="ONNX file not found"):
        graph_cost(tmp_path / "nope.onnx", {})


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_quantized_linear_bytes_and_precision(precision):
    g = GraphBuilder(np.float32)
    x = g.add_input("x", [3, 256])
    g.add_output(g.linear(x, 256, 640, precision))
    cost = graph_cost(g.model(), {})
    (mm,) = [o for o in cost.ops if o.kind == "matmul"]
    assert mm.flops == 2 * 3 * 256 * 640
    assert mm.precision == precision and mm.rows == 3  # activation rows of the weight product
    # weight bytes = every array the builder made for this linear (packed int4 + scales, int8 + scales)
    assert cost.weight_bytes == g.weight_bytes()


@pytest.mark.parametrize(("precision", "new", "past"), [("fp32", 10, 0), ("fp32", 1, 17), ("int4", 1, 17)])
def test_walked_decoder_layer_matches_the_analytic_layer(precision, new, past):
    g, _ = layers.decoder_layer(LM, new, past, precision)
    walked = graph_cost(g.model(), {})
    analytic = StageCost(
        "a", tuple(lm_layer_ops(LM, new, past, PrecisionPlan.preset(precision, host=True), "l"))
    )
    assert walked.matmul_flops == analytic.matmul_flops
    # the analytic model leaves out the norm weights and pads nothing; int4 blocks pad K = 704 to 768
    assert walked.weight_bytes == pytest.approx(analytic.weight_bytes, rel=0.03)


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_decode_step_weight_products_are_gemvs(precision):
    g, _ = layers.decoder_layer(LM, 1, 17, precision)
    walked = graph_cost(g.model(), {})
    analytic = lm_layer_ops(LM, 1, 17, PrecisionPlan.preset(precision, host=True), "l")
    weighted = [o for o in walked.ops if o.kind == "matmul" and o.weight_bytes > 0]
    assert len(weighted) == 7 and all(o.rows == 1 for o in weighted)  # q, k, v, o, gate, up, down
    assert {o.rows for o in analytic if o.weight_bytes > 0} == {1}
    prefill = graph_cost(layers.decoder_layer(LM, 10, 0, precision)[0].model(), {})
    assert {o.rows for o in prefill.ops if o.kind == "matmul" and o.weight_bytes > 0} == {10}


def test_walked_vit_blocks_match_the_analytic_blocks():
    v = VitDims(
        "vit",
        8,
        64,
        128,
        4,
        1176,
        256,
        gated_mlp=True,
        norm_params=128,
        window=tuple(None if i == 7 else 64 for i in range(8)),
    )
    for layer in (0, 7):  # a window block and a full-attention block
        g, _ = layers.vit_layer(v, layer, "fp32")
        walked = graph_cost(g.model(), {})
        ops = [
            o
            for o in vit_ops(v, PrecisionPlan.preset("fp32", host=True))
            if o.name.startswith(f"vit.{layer}.")
        ]
        assert walked.matmul_flops == StageCost("a", tuple(ops)).matmul_flops


def test_built_graphs_run_in_onnxruntime():
    g, feeds = layers.decoder_layer(LM, 3, 5, "int4")
    outs = g.session(threads=1).run(None, feeds)
    assert outs[-1].shape == (1, 3, LM.hidden) and np.isfinite(outs[-1]).all()
