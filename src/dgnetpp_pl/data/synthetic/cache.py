"""The on-disk cache of generated domains: one folder per (spec, seed), published atomically, never replaced.

A domain is generated into a fresh sibling folder that is renamed into place once complete, so a folder under
its final name is always complete and nothing a running job reads is ever removed or overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dgnetpp_pl.data.datasets import DatasetError
from dgnetpp_pl.data.synthetic.pool import write_in_processes
from dgnetpp_pl.data.synthetic.render import GENERATOR_VERSION
from dgnetpp_pl.data.synthetic.spec import SOURCE_STYLE, TARGET_STYLE, SyntheticDomainSpec
from dgnetpp_pl.data.synthetic.writer import SPLIT_FOLDERS, Domain, planned_jobs, write_share

MARKER = ".complete"
_TMP_TAG = ".tmp-"
_PARALLEL_MIN_IMAGES = 300
_MAX_WORKERS = 8


def marker(spec: SyntheticDomainSpec, seed: int) -> dict[str, Any]:
    """What ``<domain>/.complete`` holds: generator version, seed and the full spec, as JSON reads it back."""
    meta = {"generator_version": GENERATOR_VERSION, "seed": seed, "spec": asdict(spec)}
    return json.loads(json.dumps(meta))  # tuples -> lists, as they read back from disk


def read_marker(root: Path) -> dict[str, Any] | None:
    """The marker of a generated domain folder, or None when there is none (or it does not parse)."""
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def spec_digest(spec: SyntheticDomainSpec) -> str:
    """Eight hex digits of a hash of the generator version and every field of ``spec``."""
    meta = marker(spec, 0)
    del meta["seed"]  # the folder name carries the seed on its own
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:8]


def synthetic_domain_dir(data_dir: str | os.PathLike, spec: SyntheticDomainSpec, seed: int) -> Path:
    """Where a synthetic domain lives: ``data_dir/synthetic/<spec.name>_s<seed>_<spec_digest(spec)>``."""
    return Path(data_dir) / "synthetic" / f"{spec.name}_s{seed}_{spec_digest(spec)}"


def generate_domain(
    root: str | os.PathLike, spec: SyntheticDomainSpec, seed: int = 0, workers: int | None = None
) -> Path:
    """Write one domain in Market-1501 layout at ``root`` (or reuse it) and return ``root``.

    ``root/.complete`` holds the spec and seed as JSON; when it matches, nothing is done. A ``root`` that holds
    anything else is an error, never overwritten. The output is byte-identical for the same (spec, seed),
    whatever ``workers`` is.
    """
    return generate_domains([(Path(root), spec, seed)], workers)[0]


def make_synthetic_pair(
    data_dir: str | os.PathLike,
    seed: int = 0,
    source: SyntheticDomainSpec = SOURCE_STYLE,
    target: SyntheticDomainSpec = TARGET_STYLE,
    workers: int | None = None,
) -> tuple[Path, Path]:
    """Generate (or reuse) the source and target domains at :func:`synthetic_domain_dir` of each."""
    if source.name == target.name:
        raise ValueError(
            f"the source and target synthetic domains must have different names, both are {source.name!r}."
        )
    wanted = [(synthetic_domain_dir(data_dir, spec, seed), spec, seed) for spec in (source, target)]
    source_root, target_root = generate_domains(wanted, workers)
    return source_root, target_root


def generate_domains(domains: Sequence[Domain], workers: int | None = None) -> list[Path]:
    """:func:`generate_domain` for several ``(root, spec, seed)`` at once: one set of workers writes them all."""
    missing = [domain for domain in domains if not _cached(*domain)]
    tmps: list[Path] = []
    try:
        for root, _, _ in missing:
            root.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_tmps(root)
            tmp = root.with_name(f"{root.name}{_TMP_TAG}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            tmps.append(tmp)
            for folder in SPLIT_FOLDERS:
                (tmp / folder).mkdir(parents=True)
        staged = [(tmp, spec, seed) for tmp, (_, spec, seed) in zip(tmps, missing)]
        if staged:
            _write(staged, workers)
        for tmp, (root, spec, seed) in zip(tmps, missing):
            (tmp / MARKER).write_text(json.dumps(marker(spec, seed), indent=1, sort_keys=True))
            _publish(tmp, root, spec, seed)
    finally:
        for tmp in tmps:  # left only where another process published the same domain first, or on an error
            shutil.rmtree(tmp, ignore_errors=True)
    return [root for root, _, _ in domains]


def _cached(root: Path, spec: SyntheticDomainSpec, seed: int) -> bool:
    """True when ``root`` is this domain; False when it is absent; an error when it holds anything else."""
    found = read_marker(root)
    if found == marker(spec, seed):
        return True
    if not root.exists():
        return False
    if found is None:
        raise DatasetError(
            f"'{root}' exists but is not a generated synthetic domain (no {MARKER} file); "
            "remove it or choose another data_dir."
        )
    raise DatasetError(
        f"'{root}' holds another synthetic domain (generator version {found.get('generator_version')}, seed "
        f"{found.get('seed')}, spec {found.get('spec')}); a generated domain is never overwritten, since a running "
        "job may read it. Generate into synthetic_domain_dir(), which names one folder per spec and seed, or "
        "remove that folder yourself once no job uses it."
    )


def _write(staged: Sequence[Domain], workers: int | None) -> None:
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(cpus, _MAX_WORKERS) if len(planned_jobs(staged)) >= _PARALLEL_MIN_IMAGES else 1
    if workers > 1:
        write_in_processes(staged, workers)
    else:
        write_share(staged, 0, 1)


def _publish(tmp: Path, root: Path, spec: SyntheticDomainSpec, seed: int) -> None:
    """Rename the complete ``tmp`` to ``root``; if another process published it first, keep theirs."""
    try:
        os.rename(tmp, root)  # atomic; fails when root exists and is not empty
    except OSError as err:
        if read_marker(root) != marker(spec, seed):
            raise DatasetError(f"cannot move the generated domain '{tmp}' to '{root}': {err}.") from err


def _remove_stale_tmps(root: Path) -> None:
    """Remove staging folders of ``root`` left by killed generator processes of this host."""
    host = socket.gethostname()
    for stale in root.parent.glob(f"{root.name}{_TMP_TAG}*"):
        parts = stale.name[len(root.name) + len(_TMP_TAG) :].rsplit("-", 2)
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _alive(int(parts[1])):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
