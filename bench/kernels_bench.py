"""libnora_fast (C) vs numpy vs the published FAST algorithm: per chunk decode, per token select, share of a step.

Data flow:
  codec  a FAST+-like tokenizer fitted here (vocab 2048, T=5, D=7, alphabet ~1200: multi-byte UTF-8 like FAST+)
         and the medium NORA bundle's own codec (built once under --out, reused)
    --build_native/write_native (or the bundle's codec/native/)--> nora_fast_ctx_open (ctypes)
  chunks smooth synthetic chunks --FastTokenizer.encode--> N valid id sequences (automaton random walks where
         a bundle's tokenizer cannot encode enough of them)
    decode  C batch (one call, 1024 chunks) | C per chunk | numpy ByteTable.decode_chunk + Chain.apply |
            published (tokenizers decode + scipy.fft.idct + NORA's q01/q99 unnormalize): µs per chunk
    select  each sequence replayed as greedy steps (random logits, the sequence's next id on top, penalty as
            in generation): C batch 1 | C batch 1024 | numpy exactly as nora_edge.generate.greedy: µs per token
  medium bundle NoraPolicy.run_chunk --last_timings["decode_steps"]--> decoder step time
    share = (select/token * tokens/chunk + decode/chunk) / (step * tokens/chunk)
  bench_decode.c under callgrind (kernels_callgrind) --> instructions per chunk / per token (C only)
  --> kernels_bench.json + kernels_bench.md under --out.

Paths are timed interleaved per chunk/token in one process with the order rotated; medians and p99 because the
machine is shared. Outputs are checked before timing (coefficients equal to the published decode, actions
within float32 rounding, selected ids equal to the numpy path) and the counts are reported. The codecs and timed
paths live in ``kernels_paths``, the instruction counts in ``kernels_callgrind``.
Run: ``python -m nora_edge.bench.kernels_bench --out out/kernels-bench [--chunks 1024] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np

from nora_edge.actions.native import program_key
from nora_edge.atomic import write_text_atomic
from nora_edge.bench import kernels_callgrind as cg
from nora_edge.bench.kernels_paths import (
    BINDING_DECODE,
    BINDING_SELECT,
    LIB,
    Codec,
    bench_decode,
    bench_select,
    bundle_codec,
    corpus_arrays,
    load_library,
    open_binding,
    open_ctx,
    synthetic_codec,
)
from nora_edge.bench.report import table, write_json_atomic
from nora_edge.bench.stats import summarize


def ensure_bundle(out: Path) -> Path:
    """The medium NORA-Long bundle under ``out`` (fixture + export, fp32, built once and reused)."""
    bundle, ckpt = out / "medium-bundle", out / "medium-ckpt"
    if (bundle / "manifest.json").is_file():
        return bundle
    from nora_edge.export.fixtures import build_fixture  # torch: only when the bundle must be built
    from nora_edge.export.pipeline import export_bundle

    if not (ckpt / "config.json").is_file():
        shutil.rmtree(ckpt, ignore_errors=True)
        build_fixture(ckpt, preset="medium", horizon=5, seed=0)
    shutil.rmtree(bundle, ignore_errors=True)
    return Path(export_bundle(ckpt, bundle, validate=False, progress=False))


def decoder_steps(bundle, chunks: int, threads: int | None, seed: int) -> dict:
    """Decoder step seconds (NoraPolicy.last_timings["decode_steps"]) over ``chunks`` chunks after a warm-up."""
    from nora_edge.policy import NoraPolicy

    rng = np.random.default_rng(seed)
    size = int(bundle.image.get("size", 224)) if isinstance(bundle.image.get("size"), int) else 224
    steps: list[float] = []
    tokens: list[int] = []
    with NoraPolicy.load(bundle, threads=threads, forced_tokens="flag") as policy:
        for k in range(chunks + 1):
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            policy.run_chunk(image, "pick up the red block")
            if k:  # chunk 0 warms the sessions up
                steps += policy.last_timings["decode_steps"]
                tokens.append(policy.last_timings["new_tokens"])
    return {"step_ms": [s * 1e3 for s in steps], "generated_tokens": tokens, "threads": threads}


def binding_library() -> str | None:
    """The library ``nora_edge.kernels`` loads (its FastKernels rows), or None without the binding/library."""
    try:
        from nora_edge import kernels
    except ImportError:
        return None
    path = kernels.library_path()
    return None if path is None else str(path)


def machine() -> dict:
    """CPU model, logical cores, cores this process may use, OS, numpy."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": os.cpu_count(), "usable_cores": usable, "os": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__}  # fmt: skip


def summaries(samples: dict[str, list[float]]) -> dict[str, dict]:
    return {name: summarize(v) for name, v in samples.items()}


def run_codec(lib, codec: Codec, key: str, args, rng) -> dict:
    """Decode + select benchmark of one codec; the corpus arrays are kept for callgrind."""
    ctx, program = open_ctx(lib, codec.native_dir, key)
    fk = open_binding(codec.native_dir)
    try:
        corpus = corpus_arrays(codec, rng, args.select_rows)
        dec = bench_decode(lib, ctx, program, codec, corpus, args.repeats, fk)
        batch = min(args.batch, corpus["logits"].shape[0])
        sel = bench_select(lib, ctx, codec, corpus, args.repeats, batch, fk)
    finally:
        lib.nora_fast_ctx_free(ctx)
        if fk is not None:
            fk.close()
    return {
        "codec": {"name": codec.name, "vocab": codec.native.vocab_size, "T": codec.automaton.time_horizon,
                  "D": codec.automaton.action_dim, "alphabet_max": codec.native.alphabet_max,
                  "head_rows": int(codec.native.head_ids.size), "dfa_states": codec.native.dfa_states,
                  "program": key, "penalty": codec.penalty,
                  "ids_per_chunk": float(np.mean([len(s) for s in codec.sequences]))},
        "decode": {"check": dec["check"], "us": summaries(dec["samples"])},
        "select": {"check": sel["check"], "us": summaries(sel["samples"])},
        "corpus": corpus, "program": program,
    }  # fmt: skip


def ratios(res: dict) -> dict:
    """Median speed-ups: published / path and numpy / path (decode), numpy / path (select), per C path."""
    np_dec, pub, np_sel = "numpy (ByteTable + Chain)", "published", "numpy (generate.greedy step)"
    md, ms = ({k: v["median"] for k, v in res[x]["us"].items()} for x in ("decode", "select"))
    out = {}
    for k in md:
        if k not in (np_dec, pub):
            out[f"decode: published / {k}"] = md[pub] / md[k]
            out[f"decode: numpy / {k}"] = md[np_dec] / md[k]
    out.update({f"select: numpy / {k}": ms[np_sel] / ms[k] for k in ms if k != np_sel})
    return out


def step_share(res: dict, steps: dict) -> dict:
    """(select/token * tokens + decode/chunk) / (step * tokens), medians, for C and for the numpy paths."""
    dec, sel = res["decode"]["us"], res["select"]["us"]
    step_us = summarize(steps["step_ms"])["median"] * 1e3
    tokens = res["codec"]["ids_per_chunk"]

    def share(sel_key: str, dec_key: str) -> float:
        return (sel[sel_key]["median"] * tokens + dec[dec_key]["median"]) / (step_us * tokens)

    c_dec = next(k for k in dec if k.startswith("C per chunk"))
    binding = {}
    if BINDING_SELECT in sel and BINDING_DECODE in dec:
        binding["binding_percent"] = 100 * share(BINDING_SELECT, BINDING_DECODE)
    return {"decode_step_us": step_us, "tokens_per_chunk": tokens, "goal": "< 5 %", **binding,
            "c_percent": 100 * share("C batch 1 (ctypes)", c_dec),
            "numpy_percent": 100 * share("numpy (generate.greedy step)", "numpy (ByteTable + Chain)"),
            "step_summary_ms": summarize(steps["step_ms"]), "generated_tokens": steps["generated_tokens"],
            "threads": steps["threads"]}  # fmt: skip


def markdown(report: dict) -> str:
    """The report's tables (µs per chunk / per token, ratios, step share, instruction counts)."""
    m = report["machine"]
    out = [
        "# libnora_fast vs numpy vs the published FAST decode",
        "",
        f"Machine: {m['cpu']}, {m['cores']} logical cores ({m['usable_cores']} usable), {m['os']}, "
        f"Python {m['python']}, numpy {m['numpy']}. Library: `{report['library']}` "
        f"(FastKernels rows: `{report['binding_library']}`).",
        "",
        f"Reproduce: `{report['command']}`",
        "",
        "Wall-clock µs, interleaved in one process (medians and p99; the machine is shared). Single-row select "
        "calls start from a warm row (read untimed first: in the decode loop the decoder graph just wrote it); a "
        "batch call streams its rows from memory. `(ctypes)` rows call the library directly with preallocated "
        "buffers; `FastKernels` rows go through nora_edge.kernels (argument checks, allocation). Python paths are "
        "not counted under callgrind (the interpreter's work would swamp them).",
    ]
    for res in report["codecs"]:
        c = res["codec"]
        out += ["", f"## Codec: {c['name']} (V={c['vocab']}, T={c['T']}, D={c['D']}, alphabet U+0000.."
                f"U+{c['alphabet_max']:04X}, {c['head_rows']} head rows, {c['ids_per_chunk']:.1f} ids/chunk)", ""]  # fmt: skip
        rows = [[f"decode: {k}", v["median"], v["p99"], v["n"]] for k, v in res["decode"]["us"].items()]
        rows += [[f"select: {k}", v["median"], v["p99"], v["n"]] for k, v in res["select"]["us"].items()]
        out += [table(["path", "median µs", "p99 µs", "samples"], rows), ""]
        out += [table(["ratio (medians)", "x"], [[k, v] for k, v in res["ratios"].items()]), ""]
        checks = {**{f"decode {k}": v for k, v in res["decode"]["check"].items()},
                  **{f"select {k}": v for k, v in res["select"]["check"].items()}}  # fmt: skip
        out += ["Checked before timing: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in checks.items())]  # fmt: skip
        if "callgrind" in res:
            out += ["", "Instructions (callgrind, C library call only):", ""]
            out += [
                table(
                    ["mode", "counted call", "units", "Ir", "Ir per unit"],
                    cg.callgrind_rows(res["callgrind"]),
                )
            ]
    if "step_share" in report:
        s = report["step_share"]
        out += ["", "## Selection + decode as a share of the medium bundle's decode step", "",
                f"decoder step median {s['decode_step_us'] / 1e3:.2f} ms (p99 {s['step_summary_ms']['p99']:.2f} ms, "
                f"{s['step_summary_ms']['n']} steps, threads {s['threads']}), {s['tokens_per_chunk']:.1f} ids/chunk "
                f"(encoded chunks; the random-weight model generated {s['generated_tokens']}).", "",
                table(["path", "share of the steps' time", "goal"],
                      [["C (batch 1 select + per chunk decode)", f"{s['c_percent']:.3f} %", s["goal"]],
                       *([["FastKernels (select + decode calls)", f"{s['binding_percent']:.3f} %", ""]]
                         if "binding_percent" in s else []),
                       ["numpy (greedy step + ByteTable + Chain)", f"{s['numpy_percent']:.3f} %", ""]])]  # fmt: skip
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--out", type=Path, default=Path("out/kernels-bench"), help="report + cached bundle folder"
    )
    p.add_argument("--chunks", type=int, default=1024, help="valid id sequences per codec (the C batch size)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and steps (smoke runs)")
    p.add_argument(
        "--bundle", type=Path, help="bundle for the step share (default: medium, built under --out)"
    )
    p.add_argument("--no-model", action="store_true", help="skip the bundle codec and the decoder steps")
    p.add_argument("--no-callgrind", action="store_true", help="skip the instruction counts")
    p.add_argument(
        "--lib", type=Path, default=LIB, help="libnora_fast.so (the .a beside it builds the driver)"
    )
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: its own)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.chunks < 2:
        p.error("--chunks must be >= 2")
    args.repeats = 1 if args.quick else 3
    args.batch = args.chunks
    args.select_rows = max(args.chunks, 256 if args.quick else 4096)
    args.step_chunks = 1 if args.quick else 10
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run everything, write kernels_bench.json / .md under --out, return the report."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lib = load_library(args.lib)
    rng = np.random.default_rng(args.seed)
    codecs = [(synthetic_codec(args.out, args.chunks, args.seed, args.quick), "synthetic")]
    bundle = None
    if not args.no_model:
        bundle_dir = args.bundle or ensure_bundle(args.out)
        codec, bundle = bundle_codec(bundle_dir, args.out, args.chunks, args.seed)
        codecs.append((codec, program_key(codec.stats)))
    report: dict = {
        "command": " ".join(["python -m nora_edge.bench.kernels_bench", *map(shlex.quote, sys.argv[1:])])
        if argv is None else " ".join(["python -m nora_edge.bench.kernels_bench", *map(shlex.quote, argv)]),
        "machine": machine(), "library": str(args.lib), "binding_library": binding_library(), "chunks": args.chunks, "quick": args.quick, "codecs": [],
    }  # fmt: skip
    driver = None
    if not args.no_callgrind:
        driver = cg.build_driver(args.out, args.lib.with_suffix(".a"))
    for codec, key in codecs:
        res = run_codec(lib, codec, key, args, rng)
        res["ratios"] = ratios(res)
        corpus, program = res.pop("corpus"), res.pop("program")
        if driver is not None:
            path = cg.write_corpus(args.out / "corpus.bin", corpus["ids"], corpus["lengths"], corpus["states"],
                                   corpus["logits"], corpus["seen"], codec.penalty, program)  # fmt: skip
            units = {"chunk": corpus["ids"].shape[0], "token": corpus["logits"].shape[0]}
            res["callgrind"] = cg.count_instructions(driver, codec.native_dir, path, units, args.out)
        report["codecs"].append(res)
        print(f"{codec.name}: " + ", ".join(f"{k} {v:.1f}x" for k, v in res["ratios"].items()), flush=True)
    if bundle is not None:
        steps = decoder_steps(bundle, args.step_chunks, args.threads, args.seed)
        report["step_share"] = step_share(report["codecs"][-1], steps)
    write_json_atomic(args.out / "kernels_bench.json", report)
    text = markdown(report)
    write_text_atomic(args.out / "kernels_bench.md", text)
    print(text)
    return report


if __name__ == "__main__":
    main()
