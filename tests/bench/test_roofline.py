"""The analytic roofline against independent references: HF transformers parameter counts (models built on the
meta device at real dims) and torch's FlopCounterMode on small HF models; then the predictor's behaviour and the
efficiency calibration stored in the profiles."""

from __future__ import annotations

from dataclasses import replace

import pytest

from nora_edge.bench import calibrate
from nora_edge.bench.models import NORA_3B_CONFIG, LmDims, nora_3b, nora_spec_from_config, openvla_7b
from nora_edge.bench.roofline import (
    PrecisionPlan,
    StageCost,
    analytic_stage_costs,
    lm_layer_ops,
    predict_inference,
    predict_stage_ms,
    weight_footprint_bytes,
)
from nora_edge.errors import InputError
from nora_edge.profiles import Quantity, load_profile

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

HOST_FP32 = PrecisionPlan.preset("fp32", host=True)  # unfused: attention products are separate ops
SMALL = {
    "tie_word_embeddings": True,
    "text_config": {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "intermediate_size": 384,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
        "tie_word_embeddings": True,
    },
    "vision_config": {
        "depth": 4,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 4,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 128,
        "window_size": 112,
        "fullatt_block_indexes": [1],
    },
}


def _qwen_model(cfg: dict, meta: bool = False):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLConfig(
        text_config={**cfg["text_config"], "tie_word_embeddings": True},
        vision_config=cfg["vision_config"],
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    if meta:
        with torch.device("meta"):
            return Qwen2_5_VLForConditionalGeneration(hf)
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(hf).eval()


def _count_flops(fn) -> int:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    return fc.get_total_flops()


def test_nora_parameter_count_matches_hf_at_real_dims():
    model = _qwen_model(NORA_3B_CONFIG, meta=True)
    spec = nora_spec_from_config(NORA_3B_CONFIG, generated_tokens=2, horizon=1)
    hf = sum(p.numel() for p in model.parameters())
    assert spec.vision_params() + spec.extra_params + spec.lm.total_params() == hf
    vision_hf = sum(p.numel() for p in model.model.visual.parameters())
    assert spec.vision_params() + spec.extra_params == vision_hf


def test_openvla_parts_match_hf_parameter_counts():
    from transformers import (
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        LlamaConfig,
        LlamaForCausalLM,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    spec = openvla_7b()
    dino_t, siglip_t = spec.vision
    with torch.device("meta"):
        dino = Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(
                hidden_size=1024,
                num_hidden_layers=24,
                num_attention_heads=16,
                intermediate_size=4096,
                patch_size=14,
                image_size=224,
                num_register_tokens=4,
            )
        )
        siglip = SiglipVisionModel(
            SiglipVisionConfig(
                hidden_size=1152,
                num_hidden_layers=27,
                num_attention_heads=16,
                intermediate_size=4304,
                patch_size=14,
                image_size=224,
            )
        )
        llama = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=4096,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
                intermediate_size=11008,
                vocab_size=32000,
                tie_word_embeddings=False,
            )
        )
    assert sum(p.numel() for p in dino.encoder.layer[0].parameters()) == dino_t.block_params()
    layer = next(m for n, m in siglip.named_modules() if n.endswith("encoder.layers.0"))
    assert sum(p.numel() for p in layer.parameters()) == siglip_t.block_params()
    assert sum(p.numel() for p in llama.parameters()) == spec.lm.total_params() == 6_738_415_616


def test_vision_flops_match_flop_counter():
    model = _qwen_model(SMALL)
    spec = nora_spec_from_config(SMALL, generated_tokens=2, horizon=1)
    pixels, grid = torch.randn(256, 1176), torch.tensor([[1, 16, 16]])
    hf = _count_flops(lambda: model.model.visual(pixels, grid_thw=grid))
    assert analytic_stage_costs(spec, HOST_FP32)["vision"].matmul_flops == hf


@pytest.mark.parametrize(("new", "past"), [(30, 0), (12, 9), (1, 40)])
def test_decoder_flops_match_flop_counter(new, past):
    model = _qwen_model(SMALL)
    lm_hf = model.model.language_model
    spec = nora_spec_from_config(SMALL, generated_tokens=2, horizon=1)
    cache = None
    if past:
        with torch.no_grad():
            cache = lm_hf(inputs_embeds=torch.randn(1, past, 128), use_cache=True).past_key_values
    emb = torch.randn(1, new, 128)
    hf = _count_flops(lambda: lm_hf(inputs_embeds=emb, past_key_values=cache, use_cache=True))
    layers = StageCost(
        "x", tuple(op for k in range(2) for op in lm_layer_ops(spec.lm, new, past, HOST_FP32, str(k)))
    )
    assert layers.matmul_flops == hf


def test_llama_layer_flops_match_flop_counter():
    from transformers import LlamaConfig, LlamaModel

    lm = LmDims(2, 96, 256, 6, 6, 16, 500, tied=False, qkv_bias=False, head_rows=500)
    cfg = LlamaConfig(
        hidden_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=6,
        intermediate_size=256,
        vocab_size=500,
        attn_implementation="eager",
    )
    model = LlamaModel(cfg).eval()
    emb = torch.randn(1, 20, 96)
    hf = _count_flops(lambda: model(inputs_embeds=emb))
    ours = StageCost("x", tuple(op for k in range(2) for op in lm_layer_ops(lm, 20, 0, HOST_FP32, str(k))))
    assert ours.matmul_flops == hf
    assert (
        sum(p.numel() for p in model.parameters()) == lm.total_params() - lm.vocab * lm.hidden
    )  # no lm_head


def test_head_flops_match_flop_counter():
    model = _qwen_model(SMALL)
    spec = nora_spec_from_config(SMALL, generated_tokens=2, horizon=1)
    hidden = torch.randn(1, 1, 128)
    hf = _count_flops(lambda: model.lm_head(hidden))
    assert analytic_stage_costs(spec, HOST_FP32)["action_head"].matmul_flops == hf


def test_fp32_footprint_is_four_bytes_per_hf_parameter():
    spec = nora_3b(5, action_head_rows=None)  # tied full-vocab head: shares the embedding
    hf = sum(p.numel() for p in _qwen_model(NORA_3B_CONFIG, meta=True).parameters())
    total = sum(weight_footprint_bytes(spec, PrecisionPlan.preset("fp32")).values())
    assert total == pytest.approx(4 * hf, rel=1e-4)  # norms outside the layers are the only difference


def _with_bandwidth(profile, factor):
    mem = dict(profile.memory)
    mem["bandwidth_gbs"] = Quantity(mem["bandwidth_gbs"].value * factor, "test")
    return replace(profile, memory=mem)


def test_decode_is_memory_bound_and_scales_with_bandwidth():
    agx = load_profile("orin-agx-64gb")
    costs = analytic_stage_costs(nora_3b(5), PrecisionPlan.preset("int4"))
    base = predict_stage_ms(costs["decode_token"], agx)
    fast = predict_stage_ms(costs["decode_token"], _with_bandwidth(agx, 2.0))
    assert base["compute_bound_share"] == 0.0
    assert fast["ms"] == pytest.approx(base["ms"] / 2, rel=1e-9)
    # prefill of ~80 tokens on AGX is compute bound: bandwidth barely matters
    pre = predict_stage_ms(costs["prefill"], agx)
    assert pre["compute_bound_share"] > 0.9
    assert predict_stage_ms(costs["prefill"], _with_bandwidth(agx, 2.0))["ms"] > 0.95 * pre["ms"]


def test_int4_decode_speedup_follows_the_weight_bytes():
    agx = load_profile("orin-agx-64gb")
    spec = nora_3b(5)
    fp16 = predict_inference(spec, PrecisionPlan.preset("fp16"), agx)["stages"]["decode_token"]
    int4 = predict_inference(spec, PrecisionPlan.preset("int4"), agx)["stages"]["decode_token"]
    bytes_ratio = 2.0 / (0.5 + 2 / 128)
    assert fp16 / int4 == pytest.approx(bytes_ratio, rel=0.1)


def test_e2e_counts_each_stage_the_right_number_of_times():
    agx = load_profile("orin-agx-64gb")
    spec = nora_3b(5)
    pred = predict_inference(spec, PrecisionPlan.preset("int4"), agx)
    st = pred["stages"]
    expect = st["vision"] + st["prefill"] + (spec.generated_tokens - 1) * st["decode_token"]
    expect += spec.generated_tokens * st["action_head"]
    assert pred["e2e_ms"] == pytest.approx(expect, rel=1e-12)
    assert pred["actions_per_s"] == pytest.approx(5 * 1e3 / expect, rel=1e-12)


def test_stored_efficiency_is_the_calibration_output():
    cal = calibrate.calibrate_efficiency()
    for name in ("orin-agx-64gb", "orin-agx-32gb", "orin-nx-16gb", "orin-nano-8gb"):
        eff = load_profile(name).efficiency
        assert eff["compute"].value == pytest.approx(cal["compute"], abs=0.006), name
        assert eff["memory"].value == pytest.approx(cal["memory"], abs=0.006), name
    for ref, (pred, meas) in cal["fit"].items():
        assert abs(pred / meas - 1) < 0.15, ref
    # held out of the fit: OpenVLA-7B measured on AGX Orin (MLC INT4 336 ms, FP16 840 ms)
    for ref, (pred, meas) in cal["holdout"].items():
        assert abs(pred / meas - 1) < 0.15, ref


def test_bad_lengths_and_plans_are_refused():
    with pytest.raises(InputError, match="cached_prefix_tokens < prompt_tokens"):
        nora_3b(5).with_lengths(prompt_tokens=10, cached_prefix_tokens=10)
    with pytest.raises(InputError, match="generated_tokens must be a non-negative int"):
        nora_3b(5).with_lengths(generated_tokens=2.5)
    with pytest.raises(InputError, match="unknown precision plan 'int3'"):
        PrecisionPlan.preset("int3")
    with pytest.raises(InputError, match="horizon 1 .* or 5"):
        nora_3b(3)
