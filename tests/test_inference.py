"""Models outside a training run: a checkpoint written without a Trainer loads everywhere a trained one does
(load_model, load_from_checkpoint, the adapt stage's init_ckpt, the evaluate CLI), and evaluate reads only the
target domain."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from configs import compose_train, typed_train

from dgnetpp_pl.checkpoints import CheckpointError, load_checkpoint
from dgnetpp_pl.config import ConfigError, ModelConfig
from dgnetpp_pl.data.synthetic import SOURCE_STYLE, TARGET_STYLE
from dgnetpp_pl.evaluate import evaluate
from dgnetpp_pl.inference import build_model, load_model, save_model_checkpoint
from dgnetpp_pl.module import DGNetPP
from dgnetpp_pl.schedule import AdaptSchedule

N_SRC = 12


@pytest.fixture(scope="module")
def model_cfg() -> ModelConfig:
    return typed_train("experiment=demo").model


@pytest.fixture(scope="module")
def source_ckpt(model_cfg: ModelConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model("source", model_cfg, N_SRC, image_size=(64, 32))
    return save_model_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "source.ckpt")


def test_a_written_checkpoint_loads_back_typed_with_the_same_weights(source_ckpt: Path, model_cfg) -> None:
    raw = torch.load(source_ckpt, weights_only=True)  # tensors and plain values only
    assert raw["hyper_parameters"]["model"]["appearance"]["arch"] == model_cfg.appearance.arch
    for model in (load_model(source_ckpt), DGNetPP.load_from_checkpoint(source_ckpt, weights_only=True)):
        assert isinstance(model.cfg, ModelConfig) and model.cfg.appearance == model_cfg.appearance
        assert model.schedule == AdaptSchedule("source") and model.hparams.image_size == (64, 32)
        state = model.state_dict()
        assert state.keys() == raw["state_dict"].keys()
        assert all(torch.equal(state[k], raw["state_dict"][k]) for k in state)


def test_the_adapt_stage_starts_from_a_written_source_checkpoint(source_ckpt: Path, model_cfg) -> None:
    adapt = build_model("adapt", model_cfg, N_SRC, target_capacity=5, schedule=AdaptSchedule("adapt", 2))
    adapt.load_source_stage(load_checkpoint(source_ckpt)["state_dict"])
    source = load_checkpoint(source_ckpt)["state_dict"]
    for key, value in source.items():
        if key.startswith("gen_a."):
            assert torch.equal(adapt.state_dict()["gen_b." + key[6:]], value)
    w = adapt.e_app.head1.classifier.weight
    assert w.shape[0] == N_SRC + 5 and torch.equal(w[:N_SRC], source["e_app.head1.classifier.weight"])


def test_hyper_parameters_of_another_schema_name_the_key(source_ckpt: Path, tmp_path: Path) -> None:
    raw = torch.load(source_ckpt, weights_only=True)
    raw["hyper_parameters"]["model"]["loss"]["lambda_unknown"] = 2.0  # a key this version does not have
    bad = tmp_path / "foreign.ckpt"
    torch.save(raw, bad)
    with pytest.raises(CheckpointError, match=r"foreign.ckpt holds hyper-parameters .*model.loss.lambda_unknown"):
        load_model(bad)
    with pytest.raises(ConfigError, match=r"'schedule.stage': expected one of"):
        DGNetPP(ModelConfig(), {"stage": "finetune"})


def test_evaluate_reads_only_the_target_and_checks_the_checkpoint_first(source_ckpt: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    sizes = [
        "data.synthetic.num_train_ids=12", "data.synthetic.num_test_ids=8",
        "data.synthetic.images_per_id_per_cam=[1,2]", "data.synthetic.num_distractors=4",
        "data.synthetic.num_junk=2", "data.num_workers=0",
    ]  # fmt: skip
    # The source is a real dataset that is not on disk: evaluating on the target must not need it.
    absent = ["data.source.name=market1501", f"data.source.root={tmp_path / 'no_market'}"]
    overrides = [f"paths.data_dir={data_dir}", f"paths.output_dir={tmp_path / 'out'}", *sizes, *absent]

    missing = compose_train(f"ckpt_path={tmp_path / 'missing.ckpt'}", *overrides, config_name="evaluate")
    with pytest.raises(CheckpointError, match="missing.ckpt does not exist"):
        evaluate(missing)
    assert not data_dir.exists(), "nothing is generated before the checkpoint is known to be usable"

    results = evaluate(compose_train(f"ckpt_path={source_ckpt}", *overrides, config_name="evaluate"))
    assert set(results["plain"]) == {"mAP", "Rank-1", "Rank-5", "Rank-10", "mINP"}
    generated = [str(p.parent.relative_to(data_dir)) for p in data_dir.rglob("bounding_box_train")]
    assert len(generated) == 1 and TARGET_STYLE.name in generated[0], generated  # the target domain only
    assert SOURCE_STYLE.name not in generated[0]
    assert (tmp_path / "out" / "metrics.json").is_file()
