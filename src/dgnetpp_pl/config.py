"""Structured-config schemas: every hyper-parameter's name, type and default in one place.

Hydra composes the YAML tree in ``conf/``; :func:`validate_config` merges it into these dataclasses, so an
unknown key or a value of the wrong type fails at start-up with the key's full name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# The YAML tree lives at the repository root (the package is installed in editable mode).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key."""


@dataclass
class PathsConfig:
    root_dir: str = "."
    data_dir: str = "./data"
    log_dir: str = "./outputs"
    output_dir: str = "./outputs"


@dataclass
class DomainConfig:
    name: str = "synthetic"
    root: str | None = None
    style: str = "source"
    strict: bool = True


@dataclass
class SyntheticConfig:
    num_train_ids: int = 100
    num_test_ids: int = 50
    num_cams: int | None = None
    images_per_id_per_cam: list[int] | None = None
    num_distractors: int | None = None
    num_junk: int | None = None


@dataclass
class DataConfig:
    source: DomainConfig = field(default_factory=DomainConfig)
    target: DomainConfig = field(default_factory=lambda: DomainConfig(style="target"))
    data_dir: str = "./data"
    height: int = 256
    width: int = 128
    batch_size: int = 8
    test_batch_size: int = 80
    num_workers: int = 4
    pad: int = 10
    verify: bool = False
    val_split: float = 0.0
    synthetic: SyntheticConfig | None = None


@dataclass
class AppearanceConfig:
    arch: str = "resnet50"
    last_stride: int = 1
    bottleneck_dim: int = 512
    droprates: list[float] = field(default_factory=lambda: [0.5, 0.75])
    parts: int = 4
    detach_code: bool = True
    joint_call: bool = True
    checkpoint: bool = False


@dataclass
class StructureConfig:
    dim: int = 16
    n_downsample: int = 2
    n_res: int = 4
    # ASPP dilations; each must be smaller than the structure code's sides (H/4, W/4).
    aspp_dilations: list[int] = field(default_factory=lambda: [3, 6, 9])
    checkpoint: bool = False


@dataclass
class DecoderConfig:
    n_res: int = 4
    mlp_dim: int = 512
    checkpoint: bool = False
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
    recon_x: float = 5.0
    recon_xp: float = 5.0
    recon_xp_tgt: float = 0.0
    recon_s: float = 1.0
    recon_f: float = 1.0
    lambda_cyc: float = 2.0
    gan: float = 1.0
    gan_g_scale: float = 2.0
    r1: float = 0.01
    id: float = 1.0
    fine_grained: float = 0.4
    pid: float = 1.0
    lambda_id: float = 0.5
    domain_adv: float = 1.0
    domain_reduction: str = "mean"
    domain_g_scale: float = 2.0
    teacher_w: float = 0.0
    erasing_p: float = 0.5
    structure_detach_p: float = 0.5


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
    alpha: float = 0.5
    flip: bool = True


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


@dataclass
class PseudoLabelConfig:
    method: str = "kmeans"
    k: int = 700
    niter: int = 20
    every_n_epochs: int = 2
    init_classifier: str = "centroids"
    eps: float = 0.45
    min_samples: int = 7
    k1: int = 20
    k2: int = 6
    lambda_: float = 0.3
    max_clusters: int = 0


@dataclass
class TrainerConfig:
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
    warmup_epochs: int = 4
    app_lr_ramp: float = 60.0
    keep_source_classifier: bool = True


@dataclass
class RootConfig:
    task_name: str = "train"
    stage: str = "adapt"
    seed: int = 0
    init_ckpt: str | None = None
    ckpt_path: str | None = None
    train: bool = True
    test: bool = True
    optimized_metric: str = "val/mAP_best"
    skip_nonfinite_steps: int = 0
    keep_freed_memory: bool = True
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
    source: SourceStageConfig = field(default_factory=SourceStageConfig)
    adapt: AdaptStageConfig = field(default_factory=AdaptStageConfig)
    # Present when composed by Hydra's debug/sweep groups; kept free-form.
    hydra: Any = None


_CHOICES = {
    "stage": ("source", "adapt"),
    "model.loss.domain_reduction": ("mean", "sum"),
    "pseudo_label.method": ("kmeans", "dbscan"),
    "pseudo_label.init_classifier": ("centroids", "random"),
    "model.appearance.arch": ("resnet50", "resnet34", "resnet18"),
    "data.source.name": ("synthetic", "market1501", "dukemtmc", "msmt17", "folder"),
    "data.target.name": ("synthetic", "market1501", "dukemtmc", "msmt17", "folder"),
}


def validate_config(cfg: DictConfig) -> DictConfig:
    """Merge ``cfg`` into :class:`RootConfig`, rejecting unknown keys, wrong types and invalid choices."""
    schema = OmegaConf.structured(RootConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(
            f"Invalid configuration at key '{key}': {err.msg if hasattr(err, 'msg') else err}. "
            "Check the spelling of the override or the YAML file; `python -m dgnetpp_pl --cfg job` prints the tree."
        ) from None
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(merged, key, throw_on_missing=False)
        if value not in allowed:
            raise ConfigError(f"Invalid value {value!r} for key '{key}'; expected one of {list(allowed)}.")
    if merged.adapt.warmup_epochs > merged.adapt.max_epochs:
        raise ConfigError(
            f"adapt.warmup_epochs={merged.adapt.warmup_epochs} exceeds adapt.max_epochs={merged.adapt.max_epochs}."
        )
    if merged.pseudo_label.every_n_epochs < 1:
        raise ConfigError("pseudo_label.every_n_epochs must be >= 1.")
    return merged
