"""A checkpoint is evaluated as it was trained: ``evaluate`` uses the checkpoint's image size (a different size given
on the command line is an error unless ``force_image_size=true``), and training with ``train=false`` evaluates the
given checkpoint of the stage (``ckpt_path=``, or ``init_ckpt=`` for the adapt stage) and saves nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from configs import TINY_DEMO, compose_train

from dgnetpp_pl.checkpoints import CheckpointError
from dgnetpp_pl.config import ConfigError, EvaluateConfig, coerce
from dgnetpp_pl.evaluate import evaluate, evaluation_image_size
from dgnetpp_pl.resume_check import ResumeMismatch
from dgnetpp_pl.train import train

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = (
    "data.synthetic.num_train_ids=12", "data.synthetic.num_test_ids=8", "data.synthetic.images_per_id_per_cam=[1,2]",
    "data.synthetic.num_distractors=4", "data.synthetic.num_junk=2", "data.num_workers=0", "data.test_batch_size=32",
)  # fmt: skip


def eval_config(*overrides: str) -> EvaluateConfig:
    return coerce(EvaluateConfig, compose_train("ckpt_path=m.ckpt", "paths.output_dir=unused", *overrides,
                                                 config_name="evaluate"))  # fmt: skip


# ------------------------------------------------------------------------------------ evaluate's image size
def test_the_image_size_comes_from_the_checkpoint_unless_forced() -> None:
    trained = (64, 32)
    # data=synthetic sets 64x32: the same size.
    assert evaluation_image_size(eval_config(), trained, given=set()) == (64, 32)
    # A data config's own size (not given by the user) gives way to the checkpoint's.
    preset = eval_config("data.height=256", "data.width=128")
    assert evaluation_image_size(preset, trained, given={"data"}) == (64, 32)
    # Given on the command line and different: an error naming both sizes.
    with pytest.raises(ConfigError, match=r"data.height and data.width ask for 256x128 images, .*trained at 64x32"):
        evaluation_image_size(preset, trained, given={"data.height", "data.width"})
    with pytest.raises(ConfigError, match=r"^data.width ask for 64x64 images.*force_image_size=true"):
        evaluation_image_size(eval_config("data.width=64"), trained, given={"data.width"})
    # A given key that agrees with the checkpoint is no conflict.
    assert evaluation_image_size(eval_config("data.width=128"), trained, given={"data.height"}) == (64, 32)
    forced = eval_config("data.height=128", "data.width=64", "force_image_size=true")
    with pytest.warns(UserWarning, match=r"force_image_size=true: evaluating at 128x64 .* trained at 64x32"):
        assert evaluation_image_size(forced, trained, given={"data.height", "data.width"}) == (128, 64)


@pytest.mark.slow
def test_evaluate_uses_the_checkpoints_size_and_refuses_another_from_the_command_line(
    tmp_path: Path, tiny_run, synthetic_data_dir: Path
) -> None:
    _, results = tiny_run
    ckpt = results["source"]["ckpt"]  # trained at 64x32
    base = [f"ckpt_path={ckpt}", "data=synthetic", *TINY_DATA, f"paths.data_dir={synthetic_data_dir}"]
    # The data config says 128x64 (not given by the user): the checkpoint's 64x32 is used, as in training.
    cfg = compose_train(*base, "data.height=128", "data.width=64", f"paths.output_dir={tmp_path / 'a'}",
                        config_name="evaluate")  # fmt: skip
    metrics = evaluate(cfg, given=set())
    assert metrics["image_size"] == [64, 32]
    assert metrics["plain"]["mAP"] == pytest.approx(results["source"]["test/mAP"], abs=1e-6)
    # Forced: the config's size, with a warning; other metrics.
    forced = compose_train(*base, "data.height=128", "data.width=64", "force_image_size=true",
                           f"paths.output_dir={tmp_path / 'b'}", config_name="evaluate")  # fmt: skip
    with pytest.warns(UserWarning, match="force_image_size=true"):
        metrics = evaluate(forced, given={"data.height", "data.width"})
    assert metrics["image_size"] == [128, 64]
    assert metrics["plain"]["mAP"] != pytest.approx(results["source"]["test/mAP"], abs=1e-6)
    # On the command line: an error naming both sizes, before anything is evaluated or written.
    cmd = [sys.executable, "-m", "dgnetpp_pl.evaluate", *base, "data.height=128", "data.width=64",
           f"hydra.run.dir={tmp_path / 'c'}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "data.height and data.width ask for 128x64 images" in proc.stderr and "trained at 64x32" in proc.stderr
    assert not (tmp_path / "c" / "metrics.json").exists()


# ------------------------------------------------------------------------------------------- train=false
def tiny(data_dir: Path, out: Path, *extra: str):
    return compose_train(*TINY_DEMO, f"paths.data_dir={data_dir}", "logger=csv",
                         f"paths.output_dir={out}", "train=false", *extra)  # fmt: skip


def files_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_train_false_evaluates_a_stage_checkpoint_and_saves_nothing(tmp_path, tiny_run, synthetic_data_dir) -> None:
    run, trained = tiny_run
    out = tmp_path / "eval"
    got = train(tiny(synthetic_data_dir, out, "stage=source", f"ckpt_path={trained['source']['ckpt']}"))
    assert set(got) == {"source"} and got["source"]["ckpt"] == trained["source"]["ckpt"]
    for key in ("test/mAP", "test/Rank-1", "test/mINP"):
        assert got["source"][key] == pytest.approx(trained["source"][key], abs=1e-6), key
    assert sorted(files_under(out)) == ["eval_metrics.json"]  # no checkpoint, result or training log
    assert json.loads((out / "eval_metrics.json").read_text())["source"]["test/mAP"] == got["source"]["test/mAP"]

    # ckpt_path=last in the run's own folder: the finished stage's final.ckpt; only eval_metrics.json is added.
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    before = files_under(copy)
    got = train(tiny(synthetic_data_dir, copy, "stage=adapt", "ckpt_path=last"))
    assert got["adapt"]["ckpt"] == str(copy / "checkpoints" / "adapt" / "final.ckpt")
    assert got["adapt"]["test/mAP"] == pytest.approx(trained["adapt"]["test/mAP"], abs=1e-6)
    after = files_under(copy)
    assert after.pop("eval_metrics.json") and after == before


@pytest.mark.slow
def test_train_false_with_init_ckpt_evaluates_the_adapt_stages_start(tmp_path, tiny_run, synthetic_data_dir) -> None:
    _, trained = tiny_run
    source = trained["source"]["ckpt"]
    got = train(tiny(synthetic_data_dir, tmp_path / "eval", "stage=adapt", f"init_ckpt={source}"))
    # The adapt stage starts from the source encoder: its features, hence its metrics, are the source model's.
    assert got["adapt"]["ckpt"] == source
    assert got["adapt"]["test/mAP"] == pytest.approx(trained["source"]["test/mAP"], abs=1e-6)
    # A source checkpoint given as the adapt stage's ckpt_path is another stage: a table, not a size mismatch.
    with pytest.raises(ResumeMismatch) as info:
        train(tiny(synthetic_data_dir, tmp_path / "wrong", "stage=adapt", f"ckpt_path={source}"))
    named = {d.key: (d.stored, d.current) for d in info.value.differences}
    assert named["schedule.stage"] == ("source", "adapt") and named["target_capacity"] == (0, 8)
    with pytest.raises(CheckpointError, match="train=false ckpt_path='nope.ckpt'.*does not exist"):
        train(tiny(synthetic_data_dir, tmp_path / "missing", "stage=source", "ckpt_path=nope.ckpt"))
