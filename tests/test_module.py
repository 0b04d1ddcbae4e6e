"""DGNetPP: which parameters each step updates, frozen re-encoding, learning on a fixed batch, bf16."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import pytorch_lightning as pl
import torch
from configs import typed_train
from torch.utils.data import DataLoader, Dataset

from dgnetpp_pl import objective
from dgnetpp_pl.config import ModelConfig
from dgnetpp_pl.module import DGNetPP, NonFiniteLossError
from dgnetpp_pl.schedule import AdaptSchedule

H, W, B, N_SRC = 64, 32, 3, 6


def small_model_cfg() -> ModelConfig:
    return typed_train("experiment=demo").model


def make_model(stage: str, warmup_epochs: int = 0, cfg: ModelConfig | None = None, **kwargs) -> DGNetPP:
    schedule = AdaptSchedule(stage, warmup_epochs=warmup_epochs)
    return DGNetPP(cfg or small_model_cfg(), schedule, num_source_ids=N_SRC, **kwargs)


def _smooth_images(n: int, g: torch.Generator) -> torch.Tensor:
    """Person-sized images with low-frequency content (a coarse random grid, upsampled)."""
    coarse = torch.randn(n, 3, H // 8, W // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)


class FixedPairs(Dataset):
    """The same images every step; labels chosen so that every half is labelled."""

    def __init__(self, stage: str, n: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.stage = stage
        mult = 2 if stage == "source" else 1
        self.dom = {
            name: {
                "image": _smooth_images(B * mult, g),
                "pos": _smooth_images(B * mult, g),
                "label": torch.arange(B * mult) % N_SRC,
                "camid": torch.zeros(B * mult, dtype=torch.long),
                "index": torch.arange(B * mult),
            }
            for name in (["source"] if stage == "source" else ["source", "target"])
        }
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return self.dom


def _collate(items: list[dict]) -> dict:
    return items[0]


def _fit(model: DGNetPP, steps: int, callbacks=None, precision="32-true") -> pl.Trainer:
    loader = DataLoader(FixedPairs(model.stage, n=steps), batch_size=1, collate_fn=_collate)
    # max_epochs over `steps` batches: in manual optimisation max_steps counts optimizer.step() calls.
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        limit_val_batches=0, callbacks=callbacks or [], precision=precision, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=loader)
    return trainer


def _snapshot(model: DGNetPP) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _changed(before: dict, after: dict) -> set[str]:
    return {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("stage", ["source", "adapt"])
def test_each_step_updates_exactly_its_parameters(stage, monkeypatch):
    model = make_model(stage, warmup_epochs=1, target_capacity=4)
    snaps: dict[str, dict] = {}
    orig_d, orig_g = DGNetPP.discriminator_step, DGNetPP.generator_step

    def d_step(self, *a):
        snaps["start"] = _snapshot(self)
        out = orig_d(self, *a)
        snaps["after_d"] = _snapshot(self)
        return out

    def g_step(self, *a):
        out = orig_g(self, *a)
        snaps["after_g"] = _snapshot(self)
        return out

    monkeypatch.setattr(DGNetPP, "discriminator_step", d_step)
    monkeypatch.setattr(DGNetPP, "generator_step", g_step)
    _fit(model, steps=1)
    d_changed = _changed(snaps["start"], snaps["after_d"])
    g_changed = _changed(snaps["after_d"], snaps["after_g"])
    discriminators = {"d_img", "d_dom"} if stage == "adapt" else {"d_img"}
    generators = {"e_app", "gen_a", "gen_b"} if stage == "adapt" else {"e_app", "gen_a"}
    assert d_changed == discriminators
    assert g_changed == generators


def test_frozen_reencoding_leaves_running_stats_and_weights_alone():
    model = make_model("adapt", target_capacity=4)
    x = torch.randn(4, 3, H, W, requires_grad=True)
    bn_before = {k: v.clone() for k, v in model.e_app.named_buffers()}
    out = objective.frozen_call(model.e_app, "forward", x)
    out.logits[0].sum().backward()
    assert all(torch.equal(bn_before[k], v) for k, v in model.e_app.named_buffers())
    assert all(p.grad is None for p in model.e_app.parameters())
    assert x.grad is not None and x.grad.abs().sum() > 0
    # Dropout is off in the frozen call: two calls agree.
    again = objective.frozen_call(model.e_app, "forward", x)
    torch.testing.assert_close(out.logits[0], again.logits[0])


def test_appearance_code_reconstruction_is_gradient_free_as_in_the_official_code():
    model = make_model("adapt", target_capacity=4)
    d = FixedPairs("adapt").dom
    pair = objective.PairBatch(
        d["source"]["image"], d["source"]["pos"], d["source"]["label"],
        d["target"]["image"], d["target"]["pos"], torch.full((B,), -1),
    )  # fmt: skip
    flags = objective.StepFlags(False, True, 0.0, False, N_SRC)
    fwd = objective.forward_pair(
        model.e_app, model.gen_a, model.gen_b, pair, flags, erasing_p=0.5, structure_detach_p=0.5
    )
    g = objective.generator_losses(fwd, pair, flags, model.d_img, model.d_dom, model.cfg.loss)
    assert not g["recon_f"].requires_grad
    assert g["cycle"].requires_grad and g["domain_adv"].requires_grad
    assert "id_t1" not in g  # no target ids during warm-up


class _Recorder(pl.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.rows.append({k: float(m[f"train/{k}"]) for k in ("recon_x", "cycle", "recon_xp")})


@pytest.mark.slow
def test_overfitting_a_fixed_batch_lowers_reconstruction_and_cycle():
    torch.manual_seed(0)
    cfg = small_model_cfg()
    cfg.optim.source = dataclasses.replace(cfg.optim.source, lr_g=1e-3, lr_d=1e-4, lr_app=1e-3)
    model = make_model("source", cfg=cfg)
    rec = _Recorder()
    _fit(model, steps=40, callbacks=[rec])
    # Means of the first and last three steps: single steps are noisy (random erasing, dropout, the GAN).
    # Forty steps on random smooth images train reconstruction only; whether swaps keep the structure donor's
    # layout shows after real training (the README's swap grid), not here.
    first = {k: sum(r[k] for r in rec.rows[:3]) / 3 for k in rec.rows[0]}
    last = {k: sum(r[k] for r in rec.rows[-3:]) / 3 for k in rec.rows[0]}
    assert last["recon_x"] < 0.95 * first["recon_x"], (first, last)
    assert last["cycle"] < 0.95 * first["cycle"], (first, last)


def test_bf16_mixed_steps_run_on_cpu_with_finite_losses():
    model = make_model("adapt", warmup_epochs=1, target_capacity=4)
    rec = _Recorder()
    _fit(model, steps=2, callbacks=[rec], precision="bf16-mixed")
    assert len(rec.rows) == 2
    assert all(torch.isfinite(torch.tensor(list(r.values()))).all() for r in rec.rows)


def test_nonfinite_loss_stops_naming_the_term(monkeypatch):
    model = make_model("source")
    orig = objective.generator_losses

    def poisoned(*a, **k):
        out = orig(*a, **k)
        out["cycle"] = out["cycle"] * float("nan")
        return out

    monkeypatch.setattr(objective, "generator_losses", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"cycle at global step \d+ \(epoch 0, phase source\)"):
        _fit(model, steps=1)


def test_nonfinite_steps_can_be_tolerated(monkeypatch):
    model = make_model("source", skip_nonfinite_steps=2)
    before = copy.deepcopy(model.gen_a.state_dict())
    orig = objective.generator_losses

    def poisoned(*a, **k):
        out = orig(*a, **k)
        out["gan"] = out["gan"] * float("inf")
        return out

    monkeypatch.setattr(objective, "generator_losses", poisoned)
    _fit(model, steps=2)
    assert int(model.nonfinite_steps) == 2
    # Skipped generator steps leave the generator untouched.
    assert all(torch.equal(before[k], v) for k, v in model.gen_a.state_dict().items())
    with pytest.raises(NonFiniteLossError):
        _fit(model, steps=1)


def test_target_classes_are_masked_until_pseudo_labels_exist():
    model = make_model("adapt", target_capacity=4)
    logits = torch.zeros(2, N_SRC + 4)
    masked = objective.mask_logits(logits, N_SRC)
    assert (masked[:, N_SRC:] < -1e3).all() and (masked[:, :N_SRC] == 0).all()
    centroids = torch.randn(3, model.e_app.bottleneck_dim)
    src_rows = model.e_app.head1.classifier.weight[:N_SRC].clone()
    model.set_target_classes(3, centroids)
    w = model.e_app.head1.classifier.weight
    assert int(model.num_target_classes) == 3
    torch.testing.assert_close(w[:N_SRC], src_rows)
    cos = torch.nn.functional.cosine_similarity(w[N_SRC : N_SRC + 3], centroids, dim=1)
    assert (cos > 0.999).all()
    with pytest.raises(ValueError, match="capacity"):
        model.set_target_classes(5)
