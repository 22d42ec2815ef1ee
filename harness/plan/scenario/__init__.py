"""Scenario files (TOML): parse, validate, and expand into cells, one per card, backend and combination of flag
values (`read`). This package imports no torch. Its names are re-exported here, so `harness.plan.scenario.expand`
is the expansion.
"""

from harness.plan.scenario.read import (
    BACKENDS,
    CAPACITY_AXES,
    CARDS,
    CFG_BATCH_FAMILIES,
    HARNESS_BACKEND,
    MAX_FRAMES,
    MAX_SIDE_PX,
    MIN_BENCHMARK_ROUNDS,
    PROFILES,
    TIERS,
    VIDEO_FRAME_GROUP,
    CapacitySpec,
    Cell,
    Expectations,
    FateExpectation,
    ReleaseNotInstalled,
    Scenario,
    ScenarioError,
    discover,
    expand,
    in_tier,
    layerwise_pairs,
    load_all,
    load_scenario,
    matches,
    same_family,
    whole_dit_flags,
    with_model,
)

__all__ = [
    "BACKENDS", "CAPACITY_AXES", "CARDS", "CFG_BATCH_FAMILIES", "HARNESS_BACKEND", "MAX_FRAMES", "MAX_SIDE_PX",
    "MIN_BENCHMARK_ROUNDS", "PROFILES", "TIERS", "VIDEO_FRAME_GROUP", "CapacitySpec", "Cell", "Expectations",
    "FateExpectation", "ReleaseNotInstalled", "Scenario", "ScenarioError", "discover", "expand", "in_tier",
    "layerwise_pairs", "load_all", "load_scenario", "matches", "same_family", "whole_dit_flags", "with_model",
]
