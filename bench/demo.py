"""``nora-edge demo``: the README's main job on a fresh machine, end to end.

Data flow: a tiny NORA-Long fixture checkpoint (``export.fixtures``) -> the fp32 bundle (``export_bundle``,
validated against PyTorch) -> an int8 and an int4 bundle quantized from it (``quantize_bundle``, each gated by
its recipe's fidelity thresholds) -> ``run.run_bench`` of every bundle that was built against the PyTorch
reference in the same run -> ``out/report.md`` (headline table + links to each bench report) and the same table
printed. A bundle that fails to build is never skipped quietly: the report says so in its first lines, and
:func:`run_demo` then raises :class:`DemoError` naming every failed bundle (``nora-edge demo`` exits 2).
"""

from __future__ import annotations

from pathlib import Path

from nora_edge.bench.report import table, write_json_atomic, write_text_atomic
from nora_edge.bench.run import run_bench
from nora_edge.errors import ExportError, InputError, NoraEdgeError

PRECISIONS = ("fp32", "int8", "int4")  # what `make demo` builds; every one must build
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


class DemoError(ExportError):
    """One or more of the demo's bundles failed to build.

    Attributes:
        errors: precision -> the error its build raised (e.g. a ``FidelityGateError`` with its failed metrics).
        report: the summary written for the bundles that were built.
    """

    def __init__(self, message: str, *, errors: dict[str, NoraEdgeError], report: Path) -> None:
        super().__init__(message)
        self.errors = errors
        self.report = report


def describe_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


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


def build_bundles(
    ckpt: Path, out: Path, precisions: list[str]
) -> tuple[dict[str, Path], dict[str, NoraEdgeError]]:
    """The fp32 bundle, then each quantized one from it; returns (bundles built, failures).

    A failed fp32 export raises at once (nothing else can be built). A quantized bundle that fails (a
    quantizer error, a missed fidelity threshold, an unknown recipe) is recorded as ``{precision: error}`` and
    the next one is tried, so one run names every failure; the caller must fail the demo.
    """
    from rich.console import Console

    from nora_edge.export.pipeline import export_bundle
    from nora_edge.export.quantize import quantize_bundle

    console = Console(stderr=True)
    fp32 = export_bundle(ckpt, out / "bundle-fp32", precision="fp32", overwrite=True, progress=True)
    bundles, errors = {"fp32": fp32}, {}
    for p in precisions:
        if p == "fp32":
            continue
        console.print(f"quantize: bundle-{p} from {fp32.name} (recipe {p}, fidelity-gated)")
        try:
            bundles[p] = quantize_bundle(fp32, out / f"bundle-{p}", p, overwrite=True)
        except NoraEdgeError as e:
            errors[p] = e
            console.print(f"[red]{p} bundle FAILED to build: {describe_error(e)}[/red]")
    return bundles, errors


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
        precisions: bundles to build (default :data:`PRECISIONS`: fp32, int8, int4); must include fp32, the
            source of the quantized ones.
        checkpoint: use this NORA checkpoint instead of building the fixture.
        train: train the fixture on the synthetic task first (``export.train_fixture``; ~20-30 s) so the
            reference's output is well-formed and the actions can be compared; False keeps random weights.

    Returns:
        Path of the summary ``report.md`` (every requested bundle was built and benchmarked).

    Raises:
        InputError: ``precisions`` without fp32, or with a name twice.
        DemoError: (an ExportError) a quantized bundle failed to build; names each one and its error. The
            bundles that were built are benchmarked and ``report.md`` is written (it says what failed) first.
        ExportError / CheckpointError: the fp32 export or the fixture failed (nothing is benchmarked).
    """
    out = Path(out)
    precisions = list(precisions) if precisions is not None else list(PRECISIONS)
    if "fp32" not in precisions:
        raise InputError(f"precisions must include fp32 (the reference precision), got {precisions}")
    if len(set(precisions)) != len(precisions):
        raise InputError(f"precisions has a duplicate: {precisions}")
    out.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None:
        ckpt, steps_trained = Path(checkpoint), None
    else:
        from nora_edge.export.train_fixture import FIXTURE_TRAIN_STEPS

        steps_trained = FIXTURE_TRAIN_STEPS[horizon] if train else 0
        ckpt = build_checkpoint(out, preset, horizon, seed, steps_trained)
    bundles, errors = build_bundles(ckpt, out, precisions)
    failed = {p: describe_error(e) for p, e in errors.items()}
    results = {}
    for p in precisions:
        if p in bundles:
            results[p] = run_bench(
                bundles[p],
                reference=ckpt,
                steps=steps,
                warmup=warmup,
                threads=threads,
                out=out / f"bench-{p}",
            )
    rows = [headline_row(f"{ckpt.name} {p}", r) for p, r in results.items()]
    text = summary_markdown(ckpt, rows, results, failed, steps_trained)
    write_json_atomic(
        out / "demo.json",
        {
            "checkpoint": ckpt,
            "requested": precisions,
            "built": list(results),
            "failed": failed,
            "results": {p: r["files"] for p, r in results.items()},
        },
    )
    report = write_text_atomic(out / "report.md", text)
    print_headline(rows, failed, report)
    if failed:
        names = ", ".join(failed)
        raise DemoError(
            f"demo failed: {len(failed)} of {len(precisions)} bundles did not build ({names}); "
            + "; ".join(f"bundle-{p}: {why}" for p, why in failed.items())
            + f". The report for the bundles that were built is {report}",
            errors=errors,
            report=report,
        ) from next(iter(errors.values()))
    return report


def summary_markdown(
    ckpt: Path, rows: list[list], results: dict, failed: dict[str, str], steps_trained: int | None
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
    out = ["# nora-edge demo", ""]
    if failed:
        out += [f"**DEMO FAILED: {len(failed)} bundle(s) did not build ({', '.join(failed)}).**", ""]
        out += [f"- {p}: {why}" for p, why in failed.items()]
        out.append("")
    out += [
        f"Checkpoint `{ckpt}`: {what}. Each bundle was benchmarked against the PyTorch reference (HF "
        "`generate`, fp32) on the same frames in the same run.",
        "",
        table(HEADER, rows),
        "",
        "speedup = reference median / runtime median per inference. The runtime stops when the chunk is "
        "complete (constrained decoding); the reference generates until `<|im_end|>` or its length limit, so on "
        "an untrained fixture it usually generates more tokens: speedup / token compares per generated token.",
        "",
    ]
    out += [f"- {p}: [bench report](bench-{p}/report.md)" for p in results]
    return "\n".join(out) + "\n"


def print_headline(
    rows: list[list], failed: dict[str, str], report: Path, header: list[str] = HEADER
) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="nora-edge demo: runtime vs PyTorch reference (same run)")
    for h in header:
        t.add_column(h)
    for row in rows:
        t.add_row(
            *[(f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}") if isinstance(v, float) else str(v) for v in row]
        )
    console = Console(width=max(Console().width, 150))  # the table needs ~150 columns; logs default to 80
    console.print(t)
    for p, why in failed.items():
        console.print(f"[bold red]{p} bundle FAILED to build: {why}[/bold red]")
    console.print(f"report: {report}")
