"""Structured-config schemas: every hyper-parameter's name, type and default in one place.

The YAML tree in ``conf/`` (shipped inside the package) holds only what differs from these defaults. Hydra
composes it on top of the schemas, so an unknown key or a value of the wrong type fails at composition, and
:func:`validate_config` then checks the values (ranges, choices from the registries, cross-field rules) and
returns the typed :class:`RootConfig`. :func:`coerce` does the same for one section given as a plain dict, e.g.
the hyper-parameters a checkpoint stores.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dgnetpp_pl.classifier import INITS
from dgnetpp_pl.data.datasets import DATASETS
from dgnetpp_pl.data.domains import STYLES
from dgnetpp_pl.losses import REDUCTIONS
from dgnetpp_pl.models.appearance import ARCHS
from dgnetpp_pl.objective import BN_GROUPS
from dgnetpp_pl.pseudo_labels import METHODS
from dgnetpp_pl.schedule import PAIRINGS, STAGES, AdaptSchedule

# The YAML tree ships with the package, so an installed wheel composes its own configs.
CONF_DIR = Path(__file__).resolve().parent / "conf"
DATASET_NAMES = ("synthetic", *sorted(DATASETS))

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key."""


# ------------------------------------------------------------------------------------------------- paths
@dataclass
class PathsConfig:
    root_dir: str = "${oc.env:PROJECT_ROOT,.}"
    # Datasets live here; DGNETPP_DATA overrides it.
    data_dir: str = "${oc.env:DGNETPP_DATA,${paths.root_dir}/data}"
    log_dir: str = "${paths.root_dir}/outputs"
    output_dir: str = "${hydra:runtime.output_dir}"


# -------------------------------------------------------------------------------------------------- data
@dataclass
class DomainConfig:
    # A registered dataset (data.datasets.DATASETS) or "synthetic" (the built-in data).
    name: str = "synthetic"
    # The dataset's folder; null looks for it under data.data_dir (the "folder" dataset needs a root).
    root: str | None = None
    # Which built-in camera network a synthetic domain is drawn from.
    style: str = "source"
    # Unparsable file names: an error (true) or skipped with a warning (false).
    strict: bool = True
    # MSMT17 only: train on list_train + list_val (null: the reader's default, true).
    combine_train_val: bool | None = None


@dataclass
class SyntheticConfig:
    num_train_ids: int = 100
    num_test_ids: int = 50
    num_cams: int | None = None
    images_per_id_per_cam: list[int] | None = None
    num_distractors: int | None = None
    num_junk: int | None = None
    # Draws the built-in data's identities, cameras and scenes.
    seed: int = II("seed")


@dataclass
class DataConfig:
    """``data_dir`` and ``synthetic.seed`` follow the root's ``paths.data_dir`` and ``seed``; set them when
    building a ``DataConfig`` on its own."""

    source: DomainConfig = field(default_factory=DomainConfig)
    target: DomainConfig = field(default_factory=lambda: DomainConfig(style="target"))
    data_dir: str = II("paths.data_dir")
    height: int = 256
    width: int = 128
    batch_size: int = 8
    test_batch_size: int = 80
    num_workers: int = 4
    pad: int = 10
    # Decode every image at start-up and list all unreadable ones.
    verify: bool = False
    # Hold out this fraction of the target train identities as the validation set (0: validate on target test).
    val_split: float = 0.0
    # Draw target train images only among those with a pseudo-label (the official code drops outliers).
    drop_target_outliers: bool = False
    # Adapt-stage batches. cross: every batch pairs a source half with a target half. official: each batch holds one
    # type, source-source (aa), target-target (bb) or cross-domain (ab / ba), drawn per epoch as the official code.
    pairing: str = "cross"
    # official pairing: shares of same-domain (aa + bb) and cross-domain (ab + ba) batches (they sum to 1).
    xx_port: float = 0.9
    ab_port: float = 0.1
    # Sizes of the built-in domains (used where a domain's name is "synthetic").
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


# ------------------------------------------------------------------------------------------------- model
@dataclass
class AppearanceConfig:
    arch: str = "resnet50"
    last_stride: int = 1
    bottleneck_dim: int = 512
    droprates: list[float] = field(default_factory=lambda: [0.5, 0.75])
    parts: int = 4
    detach_code: bool = True
    # How the real images of an iteration meet BatchNorm in the appearance encoder. joint: all in one call (statistics
    # over all, so training and evaluation see the same statistics). split: the images whose outputs need no gradient
    # (detached codes) in a separate no-grad call that stores no activations (less memory). official: one call per
    # image group (x_a, x_b, xp_a, xp_b, each erased view, each re-encoded fake), as the official code.
    bn_groups: str = "joint"
    # Recompute each ResNet stage in backward instead of storing its activations (less memory, more time).
    checkpoint: bool = False


@dataclass
class StructureConfig:
    dim: int = 16
    n_downsample: int = 2
    n_res: int = 4
    # ASPP dilations; each must be smaller than the structure code's sides (H/4, W/4).
    aspp_dilations: list[int] = field(default_factory=lambda: [3, 6, 9])
    # Recompute the encoder from its gray input in backward (cheap; saves its activations).
    checkpoint: bool = False


@dataclass
class DecoderConfig:
    n_res: int = 4
    mlp_dim: int = 512
    # Recompute the decoder from its inputs in backward instead of storing its activations.
    checkpoint: bool = False
    # Upsampling + 5x5 conv as one conv on the low-res map; norm + activation as one function. Same results.
    fused: bool = True


@dataclass
class ImageDisConfig:
    dim: int = 32
    n_layer: int = 2
    n_res: int = 4
    num_scales: int = 3


@dataclass
class DomainDisConfig:
    hidden: list[int] = field(default_factory=lambda: [1024, 512, 256])


@dataclass
class LossConfig:
    recon_x: float = 5.0  # recon_x_w
    recon_xp: float = 5.0  # recon_xp_w (source positives)
    recon_xp_tgt: float = 0.0  # recon_xp_tgt_w (target positives)
    recon_s: float = 1.0  # recon_s_w
    recon_f: float = 1.0  # recon_f_w (gradient-free in the official code, kept so)
    lambda_cyc: float = 2.0  # recon_x_cyc_w
    gan: float = 1.0  # gan_w
    gan_g_scale: float = 2.0  # the official x2 on the generator LSGAN term
    r1: float = 0.01  # R1 penalty on real images
    id: float = 1.0  # id_w
    # The fine-grained head on real images: the official teacher_w * B_w (2 * 0.2), kept apart from the teacher terms
    # below so that teacher_w=0 leaves it as it is.
    fine_grained: float = 0.4
    # teacher_w: the generated-image terms against the teacher, teacher_w * (teacher_kl_w * KL + teacher_b_w * L_B).
    # 0 trains no teacher and runs no student pass; the paper presets set the official 2.
    teacher_w: float = 0.0
    teacher_kl_w: float = 1.0  # T_w
    teacher_b_w: float = 0.2  # B_w
    pid: float = 1.0  # pid_w
    lambda_id: float = 0.5  # recon_id_w
    domain_adv: float = 1.0  # id_adv_w (warm-up only)
    domain_reduction: str = "mean"  # official: sum
    domain_g_scale: float = 2.0
    erasing_p: float = 0.5
    structure_detach_p: float = 0.5  # use_encoder_again: chance of re-encoding the detached fake


@dataclass
class StageLR:
    lr_g: float = 1e-6
    lr_d: float = 1e-6
    lr_dom: float = 1e-5
    lr_app: float = 1e-5


@dataclass
class OptimConfig:
    source: StageLR = field(default_factory=lambda: StageLR(1e-4, 1e-4, 1e-5, 2e-3))
    adapt: StageLR = field(default_factory=StageLR)
    head_lr_mult: float = 10.0
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    momentum: float = 0.9
    milestones: list[int] = field(default_factory=lambda: [120000, 180000, 210000])
    gamma: float = 0.1
    grad_clip: float | None = None


@dataclass
class FeatureConfig:
    alpha: float = 0.5  # weight of the fine-grained half
    flip: bool = True  # add the features of the horizontally flipped image


@dataclass
class ModelConfig:
    name: str = "dgnetpp"
    # torchvision's ImageNet weights for the appearance encoder (through the weights enum).
    pretrained: bool = False
    appearance: AppearanceConfig = field(default_factory=AppearanceConfig)
    structure: StructureConfig = field(default_factory=StructureConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    image_dis: ImageDisConfig = field(default_factory=ImageDisConfig)
    domain_dis: DomainDisConfig = field(default_factory=DomainDisConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    channels_last: bool = False


# ------------------------------------------------------------------------------------------------ teacher
@dataclass
class TeacherConfig:
    """The teacher stage: a re-ID baseline (ResNet, average pooling, one id head) trained on the labelled source with
    cross-entropy, at the official baseline's recipe (Nesterov SGD, the backbone at a tenth of the head's rate, the
    rate divided by 10 after two thirds of 60 epochs). ImageNet weights follow ``model.pretrained``."""

    arch: str = "resnet50"
    last_stride: int = 2
    bottleneck_dim: int = 512
    droprate: float = 0.5
    max_epochs: int = 60
    batch_size: int = 32
    lr: float = 0.05  # the head's rate
    backbone_lr_mult: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    milestones: list[int] = field(default_factory=lambda: [40])  # epochs
    gamma: float = 0.1
    erasing_p: float = 0.5


# ------------------------------------------------------------------------------------------ pseudo-labels
@dataclass
class PseudoLabelConfig:
    # A clustering method of pseudo_labels.METHODS.
    method: str = "kmeans"
    k: int = 700  # k-means clusters (fixed k keeps the classifier size stable)
    niter: int = 20
    every_n_epochs: int = 2
    init_classifier: str = "centroids"  # centroids | random
    # DBSCAN on the k-reciprocal Jaccard distance (the official recipe).
    eps: float = 0.45
    min_samples: int = 7
    k1: int = 20
    k2: int = 6
    lambda_: float = 0.3
    # Target classifier capacity for DBSCAN; clusters beyond it are an error.
    max_clusters: int = 0


# ---------------------------------------------------------------------------------------- trainer, stages
@dataclass
class TrainerConfig:
    """Arguments of ``pytorch_lightning.Trainer``; ``max_epochs`` is set per stage from ``source`` / ``adapt``."""

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: Any = "auto"
    precision: str = "32-true"
    check_val_every_n_epoch: int = 1
    log_every_n_steps: int = 10
    deterministic: Any = False
    benchmark: bool = False
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    num_sanity_val_steps: int = 0
    enable_progress_bar: bool = True
    enable_model_summary: bool = False
    fast_dev_run: Any = False
    sync_batchnorm: bool = False
    max_steps: int = -1
    profiler: str | None = None


@dataclass
class SourceStageConfig:
    max_epochs: int = 20


@dataclass
class AdaptStageConfig:
    max_epochs: int = 24
    # Epochs of domain-adversarial alignment before self-training on pseudo-labels.
    warmup_epochs: int = 4
    # lr2_ramp_factor: appearance-encoder LR multiplier from the first self-training epoch on.
    app_lr_ramp: float = 60.0
    # Start the joint classifier's source rows from the source stage's classifier.
    keep_source_classifier: bool = True
    # data.pairing=official: draw the aa batches of self-training epochs but train on none (the official aa_drop).
    aa_drop: bool = True


@dataclass
class RootConfig:
    task_name: str = "train"
    # teacher: the re-ID baseline on the labelled source; source: DG-Net on the labelled source (direct transfer);
    # adapt: DG-Net++. A stage first runs the ones it needs (teacher when model.loss.teacher_w > 0 unless
    # teacher_ckpt; source unless init_ckpt).
    stage: str = "adapt"
    seed: int = 0
    # Source-stage checkpoint that the adapt stage starts from; null trains the source stage first.
    init_ckpt: str | None = None
    # Teacher checkpoint (stage=teacher's final.ckpt, or a converted official net_last.pth) for model.loss.teacher_w
    # > 0; null trains the teacher stage first.
    teacher_ckpt: str | None = None
    # Resume this run: a path, or "last" for the newest last.ckpt of this output directory. With train=false: the
    # checkpoint to evaluate (a final.ckpt or last.ckpt of the stage, any run), "last" this run's newest.
    ckpt_path: str | None = None
    # Keys (or sections) that may differ from the checkpoint's config on resume, e.g. [model.optim.adapt.lr_app];
    # only those of resume_check.MAY_CHANGE (rates, loss weights, epochs, logging, resources). The rest must match.
    resume_override: list[str] = field(default_factory=list)
    # false: evaluate a checkpoint on the target test split instead, training and saving nothing: ckpt_path= (a
    # checkpoint of the stage), or with stage=adapt init_ckpt= (the source model the adapt stage would start from).
    train: bool = True
    test: bool = True
    # The metric a sweeper optimises; the entry point returns it.
    optimized_metric: str = "val/mAP_best"
    # Tolerate up to N steps with a NaN/Inf loss (each is skipped and logged); 0 stops at the first.
    skip_nonfinite_steps: int = 0
    # Keep freed host memory in the process (glibc), set by the command-line entry point: re-faulting gigabytes
    # of activations each iteration costs up to 40% of the CPU time in the kernel. Peak memory is unchanged.
    keep_freed_memory: bool = True
    # Packages whose classes `_target_` may name.
    allowed_targets: list[str] = field(
        default_factory=lambda: ["dgnetpp_pl", "torch", "torchvision", "pytorch_lightning"]
    )
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pseudo_label: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, Any] = field(default_factory=dict)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    source: SourceStageConfig = field(default_factory=SourceStageConfig)
    adapt: AdaptStageConfig = field(default_factory=AdaptStageConfig)


# ------------------------------------------------------------------------------------------- other CLIs
@dataclass
class EvaluateConfig:
    """``python -m dgnetpp_pl.evaluate``: a checkpoint on the target test split of ``data.target``."""

    task_name: str = "evaluate"
    # Draws the built-in data (data.synthetic.seed follows it).
    seed: int = 0
    ckpt_path: str = MISSING
    # auto: a GPU when there is one.
    device: str = "auto"
    # Also report metrics after k-reciprocal re-ranking with k1, k2, lambda_.
    rerank: bool = False
    k1: int = 20
    k2: int = 6
    lambda_: float = 0.3
    # Evaluate at data.height x data.width even where it differs from the checkpoint's image size (with a warning).
    force_image_size: bool = False
    # Write a rank-list picture of vis_queries queries with their vis_topk matches and log it.
    vis: bool = False
    vis_queries: int = 8
    vis_topk: int = 10
    allowed_targets: list[str] = field(
        default_factory=lambda: ["dgnetpp_pl", "torch", "torchvision", "pytorch_lightning"]
    )
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logger: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExtractConfig:
    """``python -m dgnetpp_pl.extract``: features of a folder of images from a checkpoint."""

    task_name: str = "extract"
    ckpt_path: str = MISSING
    # A folder of person crops (searched recursively).
    images: str = MISSING
    # The features file (.pt or .npy); the records go beside it as <out>.csv.
    out: str = MISSING
    device: str = "auto"
    batch_size: int = 64
    paths: PathsConfig = field(default_factory=PathsConfig)


CONVERT_DIRECTIONS = ("ours", "official")
CONVERT_KINDS = ("auto", "dgnet", "dgnetpp", "teacher")


@dataclass
class ConvertConfig:
    """``python -m dgnetpp_pl.convert``: official DG-Net / DG-Net++ / teacher files to our checkpoints and back."""

    # to=ours: an official checkpoints folder (or one above it) or a net_last.pth; to=official: our checkpoint.
    src: str = MISSING
    # to=ours: the checkpoint file to write; to=official: the folder for the official files.
    out: str = MISSING
    to: str = "ours"
    # to=ours: auto tells DG-Net (gen_*.pt), DG-Net++ (gen_a_*.pt, gen_b_*.pt) and teacher (*.pth) files apart.
    kind: str = "auto"
    # The 8-digit number in the official file names: which one to read (default: the newest), or to write
    # (default: the checkpoint's global step).
    iteration: int | None = None
    # Source identities: required for DG-Net++ (the joint classifier holds them first, then the target
    # clusters); checked against the file for DG-Net and teacher models.
    num_source_ids: int | None = None
    # Teacher last stride; default: `stride` of the opts.yaml beside net_last.pth, else 2.
    teacher_last_stride: int | None = None
    # to=ours: the image size [H, W] the official networks were trained at, stored with the checkpoint.
    image_size: list[int] = field(default_factory=lambda: [256, 128])
    # to=ours: the network config stored with the checkpoint (the official networks are the paper's, the default).
    model: ModelConfig = field(default_factory=ModelConfig)


@dataclass
class ExportConfig:
    """``python -m dgnetpp_pl.export``: a checkpoint's appearance encoder as an ONNX feature extractor."""

    ckpt_path: str = MISSING
    out: str = "encoder.onnx"
    # Flip averaging inside the graph; null: the checkpoint's model.features.flip.
    flip: bool | None = None
    # ONNX opset; null: the exporter's default.
    opset: int | None = None
    # Run the exported graph with onnxruntime on a random batch and compare it with PyTorch.
    check: bool = True


SCHEMAS: dict[str, type] = {"train_schema": RootConfig, "evaluate_schema": EvaluateConfig}
SCHEMAS.update(extract_schema=ExtractConfig, convert_schema=ConvertConfig, export_schema=ExportConfig)


def register_schemas() -> None:
    """Store the schemas where the primary configs' defaults lists name them (Hydra's ConfigStore)."""
    store = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        store.store(name=name, node=node)


register_schemas()


# ------------------------------------------------------------------------------------------- validation
def _finite_nonneg(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v) and v >= 0


def _at_least(n: float) -> Callable[[Any], bool]:
    return lambda v: v >= n


def _within(lo: float, hi: float, closed_hi: bool = True) -> Callable[[Any], bool]:
    return lambda v: math.isfinite(v) and lo <= v and (v <= hi if closed_hi else v < hi)


def _one_of(choices: tuple[str, ...]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), f"expected one of {list(choices)}"


# (schema, field) -> (predicate, what is expected). "*" applies to every field of the schema.
_RULES: dict[tuple[type, str], tuple[Callable[[Any], bool], str]] = {
    (RootConfig, "stage"): _one_of(STAGES),
    (RootConfig, "seed"): (_at_least(0), "must be >= 0"),
    (RootConfig, "skip_nonfinite_steps"): (_at_least(0), "must be >= 0"),
    (DomainConfig, "name"): _one_of(DATASET_NAMES),
    (DomainConfig, "style"): _one_of(tuple(STYLES)),
    (SyntheticConfig, "seed"): (_at_least(0), "must be >= 0"),
    (DataConfig, "height"): (lambda v: v >= 16 and v % 4 == 0, "must be a multiple of 4, >= 16"),
    (DataConfig, "width"): (lambda v: v >= 16 and v % 4 == 0, "must be a multiple of 4, >= 16"),
    (DataConfig, "batch_size"): (_at_least(1), "must be >= 1"),
    (DataConfig, "test_batch_size"): (_at_least(1), "must be >= 1"),
    (DataConfig, "num_workers"): (_at_least(0), "must be >= 0"),
    (DataConfig, "pad"): (_at_least(0), "must be >= 0"),
    (DataConfig, "val_split"): (_within(0.0, 1.0, closed_hi=False), "must be in [0, 1)"),
    (DataConfig, "pairing"): _one_of(PAIRINGS),
    (DataConfig, "xx_port"): (lambda v: math.isfinite(v) and 0.0 < v <= 1.0, "must be in (0, 1]"),
    (DataConfig, "ab_port"): (_within(0.0, 1.0, closed_hi=False), "must be in [0, 1)"),
    (AppearanceConfig, "arch"): _one_of(ARCHS),
    (AppearanceConfig, "bn_groups"): _one_of(BN_GROUPS),
    (AppearanceConfig, "last_stride"): (lambda v: v in (1, 2), "must be 1 or 2"),
    (AppearanceConfig, "bottleneck_dim"): (_at_least(1), "must be >= 1"),
    (AppearanceConfig, "parts"): (_at_least(1), "must be >= 1"),
    (AppearanceConfig, "droprates"): (
        lambda v: len(v) == 2 and all(0.0 <= p < 1.0 for p in v),
        "must be two rates in [0, 1)",
    ),
    (StructureConfig, "dim"): (lambda v: v >= 2 and v % 2 == 0, "must be even, >= 2"),
    (StructureConfig, "n_downsample"): (_at_least(1), "must be >= 1"),
    (StructureConfig, "n_res"): (_at_least(1), "must be >= 1"),
    (StructureConfig, "aspp_dilations"): (lambda v: all(d >= 1 for d in v), "must all be >= 1"),
    (DecoderConfig, "mlp_dim"): (_at_least(1), "must be >= 1"),
    (ImageDisConfig, "dim"): (_at_least(1), "must be >= 1"),
    (ImageDisConfig, "n_layer"): (_at_least(1), "must be >= 1"),
    (ImageDisConfig, "n_res"): (_at_least(0), "must be >= 0"),
    (ImageDisConfig, "num_scales"): (_at_least(1), "must be >= 1"),
    (DomainDisConfig, "hidden"): (lambda v: all(h >= 1 for h in v), "must all be >= 1"),
    (LossConfig, "*"): (_finite_nonneg, "must be a finite number >= 0"),
    (LossConfig, "domain_reduction"): _one_of(REDUCTIONS),
    (LossConfig, "erasing_p"): (_within(0.0, 1.0), "must be a probability in [0, 1]"),
    (LossConfig, "structure_detach_p"): (_within(0.0, 1.0), "must be a probability in [0, 1]"),
    (StageLR, "*"): (_finite_nonneg, "must be a finite rate >= 0"),
    (OptimConfig, "head_lr_mult"): (_finite_nonneg, "must be a finite number >= 0"),
    (OptimConfig, "weight_decay"): (_finite_nonneg, "must be a finite number >= 0"),
    (OptimConfig, "betas"): (lambda v: len(v) == 2 and all(0.0 <= b < 1.0 for b in v), "must be two values in [0, 1)"),
    (OptimConfig, "momentum"): (_within(0.0, 1.0, closed_hi=False), "must be in [0, 1)"),
    (OptimConfig, "milestones"): (lambda v: all(m >= 0 for m in v), "must all be >= 0"),
    (OptimConfig, "gamma"): (lambda v: math.isfinite(v) and v > 0, "must be > 0"),
    (OptimConfig, "grad_clip"): (lambda v: v is None or (math.isfinite(v) and v > 0), "must be null or > 0"),
    (FeatureConfig, "alpha"): (_finite_nonneg, "must be a finite number >= 0"),
    (TeacherConfig, "arch"): _one_of(ARCHS),
    (TeacherConfig, "last_stride"): (lambda v: v in (1, 2), "must be 1 or 2"),
    (TeacherConfig, "bottleneck_dim"): (_at_least(1), "must be >= 1"),
    (TeacherConfig, "droprate"): (_within(0.0, 1.0, closed_hi=False), "must be in [0, 1)"),
    (TeacherConfig, "max_epochs"): (_at_least(1), "must be >= 1"),
    (TeacherConfig, "batch_size"): (_at_least(1), "must be >= 1"),
    (TeacherConfig, "lr"): (_finite_nonneg, "must be a finite rate >= 0"),
    (TeacherConfig, "backbone_lr_mult"): (_finite_nonneg, "must be a finite number >= 0"),
    (TeacherConfig, "weight_decay"): (_finite_nonneg, "must be a finite number >= 0"),
    (TeacherConfig, "momentum"): (_within(0.0, 1.0, closed_hi=False), "must be in [0, 1)"),
    (TeacherConfig, "milestones"): (lambda v: all(m >= 0 for m in v), "must all be >= 0"),
    (TeacherConfig, "gamma"): (lambda v: math.isfinite(v) and v > 0, "must be > 0"),
    (TeacherConfig, "erasing_p"): (_within(0.0, 1.0), "must be a probability in [0, 1]"),
    (PseudoLabelConfig, "method"): _one_of(tuple(METHODS)),
    (PseudoLabelConfig, "k"): (_at_least(1), "must be >= 1"),
    (PseudoLabelConfig, "niter"): (_at_least(1), "must be >= 1"),
    (PseudoLabelConfig, "every_n_epochs"): (_at_least(1), "must be >= 1"),
    (PseudoLabelConfig, "init_classifier"): _one_of(INITS),
    (PseudoLabelConfig, "eps"): (lambda v: math.isfinite(v) and v > 0, "must be > 0"),
    (PseudoLabelConfig, "min_samples"): (_at_least(1), "must be >= 1"),
    (PseudoLabelConfig, "k1"): (_at_least(1), "must be >= 1"),
    (PseudoLabelConfig, "k2"): (_at_least(1), "must be >= 1"),
    (PseudoLabelConfig, "lambda_"): (_within(0.0, 1.0), "must be in [0, 1]"),
    (PseudoLabelConfig, "max_clusters"): (_at_least(0), "must be >= 0"),
    (SourceStageConfig, "max_epochs"): (_at_least(1), "must be >= 1"),
    (AdaptStageConfig, "max_epochs"): (_at_least(1), "must be >= 1"),
    (AdaptStageConfig, "warmup_epochs"): (_at_least(0), "must be >= 0"),
    (AdaptStageConfig, "app_lr_ramp"): (lambda v: math.isfinite(v) and v > 0, "must be > 0"),
    (AdaptSchedule, "stage"): _one_of(STAGES),
    (AdaptSchedule, "warmup_epochs"): (_at_least(0), "must be >= 0"),
    (AdaptSchedule, "refresh_every"): (_at_least(1), "must be >= 1"),
    (AdaptSchedule, "app_lr_ramp"): (lambda v: math.isfinite(v) and v > 0, "must be > 0"),
    (AdaptSchedule, "pairing"): _one_of(PAIRINGS),
    (EvaluateConfig, "k1"): (_at_least(1), "must be >= 1"),
    (EvaluateConfig, "k2"): (_at_least(1), "must be >= 1"),
    (EvaluateConfig, "lambda_"): (_within(0.0, 1.0), "must be in [0, 1]"),
    (EvaluateConfig, "vis_queries"): (_at_least(1), "must be >= 1"),
    (EvaluateConfig, "vis_topk"): (_at_least(1), "must be >= 1"),
    (ExtractConfig, "batch_size"): (_at_least(1), "must be >= 1"),
    (ConvertConfig, "to"): _one_of(CONVERT_DIRECTIONS),
    (ConvertConfig, "kind"): _one_of(CONVERT_KINDS),
    (ConvertConfig, "iteration"): (_at_least(0), "must be >= 0"),
    (ConvertConfig, "num_source_ids"): (_at_least(1), "must be >= 1"),
    (ConvertConfig, "teacher_last_stride"): (lambda v: v in (1, 2), "must be 1 or 2"),
    (ConvertConfig, "image_size"): (lambda v: len(v) == 2 and all(s >= 1 for s in v), "must be [H, W]"),
    (ExportConfig, "opset"): (_at_least(1), "must be >= 1"),
}


def _domain_rules(d: DomainConfig, key: str) -> None:
    if d.name == "folder" and not d.root:
        raise ConfigError(f"{key}.root is not set: the 'folder' dataset needs the folder of its images.")
    if d.combine_train_val is not None and d.name != "msmt17":
        raise ConfigError(
            f"{key}.combine_train_val applies to msmt17 only, but {key}.name is {d.name!r}; remove the override."
        )


def _data_rules(d: DataConfig, key: str) -> None:
    _domain_rules(d.source, f"{key}.source")
    _domain_rules(d.target, f"{key}.target")
    if abs(d.xx_port + d.ab_port - 1.0) > 1e-6:
        raise ConfigError(
            f"{key}.xx_port={d.xx_port} and {key}.ab_port={d.ab_port} must sum to 1 (the shares of same-domain and "
            f"cross-domain batches); e.g. {key}.xx_port={1.0 - d.ab_port:g}."
        )


def _model_rules(m: ModelConfig, key: str, image_size: tuple[int, int] | None = None) -> None:
    if m.decoder.n_res != m.structure.n_res:
        raise ConfigError(
            f"{key}.decoder.n_res={m.decoder.n_res} must equal {key}.structure.n_res={m.structure.n_res} "
            "(one AdaIN block per code chunk)."
        )
    if image_size is not None and m.structure.aspp_dilations:
        side = min(image_size) // 2**m.structure.n_downsample
        if max(m.structure.aspp_dilations) >= side:
            raise ConfigError(
                f"{key}.structure.aspp_dilations={list(m.structure.aspp_dilations)}: each must be smaller than the "
                f"structure code's shorter side ({side} for {image_size[0]}x{image_size[1]} images); lower them "
                "or raise data.height / data.width."
            )


def _selection_rules(c: RootConfig) -> None:
    """Nothing is selected on the target test split: a callback's ``monitor`` and ``optimized_metric`` must name a
    held-out validation metric, and ``val/*`` exists only with ``data.val_split > 0``."""
    monitors = {name: node.get("monitor") for name, node in c.callbacks.items() if isinstance(node, Mapping)}
    for key, metric in ((f"callbacks.{name}.monitor", m) for name, m in monitors.items() if m):
        if str(metric).startswith("test"):
            raise ConfigError(
                f"{key}={metric} would choose checkpoints on the target test split. Select on a held-out split "
                "(data.val_split>0, monitor=val/mAP), or set the monitor to null (keep the final weights)."
            )
        if str(metric).startswith("val/") and c.data.val_split == 0:
            raise ConfigError(
                f"{key}={metric}, but data.val_split=0: there is no validation split (the per-epoch metrics then "
                "come from the target test split, as test_per_epoch/*). Set data.val_split>0 to hold out target "
                "train identities, or set the monitor to null."
            )
    if c.optimized_metric.startswith("test"):
        raise ConfigError(
            f"optimized_metric={c.optimized_metric} would tune hyper-parameters on the target test split; use "
            "val/mAP_best with data.val_split>0 (held-out target train identities)."
        )


def _root_rules(c: RootConfig) -> None:
    _data_rules(c.data, "data")
    if c.resume_override:
        if c.ckpt_path is None:
            raise ConfigError(
                "resume_override applies when resuming: set ckpt_path=last (or a checkpoint of this run), or remove "
                "resume_override."
            )
        from dgnetpp_pl.resume_check import check_override_keys  # the key policy lives with the comparison

        check_override_keys(c.resume_override, plain(c))
    if not c.train:
        if c.resume_override:
            raise ConfigError("resume_override applies to a resumed training run; train=false compares no config.")
        if not c.test:
            raise ConfigError("train=false test=false has nothing to do: train=false evaluates a checkpoint (test).")
        if c.ckpt_path is None and (c.stage != "adapt" or c.init_ckpt is None):
            raise ConfigError(
                "train=false evaluates a checkpoint: give ckpt_path=<a final.ckpt or last.ckpt of the stage> "
                "(ckpt_path=last: this run's newest), or stage=adapt init_ckpt=<a source-stage checkpoint>."
            )
    _selection_rules(c)
    _model_rules(c.model, "model", (c.data.height, c.data.width))
    if c.adapt.warmup_epochs > c.adapt.max_epochs:
        raise ConfigError(f"adapt.warmup_epochs={c.adapt.warmup_epochs} exceeds adapt.max_epochs={c.adapt.max_epochs}.")
    if c.teacher_ckpt is not None and c.stage == "teacher":
        raise ConfigError(
            "teacher_ckpt is set with stage=teacher: that stage trains a teacher. Drop teacher_ckpt, or run "
            "stage=source / stage=adapt with it."
        )
    if c.teacher_ckpt is not None and c.model.loss.teacher_w == 0:
        raise ConfigError(
            f"teacher_ckpt={c.teacher_ckpt!r} is set but model.loss.teacher_w=0, so no term would use the teacher. "
            "Set model.loss.teacher_w > 0 (the official value is 2), or drop teacher_ckpt."
        )
    if c.stage == "adapt" and c.pseudo_label.method == "dbscan" and c.pseudo_label.max_clusters < 1:
        raise ConfigError(
            "pseudo_label.max_clusters must be >= 1 with pseudo_label.method=dbscan: it is the target classifier's "
            "capacity (pseudo_label=dbscan sets 4000)."
        )


# Cross-field rules of the schemas that are validated as a whole (a root config, or one section of a checkpoint).
_CROSS: dict[type, Callable[[Any, str], None]] = {
    RootConfig: lambda c, key: _root_rules(c),
    EvaluateConfig: lambda c, key: _data_rules(c.data, "data"),
    # The stored network must fit the stored image size (only to=ours builds one).
    ConvertConfig: lambda c, key: _model_rules(c.model, "model", tuple(c.image_size)) if c.to == "ours" else None,
    DataConfig: _data_rules,
    ModelConfig: _model_rules,
}


def check_values(obj: Any, key: str = "") -> None:
    """Apply the per-field value rules to a typed config and every section inside it; a ConfigError names the key."""
    cls = type(obj)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        full = f"{key}.{f.name}" if key else f.name
        if dataclasses.is_dataclass(value):
            check_values(value, full)
            continue
        rule = _RULES.get((cls, f.name)) or (_RULES.get((cls, "*")) if not isinstance(value, str) else None)
        if rule is not None and value is not None and not rule[0](value):
            raise ConfigError(f"Invalid value {value!r} for key '{full}': {rule[1]}.")


def _merge_error(err: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    key = f"{where}.{key}" if where and key != "?" else key
    return ConfigError(
        f"Invalid configuration at key '{key}': {err.msg if hasattr(err, 'msg') else err}. "
        "Check the spelling of the override or the YAML file; `python -m dgnetpp_pl --cfg job` prints the tree."
    )


def _upgrade_model(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """A model section written before ``appearance.bn_groups`` holds the bool ``appearance.joint_call``: true is
    ``bn_groups=joint``, false ``split``. Older checkpoints keep loading."""
    app = data.get("appearance")
    if not isinstance(app, Mapping) or "joint_call" not in app:
        return data
    upgraded = {k: v for k, v in app.items() if k != "joint_call"}
    upgraded.setdefault("bn_groups", "joint" if app["joint_call"] else "split")
    return {**data, "appearance": upgraded}


def coerce(schema: type[T], data: Mapping[str, Any] | T | DictConfig, where: str = "") -> T:
    """Rebuild a typed config from a plain dict (e.g. a checkpoint's hyper-parameters), or check an instance.

    Unknown keys, wrong types and invalid values raise :class:`ConfigError` naming the key (prefixed by
    ``where``, e.g. ``"model"``). Missing keys take the schema's defaults.
    """
    if isinstance(data, schema):
        typed = data
    else:
        if schema is ModelConfig:
            data = _upgrade_model(data)
        try:
            merged = OmegaConf.merge(OmegaConf.structured(schema), data)
            typed = OmegaConf.to_object(merged)
        except OmegaConfBaseException as err:
            raise _merge_error(err, where) from None
    check_values(typed, where)
    cross = _CROSS.get(schema)
    if cross is not None:
        cross(typed, where)
    return typed


def require(cfg: Any, keys: tuple[str, ...], usage: str) -> None:
    """Raise :class:`ConfigError` naming the first of ``keys`` that ``cfg`` (typed, composed or a dict) leaves unset
    (``???`` or absent), with the command's ``usage``."""
    for key in keys:
        if isinstance(cfg, DictConfig):
            unset = key not in cfg or OmegaConf.is_missing(cfg, key)
        elif isinstance(cfg, Mapping):
            unset = cfg.get(key, MISSING) == MISSING
        else:
            unset = getattr(cfg, key, MISSING) == MISSING
        if unset:
            raise ConfigError(f"{key}= is required: {usage}.")


def validate_config(cfg: DictConfig | Mapping[str, Any] | RootConfig) -> RootConfig:
    """The typed, checked training config: unknown keys, wrong types and invalid values raise ConfigError."""
    return coerce(RootConfig, cfg)


def plain(obj: Any) -> Any:
    """A typed config as plain dicts and lists (what a checkpoint or a logger stores)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
