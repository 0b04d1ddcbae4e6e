"""Writes a share of the planned images of one or more synthetic domains as JPEG files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dgnetpp_pl.data.synthetic.plan import Job, plan_domain
from dgnetpp_pl.data.synthetic.render import render_image
from dgnetpp_pl.data.synthetic.spec import SyntheticDomainSpec

JPEG_QUALITY = 92
SPLIT_FOLDERS = ("bounding_box_train", "query", "bounding_box_test")

# One domain to write: (output folder, spec, data seed).
Domain = tuple[Path, SyntheticDomainSpec, int]


def planned_jobs(domains: Sequence[Domain]) -> list[tuple[Domain, Job]]:
    """Every image of ``domains`` in a fixed order: domain by domain, each in its plan's order."""
    return [(domain, job) for domain in domains for job in plan_domain(domain[1], domain[2])]


def write_share(domains: Sequence[Domain], index: int, count: int) -> int:
    """Render and write images ``index, index + count, ...`` of :func:`planned_jobs`; return how many.

    Each image depends only on its own keys, so the files are the same whatever ``count`` is.
    """
    jobs = planned_jobs(domains)[index::count]
    for (out, spec, seed), job in jobs:
        image = render_image(spec, seed, job.kind, job.pid, job.cam, job.shot)
        image.save(out / job.folder / job.filename, format="JPEG", quality=JPEG_QUALITY)
    return len(jobs)
