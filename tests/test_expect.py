"""harness/analyze/expect.py evaluated on hand-written records: lowest_peak, same_output and fates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harness.analyze.expect import (
    demand,
    evaluate,
    fate_failures,
    invariant_failures,
    layerwise_overhead_verdict,
    lowest_peak_verdict,
    reserved_over_allocated_verdict,
    resident_speed_verdict,
    same_output_verdict,
)
from harness.common.contract import CellRecord, as_record
from harness.common.units import MIB
from harness.plan.scenario import FateExpectation, ScenarioError, expand, load_scenario
from tests.helpers import as_records, make_record

REPO = Path(__file__).resolve().parent.parent
BOTH_ON = {"dit_cpu_offload": True, "dit_layerwise_offload": True}


def matrix(**overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """The 2x2 #26925 matrix with healthy numbers: both-on lowest. `overrides` keyed 'cpuX_lwY' change a cell."""
    peaks = {"cpu0_lw0": (8, 9), "cpu0_lw1": (8, 5), "cpu1_lw0": (1, 9), "cpu1_lw1": (1, 3)}
    records = []
    for key, (load, runtime) in peaks.items():
        cpu, lw = key[3] == "1", key[-1] == "1"
        kw: dict[str, Any] = {"load": load * MIB, "runtime": runtime * MIB, **overrides.get(key, {})}
        records.append(make_record(cpu, lw, **kw))
    return records


# ------------------------------------------------------------------------------------------------ lowest_peak


def test_lowest_peak_passes_if_both_on_is_lowest() -> None:
    v = lowest_peak_verdict("tiny-6m", as_records(matrix()), BOTH_ON)
    assert v.passed, v.message
    assert (v.check, v.card) == ("lowest_peak", "tiny-6m")
    assert "3 MiB" in v.message


@pytest.mark.parametrize("runtime_mib", [2, 3], ids=["lower", "equal"])
def test_lowest_peak_fails_if_another_loaded_cell_is_not_above(runtime_mib: int) -> None:
    records = matrix(cpu1_lw0={"load": 1 * MIB, "runtime": runtime_mib * MIB})
    v = lowest_peak_verdict("tiny-6m", as_records(records), BOTH_ON)
    assert not v.passed
    assert "not below every cell that loaded" in v.message
    assert f"cpu1-lw0-te0-vae0-pf0-pin1={runtime_mib} MiB" in v.message


def test_lowest_peak_counts_runtime_oom_as_above_cap_if_its_measured_peak_is_lower() -> None:
    # The allocator's peak stops short of the allocation that failed, so the measured number is misleading.
    records = matrix(cpu1_lw0={"status": "oom", "failed_phase": "denoise", "load": MIB // 2, "runtime": MIB})
    assert demand(as_record(records[2])) == float("inf")
    v = lowest_peak_verdict("tiny-6m", as_records(records), BOTH_ON)
    assert v.passed, v.message
    assert "cpu1-lw0-te0-vae0-pf0-pin1=> cap (oom)" in v.message


def test_lowest_peak_ignores_cells_that_failed_to_load() -> None:
    records = matrix(cpu0_lw1={"status": "oom", "failed_phase": "load", "load": MIB // 4, "runtime": None})
    v = lowest_peak_verdict("tiny-6m", as_records(records), BOTH_ON)
    assert v.passed, v.message
    assert "cpu0-lw1" not in v.message


@pytest.mark.parametrize(
    "target",
    [
        {"status": "oom", "failed_phase": "load", "runtime": None},
        {"status": "error", "failed_phase": "denoise"},
        {"status": "crash", "failed_phase": None},
    ],
    ids=["oom-in-load", "error-in-denoise", "crash"],
)
def test_lowest_peak_fails_if_target_did_not_run(target: dict[str, Any]) -> None:
    v = lowest_peak_verdict("tiny-6m", as_records(matrix(cpu1_lw1=target)), BOTH_ON)
    assert not v.passed
    assert "did not run" in v.message and target["status"] in v.message


@pytest.mark.parametrize("count", [0, 2])
def test_lowest_peak_fails_if_target_is_not_exactly_one_cell(count: int) -> None:
    records = [r for r in matrix() if r["requested"] != make_record(True, True)["requested"]]
    records += [make_record(True, True, load=MIB, runtime=MIB)] * count
    v = lowest_peak_verdict("tiny-6m", as_records(records), BOTH_ON)
    assert not v.passed and f"{count} cells match" in v.message


def test_lowest_peak_fails_if_target_has_no_peak() -> None:
    v = lowest_peak_verdict("tiny-6m", as_records(matrix(cpu1_lw1={"load": None, "runtime": None})), BOTH_ON)
    assert not v.passed


def test_lowest_peak_compares_allocator_reserved_if_device_is_cuda() -> None:
    records = [make_record(True, True, device="cuda", load=MIB, runtime=3 * MIB)]
    records.append(make_record(False, False, device="cuda", load=9 * MIB, runtime=9 * MIB))
    records[1]["phases"]["load"]["ledger_peak_bytes"] = 1  # not the counter on CUDA
    v = lowest_peak_verdict("native", as_records(records), BOTH_ON)
    assert v.passed and "alloc_peak_reserved_bytes" in v.message


def legacy_records() -> tuple[Any, list[dict[str, Any]]]:
    """Records as the runner writes them for the legacy tiny scenario: layerwise-only OOMs at load, and both-on
    (same effective flags) is a copy of it."""
    scenario = load_scenario(REPO / "scenarios" / "cpu" / "qwen_image_edit_tiny_legacy.toml")
    lw_only, both = expand(scenario)
    source = make_record(
        False,
        True,
        scenario=scenario.name,
        status="oom",
        failed_phase="load",
        load=6 * MIB,
        runtime=None,
        digest=None,
        dit_offload_prefetch_size=1.0,
    )
    assert source["cell_id"] == lw_only.cell_id
    copy = {**source, **both.resolution.as_dict(), "cell_id": both.cell_id, "same_as": both.same_as}
    return scenario, [source, copy]


def test_lowest_peak_fails_if_policy_is_legacy() -> None:
    """What the pre-#26925 policy produces: the both-on cell never ran with dit_cpu_offload."""
    scenario, records = legacy_records()
    (verdict,) = evaluate(scenario, as_records(records))
    assert verdict.check == "lowest_peak" and verdict.card == "tiny-6m"
    assert not verdict.passed
    assert "cpu1-lw1" in verdict.message and "did not run: oom in load" in verdict.message


# ------------------------------------------------------------------------------------------------ same_output


def test_same_output_passes_if_every_cell_that_ran_has_the_same_digest() -> None:
    records = [*matrix(), make_record(False, True, status="oom", failed_phase="load", digest="b" * 64, runtime=None)]
    v = same_output_verdict("native", as_records(records))
    assert v.passed and "4 cells" in v.message


def test_same_output_fails_naming_cells_if_digests_differ() -> None:
    records = matrix(cpu1_lw1={"digest": "f" * 64})
    v = same_output_verdict("native", as_records(records))
    assert not v.passed
    assert "ffffffffffff: cpu1-lw1-te0-vae0-pf0-pin1" in v.message
    assert "aaaaaaaaaaaa: cpu0-lw0-te0-vae0-pf0-pin1, cpu0-lw1-te0-vae0-pf0-pin1, cpu1-lw0" in v.message


def test_same_output_fails_if_a_cell_that_ran_has_no_digest() -> None:
    v = same_output_verdict("native", as_records(matrix(cpu0_lw0={"digest": None})))
    assert not v.passed and "missing" in v.message


# ------------------------------------------------------------------------------------------------ fates

OOM_AT_LOAD = FateExpectation({"dit_cpu_offload": False, "dit_layerwise_offload": True}, "oom", "load", ("tiny-6m",))
ALL_OK_NATIVE = FateExpectation({}, "ok", None, ("native",))


def test_fate_failures_is_empty_if_record_meets_its_fate() -> None:
    record = make_record(False, True, status="oom", failed_phase="load")
    assert fate_failures(as_record(record), (OOM_AT_LOAD, ALL_OK_NATIVE)) == []


def test_fate_failures_reports_status_mismatch() -> None:
    record = make_record(False, True, status="ok")
    (msg,) = fate_failures(as_record(record), (OOM_AT_LOAD,))
    assert msg.startswith(record["cell_id"]) and "expected oom in load, got ok" in msg


def test_fate_failures_reports_phase_mismatch() -> None:
    record = make_record(False, True, status="oom", failed_phase="denoise")
    (msg,) = fate_failures(as_record(record), (OOM_AT_LOAD,))
    assert "expected oom in load, got oom in denoise" in msg


def test_fate_failures_skips_records_on_other_cards() -> None:
    record = make_record(False, True, status="ok", card="native")
    assert fate_failures(as_record(record), (OOM_AT_LOAD,)) == []
    failing = make_record(False, True, status="oom", failed_phase="load", card="native")
    assert len(fate_failures(as_record(failing), (OOM_AT_LOAD, ALL_OK_NATIVE))) == 1


def test_fate_failures_skips_records_that_do_not_match_where() -> None:
    assert fate_failures(as_record(make_record(True, True, status="ok")), (OOM_AT_LOAD,)) == []


def test_fate_without_cards_applies_to_every_card() -> None:
    fate = FateExpectation({}, "ok", None, None)
    for card in ("tiny-6m", "native", "anything"):
        assert len(fate_failures(as_record(make_record(card=card, status="timeout")), (fate,))) == 1


def test_a_fate_naming_backends_judges_only_their_cells() -> None:
    """The 5090 resident scenario declares ours ok and SGLang 0.5.23's manager oom in denoise for the same flags
    (finding 4): each fate skips the other backend's cells."""
    sglang_oom = FateExpectation({}, "oom", "denoise", None, ("sglang@0.5.23",))
    ours_ok = FateExpectation({}, "ok", None, None, ("harness",))
    ours = make_record(status="ok")
    theirs = {**make_record(status="oom", failed_phase="denoise"), "backend": "sglang@0.5.23"}
    assert fate_failures(as_record(ours), (sglang_oom, ours_ok)) == []
    assert fate_failures(as_record(theirs), (sglang_oom, ours_ok)) == []
    fixed = {**make_record(status="ok"), "backend": "sglang@0.5.23"}  # a release that fits shows as a changed fate
    (msg,) = fate_failures(as_record(fixed), (sglang_oom, ours_ok))
    assert "expected oom in denoise, got ok" in msg


def test_a_fate_naming_a_backend_the_scenario_lacks_is_refused_by_field(tmp_path: Path) -> None:
    text = (REPO / "scenarios/gpu/qwen_image_resident_5090_sglang.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('backends = ["sglang@0.5.23"]\nstatus', 'backends = ["sglang@0.5.8"]\nstatus'))
    with pytest.raises(ScenarioError, match=r"expect\.fate\[1\]\.backends: expected a list of this scenario's"):
        load_scenario(bad)


# ------------------------------------------------------------------------------------------------ evaluate


def test_evaluate_passes_everything_if_tiny_scenario_behaves() -> None:
    scenario = load_scenario(REPO / "scenarios" / "cpu" / "qwen_image_edit_tiny.toml")
    records = []
    for card in ("tiny-6m", "native"):
        for r in matrix(
            cpu0_lw1={"status": "oom", "failed_phase": "load", "runtime": None} if card == "tiny-6m" else {}
        ):
            base = make_record(
                r["requested"]["dit_cpu_offload"],
                r["requested"]["dit_layerwise_offload"],
                scenario=scenario.name,
                card=card,
                dit_offload_prefetch_size=1.0,
            )
            records.append({**r, **{k: base[k] for k in ("cell_id", "scenario", "card", "requested")}})
    checks = ("lowest_peak", "same_output", "fates")  # the ones these records carry the fields for
    verdicts = [v for v in evaluate(scenario, as_records(records)) if v.check in checks]
    expected = [(card, check) for card in ("tiny-6m", "native") for check in checks]
    assert [(v.card, v.check) for v in verdicts] == expected
    assert all(v.passed for v in verdicts), [v.message for v in verdicts if not v.passed]
    # and a layerwise-only cell that loads on the capped card breaks the declared fate
    records[1] = {**records[1], "status": "ok", "failed_phase": None}
    fates = [v for v in evaluate(scenario, as_records(records)) if v.check == "fates" and v.card == "tiny-6m"]
    assert not fates[0].passed


def test_invariant_bound_counts_the_dit_resident_layers() -> None:
    layer, kept = 100, 3
    lw = {"groups": {"blocks": {"layers": 6, "prefetch": 1}}, "largest_layer_by_group": {"blocks": layer},
          "param_bytes": 6 * layer, "host_bytes": 6 * layer, "resident_bytes": kept * layer}
    record = {"schema_version": 2, "cell_id": "s/c/x", "status": "ok",
              "components": {"dit": {"placement": "layerwise-from-host", "weight_bytes": 6 * layer + 50,
                                     "layerwise": lw}},
              "phases": {"denoise": {"ledger_peak_bytes": 50 + kept * layer + 3 * layer}}}
    assert invariant_failures(as_record(record)) == []
    record["phases"]["denoise"]["ledger_peak_bytes"] += 1
    assert "resident layers" in invariant_failures(as_record(record))[0]


# --------------------------------------------------------------------------------------------- resident_speed

RESIDENT_SWEEP = REPO / "results" / "h200" / "qwen-image-resident-5090.records.jsonl"


def resident_sweep(slower: dict[str, float] | None = None) -> list[CellRecord]:
    """The measured H200 resident sweep (Qwen-Image, 5090 cap); `slower` sets a cell's denoise steps (ms) by label."""
    records = [json.loads(line) for line in RESIDENT_SWEEP.read_text().splitlines() if line.strip()]
    for r in records:
        label = r["cell_id"].rsplit("/", 1)[-1]
        if label in (slower or {}):
            r["phases"]["denoise"]["step_ms"] = [slower[label]] * len(r["phases"]["denoise"]["step_ms"])
    return [as_record(r) for r in records]


def test_resident_speed_passes_on_the_measured_sweep_where_strided_30_beats_leading_38() -> None:
    v = resident_speed_verdict("rtx5090-32g", resident_sweep())
    assert v.passed, v.message
    assert "pin1-res38 (r=38) 0.770 s vs cpu1-lw1-te1-vae0-pf1-pin1-res0.5 (r=30) 0.905 s" in v.message
    assert "res0.5-strided (r=30)" in v.message  # against the cell with none resident, its only peer
    assert "res38 (r=38) 0.770 s vs cpu1-lw1-te1-vae0-pf1-pin1-res0.5-strided" not in v.message


def test_resident_speed_fails_if_more_leading_layers_step_slower() -> None:
    v = resident_speed_verdict("rtx5090-32g", resident_sweep(slower={"cpu1-lw1-te1-vae0-pf1-pin1-res38": 950.0}))
    assert not v.passed
    assert "res38 (r=38) 0.950 s vs cpu1-lw1-te1-vae0-pf1-pin1-res0.5 (r=30) 0.905 s" in v.message


def test_resident_speed_compares_a_strided_cell_with_the_cell_that_keeps_none() -> None:
    slower = {"cpu1-lw1-te1-vae0-pf1-pin1-res0.5-strided": 1600.0}
    v = resident_speed_verdict("rtx5090-32g", resident_sweep(slower=slower))
    assert not v.passed
    assert "res0.5-strided (r=30) 1.600 s vs cpu1-lw1-te1-vae0-pf1-pin1 (r=0)" in v.message


# ------------------------------------------------------------------------------------------------ layerwise_overhead


def overhead_pair(layerwise_ms: float, whole_ms: float, whole_status: str = "ok") -> list[CellRecord]:
    """A whole-DiT cell (cpu1-lw0) and its layerwise twin (cpu1-lw1) with steady steps as given (first step 9 s)."""
    records = []
    for lw, ms, status in ((False, whole_ms, whole_status), (True, layerwise_ms, "ok")):
        r = make_record(True, lw, device="cuda", card="native", status=status,
                        failed_phase=None if status == "ok" else "denoise")
        r["phases"]["denoise"]["step_ms"] = [9_000.0, ms, ms]
        records.append(r)
    return as_records(records)


def test_layerwise_overhead_passes_within_the_limit_and_says_by_how_much() -> None:
    v = layerwise_overhead_verdict("native", overhead_pair(6_600.0, 6_563.0), 0.01)
    assert v.passed, v.message
    assert "step 6600.0 ms vs whole-DiT 6563.0 ms (+0.56%, limit +1%)" in v.message


def test_layerwise_overhead_fails_past_the_limit() -> None:
    v = layerwise_overhead_verdict("native", overhead_pair(6_779.0, 6_563.0), 0.01)
    assert not v.passed and "(+3.29%, limit +1%)" in v.message


def test_layerwise_overhead_fails_loudly_when_nothing_is_compared() -> None:
    assert not layerwise_overhead_verdict("native", overhead_pair(6_600.0, 6_563.0)[1:], 0.01).passed
    v = layerwise_overhead_verdict("native", overhead_pair(6_600.0, 6_563.0, whole_status="oom"), 0.01)
    assert not v.passed and "not compared" in v.message
    assert not layerwise_overhead_verdict("native", [], 0.01).passed


def test_layerwise_overhead_scenario_is_checked_at_load(tmp_path: Path) -> None:
    from tests.helpers import DELETE, base_scenario, mutate, to_toml

    ok = mutate(base_scenario(), ("expect", "layerwise_overhead"), 0.01)
    path = tmp_path / "ok.toml"
    path.write_text(to_toml(ok))
    assert load_scenario(path).expect.layerwise_overhead == 0.01
    for bad, why in ((mutate(ok, ("expect", "layerwise_overhead"), 1.5), r"fraction in \(0, 1\)"),
                     (mutate(ok, ("axes", "dit_layerwise_offload"), [True]), "nothing to compare")):
        path.write_text(to_toml(mutate(bad, ("exclude",), DELETE)) if why == "nothing to compare" else to_toml(bad))
        with pytest.raises(ScenarioError, match=why):
            load_scenario(path)


# ------------------------------------------------------------------------------------------- reserved_over_allocated


def reserved_cell(reserved_mib: int, allocated_mib: int, lw: bool = True, status: str = "ok") -> dict[str, Any]:
    """A CUDA cell whose runtime phases peak at `reserved_mib` reserved (denoise) and `allocated_mib` allocated."""
    r = make_record(True, lw, device="cuda", card="native", runtime=reserved_mib * MIB, status=status,
                    failed_phase=None if status == "ok" else "load")
    for name, phase in r["phases"].items():
        if name != "load" and status == "ok":
            phase["alloc_peak_allocated_bytes"] = allocated_mib * MIB - (10 if name != "denoise" else 0)
    if status != "ok":
        r["phases"] = {"load": r["phases"]["load"]}
    return r


def test_reserved_over_allocated_passes_within_the_limit_and_says_by_how_much() -> None:
    v = reserved_over_allocated_verdict("native", as_records([reserved_cell(11_822, 11_795)]), 0.05)
    assert v.passed, v.message
    assert "runtime reserved 11,822 MiB for 11,795 MiB allocated (+0.2%, limit +5%)" in v.message


def test_reserved_over_allocated_fails_past_the_limit_and_ignores_whole_dit_cells() -> None:
    records = as_records([reserved_cell(59_634, 19_823), reserved_cell(90_000, 10_000, lw=False)])
    v = reserved_over_allocated_verdict("native", records, 0.05)
    assert not v.passed and "(+200.8%, limit +5%)" in v.message
    assert "cpu1-lw0" not in v.message  # a whole-DiT cell is not a layerwise cell


def test_reserved_over_allocated_fails_loudly_on_a_cell_that_did_not_run_or_on_none() -> None:
    v = reserved_over_allocated_verdict("native", as_records([reserved_cell(100, 100, status="oom")]), 0.05)
    assert not v.passed and "oom in load, not run to the end: not checked" in v.message
    v = reserved_over_allocated_verdict("native", [], 0.05)
    assert not v.passed and "nothing checked" in v.message


def test_reserved_over_allocated_passes_a_cell_whose_peak_phase_has_no_cache_and_names_the_largest_phase() -> None:
    """Wan both-on on the H200: encode holds the runtime peak (11,822 reserved / 11,795 allocated MiB); the denoise
    keeps the offloaded encoder's blocks (11,822 / 5,687, 11,093 cached from earlier). The cell's footprint is not
    raised by the cache, so the check passes, and says where the largest one-phase ratio is."""
    r = reserved_cell(11_822, 11_795)
    r["phases"]["encode"].update(alloc_peak_reserved_bytes=11_822 * MIB, alloc_peak_allocated_bytes=11_795 * MIB)
    r["phases"]["denoise"].update(alloc_peak_reserved_bytes=11_822 * MIB, alloc_peak_allocated_bytes=5_687 * MIB,
                                  reserved_attribution={"cached_from_earlier_bytes": 11_093 * MIB})
    r["phases"]["decode"].update(alloc_peak_reserved_bytes=11_822 * MIB, alloc_peak_allocated_bytes=5_249 * MIB)
    v = reserved_over_allocated_verdict("native", as_records([r]), 0.05)
    assert v.passed, v.message
    assert "(+0.2%, limit +5%); largest in one phase: decode 2.25x" in v.message


def test_reserved_over_allocated_is_checked_at_load(tmp_path: Path) -> None:
    from tests.helpers import base_scenario, mutate, to_toml

    gpu = {**base_scenario(), "profile": "gpu", "few_rounds": "a unit test"}
    ok = mutate(gpu, ("expect", "reserved_over_allocated"), 0.05)
    path = tmp_path / "ok.toml"
    path.write_text(to_toml(ok))
    assert load_scenario(path).expect.reserved_over_allocated == 0.05
    for bad, why in ((mutate(ok, ("expect", "reserved_over_allocated"), 5), r"fraction in \(0, 1\)"),
                     ({**ok, "profile": "cpu"}, "needs the gpu profile")):
        path.write_text(to_toml(bad))
        with pytest.raises(ScenarioError, match=why):
            load_scenario(path)
    no_layerwise = mutate(mutate(ok, ("axes", "dit_layerwise_offload"), [False]), ("exclude",), [])
    no_layerwise["expect"] = {"reserved_over_allocated": 0.05}
    path.write_text(to_toml(no_layerwise))
    with pytest.raises(ScenarioError, match="no layerwise cell of our runtime"):
        load_scenario(path)
