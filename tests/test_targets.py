"""``_target_`` is allowed by what it names, not by its package: each config position takes only classes of its
kind, checked after import and before anything is built, everywhere in the composed config. The attacks that a
package check let through are refused, through the Python API and through the command line before Hydra starts."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from dgnetpp_pl.config import CONF_DIR, ConfigError
from dgnetpp_pl.instantiate import check_targets, instantiate_group, safe_instantiate

REPO = Path(__file__).resolve().parents[1]
ALLOWED = ["dgnetpp_pl", "torch", "torchvision", "pytorch_lightning"]


class SystemCall:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def compose_cfg(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=["experiment=demo", *overrides], return_hydra_config=hydra)


def test_torch_load_as_a_callback_is_refused_and_its_payload_never_loads(tmp_path: Path) -> None:
    marker, payload = tmp_path / "ran", tmp_path / "payload.pkl"
    payload.write_bytes(pickle.dumps(SystemCall(marker)))
    evil = ["+callbacks.x._target_=torch.load", f"+callbacks.x.f={payload}", "+callbacks.x.weights_only=false"]
    cfg = compose_cfg(*evil, f"paths.output_dir={tmp_path}")
    with pytest.raises(ConfigError) as info:
        instantiate_group(cfg.callbacks, cfg.allowed_targets, "callbacks")
    message = str(info.value)
    assert "Refusing to instantiate 'torch.load' at 'callbacks.x'" in message
    assert "not a class" in message and "pytorch_lightning.callbacks.Callback" in message
    assert not marker.exists()


def test_a_function_reached_through_an_allowed_module_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'dgnetpp_pl.runlock.os.system' at 'callbacks.x': it is a builtin"):
        safe_instantiate({"_target_": "dgnetpp_pl.runlock.os.system", "command": "true"}, ALLOWED, "callbacks.x")
    with pytest.raises(ConfigError, match=r"torch.nn.modules.linear.Identity is not a subclass of .*Callback"):
        safe_instantiate({"_target_": "torch.nn.Identity"}, ALLOWED, "callbacks.x")
    with pytest.raises(ConfigError, match=r"'pytorch_lightning.callbacks.ModelCheckpoint' at 'logger.x'.*Logger"):
        safe_instantiate({"_target_": "pytorch_lightning.callbacks.ModelCheckpoint"}, ALLOWED, "logger.x")
    nested = {"_target_": "pytorch_lightning.callbacks.LambdaCallback", "on_fit_start": {"_target_": "os.getpid"}}
    with pytest.raises(ConfigError, match=r"'os.getpid' at 'callbacks.x.on_fit_start': no _target_ is expected here"):
        safe_instantiate(nested, ALLOWED, "callbacks.x")
    ok = safe_instantiate({"_target_": "pytorch_lightning.callbacks.LearningRateMonitor"}, ALLOWED, "callbacks.lr")
    assert type(ok).__name__ == "LearningRateMonitor"


def test_every_target_of_the_composed_config_is_checked_hydra_included() -> None:
    check_targets(compose_cfg("logger=many", "hparams_search=optuna", hydra=True), ALLOWED)  # the shipped configs
    hydra_ok = ["+hydra.callbacks.log._target_=hydra.experimental.callbacks.LogJobReturnCallback"]
    check_targets(compose_cfg(*hydra_ok, hydra=True), ALLOWED)
    refused = {
        "+hydra.callbacks.x._target_=numpy.load": r"'numpy.load' at 'hydra.callbacks.x': 'numpy' is not an allowed",
        "+hydra.callbacks.x._target_=hydra.utils.call": r"'hydra.utils.call' at 'hydra.callbacks.x': it is a function",
        "hydra.launcher._target_=os.system": r"'os.system' at 'hydra.launcher'",
        "+hydra.job_logging.handlers.x.class=os.system": r"'os.system' at 'hydra.job_logging.handlers.x.class'",
        "+model.x._target_=pytorch_lightning.Callback": r"at 'model.x': no _target_ is expected here",
    }
    for override, pattern in refused.items():
        with pytest.raises(ConfigError, match=pattern):
            check_targets(compose_cfg(override, hydra=True), ALLOWED)


def run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "WANDB_MODE": "offline"}
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "dgnetpp_pl", "experiment=demo", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_numpy_load_as_a_hydra_callback_is_refused_before_hydra_runs(tmp_path: Path) -> None:
    marker, payload = tmp_path / "ran", tmp_path / "payload.npy"
    np.save(payload, np.array([SystemCall(marker)], dtype=object), allow_pickle=True)
    proc = run_cli(
        tmp_path,
        "+hydra.callbacks.x._target_=numpy.load",
        f"+hydra.callbacks.x.file={payload}",
        "+hydra.callbacks.x.allow_pickle=true",
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Refusing to instantiate 'numpy.load' at 'hydra.callbacks.x'" in proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run folder


def test_torch_load_callback_from_the_command_line_is_refused_before_anything_runs(tmp_path: Path) -> None:
    marker, payload = tmp_path / "ran", tmp_path / "payload.pkl"
    payload.write_bytes(pickle.dumps(SystemCall(marker)))
    proc = run_cli(
        tmp_path, "+callbacks.x._target_=torch.load", f"+callbacks.x.f={payload}", "+callbacks.x.weights_only=false"
    )
    assert proc.returncode == 1 and "'torch.load' at 'callbacks.x'" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists() and not (tmp_path / "run").exists()
