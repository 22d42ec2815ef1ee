"""harness/common/flags.py and harness/policy: flag parsing, the prefetch-window arithmetic, and the SGLang policies."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from harness.common.flags import FlagError, OffloadFlags, prefetch_layers, resident_layer_count, streamed_layer_indices
from harness.policy import check_policy, resolve

LEGACY_MESSAGE = "layerwise offload is selected for DiT components, automatically disabling dit_cpu_offload."

# ------------------------------------------------------------------------------------------------ from_mapping


def test_from_mapping_builds_flags_if_names_and_types_are_valid() -> None:
    flags = OffloadFlags.from_mapping({"dit_cpu_offload": True, "dit_offload_prefetch_size": 2})
    assert flags == OffloadFlags(dit_cpu_offload=True, dit_offload_prefetch_size=2.0)
    assert isinstance(flags.dit_offload_prefetch_size, float)


def test_from_mapping_names_the_flag_if_it_is_unknown() -> None:
    with pytest.raises(FlagError, match=r"where: unknown flag 'dit_gpu_offload'"):
        OffloadFlags.from_mapping({"dit_gpu_offload": True, "dit_cpu_offload": True}, where="where")


@pytest.mark.parametrize("name", ["dit_cpu_offload", "dit_layerwise_offload", "vae_cpu_offload", "pin_cpu_memory"])
@pytest.mark.parametrize("value", [1, 0, "true", 1.0])  # None is unset (engine defaults)
def test_from_mapping_rejects_switch_if_not_bool(name: str, value: object) -> None:
    with pytest.raises(FlagError, match=rf"flags\.{name}: expected true or false"):
        OffloadFlags.from_mapping({name: value})


@pytest.mark.parametrize("value", [-1, -0.5, math.nan, True, False, "2", None, [2]])
def test_from_mapping_rejects_prefetch_if_negative_nan_bool_or_not_a_number(value: object) -> None:
    with pytest.raises(FlagError, match=r"flags\.dit_offload_prefetch_size"):
        OffloadFlags.from_mapping({"dit_offload_prefetch_size": value})


def test_inf_prefetch_is_rejected_or_resolved_if_layerwise_is_on() -> None:
    try:
        flags = OffloadFlags.from_mapping({"dit_layerwise_offload": True, "dit_offload_prefetch_size": math.inf})
    except FlagError:
        return  # rejecting inf up front is a fine fix
    effective = resolve(flags, "sglang").effective
    assert prefetch_layers(effective.dit_offload_prefetch_size, 60) == 60


# ------------------------------------------------------------------------------------------------ prefetch_layers


@pytest.mark.parametrize(
    ("value", "num_layers", "expected"),
    [
        (0, 60, 1),
        (0.0, 1, 1),
        (0.1, 60, 7),  # 1 + round(5.9)
        (0.5, 60, 31),  # 1 + round(29.5): banker's rounding gives 30
        (0.99, 60, 59),  # 1 + round(58.41)
        (1.0, 60, 1),
        (4, 60, 4),
        (4.9, 60, 4),
        (99, 60, 60),
        (0.5, 1, 1),
        (2, 1, 1),
    ],
)
def test_prefetch_layers_follows_sglang_if_value_is(value: float, num_layers: int, expected: int) -> None:
    assert prefetch_layers(value, num_layers) == expected


@pytest.mark.parametrize("value", [-1, -0.1, math.nan, True, "1"])
def test_prefetch_layers_raises_if_value_is_invalid(value: object) -> None:
    with pytest.raises(FlagError, match="dit_offload_prefetch_size"):
        prefetch_layers(value, 60)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_layers", [0, -3])
def test_prefetch_layers_raises_if_group_has_no_layers(num_layers: int) -> None:
    with pytest.raises(FlagError, match="num_layers"):
        prefetch_layers(1, num_layers)


# ------------------------------------------------------------------------------------------------ resolve


def both_on(**kw: object) -> OffloadFlags:
    return OffloadFlags(dit_cpu_offload=True, dit_layerwise_offload=True, **kw)  # type: ignore[arg-type]


def test_sglang_keeps_dit_cpu_offload_if_layerwise_is_on() -> None:
    """The SGLang #26925 fix: both flags stay on and nothing is said about the DiT."""
    r = resolve(both_on(dit_offload_prefetch_size=4), "sglang")
    assert r.effective.dit_cpu_offload is True
    assert r.effective.dit_layerwise_offload is True
    assert r.effective == r.requested
    assert r.engine is None  # no card: nothing beyond the flags to report
    assert not any("dit_cpu_offload" in m or "DiT" in m for m in r.messages)


def test_legacy_disables_dit_cpu_offload_if_layerwise_is_on() -> None:
    """The #26925 bug: layerwise forces dit_cpu_offload off, with SGLang's message."""
    r = resolve(both_on(dit_offload_prefetch_size=4), "sglang-legacy")
    assert r.requested.dit_cpu_offload is True
    assert r.effective.dit_cpu_offload is False
    assert r.effective.dit_layerwise_offload is True
    assert LEGACY_MESSAGE in r.messages


@pytest.mark.parametrize("cpu", [False, True])
def test_legacy_leaves_dit_cpu_offload_alone_if_layerwise_is_off(cpu: bool) -> None:
    r = resolve(OffloadFlags(dit_cpu_offload=cpu), "sglang-legacy")
    assert r.effective.dit_cpu_offload is cpu
    assert LEGACY_MESSAGE not in r.messages


@pytest.mark.parametrize("policy", ["sglang", "sglang-legacy"])
@pytest.mark.parametrize(("value", "floored"), [(2.5, 2.0), (7.99, 7.0), (1.0001, 1.0)])
def test_prefetch_is_floored_with_message_if_non_integer_above_one(policy: str, value: float, floored: float) -> None:
    r = resolve(both_on(dit_offload_prefetch_size=value), policy)
    assert r.effective.dit_offload_prefetch_size == floored
    assert f"Invalid --dit-offload-prefetch-size value passed, truncated to: {int(floored)}" in r.messages


@pytest.mark.parametrize("value", [0.0, 0.3, 1.0, 4.0])
def test_prefetch_is_kept_if_zero_fraction_or_integer(value: float) -> None:
    r = resolve(both_on(dit_offload_prefetch_size=value), "sglang")
    assert r.effective.dit_offload_prefetch_size == value
    assert not any("truncated" in m for m in r.messages)


@pytest.mark.parametrize("policy", ["sglang", "sglang-legacy"])
@pytest.mark.parametrize("value", [0.5, 3.0])
def test_prefetch_is_recorded_as_zero_if_layerwise_is_off(policy: str, value: float) -> None:
    r = resolve(OffloadFlags(dit_cpu_offload=True, dit_offload_prefetch_size=value), policy)
    assert r.effective.dit_offload_prefetch_size == 0.0
    assert r.requested.dit_offload_prefetch_size == value
    assert any("has no effect without dit_layerwise_offload" in m for m in r.messages)


def test_resolve_says_nothing_if_prefetch_is_already_zero_without_layerwise() -> None:
    assert not any("prefetch" in m for m in resolve(OffloadFlags(), "sglang").messages)


def test_resolve_raises_naming_the_policy_if_unknown() -> None:
    with pytest.raises(FlagError, match=r"unknown policy 'vllm'"):
        resolve(OffloadFlags(), "vllm")


@pytest.mark.parametrize("name", [None, 3, ["sglang"]])
def test_check_policy_raises_if_not_a_known_string(name: object) -> None:
    with pytest.raises(FlagError, match="unknown policy"):
        check_policy(name, "somewhere")


def test_resolution_as_dict_keeps_requested_effective_and_messages() -> None:
    d = resolve(both_on(), "sglang-legacy").as_dict()
    assert d["policy"] == "sglang-legacy"
    assert d["requested"]["dit_cpu_offload"] is True
    assert d["effective"]["dit_cpu_offload"] is False
    assert d["messages"] == [LEGACY_MESSAGE]


# ------------------------------------------------------------------------------------------------ label


@pytest.mark.parametrize(
    ("flags", "label"),
    [
        (OffloadFlags(), "cpu0-lw0-te0-vae0-pf0-pin1"),
        (both_on(dit_offload_prefetch_size=4.0), "cpu1-lw1-te0-vae0-pf4-pin1"),
        (
            OffloadFlags(text_encoder_cpu_offload=True, vae_cpu_offload=True, pin_cpu_memory=False),
            "cpu0-lw0-te1-vae1-pf0-pin0",
        ),
        (OffloadFlags(dit_layerwise_offload=True, dit_offload_prefetch_size=0.25), "cpu0-lw1-te0-vae0-pf0.25-pin1"),
    ],
)
def test_label_spells_every_flag_if_formatted(flags: OffloadFlags, label: str) -> None:
    assert flags.label() == label


def test_label_differs_if_prefetch_differs() -> None:
    a = OffloadFlags(dit_layerwise_offload=True, dit_offload_prefetch_size=0.1)
    b = OffloadFlags(dit_layerwise_offload=True, dit_offload_prefetch_size=0.1000001)
    assert a.label() != b.label()


# ------------------------------------------------------------------------------------------------ resident layers


@pytest.mark.parametrize("value", [-1, -0.25, math.nan, math.inf, True, "3", None, [2]])
def test_resident_layers_flag_rejects_negative_nan_bool_or_non_number_naming_the_field(value: object) -> None:
    # SGLang: "dit_layerwise_resident_layers must be non-negative" (ServerArgs._validate_offload, ValueError)
    with pytest.raises(FlagError, match="dit_layerwise_resident_layers"):
        OffloadFlags.from_mapping({"dit_layerwise_resident_layers": value})


@pytest.mark.parametrize("value", ["Leading", "interleaved", "", None, 1, True])
def test_residency_policy_flag_rejects_unknown_names_naming_the_field(value: object) -> None:
    # SGLang: "Invalid --dit-layerwise-residency-policy ...; expected one of ('leading', 'strided')"
    with pytest.raises(FlagError, match=r"dit_layerwise_residency_policy.*leading, strided"):
        OffloadFlags.from_mapping({"dit_layerwise_residency_policy": value})


def test_resident_flags_read_from_a_mapping_as_sglang_types() -> None:
    flags = OffloadFlags.from_mapping({"dit_layerwise_resident_layers": 30,
                                       "dit_layerwise_residency_policy": "strided"})
    assert flags.dit_layerwise_resident_layers == 30.0 and isinstance(flags.dit_layerwise_resident_layers, float)
    assert flags.dit_layerwise_residency_policy == "strided"


@pytest.mark.parametrize(
    ("value", "num_layers", "expected"),
    [
        (0, 60, 0),
        (0.25, 60, 15),  # a fraction: max(1, round(v * n)) (layerwise_offload.configure_layerwise_offload)
        (0.5, 60, 30),
        (0.001, 60, 1),  # a tiny fraction still keeps one layer
        (0.625, 4, 2),  # round(2.5) = 2: Python's banker's rounding, as SGLang's
        (1.0, 60, 1),  # 1.0 is a count, not "all": v >= 1 -> int(v)
        (38, 60, 38),
        (99, 60, 60),  # at most the group
        (30.7, 60, 30),  # int() (ServerArgs has floored it already)
    ],
)
def test_resident_layer_count_follows_sglang(value: float, num_layers: int, expected: int) -> None:
    assert resident_layer_count(value, num_layers) == expected


@pytest.mark.parametrize("value", [-1, math.nan, True])
def test_resident_layer_count_raises_if_value_is_invalid(value: object) -> None:
    with pytest.raises(FlagError, match="dit_layerwise_resident_layers"):
        resident_layer_count(value, 60)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_layers", [1, 2, 6, 19, 38, 60])
@pytest.mark.parametrize("policy", ["leading", "strided"])
def test_streamed_layers_partition_the_group_with_the_resident_count(num_layers: int, policy: str) -> None:
    for resident in range(num_layers + 1):
        streamed = streamed_layer_indices(num_layers, resident, policy)
        assert len(streamed) == num_layers - resident
        assert list(streamed) == sorted(set(streamed)) and all(0 <= i < num_layers for i in streamed)
        if policy == "leading":
            assert streamed == tuple(range(resident, num_layers))


def test_strided_streams_layers_spread_evenly_as_sglang() -> None:
    # compute_streamed_layers: round(k * n / (n - r)) for k < n - r
    assert streamed_layer_indices(60, 30, "strided") == tuple(range(0, 60, 2))
    assert streamed_layer_indices(6, 2, "strided") == (0, 2, 3, 4)
    assert streamed_layer_indices(60, 0, "strided") == tuple(range(60))
    with pytest.raises(FlagError, match="dit_layerwise_residency_policy"):
        streamed_layer_indices(60, 1, "trailing")


def test_label_names_resident_layers_and_policy_only_off_their_defaults() -> None:
    base = OffloadFlags(dit_cpu_offload=True, dit_layerwise_offload=True, dit_offload_prefetch_size=1)
    assert base.label() == "cpu1-lw1-te0-vae0-pf1-pin1"  # ids of records from before the flags stay
    assert replace(base, dit_layerwise_resident_layers=30).label() == "cpu1-lw1-te0-vae0-pf1-pin1-res30"
    assert replace(base, dit_layerwise_resident_layers=0.25, dit_layerwise_residency_policy="strided").label() \
        == "cpu1-lw1-te0-vae0-pf1-pin1-res0.25-strided"


@pytest.mark.parametrize(("value", "floored"), [(30.7, 30.0), (1.5, 1.0)])
def test_resident_layers_are_floored_with_sglangs_message_if_non_integer_above_one(value: float,
                                                                                   floored: float) -> None:
    flags = OffloadFlags(dit_cpu_offload=True, dit_layerwise_offload=True, dit_layerwise_resident_layers=value)
    r = resolve(flags, "sglang")
    assert r.effective.dit_layerwise_resident_layers == floored
    assert f"Invalid --dit-layerwise-resident-layers value passed, truncated to: {int(floored)}" in r.messages


@pytest.mark.parametrize("value", [0.25, 0.5, 1.0, 38.0])
def test_resident_layers_are_kept_if_fraction_or_integer(value: float) -> None:
    flags = OffloadFlags(dit_cpu_offload=True, dit_layerwise_offload=True, dit_layerwise_resident_layers=value)
    assert resolve(flags, "sglang").effective.dit_layerwise_resident_layers == value


def test_resident_layers_and_policy_are_recorded_as_defaults_without_layerwise() -> None:
    flags = OffloadFlags(dit_cpu_offload=True, dit_layerwise_resident_layers=30,
                         dit_layerwise_residency_policy="strided")
    r = resolve(flags, "sglang")
    assert (r.effective.dit_layerwise_resident_layers, r.effective.dit_layerwise_residency_policy) == (0.0, "leading")
    assert any("resident-layers has no effect" in m for m in r.messages)
    assert any("residency-policy has no effect" in m for m in r.messages)


def test_strided_without_resident_layers_is_the_leading_run() -> None:
    flags = OffloadFlags(dit_cpu_offload=True, dit_layerwise_offload=True, dit_layerwise_residency_policy="strided")
    r = resolve(flags, "sglang")
    assert r.effective == replace(flags, dit_layerwise_residency_policy="leading")
    assert any("--dit-layerwise-resident-layers is 0" in m for m in r.messages)


@pytest.mark.parametrize("policy", ["sglang-legacy", "sglang-pre18997"])
@pytest.mark.parametrize("change", [{"dit_layerwise_resident_layers": 4.0},
                                    {"dit_layerwise_residency_policy": "strided"}])
def test_eras_before_resident_layers_refuse_them(policy: str, change: dict[str, object]) -> None:
    flags = replace(OffloadFlags(dit_cpu_offload=True, dit_layerwise_offload=True), **change)  # type: ignore[arg-type]
    with pytest.raises(FlagError, match="#31538"):
        resolve(flags, policy)
