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
) -> None:
    """Write a NORA-architecture checkpoint with random weights (no model hub needed)."""
    from nora_edge.export.fixtures import build_fixture

    try:
        path = build_fixture(out, preset=preset.value, horizon=horizon, seed=seed)
    except NoraEdgeError as e:
        _fail(e)
    typer.echo(f"checkpoint written: {path}")


@app.command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="NORA checkpoint directory (HF format)")],
    out: Annotated[Path, typer.Option("--out", help="bundle directory to create")],
    fast: Annotated[Path | None, typer.Option(help="FAST tokenizer dir (default: CHECKPOINT/fast)")] = None,
    precision: Annotated[str, typer.Option(help="fp32 | fp16 | int8 | int4 | a recipe name")] = "fp32",
    image_size: Annotated[int, typer.Option(help="square input size the vision graph is built for")] = 224,
    time_horizon: Annotated[int | None, typer.Option(help="T when the FAST config leaves it null")] = None,
    validate: Annotated[bool, typer.Option(help="check the ONNX graphs against PyTorch")] = True,
    report: Annotated[bool, typer.Option(help="write a fidelity report (quantized bundles)")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing bundle")] = False,
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
            overwrite=overwrite,
        )
    except NoraEdgeError as e:
        _fail(e)
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


@app.command()
def run(
    bundle: Annotated[Path, typer.Argument(help="bundle directory")],
    image: Annotated[Path, typer.Option(help="camera frame (.png/.jpg with Pillow, or .npy (H,W,3) uint8)")],
    instruction: Annotated[str, typer.Option(help="task instruction")],
    unnorm_key: Annotated[str | None, typer.Option(help="dataset key of the norm stats")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Predict one action chunk (T, D) with the runtime."""
    from nora_edge.image_io import load_image
    from nora_edge.policy import NoraPolicy

    try:
        policy = NoraPolicy.load(bundle)
        actions = policy.predict_action_chunk(load_image(image), instruction, unnorm_key=unnorm_key)
    except NoraEdgeError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps({"actions": actions.tolist(), "timings_ms": policy.last_timings}, indent=2))
    else:
        for t, row in enumerate(actions):
            typer.echo(f"t={t}: " + " ".join(f"{v:+.5f}" for v in row))
