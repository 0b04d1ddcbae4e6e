"""ResumableDataLoader: its state counts the batches handed out in the current pass, and a loader restored from
that state continues the pass after them, with and without worker processes, without touching the global RNG."""

from __future__ import annotations

import pytest
import torch
from lightning_fabric.utilities.types import _Stateful
from torch.utils.data import Dataset

from dgnetpp_pl.data.resumable import ResumableDataLoader


class Squares(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> int:
        return i * i


@pytest.mark.parametrize("workers", [0, 2])
def test_a_restored_loader_continues_the_pass_where_the_state_was_taken(workers: int) -> None:
    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(Squares(), batch_size=3, num_workers=workers, drop_last=False)

    full = [b.tolist() for b in loader()]
    assert full == [[0, 1, 4], [9, 16, 25], [36, 49, 64], [81]]
    first = loader()
    batches = iter(first)
    seen = [next(batches).tolist(), next(batches).tolist()]
    state = first.state_dict()
    assert state == {"batches": 2} and isinstance(first, _Stateful)

    resumed = loader()
    resumed.load_state_dict(state)
    assert len(resumed) == 4  # the pass keeps its length; only this pass starts later
    before = torch.get_rng_state()
    rest = iter(resumed)
    assert torch.equal(torch.get_rng_state(), before)  # building the skipping pass drew nothing
    assert seen + [b.tolist() for b in rest] == full
    assert resumed.state_dict() == {"batches": 4}
    assert [b.tolist() for b in resumed] == full  # the next pass is whole again
