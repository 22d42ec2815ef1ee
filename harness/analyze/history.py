"""History across runs: `offload-bench history RUN... | --baselines DIR` writes one HTML page with a trend per
metric and cell over the runs, per GPU SKU, ordered by run date (then commit), marking where a cell's fate or its
effective flags changed, and linking each point's run (its report where one sits beside the records).

A RUN is a run folder, a records file, or any folder: every `*.records.jsonl` and `records.jsonl` under it is a
run (so `results/h200` reads every committed run of the H200). `--baselines DIR` adds each baseline file there
(`<sku>.json`, as many copies as a nightly job archived) as one more point per cell, at the run it was made from.

A trend's cell is what was measured, whatever the scenario was called: model, card, resolution/steps/frames,
backend, CFG batching and the requested flags. A run made under another policy that changed the effective flags
(an older SGLang release) stays in the trend, marked: that is a change the page is there to show.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.analyze.baseline import BaselineError, cell_metrics, read_baseline
from harness.analyze.html import BODY_JS, CSS, HEAD_JS, esc, img, table
from harness.analyze.labels import flag_words
from harness.common.contract import CellRecord, Status, is_probe
from harness.common.records import latest_by_cell, read_cell_records

# The metrics drawn, in order (harness.analyze.baseline's names); the first two are the ones a nightly reader asks
TREND_METRICS = (
    ("runtime_peak_reserved_bytes", "runtime peak, alloc reserved (MiB)"),
    ("denoise_steady_step_ms", "denoise step (ms, median of steps 2..n)"),
    ("load_peak_reserved_bytes", "load peak, alloc reserved (MiB)"),
    ("nvml_proc_peak_bytes", "peak, NVML per-process (MiB)"),
    ("runtime_peak_ledger_bytes", "runtime peak, ledger (MiB)"),
    ("e2e_ms", "encode + denoise + decode (ms)"),
)


TREND_CSS = """
.trend { grid-template-columns: minmax(0, 1.15fr) minmax(0, 1fr); }
.trend td { white-space: nowrap; }
"""


@dataclass
class Point:
    created: str
    git_sha: str
    run_id: str
    source: str  # the records or baseline file
    scenario: str
    policy: str
    fate: str
    effective: str
    metrics: dict[str, float]
    link: str | None = None  # the run's report, relative to the page


@dataclass
class Trend:
    sku: str
    key: tuple[Any, ...]
    title: str
    label: str
    points: list[Point] = field(default_factory=list)

    def changes(self) -> list[tuple[int, str]]:
        """(index, what changed) where a point's fate or effective flags differ from the point before."""
        out = []
        for i in range(1, len(self.points)):
            a, b = self.points[i - 1], self.points[i]
            what = []
            if a.fate != b.fate:
                what.append(f"{a.fate} -> {b.fate}")
            if a.effective != b.effective:
                what.append(f"effective {a.effective} -> {b.effective}")
            if what:
                out.append((i, "; ".join(what)))
        return out


def _key(rec: CellRecord) -> tuple[Any, ...]:
    s = rec.settings
    workload = (None,) * 5 if s is None else (s.height, s.width, s.steps, s.frames, s.true_cfg_scale)
    return (rec.model, rec.card_name, None if rec.card is None else rec.card.cap_bytes, *workload,
            rec.backend.split("@")[0], rec.cfg_batch, rec.flags_label)


def run_files(paths: list[str]) -> list[Path]:
    """Every records file the paths name, once each however it is reached (a file and its folder, `./x` and
    `x`, a link): files are told apart by their resolved path."""
    out: list[Path] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("*.records.jsonl")) + sorted(p.rglob("records.jsonl"))
        elif p.exists():
            found = [p]
        else:
            raise FileNotFoundError(f"{p}: no such run folder or records file")
        for f in found:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                out.append(f)
    return out


def _report_of(records_file: Path) -> Path | None:
    stem = records_file.name.removesuffix(".jsonl").removesuffix(".records")
    for name in (f"{stem}.report.html", f"{stem}.html", "report.html", f"{stem}.report.md", f"{stem}.md",
                 "report.md"):
        if records_file.name == "records.jsonl" and not name.startswith("report"):
            continue
        if (candidate := records_file.with_name(name)).exists():
            return candidate
    return None


def collect(paths: list[str], baselines: str | None = None, page: Path | None = None) -> dict[str, list[Trend]]:
    """SKU -> trends (cells seen in at least one run), each trend's points by date then commit."""
    trends: dict[tuple[str, tuple[Any, ...]], Trend] = {}
    for f in run_files(paths):
        report = _report_of(f)
        link = None
        if report is not None:
            link = _relative(report, page.parent) if page is not None else str(report)
        for rec in latest_by_cell(read_cell_records(f).records).values():
            # a copy of another cell's record (same effective flags) is still this cell's outcome in that run
            if rec.status is Status.SKIPPED or is_probe(rec.scenario):
                continue
            sku = rec.sku or "unknown"
            key = _key(rec)
            trend = trends.setdefault((sku, key), Trend(sku, key, _title(rec), rec.label))
            trend.points.append(Point(rec.created or "", rec.git_sha or "", rec.run_id or "", str(f),
                                      str(rec.scenario), str(rec.policy), rec.fate, rec.effective.label(),
                                      cell_metrics(rec), link))
    if baselines:
        _add_baselines(Path(baselines), trends)
    out: dict[str, list[Trend]] = {}
    for (sku, _), trend in sorted(trends.items(), key=lambda kv: (kv[0][0], kv[1].title)):
        trend.points.sort(key=lambda p: (p.created, p.git_sha))
        out.setdefault(sku, []).append(trend)
    return out


def _relative(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve())


def _add_baselines(folder: Path, trends: dict[tuple[str, tuple[Any, ...]], Trend]) -> None:
    """Each baseline cell as a point of the trend with its cell id (baselines keep ids and metrics, not specs)."""
    by_id = {(sku, t.points[-1].scenario + "/" + str(t.key[1]) + "/" + t.label): t for (sku, _), t in trends.items()}
    for f in sorted(folder.rglob("*.json")):
        try:
            base = read_baseline(f)
        except BaselineError:
            continue
        for cell_id, cell in base.cells.items():
            scenario, card, label = cell_id.split("/", 2)
            trend = by_id.get((base.sku, cell_id))
            if trend is None:
                trend = Trend(base.sku, (cell_id,), f"{scenario} on {card}", label)
                trends[(base.sku, (cell_id,))] = trend
                by_id[(base.sku, cell_id)] = trend
            if any(p.run_id == cell.run_id and p.created == cell.created for p in trend.points):
                continue  # the same run, already read from its records
            trend.points.append(Point(cell.created or "", cell.git_sha or "", cell.run_id or "", str(f), scenario,
                                      "", cell.fate, trend.points[-1].effective if trend.points else label,
                                      dict(cell.metrics), None))


def _title(rec: CellRecord) -> str:
    s = rec.settings
    size = "" if s is None else f", {s.width}x{s.height}, {s.steps} steps" + (
        f", {s.frames} frames" if s.frames != 1 else "")
    extra = (" · CFG batched" if rec.cfg_batch else "") + (f" · on {rec.backend.split('@')[0]}"
                                                          if rec.backend != "harness" else "")
    return f"{rec.model} on {rec.card_name}{size}: {flag_words(rec.requested)}{extra}"


def trend_png(trend: Trend) -> bytes:
    from matplotlib.figure import Figure

    from harness.analyze.figures import _png
    from harness.analyze.plots import MAX_HEIGHT_IN, backend_style

    names = [(m, label) for m, label in TREND_METRICS if any(m in p.metrics for p in trend.points)][:4]
    colour, _ = backend_style(str(trend.key[8]) if len(trend.key) > 8 else None)
    fig = Figure(figsize=(11, min(MAX_HEIGHT_IN, 2.0 * max(1, -(-len(names) // 2)) + 0.8)))
    axes = fig.subplots(max(1, -(-len(names) // 2)), 2 if len(names) > 1 else 1, squeeze=False).ravel()
    xs = list(range(len(trend.points)))
    ticks = [f"{p.created[:10]}\n{p.git_sha[:7] or p.run_id[:10]}" for p in trend.points]
    changes = trend.changes()
    for ax, (name, label) in zip(axes, names, strict=False):
        scale = 2**20 if name.endswith("_bytes") else 1
        ys = [p.metrics[name] / scale if name in p.metrics else float("nan") for p in trend.points]
        ax.plot(xs, ys, color=colour, marker="o", linewidth=1.4)
        for x, p in zip(xs, trend.points, strict=True):
            if p.fate != "ok":
                ax.axvspan(x - 0.3, x + 0.3, color="#f4cccc", alpha=0.7, linewidth=0)
                ax.text(x, 0.02, p.fate, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=7,
                        color="#7f0000", rotation=90)
        for i, _ in changes:
            ax.axvline(i - 0.5, color="#7f0000", linestyle="--", linewidth=1)
        known = [v for v in ys if v == v]
        move = f" ({(known[-1] / known[0] - 1) * 100:+.1f} % first to last)" if len(known) > 1 and known[0] else ""
        ax.set_title(label + move, fontsize=9, loc="left")
        ax.set_xticks(xs, ticks, fontsize=7.5)
        ax.set_xlim(-0.6, len(xs) - 0.4)
        ax.grid(True, alpha=0.3)
        if known:  # around the values, at least +-3 % wide: a flat line stays flat, a move shows
            lo, hi = min(known), max(known)
            pad = max((hi - lo) * 0.15, abs(hi) * 0.03, 1e-9)
            ax.set_ylim(lo - pad, hi + pad)
    for ax in axes[len(names):]:
        ax.axis("off")
    fig.suptitle(trend.title, fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _point_rows(trend: Trend) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    changed = dict(trend.changes())
    rows, attrs = [], []
    for i, p in enumerate(trend.points):
        m = p.metrics
        rows.append({
            "date": p.created[:16].replace("T", " "), "commit": p.git_sha[:8], "fate": p.fate,
            "runtime peak MiB": _mib(m.get("runtime_peak_reserved_bytes", m.get("runtime_peak_ledger_bytes"))),
            "step ms": "" if "denoise_steady_step_ms" not in m else f"{m['denoise_steady_step_ms']:,.1f}",
            "load peak MiB": _mib(m.get("load_peak_reserved_bytes", m.get("load_peak_ledger_bytes"))),
            "changed": changed.get(i, ""), "run": p.run_id, "scenario": p.scenario, "policy": p.policy,
            "effective": p.effective,
        })
        link = f'<a href="{esc(p.link)}">{esc(p.run_id)}</a>' if p.link else esc(p.run_id)
        attrs.append({"run": f'<span title="{esc(p.source)}">{link}</span>',
                      "changed": f"<b>{esc(changed[i])}</b>" if i in changed else ""})
    return rows, attrs


def _mib(v: float | None) -> str:
    return "" if v is None else f"{v / 2**20:,.0f}"


def render_history(by_sku: dict[str, list[Trend]], title: str = "offload-bench history",
                   min_points: int = 2) -> str:
    body = [f"<header><h1>{esc(title)}</h1><div class=\"machine\">A trend per metric and cell over runs, by date "
            "then commit, per GPU SKU; a dashed red line marks where the fate or the effective flags changed, a "
            "red band a run that did not end ok. Cells seen in one run only are listed at the end of each SKU."
            "</div><nav class=\"muted\">SKUs: " + " ".join(
                f'<a href="#sku-{esc(s)}">{esc(s)}</a>' for s in by_sku) + "</nav></header><main>"]
    for sku, trends in by_sku.items():
        many = sorted((t for t in trends if len(t.points) >= min_points), key=lambda t: -len(t.points))
        once = [t for t in trends if len(t.points) < min_points]
        body.append(f'<h2 id="sku-{esc(sku)}">{esc(sku)} <span class="muted">({len(many)} cells in several runs, '
                    f"{len(once)} in one)</span></h2>")
        for n, t in enumerate(many):
            rows, attrs = _point_rows(t)
            body.append(f'<h3 title="{esc(t.label)}">{esc(t.title)}</h3><div class="scenario trend"><div>'
                        f"{table(rows, f'{sku}-trend-{n}', attrs)}</div><div>"
                        f"{img(trend_png(t), t.title)}</div></div>")
        if once:
            rows = [{"cell": t.title, "date": t.points[0].created[:10], "run": t.points[0].run_id,
                     "fate": t.points[0].fate} for t in once]
            body.append(f"<details><summary>{len(once)} cells seen in one run</summary>"
                        f"{table(rows, f'{sku}-once')}</details>")
    body.append("</main>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{CSS}{TREND_CSS}</style><script>{HEAD_JS}</script></head><body>"
            + "".join(body) + f"<script>{BODY_JS}</script></body></html>\n")


def history_json(by_sku: dict[str, list[Trend]]) -> str:
    """The trends as JSON (for a job that wants the numbers, not the page)."""
    return json.dumps({sku: [{"cell": t.title, "label": t.label, "points": [p.__dict__ for p in t.points]}
                             for t in trends] for sku, trends in by_sku.items()}, indent=1)


def write_history(paths: list[str], out: Path | str, baselines: str | None = None,
                  title: str = "offload-bench history") -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_history(collect(paths, baselines, out), title), encoding="utf-8")
    return out
