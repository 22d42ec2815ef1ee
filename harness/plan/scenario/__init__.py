"""Scenario files (TOML): parse, validate, and expand into cells, one per card, backend and combination of flag
values.

A scenario names a model, the cards to simulate, the backends to run (`BACKENDS`: our layerwise runtime and/or
diffusers' group-offload hooks), the pipeline settings, a policy, base flags, the axes to sweep, cells to exclude
(or instead the combinations to run, listed one by one: `[[cells]]`) and what to expect. Every error names the
file and the field. Cells whose flags the policy resolves to the same effective flags are run once; the others point
at the one that ran (`same_as`).

One job per module, each importing only those above it:
- `types`: the errors, `Scenario`, `Expectations`, `FateExpectation`, `CapacitySpec`, `Cell`, and the shared names
  (`HARNESS_BACKEND`, `BACKENDS`, `TIERS`, `CFG_BATCH_FAMILIES`);
- `fields`: the field checks `read` and `expect` share (an error naming file and field, numbers, flag tables);
- `cells`: expansion into cells (`expand`), `matches`, `whole_dit_flags`, `layerwise_pairs`;
- `expect`: the [expect] table, parsed and checked against the cells;
- `read`: one file read and validated (`load_scenario`), the cards (`CARDS`) and size limits;
- `discover`: the files under a folder (`load_all`, `discover`), tiers (`in_tier`), `with_model`, `same_family`.

This package imports no torch. Its names are re-exported here, so `harness.plan.scenario.expand` is the expansion.
"""

from harness.plan.scenario.cells import expand, layerwise_pairs, matches, whole_dit_flags
from harness.plan.scenario.discover import discover, in_tier, load_all, same_family, with_model
from harness.plan.scenario.read import (
    CAPACITY_AXES,
    CARDS,
    MAX_FRAMES,
    MAX_SIDE_PX,
    MIN_BENCHMARK_ROUNDS,
    PROFILES,
    VIDEO_FRAME_GROUP,
    load_scenario,
)
from harness.plan.scenario.types import (
    BACKENDS,
    CFG_BATCH_FAMILIES,
    HARNESS_BACKEND,
    TIERS,
    CapacitySpec,
    Cell,
    Expectations,
    FateExpectation,
    PeerStepRatio,
    ReleaseNotInstalled,
    Scenario,
    ScenarioError,
)

__all__ = [
    "BACKENDS", "CAPACITY_AXES", "CARDS", "CFG_BATCH_FAMILIES", "HARNESS_BACKEND", "MAX_FRAMES", "MAX_SIDE_PX",
    "MIN_BENCHMARK_ROUNDS", "PROFILES", "TIERS", "VIDEO_FRAME_GROUP", "CapacitySpec", "Cell", "Expectations",
    "FateExpectation", "PeerStepRatio", "ReleaseNotInstalled", "Scenario", "ScenarioError", "discover", "expand",
    "in_tier", "layerwise_pairs", "load_all", "load_scenario", "matches", "same_family", "whole_dit_flags",
    "with_model",
]
