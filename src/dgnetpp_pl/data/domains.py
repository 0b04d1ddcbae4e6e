"""One domain of the config (``data.source`` / ``data.target``) as a dataset on disk: a registered reader, or the
built-in synthetic data generated on first use."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dgnetpp_pl.data.datasets import DatasetError, Market1501, ReIDDataset, build_dataset
from dgnetpp_pl.data.synthetic import (
    SOURCE_STYLE,
    TARGET_STYLE,
    SyntheticDomainSpec,
    generate_domain,
    synthetic_domain_dir,
)

if TYPE_CHECKING:
    from dgnetpp_pl.config import DomainConfig, SyntheticConfig

# The built-in camera networks a synthetic domain is drawn from (data.<role>.style).
STYLES: dict[str, SyntheticDomainSpec] = {"source": SOURCE_STYLE, "target": TARGET_STYLE}


def synthetic_spec(domain: DomainConfig, synthetic: SyntheticConfig) -> SyntheticDomainSpec:
    """The spec of a synthetic domain: its style with the sizes that ``data.synthetic`` sets."""
    sizes = {k: v for k, v in vars(synthetic).items() if k != "seed" and v is not None}
    try:
        return STYLES[domain.style].with_overrides(sizes)
    except (TypeError, ValueError) as err:
        raise DatasetError(f"data.synthetic: {err}") from err


def prepare_domain(domain: DomainConfig, synthetic: SyntheticConfig, data_dir: str | Path) -> Path | None:
    """Generate a synthetic domain that is missing (nothing for a real dataset); returns its folder."""
    if domain.name != "synthetic":
        return None
    spec = synthetic_spec(domain, synthetic)
    root = synthetic_domain_dir(domain.root or data_dir, spec, synthetic.seed)
    return generate_domain(root, spec, synthetic.seed)


def build_domain(domain: DomainConfig, synthetic: SyntheticConfig, data_dir: str | Path, role: str) -> ReIDDataset:
    """The dataset of ``data.<role>``: its reader on ``root`` (default: ``data_dir``), or the synthetic domain.

    The target is always evaluated on, so a target without query or gallery images is an error here.
    """
    try:
        if domain.name == "synthetic":
            dataset: ReIDDataset = Market1501(prepare_domain(domain, synthetic, data_dir))
        else:
            options = {} if domain.combine_train_val is None else {"combine_train_val": domain.combine_train_val}
            dataset = build_dataset(domain.name, domain.root or data_dir, strict=domain.strict, **options)
    except DatasetError as err:
        raise DatasetError(f"data.{role}: {err}") from err
    if role == "target":
        dataset.require_eval_splits("data.target")
    return dataset
