"""Teacher-forced training of a fixture checkpoint so that its greedy output is a well-formed FAST chunk.

A random-weight fixture never emits a decodable chunk (its fitted FAST vocabulary is a few hundred of the 2048
action ids), which makes every "runtime == reference wherever the reference is well formed" test vacuous.
Training the whole tiny model on a small synthetic task (synthetic_task.py) fixes that.

Data flow, per optimizer step:
  seed, step -> ``frames`` fresh frames ``random_rgb_image(TRAIN_IMAGE_SEED_BASE + (seed << 32) + k)`` (far above
  the small seeds tests use for held-out frames) -> per frame: pixel_values + image_grid_thw from the
  reference's own ``prepare_inputs`` (NORA's resize to 224x224, then the processor) and
  ``synthetic_task.image_features`` -> ``per_frame`` distinct instructions per frame (numpy Generator seeded by
  ``seed``) -> prompt ids + mm_token_type_ids from ``prepare_inputs`` (NORA's chat template; cached per
  instruction) -> assistant ids = FAST ids of ``synthetic_task.target_chunk`` + the checkpoint's action base,
  then ``<|im_end|>`` -> right-padded batch (B, L) -> vision tower once per frame, the model's own scatter /
  3-D positions / decoder -> lm_head at the positions that predict assistant tokens -> cross-entropy ->
  AdamW (warmup + cosine) on every parameter.
After the last step the weights are rewritten in place with fixture_weights' names, order, dtype and shard
split (temp file + rename per file).

Determinism: frames and instructions depend only on ``seed``; ``torch.manual_seed(seed)`` is set; training runs
with ``num_threads`` torch threads (default 1, so the weights do not depend on the caller's thread count).
Same arguments -> bit-identical weights.

Settings (measured on the 2-core dev machine, greedy ReferencePolicy on held_out_cases(50), i.e. frames
random_rgb_image(0..49) never seen in training):
  random weights                          well-formed 0.00 (h=1 and h=5)
  h=1, 200 steps, batch 16 / 8 per frame  1.00 for seeds 0-4 (also 1.00 on 200 more held-out cases);
                                          25-31 s with 1 thread, ~19 s with 2 threads on a quiet machine
  h=5, 150 steps, batch 16 / 8 per frame  1.00, 1.00, 1.00, 0.98, 1.00 for seeds 0-4; 19-25 s (1 thread),
                                          ~13.5 s (2 threads)
  less data per step (batch 8 / 4 per frame, 120-300 steps) or 4 instructions per frame left outlier seeds at
  0.58-0.78 for h=1; lr 5e-3 was worse than 3e-3.
The trained models follow the instruction (decoded chunks ~0.02 mean abs error from the target, vs ~0.3 for the
wrong verb) but within this budget do not yet read the image better than an image-blind average.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nora_edge.errors import ExportError

from . import fixture_weights
from .images import random_rgb_image
from .reference import ReferencePolicy
from .synthetic_task import image_features, instruction_list, target_chunk

TRAIN_IMAGE_SEED_BASE = 10_000_000  # training frames use seeds above this; held-out frames use seeds below it
# Steps that the session fixtures tiny_trained_ckpt / tiny_trained_ckpt_h5 train for (train_fixture defaults
# otherwise), keyed by FAST time horizon; chosen from the sweep recorded in the module doc.
FIXTURE_TRAIN_STEPS = {1: 200, 5: 150}


@dataclass
class TrainReport:
    """What one :func:`train_fixture` run did.

    Attributes:
        steps: optimizer steps taken.
        seconds: wall time of the optimization loop (model loading and the final write excluded).
        cpu_seconds: process CPU time of the same loop (all threads; less sensitive to a shared CPU).
        losses: assistant-token cross-entropy per step.
        num_threads: torch threads used.
    """

    steps: int
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    num_threads: int = 1


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` and restore the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def training_frame_seed(seed: int, index: int) -> int:
    """Seed of the ``index``-th training frame of run ``seed`` (never below TRAIN_IMAGE_SEED_BASE)."""
    return TRAIN_IMAGE_SEED_BASE + (seed << 32) + index


def target_ids(policy: ReferencePolicy, features: np.ndarray, instruction: str) -> list[int]:
    """Qwen ids of the assistant turn: FAST ids of the target chunk + action base, then ``<|im_end|>``."""
    ckpt = policy.checkpoint
    chunk = target_chunk(features, instruction, ckpt.time_horizon)  # (T, D)
    fast_ids = policy.fast.encode(chunk)[0]
    return [ckpt.action_base + i for i in fast_ids] + [ckpt.token_ids["im_end"]]


def make_batch(
    policy: ReferencePolicy,
    frames: list[np.ndarray],
    instructions: list[list[str]],
    prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Teacher-forcing batch: row = (frame f, one of ``instructions[f]``), prompt + assistant turn, right-padded.

    Prompt ids, mm_token_type_ids and pixel_values come from ``policy.prepare_inputs`` (the reference's own
    input path); the assistant turn is :func:`target_ids`.

    Returns:
        input_ids, attention_mask, mm_token_type_ids, labels (B, L) int64 (labels -100 off the assistant turn;
        padding id = ``<|endoftext|>``), image_grid_thw (B, 3), pixel_values (F*256, 1176) one block per
        *frame*, frame_grid_thw (F, 3), frame_of_row (B,) int64.
    """
    pad_id = policy.checkpoint.token_ids["endoftext"]
    pixels, grids, rows = [], [], []
    for f, (frame, texts) in enumerate(zip(frames, instructions, strict=True)):
        feats = image_features(frame)
        for i, text in enumerate(texts):
            if i == 0 or text not in prompt_cache:
                inputs = policy.prepare_inputs(frame, text)
                prompt_cache[text] = (inputs["input_ids"][0], inputs["mm_token_type_ids"][0])
                if i == 0:
                    pixels.append(inputs["pixel_values"])  # (256, 1176)
                    grids.append(inputs["image_grid_thw"])  # (1, 3)
            ids, types = prompt_cache[text]
            tgt = torch.tensor(target_ids(policy, feats, text), dtype=torch.int64)
            rows.append((f, torch.cat([ids, tgt]), torch.cat([types, torch.zeros_like(tgt)]), ids.numel()))
    batch, length = len(rows), max(r[1].numel() for r in rows)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.int64)
    attention = torch.zeros((batch, length), dtype=torch.int64)
    types = torch.zeros((batch, length), dtype=torch.int64)
    labels = torch.full((batch, length), -100, dtype=torch.int64)
    for b, (_, ids, tt, prompt_len) in enumerate(rows):
        n = ids.numel()
        input_ids[b, :n], attention[b, :n], types[b, :n] = ids, 1, tt
        labels[b, prompt_len:n] = ids[prompt_len:]
    frame_grid = torch.cat(grids)  # (F, 3)
    frame_of_row = torch.tensor([r[0] for r in rows], dtype=torch.int64)  # (B,)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "mm_token_type_ids": types,
        "labels": labels,
        "image_grid_thw": frame_grid[frame_of_row],  # (B, 3)
        "pixel_values": torch.cat(pixels),  # (F*256, 1176)
        "frame_grid_thw": frame_grid,
        "frame_of_row": frame_of_row,
    }


def assistant_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict an assistant token; the vision tower runs once per frame.

    Equals ``model(input_ids, attention_mask, mm_token_type_ids, pixel_values=<per-row frames>,
    image_grid_thw).logits`` at those positions: the model's own image scatter, 3-D positions and decoder run;
    only the vision output is shared by rows of the same frame and the lm_head sees the selected positions only.

    Args:
        model: ``Qwen2_5_VLForConditionalGeneration``.
        batch: :func:`make_batch` output.

    Returns:
        (logits (N, V), gold ids (N,)) for the N assistant tokens of the batch.
    """
    vision = model.model.get_image_features(batch["pixel_values"], batch["frame_grid_thw"], return_dict=True)
    per_frame = vision.pooler_output  # F x (64, hidden)
    vision.pooler_output = tuple(per_frame[int(f)] for f in batch["frame_of_row"])  # B x (64, hidden)
    hidden = model.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        mm_encoder_outputs={"image": vision},
        use_cache=False,
    ).last_hidden_state  # (B, L, hidden)
    labels = batch["labels"]
    rows, cols = torch.nonzero(labels[:, 1:] != -100, as_tuple=True)  # position p predicts token p + 1
    return model.lm_head(hidden[rows, cols]), labels[rows, cols + 1]  # (N, V), (N,)


def draw_step(
    seed: int, step: int, rng: np.random.Generator, frames: int, per_frame: int
) -> tuple[list[np.ndarray], list[list[str]]]:
    """The training frames of ``step`` and ``per_frame`` distinct instructions for each (drawn from ``rng``)."""
    instructions = instruction_list()
    images = [random_rgb_image(training_frame_seed(seed, step * frames + k)) for k in range(frames)]
    texts = [
        [instructions[int(i)] for i in rng.choice(len(instructions), per_frame, replace=False)]
        for _ in images
    ]
    return images, texts


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 5% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def write_trained_weights(ckpt_dir: Path, model: torch.nn.Module, config: dict) -> list[Path]:
    """Rewrite the checkpoint's safetensors from ``model`` with fixture_weights' names, order, dtype and shards.

    Each file goes to a temp file in ``ckpt_dir`` and is renamed over the old one.

    Raises:
        ExportError: the directory's safetensors files or the model's tensors do not match the fixture layout.
    """
    dtype = str(config.get("torch_dtype", "float32"))
    specs = fixture_weights.tensor_specs(config)
    old = sorted(ckpt_dir.glob("*.safetensors"))
    if not old:
        raise ExportError(f"{ckpt_dir}: no .safetensors files to replace")
    limit = None if len(old) == 1 else max(p.stat().st_size for p in old)  # reproduces the shard split
    shards = fixture_weights.plan_shards(specs, dtype, limit)
    files = fixture_weights.shard_names(len(shards))
    if sorted(ckpt_dir / f for f in files) != old:
        raise ExportError(
            f"{ckpt_dir}: safetensors files {[p.name for p in old]} do not match the plan {files}"
        )
    state = {fixture_weights.checkpoint_name(k): v for k, v in model.state_dict().items()}
    for fname, group in zip(files, shards, strict=True):
        fd, tmp = tempfile.mkstemp(dir=ckpt_dir, prefix=f".{fname}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(fixture_weights.safetensors_header(group, dtype))
                for spec in group:
                    tensor = state.get(spec.name)
                    if tensor is None or tuple(tensor.shape) != spec.shape:
                        raise ExportError(f"trained model has no tensor {spec.name} of shape {spec.shape}")
                    f.write(fixture_weights.to_bytes(tensor.detach().to(torch.float32).numpy(), dtype))
            os.replace(tmp, ckpt_dir / fname)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return [ckpt_dir / f for f in files]


def check_train_args(steps: int, seed: int, lr: float, batch: int, per_frame: int, num_threads: int) -> None:
    """ExportError naming the first bad argument of :func:`train_fixture`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ExportError(f"train_fixture: seed must be a non-negative int, got {seed!r}")
    for name, value in (
        ("steps", steps),
        ("batch", batch),
        ("per_frame", per_frame),
        ("num_threads", num_threads),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ExportError(f"train_fixture: {name} must be a positive int, got {value!r}")
    if batch % per_frame:
        raise ExportError(f"train_fixture: batch {batch} must be a multiple of per_frame {per_frame}")
    if per_frame > len(instruction_list()):
        raise ExportError(
            f"train_fixture: per_frame {per_frame} exceeds the {len(instruction_list())} instructions"
        )
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ExportError(f"train_fixture: lr must be a positive finite number, got {lr!r}")


def train_fixture(
    ckpt_dir: str | Path,
    *,
    steps: int,
    seed: int = 0,
    lr: float = 3e-3,
    batch: int = 16,
    per_frame: int = 8,
    num_threads: int = 1,
    progress: bool = True,
) -> TrainReport:
    """Train a fixture checkpoint in place (teacher forcing on the synthetic task) and rewrite its weights.

    Args:
        ckpt_dir: a complete fixture directory (build_fixture calls this on its not-yet-renamed build dir).
        steps: optimizer steps.
        seed: frames, instruction draws and torch seed.
        lr: peak AdamW learning rate (warmup over steps // 10, cosine decay to 5%).
        batch: sequences per step.
        per_frame: instructions per frame in a step (``batch`` must be a multiple): the vision tower runs on
            ``batch // per_frame`` frames per step.
        num_threads: torch threads while training (the result is bit-identical for a fixed count).
        progress: show a rich progress bar.

    Returns:
        :class:`TrainReport`.

    Raises:
        ExportError: bad arguments, or the checkpoint's safetensors do not match the fixture layout.
    """
    check_train_args(steps, seed, lr, batch, per_frame, num_threads)
    ckpt_dir = Path(ckpt_dir)
    frames_per_step = batch // per_frame
    rng = np.random.default_rng(seed)
    report = TrainReport(steps=steps, num_threads=num_threads)
    with torch_threads(num_threads):
        torch.manual_seed(seed)
        policy = ReferencePolicy.from_pretrained(ckpt_dir)
        model = policy.model
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
        cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        warmup = max(1, steps // 10)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        with progress_bar(progress, steps) as advance:
            for step in range(steps):
                frames, texts = draw_step(seed, step, rng, frames_per_step, per_frame)
                batch_inputs = make_batch(policy, frames, texts, cache)
                logits, gold = assistant_logits(model, batch_inputs)  # (N, V), (N,)
                loss = torch.nn.functional.cross_entropy(logits, gold)
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, steps, lr, warmup)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                report.losses.append(float(loss.detach()))
                advance()
        report.seconds = time.perf_counter() - wall0
        report.cpu_seconds = time.process_time() - cpu0
        model.eval()
        write_trained_weights(ckpt_dir, model, policy.checkpoint.config)
    return report


@contextmanager
def progress_bar(enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    """Yield an ``advance()`` callable that drives a rich progress bar (a no-op when disabled)."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("training fixture"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    ) as bar:
        task = bar.add_task("train", total=total)
        yield lambda: bar.advance(task)


def held_out_cases(n: int, first_seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """``n`` held-out (frame, instruction) pairs: ``random_rgb_image(first_seed + i)`` (below the training
    seeds) with instructions drawn from the task's templates by a Generator seeded with ``first_seed``."""
    if first_seed + n > TRAIN_IMAGE_SEED_BASE:
        raise ExportError(f"held-out seeds {first_seed}..{first_seed + n - 1} overlap the training frames")
    instructions = instruction_list()
    picks = np.random.default_rng(first_seed).integers(0, len(instructions), n)
    return [(random_rgb_image(first_seed + i), instructions[int(k)]) for i, k in enumerate(picks)]


def well_formed_rate(policy: ReferencePolicy, cases: list[tuple[np.ndarray, str]]) -> float:
    """Fraction of ``cases`` whose greedy reference decode is well formed."""
    return sum(policy.predict_action_chunk(img, text).well_formed for img, text in cases) / len(cases)
