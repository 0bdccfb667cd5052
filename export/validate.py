"""Validate an export: the graphs against the PyTorch model, and the shipped runtime against NORA's reference.

Data flow (two phases, so the torch model can be freed before the ONNX graphs are loaded):
  1. torch, fp32 model (before the graphs are exported):
     :func:`held_out_pairs` (frame (H, W, 3) uint8 of varied size, instruction); frame seeds lie below the
     training frames' (train_fixture.TRAIN_IMAGE_SEED_BASE), so a trained fixture never saw them
     --:func:`reference_cases`--> per pair: :class:`~nora_edge.export.reference.ReferencePolicy` (NORA's
     own inference: HF ``generate`` over the full vocabulary with the checkpoint's generation_config, FAST
     decode, unnormalize) -> ``ReferenceResult``; plus, for the graph checks, the processor inputs, HF image
     features and mrope positions, HF logits after the prompt and after one more token (head rows), and HF
     logits with the input embeddings rounded to the bundle table's dtype.
     :func:`vision_cases`: HF image features of random pixel_values per grid.
  2. numpy + onnxruntime (torch model gone), on the staged bundle:
     graphs (measure the graphs alone): vision graph vs HF features; decoder prefill / decode logits vs HF
     (fp32 table, HF image features); decoder with the shipped table vs HF with the same rounding.
     runtime (:mod:`nora_edge.export.validate_policy`): ``NoraPolicy`` loaded from the staged files (the
     shipped preprocessing, prompt builder, prefix cache, automaton, detokenizer) vs the references.
  The results form the manifest's ``validation`` section; tolerances are stored with each stage.

Graph errors are relative to the reference's scale: ``max|out - ref| / max|ref|``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from nora_edge import bundle
from nora_edge.errors import ExportError
from nora_edge.vision_index import vision_index_from_config

# Graph tolerances (relative to max|ref|). Measured on the tiny trained fixture, 10 prompts, action head: the
# decoder's prefill logits are 2.9e-7 from HF run in float64 (torch fp32's own error vs float64: 6.0e-7); the
# fp32 real-shape 3B decoder measured 1.5e-6 vs torch fp32. 1e-5 keeps ~7x headroom over the 3B measurement
# and is still 3x below what rounding the input table to fp16 does to the tiny model's logits (3.1e-5), so
# a graph fed the wrong table fails it. The vision tower's window attention adds error (1e-4).
TOLERANCES = {
    "vision": 1e-4,
    "decoder_prefill": 1e-5,
    "decoder_decode": 1e-5,
    "decoder_table": 1e-5,
    "decoder_prefill_all": 1e-5,  # --multi-token: logits_all at every prompt position, same scale as the last one
}
INSTRUCTIONS = (
    "pick up the red block and place it in the bowl",
    "Open the top drawer.",
    "put the mug on the plate",
    "close the microwave door",
    "move the sponge to the left of the sink",
)
VISION_GRIDS = ((1, 16, 16), (1, 12, 20), (1, 18, 22))  # 224x224, non-square, ragged windows
HELD_OUT_IMAGE_SEED = 7_000_000  # frame k of the held-out set: random_rgb_image(HELD_OUT_IMAGE_SEED + k)


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


def held_out_pairs(
    n: int, instructions: tuple[str, ...] | list[str] = INSTRUCTIONS, seed: int = 4321
) -> list[tuple[np.ndarray, str]]:
    """``n`` (frame, instruction) pairs: frames of varied size (NORA's resize to 224 is part of what is
    compared), instructions drawn from ``instructions``.

    Raises:
        ExportError: ``n`` < 1 or no instructions.
    """
    from nora_edge.export.images import random_rgb_image

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ExportError(f"validation_prompts must be a positive int, got {n!r}")
    texts = list(instructions)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ExportError(f"validation instructions must be non-empty strings, got {texts[:3]!r}")
    rng = np.random.default_rng(seed)
    pairs = []
    for k in range(n):
        h, w = int(rng.integers(180, 480)), int(rng.integers(180, 640))
        pairs.append((random_rgb_image(HELD_OUT_IMAGE_SEED + k, h, w), texts[int(rng.integers(len(texts)))]))
    return pairs


@dataclass
class VisionCase:
    """pixel_values (patches, dim) float32, grid (t, h, w), HF image features (merged, out_hidden)."""

    grid: tuple[int, int, int]
    pixel_values: np.ndarray
    reference: np.ndarray


@dataclass
class PromptCase:
    """One held-out pair: NORA's result on it, and the HF tensors the graph checks compare with."""

    image: np.ndarray  # (H, W, 3) uint8 frame as the robot sends it
    instruction: str
    reference: object  # ReferenceResult: NORA's ids, actions, well_formed
    input_ids: np.ndarray  # (S,) processor ids
    pixel_values: np.ndarray  # (patches, dim) processor pixel values
    grid: tuple[int, int, int]
    position_ids: np.ndarray  # (3, 1, S) HF mrope positions
    image_features: np.ndarray  # (n_img, H) HF vision output
    prefill_logits: np.ndarray  # (rows,) HF logits of the last prompt position, head rows
    decode_logits: np.ndarray  # (rows,) HF logits after appending the reference's first generated id
    table_logits: np.ndarray  # (rows,) prefill logits with the input embeddings rounded to the table dtype
    prefill_logits_all: np.ndarray | None = (
        None  # (S, rows) HF logits at every prompt position (--multi-token)
    )


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


def _last_logits(
    model, inputs: dict, rows: torch.Tensor, table_dtype: torch.dtype | None = None, *, every: bool = False
) -> np.ndarray:
    """HF logits of the last position on the head rows, (rows,); ``every``: of every position, (S, rows). With
    ``table_dtype`` the embedding lookup's output (the table rows, before the image features are scattered in)
    is rounded to it, as in the runtime's table."""
    emb = model.get_input_embeddings()
    hook = None
    if table_dtype is not None:
        hook = emb.register_forward_hook(lambda m, args, out: out.to(table_dtype).to(out.dtype))
    try:
        logits = model(**inputs).logits[0]  # (S, vocab)
        return (logits[:, rows] if every else logits[-1][rows]).float().numpy()
    finally:
        if hook is not None:
            hook.remove()


@torch.inference_mode()
def reference_cases(
    reference,
    head_rows: list[int],
    pairs: list[tuple[np.ndarray, str]],
    *,
    table_dtype: str = "float16",
    every_position: bool = False,
) -> list[PromptCase]:
    """Run NORA's reference and the HF pieces on held-out pairs; see the module docstring.

    Args:
        reference: a ReferencePolicy over the fp32 model (with the checkpoint's generation_config, as NORA).
        head_rows: Qwen id per logits row of the decoder graph.
        pairs: (frame, instruction) pairs (:func:`held_out_pairs`).
        table_dtype: the bundle's embeddings dtype ("float16" or "float32").
        every_position: also keep HF's prefill logits at every prompt position (a ``--multi-token`` decoder).
    """
    model = reference.model
    rows = torch.tensor(head_rows)
    key = sorted(reference.checkpoint.norm_stats)[0]  # the runtime is run with the same key
    rounding = {"float16": torch.float16, "float32": None}[table_dtype]
    cases = []
    for image, instruction in pairs:
        result = reference.predict_action_chunk(image, instruction, unnorm_key=key)
        inputs = reference.prepare_inputs(image, instruction)
        longer = dict(inputs)
        first = torch.as_tensor(result.ids[:1])[None]  # (1, 1) the reference's first generated id
        longer["input_ids"] = torch.cat([inputs["input_ids"], first], dim=1)
        longer["attention_mask"] = torch.ones_like(longer["input_ids"])
        longer["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(first)], 1)
        pos, _ = model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
        )
        feats = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
        every = _last_logits(model, inputs, rows, every=True)  # (S, rows)
        prefill = every[-1]
        cases.append(
            PromptCase(
                image=image,
                instruction=instruction,
                reference=result,
                input_ids=inputs["input_ids"][0].numpy().astype(np.int64),
                pixel_values=inputs["pixel_values"].float().numpy(),
                grid=tuple(int(v) for v in inputs["image_grid_thw"][0]),
                position_ids=pos.numpy().astype(np.int64),
                image_features=feats.float().numpy(),
                prefill_logits=prefill,
                decode_logits=_last_logits(model, longer, rows),
                table_logits=prefill if rounding is None else _last_logits(model, inputs, rows, rounding),
                prefill_logits_all=every if every_position else None,
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
    """One forward of the ORT decoder graph (batch 1), for the graph-level logits checks (no generation loop:
    the shipped one, ``nora_edge.generate``, is what the runtime check runs)."""

    def __init__(self, sess, spec: bundle.ComponentSpec) -> None:
        self.sess, self.meta = sess, spec.meta
        self.n = int(spec.meta["num_layers"])
        self.kv_names = [f(i) for i in range(self.n) for f in (bundle.past_key, bundle.past_value)]
        self.every = any(o.name == bundle.LOGITS_ALL for o in spec.outputs)  # a --multi-token decoder
        self.out_names = (
            [bundle.LOGITS]
            + ([bundle.LOGITS_ALL] if self.every else [])
            + [f(i) for i in range(self.n) for f in (bundle.present_key, bundle.present_value)]
        )
        self.last_all: np.ndarray | None = None  # (S, rows) logits_all of the last step (every only)

        # fixed (1, kv, max_len, hd) buffers: the TensorRT flavor (decoder_static.py) writes them at cache_position,
        # the fused flavor (decoder_fused.py) at the slots after the attention_mask's tokens
        self.layout = spec.meta.get("kv_cache")
        self.static = self.layout in ("static", "shared")

    def empty_past(self) -> tuple[int, list[np.ndarray]]:
        """(tokens held, K/V per layer): (1, kv, 0, hd) arrays, or zeroed (1, kv, max_len, hd) static buffers."""
        slots = int(self.meta["max_len"]) if self.static else 0
        shape = (1, self.meta["num_kv_heads"], slots, self.meta["head_dim"])
        return 0, [np.zeros(shape, np.float32) for _ in self.kv_names]

    def step(self, embeds: np.ndarray, positions: np.ndarray, past: tuple[int, list[np.ndarray]]):
        """embeds (1, S, H), positions (3, 1, S) -> logits (rows,), (tokens held, present list)."""
        held, kv = past
        total = held + embeds.shape[1]
        feeds = {
            bundle.INPUTS_EMBEDS: embeds.astype(np.float32),
            bundle.POSITION_IDS: positions.astype(np.int64),
            **dict(zip(self.kv_names, kv, strict=True)),
        }
        if self.layout == "static":
            from nora_edge.static_kv import CACHE_POSITION

            feeds[CACHE_POSITION] = np.arange(held, total, dtype=np.int64)
        else:
            feeds[bundle.ATTENTION_MASK] = np.ones((1, total), np.int64)
        out = self.sess.run(self.out_names, feeds)
        if self.every:
            self.last_all = out[1][0]
            return out[0][0], (total, out[2:])
        return out[0][0], (total, out[1:])


def prompt_embeds(case: PromptCase, table: np.ndarray, image_pad_id: int, image: np.ndarray) -> np.ndarray:
    """(1, S, H): table rows of the prompt ids with the image pads replaced by ``image`` (n_img, H)."""
    emb = table[case.input_ids].astype(np.float32)  # (S, H)
    pads = np.flatnonzero(case.input_ids == image_pad_id)
    if pads.size != image.shape[0]:
        raise ExportError(f"validation: {pads.size} image pads but {image.shape[0]} image features")
    emb[pads] = image
    return emb[None]


def check_decoder(
    dec: OrtDecoder, cases: list[PromptCase], table: np.ndarray, shipped: np.ndarray, image_pad_id: int
) -> dict:
    """Prefill and first-decode-step logits vs HF (fp32 table and HF image features, so only the decoder is
    measured), and prefill logits with the shipped table vs HF with its input embeddings rounded alike."""
    pre, step, tab, rounding, every, last_row_equal = [], [], [], [], [], 0
    for c in cases:
        logits, past = dec.step(
            prompt_embeds(c, table, image_pad_id, c.image_features), c.position_ids, dec.empty_past()
        )
        pre.append(relative_error(logits, c.prefill_logits))
        if dec.every:
            if c.prefill_logits_all is None:
                raise ExportError(
                    "validation: the decoder has logits_all but the references hold no per-position logits"
                )
            every.append(relative_error(dec.last_all, c.prefill_logits_all))
            last_row_equal += int(np.array_equal(dec.last_all[-1], logits))
        pos = np.full((3, 1, 1), int(c.position_ids.max()) + 1, np.int64)
        first = c.reference.ids[:1]
        logits2, _ = dec.step(table[first][None].astype(np.float32), pos, past)
        step.append(relative_error(logits2, c.decode_logits))
        embeds = prompt_embeds(c, shipped, image_pad_id, c.image_features)
        tab.append(relative_error(dec.step(embeds, c.position_ids, dec.empty_past())[0], c.table_logits))
        rounding.append(relative_error(c.table_logits, c.prefill_logits)[1])
    results = (
        {}
        if not every
        else {
            "decoder_prefill_all": {
                **stage_result(every, TOLERANCES["decoder_prefill_all"], prompts=len(cases)),
                "positions": int(sum(c.prefill_logits_all.shape[0] for c in cases)),
                # logits is logits_all's last row in the graph: anything else is a broken export
                "last_row_equals_logits": last_row_equal,
            }
        }
    )
    if every and last_row_equal != len(cases):
        results["decoder_prefill_all"]["passed"] = False
    return results | {
        "decoder_prefill": stage_result(pre, TOLERANCES["decoder_prefill"], prompts=len(cases)),
        "decoder_decode": stage_result(step, TOLERANCES["decoder_decode"], prompts=len(cases)),
        "decoder_table": stage_result(
            tab,
            TOLERANCES["decoder_table"],
            prompts=len(cases),
            table_dtype=str(shipped.dtype),
            # what the table's rounding itself does to the logits, as HF computes it (measured, not a check:
            # it acts on the output only through an id flip, which the runtime check catches)
            rounding_effect_max_rel=float(max(rounding)),
            note="shipped embeddings table vs HF with its input embeddings rounded to the same dtype",
        ),
    }


def check_graphs(
    staging: Path,
    components: dict[str, bundle.ComponentSpec],
    *,
    vision_refs: list[VisionCase],
    cases: list[PromptCase],
    table: np.ndarray,
    shipped_table: np.ndarray,
    image_pad_id: int,
) -> dict:
    """Graph-level checks (one graph's weights in memory at a time); returns their manifest entries."""
    vspec, dspec = components["vision"], components["decoder"]
    vsess = session(staging / vspec.file)
    results = {"vision": check_vision(vsess, vspec, vision_refs)}
    del vsess  # a 3 B fp32 decoder is 11 GB: never two graphs at once
    dec = OrtDecoder(session(staging / dspec.file), dspec)
    results.update(check_decoder(dec, cases, table, shipped_table, image_pad_id))
    return results


def validate_export(
    staging: Path,
    sections: dict,
    components: dict[str, bundle.ComponentSpec],
    *,
    vision_refs: list[VisionCase],
    cases: list[PromptCase],
    table: np.ndarray,
) -> dict:
    """Every check of phase 2 on the staged bundle; returns the manifest ``validation`` entries.

    Args:
        staging: the staging directory holding every bundle file (graphs, embeddings, tokenizer, codec).
        sections: every manifest section except ``validation`` (``components`` included).
        components: the vision and decoder ComponentSpecs.
        vision_refs / cases: phase-1 references.
        table: (vocab, H) fp32 embedding table of the model (the graph checks' input).

    Raises:
        ExportError: naming every stage that failed and why.
    """
    from nora_edge.export.validate_policy import check_runtime

    shipped = np.load(staging / sections["components"]["embeddings"]["file"], mmap_mode="r")
    results = check_graphs(
        staging,
        components,
        vision_refs=vision_refs,
        cases=cases,
        table=table,
        shipped_table=shipped,
        image_pad_id=sections["prompt"]["image_pad_id"],
    )
    del shipped
    results.update(check_runtime(staging, sections, cases))
    failed = [k for k, v in results.items() if not v["passed"]]
    if failed:
        detail = "; ".join(f"{k}: {results[k]}" for k in failed)
        raise ExportError(f"export validation failed for {failed}: {detail}")
    return results
