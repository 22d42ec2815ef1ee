"""One test per cell (its declared fate, and no unexpected error/crash/timeout) and one per scenario card
(the set-level expectations, e.g. dit_cpu_offload + layerwise loads and peaks lowest)."""

from __future__ import annotations

import pytest

from harness.analyze.expect import evaluate, fate_failures
from harness.common.contract import CellRecord, Phase, Status
from harness.plan.scenario import MIN_BENCHMARK_ROUNDS, Cell, Scenario


class ReplayClock:
    """Feeds the child's measured round times to pytest-benchmark.

    pytest-benchmark times a callable with a host timer in this process; our rounds ran in the child and were
    timed there with CUDA events. Giving the fixture a clock that advances by exactly one measured round per call
    makes its stats, comparisons and JSON report the child's numbers instead of the host time of a no-op.
    """

    def __init__(self, rounds_s: list[float]) -> None:
        self.t = 0.0
        self.pending = iter(rounds_s)

    def now(self) -> float:
        return self.t

    def advance(self) -> None:
        self.t += next(self.pending)


def _feed_benchmark(benchmark, record: CellRecord, cell: Cell) -> None:
    info = benchmark.extra_info  # filled in place: the fixture shares this dict with its JSON metadata (JSON)
    denoise = record.phases.get(Phase.DENOISE)
    info.update(
        cell_id=record.cell_id, status=str(record.status), failed_phase=record.failed_phase,
        requested=record.requested.as_dict(), effective=record.effective.as_dict(), peaks=record.peaks.as_dict(),
        phases={name: {k: v for k, v in ph.as_dict().items() if not k.startswith("device_weights") and k != "step_ms"}
                for name, ph in record.phases.items()},
        denoise_step_ms=denoise.step_ms if denoise else None,
        rounds=record.rounds, components=record.components,
    )
    e2e = [ms for ms in ((record.rounds or {}).get("e2e_ms") or []) if ms]
    if len(e2e) < MIN_BENCHMARK_ROUNDS:  # its statistics rest on too few rounds: the scenario says why
        info["few_rounds"] = cell.scenario.few_rounds or f"{cell.scenario.profile} profile: times are not compared"
    if record.status is Status.OK and e2e:
        clock = ReplayClock([ms / 1e3 for ms in e2e])
        benchmark._timer = clock.now  # no public hook for an external clock in pytest-benchmark 5.x
        benchmark.pedantic(clock.advance, rounds=len(e2e), iterations=1, warmup_rounds=0)


def test_cell(cell: Cell, bench, benchmark) -> None:
    record = bench.get(cell)
    if record.status is Status.SKIPPED:  # a guard found the machine too small right now: not a verdict
        pytest.skip(f"{cell.cell_id}: {record.reason}")
    # pytest-benchmark turns itself off under xdist (-n): our record stands alone. A copy of another cell's record
    # (same_as: the same effective flags) is not a second benchmark of the same rounds.
    if not benchmark.disabled and cell.same_as is None:
        _feed_benchmark(benchmark, record, cell)
    failures = fate_failures(record, cell.scenario.expect.fates)
    declared = any(f.status == record.status for f in cell.scenario.expect.fates)
    if record.status.unexpected and not declared:
        failures.append(
            f"{cell.cell_id}: {record.status} in {record.failed_phase}: {record.reason}\n"
            f"{record.traceback or record.log_tail or ''}"
        )
    assert not failures, "\n".join(failures)


def test_expectations(scenario_card: tuple[Scenario, str], bench) -> None:
    scenario, card = scenario_card
    records = bench.group(scenario, card)
    skipped = [r.cell_id for r in records if r.status is Status.SKIPPED]
    if skipped:
        pytest.skip(f"cells skipped by guards, set-level checks not evaluated: {', '.join(skipped)}")
    verdicts = [v for v in evaluate(scenario, records) if v.card == card]
    for v in verdicts:
        print(f"{scenario.name}/{card}: {v.check}: {'PASS' if v.passed else 'FAIL'}: {v.message}")
    failed = [f"{v.check}: {v.message}" for v in verdicts if not v.passed]
    assert not failed, "\n".join(failed)
