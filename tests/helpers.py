"""Test helpers: a tiny TOML writer (for scenario files built from dicts) and a result-record builder."""

from __future__ import annotations

import copy
import datetime as dt
import math
import os
import time
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from harness.common.contract import CellRecord, Record, as_record, migrate
from harness.common.flags import OffloadFlags

# ------------------------------------------------------------------------------------------------ TOML writer


def toml_string(s: str) -> str:
    """A TOML basic string: quote, backslash and control characters escaped."""
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def toml_value(v: Any) -> str:
    """An inline TOML value (inline tables for dicts, so any nesting fits on one `key = value` line)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, dt.date):
        return v.isoformat()
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_string(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML form for {v!r}")


def to_toml(data: dict[str, Any]) -> str:
    return "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in data.items())


TINY_SCENARIO = Path(__file__).resolve().parent.parent / "scenarios" / "cpu" / "qwen_image_edit_tiny.toml"


def tiny_scenario_file(folder: Path, name: str, axes: dict[str, list], timeout_s: float | None = None) -> Path:
    """The tiny CPU scenario under another name: native card only, these axes, no expectations, one pass per child
    (so each child is fast), optionally another timeout."""
    data = tomllib.loads(TINY_SCENARIO.read_text())
    for key in ("expect", "exclude", "xfail"):
        data.pop(key, None)
    data.update(name=name, cards=["native"], axes=axes)
    data.update({k: v for k, v in (("warmup", 0), ("rounds", 1)) if k in data})
    if timeout_s is not None:
        data["timeout_s"] = timeout_s
    path = folder / f"{name}.toml"
    path.write_text(to_toml(data))
    return path


DELETE = object()


def base_scenario() -> dict[str, Any]:
    """A valid CPU scenario (every optional section present, so each can be mutated)."""
    return {
        "name": "unit",
        "description": "unit-test scenario",
        "model": "qwen-image-edit-tiny",
        "profile": "cpu",
        "cards": [{"name": "tiny-6m", "mib": 6}, "native"],
        "height": 64,
        "width": 64,
        "steps": 2,
        "true_cfg_scale": 4.0,
        "seed": 0,
        "policy": "sglang",
        "timeout_s": 300,
        "flags": {"dit_offload_prefetch_size": 1, "pin_cpu_memory": True},
        "axes": {"dit_cpu_offload": [False, True], "dit_layerwise_offload": [False, True]},
        "exclude": [{"dit_cpu_offload": False, "dit_layerwise_offload": False}],
        "expect": {
            "lowest_peak": {"dit_cpu_offload": True, "dit_layerwise_offload": True},
            "same_output": True,
            "host": {"max_rss_over_weights": 3.0, "min_setup_gbps": {"dit": 0.01}},
            "fate": [
                {
                    "cards": ["tiny-6m"],
                    "where": {"dit_cpu_offload": False, "dit_layerwise_offload": True},
                    "status": "oom",
                    "phase": "load",
                },
            ],
        },
    }


def mutate(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A deep copy of `data` with the item at `path` (keys / list indices) set to `value` (or DELETE-d)."""
    out = copy.deepcopy(data)
    node: Any = out
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


# ------------------------------------------------------------------------------------------------ records


def make_record(
    cpu: bool = True,
    lw: bool = True,
    *,
    status: str = "ok",
    failed_phase: str | None = None,
    card: str = "tiny-6m",
    scenario: str = "unit",
    device: str = "cpu",
    load: int | None = 1_000,
    runtime: int | None = 2_000,
    digest: str | None = "a" * 64,
    **flags: Any,
) -> dict[str, Any]:
    """A result record as the worker writes it (the current schema), with the peak counter of `device` set per
    phase."""
    requested = OffloadFlags(dit_cpu_offload=cpu, dit_layerwise_offload=lw, **flags)
    counter = "alloc_peak_reserved_bytes" if device == "cuda" else "ledger_peak_bytes"
    phases: dict[str, dict[str, Any]] = {}
    if load is not None:
        phases["load"] = {counter: load, "time_ms": 1.0}
    if runtime is not None:
        for i, phase in enumerate(("encode", "denoise", "decode")):
            phases[phase] = {counter: runtime - (1 - i % 2) * 10, "time_ms": 1.0}  # denoise holds the max
    record: dict[str, Any] = {
        "schema_version": 1,
        "cell_id": f"{scenario}/{card}/{requested.label()}",
        "scenario": scenario,
        "card": {"name": card, "cap_bytes": None},
        "device": device,
        "policy": "sglang",
        "backend": "harness",  # a v1 record without one was written by the copy-stream layer pool runtime
        "requested": requested.as_dict(),
        "effective": requested.as_dict(),
        "status": status,
        "failed_phase": failed_phase,
        "reason": None if status == "ok" else f"{status} in {failed_phase}",
        "phases": phases,
    }
    if digest is not None:
        record["outputs"] = {"latents_sha256": digest}
    return migrate(record)  # as a reader sees it: every field of the current schema


# The committed compare fixtures: H100 records of the #26925 scenario, a variant run, a CPU run, and baselines.
FIXTURES = Path(__file__).parent / "fixtures"
H100 = FIXTURES / "h100-qwen-image-edit-5090.records.jsonl"
VARIANT = FIXTURES / "h100-qwen-image-edit-5090-variant.records.jsonl"
CPU = FIXTURES / "cpu-qwen-image-edit-tiny.records.jsonl"
BASELINES = FIXTURES / "baselines"
SKU = "nvidia-h100-80gb-hbm3"
S = "qwen-image-edit-5090"
OK = f"{S}/native/cpu1-lw1-te0-vae0-pf4-pin1"


def cell_records(path: Path) -> list[CellRecord]:
    """Every record of a JSON-lines file, as CellRecords (migrated), in file order."""
    return [CellRecord.from_json(line) for line in path.read_text().splitlines() if line.strip()]


def as_records(records: Iterable[Record]) -> list[CellRecord]:
    """JSON records (edited by a test) as CellRecords; a CellRecord stays as it is."""
    return [as_record(r) for r in records]


def planned(data: Record) -> CellRecord:
    """A record as the analysis reads it (`harness.analyze.readout`): with the plan its run stored, or one derived
    now (`plan_on_read`)."""
    from harness.plan.planner import plan_on_read

    record = as_record(data)
    plan_on_read(record)
    return record


def planned_records(records: Iterable[Record]) -> list[CellRecord]:
    return [planned(r) for r in records]


def gone(pid: int) -> bool:
    """True once `pid` no longer runs (dead, or a zombie nobody reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def wait_for(pred: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    """Polls `pred` every 50 ms; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
