"""Human-facing summaries: the before/after table logged at the end of a run (console and the run's log file),
and the sweep summary file, which the jobs of a multirun rebuild together from their own row files."""

from __future__ import annotations

import csv
import io
import logging
import warnings
from pathlib import Path
from typing import Any

from rich.table import Table

from dgnetpp_pl.atomic_io import ResultFileError, atomic_write, read_json, write_json
from dgnetpp_pl.run_log import rendered
from dgnetpp_pl.runlock import RunLock

log = logging.getLogger(__name__)


def _pick(result: dict[str, Any], key: str) -> float | None:
    value = result.get(f"test/{key}")
    return None if value is None else float(value)


def summary_rows(results: dict[str, Any], labels: dict[str, str]) -> list[tuple[str, float | None, float | None]]:
    """(model, target mAP, target Rank-1) per stage on the target test split, as fractions (None: not tested)."""
    return [(labels.get(s, s), _pick(r, "mAP"), _pick(r, "Rank-1")) for s, r in results.items()]


def summary_table(results: dict[str, Any], labels: dict[str, str]) -> Table:
    """The target metrics of each stage's final weights on the target test split, in percent."""
    table = Table(title="Target test split, final weights of each stage")
    for col in ("model", "target mAP", "target Rank-1"):
        table.add_column(col)
    for name, m, r1 in summary_rows(results, labels):
        table.add_row(name, "-" if m is None else f"{100 * m:.1f}", "-" if r1 is None else f"{100 * r1:.1f}")
    return table


def log_summary(results: dict[str, Any], labels: dict[str, str]) -> str:
    """Log the table of :func:`summary_table` and where the outputs are (checkpoint, swap grids, logs); returns
    the logged text."""
    lines = [rendered(summary_table(results, labels))]
    last = list(results.values())[-1] if results else {}
    for key, label in (("ckpt", "checkpoint"), ("swap_grids", "swap grids"), ("output_dir", "logs")):
        if key in last and Path(last[key]).exists():  # no swap grids without a validation pass
            lines.append(f"{label}: {last[key]}")
    text = "\n".join(lines)
    log.info(text)
    return text


SUMMARY_ROWS = ".summary_rows"  # one JSON file per job, in the sweep folder


def add_sweep_row(sweep_dir: str | Path, job: int, row: dict[str, Any], wait_s: float = 120.0) -> Path:
    """Record one job's row and rebuild ``<sweep_dir>/summary.csv`` from every job's row; returns the CSV path.

    Each job writes only its own row file, and the CSV is rebuilt under a lock and replaced atomically, so jobs
    that finish at the same time (parallel launchers, other hosts) lose no rows. Rows are sorted by job number.
    """
    sweep_dir = Path(sweep_dir)
    write_json(sweep_dir / SUMMARY_ROWS / f"{int(job):06d}.json", {"job": int(job), **row})
    path = sweep_dir / "summary.csv"
    # Held for milliseconds; a holder gone from another host is presumed dead after a minute.
    with RunLock(sweep_dir, name=".summary.lock", what="sweep summary").acquire(wait_s=wait_s, stale_after_s=60.0):
        rows = []
        for row_file in sorted((sweep_dir / SUMMARY_ROWS).glob("*.json")):
            try:
                rows.append(read_json(row_file, what="sweep summary row"))
            except ResultFileError as err:
                warnings.warn(f"{err} The summary skips it.", stacklevel=2)
        rows.sort(key=lambda r: int(r["job"]))
        fields = list(dict.fromkeys(k for r in rows for k in r))

        def write(fh: Any) -> None:
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=fields)
            writer.writeheader()
            writer.writerows({k: str(v) for k, v in r.items()} for r in rows)
            fh.write(text.getvalue().encode())

        atomic_write(path, write)
    return path


def write_sweep_summary(cfg: Any, results: dict[str, Any]) -> Path | None:
    """In a Hydra multirun, add this job's overrides and final metrics to ``<sweep dir>/summary.csv``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    last = list(results.values())[-1] if results else {}
    row = {
        "overrides": " ".join(hc.overrides.task),
        "output_dir": hc.runtime.output_dir,
        **{k: v for k, v in last.items() if isinstance(v, float)},
    }
    return add_sweep_row(hc.sweep.dir, int(hc.job.num), row)
