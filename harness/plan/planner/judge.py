"""Plans against records: what a record measured on the counters plans predict (`measured`), and the plan a record
carries (the one its run stored, or the one derived when it was read: `model.plan_on_read`) against those numbers
(`check_record`): the fate and each figure's error. It judges; it plans nothing and renders nothing
(`harness.plan.planner.render` makes the rows a report shows).
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.common.contract import (
    CellRecord,
    Phase,
    Status,
)
from harness.plan.planner.model import RUNTIME_PHASES

# ------------------------------------------------------------------------------------ predicted vs measured


@dataclass(frozen=True)
class Measured:
    load_peak: int | None
    runtime_peak: int | None
    step_s: float | None


RESERVED = "alloc_peak_reserved_bytes"  # the counter plans predict peaks on (PyTorch caching allocator)


def measured(record: CellRecord) -> Measured:
    """Allocator reserved peaks at load and at run time, and the median steady denoise step (STEP_CONVENTION).
    The planner predicts the CUDA allocator's counters, so these are its peaks whatever the record's device.
    A record of one denoise step (a capacity probe) has no steady step: its only step also pays the one-off costs
    (FLUX cpu1-lw0-te1 at 1024x1024 on the H200: 340 ms as a probe's only step, 174 ms steady), so it gives
    peaks but no step time."""
    ran = record.status is Status.OK
    runtime = record.phase_max(RESERVED, RUNTIME_PHASES) if ran else None
    return Measured(record.phase_max(RESERVED, (Phase.LOAD,)), runtime,
                    record.median_step_s() if ran and steady_steps(record) else None)


def steady_steps(record: CellRecord) -> int:
    """Denoise steps after the first (the ones STEP_CONVENTION's median is over when there are any)."""
    denoise = record.phases.get(Phase.DENOISE)
    return max(len((denoise.step_ms if denoise else None) or []) - 1, 0)


@dataclass(frozen=True)
class Check:
    """A plan against a record: the fate, and each figure predicted and measured (errors: measured / predicted - 1,
    None where there is nothing to compare)."""

    cell: str
    source: str  # "recorded": the plan the run stored beside its numbers; "derived": planned now from the record
    status: str
    failed_phase: str | None
    predicted_oom_phase: str | None
    verdict_ok: bool  # the plan's fate (fits, or the phase it would OOM in) is the record's
    predicted_load: int | None
    measured_load: int | None
    predicted_runtime: int | None
    measured_runtime: int | None
    predicted_step: float | None
    measured_step: float | None
    note: str | None = None
    not_planned: str | None = None  # why the planner could not plan the cell (then nothing predicted is judged)

    @property
    def load_error(self) -> float | None:
        return _rel(self.measured_load, self.predicted_load)

    @property
    def runtime_error(self) -> float | None:
        return _rel(self.measured_runtime, self.predicted_runtime)

    @property
    def step_error(self) -> float | None:
        return _rel(self.measured_step, self.predicted_step)


def _rel(measured_value: float | None, predicted: float | None) -> float | None:
    if measured_value is None or not predicted:
        return None
    return measured_value / predicted - 1


def check_record(record: CellRecord) -> Check | None:
    """The plan a record carries (`record.plan`: stored by the runner, or derived when the record was read,
    `model.plan_on_read`) against its numbers; None for a record without one (a cell the planner does not model).
    A cell it models but could not plan (a stored {"error": ...}) gets a Check that says why (`not_planned`), so a
    report or an expectation shows it instead of failing on it."""
    if record.run_options is not None and record.run_options.runtime_cap_mib:
        # the allocator capped after the load: the plan caps a card from the load on, so it has no fate to give
        return _not_planned(record, "runtime_cap_mib: the allocator was capped after the load, which the planner "
                            "does not model")
    p = record.plan
    if p is None:
        return None
    if "error" in p:
        return _not_planned(record, str(p["error"]))
    source = "derived" if p.get("derived") else "recorded"
    m = measured(record)
    status = record.status
    if status is Status.OK:
        verdict = p["fits"]
    elif status is Status.OOM:
        verdict = p["oom_phase"] == record.failed_phase
    else:
        verdict = False
    # a phase that ran out of memory measured the cap, not the need: only phases that completed are compared
    load_done = status is Status.OK or (status is Status.OOM and record.failed_phase != Phase.LOAD)
    comparable = not generated_on_device(record)
    return Check(
        cell=record.cell_id, source=source, status=str(status), failed_phase=record.failed_phase,
        predicted_oom_phase=p["oom_phase"], verdict_ok=verdict,
        predicted_load=p["load_peak_reserved_bytes"],
        measured_load=m.load_peak if load_done and comparable else None,
        predicted_runtime=p["runtime_peak_reserved_bytes"],
        measured_runtime=m.runtime_peak if comparable else None,
        predicted_step=p["step_s"], measured_step=m.step_s,
        note=None if comparable else GENERATED_NOTE,
    )


def _not_planned(record: CellRecord, reason: str) -> Check:
    m = measured(record)
    return Check(cell=record.cell_id, source="not planned", status=str(record.status),
                 failed_phase=record.failed_phase, predicted_oom_phase=None, verdict_ok=True,
                 predicted_load=None, measured_load=m.load_peak, predicted_runtime=None,
                 measured_runtime=m.runtime_peak, predicted_step=None, measured_step=m.step_s, not_planned=reason)


GENERATED_NOTE = "peaks not compared: the child generated its synthetic checkpoint on the device first"


def generated_on_device(record: CellRecord) -> bool:
    """The cell's child generated missing synthetic checkpoints on the GPU before loading: the generator's
    blocks stay in the allocator's reservation (Wan: 6,472 MiB reserved at a 274 MiB load), so reserved peaks
    say nothing about the plan (allocated peaks are unaffected)."""
    disk = (record.guard or {}).get("disk") or {}
    return bool(disk.get("checkpoint_bytes_missing")) and disk.get("generator_device") == "cuda"


def gpu_cell_that_ran(r: CellRecord) -> bool:
    """A GPU cell that ran or ran out of memory, not a copy of another (`same_as`): what plans are checked on."""
    return r.device == "cuda" and not r.same_as and r.status in (Status.OK, Status.OOM)
