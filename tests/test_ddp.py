"""Two-process DDP on CPU (gloo): the adapt stage through ``python -m dgnetpp_pl trainer=ddp_sim``, and the
validation feature gather under a distributed sampler that pads the last batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from configs import typed_train
from torch.utils.data import DataLoader, Dataset

from dgnetpp_pl.checkpoints import load_checkpoint
from dgnetpp_pl.data.datamodule import CrossDomainDataModule
from dgnetpp_pl.evaluation import ReIDEvaluator
from dgnetpp_pl.inference import load_model
from dgnetpp_pl.train import build_datamodule

pytestmark = pytest.mark.slow

TIMEOUT_S = 900
METRICS = ("mAP", "Rank-1", "Rank-5", "Rank-10", "mINP")
# Variables of an enclosing launcher would make the child processes join another process group.
LAUNCHER_VARS = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and k != "PROJECT_ROOT"}
    return {**env, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory, tiny_overrides: list[str], tiny_source_ckpt: Path) -> Path:
    """The tiny adapt stage (warm-up epoch, one pseudo-label refresh, self-training epoch, a validation after each
    epoch, test) on 2 gloo processes, launched from an empty folder with Hydra's default run directory."""
    cwd = tmp_path_factory.mktemp("ddp")
    args = [*tiny_overrides, "stage=adapt", f"init_ckpt={tiny_source_ckpt}", "trainer=ddp_sim"]
    proc = subprocess.run(
        [sys.executable, "-m", "dgnetpp_pl", *args],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    (cwd.parent / f"{cwd.name}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return cwd


@pytest.fixture(scope="module")
def datamodule(tiny_overrides: list[str], tmp_path_factory: pytest.TempPathFactory) -> CrossDomainDataModule:
    """The run's datamodule, built in this process from the same config."""
    out = tmp_path_factory.mktemp("single")
    dm = build_datamodule(typed_train(*tiny_overrides, f"paths.output_dir={out}"), "adapt")
    dm.setup("fit")
    return dm


TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ddp_official_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_overrides: list[str], tiny_source_ckpt: Path
) -> Path:
    """The tiny adapt stage with the official batch mix on 2 gloo processes, every train batch recorded per rank
    (``tests/batch_probe.py``); shares that give each rank ab batches too. Returns the run directory."""
    cwd = tmp_path_factory.mktemp("ddp_official")
    run = cwd / "run"
    args = [*tiny_overrides, "stage=adapt", f"init_ckpt={tiny_source_ckpt}", "trainer=ddp_sim", f"hydra.run.dir={run}"]
    args += ["data.pairing=official", "data.xx_port=0.7", "data.ab_port=0.3", "trainer.limit_train_batches=null"]
    args += ["+callbacks.probe._target_=batch_probe.BatchRecorder", f"+callbacks.probe.out_dir={run / 'probe'}"]
    args.append("allowed_targets=[dgnetpp_pl,torch,torchvision,pytorch_lightning,batch_probe]")
    path = os.pathsep.join([str(TESTS.parent / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "dgnetpp_pl", *args],
        cwd=cwd,
        env={**clean_env(), "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    (cwd.parent / f"{cwd.name}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return run


def test_official_mix_ranks_draw_the_same_type_at_every_step_on_the_same_labels(ddp_official_run: Path) -> None:
    ranks = [json.loads((ddp_official_run / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    for a, b in zip(*ranks, strict=True):
        assert (a["epoch"], a["step"], a["kind"]) == (b["epoch"], b["step"], b["kind"])
        # An image takes one first and one second place per epoch (official), so the ranks' halves are disjoint
        # place by place: the first halves of aa / bb apart from the second halves, each domain of ab apart.
        for domain in ("source", "target"):
            x, y = a.get(domain, []), b.get(domain, [])
            halves = [(x[: len(x) // 2], y[: len(y) // 2]), (x[len(x) // 2 :], y[len(y) // 2 :])]
            for p, q in halves if a["kind"] in ("aa", "bb") else [(x, y)]:
                assert not set(p) & set(q), f"ranks share {domain} images in one place at {a}"
    kinds = {e: {s["kind"] for s in ranks[0] if s["epoch"] == e} for e in (0, 1)}
    assert kinds[0] == {"aa", "ab", "bb"}, "warm-up trains every type"
    assert kinds[1] == {"skip", "ab", "bb"}, "self-training skips its aa batches"

    ckpt = load_checkpoint(ddp_official_run / "checkpoints" / "adapt" / "final.ckpt")
    (state,) = (v for k, v in ckpt["callbacks"].items() if "PseudoLabelCallback" in k)
    labels = state["labels"].numpy()
    digest = zlib.crc32(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    assert state["rank_digests"] == [[digest, digest]]
    for rank in ranks:
        trained = [s for s in rank if s["epoch"] == 1 and "target" in s]
        assert trained and all(s["target_label"] == labels[s["target"]].tolist() for s in trained)


def run_dirs(cwd: Path) -> list[Path]:
    return sorted((cwd / "outputs" / "demo" / "runs").iterdir())


def test_one_hydra_output_directory_for_both_ranks(ddp_run: Path) -> None:
    # Lightning relaunches the command for rank 1; it must reuse rank 0's run directory, not make its own.
    assert [p.name for p in ddp_run.iterdir()] == ["outputs"]
    assert [p.name for p in (ddp_run / "outputs").iterdir()] == ["demo"]
    assert [p.name for p in (ddp_run / "outputs" / "demo").iterdir()] == ["runs"]
    (run,) = run_dirs(ddp_run)
    assert (run / ".hydra" / "config.yaml").is_file()
    assert (run / "metrics.json").is_file() and (run / "checkpoints" / "adapt" / "final.ckpt").is_file()
    assert [p.name for p in (run / "csv").iterdir()] == ["version_0"]  # one logger run, from rank 0


def test_both_ranks_train_on_the_same_pseudo_labels(ddp_run: Path, datamodule: CrossDomainDataModule) -> None:
    (run,) = run_dirs(ddp_run)
    ckpt = load_checkpoint(run / "checkpoints" / "adapt" / "final.ckpt")
    (state,) = (v for k, v in ckpt["callbacks"].items() if "PseudoLabelCallback" in k)
    labels = state["labels"]
    # One label per target train image: the padded samples of the sharded extraction were dropped.
    assert labels.shape == (len(datamodule.target_train_records),) and int(labels.min()) >= 0
    # Each rank's CRC32 of the labels its own datamodule holds, gathered at the (single) refresh.
    digest = zlib.crc32(np.ascontiguousarray(labels.numpy(), dtype=np.int64).tobytes())
    assert state["rank_digests"] == [[digest, digest]]
    assert state["last_refresh_epoch"] == 1 and len(state["history"]) == 1


def test_ddp_metrics_equal_one_process_evaluation_of_the_same_weights(
    ddp_run: Path, datamodule: CrossDomainDataModule
) -> None:
    (run,) = run_dirs(ddp_run)
    logged = json.loads((run / "checkpoints" / "adapt" / "result.json").read_text())
    dm = datamodule
    # An odd evaluation set: the distributed sampler padded rank 1 with a duplicate of the first image.
    assert (len(dm.query_records) + len(dm.gallery_records)) % 2 == 1

    model = load_model(run / "checkpoints" / "adapt" / "final.ckpt")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    single = {
        "test": trainer.test(model, datamodule=dm, verbose=False)[0],
        "val": trainer.validate(model, datamodule=dm, verbose=False)[0],  # the held-out split of debug=tiny
    }
    # final.ckpt holds the weights after the last epoch, which the last validation and the test both used.
    diffs = {}
    for prefix in ("val", "test"):
        for name in METRICS:
            diffs[f"{prefix}/{name}"] = abs(logged[f"{prefix}/{name}"] - single[prefix][f"{prefix}/{name}"])
    print(f"DDP vs one process: max metric difference {max(diffs.values()):.3g}")
    assert max(diffs.values()) <= 1e-6, diffs


# ------------------------------------------------------------------------ the gather, on a padded sampler
class IndexedRows(Dataset):
    """Sample ``i`` carries the feature row ``(i, -i)`` and pid ``10 + i``, so a mixed-up row shows."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = torch.tensor([float(i), -float(i)])
        return {"feats": row, "pid": torch.tensor(10 + i), "camid": torch.tensor(i % 3), "index": torch.tensor(i)}


class GatherProbe(pl.LightningModule):
    """Runs the :class:`ReIDEvaluator` gather (what validation, test and pseudo-labelling use) on each rank and
    saves what it returns."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.evaluator = ReIDEvaluator(all_gather=self.all_gather)

    def on_validation_epoch_start(self) -> None:
        self.evaluator.world_size = self.trainer.world_size
        self.evaluator.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.evaluator.process(batch["feats"], batch)

    def on_validation_epoch_end(self) -> None:
        local = self.evaluator.num_processed
        gathered = self.evaluator.gather()
        torch.save({"local": local, **gathered}, Path(self.out_dir) / f"rank{self.global_rank}.pt")


def test_validation_gather_keeps_each_sample_once_under_sampler_padding(tmp_path: Path) -> None:
    size = 7  # two ranks: 4 + 4 samples, the 8th a padded duplicate of sample 0
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=True,
    )
    trainer.validate(GatherProbe(str(tmp_path)), dataloaders=DataLoader(IndexedRows(size), batch_size=3))
    for rank in (0, 1):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert out["local"] == 4  # the sampler did pad
        assert out["index"].tolist() == list(range(size))
        assert torch.equal(out["feats"], torch.tensor([[float(i), -float(i)] for i in range(size)]))
        assert out["pid"].tolist() == [10 + i for i in range(size)]
