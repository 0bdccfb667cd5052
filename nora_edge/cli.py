"""Command-line interface: each command parses its options and calls one function."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Run NORA on robots.")


@app.command()
def version() -> None:
    """Print the nora-edge version."""
    from nora_edge import __version__

    typer.echo(__version__)
