"""One test per cell (its declared fate, and no unexpected error/crash/timeout) and one per scenario card
(the set-level expectations, e.g. dit_cpu_offload + layerwise loads and peaks lowest)."""

from __future__ import annotations

from harness.expect import evaluate, fate_failures
from harness.scenario import Cell, Scenario

UNEXPECTED = ("error", "crash", "timeout")


def test_cell(cell: Cell, bench) -> None:
    record = bench.get(cell)
    failures = fate_failures(record, cell.scenario.expect.fates)
    declared = any(f.status == record["status"] for f in cell.scenario.expect.fates)
    if record["status"] in UNEXPECTED and not declared:
        failures.append(
            f"{cell.cell_id}: {record['status']} in {record.get('failed_phase')}: {record.get('reason')}\n"
            f"{record.get('traceback') or record.get('log_tail') or ''}"
        )
    assert not failures, "\n".join(failures)


def test_expectations(scenario_card: tuple[Scenario, str], bench) -> None:
    scenario, card = scenario_card
    records = bench.group(scenario, card)
    verdicts = [v for v in evaluate(scenario, records) if v.card == card]
    for v in verdicts:
        print(f"{scenario.name}/{card}: {v.check}: {'PASS' if v.passed else 'FAIL'}: {v.message}")
    failed = [f"{v.check}: {v.message}" for v in verdicts if not v.passed]
    assert not failed, "\n".join(failed)
