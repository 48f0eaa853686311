"""Weights in 2 MiB pages (kernels/hugepages.py): aligned, writable, and counted at their own size."""

import sys

import pytest
import torch

from moepager.kernels import hugepages


@pytest.mark.skipif(sys.platform != "linux", reason="THP is Linux's")
def test_large_tensors_start_on_a_huge_page_and_hold_only_their_bytes():
    t = hugepages.empty((3, 1 << 20), torch.float32)  # 12 MiB
    assert t.data_ptr() % hugepages.HUGE_PAGE == 0
    # memory accounting reads storages (plan, the live view): the slack of the mapping is not the tensor's
    assert t.untyped_storage().nbytes() == t.numel() * 4
    t.fill_(1.5)
    assert t.sum().item() == 1.5 * t.numel()


def test_moved_copies_and_small_tensors_stay_plain():
    big = torch.arange(1 << 20, dtype=torch.float32)
    moved = hugepages.moved(big)
    assert torch.equal(moved, big) and moved.data_ptr() != big.data_ptr()
    small = torch.ones(16)
    assert hugepages.moved(small) is small


def test_populate_backs_every_page_now():
    """An expert cache's slots are backed when it is made, not at their first read in a decode step."""
    from moepager.system.process_memory import current_rss

    t = hugepages.empty((64 << 20,), torch.uint8)
    before = current_rss()
    hugepages.populate(t)
    assert current_rss() - before >= 60 << 20
    hugepages.populate(torch.empty(0))  # nothing to back
