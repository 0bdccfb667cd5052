"""ReferencePolicy: declare-lab/nora's inference, reproduced step by step on the PyTorch model.

Data flow (facts read from declare-lab/nora ``inference/nora.py``):
  image (H, W, 3) uint8 --PIL, RGB, resize to 224x224 with Pillow's default filter (qwen-vl-utils
  fetch_image with resized_height/width 224)--> chat messages [image, text] --chat template,
  add_generation_prompt--> prompt --processor--> input_ids, attention_mask, mm_token_type_ids, pixel_values,
  image_grid_thw --model.generate(**inputs) with the checkpoint's generation_config and do_sample=False-->
  ids (prompt + new) --every id in the action range (from the checkpoint), minus the base--> FAST ids
  --FAST decode (T, D)--> normalized (T, D) --0.5*(x+1)*(q99-q01)+q01 on every dim (mask ignored)--> actions.

NORA turns any decode failure into zeros, which unnormalize to the q01..q99 midpoint: a real motion. Here
that fallback is *observable*: ``ReferenceResult.well_formed`` is False and ``reason`` says why, while
``actions`` still holds exactly what NORA would have sent so parity studies can count such cases.
Like NORA, the action ids are taken from the whole returned sequence (prompt included; the prompt only holds
action ids if the instruction literally spells ``<robot_action_i>``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

from nora_edge import names
from nora_edge.actions.fast import FastTokenizer
from nora_edge.checkpoint import NoraCheckpoint
from nora_edge.errors import DetokenizationError, ExportError, InputError

from .processor import NoraProcessor, load_processor


@dataclass(frozen=True)
class ReferenceResult:
    """One NORA inference.

    Attributes:
        actions: (T, D) float64 — what NORA would send to the robot. Only trust it when ``well_formed``:
            otherwise it is NORA's silent fallback (zeros unnormalized = the q01..q99 midpoint).
        normalized: (T, D) float64 FAST-decoded actions before unnormalization (zeros when not well formed).
        ids: (N,) int64 generated ids, new tokens only (the prompt is not included).
        action_ids: (K,) int64 FAST ids NORA decoded (action-range ids of the whole sequence minus the base).
        well_formed: the action ids decoded to exactly (T, D) coefficients.
        reason: why not well formed (None when well formed).
        unnorm_key: the norm-stats key used.
    """

    actions: np.ndarray
    normalized: np.ndarray
    ids: np.ndarray
    action_ids: np.ndarray
    well_formed: bool
    reason: str | None
    unnorm_key: str


def check_image(image: object) -> np.ndarray:
    """Validate an (H, W, 3) uint8 RGB image (InputError naming the problem)."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"image must be a numpy array (H, W, 3) uint8, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InputError(f"image must be uint8, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise InputError(f"image must have shape (H, W, 3), got {image.shape}")
    return image


def resize_like_nora(image: np.ndarray) -> PIL.Image.Image:
    """RGB PIL image resized to 224x224 with Pillow's default filter (qwen-vl-utils fetch_image semantics)."""
    pil = PIL.Image.fromarray(check_image(image)).convert("RGB")
    return pil.resize((names.IMAGE_SIZE, names.IMAGE_SIZE))


def nora_messages(image: PIL.Image.Image, instruction: str) -> list[dict]:
    """The chat messages NORA builds: one user turn with the image, then the instruction text."""
    if not isinstance(instruction, str):
        raise InputError(f"instruction must be a str, got {type(instruction).__name__}")
    return [
        {
            "role": "user",
            "content": [
                {
                    "type": "image",
                    "image": image,
                    "resized_height": names.IMAGE_SIZE,
                    "resized_width": names.IMAGE_SIZE,
                },
                {"type": "text", "text": instruction},
            ],
        }
    ]


BNB_QUANTIZATIONS = ("bnb-int8", "bnb-nf4")


def bnb_config(quantization: str, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for a ``--reference-quant`` name (bitsandbytes' CPU backend here).

    Raises:
        InputError: unknown name.
        ExportError: bitsandbytes or accelerate missing.
    """
    if quantization not in BNB_QUANTIZATIONS:
        raise InputError(f"reference quantization {quantization!r}: choose one of {list(BNB_QUANTIZATIONS)}")
    import importlib.util

    missing = [m for m in ("bitsandbytes", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(
            f"reference quantization {quantization!r} needs {missing}: pip install 'nora-edge[bnb]'"
        )
    from transformers import BitsAndBytesConfig

    if quantization == "bnb-int8":
        warnings.filterwarnings(
            "ignore", message="MatMul8bitLt: inputs will be cast"
        )  # once per call otherwise
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def _bnb_unpackable(m) -> bool:
    """A bitsandbytes Linear4bit that its packed CPU kernel cannot take (it fails on it instead of falling back):
    out_features not a multiple of 32, or in_features not whole quantization blocks."""
    block = getattr(getattr(m.weight, "quant_state", None), "blocksize", 64)
    return m.out_features % 32 != 0 or m.in_features % block != 0


class ReferencePolicy:
    """NORA's inference on the HF PyTorch model, with malformed decodes made visible.

    Attributes:
        checkpoint: the checkpoint's metadata (action range, norm stats, T, D).
        model: ``Qwen2_5_VLForConditionalGeneration`` in eval mode with the checkpoint's generation_config
            (generation always passes do_sample=False, as NORA does).
        processor: the :class:`NoraProcessor`.
        fast: the FAST tokenizer (strict decode).
    """

    def __init__(
        self,
        checkpoint: NoraCheckpoint,
        model: Qwen2_5_VLForConditionalGeneration,
        processor: NoraProcessor,
        fast: FastTokenizer,
    ) -> None:
        self.checkpoint = checkpoint
        self.model = model
        self.processor = processor
        self.fast = fast

    @classmethod
    def from_pretrained(
        cls,
        ckpt: str | Path,
        fast_dir: str | Path | None = None,
        *,
        time_horizon: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        quantization: str | None = None,
    ) -> ReferencePolicy:
        """Load model, processor, generation config, FAST tokenizer and norm stats.

        Args:
            ckpt: NORA checkpoint directory.
            fast_dir: FAST tokenizer directory (default ``ckpt/fast``).
            time_horizon: T when the FAST config leaves it null (FAST+).
            dtype: model dtype (NORA uses bf16 on GPU; fp32 is the parity reference on CPU).
            device: torch device.
            quantization: None, or what users do today: "bnb-int8" (LLM.int8, outlier threshold 6) or
                "bnb-nf4" (4-bit NF4, compute in ``dtype``), every Linear but ``lm_head`` through bitsandbytes.

        Raises:
            InputError: unknown ``quantization``.
            ExportError: bitsandbytes (or accelerate) is not installed for a ``quantization``.
        """
        checkpoint = NoraCheckpoint.load(ckpt, fast_dir, time_horizon=time_horizon)
        if quantization is None:
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(checkpoint.path), dtype=dtype)
            model.to(device)
        else:
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                str(checkpoint.path),
                dtype=dtype,
                quantization_config=bnb_config(quantization, dtype),
                device_map=device,
            )
            # bitsandbytes 0.50's packed CPU NF4 kernel fails on some widths (NORA's ViT MLP is 3420 wide)
            for m in model.modules():
                if type(m).__name__ == "Linear4bit" and _bnb_unpackable(m):
                    m.support_avx512bf16_for_cpu = False  # its generic NF4 path computes the same layer
        model.eval()
        model.generation_config = GenerationConfig.from_pretrained(str(checkpoint.path))
        fast = FastTokenizer.from_pretrained(checkpoint.fast.path)
        return cls(checkpoint, model, load_processor(checkpoint.path), fast)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt(self, instruction: str) -> str:
        """The prompt string NORA feeds the processor (one unexpanded ``<|image_pad|>``)."""
        messages = nora_messages(PIL.Image.new("RGB", (names.IMAGE_SIZE, names.IMAGE_SIZE)), instruction)
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prepare_inputs(self, image: np.ndarray, instruction: str) -> dict[str, torch.Tensor]:
        """Processor outputs for one observation, on the model's device.

        Returns:
            input_ids (1, S) int64, attention_mask (1, S), mm_token_type_ids (1, S), pixel_values (256, 1176)
            float32 for 224x224, image_grid_thw (1, 3) = [[1, 16, 16]].
        """
        pil = resize_like_nora(image)
        text = self.processor.apply_chat_template(
            nora_messages(pil, instruction), tokenize=False, add_generation_prompt=True
        )
        inputs = self.processor(text=[text], images=[pil], padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in inputs.items()}

    @torch.inference_mode()
    def generate(self, inputs: dict[str, torch.Tensor]) -> np.ndarray:
        """Greedy ``model.generate`` with the checkpoint's generation config; returns (L,) int64 full sequence.

        The length limit is the checkpoint's: with no max_new_tokens / max_length in generation_config.json (as
        Qwen2.5-VL-3B-Instruct and NORA ship it) transformers makes at most 20 new tokens, so a NORA-Long chunk
        needing more is cut off into a malformed decode, exactly as NORA does.

        NORA sets ``generation_config.do_sample = False`` on the model; passing ``do_sample=False`` here is the
        same decoding and leaves ``model.generation_config`` as loaded (so ``model.save_pretrained`` still works:
        transformers refuses to save a modified config that keeps temperature/top_p/top_k without sampling).
        """
        with warnings.catch_warnings():
            # With Qwen2.5-VL's generation_config (no length field) transformers warns on every call that it
            # applies its default max_length (20 new tokens): that is NORA's behaviour, reproduced on purpose.
            warnings.filterwarnings("ignore", message="Using the model-agnostic default `max_length`")
            out = self.model.generate(**inputs, do_sample=False)
        return out[0].cpu().numpy().astype(np.int64)

    def decode_actions(self, sequence: np.ndarray) -> tuple[np.ndarray, np.ndarray, str | None]:
        """NORA's extraction + strict FAST decode.

        Returns:
            (FAST ids (K,), normalized (T, D), reason); on failure normalized is zeros and reason is set.
        """
        ids = self.checkpoint.action_ids
        in_range = (sequence >= ids.start) & (sequence < ids.stop)
        fast_ids = sequence[in_range] - ids.start  # (K,)
        t, d = self.checkpoint.time_horizon, self.checkpoint.action_dim
        if fast_ids.size == 0:
            return fast_ids, np.zeros((t, d)), "no action tokens were generated"
        try:
            normalized = self.fast.decode(fast_ids, t, d)[0]  # (1, T, D) -> (T, D)
        except DetokenizationError as e:
            return fast_ids, np.zeros((t, d)), f"FAST decode failed: {e}"
        return fast_ids, np.asarray(normalized, dtype=np.float64), None

    def predict_action_chunk(
        self, image: np.ndarray, instruction: str, unnorm_key: str | None = None
    ) -> ReferenceResult:
        """Run NORA on one observation.

        Args:
            image: (H, W, 3) uint8 RGB.
            instruction: task text, passed raw.
            unnorm_key: norm-stats key; None picks the only one (InputError when there are several).

        Returns:
            :class:`ReferenceResult` (check ``well_formed`` before trusting ``actions``).
        """
        stats = self.checkpoint.norm_stats_for(unnorm_key)
        inputs = self.prepare_inputs(image, instruction)
        prompt_len = int(inputs["input_ids"].shape[1])
        sequence = self.generate(inputs)  # (L,)
        fast_ids, normalized, reason = self.decode_actions(sequence)
        actions = stats.unnormalize(normalized, apply_mask=False)  # NORA ignores the mask
        return ReferenceResult(
            actions=actions,
            normalized=normalized,
            ids=sequence[prompt_len:],
            action_ids=fast_ids.astype(np.int64),
            well_formed=reason is None,
            reason=reason,
            unnorm_key=stats.key,
        )
