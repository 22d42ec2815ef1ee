"""--shard i/N and --tier: which cells a machine runs. Shards partition the cells (whole cards) with a bounded cost,
the same under the runner and pytest; tiers are scenario metadata."""

from __future__ import annotations

import itertools
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from harness.plan.scenario import Cell, ScenarioError, expand, in_tier, load_scenario
from harness.run import runner
from harness.run.shard import Shard, ShardError, assign, card_key, parse_shard, select, shard_cost
from tests.helpers import TINY_SCENARIO, to_toml

REPO = Path(__file__).resolve().parent.parent
SCENARIO_FILES = sorted((REPO / "scenarios").rglob("*.toml"))


def _engine_policy(path: Path) -> bool:
    """Files whose policy asks an SGLang release (a child per card, tens of seconds each) at load."""
    return str(tomllib.loads(path.read_text()).get("policy", "")).startswith("sglang@")


@pytest.fixture(scope="module")
def repo_cells() -> list[Cell]:
    """Every cell of the repository's scenarios, both profiles (the engine-policy files left out: slow to load)."""
    return [c for p in SCENARIO_FILES if not _engine_policy(p) for c in expand(load_scenario(p))]


@pytest.mark.parametrize(("text", "shard"), [("1/1", Shard(1, 1)), ("3/8", Shard(3, 8)), (" 2 / 4 ", Shard(2, 4))])
def test_parse_shard(text, shard):
    assert parse_shard(text) == shard
    assert str(parse_shard(text)) == f"{shard.index}/{shard.count}"


@pytest.mark.parametrize(
    ("text", "words"),
    [("0/3", "between 1 and 3"), ("4/3", "between 1 and 3"), ("x/y", "expected i/N"), ("1/0", "at least 1"),
     ("2", "expected i/N"), ("", "expected i/N"), ("-1/3", "expected i/N")],
)
def test_bad_shards_are_refused_saying_why(text, words):
    with pytest.raises(ShardError, match=words):
        parse_shard(text)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("count", range(1, 9))
def test_shards_partition_the_cells_with_bounded_cost(repo_cells, device, count):
    """Union = every cell, pairwise intersection = none, and every shard's cost at most total / N + the costliest
    card (the bound of greedy assignment: the shard that took a card last had at most the average before)."""
    shards = [select(repo_cells, Shard(i, count), device) for i in range(1, count + 1)]
    ids = [[c.cell_id for c in s] for s in shards]
    assert sorted(itertools.chain(*ids)) == sorted(c.cell_id for c in repo_cells)
    for a, b in itertools.combinations(ids, 2):
        assert not set(a) & set(b)
    cards: dict[str, int] = {}
    for c in repo_cells:
        cards[card_key(c)] = cards.get(card_key(c), 0) + shard_cost(c, device)
    total, costliest = sum(cards.values()), max(cards.values())
    loads = [sum(shard_cost(c, device) for c in s) for s in shards]
    assert max(loads) <= total / count + costliest
    if count <= len(cards):
        assert all(s for s in shards)  # no machine idles while another has two cards
    assert ids == [[c.cell_id for c in select(repo_cells, Shard(i, count), device)] for i in range(1, count + 1)]


def test_greedy_shards_of_many_cards_are_even():
    """The bound is reached only when one card dominates: 24 cards of costs 1..24 over 4 shards end within one
    unit of each other, and no cards means empty shards."""
    loads = [sum(s.values()) for s in assign({f"s/{k:02d}": k for k in range(1, 25)}, 4)]
    assert sum(loads) == 300 and max(loads) - min(loads) <= 1
    assert assign({}, 3) == [{}, {}, {}]


def test_a_copy_stays_with_the_cell_it_copies(repo_cells):
    copies = [c for c in repo_cells if c.same_as]
    assert copies
    for count in (2, 5, 8):
        for i in range(1, count + 1):
            mine = {c.cell_id for c in select(repo_cells, Shard(i, count), "cuda")}
            assert all(c.same_as in mine for c in copies if c.cell_id in mine)
    assert all(shard_cost(c, "cuda") == 0 for c in copies)  # a copy starts no child


def test_runner_refuses_a_bad_shard_before_anything(tmp_path, capsys):
    for bad in ("0/3", "4/3", "x/y"):
        with pytest.raises(SystemExit) as e:
            runner.main([str(TINY_SCENARIO), "--results", str(tmp_path), "--shard", bad])
        assert e.value.code == runner.EXIT_USAGE
        assert f"--shard '{bad}'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def _collected(folder: Path, *args: str) -> tuple[int, list[str], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(REPO / "scenarios"), "-p", "no:cacheprovider", "--collect-only", "-q",
         "--bench-scenarios-dir", str(folder), "--bench-results", str(folder / "results"), "--bench-profile", "cpu",
         *args],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    ids = [line.split("[", 1)[1].rstrip("]") for line in proc.stdout.splitlines() if "::test_" in line]
    return proc.returncode, ids, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def two_scenarios(tmp_path_factory) -> Path:
    """The tiny CPU scenario (two cards, tier pr) and a copy under another name of tier nightly."""
    folder = tmp_path_factory.mktemp("scen")
    data = tomllib.loads(TINY_SCENARIO.read_text())
    (folder / "a.toml").write_text(to_toml(data))
    (folder / "b.toml").write_text(to_toml({**data, "name": "tiny-nightly", "tier": "nightly"}))
    return folder


def test_pytest_shards_are_the_runner_shards_and_partition_the_tests(two_scenarios):
    rc, everything, _ = _collected(two_scenarios)
    assert rc == 0 and everything
    parts = []
    cells = [c for p in sorted(two_scenarios.glob("*.toml")) for c in expand(load_scenario(p))]
    for i in (1, 2, 3):
        rc, ids, out = _collected(two_scenarios, "--shard", f"{i}/3")
        assert rc == 0, out
        assert f"shard {i}/3" in out
        runner_ids = {c.cell_id for c in select(cells, Shard(i, 3), "cpu")}
        assert {x for x in ids if x.count("/") == 2} == runner_ids  # cell tests (set tests are scenario/card)
        parts.append(ids)
    assert sorted(itertools.chain(*parts)) == sorted(everything)


def test_pytest_refuses_a_bad_shard_in_one_line(two_scenarios):
    rc, _, out = _collected(two_scenarios, "--shard", "4/3")
    assert rc == 4 and "ERROR: offload-bench: --shard '4/3': the shard index must be between 1 and 3" in out


def test_tier_pr_runs_the_pr_scenarios_and_nightly_everything(two_scenarios):
    _, pr, _ = _collected(two_scenarios, "--tier", "pr")
    _, nightly, _ = _collected(two_scenarios, "--tier", "nightly")
    _, default, _ = _collected(two_scenarios)
    assert pr and all(i.startswith("qwen-image-edit-tiny/") for i in pr)
    assert nightly == default and set(pr) < set(nightly)


def test_tier_is_checked_when_the_file_loads(tmp_path):
    data = tomllib.loads(TINY_SCENARIO.read_text())
    (tmp_path / "t.toml").write_text(to_toml({**data, "tier": "weekly"}))
    with pytest.raises(ScenarioError, match=r"t\.toml: tier: expected one of pr, nightly, got 'weekly'"):
        load_scenario(tmp_path / "t.toml")
    del data["tier"]
    (tmp_path / "t.toml").write_text(to_toml(data))
    scenario = load_scenario(tmp_path / "t.toml")
    assert scenario.tier == "nightly" and in_tier(scenario, None) and in_tier(scenario, "nightly")
    assert not in_tier(scenario, "pr")


def test_the_pr_tier_holds_the_seed_assertion_and_a_peer_comparison():
    """On each profile the pr tier keeps dit_cpu_offload + layerwise's lowest peak (the #26925 guard); on the GPU
    also one comparison with another backend."""
    pr = [load_scenario(p) for p in SCENARIO_FILES if tomllib.loads(p.read_text()).get("tier") == "pr"]
    seed = {"dit_cpu_offload": True, "dit_layerwise_offload": True}
    for profile in ("cpu", "gpu"):
        mine = [s for s in pr if s.profile == profile]
        assert any(s.expect.lowest_peak == seed and not s.xfail for s in mine), profile
    assert any(s.expect.close_output_rtol or s.expect.beats_peer for s in pr if s.profile == "gpu")
