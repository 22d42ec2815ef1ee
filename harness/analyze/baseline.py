"""Per-GPU-SKU baselines: the metrics of every cell of a reference run, with per-metric tolerances.

A baseline lives at results/baselines/<sku>.json, where the SKU is a record's machine.sku (for example
"nvidia-h100-80gb-hbm3"; the CPU profile's records say "cpu"). It is keyed by cell id and holds, per cell, the
fate (status, failed_phase) and the metrics `cell_metrics` extracts from its record (`BaselineCell`; the file is
a `Baseline`, JSON only on disk):

- load_peak_<c>_bytes, runtime_peak_<c>_bytes: `CellRecord.peaks` on the record's peak counter,
  named after it (`reserved` = allocator reserved on CUDA, `ledger` = harness ledger on the CPU profile);
- nvml_proc_peak_bytes: NVML per-process peak over all phases (CUDA only);
- e2e_ms: encode + denoise + decode phase time; load_ms, denoise_ms; denoise_steady_step_ms: the median denoise
  step from the second on (harness.analyze.roofline.STEP_CONVENTION, the report's and roofline's ms/step).

`RETIRED_METRICS` are names an older harness wrote with another meaning (`denoise_step_ms`: the median of every
step, the first included); compare never judges them against the new metric: it says "not compared" and why.

Every metric is "smaller is better". Tolerances are relative increases a metric may show before it counts as a
regression; the defaults are SGLang-diffusion's perf-baseline tolerances, and a file's own values (hand-tuned)
survive a refresh. `improvement_threshold` is the relative decrease beyond which a metric counts as improved.

Reading a file validates it fully: a corrupt file raises `BaselineError` with a one-line message naming it.
This module imports no torch and does no I/O beyond reading and writing the files it is given.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from harness.common import locations
from harness.common.contract import (
    PHASES,
    RUNTIME_PHASES,
    STATUSES,
    STEP_CONVENTION,
    CellRecord,
    JsonObject,
    Phase,
    Status,
    fate_text,
)
from harness.common.records import now_iso, write_json_atomic

BASELINE_SCHEMA_VERSION = 1

# Short names of the peak counters, used in metric keys.
COUNTER_KEYS = {"alloc_peak_reserved_bytes": "reserved", "ledger_peak_bytes": "ledger"}


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str  # "bytes" or "ms"
    kind: str  # "memory" or "time"
    tolerance: float  # default allowed relative increase
    label: str


# Canonical order; SGLang-diffusion's perf-baseline tolerances. Larger is worse for all of them.
METRICS: tuple[Metric, ...] = (
    Metric("load_peak_reserved_bytes", "bytes", "memory", 0.01, "load peak (alloc reserved)"),
    Metric("load_peak_ledger_bytes", "bytes", "memory", 0.01, "load peak (ledger)"),
    Metric("runtime_peak_reserved_bytes", "bytes", "memory", 0.02, "runtime peak (alloc reserved)"),
    Metric("runtime_peak_ledger_bytes", "bytes", "memory", 0.02, "runtime peak (ledger)"),
    Metric("nvml_proc_peak_bytes", "bytes", "memory", 0.02, "peak (NVML per-process)"),
    Metric("e2e_ms", "ms", "time", 0.25, "encode+denoise+decode time"),
    Metric("load_ms", "ms", "time", 0.40, "load time"),
    Metric("denoise_ms", "ms", "time", 0.25, "denoise time"),
    Metric("denoise_steady_step_ms", "ms", "time", 0.30, f"denoise step time ({STEP_CONVENTION})"),
)
# Metric name -> what it meant, for baselines written before the name was retired.
RETIRED_METRICS = {
    "denoise_step_ms": "the median of every denoise step, the first included (a baseline made before "
    f"denoise_steady_step_ms, the {STEP_CONVENTION})",
}
METRIC_BY_NAME = {m.name: m for m in METRICS}
DEFAULT_TOLERANCES = {m.name: m.tolerance for m in METRICS}
DEFAULT_IMPROVEMENT_THRESHOLD = 0.20

_TOP_KEYS = ("schema_version", "sku", "created", "source", "machine", "tolerances", "improvement_threshold", "cells")
_CELL_KEYS = ("status", "failed_phase", "metrics")
# Machine fields worth keeping (the per-cell ones such as pinned_h2d_gbps vary from cell to cell).
_MACHINE_KEYS = (
    "gpu", "sku", "gpu_memory_bytes", "driver", "cuda", "torch", "diffusers", "transformers", "python",
    "pcie_gen", "pcie_gen_max", "pcie_width", "host_mem_total_bytes", "cpu_count", "allocator_conf",
)


class BaselineError(ValueError):
    """A baseline file is missing, unreadable or malformed, or a run cannot make one. One line, naming the file."""


def metric(name: str) -> Metric:
    """The metric called `name`; an unknown one (a hand-added key) is treated as a time-like, unitless metric."""
    if name in RETIRED_METRICS:
        return Metric(name, "ms", "time", DEFAULT_TOLERANCES.get(name, 0.30), f"retired: {RETIRED_METRICS[name]}")
    return METRIC_BY_NAME.get(name) or Metric(name, "", "other", DEFAULT_TOLERANCES.get(name, 0.25), name)


def metric_order(name: str) -> tuple[int, str]:
    names = [m.name for m in METRICS]
    return (names.index(name), name) if name in names else (len(names), name)


# ------------------------------------------------------------------------------------------------ records -> cells


@dataclass
class BaselineCell:
    """What a baseline (and the run side of a comparison) keeps of one cell: its fate, its metrics, the run it
    came from, the digest of what it ran and the spread of its measured rounds. JSON only in the file
    (`from_dict` / `to_dict`)."""

    status: Status
    failed_phase: str | None
    metrics: dict[str, float]
    run_id: str | None = None
    created: str | None = None
    git_sha: str | None = None
    # What the cell ran (settings, card, flags, rounds, ...) without the scenario file's path; compare calls a
    # cell whose digest changed "not comparable" instead of judging numbers of a different experiment.
    portable_spec_hash: str | None = None
    # The relative spread of each time metric across the cell's measured rounds; compare sets the timing
    # tolerance from it (harness.analyze.compare.spread_tolerance). Empty with fewer than two measured rounds.
    spread: dict[str, float] = field(default_factory=dict)
    # Optional keys the file's cell lacks (baselines made before them): written back absent, so a refresh that
    # keeps old cells leaves them as they were. Keys this harness does not know stay in `extra`.
    absent: frozenset[str] = frozenset()
    extra: JsonObject = field(default_factory=dict)

    @classmethod
    def of(cls, record: CellRecord) -> BaselineCell:
        spread = timing_spread(record)
        return cls(record.status, record.failed_phase, cell_metrics(record), record.run_id, record.created,
                   record.git_sha, record.portable_spec_hash, spread, frozenset() if spread else frozenset({"spread"}))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BaselineCell:
        known = {f.name for f in fields(cls)} - {"absent", "extra"}
        values = {k: v for k, v in data.items() if k in known}
        values["status"] = Status(data["status"])
        return cls(**values, absent=frozenset(known - set(data)),
                   extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> JsonObject:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("absent", "extra")}
        out["status"] = str(self.status)
        return {**{k: v for k, v in out.items() if k not in self.absent}, **self.extra}

    @property
    def fate(self) -> str:
        return fate_text(self.status, self.failed_phase)

    @property
    def progress(self) -> int:
        """How far the cell got: the index of the phase it failed in (load 0 ... decode 3), or len(PHASES) if ok."""
        if self.status is Status.OK:
            return len(PHASES)
        return Phase(self.failed_phase).progress if self.failed_phase in set(Phase) else -1


def cell_metrics(record: CellRecord) -> dict[str, float]:
    """The baseline metrics of one record; a metric the record does not have is left out (never null)."""
    peaks = record.peaks
    short = COUNTER_KEYS.get(peaks.counter, peaks.counter.removesuffix("_bytes"))
    out: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if _number(value):
            out[name] = value

    def time_ms(phase: str) -> Any:
        stats = record.phases.get(phase)
        return stats.time_ms if stats else None

    put(f"load_peak_{short}_bytes", peaks.load)
    put(f"runtime_peak_{short}_bytes", peaks.runtime)
    put("nvml_proc_peak_bytes", record.phase_max("nvml_proc_peak_bytes"))
    runtime_ms = [time_ms(p) for p in RUNTIME_PHASES]
    if all(isinstance(v, int | float) for v in runtime_ms):
        put("e2e_ms", round(sum(runtime_ms), 3))
    put("load_ms", time_ms(Phase.LOAD))
    put("denoise_ms", time_ms(Phase.DENOISE))
    steady = record.steady_step_ms()
    if steady is not None:
        put("denoise_steady_step_ms", round(steady, 3))
    return out


# Which per-round series of record.rounds measures the noise of which time metric.
SPREAD_SERIES = {"denoise_steady_step_ms": "steady_step_ms", "denoise_ms": "denoise_ms", "e2e_ms": "e2e_ms"}


def timing_spread(record: CellRecord) -> dict[str, float]:
    """{time metric: (max - min) / median of its per-round series} over the record's measured rounds (two or more
    with a value); records from before per-round step medians still give denoise_ms and e2e_ms."""
    rounds = record.rounds or {}
    out: dict[str, float] = {}
    for name, series in SPREAD_SERIES.items():
        values = [v for v in rounds.get(series) or [] if _number(v)]
        if len(values) >= 2 and (mid := statistics.median(values)) > 0:
            out[name] = round((max(values) - min(values)) / mid, 4)
    return out


def run_sku(records: Iterable[CellRecord], sku: str | None = None, where: str = "run") -> str:
    """The one SKU of a run's records (or `sku`, checked to be among them). Records without machine info (a child
    that died before measuring) do not count. Mixing SKUs without choosing one is refused."""
    skus = sorted({s for r in records if (s := r.sku)})
    if sku is not None:
        if sku not in skus:
            raise BaselineError(f"{where}: no records of SKU {sku!r} (the run has {', '.join(skus) or 'none'})")
        return sku
    if not skus:
        raise BaselineError(f"{where}: no record names its machine SKU (machine.sku)")
    if len(skus) > 1:
        raise BaselineError(f"{where}: records of several SKUs ({', '.join(skus)}); pick one with --sku")
    return skus[0]


def run_cells(records: Iterable[CellRecord], sku: str) -> dict[str, BaselineCell]:
    """Cell id -> what a baseline keeps of the records of `sku` (records without a SKU are taken as the run's).
    Skipped cells carry no measurement and are left out."""
    return {r.cell_id: BaselineCell.of(r) for r in records
            if r.sku in (sku, None) and r.status is not Status.SKIPPED}


# ------------------------------------------------------------------------------------------------ files


# The software under the numbers: a change in any of these can move times (and allocator reserve) on its own.
STACK_KEYS = ("driver", "cuda", "torch")


def run_machine(records: Iterable[CellRecord], sku: str) -> JsonObject:
    """The machine fields of the first record of `sku` that has them ({} if none does)."""
    for r in records:
        if r.sku == sku and isinstance(r.machine, dict):
            return r.machine
    return {}


def stack_differences(baseline_machine: Mapping[str, Any], machine: Mapping[str, Any]) -> list[str]:
    """'torch 2.11.0+cu130 -> 2.13.0+cu130' for each of driver, CUDA and torch that differ between the baseline's
    machine and the run's (a field that either side lacks is not a difference: old baselines lack some)."""
    out = []
    for key in STACK_KEYS:
        old, new = baseline_machine.get(key), machine.get(key)
        if old is not None and new is not None and old != new:
            out.append(f"{key} {old} -> {new}")
    return out


def baseline_path(sku: str, baselines_dir: Path | str | None = None) -> Path:
    """<baselines_dir>/<sku>.json; by default the checkout's results/baselines, or ./results/baselines where the
    harness is installed from a wheel (harness.common.locations)."""
    return Path(baselines_dir or locations.baselines_dir()) / f"{sku}.json"


@dataclass
class Baseline:
    """One SKU's baseline: per cell what `BaselineCell` keeps, the tolerances compare judges them with, and where
    it came from. JSON only in the file (`read_baseline` / `write_baseline`)."""

    sku: str
    created: str
    source: JsonObject  # the run id(s), git sha and records file it was made from, and whether it was merged
    machine: JsonObject  # the reference machine's fields (_MACHINE_KEYS)
    tolerances: dict[str, float]
    improvement_threshold: float
    cells: dict[str, BaselineCell]
    schema_version: int = BASELINE_SCHEMA_VERSION

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Baseline:
        """Raises `BaselineError` ('<where>: <what>') unless `data` is a well-formed baseline of this schema."""
        validate(data, where)
        cells = {cell_id: BaselineCell.from_dict(cell) for cell_id, cell in data["cells"].items()}
        return cls(**{**{k: data[k] for k in _TOP_KEYS}, "cells": cells})

    def to_dict(self) -> JsonObject:
        return {k: getattr(self, k) for k in _TOP_KEYS} | {
            "cells": {cell_id: cell.to_dict() for cell_id, cell in self.cells.items()}}


def build_baseline(
    records: list[CellRecord],
    sku: str | None = None,
    previous: Baseline | None = None,
    merge: bool = False,
    source: str | None = None,
) -> Baseline:
    """A baseline from a run's records (latest record per cell). `previous` (the file being refreshed) keeps its
    tolerances and improvement threshold; with `merge`, also its cells that this run did not measure."""
    sku = run_sku(records, sku)
    if previous is not None and previous.sku != sku:
        raise BaselineError(f"baseline is for SKU {previous.sku!r}, the run is {sku!r}: refusing to mix SKUs")
    cells = run_cells(records, sku)
    if not cells:
        raise BaselineError(f"{source or 'run'}: no cell of SKU {sku!r} to make a baseline of")
    mine = [r for r in records if r.sku == sku]
    first = mine[0]
    tolerances = dict(DEFAULT_TOLERANCES)
    improvement = DEFAULT_IMPROVEMENT_THRESHOLD
    if previous is not None:
        tolerances.update({k: v for k, v in previous.tolerances.items() if k not in RETIRED_METRICS})
        improvement = previous.improvement_threshold
        if merge:
            cells = {**previous.cells, **cells}
    run_ids = sorted({r.run_id for r in mine if r.run_id})
    machine = first.machine or {}
    return Baseline(
        sku=sku,
        created=now_iso(),
        source={
            "run_id": run_ids[0] if len(run_ids) == 1 else run_ids,
            "git_sha": first.git_sha,
            "records": source,
            "merged": bool(merge and previous is not None),
        },
        machine={k: machine.get(k) for k in _MACHINE_KEYS if k in machine},
        tolerances=tolerances,
        improvement_threshold=improvement,
        cells=dict(sorted(cells.items())),
    )


def migrate_retired(baseline: Baseline, records: Iterable[CellRecord]) -> list[str]:
    """Replaces each cell's retired metrics with today's, recomputed from the cell's own record (same cell id and
    run id) where `records` holds it; tolerances follow. Returns the cells left with a retired metric (no record):
    compare says "not compared" for those. How the committed baselines moved to denoise_steady_step_ms."""
    by_run = {(r.cell_id, r.run_id): r for r in records}
    left = []
    for cell_id, cell in baseline.cells.items():
        retired = [name for name in cell.metrics if name in RETIRED_METRICS]
        record = by_run.get((cell_id, cell.run_id))
        if not retired:
            continue
        if record is None:
            left.append(cell_id)
            continue
        for name in retired:
            del cell.metrics[name]
        cell.metrics.update({k: v for k, v in cell_metrics(record).items() if k not in cell.metrics})
    for name in RETIRED_METRICS:
        if name in baseline.tolerances and not left:
            baseline.tolerances.setdefault("denoise_steady_step_ms", baseline.tolerances.pop(name))
    return left


def write_baseline(path: Path, baseline: Baseline) -> None:
    data = baseline.to_dict()
    validate(data, str(path))
    write_json_atomic(Path(path), data)


def read_baseline(path: Path | str) -> Baseline:
    """Reads and validates a baseline file; any problem is a one-line `BaselineError` naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BaselineError(f"{path}: no such baseline file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BaselineError(f"{path}: unreadable baseline file: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BaselineError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    return Baseline.from_dict(data, str(path))


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def validate(data: Any, where: str) -> None:
    """Raises `BaselineError` ('<where>: <what>') unless `data` is a well-formed baseline of this schema."""

    def bad(what: str) -> BaselineError:
        return BaselineError(f"{where}: {what}")

    if not isinstance(data, dict):
        raise bad("a baseline is a JSON object")
    version = data.get("schema_version")
    if version != BASELINE_SCHEMA_VERSION:
        raise bad(f"schema_version is {version!r}, this harness reads baseline schema {BASELINE_SCHEMA_VERSION}")
    missing = [k for k in _TOP_KEYS if k not in data]
    if missing:
        raise bad(f"missing key(s): {', '.join(missing)}")
    if not isinstance(data["sku"], str) or not data["sku"]:
        raise bad("sku must be a non-empty string")
    tol = data["tolerances"]
    if not isinstance(tol, dict) or not all(_number(v) and v >= 0 for v in tol.values()):
        raise bad("tolerances must map metric names to non-negative numbers (fractions: 0.01 = 1 %)")
    if not _number(data["improvement_threshold"]) or data["improvement_threshold"] < 0:
        raise bad("improvement_threshold must be a non-negative number")
    if not isinstance(data["cells"], dict):
        raise bad("cells must be an object keyed by cell id")
    for cell_id, cell in data["cells"].items():
        if not isinstance(cell, dict):
            raise bad(f"cells[{cell_id!r}] must be an object")
        missing = [k for k in _CELL_KEYS if k not in cell]
        if missing:
            raise bad(f"cells[{cell_id!r}]: missing key(s): {', '.join(missing)}")
        if cell["status"] not in STATUSES:
            raise bad(f"cells[{cell_id!r}].status {cell['status']!r} is not one of {', '.join(STATUSES)}")
        if cell["failed_phase"] is not None and cell["failed_phase"] not in PHASES:
            raise bad(f"cells[{cell_id!r}].failed_phase {cell['failed_phase']!r} is not a phase or null")
        metrics = cell["metrics"]
        if not isinstance(metrics, dict) or not all(_number(v) for v in metrics.values()):
            raise bad(f"cells[{cell_id!r}].metrics must map metric names to numbers")
        spread = cell.get("spread")  # optional: cells of one measured round, and older baselines, lack it
        if spread is not None and not (isinstance(spread, dict) and all(_number(v) and v >= 0
                                                                          for v in spread.values())):
            raise bad(f"cells[{cell_id!r}].spread must map time metrics to non-negative numbers")
        digest = cell.get("portable_spec_hash")  # optional: baselines made before it existed lack it
        if digest is not None and not (isinstance(digest, str) and digest):
            raise bad(f"cells[{cell_id!r}].portable_spec_hash must be a non-empty string or null")
