"""What a run says, in a few lines, before any table: the fates by card, the seed assertion's verdict, the
regressions against the SKU's baseline (where one exists), and the pick per card.

- Fates by card: how many cells ended how, per card (a copy of another cell's record counts once, as its cell).
- The seed assertion: SGLang #26925's guard, the `lowest_peak` expectation (dit_cpu_offload + layerwise loads and
  peaks lowest), on each scenario of the run that declares it; the other expectations are counted. The verdicts are
  the run's (`harness.analyze.readout`: written at its end, or judged once for a records file without them).
- Regressions: `harness.analyze.compare` of the run's cells with `results/baselines/<sku>.json` (or the folder
  given), limited to the scenario/card pairs the run has; only what fails or cannot be compared is listed.
- The pick: per scenario and card, the fastest cell that ran within its card (`frontier.frontier_rows`).

`build_summary` gathers it (pure, but for reading the baseline, and the scenario files where it is given no
verdicts); `summary_markdown`, `harness.analyze.report` and `harness.analyze.html` render it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from harness.analyze.compare import (
    FAILING_CELL_VERDICTS,
    FAILING_METRIC_VERDICTS,
    NOT_COMPARABLE,
    Comparison,
    scenario_card,
)
from harness.analyze.expect import ScenarioVerdicts, Verdict, run_verdicts
from harness.common.contract import CellRecord, Status, is_probe

SEED_CHECK = "lowest_peak"


@dataclass(frozen=True)
class Check:
    scenario: str
    card: str
    check: str
    passed: bool
    message: str
    note: str = ""  # "not re-evaluated here", "expected to fail: ..."
    judged_here: bool = True  # False: the verdict needs latents files that stayed on the machine that ran the cells


@dataclass(frozen=True)
class Pick:
    scenario: str
    card: str
    cell: CellRecord
    step_ms: float | None
    runtime_peak: int | None


@dataclass
class RunSummary:
    fates: dict[str, Counter[str]] = field(default_factory=dict)  # card -> fate -> cells
    verdicts: list[ScenarioVerdicts] = field(default_factory=list)  # the run's, per scenario
    picks: list[Pick] = field(default_factory=list)
    comparison: Comparison | None = None
    baseline_note: str = ""  # why nothing was compared, or the baseline's path

    @property
    def checks(self) -> list[Check]:
        """Every verdict of the run, with its scenario and the note a reader needs."""
        return [Check(s.scenario, v.card, v.check, v.passed, v.message, _note(v, s.xfail),
                      not v.latents_elsewhere)
                for s in self.verdicts for v in s.verdicts]

    def of_scenario(self, name: str) -> ScenarioVerdicts | None:
        return next((s for s in self.verdicts if s.scenario == name), None)

    @property
    def seed(self) -> list[Check]:
        return [c for c in self.checks if c.check == SEED_CHECK]

    @property
    def regressions(self) -> list[str]:
        """One line per failing cell or metric, then per cell whose spec changed (not comparable)."""
        comp = self.comparison
        if comp is None:
            return []
        gone = {c.cell_id for c in comp.cells if c.verdict == "missing"}
        out = [f"{c.cell_id}: {c.verdict}" + (f" ({c.note})" if c.note else "")
               for c in comp.cells if c.verdict in FAILING_CELL_VERDICTS or c.verdict == NOT_COMPARABLE]
        out += [f"{r.cell_id}: {r.metric} {r.verdict}" + (f" ({_pct(r.change)})" if r.change is not None else "")
                + (f"; {r.note}" if r.note and r.change is None else "")
                for r in comp.rows if r.verdict in FAILING_METRIC_VERDICTS and r.cell_id not in gone]
        return out


def _pct(change: float) -> str:
    return f"{change * 100:+.1f} %"


def fates_by_card(records: list[CellRecord]) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = {}
    for r in records:
        out.setdefault(str(r.card_name), Counter())[r.fate] += 1
    return out


def _note(v: Verdict, xfail: str | None) -> str:
    if v.latents_elsewhere:
        return "not re-evaluated here: the latents files stay on the machine that ran the cells"
    return f"expected to fail: {xfail}" if xfail else ""


def picks(records: list[CellRecord]) -> list[Pick]:
    from harness.analyze.frontier import frontier_rows

    out = []
    by_group: dict[tuple[str, str], list[CellRecord]] = {}
    for r in records:
        if not is_probe(r.scenario):
            by_group.setdefault((str(r.scenario), str(r.card_name)), []).append(r)
    for (scenario, card), recs in by_group.items():
        rows = frontier_rows(recs)
        best = next((row for row in rows if row["fastest that fits"]), None)
        if best is None:
            continue
        cell = next(r for r in recs if r.label == best["cell"] and r.status is Status.OK and not r.same_as)
        out.append(Pick(scenario, card, cell, cell.steady_step_ms(), cell.peaks.runtime))
    return out


def baseline_comparison(records: list[CellRecord], baselines_dir: Path | str | None = None
                        ) -> tuple[Comparison | None, str]:
    """The run compared with its SKU's baseline, limited to its scenario/card pairs; (None, why) where the run
    has no single SKU or the SKU no baseline."""
    from harness.analyze.baseline import BaselineError, baseline_path, read_baseline, run_cells, run_sku
    from harness.analyze.compare import compare

    try:
        sku = run_sku(records)
    except BaselineError as e:
        return None, f"not compared: {e}"
    path = baseline_path(sku, baselines_dir)
    if not path.exists():
        return None, f"no baseline for SKU {sku} ({path.name})"
    try:
        baseline = read_baseline(path)
    except BaselineError as e:
        return None, f"not compared: {e}"
    cells = run_cells(records, sku)
    if not cells:
        return None, "not compared: no cell of the run measured anything"
    shown = f"results/baselines/{path.name}" if baselines_dir is None else str(path)
    comp = compare(baseline, cells, only_cards={scenario_card(c) for c in cells}, source=shown,
                   timing=sku != "cpu")
    return comp, shown


def build_summary(records: list[CellRecord], baselines_dir: Path | str | None = None,
                  compare_baseline: bool = True, verdicts: list[ScenarioVerdicts] | None = None) -> RunSummary:
    """The summary of a run: its verdicts as given (a `readout`'s), else judged now, once (`expect.run_verdicts`:
    the report's one way to them for records it is handed without)."""
    comparison, note = (baseline_comparison(records, baselines_dir) if compare_baseline
                        else (None, "not compared"))
    judged = verdicts if verdicts is not None else run_verdicts(records)
    return RunSummary(fates_by_card(records), judged, picks(records), comparison, note)


def _mib(v: int | None) -> str:
    return "n/a" if v is None else f"{v / 2**20:,.0f} MiB"


def fates_line(counts: Counter[str]) -> str:
    order = sorted(counts, key=lambda f: (f != "ok", f))
    return ", ".join(f"{counts[f]} {f}" for f in order)


def baseline_verdict(s: RunSummary) -> str:
    comp = s.comparison
    if comp is None:
        return s.baseline_note
    regressed = sum(r.verdict == "regressed" for r in comp.rows)
    lost = sum(c.verdict in FAILING_CELL_VERDICTS for c in comp.cells)
    stale = sum(c.verdict == NOT_COMPARABLE for c in comp.cells)
    verdict = "FAIL" if comp.failed else "PASS"
    parts = [f"{regressed} metric(s) regressed", f"{lost} cell(s) lost, changed or missing"]
    if stale:
        parts.append(f"{stale} cell(s) not comparable (spec changed)")
    scope = "" if comp.timing else "; memory and validity only (CPU)"
    return f"{verdict} against {comp.baseline_source}: {', '.join(parts)}{scope}"


def summary_markdown(s: RunSummary) -> list[str]:
    """The summary as markdown lines ("## Summary" and its bullets)."""
    out = ["## Summary", ""]
    out.append("- **Fates by card:** " + "; ".join(f"{card}: {fates_line(c)}" for card, c in s.fates.items()))
    seed = s.seed
    if seed:
        out.append("- **Seed assertion** (#26925: dit_cpu_offload + layerwise loads and peaks lowest): "
                   + "; ".join(f"{c.scenario} on {c.card}: {'PASS' if c.passed else 'FAIL'}"
                               + (" (expected to fail)" if c.note.startswith("expected") else "") for c in seed))
    else:
        out.append("- **Seed assertion** (#26925): not in this run")
    if s.checks:
        # a check this machine could not judge (latents left on the GPU box) is counted apart, as the HTML page does
        unjudged = [c for c in s.checks if not c.passed and not c.judged_here]
        failed = [c for c in s.checks if not c.passed and c.judged_here]
        judged = len(s.checks) - len(unjudged)
        line = f"- **Expectations:** {judged - len(failed)} of {judged} checks pass"
        for what, group in (("failing", failed), ("not re-evaluated here", unjudged)):
            if group:
                line += f"; {what}: " + ", ".join(
                    f"{c.check} ({c.scenario} on {c.card}"
                    f"{', ' + c.note.split(':')[0] if c.note and c.judged_here else ''})" for c in group)
        out.append(line)
    out.append(f"- **Baseline:** {baseline_verdict(s)}")
    shown = s.regressions
    for line in shown[:12]:
        out.append(f"  - `{line}`")
    if len(shown) > 12:
        out.append(f"  - ... and {len(shown) - 12} more (python -m harness compare RUN)")
    if s.picks:
        out.append("- **Pick per card** (the fastest cell that ran within its card):")
        for p in s.picks:
            step = "n/a" if p.step_ms is None else f"{p.step_ms:,.0f} ms/step"
            out.append(f"  - {p.card} ({p.scenario}): `{p.cell.label}`, {step}, runtime peak {_mib(p.runtime_peak)}")
    return [*out, ""]
