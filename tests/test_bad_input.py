"""Every bad input a user can give, and the message it gets: dataset folders, image files, data and training
config, checkpoints and ``_target_`` classes. Each message names the file, folder, key or value at fault."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from configs import compose_train, small_data_config
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from PIL import Image

from dgnetpp_pl.checkpoints import CheckpointError, load_checkpoint, resolve_resume
from dgnetpp_pl.config import ConfigError, DataConfig, DomainConfig, coerce, validate_config
from dgnetpp_pl.data.datamodule import CrossDomainDataModule
from dgnetpp_pl.data.datasets import (
    MSMT17,
    DatasetError,
    DukeMTMCreID,
    ImageFolderReID,
    Market1501,
    build_dataset,
    load_image,
    verify_images,
)
from dgnetpp_pl.data.records import ImageRecord
from dgnetpp_pl.data.synthetic import SMALL_SIZES, SOURCE_STYLE, synthetic_domain_dir
from dgnetpp_pl.data.torch_datasets import ReIDImageDataset
from dgnetpp_pl.data.transforms import build_test_transform
from dgnetpp_pl.inference import load_model
from dgnetpp_pl.instantiate import instantiate_group, safe_instantiate
from dgnetpp_pl.train import build_datamodule


def compose_cfg(*overrides: str):
    """The training config with ``overrides`` and an output folder (validation needs one outside a Hydra run)."""
    if not any(o.startswith("paths.output_dir=") for o in overrides):
        overrides = (*overrides, "paths.output_dir=unused")
    return compose_train(*overrides)


def start_datamodule(tmp_path: Path, tiny_overrides: list[str], *overrides: str) -> CrossDomainDataModule:
    """The datamodule as ``train`` builds it at start-up, from the tiny preset plus ``overrides``."""
    cfg = validate_config(compose_cfg(*tiny_overrides, f"paths.output_dir={tmp_path}", *overrides))
    dm = build_datamodule(cfg, cfg.stage)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def make_dm(data_dir: Path, **data: Any) -> CrossDomainDataModule:
    """A datamodule built through the Python API on the small synthetic pair, with ``data`` overriding."""
    dm = CrossDomainDataModule(small_data_config(data_dir, **data))
    dm.prepare_data()
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------------ dataset folders
@pytest.mark.parametrize(
    ("cls", "hint"),
    [
        (Market1501, "Zheng et al"),
        (DukeMTMCreID, "withdrawn by its authors in 2019"),
        (MSMT17, "on request from its authors at Peking University"),
    ],
)
def test_missing_root_names_path_subfolders_and_source(tmp_path: Path, cls, hint: str) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as info:
        cls(missing)
    message = str(info.value)
    assert str(missing) in message and hint in message
    expected = "list_query.txt" if cls is MSMT17 else "bounding_box_train"
    assert expected in message and "does not exist" in message
    assert f"a folder named {' or '.join(p + '/' for p in cls.folder_patterns)}" in message


def test_root_without_the_layout_lists_expected_and_found(tmp_path: Path, write_jpeg) -> None:
    write_jpeg(tmp_path / "images" / "a.jpg")
    with pytest.raises(DatasetError, match=r"expected bounding_box_train, query, bounding_box_test .*found images"):
        Market1501(tmp_path)


def test_empty_split_names_the_folder(tmp_path: Path, market_tree, market_files) -> None:
    market_tree(tmp_path, {**market_files, "query": []})
    with pytest.raises(DatasetError, match=r"query split '.*query' holds no usable images"):
        Market1501(tmp_path)


def test_unparsable_name_strict_raises_with_file_name(tmp_path: Path, market_tree, write_jpeg) -> None:
    market_tree(tmp_path)
    write_jpeg(tmp_path / "query" / "holiday_photo.jpg")
    with pytest.raises(DatasetError, match=r"1 entries .*'query/holiday_photo.jpg'.*strict=False"):
        Market1501(tmp_path)


def test_unparsable_names_not_strict_warn_once_with_count_and_skip(tmp_path: Path, market_tree, write_jpeg) -> None:
    market_tree(tmp_path)
    for i in range(7):
        write_jpeg(tmp_path / "bounding_box_test" / f"bad_{i}.jpg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = Market1501(tmp_path, strict=False)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "7 entries" in message and "bad_0.jpg" in message and "and 2 more" in message
    assert len(ds.gallery) == 3


def test_msmt17_bad_list_line_names_the_line(tmp_path: Path, msmt_tree) -> None:
    root = msmt_tree(tmp_path)
    with open(root / "list_train.txt", "a") as handle:
        handle.write("0002/badname.jpg 2\n")
    with pytest.raises(DatasetError, match=r"list_train.txt:3: 0002/badname.jpg 2"):
        MSMT17(root)


def test_image_folder_csv_errors(tmp_path: Path, write_jpeg) -> None:
    write_jpeg(tmp_path / "a.jpg")
    (tmp_path / "records.csv").write_text("file,label\na.jpg,1\n")
    with pytest.raises(DatasetError, match=r"must name the columns path and pid"):
        ImageFolderReID(tmp_path)
    (tmp_path / "records.csv").write_text("path,pid\na.jpg,1\ngone.jpg,2\na.jpg,x\n")
    with pytest.raises(DatasetError, match=r"records.csv:3: missing file 'gone.jpg'.*records.csv:4: pid / camid"):
        ImageFolderReID(tmp_path)
    with pytest.warns(UserWarning, match="2 entries"):
        assert len(ImageFolderReID(tmp_path, strict=False).train) == 1


def test_records_csv_paths_must_stay_inside_the_root(tmp_path: Path, write_jpeg) -> None:
    root = tmp_path / "custom"
    write_jpeg(root / "img" / "a.jpg")
    outside = write_jpeg(tmp_path / "outside.jpg")  # exists, so only the confinement can reject it
    rows = ["img/a.jpg,1", f"{outside},2", "../outside.jpg,3", "img/../../outside.jpg,4", "./img/a.jpg,5"]
    (root / "records.csv").write_text("path,pid\n" + "\n".join(rows) + "\n")
    with pytest.raises(DatasetError) as info:
        ImageFolderReID(root)
    message = str(info.value)
    assert "3 entries do not parse" in message
    for number, path in ((3, str(outside)), (4, "../outside.jpg"), (5, "img/../../outside.jpg")):
        assert f"records.csv:{number}: path '{path}' leaves the dataset root" in message
    with pytest.warns(UserWarning, match="3 entries"):
        ds = ImageFolderReID(root, strict=False)
    assert sorted(Path(r.path).name for r in ds.train) == ["a.jpg", "a.jpg"]
    assert all(Path(r.path).resolve().is_relative_to(root.resolve()) for r in ds.train)


def test_unknown_dataset_name_lists_the_valid_ones(tmp_path: Path, market_tree) -> None:
    market_tree(tmp_path)
    with pytest.raises(DatasetError, match=r"unknown dataset name 'market'.*dukemtmc, folder, market1501, msmt17"):
        build_dataset("market", tmp_path)


# ---------------------------------------------------------------------------------------------- image files
def test_corrupt_or_missing_image_names_the_file(tmp_path: Path, write_jpeg) -> None:
    good = write_jpeg(tmp_path / "good.jpg", size=(16, 16))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    for path in (truncated, garbage, tmp_path / "missing.jpg"):
        with pytest.raises(DatasetError, match=rf"cannot read image '.*{path.name}'.*data.verify=true"):
            load_image(path)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA"])
def test_grayscale_palette_cmyk_and_rgba_images_become_3_channel_tensors(tmp_path: Path, mode: str) -> None:
    rgb = Image.new("RGB", (6, 4), (200, 40, 40))
    path = tmp_path / f"image_{mode}.{'jpg' if mode in ('L', 'CMYK') else 'png'}"
    (rgb.convert("RGBA") if mode == "RGBA" else rgb.convert(mode)).save(path)
    assert Image.open(path).mode == mode
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (6, 4)
    expected = np.asarray(rgb.convert(mode).convert("RGB"), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - expected).max() <= 12  # JPEG round trip
    item = ReIDImageDataset([ImageRecord(str(path), 1, 0)], build_test_transform(8, 4))[0]
    assert item["image"].shape == (3, 8, 4) and item["image"].dtype == torch.float32


def test_verify_images_reports_every_bad_file(tmp_path: Path, market_tree) -> None:
    ds = Market1501(market_tree(tmp_path))
    bad = [ds.train[1].path, ds.gallery[2].path]
    Path(bad[0]).write_bytes(b"\xff\xd8\xff broken")
    Path(bad[1]).write_bytes(Path(ds.train[0].path).read_bytes()[:100])
    problems = verify_images([*ds.train, *ds.query, *ds.gallery], workers=2)
    assert [path for path, _ in problems] == bad
    assert all(reason for _, reason in problems)


def test_datamodule_verify_lists_every_unreadable_image(tmp_path: Path, synthetic_data_dir: Path) -> None:
    copy = tmp_path / "market"
    shutil.copytree(synthetic_domain_dir(synthetic_data_dir, SOURCE_STYLE.with_overrides(SMALL_SIZES), 0), copy)
    ds = Market1501(copy)
    bad = [ds.train[3].path, ds.query[0].path, ds.gallery[-1].path]
    for path in bad:
        Path(path).write_bytes(b"broken")
    source = DomainConfig(name="market1501", root=str(copy))
    with pytest.raises(DatasetError, match=r"3 unreadable image\(s\); replace or remove them") as info:
        make_dm(synthetic_data_dir, source=source, verify=True)
    assert all(path in str(info.value) for path in bad)


# ------------------------------------------------------------------------------------------- data settings
def test_same_dataset_as_source_and_target_warns_at_start_up(tmp_path: Path, tiny_overrides: list[str]) -> None:
    with pytest.warns(UserWarning, match=r"data.source and data.target are the same dataset .*indoor_s0.*data.target"):
        start_datamodule(tmp_path, tiny_overrides, "data.target.style=source")


def test_batch_size_larger_than_the_source_identities_is_an_error(tmp_path: Path, tiny_overrides: list[str]) -> None:
    with pytest.raises(DatasetError, match=r"data.batch_size=20 is larger than the 12 source train identities"):
        start_datamodule(tmp_path, tiny_overrides, "data.batch_size=20")


def test_data_settings_name_the_key(synthetic_data_dir: Path) -> None:
    def data(**section: Any) -> DataConfig:  # a data section alone: its root-level interpolations set here
        base = {"data_dir": str(synthetic_data_dir), "synthetic": {"seed": 0}}
        return coerce(DataConfig, OmegaConf.merge(base, section), "data")

    assert data(target={"name": "market1501"}).target.name == "market1501"
    with pytest.raises(ConfigError, match=r"'marketplace' for key 'data.target.name': expected one of .*market1501"):
        data(target={"name": "marketplace"})
    with pytest.raises(ConfigError, match=r"data.source.root is not set: the 'folder' dataset"):
        data(source={"name": "folder"})
    with pytest.raises(ConfigError, match=r"key 'data.source.rot'"):
        data(source={"name": "market1501", "rot": "x"})
    with pytest.raises(ConfigError, match=r"key 'data.synthetic.num_ids'"):
        data(synthetic={"num_ids": 3})
    nowhere = str(synthetic_data_dir / "nowhere")
    with pytest.raises(DatasetError, match=r"data.source: market1501 root '.*nowhere' does not exist"):
        make_dm(synthetic_data_dir, source=DomainConfig(name="market1501", root=nowhere))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pseudo_label.k=0", r"'pseudo_label.k': must be >= 1"),
        ("pseudo_label.every_n_epochs=0", r"'pseudo_label.every_n_epochs': must be >= 1"),
        ("data.batch_size=0", r"'data.batch_size': must be >= 1"),
        ("data.test_batch_size=-1", r"'data.test_batch_size': must be >= 1"),
        ("model.loss.lambda_cyc=nan", r"'model.loss.lambda_cyc': must be a finite number >= 0"),
        ("model.loss.recon_x=-1", r"'model.loss.recon_x': must be a finite number >= 0"),
        ("model.optim.adapt.lr_app=-0.1", r"'model.optim.adapt.lr_app': must be a finite rate >= 0"),
        ("data.height=66", r"'data.height': must be a multiple of 4"),
        ("data.width=30", r"'data.width': must be a multiple of 4"),
        ("data.val_split=1.0", r"'data.val_split': must be in \[0, 1\)"),
        ("stage=student", r"'student' for key 'stage': expected one of \['teacher', 'source', 'adapt'\]"),
        ("model.appearance.arch=vgg16", r"key 'model.appearance.arch': expected one of .*resnet50"),
        ("model.loss.domain_reduction=max", r"key 'model.loss.domain_reduction': expected one of \['mean', 'sum'\]"),
        ("adapt.warmup_epochs=9", r"adapt.warmup_epochs=9 exceeds adapt.max_epochs"),
        ("model.decoder.n_res=3", r"model.decoder.n_res=3 must equal model.structure.n_res=4"),
        ("model.structure.aspp_dilations=[1,2,8]", r"aspp_dilations=\[1, 2, 8\]: each must be smaller than .* \(8 for"),
        ("data.target.combine_train_val=false", r"data.target.combine_train_val applies to msmt17 only"),
        ("pseudo_label=dbscan", None),
        ("pseudo_label.method=dbscan", r"pseudo_label.max_clusters must be >= 1 with pseudo_label.method=dbscan"),
    ],
)
def test_invalid_values_are_rejected_at_start_up_naming_the_key(override: str, message: str | None) -> None:
    cfg = compose_cfg("experiment=demo", override)
    if message is None:  # the valid neighbour of an invalid case
        assert validate_config(cfg).pseudo_label.max_clusters == 4000
        return
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


# ---------------------------------------------------------------------------------------------- the config
def test_unknown_key_fails_naming_it() -> None:
    cfg = OmegaConf.to_container(compose_cfg("experiment=demo"))
    cfg["model"]["loss"]["lambda_cyk"] = 3.0  # e.g. from a hand-edited dict
    with pytest.raises(ConfigError, match="model.loss.lambda_cyk"):
        validate_config(cfg)


def test_unknown_override_is_rejected_at_compose() -> None:
    with pytest.raises(ConfigCompositionException, match="lambda_cyk"):
        compose_cfg("experiment=demo", "model.loss.lambda_cyk=3")


def test_wrong_type_fails_naming_the_key() -> None:
    with pytest.raises(ConfigCompositionException, match=r"data.batch_size=many") as info:
        compose_cfg("experiment=demo", "data.batch_size=many")
    assert "full_key: data.batch_size" in str(info.value.__cause__)
    cfg = OmegaConf.to_container(compose_cfg("experiment=demo"))
    cfg["data"]["batch_size"] = "many"
    with pytest.raises(ConfigError, match=r"Invalid configuration at key 'data.batch_size'"):
        validate_config(cfg)


def test_invalid_choice_fails_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"Invalid value 'spectral' for key 'pseudo_label.method'"):
        validate_config(compose_cfg("experiment=demo", "pseudo_label.method=spectral"))


def test_foreign_target_is_refused_by_instantiate(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"Refusing to instantiate 'os.system' at 'callbacks.evil'"):
        safe_instantiate({"_target_": "os.system", "command": "true"}, ["dgnetpp_pl", "torch"], "callbacks.evil")
    nested = {"_target_": "pytorch_lightning.callbacks.LambdaCallback", "_args_": [{"_target_": "subprocess.call"}]}
    with pytest.raises(ConfigError, match=r"'subprocess.call' at 'callbacks.nested._args_\[0\]': no _target_ is"):
        safe_instantiate(nested, ["pytorch_lightning"], "callbacks.nested")
    evil = ["+callbacks.evil._target_=subprocess.call", "+callbacks.evil.args=[touch,pwned]"]
    cfg = compose_cfg("experiment=demo", f"paths.output_dir={tmp_path}", *evil)
    with pytest.raises(ConfigError, match=r"'subprocess.call' at 'callbacks.evil'.*allowed_targets"):
        instantiate_group(cfg.callbacks, cfg.allowed_targets, "callbacks")
    with pytest.raises(ConfigError, match=r"'torch.nn.Identity' at 'callbacks.ok': .* is not a subclass of"):
        safe_instantiate({"_target_": "torch.nn.Identity"}, ["torch"], "callbacks.ok")
    obj = safe_instantiate(
        {"_target_": "pytorch_lightning.callbacks.LearningRateMonitor"}, ["pytorch_lightning"], "callbacks.ok"
    )
    assert obj.__class__.__name__ == "LearningRateMonitor"


# ---------------------------------------------------------------------------------------------- checkpoints
class Payload:
    """Unpickling this would call ``print``: what a malicious checkpoint does with ``os.system``."""

    def __reduce__(self) -> tuple[Callable, tuple[str]]:
        return print, ("payload ran",)


def test_bytes_that_are_not_a_checkpoint_name_the_file(tmp_path: Path) -> None:
    not_checkpoints = {
        "lfs_pointer.ckpt": b"version https://git-lfs.github.com/spec/v1\noid sha256:0123abcd\nsize 107584955\n",
        "hparams.ckpt": b"hyper_parameters:\n  stage: adapt\n",  # torch.load raised a bare KeyError on this
        "empty.ckpt": b"",
    }
    for name, data in not_checkpoints.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"{name} is truncated or corrupt .*earlier checkpoint"):
            load_checkpoint(tmp_path / name)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match=r"other.ckpt holds no 'state_dict'; it is not a dgnetpp_pl checkpoint"):
        load_checkpoint(tmp_path / "other.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "bare.ckpt")
    with pytest.raises(CheckpointError, match=r"bare.ckpt has no model hyper-parameters"):
        load_model(tmp_path / "bare.ckpt")


def test_pickled_code_in_a_checkpoint_is_refused_without_running_it(tmp_path: Path, capsys) -> None:
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "extra": Payload()}, path)
    capsys.readouterr()
    with pytest.raises(CheckpointError, match=r"foreign.ckpt holds a pickled object \(print\) that safe loading"):
        load_checkpoint(path)
    assert "payload ran" not in capsys.readouterr().out


def test_resume_from_a_corrupt_or_missing_checkpoint_names_the_file(tmp_path: Path) -> None:
    stage_dir = tmp_path / "checkpoints" / "adapt"
    stage_dir.mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"ckpt_path=last: nothing to resume in .*adapt"):
        resolve_resume("last", stage_dir)  # nothing saved: an error, not a fresh start
    (stage_dir / "last.ckpt").write_bytes(b"PK\x03\x04 cut short by a full disk")
    with pytest.raises(CheckpointError, match=r"adapt/last.ckpt is truncated or corrupt"):
        resolve_resume("last", stage_dir)
    with pytest.raises(CheckpointError, match=r"adapt/epoch003.ckpt does not exist"):
        resolve_resume(str(stage_dir / "epoch003.ckpt"), stage_dir)
