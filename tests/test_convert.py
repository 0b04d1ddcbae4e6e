"""Official DG-Net / DG-Net++ / teacher files <-> our checkpoints: key names against the official code's list,
exact round trips, the adapt stage started from a converted source model, and refused inputs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from configs import typed_train
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dgnetpp_pl.checkpoints import CheckpointError, load_checkpoint
from dgnetpp_pl.config import CONF_DIR, ConfigError, ConvertConfig, ModelConfig, plain
from dgnetpp_pl.convert import (
    convert,
    official_model_to_ours,
    official_states,
    official_teacher_to_ours,
    ours_to_official,
)
from dgnetpp_pl.inference import build_model, load_model, save_model_checkpoint
from dgnetpp_pl.models.teacher import Teacher
from dgnetpp_pl.official_files import find_official_files
from dgnetpp_pl.official_layout import OfficialLayoutError, export_state, teacher_layout
from dgnetpp_pl.teacher_checkpoint import load_teacher
from dgnetpp_pl.train import train

OFFICIAL_KEYS = json.loads((Path(__file__).parent / "data" / "official_keys.json").read_text())
PAPER = OmegaConf.to_container(OmegaConf.structured(ModelConfig), resolve=True)
SIZE = (64, 32)
N_SRC, CAPACITY = 6, 4
# Training bookkeeping, not weights: the official files have no place for it and a conversion starts it afresh.
BOOKKEEPING = {"best_map", "lr_ramped", "nonfinite_steps"}


@pytest.fixture(scope="module")
def small() -> dict:
    return plain(typed_train("experiment=demo").model)


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every float weight and BN statistic moved off its initial value, each by its own noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if key.split(".")[-1] in BOOKKEEPING or not t.is_floating_point():
                continue
            t.add_(0.05 * torch.randn(t.shape, generator=g))
            if key.endswith("running_var"):
                t.abs_().add_(0.5)
    return model


def cli_cfg(**values):
    """The convert CLI's config with `values` set, as Hydra would compose it."""
    values = {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
    return OmegaConf.merge(OmegaConf.structured(ConvertConfig), values)


def state_of(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path).state_dict()


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    assert set(a) == set(b)
    return {k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])}


def shapes(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


# ---------------------------------------------------------------- the official layout
def test_paper_source_model_has_the_official_dgnet_names_and_shapes() -> None:
    model = build_model("source", PAPER, 751, 0, image_size=(256, 128))
    files = official_states(model)
    assert {role: entry for role, (_, entry) in files.items()} == {"gen": "a", "dis": "a", "id": "a"}
    assert shapes(files["gen"][0]) == OFFICIAL_KEYS["gen"]
    assert shapes(files["dis"][0]) == OFFICIAL_KEYS["dis"]
    assert shapes(files["id"][0]) == OFFICIAL_KEYS["id"]


def test_paper_adapt_model_has_the_official_dgnetpp_names_and_shapes() -> None:
    # 700 source ids + 51 clusters in use: the joint classifier has the 751 rows of the listed ft_netABe.
    model = build_model("adapt", PAPER, 700, 60, image_size=(256, 128))
    model.num_target_classes.fill_(51)
    files = official_states(model)
    entries = {role: entry for role, (_, entry) in files.items()}
    assert entries == {"gen_a": "a", "gen_b": "b", "dis_a": "a", "dis_b": "b", "id": "a"}
    for role in ("gen_a", "gen_b"):
        assert shapes(files[role][0]) == OFFICIAL_KEYS["gen"]
    for role in ("dis_a", "dis_b"):
        assert shapes(files[role][0]) == OFFICIAL_KEYS["dis"]
    assert shapes(files["id"][0]) == OFFICIAL_KEYS["id"]


def test_teacher_file_has_the_baseline_names_and_opts(tmp_path: Path) -> None:
    teacher = Teacher(751)
    from dgnetpp_pl.teacher_checkpoint import save_teacher

    written = ours_to_official(save_teacher(teacher, tmp_path / "t.ckpt"), tmp_path / "official")
    assert [p.name for p in written] == ["net_last.pth", "opts.yaml"]
    state = torch.load(written[0], weights_only=True)
    assert shapes(state) == OFFICIAL_KEYS["teacher"]
    assert "stride: 2" in written[1].read_text() and "nclasses: 751" in written[1].read_text()


# ---------------------------------------------------------------- round trips
def test_source_round_trip_gives_identical_tensors(tmp_path: Path, small: dict, caplog) -> None:
    model = perturbed(build_model("source", small, N_SRC, 0, image_size=SIZE))
    ours = save_model_checkpoint(model, tmp_path / "source.ckpt")
    written = ours_to_official(ours, tmp_path / "official", iteration=1234)
    assert sorted(p.name for p in written) == ["dis_00001234.pt", "gen_00001234.pt", "id_00001234.pt"]
    with caplog.at_level(logging.INFO, logger="dgnetpp_pl.convert"):
        back = convert(cli_cfg(src=tmp_path / "official", out=tmp_path / "back.ckpt", image_size=[*SIZE], model=small))[
            0
        ]
    assert differing(model.state_dict(), state_of(back)) == set()
    ckpt = load_checkpoint(back)
    assert ckpt["dgnetpp"]["stage"] == "source" and ckpt["hyper_parameters"]["num_source_ids"] == N_SRC
    assert ckpt["hyper_parameters"]["image_size"] == SIZE
    unused = [r.message for r in caplog.records if "not used" in r.message]
    assert len(unused) == 1 and "model.fc.weight" in unused[0] and "norm.running_mean (x8)" in unused[0]


def test_adapt_round_trip_gives_identical_tensors_for_both_generators(tmp_path: Path, small: dict) -> None:
    model = perturbed(build_model("adapt", small, N_SRC, CAPACITY, image_size=SIZE))
    model.num_target_classes.fill_(CAPACITY)
    assert not torch.equal(model.gen_a.decoder.mlp_w[0][0].weight, model.gen_b.decoder.mlp_w[0][0].weight)
    ours = save_model_checkpoint(model, tmp_path / "adapt.ckpt")
    written = ours_to_official(ours, tmp_path / "official")
    assert sorted(p.name for p in written) == [f"{r}_00000000.pt" for r in ("dis_a", "dis_b", "gen_a", "gen_b", "id")]
    back = official_model_to_ours(
        find_official_files(tmp_path / "official"), tmp_path / "back.ckpt", "auto", N_SRC, small, SIZE
    )
    diff = differing(model.state_dict(), state_of(back))
    # Only the domain discriminator, which the official code never saves, starts afresh.
    assert diff and all(k.startswith("d_dom.") for k in diff)
    hp = load_checkpoint(back)["hyper_parameters"]
    assert (hp["schedule"]["stage"], hp["num_source_ids"], hp["target_capacity"]) == ("adapt", N_SRC, CAPACITY)


def test_unused_classifier_capacity_is_not_written(tmp_path: Path, small: dict) -> None:
    model = perturbed(build_model("adapt", small, N_SRC, CAPACITY, image_size=SIZE))
    model.num_target_classes.fill_(2)  # 2 clusters in use of a capacity of 4
    ours_to_official(save_model_checkpoint(model, tmp_path / "adapt.ckpt"), tmp_path / "official", iteration=7)
    id_state = torch.load(tmp_path / "official" / "id_00000007.pt", weights_only=True)["a"]
    assert id_state["classifier1.classifier.0.weight"].shape[0] == N_SRC + 2
    back = load_model(
        official_model_to_ours(
            find_official_files(tmp_path / "official"), tmp_path / "b.ckpt", "dgnetpp", N_SRC, small, SIZE
        )
    )
    assert back.target_capacity == 2 and int(back.num_target_classes) == 2
    for head in ("head1", "head2"):
        ours, theirs = getattr(model.e_app, head).classifier, getattr(back.e_app, head).classifier
        assert torch.equal(theirs.weight, ours.weight[: N_SRC + 2]) and torch.equal(theirs.bias, ours.bias[: N_SRC + 2])


def test_teacher_round_trip_keeps_weights_and_stride(tmp_path: Path) -> None:
    teacher = perturbed(Teacher(9, last_stride=1)).eval()
    from dgnetpp_pl.teacher_checkpoint import save_teacher

    ours_to_official(save_teacher(teacher, tmp_path / "t.ckpt"), tmp_path / "official")
    back = load_teacher(official_teacher_to_ours(tmp_path / "official" / "net_last.pth", tmp_path / "b.ckpt", 9, None))
    assert back.last_stride == 1  # read from opts.yaml
    assert differing(teacher.state_dict(), back.state_dict()) == set()


def test_old_non_zip_files_convert_the_same(tmp_path: Path, small: dict) -> None:
    model = perturbed(build_model("source", small, N_SRC, 0, image_size=SIZE))
    ours_to_official(save_model_checkpoint(model, tmp_path / "s.ckpt"), tmp_path / "official", iteration=3)
    for path in (tmp_path / "official").glob("*.pt"):  # as PyTorch < 1.6 wrote them
        torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)
    back = official_model_to_ours(
        find_official_files(tmp_path / "official"), tmp_path / "b.ckpt", "dgnet", None, small, SIZE
    )
    assert differing(model.state_dict(), state_of(back)) == set()


def test_missing_batchnorm_counters_are_filled_with_zero(tmp_path: Path, small: dict, caplog) -> None:
    model = perturbed(build_model("source", small, N_SRC, 0, image_size=SIZE))
    ours_to_official(save_model_checkpoint(model, tmp_path / "s.ckpt"), tmp_path / "official", iteration=3)
    path = tmp_path / "official" / "id_00000003.pt"
    state = torch.load(path, weights_only=True)["a"]
    torch.save({"a": {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}}, path)
    with caplog.at_level(logging.INFO, logger="dgnetpp_pl.convert"):
        back = load_model(
            official_model_to_ours(
                find_official_files(tmp_path / "official"), tmp_path / "b.ckpt", "dgnet", None, small, SIZE
            )
        )
    counters = [k for k in back.state_dict() if k.startswith("e_app.") and k.endswith("num_batches_tracked")]
    assert counters and all(int(back.state_dict()[k]) == 0 for k in counters)
    assert any(f"{len(counters)} BatchNorm step counters" in r.message for r in caplog.records)


# ---------------------------------------------------------------- finding the files
def test_newest_iteration_is_found_in_round_folders_and_an_asked_one_too(tmp_path: Path, small: dict) -> None:
    model = perturbed(build_model("adapt", small, N_SRC, CAPACITY, image_size=SIZE))
    ckpt = save_model_checkpoint(model, tmp_path / "a.ckpt")
    run = tmp_path / "outputs" / "best-run"
    ours_to_official(ckpt, run / "0" / "checkpoints", iteration=100)
    ours_to_official(ckpt, run / "1" / "checkpoints", iteration=250)
    assert (find_official_files(run).iteration, find_official_files(run).folder) == (250, run / "1" / "checkpoints")
    assert find_official_files(run, 100).folder == run / "0" / "checkpoints"
    with pytest.raises(CheckpointError, match=r"No official files of iteration 7 .*iterations found: 100, 250"):
        find_official_files(run, 7)


# ---------------------------------------------------------------- starting DG-Net++ from a converted DG-Net model
@pytest.mark.slow
def test_converted_source_model_starts_the_adapt_stage(tmp_path: Path, tiny_source_ckpt: Path, tiny_overrides) -> None:
    model_cfg = typed_train(*tiny_overrides).model
    ours_to_official(tiny_source_ckpt, tmp_path / "dgnet" / "checkpoints", iteration=1)
    converted = official_model_to_ours(
        find_official_files(tmp_path / "dgnet"), tmp_path / "dgnet.ckpt", "auto", None, model_cfg, SIZE
    )
    source = load_checkpoint(tiny_source_ckpt)["state_dict"]
    state = load_checkpoint(converted)["state_dict"]
    assert differing({k: v for k, v in source.items() if k.split(".")[-1] not in BOOKKEEPING},
                     {k: v for k, v in state.items() if k.split(".")[-1] not in BOOKKEEPING}) == set()  # fmt: skip
    # The adapt stage's starting point: both generators are the converted source generator.
    adapt = build_model("adapt", model_cfg, int(state["e_app.head1.classifier.weight"].shape[0]), target_capacity=8)
    adapt.load_source_stage(state)
    for key, value in state.items():
        if key.startswith("gen_a."):
            assert torch.equal(adapt.state_dict()[key], value) and torch.equal(
                adapt.state_dict()["gen_b." + key[6:]], value
            )
    out = tmp_path / "run"
    overrides = [*tiny_overrides, f"paths.output_dir={out}", "stage=adapt", f"init_ckpt={converted}"]
    overrides += ["adapt.max_epochs=1", "trainer.limit_train_batches=1", "test=false"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        results = train(compose(config_name="config", overrides=overrides))
    assert set(results) == {"adapt"}
    assert 0.0 <= results["adapt"]["val/mAP"] <= 1.0
    assert load_checkpoint(results["adapt"]["ckpt"])["dgnetpp"]["stage"] == "adapt"


# ---------------------------------------------------------------- the CLI
def test_cli_schema_rejects_unknown_keys_and_reads_model_overrides() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="convert", overrides=["src=a", "out=b", "model.structure.dim=8", "num_source_ids=702"]
        )
        assert cfg.model.structure.dim == 8 and cfg.num_source_ids == 702 and cfg.to == "ours"
        with pytest.raises(Exception, match="bogus"):
            compose(config_name="convert", overrides=["src=a", "out=b", "bogus=1"])


def test_cli_checks_choices_and_required_keys() -> None:
    with pytest.raises(ConfigError, match="src= is required"):
        convert(cli_cfg(out="x"))
    with pytest.raises(ConfigError, match=r"'to': expected one of \['ours', 'official'\]"):
        convert(cli_cfg(src="a", out="b", to="theirs"))
    with pytest.raises(ConfigError, match="'kind'"):
        convert(cli_cfg(src="a", out="b", kind="pcb"))


@pytest.mark.slow
def test_cli_converts_a_teacher_folder(tmp_path: Path) -> None:
    teacher = perturbed(Teacher(5)).eval()
    folder = tmp_path / "models" / "teacher" / "duke"
    folder.mkdir(parents=True)
    torch.save(export_state(teacher, teacher_layout(teacher)), folder / "net_last.pth")
    (folder / "opts.yaml").write_text("name: ft_ResNet50\nstride: 1\nnclasses: 5\ndroprate: 0.5\n")
    cmd = [
        sys.executable,
        "-m",
        "dgnetpp_pl.convert",
        f"src={folder}",
        f"out={tmp_path / 't.ckpt'}",
        "num_source_ids=5",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model.fc.bias, model.fc.weight" in proc.stdout and "last stride 1" in proc.stdout
    back = load_teacher(tmp_path / "t.ckpt")
    assert back.last_stride == 1 and differing(teacher.state_dict(), back.state_dict()) == set()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "t.ckpt"]  # no run folder


# ---------------------------------------------------------------- refused inputs
@pytest.fixture
def official_source(tmp_path: Path, small: dict) -> Path:
    model = perturbed(build_model("source", small, N_SRC, 0, image_size=SIZE))
    ours_to_official(save_model_checkpoint(model, tmp_path / "s.ckpt"), tmp_path / "official", iteration=1)
    return tmp_path / "official"


def _convert_source(folder: Path, small: dict, **kw) -> Path:
    return official_model_to_ours(
        find_official_files(folder),
        folder.parent / "out.ckpt",
        kw.pop("kind", "auto"),
        kw.pop("num_source_ids", None),
        small,
        SIZE,
    )


def test_a_file_that_is_not_a_checkpoint_is_refused_naming_it(
    official_source: Path, small: dict, tmp_path: Path
) -> None:
    bad = official_source / "id_00000001.pt"
    bad.write_bytes(os.urandom(2000))
    with pytest.raises(CheckpointError, match=f"{bad} is not a PyTorch file of tensors"):
        _convert_source(official_source, small)
    text = tmp_path / "teacher" / "net_last.pth"
    text.parent.mkdir()
    text.write_text("not weights\n")
    with pytest.raises(CheckpointError, match=f"{text} is not a PyTorch file of tensors"):
        official_teacher_to_ours(text, tmp_path / "t.ckpt", None, None)


def test_a_pickle_holding_code_is_refused_and_not_run(official_source: Path, small: dict, tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = official_source / "gen_00000001.pt"
    torch.save({"a": Payload()}, bad)
    with pytest.raises(CheckpointError) as err:
        _convert_source(official_source, small)
    message = str(err.value)
    assert str(bad) in message and "refused: it holds pickled code" in message and "system" in message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message
    assert not marker.exists()
    # A whole pickled module (torch.save(model)) is code too.
    whole = tmp_path / "net_last.pth"
    torch.save(Teacher(3), whole)
    with pytest.raises(CheckpointError, match=f"{whole} is refused: it holds pickled code or objects"):
        official_teacher_to_ours(whole, tmp_path / "t.ckpt", None, None)


def _pcb_state(classes: int) -> dict[str, torch.Tensor]:
    """A PCB model's entries: the ResNet trunk plus six part classifiers `classifier0..5` (bottleneck 256)."""
    state = {
        k: v
        for k, v in export_state(Teacher(classes), teacher_layout(Teacher(classes))).items()
        if not k.startswith("classifier.")
    }
    for part in range(6):
        state[f"classifier{part}.add_block.0.weight"] = torch.zeros(256, 2048)
        state[f"classifier{part}.add_block.0.bias"] = torch.zeros(256)
        state[f"classifier{part}.classifier.0.weight"] = torch.zeros(classes, 256)
    return state


def test_a_pcb_model_is_refused_listing_the_entries(official_source: Path, small: dict, tmp_path: Path) -> None:
    net = tmp_path / "pcb" / "net_last.pth"
    net.parent.mkdir()
    torch.save(_pcb_state(4), net)
    with pytest.raises(OfficialLayoutError) as err:
        official_teacher_to_ours(net, tmp_path / "t.ckpt", None, None)
    message = str(err.value)
    assert str(net) in message and "18 unknown: classifier0.add_block.0.bias" in message
    assert "missing: classifier.add_block.0.bias" in message and "classifier.classifier.0.weight" in message
    # As a DG-Net appearance encoder too.
    torch.save({"a": _pcb_state(N_SRC)}, official_source / "id_00000001.pt")
    with pytest.raises(
        OfficialLayoutError, match=r"id_00000001.pt does not hold the official AppearanceEncoder entries"
    ):
        _convert_source(official_source, small)


def test_another_class_count_than_asked_is_refused(official_source: Path, small: dict, tmp_path: Path) -> None:
    net = tmp_path / "t" / "net_last.pth"
    net.parent.mkdir()
    teacher = Teacher(10)
    torch.save(export_state(teacher, teacher_layout(teacher)), net)
    with pytest.raises(OfficialLayoutError, match=f"{net} scores 10 identities, but num_source_ids=12 was asked"):
        official_teacher_to_ours(net, tmp_path / "t.ckpt", 12, None)
    with pytest.raises(
        OfficialLayoutError, match=f"id_00000001.pt scores {N_SRC} source identities, but num_source_ids=7"
    ):
        _convert_source(official_source, small, num_source_ids=7)


def test_networks_of_another_size_name_each_shape(official_source: Path, small: dict) -> None:
    wider = {**small, "structure": {**small["structure"], "dim": 16}}
    with pytest.raises(OfficialLayoutError) as err:
        _convert_source(official_source, wider)
    message = str(err.value)
    assert "gen_00000001.pt has" in message and "entries of other shapes" in message
    assert "enc_content.model.0.conv.weight is (8, 1, 3, 3), expected (16, 1, 3, 3)" in message


def test_an_unknown_entry_is_listed(official_source: Path, small: dict) -> None:
    path = official_source / "dis_00000001.pt"
    state = torch.load(path, weights_only=True)["a"]
    state["cnns.0.10.gamma"] = torch.zeros(1)
    torch.save({"a": state}, path)
    with pytest.raises(OfficialLayoutError, match=r"dis_00000001.pt does not hold .* 1 unknown: cnns.0.10.gamma\."):
        _convert_source(official_source, small)


def test_dgnetpp_needs_num_source_ids_and_kinds_must_match(tmp_path: Path, small: dict, official_source: Path) -> None:
    model = build_model("adapt", small, N_SRC, CAPACITY, image_size=SIZE)
    ours_to_official(save_model_checkpoint(model, tmp_path / "a.ckpt"), tmp_path / "pp", iteration=1)
    with pytest.raises(ConfigError, match=r"num_source_ids is required for a DG-Net\+\+ model .* scores 6 classes"):
        official_model_to_ours(find_official_files(tmp_path / "pp"), tmp_path / "x.ckpt", "auto", None, small, SIZE)
    with pytest.raises(CheckpointError, match=r"holds a DG-Net model \(one generator\), not kind=dgnetpp"):
        _convert_source(official_source, small, kind="dgnetpp", num_source_ids=N_SRC)
