"""The CI gate's baseline: what a bench report is judged on, and the stored file it is judged against.

Data flow: bench report(s) (``run.run_bench``) -> :func:`gate_metrics` (fastest stage sample / its stage's unit,
:data:`STAGE_UNITS`: the GEMM yardstick's ``unit_ms``, or its geometric mean with the dispatch yardstick's
``dispatch_ms``; raw minima, peak RSS, token-class rates) and :func:`identity` (bundle and settings that must match) ->
:func:`make_baseline`: the per-metric median over several reports, each from a fresh bench process
(``make bench-ci-baseline`` runs five), because one process's yardstick and stage minima sit a few percent off
the next one's (measured here, five processes on one quiet 2-vCPU VM: normalized prefill 1.07-1.19, vision
2.59-2.71): a baseline from one lucky process moves the gate's zero by that much -> ``bench/baselines/ci.json``
(atomic write) -> :func:`load_baseline` (checked).
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from pathlib import Path

from nora_edge.atomic import read_json_object
from nora_edge.bench.gate_source import source_fingerprint
from nora_edge.errors import InputError

GATED_STAGES = ("vision", "prefill", "decode_step")
# e2e spans several scheduler ticks, so even its fastest sample moves with the runner's load (measured here:
# 5.4 vs 9.3 ms between identical runs); it is shown in the diff but does not fail the gate.
INFO_STAGES = ("e2e",)
# token-class rates of the runtime (informational rows: a different bundle or model changes them, not the code's
# speed); per chunk = share of chunks holding at least one such token
RATES = (
    ("malformed per chunk", "malformed_rate"),
    ("repaired per token", "repaired_rate"),
    ("forced_continue per token", "forced_rate"),
    ("repaired per chunk", "repaired_chunk_rate"),
    ("forced_continue per chunk", "forced_chunk_rate"),
)
BASELINE_SCHEMA = 1
DEFAULT_BASELINE = Path(__file__).resolve().parent / "baselines" / "ci.json"
GATE_STAT = "min"
# which yardstick (bench.microbench.Yardstick) normalizes each stage of the CI's tiny bundle: "unit_ms" (a GEMM)
# for the vision encoder, whose 4.4 ms are mostly matmuls; "mixed", the geometric mean of the GEMM and
# "dispatch_ms" (a warm chain of ~180 small nodes), for the prefill and the decode step, which on a 2-layer,
# 128-wide decoder are mostly per-node dispatch. Each unit alone failed once here: between two hosts of one VM
# type the GEMM got 10% faster while the decode step got 14% slower (0.311 -> 0.355 ms; a false +25% over the
# GEMM), and in a contended window the warm chain slowed 36% while the steps slowed 17% (a +30% injected
# slowdown read +11% over the chain, +37% over the GEMM, +24% over the mean).
STAGE_UNITS = {"vision": "unit_ms", "prefill": "mixed", "decode_step": "mixed", "e2e": "unit_ms"}
UNITS = ("unit_ms", "dispatch_ms")


def stage_unit(units: dict, stage: str) -> float:
    """The ms a stage is divided by, from ``{"unit_ms": ..., "dispatch_ms": ...}`` (:data:`STAGE_UNITS`)."""
    u = STAGE_UNITS[stage]
    return math.sqrt(units["unit_ms"] * units["dispatch_ms"]) if u == "mixed" else units[u]


def unit_stat(report: dict, unit: str) -> float:
    """The fastest sample of one yardstick workload (``unit_ms`` / ``dispatch_ms``) of a bench report."""
    try:
        value = float(report[unit][GATE_STAT])
    except KeyError as e:
        raise InputError(f"bench report has no {unit} (a report from before the dispatch yardstick?)") from e
    if not value > 0:
        raise InputError(f"bench report has a non-positive {unit} {value!r}")
    return value


def stage_stat(report: dict, stage: str) -> float:
    try:
        return float(report["runtime"]["stages"][stage][GATE_STAT])
    except KeyError as e:
        raise InputError(f"bench report has no {GATE_STAT} for stage '{stage}'") from e


def gate_metrics(report: dict) -> dict:
    """First-pass normalized stage latencies (min ms / the stage's unit ms), raw minima, the units, memory (MB),
    token-class rates."""
    units = {u: unit_stat(report, u) for u in UNITS}
    raw = {s: stage_stat(report, s) for s in (*GATED_STAGES, *INFO_STAGES)}
    mem, rt = report["memory"], report["runtime"]
    return {
        **units,
        "normalized": {s: v / stage_unit(units, s) for s, v in raw.items()},
        "stages_ms": raw,
        # peak anonymous RSS of the bench process (Linux RssAnon; RSS elsewhere): the RSS also counts mapped
        # library pages, which follow the page cache (+12% in a fresh venv, same RssAnon); the load delta
        # (policy_rss_mb) moves too, because a second load in one process reuses memory the first one freed
        "memory_mb": mem["anon_rss_peak_mb"] if mem.get("anon_rss_peak_mb") else mem["rss_peak_mb"],
        "memory_kind": "anon_rss_peak_mb" if mem.get("anon_rss_peak_mb") else "rss_peak_mb",
        "rates": {key: rt.get(key) for _, key in RATES},
    }


def identity(report: dict) -> dict:
    """What must match between a run and its baseline for the comparison to mean anything."""
    b, c = report["bundle"], report["config"]
    return {
        "precision": b["precision"],
        "head": b["head"],
        "horizon": b["horizon"],
        "decoder": b["decoder"],
        "threads": c["threads"],
        "instruction": c["instruction"],
        "mode": c.get("mode"),  # "constrained" / "hf-parity": different decoders run different steps
        "providers": c.get("providers"),  # execution provider each graph actually ran on
        "with_reference": bool(c.get("reference")),  # the reference's torch model is in the same process RSS
        # what the units time (normalized values depend on them) and which unit each stage is divided by
        "yardstick": report["unit_ms"].get("yardstick"),
        "dispatch_yardstick": report.get("dispatch_ms", {}).get("yardstick"),
        "stage_units": dict(STAGE_UNITS),
    }


def make_baseline(reports: dict | list[dict]) -> dict:
    """The baseline of one report, or the per-metric median of several (one per fresh bench process).

    Raises:
        InputError: no reports, or reports recorded for different bundles / settings (names the fields).
    """
    reports = [reports] if isinstance(reports, dict) else list(reports)
    if not reports:
        raise InputError("a baseline needs at least one bench report")
    ident = identity(reports[0])
    for i, rep in enumerate(reports[1:], 1):
        diff = sorted(k for k, v in identity(rep).items() if ident[k] != v)
        if diff:
            raise InputError(f"bench reports 0 and {i} were recorded for different settings: {diff}")
    runs = [gate_metrics(r) for r in reports]

    def median(get) -> float | None:
        values = [get(m) for m in runs]
        return None if any(v is None for v in values) else float(statistics.median(values))

    first = runs[0]
    metrics = {
        **{u: median(lambda m, u=u: m[u]) for u in UNITS},
        "normalized": {s: median(lambda m, s=s: m["normalized"][s]) for s in first["normalized"]},
        "stages_ms": {s: median(lambda m, s=s: m["stages_ms"][s]) for s in first["stages_ms"]},
        "memory_mb": median(lambda m: m["memory_mb"]),
        "memory_kind": first["memory_kind"],
        "rates": {k: median(lambda m, k=k: m["rates"][k]) for k in first["rates"]},
    }
    return {
        "schema": BASELINE_SCHEMA,
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "identity": ident,
        "metrics": metrics,
        "runs": [
            {"normalized": m["normalized"], **{u: m[u] for u in UNITS}, "memory_mb": m["memory_mb"]}
            for m in runs
        ],
        # the code the runs measured (bench.gate_source): gate_ab tells a host difference from a code change by it
        "source": source_fingerprint(),
        "note": f"median over {len(runs)} bench process(es) of: normalized = fastest stage sample ms / the fastest "
        "run of its stage's yardstick (stage_units: unit_ms a fixed ORT GEMM, dispatch_ms a chain of small ORT "
        "nodes; both sampled between steps)",
    }


def write_baseline(path: Path, reports: dict | list[dict]) -> Path:
    """Write the baseline of ``reports`` (one report dict or several, see :func:`make_baseline`; atomic)."""
    from nora_edge.bench.report import write_json_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(path, make_baseline(reports))


def read_report(report: dict | str | Path) -> dict:
    """A bench report dict, or read from a report.json path (InputError naming a missing / unreadable file)."""
    if isinstance(report, dict):
        return report
    path = Path(report)
    if not path.is_file():
        raise InputError(f"bench report not found: {path}")
    return read_json_object(path, InputError)


def load_baseline(path: Path) -> dict:
    """Read and check a baseline file. Raises InputError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"baseline not found: {path} (create it with --update-baseline)")
    data = read_json_object(path, InputError)
    if data.get("schema") != BASELINE_SCHEMA:
        raise InputError(f"{path}: field 'schema' must be {BASELINE_SCHEMA}")
    for key in ("identity", "metrics"):
        if key not in data:
            raise InputError(f"{path}: missing field '{key}'")
    return data
