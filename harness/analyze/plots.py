"""PNG plots of a run's records (matplotlib, Agg; no pyplot, so no global figure state and no display needed).

- `pareto_plot`: peak device memory (the record's peak counter, labelled) against denoise ms/step, one point per
  cell that ran its denoise loop, the Pareto front (lowest memory for its latency) marked, the card's cap drawn as
  a horizontal line where the card has one, with panels for host memory and first-vs-steady step times beside it
  and a key naming every numbered cell with its fate.
- `trace_plot`: memory over time of each cell from record["trace"] ([t_s, phase, nvml_proc_bytes|None,
  rss_bytes]): NVML per-process on the left axis (with the cap), host RSS on the right axis, phases shaded and
  labelled where they are wide enough; every panel on one time, device and host scale.

Both take the records of one scenario on one card and write one PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.common.contract import STEP_CONVENTION, CellRecord, Phase, Status
from harness.common.units import GIB, MIB

PHASE_COLORS = {
    "setup": "#dddddd", "load": "#f4c27a", "encode": "#9fd3a6", "denoise": "#9ec5e8", "decode": "#d8a8e0",
}
_COUNTER_LABELS = {"alloc_peak_reserved_bytes": "alloc reserved", "ledger_peak_bytes": "ledger"}
_PNG_META = {"Software": None}  # no matplotlib version in the file: the same records give the same bytes
MAX_HEIGHT_IN = 8.5  # at the 110 dpi of _save: 935 px, within a laptop screen's height


def _unit(max_bytes: float) -> tuple[float, str]:
    return (GIB, "GiB") if max_bytes >= 4 * GIB else (MIB, "MiB")


def plot_points(records: list[CellRecord]) -> tuple[list[tuple[str, float, float]], list[CellRecord]]:
    """(cell id, denoise ms/step by STEP_CONVENTION, peak bytes) of the cells that finished their denoise loop;
    the others."""
    points, others = [], []
    for r in records:
        if r.same_as:
            continue  # a copy of another cell's record: same point
        ms = r.steady_step_ms()
        peak = r.peaks.peak
        finished_denoise = r.status is Status.OK or r.failed_phase == Phase.DECODE
        if finished_denoise and ms is not None and peak is not None:
            points.append((r.cell_id, float(ms), float(peak)))
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


# One colour and marker per backend, the same in every figure (our runtime first; an engine release shares its
# engine's entry).
BACKEND_STYLES = {
    "harness": ("#1f77b4", "o"),
    "diffusers-group": ("#ff7f0e", "s"),
    "diffusers-group-rs": ("#2ca02c", "^"),
    "sglang": ("#d62728", "D"),
}
_OTHER_STYLE = ("#7f7f7f", "v")


# Who page-locked host memory, by the record's counters, disjoint so that they stack: (counter, who, the backend
# that pins that way, whose colour it is drawn in). The harness's ledger counts its cudaHostRegister ranges here (its
# rare pin_memory fallback is in torch's allocator); SGLang <= 0.5.13 pins through torch's allocator too.
PINNERS = (("pinned_registered_bytes", "harness ledger", "harness"),
           ("pinned_torch_allocator_bytes", "torch caching host allocator", "diffusers-group"),
           ("pinned_sglang_registered_bytes", "SGLang manager (its cudaHostRegister)", "sglang"))


def backend_style(backend: str | None) -> tuple[str, str]:
    """(colour, marker) of a backend; `sglang@0.5.23` is drawn as `sglang`."""
    return BACKEND_STYLES.get((backend or "harness").split("@", 1)[0], _OTHER_STYLE)


def pareto_plot(records: list[CellRecord], path: Path, title: str) -> Path:
    """Three panels over the cells of one scenario on one card, each cell numbered the same in all three and named
    in the key below them (labels never sit on the points, so none overprint another):

    - peak device memory against denoise ms/step (STEP_CONVENTION), colour and marker per backend, the Pareto
      front and the card's cap;
    - host memory per cell: peak RSS and pinned bytes by who pinned them (`PINNERS`: the harness's ledger, torch's
      caching host allocator where diffusers' group offload pins, SGLang's own registrations where a record counts
      them), one GiB axis;
    - denoise step times per cell: the first step against the steady state, one ms axis.
    """
    points, others = plot_points(records)
    cells = [r for r in records if not r.same_as]
    number = {r.cell_id: i for i, r in enumerate(cells, 1)}
    counter = records[0].peak_counter if records else "alloc_peak_reserved_bytes"
    cap = next((r.card.get("cap_bytes") for r in records if r.card), None)
    key_lines = [f"{number[r.cell_id]}  {r.label}: {r.fate}" for r in cells]
    key_rows = -(-len(key_lines) // (2 if len(key_lines) > 6 else 1))  # _key_panel's rows
    fig = Figure(figsize=(13, min(MAX_HEIGHT_IN, 4.9 + 0.15 * key_rows)))
    grid = fig.add_gridspec(2, 3, height_ratios=[4.6, 0.15 * key_rows + 0.2], width_ratios=[1.3, 1, 1])
    ax, host, steps = (fig.add_subplot(grid[0, i]) for i in range(3))
    _memory_panel(ax, points, {r.cell_id: r for r in cells}, number, cap, counter)
    _host_panel(host, cells, number)
    _steps_panel(steps, cells, number)
    _key_panel(fig.add_subplot(grid[1, :]), key_lines)
    if others:
        ax.text(0.01, 0.99, f"{len(others)} cell(s) did not finish denoise (see the key)", transform=ax.transAxes,
                va="top", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _memory_panel(ax: Any, points: list[tuple[str, float, float]], by_id: dict[str, CellRecord],
                  number: dict[str, int], cap: int | None, counter: str) -> None:
    """Peak device memory against ms/step: colour and marker per backend, the Pareto front, the card's cap, and
    the cells that ran out of memory before a step time drawn as crosses on the card line, at the right."""
    oom = [r for cid, r in by_id.items() if r.status is Status.OOM and cid not in {p[0] for p in points}]
    scale, unit = _unit(max([p[2] for p in points] + [cap or 0, 1]))
    right = max([p[1] for p in points] + [1.0]) * 1.12
    labels: list[tuple[float, float, str, str]] = []  # x, y, number, colour: placed together at the end
    if points:
        for backend in dict.fromkeys(by_id[cid].backend for cid, _, _ in points):
            mine = [p for p in points if by_id[p[0]].backend == backend]
            colour, marker = backend_style(backend)
            ax.scatter([p[1] for p in mine], [p[2] / scale for p in mine], color=colour, marker=marker, s=46,
                       zorder=3, label=backend)
            labels += [(ms, peak / scale, str(number[cid]), colour) for cid, ms, peak in mine]
        front = pareto_front(points)
        ax.plot([p[1] for p in front], [p[2] / scale for p in front], color="#444444", marker="o",
                markerfacecolor="none", markersize=14, linestyle="--", linewidth=1, zorder=4, label="Pareto front")
    elif not oom:
        ax.text(0.5, 0.5, "no cell finished its denoise loop", transform=ax.transAxes, ha="center", va="center")
    top = max([p[2] / scale for p in points] + [(cap or 0) / scale, 1e-9]) * 1.12
    if oom:  # no step time to place them by: a strip right of the measured points, on the card line
        strip = right
        right = strip * (1.1 + 0.12 * len(oom))
        y = cap / scale if cap else top / 1.12
        xs = [strip * (1.06 + 0.12 * i) for i in range(len(oom))]
        for x, r in zip(xs, oom, strict=True):
            colour, _ = backend_style(r.backend)
            ax.scatter([x], [y], color=colour, marker="x", s=60, linewidths=2, zorder=5)
            labels.append((x, y, str(number[r.cell_id]), colour))
        ax.axvline(strip, color="#bbbbbb", linewidth=0.8)
        ax.text((strip + right) / 2, y * 0.97, "out of\nmemory", ha="center", va="top", fontsize=7, color="#7f0000")
        ax.scatter([], [], color="#555555", marker="x", label="ran out of memory (at the card line)")
    ax.set_xlim(left=0, right=right)
    if cap:
        ax.axhline(cap / scale, color="#7f0000", linestyle=":", linewidth=1.5,
                   label=f"card cap {cap / scale:,.2f} {unit}")
    ax.set_xlabel(f"denoise ms/step ({STEP_CONVENTION})")
    ax.set_ylabel(f"peak device memory ({unit}, {_COUNTER_LABELS.get(counter, counter)})")
    ax.set_ylim(bottom=0, top=top)
    _place_numbers(ax, labels)
    ax.grid(True, alpha=0.3)
    if points or cap or oom:  # legends above the panels: inside they would cover points or bars
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=3, fontsize=7, frameon=False)


def _place_numbers(ax: Any, labels: list[tuple[float, float, str, str]], near_px: float = 14.0) -> None:
    """Each point's number beside it; points closer than `near_px` on screen share one label ("1,3") so no
    number is drawn over another."""
    to_px = ax.transData.transform
    groups: list[list[tuple[float, float, str, str]]] = []
    for lab in sorted(labels, key=lambda v: (v[1], v[0])):
        x, y = to_px((lab[0], lab[1]))
        for g in groups:
            gx, gy = to_px((g[0][0], g[0][1]))
            if abs(gx - x) < near_px * 2.5 and abs(gy - y) < near_px:
                g.append(lab)
                break
        else:
            groups.append([lab])
    for g in groups:
        text = ",".join(sorted((v[2] for v in g), key=int))
        colour = g[0][3] if len({v[3] for v in g}) == 1 else "#333333"
        ax.annotate(text, (g[0][0], g[0][1]), textcoords="offset points", xytext=(6, 5), fontsize=8,
                    fontweight="bold", color=colour, zorder=6)



def _host_panel(host: Any, cells: list[CellRecord], number: dict[str, int]) -> None:
    """Host memory per cell on one axis: peak RSS and the pinned bytes by who pinned them (SGLang's bar only where a
    record counts it)."""
    ys = list(range(len(cells)))
    host_scale, host_unit = _unit(max([r.phase_max("rss_peak_bytes") or 0 for r in cells] + [1]))
    bars = (("rss_peak_bytes", "host RSS peak", "#9e9e9e"),
            *((counter, f"pinned: {who}", backend_style(pinner)[0]) for counter, who, pinner in PINNERS
              if any(r.phase_max(counter) for r in cells) or pinner != "sglang"))
    height = 0.8 / len(bars)
    for k, (field, label, colour) in enumerate(bars):
        values = [(r.phase_max(field) or 0) / host_scale for r in cells]
        host.barh([y - 0.4 + (k + 0.5) * height for y in ys], values, height=height, color=colour, label=label)
    host.set_yticks(ys, [str(number[r.cell_id]) for r in cells], fontsize=7)
    host.invert_yaxis()
    host.set_xlabel(f"host memory ({host_unit})")
    host.set_ylabel("cell (key below)", fontsize=8)
    host.grid(True, axis="x", alpha=0.3)
    host.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, fontsize=7, frameon=False)



def _steps_panel(steps: Any, cells: list[CellRecord], number: dict[str, int]) -> None:
    """Denoise step times per cell: the first step against the steady state, one ms axis."""
    ys = list(range(len(cells)))
    first = [r.first_step_ms() for r in cells]
    steady = [r.steady_step_ms() for r in cells]
    steps.barh([y - 0.2 for y in ys], [v or 0 for v in first], height=0.4, color="#c7c7c7", label="first step")
    steps.barh([y + 0.2 for y in ys], [v or 0 for v in steady], height=0.4,
               color=[backend_style(r.backend)[0] for r in cells],
               label=f"steady ({STEP_CONVENTION}), backend colour")
    steps.set_yticks(ys, [str(number[r.cell_id]) for r in cells], fontsize=7)
    steps.invert_yaxis()
    if not any(first + steady):
        steps.text(0.5, 0.5, "no denoise steps recorded", transform=steps.transAxes, ha="center", va="center")
        steps.set_xlim(0, 1)
    steps.set_xlabel("denoise step (ms)")
    steps.grid(True, axis="x", alpha=0.3)
    steps.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=1, fontsize=7, frameon=False)



def _key_panel(keyax: Any, key_lines: list[str]) -> None:
    """The key under the panels: each cell's number, label and fate, in one or two columns."""
    keyax.axis("off")
    columns = 2 if len(key_lines) > 6 else 1
    per = -(-len(key_lines) // columns)
    for c in range(columns):
        keyax.text(c / columns, 1.0, "\n".join(key_lines[c * per:(c + 1) * per]), transform=keyax.transAxes,
                   va="top", ha="left", fontsize=7, family="monospace")


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


def trace_plot(records: list[CellRecord], path: Path, title: str) -> Path:
    """Memory over time, one panel per cell, on one scale (time, device and host RSS axes shared, so panels compare
    by eye). A phase is named in its span where the span is wide enough; the key under the panels names them all."""
    cells = [r for r in records if not r.same_as]
    # one column up to 3 cells, then 2 or 3 columns: the figure stays within a screen's height
    columns = 1 if len(cells) <= 3 else 2 if len(cells) <= 8 else 3
    rows = max(1, -(-len(cells) // columns))
    fig = Figure(figsize=(9 if columns == 1 else 6.5 * columns, min(MAX_HEIGHT_IN, max(2.6, 2.1 * rows + 0.9))))
    if not cells:
        fig.text(0.5, 0.5, "no cells", ha="center")
        return _save(fig, path)
    axes = _panel_grid(fig, rows, columns, len(cells))
    traces = [[row for row in (r.trace or []) if len(row) >= 4] for r in cells]
    rows = [row for trace in traces for row in trace]
    cap = next((c for r in cells if (c := (r.card or {}).get("cap_bytes"))), None)
    has_nvml = any(row[2] is not None for row in rows)
    device_top = max([row[2] for row in rows if row[2] is not None] + [cap or 0, 1]) if has_nvml else 1
    rss_top = max([row[3] for row in rows if row[3] is not None] + [1])
    scale, unit = _unit(device_top if has_nvml else rss_top)
    t_end = max([row[0] for row in rows] + [1e-9])
    twins, lines = [], []  # lines: the curves' key, once for the figure (inside a panel it covered the curves)
    for ax, rec, trace in zip(axes, cells, traces, strict=True):
        ax.set_title(f"{rec.label}: {rec.fate}", fontsize=9, loc="left")
        if not trace:
            ax.text(0.5, 0.5, "no trace in the record", transform=ax.transAxes, ha="center", va="center")
            continue
        t = [row[0] for row in trace]
        _shade_phases(ax, trace, t_end)
        if has_nvml:
            nvml = [row[2] for row in trace]
            ax.plot(t, [float("nan") if v is None else v / scale for v in nvml], color="#1f4e79", linewidth=1.4,
                    label="NVML per-process")
            if cap:
                ax.axhline(cap / scale, color="#7f0000", linestyle=":", linewidth=1.2, label="card cap")
            host = ax.twinx()
            twins.append(host)
            host.plot(t, [row[3] / GIB for row in trace], color="#888888", linewidth=1, linestyle="--",
                      label="host RSS")
            host.set_ylabel("host RSS GiB", fontsize=8)
            lines = lines or ax.get_legend_handles_labels()[0] + host.get_legend_handles_labels()[0]
        else:
            ax.plot(t, [row[3] / scale for row in trace], color="#888888", linewidth=1.2, label="host RSS")
            lines = lines or ax.get_legend_handles_labels()[0]
        ax.set_ylabel(f"device {unit}\n(NVML per-process)" if has_nvml else
                      f"host RSS {unit}\n(no NVML: CPU profile)", fontsize=8)
        ax.grid(True, alpha=0.25)
    _shared_limits(axes[0], twins, (device_top if has_nvml else rss_top) / scale, rss_top / GIB, t_end)
    _trace_key(fig, axes[-1], lines, list(dict.fromkeys(row[1] for row in rows)), title)
    return _save(fig, path)


def _shared_limits(ax: Any, twins: list[Any], top: float, host_top: float, t_end: float) -> None:
    """One scale for every panel (the axes are shared), and one for the host RSS twins."""
    ax.set_ylim(bottom=0, top=top * 1.08)
    ax.set_xlim(left=0, right=t_end)
    for host in twins:
        host.set_ylim(bottom=0, top=host_top * 1.08)


def _panel_grid(fig: Figure, rows: int, columns: int, count: int) -> list[Any]:
    """`count` panels filled column by column, sharing both axes; an empty slot is off, and the panel above it keeps
    its time ticks."""
    grid = fig.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
    for i in range(count, rows * columns):
        grid[i % rows, i // rows].axis("off")
        grid[i % rows - 1, i // rows].xaxis.set_tick_params(labelbottom=True)
    return [grid[i % rows, i // rows] for i in range(count)]


def _shade_phases(ax: Any, trace: list[list[Any]], t_end: float) -> None:
    """Each phase's span shaded in its colour, named inside where the span is wide enough for the name."""
    for phase, t0, t1 in _phase_spans(trace):
        ax.axvspan(t0, t1, color=PHASE_COLORS.get(phase, "#eeeeee"), alpha=0.45, linewidth=0)
        if (t1 - t0) >= 0.012 * t_end * max(len(phase), 4):  # room for the name at this figure width
            ax.text((t0 + t1) / 2, 0.97, phase, transform=ax.get_xaxis_transform(), ha="center", va="top",
                    fontsize=7, clip_on=True)


def _trace_key(fig: Figure, bottom: Any, lines: list[Any], phases: list[str], title: str) -> None:
    """One key for the figure under the time axis (the curves, then the phase colours), and the title above."""
    from matplotlib.patches import Patch

    bottom.set_xlabel("seconds since the child started")
    handles = lines + [Patch(color=PHASE_COLORS.get(p, "#eeeeee"), alpha=0.45, label=p) for p in phases]
    key_height = 0.35 / fig.get_figheight()  # one row of key under the time axis, whatever the panel count
    fig.legend(handles=handles, loc="lower center", ncols=len(handles) or 1, fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, key_height, 1, 1 - 0.3 / fig.get_figheight()))  # the title's row kept free
