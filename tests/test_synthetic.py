"""The built-in synthetic cross-domain dataset: determinism, identity structure, layout and caching."""

from __future__ import annotations

import hashlib
import json
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
    generate_domain,
    make_identity,
    make_synthetic_pair,
    render_image,
)

SMALL_SOURCE = SOURCE_STYLE.with_overrides(SMALL_SIZES)
SMALL_TARGET = TARGET_STYLE.with_overrides(SMALL_SIZES)


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


def test_pair_reads_back_as_market1501_with_the_expected_structure(synthetic_data_dir: Path) -> None:
    for spec in (SMALL_SOURCE, SMALL_TARGET):
        root = synthetic_data_dir / "synthetic" / f"{spec.name}_s0"
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
    assert make_identity("indoor", 0, 5) != make_identity("indoor", 1, 5)


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


def test_cache_is_reused_and_a_changed_spec_regenerates_without_mixing(tmp_path: Path) -> None:
    root = generate_domain(tmp_path / "dom", SMALL_SOURCE, seed=0)
    first = file_hashes(root)
    stamp = (root / MARKER).stat().st_mtime_ns
    generate_domain(root, SMALL_SOURCE, seed=0)
    assert (root / MARKER).stat().st_mtime_ns == stamp
    smaller = SMALL_SOURCE.with_overrides({"num_train_ids": 5})
    generate_domain(root, smaller, seed=0)
    assert Market1501(root).num_train_pids == 5
    assert len(file_hashes(root)) < len(first)
    assert json.loads((root / MARKER).read_text())["spec"]["num_train_ids"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["dom"], "no temporary folder is left behind"


def test_refuses_to_overwrite_a_folder_it_did_not_create(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match=r"not a generated synthetic domain"):
        generate_domain(tmp_path / "mine", SMALL_SOURCE)
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_spec_validation_and_overrides() -> None:
    with pytest.raises(ValueError, match=r"unknown synthetic setting\(s\) \['num_ids'\]; valid: .*num_train_ids"):
        SOURCE_STYLE.with_overrides({"num_ids": 3})
    with pytest.raises(ValueError, match="num_cams"):
        SyntheticDomainSpec(name="x", num_cams=1)
    assert SOURCE_STYLE.with_overrides({"images_per_id_per_cam": [2, 4]}).images_per_id_per_cam == (2, 4)
    with pytest.raises(ValueError, match="different names"):
        make_synthetic_pair("unused", source=SOURCE_STYLE, target=SOURCE_STYLE)
