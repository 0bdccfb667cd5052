"""``nora-edge demo``: the README's main job on a fresh machine, end to end.

Data flow: a tiny NORA-Long fixture checkpoint (``export.fixtures``) -> bundles at fp32 and at every quantized
precision the export stage offers (int8 / int4 when ``nora_edge.export.quantize`` has the recipe and
``export_bundle`` accepts it; a refusal is recorded and shown, never hidden) -> ``run.run_bench`` of each bundle
against the PyTorch reference in the same run -> ``out/report.md`` (headline table + links to each bench report)
and the same table printed.
"""

from __future__ import annotations

from pathlib import Path

from nora_edge.bench.report import table, write_json_atomic, write_text_atomic
from nora_edge.bench.run import run_bench
from nora_edge.errors import ExportError, InputError

QUANTIZED = ("int8", "int4")
HEADER = [
    "bundle",
    "MB",
    "median ms",
    "p99 ms",
    "actions/s",
    "tokens",
    "ref median ms",
    "ref tokens",
    "speedup (median)",
    "speedup / token",
    "25 Hz misses",
]


def available_precisions() -> list[str]:
    """fp32 plus the quantized recipes the export stage ships (names from ``export.quantize.list_recipes``)."""
    try:
        from nora_edge.export.quantize import list_recipes
    except ImportError:
        return ["fp32"]
    names = {r.name for r in list_recipes()}
    return ["fp32", *[p for p in QUANTIZED if p in names]]


def build_checkpoint(out: Path, preset: str, horizon: int, seed: int, train_steps: int) -> Path:
    """The fixture checkpoint (reused when a previous demo left a complete one)."""
    from nora_edge.checkpoint import NoraCheckpoint
    from nora_edge.export.fixtures import build_fixture

    ckpt = out / (f"ckpt-{preset}-h{horizon}" + ("-trained" if train_steps else ""))
    if ckpt.is_dir():
        NoraCheckpoint.load(ckpt)  # raises CheckpointError if it is not a complete checkpoint
        return ckpt
    return build_fixture(
        ckpt, preset=preset, horizon=horizon, seed=seed, train_steps=train_steps, progress=True
    )


def export_all(ckpt: Path, out: Path, precisions: list[str]) -> tuple[dict[str, Path], dict[str, str]]:
    """Export one bundle per precision; returns (bundles, refusals with the export stage's message)."""
    from nora_edge.export.pipeline import export_bundle

    bundles, refused = {}, {}
    for p in precisions:
        try:
            bundles[p] = export_bundle(ckpt, out / f"bundle-{p}", precision=p, overwrite=True, progress=True)
        except ExportError as e:
            if p == "fp32":
                raise
            refused[p] = str(e)
    return bundles, refused


def headline_row(name: str, res: dict) -> list:
    rt, ref, sp = res["runtime"], res.get("reference"), res.get("speedup") or {}
    return [
        name,
        res["bundle"]["size_bytes"] / 1e6,
        rt["e2e"]["median"],
        rt["e2e"]["p99"],
        rt["e2e"]["actions_per_s"],
        rt["tokens_per_chunk"]["median"] if rt["tokens_per_chunk"] else "n/a",
        ref["e2e"]["median"] if ref else "n/a",
        ref["tokens_per_chunk"]["median"] if ref else "n/a",
        f"{sp['e2e_median']:.1f}x" if sp else "n/a",
        f"{sp['per_generated_token']:.1f}x" if sp.get("per_generated_token") else "n/a",
        f"{100 * rt['e2e']['deadline_miss_rate']:.0f}%",
    ]


def run_demo(
    out: str | Path,
    *,
    preset: str = "tiny",
    horizon: int = 5,
    seed: int = 0,
    steps: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    precisions: list[str] | None = None,
    checkpoint: str | Path | None = None,
    train: bool = True,
) -> Path:
    """Fixture -> bundles -> bench with reference -> ``out/report.md``; prints the headline table.

    Args:
        out: working and report directory (created).
        preset / horizon / seed: the fixture checkpoint (``export.fixtures.build_fixture``).
        steps / warmup: per bench run.
        threads: ORT and torch threads (None: library defaults).
        precisions: bundles to build (default: fp32 + the quantized recipes available).
        checkpoint: use this NORA checkpoint instead of building the fixture.
        train: train the fixture on the synthetic task first (``export.train_fixture``; ~20-30 s) so the
            reference's output is well-formed and the actions can be compared; False keeps random weights.

    Returns:
        Path of the summary ``report.md``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    precisions = precisions or available_precisions()
    if "fp32" not in precisions:
        raise InputError(f"precisions must include fp32 (the reference precision), got {precisions}")
    if checkpoint is not None:
        ckpt, steps_trained = Path(checkpoint), None
    else:
        from nora_edge.export.train_fixture import FIXTURE_TRAIN_STEPS

        steps_trained = FIXTURE_TRAIN_STEPS[horizon] if train else 0
        ckpt = build_checkpoint(out, preset, horizon, seed, steps_trained)
    bundles, refused = export_all(ckpt, out, precisions)
    results = {}
    for p, bundle in bundles.items():
        results[p] = run_bench(
            bundle, reference=ckpt, steps=steps, warmup=warmup, threads=threads, out=out / f"bench-{p}"
        )
    rows = [headline_row(f"{ckpt.name} {p}", r) for p, r in results.items()]
    text = summary_markdown(ckpt, rows, results, refused, steps_trained)
    write_json_atomic(
        out / "demo.json",
        {"checkpoint": ckpt, "refused": refused, "results": {p: r["files"] for p, r in results.items()}},
    )
    report = write_text_atomic(out / "report.md", text)
    print_headline(rows, refused, report)
    return report


def summary_markdown(
    ckpt: Path, rows: list[list], results: dict, refused: dict[str, str], steps_trained: int | None
) -> str:
    if steps_trained is None:
        what = "a user-supplied checkpoint"
    elif steps_trained:
        what = (
            f"a fixture trained {steps_trained} steps on a synthetic instruction -> FAST-chunk task (well-formed "
            "output; its actions follow the instruction, they are not robot skills)"
        )
    else:
        what = "a random-weight fixture (its actions mean nothing, its timings do)"
    out = [
        "# nora-edge demo",
        "",
        f"Checkpoint `{ckpt}`: {what}. Each bundle was benchmarked against the PyTorch reference (HF "
        "`generate`, fp32) on the same frames in the same run.",
        "",
        table(HEADER, rows),
        "",
        "speedup = reference median / runtime median per inference. The runtime stops when the chunk is "
        "complete (constrained decoding); the reference generates until `<|im_end|>` or max_new_tokens, so on an "
        "untrained fixture it usually generates more tokens: speedup / token compares per generated token.",
        "",
    ]
    out += [f"- {p}: [bench report](bench-{p}/report.md)" for p in results]
    for p, why in refused.items():
        out.append(f"- {p}: not built, the export stage refused: {why}")
    return "\n".join(out) + "\n"


def print_headline(rows: list[list], refused: dict[str, str], report: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="nora-edge demo: runtime vs PyTorch reference (same run)")
    for h in HEADER:
        t.add_column(h)
    for row in rows:
        t.add_row(
            *[(f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}") if isinstance(v, float) else str(v) for v in row]
        )
    console = Console(width=max(Console().width, 150))  # the table needs ~150 columns; logs default to 80
    console.print(t)
    for p, why in refused.items():
        console.print(f"[yellow]{p} bundle not built: {why}[/yellow]")
    console.print(f"report: {report}")
