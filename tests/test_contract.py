"""harness/common/contract.py: the record round-trips, migrations, the vocabularies, and who may import torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.common.contract import (
    SCHEMA_VERSION,
    Backend,
    Card,
    CellRecord,
    CellSpec,
    Phase,
    Placement,
    RecordError,
    RunSettings,
    Status,
    cell_id_of,
    dumps_line,
    migrate,
)
from harness.common.flags import OffloadFlags
from harness.plan.scenario import expand, load_scenario
from tests.helpers import make_record

REPO = Path(__file__).resolve().parent.parent
COMMITTED = sorted([*REPO.glob("results/**/*.records.jsonl"), *REPO.glob("tests/fixtures/**/*.records.jsonl")])
LINES = [(p, i, line) for p in COMMITTED for i, line in enumerate(p.read_text().splitlines(), 1) if line.strip()]


def test_committed_records_exist() -> None:
    assert len(LINES) > 100


@pytest.mark.parametrize(("path", "lineno", "line"), LINES, ids=[f"{p.name}:{i}" for p, i, _ in LINES])
def test_committed_record_round_trips_if_migrated(path: Path, lineno: int, line: str) -> None:
    record = CellRecord.from_json(line, f"{path}:{lineno}")
    assert record.to_json() == dumps_line(migrate(json.loads(line)))
    assert CellRecord.from_json(record.to_json()) == record
    # the label comes from the flags and agrees with the id every reader keys on
    rebuilt = cell_id_of(record.scenario or "", record.card_name or "", record.flags_label, record.backend,
                         record.cfg_batch)
    assert rebuilt == record.cell_id


@pytest.mark.parametrize(("path", "lineno", "line"), LINES, ids=[f"{p.name}:{i}" for p, i, _ in LINES])
def test_committed_record_of_the_current_schema_reads_and_writes_back_byte_for_byte(
        path: Path, lineno: int, line: str) -> None:
    """A record of SCHEMA_VERSION reads and re-serialises to its committed line, byte for byte, in the form the
    writer writes (`dumps_line`: keys sorted, no spaces; a few committed lines were written with spaces, which
    is the one difference allowed). A typed field added to CellRecord must keep this (WRITTEN_OFF_DEFAULT)."""
    data = json.loads(line)
    if data["schema_version"] != SCHEMA_VERSION:
        pytest.skip("an older schema: migrated on read (test_committed_record_round_trips_if_migrated)")
    written = CellRecord.from_json(line, f"{path}:{lineno}").to_json()
    assert written == dumps_line(data)  # == line itself wherever the line is in the writer's form (97 of 112)


def test_a_records_spec_is_typed_and_written_back_in_the_form_it_was_read() -> None:
    """The spec sections read as the spec types them; a run_options written before the last two run options
    existed reads them at their defaults, says so (`unrecorded`), and writes back without them."""
    line = (REPO / "results/h200/copy-limit-qwen-image.records.jsonl").read_text().splitlines()[0]
    record = CellRecord.from_json(line)
    assert isinstance(record.card, Card) and isinstance(record.settings, RunSettings)
    assert isinstance(record.effective, OffloadFlags) and record.effective.dit_layerwise_offload
    assert record.placements["dit"] is Placement.LAYERWISE_FROM_HOST
    options = record.run_options
    assert options is not None and options.copy_timeline and options.runtime_cap_mib == 0
    assert options.unrecorded == {"empty_cache_after_packing", "runtime_cap_mib"} and options.recorded("cfg_batch")
    assert "runtime_cap_mib" not in json.loads(record.to_json())["run_options"]
    assert record.to_json() == dumps_line(json.loads(line))


def test_the_records_settings_carry_its_cfg_batch_run_option() -> None:
    data = {**make_record(), "settings": {"height": 64, "width": 64, "steps": 2, "frames": 1, "true_cfg_scale": 4.0,
                                          "seed": 0}, "run_options": {"cfg_batch": True}}
    record = CellRecord.from_dict(data)
    assert record.cfg_batch and record.settings is not None and record.settings.cfg_batch
    assert "cfg_batch" not in json.loads(record.to_json())["settings"]


def test_a_section_no_type_reads_names_the_record_and_the_section() -> None:
    with pytest.raises(RecordError, match=r"x\.jsonl:3: settings: KeyError: 'height'"):
        CellRecord.from_dict({**make_record(), "settings": {"width": 64}}, "x.jsonl:3")
    with pytest.raises(RecordError, match=r"placements: ValueError"):
        CellRecord.from_dict({**make_record(), "placements": {"dit": "on-the-moon"}})


def test_unknown_keys_are_kept_in_extra_and_written_back() -> None:
    data = {**make_record(), "resident_layers": {"dit": 30}}
    data["phases"]["denoise"]["streamed_bytes_per_forward"] = 123
    record = CellRecord.from_dict(data)
    assert record.extra == {"resident_layers": {"dit": 30}}
    assert record.phases["denoise"].extra == {"streamed_bytes_per_forward": 123}
    assert json.loads(record.to_json()) == data


def test_v1_migration_drops_stored_peaks_and_fills_backend() -> None:
    v1 = {"schema_version": 1, "cell_id": "s/c/x", "status": "ok", "peaks": {"peak": 1}}
    out = migrate(v1)
    assert out["schema_version"] == SCHEMA_VERSION and "peaks" not in out and out["backend"] == "harness"
    assert v1["peaks"] == {"peak": 1}  # the input is not edited


@pytest.mark.parametrize(
    ("change", "message"),
    [({"schema_version": SCHEMA_VERSION + 1}, "newer"), ({"cell_id": 3}, "no cell_id"), ({"status": "meh"}, "status")],
)
def test_record_is_refused_if_malformed(change: dict, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        CellRecord.from_dict({**make_record(), **change})


def test_peaks_are_computed_from_phases() -> None:
    record = CellRecord.from_dict(make_record(load=9_000, runtime=3_000))
    assert (record.peaks.load, record.peaks.runtime, record.peaks.peak) == (9_000, 3_000, 9_000)
    assert "peaks" not in record.to_dict()


def test_fate_and_median_step_if_failed_and_ran() -> None:
    assert CellRecord.from_dict(make_record(status="oom", failed_phase="load")).fate == "oom in load"
    record = CellRecord.from_dict(make_record())
    record.phases["denoise"].step_ms = [9.0, 2.0, 4.0, 3.0]
    assert record.median_step_ms() == 3.5
    assert record.median_step_ms(skip_first=True) == 3.0
    assert record.median_step_s() == 0.003


def test_enums_are_the_json_strings() -> None:
    assert [str(s) for s in Status] == ["ok", "oom", "error", "crash", "timeout", "skipped"]
    assert json.dumps({"s": Status.OOM, "p": Phase.LOAD}) == '{"s": "oom", "p": "load"}'
    assert {s for s in Status if s.unexpected} == {Status.ERROR, Status.CRASH, Status.TIMEOUT}
    assert [p for p in Phase if p.is_runtime] == [Phase.ENCODE, Phase.DENOISE, Phase.DECODE]


@pytest.mark.parametrize(
    ("placement", "host", "streams", "needs_cuda"),
    [
        (Placement.RESIDENT, False, False, False),
        (Placement.CPU_OFFLOAD, True, False, False),
        (Placement.LAYERWISE_FROM_HOST, True, True, False),
        (Placement.LAYERWISE_FROM_DEVICE, True, True, False),
        (Placement.DIFFUSERS_GROUP, True, True, True),
        (Placement.SGLANG_LAYERWISE, True, True, True),
    ],
)
def test_placement_answers_what_it_holds(placement: Placement, host: bool, streams: bool, needs_cuda: bool) -> None:
    assert placement.holds_host_copy is host
    assert placement.streams is streams
    assert bool(placement.needs_cuda) is needs_cuda


@pytest.mark.parametrize(
    ("backend", "kind", "placement"),
    [
        ("harness", Backend.HARNESS, Placement.LAYERWISE_FROM_HOST),
        ("diffusers-group-rs", Backend.DIFFUSERS_GROUP_RS, Placement.DIFFUSERS_GROUP),
        ("sglang@0.5.23", Backend.SGLANG, Placement.SGLANG_LAYERWISE),
    ],
)
def test_backend_kind_decides_the_layerwise_placement(backend: str, kind: Backend, placement: Placement) -> None:
    assert Backend.of(backend) is kind
    flags = OffloadFlags(dit_cpu_offload=True, dit_layerwise_offload=True)
    assert Placement.for_role("dit", flags, backend) is placement
    assert Placement.for_role("vae", flags, backend) is Placement.RESIDENT


def test_backend_is_refused_if_unknown() -> None:
    with pytest.raises(ValueError, match="unknown backend 'accelerate'"):
        Backend.of("accelerate")


def test_cell_spec_round_trips_and_keeps_its_hash(tmp_path: Path) -> None:
    from tests.helpers import tiny_scenario_file

    [cell] = expand(load_scenario(tiny_scenario_file(tmp_path, "spec", {"dit_cpu_offload": [True]})))
    spec = cell.spec("cpu")
    assert CellSpec.from_json(spec.to_json()) == spec
    # the hash of the spec dict as the runner wrote it before CellSpec (no backend key for the harness backend)
    legacy = {k: v for k, v in spec.as_dict().items() if k != "backend"}
    import hashlib

    assert spec.spec_hash == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:12]


def test_the_parent_and_the_child_begin_a_record_with_one_header(tmp_path: Path) -> None:
    """`CellRecord.begin` is the one header: the child's record and the parent's crash, timeout or skip record
    carry the same spec fields, settings included (the parent's used to leave them out)."""
    import dataclasses

    from harness.run.runner import Run, _base_record
    from tests.helpers import tiny_scenario_file

    [cell] = expand(load_scenario(tiny_scenario_file(tmp_path, "hdr", {"dit_cpu_offload": [True]})))
    spec = dataclasses.replace(cell.spec("cpu"), resolution=cell.resolution.as_dict())
    child = CellRecord.begin(spec)
    run = Run.__new__(Run)
    run.device = "cpu"
    crash = _base_record(run, cell, Status.CRASH)
    assert crash.settings == spec.settings and crash.run_options == spec.run
    header = ("scenario", "scenario_file", "model", "card", "settings", "device", "backend", "policy", "requested",
              "effective", "messages", "engine", "placements", "run_options")
    assert {k: getattr(crash, k) for k in header} == {k: getattr(child, k) for k in header}
    with pytest.raises(ValueError, match="no resolution"):
        CellRecord.begin(dataclasses.replace(spec, resolution=None))


# ------------------------------------------------------------------------------- only the child imports torch

# The child's modules: the only ones that may import torch, diffusers or transformers when imported. Every other
# module of the package is imported by the parent, the analysis commands or the CPU tests, and must not pull them
# in (the parent would then hold a CUDA context that distorts the children's numbers), directly or through another.
CHILD_SIDE = {
    "harness.cell.pipeline",
    "harness.cell.measure",
    "harness.cell.checkpoint",
    "harness.cell.offload.component",
    "harness.cell.offload.layerwise",
    "harness.cell.offload.loader",
    "harness.cell.offload.memory",
    "harness.cell.offload.timeline",
    "harness.engine.layerwise",
}
HEAVY = ("torch", "diffusers", "transformers")


def _modules() -> list[str]:
    out = []
    for path in sorted((REPO / "harness").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_child_side_modules_exist() -> None:
    assert CHILD_SIDE <= set(_modules())


def test_parent_side_modules_import_no_torch() -> None:
    parent = [m for m in _modules() if m not in CHILD_SIDE and m != "harness.__main__"]
    code = (f"import importlib, sys\nfor m in {parent!r}:\n    importlib.import_module(m)\n"
            f"    heavy = [h for h in {HEAVY!r} if h in sys.modules]\n"
            "    if heavy:\n        print(m, heavy)\n        sys.exit(1)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"a parent-side module imports the child's stack: {proc.stdout}{proc.stderr[-2000:]}"


# ------------------------------------------------------------------------------------------ house rules, pinned

MAX_FUNCTION_LINES = 50


def test_no_function_in_the_package_is_over_50_lines() -> None:
    long = []
    for path in sorted((REPO / "harness").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these: " + "; ".join(long)
