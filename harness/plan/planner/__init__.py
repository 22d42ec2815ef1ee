"""The planner: what a flag combination will cost on a card, before anything runs, without torch or a GPU.

One job per module:
- `model`: the prediction (`plan`: per-phase device memory through a model of the caching allocator, host bytes,
  the roofline step), its data (`load_data`), and the plan of a recorded cell (`plan_for_record`, `plan_entry`:
  what the runner stores in `record.plan`; `plan_on_read`: the plan of an older record, derived once on read);
- `fit`: the data's fitted coefficients and machine profiles from committed GPU records (`fit`, `plan-fit`);
- `judge`: a plan against a record's numbers (`measured`, `check_record`);
- `render`: those checks as table rows (`plan_rows`), which the report shows.

This package imports no torch. Its names are re-exported here, so `harness.plan.planner.plan` is the prediction.
"""

from harness.plan.planner.fit import LAUNCH_BOUND_FLOPS, fit
from harness.plan.planner.judge import (
    GENERATED_NOTE,
    RESERVED,
    Check,
    Measured,
    check_record,
    generated_on_device,
    gpu_cell_that_ran,
    measured,
    steady_steps,
)
from harness.plan.planner.model import (
    DEFAULT_MACHINE,
    DIT_PLACEMENTS,
    PHASES,
    PLAN_FAILURES,
    RUNTIME_PHASES,
    STREAMED_IN,
    WARM_KERNELS_BYTES,
    Drivers,
    Machine,
    PhasePlan,
    Plan,
    PlanError,
    Streaming,
    Workload,
    dit_flops,
    drivers,
    load_data,
    machine_of_record,
    machine_profile,
    model_fits,
    model_weights,
    placements,
    plan,
    plan_entry,
    plan_for_record,
    plan_on_read,
    streaming,
    text_encoder_class,
    warm_kernels_bytes,
)
from harness.plan.planner.render import plan_rows

__all__ = [
    "DEFAULT_MACHINE", "DIT_PLACEMENTS", "GENERATED_NOTE", "LAUNCH_BOUND_FLOPS", "PHASES", "PLAN_FAILURES",
    "RESERVED", "RUNTIME_PHASES", "STREAMED_IN", "WARM_KERNELS_BYTES", "Check", "Drivers", "Machine", "Measured",
    "PhasePlan", "Plan", "PlanError", "Streaming", "Workload", "check_record", "dit_flops", "drivers", "fit",
    "generated_on_device", "gpu_cell_that_ran", "load_data", "machine_of_record", "machine_profile", "measured",
    "model_fits", "model_weights", "placements", "plan", "plan_entry", "plan_for_record", "plan_on_read",
    "plan_rows", "steady_steps", "streaming", "text_encoder_class", "warm_kernels_bytes",
]
