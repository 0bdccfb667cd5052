"""NORA-3B vs OpenVLA-7B: analytic predictions on every device profile, and a host measurement extrapolated from
one real-size layer of each kind (``make bench-real``; a few GB of RAM, a couple of minutes; never CI).

Data flow: ``models.nora_3b()`` / ``models.openvla_7b()`` -> ``roofline.predict_inference`` on the Orin profiles
and on ``host`` (microbenchmarked) -> prediction rows. Host measurement: ``layers.*`` builds one decoder layer
(prefill-sized and decode-sized), one ViT block per attention kind, the extra linears and the output head at real
dims -> timed with ORT -> multiplied by the layer counts -> per-stage "measured (extrapolated from one layer)"
next to the host prediction. Output: ``baseline7b.json`` + ``baseline7b.md`` (atomic writes).
:func:`bench_section` is the OpenVLA-7B part every ``nora-edge bench`` report carries (one row per profile; the
host row adds a ``baseline7b.json`` measurement when one is passed).
"""

from __future__ import annotations

import gc
from pathlib import Path

from nora_edge.atomic import read_json_object
from nora_edge.bench import layers
from nora_edge.bench.calibrate import calibrate_efficiency
from nora_edge.bench.microbench import HostMeasurement, host_profile, measure_host
from nora_edge.bench.models import Dense, VlaSpec, nora_3b, openvla_7b
from nora_edge.bench.ortgraph import time_session
from nora_edge.bench.roofline import (
    STAGES,
    PrecisionPlan,
    kv_cache_bytes,
    memory_estimate_bytes,
    predict_inference,
    weight_footprint_bytes,
)
from nora_edge.errors import InputError
from nora_edge.profiles import DeviceProfile, list_profiles, load_profile

DEVICE_PLANS = ("fp16", "int8", "int4")
HOST_PLANS = ("fp32", "int8", "int4")
CONTROL_HZ = 25
EXTRAPOLATED = "extrapolated from one layer"
OPENVLA = "OpenVLA-7B"


def specs() -> list[VlaSpec]:
    """The like-for-like pair: NORA-Long (horizon 5), NORA (horizon 1), OpenVLA-7B."""
    return [nora_3b(5), nora_3b(1), openvla_7b()]


def device_profiles() -> list[DeviceProfile]:
    return [load_profile(name) for name in list_profiles() if name != "host"]


def prediction_rows(
    models: list[VlaSpec], profiles: list[DeviceProfile], plans: tuple[str, ...]
) -> list[dict]:
    """One row per (profile, model, plan): per-stage ms, e2e, actions/s, memory, 25 Hz verdict."""
    rows = []
    for prof in profiles:
        for spec in models:
            for plan_name in plans:
                plan = PrecisionPlan.preset(plan_name, host=prof.measured)
                pred = predict_inference(spec, plan, prof)
                mem = memory_estimate_bytes(spec, plan)
                budget_ms = 1e3 * spec.actions_per_inference / CONTROL_HZ
                rows.append(
                    {
                        **pred,
                        "memory_gb": mem / 1e9,
                        "fits": mem / 1e9 < prof.memory["capacity_gb"].value,
                        "budget_ms_25hz": budget_ms,
                        "meets_25hz": pred["e2e_ms"] <= budget_ms,
                    }
                )
    return rows


def headline(rows: list[dict], profile: str = "orin-agx-64gb") -> dict:
    """NORA-Long-3B int4 vs OpenVLA-7B int4 on ``profile``: actions/s, speedup, memory ratio."""
    pick = {(r["model"], r["plan"]): r for r in rows if r["profile"] == profile}
    nora, ovla = pick[("NORA-Long-3B", "int4")], pick[("OpenVLA-7B", "int4")]
    return {
        "profile": profile,
        "nora_long_int4_ms": nora["e2e_ms"],
        "nora_long_int4_actions_per_s": nora["actions_per_s"],
        "nora_long_meets_25hz": nora["meets_25hz"],
        "openvla_int4_ms": ovla["e2e_ms"],
        "openvla_int4_actions_per_s": ovla["actions_per_s"],
        "actions_per_s_ratio": nora["actions_per_s"] / ovla["actions_per_s"],
        "memory_ratio_openvla_over_nora": ovla["memory_gb"] / nora["memory_gb"],
        "nora_long_memory_gb": nora["memory_gb"],
        "openvla_memory_gb": ovla["memory_gb"],
    }


def _time(builder_and_feeds: tuple, threads: int | None, reps: int) -> float:
    g, feeds = builder_and_feeds
    sess = g.session(threads)
    ms = 1e3 * min(time_session(sess, feeds, reps))  # fastest run: robust to other processes preempting us
    del sess, g
    gc.collect()
    return ms


def measure_extrapolated(spec: VlaSpec, precision: str, threads: int | None = None, reps: int = 3) -> dict:
    """Host per-stage ms of ``spec`` from one timed layer of each kind (fastest of ``reps``), multiplied out.

    Vision runs fp32 (as the host bundles keep it); the decoder layers and head run in ``precision``.

    Returns:
        {"stages": {stage: ms per invocation}, "layers": {kind: ms}, "e2e_ms", "label": EXTRAPOLATED}.
    """
    lm, timed = spec.lm, {}
    vision = 0.0
    for tower in spec.vision:
        kinds = sorted(set(tower.window or (None,)), key=lambda w: w or 0)
        for w in kinds:
            layer = (tower.window or (None,)).index(w)
            count = (
                (tower.window or (None,) * tower.layers_run).count(w) if tower.window else tower.layers_run
            )
            ms = _time(layers.vit_layer(tower, layer, "fp32"), threads, reps)
            timed[f"{tower.name}.block(window={w or 'full'})"] = ms
            vision += count * ms
    extras = (
        tuple(
            Dense(f"{t.name}.patch_embed", t.patch_dim, t.hidden, t.tokens, t.patch_bias) for t in spec.vision
        )
        + spec.vision_linears
    )
    timed["vision extras (patch embeds, merger/projector)"] = ms = _time(
        layers.dense_stack(extras, "fp32"), threads, reps
    )
    vision += ms
    timed["decoder layer (prefill)"] = prefill_layer = _time(
        layers.decoder_layer(lm, spec.prefill_tokens, spec.cached_prefix_tokens, precision), threads, reps
    )
    mean_past = spec.prompt_tokens + spec.decode_steps // 2
    timed["decoder layer (decode)"] = decode_layer = _time(
        layers.decoder_layer(lm, 1, mean_past, precision), threads, max(reps, 5)
    )
    timed["output head"] = head = _time(layers.output_head(lm, precision), threads, max(reps, 5))
    stages = {
        "vision": vision,
        "prefill": lm.layers * prefill_layer,
        "decode_token": lm.layers * decode_layer,
        "action_head": head,
    }
    e2e = (
        stages["vision"]
        + stages["prefill"]
        + spec.decode_steps * stages["decode_token"]
        + spec.generated_tokens * stages["action_head"]
    )
    return {
        "model": spec.name,
        "precision": precision,
        "stages": stages,
        "layers": timed,
        "e2e_ms": e2e,
        "label": EXTRAPOLATED,
    }


def host_comparison(spec: VlaSpec, precision: str, measurement: HostMeasurement, reps: int = 3) -> dict:
    """Host prediction vs one-layer extrapolation, per stage, with the relative error."""
    prof = host_profile(measurement)
    pred = predict_inference(spec, PrecisionPlan.preset(precision, host=True), prof)
    meas = measure_extrapolated(spec, precision, measurement.threads or None, reps)
    err = {s: pred["stages"][s] / meas["stages"][s] - 1 for s in STAGES}
    return {"model": spec.name, "precision": precision, "predicted": pred, "measured": meas, "error": err}


def read_host_measurement(path: str | Path) -> dict[str, dict]:
    """OpenVLA-7B host measurements from a ``baseline7b.json`` (``make bench-real``): {precision: row}.

    Raises:
        InputError: the file is missing, not JSON, or its ``host_comparison`` rows lack the fields used here.
    """
    path = Path(path)
    data = read_json_object(path, InputError)
    rows = data.get("host_comparison")
    if not isinstance(rows, list):
        raise InputError(
            f"{path}: field 'host_comparison' must be a list (written by nora_edge.bench.baseline7b)"
        )
    out = {}
    for i, row in enumerate(rows):
        try:
            if row["model"] != OPENVLA:
                continue
            out[str(row["precision"])] = {
                "e2e_ms": float(row["measured"]["e2e_ms"]),
                "predicted_e2e_ms": float(row["predicted"]["e2e_ms"]),
                "label": str(row["measured"].get("label", EXTRAPOLATED)),
            }
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(
                f"{path}: host_comparison[{i}] lacks model/precision/measured.e2e_ms ({e!r})"
            ) from e
    return out


def bench_section(
    host: DeviceProfile,
    measured: str | Path | None = None,
    bundle_actions_per_s: dict[str, float | None] | None = None,
) -> dict:
    """The 7B baseline section of a ``nora-edge bench`` report: OpenVLA-7B on every profile, one row each.

    Args:
        host: this machine's measured profile (the bench's own microbenchmark).
        measured: a ``baseline7b.json`` whose OpenVLA-7B host rows (one layer of each kind timed, multiplied
            out) go into the host row; None: predictions only (the measurement takes minutes and GBs).
        bundle_actions_per_s: the benched bundle's actions/s per profile (host measured, devices predicted),
            shown next to OpenVLA-7B.

    Returns:
        {"model", "rows": [{"profile", "measured_profile", "plans": {plan: {e2e_ms, actions_per_s, memory_gb,
        fits, meets_25hz}}, "host_measured": {precision: {...}} or None, "bundle_actions_per_s",
        "bundle_over_openvla_int4"}], "measured_from", "note"}. Rows follow ``list_profiles()`` order.
    """
    spec = openvla_7b()
    host_rows = read_host_measurement(measured) if measured is not None else None
    speeds = bundle_actions_per_s or {}
    rows = []
    for name in list_profiles():
        prof = host if name == "host" else load_profile(name)
        plans = HOST_PLANS if prof.measured else DEVICE_PLANS
        preds = prediction_rows([spec], [prof], plans)
        own = speeds.get(name)
        int4 = next(p for p in preds if p["plan"] == "int4")
        rows.append(
            {
                "profile": name,
                "measured_profile": bool(prof.measured),
                "plans": {
                    p["plan"]: {
                        k: p[k] for k in ("e2e_ms", "actions_per_s", "memory_gb", "fits", "meets_25hz")
                    }
                    for p in preds
                },
                "host_measured": host_rows if name == "host" else None,
                "bundle_actions_per_s": own,
                "bundle_over_openvla_int4": own / int4["actions_per_s"] if own else None,
            }
        )
    return {
        "model": OPENVLA,
        "rows": rows,
        "measured_from": str(measured) if measured is not None else None,
        "note": "roofline predictions (nora_edge.bench.baseline7b) of OpenVLA-7B, one action per inference; "
        "the host row uses this run's measured peaks",
    }


def run_baseline(
    out: Path | None = None,
    *,
    host_plans: tuple[str, ...] = HOST_PLANS,
    measure: bool = True,
    reps: int = 3,
    threads: int | None = 1,
) -> dict:
    """The whole 7B baseline: predictions on every profile (+ host), host one-layer measurements, headline.

    Args:
        out: directory for baseline7b.json / baseline7b.md (None: return only).
        host_plans: precisions measured on the host.
        measure: False skips the host layer timings (predictions only, a second).
        reps: timed runs per layer (the fastest counts).
        threads: ORT intra-op threads for the microbenchmark and the layers (1: one core, the least disturbed
            by other processes; None: ORT's default).
    """
    from nora_edge.bench.report import baseline_markdown, write_json_atomic, write_text_atomic

    measurement = measure_host(threads)
    hostp = host_profile(measurement)
    models = specs()
    rows = prediction_rows(models, device_profiles(), DEVICE_PLANS)
    rows += prediction_rows(models, [hostp], host_plans)
    result = {
        "headline": headline(rows),
        "predictions": rows,
        "host": measurement.to_json(),
        "profiles": {p.name: p.sources() for p in [*device_profiles(), hostp]},
        "assumptions": sorted({a for s in models for a in s.assumptions}),
        "footprint_gb": {
            f"{s.name} {p}": {
                k: v / 1e9 for k, v in weight_footprint_bytes(s, PrecisionPlan.preset(p)).items()
            }
            | {"kv_cache": kv_cache_bytes(s, PrecisionPlan.preset(p)) / 1e9}
            for s in models
            for p in ("fp16", "int4")
        },
        "calibration": calibrate_efficiency(),
        "host_comparison": [],
    }
    if measure:
        for spec in (nora_3b(5), openvla_7b()):
            for p in host_plans:
                result["host_comparison"].append(host_comparison(spec, p, measurement, reps))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "baseline7b.json", result)
        write_text_atomic(out / "baseline7b.md", baseline_markdown(result))
    return result


if __name__ == "__main__":  # pragma: no cover - `make bench-real`
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("out/baseline7b")
    res = run_baseline(target)
    from nora_edge.bench.report import baseline_markdown

    print(baseline_markdown(res))
    print(f"written: {target / 'baseline7b.md'}")
