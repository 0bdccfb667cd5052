"""Benchmark (not a test): one decode step of decoder-graph flavors side by side, plus their node counts.

Data flow: decoder graphs of one fixture (bench/decoder_flavors_build.py: ours fp32 / int4 (the portable
graph); fused fp32 / int4 (``export --decoder-graph fused``, the product's onnxruntime flavor, also run with its
KV in place as the runtime runs it: "-sharebuf"); onnxruntime-genai
builder int4 (its default blocks, our blocks, and our blocks with the lm_head cut to our action-head rows: the
builder adapted to our bundle) and fp32; ours + onnxruntime.transformers fusion) -> :func:`node_counts` (nodes and op types of the file, and of the model
onnxruntime writes after ``ORT_ENABLE_ALL`` through ``SessionOptions.optimized_model_filepath``) -> per thread
count, one session per flavor (per-session pools, spinning off, so no idle pool spins while another graph
runs) -> :class:`StepRunner` (IO binding; random ``inputs_embeds`` (1, 1, H), position_ids (3, 1, 1) = P,
attention_mask ones (1, P+1), past K/V (1, kv_heads, P, head_dim); in the builder's share-buffer mode the past
is a (1, kv_heads, cache_len, head_dim) buffer bound as both past and present, which GroupQueryAttention
updates in place) -> :func:`time_interleaved` (round-robin, one step of each flavor per round, rotating
order) -> medians / p99 (bench/stats.py); :func:`equality_checks` (same-input output differences);
:func:`profile_ops` (onnxruntime's profiler: ms per op type of the int4 flavors) -> ``decoder_flavors.{json,md}``.

Every flavor takes the same interface: inputs_embeds, position_ids (3, B, S), attention_mask (B, P+S),
past_key_values.{i}.key/value -> logits, present.{i}.key/value. Our head computes the action rows only
(2050 on the medium fixture); the builder's computes the whole vocabulary.

Usage: ``python -m nora_edge.bench.decoder_flavors --out out/decoder-flavors [--threads 1 2] [--past 130]
[--fixture medium real-slice]``; results in ``<out>/<fixture>/decoder_flavors.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from nora_edge.bench import decoder_flavors_build as build
from nora_edge.bench.decoder_flavors_build import markdown, max_abs_diff, node_counts
from nora_edge.bench.stats import summarize
from nora_edge.errors import InputError
from nora_edge.sessions import session_options


class StepRunner:
    """One decode step (S = 1 after P cached positions) of one decoder graph, with its inputs bound once.

    Args:
        session: the decoder's ``InferenceSession``.
        dims: decoder shapes (bench/decoder_flavors_build.py).
        past: cached positions P.
        seed: RNG seed of the random embeddings and K/V (same seed -> same inputs across flavors).
        cache_len: None for the grow-by-concat interface (past (1, kv, P, hd) -> present (1, kv, P+1, hd));
            an int >= P+1 for GroupQueryAttention's share-buffer mode (past and present are one
            (1, kv, cache_len, hd) buffer).
        mrope_offsets: see :func:`step_inputs`.

    Raises:
        InputError: an input the interface does not know, or cache_len < P + 1.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        dims: build.DecoderDims,
        past: int,
        seed: int = 0,
        cache_len: int | None = None,
        mrope_offsets: tuple[int, int, int] = (0, 0, 0),
    ) -> None:
        if cache_len is not None and cache_len < past + 1:
            raise InputError(f"cache_len {cache_len} must hold past + 1 = {past + 1} positions")
        self.session = session
        self.binding = session.io_binding()
        self.feeds = step_inputs(dims, past, seed, cache_len, mrope_offsets)
        names = {i.name for i in session.get_inputs()}
        unknown = names - set(self.feeds)
        if unknown:
            raise InputError(f"decoder inputs {sorted(unknown)} are not part of the decode-step interface")
        self._values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in self.feeds.items() if k in names}
        for name, value in self._values.items():
            self.binding.bind_ortvalue_input(name, value)
        self.output_names = [o.name for o in session.get_outputs()]
        for name in self.output_names:
            past_name = name.replace("present.", "past_key_values.")
            if cache_len is not None and past_name in self._values:
                self.binding.bind_ortvalue_output(name, self._values[past_name])
            else:
                self.binding.bind_output(name, "cpu")

    def __call__(self) -> None:
        self.session.run_with_iobinding(self.binding)

    def outputs(self) -> dict[str, np.ndarray]:
        """The last step's outputs by name (logits (1, rows) or (1, 1, rows); presents)."""
        return dict(zip(self.output_names, self.binding.copy_outputs_to_cpu(), strict=True))


def step_inputs(
    dims: build.DecoderDims,
    past: int,
    seed: int,
    cache_len: int | None = None,
    mrope_offsets: tuple[int, int, int] = (0, 0, 0),
) -> dict:
    """Random inputs of one decode step; K/V past (1, kv_heads, cache_len or P, head_dim) float32.

    position_ids (3, 1, 1) are P - offset for the temporal / height / width rows: (0, 0, 0) is a text token
    (what decoding feeds); distinct offsets exercise each mrope section in the equality checks.
    """
    if min(past - o for o in mrope_offsets) < 0:
        raise InputError(f"mrope_offsets {mrope_offsets} exceed past {past}")
    rng = np.random.default_rng(seed)
    kv_len = past if cache_len is None else cache_len
    feeds = {
        "inputs_embeds": rng.standard_normal((1, 1, dims.hidden), dtype=np.float32) * np.float32(0.02),
        "position_ids": np.asarray([past - o for o in mrope_offsets], dtype=np.int64).reshape(3, 1, 1),
        "attention_mask": np.ones((1, past + 1), dtype=np.int64),
    }
    for i in range(dims.layers):
        for kind in ("key", "value"):
            cache = np.zeros((1, dims.kv_heads, kv_len, dims.head_dim), dtype=np.float32)
            cache[:, :, :past] = rng.standard_normal(
                (1, dims.kv_heads, past, dims.head_dim), dtype=np.float32
            )
            feeds[f"past_key_values.{i}.{kind}"] = cache
    return feeds


def time_interleaved(runners: dict[str, StepRunner], steps: int, warmup: int = 5) -> dict[str, dict]:
    """Round-robin timing: each round runs one step of every runner, starting one later each round.

    Returns:
        {name: bench/stats.py summary of the per-step milliseconds}.
    """
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(steps):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            t0 = time.perf_counter()
            runners[name]()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {n: summarize(s) for n, s in samples.items()}


def profile_ops(
    paths: dict[str, Path],
    dims: build.DecoderDims,
    past: int,
    threads: int,
    steps: int,
    work_dir: Path,
    warmup: int = 3,
) -> dict[str, dict[str, float]]:
    """Milliseconds per decode step spent in each op type, per graph (onnxruntime's profiler: node kernel
    times of ``steps`` runs after ``warmup`` uncounted ones, the graphs run round-robin like the timings).

    Returns:
        {name: {op type: ms per step}}, largest first; "(all nodes)" is their sum, "(run)" the whole run's.

    Raises:
        InputError: a profile without one model_run event per run.
    """
    so = session_options(threads)
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(work_dir) / "ort_profile")
    sessions = {
        n: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for n, p in paths.items()
    }
    runners = {n: StepRunner(sess, dims, past) for n, sess in sessions.items()}
    for _ in range(warmup):
        for runner in runners.values():
            runner()
    time_interleaved(runners, steps, warmup=0)
    result = {}
    for name, sess in sessions.items():
        profile = Path(sess.end_profiling())
        events = json.loads(profile.read_text())
        profile.unlink()
        runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
        if len(runs) != warmup + steps:
            raise InputError(f"{profile}: {len(runs)} model_run events, expected {warmup + steps}")
        start = runs[warmup]["ts"]
        per_op: dict[str, float] = {}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
                op = e["args"]["op_name"]
                per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1e3 / steps
        per_op = dict(sorted(per_op.items(), key=lambda kv: -kv[1]))
        run_ms = sum(r["dur"] for r in runs[warmup:]) / 1e3 / steps
        result[name] = {"(run)": run_ms, "(all nodes)": sum(per_op.values()), **per_op}
    return result


ADAPTED = "builder-int4-b128"  # same quantization as our int4 recipe; its head-sliced copy is route B
EQUALITY_OFFSETS = (0, 5, 11)  # distinct t/h/w positions, so a swapped mrope section would show


def equality_checks(
    flavors: dict, sessions: dict, dims: build.DecoderDims, past: int, cache_len: int, notes: dict
) -> dict[str, dict]:
    """Same-input output differences: each fused flavor vs its source, builder-fp32 vs ours-fp32 on our head
    rows (logits and presents), the head-sliced builder graph vs its source on those rows, each share-buffer
    flavor vs its plain run (logits).

    Returns:
        {"<flavor> vs <reference>": :func:`max_abs_diff` result}.
    """

    def outputs(name: str) -> dict[str, np.ndarray]:
        f = flavors[name]
        sl = cache_len if f["share_buffer"] else None
        r = StepRunner(sessions[str(f["path"])], dims, past, 1, sl, EQUALITY_OFFSETS)
        r()
        return r.outputs()

    checks = {}
    for name, f in flavors.items():
        if "source" in f:
            checks[f"{name} vs {f['source']}"] = max_abs_diff(outputs(f["source"]), outputs(name))
        elif f["share_buffer"]:
            plain = name.removesuffix("-sharebuf")
            a, b = outputs(plain), outputs(name)
            checks[f"{name} vs {plain}"] = max_abs_diff({"logits": a["logits"]}, {"logits": b["logits"]})
    rows = build.head_rows(Path(notes["head_rows_bundle"]))
    for name, f in flavors.items():
        if "head_of" in f:
            full, sliced = outputs(f["head_of"]), outputs(name)
            full["logits"] = full["logits"][..., rows]
            checks[f"{name} vs {f['head_of']} (our head rows)"] = max_abs_diff(full, sliced)
    fused = outputs("fused-fp32-sharebuf")["logits"]
    checks["fused-fp32-sharebuf vs ours-fp32"] = max_abs_diff(
        {"logits": outputs("ours-fp32")["logits"]}, {"logits": fused}
    )
    if "builder-fp32" in flavors:
        theirs = outputs("builder-fp32")
        theirs["logits"] = theirs["logits"].reshape(1, -1)[:, rows]
        checks["builder-fp32 (our head rows) vs ours-fp32"] = max_abs_diff(outputs("ours-fp32"), theirs)
    return checks


def collect_flavors(
    out: Path, fixture: str = "medium", fuse: bool = True
) -> tuple[dict[str, dict], build.DecoderDims, dict]:
    """Build (or find) every flavor's graph for ``fixture`` under ``out/<fixture>``.

    Returns:
        ({flavor: {"path", "share_buffer"}}, dims, notes: builder availability / version, fusions, errors).
    """
    paths = build.ensure_ours(out, fixture)
    root = paths["dir"]
    dims = build.dims_from_config(paths["ckpt"])
    flavors = {
        "ours-fp32": {"path": paths["fp32"], "share_buffer": False},
        "ours-int4": {"path": paths["int4"], "share_buffer": False},
        # the product's fused flavor (export --decoder-graph fused), run as the runtime runs it: KV in place
        "fused-fp32": {"path": paths["fused-fp32"], "share_buffer": False},
        "fused-fp32-sharebuf": {"path": paths["fused-fp32"], "share_buffer": True},
        "fused-int4": {"path": paths["fused-int4"], "share_buffer": False},
        "fused-int4-sharebuf": {"path": paths["fused-int4"], "share_buffer": True},
        "fused-int4-b32": {"path": paths["fused-int4-b32"], "share_buffer": False},
        "fused-int4-b32-sharebuf": {"path": paths["fused-int4-b32"], "share_buffer": True},
    }
    notes: dict = {
        "head_rows_bundle": str(paths["fp32"].parent),
        "checkpoint": str(paths["ckpt"]),
        "onnxruntime": ort.__version__,
        "fusions": {},
        "errors": {},
    }
    ok, why = build.genai_available()
    notes["onnxruntime_genai"] = why if ok else None
    if not ok:
        notes["errors"]["builder"] = why
    for variant in build.BUILDER_VARIANTS if ok else ():
        try:
            model = build.ensure_builder(paths["ckpt"], root, variant)
        except Exception as e:  # noqa: BLE001 - a builder failure is a result to report, not a crash
            notes["errors"][variant] = f"{type(e).__name__}: {e}"
            continue
        flavors[variant] = {"path": model, "share_buffer": False}
        if build.BUILDER_VARIANTS[variant][0] == "int4":
            flavors[f"{variant}-sharebuf"] = {"path": model, "share_buffer": True}
        if variant == ADAPTED:  # the builder's graph adapted to our head rows, in both KV modes
            rows = build.head_rows(paths["fp32"].parent)
            sliced = build.ensure_head_sliced(model, rows, root / f"{variant}-head")
            flavors[f"{variant}-head"] = {"path": sliced, "share_buffer": False, "head_of": variant}
            flavors[f"{variant}-head-sharebuf"] = {"path": sliced, "share_buffer": True}
    if fuse:
        for src in ("ours-fp32", "ours-int4"):
            dst = root / "fused" / f"{src}.onnx"
            try:
                path, stats = build.ensure_fused(flavors[src]["path"], dst, dims)
            except Exception as e:  # noqa: BLE001 - report, continue with the other flavors
                notes["errors"][f"{src}+ortfusion"] = f"{type(e).__name__}: {e}"
                continue
            flavors[f"{src}+ortfusion"] = {"path": path, "share_buffer": False, "source": src}
            notes["fusions"][f"{src}+ortfusion"] = stats
    return flavors, dims, notes


def run(
    out: Path,
    threads: list[int],
    past: int,
    steps: int,
    cache_len: int | None = None,
    fixture: str = "medium",
    fuse: bool = True,
    profile_steps: int = 50,
) -> dict:
    """The whole benchmark for one fixture; returns the JSON-able result, also written to
    ``out/<fixture>/decoder_flavors.{json,md}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    flavors, dims, notes = collect_flavors(out, fixture, fuse)
    cache_len = cache_len or past + 128
    result: dict = {
        "fixture": fixture,
        "dims": vars(dims),
        "past": past,
        "steps": steps,
        "cache_len": cache_len,
        "threads": list(threads),
        "equality_offsets": list(EQUALITY_OFFSETS),
    }
    result["notes"] = notes
    result["nodes"] = {}
    for name, f in flavors.items():
        if not f["share_buffer"]:
            result["nodes"][name] = node_counts(f["path"], out / fixture)
    result["timing"], result["equality"] = {}, {}
    for t in threads:
        sessions, runners = {}, {}
        for name, f in flavors.items():
            key = str(f["path"])
            if key not in sessions:
                sessions[key] = ort.InferenceSession(
                    key, session_options(t), providers=["CPUExecutionProvider"]
                )
            runners[name] = StepRunner(
                sessions[key], dims, past, seed=0, cache_len=cache_len if f["share_buffer"] else None
            )
        result["timing"][str(t)] = time_interleaved(runners, steps)
        if t == threads[0]:
            result["equality"] = equality_checks(flavors, sessions, dims, past, cache_len, notes)
        del runners, sessions
    profiled = {n: f["path"] for n, f in flavors.items() if "int4" in n and not f["share_buffer"]}
    result["profile"] = (
        profile_ops(profiled, dims, past, threads[0], profile_steps, out / fixture) if profile_steps else {}
    )
    (out / fixture / "decoder_flavors.json").write_text(json.dumps(result, indent=1, default=str))
    (out / fixture / "decoder_flavors.md").write_text(markdown(result))
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m nora_edge.bench.decoder_flavors", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--out", type=Path, default=Path("out/decoder-flavors"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--past", type=int, default=130)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument(
        "--cache-len", type=int, default=None, help="share-buffer cache length (default past + 128)"
    )
    ap.add_argument("--no-fusion", action="store_true", help="skip the ours + ORT transformers fusion flavor")
    ap.add_argument("--profile-steps", type=int, default=50, help="profiled steps per int4 flavor (0: none)")
    ap.add_argument("--fixture", nargs="+", choices=build.FIXTURES, default=["medium"])
    a = ap.parse_args(argv)
    for fixture in a.fixture:
        result = run(
            a.out, a.threads, a.past, a.steps, a.cache_len, fixture, not a.no_fusion, a.profile_steps
        )
        print(markdown(result))


if __name__ == "__main__":
    main()
