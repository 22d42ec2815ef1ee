"""SGLang's own offload unit tests, re-expressed against our hand-written `sglang` model (no SGLang needed).

Each test names the case of `python/sglang/multimodal_gen/test/unit/test_server_args.py` it ports (0.5.13, and
0.5.23 where marked). SGLang builds ServerArgs on a mocked CUDA platform; here the same inputs go through
`harness.policy.resolve` with an `EngineContext` (card GiB, task, family, performance mode), and the expected values
are 0.5.23's (our `sglang` model). What our model cannot express (exact component names, a Wan2.2 family) asserts
the clear refusal or is a strict expected failure naming what it needs.
"""

from __future__ import annotations

import pytest

from harness.common.flags import FlagError, OffloadFlags
from harness.models.standin import zoo_source
from harness.policy import EngineContext, resolve

U = None  # unset: SGLang's None, the engine's defaults decide

def flags(cpu: bool | None = U, lw: bool | None = U, te: bool | None = U, vae: bool | None = U, pf: float = 0.0,
          pin: bool | None = U) -> OffloadFlags:
    return OffloadFlags(dit_cpu_offload=cpu, dit_layerwise_offload=lw, text_encoder_cpu_offload=te,
                        vae_cpu_offload=vae, dit_offload_prefetch_size=pf, pin_cpu_memory=pin)


def ctx(family: str = "qwen-image", memory: float = 80.0, mode: str | None = None) -> EngineContext:
    task = {"qwen-image": "T2I", "qwen-image-edit": "I2I", "flux": "T2I", "wan": "T2V"}[family]
    return EngineContext(memory_gib=memory, task=task, family=family, performance_mode=mode)


# ------------------------------------------------------------------ expressible: our model must answer as SGLang


def test_dit_layerwise_offload_preserves_dit_cpu_offload() -> None:
    """0.5.13 TestOffloadDefaults.test_dit_layerwise_offload_preserves_dit_cpu_offload (#26925): T2I at 32 GB."""
    r = resolve(flags(cpu=True, lw=True), "sglang", EngineContext(32, "T2I", "qwen-image"))
    assert r.effective.dit_cpu_offload and r.effective.dit_layerwise_offload
    assert r.engine is not None and r.engine.layerwise_components == ("dit",)


def test_legacy_layerwise_wins_over_component_offload() -> None:
    """0.5.23 test_legacy_layerwise_wins_over_component_offload: both DiT flags kept, the DiT's mode is layerwise."""
    r = resolve(flags(cpu=True, lw=True), "sglang", EngineContext(32, "T2I", "qwen-image"))
    assert r.effective.dit_cpu_offload and r.effective.dit_layerwise_offload
    assert r.engine is not None and r.engine.dit_residency == "layerwise-offload"
    assert r.engine.layerwise_components == ("dit",)


def test_explicit_fastwan_dit_layerwise_still_selects_dit_group() -> None:
    """0.5.13 test_explicit_fastwan_dit_layerwise_still_selects_dit_group: only --dit-layerwise-offload on a Wan."""
    r = resolve(flags(lw=True), "sglang", ctx("wan"))
    assert r.effective.dit_cpu_offload is True  # _adjust_offload's default, kept alongside layerwise
    assert r.engine is not None and r.engine.layerwise_components == ("dit",)


def test_explicit_dit_layerwise_default_keeps_text_encoder_cpu_offload() -> None:
    """0.5.13 test_explicit_multi_gpu_dit_layerwise_only_selects_dit_group, on one GPU: the legacy DiT selector adds
    no default layerwise group, so the text encoder keeps its CPU offload default."""
    r = resolve(flags(lw=True), "sglang", ctx("qwen-image-edit", 31.36))
    assert r.effective.text_encoder_cpu_offload is True and r.effective.vae_cpu_offload is False
    assert r.engine is not None and r.engine.layerwise_components == ("dit",)


def test_invalid_performance_mode_raises() -> None:
    """0.5.13 test_invalid_performance_mode_raises: a mode SGLang does not know is an error here too."""
    with pytest.raises(FlagError, match=r"performance_mode: expected one of .*'fast'"):
        resolve(flags(cpu=True, lw=False, te=False, vae=False), "sglang", ctx(mode="fast"))


# ------------------------------------------------------------------ memory defaults, modes and selectors

LW, CO, RES = "layerwise-offload", "component-offload", "resident"


@pytest.mark.parametrize(
    ("sglang_test", "requested", "context", "residency", "components"),
    [
        # (DiT, text encoder, VAE) residency and SGLang's final layerwise list, as 0.5.23 answers
        ("test_vae_cpu_offload_defaults_false_for_video_generation", flags(), ctx("wan"),
         (RES, LW, LW), ("text_encoder", "image_encoder", "vae")),
        ("test_vae_cpu_offload_defaults_false_on_low_memory_gpu", flags(), ctx("wan", 16, "memory"),
         (LW, LW, LW), ("dit", "text_encoder", "image_encoder", "vae")),
        ("test_explicit_vae_cpu_offload_true_is_preserved_by_default_layerwise", flags(vae=True), ctx("wan"),
         (RES, LW, CO), ("text_encoder", "image_encoder")),
        ("test_explicit_component_resident_is_preserved_by_default_layerwise", flags(cpu=True, te=False),
         ctx("wan"), (CO, RES, LW), ("image_encoder", "vae")),
        ("test_default_auto_replaces_text_encoder_cpu_offload_with_layerwise", flags(), ctx("qwen-image"),
         (RES, LW, RES), ("text_encoder", "image_encoder")),
        ("test_auto_wan2_1_14b_layerwise_offload_uses_non_dit_default", flags(), ctx("wan"),
         (RES, LW, LW), ("text_encoder", "image_encoder", "vae")),
        ("test_auto_wan_layerwise_offload_preserves_explicit_dit_cpu_offload", flags(cpu=True), ctx("wan"),
         (CO, LW, LW), ("text_encoder", "image_encoder", "vae")),
        ("test_manual_mode_preserves_unset_performance_args", flags(), ctx(mode="manual"), (RES, RES, RES), ()),
        ("test_speed_mode_single_gpu_disables_offload", flags(), ctx(mode="speed"), (RES, RES, RES), ()),
        ("test_speed_mode_preserves_explicit_offload", flags(cpu=True, lw=False, te=True, vae=False),
         ctx(mode="speed"), (CO, CO, RES), ()),
        ("test_memory_mode_wan_uses_layerwise_offload", flags(), ctx("wan", mode="memory"),
         (LW, LW, LW), ("dit", "text_encoder", "image_encoder", "vae")),
        ("test_dit_layerwise_offload_selects_dit_group", flags(lw=True), ctx(mode="manual"), (LW, RES, RES),
         ("dit",)),
        ("test_dit_layerwise_offload_cli_arg (`--dit-layerwise-offload true`)", flags(lw=True), ctx(mode="manual"),
         (LW, RES, RES), ("dit",)),
        ("0.5.23 test_explicit_false_layerwise_keeps_dit_resident", flags(lw=False, te=True, vae=False),
         ctx("qwen-image"), (RES, CO, RES), ("image_encoder",)),
        ("0.5.23 test_explicit_layerwise_takes_precedence_over_legacy_cpu_offload", flags(cpu=True, lw=True),
         ctx(mode="manual"), (LW, RES, RES), ("dit",)),
    ],
)
def test_sglang_case_answers_as_the_release(sglang_test: str, requested: OffloadFlags, context: EngineContext,
                                            residency: tuple[str, str, str], components: tuple[str, ...]) -> None:
    r = resolve(requested, "sglang", context)
    assert r.engine is not None and r.engine.residency is not None
    assert tuple(r.engine.residency[c] for c in ("dit", "text_encoder", "vae")) == residency
    assert r.engine.layerwise_components == components


# ------------------------------------------------------------------ 0.5.23's auto sizing, with the zoo's stand-ins
# SGLang mocks the sizes (dit_parameter_count, checkpoint_component_sizes); here they are what the release reads
# from the zoo's sized stand-in (`harness.models.standin`), the context's checkpoint. tests/test_standin_engine.py
# asks the release itself with the same stand-ins.


def _wan(gib: float, checkpoint: bool = True) -> EngineContext:
    return EngineContext(gib, "T2V", "wan", checkpoint=zoo_source("wan2.1-t2v-14b") if checkpoint else None)


def _roles(flags: OffloadFlags, context: EngineContext) -> tuple[str, str, str]:
    """(DiT, text encoder, VAE) residency as our model resolves them."""
    r = resolve(flags, "sglang", context)
    assert r.engine is not None and r.engine.residency is not None
    return r.engine.residency["dit"], r.engine.residency["text_encoder"], r.engine.residency["vae"]


@pytest.mark.parametrize("gib", [16.0, 24.0, 31.36, 32.0])
def test_model_streams_the_wan_14b_dit_that_overflows_the_card(gib: float) -> None:
    """0.5.23 test_auto_wan2_1_14b_streams_a_dit_that_overflows_the_card, with the DiT sized from the zoo's
    stand-in (14.29 B parameters, 26.6 GiB in BF16 > 80 % of the card) instead of a mocked count."""
    r = resolve(flags(), "sglang", _wan(gib))
    assert r.engine is not None and r.engine.dit_residency == LW and r.engine.layerwise_components[0] == "dit"
    assert any("the DiT needs 26.6 GiB" in m for m in r.messages)
    assert _roles(flags(), _wan(gib, checkpoint=False))[0] == CO  # no checkpoint: the declared placement


def test_model_keeps_a_wan_dit_that_fits_and_an_explicit_placement() -> None:
    assert _roles(flags(), _wan(48.0))[0] == CO  # 26.6 GiB within 80 % of 48: the declared component offload
    assert _roles(flags(cpu=True, lw=False), _wan(24.0))[0] == CO  # explicit placement wins


@pytest.mark.parametrize(("family", "model", "gib", "all_resident"), [
    ("qwen-image", "qwen-image", 141.0, True), ("qwen-image", "qwen-image", 80.0, False),
    ("flux", "flux-dev", 80.0, True), ("flux", "flux-dev", 141.0, True), ("flux", "flux-dev", 48.0, False),
    ("wan", "wan2.1-t2v-14b", 141.0, True), ("wan", "wan2.1-t2v-14b", 80.0, False),
])
def test_model_keeps_everything_resident_on_memory_rich_cards(family: str, model: str, gib: float,
                                                              all_resident: bool) -> None:
    """_fits_all_components_resident: every weight twice over, in the precision each loads in (Wan's UMT5 and VAE
    in FP32: 48.3 GiB, so 141 GiB but not 80; FLUX 31.4 GiB; Qwen-Image 51.5 GiB)."""
    task = "T2V" if family == "wan" else "T2I"
    context = EngineContext(gib, task, family, checkpoint=zoo_source(model))
    r = resolve(flags(), "sglang", context)
    assert r.engine is not None
    assert (_roles(flags(), context) == (RES, RES, RES) and r.engine.layerwise_components == ()) is all_resident
    assert not r.effective.dit_cpu_offload or not all_resident


def test_layerwise_offload_components_imply_layerwise() -> None:
    """0.5.13 test_layerwise_offload_components_imply_layerwise: a selected group streams."""
    f = OffloadFlags(dit_cpu_offload=True, dit_layerwise_offload=False, text_encoder_cpu_offload=True,
                     vae_cpu_offload=False, layerwise_offload_components=("text_encoder",))
    r = resolve(f, "sglang", ctx())
    assert r.engine is not None and r.engine.residency is not None
    assert r.engine.residency["text_encoder"] == LW and r.effective.text_encoder_cpu_offload is False


def test_layerwise_offload_components_normalize_default_group() -> None:
    """0.5.13 test_layerwise_offload_components_normalize_default_group."""
    f = OffloadFlags.from_mapping({"layerwise_offload_components": "default"})
    assert f.layerwise_offload_components == ("text_encoder", "image_encoder", "vae")


def test_layerwise_components_disable_matching_non_dit_cpu_offloads() -> None:
    """0.5.13 test_layerwise_components_disable_matching_non_dit_cpu_offloads (#26925: the DiT's flag stays)."""
    f = OffloadFlags(dit_cpu_offload=True, dit_layerwise_offload=True, text_encoder_cpu_offload=True,
                     vae_cpu_offload=True, layerwise_offload_components=("text_encoder", "image_encoder", "vae"))
    e = resolve(f, "sglang", ctx()).effective
    assert (e.dit_cpu_offload, e.text_encoder_cpu_offload, e.vae_cpu_offload) == (True, False, False)
    assert e.layerwise_offload_components == ("text_encoder", "vae")


def test_layerwise_offload_components_normalize_commas_refuses_exact_component_names() -> None:
    """0.5.13 test_layerwise_offload_components_normalize_commas passes "text-encoder,transformer": SGLang takes a
    pipeline's exact component names too; ours takes the groups only and says so."""
    with pytest.raises(FlagError, match="unknown component group 'transformer'"):
        OffloadFlags.from_mapping({"layerwise_offload_components": "text-encoder,transformer"})


@pytest.mark.xfail(strict=True, raises=FlagError, reason="needs a Wan2.2-A14B family (auto DiT layerwise, prefetch 2)")
def test_auto_wan2_2_a14b_layerwise_offload_adds_dit() -> None:
    """0.5.13 test_auto_wan2_2_a14b_layerwise_offload_adds_dit: the zoo's Wan is Wan2.1 (no "auto" DiT mode)."""
    raise FlagError("no Wan2.2-A14B family in the zoo")
