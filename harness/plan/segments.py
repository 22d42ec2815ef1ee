"""What the layerwise runtime's layer buffers reserve in PyTorch's CUDA caching allocator, replayed block by block
(no torch): the planner's `window_segment_bytes`.

The allocator's rules that matter for buffers of hundreds of MiB (c10/cuda/CUDACachingAllocator.cpp, the large
pool of one stream): a request is rounded up to 512 bytes; it takes the smallest free cached block that holds it
(best fit), splitting off the rest as a free block when more than 1 MiB is left; with none it reserves a new
segment of the request rounded up to 2 MiB; a freed block merges with free neighbours of its own segment only, so a
segment never grows and never joins another.

With one layer size (Qwen-Image, Wan) a freed layer buffer is exactly the next one's block and the window reserves
2p layer segments. With two (FLUX: 19 double blocks of 648 MiB, 38 single of 270 MiB) a single-block buffer may
take a freed double-block segment and split it; the next double block then finds no whole 648 MiB block there and
reserves a new segment. The replay runs the window schedule of `harness.cell.offload.layerwise` (window k+1
prefetched on entering window k, each group's window 0 prefetched at the end of its last window for the next
forward, a layer released after its forward) for a fixed number of forwards (3: the reservation settles within
the second, at the wrap-around windows) and reports what it reserved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from harness.common.units import MIB


def segment_size(nbytes: int) -> int:
    """The segment the allocator reserves for a large request it cannot serve from its cache."""
    if nbytes <= MIB:
        return 2 * MIB
    if nbytes < 10 * MIB:
        return 20 * MIB
    return -(-nbytes // (2 * MIB)) * 2 * MIB


@dataclass
class _Block:
    segment: int
    offset: int
    size: int
    free: bool = True


@dataclass
class SegmentCache:
    """One stream's large pool: its segments' blocks, the bytes reserved and their high-water mark."""

    blocks: list[_Block] = field(default_factory=list)
    reserved: int = 0
    segments: int = 0

    def malloc(self, nbytes: int) -> _Block:
        size = -(-nbytes // 512) * 512
        fitting = [b for b in self.blocks if b.free and b.size >= size]
        if fitting:
            block = min(fitting, key=lambda b: (b.size, b.segment, b.offset))
        else:
            block = _Block(self.segments, 0, segment_size(size))
            self.segments += 1
            self.reserved += block.size
            self.blocks.append(block)
        block.free = False
        if block.size - size > MIB:  # split: the rest stays cached as a free block of the same segment
            self.blocks.append(_Block(block.segment, block.offset + size, block.size - size))
            block.size = size
        return block

    def free(self, block: _Block) -> None:
        block.free = True
        for other in sorted((b for b in self.blocks if b.free and b.segment == block.segment and b is not block),
                            key=lambda b: b.offset):
            if other.offset + other.size == block.offset or block.offset + block.size == other.offset:
                block.offset = min(block.offset, other.offset)
                block.size += other.size
                self.blocks.remove(other)


@cache
def window_segment_bytes(groups: tuple[tuple[int, int, int], ...], forwards: int = 3,
                         kept: tuple[int, ...] = ()) -> int:
    """Bytes the layer buffers of the groups reserve from an empty cache over `forwards` forwards.

    Args:
        groups (tuple): per group, in forward order: (streamed layers n, window p, layer bytes).
        forwards (int): forwards replayed; the reservation settles within the second (the wrap-around windows).
        kept (tuple): per group, its resident layers: copied in at its first layer of the first forward, before
            its window 0, and held to the end (with layers of two sizes they change how the window packs: FLUX,
            a quarter kept at prefetch 5, 15,720 MiB against 14,534 counted apart; H200 measured 14,668 of
            growth after the text encoder's 768 MiB of cached layer segments).
    """
    pool = SegmentCache()
    live: list[dict[int, _Block]] = [{} for _ in groups]
    resident = kept or (0,) * len(groups)
    for forward in range(forwards):
        for held, (n, p, nbytes), r in zip(live, groups, resident, strict=True):
            if forward == 0:
                for _ in range(r):
                    pool.malloc(nbytes)
            windows = -(-n // p)
            for i in range(n):
                wanted = list(range(p)) if i == 0 else []
                if i % p == 0 and (i // p + 1) % windows != i // p:
                    nxt = (i // p + 1) % windows
                    wanted += range(nxt * p, min(n, (nxt + 1) * p))
                for j in [*wanted, i]:
                    if j not in held:
                        held[j] = pool.malloc(nbytes)
                pool.free(held.pop(i))
    return pool.reserved
