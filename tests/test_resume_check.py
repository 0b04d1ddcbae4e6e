"""Resume checks what it resumes: the run's config stored in every checkpoint and stage result, a table of the
differences on resume (nothing written), ``resume_override`` for the keys that may change, a changed rate applied
to the restored optimisers, and the start-up checks of the values a resume depends on."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from configs import TINY_DEMO, compose_train, typed_train

from dgnetpp_pl.checkpoints import RUN_CONFIG_KEY, load_checkpoint
from dgnetpp_pl.config import ConfigError, plain, validate_config
from dgnetpp_pl.resume_check import ResumeMismatch, check_model, compare_configs
from dgnetpp_pl.train import train

REPO = Path(__file__).resolve().parents[1]


def verdicts(stored: tuple[str, ...], current: tuple[str, ...], stage: str = "adapt", override=()) -> dict:
    """``{key: verdict}`` of the differences between two tiny configs (``paths.output_dir`` set apart)."""
    old = plain(typed_train(*TINY_DEMO, "paths.output_dir=/runs/a", *stored))
    new = plain(typed_train(*TINY_DEMO, "paths.output_dir=/runs/a", *current))
    return {d.key: d.verdict for d in compare_configs(old, new, stage, override)}


# --------------------------------------------------------------------------------------------- the key policy
def test_each_changed_key_gets_its_verdict() -> None:
    assert verdicts((), ()) == {}
    lr = "model.optim.adapt.lr_app=6e-5"
    assert verdicts((), (lr,)) == {"model.optim.adapt.lr_app": "needs_override"}
    assert verdicts((), (lr,), override=["model.optim.adapt.lr_app"]) == {"model.optim.adapt.lr_app": "allowed"}
    assert verdicts((), (lr,), override=["model.optim.adapt"]) == {"model.optim.adapt.lr_app": "allowed"}
    assert verdicts((), ("data.batch_size=3",), override=["model.optim"]) == {"data.batch_size": "refused"}
    # The seed also draws the built-in data (data.synthetic.seed follows it).
    assert verdicts((), ("seed=5",)) == {"seed": "refused", "data.synthetic.seed": "refused"}
    assert verdicts((), ("pseudo_label.k=6",)) == {"pseudo_label.k": "refused"}
    assert verdicts((), ("data.synthetic.num_train_ids=10",)) == {"data.synthetic.num_train_ids": "refused"}
    assert verdicts((), ("model.appearance.arch=resnet34",)) == {"model.appearance.arch": "refused"}
    assert verdicts((), ("data.height=96",)) == {"data.height": "refused"}
    # A stage is not checked on the keys it never reads.
    assert verdicts((), ("pseudo_label.k=6", lr, "adapt.max_epochs=5"), stage="source") == {}
    assert verdicts((), ("model.optim.source.lr_g=1e-3", "source.max_epochs=3"), stage="adapt") == {}
    # What this invocation does is not the run's config.
    assert verdicts((), ("ckpt_path=last", "test=false", "task_name=other", "stage=source")) == {}


def test_a_moved_run_folder_compares_equal() -> None:
    old = plain(typed_train(*TINY_DEMO, "paths.output_dir=/scratch/job1/run"))
    new = plain(typed_train(*TINY_DEMO, "paths.output_dir=/home/me/run"))
    assert old["callbacks"]["model_checkpoint"]["dirpath"] != new["callbacks"]["model_checkpoint"]["dirpath"]
    assert compare_configs(old, new, "adapt") == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("resume_override=[data.batch_size]", r"may not name 'data.batch_size': it must match .*the batches the run"),
        ("resume_override=[seed]", r"may not name 'seed': it must match the checkpoint \(the random streams"),
        ("resume_override=[pseudo_label.k]", r"may not name 'pseudo_label.k'.*target classifier's size"),
        ("resume_override=[model.appearance.arch]", r"may not name 'model.appearance.arch'.*architecture"),
        ("resume_override=[model.optim]", r"may not name 'model.optim'.*Name the keys .*model.optim.adapt"),
        ("resume_override=[model.optim.adapt.lr_ap]", r"'model.optim.adapt.lr_ap', which is no key or section"),
        ("resume_override=[ckpt_path]", r"'ckpt_path', which a resume never compares"),
    ],
)
def test_resume_override_refuses_keys_that_must_match_with_the_reason(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        typed_train(*TINY_DEMO, "ckpt_path=last", override)


def test_resume_override_needs_a_resume_and_accepts_the_keys_that_may_change() -> None:
    with pytest.raises(ConfigError, match=r"resume_override applies when resuming: set ckpt_path=last"):
        typed_train(*TINY_DEMO, "resume_override=[model.optim.adapt.lr_app]")
    keys = ["model.optim.adapt.lr_app", "model.loss", "adapt.max_epochs", "logger", "data.num_workers"]
    cfg = typed_train(*TINY_DEMO, "ckpt_path=last", f"resume_override=[{','.join(keys)}]")
    assert cfg.resume_override == keys


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pseudo_label.k=0", r"'pseudo_label.k': must be >= 1"),
        ("pseudo_label.k=-1", r"'pseudo_label.k': must be >= 1"),
        ("model.loss.gan=nan", r"'model.loss.gan': must be a finite number >= 0"),
        ("model.loss.id=inf", r"'model.loss.id': must be a finite number >= 0"),
        ("model.loss.domain_adv=nan", r"'model.loss.domain_adv': must be a finite number >= 0"),
        ("model.optim.source.lr_g=nan", r"'model.optim.source.lr_g': must be a finite rate >= 0"),
        ("data.height=62", r"'data.height': must be a multiple of 4"),
        ("data.width=18", r"'data.width': must be a multiple of 4"),
        ("train=false", r"train=false evaluates a checkpoint: give ckpt_path="),
        ("train=false test=false", None),
        ("train=false ckpt_path=last resume_override=[logger]", r"train=false compares no config"),
    ],
)
def test_start_up_rejects_values_naming_the_key(override: str, message: str | None) -> None:
    if message is None:
        with pytest.raises(ConfigError, match=r"train=false test=false has nothing to do"):
            typed_train(*TINY_DEMO, "ckpt_path=last", *override.split())
        return
    with pytest.raises(ConfigError, match=message):
        typed_train(*TINY_DEMO, *override.split())


def test_a_checkpoint_for_other_shapes_is_a_table_not_a_size_mismatch() -> None:
    model = {"appearance": {"arch": "resnet18", "bottleneck_dim": 128, "checkpoint": False}, "loss": {"gan": 1.0}}
    stored = {"model": model, "num_source_ids": 12, "target_capacity": 8, "image_size": (64, 32)}
    same = {**stored, "model": {**model, "appearance": {**model["appearance"], "checkpoint": True}}}
    check_model(stored, {**same, "model": {**same["model"], "loss": {"gan": 2.0}}}, "x.ckpt")  # no shape changed
    with pytest.raises(ResumeMismatch) as info:
        check_model(stored, {**stored, "num_source_ids": 10, "image_size": [64, 32]}, "x.ckpt")
    assert [(d.key, d.stored, d.current) for d in info.value.differences] == [("num_source_ids", 12, 10)]
    assert "num_source_ids  12          10       must match: the number of source identities" in str(info.value)
    wider = {**model, "appearance": {**model["appearance"], "bottleneck_dim": 256}}
    with pytest.raises(ResumeMismatch, match=r"model.appearance.bottleneck_dim  128 +256 +must match"):
        check_model(stored, {**stored, "model": wider}, "x.ckpt")


# ------------------------------------------------------------------------------- resuming the shared tiny run
def tree_state(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root``: its bytes' SHA-256 and its modification time."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_overrides(data_dir: Path) -> list[str]:
    """The shared tiny run's own overrides (see conftest.tiny_run), without its output folder."""
    return [*TINY_DEMO, f"paths.data_dir={data_dir}", "logger=csv"]


def resume(run: Path, data_dir: Path, *extra: str) -> dict:
    return train(compose_train(*run_overrides(data_dir), f"paths.output_dir={run}", "ckpt_path=last", *extra))


@pytest.fixture
def finished_copy(tmp_path: Path, tiny_run: tuple[Path, dict]) -> Path:
    """A copy of the finished tiny run (both stages)."""
    return Path(shutil.copytree(tiny_run[0], tmp_path / "run"))


@pytest.fixture
def interrupted_copy(finished_copy: Path) -> Path:
    """A copy of the tiny run as if stopped after the adapt stage's last epoch checkpoint (no result, no final)."""
    for name in ("result.json", "final.ckpt"):
        (finished_copy / "checkpoints" / "adapt" / name).unlink()
    return finished_copy


@pytest.mark.slow
def test_every_checkpoint_and_result_stores_the_run_config(tiny_run, synthetic_data_dir) -> None:
    out, _ = tiny_run
    expected = plain(validate_config(compose_train(*run_overrides(synthetic_data_dir), f"paths.output_dir={out}")))
    files = sorted((out / "checkpoints").rglob("*.ckpt"))
    assert {p.name for p in files} >= {"final.ckpt", "last.ckpt"}
    for path in files:
        assert load_checkpoint(path, mmap=True)[RUN_CONFIG_KEY] == expected, path
    for stage in ("source", "adapt"):
        result = json.loads((out / "checkpoints" / stage / "result.json").read_text())
        assert result[RUN_CONFIG_KEY] == json.loads(json.dumps(expected))


@pytest.mark.slow
def test_a_finished_run_resumed_with_another_model_fails_with_the_table_and_writes_nothing(
    finished_copy: Path, synthetic_data_dir: Path, tiny_run
) -> None:
    before = tree_state(finished_copy)
    other_model = ["model=dgnetpp", "model.structure.aspp_dilations=[1,2,4]"]  # the paper model at 64x32
    cmd = [sys.executable, "-m", "dgnetpp_pl", *run_overrides(synthetic_data_dir), f"hydra.run.dir={finished_copy}"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "WANDB_MODE": "offline"}
    proc = subprocess.run([*cmd, "ckpt_path=last", *other_model], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr
    assert "source/result.json was written with, so the run cannot report this finished stage's result" in err
    assert "Nothing was written." in err
    for row in ("model.name  +dgnetpp_small +dgnetpp +must match", "model.appearance.arch +resnet18 +resnet50"):
        assert any(re.search(row, line) for line in err.splitlines()), (row, err)
    assert tree_state(finished_copy) == before  # not even .hydra/ or a log file
    # The same through the Python API; the reported metrics were the old model's before.
    with pytest.raises(ResumeMismatch) as info:
        resume(finished_copy, synthetic_data_dir, *other_model)
    assert {"model.name", "model.appearance.arch"} <= {d.key for d in info.value.differences}
    assert tree_state(finished_copy) == before


@pytest.mark.slow
def test_finished_stages_report_their_result_only_when_the_config_agrees(finished_copy, synthetic_data_dir, tiny_run):
    results = resume(finished_copy, synthetic_data_dir)
    assert results["adapt"]["test/mAP"] == tiny_run[1]["adapt"]["test/mAP"]
    assert RUN_CONFIG_KEY not in results["adapt"]
    with pytest.raises(ResumeMismatch, match=r"model.optim.adapt.lr_app +3e-05 +6e-05 +may change: add it"):
        resume(finished_copy, synthetic_data_dir, "model.optim.adapt.lr_app=6e-5")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("key", "value", "stored"),
    [
        ("model.optim.adapt.lr_app", 6e-5, 3e-5),
        ("data.batch_size", 3, 4),
        ("seed", 5, 0),
        ("pseudo_label.k", 6, 8),
        ("model.appearance.arch", "resnet34", "resnet18"),
        ("data.synthetic.num_train_ids", 10, 12),
    ],
)
def test_a_changed_key_stops_the_resume_naming_it(interrupted_copy, synthetic_data_dir, key, value, stored) -> None:
    before = tree_state(interrupted_copy)
    with pytest.raises(ResumeMismatch) as info:
        resume(interrupted_copy, synthetic_data_dir, f"{key}={value}")
    named = {d.key: d for d in info.value.differences}
    assert (named[key].stored, named[key].current) == (stored, value)
    verdict = "needs_override" if key.startswith("model.optim") else "refused"
    assert named[key].verdict == verdict and "size mismatch" not in str(info.value)
    assert tree_state(interrupted_copy) == before


@pytest.mark.slow
def test_a_checkpoint_without_a_stored_config_still_gets_a_table_for_other_data(interrupted_copy, synthetic_data_dir):
    # An older checkpoint (no stored config) and a source dataset with fewer identities on disk.
    last = interrupted_copy / "checkpoints" / "adapt" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    del ckpt[RUN_CONFIG_KEY]
    torch.save(ckpt, last)
    source = interrupted_copy / "checkpoints" / "source" / "final.ckpt"  # init_ckpt: the source stage is not run
    with pytest.raises(ResumeMismatch) as info, pytest.warns(UserWarning, match="holds no stored run config"):
        resume(interrupted_copy, synthetic_data_dir, "data.synthetic.num_train_ids=10", f"init_ckpt={source}")
    assert [d.key for d in info.value.differences] == ["num_source_ids"]
    assert "cannot load its weights" in str(info.value) and "size mismatch" not in str(info.value)


@pytest.mark.slow
def test_an_overridden_rate_is_applied_to_the_restored_optimisers(interrupted_copy, synthetic_data_dir) -> None:
    stage = interrupted_copy / "checkpoints" / "adapt"
    old = load_checkpoint(stage / "last.ckpt")
    old_rate = old[RUN_CONFIG_KEY]["model"]["optim"]["adapt"]["lr_app"]
    head_mult = old[RUN_CONFIG_KEY]["model"]["optim"]["head_lr_mult"]
    scale = old["dgnetpp"]["app_lr_scale"]
    assert (old_rate, scale) == (3e-5, 10.0)  # the demo's self-training rate and ramp
    new_rate = 6e-5
    results = resume(
        interrupted_copy,
        synthetic_data_dir,
        f"model.optim.adapt.lr_app={new_rate}",
        "adapt.max_epochs=3",
        "resume_override=[model.optim.adapt.lr_app,adapt.max_epochs]",
    )
    assert 0.0 <= results["adapt"]["test/mAP"] <= 1.0
    final = load_checkpoint(stage / "final.ckpt")
    assert final["epoch"] == 3 and final["dgnetpp"]["app_lr_scale"] == scale
    e_app, sched = final["optimizer_states"][-1]["param_groups"], final["lr_schedulers"][-1]
    assert [g["lr"] for g in e_app] == pytest.approx([new_rate * scale, new_rate * head_mult * scale], rel=1e-12)
    assert [g["initial_lr"] for g in e_app] == pytest.approx([new_rate, new_rate * head_mult], rel=1e-12)
    assert sched["base_lrs"] == pytest.approx([new_rate, new_rate * head_mult], rel=1e-12)
    # The other optimisers keep the rates they were restored with.
    for before, after in zip(old["optimizer_states"][:-1], final["optimizer_states"][:-1], strict=True):
        assert [g["lr"] for g in before["param_groups"]] == [g["lr"] for g in after["param_groups"]]
    # What ran: the resumed epoch logged the new rate, and the stage's result stores the config it ran with.
    logged = []
    for path in sorted(interrupted_copy.glob("csv/version_*/metrics.csv")):
        with open(path, newline="") as fh:
            logged += [float(r["train/lr_e_app"]) for r in csv.DictReader(fh) if r.get("train/lr_e_app")]
    assert logged[-1] == pytest.approx(new_rate * scale, rel=1e-6)  # logged as float32
    assert logged.count(logged[-1]) == 2  # the two steps of the resumed epoch (debug=tiny: 2 batches)
    stored = json.loads((stage / "result.json").read_text())[RUN_CONFIG_KEY]
    assert stored["model"]["optim"]["adapt"]["lr_app"] == new_rate and stored["adapt"]["max_epochs"] == 3
