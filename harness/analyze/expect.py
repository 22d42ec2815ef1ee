"""Scenario expectations, evaluated on records (never on live objects).

- `fate`: cells matching `where` (requested flags) on the given cards end with `status` (and `phase`), under
  every backend.
- `lowest_peak`: on every card, the harness-backend cell matching `where` loads, and its peak device memory (max
  of load and runtime peaks, on the record's peak counter) is strictly the lowest of all harness-backend cells
  that loaded. This is the #26925 guard: dit_cpu_offload + layerwise must load and must be the most frugal
  combination. (Other backends' cells are peers for comparison, not part of this guard.)
- `same_output`: within each backend, every cell that ran computed bit-identical final latents.
- `close_output_rtol = r` (or `{ default = r, "<backend>" = r2 }`): every cell of another backend that ran computed
  final latents within relative L2 distance r (||x - ref|| / ||ref||, in float32; r2 for the backend named) of
  those of the harness-backend cell with the same requested flags on the same card, which must have run too.
  Latents are read from the files the runner has the child save (`latents_path` in the record:
  <run>/cells/<cell>/latents.pt). Bit equality is not asked across backends: diffusers' hooks place weights in
  other buffers, so kernels may differ.
- `beats_peer`: every other-backend cell that streamed the DiT is matched by the harness-backend cell with the
  same requested flags on the same card, and ours is at least as fast (median denoise step, the first step left
  out as in `harness.analyze.roofline`) and peaks no higher at runtime (max over encode/denoise/decode on the record's
  peak counter). A peer cell that did not run is no comparison: the check fails and says why.
- `peer_step_ratio = { "<backend>" = { at_most = x, reason = "..." } }`: a known speed gap kept as a regression
  check. Every layerwise cell of that backend is matched by our layerwise cell with the same requested flags on
  the same card, and its median steady step is at most x times ours; the verdict gives each measured ratio and
  the reason. A cell of either side that did not run is no comparison: the check fails and says why.
- `prefetch_peak_monotone`: among harness-backend layerwise cells of a card that differ only in the prefetch
  size, a larger window (in layers, as the runtime recorded it) never has a lower denoise peak (on the record's
  peak counter; 2 % slack, SGLang CI's runtime-peak tolerance). A cell that ran out of memory after load counts
  as above every cell that ran.
- `resident_never_slows`: among harness-backend layerwise cells of a card that differ only in resident layers
  (count and policy), a cell with more resident layers steps no slower (median denoise step, first left out; 3 %
  slack) than one with fewer whose step is transfer-bound: its streamed bytes x forwards over the probe's pinned
  H2D rate are at least half its measured step. Pairs whose smaller cell is not transfer-bound, or that lack the
  probe, are listed as not compared.
- `cfg_batch_rtol = r`: every cfg-batch cell (`[run] cfg_batch`, the two CFG passes as one batched forward: a
  different workload) that ran computed final latents within relative L2 distance r of the two-pass cell with the
  same flags and backend; the verdict also gives the step-time ratio batched / two-pass. lowest_peak, same_output,
  close_output and beats_peer judge the two-pass cells only.
- `plan_within = {peak = p, time = t}`: on every GPU cell of our runtime that ran or ran out of memory, the
  planner (`harness.plan.planner`: the plan the runner stored in the record) predicted its fate (fits, or the phase of
  the OOM), and its allocator reserved load and runtime peaks lie within p, its median steady step within t, of
  the plan (relative to the plan; a peak within 32 MiB of its plan passes whatever the percentage,
  `PLAN_PEAK_FLOOR_BYTES`). Phases that ran out of memory and peaks the synthetic checkpoint's generation
  inflated are not compared; the CPU profile is not judged (the plan predicts CUDA counters); a cell the planner
  cannot plan is named in the verdict as not planned, with the reason, and not judged.
- `layerwise_overhead = f`: each of our layerwise cells steps at most f slower than its whole-DiT twin.
- `reserved_over_allocated = f`: each of our layerwise cells ran, and its runtime peak allocator reserved (max over
  encode, denoise and decode of every round, the warm-up included) is at most f over its runtime peak allocated
  (max over the same phases): cache kept between phases does not raise the cell's device footprint, which is what
  decides whether it fits a card. A phase's own ratio is not judged (each line names the largest); a cell that did
  not run to the end fails the check, and so does a card with none. GPU scenarios only (CPU records have no
  allocator counters).
- `invariants`, `host`: per-cell checks, below.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from harness.common.contract import RUNTIME_PHASES, CellRecord, PhaseStats, Placement, Status, fate_text
from harness.common.flags import OffloadFlags
from harness.common.locations import local_scenario_file
from harness.common.records import write_json_atomic
from harness.plan.planner import WARM_KERNELS_BYTES
from harness.plan.scenario import (
    HARNESS_BACKEND,
    FateExpectation,
    PeerStepRatio,
    Scenario,
    ScenarioError,
    load_scenario,
    matches,
    whole_dit_flags,
)


@dataclass(frozen=True)
class Verdict:
    check: str
    card: str
    passed: bool
    message: str
    # failed only because latents files are not on this machine (a report regenerated away from the GPU box):
    # the gate still fails such a verdict; a report says it was not re-evaluated
    latents_elsewhere: bool = False


def _mib(v: int | None) -> str:
    return "n/a" if v is None else f"{v / 2**20:,.0f} MiB"


def fate_failures(rec: CellRecord, fates: tuple[FateExpectation, ...]) -> list[str]:
    """Messages for each declared fate this record should meet and does not."""
    out = []
    for f in fates:
        if f.cards is not None and rec.card_name not in f.cards:
            continue
        if f.backends is not None and (rec.backend or HARNESS_BACKEND) not in f.backends:
            continue
        if not matches(rec.requested, f.where):
            continue
        if rec.status != f.status or (f.phase is not None and rec.failed_phase != f.phase):
            out.append(f"{rec.cell_id}: expected {fate_text(f.status, f.phase)}, got {rec.fate} ({rec.reason})")
    return out


def demand(rec: CellRecord) -> float | None:
    """Peak device memory a cell needed: its measured peak, or infinity if it ran out (it needed more than the
    card has; the allocator's peak stops short of the allocation that failed)."""
    return float("inf") if rec.status is Status.OOM else rec.peaks.peak


def _fmt(v: float | None) -> str:
    return "> cap (oom)" if v == float("inf") else _mib(None if v is None else int(v))


def lowest_peak_verdict(card: str, records: Iterable[CellRecord], where: dict[str, Any]) -> Verdict:
    recs = [r for r in records if r.backend == HARNESS_BACKEND]
    targets = [r for r in recs if matches(r.requested, where)]
    if len(targets) != 1:
        return Verdict("lowest_peak", card, False, f"{len(targets)} cells match {where}; expected exactly one")
    target = targets[0]
    if target.status is not Status.OK:
        return Verdict("lowest_peak", card, False, f"{target.cell_id} did not run: {target.fate} ({target.reason})")
    mine = demand(target)
    others = [r for r in recs if r is not target and r.loaded]
    not_above = [r for r in others if (d := demand(r)) is not None and mine is not None and d <= mine]
    counter = target.peak_counter
    listing = ", ".join(f"{r.label}={_fmt(demand(r))}" for r in others) or "none"
    if not_above or mine is None:
        return Verdict(
            "lowest_peak", card, False,
            f"{target.cell_id} peaked at {_fmt(mine)} ({counter}), not below every cell that loaded: {listing}",
        )
    return Verdict(
        "lowest_peak", card, True,
        f"{target.label} loads and peaks at {_fmt(mine)} ({counter}); others that loaded: {listing}",
    )


def same_output_verdict(card: str, records: Iterable[CellRecord]) -> Verdict:
    """Every cell that ran to the end computed the same final latents, bit for bit (same seed, same math), within
    each backend."""
    ran = [r for r in records if r.status is Status.OK]
    differ = []
    for backend in dict.fromkeys(r.backend for r in ran):
        digests: dict[str, list[str]] = {}
        for r in ran:
            if r.backend == backend:
                digests.setdefault((r.outputs or {}).get("latents_sha256", "missing"), []).append(r.label)
        if len(digests) > 1:
            differ.append("; ".join(f"{d[:12]}: {', '.join(cells)}" for d, cells in digests.items()))
    if not differ:
        return Verdict("same_output", card, True, f"{len(ran)} cells that ran agree bit for bit (per backend)")
    return Verdict("same_output", card, False, f"final latents differ between cells: {' | '.join(differ)}")


def _flags_key(record: CellRecord) -> OffloadFlags:
    """Records with the same key differ only in backend (or cfg_batch): their requested flags."""
    return record.requested


def latents_distance(path: str | Path, ref_path: str | Path) -> float:
    """Relative L2 distance ||x - ref|| / ||ref|| of two saved latent tensors, in float32 on the host.

    Raises:
        OSError: a file is missing or unreadable.
        ValueError: the shapes differ, or a tensor is not finite.
    """
    import torch

    x = torch.load(path, map_location="cpu", weights_only=True).float()
    ref = torch.load(ref_path, map_location="cpu", weights_only=True).float()
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(ref.shape)}")
    if not (torch.isfinite(x).all() and torch.isfinite(ref).all()):
        raise ValueError("latents are not finite")
    ref_norm = float(ref.norm())
    diff = float((x - ref).norm())
    return diff / ref_norm if ref_norm else (0.0 if diff == 0 else float("inf"))


def _latents_line(r: CellRecord, ref: CellRecord, rtol: float) -> tuple[bool, str, bool]:
    """(within rtol, the line saying so, whether a latents file was missing) for the final latents of `r` against
    those of `ref`."""
    try:
        if not r.latents_path or not ref.latents_path:
            raise ValueError(f"no latents_path in the record of {(r if not r.latents_path else ref).label}")
        dist = latents_distance(r.latents_path, ref.latents_path)
    except (OSError, ValueError, RuntimeError) as e:
        return (False, f"{r.label}: cannot compare with {ref.label}: {type(e).__name__}: {e}",
                isinstance(e, FileNotFoundError))
    return dist <= rtol, f"{r.label} vs {ref.label}: {dist:.3g}" + ("" if dist <= rtol else f" > {rtol}"), False


def _close_to_reference(
    check: str, card: str, pairs: list[tuple[CellRecord, CellRecord | None]], rtol: float, which: str,
    when_none: tuple[bool, str], note: Callable[[CellRecord, CellRecord], str] | None = None,
    rtol_by_backend: Mapping[str, float] | None = None,
) -> Verdict:
    """Each (cell, reference) pair's final latents within `rtol` (relative L2; `rtol_by_backend` where it names the
    cell's backend); a reference that did not run fails the check; `note(cell, reference)` adds to a pair's line;
    `when_none` is the verdict without pairs."""
    problems, passed, missing = [], [], 0
    for r, ref in pairs:
        if ref is None or ref.status is not Status.OK:
            why = "has no record" if ref is None else f"ended {ref.status}"
            problems.append(f"{r.label}: the {which} cell with the same flags {why}, nothing to compare with")
            continue
        bound = (rtol_by_backend or {}).get(r.backend, rtol)
        ok, line, file_missing = _latents_line(r, ref, bound)
        missing += file_missing
        line += ("" if bound == rtol else f" (its bound {bound})") + (note(r, ref) if note else "")
        (passed if ok else problems).append(line)
    if problems:
        return Verdict(check, card, False, "; ".join(problems), latents_elsewhere=missing == len(problems))
    if not passed:
        return Verdict(check, card, *when_none)
    return Verdict(check, card, True, f"relative L2 of final latents within {rtol}: {'; '.join(passed)}")


def close_output_verdict(card: str, records: Iterable[CellRecord], rtol: float,
                         rtol_by_backend: Mapping[str, float] | None = None) -> Verdict:
    """Every other-backend cell that ran is within `rtol` (relative L2 of final latents; `rtol_by_backend` where it
    names the cell's backend) of the harness-backend cell with the same requested flags."""
    recs = list(records)
    ref = {_flags_key(r): r for r in recs if r.backend == HARNESS_BACKEND}
    pairs = [(r, ref.get(_flags_key(r))) for r in recs if r.backend != HARNESS_BACKEND and r.status is Status.OK]
    return _close_to_reference("close_output", card, pairs, rtol, "harness",
                               (True, "no other-backend cell ran: nothing to compare"), rtol_by_backend=rtol_by_backend)


def cfg_batch_verdict(card: str, records: Iterable[CellRecord], rtol: float) -> Verdict:
    """Every cfg-batch cell that ran is within `rtol` (relative L2 of final latents) of the two-pass cell with the
    same flags and backend; each line also gives the steady step time of both and their ratio."""
    recs = list(records)
    two_pass = {(r.backend, _flags_key(r)): r for r in recs if not r.cfg_batch}
    pairs = [(r, two_pass.get((r.backend, _flags_key(r)))) for r in recs if r.cfg_batch and r.status is Status.OK]

    def step_ratio(r: CellRecord, ref: CellRecord) -> str:
        t_batch, t_two = r.median_step_s(), ref.median_step_s()
        return f"; step {t_batch:.3f} s vs {t_two:.3f} s two-pass ({t_batch / t_two:.2f}x)" if t_batch and t_two else ""

    return _close_to_reference("cfg_batch", card, pairs, rtol, "two-pass",
                               (False, "no cfg-batch cell ran: nothing to compare"), step_ratio)


# plan_within's absolute floor for peaks: a peak off its plan by more than the relative tolerance fails only if it is
# also off by more than this. One cuBLAS workspace (WARM_KERNELS_BYTES, 32 MiB, measured in
# results/h200/reserved-capped.records.jsonl), the largest allocation the plan places by an observed rule rather
# than a model, and above the caching allocator's grain (a 1-10 MiB request reserves a 20 MiB segment). Without it
# a small load peak failed on noise: Qwen-Image on the 4090 cap, load 132 MiB against 142 planned (-7 %, 10 MiB).
PLAN_PEAK_FLOOR_BYTES = WARM_KERNELS_BYTES


def _bytes_off(measured: int | None, predicted: int | None) -> int | None:
    return None if measured is None or predicted is None else abs(int(measured) - int(predicted))


def plan_within_verdict(card: str, records: Iterable[CellRecord], tolerance: dict[str, float]) -> Verdict:
    """The planner against every GPU cell of our runtime: fate, peaks within tolerance["peak"], step within
    tolerance["time"] (each relative to the plan)."""
    from harness.plan.planner import check_record

    gpu = [r for r in records if r.device == "cuda" and r.backend == HARNESS_BACKEND
           and r.status in (Status.OK, Status.OOM)]
    if not gpu:
        return Verdict("plan_within", card, True, "no GPU cell of our runtime ran: not judged (the plan predicts "
                       "CUDA allocator counters)")
    problems, checked, skipped = [], 0, []
    for r in gpu:
        c = check_record(r)
        if c is None:
            problems.append(f"{r.label}: no plan")
            continue
        if c.not_planned:  # flags the planner does not model: nothing predicted to judge, said in the verdict
            skipped.append(f"{r.label} not planned: {c.not_planned}")
            continue
        checked += 1
        if not c.verdict_ok:
            planned = "fits" if c.predicted_oom_phase is None else f"OOM in {c.predicted_oom_phase}"
            problems.append(f"{r.label}: planned {planned}, ended {r.fate}")
        for what, err, key, miss in (
                ("load peak", c.load_error, "peak", _bytes_off(c.measured_load, c.predicted_load)),
                ("runtime peak", c.runtime_error, "peak", _bytes_off(c.measured_runtime, c.predicted_runtime)),
                ("step", c.step_error, "time", None)):
            if key in tolerance and err is not None and abs(err) > tolerance[key]:
                if miss is not None and miss <= PLAN_PEAK_FLOOR_BYTES:
                    continue  # a few MiB on a small peak: the allocator's grain, not the plan's error
                problems.append(f"{r.label}: {what} {100 * err:+.1f} % off the plan (> {tolerance[key]:.0%}"
                                + (f" and > {PLAN_PEAK_FLOOR_BYTES // 2**20} MiB" if miss is not None else "") + ")")
    if problems:
        return Verdict("plan_within", card, False, "; ".join(problems + skipped))
    return Verdict("plan_within", card, True, "; ".join([f"{checked} cells within {tolerance} of their plans",
                                                         *skipped]))


def _streamed(record: CellRecord) -> bool:
    return bool(record.effective.dit_layerwise_offload)


def _peer_pairs(records: Iterable[CellRecord], backend: str | None = None
                ) -> tuple[list[tuple[CellRecord, CellRecord]], list[str]]:
    """(peer, ours) for each other backend's layerwise cell (`backend`'s only, if given) and our layerwise cell with
    the same requested flags, both finished; and a 'not compared' line for each peer whose pair is missing or
    did not finish."""
    recs = list(records)
    ours = {_flags_key(r): r for r in recs if r.backend == HARNESS_BACKEND and _streamed(r)}
    pairs, problems = [], []
    for peer in recs:
        if peer.backend == HARNESS_BACKEND or not _streamed(peer) or backend not in (None, peer.backend):
            continue
        mine = ours.get(_flags_key(peer))
        for who in (peer, mine):
            if who is None or who.status is not Status.OK:
                why = "has no record" if who is None else f"ended {who.status} ({who.reason})"
                problems.append(f"{peer.label}: {'the harness cell' if who is mine else 'it'} {why}; not compared")
                break
        else:
            pairs.append((peer, mine))
    return pairs, problems


def beats_peer_verdict(card: str, records: Iterable[CellRecord]) -> Verdict:
    """Our layerwise runtime against each other backend's cell with the same flags: time and runtime peak."""
    pairs, problems = _peer_pairs(records)
    passed = []
    for peer, mine in pairs:
        t_mine, t_peer = mine.median_step_s(), peer.median_step_s()
        p_mine, p_peer = mine.peaks.runtime, peer.peaks.runtime
        if None in (t_mine, t_peer, p_mine, p_peer):
            problems.append(f"{peer.label}: no denoise steps or runtime peak recorded; not compared")
            continue
        line = (f"{peer.label}: step {t_mine:.3f} s (ours) vs {t_peer:.3f} s, runtime peak {_mib(p_mine)} "
                f"(ours) vs {_mib(p_peer)} ({mine.peak_counter})")
        (passed if t_mine <= t_peer and p_mine <= p_peer else problems).append(line)
    if problems:
        return Verdict("beats_peer", card, False, "; ".join(problems))
    if not passed:
        return Verdict("beats_peer", card, False, "no other-backend cell streamed the DiT: nothing to compare")
    return Verdict("beats_peer", card, True, "; ".join(passed))


def peer_step_ratio_verdict(card: str, records: Iterable[CellRecord], bound: PeerStepRatio) -> Verdict:
    """Each layerwise cell of `bound.backend`: its median steady step over ours (same flags) at most the bound."""
    pairs, problems = _peer_pairs(records, bound.backend)
    passed = []
    for peer, mine in pairs:
        t_mine, t_peer = mine.median_step_s(), peer.median_step_s()
        if t_mine is None or t_peer is None or t_mine <= 0:
            problems.append(f"{peer.label}: no denoise steps recorded; not compared")
            continue
        ratio = t_peer / t_mine
        line = f"{peer.label}: {t_peer:.3f} s vs {t_mine:.3f} s (ours) = {ratio:.2f}x (at most {bound.at_most:g}x)"
        (passed if ratio <= bound.at_most else problems).append(line)
    if not problems and not passed:
        problems.append(f"no layerwise cell of {bound.backend}: nothing to compare")
    message = "; ".join(problems or passed) + f". Why the gap is kept: {bound.reason}"
    return Verdict(f"peer_step_ratio[{bound.backend}]", card, not problems, message)


def layerwise_overhead_verdict(card: str, records: Iterable[CellRecord], limit: float) -> Verdict:
    """Each of our layerwise cells' steady step at most (1 + limit) x that of the cell with the same requested flags
    but dit_layerwise_offload = false (the whole DiT on the device for the denoise), from the same run's records."""
    recs = [r for r in records if r.backend == HARNESS_BACKEND and not r.cfg_batch]
    whole = {_flags_key(r): r for r in recs if not r.requested.dit_layerwise_offload}
    problems, passed = [], []
    for r in recs:
        if not r.requested.dit_layerwise_offload:
            continue
        ref = whole.get(whole_dit_flags(r.requested))
        t, t_ref = r.steady_step_ms(), ref.steady_step_ms() if ref is not None else None
        if ref is None or r.status is not Status.OK or ref.status is not Status.OK or None in (t, t_ref):
            why = "has no whole-DiT cell" if ref is None else "has no steady step on both sides (ended " \
                f"{r.status} / {ref.status})"
            problems.append(f"{r.label}: {why}; not compared")
            continue
        over = t / t_ref - 1
        line = f"{r.label}: step {t:.1f} ms vs whole-DiT {t_ref:.1f} ms ({over:+.2%}, limit +{limit:.0%})"
        (passed if over <= limit else problems).append(line)
    if problems or not passed:
        return Verdict("layerwise_overhead", card, False, "; ".join(problems) or "no layerwise cell: nothing compared")
    return Verdict("layerwise_overhead", card, True, "; ".join(passed))


def reserved_over_allocated_verdict(card: str, records: Iterable[CellRecord], limit: float) -> Verdict:
    """Each of our layerwise cells ran to the end, and its runtime peak reserved (allocator, max over the runtime
    phases of every round, warm-up included) is at most (1 + limit) x its runtime peak allocated (max over the same
    phases): cache kept between phases does not raise the cell's device footprint. A phase's own ratio can be far
    higher while another phase holds the peak (Wan both-on: denoise 11,822 / 5,687 MiB); each line names the
    largest one, and the record's reserved_attribution says where it comes from."""
    problems, passed = [], []
    for r in records:
        if r.backend != HARNESS_BACKEND or not r.requested.dit_layerwise_offload or r.same_as:
            continue
        reserved = r.phase_max("alloc_peak_reserved_bytes", RUNTIME_PHASES)
        allocated = r.phase_max("alloc_peak_allocated_bytes", RUNTIME_PHASES)
        if r.status is not Status.OK or not reserved or not allocated:
            problems.append(f"{r.label}: {r.fate}, not run to the end: not checked")
            continue
        over = reserved / allocated - 1
        line = f"{r.label}: runtime reserved {_mib(reserved)} for {_mib(allocated)} allocated ({over:+.1%}, " \
            f"limit +{limit:.0%}){_largest_phase_ratio(r)}"
        (passed if over <= limit else problems).append(line)
    if problems or not passed:
        return Verdict("reserved_over_allocated", card, False,
                       "; ".join(problems) or "no layerwise cell of our runtime: nothing checked")
    return Verdict("reserved_over_allocated", card, True, "; ".join(passed))


def _largest_phase_ratio(record: CellRecord) -> str:
    """", largest in one phase: denoise 2.08x (11,094 MiB cached from earlier)", or "" when none is measured."""
    ratios = []
    for name in RUNTIME_PHASES:
        ph = record.phases.get(name)
        if ph and ph.alloc_peak_reserved_bytes and ph.alloc_peak_allocated_bytes:
            ratios.append((ph.alloc_peak_reserved_bytes / ph.alloc_peak_allocated_bytes, name, ph))
    if not ratios:
        return ""
    ratio, name, ph = max(ratios, key=lambda t: t[0])
    cached = (ph.reserved_attribution or {}).get("cached_from_earlier_bytes")
    return f"; largest in one phase: {name} {ratio:.2f}x" + (f" ({_mib(cached)} cached from earlier)" if cached else "")


PREFETCH_PEAK_SLACK = 0.02  # SGLang CI's runtime_peak_vram tolerance
RESIDENT_STEP_SLACK = 0.03
TRANSFER_BOUND_SHARE = 0.5  # transfer time at the probe's rate over the measured step, at or above: transfer-bound


def _layerwise(record: CellRecord) -> dict[str, Any]:
    """The DiT's layerwise section of the record (our runtime), or {}."""
    return ((record.components or {}).get("dit") or {}).get("layerwise") or {}


def _group_key(record: CellRecord, drop: tuple[str, ...]) -> OffloadFlags:
    """The effective flags with those in `drop` at their defaults: records with one key differ only in those."""
    return replace(record.effective, **{name: getattr(OffloadFlags(), name) for name in drop})


def _harness_layerwise(records: Iterable[CellRecord]) -> list[CellRecord]:
    recs = records
    return [r for r in recs if r.backend == HARNESS_BACKEND and _streamed(r) and not r.same_as]


def _denoise_peak(record: CellRecord) -> float | None:
    if record.status is Status.OOM and record.loaded:
        return float("inf")
    if record.status is not Status.OK:
        return None
    denoise = record.phases.get("denoise")
    return denoise.get(record.peak_counter) if denoise else None


def prefetch_peak_verdict(card: str, records: Iterable[CellRecord]) -> Verdict:
    """A larger prefetch window never lowers the denoise peak, between cells that differ only in the prefetch."""
    by_key: dict[OffloadFlags, list[tuple[int, float, CellRecord]]] = {}
    for r in _harness_layerwise(records):
        peak = _denoise_peak(r)
        window = sum(g.get("prefetch", 0) for g in (_layerwise(r).get("groups") or {}).values()) or \
            r.effective.dit_offload_prefetch_size
        if peak is not None and window is not None:
            by_key.setdefault(_group_key(r, ("dit_offload_prefetch_size",)), []).append((window, peak, r))
    problems, passed = [], []
    for cells in by_key.values():
        cells.sort(key=lambda c: (c[0], c[1]))
        for (w1, p1, r1), (w2, p2, r2) in itertools.pairwise(cells):
            line = f"{r2.label} (p={w2}) {_fmt(p2)} vs {r1.label} (p={w1}) {_fmt(p1)}"
            ok = w1 == w2 or p2 >= p1 * (1 - PREFETCH_PEAK_SLACK)
            (passed if ok else problems).append(line)
    if problems:
        return Verdict("prefetch_peak", card, False,
                       "a larger prefetch lowered the denoise peak: " + "; ".join(problems))
    if not passed:
        return Verdict("prefetch_peak", card, False,
                       "no two layerwise cells differ only in prefetch: nothing compared")
    return Verdict("prefetch_peak", card, True, "; ".join(passed))


def _transfer_bound(record: CellRecord, step_s: float) -> bool | None:
    lw = _layerwise(record)
    gbps = record.h2d_gbps
    streamed = lw.get("streamed_bytes", lw.get("host_bytes"))
    if not gbps or not streamed:
        return None
    return record.dit_calls_per_step * streamed / (gbps * 1e9) >= TRANSFER_BOUND_SHARE * step_s


def _residency_policy(record: CellRecord) -> str:
    return record.effective.dit_layerwise_residency_policy


def resident_speed_verdict(card: str, records: Iterable[CellRecord]) -> Verdict:
    """More resident layers never slow a transfer-bound step, between cells that differ only in the resident count
    under one residency policy (a cell with none resident compares with every policy).

    Not across policies: which layers stay resident decides how much copy time hides under compute. Measured on the
    H200 at the 5090 cap (Qwen-Image, prefetch 1): 30 strided stepped in 0.744 s, 38 leading in 0.770 s. Leading
    keeps the first layers, so their compute runs with the copy engine idle (the window reaches one layer ahead) and
    the streamed tail is copied back to back; strided interleaves the streamed layers with resident ones."""
    by_key: dict[OffloadFlags, list[tuple[int, float, CellRecord]]] = {}
    for r in _harness_layerwise(records):
        step = r.median_step_s() if r.status is Status.OK else None
        if step is not None:
            kept = sum(g.get("resident_layers", 0) for g in (_layerwise(r).get("groups") or {}).values())
            key = _group_key(r, ("dit_layerwise_resident_layers", "dit_layerwise_residency_policy"))
            by_key.setdefault(key, []).append((kept, step, r))
    problems, passed, skipped = [], [], []
    for cells in by_key.values():
        for k1, s1, r1 in cells:
            bound = _transfer_bound(r1, s1)
            for k2, s2, r2 in cells:
                if k2 <= k1 or (k1 and _residency_policy(r1) != _residency_policy(r2)):
                    continue
                line = f"{r2.label} (r={k2}) {s2:.3f} s vs {r1.label} (r={k1}) {s1:.3f} s"
                if not bound:
                    skipped.append(line + (" (not transfer-bound)" if bound is False else " (no H2D probe)"))
                    continue
                (passed if s2 <= s1 * (1 + RESIDENT_STEP_SLACK) else problems).append(line)
    note = f"; not compared: {'; '.join(skipped)}" if skipped else ""
    if problems:
        return Verdict("resident_speed", card, False, "more resident layers stepped slower: " + "; ".join(problems)
                       + note)
    if not passed:
        return Verdict("resident_speed", card, False, "no transfer-bound pair of cells differing only in resident "
                       "layers ran: nothing compared" + note)
    return Verdict("resident_speed", card, True, "; ".join(passed) + note)


def host_failures(rec: CellRecord, bounds: dict[str, Any]) -> list[str]:
    """Host-cost bounds of one cell that ran: peak RSS over all weight bytes, pinned held over requested, and the
    setup rate (weight bytes over setup seconds) of named components."""
    comps = rec.components or {}
    weights = sum(c.get("weight_bytes", 0) for c in comps.values())
    phases = rec.phases.values()
    out = []
    ratio = bounds.get("max_rss_over_weights")
    if ratio is not None:
        rss = max([p.get("rss_peak_bytes", 0) for p in phases] + [rec.ru_maxrss_bytes or 0])
        if not weights or rss > ratio * weights:
            out.append(f"{rec.cell_id}: host peak RSS {_mib(rss)} > {ratio} x weights {_mib(weights)}")
    ratio = bounds.get("max_pinned_held_over_requested")
    if ratio is not None:
        requested = max((p.get("pinned_requested_peak_bytes", 0) for p in phases), default=0)
        held = max((p.get("pinned_registered_bytes", 0) + p.get("pinned_torch_allocator_bytes", 0) for p in phases),
                   default=0)
        if held > ratio * requested:
            out.append(f"{rec.cell_id}: pinned held {_mib(held)} > {ratio} x requested {_mib(requested)}")
    for role, floor in (bounds.get("min_setup_gbps") or {}).items():
        rate = (comps.get(role) or {}).get("setup_gbps")
        if rate is None or rate < floor:
            out.append(f"{rec.cell_id}: {role} setup at {rate} GB/s, below {floor} GB/s")
    return out


# Pinned host bytes over streamed bytes: diffusers budgets 2x the model for stream offload; we allow 2.1x.
PINNED_OVER_STREAMED = 2.1


def invariant_failures(rec: CellRecord) -> list[str]:
    """The offload memory invariants of one cell that ran, on the weight bytes the components hold on the device
    (the harness ledger and per-component probes, so activations do not blur them):

    1. At every phase start and end, a CPU-offloaded component holds no weights on the device, and a layerwise
       component (DiT, text encoder, VAE) holds only its non-layer weights (no layer left from a window).
    2. During denoise the ledger peak <= weights of resident components + the DiT's non-layer weights
       + its resident layers (`dit_layerwise_resident_layers`) + sum over streamed groups of (2p + 1) x that
       group's largest layer (2p in flight or computing, +1 slack for a wrap-around prefetch), + the DiT whole
       when it is CPU-offloaded.
    3. With dit_cpu_offload + layerwise, the load phase never holds the whole DiT: ledger load peak minus the
       other resident components < the DiT's weight bytes.
    4. Pinned host bytes (peak requested) <= 2.1 x the bytes the layerwise runtimes stream (all components).
    """
    comps = rec.components or {}
    dit = comps.get("dit") or {}
    lw = dit.get("layerwise")
    nonlayer = dit.get("weight_bytes", 0) - (lw or {}).get("param_bytes", 0) if lw else None
    # what a layerwise component keeps on the device between its uses: its non-layer weights
    kept_between = {role: c.get("weight_bytes", 0) - c["layerwise"].get("param_bytes", 0)
                    for role, c in comps.items() if c.get("layerwise")}
    out = _between_phases(rec.cell_id, comps, rec.phases, kept_between)
    out += _denoise_bound(rec.cell_id, comps, rec.phases, nonlayer, kept_between)
    load_peak = rec.phase_max("ledger_peak_bytes", ("load",))
    if dit.get("placement") == Placement.LAYERWISE_FROM_HOST and load_peak is not None:
        others = sum(c["weight_bytes"] for r, c in comps.items() if r != "dit" and c["placement"] == Placement.RESIDENT)
        if load_peak - others >= dit["weight_bytes"]:
            out.append(f"{rec.cell_id}: load held the whole DiT ({_mib(load_peak - others)} of DiT weights)")
    if lw:
        pinned = rec.phase_max("pinned_requested_peak_bytes", rec.phases) or 0
        streamed = sum(c["layerwise"]["host_bytes"] for c in comps.values() if c.get("layerwise"))
        if pinned > PINNED_OVER_STREAMED * streamed:
            out.append(f"{rec.cell_id}: pinned {_mib(pinned)} > {PINNED_OVER_STREAMED} x streamed {_mib(streamed)}")
    return out


def _between_phases(cid: str, comps: dict[str, Any], phases: dict[str, PhaseStats], kept_between: dict[str, int],
                    ) -> list[str]:
    """Invariant 1: what each component holds on the device at every phase start and end."""
    out = []
    for pname, ph in phases.items():
        for when in ("device_weights_at_start", "device_weights_at_end"):
            held = ph.get(when) or {}
            for role, c in comps.items():
                got = held.get(role)
                if got is None:
                    continue
                if c["placement"] == Placement.CPU_OFFLOAD and got != 0:
                    out.append(f"{cid}: {role} is CPU-offloaded but holds {_mib(got)} on the device at {pname} "
                               f"{when.rsplit('_', 1)[-1]}")
                if role in kept_between and got != kept_between[role]:
                    out.append(f"{cid}: layerwise {'DiT' if role == 'dit' else role} holds {_mib(got)} at {pname} "
                               f"{when.rsplit('_', 1)[-1]}, expected its non-layer weights "
                               f"{_mib(kept_between[role])}")
    return out


def _denoise_bound(cid: str, comps: dict[str, Any], phases: dict[str, PhaseStats], nonlayer: int | None,
                   kept_between: dict[str, int]) -> list[str]:
    """Invariant 2: the denoise weight peak against what the placements allow on the device."""
    denoise = phases.get("denoise")
    if denoise is None or denoise.ledger_peak_bytes is None:
        return []
    dit = comps.get("dit") or {}
    lw = dit.get("layerwise")
    resident = sum(c["weight_bytes"] for c in comps.values() if c["placement"] == Placement.RESIDENT)
    resident += sum(b for role, b in kept_between.items() if role != "dit")  # layerwise te/VAE: non-layer weights
    if lw and "largest_layer_by_group" in lw and nonlayer is not None:  # older records lack the field: skipped
        window = sum((2 * g["prefetch"] + 1) * lw["largest_layer_by_group"][name] for name, g in lw["groups"].items())
        kept = lw.get("resident_bytes", 0)  # the DiT's resident layers (0 in records from before them)
        bound = resident + nonlayer + kept + window
        formula = (f"resident {_mib(resident)} + non-layer {_mib(nonlayer)} + resident layers {_mib(kept)} "
                   "+ sum (2p+1) x largest layer")
    else:
        offloaded = (dit.get("cpu_offload") or {}).get("host_bytes", 0)  # the one device buffer it moves into
        bound = resident + (offloaded if dit.get("placement") == Placement.CPU_OFFLOAD else 0)
        formula = "resident components + the DiT when CPU-offloaded"
    if denoise.ledger_peak_bytes > bound:
        return [f"{cid}: denoise weight peak {_mib(denoise.ledger_peak_bytes)} > {_mib(bound)} ({formula})"]
    return []


def evaluate(scenario: Scenario, records: Iterable[CellRecord]) -> list[Verdict]:
    """All set-level verdicts of a scenario, one per card."""
    recs = list(records)
    verdicts = []
    for card in scenario.cards:
        group = [r for r in recs if r.card_name == card.name and r.scenario == scenario.name]
        two_pass = [r for r in group if not r.cfg_batch]  # cfg-batch cells are another workload: judged apart
        if scenario.expect.lowest_peak is not None:
            verdicts.append(lowest_peak_verdict(card.name, two_pass, scenario.expect.lowest_peak))
        if scenario.expect.same_output:
            verdicts.append(same_output_verdict(card.name, two_pass))
        if scenario.expect.close_output_rtol is not None:
            verdicts.append(close_output_verdict(card.name, two_pass, scenario.expect.close_output_rtol,
                                                 dict(scenario.expect.close_output_rtol_by_backend)))
        if scenario.expect.beats_peer:
            verdicts.append(beats_peer_verdict(card.name, two_pass))
        for bound in scenario.expect.peer_step_ratio:
            verdicts.append(peer_step_ratio_verdict(card.name, two_pass, bound))
        if scenario.expect.prefetch_peak_monotone:
            verdicts.append(prefetch_peak_verdict(card.name, two_pass))
        if scenario.expect.resident_never_slows:
            verdicts.append(resident_speed_verdict(card.name, two_pass))
        if scenario.expect.cfg_batch_rtol is not None:
            verdicts.append(cfg_batch_verdict(card.name, group, scenario.expect.cfg_batch_rtol))
        if scenario.expect.plan_within is not None:
            verdicts.append(plan_within_verdict(card.name, group, scenario.expect.plan_within))
        if scenario.expect.layerwise_overhead is not None:
            verdicts.append(layerwise_overhead_verdict(card.name, two_pass, scenario.expect.layerwise_overhead))
        if scenario.expect.reserved_over_allocated is not None:
            verdicts.append(reserved_over_allocated_verdict(card.name, group, scenario.expect.reserved_over_allocated))
        if scenario.expect.invariants:
            inv = [m for r in group if r.status is Status.OK for m in invariant_failures(r)]
            verdicts.append(Verdict("invariants", card.name, not inv, "; ".join(inv) or "all hold"))
        if scenario.expect.host is not None:
            host = [m for r in group if r.status is Status.OK for m in host_failures(r, scenario.expect.host)]
            verdicts.append(Verdict("host", card.name, not host, "; ".join(host) or "within the host-cost bounds"))
        failures = [m for r in group for m in fate_failures(r, scenario.expect.fates)]
        if scenario.expect.fates:
            verdicts.append(Verdict("fates", card.name, not failures, "; ".join(failures) or "all as declared"))
    return verdicts


# ------------------------------------------------------------------------------------------- the verdicts of a run


@dataclass(frozen=True)
class ScenarioVerdicts:
    """The expectations of one scenario of a run, judged on its records, on the cards that ran (`run_verdicts`)."""

    scenario: str
    verdicts: tuple[Verdict, ...] = ()
    xfail: str | None = None  # the scenario's expectations are known to fail, and why
    not_evaluated: str | None = None  # why none were: its file would not load

    def as_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "xfail": self.xfail, "not_evaluated": self.not_evaluated,
                "verdicts": [asdict(v) for v in self.verdicts]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScenarioVerdicts:
        return cls(data["scenario"], tuple(Verdict(**v) for v in data["verdicts"]), data.get("xfail"),
                   data.get("not_evaluated"))


def run_verdicts(records: Iterable[CellRecord]) -> list[ScenarioVerdicts]:
    """The one evaluation of a run's expectations: per scenario of the run whose file this checkout has
    (`local_scenario_file`), `evaluate` on its records, the verdicts of the cards that ran (a run of part of a
    scenario judges that part). A run's end writes them beside its records (`write_verdicts`); a reader of a
    records file without them calls this, through `verdicts_of`."""
    by_scenario: dict[str, list[CellRecord]] = {}
    for r in records:
        by_scenario.setdefault(str(r.scenario), []).append(r)
    out = []
    for name, recs in by_scenario.items():
        path = local_scenario_file(next((r.scenario_file for r in recs if r.scenario_file), None))
        if path is None:
            continue
        try:
            scenario = load_scenario(path)
        except ScenarioError as e:
            out.append(ScenarioVerdicts(name, not_evaluated=str(e)))
            continue
        cards = {r.card_name for r in recs}
        out.append(ScenarioVerdicts(name, tuple(v for v in evaluate(scenario, recs) if v.card in cards),
                                    scenario.xfail))
    return out


def verdicts_path(records_path: Path | str) -> Path:
    """Where a run's verdicts are kept: `verdicts.json` in a run folder (beside `records.jsonl`), else
    `<name>.verdicts.json` beside `<name>.records.jsonl`."""
    p = Path(records_path)
    stem = p.name.removesuffix(".jsonl").removesuffix(".records")
    return p.with_name("verdicts.json" if stem == "records" else f"{stem}.verdicts.json")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_verdicts(records_path: Path | str, records: Iterable[CellRecord]) -> Path:
    """Evaluates a finished run (`run_verdicts` of `records`, the latest of each cell of `records_path`, as the
    analysis reads them) and writes the verdicts beside its records file, with the digest of the file they judged.
    Written where the run ends (the runner, the pytest session, merge), where the latents files still are."""
    path = verdicts_path(records_path)
    write_json_atomic(path, {"records_sha256": _digest(Path(records_path)),
                             "scenarios": [s.as_dict() for s in run_verdicts(records)]})
    return path


def verdicts_of(records_path: Path | str, records: Iterable[CellRecord]) -> list[ScenarioVerdicts]:
    """A run's verdicts: the ones its end wrote (`write_verdicts`), else (a records file without them, or changed
    since they were written: a resumed run, an edited file) `run_verdicts` of `records` now."""
    path = verdicts_path(records_path)
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("records_sha256") == _digest(Path(records_path)):
            return [ScenarioVerdicts.from_dict(s) for s in stored["scenarios"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none written, or unreadable: judged now
    return run_verdicts(records)
