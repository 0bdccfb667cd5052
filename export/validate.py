"""Validate exported graphs in onnxruntime against the PyTorch model, with tolerances stored per stage.

Data flow (two phases, so the torch model can be freed before the ONNX graphs are loaded):
  1. :func:`reference_cases` (torch, fp32 model): held-out images + instructions -> HF processor inputs ->
     HF image features, prefill and first-decode-step logits (head rows), HF ``generate`` ids (greedy, the
     checkpoint's generation_config incl. repetition penalty; restricted to the head rows for an action head).
  2. :func:`validate_graphs` (numpy + ORT): vision graph vs HF features; decoder prefill / decode logits vs HF;
     greedy loop (ORT vision -> scatter -> ORT prefill -> ORT decode steps with HF's repetition penalty) vs
     the HF ids; prompt pieces (manifest) vs the processor's ids. Results go to the manifest's ``validation``.

Errors are relative to the reference's scale: ``max|out - ref| / max|ref|``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch

from nora_edge import bundle
from nora_edge.errors import ExportError
from nora_edge.vision_index import vision_index_from_config

TOLERANCES = {"vision": 1e-4, "decoder_prefill": 1e-5, "decoder_decode": 1e-5}
INSTRUCTIONS = (
    "pick up the red block and place it in the bowl",
    "Open the top drawer.",
    "put the mug on the plate",
    "close the microwave door",
    "move the sponge to the left of the sink",
)
VISION_GRIDS = ((1, 16, 16), (1, 12, 20), (1, 18, 22))  # 224x224, non-square, ragged windows


def relative_error(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max abs error, max abs error / max |ref|)."""
    if out.shape != ref.shape:
        raise ExportError(f"validation: output shape {out.shape} != reference shape {ref.shape}")
    abs_err = float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max()) if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    return abs_err, abs_err / scale if scale else abs_err


def stage_result(errors: list[tuple[float, float]], tolerance: float, **extra) -> dict:
    abs_err = max(e[0] for e in errors)
    rel_err = max(e[1] for e in errors)
    return {
        "max_abs_err": abs_err,
        "max_rel_err": rel_err,
        "tolerance": tolerance,
        "passed": bool(rel_err <= tolerance),
        **extra,
    }


@dataclass
class VisionCase:
    """pixel_values (patches, dim) float32, grid (t, h, w), HF image features (merged, out_hidden)."""

    grid: tuple[int, int, int]
    pixel_values: np.ndarray
    reference: np.ndarray


@dataclass
class PromptCase:
    """One held-out prompt: processor ids, HF positions/features, reference logits and generated ids."""

    instruction: str
    input_ids: np.ndarray  # (S,)
    pixel_values: np.ndarray  # (patches, dim)
    grid: tuple[int, int, int]
    position_ids: np.ndarray  # (3, 1, S)
    image_features: np.ndarray  # (n_img, H) HF vision output
    prefill_logits: np.ndarray  # (rows,) HF logits of the last prompt position, head rows
    decode_logits: np.ndarray  # (rows,) HF logits after appending generated[0]
    generated: np.ndarray  # (N,) HF greedy ids
    max_new: int  # the cap HF generated under


class RestrictToRows:
    """HF logits processor: every id outside ``rows`` gets -inf (HF greedy restricted to the action head)."""

    def __init__(self, rows: list[int], vocab: int) -> None:
        self.mask = torch.ones(vocab, dtype=torch.bool)
        self.mask[torch.tensor(rows)] = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.masked_fill(self.mask[: scores.shape[-1]], float("-inf"))


@torch.inference_mode()
def vision_cases(model, grids=VISION_GRIDS, seed: int = 1234) -> list[VisionCase]:
    """HF ``get_image_features`` on random pixel_values for each grid (held-out seed)."""
    cfg = model.config.vision_config
    dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for grid in grids:
        pv = torch.randn(int(np.prod(grid)), dim, generator=gen)
        ref = model.get_image_features(pv, torch.tensor([grid])).pooler_output[0]
        cases.append(VisionCase(tuple(grid), pv.numpy(), ref.float().numpy()))
    return cases


@torch.inference_mode()
def reference_cases(
    model, processor, head_rows: list[int], *, n_prompts: int = 3, max_new_tokens: int = 16, seed: int = 4321
) -> list[PromptCase]:
    """Run HF on held-out (image, instruction) pairs; see module docstring.

    Args:
        model: fp32 ``Qwen2_5_VLForConditionalGeneration`` with the checkpoint's generation_config set.
        processor: the checkpoint's processor (``nora_edge.export.processor.load_processor``).
        head_rows: Qwen id per logits row; generation is restricted to them unless they cover the vocab.
        n_prompts: how many prompts (instructions cycle through ``INSTRUCTIONS``).
        max_new_tokens: cap on generated tokens (the checkpoint's own limit applies when smaller).
    """
    from transformers import LogitsProcessorList

    from nora_edge.export.reference import nora_messages, resize_like_nora

    vocab = model.config.text_config.vocab_size
    full = len(head_rows) == vocab and head_rows == list(range(vocab))
    procs = LogitsProcessorList([] if full else [RestrictToRows(head_rows, vocab)])
    limit = model.generation_config.max_new_tokens or max_new_tokens
    rng = np.random.default_rng(seed)
    rows = torch.tensor(head_rows)
    cases = []
    for k in range(n_prompts):
        instruction = INSTRUCTIONS[k % len(INSTRUCTIONS)]
        image = resize_like_nora(rng.integers(0, 256, (180 + 20 * k, 240, 3), dtype=np.uint8))
        text = processor.apply_chat_template(
            nora_messages(image, instruction), tokenize=False, add_generation_prompt=True
        )
        inputs = dict(processor(text=[text], images=[image], return_tensors="pt"))
        cap = min(limit, max_new_tokens)
        out = model.generate(**inputs, do_sample=False, max_new_tokens=cap, logits_processor=procs)
        prompt_len = inputs["input_ids"].shape[1]
        generated = out[0, prompt_len:]
        logits = model(**inputs).logits[0, -1]
        longer = dict(inputs)
        longer["input_ids"] = torch.cat([inputs["input_ids"], generated[None, :1]], dim=1)
        longer["attention_mask"] = torch.ones_like(longer["input_ids"])
        longer["mm_token_type_ids"] = torch.cat(
            [inputs["mm_token_type_ids"], torch.zeros_like(generated[None, :1])], 1
        )
        decode_logits = model(**longer).logits[0, -1]
        pos, _ = model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
        )
        feats = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
        cases.append(
            PromptCase(
                instruction=instruction,
                input_ids=inputs["input_ids"][0].numpy().astype(np.int64),
                pixel_values=inputs["pixel_values"].float().numpy(),
                grid=tuple(int(v) for v in inputs["image_grid_thw"][0]),
                position_ids=pos.numpy().astype(np.int64),
                image_features=feats.float().numpy(),
                prefill_logits=logits[rows].float().numpy(),
                decode_logits=decode_logits[rows].float().numpy(),
                generated=generated.numpy().astype(np.int64),
                max_new=cap,
            )
        )
    return cases


def session(path) -> ort.InferenceSession:
    """A CPU session that does not duplicate weights (no MatMul prepacking, no arena): a 3 B fp32 decoder
    must fit beside nothing else in 24 GB."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = False
    opts.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def vision_feeds(spec: bundle.ComponentSpec, pixel_values: np.ndarray, grid) -> dict:
    """Feeds for the vision graph: pixel_values, plus the host index tensors when the graph takes them."""
    feeds = {bundle.PIXEL_VALUES: pixel_values.astype(np.float32)}
    if len(spec.inputs) > 1:
        idx = vision_index_from_config(np.array([grid]), spec.meta)
        feeds.update(idx.graph_feeds())
    return {k: v for k, v in feeds.items() if k in spec.input_names}


def run_vision(sess, spec: bundle.ComponentSpec, pixel_values: np.ndarray, grid) -> np.ndarray:
    fixed = spec.meta.get("grid_thw")
    if fixed is not None and tuple(fixed) != tuple(grid):
        raise ExportError(f"vision graph is specialised to grid {fixed}, got {tuple(grid)}")
    return sess.run([bundle.IMAGE_EMBEDS], vision_feeds(spec, pixel_values, grid))[0]


def check_vision(sess, spec: bundle.ComponentSpec, cases: list[VisionCase]) -> dict:
    fixed = spec.meta.get("grid_thw")
    usable = [c for c in cases if fixed is None or tuple(fixed) == c.grid]
    if not usable:
        raise ExportError(f"validation: no vision case matches the graph's grid {fixed}")
    errors = [relative_error(run_vision(sess, spec, c.pixel_values, c.grid), c.reference) for c in usable]
    return stage_result(errors, TOLERANCES["vision"], grids=[list(c.grid) for c in usable])


class OrtDecoder:
    """Prefill / decode steps on the ORT decoder graph (batch 1)."""

    def __init__(self, sess, spec: bundle.ComponentSpec) -> None:
        self.sess, self.meta = sess, spec.meta
        self.n = int(spec.meta["num_layers"])
        self.kv_names = [f(i) for i in range(self.n) for f in (bundle.past_key, bundle.past_value)]
        self.out_names = [bundle.LOGITS] + [
            f(i) for i in range(self.n) for f in (bundle.present_key, bundle.present_value)
        ]

    def empty_past(self) -> list[np.ndarray]:
        shape = (1, self.meta["num_kv_heads"], 0, self.meta["head_dim"])
        return [np.zeros(shape, np.float32) for _ in self.kv_names]

    def step(self, embeds: np.ndarray, positions: np.ndarray, past: list[np.ndarray]):
        """embeds (1, S, H), positions (3, 1, S) -> logits (rows,), present list."""
        total = past[0].shape[2] + embeds.shape[1]
        feeds = {
            bundle.INPUTS_EMBEDS: embeds.astype(np.float32),
            bundle.POSITION_IDS: positions.astype(np.int64),
            bundle.ATTENTION_MASK: np.ones((1, total), np.int64),
            **dict(zip(self.kv_names, past, strict=True)),
        }
        out = self.sess.run(self.out_names, feeds)
        return out[0][0], out[1:]


def repetition_penalty(
    logits: np.ndarray, rows: np.ndarray, seen: np.ndarray, penalty: float | None
) -> np.ndarray:
    """HF ``RepetitionPenaltyLogitsProcessor`` on the head rows: seen ids' logits /p if > 0 else *p."""
    if penalty is None or penalty == 1.0:
        return logits
    hit = np.isin(rows, seen)
    out = logits.copy()
    out[hit] = np.where(out[hit] < 0, out[hit] * penalty, out[hit] / penalty)
    return out


def prompt_embeds(case: PromptCase, table: np.ndarray, image_pad_id: int, image: np.ndarray) -> np.ndarray:
    """(1, S, H): table rows of the prompt ids with the image pads replaced by ``image`` (n_img, H)."""
    emb = table[case.input_ids].astype(np.float32)  # (S, H)
    pads = np.flatnonzero(case.input_ids == image_pad_id)
    if pads.size != image.shape[0]:
        raise ExportError(f"validation: {pads.size} image pads but {image.shape[0]} image features")
    emb[pads] = image
    return emb[None]


def greedy_ort(
    dec: OrtDecoder,
    case: PromptCase,
    embeds: np.ndarray,
    table: np.ndarray,
    rows: np.ndarray,
    eos: set[int],
    penalty: float | None,
    max_new: int,
) -> list[int]:
    """ORT greedy generation with HF's repetition penalty; stops after an eos id, like HF."""
    logits, past = dec.step(embeds, case.position_ids, dec.empty_past())
    seq = case.input_ids.tolist()
    next_pos = int(case.position_ids.max()) + 1
    out: list[int] = []
    while True:
        tok = int(rows[int(np.argmax(repetition_penalty(logits, rows, np.asarray(seq), penalty)))])
        out.append(tok)
        seq.append(tok)
        if tok in eos or len(out) >= max_new:
            return out
        pos = np.full((3, 1, 1), next_pos, np.int64)
        next_pos += 1
        logits, past = dec.step(table[[tok]][None].astype(np.float32), pos, past)


def check_decoder(
    dec: OrtDecoder, cases: list[PromptCase], table: np.ndarray, image_pad_id: int
) -> tuple[dict, dict]:
    """Prefill and first-decode-step logits vs HF (HF image features, so only the decoder is measured)."""
    pre, step = [], []
    for c in cases:
        embeds = prompt_embeds(c, table, image_pad_id, c.image_features)
        logits, past = dec.step(embeds, c.position_ids, dec.empty_past())
        pre.append(relative_error(logits, c.prefill_logits))
        pos = np.full((3, 1, 1), int(c.position_ids.max()) + 1, np.int64)
        logits2, _ = dec.step(table[c.generated[:1]][None].astype(np.float32), pos, past)
        step.append(relative_error(logits2, c.decode_logits))
    return (
        stage_result(pre, TOLERANCES["decoder_prefill"], prompts=len(cases)),
        stage_result(step, TOLERANCES["decoder_decode"], prompts=len(cases)),
    )


def check_prompt_pieces(cases: list[PromptCase], prompt: dict, tokenizer) -> dict:
    """prefix + pads + vision_end + tokenizer(instruction) + suffix must equal the processor's ids."""
    mismatched = []
    for c in cases:
        n_img = int(np.sum(c.input_ids == prompt["image_pad_id"]))
        instr = tokenizer.encode(c.instruction, add_special_tokens=False).ids
        built = [
            *prompt["prefix_ids"],
            *[prompt["image_pad_id"]] * n_img,
            prompt["vision_end_id"],
            *instr,
            *prompt["suffix_ids"],
        ]
        if built != c.input_ids.tolist():
            mismatched.append(c.instruction)
    return {"prompts": len(cases), "mismatched": mismatched, "passed": not mismatched}


def validate_graphs(
    vision_path,
    vision_spec: bundle.ComponentSpec,
    decoder_path,
    decoder_spec: bundle.ComponentSpec,
    *,
    vision_refs: list[VisionCase],
    prompt_refs: list[PromptCase],
    table: np.ndarray,
    sections: dict,
    tokenizer,
) -> dict:
    """Every check of phase 2; returns the manifest ``validation`` section.

    Raises:
        ExportError: naming every stage over its tolerance (or a greedy / prompt mismatch).
    """
    rows = bundle.expand_ranges(sections["actions"]["head_rows"], "actions.head_rows")
    pad = sections["prompt"]["image_pad_id"]
    vsess = session(vision_path)
    results = {"vision": check_vision(vsess, vision_spec, vision_refs)}
    images = [run_vision(vsess, vision_spec, c.pixel_values, c.grid) for c in prompt_refs]  # ORT vision
    del vsess  # only one graph's weights in memory at a time (a 3 B decoder is 11 GB in fp32)
    dec = OrtDecoder(session(decoder_path), decoder_spec)
    results["decoder_prefill"], results["decoder_decode"] = check_decoder(dec, prompt_refs, table, pad)
    gen = sections["generation"]
    matched, tokens = 0, 0
    for c, image in zip(prompt_refs, images, strict=True):
        embeds = prompt_embeds(c, table, pad, image)
        ids = greedy_ort(
            dec, c, embeds, table, rows, set(gen["eos_token_ids"]), gen["repetition_penalty"], c.max_new
        )
        matched += ids == c.generated.tolist()
        tokens += len(c.generated)
    results["greedy"] = {
        "prompts": len(prompt_refs),
        "matched": matched,
        "tokens": tokens,
        "passed": matched == len(prompt_refs),
    }
    results["prompt_ids"] = check_prompt_pieces(prompt_refs, sections["prompt"], tokenizer)
    failed = [k for k, v in results.items() if not v["passed"]]
    if failed:
        detail = "; ".join(f"{k}: {results[k]}" for k in failed)
        raise ExportError(f"export validation failed for {failed}: {detail}")
    return results
