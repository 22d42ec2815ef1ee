"""The Pareto front of one run: per card, every cell that ran, sorted by runtime peak (allocator reserved on CUDA,
the weight ledger on the CPU profile), with the front and the fastest cell that fits its card marked. One table
that the markdown report, the HTML page and the summary's pick all read."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from harness.common.contract import RUNTIME_PHASES, CellRecord, Status
from harness.common.flags import OffloadFlags
from harness.common.units import MIB


def mib_text(v: Any) -> str:
    return "" if v is None else f"{v / MIB:,.0f}"


def _fits(record: CellRecord) -> bool:
    """Ran to the end, and (where NVML measured it under a card cap) its per-process peak stayed within the cap."""
    return record.status is Status.OK and (record.cap or {}).get("within_cap") is not False


def frontier_rows(records: list[CellRecord]) -> list[dict[str, str | float]]:
    """Peak against step time, per card: every cell that ran (one row per distinct run), sorted by runtime peak,
    with the Pareto front (no other cell that ran is both lower in runtime peak and faster per median steady
    step) and the fastest cell that fits its card marked. A cell with resident DiT layers also shows its step
    against the cell with none and otherwise the same effective flags."""
    ran = [r for r in records if r.status is Status.OK and not r.same_as and r.median_step_s()]
    rows = []
    for card in dict.fromkeys(r.card_name for r in ran):
        mine = [r for r in ran if r.card_name == card]
        peak = {id(r): r.peaks.runtime for r in mine}
        step = {id(r): r.median_step_s() or 0.0 for r in mine}
        fastest = min((r for r in mine if _fits(r)), key=lambda r: step[id(r)], default=None)
        for r in sorted(mine, key=lambda r: (peak[id(r)] or 0, step[id(r)])):
            dominated = any(peak[id(o)] is not None and peak[id(r)] is not None and peak[id(o)] <= peak[id(r)]
                            and step[id(o)] <= step[id(r)] and (peak[id(o)], step[id(o)]) != (peak[id(r)], step[id(r)])
                            for o in mine)
            base = _resident_zero_twin(r, mine)
            cuda = r.device == "cuda"
            rows.append({
                "card": card,
                "cell": r.label,
                f"runtime peak MiB ({'alloc reserved' if cuda else 'ledger'})": mib_text(peak[id(r)]),
                "runtime peak MiB (NVML per-process)": mib_text(r.phase_max("nvml_proc_peak_bytes", RUNTIME_PHASES)),
                "step s (median, steady)": round(step[id(r)], 3),
                "vs resident 0": "" if base is None else f"{step[id(base)] / step[id(r)]:.2f}x faster"
                if step[id(r)] < step[id(base)] else f"{step[id(r)] / step[id(base)]:.2f}x slower",
                "frontier": "yes" if not dominated else "",
                "fastest that fits": "**fastest**" if r is fastest else "",
            })
    return rows


def _resident_zero_twin(record: CellRecord, records: list[CellRecord]) -> CellRecord | None:
    """The cell with no resident DiT layers and otherwise the same effective flags and backend, or None."""
    if not record.effective.dit_layerwise_resident_layers:
        return None

    def rest(r: CellRecord) -> OffloadFlags:  # the flags but residency
        return replace(r.effective, dit_layerwise_resident_layers=0.0, dit_layerwise_residency_policy="leading")

    return next((o for o in records if not o.effective.dit_layerwise_resident_layers
                 and rest(o) == rest(record) and o.backend == record.backend), None)
