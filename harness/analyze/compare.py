"""Compare a run with its SKU's baseline: pure functions over `BaselineCell`s that return verdicts, rendered
separately.

Two questions, kept apart:

- **Validity** (does each cell still get as far as it did?): a cell's progress is how far it got, failed in load <
  failed in encode < ... < ok. Less progress than the baseline is `lost` (ok -> oom is the typical case), more is
  `fixed` (it now loads, or now runs to the end, where it used to run out of memory), the same progress with
  another fate (oom -> crash) is `changed`. A baseline cell the run lacks is `missing`, a run cell the baseline
  lacks is `new`. A cell whose spec changed since the baseline (its `portable_spec_hash` differs: the scenario
  was edited, e.g. `steps`) is `not comparable`: its numbers measure another experiment, so none is judged and
  it never fails the comparison (asv's rule); refreshing the baseline takes the new spec.
- **Metrics** (is a cell that ran in both slower or hungrier?): each metric of each cell gets `regressed` (it grew
  by more than its tolerance), `improved` (it shrank by more than the improvement threshold), `within tolerance`,
  `missing` (the baseline has it, the run does not), `new` (the run has it, the baseline does not) or
  `not compared` (the cell did not get through the phases the metric measures, in the baseline or the run: its
  fate is judged above). So a cell that ran out of memory in denoise in both still has its load metrics compared.

Every metric is smaller-is-better. `Check` is a small regression check in the style of pytest-benchmark's
(`Check.parse("load_peak_reserved_bytes:+1%")`, `fails(baseline, current) -> str | None`).

Timing tolerance from the measured noise: where the baseline cell carries the spread of its measured rounds
(`spread`: (max - min) / median per time metric, from `harness.analyze.baseline.timing_spread`), the tolerance of
e2e_ms, denoise_ms and denoise_steady_step_ms is max(SPREAD_FLOOR, SPREAD_FACTOR x the larger of the baseline's and the
run's spread) instead of the fixed one, so a quiet cell is judged tightly and a noisy one loosely. A baseline cell
without a spread (one measured round, or a baseline from before spreads were kept) keeps the fixed tolerance, and
the output says how many cells did. A `--threshold` override always wins.

The comparison fails on any regressed or missing metric and any lost, changed or missing cell. With
`timing=False` (the CPU profile, where times are noise) only memory metrics and validity are judged; the time
metrics are left out and the summary says so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from tabulate import tabulate

from harness.analyze.baseline import METRIC_BY_NAME, RETIRED_METRICS, Baseline, BaselineCell, metric, metric_order
from harness.common.contract import PHASES, JsonObject, Status
from harness.common.units import MIB

REGRESSED, IMPROVED, WITHIN, MISSING, NEW, NOT_COMPARED = (
    "regressed", "improved", "within tolerance", "missing", "new", "not compared",
)
LOST, FIXED, CHANGED = "lost", "fixed", "changed"
NOT_COMPARABLE = "not comparable"
FAILING_METRIC_VERDICTS = (REGRESSED, MISSING)
FAILING_CELL_VERDICTS = (LOST, CHANGED, MISSING)


# Timing tolerance = max(SPREAD_FLOOR, SPREAD_FACTOR x spread). Floor: the 2 % asked of one cell's rounds,
# plus 1 % for what changes between processes (another GPU of the SKU, its clocks on the day). Factor: the range of
# three rounds is about 1.7 sigma of one; 3 x that range keeps a repeat of the same code inside the tolerance.
SPREAD_FLOOR = 0.03
SPREAD_FACTOR = 3.0
SPREAD_METRICS = ("e2e_ms", "denoise_ms", "denoise_steady_step_ms")


def spread_tolerance(name: str, base: BaselineCell | None, cur: BaselineCell | None) -> float | None:
    """The tolerance of time metric `name` from the measured spread of its rounds, or None (keep the fixed one)
    where the baseline cell has no spread for it. The run's spread counts when it has one: a noisier run widens."""
    if name not in SPREAD_METRICS:
        return None
    measured = base.spread.get(name) if base else None
    if measured is None:
        return None
    run = cur.spread.get(name) if cur else None
    return round(max(SPREAD_FLOOR, SPREAD_FACTOR * max(measured, run or 0.0)), 4)


class CheckSpecError(ValueError):
    """A threshold spec such as 'e2e_ms:+25%' is malformed."""


def relative_change(baseline: float, current: float) -> float:
    """(current - baseline) / baseline; from a zero baseline, 0 if still zero else +/-inf."""
    if baseline == 0:
        return 0.0 if current == 0 else math.copysign(math.inf, current)
    return (current - baseline) / abs(baseline)


@dataclass(frozen=True)
class Check:
    """A metric may grow by at most `tolerance` (a fraction: 0.01 = +1 %) over its baseline value."""

    metric: str
    tolerance: float

    _SPEC = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*\+?\s*([0-9]*\.?[0-9]+)\s*(%?)\s*$")

    @classmethod
    def parse(cls, spec: str) -> Check:
        """'name:+N%' (or 'name:N%', or 'name:0.01' as a fraction)."""
        m = cls._SPEC.match(spec)
        if not m:
            raise CheckSpecError(f"threshold {spec!r}: expected METRIC:+N% (for example e2e_ms:+25%)")
        if m.group(1) not in METRIC_BY_NAME:  # a typo used to pass, its threshold judging nothing
            raise CheckSpecError(f"threshold {spec!r}: unknown metric {m.group(1)!r}; the metrics are: "
                                 f"{', '.join(METRIC_BY_NAME)}")
        value = float(m.group(2))
        return cls(m.group(1), value / 100 if m.group(3) else value)

    def fails(self, baseline: float, current: float) -> str | None:
        """Why `current` is a regression against `baseline`, or None if it is within tolerance."""
        change = relative_change(baseline, current)
        if change > self.tolerance:
            return (
                f"{self.metric} regressed by {_pct(change)} (> +{self.tolerance * 100:g} %): "
                f"{_value(self.metric, baseline)} -> {_value(self.metric, current)}"
            )
        return None

    def __str__(self) -> str:
        return f"{self.metric}:+{self.tolerance * 100:g}%"


@dataclass(frozen=True)
class MetricRow:
    cell_id: str
    metric: str
    baseline: float | None
    current: float | None
    change: float | None  # relative, None where not both present
    tolerance: float
    verdict: str
    note: str = ""


@dataclass(frozen=True)
class CellRow:
    cell_id: str
    verdict: str  # lost | fixed | changed | missing | new | not comparable | unchanged
    baseline_fate: str | None
    current_fate: str | None
    note: str = ""


@dataclass
class Comparison:
    sku: str
    baseline_source: str
    improvement_threshold: float
    cells: list[CellRow] = field(default_factory=list)
    rows: list[MetricRow] = field(default_factory=list)
    timing: bool = True  # False: time metrics were not judged (the CPU profile)
    notes: list[str] = field(default_factory=list)  # one-line caveats shown under the summary

    @property
    def failures(self) -> list[str]:
        """One line per failing cell, then per failing metric of a cell that is in the run."""
        out = [f"{c.cell_id}: {c.verdict} ({c.note})" for c in self.cells if c.verdict in FAILING_CELL_VERDICTS]
        gone = {c.cell_id for c in self.cells if c.verdict == MISSING}
        out += [
            f"{r.cell_id}: {r.metric} {r.verdict}" + (f" ({r.note})" if r.note else "")
            for r in self.rows
            if r.verdict in FAILING_METRIC_VERDICTS and r.cell_id not in gone
        ]
        return out

    @property
    def failed(self) -> bool:
        return bool(self.failures)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def count(self, verdict: str) -> int:
        return sum(r.verdict == verdict for r in self.rows)

    def count_cells(self, verdict: str) -> int:
        return sum(c.verdict == verdict for c in self.cells)


# ------------------------------------------------------------------------------------------------ pure comparison


def needs_phase(name: str) -> int:
    """The index of the last phase a metric needs: load metrics need load, denoise ones denoise, whole-run ones
    (runtime peak, NVML peak, e2e) every phase; a metric is compared only where both cells got through it."""
    if name.startswith("load_"):
        return PHASES.index("load")
    if name.startswith("denoise_"):
        return PHASES.index("denoise")
    return len(PHASES) - 1


def spec_changed(base: BaselineCell | None, cur: BaselineCell | None) -> bool:
    """Both sides carry a portable spec digest and they differ. A side without one (a baseline or record from
    before the digest existed) cannot show a change, so it is compared as before."""
    b, c = base and base.portable_spec_hash, cur and cur.portable_spec_hash
    return bool(b and c and b != c)


def cell_verdict(cell_id: str, base: BaselineCell | None, cur: BaselineCell | None) -> CellRow:
    if cur is None:
        return CellRow(cell_id, MISSING, base.fate if base else None, None, "in the baseline, not in the run")
    if base is None:
        return CellRow(cell_id, NEW, None, cur.fate, "not in the baseline")
    if spec_changed(base, cur):
        return CellRow(
            cell_id, NOT_COMPARABLE, base.fate, cur.fate,
            f"spec changed since the baseline ({base.portable_spec_hash} -> {cur.portable_spec_hash}); "
            "refresh the baseline",
        )
    b, c = base.progress, cur.progress
    if c < b:
        what = "used to run to the end" if base.status is Status.OK else f"used to get further ({base.fate})"
        return CellRow(cell_id, LOST, base.fate, cur.fate, f"{what}, now {cur.fate}")
    if c > b:
        if cur.status is Status.OK:
            now = "now runs to the end"
        elif b <= 0:
            now = f"now loads ({cur.fate})"
        else:
            now = f"now gets further ({cur.fate})"
        return CellRow(cell_id, FIXED, base.fate, cur.fate, f"{now}; used to be {base.fate}")
    if base.fate != cur.fate:
        return CellRow(cell_id, CHANGED, base.fate, cur.fate, f"{base.fate} -> {cur.fate}")
    return CellRow(cell_id, "unchanged", base.fate, cur.fate)


def metric_rows(
    cell_id: str,
    base: BaselineCell | None,
    cur: BaselineCell | None,
    checks: dict[str, Check],
    improvement_threshold: float,
    timing: bool = True,
    overridden: frozenset[str] = frozenset(),
) -> list[MetricRow]:
    base_m = base.metrics if base else {}
    cur_m = cur.metrics if cur else {}
    if not timing:
        base_m = {k: v for k, v in base_m.items() if metric(k).kind != "time"}
        cur_m = {k: v for k, v in cur_m.items() if metric(k).kind != "time"}
    other_spec = spec_changed(base, cur)
    completed = min(base.progress, cur.progress) if base is not None and cur is not None else -1
    rows = []
    for name in sorted(set(base_m) | set(cur_m), key=metric_order):
        check = checks.get(name) or Check(name, metric(name).tolerance)
        from_spread = None if name in overridden else spread_tolerance(name, base, cur)
        if from_spread is not None:
            check = Check(name, from_spread)
        b, c = base_m.get(name), cur_m.get(name)
        change = relative_change(b, c) if b is not None and c is not None else None

        if cur is None:
            verdict, note = MISSING, "cell not in the run"
        elif base is None:
            verdict, note = NEW, "cell not in the baseline"
        elif name in RETIRED_METRICS:  # another meaning under an old name: neither judged nor missing
            verdict, note = NOT_COMPARED, "retired metric: refresh the baseline"
        elif other_spec:
            verdict, note = NOT_COMPARED, "spec changed since the baseline"
        elif needs_phase(name) >= completed:
            verdict, note = NOT_COMPARED, f"baseline {base.fate}, run {cur.fate}"
        elif c is None:
            verdict, note = MISSING, "metric not in the run"
        elif b is None:
            verdict, note = NEW, "metric not in the baseline"
        elif (why := check.fails(b, c)) is not None:
            verdict, note = REGRESSED, why
        elif change is not None and change < -improvement_threshold:
            verdict, note = IMPROVED, f"beyond the {improvement_threshold * 100:g} % improvement threshold"
        else:
            verdict, note = WITHIN, ""
        if from_spread is not None and verdict in (REGRESSED, WITHIN, IMPROVED):
            note = "; ".join(x for x in (note, "tolerance from the rounds' spread") if x)
        rows.append(MetricRow(cell_id, name, b, c, change, check.tolerance, verdict, note))
    return rows


def compare(
    baseline: Baseline,
    current: Mapping[str, BaselineCell],
    overrides: list[Check] | tuple[Check, ...] = (),
    only_scenarios: set[str] | None = None,
    source: str = "baseline",
    only_cards: set[str] | None = None,
    timing: bool = True,
) -> Comparison:
    """Compares `current` (cell id -> cell, as `harness.analyze.baseline.run_cells` makes) with a baseline.
    `overrides` replace the baseline's tolerances for their metrics; `only_scenarios` limits the baseline to
    those scenarios and `only_cards` to those "<scenario>/<card>" pairs (a partial run then does not report the
    others' cells as missing). `timing=False` judges memory and validity only (the CPU profile)."""
    checks = {name: Check(name, tol) for name, tol in baseline.tolerances.items()}
    checks.update({c.metric: c for c in overrides})
    threshold = baseline.improvement_threshold
    base_cells = baseline.cells
    if only_scenarios is not None:
        base_cells = {k: v for k, v in base_cells.items() if k.split("/", 1)[0] in only_scenarios}
    if only_cards is not None:
        base_cells = {k: v for k, v in base_cells.items() if scenario_card(k) in only_cards}
    out = Comparison(baseline.sku, source, threshold, timing=timing)
    order = sorted(base_cells) + [k for k in current if k not in base_cells]
    for cell_id in order:
        base, cur = base_cells.get(cell_id), current.get(cell_id)
        out.cells.append(cell_verdict(cell_id, base, cur))
        out.rows += metric_rows(cell_id, base, cur, checks, threshold, timing,
                                frozenset(c.metric for c in overrides))
    if timing:
        out.notes += spread_notes(base_cells, current, {c.metric for c in overrides})
    for name in sorted({r.metric for r in out.rows if r.metric in RETIRED_METRICS}):
        out.notes.append(f"the baseline's {name} is {RETIRED_METRICS[name]}: not compared with this run; refresh "
                         "the baseline to judge step times")
    return out


def spread_notes(base_cells: Mapping[str, BaselineCell], current: Mapping[str, BaselineCell],
                 overridden: set[str]) -> list[str]:
    """One line on how the timing tolerances were set: from the spread for how many cells, fixed for how many."""
    both = [k for k in base_cells if k in current]
    if not both or set(SPREAD_METRICS) <= overridden:
        return []
    measured = [k for k in both if base_cells[k].spread]
    rule = f"max({SPREAD_FLOOR * 100:g} %, {SPREAD_FACTOR:g} x the larger per-round spread of baseline and run)"
    lines = []
    if measured:
        lines.append(f"timing tolerance of {', '.join(SPREAD_METRICS)} from the measured rounds: {rule}, "
                     f"for {len(measured)} of {len(both)} cells")
    if len(measured) < len(both):
        lines.append(f"{len(both) - len(measured)} of {len(both)} cells keep the fixed timing tolerances: their "
                     "baseline has no per-round spread (one measured round, or made before spreads were kept)")
    return lines


def scenario_card(cell_id: str) -> str:
    """'<scenario>/<card>' of a cell id '<scenario>/<card>/<flags label>[+backend]' (the label has no '/')."""
    return cell_id.rsplit("/", 1)[0]


# ------------------------------------------------------------------------------------------------ rendering


def _pct(change: float | None) -> str:
    if change is None:
        return ""
    if math.isinf(change):
        return "+inf %" if change > 0 else "-inf %"
    return f"{change * 100:+.1f} %"


def _value(name: str, v: float | None) -> str:
    if v is None:
        return ""
    if metric(name).unit == "bytes":
        return f"{v / MIB:,.1f} MiB"
    if metric(name).unit == "ms":
        return f"{v:,.1f} ms"
    return f"{v:,g}"


def validity_table(comp: Comparison) -> str | None:
    rows = [c for c in comp.cells if c.verdict != "unchanged"]
    if not rows:
        return None
    return tabulate(
        [[c.cell_id, c.verdict, c.baseline_fate or "", c.current_fate or "", c.note] for c in rows],
        headers=["cell", "validity", "baseline", "run", "note"],
        tablefmt="github",
    )


def metric_table(comp: Comparison, rows: list[MetricRow] | None = None) -> str:
    return tabulate(
        [
            [r.cell_id, r.metric, _value(r.metric, r.baseline), _value(r.metric, r.current), _pct(r.change),
             f"+{r.tolerance * 100:g} %", r.verdict, r.note]
            for r in (comp.rows if rows is None else rows)
        ],
        headers=["cell", "metric", "baseline", "current", "change", "tolerance", "verdict", "note"],
        tablefmt="github",
        disable_numparse=True,
    )


def summary(comp: Comparison) -> str:
    metric_counts = ", ".join(
        f"{n} {v}" for v in (REGRESSED, MISSING, IMPROVED, WITHIN, NEW, NOT_COMPARED) if (n := comp.count(v))
    )
    cell_counts = ", ".join(
        f"{n} {v}" for v in (LOST, CHANGED, MISSING, FIXED, NEW, NOT_COMPARABLE) if (n := comp.count_cells(v))
    )
    verdict = "FAIL" if comp.failed else "PASS"
    scope = "" if comp.timing else "; memory and validity only (CPU profile: timing not compared)"
    return (
        f"{verdict}: {len(comp.cells)} cells vs {comp.baseline_source} (SKU {comp.sku}); "
        f"cells: {cell_counts or 'all as in the baseline'}; metrics: {metric_counts or 'none'}{scope}"
    )


def render(comp: Comparison, markdown: bool = False, all_rows: bool = True) -> str:
    """The validity section (lost/fixed/changed/missing/new cells) above the per-metric table; with `all_rows`
    False, the metric table keeps only the rows that fail (regressed, missing) and says how many it left out."""
    out = []
    if markdown:
        out += [f"# Comparison with the {comp.sku} baseline", "", f"**{summary(comp)}**", ""]
    else:
        out += [summary(comp), ""]
    for note in comp.notes:
        out += [f"Note: {note}", ""]
    out += ["## Validity (cells whose fate changed)" if markdown else "Validity (cells whose fate changed):", ""]
    out += [validity_table(comp) or "Every cell ends as it did in the baseline.", ""]
    out += ["## Metrics" if markdown else "Metrics:", ""]
    gone = {c.cell_id for c in comp.cells if c.verdict == MISSING}  # said once, in the validity table
    shown = comp.rows if all_rows else [r for r in comp.rows
                                        if r.verdict in FAILING_METRIC_VERDICTS and r.cell_id not in gone]
    if shown:
        out += [metric_table(comp, shown), ""]
    if len(shown) < len(comp.rows):
        out += [f"{len(comp.rows) - len(shown)} metric rows within tolerance, improved, new or not compared are "
                "not shown (--all shows every row).", ""]
    out.append(
        "Every metric is smaller-is-better: `regressed` = grew by more than its tolerance, `improved` = shrank by "
        f"more than {comp.improvement_threshold * 100:g} %. Memory: `reserved` = PyTorch allocator reserved, "
        "`ledger` = harness ledger (CPU profile), `nvml_proc` = NVML per-process. `not compared` = the cell did "
        "not get through the phases the metric measures, in the baseline or the run (see validity)."
    )
    if any(c.verdict == FIXED for c in comp.cells) or comp.count(IMPROVED):
        out.append("")
        out.append("Cells were fixed or metrics improved: refresh the baseline (`python -m harness baseline RUN`).")
    return "\n".join(out) + "\n"


def gab_entries(current: Mapping[str, BaselineCell], sku: str | None = None) -> list[JsonObject]:
    """github-action-benchmark `customSmallerIsBetter` entries ({name, unit, value}) of the cells that ran to the
    end (a failed cell's partial numbers would draw misleading points). Memory in MiB, time in ms. They are
    benchmark.json's lines: JSON is what this function makes."""
    out = []
    for cell_id in sorted(current):
        cell = current[cell_id]
        if cell.status is not Status.OK:
            continue
        for name in sorted(cell.metrics, key=metric_order):
            v = cell.metrics[name]
            m = metric(name)
            unit, value = ("MiB", round(v / MIB, 1)) if m.unit == "bytes" else (m.unit or "value", round(v, 3))
            entry: JsonObject = {"name": f"{cell_id} {name}", "unit": unit, "value": value}
            if sku:
                entry["extra"] = f"sku {sku}"
            out.append(entry)
    return out

