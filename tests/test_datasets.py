"""Dataset readers on tiny fake trees in each official layout (bad input: ``test_bad_input.py``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dgnetpp_pl.data.datasets import (
    MSMT17,
    DatasetError,
    DukeMTMCreID,
    ImageFolderReID,
    Market1501,
    build_dataset,
    dataset_named,
    parse_market_name,
)


def test_parse_market_name_accepts_both_official_forms_and_rejects_camera_zero() -> None:
    assert parse_market_name("0002_c1s1_000451_03.jpg") == (2, 0)
    assert parse_market_name("0005_c2_f0046985.jpg") == (5, 1)
    assert parse_market_name("-1_c3s1_000401_03.jpg") == (-1, 2)
    assert parse_market_name("0005_c0_f0046985.jpg") is None
    assert parse_market_name("person5.jpg") is None
    assert parse_market_name("0002_c1s1_000451_03.PNG") == (2, 0), "every image extension of the package"
    assert parse_market_name("0002_c1s1_000451_03.txt") is None


def test_market_counts_relabelling_and_camids(tmp_path: Path, market_tree) -> None:
    market_tree(tmp_path)
    (tmp_path / "bounding_box_test" / "Thumbs.db").write_bytes(b"junk")  # ships with the archive
    ds = Market1501(tmp_path)
    assert ds.root == tmp_path.resolve()
    assert len(ds.train) == 5 and len(ds.query) == 2 and len(ds.gallery) == 3
    assert ds.num_train_pids == 3 and ds.num_train_cams == 6
    by_name = {Path(r.path).name: r for r in ds.train}
    assert by_name["0002_c1s1_000451_03.jpg"].pid == 0
    assert by_name["0007_c3s3_015000_02.jpg"].pid == 1
    assert by_name["0012_c6s2_020000_01.jpg"].pid == 2 and by_name["0012_c6s2_020000_01.jpg"].camid == 5
    assert sorted(r.pid for r in ds.query) == [3, 5]  # original pids
    assert sorted(r.pid for r in ds.gallery) == [0, 3, 5]
    assert {r.camid for r in ds.gallery if r.pid == 5} == {4}


def test_market_pid_zero_is_skipped_outside_the_gallery(tmp_path: Path, market_tree, market_files) -> None:
    market_files["query"].append("0000_c2s1_000700_00.jpg")
    market_files["bounding_box_train"].append("0000_c2s1_000800_00.jpg")
    ds = Market1501(market_tree(tmp_path, market_files))
    assert 0 not in {r.pid for r in ds.query} and ds.num_train_pids == 3


def test_dataset_found_one_level_down(tmp_path: Path, market_tree) -> None:
    market_tree(tmp_path / "Market-1501-v15.09.15")
    (tmp_path / "unrelated").mkdir()
    ds = Market1501(tmp_path)
    assert ds.root == (tmp_path / "Market-1501-v15.09.15").resolve() and len(ds.train) == 5


def test_duke_names_without_sequence(tmp_path: Path, market_tree) -> None:
    files = {
        "bounding_box_train": ["0005_c2_f0046985.jpg", "0005_c8_f0046999.jpg", "0009_c1_f0000001.jpg"],
        "query": ["0011_c3_f0000002.jpg"],
        "bounding_box_test": ["0011_c4_f0000003.jpg"],
    }
    ds = DukeMTMCreID(market_tree(tmp_path, files))  # Duke ships in the Market layout
    assert [(r.pid, r.camid) for r in ds.train] == [(0, 1), (0, 7), (1, 0)]
    assert ds.num_train_cams == 8


def test_msmt17_lists_cameras_and_train_val_switch(tmp_path: Path, msmt_tree) -> None:
    root = msmt_tree(tmp_path / "MSMT17_V1")
    combined = MSMT17(tmp_path)  # one level down
    assert len(combined.train) == 3 and combined.num_train_pids == 2
    assert [r.camid for r in combined.train] == [0, 14, 6]
    assert combined.query[0].camid == 14 and combined.query[0].path == str(
        root.resolve() / "test/0000/0000_000_15_0303morning_0001_0.jpg"
    )
    assert [(r.pid, r.camid) for r in combined.gallery] == [(0, 1), (1, 9)]
    train_only = MSMT17(root, combine_train_val=False)
    assert len(train_only.train) == 2 and train_only.num_train_pids == 1


def test_image_folder_identity_subfolders(tmp_path: Path, write_jpeg) -> None:
    write_jpeg(tmp_path / "bob" / "x1.jpg")
    write_jpeg(tmp_path / "bob" / "0001_c3s1_000001_00.jpg")  # Market-style name gives the camera
    write_jpeg(tmp_path / "alice" / "y.png")
    ds = ImageFolderReID(tmp_path)
    assert [(Path(r.path).name, r.pid, r.camid) for r in ds.train] == [
        ("y.png", 0, 0),
        ("0001_c3s1_000001_00.jpg", 1, 2),
        ("x1.jpg", 1, 0),
    ]
    assert ds.query == [] and ds.gallery == []


def test_image_folder_keys_identities_by_the_folder_name_string(tmp_path: Path, write_jpeg) -> None:
    for folder in ("1", "01", "001", "2"):
        write_jpeg(tmp_path / folder / "a.jpg")
    ds = ImageFolderReID(tmp_path)
    labels = {Path(r.path).parent.name: r.pid for r in ds.train}
    assert labels == {"001": 0, "01": 1, "1": 2, "2": 3}, "three people, labelled in sorted order of the names"


def test_image_folder_csv_with_splits(tmp_path: Path, write_jpeg) -> None:
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        write_jpeg(tmp_path / "img" / name)
    (tmp_path / "records.csv").write_text(
        "path,pid,camid,split\nimg/a.jpg,40,1,train\nimg/b.jpg,30,0,train\nimg/c.jpg,40,2,query\nimg/d.jpg,40,,gallery\n"
    )
    ds = ImageFolderReID(tmp_path)
    assert [(r.pid, r.camid) for r in ds.train] == [(1, 1), (0, 0)]
    assert [(r.pid, r.camid) for r in ds.query] == [(40, 2)]
    assert [(r.pid, r.camid) for r in ds.gallery] == [(40, 0)]


def test_build_dataset_registry(tmp_path: Path, market_tree) -> None:
    market_tree(tmp_path)
    assert isinstance(build_dataset("market1501", tmp_path), Market1501)


# ------------------------------------------------------------------------------- benchmarks side by side
def test_each_reader_picks_its_own_benchmark_among_all_three(benchmark_data_dir: Path, benchmark_sizes) -> None:
    assert sorted(p.name for p in benchmark_data_dir.iterdir()) == [
        "DukeMTMC-reID",
        "MSMT17_V1",
        "Market-1501-v15.09.15",
    ]
    for name, tree in benchmark_sizes.items():
        ds = build_dataset(name, benchmark_data_dir)
        assert ds.root == (benchmark_data_dir / str(tree["folder"])).resolve()
        assert ds.num_train_pids == tree["train_ids"]
        distractors = set() if name == "msmt17" else {0}  # MSMT17's test ids start at 0
        assert len({r.pid for r in ds.query}) == len({r.pid for r in ds.gallery} - distractors) == tree["test_ids"]
        assert all(Path(r.path).is_relative_to(ds.root) for r in (*ds.train, *ds.query, *ds.gallery))
        assert {r.camid for r in ds.train} <= set(range(int(tree["cams"])))


def test_msmt17_v2_layout_is_read(tmp_path: Path, benchmark_tree, benchmark_sizes) -> None:
    benchmark_tree(tmp_path, ("market1501", "msmt17"), msmt_version="V2")
    ds = MSMT17(tmp_path)
    assert ds.version == "V2" and ds.root == (tmp_path / "MSMT17_V2").resolve()
    assert ds.num_train_pids == benchmark_sizes["msmt17"]["train_ids"]
    assert all("/mask_train_v2/" in r.path for r in ds.train)
    assert all("/mask_test_v2/" in r.path for r in (*ds.query, *ds.gallery))
    assert MSMT17(tmp_path, combine_train_val=False).num_train_pids == ds.num_train_pids - 2


def test_folder_names_are_matched_case_insensitively_and_owned_by_one_dataset() -> None:
    assert dataset_named("Market-1501-v15.09.15") == dataset_named("market1501") == "market1501"
    assert dataset_named("DukeMTMC-reID") == dataset_named("dukemtmc-reid_copy") == "dukemtmc"
    assert dataset_named("MSMT17_V1") == dataset_named("MSMT17_V2") == dataset_named("msmt17") == "msmt17"
    assert dataset_named("bounding_box_train") is None and dataset_named("my_duke_copy") is None


def test_with_only_market_present_dukemtmc_fails_naming_the_folders_looked_for(tmp_path: Path, benchmark_tree) -> None:
    benchmark_tree(tmp_path, ("market1501",))
    with pytest.raises(DatasetError) as info:
        DukeMTMCreID(tmp_path)
    message = str(info.value)
    assert "dukemtmc not found in" in message and str(tmp_path) in message
    assert "DukeMTMC-reID*/ or DukeMTMCreID*/" in message
    assert "Market-1501-v15.09.15 (a market1501 folder)" in message


def test_an_explicit_root_with_the_layout_wins(tmp_path: Path, market_tree) -> None:
    copy = market_tree(tmp_path / "my_duke_copy")
    market_tree(tmp_path / "DukeMTMC-reID")  # another copy one level up does not matter
    assert DukeMTMCreID(copy).root == copy.resolve()
    assert DukeMTMCreID(tmp_path / "DukeMTMC-reID").root == (tmp_path / "DukeMTMC-reID").resolve()
    market_tree(tmp_path / "market1501" / "Market-1501-v15.09.15")  # torchreid's folder above the dataset
    assert Market1501(tmp_path / "market1501").root == (tmp_path / "market1501" / "Market-1501-v15.09.15").resolve()


def test_a_root_named_as_another_dataset_is_refused(tmp_path: Path, market_tree) -> None:
    market = market_tree(tmp_path / "Market-1501-v15.09.15")
    with pytest.raises(DatasetError, match=r"dukemtmc: root '.*Market-1501-v15.09.15' is named as a market1501 folder"):
        DukeMTMCreID(market)
    with pytest.raises(DatasetError, match=r"is named as a market1501 folder.*only folders named MSMT17\*/"):
        MSMT17(market)
    assert Market1501(market).root == market.resolve()


def test_several_copies_of_one_dataset_ask_to_set_root(tmp_path: Path, market_tree) -> None:
    for name in ("Market-1501", "Market-1501-v15.09.15"):
        market_tree(tmp_path / name)
    with pytest.raises(DatasetError, match=r"several copies .*Market-1501, .*Market-1501-v15.09.15\); set root"):
        Market1501(tmp_path)
    assert Market1501(tmp_path / "Market-1501").root == (tmp_path / "Market-1501").resolve()


def test_a_named_folder_without_the_layout_says_what_it_lacks(tmp_path: Path, benchmark_data_dir: Path) -> None:
    duke = tmp_path / "DukeMTMC-reID"
    shutil.copytree(benchmark_data_dir / "DukeMTMC-reID", duke)
    shutil.rmtree(duke / "query")
    with pytest.raises(DatasetError, match=r"'.*DukeMTMC-reID' is named as a dukemtmc folder but lacks query\."):
        DukeMTMCreID(tmp_path)
    with pytest.raises(DatasetError, match=r"'.*DukeMTMC-reID' is named as a dukemtmc folder but lacks query\."):
        DukeMTMCreID(duke)


# ---------------------------------------------------------------------------------- evaluation targets
def test_identity_folders_are_a_training_source_but_not_an_evaluation_target(tmp_path: Path, write_jpeg) -> None:
    for pid in ("alice", "bob"):
        write_jpeg(tmp_path / pid / "a.jpg")
    ds = ImageFolderReID(tmp_path)
    assert ds.num_train_pids == 2
    with pytest.raises(DatasetError) as info:
        ds.require_eval_splits("data.target")
    message = str(info.value)
    assert message.startswith(f"data.target: folder at '{tmp_path.resolve()}' has no query and no gallery images")
    assert f"add '{tmp_path.resolve() / 'records.csv'}'" in message and "split=query and split=gallery" in message


def test_records_without_gallery_rows_are_not_an_evaluation_target(tmp_path: Path, write_jpeg) -> None:
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        write_jpeg(tmp_path / name)
    (tmp_path / "records.csv").write_text("path,pid,split\na.jpg,1,train\nb.jpg,2,train\nc.jpg,1,query\n")
    with pytest.raises(DatasetError, match=r"data.source: folder at .* has no gallery images.*records.csv'\.$"):
        ImageFolderReID(tmp_path).require_eval_splits("data.source")
    with open(tmp_path / "records.csv", "a") as handle:
        handle.write("a.jpg,1,gallery\n")
    ImageFolderReID(tmp_path).require_eval_splits("data.target")  # query and gallery: no error


def test_benchmarks_are_evaluation_targets(benchmark_data_dir: Path, benchmark_sizes) -> None:
    for name in benchmark_sizes:
        build_dataset(name, benchmark_data_dir).require_eval_splits("data.target")
