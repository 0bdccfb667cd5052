"""The policy-server commands of the CLI (``nora-edge serve``, ``nora-edge loadtest``): each parses its options and
calls one function of ``nora_edge.serve`` (registered on the main app by ``nora_edge.cli``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from nora_edge.errors import NoraEdgeError


def register(app: typer.Typer, fail: Callable[[Exception], None]) -> None:
    """Add ``serve`` and ``loadtest`` to ``app``; ``fail`` reports a NoraEdgeError and exits 2."""

    def serve(
        bundle: Annotated[Path, typer.Argument(help="bundle directory")],
        host: Annotated[
            str, typer.Option(help="bind address (loopback unless told otherwise)")
        ] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="TCP port (WebSocket, /healthz and /metrics)")] = 8000,
        api_key: Annotated[
            str | None,
            typer.Option(
                envvar="NORA_EDGE_API_KEY",
                help="require 'Authorization: Api-Key KEY' (env NORA_EDGE_API_KEY)",
            ),
        ] = None,
        threads: Annotated[int | None, typer.Option(help="onnxruntime intra-op threads per graph")] = None,
        image_key: Annotated[str, typer.Option(help="observation key of the (H,W,3) uint8 frame")] = "image",
        prompt_key: Annotated[str, typer.Option(help="observation key of the instruction")] = "prompt",
        max_message_bytes: Annotated[int, typer.Option(help="largest message accepted")] = 16 * 2**20,
        max_frame_pixels: Annotated[int, typer.Option(help="largest H*W of a frame")] = 1920 * 1080,
        max_instruction_chars: Annotated[int, typer.Option(help="longest instruction (characters)")] = 2000,
        max_connections: Annotated[int, typer.Option(help="simultaneous connections")] = 16,
        workers: Annotated[
            int, typer.Option(help="request threads (the policy runs one chunk at a time)")
        ] = 4,
        forced_tokens: Annotated[
            str,
            typer.Option(
                help="raise: refuse chunks with tokens the model did not choose; flag: send them flagged"
            ),
        ] = "raise",
        max_repaired: Annotated[int, typer.Option(help="repaired tokens a chunk may hold under 'raise'")] = 0,
        kernels: Annotated[str, typer.Option(help="FAST codec backend: auto, c, numpy")] = "auto",
        decoding: Annotated[
            str, typer.Option(help="plain | multi-token (a bundle exported with --multi-token; same ids)")
        ] = "plain",
        ray: Annotated[
            bool, typer.Option("--ray", help="serve N replicas on Ray Serve (one policy per replica)")
        ] = False,
        replicas: Annotated[int, typer.Option(help="--ray: policy replicas")] = 2,
        address: Annotated[
            str | None,
            typer.Option(help="--ray: an existing Ray cluster's address (default: a local Ray on 127.0.0.1)"),
        ] = None,
    ) -> None:
        """Serve a bundle over openpi's WebSocket protocol (observation in, action chunk out)."""
        from nora_edge.serve.handler import ServeConfig
        from nora_edge.serve.server import load_and_serve

        try:
            config = ServeConfig(
                image_key=image_key, prompt_key=prompt_key, max_message_bytes=max_message_bytes,
                max_frame_pixels=max_frame_pixels, max_instruction_chars=max_instruction_chars,
                max_connections=max_connections, workers=workers, api_key=api_key,
            )  # fmt: skip
            if ray:
                from nora_edge.serve import ray_app

                url = ray_app.serve_ray(
                    bundle, replicas=replicas, host=host, port=port, address=address, config=config,
                    threads=threads or 1,
                    load_kwargs={
                        "forced_tokens": forced_tokens, "max_repaired": max_repaired, "kernels": kernels,
                        "decoding": decoding,
                    },
                )  # fmt: skip
                ray_app.run_forever(url, typer.echo)
                return
            load_and_serve(
                bundle, config, host, port, threads=threads, forced_tokens=forced_tokens, max_repaired=max_repaired,
                kernels=kernels, decoding=decoding,
            )  # fmt: skip
        except NoraEdgeError as e:
            fail(e)

    def loadtest(
        url: Annotated[str, typer.Argument(help="policy server, ws://host:port")],
        clients: Annotated[
            int, typer.Option(help="concurrent openpi clients, one connection each (1..256)")
        ] = 8,
        seconds: Annotated[float, typer.Option(help="how long the clients send requests (<= 3600)")] = 60.0,
        bundle: Annotated[
            Path | None,
            typer.Option(
                help="the served bundle: replies must equal NoraPolicy.predict_action_chunk on it "
                "(without: the first reply is the reference)"
            ),
        ] = None,
        image: Annotated[
            Path | None,
            typer.Option(help="frame to send (.npy, .png); default: seeded noise frames the bundle answers"),
        ] = None,
        prompt: Annotated[str | None, typer.Option(help="instruction to send")] = None,
        unnorm_key: Annotated[str | None, typer.Option(help="norm-stats key to send")] = None,
        forced_tokens: Annotated[
            str, typer.Option(help="the server's --forced-tokens (for the reference)")
        ] = "raise",
        request_timeout: Annotated[
            float, typer.Option(help="seconds before an unanswered request is a timeout")
        ] = 60.0,
        api_key: Annotated[
            str | None, typer.Option(envvar="NORA_EDGE_API_KEY", help="the server's API key")
        ] = None,
        out: Annotated[Path, typer.Option(help="report directory (report.json, report.md)")] = Path(
            "out/loadtest"
        ),
    ) -> None:
        """Load-test a policy server: M openpi clients for S seconds; throughput, p50/p99, errors by type."""
        from nora_edge.serve import loadtest as lt

        try:
            cfg = lt.LoadConfig(
                clients=clients, seconds=seconds, request_timeout_s=request_timeout, api_key=api_key
            )
            if image is not None:
                from nora_edge.image_io import load_image

                candidates = [(load_image(image), prompt or lt.DEFAULT_PROMPTS[0])]
            else:
                candidates = lt.default_candidates(prompt)
            res = lt.loadtest(url, cfg, out, bundle=bundle, candidates=candidates, unnorm_key=unnorm_key,
                              load_kwargs={"forced_tokens": forced_tokens})  # fmt: skip
        except NoraEdgeError as e:
            fail(e)
        typer.echo(lt.markdown(res))
        typer.echo(f"report: {res['paths']['markdown']} (json: {res['paths']['json']})")

    app.command()(serve)
    app.command()(loadtest)
