"""Our hand-written SGLang policies against the real ServerArgs of released SGLang versions (the full grid).

Needs the releases installed (`python -m harness.engine.install 0.5.8 0.5.13 0.5.23`). A missing release fails
the test; `OFFLOAD_BENCH_SGLANG=0` turns the engine off and skips it, with the reason. One child per release
answers the whole grid (`harness.policy.differential`).
"""

from __future__ import annotations

import os

import pytest

from harness.engine.policy import EngineError, available_versions
from harness.policy import MODEL_FOR_VERSION
from harness.policy.differential import (
    MODERN_VERSION,
    as_rows,
    changed_by_checkpoint,
    grid_inputs,
    modern_inputs,
    run_version,
    summary,
    with_standins,
)

VERSIONS = ("0.5.8", "0.5.13", "0.5.23")
ENGINE_OFF = os.environ.get("OFFLOAD_BENCH_SGLANG", "1") == "0"


@pytest.fixture(scope="module")
def grid() -> list:
    return grid_inputs()


@pytest.mark.slow  # one child per release answers ~29,000 inputs: minutes (make test-e2e)
@pytest.mark.skipif(ENGINE_OFF, reason="OFFLOAD_BENCH_SGLANG=0: the SGLang install is turned off")
@pytest.mark.parametrize("standins", [False, True], ids=["no-checkpoint", "stand-ins"])
@pytest.mark.parametrize("version", VERSIONS)
def test_model_agrees_with_release_on_every_expressible_input(version: str, standins: bool, grid: list) -> None:
    """Without a checkpoint on disk and with each family's zoo sized stand-in (whose sizes 0.5.23's auto policy
    reads, and our model with it)."""
    if version not in available_versions():
        pytest.fail(f"sglang {version} is not installed: run `python -m harness.engine.install {version}` "
                    f"(or set OFFLOAD_BENCH_SGLANG=0 to skip the engine tests)")
    try:
        outcomes = run_version(version, with_standins(grid) if standins else grid)
    except EngineError as e:
        pytest.fail(str(e))
    counts = summary(outcomes)
    rows = as_rows(outcomes)
    listing = "\n".join(f"{r['input']}: SGLang {r['sglang']} | ours {r['ours']} | {'; '.join(r['diffs'])}"
                        for r in rows)
    assert not rows, (f"{MODEL_FOR_VERSION[version]} disagrees with sglang {version} on {len(rows)} of "
                      f"{len(outcomes)} inputs ({dict(counts)}):\n{listing}")
    assert counts["agree"] > 0, "nothing was compared"


@pytest.mark.slow
@pytest.mark.skipif(ENGINE_OFF, reason="OFFLOAD_BENCH_SGLANG=0: the SGLang install is turned off")
@pytest.mark.parametrize("standins", [False, True], ids=["no-checkpoint", "stand-ins"])
def test_model_agrees_with_newest_release_on_modes_components_and_resident_layers(standins: bool) -> None:
    if MODERN_VERSION not in available_versions():
        pytest.fail(f"sglang {MODERN_VERSION} is not installed: run `python -m harness.engine.install "
                    f"{MODERN_VERSION}`")
    outcomes = run_version(MODERN_VERSION, with_standins(modern_inputs()) if standins else modern_inputs())
    rows = as_rows(outcomes)
    listing = "\n".join(f"{r['input']}: SGLang {r['sglang']} | ours {r['ours']} | {'; '.join(r['diffs'])}"
                         for r in rows[:40])
    counts = summary(outcomes)
    assert not rows, f"sglang disagrees with {MODERN_VERSION} on {len(rows)} inputs ({dict(counts)}):\n{listing}"
    assert counts["agree"] > 0.9 * len(outcomes), dict(counts)


@pytest.mark.slow
@pytest.mark.skipif(ENGINE_OFF, reason="OFFLOAD_BENCH_SGLANG=0: the SGLang install is turned off")
def test_the_standins_change_the_newest_release_only(grid: list) -> None:
    """0.5.23 sizes the checkpoint (and some answers change with it); 0.5.8 and 0.5.13 read none (none do)."""
    for version in VERSIONS:
        if version not in available_versions():
            pytest.fail(f"sglang {version} is not installed: run `python -m harness.engine.install {version}`")
    small = [g for g in grid if g.context.memory_gib in (24.0, 141.0) and g.flags.dit_offload_prefetch_size == 1.0]
    for version in VERSIONS:
        changed = changed_by_checkpoint(run_version(version, small), run_version(version, with_standins(small)))
        assert bool(changed) is (version == MODERN_VERSION), (version, len(changed))


def test_modern_grid_covers_modes_cards_components_and_resident_layers() -> None:
    items = modern_inputs()
    assert {i.context.performance_mode for i in items} == {None, "manual", "speed", "memory"}
    assert {i.context.memory_gib for i in items} >= {16.0, 24.0, 31.36, 48.0, 80.0, 141.0}
    assert {i.context.is_image for i in items} == {True, False}
    labels = {i.flags.label() for i in items}
    assert any("-lwc-all" in x for x in labels) and any("-lwc-none" in x for x in labels)
    assert any("-res30.7-strided" in x for x in labels) and any("-tepf2" in x for x in labels)


def test_grid_covers_unset_flags_prefetch_cards_and_both_task_kinds(grid: list) -> None:
    labels = {g.flags.label() for g in grid}
    assert any("cpuU" in label for label in labels) and any("pf2.5" in label for label in labels)
    assert {g.context.memory_gib for g in grid} == {16.0, 24.0, 31.36, 80.0, 141.0}
    assert {g.context.is_image for g in grid} == {True, False}


def test_grid_answers_do_not_stay_in_the_process_cache(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The grid asks ~29,000 questions a release that no scenario asks again: `cache=False` keeps none of them,
    while a scenario's resolution (the default) is kept for the next card. No child runs here."""
    from harness.engine import install, policy

    engine = install.InstalledEngine("9.9.9", tmp_path / "9.9.9-py3" / "site", {})
    engine.site.mkdir(parents=True)
    monkeypatch.setattr(install, "installed", lambda *a, **k: {"9.9.9": engine})
    monkeypatch.delenv(policy.ANSWERS_ENV, raising=False)
    asked: list[int] = []

    def child(version: str, requests: list, timeout_s: float) -> list:
        asked.append(len(requests))
        return [policy.EngineResolution(version, dict(r.flags), (), None, (), "test") for r in requests]

    monkeypatch.setattr(policy, "_ask_child", child)
    monkeypatch.setattr(policy, "_CACHE", {})
    request = policy.EngineRequest({"dit_layerwise_offload": True}, 32.0, "wan", "video")
    policy.resolve_engine("9.9.9", [request, request], cache=False)
    assert policy._CACHE == {} and asked == [1]
    policy.resolve_engine("9.9.9", [request])
    policy.resolve_engine("9.9.9", [request])
    assert len(policy._CACHE) == 1 and asked == [1, 1]


def test_a_release_without_a_model_is_compared_with_the_newest_and_said_so() -> None:
    """0.5.22 (between two modelled releases) died on KeyError: it is compared with the newest model instead, and
    the report's row and summary line say so."""
    from harness.policy.differential import model_for, report

    assert model_for("0.5.8") == ("sglang-pre18997", True)
    assert model_for("0.5.13") == ("sglang-0.5.13", True)
    assert model_for("0.5.22") == ("sglang", False)
    text = report({"0.5.22": []}, {"0.5.22": 1.0})
    assert "| 0.5.22 | `sglang` (unmapped) | 0 | 0 | 0 | 0 | 0 | 0 | 1 s |" in text
