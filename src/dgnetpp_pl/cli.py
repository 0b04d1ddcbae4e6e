"""The command-line entry points' shared piece: run a task as a Hydra app on the package's configs, with a
``--help`` that can list a group's presets with their one-line descriptions.

Each CLI has a schema dataclass and a primary config in ``conf/`` whose defaults list starts with the schema's
name; ``main()`` is ``run_app("<config name>", task)`` (the schemas of :mod:`dgnetpp_pl.config` are registered
already; a new CLI passes its own, e.g. ``run_app("export", task, {"export_schema": ExportConfig})``, and
validates with ``config.coerce(ExportConfig, cfg)``). A primary config's ``hydra.help.template`` may use
``${dgnetpp_presets:GROUP}`` (each option of GROUP with the first comment line of its file) and
``${dgnetpp_groups:GROUP,...}`` (the options of the named groups only).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dgnetpp_pl.config import CONF_DIR
from dgnetpp_pl.run_log import joined_run_log
from dgnetpp_pl.startup import Precheck, before_hydra


def description(path: str) -> str:
    """The first comment line of a YAML file that is not a ``@package`` directive ("" when there is none)."""
    with open(path) as fh:
        for line in fh:
            text = line.strip()
            if not text.startswith("#"):
                if text:
                    break
                continue
            text = text.lstrip("#").strip()
            if text and not text.startswith("@package"):
                return text
    return ""


def presets(group: str) -> str:
    """One line per option of ``group``: its name and description."""
    files = sorted((CONF_DIR / group).glob("*.yaml"))
    width = max((len(f.stem) for f in files), default=0)
    return "\n".join(f"  {f.stem:<{width}}  {description(str(f))}" for f in files)


def groups(*names: str) -> str:
    """One line per named group: its options."""
    lines = []
    for name in names:
        options = ", ".join(sorted(f.stem for f in (CONF_DIR / name).glob("*.yaml")))
        lines.append(f"{name}: {options}")
    return "\n".join(lines)


def register_help_resolvers() -> None:
    OmegaConf.register_new_resolver("dgnetpp_presets", presets, replace=True)
    OmegaConf.register_new_resolver("dgnetpp_groups", groups, replace=True)


def run_app(
    config_name: str,
    task: Callable[[DictConfig], Any],
    schemas: Mapping[str, type] | None = None,
    lock_folder: bool = True,
    precheck: Precheck | None = None,
) -> Any:
    """Parse the command line and run ``task`` on the composed ``config_name`` (Hydra's overrides, --help, -m);
    ``schemas`` (name -> dataclass) are stored where the primary config's defaults list names them.

    Before Hydra starts, every ``_target_`` of the composed config is checked and the run (or sweep) folder is
    locked for this run (:func:`dgnetpp_pl.startup.before_hydra`); ``lock_folder=False`` for a tool that writes no
    run folder. ``precheck(cfg, run folder)`` then checks the composed config against the run folder (training:
    the resume's config check) before Hydra writes there. While ``task`` runs, Lightning's messages and warnings
    join the run's log (:func:`dgnetpp_pl.run_log.joined_run_log`).
    """
    register_help_resolvers()
    for name, node in (schemas or {}).items():
        ConfigStore.instance().store(name=name, node=node)

    @functools.wraps(task)
    def logged_task(cfg: DictConfig) -> Any:
        with joined_run_log():
            return task(cfg)

    app = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(logged_task)
    return before_hydra(CONF_DIR, config_name, lock_folder, precheck)(app)()
