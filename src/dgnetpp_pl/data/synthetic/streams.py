"""Independent random streams, keyed by (seed, domain name, stream, keys...), so that e.g. adding cameras does
not change identities."""

from __future__ import annotations

import zlib

import numpy as np

STREAM_ID, STREAM_CAMERA, STREAM_IMAGE, STREAM_PLAN, STREAM_DISTRACTOR, STREAM_JUNK = range(1, 7)


def domain_key(name: str) -> int:
    """A stable integer for a domain name (CRC-32), so that two domains draw different streams."""
    return zlib.crc32(name.encode())


def stream_rng(seed: int, name: str, stream: int, *keys: int) -> np.random.Generator:
    """The generator of one stream of domain ``name`` under data seed ``seed``, e.g. ``(STREAM_ID, pid)``."""
    return np.random.default_rng([seed, domain_key(name), stream, *keys])
