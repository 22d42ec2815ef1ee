"""SGLang 0.5.23's own ServerArgs, asked through our child with a checkpoint on disk (#29): the zoo's sized
stand-ins and a folder model's folder, in the child's Hugging Face cache under the family's Hub id. One child
answers every request here; our model of 0.5.23 (policy "sglang") must answer each the same.

Needs the release installed (`python -m harness.engine.install 0.5.23`); `OFFLOAD_BENCH_SGLANG=0` skips it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.common.flags import OffloadFlags
from harness.engine.policy import EngineError, available_versions
from harness.models.standin import checkpoint_source, zoo_source
from harness.policy import EngineContext
from harness.policy.differential import GridInput, Outcome, run_version

VERSION = "0.5.23"
U = None
UNSET = OffloadFlags(U, U, U, U)
LW, CO, RES = "layerwise-offload", "component-offload", "resident"
MODELS = {"wan": ("wan2.1-t2v-14b", "T2V"), "flux": ("flux-dev", "T2I"), "qwen-image": ("qwen-image", "T2I")}
CARDS = (16.0, 24.0, 32.0, 48.0, 80.0, 141.0)

pytestmark = [
    pytest.mark.slow,  # the release's child (10-60 s to import SGLang) and three stand-ins written (make test-e2e)
    pytest.mark.skipif(os.environ.get("OFFLOAD_BENCH_SGLANG", "1") == "0",
                       reason="OFFLOAD_BENCH_SGLANG=0: the SGLang install is turned off"),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.pipeline_folders import write_pipeline_folder

    return write_pipeline_folder(tmp_path_factory.mktemp("byo") / "wan-tiny", "wan-tiny")


@pytest.fixture(scope="module")
def answers(folder: Path) -> dict[tuple[str, float, str], Outcome]:
    """(family, card GiB, "none" | "zoo" | "folder") -> the release's answer and our model's, for unset flags."""
    if VERSION not in available_versions():
        pytest.fail(f"sglang {VERSION} is not installed: run `python -m harness.engine.install {VERSION}` (or set "
                    "OFFLOAD_BENCH_SGLANG=0 to skip the engine tests)")
    keys, items = [], []
    for family, (model, task) in MODELS.items():
        for gib in CARDS:
            for kind, source in (("none", None), ("zoo", zoo_source(model))):
                keys.append((family, gib, kind))
                items.append(GridInput(UNSET, EngineContext(gib, task, family, checkpoint=source)))
    for gib in (16.0, 80.0):
        keys.append(("wan", gib, "folder"))
        items.append(GridInput(UNSET, EngineContext(gib, "T2V", "wan", checkpoint=checkpoint_source(str(folder)))))
    try:
        return dict(zip(keys, run_version(VERSION, items), strict=True))
    except EngineError as e:
        pytest.fail(str(e))


def _roles(o: Outcome) -> tuple[str, str, str]:
    residency = o.engine.extra["residency"]
    return residency["dit"], residency["text_encoder"], residency["vae"]


@pytest.mark.parametrize("gib", [16.0, 24.0, 32.0])
def test_auto_wan2_1_14b_streams_a_dit_that_overflows_the_card(answers: dict, gib: float) -> None:
    """0.5.23 test_server_args.py TestOffloadDefaults.test_auto_wan2_1_14b_streams_a_dit_that_overflows_the_card
    ("With no placement flags, a Wan2.1 14B DiT OOMed on 24 GB cards"), through our child: SGLang mocks
    `dit_parameter_count` at 16 B; here the release counts the stand-in's 14.29 B from its headers."""
    o = answers[("wan", gib, "zoo")]
    assert o.engine.dit_residency == LW and o.engine.layerwise_components[0] == "dit"
    assert o.engine.extra["checkpoint_read"]["dit_parameter_count"] == 14_288_491_584
    assert o.engine.checkpoint.startswith("zoo sized stand-in wan2.1-t2v-14b@")
    assert answers[("wan", gib, "none")].engine.dit_residency == CO  # without files: the declared placement


def test_a_wan_dit_within_80_percent_of_the_card_keeps_its_placement(answers: dict) -> None:
    assert answers[("wan", 48.0, "zoo")].engine.dit_residency == CO


@pytest.mark.parametrize(("family", "gib"), [("qwen-image", 141.0), ("flux", 80.0), ("flux", 141.0),
                                             ("wan", 141.0)])
def test_memory_rich_cards_keep_everything_resident(answers: dict, family: str, gib: float) -> None:
    """_fits_all_components_resident: the card holds every weight twice over."""
    o = answers[(family, gib, "zoo")]
    assert _roles(o) == (RES, RES, RES) and o.engine.layerwise_components == ()
    assert _roles(answers[(family, gib, "none")]) != (RES, RES, RES)  # without files the declared policy streams
    assert any("stays resident" in m for m in o.engine.messages)


@pytest.mark.parametrize(("family", "gib"), [("qwen-image", 80.0), ("wan", 80.0), ("flux", 48.0)])
def test_cards_short_of_twice_the_weights_keep_the_declared_policy(answers: dict, family: str, gib: float) -> None:
    assert _roles(answers[(family, gib, "zoo")]) == _roles(answers[(family, gib, "none")]) != (RES, RES, RES)


def test_a_folder_models_resolution_reads_its_folder(answers: dict, folder: Path) -> None:
    """The tiny folder (8.7 MB in F32) fits any card twice over: everything resident, sized from its files."""
    o = answers[("wan", 16.0, "folder")]
    assert o.engine.checkpoint == f"folder {folder.resolve()}"
    read = o.engine.extra["checkpoint_read"]["checkpoint_component_sizes"]
    source = checkpoint_source(str(folder))
    assert source is not None and read == {k: list(v) for k, v in (source.component_sizes() or {}).items()}
    assert o.engine.checkpoint_bytes == source.total_bytes
    assert _roles(o) == (RES, RES, RES) and _roles(answers[("wan", 16.0, "none")]) == (CO, LW, LW)


def test_our_model_answers_each_as_the_release(answers: dict) -> None:
    wrong = {k: o.diffs for k, o in answers.items() if o.kind != "agree"}
    assert not wrong, wrong
