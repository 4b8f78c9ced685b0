"""``rosa-ds sweep report DIR``: every cell's ``summary.json`` beside its plan, as one table
(``results.csv``, ``results.json``) and plots (PNG): quality by trainable parameters per
method, step time and tokens/s by model size and world size, peak memory planned against
measured, and the log-log slope of each cost against model size.

The slope is the least-squares fit of ``log(cost) = a + k log(parameters)`` over the finished
cells of one method at one world size with at least two model sizes: ``k`` near 1 means cost
grows with the parameters, below 1 that fixed costs still dominate.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from rosa_ds.sweep.cells import figure, read_sweep

LOSS_KEYS = ("eval_loss", "eval_ppl")
COLUMNS = [
    "name", "method", "model", "world_size", "status", "model_params", "trainable_params",
    "steps", "loss_last", "eval_loss", "metric_name", "metric", "step_seconds",
    "tokens_per_second", "tflops_per_rank", "mfu", "peak_measured_gib", "peak_planned_gib",
    "measured_over_planned", "planned_step_seconds", "mask_seconds", "resample_seconds",
]  # fmt: skip


def _cell_row(cell: dict[str, Any], folder: Path | None = None) -> dict[str, Any]:
    plan = cell.get("plan") or {}
    row: dict[str, Any] = {
        "name": cell["name"],
        "method": cell.get("method"),
        "model": cell.get("model"),
        "world_size": cell.get("world_size"),
        "model_params": plan.get("model_params"),
        "trainable_params": plan.get("trainable_params"),
        "peak_planned_gib": plan.get("peak_gib"),
        "planned_step_seconds": plan.get("step_seconds"),
        **{f"axis:{k}": v for k, v in (cell.get("labels") or {}).items()},
    }
    if cell.get("skip"):
        return {**row, "status": f"skipped: {cell['skip']}"}
    path = Path(cell["output_dir"]) / "summary.json"
    if not path.is_file() and folder is not None:  # a folder moved since: its own runs/
        path = folder / "runs" / cell["name"] / "summary.json"
    try:
        s = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {**row, "status": "not finished"}
    tel = s.get("telemetry") or {}
    after = s.get("after") or {}
    metric = next((k for k in after if k not in LOSS_KEYS), None)
    measured = tel.get("peak_allocated_bytes") or tel.get("peak_rss_above_start_bytes")
    planned = tel.get("planned_peak_bytes")
    resample = s.get("resample_seconds") or []
    row.update(
        status="finished",
        trainable_params=s.get("trainable_elements", row["trainable_params"]),
        model_params=row["model_params"] or s.get("param_elements_total"),
        steps=s.get("steps"),
        loss_last=s.get("loss_last"),
        eval_loss=after.get("eval_loss"),
        metric_name=metric,
        metric=after.get(metric) if metric else None,
        step_seconds=tel.get("median_step_seconds"),
        tokens_per_second=tel.get("median_tokens_per_second"),
        tflops_per_rank=tel.get("median_tflops_per_rank"),
        mfu=tel.get("median_mfu"),
        peak_measured_gib=measured / 2**30 if measured else None,
        peak_planned_gib=planned / 2**30 if planned else row["peak_planned_gib"],
        measured_over_planned=tel.get("measured_over_planned"),
        mask_seconds=s.get("mask_seconds"),
        resample_seconds=statistics.median(resample) if resample else None,
    )
    return row


def collect(folder: Path) -> list[dict[str, Any]]:
    return [_cell_row(c, folder) for c in read_sweep(folder)["cells"]]


def loglog_slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(y) on log(x); None with fewer than two distinct x."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x and y and x > 0 and y > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def exponents(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{cost: {"<method>@<world size>": slope}} for step time, mask and resample time."""
    out: dict[str, dict[str, float]] = {}
    done = [r for r in rows if r["status"] == "finished"]
    for cost in ("step_seconds", "mask_seconds", "resample_seconds"):
        groups: dict[str, list[tuple[float, float]]] = {}
        for r in done:
            if r.get(cost):
                key = f"{r['method']}@{r['world_size']}"
                groups.setdefault(key, []).append((r["model_params"], r[cost]))
        fits = {k: loglog_slope(v) for k, v in groups.items()}
        kept = {k: round(v, 4) for k, v in fits.items() if v is not None}
        if kept:
            out[cost] = kept
    return out


def planner_error(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The planner's relative error on peak memory, per finished cell that has both."""
    errs = {
        r["name"]: r["measured_over_planned"] - 1
        for r in rows
        if r["status"] == "finished" and r.get("measured_over_planned")
    }
    return {"per_cell": errs, "max_abs": max((abs(e) for e in errs.values()), default=None)}


def write_table(rows: list[dict[str, Any]], out: Path) -> None:
    axes = sorted({k for r in rows for k in r if k.startswith("axis:")})
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS + axes, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _series(rows, x: str, y: str, by: str) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["status"] == "finished" and r.get(x) and r.get(y) is not None:
            series.setdefault(str(by(r)), []).append((r[x], r[y]))
    return {k: sorted(v) for k, v in series.items()}


def plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """The report's PNGs (matplotlib, the ``bench`` extra); none where there is nothing to
    draw."""
    try:
        import matplotlib
    except ImportError:
        print(
            "rosa-ds sweep report: no plots: they need matplotlib (pip install 'rosa-ds[bench]'); "
            "the table is in results.csv",
            file=sys.stderr,
        )
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "finished"]
    has_metric = any(r.get("metric") is not None for r in done)
    quality = "metric" if has_metric else "eval_loss"
    label = next((r["metric_name"] for r in done if r.get("metric_name")), "held-out loss")
    figures = [
        ("quality_by_trainable.png", "trainable_params", quality, lambda r: r["method"],
         "trainable parameters", label if has_metric else "held-out loss", True, False),
        ("step_time_by_size.png", "model_params", "step_seconds",
         lambda r: f"{r['method']}, {r['world_size']} rank(s)", "model parameters",
         "median step time (s)", True, True),
        ("tokens_per_second_by_world_size.png", "world_size", "tokens_per_second",
         lambda r: f"{r['method']}, {r['model']}", "ranks (GPUs)", "tokens/s (all ranks)",
         True, True),
        ("tokens_per_second_by_size.png", "model_params", "tokens_per_second",
         lambda r: f"{r['method']}, {r['world_size']} rank(s)", "model parameters",
         "tokens/s (all ranks)", True, True),
    ]  # fmt: skip
    written = []
    for name, x, y, by, xlabel, ylabel, logx, logy in figures:
        series = _series(done, x, y, by)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for key, pts in sorted(series.items()):
            # quality: one point per cell (different models); costs: a line along the sizes
            style = "none" if name.startswith("quality") else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls=style, label=key)
        ax.set_xscale("log" if logx else "linear")
        ax.set_yscale("log" if logy else "linear")
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    pairs = [(r["peak_planned_gib"], r["peak_measured_gib"], r["method"]) for r in done
             if r.get("peak_planned_gib") and r.get("peak_measured_gib")]  # fmt: skip
    if pairs:
        fig, ax = plt.subplots(figsize=(5.2, 5.2))
        for method in sorted({p[2] for p in pairs}):
            pts = [p for p in pairs if p[2] == method]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=method)
        lo = min(min(p[0], p[1]) for p in pairs)
        hi = max(max(p[0], p[1]) for p in pairs)
        ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", label="measured = planned")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(xlabel="planned peak (GiB per rank)", ylabel="measured peak (GiB per rank)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "memory_planned_vs_measured.png", dpi=110)
        plt.close(fig)
        written.append(out / "memory_planned_vs_measured.png")
    return written


def report(folder: Path, out: Path | None = None) -> dict[str, Any]:
    """Write the table, the plots and ``results.json``; returns what ``results.json`` holds
    (and the plots' paths)."""
    rows = collect(folder)
    out = out or folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    write_table(rows, out)
    result = {
        "cells": len(rows),
        "finished": sum(r["status"] == "finished" for r in rows),
        "exponents": exponents(rows),
        "planner_peak_error": planner_error(rows),
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    result["plots"] = [str(p) for p in plot(rows, out)]
    return result


def format_report(result: dict[str, Any]) -> str:
    lines = [f"{result['finished']} of {result['cells']} cell(s) finished"]
    head = f"{'cell':<52} {'params':>9} {'trainable':>10} {'step s':>8} {'tok/s':>9} {'quality':>8}"
    lines.append(head)
    for r in result["rows"]:
        if r["status"] != "finished":
            lines.append(f"{r['name']:<52} {r['status']}")
            continue
        q = r["metric"] if r.get("metric") is not None else r.get("eval_loss")
        lines.append(
            f"{r['name']:<52} {figure(r.get('model_params'), '8.2f', 1e6, 'M')} "
            f"{figure(r.get('trainable_params'), '9.3f', 1e6, 'M')} "
            f"{figure(r.get('step_seconds'), '8.3f')} {figure(r.get('tokens_per_second'), '9.0f')} "
            f"{figure(q, '8.4f')}"
        )
    for cost, fits in result["exponents"].items():
        pretty = ", ".join(f"{k} {v:.2f}" for k, v in sorted(fits.items()))
        lines.append(f"log-log slope of {cost} against model size: {pretty}")
    err = result["planner_peak_error"]["max_abs"]
    if err is not None:
        lines.append(f"planner peak memory: largest relative error {err:.1%}")
    for p in result.get("plots", []):
        lines.append(f"plot: {p}")
    return "\n".join(lines)
