"""A train DataLoader that a checkpoint taken mid-epoch can continue: Lightning saves its state (how many batches
of the current pass it has handed out) with every checkpoint and restores it before the resumed epoch starts, and
the restored loader then skips those batches. Without this a resumed epoch would start its (seeded) order again,
train on its first batches twice and never on its last ones.

Batches are skipped as index lists, before any image is loaded. Under DDP Lightning rebuilds the loader around a
distributed sampler; the skip applies to each rank's own batches, which is what each rank had consumed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader


class _SkipFirst:
    """``batches`` without its first ``count`` items; the length counts only what is left."""

    def __init__(self, batches: Iterable[Any], count: int) -> None:
        self.batches, self.count = batches, count

    def __iter__(self) -> Iterator[Any]:
        return islice(iter(self.batches), self.count, None)

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.count)  # type: ignore[arg-type]


class _Counted:
    """An iterator that counts the batches it hands out into ``loader._served``."""

    def __init__(self, batches: Iterator[Any], loader: ResumableDataLoader) -> None:
        self.batches, self.loader = batches, loader

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> Any:
        batch = next(self.batches)
        self.loader._served += 1
        return batch


class ResumableDataLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` with ``state_dict`` / ``load_state_dict`` (Lightning's resumable
    loader interface): the state is ``{"batches": n}``, the batches of the current pass handed out so far.

    Needs batches (``batch_size`` or ``batch_sampler``, or ``batch_size=None`` over a sampler of whole batches): the
    skip counts what the index sampler yields.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        self._skip_next = 0  # from load_state_dict, used by the next pass only
        self._skipping = 0  # read by _index_sampler while a pass's iterator is being built

    def state_dict(self) -> dict[str, int]:
        return {"batches": self._served}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._skip_next = int(state_dict.get("batches", 0))

    @property
    def _index_sampler(self) -> Any:  # what a pass's iterator draws its index lists from
        sampler = super()._index_sampler
        return _SkipFirst(sampler, self._skipping) if self._skipping else sampler

    def __iter__(self) -> Iterator[Any]:
        skip, self._skip_next = self._skip_next, 0
        self._served = skip
        self._skipping = skip
        try:
            if skip:
                # Building an iterator draws a worker base seed from the global torch RNG. The resumed checkpoint's
                # RNG state was taken after this pass's draw, so this one must leave the RNG as it found it.
                with torch.random.fork_rng(devices=[]):
                    batches = super().__iter__()
            else:
                batches = super().__iter__()
        finally:
            self._skipping = 0
        return _Counted(iter(batches), self)
