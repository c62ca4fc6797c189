"""MetricsLogger's TensorBoard scalars, read back with tensorboard's own event reader and compared with metrics.jsonl.

- a run: every metric of every epoch is a scalar with the metric's name, step = epoch, value = the jsonl value in
  float32 (NaN where jsonl has null), and nothing else;
- a run that crashed after logging an epoch its checkpoint does not hold, then resumed: TensorBoard shows each epoch
  once, the resumed run's values (the orphaned events are purged), as metrics.jsonl does; likewise a run started
  afresh in a folder that holds an earlier run's events.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator

from sharpness import AESAM
from sharpness.data import load_dataset
from sharpness.models import build_model
from sharpness.train import Callback, Checkpointer, MetricsLogger, Trainer, load_checkpoint

EPOCHS = 4


class Crash(RuntimeError):
    """Stands in for a killed process."""


class CrashAfter(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        if record["epoch"] == self.epoch:
            raise Crash(f"killed after epoch {self.epoch}")


def trainer(callbacks: list[Callback]) -> Trainer:
    """AE-SAM on a tiny synthetic task, so the records hold the policy's statistics too."""
    data = load_dataset("synthetic", seed=0, n_train=96, n_test=48, dim=6)
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=data.input_shape, num_classes=data.num_classes, hidden=(16,))
    opt = AESAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=model)
    return Trainer(model, opt, data, epochs=EPOCHS, batch_size=16, callbacks=callbacks)


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in ``log_dir``'s event files, as tensorboard reads them (orphaned steps purged)."""
    accumulator = event_accumulator.EventAccumulator(str(log_dir), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def assert_tensorboard_matches_jsonl(run_dir: Path) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == list(range(1, EPOCHS + 1))
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    assert set(scalars) == {key for row in rows for key in row} - {"epoch"}
    for tag, series in scalars.items():
        expected = [(row["epoch"], math.nan if row[tag] is None else row[tag]) for row in rows if tag in row]
        assert [step for step, _ in series] == [epoch for epoch, _ in expected], tag
        logged = torch.tensor([value for _, value in series], dtype=torch.float32)
        written = torch.tensor([value for _, value in expected], dtype=torch.float32)
        torch.testing.assert_close(logged, written, rtol=0, atol=0, equal_nan=True, msg=tag)


def test_every_metric_of_every_epoch_is_a_scalar(tmp_path: Path) -> None:
    trainer([MetricsLogger(tmp_path)]).fit()
    assert_tensorboard_matches_jsonl(tmp_path)
    assert "policy_s" in tensorboard_scalars(tmp_path / "tensorboard")


def test_a_resumed_run_shows_each_epoch_once(tmp_path: Path) -> None:
    """Checkpoints every 2 epochs, killed after logging epoch 3: the resumed run retrains epoch 3."""
    crashed = trainer([MetricsLogger(tmp_path), Checkpointer(tmp_path, every=2), CrashAfter(3)])
    with pytest.raises(Crash):
        crashed.fit()
    resumed = trainer([MetricsLogger(tmp_path), Checkpointer(tmp_path, every=2)])
    resumed.load_state_dict(load_checkpoint(tmp_path))
    resumed.fit()
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert_tensorboard_matches_jsonl(tmp_path)


def test_a_stale_event_file_named_after_the_new_one_is_not_shown(tmp_path: Path) -> None:
    """TensorBoard reads event files in name order; two opened in the same second can sort either way (the
    suite once saw the resumed run's epochs purged). A stale file that sorts last must not change what is shown."""
    crashed = trainer([MetricsLogger(tmp_path), Checkpointer(tmp_path, every=2), CrashAfter(3)])
    with pytest.raises(Crash):
        crashed.fit()
    from torch.utils.tensorboard import SummaryWriter

    stale = SummaryWriter(str(tmp_path / "stale"))
    for epoch in range(1, EPOCHS + 2):
        stale.add_scalar("loss", -1.0, epoch)
    stale.close()
    (written,) = (tmp_path / "stale").glob("events.out.tfevents.*")
    written.rename(tmp_path / "tensorboard" / "events.out.tfevents.9999999999.stale")  # sorts after any other
    resumed = trainer([MetricsLogger(tmp_path), Checkpointer(tmp_path, every=2)])
    resumed.load_state_dict(load_checkpoint(tmp_path))
    resumed.fit()
    assert_tensorboard_matches_jsonl(tmp_path)


def test_a_run_started_afresh_in_the_same_folder_replaces_the_earlier_one(tmp_path: Path) -> None:
    trainer([MetricsLogger(tmp_path)]).fit()
    trainer([MetricsLogger(tmp_path)]).fit()
    assert_tensorboard_matches_jsonl(tmp_path)


def test_no_event_files_without_tensorboard(tmp_path: Path) -> None:
    trainer([MetricsLogger(tmp_path, tensorboard=False)]).fit()
    assert (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()
