"""``make bench-multitoken``: the multi-token acceptance measurement on the MetaWorld policy, end to end.

Data flow: the committed MetaWorld policy (policies/metaworld-nora-long) --export_bundle(multi_token=True,
calibration: 8 expert frames per task, from which its drafts.json is built)--> fp32 bundle --quantize_bundle
(calibration and held-out expert frames, sim.table.sample_sets)--> one bundle per recipe (default int4)
--sim.closed_loop_inputs (each bundle's OWN closed loop: the frames it met, in call order)--> inputs per bundle --bench/multitoken_bench.py (plain vs multi-token side by side, every setting)-->
``<out>/report.md`` + JSON; ``--record FILE`` writes the first recipe's acceptance record (the committed one is
``bench/baselines/multitoken_acceptance.json``).

Run: ``make bench-multitoken`` (``RECORD=bench/baselines/multitoken_acceptance.json`` to re-record); ~15-25 min on
2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from nora_edge.bench.multitoken_bench import DRAFT_FRAMES, SETTINGS, bench_model, table_markdown
from nora_edge.errors import NoraEdgeError

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "policies" / "metaworld-nora-long"


def build(out: Path, recipes: list[str]) -> dict[str, Path]:
    """fp32 --multi-token bundle + one quantized bundle per recipe (each gated by its fidelity thresholds)."""
    from nora_edge.export.pipeline import export_bundle
    from nora_edge.export.quantize import CalibrationSample
    from nora_edge.sim.frames import policy_view_samples
    from nora_edge.sim.metaworld_env import TASKS
    from nora_edge.sim.table import build_one, export_args, sample_sets

    gripper, mask = export_args(POLICY)
    fp32 = out / "bundles" / "fp32"
    calib, held = sample_sets(list(TASKS), 2)  # the quantizer's
    if not (fp32 / "manifest.json").is_file():
        # drafts.json: the policy's own chunks on expert frames (a seed of their own)
        frames = policy_view_samples(list(TASKS), DRAFT_FRAMES, seed=2)
        export_bundle(POLICY, fp32, validation_instructions=list(TASKS.values()), gripper=gripper, mask=mask,
                      overwrite=True, multi_token=True, progress=True,
                      calibration=[CalibrationSample(f, t) for f, t in frames])  # fmt: skip
    bundles = {"fp32": fp32}
    for r in recipes:
        got = build_one(fp32, out / "bundles" / r, r, calib, held, accept_degraded=False)
        if got["path"] is None:
            raise got["error"]
        bundles[r] = got["path"]
    return bundles


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/multitoken"))
    ap.add_argument("--recipes", nargs="*", default=["int4"])
    ap.add_argument("--calls", type=int, default=600, help="closed-loop policy calls recorded per bundle")
    ap.add_argument(
        "--record", type=Path, default=None, help="write the first recipe's acceptance record here"
    )
    a = ap.parse_args(argv)
    from nora_edge.bench.multitoken_acceptance import record_from
    from nora_edge.sim.closed_loop_inputs import main as record_inputs

    try:
        bundles = build(a.out, a.recipes)
        results = []
        for name, path in bundles.items():
            inputs = a.out / f"closed_loop_{name}.npz"
            if not inputs.is_file():
                print(f"[multitoken] closed loop of the {name} bundle ({a.calls} calls)")
                if record_inputs([str(path), "--out", str(inputs), "--calls", str(a.calls)]):
                    raise SystemExit(f"closed-loop recording of {path} failed")
            print(f"[multitoken] plain vs multi-token: {name}")
            res = bench_model(name, a.out, 10**6, dict(SETTINGS), inputs, path)  # all three settings
            results += res
            if a.record is not None and name == (a.recipes[0] if a.recipes else "fp32"):
                rec = record_from(res[0], inputs, path, SETTINGS["default"].max_draft,
                                  datetime.date.today().isoformat())  # fmt: skip
                a.record.write_text(json.dumps(rec, indent=1) + "\n")
                print(f"[multitoken] acceptance record: {a.record} ({rec['acceptance']:.3f})")
    except NoraEdgeError as e:
        print(f"error: {e}")
        return 2
    (a.out / "multitoken.json").write_text(json.dumps(results, indent=1))
    text = table_markdown(results)
    (a.out / "report.md").write_text(
        "# Multi-token decoding on the MetaWorld policy's closed loop\n\n" + text + "\n"
    )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
