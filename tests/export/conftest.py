"""Session fixtures of the export-stage tests: the tiny HF model, exported graphs and bundles, built once.

tiny_model           fp32 HF Qwen2.5-VL model of ``tiny_ckpt`` (generation_config set, greedy)
tiny_processor       its processor
tiny_bundle          export_bundle(tiny_ckpt) with defaults (action head, 224-specialised vision, fp16 table)
vision_dynamic_onnx  (path, ComponentSpec) of the resolution-dynamic vision graph of tiny_model
decoder_full_onnx    (path, ComponentSpec) of the full-vocab-head decoder of tiny_model
decoder_action_onnx  (path, ComponentSpec, head_rows) of the action-head decoder of tiny_model
trt_target_bundles   (validated ``--target tensorrt`` bundle, portable onnxruntime bundle without validation) of
                     ``tiny_trained_ckpt_h5``: shared by the TensorRT target, engine and quantization tests
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_and_processor(tiny_ckpt: Path):
    from nora_edge.checkpoint import NoraCheckpoint
    from nora_edge.export.pipeline import load_model

    return load_model(NoraCheckpoint.load(tiny_ckpt))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_and_processor):
    return tiny_model_and_processor[0]


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_and_processor):
    return tiny_model_and_processor[1]


@pytest.fixture(scope="session")
def trt_target_bundles(
    tiny_trained_ckpt_h5: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    from nora_edge.export.pipeline import export_bundle
    from nora_edge.export.synthetic_task import instruction_list

    root = tmp_path_factory.mktemp("trt_target")
    trt = export_bundle(
        tiny_trained_ckpt_h5, root / "trt", target="tensorrt", progress=False,
        validation_prompts=4, validation_instructions=instruction_list(),
    )  # fmt: skip
    ort = export_bundle(tiny_trained_ckpt_h5, root / "ort", validate=False, progress=False)
    return trt, ort


@pytest.fixture(scope="session")
def tiny_bundle(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nora_edge.export.pipeline import export_bundle

    return export_bundle(tiny_ckpt, tmp_path_factory.mktemp("bundle") / "tiny", progress=False)


@pytest.fixture(scope="session")
def vision_dynamic_onnx(tiny_model, tmp_path_factory: pytest.TempPathFactory):
    from nora_edge.export.vision import export_vision

    path = tmp_path_factory.mktemp("vision") / "vision.onnx"
    return path, export_vision(tiny_model, path)


@pytest.fixture(scope="session")
def decoder_full_onnx(tiny_model, tmp_path_factory: pytest.TempPathFactory):
    from nora_edge.export.decoder import export_decoder, head_rows_for

    vocab = tiny_model.config.text_config.vocab_size
    path = tmp_path_factory.mktemp("decoder_full") / "decoder.onnx"
    return path, export_decoder(tiny_model, path, head_rows_for({}, "full", vocab), head="full")


@pytest.fixture(scope="session")
def decoder_action_onnx(tiny_model, tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    from nora_edge.checkpoint import NoraCheckpoint
    from nora_edge.export.decoder import export_decoder, head_rows_for
    from nora_edge.export.manifest_sections import end_ids

    ckpt = NoraCheckpoint.load(tiny_ckpt)
    meta = {
        "action_base": ckpt.action_base,
        "num_action_tokens": ckpt.num_action_tokens,
        "end_ids": end_ids(ckpt),
    }
    rows = head_rows_for(meta, "action", tiny_model.config.text_config.vocab_size)
    path = tmp_path_factory.mktemp("decoder_action") / "decoder.onnx"
    return path, export_decoder(tiny_model, path, rows, head="action"), rows
