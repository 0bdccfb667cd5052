"""export_bundle end to end: manifest contents vs the checkpoint, options, refusals, crash safety."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nora_edge import bundle, names
from nora_edge.bundle import Bundle
from nora_edge.checkpoint import NoraCheckpoint
from nora_edge.errors import CheckpointError, ExportError


def test_prompt_section_spells_the_nora_template(tiny_bundle: Path, tiny_ckpt: Path):
    from tokenizers import Tokenizer

    b = Bundle.load(tiny_bundle)
    tok = Tokenizer.from_file(str(b.file(b.prompt.tokenizer)))
    decode = lambda ids: tok.decode(list(ids), skip_special_tokens=False)  # noqa: E731
    system = f"<|im_start|>system\n{names.DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
    assert decode(b.prompt.prefix_ids) == system + "<|im_start|>user\n<|vision_start|>"
    assert decode(b.prompt.suffix_ids) == "<|im_end|>\n<|im_start|>assistant\n"
    ckpt = NoraCheckpoint.load(tiny_ckpt)
    assert b.prompt.image_pad_id == ckpt.token_ids["image_pad"]
    assert b.prompt.vision_end_id == ckpt.token_ids["vision_end"]
    assert b.prompt.mrope["section"] == ckpt.config["rope_scaling"]["mrope_section"]
    assert b.manifest["validation"]["prompt_ids"]["passed"]


def test_actions_generation_codec_norm_stats(tiny_bundle: Path, tiny_ckpt: Path):
    from tokenizers import Tokenizer

    from nora_edge.actions.bytetable import ByteTable

    b = Bundle.load(tiny_bundle)
    ckpt = NoraCheckpoint.load(tiny_ckpt)
    gen = json.loads((tiny_ckpt / names.GENERATION_CONFIG).read_text())
    n = ckpt.num_action_tokens
    np.testing.assert_array_equal(b.actions.head_rows[:n], np.arange(ckpt.action_base, ckpt.action_base + n))
    assert tuple(b.actions.head_rows[n:].tolist()) == b.actions.end_ids
    assert b.actions.end_ids[0] == ckpt.token_ids["im_end"]
    assert set(gen["eos_token_id"]) <= set(b.actions.end_ids)
    assert b.generation.eos_token_ids == tuple(gen["eos_token_id"])
    assert b.generation.repetition_penalty == gen["repetition_penalty"]
    # Qwen2.5-VL-3B-Instruct's generation_config has no length field: HF makes its default 20 new tokens
    assert "max_new_tokens" not in gen and "max_length" not in gen
    assert b.generation.max_new_tokens is None and b.generation.max_length is None
    assert "20 new tokens" in b.manifest["generation"]["length_rule"]
    fast = json.loads((tiny_ckpt / "fast" / names.FAST_PROCESSOR_CONFIG).read_text())
    assert (b.codec.scale, b.codec.min_token, b.codec.vocab_size) == (fast["scale"], fast["min_token"], n)
    assert (b.codec.time_horizon, b.codec.action_dim) == (ckpt.time_horizon, ckpt.action_dim)
    table = ByteTable.load(b.file(b.codec.byte_table))
    fast_tok = Tokenizer.from_file(str(b.file(b.codec.tokenizer)))
    assert table.vocab_size == fast_tok.get_vocab_size() == b.manifest["codec"]["bpe_vocab_size"]
    assert (table.min_token, table.scale) == (fast["min_token"], fast["scale"])
    for key, stats in ckpt.norm_stats.items():
        assert b.norm_stats[key].q01.tolist() == stats.q01.tolist()
        assert b.norm_stats[key].q99.tolist() == stats.q99.tolist()


def test_embeddings_image_and_source(tiny_bundle: Path, tiny_ckpt: Path, tiny_model):
    from nora_edge.bundle import sha256_file
    from nora_edge.preprocess import ImageSpec

    b = Bundle.load(tiny_bundle)
    table = np.load(b.file(b.embeddings["file"]))
    ref = tiny_model.get_input_embeddings().weight.detach().numpy()
    assert table.dtype == np.float16 and list(table.shape) == b.embeddings["shape"] == list(ref.shape)
    np.testing.assert_array_equal(table, ref.astype(np.float16))
    assert ImageSpec.from_manifest(b.image).grid_thw() == (1, 16, 16)
    src = b.manifest["source_checkpoint"]
    assert src["sha256"][names.CONFIG] == sha256_file(tiny_ckpt / names.CONFIG)
    v = b.manifest["validation"]
    for stage in ("vision", "decoder_prefill", "decoder_decode", "decoder_table", "preprocess", "policy"):
        assert v[stage]["passed"], stage
    # the default bundle's fp16 table: checked against HF with its inputs rounded alike, at the graph
    # tolerance, while the rounding itself visibly moves the (fp32-weight) tiny model's logits
    assert v["decoder_table"]["table_dtype"] == "float16"
    assert v["decoder_table"]["max_rel_err"] <= v["decoder_table"]["tolerance"]
    assert v["decoder_table"]["rounding_effect_max_rel"] > v["decoder_prefill"]["max_rel_err"]
    policy = v["policy"]
    assert (policy["pairs"], policy["head"], policy["embeddings_dtype"]) == (3, "action", "float16")
    # random weights: NORA's reference is malformed on every pair; each one is classified, none compared
    assert policy["well_formed"] == policy["ids_equal"] == policy["actions_compared"] == 0
    assert sum(n for k, n in policy["malformed"].items() if k != "pairs") == policy["malformed"]["pairs"] == 3
    assert sum(policy["token_classes"].values()) > 0


def test_options_h5_full_head_dynamic_vision(tiny_ckpt_h5: Path, tmp_path: Path):
    from nora_edge.export.pipeline import FIDELITY_REPORT, export_bundle

    out = export_bundle(
        tiny_ckpt_h5,
        tmp_path / "b",
        head="full",
        specialise_224=False,
        embeddings_dtype="float32",
        validation_prompts=2,
        report=True,
        progress=False,
    )
    b = Bundle.load(out)
    assert b.codec.time_horizon == 5
    assert b.actions.head == "full" and b.actions.head_rows.size == b.embeddings["shape"][0]
    assert len(b.components["vision"].inputs) == 6 and b.components["vision"].meta["grid_thw"] is None
    assert b.embeddings["dtype"] == "float32" and b.manifest["validation"]["embeddings"]["max_abs_err"] == 0.0
    assert b.manifest["validation"]["vision"]["grids"] == [[1, 16, 16], [1, 12, 20], [1, 18, 22]]
    report = json.loads(b.file(FIDELITY_REPORT).read_text())
    assert report["validation"] == b.manifest["validation"]
    # a full head is also run unconstrained (HF parity): same ids as NORA's reference on every pair, and it
    # raises exactly where the reference is malformed (random weights, T=5: HF's 20 new tokens run out)
    parity, policy = b.manifest["validation"]["hf_parity"], b.manifest["validation"]["policy"]
    assert parity["pairs"] == parity["ids_equal"] == 2 and parity["passed"]
    assert parity["raised"] == parity["reference_malformed"] == 2 - policy["well_formed"]
    assert policy["embeddings_dtype"] == "float32" and policy["head"] == "full"


@pytest.mark.parametrize("stage", ["vision", "codec"])
def test_failure_midway_leaves_nothing(tiny_ckpt: Path, tmp_path: Path, stage: str):
    from nora_edge.export.pipeline import export_bundle

    out = tmp_path / "b"
    with pytest.raises(ExportError, match=f"after stage '{stage}'"):
        export_bundle(tiny_ckpt, out, validate=False, progress=False, _fail_after=stage)
    assert list(tmp_path.iterdir()) == []


def test_over_tolerance_is_refused(tiny_ckpt: Path, tmp_path: Path, monkeypatch):
    from nora_edge.export import validate
    from nora_edge.export.pipeline import export_bundle

    monkeypatch.setitem(validate.TOLERANCES, "vision", 1e-12)
    with pytest.raises(ExportError, match=r"validation failed for \['vision'\]"):
        export_bundle(tiny_ckpt, tmp_path / "b", validation_prompts=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_option_errors(tiny_ckpt: Path, tmp_path: Path):
    from nora_edge.export.pipeline import export_bundle

    with pytest.raises(ExportError, match="unknown quantization recipe 'int3'"):
        export_bundle(tiny_ckpt, tmp_path / "b", precision="int3", progress=False)
    with pytest.raises(ExportError, match="multiple of 28"):
        export_bundle(tiny_ckpt, tmp_path / "b", image_size=230, progress=False)
    with pytest.raises(ExportError, match="head"):
        export_bundle(tiny_ckpt, tmp_path / "b", head="actions", progress=False)
    with pytest.raises(ExportError, match="validation_prompts"):
        export_bundle(tiny_ckpt, tmp_path / "b", validation_prompts=0, progress=False)
    with pytest.raises(CheckpointError):
        export_bundle(tmp_path / "missing", tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()


def test_refuses_existing_bundle(tiny_ckpt: Path, tiny_bundle: Path):
    from nora_edge.errors import BundleError
    from nora_edge.export.pipeline import export_bundle

    with pytest.raises(BundleError, match="already exists"):
        export_bundle(tiny_ckpt, tiny_bundle, validate=False, progress=False)
    Bundle.load(tiny_bundle)
    assert bundle.MANIFEST in {p.name for p in tiny_bundle.iterdir()}


def test_quantized_export_end_to_end(tiny_ckpt: Path, tmp_path: Path):
    """precision=<recipe>: fp32 export + validation in a temp dir, then the recipe; nothing else is left."""
    import json
    import warnings

    from nora_edge.bundle import Bundle
    from nora_edge.export.pipeline import export_bundle
    from nora_edge.policy import NoraPolicy

    # random weights: int8 may miss the recipe's fidelity thresholds; accepted explicitly and recorded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = export_bundle(
            tiny_ckpt,
            tmp_path / "int8",
            precision="int8",
            validation_prompts=1,
            accept_degraded=True,
            progress=False,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]  # the temporary fp32 bundle is gone
    b = Bundle.load(out)
    assert b.components["decoder"].precision.startswith("int8")
    v = b.manifest["validation"]  # the quantized bundle's own fidelity, not the fp32 export's checks
    assert v["recipe"] == "int8" and v["samples"] > 0 and "policy" not in v
    assert v["accepted_despite_failure"] == (not v["passed"])
    report = json.loads((out / "fidelity_report.json").read_text())
    assert report["records"], "a quantized bundle carries per-sample fidelity records"
    # random weights: the model's own choices rarely form a chunk, so the default policy would refuse it
    with NoraPolicy.load(out, forced_tokens="flag") as policy:
        chunk = policy.run_chunk(np.zeros((224, 224, 3), np.uint8) + 100, "pick up the block")
    assert chunk.actions.shape == (1, 7) and np.isfinite(chunk.actions).all()
    assert sum(chunk.class_counts.values()) == chunk.ids.size


def test_external_data_export_validates(tiny_ckpt: Path, tmp_path: Path, monkeypatch):
    """The path a 3B decoder takes (weights in <graph>.data, written by one thread), forced on the tiny model and
    checked by the export's own validation against PyTorch."""
    from nora_edge.export import onnx_io
    from nora_edge.export.pipeline import export_bundle

    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_BYTES", 0)
    b = Bundle.load(export_bundle(tiny_ckpt, tmp_path / "b", validation_prompts=1, progress=False))
    for name in ("vision", "decoder"):
        spec = b.components[name]
        assert spec.data_files == (f"{spec.file}.data",) and b.file(spec.data_files[0]).stat().st_size > 0
    v = b.manifest["validation"]
    assert all(
        v[k]["passed"] for k in ("vision", "decoder_prefill", "decoder_decode", "policy", "prompt_ids")
    )
