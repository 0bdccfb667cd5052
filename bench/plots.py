"""PNG plots of a bench report (matplotlib, Agg backend: no display needed).

Data flow: report dict (``run.run_bench``) -> latency.png (e2e histogram + CDF, runtime vs reference, deadline),
stages.png (median time per chunk by stage), roofline.png (host roofline with each stage's measured
GFLOP/s at its arithmetic intensity) -> written via temp file + rename.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nora_edge.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    return path


def plot_latency(report: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, (ax_h, ax_c) = plt.subplots(1, 2, figsize=(11, 4))
    series = {"runtime (ORT)": report["samples"]["runtime"]["e2e"]}
    if report["samples"].get("reference_e2e"):
        series["reference (PyTorch)"] = report["samples"]["reference_e2e"]
    for label, xs in series.items():
        x = np.sort(np.asarray(xs))
        ax_h.hist(x, bins=30, alpha=0.6, label=label)
        ax_c.plot(x, np.arange(1, x.size + 1) / x.size, label=label)
    deadline = report["config"]["deadline_ms"]
    for ax in (ax_h, ax_c):
        ax.axvline(deadline, color="red", ls="--", label=f"deadline {deadline:.0f} ms")
        ax.set_xlabel("end-to-end ms per inference")
        ax.set_xscale("log")
    ax_h.set_ylabel("count")
    ax_c.set_ylabel("fraction of inferences")
    ax_c.legend(fontsize=8)
    fig.suptitle("Inference latency")
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_stages(report: dict, path: Path) -> Path:
    plt = _pyplot()
    st = report["runtime"]["stages"]
    names = [s for s in ("preprocess", "vision", "prefill", "decode", "detokenize") if s in st]
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = 0.0
    for s in names:
        ax.bar(["runtime"], [st[s]["median"]], bottom=bottom, label=s)
        bottom += st[s]["median"]
    if report.get("reference"):
        ax.bar(["reference"], [report["reference"]["e2e"]["median"]], color="grey", label="reference e2e")
    ax.set_ylabel("median ms per chunk")
    ax.set_yscale("log" if report.get("reference") else "linear")
    ax.legend(fontsize=8)
    ax.set_title("Where the time goes")
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_roofline(report: dict, path: Path) -> Path:
    plt = _pyplot()
    roof = report["roofline"]["host"]
    sources = {k: v for k, v, *_ in report["host"]["sources"]}
    peak = sources["peak_tflops.fp32"] * 1e3  # GFLOP/s
    bw = sources["memory.bandwidth_gbs"]
    xs = np.logspace(-2, 4, 200)
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.loglog(
        xs, np.minimum(peak, xs * bw), color="black", label=f"host roof: {peak:.0f} GFLOP/s, {bw:.0f} GB/s"
    )
    for stage, row in roof.items():
        if row.get("achieved_gflops"):
            ax.scatter(
                row["intensity_flop_per_byte"], row["achieved_gflops"], s=50, label=f"{stage} (measured)"
            )
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("GFLOP/s")
    ax.legend(fontsize=8)
    ax.set_title("Roofline: bundle stages on this host")
    out = _save(fig, path)
    plt.close(fig)
    return out


def write_plots(report: dict, out: Path) -> dict[str, Path]:
    """All plots of ``report`` into ``out``; returns {file name: path}."""
    files = {
        "latency.png": plot_latency(report, out / "latency.png"),
        "stages.png": plot_stages(report, out / "stages.png"),
    }
    if report.get("roofline"):
        files["roofline.png"] = plot_roofline(report, out / "roofline.png")
    return files
