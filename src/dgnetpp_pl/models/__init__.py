"""Networks of DG-Net++: appearance encoder, per-domain generators, and the two discriminators."""

from dgnetpp_pl.models.appearance import AppearanceEncoder, AppearanceOutput, ClassBlock
from dgnetpp_pl.models.blocks import (
    ASPP,
    MLP,
    AdaINResBlock,
    AdaptiveInstanceNorm2d,
    Conv2dBlock,
    LayerNorm,
    ResBlock,
    ResBlocks,
    init_weights,
)
from dgnetpp_pl.models.decoder import Decoder
from dgnetpp_pl.models.discriminators import DomainDiscriminator, MultiScaleImageDiscriminator
from dgnetpp_pl.models.generator import Generator
from dgnetpp_pl.models.structure import StructureEncoder, to_gray
from dgnetpp_pl.models.teacher import Teacher

__all__ = [
    "ASPP",
    "MLP",
    "AdaINResBlock",
    "AdaptiveInstanceNorm2d",
    "AppearanceEncoder",
    "AppearanceOutput",
    "ClassBlock",
    "Conv2dBlock",
    "Decoder",
    "DomainDiscriminator",
    "Generator",
    "LayerNorm",
    "MultiScaleImageDiscriminator",
    "ResBlock",
    "ResBlocks",
    "StructureEncoder",
    "Teacher",
    "init_weights",
    "to_gray",
]
