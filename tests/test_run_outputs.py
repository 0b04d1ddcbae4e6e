"""What a run shows a person, unit by unit: the 8-bit images every logger gets, the run's log (console and file),
the progress bar's stage and phase, and the rules that keep model selection off the target test split (end to
end: ``test_user_path.py``)."""

from __future__ import annotations

import io
import logging
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from configs import TINY_DEMO, typed_train
from PIL import Image
from torchvision.utils import save_image

from dgnetpp_pl.callbacks.progress import StageProgressBar
from dgnetpp_pl.config import ConfigError
from dgnetpp_pl.image_logging import log_image, save_png, to_uint8
from dgnetpp_pl.run_log import ConsoleHandler, joined_run_log, rendered


def gradient_image(h: int = 12, w: int = 20) -> torch.Tensor:
    """A float ``(3, h, w)`` image in [0, 1] whose channels vary differently, with exact 0 and 1 in it."""
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return torch.stack([x, y, (x + y) / 2])


# --------------------------------------------------------------------------------------------- images
def test_a_float_image_becomes_the_8_bit_pixels_torchvision_writes(tmp_path: Path) -> None:
    image = gradient_image()
    pixels = to_uint8(image)
    assert pixels.dtype == np.uint8 and pixels.shape == (12, 20, 3)
    assert pixels.min() == 0 and pixels.max() == 255  # not the 0/1 values of a bare cast
    save_image(image, tmp_path / "torchvision.png")
    assert np.array_equal(pixels, np.asarray(Image.open(tmp_path / "torchvision.png").convert("RGB")))
    assert np.array_equal(to_uint8(image.permute(1, 2, 0).numpy()), pixels)  # channels last
    assert np.array_equal(to_uint8(Image.fromarray(pixels)), pixels)  # PIL
    assert np.array_equal(to_uint8(torch.from_numpy(pixels).permute(2, 0, 1)), pixels)  # uint8 tensor
    assert np.array_equal(np.asarray(Image.open(save_png(image, tmp_path / "ours.png"))), pixels)


def test_shapes_and_types_that_are_no_rgb_image_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\(3, H, W\) or \(H, W, 3\), got \(4, 5\)"):
        to_uint8(torch.zeros(4, 5))
    with pytest.raises(TypeError, match="dtype int64"):
        to_uint8(np.zeros((4, 5, 3), dtype=np.int64))


def test_tensorboard_receives_the_same_8_bit_pixels(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    logger = pl.loggers.TensorBoardLogger(tmp_path, name=None)
    image = gradient_image()
    log_image(logger, "images/grid", image, step=3)
    logger.experiment.flush()
    events = EventAccumulator(str(Path(logger.log_dir)), size_guidance={IMAGES: 0})
    events.Reload()
    (stored,) = events.Images("images/grid")
    decoded = np.asarray(Image.open(io.BytesIO(stored.encoded_image_string)).convert("RGB"))
    assert stored.step == 3 and np.array_equal(decoded, to_uint8(image))


# ------------------------------------------------------------------------------------------- run log
def test_the_console_handler_writes_to_the_stdout_of_the_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    handler = ConsoleHandler(stream=sys.stderr)  # Hydra's default config passes a stream; it is not kept
    first, later = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", first)
    handler.emit(logging.makeLogRecord({"msg": "one"}))
    monkeypatch.setattr(sys, "stdout", later)  # e.g. a live progress bar's proxy
    handler.emit(logging.makeLogRecord({"msg": "two"}))
    assert first.getvalue() == "one\n" and later.getvalue() == "two\n"


def test_lightning_messages_and_warnings_join_the_run_log_while_it_lasts() -> None:
    root, lightning = logging.getLogger(), logging.getLogger("pytorch_lightning")
    records: list[logging.LogRecord] = []
    run_log = logging.Handler(logging.INFO)
    run_log.emit = records.append  # type: ignore[method-assign]
    own = logging.StreamHandler(io.StringIO())
    saved = (list(lightning.handlers), lightning.propagate, root.level)
    # As Lightning sets itself up when it is imported before logging is configured: its own handler, no propagation.
    lightning.handlers, lightning.propagate = [own], False
    root.addHandler(run_log)
    root.setLevel(logging.INFO)
    try:
        with joined_run_log():
            logging.getLogger("pytorch_lightning.utilities.rank_zero").info("GPU available: False")
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.warn("metrics on 4 of 9 evaluation images only", UserWarning, stacklevel=1)
        after = (list(lightning.handlers), lightning.propagate)
        lightning.info("after the run")
    finally:
        root.removeHandler(run_log)
        lightning.handlers, lightning.propagate = saved[0], saved[1]
        root.setLevel(saved[2])
    messages = [r.getMessage() for r in records]
    assert "GPU available: False" in messages
    assert any("UserWarning: metrics on 4 of 9 evaluation images only" in m for m in messages)
    assert own.stream.getvalue() == "after the run\n"  # only what came after the run went to its own handler
    assert after == ([own], False) and "after the run" not in messages


def test_a_rich_table_renders_to_plain_text() -> None:
    from rich.table import Table

    table = Table(title="results")
    table.add_column("model")
    table.add_row("DG-Net++ adapted")
    text = rendered(table)
    assert "results" in text and "DG-Net++ adapted" in text and "\x1b[" not in text


# --------------------------------------------------------------------------------------- progress bar
def test_the_progress_bar_shows_the_stage_and_phase_before_the_metrics() -> None:
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", callbacks=[StageProgressBar()])
    module = SimpleNamespace(stage="adapt", phase="self_training")
    metrics = trainer.progress_bar_callback.get_metrics(trainer, module)
    assert list(metrics.items())[:2] == [("stage", "adapt"), ("phase", "self_training")]


# ------------------------------------------------------------------------------------ model selection
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["callbacks.model_checkpoint.monitor=val/mAP", "callbacks.model_checkpoint.save_top_k=1"],
         r"callbacks.model_checkpoint.monitor=val/mAP, but data.val_split=0: there is no validation split"),
        (["data.val_split=0.2", "callbacks.model_checkpoint.monitor=test/mAP"],
         r"callbacks.model_checkpoint.monitor=test/mAP would choose checkpoints on the target test split"),
        (["callbacks.model_checkpoint.monitor=test_per_epoch/mAP"], r"on the target test split"),
        (["optimized_metric=test/mAP"], r"optimized_metric=test/mAP would tune hyper-parameters on the target test"),
    ],
)  # fmt: skip
def test_selecting_on_the_test_split_is_refused_at_start_up(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        typed_train("experiment=demo", *overrides)


def test_selecting_on_a_held_out_split_is_accepted_and_the_default_selects_nothing() -> None:
    cfg = typed_train(
        "experiment=demo", "data.val_split=0.2", "callbacks.model_checkpoint.monitor=val/mAP",
        "callbacks.model_checkpoint.save_top_k=1",
    )  # fmt: skip
    assert cfg.callbacks["model_checkpoint"]["monitor"] == "val/mAP"
    default = typed_train("experiment=demo").callbacks["model_checkpoint"]
    assert default["monitor"] is None and default["save_top_k"] == 0 and default["save_last"] is True


def test_the_sigterm_message_goes_to_the_run_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from dgnetpp_pl.signals import CheckpointOnSigterm

    stage_dir = tmp_path / "run" / "checkpoints" / "adapt"
    with caplog.at_level(logging.INFO, logger="dgnetpp_pl"), pytest.raises(SystemExit) as stop:
        CheckpointOnSigterm(stage_dir).exit()
    assert stop.value.code == 0
    (record,) = [r for r in caplog.records if r.name.startswith("dgnetpp_pl")]
    assert "Stopped on SIGTERM" in record.getMessage()
    assert f"hydra.run.dir={tmp_path / 'run'} ckpt_path=last" in record.getMessage()


# ------------------------------------------------------------------------------------ data generation
def test_a_run_checks_its_checkpoints_before_it_generates_any_data(tmp_path: Path) -> None:
    from configs import compose_train

    from dgnetpp_pl.checkpoints import CheckpointError
    from dgnetpp_pl.train import train

    data_dir = tmp_path / "data"
    base = [*TINY_DEMO, f"paths.data_dir={data_dir}", f"paths.output_dir={tmp_path / 'run'}"]
    bad = tmp_path / "source.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"source.ckpt is truncated or corrupt"):
        train(compose_train(*base, "stage=adapt", f"init_ckpt={bad}"))
    with pytest.raises(CheckpointError, match=r"ckpt_path=last: nothing to resume"):
        train(compose_train(*base, "ckpt_path=last"))
    assert not data_dir.exists(), "the built-in data is generated only once the checkpoints are known to load"
