"""The copy stream's timeline: when each layer copy of our layerwise runtime ran, summarised per denoise step.

A transfer-bound step is as fast as the copy engine is busy. Its step time alone cannot say whether the copies ran
back to back at the link's rate (the copy limit) or left the engine idle between windows; this records it.
`CopyRecorder` brackets every copy with a pair of timing events on the copy stream (host clock on the CPU
profile, where copies are synchronous); `per_step` cuts the copies at the denoise loop's step marks (CUDA events
on the compute stream, on the same device clock) and gives per step: the copy engine's busy time (the union of
copy intervals inside the step), its idle gaps between copies, the bytes moved and the rate while busy.

Opt-in (`[run] copy_timeline = true`): two events per layer copy cost a little host time.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class CopySpan:
    """One copy, in ms since the step clock's origin."""

    start_ms: float
    end_ms: float
    nbytes: int


class CopyRecorder:
    """Called by the layerwise runtime around each host-to-device layer copy (`begin` before, `end` after, both
    inside the copy stream's context). `spans(origin)` reads them back after a synchronize."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._pending: list[tuple[Any, Any, int]] = []

    def begin(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()  # on the current stream: the runtime calls this inside the copy stream's context
            return ev
        return time.perf_counter()

    def end(self, start: Any, nbytes: int) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
        else:
            ev = time.perf_counter()
        self._pending.append((start, ev, nbytes))

    def clear(self) -> None:
        self._pending.clear()

    def spans(self, origin: Any) -> list[CopySpan]:
        """Every recorded copy relative to `origin` (the first step mark: a CUDA event or a perf_counter time)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [CopySpan(origin.elapsed_time(a), origin.elapsed_time(b), n) for a, b, n in self._pending]
        return [CopySpan((a - origin) * 1e3, (b - origin) * 1e3, n) for a, b, n in self._pending]


@contextlib.contextmanager
def recorded(recorder: CopyRecorder | None, nbytes: int) -> Iterator[None]:
    """Brackets the copy issued inside with `recorder`'s marks (nothing when there is no recorder)."""
    if recorder is None:
        yield
        return
    started = recorder.begin()
    yield
    recorder.end(started, nbytes)


def per_step(spans: list[CopySpan], marks_ms: list[float], link_gbps: float | None = None) -> list[dict[str, Any]]:
    """Per step (between consecutive marks): copy-engine busy ms (the union of copy intervals clipped to the
    step), busy fraction, idle gaps between copies inside the step (count, total, longest; the time before the
    first copy and after the last count too, as lead-in/tail), bytes moved (each copy's bytes split by the share of
    its interval inside the step), the rate while busy, and with `link_gbps` (the run's pinned-copy probe) the copy
    limit of those bytes and the step's share of it (`pct_of_copy_limit`: 100 = the step took exactly as long as
    its bytes need at the probe's rate)."""
    out = []
    for a, b in itertools.pairwise(marks_ms):
        step_ms = b - a
        inside = [s for s in spans if s.end_ms > a and s.start_ms < b]
        clipped = sorted(((max(s.start_ms, a), min(s.end_ms, b), s) for s in inside), key=lambda c: c[0])
        busy, gaps, moved, cursor = 0.0, [], 0.0, a
        for lo, hi, s in clipped:
            if lo > cursor:
                gaps.append(lo - cursor)
            if hi > cursor:
                busy += hi - max(lo, cursor)
                cursor = hi
            length = s.end_ms - s.start_ms
            moved += s.nbytes * ((hi - lo) / length if length > 0 else 1.0)
        tail = b - cursor if clipped else 0.0
        inner = gaps[1:] if clipped and clipped[0][0] > a else gaps
        lead_in = gaps[0] if clipped and clipped[0][0] > a else 0.0
        row: dict[str, Any] = {
            "step_ms": round(step_ms, 3),
            "copies": len(clipped),
            "bytes": int(moved),
            "busy_ms": round(busy, 3),
            "busy_fraction": round(busy / step_ms, 4) if step_ms > 0 else None,
            "lead_in_ms": round(lead_in, 3),
            "tail_ms": round(tail, 3),
            "idle_gaps": len(inner),
            "idle_gap_ms": round(sum(inner), 3),
            "longest_gap_ms": round(max(inner), 3) if inner else 0.0,
            "busy_gbps": round(moved / busy / 1e6, 2) if busy > 0 else None,
        }
        if link_gbps:
            limit_ms = moved / (link_gbps * 1e6)
            row["copy_limit_ms"] = round(limit_ms, 3)
            row["pct_of_copy_limit"] = round(100 * limit_ms / step_ms, 1) if step_ms > 0 else None
        out.append(row)
    return out


def summary(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the steady steps (2..n; step 1 includes the first window's cold start) of a round."""
    steady = steps[1:] or steps
    out: dict[str, Any] = {}
    for key in ("busy_fraction", "busy_gbps", "idle_gap_ms", "pct_of_copy_limit", "bytes"):
        values = [s[key] for s in steady if isinstance(s.get(key), int | float)]
        if values:
            out[f"steady_median_{key}"] = round(statistics.median(values), 4)
    return out
