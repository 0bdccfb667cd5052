"""Plain constrained greedy vs lossless multi-token decoding (nora_edge.multitoken), side by side in one process.

Data flow:
  model   tiny-trained (tiny preset, horizon 5, trained on the synthetic task) | medium (random, horizon 5) |
          metaworld (the committed policies/metaworld-nora-long)
  --build_fixture / export_bundle (fp32, action head, default fp16 table) / add_verify_graph--> bundle + verify graph
  (cached under --work)
  inputs  tiny-trained, medium: the parity set tests/synthetic_pairs.held_out_pairs(N, seed=11), in order;
          metaworld: chunk-start frames of expert episodes (sim.frames.policy_view_samples), consecutive per task,
          or with --inputs the frames the policy met in its own closed loop (sim.closed_loop_inputs), in call order
  --per input, order alternated: MultiTokenRunner.plain (the policy's own greedy loop) and .multitoken (drafts from
  the earlier chunks of the same instruction / the n-gram table, learned as the run goes)-->
  ids compared on every input (a difference is reported, never hidden); decoder calls per chunk (prefill
  excluded), tokens per chunk, drafts accepted per verify call, decode ms per chunk median / p99 (the decode loop
  only: preprocessing, vision and prefill are the same call for both)
  --numerics: on every input the plain ids are re-run as ONE verify call from the prefill and compared with the
  sequential step logits: positions bitwise equal, max |difference|, and whether the selection changes.
  --> a Markdown table on stdout (+ --json).

Run: ``python -m nora_edge.bench.multitoken_bench --models tiny-trained medium metaworld --n 40``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from nora_edge.bench.report import table
from nora_edge.bench.stats import summarize
from nora_edge.generate import GreedySelector, decode_step, greedy
from nora_edge.multitoken import DEFAULT_MAX_DRAFT, DEFAULT_TIE_MARGIN, MultiTokenRunner

MODELS = ("tiny-trained", "medium", "metaworld")
REPO = Path(__file__).resolve().parents[1]
METAWORLD_POLICY = REPO / "policies" / "metaworld-nora-long"


def prepare(model: str, work: Path) -> Path:
    """The bundle with ``decoder_verify`` for ``model`` (built once under ``work``)."""
    import torch

    from nora_edge.export.decoder_verify import add_verify_graph
    from nora_edge.export.fixtures import build_fixture
    from nora_edge.export.pipeline import export_bundle
    from nora_edge.export.train_fixture import FIXTURE_TRAIN_STEPS

    torch.set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{model}-verify"
    if out.exists():
        return out
    if model == "metaworld":
        ckpt = METAWORLD_POLICY
    else:
        ckpt = work / f"{model}-ckpt"
        if not ckpt.exists():
            kw = {"train_steps": FIXTURE_TRAIN_STEPS[5]} if model == "tiny-trained" else {}
            preset = "tiny" if model == "tiny-trained" else "medium"
            build_fixture(ckpt, preset=preset, horizon=5, seed=0, progress=False, **kw)
    plain = work / f"{model}-plain"
    if not plain.exists():
        export_bundle(ckpt, plain, validate=False, progress=False)
    return add_verify_graph(plain, ckpt, out)


def inputs(model: str, n: int, recorded: Path | None = None) -> list[tuple[np.ndarray, str]]:
    """The inputs of ``model`` (module docstring); ``recorded``: a ``sim.closed_loop_inputs`` file (the frames the
    policy met in closed loop, in call order), its first ``n`` calls."""
    if recorded is not None:
        from nora_edge.sim.closed_loop_inputs import load_inputs

        rec = load_inputs(recorded)
        return [(rec.frames[i], str(rec.instructions[i])) for i in range(min(n, len(rec)))]
    if model == "metaworld":
        from nora_edge.sim.frames import policy_view_samples
        from nora_edge.sim.metaworld_env import TASKS

        per_task = max(1, n // len(TASKS))
        return policy_view_samples(list(TASKS), per_task, seed=0)[:n]
    sys.path.insert(0, str(REPO))
    from tests.synthetic_pairs import held_out_pairs

    return held_out_pairs(n, seed=11)


def numerics(runner: MultiTokenRunner, image: np.ndarray, instruction: str) -> dict:
    """Plain ids re-run as one verify call vs the sequential steps' logits (module docstring)."""
    pol = runner.policy
    prompt, logits0, cache0 = runner._prefill(image, instruction)
    ids = greedy(pol.decoder, logits0, cache0, prompt.input_ids, prompt.rope_delta, pol._greedy).ids
    feed, index = ids[:-1], int(prompt.input_ids.size)
    if feed.size == 0:
        return {"positions": 0, "bitwise": 0, "max_abs": 0.0, "changed": 0}
    seq, cache = [], cache0
    for j, t in enumerate(feed.tolist()):
        lg, cache = decode_step(pol.decoder, t, index + j, prompt.rope_delta, cache)
        seq.append(lg)
    ver, _ = runner.verify.forward(feed, index, prompt.rope_delta, cache0)  # (N-1, rows)
    seq = np.stack(seq)  # (N-1, rows)
    sel = GreedySelector(pol.decoder, prompt.input_ids, pol._greedy)
    sel.choose(logits0)
    changed = 0
    for j in range(feed.size):  # teacher-forced: the selection on batched logits vs the plain id
        if sel.choose(ver[j]) != int(ids[j + 1]):
            changed += 1
            break
    return {
        "positions": int(feed.size),
        "bitwise": int(sum(np.array_equal(a, b) for a, b in zip(seq, ver, strict=True))),
        "max_abs": float(np.abs(seq - ver).max()),
        "changed": changed,
    }


def bench_model(
    model: str, work: Path, n: int, max_draft: int, tie_margin: float | None, recorded: Path | None = None
) -> dict:
    bundle = prepare(model, work)
    runner = MultiTokenRunner.load(bundle, providers="cpu", threads=1, forced_tokens="flag")
    pairs = inputs(model, n, recorded)
    for image, text in pairs[:2]:  # warm-up (not recorded, drafts not learned)
        runner.plain(image, text)
        runner.multitoken(image, text, learn=False)
    rec = {k: [] for k in ("tokens", "plain_calls", "mt_calls", "plain_ms", "mt_ms", "verify", "acc", "prop")}
    same = fallbacks = 0
    num = {"positions": 0, "bitwise": 0, "max_abs": 0.0, "changed": 0}
    for i, (image, text) in enumerate(pairs):
        if i % 2:
            m, st, sm = runner.multitoken(image, text, max_draft=max_draft, tie_margin=tie_margin)
            p, sp = runner.plain(image, text)
        else:
            p, sp = runner.plain(image, text)
            m, st, sm = runner.multitoken(image, text, max_draft=max_draft, tie_margin=tie_margin)
        same += bool(np.array_equal(p.ids, m.ids) and p.classes == m.classes)
        fallbacks += st.fallback
        rec["tokens"].append(p.ids.size)
        rec["plain_calls"].append(len(p.step_seconds))
        rec["mt_calls"].append(st.decoder_calls)
        rec["plain_ms"].append(sp * 1e3)
        rec["mt_ms"].append(sm * 1e3)
        rec["verify"].append(st.verify_calls)
        rec["acc"].append(st.accepted)
        rec["prop"].append(st.proposed)
        d = numerics(runner, image, text)
        num = {k: (max(num[k], d[k]) if k == "max_abs" else num[k] + d[k]) for k in num}
    verify = sum(rec["verify"])
    return {
        "model": model,
        "inputs": len(pairs),
        "ids_identical": same,
        "fallbacks": fallbacks,
        "tokens_per_chunk": float(np.mean(rec["tokens"])),
        "plain_calls_per_chunk": float(np.mean(rec["plain_calls"])),
        "mt_calls_per_chunk": float(np.mean(rec["mt_calls"])),
        "call_reduction": float(sum(rec["plain_calls"]) / max(1, sum(rec["mt_calls"]))),
        "accepted_per_verify": float(sum(rec["acc"]) / max(1, verify)),
        "acceptance_rate": float(sum(rec["acc"]) / max(1, sum(rec["prop"]))),
        "plain_ms": summarize(rec["plain_ms"]),
        "mt_ms": summarize(rec["mt_ms"]),
        "numerics": num,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--n", type=int, default=40, help="inputs per model")
    ap.add_argument("--work", type=Path, default=Path("out/multitoken-bench"))
    ap.add_argument("--max-draft", type=int, default=DEFAULT_MAX_DRAFT)
    ap.add_argument("--tie-margin", type=float, default=DEFAULT_TIE_MARGIN, help="negative: guard off")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--inputs", type=Path, default=None,
        help="metaworld: closed-loop inputs recorded by python -m nora_edge.sim.closed_loop_inputs (first --n)",
    )  # fmt: skip
    a = ap.parse_args(argv)
    margin = None if a.tie_margin < 0 else a.tie_margin
    res = [
        bench_model(m, a.work, a.n, a.max_draft, margin, a.inputs if m == "metaworld" else None)
        for m in a.models
    ]
    head = ["model", "inputs", "ids identical", "fallbacks", "tokens/chunk", "calls/chunk plain",
            "calls/chunk multi", "call reduction", "accepted/verify", "ms/chunk plain p50", "p99",
            "ms/chunk multi p50", "p99", "batched==seq bitwise", "max |dlogit|", "choice changed"]  # fmt: skip
    rows = [
        [r["model"], r["inputs"], r["ids_identical"], r["fallbacks"], r["tokens_per_chunk"],
         r["plain_calls_per_chunk"], r["mt_calls_per_chunk"], r["call_reduction"], r["accepted_per_verify"],
         r["plain_ms"]["median"], r["plain_ms"]["p99"], r["mt_ms"]["median"], r["mt_ms"]["p99"],
         f"{r['numerics']['bitwise']}/{r['numerics']['positions']}", r["numerics"]["max_abs"],
         r["numerics"]["changed"]]
        for r in res
    ]  # fmt: skip
    print(table(head, rows))
    print(
        f"max_draft {a.max_draft}, tie_margin {margin}; decode loop only (prefill shared), 1 thread, CPU EP"
    )
    if a.json is not None:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
