"""Plain constrained greedy vs lossless multi-token decoding (nora_edge.multitoken), side by side in one process.

Data flow:
  model   tiny-trained (tiny preset, horizon 5, trained on the synthetic task) | medium (random, horizon 5) |
          metaworld (the committed policies/metaworld-nora-long)
  --build_fixture / export_bundle (fp32, action head, default fp16 table, multi_token=True: the decoder also
  outputs logits_all; calibration frames of the same task, other seeds than the inputs: drafts.json)--> bundle (cached under --work); or --bundle: any bundle exported with --multi-token (e.g. an
  int4 one quantized from it)
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

Run: ``python -m nora_edge.bench.multitoken_bench --models tiny-trained medium metaworld --n 40``;
``--bundle B --inputs closed_loop.npz --n 600`` for a given bundle on recorded closed-loop frames.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from nora_edge.bench.report import table
from nora_edge.bench.stats import summarize
from nora_edge.drafts import DraftTable
from nora_edge.multitoken import CPU_HOST, DEFAULT_MAX_DRAFT, DEFAULT_TIE_MARGIN, MultiTokenConfig
from nora_edge.multitoken_runner import MultiTokenRunner, batched_vs_sequential

MODELS = ("tiny-trained", "medium", "metaworld")
REPO = Path(__file__).resolve().parents[1]
METAWORLD_POLICY = REPO / "policies" / "metaworld-nora-long"
DRAFT_FRAMES = 8  # MetaWorld expert frames per task that drafts.json is built from


def prepare(model: str, work: Path) -> Path:
    """The ``--multi-token`` bundle of ``model`` (built once under ``work``)."""
    import torch

    from nora_edge.export.fixtures import build_fixture
    from nora_edge.export.pipeline import export_bundle
    from nora_edge.export.quantize import CalibrationSample
    from nora_edge.export.train_fixture import FIXTURE_TRAIN_STEPS

    torch.set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{model}-multi-token-drafts"
    if out.exists():
        return out
    if model == "metaworld":
        from nora_edge.sim.frames import policy_view_samples
        from nora_edge.sim.metaworld_env import TASKS

        ckpt = METAWORLD_POLICY
        calib = policy_view_samples(list(TASKS), DRAFT_FRAMES, seed=1)  # expert frames; inputs: seed 0
    else:
        sys.path.insert(0, str(REPO))
        from tests.synthetic_pairs import held_out_pairs

        calib = held_out_pairs(16, seed=5)  # the inputs are seed 11's
        ckpt = work / f"{model}-ckpt"
        if not ckpt.exists():
            kw = {"train_steps": FIXTURE_TRAIN_STEPS[5]} if model == "tiny-trained" else {}
            preset = "tiny" if model == "tiny-trained" else "medium"
            build_fixture(ckpt, preset=preset, horizon=5, seed=0, progress=False, **kw)
    samples = [CalibrationSample(image, text) for image, text in calib]  # drafts.json is built from these
    return export_bundle(ckpt, out, validate=False, progress=False, multi_token=True, calibration=samples)


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


# fewest calls | fewer, shorter calls | the default without the bundle's drafts.json (what the file adds)
SETTINGS = {
    "default": MultiTokenConfig(),
    "cpu-host": CPU_HOST,
    "no-draft-file": MultiTokenConfig(bundle_drafts=False),
}
PAIRS = {"both": ("default", "cpu-host"), "all": tuple(SETTINGS)}


def fresh_table(runner: MultiTokenRunner, config: MultiTokenConfig) -> DraftTable:
    """A new draft table, seeded from the bundle's drafts.json when it ships one and the setting uses it."""
    from nora_edge.multitoken import bundle_drafts

    table, b = DraftTable(), runner.policy.bundle
    if config.bundle_drafts:
        table.seed(bundle_drafts(b, b.embeddings["shape"][0]))
    return table


def bench_model(
    model: str,
    work: Path,
    n: int,
    configs: dict[str, MultiTokenConfig],
    recorded: Path | None = None,
    bundle: Path | None = None,
) -> list[dict]:
    """One model's (or ``bundle``'s) side-by-side records, one per multi-token setting (module docstring).

    Each setting drafts from its own table (seeded from the bundle's drafts.json unless the setting turns it
    off), so no setting sees a chunk another one just decoded. ``first_*`` fields cover each instruction's first
    chunk: the chunks a process's own history cannot draft for.
    """
    bundle = bundle if bundle is not None else prepare(model, work)
    runner = MultiTokenRunner.load(bundle, providers="cpu", threads=1, forced_tokens="flag")
    pairs = inputs(model, n, recorded)
    for image, text in pairs[:2]:  # warm-up (not recorded, drafts not learned)
        runner.plain(image, text)
        runner.multitoken(image, text, learn=False)
    keys = ("mt_calls", "mt_ms", "verify", "acc", "prop", "per_call")
    tables = {name: fresh_table(runner, c) for name, c in configs.items()}
    seen: set[str] = set()
    first: list[bool] = []  # per input: the instruction's first chunk
    rec = {name: {k: [] for k in keys} for name in configs}
    plain = {k: [] for k in ("tokens", "plain_calls", "plain_ms")}
    same = dict.fromkeys(configs, 0)
    fallbacks = dict.fromkeys(configs, 0)
    num = {"positions": 0, "bitwise": 0, "max_abs": 0.0, "changed": 0}
    for i, (image, text) in enumerate(pairs):
        order = ["plain", *configs] if i % 2 == 0 else [*configs, "plain"]  # alternate who runs first
        got = {}
        for name in order:
            if name == "plain":
                got[name] = runner.plain(image, text)
                continue
            runner.drafts = tables[name]
            c = configs[name]
            got[name] = runner.multitoken(
                image, text, max_draft=c.max_draft, tie_margin=c.tie_margin, gate_rate=c.gate_rate,
                adaptive_draft=c.adaptive_draft,
            )  # fmt: skip
        first.append(text not in seen)
        seen.add(text)
        p, sp = got["plain"]
        plain["tokens"].append(p.ids.size)
        plain["plain_calls"].append(len(p.step_seconds))
        plain["plain_ms"].append(sp * 1e3)
        for name in configs:
            m, st, sm = got[name]
            r = rec[name]
            same[name] += bool(np.array_equal(p.ids, m.ids) and p.classes == m.classes)
            fallbacks[name] += st.fallback
            r["mt_calls"].append(st.decoder_calls)
            r["mt_ms"].append(sm * 1e3)
            r["verify"].append(st.verify_calls)
            r["acc"].append(st.accepted)
            r["prop"].append(st.proposed)
            r["per_call"].append(list(st.per_call_accepted))
        d = batched_vs_sequential(runner, image, text)
        num = {k: (max(num[k], d[k]) if k == "max_abs" else num[k] + d[k]) for k in num}
    out = []
    firsts = [i for i, f in enumerate(first) if f]
    for name, c in configs.items():
        r = rec[name]
        seeded = bool(c.bundle_drafts and runner.policy.bundle.manifest.get("drafts"))
        out.append({
            "model": model,
            "setting": name,
            "config": {"max_draft": c.max_draft, "tie_margin": c.tie_margin, "gate_rate": c.gate_rate,
                       "adaptive_draft": c.adaptive_draft, "bundle_drafts": seeded},
            "inputs": len(pairs),
            "first_chunks": len(firsts),
            "first_plain_calls_per_chunk": float(np.mean([plain["plain_calls"][i] for i in firsts])),
            "first_mt_calls_per_chunk": float(np.mean([r["mt_calls"][i] for i in firsts])),
            "ids_identical": same[name],
            "fallbacks": fallbacks[name],
            "tokens_per_chunk": float(np.mean(plain["tokens"])),
            "plain_calls_per_chunk": float(np.mean(plain["plain_calls"])),
            "mt_calls_per_chunk": float(np.mean(r["mt_calls"])),
            "call_reduction": float(sum(plain["plain_calls"]) / max(1, sum(r["mt_calls"]))),
            "accepted_per_verify": float(sum(r["acc"]) / max(1, sum(r["verify"]))),
            "acceptance_rate": float(sum(r["acc"]) / max(1, sum(r["prop"]))),
            "plain_ms": summarize(plain["plain_ms"]),
            "mt_ms": summarize(r["mt_ms"]),
            "numerics": num,
            "tokens_histogram": histogram(plain["tokens"]),
            "accepted_per_verify_histogram": histogram(a for call in r["per_call"] for a in call),
        })  # fmt: skip
    return out


def histogram(values) -> dict[str, int]:
    """value -> count, keys as strings in ascending order (JSON)."""
    counts: dict[int, int] = {}
    for v in values:
        counts[int(v)] = counts.get(int(v), 0) + 1
    return {str(k): counts[k] for k in sorted(counts)}


def table_markdown(res: list[dict]) -> str:
    """The side-by-side table of :func:`bench_model` records (one row per model and setting)."""
    head = ["model", "setting", "inputs", "ids identical", "fallbacks", "tokens/chunk", "calls/chunk plain",
            "calls/chunk multi", "call reduction", "accepted/verify", "ms/chunk plain p50", "p99",
            "ms/chunk multi p50", "p99", "batched==seq bitwise", "max |dlogit|", "choice changed",
            "first chunks", "calls/first chunk plain", "multi"]  # fmt: skip
    rows = [
        [r["model"], r["setting"], r["inputs"], r["ids_identical"], r["fallbacks"], r["tokens_per_chunk"],
         r["plain_calls_per_chunk"], r["mt_calls_per_chunk"], r["call_reduction"], r["accepted_per_verify"],
         r["plain_ms"]["median"], r["plain_ms"]["p99"], r["mt_ms"]["median"], r["mt_ms"]["p99"],
         f"{r['numerics']['bitwise']}/{r['numerics']['positions']}", r["numerics"]["max_abs"],
         r["numerics"]["changed"], r["first_chunks"], r["first_plain_calls_per_chunk"],
         r["first_mt_calls_per_chunk"]]
        for r in res
    ]  # fmt: skip
    return table(head, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument(
        "--bundle", type=Path, default=None,
        help="bench this --multi-token bundle instead of --models (its name labels the row); with --inputs",
    )  # fmt: skip
    ap.add_argument("--n", type=int, default=40, help="inputs per model")
    ap.add_argument("--work", type=Path, default=Path("out/multitoken-bench"))
    ap.add_argument("--max-draft", type=int, default=DEFAULT_MAX_DRAFT)
    ap.add_argument("--tie-margin", type=float, default=DEFAULT_TIE_MARGIN, help="negative: guard off")
    ap.add_argument(
        "--settings", choices=[*SETTINGS, *PAIRS], default="both",
        help="default: no gate, fixed K (fewest calls); cpu-host: gate 0.2 + adaptive K (multitoken.CPU_HOST); "
        "no-draft-file: default without the bundle's drafts.json; both: default + cpu-host; all",
    )  # fmt: skip
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--record", type=Path, default=None,
        help="with --bundle: write the acceptance record every bench report's Orin prediction reads "
        "(bench/baselines/multitoken_acceptance.json is the committed one)",
    )  # fmt: skip
    ap.add_argument(
        "--inputs", type=Path, default=None,
        help="metaworld: closed-loop inputs recorded by python -m nora_edge.sim.closed_loop_inputs (first --n)",
    )  # fmt: skip
    a = ap.parse_args(argv)
    margin = None if a.tie_margin < 0 else a.tie_margin
    names = list(PAIRS.get(a.settings, (a.settings,)))
    configs = {n: replace(SETTINGS[n], max_draft=a.max_draft, tie_margin=margin) for n in names}
    if a.bundle is not None:
        if a.inputs is None:
            ap.error("--bundle needs --inputs (recorded closed-loop frames)")
        res = bench_model(a.bundle.name, a.work, a.n, configs, a.inputs, a.bundle)
    else:
        res = [
            r
            for m in a.models
            for r in bench_model(m, a.work, a.n, configs, a.inputs if m == "metaworld" else None)
        ]
    print(table_markdown(res))
    print(
        f"max_draft {a.max_draft}, tie_margin {margin}; decode loop only (prefill shared), 1 thread, CPU EP; "
        "plain columns: one plain run per input, shared by the settings"
    )
    if a.json is not None:
        a.json.write_text(json.dumps(res, indent=1))
    if a.record is not None:
        import datetime

        from nora_edge.bench.multitoken_acceptance import record_from

        if a.bundle is None:
            ap.error("--record needs --bundle and --inputs (a policy's own closed-loop calls)")
        first = next(r for r in res if r["setting"] == names[0])
        rec = record_from(first, a.inputs, a.bundle, a.max_draft, datetime.date.today().isoformat())
        a.record.write_text(json.dumps(rec, indent=1) + "\n")
        print(
            f"acceptance record written: {a.record} (acceptance {rec['acceptance']:.3f}, block {rec['block']})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
