"""File and tensor names shared by the export stage and the runtime (the bundle contract lives here)."""

from __future__ import annotations

# --- NORA checkpoint directory (HF format, as declare-lab/nora ships it) -------------------------------
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE = "chat_template.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
ADDED_TOKENS = "added_tokens.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
NORM_STATS = "norm_stats.json"
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
FAST_SUBDIR = "fast"  # where nora-edge fixtures put the FAST tokenizer; real NORA loads it separately

# --- FAST tokenizer directory (physical-intelligence/fast layout) ---------------------------------------
FAST_PROCESSOR_CONFIG = "processor_config.json"

# --- action tokens ------------------------------------------------------------------------------------
ACTION_TOKEN_FORMAT = "<robot_action_{}>"
NUM_ACTION_TOKENS = 2048  # FAST+ vocab size; read the real count from the checkpoint

# --- Qwen2 special tokens, in vocabulary order right after the base BPE vocab --------------------------
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_SIZE = 224  # NORA resizes every frame to 224x224 (qwen-vl-utils fetch_image)
