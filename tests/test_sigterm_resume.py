"""SIGTERM resume is exact: a run stopped by SIGTERM at an epoch boundary (during the pseudo-label refresh),
mid-epoch, or during an epoch's last batch, and resumed with ``ckpt_path=last``, ends with the same weights,
optimiser states, pseudo-labels and metrics as an uninterrupted deterministic run, on CPU, to the last bit.

The signal comes from the run itself (``tests/signal_probe.py``), so it lands at the same point every time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgnetpp_pl.checkpoints import load_checkpoint

pytestmark = pytest.mark.slow

TIMEOUT_S = 900
TESTS = Path(__file__).resolve().parent
PROBE_ALLOWED = "allowed_targets=[dgnetpp_pl,torch,torchvision,pytorch_lightning,signal_probe]"


def cli(cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
    # This checkout's package and the probe, whatever the working folder of the run.
    path = os.pathsep.join([str(TESTS.parent / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-m", "dgnetpp_pl", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def assert_same_training_state(a: dict, b: dict, case: str) -> None:
    """Two checkpoints hold the same weights, loop counters and optimiser states, exactly."""
    diff = max((a["state_dict"][k].double() - b["state_dict"][k].double()).abs().max().item() for k in a["state_dict"])
    print(f"{case}: max abs weight difference {diff:.3g}")
    assert diff == 0.0
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for key, state in opt_a["state"].items():
            for name, value in state.items():
                other = opt_b["state"][key][name]
                assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


@pytest.fixture(scope="module")
def run_args(tiny_overrides: list[str], tiny_source_ckpt: Path) -> list[str]:
    # 3 epochs of 2 batches: warm-up, then self-training with a refresh before epochs 1 and 2.
    return [
        *tiny_overrides,
        "stage=adapt",
        f"init_ckpt={tiny_source_ckpt}",
        "adapt.max_epochs=3",
        "adapt.warmup_epochs=1",
        "pseudo_label.every_n_epochs=1",
        "trainer.deterministic=true",
        "trainer.limit_train_batches=2",
    ]


WORKERS = ["data.num_workers=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, run_args: list[str]) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    cli(run_dir.parent, [*run_args, f"hydra.run.dir={run_dir}"])
    return run_dir


CASES = {
    # where the signal comes: (probe overrides, epoch / phase / (processed, completed) of the SIGTERM checkpoint,
    # overrides of the stopped and the resumed run)
    "refresh before epoch 1": (["at=refresh", "epoch=1"], (0, "warmup", (1, 0)), []),
    "mid-epoch": (["at=batch", "epoch=1", "batch=0"], (1, "self_training", (1, 1)), []),
    "last batch of epoch 1": (["at=batch", "epoch=1", "batch=1"], (1, "self_training", (2, 1)), []),
    # Loader workers draw their first batches as the resumed epoch's iterator is built, before Lightning sets the
    # sampler's epoch; the worker count itself does not change what is trained.
    "mid-epoch, 2 loader workers": (["at=batch", "epoch=1", "batch=0"], (1, "self_training", (1, 1)), WORKERS),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sigterm_then_resume_matches_an_uninterrupted_run(
    case: str, tmp_path: Path, run_args: list[str], uninterrupted: Path
) -> None:
    probe, (epoch, phase, (processed, completed)), extra = CASES[case]
    run_dir = tmp_path / "run"
    stopped = cli(
        tmp_path,
        [
            *run_args,
            *extra,
            f"hydra.run.dir={run_dir}",
            "+callbacks.probe._target_=signal_probe.SigtermAt",
            *(f"+callbacks.probe.{p}" for p in probe),
            PROBE_ALLOWED,
        ],
    )
    assert "signal_probe: SIGTERM" in stopped.stdout and "Stopped on SIGTERM" in stopped.stdout + stopped.stderr
    stage = run_dir / "checkpoints" / "adapt"
    assert not (stage / "result.json").exists() and not (stage / "final.ckpt").exists()
    saved = load_checkpoint(stage / "last.ckpt")
    progress = saved["loops"]["fit_loop"]["epoch_progress"]["current"]
    assert (saved["epoch"], saved["dgnetpp"]["phase"]) == (epoch, phase)
    assert (progress["processed"], progress["completed"]) == (processed, completed)

    # The resume leaves the probe out: a callback the checkpoint's config has, so resume_override names it.
    cli(
        tmp_path, [*run_args, *extra, f"hydra.run.dir={run_dir}", "ckpt_path=last", "resume_override=[callbacks.probe]"]
    )

    a = load_checkpoint(uninterrupted / "checkpoints" / "adapt" / "final.ckpt")
    b = load_checkpoint(stage / "final.ckpt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert_same_training_state(a, b, case)
    pl_a, pl_b = ({k: v for k, v in c["callbacks"].items() if "PseudoLabelCallback" in k} for c in (a, b))
    # The pseudo-labels live in the label store, which the pseudo-label callback checkpoints.
    ((labels_a,), (labels_b,)) = ([v["labels"] for v in pl.values()] for pl in (pl_a, pl_b))
    assert labels_a is not None and torch.equal(labels_a, labels_b)
    assert [v["rank_digests"] for v in pl_a.values()] == [v["rank_digests"] for v in pl_b.values()]
    assert [len(v["rank_digests"]) for v in pl_a.values()] == [2]

    res_a, res_b = (
        json.loads((d / "checkpoints" / "adapt" / "result.json").read_text()) for d in (uninterrupted, run_dir)
    )
    metrics = sorted(k for k in res_a if k.startswith(("val/", "test/")))
    assert "val/mAP_best" in metrics and "test/mAP" in metrics
    assert {k: res_a[k] for k in metrics} == {k: res_b.get(k) for k in metrics}


# The official batch mix (aa / bb / ab / ba batches, aa skipped in self-training), 4 batches per epoch: a SIGTERM
# in the middle of a self-training epoch resumes that epoch's drawn batches where they stopped.
OFFICIAL = ["data.pairing=official", "data.xx_port=0.7", "data.ab_port=0.3", "trainer.limit_train_batches=4"]


@pytest.fixture(scope="module")
def official_uninterrupted(tmp_path_factory: pytest.TempPathFactory, run_args: list[str]) -> Path:
    run_dir = tmp_path_factory.mktemp("official_uninterrupted") / "run"
    cli(run_dir.parent, [*run_args, *OFFICIAL, f"hydra.run.dir={run_dir}"])
    return run_dir


def test_sigterm_mid_epoch_with_the_official_mix_resumes_exactly(
    tmp_path: Path, run_args: list[str], official_uninterrupted: Path
) -> None:
    run_dir = tmp_path / "run"
    probe = ["+callbacks.probe._target_=signal_probe.SigtermAt", "+callbacks.probe.at=batch"]
    probe += ["+callbacks.probe.epoch=1", "+callbacks.probe.batch=2", PROBE_ALLOWED]
    cli(tmp_path, [*run_args, *OFFICIAL, f"hydra.run.dir={run_dir}", *probe])
    stage = run_dir / "checkpoints" / "adapt"
    saved = load_checkpoint(stage / "last.ckpt")
    progress = saved["loops"]["fit_loop"]["epoch_progress"]["current"]
    assert (saved["epoch"], saved["dgnetpp"]["phase"]) == (1, "self_training")
    assert (progress["processed"], progress["completed"]) == (1, 1)  # inside epoch 1
    batches = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"]
    assert 0 < batches < 4, f"stopped after {batches} batches of epoch 1"

    cli(
        tmp_path,
        [*run_args, *OFFICIAL, f"hydra.run.dir={run_dir}", "ckpt_path=last", "resume_override=[callbacks.probe]"],
    )
    a = load_checkpoint(official_uninterrupted / "checkpoints" / "adapt" / "final.ckpt")
    b = load_checkpoint(stage / "final.ckpt")
    assert_same_training_state(a, b, "official mix, mid-epoch")
    assert [s["last_epoch"] for s in a["lr_schedulers"]] == [s["last_epoch"] for s in b["lr_schedulers"]]
