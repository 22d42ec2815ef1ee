"""One self-contained HTML page per run: `report --html` (and `make report`).

The summary first (`harness.analyze.summary`: fates by card, the seed assertion's verdict, regressions against the
SKU's baseline, the pick per card), then one section per scenario with its table and, beside it, its figures
(per card: peak against step time with the Pareto front and the cells that ran out of memory at the card line;
memory per phase; host memory with pinned bytes by who pinned them; plan against measured where the records carry
plans; baseline against current per metric where the summary compared the run with its SKU's baseline, captioned
with that file; memory over time).
Cells read as words (`labels.cell_words`) with the compact label on hover; every table sorts on a header click
(a few lines of inline JavaScript); the figures are inline base64 PNGs, so the page needs no network when viewed.

Opened as `page.html#selftest`, the page checks itself once loaded (every image decoded, a table sorts both ways,
no script error) and writes the result as JSON into `<pre id="selftest-result">` (the browser test reads it with
headless Chromium's --dump-dom).
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from harness.analyze.compare import Comparison, scenario_card
from harness.analyze.labels import cell_words
from harness.analyze.summary import RunSummary, baseline_verdict, build_summary, fates_line
from harness.common.contract import CellRecord, is_probe

CSS = """
:root { --fg:#1d1d1f; --muted:#5f6368; --line:#d9dce1; --bg:#fff; --band:#f6f7f9; --ok:#1e7d32; --bad:#b3261e; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); margin: 0;
       background: var(--bg); }
header, main { padding: 0 24px; max-width: 1900px; margin: 0 auto; }
header { border-bottom: 1px solid var(--line); padding-top: 12px; padding-bottom: 8px; }
h1 { font-size: 22px; margin: 4px 0; } h2 { font-size: 18px; margin: 28px 0 8px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
.muted, .machine { color: var(--muted); font-size: 13px; }
nav a { margin-right: 14px; white-space: nowrap; }
.summary { display: grid; grid-template-columns: repeat(auto-fit, minmax(360px, 1fr)); gap: 12px 24px;
           background: var(--band); border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; }
.summary h3 { margin-top: 4px; }
.badge { display: inline-block; padding: 0 7px; border-radius: 10px; font-weight: 600; font-size: 12px;
         color: #fff; background: var(--muted); }
.badge.pass { background: var(--ok); } .badge.fail { background: var(--bad); } .badge.xfail { background: #9a6700; }
.badge.unknown { background: #6e7781; }
.scenario { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 16px; align-items: start; }
@media (max-width: 1300px) { .scenario { grid-template-columns: minmax(0, 1fr); } }
.tablewrap { overflow-x: auto; border: 1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; font-size: 12.5px; width: 100%; }
th, td { padding: 4px 8px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
th { background: var(--band); position: sticky; top: 0; cursor: pointer; user-select: none; font-weight: 600; }
th[aria-sort=ascending]::after { content: " \\25B2"; font-size: 10px; }
th[aria-sort=descending]::after { content: " \\25BC"; font-size: 10px; }
tr:hover td { background: #fafbfc; }
td.cell { min-width: 220px; }
.fate-ok, .fate-bad { white-space: nowrap; }
.fate-ok { color: var(--ok); } .fate-bad { color: var(--bad); font-weight: 600; }
figure { margin: 0 0 14px; } figcaption { color: var(--muted); font-size: 12px; }
.summary > div.wide { grid-column: span 2; }
@media (max-width: 900px) { .summary > div.wide { grid-column: auto; } }
img.plot.square { width: 55%; }
img.plot { width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; cursor: zoom-in; }
img.plot.zoom { position: fixed; inset: 2vh 2vw; width: 96vw; height: 96vh; object-fit: contain; z-index: 10;
                background: #fff; cursor: zoom-out; box-shadow: 0 0 0 100vmax rgba(0,0,0,.45); }
ul.verdicts { padding-left: 18px; margin: 6px 0; } ul.verdicts li { margin: 2px 0; }
details { margin: 8px 0; } summary { cursor: pointer; color: #0b57d0; }
code { font-size: 12px; background: var(--band); padding: 0 3px; border-radius: 3px; }
"""

HEAD_JS = """window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(String(e.message || e)); });
(function () { var ce = console.error; console.error = function () {
  window.__errors.push(Array.prototype.join.call(arguments, " ")); ce.apply(console, arguments); }; })();"""

BODY_JS = """function cellValue(td) {
  var v = td.getAttribute("data-v");
  if (v !== null && v !== "") { return parseFloat(v); }
  return td.textContent.trim().toLowerCase();
}
function sortTable(th) {
  var table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
  var dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
  table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
  th.setAttribute("aria-sort", dir);
  var rows = Array.prototype.slice.call(body.rows);
  rows.sort(function (a, b) {
    var x = cellValue(a.cells[col]), y = cellValue(b.cells[col]);
    var xe = x === "" || (typeof x === "number" && isNaN(x)), ye = y === "" || (typeof y === "number" && isNaN(y));
    if (xe || ye) { return xe === ye ? 0 : xe ? 1 : -1; }  /* empty cells last, either way */
    if (typeof x !== typeof y) { x = String(x); y = String(y); }
    var c = x < y ? -1 : x > y ? 1 : 0;
    return dir === "ascending" ? c : -c;
  });
  rows.forEach(function (r) { body.appendChild(r); });
}
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.title = (th.title ? th.title + " | " : "") + "click to sort";
  th.addEventListener("click", function () { sortTable(th); });
});
document.querySelectorAll("img.plot").forEach(function (img) {
  img.addEventListener("click", function () { img.classList.toggle("zoom"); });
});
function selftest() {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                   .map(function (i) { return i.alt; });
  var sorted = null;
  var tables = document.querySelectorAll("table.sortable");
  for (var t = 0; t < tables.length && !sorted; t++) {
    var rows = tables[t].tBodies[0].rows, ths = tables[t].tHead.rows[0].cells;
    if (rows.length < 2) { continue; }
    for (var c = 0; c < ths.length && !sorted; c++) {
      var vals = Array.prototype.map.call(rows, function (r) { return r.cells[c].getAttribute("data-v"); })
                 .filter(function (v) { return v !== null && v !== ""; }).map(parseFloat);
      if (vals.length < 2 || new Set(vals).size < 2) { continue; }
      var read = function () {
        return Array.prototype.map.call(tables[t].tBodies[0].rows, function (r) {
          return r.cells[c].getAttribute("data-v"); }).filter(function (v) { return v !== null && v !== ""; })
          .map(parseFloat);
      };
      ths[c].click(); var up = read(); ths[c].click(); var down = read();
      var ordered = function (a, s) { for (var i = 1; i < a.length; i++) { if (s * (a[i] - a[i - 1]) < 0) {
        return false; } } return true; };
      sorted = { table: tables[t].id, column: ths[c].textContent, rows: rows.length,
                 ascending: ordered(up, 1), descending: ordered(down, -1), first_after_click: up[0] };
    }
  }
  var out = { images: imgs.length, broken: broken, errors: window.__errors, sort: sorted,
              tables: tables.length };
  var pre = document.createElement("pre");
  pre.id = "selftest-result"; pre.hidden = true; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}
if (location.hash === "#selftest") {
  if (document.readyState === "complete") { selftest(); } else { window.addEventListener("load", selftest); }
}"""

_NUMBER = re.compile(r"^-?[\d,]*\.?\d+(x faster|x slower| %)?$")


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _numeric(text: str) -> float | None:
    t = text.strip().replace("**", "")
    if not t or not _NUMBER.match(t.split(" ")[0] if t.endswith(("faster", "slower")) else t):
        return None
    try:
        return float(t.split(" ")[0].replace(",", "").replace("x", "").replace("%", "").strip())
    except ValueError:
        return None


def table(rows: list[Mapping[str, Any]], table_id: str, cell_attrs: list[dict[str, str]] | None = None,
          headers_title: Mapping[str, str] | None = None) -> str:
    """A sortable table of `rows` (dicts by header). Numeric text gets a data-v to sort by; `cell_attrs[i]`
    maps a header to raw HTML for that cell of row i (words with a hover title, say)."""
    if not rows:
        return ""
    headers = list(dict.fromkeys(k for r in rows for k in r))
    numeric = {h: all(_numeric(str(r.get(h, ""))) is not None or str(r.get(h, "")).strip() == "" for r in rows)
               and any(str(r.get(h, "")).strip() for r in rows) for h in headers}
    out = [f'<div class="tablewrap"><table class="sortable" id="{esc(table_id)}"><thead><tr>']
    for h in headers:
        title = f' title="{esc(headers_title[h])}"' if headers_title and h in headers_title else ""
        out.append(f'<th class="{"num" if numeric[h] else ""}"{title}>{esc(h.strip())}</th>')
    out.append("</tr></thead><tbody>")
    for i, r in enumerate(rows):
        out.append("<tr>")
        for h in headers:
            raw = (cell_attrs[i] if cell_attrs else {}).get(h)
            text = str(r.get(h, "")).replace("**", "")
            value = _numeric(text)
            v = "" if value is None else f' data-v="{value:g}"'
            cls = ' class="num"' if numeric[h] else ""
            out.append(f"<td{cls}{v}>{raw if raw is not None else esc(text)}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def img(png: bytes, alt: str, caption: str = "", square: bool = False) -> str:
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    cls = "plot square" if square else "plot"
    return f'<figure><img class="{cls}" alt="{esc(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def badge(passed: bool, expected_fail: bool = False, judged_here: bool = True) -> str:
    """PASS / FAIL / expected FAIL, or "NOT RE-EVALUATED" (grey) for a check this machine cannot judge (its latents
    files stayed on the GPU machine): it is neither a pass nor a failure here."""
    if not judged_here:
        return '<span class="badge unknown" title="the latents files stay on the machine that ran the cells">' \
               'NOT RE-EVALUATED</span>'
    if passed:
        return '<span class="badge pass">PASS</span>'
    return f'<span class="badge {"xfail" if expected_fail else "fail"}">FAIL</span>'


def words_cell(rec: CellRecord) -> str:
    return f'<span title="{esc(rec.label)}">{esc(cell_words(rec))}</span>'


def fate_cell(rec: CellRecord, text: str, title: str | None = None) -> str:
    cls = "fate-ok" if rec.status == "ok" else "fate-bad" if rec.status.unexpected or rec.status == "oom" else ""
    hover = title or rec.reason
    attr = f' title="{esc(hover)}"' if hover else ""
    return f'<span class="{cls}"{attr}>{esc(text)}</span>'


# ------------------------------------------------------------------------------------------------ the summary


def summary_html(s: RunSummary) -> str:
    fates = sorted({f for c in s.fates.values() for f in c}, key=lambda f: (f != "ok", f))
    fate_rows = [{"card": card, **{f: counts.get(f, "") for f in fates}} for card, counts in s.fates.items()]
    parts = ['<section class="summary" id="summary">']
    parts.append(f"<div><h3>Fates by card</h3>{table(fate_rows, 'fates')}</div>")
    seed = s.seed
    items = "".join(
        f'<li>{badge(c.passed, c.note.startswith("expected"))} {esc(c.scenario)} on {esc(c.card)}: '
        f'<span class="muted">{esc(c.message)}</span></li>' for c in seed)
    parts.append("<div><h3>Seed assertion</h3><p class=\"muted\">SGLang #26925: dit_cpu_offload + layerwise loads "
                 "and peaks lowest of our runtime's cells (the scenario's <code>lowest_peak</code>).</p>"
                 + (f'<ul class="verdicts">{items}</ul>' if seed else "<p>Not in this run.</p>"))
    if s.checks:
        failed = [c for c in s.checks if not c.passed]
        unjudged = sum(not c.judged_here for c in failed)
        judged = len(s.checks) - unjudged
        parts.append(f"<p>Expectations: {judged - len(failed) + unjudged} of {judged} checks pass"
                     + (f"; {unjudged} not re-evaluated here" if unjudged else "") + ".</p>")
        if failed:
            parts.append('<ul class="verdicts">' + "".join(
                f'<li>{badge(False, c.note.startswith("expected"), c.judged_here)} <b>{esc(c.check)}</b> '
                f'({esc(c.scenario)} on {esc(c.card)}){": " + esc(c.note) if c.note else ""}</li>'
                for c in failed) + "</ul>")
    parts.append("</div>")
    comp = s.comparison
    base = f"<div><h3>Against the baseline</h3><p>{badge(not comp.failed) + ' ' if comp else ''}"
    base += f"{esc(baseline_verdict(s))}</p>"
    lines = s.regressions
    if lines:
        base += '<ul class="verdicts">' + "".join(f"<li><code>{esc(line)}</code></li>" for line in lines[:20])
        base += (f"<li>... and {len(lines) - 20} more: <code>python -m harness compare RUN</code></li>"
                 if len(lines) > 20 else "") + "</ul>"
    parts.append(base + "</div>")
    pick_rows = [{"card": p.card, "scenario": p.scenario, "pick": p.cell.label,
                  "ms/step": "" if p.step_ms is None else f"{p.step_ms:,.0f}",
                  "runtime peak MiB": "" if p.runtime_peak is None else f"{p.runtime_peak / 2**20:,.0f}"}
                 for p in s.picks]
    attrs = [{"pick": words_cell(p.cell), "scenario": f'<a href="#{_anchor(p.scenario)}">{esc(p.scenario)}</a>'}
             for p in s.picks]
    parts.append("<div class=\"wide\"><h3>Pick per card</h3><p class=\"muted\">The fastest cell that ran within "
                 "its card (median steady denoise step).</p>"
                 + (table(pick_rows, "picks", attrs) or "<p>No cell ran.</p>") + "</div>")
    parts.append("</section>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------------ the scenarios


def _anchor(name: str) -> str:
    return "s-" + re.sub(r"[^A-Za-z0-9_-]+", "-", name)


def _numbers(records: Iterable[CellRecord]) -> dict[str, int]:
    """Each cell's number in its (scenario, card) figures (as `plots.pareto_plot` numbers them)."""
    out: dict[str, int] = {}
    per: dict[str | None, int] = {}
    for r in records:
        if r.same_as:
            continue
        per[r.card_name] = per.get(r.card_name, 0) + 1
        out[r.cell_id] = per[r.card_name]
    return out


def scenario_table(name: str, recs: list[CellRecord]) -> str:
    from harness.analyze.report import cell_row

    numbers = _numbers(recs)
    rows, attrs = [], []
    for r in recs:
        full = {**cell_row(r), "requested": r.label}
        # what a reader compares first (the cell, its fate, its peak and step), then the rest of the columns
        first = ["requested", "status", *(h for h in full if h.startswith(("runtime peak", "denoise ms/step"))),
                 "card"]
        row = {"#": str(numbers.get(r.cell_id, "")), **{h: full[h] for h in first}, **full}
        rows.append(row)
        # a cell not rerun says which numbered cell it shares its effective flags with (the markdown's compact
        # "[same as cpu1-lw0-...]" wrapped a letter group per line in this column)
        status = (f"{r.fate} (= #{numbers[r.same_as]})" if r.same_as in numbers else row["status"])
        title = f"same effective flags as {r.same_as}: not rerun" if r.same_as else None
        attrs.append({"requested": words_cell(r), "status": fate_cell(r, status, title)})
    titles = {"requested": "the requested flags in words; hover a cell for its compact label",
              "#": "the cell's number in the figures of its card"}
    return table(rows, _anchor(name) + "-cells", attrs, titles)


def _extra_tables(name: str, recs: list[CellRecord]) -> str:
    from harness.analyze.frontier import frontier_rows
    from harness.analyze.roofline import roofline_rows
    from harness.plan.planner import plan_rows

    out = []
    for title, rows, key in (("Peak against step time (Pareto front, fastest that fits)", frontier_rows(recs),
                              "frontier"),
                             ("Layerwise roofline", roofline_rows(recs), "roofline"),
                             ("Plan vs measured", plan_rows(recs), "plan")):
        if len(rows) > (1 if key == "frontier" else 0):
            out.append(f"<details><summary>{esc(title)} ({len(rows)} rows)</summary>"
                       f"{table(rows, _anchor(name) + '-' + key)}</details>")
    return "".join(out)


def _verdicts(name: str, s: RunSummary) -> str:
    mine = [c for c in s.checks if c.scenario == name]
    if not mine:
        return ""
    return '<ul class="verdicts">' + "".join(
        f'<li>{badge(c.passed, c.note.startswith("expected"), c.judged_here)} <b>{esc(c.check)}</b> on {esc(c.card)}: '
        f'<span class="muted">{esc(c.note + ": " if c.note else "")}{esc(c.message)}</span></li>' for c in mine
    ) + "</ul>"


def baseline_figure(name: str, card: str, comparison: Comparison | None) -> str:
    """Baseline against current per metric for this scenario on this card (`figures.baseline_png` on the
    comparison's rows of it), captioned with the baseline file; "" where there is no comparison or nothing to draw."""
    from harness.analyze.figures import baseline_png

    if comparison is None:
        return ""
    rows = [r for r in comparison.rows if scenario_card(r.cell_id) == f"{name}/{card}"]
    png = baseline_png(rows, f"{name} on {card}: baseline vs current")
    if png is None:
        return ""
    return img(png, f"{name} on {card}: baseline vs current",
               f"Against the baseline {comparison.baseline_source}: per metric and cell, the baseline (grey) and "
               "this run (blue; red where the metric regressed or is missing).")


def scenario_figures(name: str, recs: list[CellRecord], comparison: Comparison | None = None) -> str:
    from harness.analyze.figures import host_memory_png, phase_memory_png, plan_png, png_of
    from harness.analyze.plots import pareto_plot, trace_plot

    if is_probe(name):
        return '<p class="muted">A capacity probe: its table is its picture.</p>'
    out = []
    by_card: dict[str, list[CellRecord]] = {}
    for r in recs:
        by_card.setdefault(str(r.card_name), []).append(r)
    for card, mine in by_card.items():
        out.append(f"<h3>{esc(card)}</h3>")
        out.append(img(png_of(pareto_plot, mine, f"{name} on {card}: peak vs denoise step"),
                       f"{name} on {card}: peak memory against ms/step",
                       "Peak device memory against ms/step; one colour per backend; crosses on the card line: "
                       "cells that ran out of memory. Click to enlarge."))
        out.append(img(phase_memory_png(mine, f"{name} on {card}: device memory per phase"),
                       f"{name} on {card}: memory per phase",
                       "Per phase: allocated, allocator cache above it, and context (NVML minus reserved)."))
        out.append(img(host_memory_png(mine, f"{name} on {card}: host memory"),
                       f"{name} on {card}: host memory",
                       "Host memory per cell: RSS peak, and pinned bytes by who pinned them (the harness's ledger, "
                       "torch's caching host allocator, SGLang's own registrations), in the colour of the backend "
                       "that pins that way; at the right, where SGLang's managers hosted each layer group."))
        plan = plan_png(mine, f"{name} on {card}: plan vs measured")
        if plan:
            out.append(img(plan, f"{name} on {card}: plan vs measured",
                           "Planned against measured reserved peak per phase: on the diagonal when the plan "
                           "is right.", square=True))
        out.append(baseline_figure(name, card, comparison))
        out.append(img(png_of(trace_plot, mine, f"{name} on {card}: memory over time"),
                       f"{name} on {card}: memory over time", "Memory over time per cell, phases shaded."))
    return "".join(out)


def render_html(records: list[CellRecord], title: str = "offload-bench run", summary: RunSummary | None = None,
                plots: bool = True) -> str:
    from harness.analyze.report import _machine_line

    s = summary if summary is not None else build_summary(records)
    by_scenario: dict[str, list[CellRecord]] = {}
    for r in records:
        by_scenario.setdefault(str(r.scenario), []).append(r)
    machine = " ".join(_machine_line(records)).strip().removeprefix("Machine: ")
    nav = " ".join(
        f'<a href="#{_anchor(n)}" title="{esc(fates_line(_count(recs)))}">{esc(n)}</a>'
        for n, recs in by_scenario.items())
    body = [f"<header><h1>{esc(title)}</h1><div class=\"machine\">{esc(machine)}</div>"
            f"<nav class=\"muted\">Scenarios: {nav}</nav></header><main>", summary_html(s)]
    for name, recs in by_scenario.items():
        body.append(f'<h2 id="{_anchor(name)}">{esc(name)} <span class="muted">({esc(fates_line(_count(recs)))})'
                    "</span></h2>")
        left = scenario_table(name, recs) + _verdicts(name, s) + _extra_tables(name, recs)
        messages = sorted({m for r in recs for m in r.messages})
        if messages:
            left += "<details><summary>Policy messages</summary><ul>" + "".join(
                f"<li><code>{esc(m)}</code></li>" for m in messages) + "</ul></details>"
        right = scenario_figures(name, recs, s.comparison) if plots else ""
        body.append(f'<div class="scenario"><div>{left}</div><div>{right}</div></div>')
    body.append('<p class="muted">Counters: <b>alloc reserved/allocated</b>: PyTorch caching-allocator peaks (reset '
                "per phase); <b>NVML per-process</b>: polled every 10 ms, includes the CUDA context; <b>ledger</b>: "
                "weight bytes the harness placed on the device (the CPU profile's only device counter). A cell that "
                "ran out of memory needed more than its card, whatever its last measured peak.</p></main>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style><script>{HEAD_JS}</script></head><body>"
            + "".join(body) + f"<script>{BODY_JS}</script></body></html>\n")


def _count(recs: list[CellRecord]) -> Any:
    from collections import Counter

    return Counter(r.fate for r in recs)


def write_html(records: list[CellRecord], path: Path | str, title: str = "offload-bench run",
               summary: RunSummary | None = None, plots: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(records, title, summary, plots), encoding="utf-8")
    return path
