"""One chunk through libnora_edge (the C runtime firmware links) vs the Python runtime, side by side, plus the C
library's footprint.

Data flow:
  bundle (fused decoder; ``make bench-edge-policy`` exports the medium fixture)
    C       nora_edge.edge_policy.EdgePolicy (ctypes over libnora_edge.so: nora_policy_step)
    Python  nora_edge.policy.NoraPolicy (onnxruntime Python API, numpy, C preprocessing and codec when built)
  --> both loaded in one process, threads=1, forced_tokens="flag"; the same held-out frames and instructions
  --> ids compared on every round (a benchmark of two runtimes that disagree is meaningless)
  --> interleaved rounds (order alternated): per-stage seconds of each -> median / p99 ms, C/Python ratios
  footprint: ``size`` of libnora_edge.so (text + data, onnxruntime excluded: it is dlopen'ed), and anonymous RSS
  growth of a fresh process for (a) onnxruntime sessions of the two graphs alone (Python onnxruntime, same
  library) and (b) nora_policy_create, then 3 steps: (b's create) - (a) is the runtime's overhead over the
  graphs (tokenizer tables, buffers, the prefix prefill); the steps' growth is onnxruntime's arenas.
  --> edge_policy_bench.json + .md under --out.

Run: ``python -m nora_edge.bench.edge_policy_bench BUNDLE --out out/edge-policy-bench [--rounds 40]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from nora_edge.atomic import write_text_atomic
from nora_edge.bench.report import table, write_json_atomic
from nora_edge.bench.stats import summarize
from nora_edge.edge_policy import REPO_LIB, EdgePolicy
from nora_edge.errors import InputError
from nora_edge.export.images import random_rgb_image
from nora_edge.export.synthetic_task import instruction_list

STAGES = ("preprocess", "vision", "prefill", "decode", "detokenize", "total")

_RSS_CHILD = r"""
import json, sys
sys.argv = sys.argv[1:]
from nora_edge.bench.edge_policy_bench import anon_rss_mb, child_run
print(json.dumps(child_run(*sys.argv)))
"""


def anon_rss_mb() -> float:
    """This process's anonymous resident memory (Linux RssAnon), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise InputError("no RssAnon in /proc/self/status (Linux only)")


def frames(n: int) -> list[tuple[np.ndarray, str]]:
    texts = instruction_list()
    return [(random_rgb_image(9000 + i, 480, 640), texts[i % len(texts)]) for i in range(n)]


def child_run(kind: str, bundle: str, library: str) -> dict:
    """In a fresh process: anonymous RSS growth (MB) of ``kind`` = "graphs" (two onnxruntime sessions) or
    "edge" (nora_policy_create + 3 steps)."""
    import onnxruntime as ort

    before = anon_rss_mb()
    if kind == "graphs":
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        keep = [ort.InferenceSession(str(Path(bundle) / f), so) for f in ("vision.onnx", "decoder.onnx")]
        after = anon_rss_mb()
        del keep
        return {"kind": kind, "anon_rss_mb": after - before}
    p = EdgePolicy.load(bundle, library=library, threads=1, forced_tokens="flag")
    created = anon_rss_mb()
    for image, text in frames(3):
        p.step(image, text)
    after = anon_rss_mb()
    p.close()
    return {
        "kind": kind,
        "anon_rss_mb": after - before,
        "create_mb": created - before,
        "steps_mb": after - created,
    }


def footprint(bundle: Path, library: Path) -> dict:
    out = subprocess.run(["size", "-A", str(library)], capture_output=True, text=True, check=True).stdout
    sections = {ln.split()[0]: int(ln.split()[1]) for ln in out.splitlines() if ln.startswith(".")}
    code = sum(v for k, v in sections.items() if k in (".text", ".rodata", ".data", ".data.rel.ro", ".bss"))
    rss = {}
    for kind in ("graphs", "edge"):
        r = subprocess.run(
            [sys.executable, "-c", _RSS_CHILD, kind, str(bundle), str(library)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rss[kind] = json.loads(r.stdout.strip().splitlines()[-1])
    return {
        "library": str(library),
        "file_bytes": library.stat().st_size,
        "code_data_bytes": code,
        "sections": sections,
        "rss_graphs_mb": rss["graphs"]["anon_rss_mb"],
        "rss_edge_mb": rss["edge"]["anon_rss_mb"],
        "rss_edge_create_mb": rss["edge"]["create_mb"],
        "rss_edge_steps_mb": rss["edge"]["steps_mb"],
        "rss_overhead_mb": rss["edge"]["create_mb"] - rss["graphs"]["anon_rss_mb"],
    }


def run(bundle: Path, library: Path, rounds: int) -> dict:
    from nora_edge.policy import NoraPolicy

    edge = EdgePolicy.load(bundle, library=library, threads=1, forced_tokens="flag")
    py = NoraPolicy.load(bundle, threads=1, forced_tokens="flag")
    pairs = frames(8)
    samples: dict[str, dict[str, list[float]]] = {k: {s: [] for s in STAGES} for k in ("c", "python")}
    steps: dict[str, list[float]] = {"c": [], "python": []}
    for i in range(rounds + 2):
        image, text = pairs[i % len(pairs)]
        for who in ("c", "python") if i % 2 == 0 else ("python", "c"):
            if who == "c":
                c = edge.step(image, text)
                got = {s: c.timings[f"{s}_s"] for s in STAGES}
                step = c.timings["decode_step_min_s"]
                ids_c = c.ids
            else:
                o = py.run_chunk(image, text)
                t = py.last_timings
                got = {s: t[s] for s in STAGES[:-1]} | {"total": t["total"]}
                step = min(t["decode_steps"]) if t["decode_steps"] else 0.0
                ids_py = o.ids
            if i >= 2:  # warm-up rounds dropped
                for s in STAGES:
                    samples[who][s].append(1e3 * got[s])
                steps[who].append(1e3 * step)
        if ids_c.tolist() != ids_py.tolist():
            raise InputError(
                f"round {i}: the C and Python runtimes generated different ids; not benchmarking"
            )
    stats = {who: {s: summarize(v) for s, v in st.items()} for who, st in samples.items()}
    ratios = {
        s: stats["python"][s]["median"] / stats["c"][s]["median"] for s in STAGES if stats["c"][s]["median"]
    }
    return {
        "bundle": str(bundle),
        "rounds": rounds,
        "host": {
            "machine": platform.machine(),
            "processor": platform.processor(),
            "onnxruntime": edge.onnxruntime_version,
        },
        "stages_ms": stats,
        "fastest_decode_step_ms": {who: float(min(v)) for who, v in steps.items()},
        "python_over_c": ratios,
    }


def markdown(res: dict) -> str:
    st = res["stages_ms"]
    rows = [
        [s, f"{st['c'][s]['median']:.2f}", f"{st['c'][s]['p99']:.2f}", f"{st['python'][s]['median']:.2f}",
         f"{st['python'][s]['p99']:.2f}", f"{res['python_over_c'].get(s, float('nan')):.2f}x"]
        for s in STAGES
    ]  # fmt: skip
    fp = res["footprint"]
    return "\n".join([
        f"# libnora_edge vs the Python runtime: {res['bundle']}",
        "",
        f"{res['rounds']} interleaved rounds, threads=1, 480x640 frames; ids equal on every round.",
        "",
        table(["stage", "C median ms", "C p99", "Python median ms", "Python p99", "Python / C"], rows),
        "",
        f"fastest decode step: C {res['fastest_decode_step_ms']['c']:.3f} ms, "
        f"Python {res['fastest_decode_step_ms']['python']:.3f} ms",
        "",
        f"libnora_edge.so: {fp['file_bytes'] / 1e6:.2f} MB file, {fp['code_data_bytes'] / 1e6:.2f} MB code+data "
        f"(onnxruntime excluded). Anonymous RSS of a fresh process: two onnxruntime sessions alone "
        f"{fp['rss_graphs_mb']:.1f} MB; nora_policy_create {fp['rss_edge_create_mb']:.1f} MB (sessions, tokenizer "
        f"tables, buffers, prefix prefill): {fp['rss_overhead_mb']:.1f} MB over the sessions; 3 steps then add "
        f"{fp['rss_edge_steps_mb']:.1f} MB (onnxruntime's arenas for the prefill / step shapes)",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--out", type=Path, default=Path("out/edge-policy-bench"))
    ap.add_argument("--library", type=Path, default=REPO_LIB)
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args(argv)
    res = run(args.bundle, args.library, args.rounds)
    res["footprint"] = footprint(args.bundle, args.library)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "edge_policy_bench.json", res)
    md = markdown(res)
    write_text_atomic(args.out / "edge_policy_bench.md", md + "\n")
    print(md)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
