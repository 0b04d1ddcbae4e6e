"""The networks of one stage built from the typed model config: E_app, one generator per domain, D_img, D_dom."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from dgnetpp_pl.models.appearance import AppearanceEncoder
from dgnetpp_pl.models.discriminators import DomainDiscriminator, MultiScaleImageDiscriminator
from dgnetpp_pl.models.generator import Generator

if TYPE_CHECKING:
    from dgnetpp_pl.config import ModelConfig


class Networks(NamedTuple):
    """``gen_b`` and ``d_dom`` are None in the source stage (DG-Net has one generator and no domain critic)."""

    e_app: AppearanceEncoder
    gen_a: Generator
    gen_b: Generator | None
    d_img: MultiScaleImageDiscriminator
    d_dom: DomainDiscriminator | None


def build_networks(cfg: ModelConfig, stage: str, num_classes: int) -> Networks:
    """Fresh networks (in this order, which fixes their random initialisation); ``num_classes`` is the joint
    classifier's size (source ids plus the reserved target capacity)."""
    a, s, d = cfg.appearance, cfg.structure, cfg.decoder
    e_app = AppearanceEncoder(
        num_classes=num_classes,
        arch=a.arch,
        pretrained=cfg.pretrained,
        last_stride=a.last_stride,
        bottleneck_dim=a.bottleneck_dim,
        droprates=tuple(a.droprates),
        parts=a.parts,
        detach_code=a.detach_code,
        checkpoint=a.checkpoint,
    )
    gen_kw = dict(
        dim=s.dim, n_downsample=s.n_downsample, n_res=s.n_res, code_dim=e_app.code_dim, mlp_dim=d.mlp_dim,
        aspp_dilations=tuple(s.aspp_dilations), checkpoint_decoder=d.checkpoint, fused=d.fused,
        checkpoint_structure=s.checkpoint,
    )  # fmt: skip
    gen_a = Generator(**gen_kw)
    gen_b = Generator(**gen_kw) if stage == "adapt" else None
    di = cfg.image_dis
    d_img = MultiScaleImageDiscriminator(dim=di.dim, n_layer=di.n_layer, n_res=di.n_res, num_scales=di.num_scales)
    d_dom = DomainDiscriminator(e_app.feature_dim, hidden=tuple(cfg.domain_dis.hidden)) if stage == "adapt" else None
    return Networks(e_app, gen_a, gen_b, d_img, d_dom)
