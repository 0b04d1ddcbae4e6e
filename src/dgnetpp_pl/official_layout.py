"""How our networks' state dicts are named in the official code, and the renaming both ways.

The official networks compute what ours compute, so a conversion is a renaming of entries with equal shapes:

- appearance encoder (official `ft_netAB` / `ft_netABe`, file `id_*.pt`): the torchvision ResNet under `model.`,
  the heads as `classifier{1,2}.add_block.{0,1}` (Linear, BN1d) and `classifier{1,2}.classifier.0`;
- generator (official `AdaINGen`, files `gen_*.pt`): `enc_content.model.*`, `dec.model.*` (index 0 is a
  dropout, 1 the AdaIN ResBlocks, then the upsampling and output layers) and `mlp_{w,b}{1..4}.model.{0,1,2}.fc`;
- image discriminator (official `MsImageDis`, files `dis_*.pt`): `cnns.{scale}.{layer}`, one index per layer;
- teacher (the re-ID baseline's `ft_net`, file `net_last.pth`): `model.` and `classifier.add_block` /
  `classifier.classifier.0`.

Entries the official modules hold but never use (the ImageNet `fc` of each ResNet, the AdaIN layers' dummy
running statistics) are written on export with the values the official code would hold for an unused layer
and skipped on import.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dgnetpp_pl.models.appearance import AppearanceEncoder
from dgnetpp_pl.models.blocks import ASPP, Conv2dBlock, ResBlocks
from dgnetpp_pl.models.discriminators import MultiScaleImageDiscriminator
from dgnetpp_pl.models.generator import Generator
from dgnetpp_pl.models.teacher import Teacher

# The official ASPP names its three dilated branches after their DeepLab rates, whatever the dilations.
ASPP_BRANCHES = ("conv6", "conv12", "conv18")
IMAGENET_CLASSES = 1000
# BatchNorm's step counter: absent from files saved by PyTorch < 0.4.1 and without effect on the outputs.
COUNTER = "num_batches_tracked"
_MAX_LISTED = 30


class OfficialLayoutError(ValueError):
    """A file's entries do not match the official layout of the network asked for; the message names the file."""


@dataclass(frozen=True)
class Layout:
    """One network's official naming: `names` maps each of our state-dict keys to its official key; `unused`
    holds the official-only entries (never read by the official code) with the values written on export."""

    names: dict[str, str]
    unused: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Imported:
    """An official state dict renamed to ours: `state` for `load_state_dict`, the official-only entries found
    (`unused`) and our BatchNorm counters the file lacked, set to 0 (`filled`)."""

    state: dict[str, Tensor]
    unused: list[str]
    filled: list[str]


def _names(module: nn.Module, prefixes: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Rename every state-dict key of `module` by the first matching (ours, official) prefix pair."""
    pairs = list(prefixes)
    names: dict[str, str] = {}
    for key in module.state_dict():
        for ours, theirs in pairs:
            if key.startswith(ours):
                names[key] = theirs + key[len(ours) :]
                break
        else:
            raise OfficialLayoutError(
                f"{type(module).__name__} entry {key!r} has no counterpart in the official layout; only the "
                "official architecture (the paper's networks) can be converted."
            )
    return names


def _res_blocks(blocks: ResBlocks, ours: str, theirs: str, start: int = 0) -> list[tuple[str, str]]:
    """Our ResBlock `r` (`conv1`, `conv2`) is official layer `start + r` (`model.0`, `model.1`)."""
    pairs = []
    for r in range(len(blocks)):
        t = f"{theirs}{start + r}"
        pairs += [(f"{ours}{r}.conv1.", f"{t}.model.0."), (f"{ours}{r}.conv2.", f"{t}.model.1.")]
    return pairs


def _resnet_fc(feature_dim: int) -> dict[str, Tensor]:
    # Written as zeros: both official loaders drop this layer right after loading.
    return {
        "model.fc.weight": torch.zeros(IMAGENET_CLASSES, feature_dim),
        "model.fc.bias": torch.zeros(IMAGENET_CLASSES),
    }


def appearance_layout(e_app: AppearanceEncoder) -> Layout:
    """Official `ft_netABe` names of the appearance encoder (file `id_*.pt`, entry `'a'`)."""
    pairs = [("backbone.", "model.")]
    for ours, theirs in (("head1", "classifier1"), ("head2", "classifier2")):
        pairs += [
            (f"{ours}.bottleneck.0.", f"{theirs}.add_block.0."),
            (f"{ours}.bottleneck.1.", f"{theirs}.add_block.1."),
            (f"{ours}.classifier.", f"{theirs}.classifier.0."),
        ]
    return Layout(_names(e_app, pairs), _resnet_fc(e_app.feature_dim))


def teacher_layout(teacher: Teacher) -> Layout:
    """The re-ID baseline's `ft_net` names of the teacher (file `net_last.pth`, a plain state dict)."""
    pairs = [
        ("backbone.", "model."),
        ("head.bottleneck.0.", "classifier.add_block.0."),
        ("head.bottleneck.1.", "classifier.add_block.1."),
        ("head.classifier.", "classifier.classifier.0."),
    ]
    return Layout(_names(teacher, pairs), _resnet_fc(teacher.head.bottleneck[0].in_features))


def generator_layout(gen: Generator) -> Layout:
    """Official `AdaINGen` names of one generator (files `gen_*.pt`)."""
    pairs: list[tuple[str, str]] = []
    for i, layer in enumerate(gen.encoder.model):
        ours, theirs = f"encoder.model.{i}.", f"enc_content.model.{i}."
        if isinstance(layer, ResBlocks):
            pairs += _res_blocks(layer, ours, theirs + "model.")
        elif isinstance(layer, ASPP):
            if len(layer.dilated) != len(ASPP_BRANCHES):
                raise OfficialLayoutError(
                    f"The official ASPP has {len(ASPP_BRANCHES)} dilated branches; this structure encoder has "
                    f"{len(layer.dilated)} (model.structure.aspp_dilations)."
                )
            pairs.append((ours + "branch1.", theirs + "conv1."))
            pairs += [(f"{ours}dilated.{b}.", f"{theirs}{name}.") for b, name in enumerate(ASPP_BRANCHES)]
            pairs.append((ours + "fuse.", theirs + "fuse."))
        elif isinstance(layer, Conv2dBlock):
            pairs.append((ours, theirs))
    unused: dict[str, Tensor] = {}
    for k, block in enumerate(gen.decoder.res_blocks):
        for c, conv in enumerate((block.conv1, block.conv2)):
            theirs = f"dec.model.1.model.{k}.model.{c}."
            pairs.append((f"decoder.res_blocks.{k}.conv{c + 1}.", theirs))
            # The official AdaIN keeps running statistics it never updates nor reads.
            unused[theirs + "norm.running_mean"] = torch.zeros(conv.norm.num_features)
            unused[theirs + "norm.running_var"] = torch.ones(conv.norm.num_features)
    # Official dec.model: 0 is a dropout with p=0, 1 the AdaIN ResBlocks, then our `upsample` layers in order.
    pairs += [(f"decoder.upsample.{i}.", f"dec.model.{i + 2}.") for i in range(len(gen.decoder.upsample))]
    for kind in ("w", "b"):
        for k, mlp in enumerate(getattr(gen.decoder, f"mlp_{kind}")):
            linears = [j for j, layer in enumerate(mlp) if isinstance(layer, nn.Linear)]
            pairs += [
                (f"decoder.mlp_{kind}.{k}.{j}.", f"mlp_{kind}{k + 1}.model.{n}.fc.") for n, j in enumerate(linears)
            ]
    return Layout(_names(gen, pairs), unused)


def image_dis_layout(d_img: MultiScaleImageDiscriminator) -> Layout:
    """Official `MsImageDis` names of the image discriminator (files `dis_*.pt`)."""
    pairs: list[tuple[str, str]] = []
    for s, net in enumerate(d_img.nets):
        j = 0  # the official Sequential lists each ResBlock as its own layer
        for i, layer in enumerate(net):
            if isinstance(layer, ResBlocks):
                pairs += _res_blocks(layer, f"nets.{s}.{i}.", f"cnns.{s}.", start=j)
                j += len(layer)
            else:
                pairs.append((f"nets.{s}.{i}.", f"cnns.{s}.{j}."))
                j += 1
    return Layout(_names(d_img, pairs))


def export_state(module: nn.Module, layout: Layout) -> dict[str, Tensor]:
    """`module`'s state dict under the official names, plus the official-only entries; tensors on the CPU."""
    state = module.state_dict()
    out = {layout.names[k]: v.detach().cpu().clone() for k, v in state.items()}
    out.update({k: v.clone() for k, v in layout.unused.items()})
    return out


def import_state(official: Mapping[str, Tensor], module: nn.Module, layout: Layout, source: str) -> Imported:
    """Rename an official state dict to `module`'s keys, checking that the entries and their shapes match.

    Raises :class:`OfficialLayoutError`, naming `source` and listing every unknown or missing entry and every
    shape that differs. BatchNorm counters the file lacks are set to 0.
    """
    own = module.state_dict()
    expected = {theirs: ours for ours, theirs in layout.names.items()}
    unknown = sorted(k for k in official if k not in expected and k not in layout.unused)
    missing = sorted(k for k in expected if k not in official and not k.endswith(COUNTER))
    if unknown or missing:
        parts = [f"{source} does not hold the official {type(module).__name__} entries."]
        if unknown:
            parts.append(f"{len(unknown)} unknown: {_listing(unknown)}.")
        if missing:
            parts.append(f"{len(missing)} missing: {_listing(missing)}.")
        if any(re.search(r"(query|key|value)_conv|nonloc", k) for k in unknown):
            parts.append("Non-local blocks (official non_local > 0) have no counterpart here.")
        parts.append(
            "Convert only files written by the official DG-Net / DG-Net++ training (or the re-ID baseline's ft_net "
            "for a teacher), with the paper's networks."
        )
        raise OfficialLayoutError(" ".join(parts))
    shapes = [
        f"{k} is {tuple(official[k].shape)}, expected {tuple(own[ours].shape)}"
        for k, ours in expected.items()
        if k in official and tuple(official[k].shape) != tuple(own[ours].shape)
    ]
    if shapes:
        raise OfficialLayoutError(
            f"{source} has {len(shapes)} entries of other shapes than this network: {_listing(shapes)}. "
            "The official networks are the paper's size: convert with the default model config."
        )
    state, filled = {}, []
    for theirs, ours in expected.items():
        if theirs in official:
            state[ours] = official[theirs]
        else:
            state[ours] = torch.zeros_like(own[ours])
            filled.append(ours)
    return Imported(state, sorted(k for k in official if k in layout.unused), filled)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def summarise_keys(keys: Iterable[str]) -> str:
    """Keys grouped by pattern, indices as `*`: `dec.model.1.model.*.model.*.norm.running_mean (x8), ...`."""
    groups: dict[str, int] = {}
    for key in keys:
        pattern = re.sub(r"(?<=\.)\d+(?=\.)", "*", key)
        groups[pattern] = groups.get(pattern, 0) + 1
    return ", ".join(p if n == 1 else f"{p} (x{n})" for p, n in groups.items())
