"""Policy `sglang` (our model of SGLang 0.5.23): what unset flags become on each card and task, per performance mode.

Every expected value is traced to the SGLang 0.5.23 rule it reproduces (runtime/server_args/server_args.py and
auto_tune.py; §2.3 of shared/reference/sglang-offload-semantics.md). The differential grid
(tests/test_engine_differential.py) checks the same model against the release itself.
"""

from __future__ import annotations

import pytest

from harness.common.flags import FlagError, OffloadFlags
from harness.policy import FAMILY_TASKS, EngineContext, resolve

CARDS = (16.0, 24.0, 31.36, 48.0, 80.0, 141.0)
ALL_UNSET = OffloadFlags(dit_cpu_offload=None, dit_layerwise_offload=None, text_encoder_cpu_offload=None,
                         vae_cpu_offload=None)
LW, CO, RES = "layerwise-offload", "component-offload", "resident"


def resolved(family: str, gib: float, mode: str | None = None, flags: OffloadFlags = ALL_UNSET) -> tuple:
    r = resolve(flags, "sglang", EngineContext(gib, FAMILY_TASKS[family], family, mode))
    assert r.engine is not None and r.engine.residency is not None
    return r.engine.residency["dit"], r.engine.residency["text_encoder"], r.engine.residency["vae"], \
        r.engine.layerwise_components


# (family, card GiB) -> (DiT, text encoder, VAE residency, layerwise list), auto mode, every switch unset.
AUTO = {
    # image (Qwen-Image T2I), below 30 GiB: _adjust_offload's low-memory row offloads DiT, text encoder and image
    # encoder; maybe_adjust_auto_default_layerwise_offload then selects the default group (te, ie, vae: none set
    # explicitly) and _adjust_layerwise_offload_components clears the te flag it covers; the DiT keeps
    # dit_cpu_offload (not a layerwise group member since #26925)
    ("qwen-image", 16.0): (CO, LW, LW, ("text_encoder", "image_encoder", "vae")),
    ("qwen-image", 24.0): (CO, LW, LW, ("text_encoder", "image_encoder", "vae")),
    # 30 .. 45 GiB: the image-generation row (DiT, te offloaded; ie not), same default group below the image
    # keep-resident threshold (IMAGE_GEN_KEEP_RESIDENT_MIN_AVAILABLE_GB = 45)
    ("qwen-image", 31.36): (CO, LW, LW, ("text_encoder", "image_encoder", "vae")),
    # from 45 GiB free: _filter_high_memory_resident_components keeps the model's keep_resident_components
    # ("vae") out of the default group, and maybe_adjust_auto_component_residency_after_offload clears the
    # implicit dit_cpu_offload ("dit" is added for image generation): DiT and VAE resident
    ("qwen-image", 48.0): (RES, LW, RES, ("text_encoder", "image_encoder")),
    ("qwen-image", 80.0): (RES, LW, RES, ("text_encoder", "image_encoder")),
    ("qwen-image", 141.0): (RES, LW, RES, ("text_encoder", "image_encoder")),
    # video (Wan2.1 T2V): the low-memory row below 30 GiB and the video row above offload the same three; Wan
    # declares keep_resident_min_available_gb = 60 with ("dit",), so below 60 GiB everything default streams
    # and the DiT is CPU-offloaded (its dit_layerwise_offload_modes lists only "memory": no auto DiT layerwise)
    ("wan", 16.0): (CO, LW, LW, ("text_encoder", "image_encoder", "vae")),
    ("wan", 24.0): (CO, LW, LW, ("text_encoder", "image_encoder", "vae")),
    ("wan", 31.36): (CO, LW, LW, ("text_encoder", "image_encoder", "vae")),
    ("wan", 48.0): (CO, LW, LW, ("text_encoder", "image_encoder", "vae")),
    # from 60 GiB: the DiT (Wan's keep-resident component) loses its implicit CPU offload; the VAE is not in
    # Wan's list and a video task adds nothing, so it still streams
    ("wan", 80.0): (RES, LW, LW, ("text_encoder", "image_encoder", "vae")),
    ("wan", 141.0): (RES, LW, LW, ("text_encoder", "image_encoder", "vae")),
}


@pytest.mark.parametrize(("family", "gib"), list(AUTO))
def test_auto_mode_defaults_follow_card_memory_and_task(family: str, gib: float) -> None:
    assert resolved(family, gib) == AUTO[(family, gib)]


@pytest.mark.parametrize("gib", CARDS)
@pytest.mark.parametrize("family", ["qwen-image", "wan"])
def test_speed_mode_keeps_every_unset_component_resident(family: str, gib: float) -> None:
    # _set_gpu_resident_defaults: unset DiT, DiT-layerwise, te and ie flags become False before any memory rule
    # runs; _adjust_offload then finds nothing unset and nothing is implicitly offloaded to replace with layerwise
    assert resolved(family, gib, "speed") == (RES, RES, RES, ())


@pytest.mark.parametrize("gib", CARDS)
@pytest.mark.parametrize("family", ["qwen-image", "wan"])
def test_manual_mode_leaves_unset_flags_off(family: str, gib: float) -> None:
    # could_override_server_args() is False in manual: no default, no finalisation; an unset flag stays None,
    # which the runtime reads as off, so everything is resident
    assert resolved(family, gib, "manual") == (RES, RES, RES, ())


@pytest.mark.parametrize("gib", CARDS)
def test_memory_mode_streams_the_default_group_and_the_dit_where_the_model_lists_memory(gib: float) -> None:
    # _set_layerwise_offload_defaults: the default group (no keep-resident filter outside auto) and
    # dit_cpu_offload on; Wan lists "memory" in dit_layerwise_offload_modes, so its DiT streams too, Qwen-Image's
    # does not (it stays CPU-offloaded whatever the card)
    assert resolved("qwen-image", gib, "memory") == (CO, LW, LW, ("text_encoder", "image_encoder", "vae"))
    assert resolved("wan", gib, "memory") == (LW, LW, LW, ("dit", "text_encoder", "image_encoder", "vae"))


@pytest.mark.parametrize("gib", CARDS)
def test_explicit_flags_keep_their_components_out_of_the_default_group(gib: float) -> None:
    # explicit_residency_mode: a *_cpu_offload passed explicitly (true or false) places that component, so
    # _default_layerwise_components_for_unset_placement leaves it out, on every card
    flags = OffloadFlags(dit_cpu_offload=True, dit_layerwise_offload=None, text_encoder_cpu_offload=True,
                         vae_cpu_offload=False)
    dit, te, vae, comps = resolved("qwen-image", gib, flags=flags)
    assert (dit, te, vae) == (CO, CO, RES)
    assert "text_encoder" not in comps and "vae" not in comps


def test_dit_layerwise_offload_adds_dit_and_a_selection_clears_its_components_cpu_offload() -> None:
    # _adjust_layerwise_offload_components: --dit-layerwise-offload puts "dit" first; a selected group's
    # CPU-offload flag is cleared (te here), the DiT's is kept (#26925)
    flags = OffloadFlags(dit_cpu_offload=True, dit_layerwise_offload=True, text_encoder_cpu_offload=True,
                         layerwise_offload_components=("text_encoder",))
    r = resolve(flags, "sglang")
    assert r.engine is not None and r.engine.layerwise_components == ("dit", "text_encoder")
    assert r.effective.layerwise_offload_components == ("text_encoder",)  # what streams beyond the DiT
    assert (r.effective.dit_cpu_offload, r.effective.text_encoder_cpu_offload) == (True, False)
    assert any("Ignoring component-offload flags" in m and "text_encoder_cpu_offload" in m for m in r.messages)


def test_all_streams_the_dit_without_dit_layerwise_offload() -> None:
    # residency_mode: an explicit "all" selects the DiT too; "all" is the whole normalised list
    r = resolve(OffloadFlags(dit_cpu_offload=True, layerwise_offload_components=("all",)), "sglang")
    assert r.engine is not None and r.engine.layerwise_components == ("all",)
    assert r.effective.dit_layerwise_offload and r.effective.layerwise_offload_components == ("text_encoder", "vae")
    assert r.engine is not None and r.engine.residency == {"dit": LW, "text_encoder": LW, "vae": LW}


def test_default_group_is_text_encoder_image_encoder_vae() -> None:
    flags = OffloadFlags.from_mapping({"layerwise_offload_components": "default"})
    assert flags.layerwise_offload_components == ("text_encoder", "image_encoder", "vae")


def test_explicit_empty_selection_adds_nothing_in_auto() -> None:
    # an explicitly passed (empty) --layerwise-offload-components stops the auto default group and the
    # CPU-offload replacement (both only fill an unset list); the text encoder stays CPU-offloaded
    flags = OffloadFlags(dit_cpu_offload=None, dit_layerwise_offload=None, text_encoder_cpu_offload=None,
                         layerwise_offload_components=())
    assert resolved("qwen-image", 24.0, flags=flags) == (CO, CO, RES, ())


def test_explicit_dit_layerwise_false_keeps_the_dit_resident() -> None:
    # the 0.5.23 rule in _adjust_layerwise_offload_components: --dit-layerwise-offload false with no explicit DiT
    # offload clears dit_cpu_offload (which auto had turned on)
    flags = OffloadFlags(dit_cpu_offload=None, dit_layerwise_offload=False, text_encoder_cpu_offload=True)
    assert resolved("qwen-image", 24.0, flags=flags)[0] == RES


def test_unknown_performance_mode_is_refused_naming_the_field() -> None:
    with pytest.raises(FlagError, match="performance_mode"):
        resolved("qwen-image", 24.0, "fast")
