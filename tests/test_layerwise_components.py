"""Layerwise components end to end on the CPU side: the flags' forms in scenarios and records, which placement each
zoo role gets, each component's prefetch / resident / policy, and cell specs that stay as they were."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cell.offload.loader import layerwise_tuning
from harness.common.contract import Placement
from harness.common.flags import FlagError, OffloadFlags
from harness.engine.policy import EngineRequest, _request_key
from harness.plan.scenario import expand, load_scenario, matches
from harness.policy import resolve

placement_for = Placement.for_role
REPO = Path(__file__).resolve().parent.parent
BOTH = {"dit_cpu_offload": True, "dit_layerwise_offload": True}


@pytest.mark.parametrize(("components", "expected"), [
    (None, ("cpu-offload", "layerwise-from-host", "resident")),
    ((), ("cpu-offload", "layerwise-from-host", "resident")),
    (("text_encoder",), ("layerwise-from-host", "layerwise-from-host", "resident")),
    (("vae",), ("cpu-offload", "layerwise-from-host", "layerwise-from-host")),
    (("all",), ("layerwise-from-host", "layerwise-from-host", "layerwise-from-host")),
])
def test_placement_follows_the_layerwise_selection(components: tuple[str, ...] | None, expected: tuple) -> None:
    flags = OffloadFlags(**BOTH, text_encoder_cpu_offload=True, layerwise_offload_components=components)
    eff = resolve(flags, "sglang").effective
    assert tuple(placement_for(role, eff) for role in ("text_encoder", "dit", "vae")) == expected


def test_all_streams_the_dit_from_the_host_without_its_own_flag() -> None:
    eff = resolve(OffloadFlags(dit_cpu_offload=True, layerwise_offload_components=("all",)), "sglang").effective
    assert placement_for("dit", eff) == "layerwise-from-host"


def test_each_component_takes_its_map_entry_else_sglangs_defaults() -> None:
    flags = OffloadFlags(**BOTH, dit_offload_prefetch_size=4, dit_layerwise_resident_layers=30,
                         dit_layerwise_residency_policy="strided",
                         layerwise_prefetch_size=(("text_encoder", 2.0),), layerwise_resident_layers=(("vae", 1.0),))
    # layerwise_tuning_for: a map entry wins; the DiT falls back to the dit_* flags, the others to 0 / 0 / leading
    assert layerwise_tuning("dit", flags, 4.0) == (4.0, 30.0, "strided")
    assert layerwise_tuning("text_encoder", flags, 4.0) == (2.0, 0.0, "leading")
    assert layerwise_tuning("vae", flags, 4.0) == (0.0, 1.0, "leading")
    dit_map = OffloadFlags(**BOTH, layerwise_prefetch_size=(("transformer", 3.0),))
    assert layerwise_tuning("dit", dit_map, 0.0)[0] == 3.0


@pytest.mark.parametrize("value", [{"unet": 2}, {"text_encoder": -1}, {"vae": "x"}, "text_encoder", 3])
def test_component_maps_refuse_bad_entries_naming_the_field(value: object) -> None:
    with pytest.raises(FlagError, match="layerwise_prefetch_size"):
        OffloadFlags.from_mapping({"layerwise_prefetch_size": value})


def test_component_map_reads_sglangs_string_form() -> None:
    flags = OffloadFlags.from_mapping({"layerwise_prefetch_size": "text_encoder=2, vae=1"})
    assert flags.layerwise_prefetch_size == (("text_encoder", 2.0), ("vae", 1.0))
    assert flags.as_dict()["layerwise_prefetch_size"] == {"text_encoder": 2.0, "vae": 1.0}


@pytest.mark.parametrize("value", [["dit", "unet"], [3], {"dit": True}])
def test_components_refuse_unknown_groups_and_types_naming_the_field(value: object) -> None:
    with pytest.raises(FlagError, match="layerwise_offload_components"):
        OffloadFlags.from_mapping({"layerwise_offload_components": value})


def test_components_normalise_as_sglang() -> None:
    # split on commas, '-' as '_', lowercased, "default" expanded, duplicates dropped, "all" is the whole answer
    assert OffloadFlags.from_mapping({"layerwise_offload_components": "Text-Encoder, default"}) \
        .layerwise_offload_components == ("text_encoder", "image_encoder", "vae")
    assert OffloadFlags.from_mapping({"layerwise_offload_components": ["vae", "all", "dit"]}) \
        .layerwise_offload_components == ("all",)
    assert OffloadFlags.from_mapping({"layerwise_offload_components": "unset"}).layerwise_offload_components is None


def test_scenario_where_matches_a_records_list_form() -> None:
    scenario = load_scenario(REPO / "scenarios/cpu/flux_layerwise_components_tiny.toml")
    cells = expand(scenario)
    record_form = cells[1].requested.as_dict()
    assert record_form["layerwise_offload_components"] == ["text_encoder", "vae"]
    assert matches(record_form, {"layerwise_offload_components": ("text_encoder", "vae")})
    assert not matches(record_form, {"layerwise_offload_components": ("all",)})


def test_cell_spec_of_default_new_flags_hashes_as_before() -> None:
    scenario = load_scenario(REPO / "scenarios/cpu/qwen_image_edit_tiny.toml")
    cell = expand(scenario)[0]
    assert set(cell.spec("cpu").as_dict()["requested"]) == {"dit_cpu_offload", "dit_layerwise_offload",
                                                  "text_encoder_cpu_offload", "vae_cpu_offload",
                                                  "dit_offload_prefetch_size", "pin_cpu_memory"}
    assert OffloadFlags.from_mapping(cell.spec("cpu").as_dict()["requested"]) == cell.requested


def test_engine_request_key_leaves_out_new_flags_at_their_defaults() -> None:
    # answers recorded before the flags existed (OFFLOAD_BENCH_SGLANG_ANSWERS) still match
    old = {"dit_cpu_offload": True, "dit_layerwise_offload": True, "text_encoder_cpu_offload": False,
           "vae_cpu_offload": False, "dit_offload_prefetch_size": 4.0, "pin_cpu_memory": True}
    new = OffloadFlags.from_mapping(old).as_dict()
    assert _request_key(EngineRequest(new, 32.0, "qwen-image", "T2I")) == \
        _request_key(EngineRequest(old, 32.0, "qwen-image", "T2I"))
    moved = OffloadFlags.from_mapping({**old, "dit_layerwise_resident_layers": 30}).as_dict()
    assert _request_key(EngineRequest(moved, 32.0, "qwen-image", "T2I")) != \
        _request_key(EngineRequest(old, 32.0, "qwen-image", "T2I"))
