"""CI gate, last word on a flagged regression: the baseline's own code, run side by side with this tree on this host.

Data flow: the first pass's report.json (``nora-edge bench --against``: a metric still over the limit after its
re-measurement) ->
1. the source fingerprint (``gate_source``) equals the baseline's: no file the bench runs changed since the baseline
   was recorded, so the difference is this host -> PASS;
2. otherwise the commit that wrote the baseline (``gate_source.baseline_commit``) --git archive--> OUT/src (package
   folders laid out as its own pyproject maps them; its native libraries built by its own ``make kernels``) --its own
   CLI--> tiny checkpoint -> bundle (:func:`build_reference`);
3. rounds of fresh ``nora-edge bench`` processes alternating the two sides (current then reference, reference then
   current, ...; :func:`run_side_by_side`) -> per gated stage the fastest sample over all of a side's processes, and
   the lowest peak anonymous RSS -> current / reference against 1 + max_regression (:func:`compare_sides`) ->
   verdict (exit 0 / 1) and OUT/ab.json.

Why: the stored baseline's numbers are divided by in-run yardsticks, which carry a baseline across hosts that differ
in speed but not across CPUs that differ in kind: a CI host whose GEMM and dispatch yardsticks read within 2% of
the baseline's ran the tiny decoder's prefill 17% slower. Two trees timed on one host in alternating processes
share the host, its load and its drift; what differs is the code. A side stops being re-measured once no metric
is over the limit after ``min_rounds``; a real slowdown stays over it however many rounds run, because each side's
pooled fastest sample only moves down towards that code's own speed.

    python -m nora_edge.bench.gate_ab out/ci/bench/report.json --bundle out/ci/bundle --out out/ci/ab
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nora_edge.bench.gate_baseline import DEFAULT_BASELINE, GATED_STAGES, identity, load_baseline, read_report
from nora_edge.bench.gate_source import (
    REPO_ROOT,
    ReferenceUnavailable,
    baseline_commit,
    changed_source,
    git,
    source_fingerprint,
)
from nora_edge.errors import InputError, NoraEdgeError

CLI = "from nora_edge.cli import app; app()"
# the Makefile's CI bundle (CI_TINY_ARGS); the reference is built with the same arguments by its own code
TINY_ARGS = "--preset tiny --horizon 5 --seed 0"
# identity fields that name the yardsticks, not the workload: the two sides may time different yardsticks
YARDSTICK_FIELDS = ("yardstick", "dispatch_yardstick", "stage_units")
BENCH_TIMEOUT_S = 600


@dataclass(frozen=True)
class Side:
    """One tree's bench process recipe.

    Attributes:
        name: "current" or "reference".
        bundle: the bundle this tree exported.
        pythonpath: the tree's package root (None: the installed package, i.e. this tree).
        command: argv up to the CLI's subcommand (default: this interpreter running ``nora_edge.cli``).
    """

    name: str
    bundle: Path
    pythonpath: Path | None = None
    # -P: no working directory at the front of sys.path, or `python -c` started in this repository's root would
    # import this tree's nora_edge whatever PYTHONPATH names (each process also runs in its own output folder)
    command: tuple[str, ...] = field(default_factory=lambda: (sys.executable, "-P", "-c", CLI))

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        if self.pythonpath is not None:
            env["PYTHONPATH"] = str(self.pythonpath)
        return env


class BenchProcessError(NoraEdgeError):
    """A side's bench process failed (names the side and the end of its output)."""


def _run(
    argv: list[str], env: dict, what: str, cwd: Path | None = None, error: type = ReferenceUnavailable
) -> None:
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-8:]
        raise error(f"{what} failed (exit {done.returncode}): " + " | ".join(tail))


def bench_once(side: Side, out: Path, steps: int, warmup: int) -> dict:
    """One fresh ``nora-edge bench`` process of ``side`` (1 thread, no plots) -> its report dict."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    argv = [
        *side.command,
        "bench",
        str(side.bundle.resolve()),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
    ]
    _run(
        [*argv, "--threads", "1", "--no-plots", "--out", str(out)],
        side.env(),
        f"the {side.name} tree's bench",
        cwd=out,
        error=BenchProcessError,
    )
    return read_report(out / "report.json")


def imported_from(side: Side) -> Path:
    """The nora_edge package folder ``side``'s processes import (checked before timing: a reference that silently
    imported this tree would compare the tree with itself)."""
    code = "import nora_edge, pathlib; print(pathlib.Path(nora_edge.__file__).resolve().parent)"
    done = subprocess.run(
        [side.command[0], "-P", "-c", code],
        env=side.env(),
        cwd="/",
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchProcessError(f"the {side.name} tree does not import: {done.stderr.strip()[-400:]}")
    path = Path(done.stdout.strip())
    if side.pythonpath is not None and not path.is_relative_to(Path(side.pythonpath).resolve()):
        raise BenchProcessError(
            f"the {side.name} tree imports nora_edge from {path}, not from {side.pythonpath}"
        )
    return path


def memory_mb(report: dict) -> float:
    mem = report["memory"]
    return float(mem.get("anon_rss_peak_mb") or mem["rss_peak_mb"])


def workload(report: dict) -> dict:
    """What both sides must have run for their times to compare: the gate identity less the yardsticks."""
    return {k: v for k, v in identity(report).items() if k not in YARDSTICK_FIELDS}


def compare_sides(current: list[dict], reference: list[dict], max_regression: float) -> dict:
    """Fastest sample per gated stage over each side's reports, lowest peak RSS; current / reference - 1.

    Returns:
        {"ok", "rows": [{metric, reference, current, change, status}], "processes": {side: count}}.

    Raises:
        InputError: a side has no report, or the two sides ran different workloads (names the fields).
    """
    if not current or not reference:
        raise InputError("side-by-side comparison needs at least one report per side")
    want = workload(reference[0])
    for r in [*current, *reference]:
        diff = sorted(k for k, v in workload(r).items() if want.get(k) != v)
        if diff:
            raise InputError(f"the two trees ran different workloads: {diff}")
    rows = []
    for stage in GATED_STAGES:
        ref = min(float(r["runtime"]["stages"][stage]["min"]) for r in reference)
        cur = min(float(r["runtime"]["stages"][stage]["min"]) for r in current)
        rows.append({"metric": f"{stage} (ms)", "reference": ref, "current": cur})
    rows.append(
        {
            "metric": "memory (MB)",
            "reference": min(memory_mb(r) for r in reference),
            "current": min(memory_mb(r) for r in current),
        }
    )
    for row in rows:
        row["change"] = row["current"] / row["reference"] - 1
        row["status"] = "REGRESSION" if row["change"] > max_regression else "ok"
    ok = all(r["status"] == "ok" for r in rows)
    return {"ok": ok, "rows": rows, "processes": {"current": len(current), "reference": len(reference)}}


def run_side_by_side(
    current: Side,
    reference: Side,
    out: Path,
    max_regression: float = 0.15,
    steps: int = 200,
    warmup: int = 20,
    min_rounds: int = 2,
    max_rounds: int = 4,
    log: Callable[[str], None] = print,
) -> dict:
    """Alternate fresh bench processes of the two sides for ``min_rounds``..``max_rounds`` rounds (see module doc).

    Returns:
        :func:`compare_sides`'s dict plus "rounds" and "seconds".
    """
    if not 1 <= min_rounds <= max_rounds:
        raise InputError(f"rounds must satisfy 1 <= min_rounds <= max_rounds, got {min_rounds}, {max_rounds}")
    where = {side.name: imported_from(side) for side in (current, reference)}
    log(f"  current imports {where['current']}, reference imports {where['reference']}")
    reports: dict[str, list[dict]] = {"current": [], "reference": []}
    t0 = time.perf_counter()
    result: dict = {}
    for rnd in range(max_rounds):
        order = (current, reference) if rnd % 2 == 0 else (reference, current)
        for side in order:
            reports[side.name].append(bench_once(side, out / f"round{rnd}-{side.name}", steps, warmup))
        result = compare_sides(reports["current"], reports["reference"], max_regression)
        over = [r["metric"] for r in result["rows"] if r["status"] != "ok"]
        log(f"  round {rnd + 1}: {', '.join(over) + ' over the limit' if over else 'nothing over the limit'}")
        if rnd + 1 >= min_rounds and not over:
            break
    return {**result, "rounds": rnd + 1, "seconds": time.perf_counter() - t0}


def side_by_side_text(result: dict, max_regression: float) -> str:
    lines = [f"{'metric':<22}{'reference':>12}{'current':>12}{'change':>10}  status"]
    for r in result["rows"]:
        lines.append(
            f"{r['metric']:<22}{r['reference']:>12.4g}{r['current']:>12.4g}{100 * r['change']:>+9.1f}%  {r['status']}"
        )
    n = result["processes"]
    lines.append(
        f"fastest sample over {n['current']} current and {n['reference']} reference bench processes, alternating, "
        f"{result['rounds']} round(s) in {result['seconds']:.0f} s"
    )
    lines.append(
        "PASS"
        if result["ok"]
        else f"FAIL: regression over {100 * max_regression:.0f}% against the baseline's own code on this host"
    )
    return "\n".join(lines)


def extract_tree(commit: str, repo: Path, dest: Path) -> Path:
    """``git archive commit`` unpacked into ``dest``, each package folder copied where its pyproject's
    ``[tool.setuptools.package-dir]`` puts it (``export`` -> ``nora_edge/export``), so PYTHONPATH=dest imports it."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    try:
        data = subprocess.run(
            ["git", "-C", str(repo), "archive", "--format=tar", commit], capture_output=True, check=True
        ).stdout
    except subprocess.CalledProcessError as e:
        raise ReferenceUnavailable(
            f"git archive {commit}: {e.stderr.decode(errors='replace').strip()}"
        ) from e
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    pyproject = dest / "pyproject.toml"
    if not pyproject.is_file():
        raise ReferenceUnavailable(f"commit {commit} has no pyproject.toml")
    mapping = (
        tomllib.loads(pyproject.read_text()).get("tool", {}).get("setuptools", {}).get("package-dir", {})
    )
    for package, folder in mapping.items():
        target = dest / package.replace(".", "/")
        source = dest / folder
        if target.resolve() != source.resolve() and source.is_dir() and not target.exists():
            shutil.copytree(source, target)
    return dest


def build_reference(
    commit: str,
    out: Path,
    repo: Path = REPO_ROOT,
    tiny_args: str = TINY_ARGS,
    log: Callable[[str], None] = print,
) -> Side:
    """The baseline's tree at ``commit``, its native libraries and its tiny bundle, each made by its own code.

    Raises:
        ReferenceUnavailable: the archive, the native build or the export failed (names the step and its output).
    """
    t0, out = time.perf_counter(), Path(out).resolve()
    src = extract_tree(commit, repo, out / "src")
    _run(
        ["make", "-s", "-C", str(src), "kernels"],
        dict(os.environ),
        "the reference's native build (make kernels)",
    )
    side = Side("reference", out / "bundle", pythonpath=src)
    for path in (out / "ckpt", out / "bundle"):
        if path.exists():
            shutil.rmtree(path)
    cli = list(side.command)
    _run(
        [*cli, "tiny", str(out / "ckpt"), *shlex.split(tiny_args)],
        side.env(),
        "the reference's tiny fixture",
        src,
    )
    _run(
        [*cli, "export", str(out / "ckpt"), "--out", str(side.bundle), "--no-validate"],
        side.env(),
        "the reference's export",
        src,
    )
    log(f"reference built from {commit[:12]} in {time.perf_counter() - t0:.0f} s: {side.bundle}")
    return side


def decide(args: argparse.Namespace, log: Callable[[str], None] = print) -> tuple[int, dict]:
    """The verdict on a flagged first pass: (exit code, the record written to OUT/ab.json)."""
    first = read_report(args.report)
    gate = first.get("gate")
    if not gate or gate.get("ok", True):
        raise InputError(f"{args.report} holds no failed gate verdict: nothing to decide")
    flagged = [
        f"{r['metric']} {100 * r['change']:+.1f}%" for r in gate["rows"] if r["status"] == "REGRESSION"
    ]
    log(f"the stored baseline flags: {', '.join(flagged)}")
    baseline = load_baseline(args.baseline)
    now, then = source_fingerprint(args.repo), baseline.get("source")
    record: dict = {"flagged": flagged, "source_now": now, "source_baseline": then}
    if now and then and now["sha256"] == then["sha256"]:
        log(
            f"no file the bench runs changed since the baseline was recorded ({now['files']} files, sha256 "
            f"{now['sha256'][:16]}): the difference is this host, not the code"
        )
        log(
            "PASS (the baseline holds for the host it was recorded on; `make bench-ci-baseline` records one here)"
        )
        return 0, {**record, "verdict": "host", "ok": True}
    try:
        commit = baseline_commit(args.baseline, args.repo)
        changed = changed_source(commit, args.repo)
        log(
            f"{len(changed)} source file(s) changed since the baseline's commit {commit[:12]}; timing both trees "
            f"side by side on this host ({git(args.repo, 'rev-list', '--count', 'HEAD')} commits of history)"
        )
        reference = build_reference(commit, args.out / "reference", args.repo, args.tiny_args, log)
    except ReferenceUnavailable as e:
        log(f"cannot tell this host from the code: {e}")
        log("FAIL: the first-pass verdict stands")
        return 1, {**record, "verdict": "unavailable", "ok": False, "why": str(e)}
    current = Side("current", args.bundle)
    result = run_side_by_side(
        current,
        reference,
        args.out / "runs",
        args.max_regression,
        args.steps,
        args.warmup,
        args.min_rounds,
        args.max_rounds,
        log,
    )
    log(side_by_side_text(result, args.max_regression))
    return (0 if result["ok"] else 1), {
        **record,
        "verdict": "side-by-side",
        "commit": commit,
        "changed": changed,
        **result,
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry: exit 0 (no regression against the baseline's code here), 1 (a regression, or undecidable), 2
    (bad input)."""
    from nora_edge.bench.report import write_json_atomic

    ap = argparse.ArgumentParser(prog="nora-edge-gate-ab", description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path, help="the first pass's report.json (nora-edge bench --against)")
    ap.add_argument(
        "--bundle", type=Path, required=True, help="the bundle this tree exported (the first pass's)"
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE)
    ap.add_argument("--repo", type=Path, default=REPO_ROOT)
    ap.add_argument("--max-regression", type=float, default=0.15)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--min-rounds", type=int, default=2)
    ap.add_argument("--max-rounds", type=int, default=4)
    ap.add_argument("--tiny-args", default=TINY_ARGS, help="the reference's `nora-edge tiny` arguments")
    args = ap.parse_args(argv)
    try:
        code, record = decide(args)
    except (InputError, BenchProcessError) as e:
        print(f"gate-ab: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "ab.json", record)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
