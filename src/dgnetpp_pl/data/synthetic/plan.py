"""Which files one synthetic domain holds: train and test identities in their cameras, distractors and junk."""

from __future__ import annotations

from dataclasses import dataclass

from dgnetpp_pl.data.synthetic.spec import SyntheticDomainSpec
from dgnetpp_pl.data.synthetic.streams import STREAM_PLAN, stream_rng


@dataclass(frozen=True)
class Job:
    """One file of a domain: where it goes and the keys its image is rendered from."""

    folder: str
    filename: str
    kind: str  # person | distractor | junk
    pid: int  # person: the identity; distractor / junk: running index
    cam: int  # 1-based
    shot: int  # index of the image of (pid, cam)


def plan_domain(spec: SyntheticDomainSpec, seed: int) -> list[Job]:
    """Every file of the domain: train and test ids (each in >= 2 cameras), junk and distractors."""
    jobs: list[Job] = []
    low, high = spec.images_per_id_per_cam

    def add(folder: str, kind: str, pid: int, cam: int, shot: int) -> None:
        label = "-1" if kind == "junk" else f"{0 if kind == 'distractor' else pid:04d}"
        name = f"{label}_c{cam}s1_{len(jobs):06d}_00.jpg"
        jobs.append(Job(folder, name, kind, pid, cam, shot))

    test_pids = range(spec.num_train_ids + 1, spec.num_train_ids + spec.num_test_ids + 1)
    for pid in [*range(1, spec.num_train_ids + 1), *test_pids]:
        rng = stream_rng(seed, spec.name, STREAM_PLAN, pid)
        cams = [int(c) + 1 for c in rng.permutation(spec.num_cams)[: rng.integers(2, spec.num_cams + 1)]]
        counts = [int(rng.integers(low, high + 1)) for _ in cams]
        if pid <= spec.num_train_ids:
            for cam, count in zip(cams, counts):
                for shot in range(count):
                    add("bounding_box_train", "person", pid, cam, shot)
            continue
        # Query: the first image of 1-2 cameras; at least one camera stays wholly in the gallery.
        num_query_cams = min(int(rng.integers(1, 3)), len(cams) - 1)
        for i, (cam, count) in enumerate(zip(cams, counts)):
            for shot in range(count):
                add(
                    "query" if i < num_query_cams and shot == 0 else "bounding_box_test",
                    "person",
                    pid,
                    cam,
                    shot,
                )
    plan_rng = stream_rng(seed, spec.name, STREAM_PLAN, 0)
    for kind, count in (("distractor", spec.num_distractors), ("junk", spec.num_junk)):
        for index in range(count):
            add("bounding_box_test", kind, index, int(plan_rng.integers(1, spec.num_cams + 1)), 0)
    return jobs
