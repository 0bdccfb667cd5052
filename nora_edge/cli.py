"""Command-line interface: each command parses its options and calls one function.

Commands that need the export stage (torch) import it inside the command, so ``nora-edge run``,
``info`` and ``bench`` (without ``--reference``) work on a robot where only the runtime is installed.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from nora_edge.errors import NoraEdgeError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="nora-edge: run NORA on robots.")


class Preset(StrEnum):
    tiny = "tiny"
    medium = "medium"
    real_shape = "real-shape"


def _fail(e: Exception) -> None:
    typer.secho(f"error: {type(e).__name__}: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def version() -> None:
    """Print the nora-edge version."""
    from nora_edge import __version__

    typer.echo(__version__)


@app.command()
def tiny(
    out: Annotated[Path, typer.Argument(help="directory to write the checkpoint to")],
    preset: Annotated[Preset, typer.Option(help="model size")] = Preset.tiny,
    horizon: Annotated[int, typer.Option(help="actions per chunk: 1 (NORA) or 5 (NORA-Long)")] = 1,
    seed: Annotated[int, typer.Option(help="weights and tokenizer seed")] = 0,
    train_steps: Annotated[
        int, typer.Option(help="train on the synthetic task first (tiny: 200 for h=1, 150 for h=5)")
    ] = 0,
) -> None:
    """Write a NORA-architecture checkpoint with random (or briefly trained) weights; no model hub needed."""
    from nora_edge.export.fixtures import build_fixture

    try:
        path = build_fixture(out, preset=preset.value, horizon=horizon, seed=seed, train_steps=train_steps)
    except NoraEdgeError as e:
        _fail(e)
    typer.echo(f"checkpoint written: {path}")


@app.command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="NORA checkpoint directory (HF format)")],
    out: Annotated[Path, typer.Option("--out", help="bundle directory to create")],
    fast: Annotated[Path | None, typer.Option(help="FAST tokenizer dir (default: CHECKPOINT/fast)")] = None,
    precision: Annotated[
        str, typer.Option(help="fp32 | fp16 | int8 | int8-qdq | int4 | int4-qdq | a recipe name")
    ] = "fp32",
    image_size: Annotated[int, typer.Option(help="square input size the vision graph is built for")] = 224,
    time_horizon: Annotated[int | None, typer.Option(help="T when the FAST config leaves it null")] = None,
    validate: Annotated[bool, typer.Option(help="check the ONNX graphs against PyTorch")] = True,
    report: Annotated[
        bool, typer.Option(help="fp32: also write fidelity_report.json (quantized: always)")
    ] = False,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="folder of images + instructions.jsonl: the frames calibrated recipes record and, with "
            "--multi-token, the frames drafts.json is built from (the model's own chunks: first proposals)"
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing bundle")] = False,
    accept_degraded: Annotated[
        bool,
        typer.Option(
            help="quantized precisions: write the bundle even if it misses the recipe's fidelity thresholds"
        ),
    ] = False,
    validation_prompts: Annotated[
        int, typer.Option(help="held-out (frame, instruction) pairs the shipped runtime is checked on")
    ] = 3,
    validation_instructions: Annotated[
        Path | None,
        typer.Option(help="text file, one instruction per line, for those pairs (default: generic tasks)"),
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option(
            help="fine-tuned weights over CHECKPOINT (the base dir): accelerate save_state dir, "
            "model.safetensors or a *.safetensors.index.json; every key must match a base parameter"
        ),
    ] = None,
    weights_format: Annotated[str, typer.Option(help="auto | safetensors | accelerate")] = "auto",
    allow_partial: Annotated[
        list[str] | None,
        typer.Option(help="base parameter (or prefix, e.g. visual) the weights may omit; repeatable"),
    ] = None,
    stats: Annotated[
        Path | None,
        typer.Option(help="LeRobot dataset root or meta/stats.json: unnormalize with it (default: q01/q99)"),
    ] = None,
    stats_key: Annotated[str, typer.Option(help="feature of the stats file holding the actions")] = "action",
    norm_mode: Annotated[
        str, typer.Option(help="min_max (NORA's LeRobot fine-tuning) | mean_std")
    ] = "min_max",
    gripper: Annotated[
        list[str] | None,
        typer.Option(
            help="gripper step after unnormalize, in order, repeatable: rescale|binarize|invert[:DIM]"
        ),
    ] = None,
    mask: Annotated[
        str | None,
        typer.Option(
            help="per-dimension unnormalize mask, e.g. 1,1,1,1,1,1,0 (0: dimension left as produced)"
        ),
    ] = None,
    target: Annotated[
        str,
        typer.Option(
            help="onnxruntime | tensorrt (standard ONNX ops only, static KV cache, checked against TensorRT's "
            "operator tables; precisions fp32, fp16, int8-qdq, int4-qdq)"
        ),
    ] = "onnxruntime",
    decoder_graph: Annotated[
        str,
        typer.Option(
            help="onnxruntime target: portable (traced, standard ops) | fused (onnxruntime-genai's builder graph "
            "adapted: GroupQueryAttention over in-place KV buffers, fused RMSNorm and rotary)"
        ),
    ] = "portable",
    multi_token: Annotated[
        bool,
        typer.Option(
            "--multi-token",
            help="decoder with logits at every new position (logits_all) for lossless multi-token "
            "decoding (`nora-edge run --decoding multi-token`); validated vs HF and vs the plain loop's ids; "
            "with --calibration also drafts.json",
        ),
    ] = False,
) -> None:
    """Export a NORA checkpoint to a runtime bundle (ONNX + manifest), validated against PyTorch."""
    from nora_edge.export.pipeline import export_bundle

    try:
        path = export_bundle(
            checkpoint,
            out,
            fast_dir=fast,
            time_horizon=time_horizon,
            precision=precision,
            image_size=image_size,
            validate=validate,
            report=report,
            calibration=calibration,
            overwrite=overwrite,
            accept_degraded=accept_degraded,
            validation_prompts=validation_prompts,
            validation_instructions=_instructions(validation_instructions),
            weights=weights,
            weights_format=weights_format,
            allow_partial=tuple(allow_partial or ()),
            stats=stats,
            stats_key=stats_key,
            norm_mode=norm_mode,
            gripper=tuple(gripper or ()),
            mask=_mask(mask),
            target=target,
            decoder_graph=decoder_graph,
            multi_token=multi_token,
        )
    except NoraEdgeError as e:
        _fail(e)
    typer.echo(f"bundle written: {path}")


def _mask(text: str | None) -> list[bool] | None:
    """``"1,1,0"`` -> [True, True, False] (InputError on anything but 0/1 entries)."""
    if text is None:
        return None
    from nora_edge.errors import InputError

    parts = [p.strip() for p in text.split(",")]
    if not parts or any(p not in ("0", "1") for p in parts):
        _fail(InputError(f"--mask must be comma-separated 0/1 per action dimension, got {text!r}"))
    return [p == "1" for p in parts]


def _instructions(path: Path | None) -> list[str] | None:
    """Non-empty lines of ``path`` (None: the exporter's default list)."""
    if path is None:
        return None
    from nora_edge.errors import InputError

    try:
        lines = [x.strip() for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    except OSError as e:
        _fail(InputError(f"{path}: cannot read validation instructions ({e})"))
    if not lines:
        _fail(InputError(f"{path}: no instruction in the file"))
    return lines


@app.command()
def quantize(
    bundle: Annotated[Path, typer.Argument(help="fp32 bundle directory")],
    out: Annotated[Path, typer.Option("--out", help="quantized bundle directory to create")],
    recipe: Annotated[str, typer.Option(help="recipe name (see `nora-edge recipes`)")] = "int8",
    calibration: Annotated[
        Path | None, typer.Option(help="folder of images + instructions.jsonl (default: synthetic frames)")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing bundle")] = False,
    accept_degraded: Annotated[
        bool,
        typer.Option(
            help="write the bundle even if it misses the recipe's fidelity thresholds (recorded in its manifest)"
        ),
    ] = False,
) -> None:
    """Quantize an existing fp32 bundle (no re-export), gated by the recipe's fidelity thresholds vs fp32.

    Writes fidelity_report.{json,md} into the bundle; a metric over its threshold fails (exit 2, nothing
    written) unless --accept-degraded.
    """
    import warnings

    from nora_edge.bundle import Bundle, format_quantized_validation
    from nora_edge.export.quantize import load_calibration_dir, quantize_bundle

    try:
        samples = load_calibration_dir(calibration) if calibration is not None else None
        with warnings.catch_warnings():  # the validation lines below say it
            warnings.filterwarnings("ignore", message="(accepted despite failure|.*written without fidelity)")
            path = quantize_bundle(
                bundle, out, recipe, calibration=samples, overwrite=overwrite, accept_degraded=accept_degraded
            )
        lines = format_quantized_validation(Bundle.load(path, verify=False).manifest["validation"])
    except NoraEdgeError as e:
        _fail(e)
    typer.echo("\n".join(lines))
    typer.echo(f"bundle written: {path}")


@app.command()
def info(
    bundle: Annotated[Path, typer.Argument(help="bundle directory")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Print what a bundle holds (components, precision, sizes, validation)."""
    from nora_edge.bundle import Bundle, format_info

    try:
        data = Bundle.load(bundle).info()
    except NoraEdgeError as e:
        _fail(e)
    typer.echo(json.dumps(data, indent=2) if as_json else format_info(data))


def run_json(actions, policy) -> dict:
    """``run --json`` payload: actions, stage timings in milliseconds, token classes, providers, decoding mode."""
    t = policy.last_timings
    ms = {k: round(1e3 * v, 3) for k, v in t.items() if isinstance(v, float)}
    ms["decode_steps"] = [round(1e3 * v, 3) for v in t["decode_steps"]]
    out = policy.last_output
    return {
        "actions": actions.tolist(),
        "timings_ms": ms,
        "new_tokens": t["new_tokens"],
        "token_classes": t["token_classes"],
        "flagged": out.flagged,
        "mode": out.mode,
        "providers": t["providers"],
        "codec_backend": t["codec_backend"],
        "decoding": t["decoding"],
        "decoder_calls": t["decoder_calls"],
    }


@app.command()
def run(
    bundle: Annotated[Path, typer.Argument(help="bundle directory")],
    image: Annotated[Path, typer.Option(help="camera frame (.png/.jpg with Pillow, or .npy (H,W,3) uint8)")],
    instruction: Annotated[str, typer.Option(help="task instruction")],
    unnorm_key: Annotated[str | None, typer.Option(help="dataset key of the norm stats")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    allow_forced: Annotated[
        bool,
        typer.Option(
            help="print a chunk holding tokens the model did not choose (flagged) instead of failing"
        ),
    ] = False,
    kernels: Annotated[
        str, typer.Option(help="FAST codec backend: auto (libnora_fast when built, else numpy), c, numpy")
    ] = "auto",
    decoding: Annotated[
        str,
        typer.Option(
            help="plain | multi-token (proposals verified several per decoder call, same ids; a bundle "
            "exported with --multi-token)"
        ),
    ] = "plain",
) -> None:
    """Predict one action chunk (T, D) with the runtime."""
    from nora_edge.image_io import load_image
    from nora_edge.policy import NoraPolicy

    try:
        policy = NoraPolicy.load(
            bundle, forced_tokens="flag" if allow_forced else "raise", kernels=kernels, decoding=decoding
        )
        actions = policy.predict_action_chunk(load_image(image), instruction, unnorm_key=unnorm_key)
    except NoraEdgeError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(run_json(actions, policy), indent=2))
    else:
        for t, row in enumerate(actions):
            typer.echo(f"t={t}: " + " ".join(f"{v:+.5f}" for v in row))
        if policy.last_output.flagged:
            typer.secho(
                f"warning: tokens the model did not choose: {policy.last_output.class_counts}",
                fg=typer.colors.YELLOW,
                err=True,
            )


@app.command("check-trt")
def check_trt(
    bundle: Annotated[Path, typer.Argument(help="bundle directory or one .onnx file")],
    trt: Annotated[
        str, typer.Option("--trt", help="TensorRT version: 10.3 (JetPack 6.1/6.2), 10.15 or latest")
    ] = "10.3",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List every node, tensor and dtype TensorRT's ONNX parser documents as unsupported (exit 1 if any)."""
    from nora_edge.export.trt_support import check_bundle, check_graph

    try:
        reports = (
            {bundle.name: check_graph(bundle, trt)} if bundle.suffix == ".onnx" else check_bundle(bundle, trt)
        )
    except NoraEdgeError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=2))
    else:
        typer.echo("\n".join(r.format() for r in reports.values()))
    if not all(r.ok for r in reports.values()):
        raise typer.Exit(1)


@app.command("build-engine")
def build_engine(
    bundle: Annotated[Path, typer.Argument(help="bundle exported with --target tensorrt")],
    profile: Annotated[Path, typer.Option(help="device profile, e.g. profiles/orin-agx-64gb.toml")],
    print_trtexec: Annotated[
        bool, typer.Option("--print-trtexec", help="print the trtexec commands to run on the device")
    ] = False,
    workspace_mib: Annotated[int, typer.Option(help="TensorRT builder workspace (MiB)")] = 1024,
) -> None:
    """TensorRT engines for a --target tensorrt bundle: one per graph, built with the tensorrt Python API into
    <bundle>.engines/<device>/ with engines.json (needs TensorRT + an NVIDIA GPU; else use --print-trtexec)."""
    from nora_edge.bundle import Bundle
    from nora_edge.export.trt_engine import build_engines, trtexec_commands
    from nora_edge.profiles import load_profile_file

    try:
        device = load_profile_file(profile).name
        b = Bundle.load(bundle, verify=not print_trtexec)  # engines are built from verified graphs only
        if print_trtexec:
            typer.echo("\n".join(trtexec_commands(b, device, workspace_mib)))
            return
        record = build_engines(b, device, workspace_mib, log=lambda line: typer.echo(line, err=True))
    except NoraEdgeError as e:
        _fail(e)
    typer.echo(f"engines and record: {record}")


@app.command()
def recipes() -> None:
    """List the quantization recipes ``export --precision`` accepts."""
    from nora_edge.export.quantize import list_recipes

    for r in list_recipes():
        typer.echo(f"{r.name}: {r.description}")


@app.command()
def bench(
    bundle: Annotated[Path, typer.Argument(help="bundle directory")],
    reference: Annotated[
        Path | None, typer.Option(help="checkpoint: run the PyTorch reference side by side")
    ] = None,
    reference_quant: Annotated[
        str | None,
        typer.Option(
            help="load the reference through bitsandbytes: bnb-int8 or bnb-nf4 (needs nora-edge[bnb])"
        ),
    ] = None,
    steps: Annotated[int, typer.Option(help="timed inferences")] = 50,
    warmup: Annotated[int, typer.Option(help="untimed inferences first")] = 5,
    hz: Annotated[float, typer.Option(help="control rate for the deadline-miss rate")] = 25.0,
    out: Annotated[Path, typer.Option(help="report directory")] = Path("bench-out"),
    against: Annotated[Path | None, typer.Option(help="baseline JSON: fail on a regression")] = None,
    max_regression: Annotated[
        float, typer.Option(help="allowed slowdown / memory growth vs baseline")
    ] = 0.15,
    update_baseline: Annotated[
        bool, typer.Option(help="write this run as the baseline at --against")
    ] = False,
    threads: Annotated[int | None, typer.Option(help="onnxruntime (and torch) threads")] = None,
    unnorm_key: Annotated[str | None, typer.Option(help="dataset key of the norm stats")] = None,
    constrained: Annotated[
        bool, typer.Option(help="automaton-constrained decoding (runtime default)")
    ] = True,
    plots: Annotated[bool, typer.Option(help="write PNG plots")] = True,
    baseline7b: Annotated[
        Path | None,
        typer.Option(help="baseline7b.json (python -m nora_edge.bench.baseline7b): the 7B host measurement"),
    ] = None,
) -> None:
    """Benchmark a bundle: per-stage latency, p99, jitter, deadline misses, memory; optional CI gate."""
    from nora_edge.bench.run import run_bench

    try:
        result = run_bench(
            bundle,
            reference=reference,
            reference_quant=reference_quant,
            steps=steps,
            warmup=warmup,
            hz=hz,
            out=out,
            against=against,
            max_regression=max_regression,
            update_baseline=update_baseline,
            threads=threads,
            unnorm_key=unnorm_key,
            constrained=constrained,
            plots=plots,
            baseline7b=baseline7b,
        )
    except NoraEdgeError as e:
        _fail(e)
    e2e = result["runtime"]["e2e"]
    typer.echo(
        f"end-to-end: median {e2e['median']:.1f} ms, p99 {e2e['p99']:.1f} ms, "
        f"{e2e['actions_per_s']:.1f} actions/s, deadline misses at {hz:g} Hz: {100 * e2e['deadline_miss_rate']:.0f}%"
    )
    typer.echo(f"report: {Path(out) / 'report.md'}")
    gate = result.get("gate")
    if gate is not None:
        from nora_edge.bench.gate import GateResult

        verdict = GateResult.from_json(gate)
        typer.echo(verdict.text())
        if not verdict.ok:
            raise typer.Exit(1)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="working and report directory")] = Path("out"),
    steps: Annotated[int, typer.Option(help="timed inferences per bundle")] = 20,
    episodes: Annotated[int, typer.Option(help="closed-loop episodes per task per policy")] = 2,
    checkpoint: Annotated[
        Path | None, typer.Option(help="MetaWorld policy checkpoint (default: policies/metaworld-nora-long)")
    ] = None,
    fixture: Annotated[
        bool, typer.Option(help="the older job without a simulator: tiny fixture -> bundles -> bench")
    ] = False,
) -> None:
    """The main job: the MetaWorld policy -> fp32/int8/int4 bundles -> bench vs PyTorch -> closed loop."""
    try:
        if fixture:
            from nora_edge.bench.demo import run_demo

            run_demo(out, steps=steps)  # prints the headline table and where the report is
        else:
            from nora_edge.bench.demo_sim import run_sim_demo

            run_sim_demo(out, checkpoint=checkpoint, steps=steps, episodes=episodes)
    except NoraEdgeError as e:
        _fail(e)


@app.command("eval")
def eval_cmd(
    policy: Annotated[
        Path, typer.Argument(help="bundle (manifest.json) or checkpoint (config.json) directory")
    ],
    env: Annotated[str, typer.Option(help="simulator (only 'metaworld')")] = "metaworld",
    tasks: Annotated[str, typer.Option(help="'all' or comma-separated MetaWorld tasks")] = "all",
    episodes: Annotated[int, typer.Option(help="episodes per task")] = 10,
    seed: Annotated[int, typer.Option(help="evaluation seed set (same seed: same episodes)")] = 0,
    workers: Annotated[int, typer.Option(help="parallel worker processes / Ray actors")] = 1,
    against: Annotated[
        Path | None, typer.Option(help="second bundle or checkpoint, run on the same episodes and compared")
    ] = None,
    ray: Annotated[str | None, typer.Option(help="Ray cluster address, or 'local' (127.0.0.1)")] = None,
    gif: Annotated[int, typer.Option(help="GIF of the first N episodes (frames at chunk starts)")] = 0,
    max_steps: Annotated[
        int | None, typer.Option(help="env steps per episode (default sim MAX_STEPS)")
    ] = None,
    blank_image: Annotated[bool, typer.Option(help="feed a constant gray frame (vision ablation)")] = False,
    latency_steps: Annotated[
        int,
        typer.Option(
            help="simulated inference latency in env steps: each chunk after the first arrives this many steps "
            "after its frame, predicted while the current one executes; the robot holds when it is late"
        ),
    ] = 0,
    nora_fallback: Annotated[
        bool,
        typer.Option(
            help="checkpoints: execute NORA's zeros fallback for a malformed chunk (counted) instead of "
            "ending the episode"
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="seconds one episode may take before its worker is killed")
    ] = 600.0,
    gripper: Annotated[
        list[str] | None, typer.Option(help="checkpoint without train_report.json: gripper steps, in order")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="report directory (default out/eval/<name>)")] = None,
) -> None:
    """Run a bundle or checkpoint in closed loop on MetaWorld; success rates with 95% intervals, latency, GIFs."""
    from nora_edge.errors import InputError

    try:
        if env != "metaworld":
            raise InputError(f"--env {env!r}: only 'metaworld' is supported")
        from nora_edge.sim.evaluate import EvalConfig, run_eval
        from nora_edge.sim.metaworld_env import MAX_STEPS

        cfg = EvalConfig(
            max_steps=max_steps if max_steps is not None else MAX_STEPS,
            blank_image=blank_image,
            gif=gif,
            workers=workers,
            timeout_s=timeout,
            gripper=tuple(gripper) if gripper else None,
            nora_fallback=nora_fallback,
            latency_steps=latency_steps,
        )
        paths = run_eval(policy, tasks, episodes, seed, cfg, against=against, ray_address=ray, out=out)
    except NoraEdgeError as e:
        _fail(e)
    typer.echo(f"report: {paths['markdown']} (json: {paths['json']}, plot: {paths['png']})")


# the policy server commands (serve, loadtest) live in their own module to keep this one thin
from nora_edge.cli_serve import register as _register_serve  # noqa: E402

_register_serve(app, _fail)
