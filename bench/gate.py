"""CI gate: compare a bench run against a stored baseline, normalized by the in-run microbenchmark, and confirm a
suspected regression by re-measuring before failing.

Data flow: report dict (``run.run_bench``) -> ``gate_baseline.gate_metrics`` (fastest stage sample / the fastest
run of its stage's yardstick, a fixed GEMM or a chain of small nodes sampled between steps, so a slower machine is
not a regression;
memory in MB; token-class rates) -> :func:`compare` with the baseline (``bench/baselines/ci.json``, the median of
several bench processes: ``gate_baseline``) -> :class:`GateResult`
(ok, one row per metric, readable diff). A gated stage over the limit is only a suspect: :func:`confirm` has the
bench re-measure it in rounds of more steps run exactly like the timed ones (one chunk, then one yardstick
sample, so stage and yardstick see the same load), pools the new samples with the first pass
(``report["confirmation"]``) and compares again; it stops as soon as no suspect is over the limit (not
reproduced) and fails only if a stage is still over it when the time budget is spent. ``compare`` reads the pooled
samples from the report, so ``main`` on a saved report.json reaches the same verdict as the run did.
``--update-baseline`` rewrites the baseline from the given reports (per-metric median; atomic).

Why the minimum and not the median: on a shared CI runner other processes preempt the bench for whole scheduler
ticks (samples come out quantized: 2.1, 6.1, 10.1 ms for a 2 ms stage), and the share of preempted samples
changes from run to run (measured here: 20% to 80%), which moves medians and even p25 by more than any threshold
worth having. The fastest sample is the code's own speed on this machine; a change that makes a stage slower
moves it as much as every other quantile.

Why confirm by re-measuring: while another runnable process shares the bench's core, a stage longer than the
scheduler's time slice is preempted on nearly every run, so even its fastest sample carries someone else's
slice (measured on a 2-vCPU VM with a CPU hog and other jobs: the fastest 4.6 ms vision sample of a 2.6 s window
read 3.1-5.3x the yardstick instead of 1.67x for 10-20 s stretches, while the yardstick's ~1.5 ms runs stayed
clean). Such stretches end; a slower code path does not. Only more samples spread over time, pooled, tell them
apart: the pooled fastest sample can only move down towards the code's own speed, never below it, so a real
30% slowdown stays over a 15% limit however long it is re-measured. The budget is time (CONFIRM_SECONDS), not a
sample count, because the stretches are time: a loaded machine also runs fewer steps per second.

    python -m nora_edge.bench.gate out/report.json --against bench/baselines/ci.json [--max-regression 0.15]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nora_edge.bench.gate_baseline import (
    DEFAULT_BASELINE,
    GATED_STAGES,
    INFO_STAGES,
    RATES,
    UNITS,
    gate_metrics,
    identity,
    load_baseline,
    read_report,
    stage_stat,
    stage_unit,
    unit_stat,
    write_baseline,
)
from nora_edge.errors import InputError

__all__ = [
    "DEFAULT_BASELINE",
    "GATED_STAGES",
    "RATES",
    "GateResult",
    "check",
    "compare",
    "confirm",
    "contention",
    "identity",
    "load_baseline",
    "main",
    "write_baseline",
]

# a suspect is re-measured in rounds of CONFIRM_STEPS steps for up to CONFIRM_SECONDS (a time budget, because
# contention comes in stretches of time: 10-20 s seen here) before it counts as a regression
CONFIRM_SECONDS = 30.0
CONFIRM_STEPS = 50
WAITED_MS = 0.1  # an inference that waited longer than this on the run queue shared its core

# remeasure(steps) -> {"stages": {stage: [ms, ...]}, "unit_ms": [GEMM yardstick ms, ...], "dispatch_ms": [dispatch
# yardstick ms, ...], "wait_ms": [run-queue wait per step, ms; empty where the OS does not report it]} of ``steps``
# more bench steps
Remeasure = Callable[[int], dict]


@dataclass
class GateResult:
    """Outcome of one comparison.

    Attributes:
        ok: no gated metric over the limit (after confirmation).
        max_regression: the limit (fraction).
        rows: metric, stage (gated stages; None otherwise), baseline, current, change, status ("ok",
            "REGRESSION", "info"), note; a re-measured stage adds first_pass / first_change (``current`` is then
            the pooled value).
        confirmation: what was re-measured (None when nothing was): stages, rounds, steps_per_round, seconds,
            max_seconds, contention, samples per stage, unit_samples, unit_ms before/after, before/after
            normalized and change per stage, reproduced per stage.
        rates: informational token-class rates: name, baseline (None if the baseline lacks it), current.
        contention: the first pass's run-queue waits (:func:`contention`; None where the OS does not say).
    """

    ok: bool
    max_regression: float
    rows: list[dict]
    confirmation: dict | None = None
    rates: list[dict] = field(default_factory=list)
    contention: dict | None = None

    @property
    def suspects(self) -> list[str]:
        """Gated stages over the limit."""
        return [r["stage"] for r in self.rows if r.get("stage") and r["status"] == "REGRESSION"]

    def text(self) -> str:
        lines = [f"{'metric':<22}{'baseline':>12}{'current':>12}{'change':>10}  status"]
        for r in self.rows:
            note = f" ({r['note']})" if r.get("note") else ""
            lines.append(
                f"{r['metric']:<22}{r['baseline']:>12.4g}{r['current']:>12.4g}"
                f"{100 * r['change']:>+9.1f}%  {r['status']}{note}"
            )
        if self.contention:
            lines.append(f"first pass: {_contention_text(self.contention)}")
        if self.confirmation:
            lines += confirmation_lines(self.confirmation)
        if self.rates:
            lines.append("token rates (informational, not gated): baseline -> current")
            for r in self.rates:
                lines.append(f"  {r['name']:<26}{_pct(r['baseline']):>8} -> {_pct(r['current'])}")
        verdict = "PASS" if self.ok else f"FAIL: regression over {100 * self.max_regression:.0f}%"
        return "\n".join([*lines, verdict])

    def to_json(self) -> dict:
        return {**asdict(self), "text": self.text()}

    @classmethod
    def from_json(cls, data: dict) -> GateResult:
        keys = ("confirmation", "rates", "contention")
        return cls(
            data["ok"], data["max_regression"], data["rows"], **{k: data[k] for k in keys if k in data}
        )


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def contention(wait_ms: list[float]) -> dict | None:
    """How long inferences waited on the run queue (another process had the core): median and total ms, share of
    inferences that waited over ``WAITED_MS``."""
    if not wait_ms:
        return None
    ordered = sorted(wait_ms)
    return {
        "steps": len(wait_ms),
        "median_wait_ms": float(ordered[len(ordered) // 2]),
        "wait_ms": float(sum(wait_ms)),
        "waited_share": sum(w > WAITED_MS for w in wait_ms) / len(wait_ms),
    }


def _contention_text(c: dict | None) -> str:
    if not c:
        return "run-queue wait not reported by this OS"
    return (
        f"{100 * c['waited_share']:.0f}% of {c['steps']} inferences waited on the run queue (another process had "
        f"the core), median {c['median_wait_ms']:.2f} ms"
    )


def confirmation_lines(c: dict) -> list[str]:
    """Plain-text account of a confirmation (also in report.md)."""
    out = [
        f"re-measured {', '.join(c['stages'])}: {c['rounds']} rounds x {c['steps_per_round']} steps in "
        f"{c['seconds']:.1f} s (budget {c['max_seconds']:.0f} s), each step one inference then one yardstick "
        f"sample; {_contention_text(c['contention'])}; yardstick {c['unit_samples']} more samples, unit "
        f"{c['unit_ms_before']:.4g} -> {c['unit_ms_after']:.4g} ms"
        + (
            f", dispatch {c['dispatch_ms_before']:.4g} -> {c['dispatch_ms_after']:.4g} ms"
            if "dispatch_ms_before" in c
            else ""
        )
    ]
    for s in c["stages"]:
        b, a = c["before"][s], c["after"][s]
        verdict = "reproduced" if c["reproduced"][s] else "not reproduced"
        out.append(
            f"  {s}: {c['samples'][s]} more samples; first pass {b['normalized']:.4g} ({100 * b['change']:+.1f}%) "
            f"-> pooled fastest {a['normalized']:.4g} ({100 * a['change']:+.1f}%): {verdict}"
        )
    return out


def compare(report: dict, baseline: dict, max_regression: float = 0.15) -> GateResult:
    """Compare normalized latencies and memory of ``report`` with ``baseline``.

    A stage with re-measured samples in ``report["confirmation"]`` (see :func:`confirm`) is judged on the fastest
    sample of the first pass and the re-measurement pooled, over the fastest yardstick sample of both.

    Raises:
        InputError: the baseline was recorded for a different bundle / settings (names the fields).
    """
    if not max_regression > 0:
        raise InputError(f"max_regression must be positive, got {max_regression!r}")
    ident, stored = identity(report), baseline["identity"]
    diff = [
        f"{k} (baseline {stored.get(k)!r}, this run {v!r})" for k, v in ident.items() if stored.get(k) != v
    ]
    if diff:
        raise InputError(
            f"baseline was recorded for other settings: {'; '.join(diff)}; record a new one with --update-baseline"
        )
    cur, base = gate_metrics(report), baseline["metrics"]
    conf = report.get("confirmation")
    rows = []
    for s in GATED_STAGES:
        row = _row(f"{s} (norm)", base["normalized"][s], cur["normalized"][s], max_regression, stage=s)
        if conf and s in conf["samples"]:
            pooled = _pooled(report, conf, s)
            first_change = row["change"]
            row = _row(f"{s} (norm)", base["normalized"][s], pooled, max_regression, stage=s)
            row.update(first_pass=cur["normalized"][s], first_change=first_change)
            row["note"] = f"first pass {100 * first_change:+.1f}%, " + (
                "reproduced when re-measured"
                if row["status"] == "REGRESSION"
                else "not reproduced when re-measured"
            )
        elif row["status"] == "REGRESSION":
            row["note"] = "not re-measured"
        rows.append(row)
    if base.get("memory_kind") != cur["memory_kind"]:
        raise InputError(
            f"baseline memory is {base.get('memory_kind')!r}, this run's is {cur['memory_kind']!r} (not comparable); "
            "record a new one with --update-baseline"
        )
    if base["memory_mb"] > 0:
        rows.append(
            _row(f"memory ({cur['memory_kind']})", base["memory_mb"], cur["memory_mb"], max_regression)
        )
    for s in INFO_STAGES:
        if s in base["normalized"]:
            rows.append(_row(f"{s} (norm)", base["normalized"][s], cur["normalized"][s], None))
    rates = [
        {"name": name, "key": key, "baseline": base.get("rates", {}).get(key), "current": cur["rates"][key]}
        for name, key in RATES
    ]
    ok = all(r["status"] != "REGRESSION" for r in rows)
    summary = _confirmation_summary(report, conf, rows) if conf else None
    first = report["runtime"].get("contention")
    return GateResult(ok, float(max_regression), rows, summary, rates, first)


def _pooled(report: dict, conf: dict, stage: str) -> float:
    """Fastest stage sample of first pass + re-measurement over the fastest sample of its yardstick in both."""
    stage_ms = min([stage_stat(report, stage), *conf["samples"][stage]])
    units = {u: min([unit_stat(report, u), *conf.get(u, ())]) for u in UNITS}
    return stage_ms / stage_unit(units, stage)


def _confirmation_summary(report: dict, conf: dict, rows: list[dict]) -> dict:
    by_stage = {r["stage"]: r for r in rows if r.get("stage") in conf["samples"]}
    unit0 = unit_stat(report, "unit_ms")
    disp0 = unit_stat(report, "dispatch_ms")
    return {
        "stages": list(conf["samples"]),
        "rounds": conf["rounds"],
        "steps_per_round": conf["steps_per_round"],
        "seconds": conf["seconds"],
        "max_seconds": conf["max_seconds"],
        "contention": contention(conf.get("wait_ms", [])),
        "samples": {s: len(v) for s, v in conf["samples"].items()},
        "unit_samples": len(conf["unit_ms"]),
        "unit_ms_before": unit0,
        "unit_ms_after": min([unit0, *conf["unit_ms"]]),
        "dispatch_ms_before": disp0,
        "dispatch_ms_after": min([disp0, *conf.get("dispatch_ms", ())]),
        "before": {
            s: {"normalized": r["first_pass"], "change": r["first_change"]} for s, r in by_stage.items()
        },
        "after": {s: {"normalized": r["current"], "change": r["change"]} for s, r in by_stage.items()},
        "reproduced": {s: r["status"] == "REGRESSION" for s, r in by_stage.items()},
    }


def _row(metric: str, baseline: float, current: float, limit: float | None, stage: str | None = None) -> dict:
    change = current / baseline - 1
    status = "info" if limit is None else ("REGRESSION" if change > limit else "ok")
    return {
        "metric": metric,
        "stage": stage,
        "baseline": baseline,
        "current": current,
        "change": change,
        "status": status,
        "note": "",
    }


def confirm(
    report: dict,
    baseline: dict,
    max_regression: float,
    remeasure: Remeasure | None,
    seconds: float = CONFIRM_SECONDS,
    steps: int = CONFIRM_STEPS,
) -> GateResult:
    """Compare, and re-measure suspected stage regressions before they count.

    Suspects are the gated stages over the limit in the first pass. Each round runs ``steps`` more bench steps
    (``remeasure``), appends the suspects' samples and the yardstick samples to ``report["confirmation"]`` and
    compares again on the pooled samples. It stops as soon as no suspect is over the limit (not reproduced);
    rounds continue while less than ``seconds`` have passed (at least one round), so a suspect fails only if
    every round of the budget keeps it over the limit. Memory is not re-measured (peak RSS only grows).

    Returns:
        The final :class:`GateResult` (its ``confirmation`` says what was re-measured).
    """
    result = compare(report, baseline, max_regression)
    suspects = result.suspects
    if not suspects or remeasure is None or not seconds > 0:
        return result
    conf = {"max_seconds": seconds, "steps_per_round": steps, "rounds": 0, "seconds": 0.0}
    conf.update(samples={s: [] for s in suspects}, unit_ms=[], dispatch_ms=[], wait_ms=[])
    report["confirmation"] = conf
    t0 = time.perf_counter()
    while True:
        got = remeasure(steps)
        for s in suspects:
            conf["samples"][s].extend(float(x) for x in got["stages"].get(s, ()))
        for u in UNITS:
            conf[u].extend(float(x) for x in got.get(u, ()))
        conf["wait_ms"].extend(float(x) for x in got.get("wait_ms", ()))
        conf["rounds"] += 1
        conf["seconds"] = time.perf_counter() - t0
        result = compare(report, baseline, max_regression)
        if not set(result.suspects) & set(suspects) or conf["seconds"] >= seconds:
            return result


def check(
    report: dict | str | Path,
    against: str | Path = DEFAULT_BASELINE,
    max_regression: float = 0.15,
    update_baseline: bool = False,
) -> GateResult:
    """Gate a report (dict or report.json path); with ``update_baseline`` write it as the baseline first.

    A saved report carries the bench's re-measured samples (``confirmation``), which :func:`compare` pools.
    """
    report = read_report(report)
    if update_baseline:
        write_baseline(Path(against), report)
    return compare(report, load_baseline(Path(against)), max_regression)


def baseline_text(baseline: dict, path: Path) -> str:
    """What a baseline holds: each gated metric's median and the runs it came from."""
    runs = baseline.get("runs") or [baseline["metrics"]]
    lines = [f"baseline written: {path} (median of {len(runs)} bench process(es))"]
    for s in (*GATED_STAGES, *INFO_STAGES):
        values = " ".join(f"{r['normalized'][s]:.4g}" for r in runs)
        lines.append(f"  {s + ' (norm)':<20}{baseline['metrics']['normalized'][s]:>10.4g}   runs: {values}")
    values = " ".join(f"{r['memory_mb']:.4g}" for r in runs)
    lines.append(f"  {'memory (MB)':<20}{baseline['metrics']['memory_mb']:>10.4g}   runs: {values}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: print each report's diff; exit 0 (all pass), 1 (a regression), 2 (bad input).

    With ``--update-baseline`` the baseline is written from all the reports (per-metric median) and described;
    a single report is then also compared with it (as before).
    """
    ap = argparse.ArgumentParser(prog="nora-edge-gate", description=__doc__.splitlines()[0])
    ap.add_argument("reports", type=Path, nargs="+")
    ap.add_argument("--against", type=Path, default=DEFAULT_BASELINE)
    ap.add_argument("--max-regression", type=float, default=0.15)
    ap.add_argument("--update-baseline", action="store_true")
    args = ap.parse_args(argv)
    try:
        reports = [read_report(r) for r in args.reports]
        if args.update_baseline:
            write_baseline(args.against, reports)
            print(baseline_text(load_baseline(args.against), args.against))
            if len(reports) > 1:
                return 0
        results = [compare(r, load_baseline(args.against), args.max_regression) for r in reports]
    except InputError as e:
        print(f"gate: {e}", file=sys.stderr)
        return 2
    for path, result in zip(args.reports, results, strict=True):
        print(f"{path}:\n{result.text()}" if len(results) > 1 else result.text())
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
