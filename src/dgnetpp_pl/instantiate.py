"""``_target_`` allow-list: a config may name only classes of the kind its position instantiates.

Every ``_target_`` in a composed config must sit where something is instantiated and name, by its fully qualified
name, a class of that position's kind: a ``pytorch_lightning.Callback`` under ``callbacks.<name>``, a Lightning
``Logger`` under ``logger.<name>``, a ``hydra.experimental.callback.Callback`` under ``hydra.callbacks.<name>``,
Hydra's ``Launcher`` and ``Sweeper`` plugins and an optuna sampler at their keys. A function (``torch.load``,
``dgnetpp_pl.runlock.os.system``), another class, or a ``_target_`` anywhere else (e.g. nested in a callback's
arguments) is refused. The name is imported (only from the packages in ``allowed_targets``, plus Hydra's for Hydra's
own keys) and checked before anything is instantiated. The factories of Hydra's logging config (``class`` and
``()``) are held to the same rule: a logging handler, formatter or filter class.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from dgnetpp_pl.config import ConfigError


@dataclass(frozen=True)
class Role:
    """What a config position instantiates: keys matching ``pattern`` name a subclass of ``base``."""

    pattern: str
    base: str
    packages: tuple[str, ...] = ()  # importable there besides allowed_targets

    def matches(self, key: str) -> bool:
        return re.fullmatch(self.pattern, key) is not None


_NAME = r"[^.\[\]]+"
ROLES = (
    Role(rf"callbacks\.{_NAME}", "pytorch_lightning.callbacks.Callback"),
    Role(rf"logger\.{_NAME}", "pytorch_lightning.loggers.Logger"),
    Role(rf"hydra\.callbacks\.{_NAME}", "hydra.experimental.callback.Callback", ("hydra", "hydra_plugins")),
    Role(r"hydra\.launcher", "hydra.plugins.launcher.Launcher", ("hydra", "hydra_plugins")),
    Role(r"hydra\.sweeper", "hydra.plugins.sweeper.Sweeper", ("hydra", "hydra_plugins")),
    Role(r"hydra\.sweeper\.sampler", "optuna.samplers.BaseSampler", ("optuna",)),
)
# logging.config.dictConfig calls `class` and `()` of these sections; Hydra applies hydra.job_logging before the run.
_LOGGING = rf"hydra\.(job_logging|hydra_logging)\.(handlers|formatters|filters)\.{_NAME}"
_LOGGING_BASES = {"handlers": "logging.Handler", "formatters": "logging.Formatter", "filters": "logging.Filter"}
_LOGGING_PACKAGES = ("logging", "colorlog", "hydra", "hydra_plugins", "dgnetpp_pl")  # dgnetpp_pl: its console handler


def _walk(node: Any, key: str) -> Iterator[tuple[str, str, Any]]:
    """``(key of the owning node, field, value)`` for every ``_target_``, ``class`` and ``()`` field."""
    if isinstance(node, Mapping):
        for field, value in node.items():
            if field in ("_target_", "class", "()"):
                yield key, str(field), value
            else:
                yield from _walk(value, f"{key}.{field}" if key else str(field))
    elif isinstance(node, list | tuple):
        for i, item in enumerate(node):
            yield from _walk(item, f"{key}[{i}]")


def _plain(node: Any) -> Any:
    """A plain container; interpolations resolved where they can be (a target must not hide behind one)."""
    if not isinstance(node, DictConfig | ListConfig):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:  # noqa: BLE001 - an unrelated interpolation that cannot resolve here; targets stay literal
        return OmegaConf.to_container(node, resolve=False)


def _refuse(target: Any, key: str, why: str) -> ConfigError:
    return ConfigError(f"Refusing to instantiate {str(target)!r} at '{key}': {why}")


def check_target(
    key: str, target: Any, allowed: Iterable[str], base: str | None = None, extra: Iterable[str] = ()
) -> None:
    """Raise :class:`ConfigError` unless ``target`` names a subclass of ``base`` (or of the role of ``key``)."""
    if base is None:
        role = next((r for r in ROLES if r.matches(key)), None)
        if role is None:
            where = "callbacks, loggers and Hydra's callbacks, launcher and sweeper, at the top of their entry"
            raise _refuse(target, key, f"no _target_ is expected here; classes are named only for {where}.")
        base, extra = role.base, role.packages
    if not isinstance(target, str) or "${" in target or not target:
        raise _refuse(target, key, "a _target_ must be the fully qualified name of a class.")
    packages = [*allowed, *extra]
    package = target.split(".")[0]
    if package not in packages:
        hint = "add it to allowed_targets only if you trust the config"
        raise _refuse(target, key, f"'{package}' is not an allowed package ({packages}); {hint}.")
    try:
        obj = get_object(target)
    except Exception as err:  # noqa: BLE001 - ImportError, AttributeError, or whatever an import raises
        raise _refuse(target, key, f"it cannot be imported ({type(err).__name__}).") from None
    if not isinstance(obj, type):
        kind = type(obj).__name__
        raise _refuse(target, key, f"it is a {kind}, not a class; this position takes a subclass of {base}.")
    try:
        base_cls = get_object(base)
    except Exception:  # noqa: BLE001 - e.g. optuna not installed: nothing can be a subclass of it
        raise _refuse(target, key, f"its required base class {base} cannot be imported.") from None
    if not issubclass(obj, base_cls):
        name = f"{obj.__module__}.{obj.__qualname__}"
        raise _refuse(target, key, f"{name} is not a subclass of {base}, which this position takes.")


def check_targets(cfg: Mapping | DictConfig, allowed: Iterable[str], prefix: str = "") -> None:
    """Check every ``_target_`` of ``cfg`` (and the logging factories under ``hydra``) before anything is built."""
    allowed = list(allowed)
    for key, field, value in _walk(_plain(cfg), prefix):
        if field == "_target_":
            check_target(key, value, allowed)
            continue
        logging = re.fullmatch(_LOGGING, key)
        if logging is None:
            continue  # `class` / `()` outside Hydra's logging config are plain data
        if isinstance(value, str) and value.startswith(("ext://", "cfg://")):
            continue
        check_target(f"{key}.{field}", value, [], _LOGGING_BASES[logging.group(2)], _LOGGING_PACKAGES)


def safe_instantiate(node: DictConfig | Mapping, allowed: Iterable[str], where: str) -> Any:
    """Instantiate the entry ``node`` at config key ``where`` (e.g. ``callbacks.model_checkpoint``) after checking
    that its ``_target_`` is a class of that position's kind and that nothing in it names another target."""
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    for key, field, value in _walk(plain, where):
        if field == "_target_":
            check_target(key, value, allowed)
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
