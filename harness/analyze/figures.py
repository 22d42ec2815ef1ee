"""More PNG figures of one scenario on one card, as bytes (the HTML report inlines them):

- `phase_memory_png`: device memory per phase as stacked bars per cell: allocator allocated, reserved above it
  (the allocator's cache), and the CUDA context and other non-allocator memory (NVML per-process minus
  reserved); the card's cap as a line. The CPU profile has one counter, the harness ledger.
- `plan_png`: planned against measured allocator reserved peak per phase (the plan the runner stored in each
  record: `record.plan`), points on the diagonal when the planner is right; one colour per backend
  (`plots.backend_style`), one marker per phase. None where no record carries a plan.
- `host_memory_png`: host memory per cell: peak RSS, and the pinned bytes stacked by who pinned them (the harness's
  ledger, torch's caching host allocator, SGLang's own registrations), each in the colour of the backend that pins
  that way (`plots.backend_style`), the cell numbers in their backend's colour; beside each SGLang cell, where its
  managers hosted each layer group (`sglang_hosting`: the harness's count, or the release's plan where the record
  predates it, as counts only).
- `png_of`: an existing `harness.analyze.plots` figure (pareto, trace) as bytes.

Every figure is capped at `plots.MAX_HEIGHT_IN` (a screen's height).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.analyze.plots import _PNG_META, MAX_HEIGHT_IN, PINNERS, _unit, backend_style
from harness.common.contract import PHASES, CellRecord
from harness.common.units import GIB

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


def _layers_text(counts: dict[str, int]) -> str:
    """{"pinned": 49, "pageable": 11} -> "49/60 pinned, 11 pageable"."""
    total = sum(counts.values())
    rest = [f"{n} {where}" for where, n in counts.items() if where != "pinned" and n]
    return ", ".join([f"{counts.get('pinned', 0)}/{total} pinned", *rest])


def sglang_hosting(record: CellRecord) -> list[str]:
    """Where the SGLang managers of a cell hosted each layer group, one line per group: the harness's walk of their
    host tensors (layers and GiB by `is_pinned()`), else the release's hosting plan (`layer_hosting`: counts only,
    said as the plan), else that the record has neither. [] for a cell without SGLang managers."""
    section = ((record.components or {}).get("dit") or {}).get("sglang_layerwise")
    if not section:
        return []
    plan = section.get("layer_hosting") or {}
    out = []
    for group, info in (section.get("groups") or {}).items():
        host = info.get("host") or {}
        if host.get("layers"):
            sizes = ", ".join(f"{host[k] / GIB:.1f} GiB {k.removesuffix('_bytes')}" for k in
                              ("pinned_bytes", "pageable_bytes", "mapped_bytes") if host.get(k))
            out.append(f"{group}: {_layers_text(host['layers'])} ({sizes or 'no host bytes'})")
        elif plan.get(group):
            out.append(f"{group}: {_layers_text(plan[group])} (SGLang's plan)")
        else:
            out.append(f"{group}: {info.get('layers', '?')} layers; no hosting recorded")
    return out


def pinned_by_whom(record: CellRecord) -> list[tuple[str, str, int]]:
    """(who, the backend whose colour it takes, bytes) per `PINNERS` entry: the largest value of its counter over
    the measured phases, 0 where the record has none."""
    return [(who, pinner, int(record.phase_max(counter) or 0)) for counter, who, pinner in PINNERS]


def _pinned_stack(ax: Any, cells: list[CellRecord], scale: float) -> None:
    """Per cell: the RSS peak above, the pinned bytes stacked by who pinned them below. An SGLang cell says, in
    words at the end of its pinned bar, where its managers hosted each layer group, and that the record has no
    SGLang pin counter where it has none (its bar is then short by what SGLang pinned)."""
    ys = list(range(len(cells)))
    ax.barh([y - 0.2 for y in ys], [(r.phase_max("rss_peak_bytes") or 0) / scale for r in cells], height=0.36,
            color="#bdbdbd", label="host RSS peak")
    left = [0.0] * len(cells)
    stacks = [pinned_by_whom(r) for r in cells]
    for k, (_, label, pinner) in enumerate(PINNERS):
        values = [stack[k][2] / scale for stack in stacks]
        ax.barh([y + 0.2 for y in ys], values, left=left, height=0.36, color=backend_style(pinner)[0],
                label=f"pinned: {label}")
        left = [a + b for a, b in zip(left, values, strict=True)]
    for y, r, x in zip(ys, cells, left, strict=True):
        hosting = sglang_hosting(r)
        if not hosting:
            continue
        uncounted = r.phase_max("pinned_sglang_manager_bytes") is None
        text = "; ".join(hosting) + (" - SGLang's own pins not counted in this record" if uncounted else "")
        ax.text(x, y + 0.2, "  " + text, va="center", fontsize=8, color=backend_style(r.backend)[0])


def host_memory_png(records: list[CellRecord], title: str) -> bytes:
    """Host RSS peak and the pinned bytes by who pinned them per cell (max over the measured phases), numbered and
    coloured by backend as in the peak figure; an SGLang cell's hosting per layer group in words on its row."""
    from matplotlib.lines import Line2D

    cells = [r for r in records if not r.same_as]
    top = max([max(r.phase_max("rss_peak_bytes") or 0, sum(b for _, _, b in pinned_by_whom(r))) for r in cells]
              + [1])
    scale, unit = _unit(top)
    worded = any(sglang_hosting(r) for r in cells)
    height = min(MAX_HEIGHT_IN, 2.0 + 0.42 * len(cells))
    fig = Figure(figsize=(10, height))
    ax = fig.add_subplot()
    ys = list(range(len(cells)))
    _pinned_stack(ax, cells, scale)
    ax.set_yticks(ys, [str(i) for i in range(1, len(cells) + 1)], fontsize=9)
    for tick, r in zip(ax.get_yticklabels(), cells, strict=True):
        tick.set_color(backend_style(r.backend)[0])
        tick.set_fontweight("bold")
    ax.set_ylim(len(cells) - 0.5, -0.5)
    # room at the right for the hosting words of a cell whose pinned bar is long
    ax.set_xlim(0, top / scale * (1.35 if worded else 1.05))
    ax.set_xlabel(f"host memory ({unit}; max over the phases)", fontsize=9)
    ax.set_ylabel("cell (numbered as in the peak figure)", fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    backends = list(dict.fromkeys(r.backend or "harness" for r in cells))
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], linestyle="", marker="s", color=backend_style(b)[0]) for b in backends]
    labels += [f"cell number: {b}" for b in backends]
    fig.legend(handles, labels, loc="lower center", ncols=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    rows = -(-(len(handles)) // 3)
    fig.tight_layout(rect=(0, (0.15 + 0.17 * rows) / height, 1, 1))
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
