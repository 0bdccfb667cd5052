"""Train a small NORA-architecture policy on MetaWorld demonstrations, on the CPU, and save it in NORA's format.

Data flow:
  demos.npz (sim.demos) --:func:`nora_actions`--> actions in NORA's training convention (xyz as the expert gave
  them, gripper 1 = open / 0 = close, i.e. NORA's ``invert_grippler_action`` of MetaWorld's +1 = close)
  --:func:`norm_stats_entry`--> norm_stats.json key ``metaworld`` (OpenVLA/NORA layout, mask False on the gripper)
  --:func:`normalize`--> q01/q99 -> [-1, 1] (clipped), gripper untouched --:func:`sim.demos.action_chunks`-->
  (N, 5, 4) chunks --``FastTokenizer.fit`` (the published FAST algorithm: DCT, scale 10, BPE to 128 tokens; the
  checkpoint keeps NORA's 2048 action ids)--> ``fast/``
  --``encode``--> assistant ids ``<robot_action_i>``... + ``<|im_end|>`` (NORA's loss covers the action tokens
  and the end token) --teacher forcing on ``Qwen2_5_VLForConditionalGeneration`` (one frame per row, the
  model's own vision tower, image scatter and 3-D positions; export.train_fixture.assistant_logits)--> AdamW,
  warmup + cosine --> weights rewritten in NORA's safetensors layout, ``train_report.json`` (the exact command,
  losses, timings), ``loss.png``.

At inference the bundle's post-processing chain undoes this: unnormalize q01_q99 with the mask (export
``--mask 1,1,1,0``: NORA's own inference unnormalizes every dimension, so the mask must be explicit), then NORA's
``normalize_gripper_action(binarize=True)`` ([0, 1] -> [-1, 1], sign) and ``invert_gripper_action``
(declare-lab/nora ``inference/nora.py``) give MetaWorld's +1 = close. :data:`EXPORT_ARGS` is that chain.

The checkpoint directory is built under ``out.tmp-*`` and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from nora_edge import names
from nora_edge.actions.fast import FastTokenizer
from nora_edge.errors import ExportError
from nora_edge.preprocess import preprocess_image

from .demos import Demos, action_chunks
from .metaworld_env import TASKS

UNNORM_KEY = "metaworld"
HORIZON = 5  # NORA-Long
GRIPPER_DIM = 3
# nora-edge export options that give MetaWorld actions back from this checkpoint's normalized ones: the gripper
# was trained un-normalized (mask False), so the chain leaves it as produced before NORA's gripper helpers
EXPORT_ARGS = ["--mask", "1,1,1,0", "--gripper", "rescale", "--gripper", "binarize", "--gripper", "invert"]


def nora_actions(actions: np.ndarray) -> np.ndarray:
    """(N, 4) MetaWorld actions -> NORA's training convention: gripper g -> (1 - g) / 2 (1 open, 0 closed)."""
    out = np.array(actions, dtype=np.float64)
    out[:, GRIPPER_DIM] = np.clip((1.0 - out[:, GRIPPER_DIM]) / 2.0, 0.0, 1.0)
    return out


def norm_stats_entry(actions: np.ndarray) -> dict:
    """norm_stats.json entry (OpenVLA/NORA layout) of (N, 4) NORA-convention actions; mask False on the gripper."""
    q01, q99 = np.quantile(actions, 0.01, axis=0), np.quantile(actions, 0.99, axis=0)
    if np.any(q99[:GRIPPER_DIM] <= q01[:GRIPPER_DIM]):
        raise ExportError(f"demonstrations have a constant action dimension: q01 {q01} q99 {q99}")
    action = {
        "mean": actions.mean(0).tolist(),
        "std": actions.std(0).tolist(),
        "max": actions.max(0).tolist(),
        "min": actions.min(0).tolist(),
        "q01": q01.tolist(),
        "q99": q99.tolist(),
        "mask": [True] * GRIPPER_DIM + [False],
    }
    return {"action": action, "num_transitions": len(actions)}


def normalize(actions: np.ndarray, entry: dict) -> np.ndarray:
    """NORA/OpenVLA BOUNDS_Q99 normalization: masked dims 2 (a - q01) / (q99 - q01) - 1, clipped to [-1, 1]."""
    q01, q99 = np.array(entry["action"]["q01"]), np.array(entry["action"]["q99"])
    mask = np.array(entry["action"]["mask"])
    x = np.clip(2.0 * (actions - q01) / np.maximum(q99 - q01, 1e-8) - 1.0, -1.0, 1.0)
    return np.where(mask, x, actions)


@dataclass(frozen=True)
class TrainConfig:
    """Training hyperparameters (recorded in train_report.json).

    Attributes:
        steps: optimizer steps; batch: rows (frames) per step; lr: peak AdamW rate (warmup steps // 20,
        cosine to 5%); seed: sampling and init seed; threads: torch threads; preset: architecture name in
        :data:`sim.checkpoint.SIM_PRESETS`; weight_decay: AdamW decay; fast_scale: FAST's quantization scale
        (the published default is 10); fast_vocab: BPE vocabulary size (NORA's 2048 merges most MetaWorld
        chunks into one or two chunk-sized tokens, ~6300 distinct chunks, which a small model learns as an
        image-blind mode per task; 128 keeps tokens near one DCT coefficient each: 5.7 per chunk, at most 19).
    """

    steps: int = 3000
    batch: int = 32
    lr: float = 2e-3
    seed: int = 0
    threads: int = 2
    preset: str = "sim"
    weight_decay: float = 0.01
    fast_scale: float = 10.0
    fast_vocab: int = 128

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ExportError(f"TrainConfig.{name} must be a positive int, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ExportError(f"TrainConfig.lr must be in (0, 1), got {self.lr!r}")


@dataclass
class TrainReport:
    """What one training run did (written to train_report.json)."""

    config: dict
    command: str
    rows: int
    episodes: int
    tasks: list[str]
    fast_vocab: int
    tokens_per_chunk: dict
    export_args: list[str] = field(default_factory=lambda: list(EXPORT_ARGS))
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


def fast_targets(fast: FastTokenizer, chunks: np.ndarray, action_base: int, im_end: int) -> list[np.ndarray]:
    """Per row: int64 ids ``action_base + fast ids`` then ``<|im_end|>``."""
    ids = fast.encode(chunks)
    return [np.array([action_base + i for i in row] + [im_end], dtype=np.int64) for row in ids]


def make_rows_batch(rows, frames, tasks, targets, prompts, pad_id):
    """Teacher-forcing batch of one frame per row (the layout export.train_fixture.assistant_logits reads).

    Args:
        rows: (B,) demo row indices; frames: (N, S, S, 3) uint8; tasks: (N,) task index; targets: per-row ids;
        prompts: task index -> (prompt ids (P,), mm_token_type_ids (P,)) int64 tensors; pad_id: padding id.
    """
    import torch

    seqs, pixels, grids = [], [], []
    for r in rows:
        ids, types = prompts[int(tasks[r])]
        tgt = torch.from_numpy(targets[r])
        seqs.append((torch.cat([ids, tgt]), torch.cat([types, torch.zeros_like(tgt)]), ids.numel()))
        px, grid_thw = preprocess_image(frames[r])  # (256, 1176), (1, 3)
        pixels.append(torch.from_numpy(px))
        grids.append(torch.from_numpy(grid_thw))
    b, length = len(seqs), max(s[0].numel() for s in seqs)
    input_ids = torch.full((b, length), pad_id, dtype=torch.int64)
    attention = torch.zeros((b, length), dtype=torch.int64)
    types = torch.zeros((b, length), dtype=torch.int64)
    labels = torch.full((b, length), -100, dtype=torch.int64)
    for i, (ids, tt, p) in enumerate(seqs):
        n = ids.numel()
        input_ids[i, :n], attention[i, :n], types[i, :n] = ids, 1, tt
        labels[i, p:n] = ids[p:]
    grid = torch.cat(grids)  # (B, 3)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "mm_token_type_ids": types,
        "labels": labels,
        "image_grid_thw": grid,
        "pixel_values": torch.cat(pixels),
        "frame_grid_thw": grid,
        "frame_of_row": torch.arange(b),
    }


def train_policy(
    demos_path: str | Path,
    out: str | Path,
    config: TrainConfig = TrainConfig(),
    progress: bool = True,
    command: str | None = None,
) -> TrainReport:
    """Build and train the MetaWorld policy; write a complete NORA-format checkpoint at ``out``.

    Raises:
        ExportError: ``out`` exists, bad config, or degenerate demonstrations.
    """
    import torch

    from nora_edge.export.reference import ReferencePolicy
    from nora_edge.export.train_fixture import assistant_logits, lr_at, torch_threads, write_trained_weights

    from .checkpoint import write_sim_checkpoint

    out = Path(out)
    if out.exists():
        raise ExportError(f"policy target already exists: {out}")
    demos = Demos.load(demos_path)
    acts = nora_actions(demos.actions)  # (N, 4)
    entry = norm_stats_entry(acts)
    norm = normalize(acts, entry)
    chunk_src = Demos(demos.tasks, demos.frames, norm, demos.task, demos.episode, demos.step, demos.failed)
    chunks = action_chunks(chunk_src, HORIZON)  # (N, 5, 4) normalized
    fit = FastTokenizer.fit(
        chunks,
        scale=config.fast_scale,
        vocab_size=config.fast_vocab,
        time_horizon=HORIZON,
        action_dim=chunks.shape[2],
    )
    # NORA's checkpoint keeps 2048 <robot_action_i> tokens; the fitted BPE uses the first fast_vocab of them
    fast = FastTokenizer(
        fit.tokenizer,
        scale=fit.scale,
        min_token=fit.min_token,
        vocab_size=names.NUM_ACTION_TOKENS,
        time_horizon=HORIZON,
        action_dim=chunks.shape[2],
    )
    tmp = out.parent / f"{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_sim_checkpoint(tmp, config.preset, {UNNORM_KEY: entry}, fast, config.seed)
        with torch_threads(config.threads):
            torch.manual_seed(config.seed)
            policy = ReferencePolicy.from_pretrained(tmp)
            ckpt = policy.checkpoint
            targets = fast_targets(fast, chunks, ckpt.action_base, ckpt.token_ids["im_end"])
            lengths = np.array([len(t) - 1 for t in targets])
            report = TrainReport(
                config=asdict(config),
                command=command or " ".join(sys.argv),
                rows=len(targets),
                episodes=demos.episodes,
                tasks=demos.tasks,
                fast_vocab=fast.tokenizer.get_vocab_size(),
                tokens_per_chunk={"mean": float(lengths.mean()), "max": int(lengths.max())},
            )
            prompts = {}
            for i, task in enumerate(demos.tasks):
                inputs = policy.prepare_inputs(demos.frames[int(np.argmax(demos.task == i))], TASKS[task])
                prompts[i] = (inputs["input_ids"][0], inputs["mm_token_type_ids"][0])
            model = policy.model
            model.train()
            opt = torch.optim.AdamW(
                model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay
            )
            rng = np.random.default_rng(config.seed)
            order = rng.permutation(len(targets))
            warmup = max(1, config.steps // 20)
            pad = ckpt.token_ids["endoftext"]
            t0 = time.perf_counter()
            with _bar(progress, config.steps) as advance:
                for step in range(config.steps):
                    lo = (step * config.batch) % len(order)
                    if lo + config.batch > len(order):
                        order, lo = rng.permutation(len(targets)), 0
                    batch = make_rows_batch(
                        order[lo : lo + config.batch], demos.frames, demos.task, targets, prompts, pad
                    )
                    logits, gold = assistant_logits(model, batch)
                    loss = torch.nn.functional.cross_entropy(logits, gold)
                    for g in opt.param_groups:
                        g["lr"] = lr_at(step, config.steps, config.lr, warmup)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    report.losses.append(float(loss.detach()))
                    advance(report.losses[-1])
            report.seconds = time.perf_counter() - t0
            model.eval()
            write_trained_weights(tmp, model, ckpt.config)
        (tmp / "train_report.json").write_text(json.dumps(asdict(report), indent=1) + "\n", encoding="utf-8")
        plot_losses(report.losses, tmp / "loss.png")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def plot_losses(losses: list[float], path: Path) -> None:
    """Loss per step and its 50-step running mean, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.array(losses)
    k = min(50, len(y))
    smooth = np.convolve(y, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(y, lw=0.5, alpha=0.4, label="per step")
    ax.plot(np.arange(k - 1, len(y)), smooth, lw=1.5, label=f"{k}-step mean")
    ax.set(
        yscale="log",
        xlabel="optimizer step",
        ylabel="action-token cross-entropy",
        title="MetaWorld policy training",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class _bar:
    """Rich progress bar with the running loss; ``advance(loss)``."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda loss: None
        if not sys.stderr.isatty():  # a log file: one line every 5% of the run
            t0, every, seen = time.perf_counter(), max(1, self.total // 20), [0]

            def log(loss: float) -> None:
                seen[0] += 1
                if seen[0] % every == 0 or seen[0] == self.total:
                    el = time.perf_counter() - t0
                    print(
                        f"step {seen[0]}/{self.total} loss {loss:.3f} {el / 60:.1f} min "
                        f"(eta {el / seen[0] * (self.total - seen[0]) / 60:.1f} min)",
                        file=sys.stderr,
                        flush=True,
                    )

            self.p = None
            return log
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(
            TextColumn("training policy"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"),
            TimeRemainingColumn(),
        )
        self.p.__enter__()
        job = self.p.add_task("train", total=self.total, loss=float("nan"))
        return lambda loss: self.p.update(job, advance=1, loss=loss)

    def __exit__(self, *exc):
        if self.enabled and self.p is not None:
            self.p.__exit__(*exc)


def main(argv: list[str] | None = None) -> None:
    """``python -m nora_edge.sim.train DEMOS OUT [--steps N --batch B --lr LR --seed S --threads K --preset P]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m nora_edge.sim.train", description=main.__doc__)
    ap.add_argument("demos")
    ap.add_argument("out")
    defaults = TrainConfig()
    for name in ("steps", "batch", "seed", "threads"):
        ap.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--fast-scale", type=float, default=defaults.fast_scale)
    ap.add_argument("--fast-vocab", type=int, default=defaults.fast_vocab)
    ap.add_argument("--preset", default=defaults.preset)
    a = ap.parse_args(argv)
    cfg = TrainConfig(steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed, threads=a.threads, preset=a.preset,
                      fast_scale=a.fast_scale, fast_vocab=a.fast_vocab)  # fmt: skip
    cmd = "python -m nora_edge.sim.train " + " ".join(sys.argv[1:] if argv is None else argv)
    report = train_policy(a.demos, a.out, cfg, command=cmd)
    print(
        f"trained {cfg.steps} steps in {report.seconds / 60:.1f} min, final loss "
        f"{np.mean(report.losses[-50:]):.3f}: {a.out} (loss curve {a.out}/loss.png)"
    )


if __name__ == "__main__":
    main()
