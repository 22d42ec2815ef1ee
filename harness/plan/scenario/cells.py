"""A scenario expanded into cells: one per card, backend, cfg_batch value and combination of flag values, those
whose flags the policy resolves to the same effective flags pointing at the one that runs (`same_as`); and the
cell matching the expectations and reports share (`matches`, `layerwise_pairs`)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.common.contract import Card
from harness.common.flags import OffloadFlags, flag_json
from harness.common.inputs import InputError, env_number
from harness.common.units import GIB
from harness.models import get_model
from harness.plan.scenario.fields import _err
from harness.plan.scenario.types import HARNESS_BACKEND, Cell, ReleaseNotInstalled, Scenario, ScenarioError
from harness.policy import EngineContext, EngineError, ReleaseMissing, resolve_many


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
