"""The runtime runs a full step with torch, transformers and the export stage unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = ("torch", "transformers", "nora_edge.export", "PIL")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"blocked import: {name}")
            return None

    sys.meta_path.insert(0, Block())

    import numpy as np
    from nora_edge.policy import NoraPolicy

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    for constrained in (True, False):
        pol = NoraPolicy.load(sys.argv[1], providers="auto", threads=1, constrained=constrained)
        try:
            pol.predict_action_chunk(image, "pick up the cup")
        except Exception as e:  # a random model: a malformed or forced-token chunk is a typed error
            assert type(e).__name__ in ("DetokenizationError", "ForcedTokenError"), repr(e)
        assert pol.last_ids is not None and pol.last_ids.size > 0
    pol = NoraPolicy.load(sys.argv[1], threads=1, forced_tokens="flag")
    action = pol.select_action(image, "pick up the cup")
    assert action.shape == (7,)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "PIL")
                    or m.startswith("nora_edge.export"))
    assert not loaded, loaded
    print("TORCH_FREE_OK", action.round(4).tolist())
    """
)


def test_full_step_without_torch(rt_bundle):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(rt_bundle)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TORCH_FREE_OK" in proc.stdout
