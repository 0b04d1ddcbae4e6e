"""``hydra.utils.instantiate`` restricted to an allow-list of packages, so a config cannot run arbitrary code."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dgnetpp_pl.config import ConfigError


def _targets(node: Any) -> Iterable[str]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "_target_":
                yield str(value)
            else:
                yield from _targets(value)
    elif isinstance(node, list | tuple):
        for item in node:
            yield from _targets(item)


def safe_instantiate(node: DictConfig | Mapping, allowed: Iterable[str], where: str) -> Any:
    """Instantiate ``node`` after checking that every ``_target_`` lives in an ``allowed`` top-level package."""
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    allowed = tuple(allowed)
    for target in _targets(plain):
        if target.split(".")[0] not in allowed:
            raise ConfigError(
                f"Refusing to instantiate '{target}' at '{where}': only classes from {list(allowed)} may be named "
                "by _target_. Add the package to allowed_targets only if you trust the config."
            )
    return instantiate(plain, _convert_="all")


def instantiate_group(group: Mapping | DictConfig | None, allowed: Iterable[str], where: str) -> list[Any]:
    """Instantiate each non-null entry of a ``{name: {_target_: ...}}`` group (callbacks, loggers)."""
    out = []
    for name, node in (group or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            raise ConfigError(f"'{where}.{name}' has no _target_; every entry of {where} names a class.")
        out.append(safe_instantiate(node, allowed, f"{where}.{name}"))
    return out
