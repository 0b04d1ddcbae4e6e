"""The built-in synthetic cross-domain dataset: determinism, what the seed draws, identity structure, layout, the
per-spec cache that is never replaced under a reader, and worker processes that never fork the caller."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from dgnetpp_pl.data.datasets import DatasetError, Market1501
from dgnetpp_pl.data.synthetic import (
    MARKER,
    SMALL_SIZES,
    SOURCE_STYLE,
    TARGET_STYLE,
    SyntheticDomainSpec,
    cache,
    generate_domain,
    make_identity,
    make_synthetic_pair,
    read_marker,
    render_image,
    spec_digest,
    synthetic_domain_dir,
)
from dgnetpp_pl.data.synthetic.cameras import make_camera, render_scene
from dgnetpp_pl.data.synthetic.plan import plan_domain
from dgnetpp_pl.data.synthetic.pool import write_in_processes

SMALL_SOURCE = SOURCE_STYLE.with_overrides(SMALL_SIZES)
SMALL_TARGET = TARGET_STYLE.with_overrides(SMALL_SIZES)
SRC = str(Path(__file__).resolve().parents[1] / "src")


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.jpg"))}


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(tmp_path: Path) -> None:
    a = generate_domain(tmp_path / "a", SMALL_TARGET, seed=3, workers=1)
    b = generate_domain(tmp_path / "b", SMALL_TARGET, seed=3, workers=2)
    hashes = file_hashes(a)
    assert len(hashes) > 50 and hashes == file_hashes(b)


def test_different_seed_gives_different_images(tmp_path: Path) -> None:
    a = file_hashes(generate_domain(tmp_path / "a", SMALL_SOURCE, seed=0))
    b = file_hashes(generate_domain(tmp_path / "b", SMALL_SOURCE, seed=1))
    assert not set(a.values()) & set(b.values())


def test_the_seed_draws_identities_cameras_and_scenes_not_just_noise(tmp_path: Path, synthetic_data_dir: Path) -> None:
    pids = range(1, 51)
    for spec in (SOURCE_STYLE, TARGET_STYLE):
        assert not {make_identity(spec.name, 0, p) for p in pids} & {make_identity(spec.name, 1, p) for p in pids}
        for cam in range(1, spec.num_cams + 1):
            cams = make_camera(spec, 0, cam), make_camera(spec, 1, cam)
            assert not np.allclose(cams[0].gains, cams[1].gains), "per-camera photometry"
            assert cams[0].horizon != cams[1].horizon and not np.allclose(cams[0].top_colour, cams[1].top_colour)

            def scene(camera, frame: int, spec: SyntheticDomainSpec = spec) -> np.ndarray:
                return render_scene(spec, camera, np.random.default_rng(frame), 64, 32)

            within = max(np.abs(scene(cams[0], k) - scene(cams[0], k + 1)).mean() for k in range(5))
            across = min(np.abs(scene(cams[0], k) - scene(cams[1], k)).mean() for k in range(5))
            assert across > 1.5 * within, f"{spec.name} camera {cam}: the scene itself changes with the seed"
    # Which cameras see whom: read back from the generated files of seed 0 and seed 1.
    seeds = [
        synthetic_domain_dir(synthetic_data_dir, SMALL_SOURCE, 0),
        generate_domain(tmp_path / "s1", SMALL_SOURCE, 1),
    ]
    seen = [{(r.pid, r.camid) for r in Market1501(root).train} for root in seeds]
    assert len(seen[0] ^ seen[1]) > len(seen[0]) / 2


def test_pair_reads_back_as_market1501_with_the_expected_structure(synthetic_data_dir: Path) -> None:
    for spec in (SMALL_SOURCE, SMALL_TARGET):
        root = synthetic_domain_dir(synthetic_data_dir, spec, 0)
        ds = Market1501(root)
        assert ds.num_train_pids == spec.num_train_ids and ds.num_train_cams <= spec.num_cams
        gallery_pids = [r.pid for r in ds.gallery]
        assert gallery_pids.count(0) == spec.num_distractors
        assert len(list((root / "bounding_box_test").glob("-1_c*.jpg"))) == spec.num_junk
        test_pids = {r.pid for r in ds.query} | set(gallery_pids) - {0}
        assert len(test_pids) == spec.num_test_ids
        train_pids = {int(Path(r.path).name[:4]) for r in ds.train}
        assert not train_pids & test_pids, "train and test identities are disjoint"
        cams = defaultdict(set)
        for r in [*ds.train, *ds.query, *ds.gallery]:
            cams[int(Path(r.path).name[:4])].add(r.camid)
        assert all(len(cams[pid]) >= 2 for pid in train_pids | test_pids)
        for query in ds.query:  # every query has its identity in the gallery under another camera
            assert any(g.pid == query.pid and g.camid != query.camid for g in ds.gallery)
        low, high = spec.images_per_id_per_cam
        per_id = np.bincount([r.pid for r in ds.train])
        assert per_id.min() >= 2 * low and per_id.max() <= spec.num_cams * high


def test_identities_are_distinct_across_domains_and_splits() -> None:
    pids = range(1, 151)
    identities = [make_identity(name, 0, pid) for name in (SOURCE_STYLE.name, TARGET_STYLE.name) for pid in pids]
    assert len(set(identities)) == len(identities)
    assert make_identity("indoor", 0, 5) == make_identity("indoor", 0, 5)


def render_all_cameras(spec: SyntheticDomainSpec) -> np.ndarray:
    """(cams, ids, H, W, 3) float images of ids 1..20 in every camera."""
    cams = range(1, spec.num_cams + 1)
    return np.array([[render_image(spec, 0, "person", p, c, 0) for p in range(1, 21)] for c in cams], np.float32)


def test_target_domain_differs_in_scenes_and_people_not_in_camera_photometry() -> None:
    source = render_all_cameras(SOURCE_STYLE.with_overrides({"noise": 0.0}))
    target = render_all_cameras(TARGET_STYLE.with_overrides({"noise": 0.0}))
    assert source.shape[2:] == (SOURCE_STYLE.height, SOURCE_STYLE.width, 3)
    photometry = ("color_cast", "exposure", "gamma", "blur", "downsample", "noise")
    assert all(getattr(SOURCE_STYLE, k) == getattr(TARGET_STYLE, k) for k in photometry)

    def top_colour(images: np.ndarray) -> np.ndarray:  # wall vs sky / facade
        return images[:, :, : images.shape[2] // 6].mean(axis=(0, 1, 2, 3))

    def ground_texture(images: np.ndarray) -> float:  # plain floor vs textured ground
        return float(np.abs(np.diff(images[:, :, -10:], axis=-2)).mean())

    def identity_spread(images: np.ndarray) -> float:  # how much one person's images vary across cameras
        return float(np.abs(images - images.mean(axis=0, keepdims=True)).mean())

    assert np.abs(top_colour(target) - top_colour(source)).mean() > 30
    assert ground_texture(target) > 1.15 * ground_texture(source)
    assert identity_spread(target) > 1.05 * identity_spread(source)


# ---------------------------------------------------------------------------------------------------- cache
def test_the_folder_carries_the_seed_and_a_hash_of_the_full_spec(tmp_path: Path, monkeypatch) -> None:
    root = synthetic_domain_dir(tmp_path, SMALL_SOURCE, 3)
    assert root == tmp_path / "synthetic" / f"indoor_s3_{spec_digest(SMALL_SOURCE)}"
    assert spec_digest(SMALL_SOURCE) == spec_digest(SOURCE_STYLE.with_overrides(dict(SMALL_SIZES)))
    variants = [
        SOURCE_STYLE,
        SMALL_SOURCE,
        SMALL_SOURCE.with_overrides({"num_train_ids": 5}),
        SMALL_SOURCE.with_overrides({"height": 64}),
        SMALL_SOURCE.with_overrides({"noise": 0.0}),  # style, not only sizes
    ]
    assert len({spec_digest(spec) for spec in variants}) == len(variants)
    monkeypatch.setattr(cache, "GENERATOR_VERSION", cache.GENERATOR_VERSION + 1)
    assert synthetic_domain_dir(tmp_path, SMALL_SOURCE, 3) != root, "a new generator version gets a new folder"


def test_switching_specs_reuses_each_cache_and_never_touches_the_other(tmp_path: Path) -> None:
    small = make_synthetic_pair(tmp_path, 0, SMALL_SOURCE, SMALL_TARGET)
    smaller = SMALL_SOURCE.with_overrides({"num_train_ids": 5}), SMALL_TARGET.with_overrides({"num_train_ids": 5})
    reader = Market1501(small[0])  # a job reading the first pair while the second is generated
    before = {root: (file_hashes(root), (root / MARKER).stat().st_mtime_ns) for root in small}
    other = make_synthetic_pair(tmp_path, 0, *smaller)
    assert set(other).isdisjoint(small) and Market1501(other[0]).num_train_pids == 5
    assert all(Path(r.path).is_file() for r in (*reader.train, *reader.query, *reader.gallery))
    assert make_synthetic_pair(tmp_path, 0, SMALL_SOURCE, SMALL_TARGET) == small  # switching back: no regeneration
    assert {root: (file_hashes(root), (root / MARKER).stat().st_mtime_ns) for root in small} == before
    assert sorted(p.name for p in (tmp_path / "synthetic").iterdir()) == sorted(p.name for p in (*small, *other))


def test_an_existing_domain_of_another_spec_is_an_error_and_stays_untouched(tmp_path: Path) -> None:
    root = generate_domain(tmp_path / "dom", SMALL_SOURCE, seed=0)
    before = file_hashes(root)
    with pytest.raises(DatasetError, match=r"'.*dom' holds another synthetic domain .*never overwritten"):
        generate_domain(root, SMALL_SOURCE.with_overrides({"num_train_ids": 5}), seed=0)
    with pytest.raises(DatasetError, match=r"seed 0.*never overwritten"):
        generate_domain(root, SMALL_SOURCE, seed=1)
    assert file_hashes(root) == before and Market1501(root).num_train_pids == SMALL_SOURCE.num_train_ids
    assert [p.name for p in tmp_path.iterdir()] == ["dom"], "no staging folder is left behind"


def test_a_domain_another_process_published_meanwhile_is_kept(tmp_path: Path, monkeypatch) -> None:
    root = synthetic_domain_dir(tmp_path, SMALL_SOURCE, 0)
    real_write = cache._write
    published = {}

    def write_then_lose_the_race(staged, workers) -> None:
        real_write(staged, workers)
        monkeypatch.setattr(cache, "_write", real_write)
        generate_domain(root, SMALL_SOURCE, 0)  # the other process finishes first
        published["inode"] = root.stat().st_ino
        published["hashes"] = file_hashes(root)

    monkeypatch.setattr(cache, "_write", write_then_lose_the_race)
    assert generate_domain(root, SMALL_SOURCE, 0) == root
    assert root.stat().st_ino == published["inode"] and file_hashes(root) == published["hashes"]
    assert [p.name for p in root.parent.iterdir()] == [root.name], "the losing copy is removed, nothing else"


def test_two_processes_generating_the_same_pair_both_succeed_with_one_copy(tmp_path: Path) -> None:
    go = tmp_path / "go"
    script = (
        "import sys, time, pathlib\n"
        "from dgnetpp_pl.data.synthetic import SMALL_SIZES, SOURCE_STYLE, TARGET_STYLE, make_synthetic_pair\n"
        f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.005)\n"
        f"roots = make_synthetic_pair({str(tmp_path / 'data')!r}, 0, SOURCE_STYLE.with_overrides(SMALL_SIZES), "
        "TARGET_STYLE.with_overrides(SMALL_SIZES), workers=1)\n"
        "print(*roots)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True) for _ in "ab"]
    go.touch()
    outputs = [proc.communicate(timeout=120)[0].split() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    expected = make_synthetic_pair(tmp_path / "reference", 0, SMALL_SOURCE, SMALL_TARGET)
    assert (
        outputs[0]
        == outputs[1]
        == [str(synthetic_domain_dir(tmp_path / "data", s, 0)) for s in (SMALL_SOURCE, SMALL_TARGET)]
    )
    for root, reference in zip(outputs[0], expected):
        assert file_hashes(Path(root)) == file_hashes(reference)
    assert sorted(p.name for p in (tmp_path / "data" / "synthetic").iterdir()) == sorted(
        Path(r).name for r in outputs[0]
    )


def test_staging_folders_of_dead_processes_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    root = synthetic_domain_dir(tmp_path, SMALL_SOURCE, 0)
    host = cache.socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = root.with_name(f"{root.name}.tmp-{host}-{dead.pid}-0123abcd")
    live = root.with_name(f"{root.name}.tmp-{host}-{os.getppid()}-0123abcd")
    elsewhere = root.with_name(f"{root.name}.tmp-another-host-{dead.pid}-0123abcd")
    for folder in (stale, live, elsewhere):
        (folder / "query").mkdir(parents=True)
    generate_domain(root, SMALL_SOURCE, 0)
    assert not stale.exists() and live.exists() and elsewhere.exists()


def test_refuses_to_overwrite_a_folder_it_did_not_create(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match=r"not a generated synthetic domain"):
        generate_domain(tmp_path / "mine", SMALL_SOURCE)
    assert (tmp_path / "mine" / "notes.txt").exists()


# ------------------------------------------------------------------------------------------------ workers
def test_workers_start_without_forking_this_process(tmp_path: Path, monkeypatch) -> None:
    import torch  # noqa: F401  (as in a training run: torch is loaded when the data is generated)

    def no_fork() -> int:
        raise AssertionError("the generator forked a process that has torch loaded")

    monkeypatch.setattr(os, "fork", no_fork)
    root = generate_domain(tmp_path / "dom", SMALL_SOURCE, seed=5, workers=2)
    assert json.loads((root / MARKER).read_text())["seed"] == 5
    assert len(file_hashes(root)) == len(plan_domain(SMALL_SOURCE, 5))


def test_a_pair_is_written_by_one_set_of_workers(tmp_path: Path, monkeypatch) -> None:
    calls = []
    real = cache.write_in_processes

    def counted(staged, workers: int) -> None:
        calls.append(([spec.name for _, spec, _ in staged], workers))
        real(staged, workers)

    monkeypatch.setattr(cache, "write_in_processes", counted)
    roots = make_synthetic_pair(tmp_path, 4, SMALL_SOURCE, SMALL_TARGET, workers=2)
    assert calls == [(["indoor", "outdoor"], 2)]
    assert [read_marker(root)["spec"]["name"] for root in roots] == ["indoor", "outdoor"]


def test_workers_run_the_callers_copy_of_the_package(tmp_path: Path) -> None:
    script = (  # the caller found the package through a path it added at run time, as a notebook may
        f"import sys; sys.path.insert(0, {SRC!r})\n"
        "from dgnetpp_pl.data.synthetic import SMALL_SIZES, TARGET_STYLE, generate_domain\n"
        f"generate_domain({str(tmp_path / 'dom')!r}, TARGET_STYLE.with_overrides(SMALL_SIZES), 2, workers=2)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, check=True, capture_output=True)
    assert file_hashes(tmp_path / "dom") == file_hashes(generate_domain(tmp_path / "ref", SMALL_TARGET, 2, workers=1))


def test_the_generator_and_the_data_package_do_not_import_torch() -> None:
    script = (
        "import sys\n"
        "import dgnetpp_pl.data.synthetic.pool, dgnetpp_pl.data\n"
        "from dgnetpp_pl.data import SyntheticDomainSpec, Market1501, DatasetError\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'pytorch_lightning') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out == "[]\n"
    from dgnetpp_pl.data import CrossDomainDataModule, __all__  # the lazy names resolve on first use

    assert CrossDomainDataModule.__module__ == "dgnetpp_pl.data.datamodule"
    assert all(getattr(importlib.import_module("dgnetpp_pl.data"), name) is not None for name in __all__)


def test_a_failing_worker_is_an_error_quoting_its_stderr(tmp_path: Path) -> None:
    missing = tmp_path / "not_created"  # its split folders do not exist, so the first save fails
    with pytest.raises(
        RuntimeError, match=r"(?s)worker [01] of 2 failed \(exit code 1\).*not_created.*FileNotFoundError"
    ):
        write_in_processes([(missing, SMALL_SOURCE, 0)], 2)


def test_spec_validation_and_overrides() -> None:
    with pytest.raises(ValueError, match=r"unknown synthetic setting\(s\) \['num_ids'\]; valid: .*num_train_ids"):
        SOURCE_STYLE.with_overrides({"num_ids": 3})
    with pytest.raises(ValueError, match="num_cams"):
        SyntheticDomainSpec(name="x", num_cams=1)
    assert SOURCE_STYLE.with_overrides({"images_per_id_per_cam": [2, 4]}).images_per_id_per_cam == (2, 4)
    with pytest.raises(ValueError, match="different names"):
        make_synthetic_pair("unused", source=SOURCE_STYLE, target=SOURCE_STYLE)
