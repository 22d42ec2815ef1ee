"""Reading one scenario file (`load_scenario`): parse the TOML, validate every field (each error names the file
and the field), and check the whole against its cells (harness.plan.scenario.cells) and expectations
(harness.plan.scenario.expect) at load time."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from harness.common.contract import PROBE_MARK, Card, Placement, RunOptions
from harness.common.flags import FlagError, OffloadFlags, check_flag_value, is_finite_number
from harness.common.inputs import name_problem
from harness.common.units import GIB, MIB
from harness.models import ModelSpec, UnknownModelError, get_model, model_names
from harness.models.folder import is_folder_model, unrunnable
from harness.plan.scenario.cells import _cells_of
from harness.plan.scenario.expect import _check_expectations_match, _expect
from harness.plan.scenario.fields import _err, _flag_table, _positive_number
from harness.plan.scenario.types import (
    BACKENDS,
    CFG_BATCH_FAMILIES,
    HARNESS_BACKEND,
    TIERS,
    CapacitySpec,
    Cell,
    ReleaseNotInstalled,
    Scenario,
    ScenarioError,
)
from harness.policy import check_policy, install_command, release_status

# Usable capacity as PyTorch reports it on the real cards (RTX 5090: SGLang #26925; RTX 4090: #17070).
CARDS: dict[str, int | None] = {
    "rtx5090-32g": round(31.36 * GIB),
    "rtx4090-24g": round(23.64 * GIB),
    "native": None,  # whatever the machine's GPU has: no cap
}


PROFILES = ("gpu", "cpu")


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


# pytest-benchmark's statistics (mean, stddev, IQR) need a few rounds to mean anything: a GPU scenario measuring
# fewer says why in `few_rounds` (it reaches each benchmark's extra_info).
MIN_BENCHMARK_ROUNDS = 3


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


def _xfail(value: Any, path: Path) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise _err(path, "xfail", f"expected a reason (a non-empty string), got {value!r}")
    return value


def _tier(value: Any, path: Path) -> str:
    if value not in TIERS:
        raise _err(path, "tier", f"expected one of {', '.join(TIERS)}, got {value!r}")
    return value


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
