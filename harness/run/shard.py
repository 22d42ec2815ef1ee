"""`--shard i/N`: a deterministic, cost-balanced share of a run's cells, so N machines each run one share of the
same run id and `python -m harness merge` joins their records (harness/run/merge.py).

The unit of a share is a scenario's card (every cell of `<scenario>/<card>/...`), never a single cell: the card's
set-level test (lowest peak, same output, beats peer) reads all of the card's records and would run the missing
ones, and a copy cell (`same_as`) takes its record from a cell of the same card. So a cell is in exactly one
shard because its card is.

Cost: the hint that orders cells today (`harness.run.gpus.cell_cost`, no torch), summed over the cells of a card that
start a child on this device: a copy (`same_as`) runs nothing, and a cell of the other profile is only recorded
as skipped. Cards are handed out greedily, costliest first, each to the shard with the least cost so far (ties:
fewer cards, then the lower index), which is deterministic for one list of scenarios and device. Greedy
assignment bounds every shard's cost by total / N + the costliest card (the shard that got a card last had at most
the average before it), which `tests/test_shard.py` asserts for N = 1..8.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from harness.plan.scenario import Cell
from harness.run.gpus import cell_cost

_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


class ShardError(ValueError):
    """A --shard value that is not i/N with 1 <= i <= N."""


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based, as the command line spells it
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """`"2/4"` -> Shard(2, 4). Anything else (0/3, 4/3, x/y, 1/0) raises ShardError with a line that says why."""
    m = _SHARD.fullmatch(text or "")
    if m is None:
        raise ShardError(f"--shard {text!r}: expected i/N with whole numbers, e.g. 1/4 (the first of four shards)")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1:
        raise ShardError(f"--shard {text!r}: the number of shards N must be at least 1")
    if not 1 <= index <= count:
        raise ShardError(f"--shard {text!r}: the shard index must be between 1 and {count} (shards count from 1)")
    return Shard(index, count)


def card_key(cell: Cell) -> str:
    """The unit of a share: `<scenario>/<card>`."""
    return f"{cell.scenario.name}/{cell.card.name}"


def shard_cost(cell: Cell, device: str) -> int:
    """What a cell costs this device: its cost hint when it starts a child here, else 0 (a copy of another cell's
    record, or a cell of the other profile, which is recorded as skipped without a child)."""
    wanted = "cuda" if cell.scenario.profile == "gpu" else "cpu"
    return 0 if cell.same_as is not None or wanted != device else cell_cost(cell)


def assign_cards(cells: Iterable[Cell], count: int, device: str) -> list[dict[str, int]]:
    """Every card of `cells` in exactly one of `count` shards: shard k (0-based) -> {card key: its cost}."""
    costs: dict[str, int] = {}
    for cell in cells:
        costs[card_key(cell)] = costs.get(card_key(cell), 0) + shard_cost(cell, device)
    return assign(costs, count)


def assign(costs: Mapping[str, int], count: int) -> list[dict[str, int]]:
    """Greedy assignment of weighted keys to `count` shards: costliest first (ties by key), each to the shard with
    the least cost so far (ties: fewer keys, then the lower index)."""
    shards: list[dict[str, int]] = [{} for _ in range(count)]
    loads = [0] * count
    for key in sorted(costs, key=lambda k: (-costs[k], k)):
        k = min(range(count), key=lambda i: (loads[i], len(shards[i]), i))
        shards[k][key] = costs[key]
        loads[k] += costs[key]
    return shards


def select(cells: list[Cell], shard: Shard | None, device: str) -> list[Cell]:
    """The cells of `shard` (all of them for None), in their given order."""
    if shard is None:
        return list(cells)
    mine = assign_cards(cells, shard.count, device)[shard.index - 1]
    return [c for c in cells if card_key(c) in mine]


def describe(cells: list[Cell], shard: Shard, device: str) -> str:
    """One line for the run's header: which cards this shard runs and its share of the cost."""
    shards = assign_cards(cells, shard.count, device)
    total = sum(sum(s.values()) for s in shards) or 1
    mine = shards[shard.index - 1]
    share = 100 * sum(mine.values()) / total
    return f"shard {shard}: {len(mine)} of {sum(len(s) for s in shards)} cards ({share:.0f} % of the cost hint)"
