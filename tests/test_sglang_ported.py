"""SGLang's own offload unit tests, re-expressed against our hand-written `sglang` model (no SGLang needed).

Each test names the case of `python/sglang/multimodal_gen/test/unit/test_server_args.py` it ports (0.5.13, and
0.5.23 where marked). SGLang builds ServerArgs on a mocked CUDA platform; here the same inputs go through
`harness.flags.resolve` with an `EngineContext` (card GiB, task, family). Cases whose inputs our model cannot
express (component selectors, performance modes other than auto, multi-GPU, text encoder / VAE layerwise) either
assert the clear refusal or are strict expected failures naming the feature they need.
"""

from __future__ import annotations

import pytest

from harness.flags import EngineContext, FlagError, OffloadFlags, resolve

U = None  # unset: SGLang's None, the engine's defaults decide

LW_SELECTOR = "needs layerwise_offload_components (our model selects the DiT only, by dit_layerwise_offload)"


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
    with pytest.raises(FlagError, match="performance_mode=fast"):
        resolve(flags(cpu=True, lw=False, te=False, vae=False), "sglang", ctx(mode="fast"))


# ------------------------------------------------------------------ inexpressible: our model must refuse clearly


@pytest.mark.parametrize(
    ("sglang_test", "requested", "context", "needs"),
    [
        ("test_vae_cpu_offload_defaults_false_for_video_generation", flags(), ctx("wan"), "text encoder layerwise"),
        ("test_vae_cpu_offload_defaults_false_on_low_memory_gpu", flags(), ctx("wan", 16, "memory"),
         "performance_mode=memory"),
        ("test_explicit_vae_cpu_offload_true_is_preserved_by_default_layerwise", flags(vae=True), ctx("wan"),
         "text encoder layerwise"),
        ("test_explicit_component_resident_is_preserved_by_default_layerwise", flags(cpu=True, te=False),
         ctx("wan"), "VAE layerwise"),
        ("test_default_auto_replaces_text_encoder_cpu_offload_with_layerwise", flags(), ctx("qwen-image"),
         "text encoder layerwise"),
        ("test_auto_wan_layerwise_offload_is_enabled_without_fsdp", flags(), ctx("wan"), "text encoder layerwise"),
        ("test_auto_wan2_1_14b_layerwise_offload_uses_non_dit_default", flags(), ctx("wan"),
         "text encoder layerwise"),
        ("test_auto_wan_layerwise_offload_preserves_explicit_dit_cpu_offload", flags(cpu=True), ctx("wan"),
         "text encoder layerwise"),
        ("test_manual_mode_preserves_unset_performance_args", flags(), ctx(mode="manual"), "performance_mode=manual"),
        ("test_speed_mode_single_gpu_disables_offload", flags(), ctx(mode="speed"), "performance_mode=speed"),
        ("test_speed_mode_preserves_explicit_offload", flags(cpu=True, lw=False, te=True, vae=False),
         ctx(mode="speed"), "performance_mode=speed"),
        ("test_memory_mode_wan_uses_layerwise_offload", flags(), ctx("wan", mode="memory"),
         "performance_mode=memory"),
        ("test_dit_layerwise_offload_selects_dit_group", flags(lw=True), ctx(mode="manual"),
         "performance_mode=manual"),
        ("test_dit_layerwise_offload_from_kwargs", flags(lw=True), ctx(mode="manual"), "performance_mode=manual"),
        ("0.5.23 test_explicit_false_layerwise_keeps_dit_resident", flags(lw=False, te=True, vae=False),
         ctx("qwen-image"), "dit_cpu_offload set"),
        ("0.5.23 test_explicit_layerwise_takes_precedence_over_legacy_cpu_offload", flags(cpu=True, lw=True),
         ctx(mode="manual"), "performance_mode=manual"),
    ],
)
def test_inexpressible_sglang_case_is_refused_clearly(sglang_test: str, requested: OffloadFlags,
                                                      context: EngineContext, needs: str) -> None:
    with pytest.raises(FlagError, match=f"needs {needs}"):
        resolve(requested, "sglang", context)


# ------------------------------------------------------------------ features our model does not have


def _needs_components() -> None:
    raise FlagError("our model has no layerwise_offload_components input")


@pytest.mark.xfail(strict=True, raises=FlagError, reason=LW_SELECTOR)
@pytest.mark.parametrize(
    "sglang_test",
    [
        "test_layerwise_offload_components_imply_layerwise",
        "test_layerwise_offload_components_normalize_commas",
        "test_layerwise_offload_components_normalize_default_group",
        "test_layerwise_offload_components_cli_args",
        "test_layerwise_components_disable_matching_non_dit_cpu_offloads",
    ],
)
def test_component_selector_case(sglang_test: str) -> None:
    _needs_components()


@pytest.mark.xfail(strict=True, raises=FlagError, reason="needs the SGLang CLI (StoreBoolean `--dit-layerwise-offload "
                   "true`) and performance_mode=manual")
def test_dit_layerwise_offload_cli_arg() -> None:
    """0.5.13 test_dit_layerwise_offload_cli_arg."""
    resolve(flags(lw=True), "sglang", ctx(mode="manual"))


@pytest.mark.xfail(strict=True, raises=FlagError, reason="needs a Wan2.2-A14B family (auto DiT layerwise, prefetch 2)")
def test_auto_wan2_2_a14b_layerwise_offload_adds_dit() -> None:
    """0.5.13 test_auto_wan2_2_a14b_layerwise_offload_adds_dit: the zoo's Wan is Wan2.1."""
    r = resolve(flags(), "sglang", ctx("wan"))
    assert r.engine is not None and r.engine.layerwise_components[0] == "dit"
