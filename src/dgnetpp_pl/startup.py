"""What an entry point checks before Hydra takes over the command line.

Hydra instantiates ``hydra.callbacks`` (and, in a multirun, the sweeper and the launcher) and writes ``.hydra/`` into
the run folder before the task function starts, so two checks must come first: :func:`before_hydra` composes the
config exactly as Hydra is about to, refuses it if any ``_target_`` is not allowed
(:func:`dgnetpp_pl.instantiate.check_targets`), and locks the run folder (the sweep folder in a multirun) for this
run (:class:`dgnetpp_pl.runlock.RunLock`). An entry point's ``precheck`` (training: the resume's config check,
:func:`dgnetpp_pl.resume_check.check_before_start`) runs last, so a refused resume leaves the run folder as it was.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dgnetpp_pl.config import ConfigError
from dgnetpp_pl.instantiate import check_targets
from dgnetpp_pl.runlock import RunFolderBusy, RunLock, process_is_rank_zero

HEARTBEAT_S = 30.0  # how often a run touches its lock file


def compose_as_hydra(
    task_function: Callable, config_dir: Path, config_name: str, argv: Sequence[str]
) -> tuple[DictConfig, RunMode] | None:
    """The config (with its ``hydra`` node) that ``@hydra.main`` composes for ``argv``, and the run mode; None when
    ``argv`` asks for no run (``--help``, ``--cfg``, ``--info``, ...) or does not compose (Hydra reports that)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import (
        create_automatic_config_search_path,
        detect_calling_file_or_module_from_task_function,
        detect_task_name,
        get_args_parser,
    )
    from hydra.core.config_search_path import SearchPathQuery

    try:
        args = get_args_parser().parse_args(list(argv))
    except SystemExit:
        return None  # Hydra prints the usage error itself
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return None
    if GlobalHydra.instance().is_initialized():
        return None  # called inside another Hydra context: not from a command line
    calling_file, calling_module = detect_calling_file_or_module_from_task_function(task_function)
    search_path = create_automatic_config_search_path(calling_file, calling_module, args.config_path or str(config_dir))
    if args.config_dir is not None:
        extra = os.path.abspath(args.config_dir)
        search_path.prepend("command-line", f"file://{extra}", anchor=SearchPathQuery(provider="schema"))
    name = args.config_name or config_name
    overrides = list(args.overrides)
    try:
        hydra = Hydra.create_main_hydra2(detect_task_name(calling_file, calling_module), search_path)
        mode = hydra.get_mode(config_name=name, overrides=overrides)
        run_mode = RunMode.MULTIRUN if args.multirun or mode == RunMode.MULTIRUN else RunMode.RUN
        cfg = hydra.compose_config(name, overrides, run_mode=run_mode, with_log_configuration=False)
    except Exception:  # noqa: BLE001 - the same composition fails in Hydra, which reports it its own way
        return None
    finally:
        GlobalHydra.instance().clear()
    return cfg, run_mode


@contextmanager
def _hydra_config_set(cfg: DictConfig) -> Iterator[None]:
    # ${hydra:...} interpolations resolve against HydraConfig; set it for the check, then put back what was there.
    instance = HydraConfig.instance()
    previous = instance.cfg
    instance.set_config(cfg)
    try:
        yield
    finally:
        instance.cfg = previous


# A check of the composed config against what the run folder holds, before Hydra writes there: (config, run folder).
Precheck = Callable[[DictConfig, Path], None]


@contextmanager
def checked_and_locked(
    cfg: DictConfig, run_mode: RunMode, lock_folder: bool = True, precheck: Precheck | None = None
) -> Iterator[RunLock | None]:
    """Refuse a disallowed ``_target_`` anywhere in ``cfg``; hold the run (or sweep) folder's lock in the block
    (unless ``lock_folder`` is false: a tool that writes no run folder); then, in a single run, call
    ``precheck(cfg, run folder)`` (e.g. the resume's config check), which refuses by raising ConfigError."""
    with _hydra_config_set(cfg):
        check_targets(cfg, OmegaConf.select(cfg, "allowed_targets", default=[]))
        key = "hydra.sweep.dir" if run_mode == RunMode.MULTIRUN else "hydra.run.dir"
        folder = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
    lock = None
    if lock_folder and folder and process_is_rank_zero():  # other ranks join the run that rank 0 holds
        what = "sweep folder" if run_mode == RunMode.MULTIRUN else "run folder"
        lock = RunLock(Path(folder).absolute(), what=what, heartbeat_s=HEARTBEAT_S)
        lock.acquire(stale_after_s=4 * HEARTBEAT_S)  # a run resumed on another node after its holder's node died
    try:
        if precheck is not None and folder and run_mode == RunMode.RUN:
            with _hydra_config_set(cfg):
                precheck(cfg, Path(folder).absolute())
        yield lock
    finally:
        if lock is not None:
            lock.release()


def before_hydra(
    config_dir: str | Path, config_name: str, lock_folder: bool = True, precheck: Precheck | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a ``@hydra.main`` function: from the command line, check its ``_target_``s, lock its run folder
    (unless ``lock_folder`` is false) and run ``precheck`` before Hydra starts (see the module docstring and
    :func:`checked_and_locked`); with arguments (a config passed in) it is called unchanged."""

    def wrap(hydra_main: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(hydra_main)
        def main(*args: Any, **kwargs: Any) -> Any:
            if args or kwargs:
                return hydra_main(*args, **kwargs)
            task_function = getattr(hydra_main, "__wrapped__", hydra_main)
            composed = compose_as_hydra(task_function, Path(config_dir), config_name, sys.argv[1:])
            if composed is None:
                return hydra_main()
            with ExitStack() as stack:
                try:
                    stack.enter_context(checked_and_locked(*composed, lock_folder=lock_folder, precheck=precheck))
                except (ConfigError, RunFolderBusy) as err:  # reported as Hydra reports errors: message, status 1
                    print(f"Error: {err}", file=sys.stderr)
                    raise SystemExit(1) from None
                return hydra_main()

        return main

    return wrap
