"""A scenario's [expect] table: each expectation parsed and validated (errors name the file and the field), and
checked against the scenario's cells at load time, so an expectation that names no cell fails there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.common.contract import PHASES, STATUSES, Card
from harness.plan.scenario.cells import layerwise_pairs, matches
from harness.plan.scenario.fields import _err, _flag_table, _positive_number
from harness.plan.scenario.types import (
    HARNESS_BACKEND,
    Cell,
    Expectations,
    FateExpectation,
    PeerStepRatio,
    Scenario,
)

_EXPECT_KEYS = {"lowest_peak", "fate", "same_output", "host", "invariants", "close_output_rtol", "beats_peer",
                "peer_step_ratio", "prefetch_peak_monotone", "resident_never_slows", "cfg_batch_rtol", "plan_within",
                "layerwise_overhead", "reserved_over_allocated"}


_PLAN_WITHIN_KEYS = ("peak", "time")


_HOST_KEYS = {"max_rss_over_weights", "max_pinned_held_over_requested", "min_setup_gbps"}


_FATE_KEYS = {"cards", "backends", "where", "status", "phase"}


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
    fates = tuple(_fate(f, path, f"expect.fate[{i}]", card_names, backends) for i, f in enumerate(raw_fates))
    switches = {key: _switch(data, key, path) for key in
                ("same_output", "invariants", "beats_peer", "prefetch_peak_monotone", "resident_never_slows")}
    rtol, rtol_by_backend = _close_output_rtol(data.get("close_output_rtol"), path, backends)
    if switches["beats_peer"]:
        _needs_peers(path, "expect.beats_peer", "step times and peaks", backends)
    return Expectations(lowest, fates, host=_host_bounds(data.get("host"), path), close_output_rtol=rtol,
                        close_output_rtol_by_backend=rtol_by_backend,
                        peer_step_ratio=_peer_step_ratio(data.get("peer_step_ratio"), path, backends),
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


def _fate(f: Any, path: Path, where: str, card_names: set[str], backends: tuple[str, ...]) -> FateExpectation:
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
    fbackends = f.get("backends")
    if fbackends is not None:
        names_ok = isinstance(fbackends, list) and bool(fbackends) and all(isinstance(b, str) for b in fbackends)
        if not names_ok or not set(fbackends) <= set(backends):
            raise _err(path, f"{where}.backends", f"expected a list of this scenario's backends {list(backends)}")
        fbackends = tuple(fbackends)
    return FateExpectation(_flag_table(f.get("where", {}), path, f"{where}.where"), f["status"], phase, fcards,
                           fbackends)


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


def _peer_step_ratio(value: Any, path: Path, backends: tuple[str, ...]) -> tuple[PeerStepRatio, ...]:
    """`peer_step_ratio = { "sglang@0.5.23" = { at_most = 1.35, reason = "..." } }`: one entry per other backend
    of the scenario, each with the largest ratio of its step to ours that passes and the reason the gap is kept."""
    field = "expect.peer_step_ratio"
    if value is None:
        return ()
    if not isinstance(value, dict) or not value:
        raise _err(path, field, 'expected a table of backends: { "sglang@0.5.23" = { at_most = 1.35, reason = '
                   '"..." } }')
    others = [b for b in backends if b != HARNESS_BACKEND]
    out = []
    for backend, entry in value.items():
        where = f"{field}.{backend}"
        if backend not in others:
            raise _err(path, where, f"names no other backend of this scenario (backends: {others})")
        if not isinstance(entry, dict) or set(entry) != {"at_most", "reason"}:
            raise _err(path, where, "expected a table with exactly `at_most` (a ratio) and `reason` (why the gap "
                       "is kept)")
        if not _positive_number(entry["at_most"]):
            raise _err(path, f"{where}.at_most", f"expected a positive finite ratio, got {entry['at_most']!r}")
        if not isinstance(entry["reason"], str) or not entry["reason"].strip():
            raise _err(path, f"{where}.reason", "expected the reason the gap is kept, in words")
        out.append(PeerStepRatio(backend, float(entry["at_most"]), entry["reason"].strip()))
    _needs_peers(path, field, "step times", backends)
    return tuple(out)


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
        scope = [c for c in cells if (f.cards is None or c.card.name in f.cards)
                 and (f.backends is None or c.backend in f.backends)]
        if not any(matches(c.requested, f.where) for c in scope):
            raise _err(path, f"expect.fate[{i}].where",
                       f"{f.where} matches no cell of the matrix (cards {', '.join(sorted(f.cards or [])) or 'all'}"
                       f"; backends {', '.join(f.backends or []) or 'all'})")
