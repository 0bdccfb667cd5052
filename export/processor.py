"""Qwen2.5-VL processor without the video part (the stock one needs torchvision, unusable here).

Data flow: checkpoint dir -> tokenizer (transformers Qwen2Tokenizer from tokenizer.json + tokenizer_config.json)
+ image processor (transformers' PIL/numpy ``Qwen2VLImageProcessorPil`` from preprocessor_config.json)
+ chat template (chat_template.json) -> :class:`NoraProcessor`.
``processor(text=[prompt], images=[image])``: image -> pixel_values (N, C*T*P*P) + image_grid_thw (1, 3);
each ``<|image_pad|>`` in the prompt -> grid_t*grid_h*grid_w / merge^2 pads (224x224 -> 64); text -> input_ids,
attention_mask and mm_token_type_ids (0 text, 1 image) exactly as transformers' Qwen2_5_VLProcessor does it
(its ``replace_image_token`` + ProcessorMixin's generic expansion, checked in transformers 5.23).

mm_token_type_ids matters: transformers 5 computes Qwen2.5-VL's 3-D (mrope) positions only when it is passed;
without it the image tokens get plain 1-D positions and the model silently diverges from NORA.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from nora_edge import names
from nora_edge.errors import CheckpointError, InputError

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"


class NoraProcessor(ProcessorMixin):
    """Image processor + tokenizer + chat template of a NORA checkpoint (no video processor).

    Call it like the stock processor: ``proc(text=[prompt], images=[pil_image], return_tensors="pt")`` returns
    input_ids (B, S), attention_mask (B, S), mm_token_type_ids (B, S), pixel_values (N, 1176) and
    image_grid_thw (num_images, 3).
    """

    return_mm_token_type_ids = True  # as Qwen2_5_VLProcessor: the model needs it for mrope positions

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        # video_token stays None (no video support); its id is still marked (type 2) in mm_token_type_ids
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """One ``<|image_pad|>`` per merged patch: grid_t * grid_h * grid_w / merge_size**2."""
        merge_length = self.image_processor.merge_size**2
        num_image_tokens = int(image_inputs["image_grid_thw"][image_idx].prod()) // merge_length
        return self.image_token * num_image_tokens

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise InputError("NoraProcessor has no video support; pass images only")
        texts = [text] if isinstance(text, str) else (text or [])
        if any(VIDEO_TOKEN in t for t in texts):
            raise InputError(f"prompt contains {VIDEO_TOKEN} but NoraProcessor has no video support")
        return super().__call__(images=images, text=text, **kwargs)


def read_chat_template(ckpt: Path) -> str:
    """The Jinja chat template from chat_template.json."""
    path = ckpt / names.CHAT_TEMPLATE
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(template, str) or not template:
        raise CheckpointError(f"{path}: missing field 'chat_template'")
    return template


def load_image_processor(ckpt: Path) -> Qwen2VLImageProcessorPil:
    """transformers' PIL/numpy Qwen2-VL image processor configured from preprocessor_config.json."""
    path = ckpt / names.PREPROCESSOR_CONFIG
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg.pop("image_processor_type", None)
    cfg.pop("processor_class", None)
    return Qwen2VLImageProcessorPil(**cfg)


def load_processor(ckpt: str | Path) -> NoraProcessor:
    """Build the checkpoint's processor (tokenizer + image processor + chat template), no torchvision needed.

    Raises:
        CheckpointError: a file is missing or malformed.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt}")
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    return NoraProcessor(load_image_processor(ckpt), tokenizer, chat_template=read_chat_template(ckpt))
