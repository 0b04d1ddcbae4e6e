"""The run's log: what a run reports goes to the console and to ``<output dir>/<task_name>.log``.

Hydra's job logging (``conf/hydra/default.yaml``) gives the root logger two handlers: the console (the message
alone) and the run's log file (with time, logger name and level). The package reports through loggers under
``dgnetpp_pl`` (``logging.getLogger(__name__)``); :func:`joined_run_log` sends Lightning's own messages and Python
warnings to the same handlers while a command-line run lasts. Lightning's progress bar draws on the terminal
only. Outside a command-line run (the Python API, a notebook) nothing is configured: ``logging.basicConfig(
level=logging.INFO)`` shows the messages.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pytorch_lightning.utilities.rank_zero import rank_zero_only

# The loggers that Lightning gives a console handler of their own when it is imported before logging is set up.
LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")


class ConsoleHandler(logging.StreamHandler):
    """A handler on whatever ``sys.stdout`` is when a record comes: while a rich progress bar draws, it replaces
    ``sys.stdout`` so that text prints above the bar, and a stream fixed at start-up would print through it."""

    def __init__(self, stream: Any = None) -> None:  # `stream` (from Hydra's default config) is not used
        super().__init__(sys.stdout)

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler sets it; the current sys.stdout is always used
        pass


@contextmanager
def joined_run_log() -> Iterator[None]:
    """While the block runs, Lightning's loggers and ``warnings`` reach the root logger's handlers (the console and
    the run's log file); without root handlers (logging not configured) it changes nothing."""
    root = logging.getLogger()
    if not root.handlers:
        yield
        return
    saved = []
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, list(logger.handlers), logger.propagate))
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for logger, handlers, propagate in saved:
            for handler in handlers:
                logger.addHandler(handler)
            logger.propagate = propagate


def rendered(renderable: Any, width: int = 100) -> str:
    """The plain text of a rich renderable (a table), as the console prints it but without colours."""
    from rich.console import Console

    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, force_terminal=False, legacy_windows=False).print(renderable)
    return buffer.getvalue().rstrip("\n")


@rank_zero_only
def info_on_rank_zero(logger: logging.Logger, message: str) -> None:
    """``logger.info(message)`` on the global rank 0 only (each rank would repeat it)."""
    logger.info(message)


@rank_zero_only
def warning_on_rank_zero(logger: logging.Logger, message: str) -> None:
    """``logger.warning(message)`` on the global rank 0 only."""
    logger.warning(message)
