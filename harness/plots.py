"""PNG plots of a run's records (matplotlib, Agg; no pyplot, so no global figure state and no display needed).

- `pareto_plot`: peak device memory (the record's peak counter, labelled) against denoise latency, one point per
  cell that ran its denoise loop, the Pareto front (lowest memory for its latency) marked, the card's cap drawn as
  a horizontal line where the card has one, and the cells that did not get through denoise listed with their fate.
- `trace_plot`: memory over time of each cell from record["trace"] ([t_s, phase, nvml_proc_bytes|None,
  rss_bytes]): NVML per-process on the left axis (with the cap), host RSS on the right axis, phases shaded and
  labelled.

Both take the records of one scenario on one card and write one PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.results import summarize_peaks

GIB, MIB = 2**30, 2**20
PHASE_COLORS = {
    "setup": "#dddddd", "load": "#f4c27a", "encode": "#9fd3a6", "denoise": "#9ec5e8", "decode": "#d8a8e0",
}
_COUNTER_LABELS = {"alloc_peak_reserved_bytes": "alloc reserved", "ledger_peak_bytes": "ledger"}
_PNG_META = {"Software": None}  # no matplotlib version in the file: the same records give the same bytes


def short(cell_id: str) -> str:
    return cell_id.rsplit("/", 1)[-1]


def _unit(max_bytes: float) -> tuple[float, str]:
    return (GIB, "GiB") if max_bytes >= 4 * GIB else (MIB, "MiB")


def _fate(record: dict[str, Any]) -> str:
    return record["status"] + (f" in {record['failed_phase']}" if record.get("failed_phase") else "")


def plot_points(records: list[dict[str, Any]]) -> tuple[list[tuple[str, float, float]], list[dict[str, Any]]]:
    """(label, denoise ms, peak bytes) of the cells that finished their denoise loop; the others."""
    points, others = [], []
    for r in records:
        if r.get("same_as"):
            continue  # a copy of another cell's record: same point
        ms = ((r.get("phases") or {}).get("denoise") or {}).get("time_ms")
        peak = summarize_peaks(r)["peak"]
        finished_denoise = r["status"] == "ok" or r.get("failed_phase") == "decode"
        if finished_denoise and ms is not None and peak is not None:
            points.append((short(r["cell_id"]), float(ms), float(peak)))
        else:
            others.append(r)
    return points, others


def pareto_front(points: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """Points no other point beats on both latency and memory (ties kept), sorted by latency."""
    front = []
    for p in points:
        dominated = any(
            q[1] <= p[1] and q[2] <= p[2] and (q[1] < p[1] or q[2] < p[2]) for q in points if q is not p
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: (p[1], p[2]))


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110, metadata=_PNG_META)
    return path


def pareto_plot(records: list[dict[str, Any]], path: Path, title: str) -> Path:
    points, others = plot_points(records)
    counter = summarize_peaks(records[0])["counter"] if records else "alloc_peak_reserved_bytes"
    cap = next((r["card"].get("cap_bytes") for r in records if r.get("card")), None)
    scale, unit = _unit(max([p[2] for p in points] + [cap or 0, 1]))
    fig = Figure(figsize=(8, 5.2))
    ax = fig.add_subplot()
    if points:
        front = pareto_front(points)
        ax.scatter([p[1] for p in points], [p[2] / scale for p in points], color="#4a7ab5", zorder=3,
                   label="cell")
        ax.plot([p[1] for p in front], [p[2] / scale for p in front], color="#c0392b", marker="o",
                markerfacecolor="none", markersize=12, linestyle="--", zorder=4, label="Pareto front")
        for label, ms, peak in points:
            ax.annotate(label, (ms, peak / scale), textcoords="offset points", xytext=(6, 4), fontsize=7)
    else:
        ax.text(0.5, 0.5, "no cell finished its denoise loop", transform=ax.transAxes, ha="center", va="center")
    if cap:
        ax.axhline(cap / scale, color="#7f0000", linestyle=":", linewidth=1.5,
                   label=f"card cap {cap / scale:,.2f} {unit}")
    if others:
        lines = [f"{short(r['cell_id'])}: {_fate(r)}" for r in others]
        ax.text(0.01, 0.01, "did not finish denoise:\n" + "\n".join(lines), transform=ax.transAxes,
                fontsize=7, va="bottom", ha="left", bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "#999"})
    ax.set_xlabel("denoise latency (ms, all steps)")
    ax.set_ylabel(f"peak device memory ({unit}, {_COUNTER_LABELS.get(counter, counter)})")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0, top=max([p[2] / scale for p in points] + [(cap or 0) / scale, 1e-9]) * 1.12)
    if points:
        ax.set_xlim(left=0, right=max(p[1] for p in points) * 1.35)  # room for the labels right of the points
    ax.grid(True, alpha=0.3)
    if points or cap:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _phase_spans(trace: list[list[Any]]) -> list[tuple[str, float, float]]:
    spans: list[tuple[str, float, float]] = []
    for t, phase, *_ in trace:
        if spans and spans[-1][0] == phase:
            spans[-1] = (phase, spans[-1][1], t)
        else:
            if spans:
                spans[-1] = (spans[-1][0], spans[-1][1], t)
            spans.append((phase, t, t))
    return spans


def trace_plot(records: list[dict[str, Any]], path: Path, title: str) -> Path:
    cells = [r for r in records if not r.get("same_as")]
    fig = Figure(figsize=(9, max(2.6, 2.3 * len(cells) + 0.6)))
    if not cells:
        fig.text(0.5, 0.5, "no cells", ha="center")
        return _save(fig, path)
    axes = fig.subplots(len(cells), 1, squeeze=False)[:, 0]
    for ax, r in zip(axes, cells, strict=True):
        trace = [row for row in (r.get("trace") or []) if len(row) >= 4]
        cap = (r.get("card") or {}).get("cap_bytes")
        ax.set_title(f"{short(r['cell_id'])}: {_fate(r)}", fontsize=9, loc="left")
        if not trace:
            ax.text(0.5, 0.5, "no trace in the record", transform=ax.transAxes, ha="center", va="center")
            continue
        t = [row[0] for row in trace]
        nvml = [row[2] for row in trace]
        rss = [row[3] for row in trace]
        has_nvml = any(v is not None for v in nvml)
        top = max([v for v in nvml if v is not None] + [cap or 0, 1]) if has_nvml else max([*rss, 1])
        scale, unit = _unit(top)
        for phase, t0, t1 in _phase_spans(trace):
            ax.axvspan(t0, t1, color=PHASE_COLORS.get(phase, "#eeeeee"), alpha=0.45, linewidth=0)
            ax.text((t0 + t1) / 2, 0.97, phase, transform=ax.get_xaxis_transform(), ha="center", va="top",
                    fontsize=7, clip_on=True)
        if has_nvml:
            ax.plot(t, [float("nan") if v is None else v / scale for v in nvml], color="#1f4e79", linewidth=1.4,
                    label="NVML per-process")
            ax.set_ylabel(f"device {unit}\n(NVML per-process)", fontsize=8)
            if cap:
                ax.axhline(cap / scale, color="#7f0000", linestyle=":", linewidth=1.2, label="card cap")
            host = ax.twinx()
            host.plot(t, [v / GIB for v in rss], color="#888888", linewidth=1, linestyle="--", label="host RSS")
            host.set_ylabel("host RSS GiB", fontsize=8)
            host.set_ylim(bottom=0)
            handles = ax.get_legend_handles_labels()[0] + host.get_legend_handles_labels()[0]
            ax.legend(handles=handles, loc="center left", fontsize=7)
        else:
            ax.plot(t, [v / scale for v in rss], color="#888888", linewidth=1.2, label="host RSS")
            ax.set_ylabel(f"host RSS {unit}\n(no NVML: CPU profile)", fontsize=8)
            ax.legend(loc="center left", fontsize=7)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.25)
    axes[-1].set_xlabel("seconds since the child started")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
