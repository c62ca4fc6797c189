"""Training-loop callbacks: the hook points, metrics files and checkpoints."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sharpness.train.checkpoint import CHECKPOINT_NAME, remove_stale_temps, save_checkpoint, to_json

if TYPE_CHECKING:
    from sharpness.train.loop import StepOutput, Trainer


class Callback:
    """Hooks of :class:`~sharpness.train.Trainer`; override what you need. Called in list order.

    ``on_epoch_end`` receives the epoch's metrics record: a callback may add keys to it (a sharpness tracker,
    say), so such callbacks go before the ones that write the record out. A callback with state that a resumed
    run needs returns it from :meth:`state_dict`; it is saved in the trainer's checkpoints under the callback's
    class name (so at most one stateful callback per class), and a resumed run must have that callback too.
    """

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first epoch of :meth:`Trainer.fit` (also when resuming)."""

    def on_step_end(self, trainer: Trainer, step: StepOutput) -> None:
        """After every optimizer step (and the scheduler step): the place to measure during training."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """After each epoch's evaluation, with the record that goes into the history."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last epoch."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the default has nothing to restore."""


class MetricsLogger(Callback):
    """One row per epoch in ``metrics.jsonl`` and ``metrics.csv`` (and TensorBoard scalars if installed).

    ``metrics.jsonl`` is strict JSON: a NaN or infinite metric is written as ``null``.

    At the start of :meth:`Trainer.fit` both files are rewritten from the trainer's history, so a resumed run
    has exactly one row per epoch (the rows of epochs after the checkpoint are dropped).

    TensorBoard (``pip install "sharpness[tensorboard]"``): every numeric metric is a scalar of that name at step
    = epoch, in ``run_dir/tensorboard`` (``tensorboard --logdir run_dir``). Like the two files, the event file is
    rewritten from the trainer's history at the start of each :meth:`Trainer.fit` (earlier event files removed),
    so TensorBoard shows what the files show: a resumed run drops the events that epochs after its checkpoint had
    logged, a run started afresh in the same folder replaces the earlier run's. (TensorBoard's own ``purge_step``
    would depend on the order of the event files' names, which is wrong for two files opened in the same second.)
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.tensorboard = tensorboard
        self._writer: Any = None

    @property
    def jsonl_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def csv_path(self) -> Path:
        return self.run_dir / "metrics.csv"

    def on_train_start(self, trainer: Trainer) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.jsonl_path.open("w") as handle:
            for record in trainer.state.history:
                handle.write(to_json(record) + "\n")
        self._write_csv(trainer.state.history)
        self._close_writer()  # a writer left open by a fit() that raised
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                self.tensorboard = False
            else:
                log_dir = self.run_dir / "tensorboard"
                for stale in log_dir.glob("events.out.tfevents.*"):
                    stale.unlink()
                self._writer = SummaryWriter(log_dir=str(log_dir))
                for record in trainer.state.history:
                    self._add_scalars(record)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        with self.jsonl_path.open("a") as handle:
            handle.write(to_json(record) + "\n")
        self._write_csv(trainer.state.history)
        self._add_scalars(record)

    def _add_scalars(self, record: dict[str, Any]) -> None:
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "epoch":
                    self._writer.add_scalar(key, value, record["epoch"])
            self._writer.flush()

    def on_train_end(self, trainer: Trainer) -> None:
        self._close_writer()

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write_csv(self, history: list[dict[str, Any]]) -> None:
        columns = list(dict.fromkeys(key for record in history for key in record))
        with self.csv_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(history)


class Checkpointer(Callback):
    """Write the trainer's full state to ``run_dir/checkpoint.pt`` atomically every ``every`` epochs.

    Only completed, finite epochs are saved (the loop raises before an epoch with a NaN loss ends), so the file
    always holds the last good state. The final epoch is always saved. At the start of training the temp files of
    writes that a killed process left in the folder are removed. With several processes attach it to every process
    (a sharded model's state is gathered by all of them); rank 0 alone writes.
    """

    def __init__(self, run_dir: str | Path, *, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"checkpoint every must be >= 1 epoch, got {every}")
        self.path = Path(run_dir) / CHECKPOINT_NAME
        self.every = every

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.rank == 0:
            remove_stale_temps(self.path.parent)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if record["epoch"] % self.every == 0 or record["epoch"] == trainer.epochs:
            if trainer.rank == 0:
                save_checkpoint(trainer.state_dict(), self.path)
            elif trainer.sharded:  # gathering a sharded model's state is a collective: every process takes part
                trainer.state_dict()
