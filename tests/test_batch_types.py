"""DGNetPP on the official batch mix: each type steps only its networks, a skipped aa batch runs no network and moves
no parameter (but steps the schedulers), the per-type counts and loss terms are logged, and old checkpoints'
``appearance.joint_call`` still loads."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from configs import typed_train
from torch.utils.data import DataLoader, Dataset

from dgnetpp_pl.config import ModelConfig, coerce
from dgnetpp_pl.module import DGNetPP
from dgnetpp_pl.schedule import AdaptSchedule

H, W, B, N_SRC, K = 64, 32, 3, 6, 4


def make_model(warmup_epochs: int, **schedule: object) -> DGNetPP:
    cfg = typed_train("experiment=demo").model
    plan = AdaptSchedule("adapt", warmup_epochs=warmup_epochs, pairing="official", **schedule)
    model = DGNetPP(cfg, plan, num_source_ids=N_SRC, target_capacity=K)
    if warmup_epochs == 0:
        model.set_target_classes(K)
    return model


def _images(n: int, g: torch.Generator) -> torch.Tensor:
    coarse = torch.randn(n, 3, H // 8, W // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)


def make_batch(kind: str, g: torch.Generator) -> dict:
    """A batch as the datamodule serves it: 2B images of one domain (aa, bb), B of each (ab), or a skip marker."""

    def part(n: int, labels: int) -> dict:
        return {"image": _images(n, g), "pos": _images(n, g), "label": torch.arange(n) % labels}

    if kind == "skip":
        return {"skip": "aa"}
    if kind == "aa":
        return {"source": part(2 * B, N_SRC)}
    if kind == "bb":
        return {"target": part(2 * B, K)}
    return {"source": part(B, N_SRC), "target": part(B, K)}


class Batches(Dataset):
    def __init__(self, kinds: list[str]) -> None:
        g = torch.Generator().manual_seed(0)
        self.batches = [make_batch(k, g) for k in kinds]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.batches[i]


def fit(model: DGNetPP, kinds: list[str]) -> pl.Trainer:
    loader = DataLoader(Batches(kinds), batch_size=None)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        limit_val_batches=0, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=loader)
    return trainer


def snapshot(model: DGNetPP) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict, after: dict) -> set[str]:
    return {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize(
    ("kind", "warmup_epochs", "networks"),
    [
        ("aa", 1, {"d_img", "d_dom", "gen_a", "e_app"}),
        ("bb", 1, {"d_img", "d_dom", "gen_b", "e_app"}),
        ("ab", 1, {"d_img", "d_dom", "gen_a", "gen_b", "e_app"}),
        ("bb", 0, {"d_img", "gen_b", "e_app"}),
    ],
)
def test_each_type_updates_only_its_networks(kind: str, warmup_epochs: int, networks: set[str]) -> None:
    model = make_model(warmup_epochs)
    before = snapshot(model)
    fit(model, [kind])
    assert changed(before, snapshot(model)) == networks


def test_a_skipped_aa_batch_runs_no_network_and_moves_nothing_but_the_schedulers() -> None:
    model = make_model(warmup_epochs=0)
    calls: list[str] = []
    for name in ("e_app", "gen_a", "gen_b", "d_img", "d_dom"):
        for sub in getattr(model, name).modules():
            sub.register_forward_hook(lambda mod, inp, out, n=name: calls.append(n))
    before = snapshot(model)
    trainer = fit(model, ["skip", "skip", "skip"])
    assert calls == [] and changed(before, snapshot(model)) == set()
    assert trainer.global_step == 0, "no optimiser stepped"
    for opt in trainer.optimizers:
        assert opt.state_dict()["state"] == {}
    # The official iteration counter and schedulers advance on skipped iterations too.
    assert [c.scheduler.last_epoch for c in trainer.lr_scheduler_configs] == [3] * 5
    metrics = trainer.callback_metrics
    assert float(metrics["train/batches_aa_skipped"]) == 3.0 and float(metrics["train/batches_aa"]) == 0.0


def test_type_counts_and_per_type_terms_are_logged() -> None:
    model = make_model(warmup_epochs=1)
    kinds = ["aa", "bb", "ab", "bb", "aa", "bb"]
    trainer = fit(model, kinds)
    metrics = trainer.callback_metrics
    assert {t: float(metrics[f"train/batches_{t}"]) for t in ("aa", "ab", "bb")} == {"aa": 2.0, "ab": 1.0, "bb": 3.0}
    assert "train/batches_aa_skipped" not in metrics, "warm-up skips nothing"
    assert "train/bb/domain_adv" in metrics and "train/bb/id_s1" not in metrics and "train/aa/id_t1" in metrics
    assert "train/aa/domain_adv" not in metrics and "train/aa/d_dom" in metrics  # D_dom trains on aa (both 0)
    assert "train/recon_x" in metrics and "train/g_total" in metrics


def test_cross_pairing_logs_only_ab_counts() -> None:
    cfg = typed_train("experiment=demo").model
    model = DGNetPP(cfg, AdaptSchedule("adapt", warmup_epochs=1), num_source_ids=N_SRC, target_capacity=K)
    metrics = fit(model, ["ab", "ab"]).callback_metrics
    assert float(metrics["train/batches_ab"]) == 2.0 and "train/batches_aa" not in metrics
    assert not any(k.startswith("train/ab/") for k in metrics)


def test_old_model_sections_with_joint_call_still_load() -> None:
    split = coerce(ModelConfig, {"appearance": {"arch": "resnet18", "joint_call": False}}).appearance
    assert (split.bn_groups, split.arch) == ("split", "resnet18")
    assert coerce(ModelConfig, {"appearance": {"joint_call": True}}).appearance.bn_groups == "joint"
