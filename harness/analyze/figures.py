"""More PNG figures of one scenario on one card, as bytes (the HTML report inlines them):

- `phase_memory_png`: device memory per phase as stacked bars per cell: allocator allocated, reserved above it
  (the allocator's cache), and the CUDA context and other non-allocator memory (NVML per-process minus
  reserved); the card's cap as a line. The CPU profile has one counter, the harness ledger.
- `plan_png`: planned against measured allocator reserved peak per phase (the plan the runner stored in each
  record: `record.plan`), points on the diagonal when the planner is right; one colour per backend
  (`plots.backend_style`), one marker per phase. None where no record carries a plan.
- `png_of`: an existing `harness.analyze.plots` figure (pareto, trace) as bytes.

Every figure is capped at `plots.MAX_HEIGHT_IN` (a screen's height).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.analyze.plots import _PNG_META, MAX_HEIGHT_IN, _unit, backend_style
from harness.common.contract import PHASES, CellRecord

PHASE_MARKERS = {"load": "s", "encode": "^", "denoise": "o", "decode": "D"}
SEGMENTS = (("allocated", "#1f4e79"), ("reserved above allocated (allocator cache)", "#6fa8dc"),
            ("context and other (NVML per-process - reserved)", "#f4b183"))


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata=_PNG_META)
    return buf.getvalue()


def png_of(draw: Callable[[list[CellRecord], Path, str], Path], records: list[CellRecord], title: str) -> bytes:
    """The PNG bytes of a `plots` function that writes a file."""
    with tempfile.TemporaryDirectory() as tmp:
        return draw(records, Path(tmp) / "f.png", title).read_bytes()


def _segments(rec: CellRecord, phase: str) -> list[float]:
    stats = rec.phases.get(phase)
    if stats is None:
        return [0.0, 0.0, 0.0]
    if rec.device != "cuda":
        return [float(stats.get("ledger_peak_bytes", 0)), 0.0, 0.0]
    alloc = float(stats.get("alloc_peak_allocated_bytes", 0))
    reserved = float(stats.get("alloc_peak_reserved_bytes", alloc))
    nvml = stats.get("nvml_proc_peak_bytes")
    return [alloc, max(0.0, reserved - alloc), 0.0 if nvml is None else max(0.0, float(nvml) - reserved)]


def phase_memory_png(records: list[CellRecord], title: str) -> bytes:
    """Stacked bars per cell (numbered as in the Pareto figure's key), one panel per measured phase."""
    cells = [r for r in records if not r.same_as]
    cuda = any(r.device == "cuda" for r in cells)
    phases = [p for p in PHASES if any(p in r.phases for r in cells)] or list(PHASES)
    cap = next((c for r in cells if (c := (r.card or {}).get("cap_bytes"))), None)
    totals = [sum(_segments(r, p)) for r in cells for p in phases] + [cap or 0, 1]
    scale, unit = _unit(max(totals))
    height = min(MAX_HEIGHT_IN, 1.9 + 0.28 * len(cells))
    fig = Figure(figsize=(13, height))
    axes = fig.subplots(1, len(phases), sharey=True, sharex=True, squeeze=False)[0]
    ys = list(range(len(cells)))
    for ax, phase in zip(axes, phases, strict=True):
        left = [0.0] * len(cells)
        for k, (label, colour) in enumerate(SEGMENTS if cuda else (("ledger (weights on the device)", "#1f4e79"),)):
            values = [_segments(r, phase)[k] / scale for r in cells]
            ax.barh(ys, values, left=left, height=0.7, color=colour, label=label)
            left = [a + b for a, b in zip(left, values, strict=True)]
        for y, r in zip(ys, cells, strict=True):
            if r.failed_phase == phase:
                ax.text(0.01, y, f" {r.status} here", va="center", fontsize=7, color="#7f0000",
                        transform=ax.get_yaxis_transform())
        if cap:
            ax.axvline(cap / scale, color="#7f0000", linestyle=":", linewidth=1.2, label="card cap")
        ax.set_title(phase, fontsize=9)
        ax.set_xlabel(unit)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(ys, [str(i) for i in range(1, len(cells) + 1)], fontsize=7)
    axes[0].invert_yaxis()
    axes[0].set_ylabel("cell (numbered as in the peak figure)", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=len(labels), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1))
    return _png(fig)


def plan_points(records: list[CellRecord]) -> list[tuple[CellRecord, str, float, float]]:
    """(record, phase, planned reserved bytes, measured reserved bytes) of each phase a cell finished, for the
    records that carry a plan."""
    out = []
    for r in records:
        planned = (r.plan or {}).get("phases") or {}
        if r.same_as or not planned:
            continue
        for phase in PHASES:
            stats, plan = r.phases.get(phase), planned.get(phase) or {}
            if stats is None or r.failed_phase == phase:
                continue
            measured, predicted = stats.get("alloc_peak_reserved_bytes"), plan.get("reserved_bytes")
            if measured is not None and predicted is not None:
                out.append((r, phase, float(predicted), float(measured)))
    return out


def plan_png(records: list[CellRecord], title: str) -> bytes | None:
    points = plan_points(records)
    if not points:
        return None
    scale, unit = _unit(max(max(p[2], p[3]) for p in points))
    fig = Figure(figsize=(6.2, 5.2))
    ax = fig.add_subplot()
    top = max(max(p[2], p[3]) for p in points) / scale * 1.08
    ax.plot([0, top], [0, top], color="#888888", linewidth=1, linestyle="--", label="measured = planned")
    ax.fill_between([0, top], [0, top * 0.95], [0, top * 1.05], color="#dddddd", alpha=0.5, label="within 5 %")
    for backend in dict.fromkeys(p[0].backend for p in points):
        colour, _ = backend_style(backend)
        for phase, marker in PHASE_MARKERS.items():
            mine = [p for p in points if p[0].backend == backend and p[1] == phase]
            if mine:
                ax.scatter([p[2] / scale for p in mine], [p[3] / scale for p in mine], color=colour, marker=marker,
                           s=40, alpha=0.85, label=f"{phase} ({backend})", zorder=3)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_aspect("equal")
    ax.set_xlabel(f"planned reserved peak ({unit})")
    ax.set_ylabel(f"measured reserved peak ({unit})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", frameon=False)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _png(fig)


# The metrics a baseline figure shows first (the ones a reader of a comparison asks about), then the rest in order
BASELINE_FIRST = ("runtime_peak_reserved_bytes", "denoise_steady_step_ms", "load_peak_reserved_bytes",
                  "nvml_proc_peak_bytes", "e2e_ms")


def baseline_png(rows: list, title: str, metrics: int = 4) -> bytes | None:
    """Baseline against current per metric (`compare.MetricRow`s of one scenario on one card): one panel per
    metric (the first `metrics` with both values, `BASELINE_FIRST` first), paired bars per cell, baseline grey and
    current blue, red where the row's verdict fails, the change in percent at the end of the bar, "n/a" where a
    cell has no pair for the metric. None where no row has both values."""
    from matplotlib.patches import Patch

    both = [r for r in rows if r.baseline is not None and r.current is not None]
    seen = list(dict.fromkeys(r.metric for r in both))
    names = sorted(seen, key=lambda m: (BASELINE_FIRST.index(m) if m in BASELINE_FIRST else len(BASELINE_FIRST),
                                        seen.index(m)))[:metrics]
    if not names:
        return None
    cells = list(dict.fromkeys(r.cell_id for r in both))
    fig = Figure(figsize=(11, min(MAX_HEIGHT_IN, 1.2 + 0.35 * len(cells) * -(-len(names) // 2))))
    axes = fig.subplots(-(-len(names) // 2), min(2, len(names)), squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        _baseline_panel(ax, name, cells, {r.cell_id: r for r in both if r.metric == name})
    for ax in axes[len(names):]:
        ax.axis("off")
    handles = [Patch(color=c, label=label) for c, label in (("#bdbdbd", "baseline"), ("#1f77b4", "current"),
                                                             ("#b3261e", "current, failing"))]
    fig.legend(handles=handles, fontsize=7, loc="upper right", ncols=3, frameon=False)
    fig.suptitle(title, fontsize=10, x=0.02, ha="left")
    fig.tight_layout()
    return _png(fig)


def _baseline_panel(ax, name: str, cells: list[str], mine: dict) -> None:
    from harness.analyze.compare import FAILING_METRIC_VERDICTS

    scale, unit = _unit(max(max(r.baseline, r.current) for r in mine.values())) if name.endswith("_bytes") \
        else (1.0, "ms")
    ys = list(range(len(cells)))
    base = [mine[c].baseline / scale if c in mine else 0 for c in cells]
    cur = [mine[c].current / scale if c in mine else 0 for c in cells]
    colours = ["#b3261e" if c in mine and mine[c].verdict in FAILING_METRIC_VERDICTS else "#1f77b4" for c in cells]
    ax.barh([y + 0.2 for y in ys], base, height=0.38, color="#bdbdbd")
    ax.barh([y - 0.2 for y in ys], cur, height=0.38, color=colours)
    top = max(base + cur) or 1.0
    for y, c, x in zip(ys, cells, cur, strict=True):
        row = mine.get(c)
        text = "n/a" if row is None else "" if not row.baseline else f"{(row.current / row.baseline - 1) * 100:+.1f} %"
        ax.text(x + top * 0.01, y, text, va="center", fontsize=6.5, color="#5f6368" if row is None else "#1d1d1f")
    ax.set_xlim(0, top * 1.14)
    ax.set_yticks(ys, [c.rsplit("/", 1)[-1] for c in cells], fontsize=7)
    ax.invert_yaxis()
    ax.set_title(f"{name} ({unit})", fontsize=9, loc="left")
    ax.grid(True, axis="x", alpha=0.3)
