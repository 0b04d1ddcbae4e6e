"""The config tree: every option of every group composes and validates against the schemas, the presets say what
they are, every schema key is read by some code, and the Optuna space holds keys that move its metric (bad
overrides: ``test_bad_input.py``)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
from configs import compose_train, typed_train
from hydra import compose, initialize_config_dir

from dgnetpp_pl.cli import description, run_app
from dgnetpp_pl.config import (
    CONF_DIR,
    ConvertConfig,
    EvaluateConfig,
    ExportConfig,
    ExtractConfig,
    PathsConfig,
    RootConfig,
    SyntheticConfig,
    TrainerConfig,
    coerce,
    register_schemas,
    validate_config,
)
from dgnetpp_pl.data.synthetic import SyntheticDomainSpec

SRC = CONF_DIR.parent
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
# What an option needs besides itself to be a complete config.
NEEDS = {("data", "folder"): ["data.source.root=/datasets/mine/a", "data.target.root=/datasets/mine/b"]}
# The root defaults pair the paper's model with the built-in data at 64x32, too small for its ASPP (the schema says
# so at start-up); every option is composed at 128x64, and each experiment as shipped.
SIZE = ["data.height=128", "data.width=64"]
OPTIONAL_PLUGINS = {("hparams_search", "optuna"): "hydra_plugins.hydra_optuna_sweeper"}
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_of_every_group_composes_and_validates(group: str, option: str) -> None:
    if (group, option) in OPTIONAL_PLUGINS:
        pytest.importorskip(OPTIONAL_PLUGINS[group, option])
    size = SIZE if group != "experiment" else []
    cfg = typed_train(f"{group}={option}", *NEEDS.get((group, option), []), *size)
    assert isinstance(cfg, RootConfig)
    if group == "data" and option != "synthetic":
        assert cfg.data.target.name == option if option != "folder" else cfg.data.target.root == "/datasets/mine/b"


@pytest.mark.parametrize("data", options("data"))
@pytest.mark.parametrize("logger", options("logger"))
def test_every_data_and_logger_option_composes_for_evaluate(data: str, logger: str) -> None:
    overrides = [f"data={data}", f"logger={logger}", "ckpt_path=model.ckpt", "paths.output_dir=unused"]
    cfg = coerce(EvaluateConfig, compose_train(*overrides, *NEEDS.get(("data", data), []), config_name="evaluate"))
    assert cfg.ckpt_path == "model.ckpt"


def test_extract_composes() -> None:
    overrides = ["ckpt_path=m.ckpt", "images=/crops", "out=f.pt", "paths.output_dir=unused"]
    cfg = coerce(ExtractConfig, compose_train(*overrides, config_name="extract"))
    assert (cfg.images, cfg.batch_size) == ("/crops", 64)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_validates(experiment: str) -> None:
    merged = typed_train(f"experiment={experiment}")
    assert merged.model.loss.lambda_cyc == 2.0 and merged.model.loss.lambda_id == 0.5
    assert merged.data.pairing == "official"  # every preset trains on the official batch mix, the demo too
    paper = experiment not in ("demo",)
    assert merged.model.pretrained == paper and (merged.model.appearance.arch == "resnet50") == paper
    if experiment == "duke2market":
        assert merged.data.source.name == "dukemtmc" and merged.data.target.name == "market1501"
        assert merged.data.height == 256 and merged.adapt.warmup_epochs == 22
    if experiment in ("market2msmt", "duke2msmt"):
        assert merged.data.target.name == "msmt17" and merged.pseudo_label.k == 1500
        assert merged.data.source.name == experiment.removesuffix("2msmt").replace("duke", "dukemtmc").replace(
            "market", "market1501"
        )
    if experiment == "demo":
        assert merged.model.name == "dgnetpp_small" and merged.data.source.name == "synthetic"


def test_each_experiment_file_has_a_one_line_description() -> None:
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        text = description(str(path))
        assert text and not text.startswith("@package"), path.name


def test_group_files_restate_no_schema_default() -> None:
    """A leaf value in a group file that equals the schema's default is noise (and hides where defaults live)."""
    import yaml

    schemas = {"data": RootConfig().data, "model": RootConfig().model, "pseudo_label": RootConfig().pseudo_label}
    schemas["trainer"] = TrainerConfig()
    restated = []
    for group, schema in schemas.items():
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            raw = yaml.safe_load(path.read_text()) or {}
            raw.pop("defaults", None)

            def walk(node: dict, obj: object, key: str, path: Path = path) -> None:
                for name, value in node.items():
                    default = getattr(obj, name, None)
                    if isinstance(value, dict) and dataclasses.is_dataclass(default):
                        walk(value, default, f"{key}.{name}")
                    elif value == default and not (isinstance(value, str) and "${" in value):
                        restated.append(f"{path.relative_to(CONF_DIR)}: {key}.{name}={value!r}")

            walk(raw, schema, group)
    assert not restated, restated


def test_data_dir_follows_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("DGNETPP_DATA", str(tmp_path / "datasets"))
    cfg = compose_train("experiment=demo")
    assert Path(cfg.paths.data_dir) == tmp_path / "datasets"
    assert Path(validate_config(compose_train("experiment=demo", "paths.output_dir=o")).data.data_dir) == Path(
        tmp_path / "datasets"
    )


def test_synthetic_data_seed_follows_the_run_seed() -> None:
    assert typed_train("experiment=demo", "seed=3").data.synthetic.seed == 3
    assert typed_train("experiment=demo", "seed=3", "data.synthetic.seed=1").data.synthetic.seed == 1


def test_submitit_launcher_composes() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["experiment=demo", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher.partition == "gpu"
    assert "submitit" in cfg.hydra.launcher._target_


def test_optuna_searches_keys_that_move_its_metric_on_a_held_out_split() -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=["experiment=demo", "hparams_search=optuna"], return_hydra_config=True
        )
    assert cfg.optimized_metric == "val/mAP_best"
    assert 0 < cfg.data.val_split < 1  # validation on held-out target train ids, not the target test split
    params = set(cfg.hydra.sweeper.params)
    assert {"model.optim.source.lr_app", "model.optim.adapt.lr_app", "adapt.app_lr_ramp", "pseudo_label.k"} <= params
    # Generator-only weights cannot move the appearance encoder's validation mAP.
    assert not params & {"model.loss.lambda_cyc", "model.loss.lambda_id", "model.optim.adapt.lr_g"}


# ---------------------------------------------------------------------------------------- unread keys
def _names_read_in_src() -> set[str]:
    """Attribute names, subscript / getattr string keys read by the package's code (the schemas themselves
    excluded), and the path segments of the ``${...}`` interpolations in its YAML tree."""
    names: set[str] = set()
    for path in SRC.rglob("*.py"):
        if path.name == "config.py" and path.parent == SRC:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                names.add(str(node.slice.value))
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr"):
                if len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                    names.add(str(node.args[1].value))
    for path in [*CONF_DIR.rglob("*.yaml"), SRC / "config.py"]:  # the schemas' own defaults may interpolate
        for ref in re.findall(r"\$\{([\w.:]+)", path.read_text()):
            names.update(ref.replace(":", ".").split("."))
    return names


def _schema_fields(cls: type, key: str = "") -> list[tuple[type, str, str]]:
    out = []
    for f in dataclasses.fields(cls):
        full = f"{key}.{f.name}" if key else f.name
        out.append((cls, f.name, full))
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += _schema_fields(type(default), full)
    return out


def test_every_schema_key_is_read_by_some_code() -> None:
    read = _names_read_in_src()
    # Sections handed whole to what consumes them: the Trainer's arguments, the synthetic spec's sizes.
    consumers = {
        TrainerConfig: set(inspect.signature(pl.Trainer.__init__).parameters),
        SyntheticConfig: {f.name for f in dataclasses.fields(SyntheticDomainSpec)} | {"seed"},
    }
    unread = set()
    for root in (RootConfig, EvaluateConfig, ExtractConfig, ConvertConfig, ExportConfig):
        for cls, name, full in _schema_fields(root):
            if cls in consumers:
                if name not in consumers[cls] or (name == "seed" and "seed" not in read):
                    unread.add(full)
            elif name not in read:
                unread.add(full)
    assert not unread, f"schema keys no code reads: {sorted(unread)}"


def test_the_unread_key_scan_catches_a_key_no_code_reads() -> None:
    @dataclasses.dataclass
    class Probe:
        recon_x: float = 1.0
        never_read_anywhere_xyz: float = 0.0

    read = _names_read_in_src()
    assert [name for _, name, _ in _schema_fields(Probe) if name not in read] == ["never_read_anywhere_xyz"]


def test_a_new_cli_runs_on_its_own_schema(tmp_path, monkeypatch) -> None:
    @dataclasses.dataclass
    class Probe:
        task_name: str = "probe"
        answer: int = 41
        paths: PathsConfig = dataclasses.field(default_factory=PathsConfig)

    seen = {}
    monkeypatch.setattr(sys, "argv", ["probe", "answer=42", f"hydra.run.dir={tmp_path}"])
    try:  # the extract config's defaults list names extract_schema: stand a new schema in for it
        run_app("extract", lambda cfg: seen.update(answer=cfg.answer, keys=sorted(cfg)), {"extract_schema": Probe})
    finally:
        register_schemas()
    assert seen == {"answer": 42, "keys": ["answer", "paths", "task_name"]}
