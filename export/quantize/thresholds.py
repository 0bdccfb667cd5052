"""Fidelity thresholds of a quantization recipe, and the gate that checks a fidelity report against them.

Data flow: ``BundleRecipe.fidelity`` (:class:`FidelityThresholds`) + the ``aggregates`` of the fidelity report
(``nora_edge.export.fidelity``: the quantized bundle vs its fp32 source on held-out samples) ->
:func:`check_fidelity` -> one :class:`MetricCheck` per metric -> :func:`validation_section` (the quantized
bundle's manifest ``validation``: its own numbers, never the fp32 export's) -> any failed metric raises
:class:`FidelityGateError` in ``quantize_bundle`` unless the caller accepts the degradation explicitly.

Every gated metric belongs to one component, so a failure says where to look:
  vision      image_embeds_cosine_min: the quantized vision graph's output vs fp32's, same frame.
  decoder     decoder_logits_cosine_mean, decoder_token_agreement_mean: the quantized decoder (+ head and
              embedding table) fed the fp32 image embeddings, so the vision graph's error is not in them.
  end_to_end  action_err_frac_mean, gripper_flip_rate and the per-chunk malformed / repaired /
              forced-continue rate increases over the fp32 bundle: the whole quantized bundle.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from nora_edge.bundle import QUANTIZED_VALIDATION as VALIDATION_KIND
from nora_edge.errors import ExportError, InputError


@dataclass(frozen=True)
class GateMetric:
    """How one fidelity aggregate is gated: its component, the direction and what it means."""

    component: str
    op: str  # ">=": the value must be at least the threshold; "<=": at most
    what: str


GATE_METRICS: dict[str, GateMetric] = {
    "image_embeds_cosine_min": GateMetric(
        "vision", ">=", "lowest cosine over samples of the (merged, H) image embeddings vs fp32"
    ),
    "decoder_logits_cosine_mean": GateMetric(
        "decoder", ">=", "mean cosine of the chosen-from logits vs fp32, decoder fed fp32 image embeddings"
    ),
    "decoder_token_agreement_mean": GateMetric(
        "decoder", ">=", "mean fraction of generated ids equal to fp32's, decoder fed fp32 image embeddings"
    ),
    "action_err_frac_mean": GateMetric(
        "end_to_end", "<=", "mean |action - fp32 action| as a fraction of each DoF's q01..q99 range"
    ),
    "gripper_flip_rate": GateMetric(
        "end_to_end", "<=", "fraction of compared time steps whose gripper sign differs from fp32's"
    ),
    "malformed_rate_increase": GateMetric(
        "end_to_end", "<=", "fraction of chunks that do not decode, minus fp32's"
    ),
    "repaired_rate_increase": GateMetric(
        "end_to_end", "<=", "fraction of chunks with a repaired token, minus fp32's"
    ),
    "forced_continue_rate_increase": GateMetric(
        "end_to_end", "<=", "fraction of chunks with a forced-continue token, minus fp32's"
    ),
}

# measured, reported in the validation section, not gated (robot units and positions are robot/model specific)
REPORTED = (
    "token_agreement_mean",
    "first_divergence_min",
    "logits_cosine_mean",
    "action_l2_mean",
    "action_max_per_dof",
    "action_err_frac_max",
    "gripper_flips_total",
    "malformed_rate_test",
    "repaired_rate_test",
    "forced_continue_rate_test",
)


@dataclass(frozen=True)
class FidelityThresholds:
    """Limits a quantized bundle must meet against its fp32 source (see :data:`GATE_METRICS`).

    Every field is a number in [0, 1], or None to report the metric without gating it. The defaults are the
    loosest built-in ones (int4 class); ``recipes`` sets tighter ones for fp32, fp16 and int8, and documents
    the measurements every default rests on. They are calibrated for 8 held-out samples: the discrete metrics
    (token agreement, gripper flips, rates) move in steps of 1/8 chunk there; with more samples, tighten them.

    Attributes:
        image_embeds_cosine_min: vision; at least.
        decoder_logits_cosine_mean: decoder; at least.
        decoder_token_agreement_mean: decoder; at least.
        action_err_frac_mean: end to end; at most (0.05 = 5% of the q01..q99 range on average).
        gripper_flip_rate: end to end; at most.
        malformed_rate_increase: end to end; at most.
        repaired_rate_increase: end to end; at most.
        forced_continue_rate_increase: end to end; at most.
    """

    image_embeds_cosine_min: float | None = 0.99
    decoder_logits_cosine_mean: float | None = 0.99
    decoder_token_agreement_mean: float | None = 0.6
    action_err_frac_mean: float | None = 0.1
    gripper_flip_rate: float | None = 0.25
    malformed_rate_increase: float | None = 0.0
    repaired_rate_increase: float | None = 0.25
    forced_continue_rate_increase: float | None = 0.25

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or not math.isfinite(v)
                or not 0 <= v <= 1
            ):
                m = GATE_METRICS[f.name]
                raise InputError(
                    f"FidelityThresholds.{f.name} = {v!r}: must be a number in [0, 1], or None to report the "
                    f"{m.component} metric without gating it ({m.what})"
                )

    def describe(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MetricCheck:
    """One metric against its threshold (``threshold`` None: reported, not gated; ``passed`` then None)."""

    component: str
    metric: str
    value: float | None
    threshold: float | None
    op: str
    passed: bool | None

    @property
    def name(self) -> str:
        return f"{self.component}.{self.metric}"

    def text(self) -> str:
        value = "not measured" if self.value is None else f"{self.value:.6g}"
        return f"{self.component} metric {self.metric} = {value} (must be {self.op} {self.threshold:g})"

    def to_json(self) -> dict:
        return asdict(self)


def check_fidelity(thresholds: FidelityThresholds, aggregates: dict) -> list[MetricCheck]:
    """Every :data:`GATE_METRICS` entry checked against ``aggregates`` (a value that was not measured fails)."""
    out = []
    for name, m in GATE_METRICS.items():
        value, limit = aggregates.get(name), getattr(thresholds, name)
        if limit is None:
            passed = None
        elif value is None:
            passed = False
        else:
            passed = bool(value >= limit) if m.op == ">=" else bool(value <= limit)
        out.append(MetricCheck(m.component, name, value, limit, m.op, passed))
    return out


def validation_section(
    checks: list[MetricCheck] | None,
    aggregates: dict | None,
    *,
    recipe: str,
    source: dict,
    accepted: bool,
    report: str | None,
) -> dict:
    """The quantized bundle's manifest ``validation`` section.

    Args:
        checks: :func:`check_fidelity` output (None: nothing was measured).
        aggregates: the fidelity report's aggregates (None: nothing was measured).
        recipe: recipe name.
        source: the fp32 bundle's identity, {"bundle": name, "manifest_sha256": hex, "precision": "fp32"}.
        accepted: the caller passed ``accept_degraded``.
        report: the report file inside the bundle (None: none written).
    """
    if checks is None or aggregates is None:
        return {
            "kind": VALIDATION_KIND,
            "status": "not measured (accepted)",
            "passed": False,
            "accepted_despite_failure": accepted,
            "failed_metrics": [],
            "recipe": recipe,
            "reference": source,
            "samples": 0,
            "metrics": [],
            "report": None,
        }
    failed = [c.name for c in checks if c.passed is False]
    status = "passed" if not failed else ("failed (accepted)" if accepted else "failed")
    return {
        "kind": VALIDATION_KIND,
        "status": status,
        "passed": not failed,
        "accepted_despite_failure": bool(failed) and accepted,
        "failed_metrics": failed,
        "recipe": recipe,
        "reference": source,
        "samples": aggregates["n"],
        "samples_action_compared": aggregates["n_action_compared"],
        "metrics": [c.to_json() for c in checks],
        "reported": {k: aggregates.get(k) for k in REPORTED},
        "report": report,
    }


class FidelityGateError(ExportError):
    """A quantized bundle missed its recipe's fidelity thresholds; nothing was written at ``out``.

    Attributes:
        failures: the failed :class:`MetricCheck` list (component and metric named in each).
        validation: the validation section the bundle would have carried.
        report: the fidelity report dict (aggregates and raw records).
    """

    def __init__(self, message: str, *, failures: list[MetricCheck], validation: dict, report: dict) -> None:
        super().__init__(message)
        self.failures = failures
        self.validation = validation
        self.report = report


def gate_message(out: str, recipe: str, source: str, n: int, failures: list[MetricCheck]) -> str:
    """The FidelityGateError text: every failed metric with its component, value and threshold."""
    items = "; ".join(c.text() for c in failures)
    return (
        f"quantized bundle {out} (recipe '{recipe}') fails {len(failures)} fidelity threshold(s) vs fp32 bundle "
        f"'{source}' on {n} held-out samples: {items}. Nothing was written at {out}; pass "
        "accept_degraded=True (CLI: --accept-degraded) to write it anyway, recorded in its manifest"
    )
