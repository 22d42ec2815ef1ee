"""Scenario files (TOML): parse, validate, and expand into cells, one per card, backend and combination of flag
values.

A scenario names a model, the cards to simulate, the backends to run (`BACKENDS`: our layerwise runtime and/or
diffusers' group-offload hooks), the pipeline settings, a policy, base flags, the axes to sweep, cells to exclude
(or instead the combinations to run, listed one by one: `[[cells]]`) and what to expect. Every error names the
file and the field. Cells whose flags the policy resolves to the same effective flags are run once; the others point
at the one that ran (`same_as`).

This module imports no torch.
"""

from __future__ import annotations

import itertools
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.common.contract import (
    PHASES,
    PROBE_MARK,
    STATUSES,
    Backend,
    Card,
    CellSpec,
    Placement,
    RunOptions,
    RunSettings,
    cell_id_of,
)
from harness.common.flags import FlagError, OffloadFlags, check_flag_value, flag_json, is_finite_number
from harness.common.inputs import InputError, env_number, name_problem
from harness.common.units import GIB, MIB
from harness.models import ModelSpec, UnknownModelError, get_model, model_names
from harness.models.folder import is_folder_model, unrunnable
from harness.policy import (
    EngineContext,
    EngineError,
    ReleaseMissing,
    Resolution,
    check_policy,
    install_command,
    release_status,
    resolve_many,
)

# Usable capacity as PyTorch reports it on the real cards (RTX 5090: SGLang #26925; RTX 4090: #17070).
CARDS: dict[str, int | None] = {
    "rtx5090-32g": round(31.36 * GIB),
    "rtx4090-24g": round(23.64 * GIB),
    "native": None,  # whatever the machine's GPU has: no cap
}

PROFILES = ("gpu", "cpu")
# Who moves the DiT's weights under layerwise offload: our runtime (harness.cell.offload.layerwise), or diffusers' own
# group-offload hooks (block level, one block per group, a side stream; "-rs" adds record_stream). Everything else
# (text encoder, VAE, cells without layerwise) runs the same code under every backend. "sglang@<version>" is SGLang's
# own LayerwiseOffloadManager from an installed release (harness.engine.layerwise); "sglang" the newest installed.
HARNESS_BACKEND = Backend.HARNESS.value
BACKENDS = tuple(b.value for b in Backend)
_SGLANG_BACKEND = re.compile(r"^sglang(@\d+\.\d+\.\d+(\.post\d+)?)?$")
_TOP_KEYS = {
    "name", "description", "model", "profile", "cards", "height", "width", "frames", "steps", "warmup", "rounds",
    "true_cfg_scale", "seed", "policy", "timeout_s", "flags", "axes", "exclude", "cells", "expect", "xfail",
    "backends", "run", "few_rounds", "tier", "capacity",
}
CAPACITY_AXES = ("frames", "resolution")
# Sizes a scenario may ask for. Far above any shipped scenario (1024 px, 81 frames) and any model here was trained
# for, and far below what makes torch's allocator fail with a raw error per cell (height = 2**40 did).
MAX_SIDE_PX = 16384
MAX_FRAMES = 4097
# A video VAE packs frames 1 + 4k (Wan's temporal factor): the first frame alone, then groups of four.
VIDEO_FRAME_GROUP = 4
# `--tier pr` runs the scenarios marked `tier = "pr"` (a subset that fits a pull request's time: the seed
# assertion and one peer comparison); `--tier nightly` (and no --tier) runs every scenario, "pr" ones included.
TIERS = ("pr", "nightly")
_EXPECT_KEYS = {"lowest_peak", "fate", "same_output", "host", "invariants", "close_output_rtol", "beats_peer",
                "prefetch_peak_monotone", "resident_never_slows", "cfg_batch_rtol", "plan_within",
                "layerwise_overhead", "reserved_over_allocated"}
# pytest-benchmark's statistics (mean, stddev, IQR) need a few rounds to mean anything: a GPU scenario measuring
# fewer says why in `few_rounds` (it reaches each benchmark's extra_info).
MIN_BENCHMARK_ROUNDS = 3
_PLAN_WITHIN_KEYS = ("peak", "time")
_HOST_KEYS = {"max_rss_over_weights", "max_pinned_held_over_requested", "min_setup_gbps"}
_FATE_KEYS = {"cards", "where", "status", "phase"}


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


def _err(path: Path | str, field_name: str, msg: str) -> ScenarioError:
    return ScenarioError(f"{path}: {field_name}: {msg}")


def _int(data: dict, key: str, path: Path, default: int | None = None, minimum: int = 1) -> int:
    v = data.get(key, default)
    if v is None:
        raise _err(path, key, "is required")
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _err(path, key, f"expected an integer >= {minimum}, got {v!r}")
    return v


def _card(value: Any, path: Path, where: str) -> Card:
    if isinstance(value, str):
        if value not in CARDS:
            raise _err(path, where, f"unknown card {value!r}; known cards: {', '.join(CARDS)} (or a table)")
        return Card(value, CARDS[value])
    if isinstance(value, dict):
        unknown = set(value) - {"name", "gib", "mib"}
        if unknown or "name" not in value or len({"gib", "mib"} & set(value)) != 1:
            raise _err(path, where, "a card table needs `name` and exactly one of `gib` or `mib`")
        card_name = value["name"]
        # the card is the middle part of every cell id "<scenario>/<card>/<flags>", and of its folder's name
        problem = name_problem(card_name, "card name")
        if problem is not None:
            raise _err(path, f"{where}.name", problem)
        size = value.get("gib", value.get("mib"))
        if not _positive_number(size):
            raise _err(path, where, f"card size must be a positive finite number, got {size!r}")
        return Card(str(value["name"]), round(size * (GIB if "gib" in value else MIB)))
    raise _err(path, where, f"expected a card name or table, got {value!r}")


def _flag_table(data: Any, path: Path, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _err(path, where, f"expected a table of flags, got {data!r}")
    try:
        return {k: check_flag_value(k, v, f"{path}: {where}") for k, v in data.items()}
    except FlagError as e:
        raise ScenarioError(str(e)) from None


def _name(data: dict[str, Any], path: Path) -> str:
    """The scenario's name: '/' separates a cell id's parts; PROBE_MARK names a capacity probe's scenario
    (`<name>@<axis>-<value>`); the name is part of file names and log lines (harness.common.inputs)."""
    name = data.get("name")
    problem = name_problem(name, "scenario name")
    if problem is None and PROBE_MARK in str(name):
        problem = f"must not hold {PROBE_MARK!r} (it marks a capacity probe), got {name!r}"
    if problem is not None:
        raise _err(path, "name", problem)
    return str(name)


def load_scenario(path: Path | str) -> Scenario:
    """Parses and validates one scenario file.

    Raises:
        ScenarioError: the file cannot be read or parsed, or a field is missing, unknown, or out of range.
    """
    # One file is one scenario however it is named (relative, absolute, through a symlink): the path enters every
    # cell's spec hash, and a resume that typed it another way must not rerun the run (issue #30).
    path = Path(path).resolve()
    data = _read_toml(path)
    name = _name(data, path)
    try:
        model = _runnable_model(data.get("model"), path)
        policy = check_policy(data.get("policy", "sglang"), f"{path}: policy")
    except (UnknownModelError, FlagError) as e:
        raise ScenarioError(str(e)) from None
    profile = data.get("profile", "gpu")
    if profile not in PROFILES:
        raise _err(path, "profile", f"expected one of {PROFILES}, got {profile!r}")
    cards = _cards(data.get("cards", ["native"]), path)
    cfg = _number(data, "true_cfg_scale", path, 4.0, lambda v: v >= 1, "a number >= 1 (1 = no CFG)")
    timeout = _number(data, "timeout_s", path, 1800, lambda v: v > 0, "a positive number of seconds")
    base_flags = _flag_table(data.get("flags", {}), path, "flags")
    explicit = _explicit_cells(data, path, base_flags)
    axes = _axes(data.get("axes", {}), path)
    both = sorted(set(axes) & set(base_flags))
    if both:
        raise _err(path, f"axes.{both[0]}", "is also set in [flags]; a flag is either fixed or an axis")
    backends = _backends(data.get("backends", [HARNESS_BACKEND]), path, name)
    run, cfg_batch = _run_options(data.get("run", {}), path, model.family, cfg)
    _check_prefetch_fits(model.components["dit"].layer_group_sizes(), base_flags, axes, path, model.name, explicit)
    scenario = Scenario(
        name=name, path=str(path), description=str(data.get("description", "")), model=model.name, profile=profile,
        cards=cards, height=_size(data, "height", path, model), width=_size(data, "width", path, model),
        steps=_int(data, "steps", path), frames=_frames(data, path, model),
        warmup=_int(data, "warmup", path, default=0, minimum=0), rounds=_int(data, "rounds", path, default=1),
        true_cfg_scale=cfg, seed=_int(data, "seed", path, default=0, minimum=0), policy=policy, timeout_s=timeout,
        base_flags=base_flags, axes=axes, exclude=_exclude(data.get("exclude", []), path, axes),
        cells=explicit,
        expect=_expect(data.get("expect", {}), path, cards, backends, cfg_batch),
        xfail=_xfail(data.get("xfail"), path), backends=backends, run=run, cfg_batch=cfg_batch,
        few_rounds=_few_rounds(data, profile, path), tier=_tier(data.get("tier", "nightly"), path),
        capacity=_capacity(data.get("capacity"), path, model),
    )
    cells = _cells_of(scenario, path)
    _check_expectations_match(scenario, cells, path)
    _check_run_options_apply(scenario, cells, path)
    return scenario


def _model_name(value: Any, path: Path) -> Any:
    """The scenario's `model`: a zoo name, or a pipeline folder; a relative folder ("./my-model", "../models/x") is
    read from the scenario file's folder when it holds one there, else from the working folder."""
    if isinstance(value, str) and value not in model_names() and not Path(value).expanduser().is_absolute():
        beside = path.parent / value
        if is_folder_model(str(beside)):
            return str(beside.resolve())
    return value


def _runnable_model(value: Any, path: Path) -> ModelSpec:
    """The scenario's model; one the harness plans but cannot run (harness.models.folder.unrunnable) is this
    file's error."""
    model = get_model(_model_name(value, path), f"{path}: model")
    problem = unrunnable(model)
    if problem is not None:
        raise _err(path, "model", problem)
    return model


def with_model(path: Path | str, model: str, out: Path) -> Path:
    """A copy of scenario file `path` written to `out`, its `model` replaced by `model` (a zoo name, or a pipeline
    folder as its absolute path), everything else as written: how `capacity --model` and `bench --model` run a
    scenario on your checkpoint. The copy is what the run loads, so `report` reads it back the same.

    Raises:
        ScenarioError: the file does not name its model on a top-level `model = "..."` line, or `model` is no
            model the harness knows.
    """
    path = Path(path)
    try:
        spec = get_model(model, "--model")
    except UnknownModelError as e:
        raise ScenarioError(str(e)) from None
    text = path.read_text(encoding="utf-8")
    head, sep, tables = text.partition("\n[")  # the top-level keys come before the first table
    new, n = re.subn(r'(?m)^model\s*=\s*"[^"\n]*"[ \t]*', lambda _: f"model = {json.dumps(spec.name)}", head)
    if n != 1:
        raise _err(path, "model", 'expected one top-level line model = "..." to replace')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(new + sep + tables, encoding="utf-8")
    return out


def same_family(path: Path | str, model: str) -> bool:
    """Whether scenario file `path`'s model and `model` run the same pipeline (family, and edit or not): the
    scenarios whose settings (frames, CFG batching, prefetch windows) apply to `model` too."""
    try:
        mine = get_model(_model_name(tomllib.loads(Path(path).read_text(encoding="utf-8")).get("model"),
                                     Path(path).resolve()))
        other = get_model(model)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, UnknownModelError):
        return False
    return (mine.family, mine.edit) == (other.family, other.edit)


def _check_run_options_apply(scenario: Scenario, cells: list[Cell], path: Path) -> None:
    """Run options that would do nothing, or clash with a card, fail at load time."""
    run = scenario.run
    if run.runtime_cap_mib and any(c.cap_bytes for c in scenario.cards):
        raise _err(path, "run.runtime_cap_mib", "a card of the scenario is already capped: one cap per cell "
                   "(runtime_cap_mib caps the runtime of an uncapped card's cell after its load)")
    if run.empty_cache_after_packing and not any(
            Placement.for_role("dit", c.resolution.effective, c.backend) is Placement.LAYERWISE_FROM_DEVICE
            for c in cells):
        raise _err(path, "run.empty_cache_after_packing", "no cell places its DiT through the device "
                   "(dit_layerwise_offload on, dit_cpu_offload off, our runtime): nothing to release")


def _cells_of(scenario: Scenario, path: Path) -> list[Cell]:
    """The scenario's cells; a policy whose SGLang release this machine lacks is this file's error only, not an
    EngineError that stops a whole collection (`--bench-scenario other` included)."""
    try:
        cells = expand(scenario)
    except ReleaseMissing as e:
        raise ReleaseNotInstalled(f"{path}: policy {scenario.policy!r}: {e}", scenario.name, e.version) from None
    except EngineError as e:
        raise ScenarioError(f"{path}: policy {scenario.policy!r}: {e}") from None
    if not cells:
        raise _err(path, "exclude", "excludes every cell")
    return cells


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read ({e.strerror or e})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ScenarioError(f"{path}: not valid TOML ({e})") from None
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise _err(path, unknown[0], f"unknown field; known fields: {', '.join(sorted(_TOP_KEYS))}")
    return data


def _cards(raw: Any, path: Path) -> tuple[Card, ...]:
    if not isinstance(raw, list) or not raw:
        raise _err(path, "cards", "expected a non-empty list of cards")
    cards = tuple(_card(c, path, f"cards[{i}]") for i, c in enumerate(raw))
    if len({c.name for c in cards}) != len(cards):
        raise _err(path, "cards", "card names must be unique")
    return cards


def _positive_number(v: Any) -> bool:
    """A finite number above zero, and not a boolean (TOML's true is an int to Python)."""
    return not isinstance(v, bool) and isinstance(v, int | float) and is_finite_number(v) and v > 0


def _number(data: dict, key: str, path: Path, default: float, ok: Any, expected: str) -> float:
    """A finite number (not a boolean) for which `ok` holds."""
    v = data.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not is_finite_number(v) or not ok(v):
        raise _err(path, key, f"expected {expected}, got {v!r}")
    return float(v)


def _size(data: dict, key: str, path: Path, model: Any) -> int:
    """Height or width: whole VAE cells of whole DiT patches, at most MAX_SIDE_PX."""
    v = _int(data, key, path)
    multiple = model.vae_scale * model.patch
    if v % multiple:
        raise _err(path, key, f"must be a multiple of {multiple} for {model.name}, got {v}")
    if v > MAX_SIDE_PX:
        raise _err(path, key, f"expected at most {MAX_SIDE_PX} pixels, got {v}")
    return v


def _frames(data: dict, path: Path, model: Any) -> int:
    """Frames: 1 (or left out) for an image model; 1 + a multiple of VIDEO_FRAME_GROUP for a video model."""
    v = _int(data, "frames", path, default=1)
    if model.family != "wan":
        if v != 1:
            raise _err(path, "frames", f"{model.name} makes images: frames must be 1 (or left out), got {v}")
        return v
    if (v - 1) % VIDEO_FRAME_GROUP:
        raise _err(path, "frames", f"must be 1 + a multiple of {VIDEO_FRAME_GROUP} for {model.name} (its VAE packs "
                   f"the first frame alone, then groups of {VIDEO_FRAME_GROUP}), got {v}")
    if v > MAX_FRAMES:
        raise _err(path, "frames", f"expected at most {MAX_FRAMES} frames, got {v}")
    return v


def _check_expectations_match(scenario: Scenario, cells: list[Cell], path: Path) -> None:
    """Every expectation names cells that exist, so a typo fails here, at load time, and not after the whole
    suite (lowest_peak: "0 cells match") or never (a fate whose `where` matches nothing checks nothing)."""
    expect = scenario.expect
    if expect.reserved_over_allocated is not None and scenario.profile != "gpu":
        raise _err(path, "expect.reserved_over_allocated", "needs the gpu profile: CPU records have no allocator "
                   "counters")
    for card in scenario.cards:
        mine = [c for c in cells if c.card.name == card.name]
        if expect.lowest_peak is not None:
            hits = [c for c in mine if c.backend == HARNESS_BACKEND and not c.cfg_batch
                    and matches(c.requested, expect.lowest_peak)]
            if len(hits) != 1:
                raise _err(path, "expect.lowest_peak",
                           f"{expect.lowest_peak} matches {len(hits)} harness-backend cells of card {card.name!r} "
                           f"({', '.join(c.cell_id.rsplit('/', 1)[1] for c in hits) or 'none'}); "
                           "expected exactly one")
        if expect.layerwise_overhead is not None and not layerwise_pairs(mine):
            raise _err(path, "expect.layerwise_overhead", f"card {card.name!r} has no layerwise cell whose flags, "
                       "dit_layerwise_offload = false, are also a cell: nothing to compare")
        if expect.reserved_over_allocated is not None and not any(
                c.backend == HARNESS_BACKEND and c.requested.dit_layerwise_offload for c in mine):
            raise _err(path, "expect.reserved_over_allocated", f"card {card.name!r} has no layerwise cell of our "
                       "runtime: nothing to check")
    for i, f in enumerate(expect.fates):
        scope = [c for c in cells if f.cards is None or c.card.name in f.cards]
        if not any(matches(c.requested, f.where) for c in scope):
            raise _err(path, f"expect.fate[{i}].where",
                       f"{f.where} matches no cell of the matrix (cards {', '.join(sorted(f.cards or [])) or 'all'})")


def whole_dit_flags(flags: OffloadFlags) -> OffloadFlags:
    """The same flags with dit_layerwise_offload off: a layerwise cell's whole-DiT twin."""
    return replace(flags, dit_layerwise_offload=False)


def layerwise_pairs(cells: list[Cell]) -> list[tuple[Cell, Cell]]:
    """(layerwise cell, its whole-DiT twin) pairs of our runtime's two-pass cells: what `expect.layerwise_overhead`
    compares."""
    ours = [c for c in cells if c.backend == HARNESS_BACKEND and not c.cfg_batch]
    by_flags = {c.requested: c for c in ours}
    twins = [(c, by_flags.get(whole_dit_flags(c.requested))) for c in ours if c.requested.dit_layerwise_offload]
    return [(c, whole) for c, whole in twins if whole is not None]


def _run_options(
    data: Any, path: Path, family: str, true_cfg_scale: float
) -> tuple[RunOptions, tuple[bool, ...]]:
    """The `[run]` table: the options every cell runs with, and the cfg_batch values the cells sweep."""
    if not isinstance(data, dict):
        raise _err(path, "run", "expected a table ([run])")
    known = RunOptions.names()
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise _err(path, f"run.{unknown[0]}", f"unknown run option; known: {', '.join(known)}")
    interval = data.get("sampler_interval_ms", RunOptions.sampler_interval_ms)
    if isinstance(interval, bool) or not isinstance(interval, int | float) or not is_finite_number(interval) \
            or interval < 0:
        raise _err(path, "run.sampler_interval_ms", f"expected milliseconds >= 0 (0 = off), got {interval!r}")
    for key in ("copy_timeline", "empty_cache_between_phases", "setup_overlap_pin", "empty_cache_after_packing"):
        if not isinstance(data.get(key, False), bool):
            raise _err(path, f"run.{key}", f"expected true or false, got {data[key]!r}")
    threads = data.get("setup_threads", RunOptions.setup_threads)
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 256:
        raise _err(path, "run.setup_threads", f"expected an integer from 1 to 256, got {threads!r}")
    runtime_cap = data.get("runtime_cap_mib", 0)
    if isinstance(runtime_cap, bool) or not isinstance(runtime_cap, int) or runtime_cap < 0:
        raise _err(path, "run.runtime_cap_mib", f"expected MiB as an integer >= 0 (0 = off), got {runtime_cap!r}")
    batch = data.get("cfg_batch", False)
    values = batch if isinstance(batch, list) else [batch]
    if not values or not all(isinstance(v, bool) for v in values) or len(set(values)) != len(values):
        raise _err(path, "run.cfg_batch", f"expected true, false or a list of distinct booleans, got {batch!r}")
    if any(values):
        if family not in CFG_BATCH_FAMILIES:
            raise _err(path, "run.cfg_batch", f"the {family!r} family has no batched CFG pipeline "
                       f"(families: {', '.join(CFG_BATCH_FAMILIES)})")
        if true_cfg_scale <= 1:
            raise _err(path, "run.cfg_batch", "needs true CFG (true_cfg_scale > 1): one forward a step has nothing "
                       "to batch")
    options = RunOptions(
        sampler_interval_ms=float(interval), copy_timeline=data.get("copy_timeline", False),
        empty_cache_between_phases=data.get("empty_cache_between_phases", False), setup_threads=threads,
        setup_overlap_pin=data.get("setup_overlap_pin", RunOptions.setup_overlap_pin),
        empty_cache_after_packing=data.get("empty_cache_after_packing", False), runtime_cap_mib=runtime_cap)
    return options, tuple(values)


def _check_prefetch_fits(
    groups: dict[str, int], base_flags: dict[str, Any], axes: dict[str, list[Any]], path: Path, model: str,
    cells: tuple[dict[str, Any], ...] = (),
) -> None:
    """A prefetch size of more layers than the largest layer group is refused: the runtime (like SGLang's manager)
    clamps it to the group, so a cell id saying `pf999` would run `pf60`, and two such sizes would be two ids of
    one experiment. Refused rather than relabelled because a model's groups can differ in size (FLUX: 19 and
    38), so the clamped value has no single label; a size between the groups' sizes is kept (it is exact for
    the larger group)."""
    if not groups:
        return
    largest = max(groups.values())
    name = "dit_offload_prefetch_size"
    values = [(f"flags.{name}", base_flags[name])] if name in base_flags else []
    values += [(f"axes.{name}[{i}]", v) for i, v in enumerate(axes.get(name, []))]
    values += [(f"cells[{i}].{name}", c[name]) for i, c in enumerate(cells) if name in c]
    for where, v in values:
        if v >= 1 and int(v) > largest:
            sizes = ", ".join(f"{g}: {n}" for g, n in groups.items())
            raise _err(path, where, f"{v:g} layers is more than the largest layer group of {model} ({sizes}); it "
                       f"would run as {largest} under a cell id saying pf{v:g}: use at most {largest}")


def _few_rounds(data: dict[str, Any], profile: str, path: Path) -> str | None:
    """The reason a GPU scenario measures fewer than MIN_BENCHMARK_ROUNDS rounds: required there (each cell is a
    pytest-benchmark benchmark whose statistics need rounds), refused where it explains nothing."""
    value, rounds = data.get("few_rounds"), data.get("rounds", 1)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise _err(path, "few_rounds", f"expected a reason (a non-empty string), got {value!r}")
    few = isinstance(rounds, int) and rounds < MIN_BENCHMARK_ROUNDS
    # a capacity search's probes are pass/fail cells of `python -m harness capacity`: pytest-benchmark never sees them
    if profile == "gpu" and few and value is None and "capacity" not in data:
        raise _err(path, "rounds", f"{rounds} measured round(s) feed pytest-benchmark, whose statistics need "
                   f"{MIN_BENCHMARK_ROUNDS}: measure {MIN_BENCHMARK_ROUNDS} or say why not in `few_rounds`")
    if value is not None and not few:
        raise _err(path, "few_rounds", f"rounds = {rounds} is at least {MIN_BENCHMARK_ROUNDS}: nothing to explain")
    return value


def _capacity(data: Any, path: Path, model: Any) -> CapacitySpec | None:
    """[capacity] axis = "frames" | "resolution", min, max, step (frames: a multiple of the VAE's temporal factor,
    from 1 + step; resolution: heights, multiples of the model's pixel grid)."""
    if data is None:
        return None
    if not isinstance(data, dict) or set(data) - {"axis", "min", "max", "step"} or "axis" not in data \
            or "max" not in data:
        raise _err(path, "capacity", "expected a table with axis, max and optional min, step")
    axis = data["axis"]
    if axis not in CAPACITY_AXES:
        raise _err(path, "capacity.axis", f"expected one of {CAPACITY_AXES}, got {axis!r}")
    video = model.family == "wan"
    if axis == "frames" and not video:
        raise _err(path, "capacity.axis", f"frames needs a video model; {model.name} makes images")
    grid = 4 if axis == "frames" else model.vae_scale * model.patch
    step = data.get("step", grid)
    lo = data.get("min", 1 if axis == "frames" else grid)
    for key, v in (("min", lo), ("max", data["max"]), ("step", step)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise _err(path, f"capacity.{key}", f"expected an integer >= 1, got {v!r}")
    if step % grid:
        raise _err(path, "capacity.step", f"must be a multiple of {grid} for {axis}, got {step}")
    if axis == "frames" and (lo - 1) % 4:
        raise _err(path, "capacity.min", f"frames must be 1 + a multiple of 4, got {lo}")
    if axis == "resolution" and lo % grid:
        raise _err(path, "capacity.min", f"must be a multiple of {grid}, got {lo}")
    if data["max"] <= lo:
        raise _err(path, "capacity.max", f"must be above min ({lo}), got {data['max']}")
    return CapacitySpec(axis, lo, data["max"], step)


def _plan_within(data: Any, path: Path) -> dict[str, float] | None:
    if data is None:
        return None
    if not isinstance(data, dict) or not data or set(data) - set(_PLAN_WITHIN_KEYS):
        raise _err(path, "expect.plan_within", f"expected a table with keys among {list(_PLAN_WITHIN_KEYS)}, "
                   "e.g. {peak = 0.05, time = 0.10}")
    for key, v in data.items():
        if not _positive_number(v):
            raise _err(path, f"expect.plan_within.{key}", f"expected a positive fraction (0.05 = 5 %), got {v!r}")
    return {k: float(v) for k, v in data.items()}


def _xfail(value: Any, path: Path) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise _err(path, "xfail", f"expected a reason (a non-empty string), got {value!r}")
    return value


def _tier(value: Any, path: Path) -> str:
    if value not in TIERS:
        raise _err(path, "tier", f"expected one of {', '.join(TIERS)}, got {value!r}")
    return value


def in_tier(scenario: Scenario, tier: str | None) -> bool:
    """Whether `--tier tier` runs `scenario`: "pr" only the pr scenarios, "nightly" (or None) every scenario."""
    return tier in (None, "nightly") or scenario.tier == tier


def _backends(data: Any, path: Path, name: str) -> tuple[str, ...]:
    """The backends, each of a known form; `sglang@<version>` under the rule `policy` follows: a release this harness
    knows but this machine lacks makes the scenario ReleaseNotInstalled (listed and skipped, an error when asked
    for), a version that is no release at all is an error naming the field."""
    if not isinstance(data, list) or not data:
        raise _err(path, "backends", f"expected a non-empty list of backends among {list(BACKENDS)}, got {data!r}")
    for i, b in enumerate(data):
        if not isinstance(b, str) or (b not in BACKENDS and not _SGLANG_BACKEND.match(b)):
            known = ", ".join((*BACKENDS, "sglang@<version>"))
            raise _err(path, f"backends[{i}]", f"unknown backend {b!r}; known backends: {known}")
    if len(set(data)) != len(data):
        raise _err(path, "backends", f"repeats a backend: {data!r}")
    for i, b in enumerate(data):
        version = b.partition("@")[2]
        if not version:
            continue
        status, known = release_status(version)
        if status == "unknown":
            raise _err(path, f"backends[{i}]", f"{b!r}: SGLang {version} is no release this harness knows or finds "
                       f"installed (known releases: {', '.join(known)})")
        if status == "known":
            raise ReleaseNotInstalled(f"{path}: backends[{i}]: {b!r}: SGLang {version} is not installed here; install "
                                      f"it with `{install_command(version)}`", name, version)
    return tuple(data)


def _axes(data: Any, path: Path) -> dict[str, list[Any]]:
    if not isinstance(data, dict):
        raise _err(path, "axes", "expected a table of flag -> list of values")
    axes: dict[str, list[Any]] = {}
    for flag, values in data.items():
        if not isinstance(values, list) or not values:
            raise _err(path, f"axes.{flag}", f"expected a non-empty list of values, got {values!r}")
        try:
            checked = [check_flag_value(flag, v, f"{path}: axes") for v in values]
        except FlagError as e:
            raise ScenarioError(str(e)) from None
        if len(set(checked)) != len(checked):
            raise _err(path, f"axes.{flag}", f"repeats a value: {values!r}")
        axes[flag] = checked
    return axes


def _explicit_cells(data: dict[str, Any], path: Path, base_flags: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """`[[cells]]`: the combinations to run, one table of flag values each (the rules of `[flags]`), merged over
    `[flags]` (a cell's value wins) and kept in file order. Instead of `[axes]` and `[[exclude]]`, never with them;
    two cells that make the same flags are refused (they would be one cell id twice)."""
    if "cells" not in data:
        return ()
    for other, form in (("axes", "[axes]"), ("exclude", "[[exclude]]")):
        if other in data:
            raise _err(path, "cells", f"lists the cells to run one by one, so {form} cannot join it: use either "
                       "[[cells]] or [axes] with [[exclude]]")
    raw = data["cells"]
    if not isinstance(raw, list) or not raw:
        raise _err(path, "cells", "expected a non-empty list of tables ([[cells]])")
    out: list[dict[str, Any]] = []
    seen: dict[OffloadFlags, int] = {}
    for i, item in enumerate(raw):
        table = _flag_table(item, path, f"cells[{i}]")
        flags = OffloadFlags(**{**base_flags, **table})
        if flags in seen:
            raise _err(path, f"cells[{i}]", f"repeats cells[{seen[flags]}] (the same flags once merged over "
                       f"[flags]: {flags.label()})")
        seen[flags] = i
        out.append(table)
    return tuple(out)


def _exclude(data: Any, path: Path, axes: dict[str, list[Any]]) -> tuple[dict[str, Any], ...]:
    if not isinstance(data, list):
        raise _err(path, "exclude", "expected a list of tables ([[exclude]])")
    out = []
    for i, item in enumerate(data):
        where = f"exclude[{i}]"
        table = _flag_table(item, path, where)
        if not table:
            raise _err(path, where, "an empty exclude would exclude every cell")
        for k in table:
            if k not in axes:
                raise _err(path, f"{where}.{k}", "is not an axis of this scenario")
        out.append(table)
    return tuple(out)


def _expect(
    data: Any, path: Path, cards: tuple[Card, ...], backends: tuple[str, ...], cfg_batch: tuple[bool, ...]
) -> Expectations:
    if not isinstance(data, dict):
        raise _err(path, "expect", "expected a table")
    unknown = sorted(set(data) - _EXPECT_KEYS)
    if unknown:
        raise _err(path, f"expect.{unknown[0]}", f"unknown expectation; known: {', '.join(sorted(_EXPECT_KEYS))}")
    lowest = data.get("lowest_peak")
    if lowest is not None:
        lowest = _flag_table(lowest, path, "expect.lowest_peak")
    raw_fates = data.get("fate", [])
    if not isinstance(raw_fates, list):
        raise _err(path, "expect.fate", "expected a list of tables ([[expect.fate]])")
    card_names = {c.name for c in cards}
    fates = tuple(_fate(f, path, f"expect.fate[{i}]", card_names) for i, f in enumerate(raw_fates))
    switches = {key: _switch(data, key, path) for key in
                ("same_output", "invariants", "beats_peer", "prefetch_peak_monotone", "resident_never_slows")}
    rtol, rtol_by_backend = _close_output_rtol(data.get("close_output_rtol"), path, backends)
    if switches["beats_peer"]:
        _needs_peers(path, "expect.beats_peer", "step times and peaks", backends)
    return Expectations(lowest, fates, host=_host_bounds(data.get("host"), path), close_output_rtol=rtol,
                        close_output_rtol_by_backend=rtol_by_backend,
                        cfg_batch_rtol=_cfg_batch_rtol(data.get("cfg_batch_rtol"), path, cfg_batch), **switches,
                        plan_within=_plan_within(data.get("plan_within"), path),
                        layerwise_overhead=_fraction(data.get("layerwise_overhead"), path, "expect.layerwise_overhead"),
                        reserved_over_allocated=_fraction(data.get("reserved_over_allocated"), path,
                                                          "expect.reserved_over_allocated"))


def _fraction(value: Any, path: Path, where: str) -> float | None:
    """A positive finite fraction (0.01 = 1 %), or None when absent."""
    if value is None:
        return None
    if not _positive_number(value) or value >= 1:
        raise _err(path, where, f"expected a fraction in (0, 1) (0.01 = 1 %), got {value!r}")
    return float(value)


def _cfg_batch_rtol(value: Any, path: Path, cfg_batch: tuple[bool, ...]) -> float | None:
    if value is None:
        return None
    if not _positive_number(value):
        raise _err(path, "expect.cfg_batch_rtol", f"expected a positive finite number, got {value!r}")
    if set(cfg_batch) != {False, True}:
        raise _err(path, "expect.cfg_batch_rtol", "compares cfg-batch cells with two-pass ones, so `[run] "
                   f"cfg_batch` must be [false, true]; got {list(cfg_batch)}")
    return float(value)


def _switch(data: dict, key: str, path: Path) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise _err(path, f"expect.{key}", f"expected true or false, got {value!r}")
    return value


def _fate(f: Any, path: Path, where: str, card_names: set[str]) -> FateExpectation:
    """One [[expect.fate]] table: the status (and phase) the cells it names must end with."""
    if not isinstance(f, dict) or set(f) - _FATE_KEYS or "status" not in f:
        raise _err(path, where, f"expected a table with `status` and optional {sorted(_FATE_KEYS - {'status'})}")
    if f["status"] not in STATUSES:
        raise _err(path, f"{where}.status", f"expected one of {STATUSES}, got {f['status']!r}")
    phase = f.get("phase")
    if phase is not None and phase not in PHASES:
        raise _err(path, f"{where}.phase", f"expected one of {PHASES}, got {phase!r}")
    fcards = f.get("cards")
    if fcards is not None:
        names_ok = isinstance(fcards, list) and all(isinstance(c, str) for c in fcards)
        if not names_ok or not set(fcards) <= card_names:
            raise _err(path, f"{where}.cards", f"expected a list of this scenario's cards {sorted(card_names)}")
        fcards = tuple(fcards)
    return FateExpectation(_flag_table(f.get("where", {}), path, f"{where}.where"), f["status"], phase, fcards)


def _close_output_rtol(value: Any, path: Path, backends: tuple[str, ...]
                       ) -> tuple[float | None, tuple[tuple[str, float], ...]]:
    """`close_output_rtol = 0.02`, or a table: `{ default = 0.02, "sglang@0.5.23" = 0.05 }` (a backend of the
    scenario other than the harness one; the default covers the others)."""
    field = "expect.close_output_rtol"
    if value is None:
        return None, ()
    table = value if isinstance(value, dict) else {"default": value}
    for key, rtol in table.items():
        if not _positive_number(rtol):
            raise _err(path, f"{field}.{key}" if isinstance(value, dict) else field,
                       f"expected a positive finite number, got {rtol!r}")
        if key != "default" and (key not in backends or key == HARNESS_BACKEND):
            others = [b for b in backends if b != HARNESS_BACKEND]
            raise _err(path, f"{field}.{key}", f"names no other backend of this scenario (backends: {others})")
    if "default" not in table:
        raise _err(path, field, "a table needs `default`, the distance for backends it does not name")
    _needs_peers(path, field, "latents", backends)
    by_backend = tuple(sorted((k, float(v)) for k, v in table.items() if k != "default"))
    return float(table["default"]), by_backend


def _needs_peers(path: Path, field: str, what: str, backends: tuple[str, ...]) -> None:
    if HARNESS_BACKEND not in backends or len(backends) < 2:
        raise _err(path, field, f"compares other backends' {what} with the harness backend's, so `backends` must "
                   f"list {HARNESS_BACKEND!r} and another; got {list(backends)}")


def _host_bounds(data: Any, path: Path) -> dict[str, Any] | None:
    if data is None:
        return None
    if not isinstance(data, dict) or set(data) - _HOST_KEYS:
        raise _err(path, "expect.host", f"expected a table with keys among {sorted(_HOST_KEYS)}")
    for key in ("max_rss_over_weights", "max_pinned_held_over_requested"):
        v = data.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or v <= 0):
            raise _err(path, f"expect.host.{key}", f"expected a positive number, got {v!r}")
    gbps = data.get("min_setup_gbps", {})
    if not isinstance(gbps, dict) or not all(
        k in ("text_encoder", "dit", "vae") and isinstance(v, int | float) and not isinstance(v, bool) and v > 0
        for k, v in gbps.items()
    ):
        raise _err(path, "expect.host.min_setup_gbps", "expected a table of component role -> positive GB/s")
    return data


def matches(flags: OffloadFlags | Mapping[str, Any], where: Mapping[str, Any]) -> bool:
    """Flags (a record's or a cell's, or normalised axis values) that take every value of `where`."""
    values = flags.as_dict() if isinstance(flags, OffloadFlags) else flags
    return all(flag_json(k, values.get(k)) == flag_json(k, v) for k, v in where.items())


def expand(scenario: Scenario) -> list[Cell]:
    """All cells of a scenario in a stable order: cards outermost, then backends, then the axes in file order.

    Cells of one card whose flags resolve to the same effective flags run once (`same_as`). Backends differ only
    in who streams a layerwise DiT, so a cell without layerwise runs the same code under every backend and the
    first backend's cell stands in for the others; layerwise cells of different backends never stand in for each
    other.
    """
    combos = _combos(scenario)
    cells: list[Cell] = []
    for card in scenario.cards:
        first_by_effective: dict[tuple[str, bool, OffloadFlags], str] = {}
        resolutions = resolve_many(combos, scenario.policy, _engine_context(scenario, card))
        for backend in scenario.backends:
            for batch in scenario.cfg_batch:
                for resolution in resolutions:
                    cell = Cell(scenario, card, resolution, backend=backend, cfg_batch=batch)
                    runs_as = backend if resolution.effective.dit_layerwise_offload else "every backend"
                    same = first_by_effective.setdefault((runs_as, batch, resolution.effective), cell.cell_id)
                    cells.append(cell if same == cell.cell_id
                                 else Cell(scenario, card, resolution, same, backend, batch))
    return cells


def _combos(scenario: Scenario) -> list[OffloadFlags]:
    """The requested flags of one card's cells: `[[cells]]` as listed, else the product of the axes (in file order)
    less the excluded combinations; each over the base flags."""
    if scenario.cells:
        return [OffloadFlags(**{**scenario.base_flags, **cell}) for cell in scenario.cells]
    names = list(scenario.axes)
    combos: list[OffloadFlags] = []
    for combo in itertools.product(*(scenario.axes[n] for n in names)):
        values = dict(zip(names, combo, strict=True))
        if not any(matches(values, ex) for ex in scenario.exclude):
            combos.append(OffloadFlags(**{**scenario.base_flags, **values}))
    return combos


def _engine_context(scenario: Scenario, card: Card) -> EngineContext | None:
    """What SGLang's defaults depend on for this card: its memory (the cap; uncapped, the GPU NVML sees or
    OFFLOAD_BENCH_GPU_TOTAL_BYTES), the model's task type and family. None where no GPU memory is known: a policy
    that needs it then says so (harness.plan.flags)."""
    model = get_model(scenario.model)
    total = card.cap_bytes or _visible_gpu_total_bytes()
    if total is None:
        return None
    return EngineContext.for_model(model.family, model.edit, total / GIB, model.name)


def _visible_gpu_total_bytes() -> int | None:
    try:
        env = env_number("OFFLOAD_BENCH_GPU_TOTAL_BYTES")
    except InputError as e:
        raise ScenarioError(str(e)) from None
    if env is not None:
        return int(env)
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no GPU: the card's memory is unknown here
        return None


def load_all(folder: Path | str) -> tuple[list[Scenario], list[ScenarioError]]:
    """Every scenario file under `folder` (recursively), each loaded on its own: the scenarios that load and the
    errors of those that do not, so a caller that wants some scenarios by name is not blocked by an unrelated bad
    file. A missing folder or two files with one name raise."""
    if not Path(folder).is_dir():
        raise ScenarioError(f"{folder}: no such scenarios folder")
    scenarios, errors = [], []
    for path in sorted(Path(folder).rglob("*.toml")):
        try:
            scenarios.append(load_scenario(path))
        except ScenarioError as e:
            e.scenario_name = _peek_name(path)  # type: ignore[attr-defined]  # which file a --bench-scenario asks for
            errors.append(e)
    names = [s.name for s in scenarios]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        files = [s.path for s in scenarios if s.name == dupes[0]]
        raise ScenarioError(f"scenario name {dupes[0]!r} is used by more than one file: {', '.join(files)}")
    return scenarios, errors


def _peek_name(path: Path) -> str | None:
    """The `name` a scenario file declares, read without validating anything else (None if unreadable)."""
    try:
        name = tomllib.loads(path.read_text(encoding="utf-8")).get("name")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return name if isinstance(name, str) else None


def discover(folder: Path | str, profile: str | None = None) -> list[Scenario]:
    """Every scenario file under `folder` (recursively), optionally only those of one profile. Any bad file
    raises its ScenarioError."""
    scenarios, errors = load_all(folder)
    if errors:
        raise errors[0]
    return [s for s in scenarios if profile is None or s.profile == profile]
