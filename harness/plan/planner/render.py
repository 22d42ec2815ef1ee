"""Plans against records as table rows (`plan_rows`): the judging is `harness.plan.planner.judge`'s; this module
only formats its checks (reserved peaks in MiB, steps in s, errors in per cent).
"""

from __future__ import annotations

from collections.abc import Iterable

from harness.common.contract import (
    CellRecord,
)
from harness.common.units import MIB
from harness.plan.planner.judge import check_record, gpu_cell_that_ran


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:+.1f} %"


def _mib(v: float | None) -> str:
    return "" if v is None else f"{v / MIB:,.0f}"


def plan_rows(records: Iterable[CellRecord]) -> list[dict[str, str]]:
    """Predicted vs measured, one row per GPU cell the planner models (reserved peaks in MiB, steps in s; errors
    are measured / predicted - 1); a cell it cannot plan shows its measurements and why ("not planned: ...")."""
    rows = []
    for r in records:
        if not gpu_cell_that_ran(r):
            continue
        c = check_record(r)
        if c is None:
            continue
        fate = "fits" if c.predicted_oom_phase is None else f"oom in {c.predicted_oom_phase}"
        got = "ok" if c.status == "ok" else f"oom in {c.failed_phase}"
        if c.not_planned:
            fate = "not planned"
        rows.append({
            "cell": c.cell,
            "fate planned / measured": f"{fate} / {got}" + ("" if c.verdict_ok else " (MISMATCH)"),
            "load peak MiB planned": _mib(c.predicted_load),
            "measured": _mib(c.measured_load),
            "error": _pct(c.load_error),
            "runtime peak MiB planned": _mib(c.predicted_runtime) if c.predicted_oom_phase is None else "",
            "measured ": _mib(c.measured_runtime),
            "error ": _pct(c.runtime_error),
            "step s planned": "" if c.predicted_step is None else f"{c.predicted_step:.3f}",
            "measured  ": "" if c.measured_step is None else f"{c.measured_step:.3f}",
            "error  ": _pct(c.step_error),
            "plan": f"not planned: {c.not_planned}" if c.not_planned else c.source + (f"; {c.note}" if c.note else ""),
        })
    return rows
