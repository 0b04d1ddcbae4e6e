"""The teacher stage and the teacher terms end to end on the tiny preset: ``stage=teacher`` and the three-stage
pipeline from the entry point, ``teacher_ckpt=`` skipping the stage (an official teacher converted back included),
the frozen teacher, exact resume with a teacher (and the refusal of another teacher file), and ``teacher_w=0``
leaving no trace of the teacher."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from configs import TINY_DEMO, compose_train, typed_train
from reference_metrics import reference

from dgnetpp_pl import train as train_module
from dgnetpp_pl.checkpoints import load_checkpoint
from dgnetpp_pl.convert import official_teacher_to_ours, ours_to_official
from dgnetpp_pl.data.datasets import load_image
from dgnetpp_pl.data.domains import build_domain
from dgnetpp_pl.data.transforms import build_test_transform
from dgnetpp_pl.models.teacher import Teacher
from dgnetpp_pl.teacher_checkpoint import file_sha256, load_teacher, save_teacher

pytestmark = pytest.mark.slow

TIMEOUT_S = 900
TESTS = Path(__file__).resolve().parent
PROBE_ALLOWED = "allowed_targets=[dgnetpp_pl,torch,torchvision,pytorch_lightning,signal_probe]"
TEACHER = ["model.loss.teacher_w=2", "trainer.deterministic=true"]


def cli(cwd: Path, args: list[str], ok: bool = True) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(TESTS.parent / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-m", "dgnetpp_pl", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    if ok:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def rows(run_dir: Path, stage: str) -> list[dict[str, str]]:
    """The CSV logger's rows of ``stage``."""
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        if yaml.safe_load((path.parent / "hparams.yaml").read_text())["stage"] == stage:
            with open(path, newline="") as fh:
                return list(csv.DictReader(fh))
    raise AssertionError(f"no CSV log of stage {stage} under {run_dir}")


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, tiny_overrides: list[str]) -> Path:
    """``python -m dgnetpp_pl`` with the teacher on and nothing given: teacher -> source -> adapt."""
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    cli(run_dir.parent, [*tiny_overrides, *TEACHER, f"hydra.run.dir={run_dir}"])
    return run_dir


def test_the_pipeline_trains_the_teacher_first_and_uses_it_where_the_schedule_says(pipeline, synthetic_data_dir):
    metrics = json.loads((pipeline / "metrics.json").read_text())
    assert list(metrics) == ["teacher", "source", "adapt"]
    teacher_file = pipeline / "checkpoints" / "teacher" / "final.ckpt"
    assert metrics["teacher"]["ckpt"] == str(teacher_file)
    teacher = load_teacher(teacher_file)
    cfg = typed_train(*TINY_DEMO, f"paths.data_dir={synthetic_data_dir}")
    source = build_domain(cfg.data.source, cfg.data.synthetic, cfg.data.data_dir, "source")
    assert teacher.num_classes == source.num_train_pids and teacher.arch == "resnet18"

    # The teacher's direct transfer equals a ranking of its own features computed apart from the stage's evaluator.
    target = build_domain(cfg.data.target, cfg.data.synthetic, cfg.data.data_dir, "target")
    transform = build_test_transform(cfg.data.height, cfg.data.width)
    records = [*target.query, *target.gallery]
    with torch.no_grad():
        x = torch.stack([transform(load_image(r.path)) for r in records])
        f = teacher.embedding(x) + teacher.embedding(torch.flip(x, dims=[3]))
        f = (f / f.norm(dim=1, keepdim=True)).numpy()
    nq = len(target.query)
    pids, cams = np.array([r.pid for r in records]), np.array([r.camid for r in records])
    expected = reference(1.0 - f[:nq] @ f[nq:].T, pids[:nq], pids[nq:], cams[:nq], cams[nq:])
    assert metrics["teacher"]["test/mAP"] == pytest.approx(expected["market"], abs=1e-5)

    # Both later stages record the teacher file they were trained with.
    digest = file_sha256(teacher_file)
    for stage in ("source", "adapt"):
        entry = load_checkpoint(pipeline / "checkpoints" / stage / "final.ckpt")["dgnetpp"]["teacher"]
        assert entry == {"path": str(teacher_file.resolve()), "sha256": digest}
    # The terms train every source epoch and the warm-up (adapt epoch 0), not self-training (epoch 1).
    src = [r for r in rows(pipeline, "source") if r.get("train/teacher_kl")]
    assert src and all(float(r["train/teacher_kl"]) > 0 and float(r["train/teacher_b"]) > 0 for r in src)
    adapt = [r for r in rows(pipeline, "adapt") if r.get("train/g_total")]
    assert {r["epoch"] for r in adapt if r.get("train/teacher_kl")} == {"0"}
    assert {r["epoch"] for r in adapt if not r.get("train/teacher_kl")} == {"1"}


def test_stage_teacher_alone_trains_the_same_teacher(pipeline, tmp_path, tiny_overrides):
    run_dir = tmp_path / "run"
    cli(tmp_path, [*tiny_overrides, "stage=teacher", "trainer.deterministic=true", f"hydra.run.dir={run_dir}"])
    assert list(json.loads((run_dir / "metrics.json").read_text())) == ["teacher"]
    assert not (run_dir / "checkpoints" / "source").exists()
    ours = load_teacher(run_dir / "checkpoints" / "teacher" / "final.ckpt").state_dict()
    assert max_weight_diff(ours, load_teacher(pipeline / "checkpoints" / "teacher" / "final.ckpt").state_dict()) == 0


# The resume leaves the probe callback out, which the checkpoint's config has: resume_override names it.
RESUME = ["ckpt_path=last", "resume_override=[callbacks.probe]"]


def test_resume_across_the_stages_equals_the_uninterrupted_pipeline(pipeline, tmp_path, tiny_overrides):
    """SIGTERM in the teacher stage's first batch; the resumed run finishes all three stages as the uninterrupted
    one did."""
    run_dir = tmp_path / "run"
    args = [*tiny_overrides, *TEACHER, f"hydra.run.dir={run_dir}"]
    probe = ["+callbacks.probe._target_=signal_probe.SigtermAt", "+callbacks.probe.at=batch"]
    stopped = cli(tmp_path, [*args, *probe, "+callbacks.probe.epoch=0", "+callbacks.probe.batch=0", PROBE_ALLOWED])
    assert "signal_probe: SIGTERM" in stopped.stdout
    assert (run_dir / "checkpoints" / "teacher" / "last.ckpt").is_file()
    assert not (run_dir / "checkpoints" / "source").exists()
    cli(tmp_path, [*args, *RESUME])
    for stage in ("source", "adapt"):
        a = load_checkpoint(pipeline / "checkpoints" / stage / "final.ckpt")
        b = load_checkpoint(run_dir / "checkpoints" / stage / "final.ckpt")
        assert max_weight_diff(a["state_dict"], b["state_dict"]) == 0.0, stage
    ta, tb = (load_teacher(d / "checkpoints" / "teacher" / "final.ckpt").state_dict() for d in (pipeline, run_dir))
    assert max_weight_diff(ta, tb) == 0.0
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (pipeline, run_dir))
    for stage in ("teacher", "source", "adapt"):
        keys = sorted(k for k in ma[stage] if k.startswith(("val/", "test/")))
        assert "test/mAP" in keys and {k: ma[stage][k] for k in keys} == {k: mb[stage].get(k) for k in keys}


def test_teacher_ckpt_skips_the_stage_and_a_resume_refuses_another_teacher(pipeline, tmp_path, tiny_overrides):
    """``stage=source teacher_ckpt=`` trains exactly the pipeline's source stage (the teacher stage drew its own
    random numbers); stopped mid-epoch, it resumes only with the same teacher file content."""
    teacher_file = tmp_path / "teacher.ckpt"
    shutil.copy(pipeline / "checkpoints" / "teacher" / "final.ckpt", teacher_file)
    run_dir = tmp_path / "run"
    args = [*tiny_overrides, *TEACHER, "stage=source", f"teacher_ckpt={teacher_file}", f"hydra.run.dir={run_dir}"]
    probe = ["+callbacks.probe._target_=signal_probe.SigtermAt", "+callbacks.probe.at=batch"]
    stopped = cli(tmp_path, [*args, *probe, "+callbacks.probe.epoch=0", "+callbacks.probe.batch=0", PROBE_ALLOWED])
    assert "signal_probe: SIGTERM" in stopped.stdout
    assert not (run_dir / "checkpoints" / "teacher").exists()

    original = teacher_file.read_bytes()
    other = load_teacher(teacher_file)
    with torch.no_grad():
        other.head.classifier.bias.add_(0.5)
    save_teacher(other, teacher_file)
    refused = cli(tmp_path, [*args, *RESUME], ok=False)
    assert refused.returncode != 0
    message = " ".join((refused.stdout + refused.stderr).split())
    assert "last.ckpt was trained with the teacher" in message and str(teacher_file) in message
    assert file_sha256(teacher_file) in message

    teacher_file.write_bytes(original)
    cli(tmp_path, [*args, *RESUME])
    assert list(json.loads((run_dir / "metrics.json").read_text())) == ["source"]
    a = load_checkpoint(pipeline / "checkpoints" / "source" / "final.ckpt")
    b = load_checkpoint(run_dir / "checkpoints" / "source" / "final.ckpt")
    diff = max_weight_diff(a["state_dict"], b["state_dict"])
    print(f"resume with a teacher: max abs weight difference {diff:.3g}")
    assert diff == 0.0
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for key, state in opt_a["state"].items():
            for name, value in state.items():
                other_value = opt_b["state"][key][name]
                assert torch.equal(value, other_value) if isinstance(value, torch.Tensor) else value == other_value
    assert b["dgnetpp"]["teacher"]["sha256"] == file_sha256(teacher_file)
    ra, rb = (json.loads((d / "checkpoints" / "source" / "result.json").read_text()) for d in (pipeline, run_dir))
    keys = sorted(k for k in ra if k.startswith(("val/", "test/")))
    assert "test/mAP" in keys and {k: ra[k] for k in keys} == {k: rb.get(k) for k in keys}


def test_a_converted_official_teacher_trains_the_source_stage_and_stays_frozen(
    tmp_path, synthetic_data_dir, monkeypatch
):
    """An official baseline teacher (ResNet-50 ``ft_net``, as the export direction writes it) converted with
    ``convert kind=teacher`` is accepted as ``teacher_ckpt=``."""
    cfg = typed_train(*TINY_DEMO, f"paths.data_dir={synthetic_data_dir}")
    source = build_domain(cfg.data.source, cfg.data.synthetic, cfg.data.data_dir, "source")
    torch.manual_seed(0)
    ours = save_teacher(Teacher(source.num_train_pids).eval(), tmp_path / "ours.ckpt")
    official = ours_to_official(ours, tmp_path / "official")
    (weights,) = [p for p in official if p.name == "net_last.pth"]
    converted = official_teacher_to_ours(weights, tmp_path / "converted.ckpt", None, None)
    used = []

    def load_and_keep(path, *args, **kwargs):
        teacher = load_teacher(path, *args, **kwargs)
        used.append(teacher)
        return teacher

    monkeypatch.setattr(train_module, "load_teacher", load_and_keep)
    overrides = [*TINY_DEMO, f"paths.data_dir={synthetic_data_dir}", "logger=csv", *TEACHER]
    overrides += ["stage=source", f"teacher_ckpt={converted}", f"paths.output_dir={tmp_path / 'run'}"]
    results = train_module.train(compose_train(*overrides))
    assert list(results) == ["source"]
    assert [r for r in rows(tmp_path / "run", "source") if r.get("train/teacher_kl")]
    # The teacher that trained the stage, buffers included, is byte for byte the file's.
    (teacher,) = used
    fresh = load_teacher(converted).state_dict()
    assert teacher.state_dict().keys() == fresh.keys()
    assert all(torch.equal(v, fresh[k]) for k, v in teacher.state_dict().items())
    assert not teacher.training
    saved = load_checkpoint(results["source"]["ckpt"])
    assert saved["dgnetpp"]["teacher"]["sha256"] == file_sha256(converted)
    assert not any(k.startswith(("teacher.", "_teacher.")) for k in saved["state_dict"])


def test_teacher_w_zero_trains_and_records_no_teacher(tiny_run):
    out, results = tiny_run
    assert list(results) == ["source", "adapt"] and not (out / "checkpoints" / "teacher").exists()
    for stage in ("source", "adapt"):
        ckpt = load_checkpoint(out / "checkpoints" / stage / "final.ckpt")
        assert "teacher" not in ckpt["dgnetpp"] and not ckpt["hyper_parameters"]["schedule"]["with_teacher"]
        assert not any(k.startswith("train/teacher") for k in rows(out, stage)[0])
