"""DGNetPP: the LightningModule. Manual optimisation alternates one discriminator step and one
generator/encoder step per batch; the tensor math lives in :mod:`dgnetpp_pl.objective`.

Stages: ``source`` trains DG-Net on the labelled source with one generator; ``adapt`` trains DG-Net++ with one
generator per domain, a warm-up with domain-adversarial alignment, then self-training on pseudo-labels.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from dgnetpp_pl import objective
from dgnetpp_pl.checkpoints import capture_rng_state, restore_rng_state
from dgnetpp_pl.features import check_finite, embed_images
from dgnetpp_pl.metrics import evaluate_ranking
from dgnetpp_pl.models.appearance import AppearanceEncoder
from dgnetpp_pl.models.discriminators import DomainDiscriminator, MultiScaleImageDiscriminator
from dgnetpp_pl.models.generator import Generator

PHASES = ("source", "warmup", "self_training")


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or Inf; the message names the term, the step and the phase."""


class DGNetPP(pl.LightningModule):
    """DG-Net (``stage="source"``) and DG-Net++ (``stage="adapt"``) with manual optimisation.

    ``model`` is the plain ``model`` config; ``target_capacity`` is the number of target classes the joint
    classifier reserves (k for k-means, ``max_clusters`` for DBSCAN).
    """

    def __init__(
        self,
        model: dict[str, Any],
        stage: str = "adapt",
        num_source_ids: int = 1,
        target_capacity: int = 0,
        warmup_epochs: int = 0,
        app_lr_ramp: float = 60.0,
        num_query: int = 0,
        skip_nonfinite_steps: int = 0,
        image_size: tuple[int, int] = (256, 128),
    ) -> None:
        super().__init__()
        if stage not in ("source", "adapt"):
            raise ValueError(f"stage must be 'source' or 'adapt', got {stage!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.cfg = model
        self.stage = stage
        self.num_source_ids = num_source_ids
        self.target_capacity = target_capacity if stage == "adapt" else 0
        a = model["appearance"]
        self.e_app = AppearanceEncoder(
            num_classes=num_source_ids + self.target_capacity,
            arch=a["arch"],
            pretrained=model["pretrained"],
            last_stride=a["last_stride"],
            bottleneck_dim=a["bottleneck_dim"],
            droprates=tuple(a["droprates"]),
            parts=a["parts"],
            detach_code=a["detach_code"],
            checkpoint=a.get("checkpoint", False),
        )
        s, d = model["structure"], model["decoder"]
        gen_kw = dict(
            dim=s["dim"], n_downsample=s["n_downsample"], n_res=s["n_res"], code_dim=self.e_app.code_dim,
            mlp_dim=d["mlp_dim"], aspp_dilations=tuple(s.get("aspp_dilations", (3, 6, 9))),
            checkpoint_decoder=d.get("checkpoint", False), fused=d.get("fused", True),
            checkpoint_structure=s.get("checkpoint", False),
        )  # fmt: skip
        if d["n_res"] != s["n_res"]:
            raise ValueError("model.decoder.n_res must equal model.structure.n_res (one AdaIN block per code chunk)")
        self.gen_a = Generator(**gen_kw)
        # The source stage (DG-Net) has a single generator; DG-Net++ has one per domain.
        self.gen_b = Generator(**gen_kw) if stage == "adapt" else None
        di = model["image_dis"]
        self.d_img = MultiScaleImageDiscriminator(
            dim=di["dim"], n_layer=di["n_layer"], n_res=di["n_res"], num_scales=di["num_scales"]
        )
        self.d_dom = (
            DomainDiscriminator(self.e_app.feature_dim, hidden=tuple(model["domain_dis"]["hidden"]))
            if stage == "adapt"
            else None
        )
        if model.get("channels_last"):
            self.to(memory_format=torch.channels_last)
        # Number of target clusters in use (0 until the first pseudo-labels); saved with the weights.
        self.register_buffer("num_target_classes", torch.zeros((), dtype=torch.long))
        self.register_buffer("best_map", torch.full((), -1.0))
        self.register_buffer("lr_ramped", torch.zeros((), dtype=torch.bool))
        self.register_buffer("nonfinite_steps", torch.zeros((), dtype=torch.long))
        self._val_outputs: list[dict[str, Tensor]] = []

    # ------------------------------------------------------------------ phases
    @property
    def phase(self) -> str:
        if self.stage == "source":
            return "source"
        return "warmup" if self.current_epoch < self.hparams.warmup_epochs else "self_training"

    @property
    def gen_b_or_a(self) -> Generator:
        return self.gen_b if self.gen_b is not None else self.gen_a

    # ------------------------------------------------------------ optimisers
    def _optim_names(self) -> list[str]:
        names = ["d_img", "gen_a"] + (["gen_b", "d_dom"] if self.stage == "adapt" else []) + ["e_app"]
        return names

    def configure_optimizers(self):
        o = self.cfg["optim"]
        lr = o[self.stage]
        betas = tuple(o["betas"])
        wd = o["weight_decay"]

        def adam(params, rate):
            return torch.optim.Adam([p for p in params if p.requires_grad], lr=rate, betas=betas, weight_decay=wd)

        opts = {
            "d_img": adam(self.d_img.parameters(), lr["lr_d"]),
            "gen_a": adam(self.gen_a.parameters(), lr["lr_g"]),
        }
        if self.stage == "adapt":
            opts["gen_b"] = adam(self.gen_b.parameters(), lr["lr_g"])
            opts["d_dom"] = adam(self.d_dom.parameters(), lr["lr_dom"])
        opts["e_app"] = torch.optim.SGD(
            [
                {"params": list(self.e_app.backbone_parameters()), "lr": lr["lr_app"]},
                {"params": list(self.e_app.head_parameters()), "lr": lr["lr_app"] * o["head_lr_mult"]},
            ],
            lr=lr["lr_app"],
            momentum=o["momentum"],
            weight_decay=wd,
            nesterov=True,
        )
        optimizers = [opts[n] for n in self._optim_names()]
        schedulers = [
            torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(o["milestones"]), gamma=o["gamma"])
            for opt in optimizers
        ]
        return optimizers, schedulers

    def _named_optimizers(self) -> dict[str, Any]:
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        return dict(zip(self._optim_names(), opts))

    def on_train_epoch_start(self) -> None:
        # The official x60 appearance-encoder LR ramp at the first self-training epoch, applied once.
        if self.phase == "self_training" and not bool(self.lr_ramped):
            opt = self._named_optimizers()["e_app"]
            for group in opt.param_groups:
                group["lr"] *= self.hparams.app_lr_ramp
            self.lr_ramped.fill_(True)

    # ------------------------------------------------------------- targets
    @torch.no_grad()
    def set_target_classes(self, num_clusters: int, centroids: Tensor | None = None) -> None:
        """Re-initialise the target rows of both classifiers for a new round of ``num_clusters`` pseudo-labels.

        ``centroids`` ``(num_clusters, bottleneck)`` gives normalised cluster means as initial weights; otherwise
        N(0, 0.001). The parameter shapes never change, so optimiser state stays attached (momentum of the
        target rows is cleared).
        """
        if num_clusters > self.target_capacity:
            raise ValueError(
                f"{num_clusters} target clusters exceed the classifier capacity {self.target_capacity}; "
                "raise pseudo_label.max_clusters (DBSCAN) or lower pseudo_label.k."
            )
        lo, hi = self.num_source_ids, self.num_source_ids + self.target_capacity
        for head in (self.e_app.head1, self.e_app.head2):
            w, b = head.classifier.weight, head.classifier.bias
            if centroids is not None and num_clusters > 0:
                c = F.normalize(centroids.to(w).float(), dim=1)
                # Match the norm of the trained source rows so the new logits are on the same scale.
                scale = w[:lo].norm(dim=1).mean() if lo > 0 else torch.tensor(1.0)
                w[lo : lo + num_clusters] = c.to(w.dtype) * scale
                w[lo + num_clusters : hi].normal_(0, 0.001)
            else:
                w[lo:hi].normal_(0, 0.001)
            if b is not None:
                b[lo:hi] = 0
            if self._trainer is not None:
                self._clear_momentum([w, b])
        self.num_target_classes.fill_(num_clusters)

    def _clear_momentum(self, params: list[Tensor | None]) -> None:
        opt = self._named_optimizers().get("e_app")
        if opt is None:
            return
        lo = self.num_source_ids
        for p in params:
            if p is not None and p in opt.state and "momentum_buffer" in opt.state[p]:
                buf = opt.state[p]["momentum_buffer"]
                if buf is not None:
                    buf[lo:] = 0

    def _global_target_labels(self, labels: Tensor) -> Tensor:
        return torch.where(labels >= 0, labels + self.num_source_ids, torch.full_like(labels, -1))

    # ------------------------------------------------------------- training
    def _pair_from_batch(self, batch: dict[str, dict[str, Tensor]]) -> tuple[objective.PairBatch, objective.StepFlags]:
        w = self.cfg["loss"]
        if self.stage == "source":
            src = batch["source"]
            half = src["image"].shape[0] // 2
            pair = objective.PairBatch(
                x_a=src["image"][:half], xp_a=src["pos"][:half], l_a=src["label"][:half],
                x_b=src["image"][half:], xp_b=src["pos"][half:], l_b=src["label"][half:],
            )  # fmt: skip
            flags = objective.StepFlags(
                b_ids=True, domain_adv=False, recon_xp_b=w["recon_xp"], pid_b=True,
                num_active_classes=self.num_source_ids,
            )  # fmt: skip
            return pair, flags
        s, t = batch["source"], batch["target"]
        self_training = self.phase == "self_training" and int(self.num_target_classes) > 0
        pair = objective.PairBatch(
            x_a=s["image"], xp_a=s["pos"], l_a=s["label"],
            x_b=t["image"], xp_b=t["pos"], l_b=self._global_target_labels(t["label"]),
        )  # fmt: skip
        flags = objective.StepFlags(
            b_ids=self_training,
            domain_adv=self.phase == "warmup" and w["domain_adv"] > 0,
            recon_xp_b=w["recon_xp_tgt"],
            pid_b=False,
            num_active_classes=self.num_source_ids + (int(self.num_target_classes) if self_training else 0),
        )
        return pair, flags

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> None:
        w = self.cfg["loss"]
        pair, flags = self._pair_from_batch(batch)
        fwd = objective.forward_pair(
            self.e_app, self.gen_a, self.gen_b_or_a, pair, flags,
            erasing_p=w["erasing_p"], structure_detach_p=w["structure_detach_p"],
            joint_call=self.cfg["appearance"].get("joint_call", True),
        )  # fmt: skip
        d_losses = self.discriminator_step(fwd, pair, flags)
        if d_losses is None:
            return
        g_losses = self.generator_step(fwd, pair, flags)
        if g_losses is None:
            return
        scheds = self.lr_schedulers()
        for sched in scheds if isinstance(scheds, list) else [scheds]:
            sched.step()
        self._log_step(fwd, pair, {**d_losses, **g_losses})

    def discriminator_step(
        self, fwd: objective.Forward, pair: objective.PairBatch, flags: objective.StepFlags
    ) -> dict[str, Tensor] | None:
        """D_img (and, in warm-up, D_dom) on detached fakes and features; returns the terms, None if skipped."""
        w = self.cfg["loss"]
        opts = self._named_optimizers()
        losses = objective.image_d_loss(self.d_img, fwd, pair, gan_w=w["gan"], r1_w=w["r1"])
        total = losses["d_img_total"]
        d_opts = [opts["d_img"]]
        if flags.domain_adv:
            losses["d_dom"] = objective.domain_d_loss(
                self.d_dom, fwd, weight=w["domain_adv"], reduction=w["domain_reduction"]
            )
            total = total + losses["d_dom"]
            d_opts.append(opts["d_dom"])
        for opt in d_opts:
            opt.zero_grad(set_to_none=True)
        if not self._check_finite(losses, "discriminator"):
            return None
        self.manual_backward(total)
        for opt in d_opts:
            opt.step()
        return losses

    def generator_step(
        self, fwd: objective.Forward, pair: objective.PairBatch, flags: objective.StepFlags
    ) -> dict[str, Tensor] | None:
        """E_app and both generators on the shared forward; the discriminators are frozen inside."""
        opts = self._named_optimizers()
        losses = objective.generator_losses(fwd, pair, flags, self.d_img, self.d_dom, self.cfg["loss"])
        g_opts = [opts["gen_a"], opts["e_app"]] + ([opts["gen_b"]] if self.gen_b is not None else [])
        for opt in g_opts:
            opt.zero_grad(set_to_none=True)
        if not self._check_finite(losses, "generator"):
            return None
        self.manual_backward(losses["g_total"])
        clip = self.cfg["optim"].get("grad_clip")
        for opt in g_opts:
            if clip:
                self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")
            opt.step()
        return losses

    def _log_step(self, fwd: objective.Forward, pair: objective.PairBatch, terms: dict[str, Tensor]) -> None:
        bsz = pair.x_a.shape[0]
        logs = {f"train/{k}": v.detach() for k, v in terms.items() if k != "g_total"}
        logs["train/acc_source"] = objective.accuracy(fwd.tensors["id1_a"], pair.l_a)
        if "id1_b" in fwd.tensors:
            logs["train/acc_target"] = objective.accuracy(fwd.tensors["id1_b"], pair.l_b)
        for name, opt in self._named_optimizers().items():
            logs[f"train/lr_{name}"] = opt.param_groups[0]["lr"]
        logs["train/phase"] = float(PHASES.index(self.phase))
        self.log_dict(logs, batch_size=bsz)
        self.log("train/g_total", terms["g_total"].detach(), prog_bar=True, batch_size=bsz)

    def _check_finite(self, terms: dict[str, Tensor], step: str) -> bool:
        bad = [k for k, v in terms.items() if not bool(torch.isfinite(v.detach()).all())]
        if not bad:
            return True
        limit = int(self.hparams.skip_nonfinite_steps)
        self.nonfinite_steps += 1
        msg = (
            f"Non-finite loss in the {step} step: {', '.join(bad)} at global step {self.global_step} "
            f"(epoch {self.current_epoch}, phase {self.phase})."
        )
        if int(self.nonfinite_steps) <= limit:
            self.print(f"{msg} Skipping it ({int(self.nonfinite_steps)}/{limit} tolerated).")
            self.log("train/skipped_nonfinite", self.nonfinite_steps.float())
            return False
        raise NonFiniteLossError(
            msg + " The last good checkpoint is kept; lower the learning rates, try fp32, or set "
            "skip_nonfinite_steps=N to tolerate a few bad steps."
        )

    # ----------------------------------------------------------- generation
    @torch.no_grad()
    def swap(self, structure_images: Tensor, appearance_images: Tensor, decoder: str = "a") -> Tensor:
        """Images with the structure of ``structure_images`` and the appearance of ``appearance_images``."""
        gen = self.gen_a if decoder == "a" else self.gen_b_or_a
        code, _ = self.e_app.backbone_forward(appearance_images)
        return gen.decode(gen.encode(structure_images), code)

    # ----------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        f = self.cfg["features"]
        feats = embed_images(self.e_app, batch["image"], f["alpha"], f["flip"])
        self._val_outputs.append(
            {"feats": feats, "pid": batch["pid"], "camid": batch["camid"], "index": batch["index"]}
        )

    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []
        self.sync_buffers_from_rank_zero()

    def sync_buffers_from_rank_zero(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics) before evaluation-mode features.

        Under DDP each rank's BatchNorm tracks its own batches, but only rank 0's weights are saved: without this,
        metrics and pseudo-labels would mix features of slightly different models. Collective: call on all ranks.
        """
        if self._trainer is None or self.trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return
        for buf in self.buffers():
            if buf.dtype != torch.bool:  # bool buffers (flags) agree already; not every backend sends bool
                torch.distributed.broadcast(buf, src=0)

    def _gather_eval(self) -> dict[str, Tensor]:
        """Concatenate this rank's outputs, all-gather, and drop the distributed sampler's padded duplicates."""
        local = {k: torch.cat([o[k] for o in self._val_outputs]) for k in self._val_outputs[0]}
        self._val_outputs = []
        if self.trainer.world_size > 1:
            gathered = self.all_gather(local)
            local = {k: v.reshape(-1, *v.shape[2:]) if v.dim() > 2 else v.reshape(-1) for k, v in gathered.items()}
        order = torch.argsort(local["index"], stable=True)
        local = {k: v[order] for k, v in local.items()}
        keep = torch.ones_like(local["index"], dtype=torch.bool)
        keep[1:] = local["index"][1:] != local["index"][:-1]
        return {k: v[keep] for k, v in local.items()}

    def _evaluate(self, prefix: str) -> dict[str, float]:
        if not self._val_outputs:
            return {}
        data = self._gather_eval()
        feats = data["feats"].float()
        check_finite(feats, f"{prefix} (epoch {self.current_epoch})")
        loaders = self.trainer.val_dataloaders if prefix == "val" else self.trainer.test_dataloaders
        dataset = getattr(loaders, "dataset", None)
        nq = int(getattr(dataset, "num_query", self.hparams.num_query))
        total = len(dataset) if dataset is not None else feats.shape[0]
        if nq <= 0 or nq >= total:
            raise ValueError(f"num_query={nq} is invalid for {total} evaluation images")
        # Query/gallery by dataset index, so a partial pass (limit_val_batches, fast_dev_run) splits correctly.
        is_q = data["index"] < nq
        if feats.shape[0] < total:
            if bool(is_q.all()) or not bool(is_q.any()):
                rank_zero_warn(
                    f"{prefix}: metrics skipped, only {feats.shape[0]} of {total} evaluation images were seen "
                    "(limit_val_batches / fast_dev_run) and they hold no query-gallery pair"
                )
                return {}
            rank_zero_warn(f"{prefix}: metrics on {feats.shape[0]} of {total} evaluation images only")
        res = evaluate_ranking(
            1.0 - feats[is_q] @ feats[~is_q].T,
            data["pid"][is_q],
            data["pid"][~is_q],
            data["camid"][is_q],
            data["camid"][~is_q],
            ap="market",
        )
        out = {
            f"{prefix}/mAP": float(res["mAP"]),
            f"{prefix}/Rank-1": float(res["cmc"][0]),
            f"{prefix}/Rank-5": float(res["cmc"][min(4, len(res["cmc"]) - 1)]),
            f"{prefix}/Rank-10": float(res["cmc"][min(9, len(res["cmc"]) - 1)]),
            f"{prefix}/mINP": float(res["mINP"]),
        }
        return out

    def on_validation_epoch_end(self) -> None:
        out = self._evaluate("val")
        if not out:
            return
        if not self.trainer.sanity_checking:
            self.best_map.fill_(max(float(self.best_map), out["val/mAP"]))
            out["val/mAP_best"] = float(self.best_map)
        self.log_dict(out, sync_dist=False, rank_zero_only=False)
        self.last_eval = out

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_start(self) -> None:
        self._val_outputs = []
        self.sync_buffers_from_rank_zero()

    def on_test_epoch_end(self) -> None:
        out = self._evaluate("test")
        if out:
            self.log_dict(out, sync_dist=False)
            self.last_eval = out

    # ----------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dgnetpp"] = {"stage": self.stage, "phase": self.phase, "format": 1}
        # The last validation's metrics, so a run resumed after its last epoch still reports them.
        checkpoint["dgnetpp"]["val_metrics"] = {
            k: v for k, v in getattr(self, "last_eval", {}).items() if k.startswith("val/")
        }
        # Lightning does not save the global RNGs; random erasing and the structure-detach coin draw from them.
        checkpoint["rng_states"] = capture_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.last_eval = dict(checkpoint.get("dgnetpp", {}).get("val_metrics", {}))
        # Only when resuming a fit: loading weights for inference must not reseed the caller's RNGs. Every
        # rank gets rank 0's states, which equal its own since all ranks draw the same amounts from one seed.
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if fitting and "rng_states" in checkpoint:
            restore_rng_state(checkpoint["rng_states"])

    def load_source_stage(self, state_dict: dict[str, Tensor], keep_source_classifier: bool = True) -> None:
        """Initialise the adapt stage from a source-stage state dict: both generators from the source
        generator, D_img and E_app as trained; the classifiers grow to hold the target capacity."""
        own = self.state_dict()
        new: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            if key.startswith("gen_a."):
                new[key] = value
                new["gen_b." + key[len("gen_a.") :]] = value
            elif key.startswith(("d_img.", "e_app.")):
                if key.endswith("classifier.weight") or key.endswith("classifier.bias"):
                    if keep_source_classifier:
                        grown = own[key].clone()
                        grown[: value.shape[0]] = value
                        new[key] = grown
                    continue
                new[key] = value
        missing_src = [k for k in own if k.startswith(("gen_a.", "e_app.", "d_img.")) and k not in new]
        missing_src = [k for k in missing_src if "classifier" not in k]
        if missing_src:
            raise ValueError(
                f"The source-stage checkpoint lacks {len(missing_src)} parameters (e.g. {missing_src[0]}); "
                "was it trained with a different model size? Use the same model= for both stages."
            )
        for key, value in new.items():
            if own[key].shape != value.shape:
                raise ValueError(
                    f"Parameter {key} has shape {tuple(value.shape)} in the source-stage checkpoint but "
                    f"{tuple(own[key].shape)} here; the checkpoint comes from a different model size. "
                    "Use the same model= (and data image size) for both stages."
                )
        self.load_state_dict(new, strict=False)


def lr_of(module: DGNetPP, name: str) -> float:
    """Current learning rate of one optimiser (by name) for logging and tests."""
    return module._named_optimizers()[name].param_groups[0]["lr"]
