"""Human-facing summaries: the before/after table printed at the end of a run, and the sweep summary file."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _pick(result: dict[str, Any], key: str) -> float | None:
    for prefix in ("test", "val"):
        value = result.get(f"{prefix}/{key}")
        if value is not None:
            return float(value)
    return None


def summary_rows(results: dict[str, Any], labels: dict[str, str]) -> list[tuple[str, float | None, float | None]]:
    """(model, target mAP, target Rank-1) per stage, as fractions."""
    return [(labels.get(s, s), _pick(r, "mAP"), _pick(r, "Rank-1")) for s, r in results.items()]


def print_summary(results: dict[str, Any], labels: dict[str, str], console: Console | None = None) -> None:
    """Print the target metrics of each stage (percentages) and where the outputs are."""
    console = console or Console()
    table = Table(title="Target-domain results (final weights of each stage)")
    for col in ("model", "target mAP", "target Rank-1"):
        table.add_column(col)
    for name, m, r1 in summary_rows(results, labels):
        table.add_row(name, "-" if m is None else f"{100 * m:.1f}", "-" if r1 is None else f"{100 * r1:.1f}")
    console.print(table)
    last = list(results.values())[-1] if results else {}
    for key, label in (("ckpt", "checkpoint"), ("swap_grids", "swap grids"), ("output_dir", "logs")):
        if key in last:
            console.print(f"{label}: {last[key]}")


def write_sweep_summary(cfg: Any, results: dict[str, Any]) -> Path | None:
    """In a Hydra multirun, append this job's overrides and final metrics to ``<sweep dir>/summary.csv``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    last = list(results.values())[-1] if results else {}
    row = {
        "job": hc.job.num,
        "overrides": " ".join(hc.overrides.task),
        "output_dir": hc.runtime.output_dir,
        **{k: v for k, v in last.items() if isinstance(v, float)},
    }
    path = Path(hc.sweep.dir) / "summary.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    if path.exists():
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    rows.append({k: str(v) for k, v in row.items()})
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path
