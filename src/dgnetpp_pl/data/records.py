"""The one record type every dataset reader produces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image of a re-ID dataset: its file, identity label and 0-based camera index."""

    path: str
    pid: int
    camid: int
