"""What a scenario file becomes: the errors (`ScenarioError`, `ReleaseNotInstalled`), the parsed scenario
(`Scenario`, with its `Expectations` and `CapacitySpec`) and its cells (`Cell`), and the names every part of
reading them shares (backends, tiers)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from harness.common.contract import Backend, Card, CellSpec, RunOptions, RunSettings, cell_id_of
from harness.common.flags import OffloadFlags
from harness.policy import Resolution, install_command

# Who moves the DiT's weights under layerwise offload: our runtime (harness.cell.offload.layerwise), or diffusers' own
# group-offload hooks (block level, one block per group, a side stream; "-rs" adds record_stream). Everything else
# (text encoder, VAE, cells without layerwise) runs the same code under every backend. "sglang@<version>" is SGLang's
# own LayerwiseOffloadManager from an installed release (harness.engine.layerwise); "sglang" the newest installed.
HARNESS_BACKEND = Backend.HARNESS.value


BACKENDS = tuple(b.value for b in Backend)


# `--tier pr` runs the scenarios marked `tier = "pr"` (a subset that fits a pull request's time: the seed
# assertion and one peer comparison); `--tier nightly` (and no --tier) runs every scenario, "pr" ones included.
TIERS = ("pr", "nightly")


class ScenarioError(ValueError):
    """A scenario file is malformed or contradictory. The message starts with 'file: field:'."""


class ReleaseNotInstalled(ScenarioError):
    """A well-formed scenario whose policy needs an SGLang release this machine lacks (and no recorded answer covers
    its requests): listed and skipped with one line, an error only when asked for by name."""

    def __init__(self, message: str, name: str, version: str) -> None:
        super().__init__(message)
        self.name = name
        self.version = version

    def line(self) -> str:
        return (f"{self.name}: needs SGLang {self.version}, not installed here; install it with "
                f"`{install_command(self.version)}`")


# Families whose pipeline can run the two CFG passes as one batched forward (harness.cell.pipeline).
CFG_BATCH_FAMILIES = ("qwen-image", "wan")


@dataclass(frozen=True)
class FateExpectation:
    where: dict[str, Any]
    status: str
    phase: str | None
    cards: tuple[str, ...] | None
    backends: tuple[str, ...] | None = None  # None: every backend's cells with these flags


@dataclass(frozen=True)
class PeerStepRatio:
    """`peer_step_ratio."<backend>" = { at_most = 1.35, reason = "..." }`: that backend's median steady step over
    ours, for the same flags on the same card, is at most `at_most`; `reason` says why the gap exists (or that its
    cause is not known yet) and is printed with the verdict."""

    backend: str
    at_most: float
    reason: str


@dataclass(frozen=True)
class Expectations:
    lowest_peak: dict[str, Any] | None = None
    fates: tuple[FateExpectation, ...] = ()
    same_output: bool = False  # every cell that ran to the end produced bit-identical final latents
    host: dict[str, Any] | None = None  # host-cost bounds checked on every cell that ran (see harness.analyze.expect)
    invariants: bool = False  # the offload memory invariants hold in every cell that ran (harness.analyze.expect)
    # final latents of every other-backend cell that ran lie within this relative L2 distance of the harness cell
    # with the same flags (harness.analyze.expect.close_output_verdict); a table in TOML names a backend's own distance
    close_output_rtol: float | None = None
    close_output_rtol_by_backend: tuple[tuple[str, float], ...] = ()
    # our layerwise cells are as fast as and peak no higher than other backends'
    # (harness.analyze.expect.beats_peer_verdict)
    beats_peer: bool = False
    # a known speed gap kept as a regression check: each named backend's layerwise cell steps at most `at_most` x
    # ours with the same flags, for the reason given (harness.analyze.expect.peer_step_ratio_verdict)
    peer_step_ratio: tuple[PeerStepRatio, ...] = ()
    # a larger prefetch window never lowers the denoise peak (harness.analyze.expect.prefetch_peak_verdict)
    prefetch_peak_monotone: bool = False
    # more resident DiT layers never slow a transfer-bound denoise step (harness.analyze.expect.resident_speed_verdict)
    resident_never_slows: bool = False
    # final latents of every cfg-batch cell within this relative L2 distance of the two-pass cell with the same flags
    # and backend (harness.analyze.expect.cfg_batch_verdict); needs `[run] cfg_batch = [false, true]`
    cfg_batch_rtol: float | None = None
    # every GPU cell's fate is the plan's and its peaks / step time lie within these fractions of the plan's
    # ({"peak": 0.05, "time": 0.10}; harness.analyze.expect.plan_within_verdict)
    plan_within: dict[str, float] | None = None
    # every layerwise cell's steady step within this fraction over the cell with the same flags but
    # dit_layerwise_offload = false (harness.analyze.expect.layerwise_overhead_verdict; issue 18's compute-bound guard)
    layerwise_overhead: float | None = None
    # each of our layerwise cells' runtime peak reserved at most this fraction over its runtime peak allocated
    # (allocator counters, each the max over the encode, denoise and decode phases of every round;
    # harness.analyze.expect.reserved_over_allocated_verdict; issue 18's reserved-memory gate)
    reserved_over_allocated: float | None = None


@dataclass(frozen=True)
class CapacitySpec:
    """A capacity search (`harness.run.capacity`): per card and combination, the largest value of `axis` that
    completes, between `minimum` and `maximum` in steps of `step`. "frames": the frame count (video); "resolution":
    the height, the width following the scenario's aspect ratio."""

    axis: str
    minimum: int
    maximum: int
    step: int

    def values(self) -> list[int]:
        return list(range(self.minimum, self.maximum + 1, self.step))


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    description: str
    model: str
    profile: str
    cards: tuple[Card, ...]
    height: int
    width: int
    steps: int
    frames: int
    warmup: int
    rounds: int
    true_cfg_scale: float
    seed: int
    policy: str
    timeout_s: float
    base_flags: dict[str, Any]
    axes: dict[str, list[Any]]
    exclude: tuple[dict[str, Any], ...]
    # `[[cells]]`: the combinations to run, in file order, each merged over base_flags (axes and exclude are then
    # empty); empty: the product of the axes less the excluded combinations
    cells: tuple[dict[str, Any], ...] = ()
    expect: Expectations = field(default_factory=Expectations)
    xfail: str | None = None  # the expectations are known to fail, and why (e.g. the pre-#26925 policy)
    backends: tuple[str, ...] = (HARNESS_BACKEND,)  # BACKENDS: who runs the layerwise DiT, swept like cards
    run: RunOptions = field(default_factory=RunOptions)  # the `[run]` table, less cfg_batch (the next field)
    cfg_batch: tuple[bool, ...] = (False,)  # `[run] cfg_batch`, swept like backends: each cell runs one value
    few_rounds: str | None = None  # why a GPU scenario measures fewer than MIN_BENCHMARK_ROUNDS rounds
    tier: str = "nightly"  # TIERS: the smallest tier that runs it
    capacity: CapacitySpec | None = None  # a capacity search, run by `python -m harness capacity`, not by pytest


@dataclass(frozen=True)
class Cell:
    scenario: Scenario
    card: Card
    resolution: Resolution
    same_as: str | None = None  # cell id of an earlier cell that runs the same code (see `expand`)
    backend: str = HARNESS_BACKEND
    cfg_batch: bool = False  # the two CFG passes as one batched forward (Scenario.cfg_batch sweeps it)

    @property
    def requested(self) -> OffloadFlags:
        return self.resolution.requested

    @property
    def cell_id(self) -> str:
        return cell_id_of(self.scenario.name, self.card.name, self.requested.label(), self.backend, self.cfg_batch)

    def spec(self, device: str) -> CellSpec:
        """Everything the child needs."""
        s = self.scenario
        return CellSpec(
            cell_id=self.cell_id, scenario=s.name, scenario_file=s.path, model=s.model, card=self.card,
            settings=RunSettings(s.height, s.width, s.steps, s.true_cfg_scale, s.seed, frames=s.frames,
                                 cfg_batch=self.cfg_batch),
            policy=s.policy, warmup=s.warmup, rounds=s.rounds, requested=self.requested,
            backend=self.backend, device=device, run=replace(s.run, cfg_batch=self.cfg_batch),
            # An engine policy (sglang@<version>) was asked once, in the parent, for every cell of the card: the
            # child runs what SGLang's ServerArgs answered instead of asking again. Likewise our model's answer for
            # unset flags, which took the card's memory and task (the child does not know them).
            resolution=self.resolution.as_dict()
            if self.resolution.engine_asked or self.requested.unset() else None,
        )

    def spec_hash(self, device: str) -> str:
        return self.spec(device).spec_hash

    def portable_spec_hash(self, device: str) -> str:
        return self.spec(device).portable_spec_hash
