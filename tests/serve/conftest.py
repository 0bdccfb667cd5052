"""Fixtures of the policy-server tests: the trained fused bundle, reference policies, a server factory.

serve_bundle       the session's ``fused_trained_bundle`` (T=5, D=7; well-formed chunks on the synthetic task)
reference          NoraPolicy.load(serve_bundle) in this process, never behind the server (forced_tokens="raise")
pairs              (frame, instruction) inputs: make_rgb_image seeds x the synthetic task's instructions
start_server       factory: (config, forced_tokens) -> running ServerThread over a fresh NoraPolicy
expected(policy, frame, instruction, unnorm_key)  what a client must receive: ("ok", ChunkOutput) or
                   ("error", "<ErrorType>: <message>") from a direct call
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nora_edge.errors import NoraEdgeError
from nora_edge.policy import NoraPolicy


def load_policy(bundle: Path, forced_tokens: str = "raise") -> NoraPolicy:
    return NoraPolicy.load(bundle, providers="cpu", threads=1, forced_tokens=forced_tokens)


def expected(
    policy: NoraPolicy, frame, instruction: str, unnorm_key: str | None = None
) -> tuple[str, object]:
    try:
        return "ok", policy.run_chunk(frame, instruction, unnorm_key)
    except NoraEdgeError as e:
        return "error", f"{type(e).__name__}: {e}"


@pytest.fixture(scope="session")
def serve_bundle(fused_trained_bundle: Path) -> Path:
    return fused_trained_bundle


@pytest.fixture(scope="session")
def reference(serve_bundle: Path):
    policy = load_policy(serve_bundle)
    yield policy
    policy.close()


@pytest.fixture(scope="session")
def pairs(make_rgb_image) -> list:
    from nora_edge.export.synthetic_task import instruction_list

    instructions = instruction_list()
    return [(make_rgb_image(seed=i), instructions[(5 * i) % len(instructions)]) for i in range(6)]


@pytest.fixture(scope="session")
def good_pair(reference, pairs):
    """The first pair the reference answers with a chunk (the trained model does on most)."""
    for frame, instruction in pairs:
        if expected(reference, frame, instruction)[0] == "ok":
            return frame, instruction
    pytest.fail("the trained fixture produced no well-formed chunk on any pair")


@pytest.fixture(scope="module")
def start_server(serve_bundle: Path):
    from nora_edge.serve import PolicyHandler
    from nora_edge.serve.server import ServerThread

    started = []

    def start(config=None, forced_tokens: str = "raise") -> ServerThread:
        policy = load_policy(serve_bundle, forced_tokens)
        thread = ServerThread(PolicyHandler(policy, config)).start()
        started.append((thread, policy))
        return thread

    yield start
    for thread, policy in started:
        thread.stop()
        policy.close()
