"""Runs :func:`write_share` in worker processes without forking the caller, which may have torch loaded.

Each worker is a fresh interpreter that imports only this package (numpy and PIL), given its share on stdin
as JSON. It gets the caller's ``sys.path`` and checks that it imported the caller's copy of the package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import dgnetpp_pl
from dgnetpp_pl.data.synthetic.spec import SyntheticDomainSpec
from dgnetpp_pl.data.synthetic.writer import Domain, write_share

_BOOTSTRAP = (
    "import json, sys; task = json.load(sys.stdin); sys.path[:] = task['sys_path']; "
    "from dgnetpp_pl.data.synthetic.pool import run_task; run_task(task)"
)
_STDERR_TAIL = 4000  # characters of a failed worker's stderr quoted in the error
# glibc malloc maps and unmaps every image-sized array in a fresh interpreter; keeping freed memory in the heap
# renders ~15% faster (as fast as in a process with torch loaded). These are the workers' own settings.
_WORKER_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def run_task(task: dict[str, Any]) -> None:
    """Worker side: write the share that ``task`` (see :func:`write_in_processes`) names."""
    if os.path.realpath(dgnetpp_pl.__file__) != task["package"]:
        raise RuntimeError(f"worker imported {dgnetpp_pl.__file__}, not the caller's {task['package']}")
    domains = [(Path(out), SyntheticDomainSpec(**spec), int(seed)) for out, spec, seed in task["domains"]]
    write_share(domains, task["index"], task["count"])


def write_in_processes(domains: Sequence[Domain], workers: int) -> None:
    """Write every image of ``domains`` with ``workers`` worker processes; an error quotes a failed one's stderr."""
    if not sys.executable:
        raise RuntimeError("synthetic data: cannot start worker processes (sys.executable is empty); use workers=1.")
    plain = [[str(out), asdict(spec), seed] for out, spec, seed in domains]
    package = os.path.realpath(dgnetpp_pl.__file__)
    path = [os.path.abspath(entry) for entry in sys.path]
    home = os.path.dirname(os.path.dirname(package))  # found by a path the caller may have added at run time
    if home not in map(os.path.realpath, path):
        path.insert(0, home)
    env = {**_WORKER_MALLOC, **os.environ}
    procs: list[tuple[subprocess.Popen, Any]] = []
    try:
        for index in range(workers):
            task = {"sys_path": path, "package": package, "domains": plain, "index": index, "count": workers}
            log = tempfile.TemporaryFile()
            proc = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
            )
            procs.append((proc, log))
            proc.stdin.write(json.dumps(task).encode())
            proc.stdin.close()
        codes = [proc.wait() for proc, _ in procs]
        failed = [index for index, code in enumerate(codes) if code != 0]
        if failed:
            index, code, log = failed[0], codes[failed[0]], procs[failed[0]][1]
            log.seek(0)
            tail = log.read().decode(errors="replace")[-_STDERR_TAIL:]
            folders = ", ".join(str(out) for out, _, _ in domains)
            raise RuntimeError(
                f"synthetic data: worker {index} of {workers} failed (exit code {code}) writing {folders}:\n{tail}"
            )
    finally:
        for proc, log in procs:
            if proc.poll() is None:  # interrupted: do not leave workers writing
                proc.kill()
                proc.wait()
            log.close()
