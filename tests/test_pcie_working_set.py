"""The PCIe working-set experiment's pure parts (issue 18, drift): rate spread, whether slow regions stay slow
across passes, NUMA bytes from numa_maps text, and a region that refuses huge pages (no GPU needed)."""

from __future__ import annotations

import mmap

import pytest

from experiments.pcie_working_set import numa_pages, region_consistency, spread
from harness.cell.offload.memory import HostRegion


def test_spread_is_min_median_max_and_ratio() -> None:
    assert spread([50.0, 55.0, 52.0]) == {"min": 50.0, "median": 52.0, "max": 55.0, "max_over_min": 1.1}


def test_fixed_slow_regions_correlate_and_moving_ones_do_not() -> None:
    fixed = [[50.0, 55.0, 53.0, 54.0], [50.5, 55.2, 53.1, 54.3], [49.9, 54.9, 52.8, 54.1]]
    assert region_consistency(fixed)["rank_correlation"] == 1.0
    moving = [[50.0, 55.0, 53.0, 54.0], [55.0, 50.0, 54.0, 53.0], [50.0, 55.0, 53.0, 54.0]]
    assert region_consistency(moving)["rank_correlation"] < 0
    assert region_consistency([[1.0, 2.0]])["rank_correlation"] is None


def test_numa_pages_counts_large_anonymous_mappings_by_node_and_page_size() -> None:
    text = "\n".join([
        "7f00 default anon=262144 dirty=262144 N0=200000 N1=62144 kernelpagesize_kB=4",  # 1 GiB, 4 KiB pages
        "7f80 default anon=1024 dirty=1024 N0=1024 kernelpagesize_kB=2048",  # 2 GiB of 2 MiB pages
        "7fa0 default anon=10 N1=10 kernelpagesize_kB=4",  # small: left out
        "5600 default file=/usr/bin/python3 mapped=100 N0=100 kernelpagesize_kB=4",  # not anonymous
    ])
    assert numa_pages(text) == {"N0": 200000 * 4096 + 1024 * 2**21, "N1": 62144 * 4096}


@pytest.mark.skipif(not hasattr(mmap, "MADV_NOHUGEPAGE"), reason="no MADV_NOHUGEPAGE here")
def test_region_without_huge_pages_still_holds_its_bytes() -> None:
    region = HostRegion(3 * 2**20 + 5, pin=False, huge_pages=False)
    region.tensor.fill_(3)
    assert region.tensor.numel() == 3 * 2**20 + 5 and int(region.tensor[-1]) == 3
