"""The training loop: steps equal a hand-written loop, passes are counted, metrics, resume, NaN, checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from sharpness import SAM
from sharpness.data import iterate_batches, load_dataset
from sharpness.models import build_model
from sharpness.train import (
    Callback,
    Checkpointer,
    MetricsLogger,
    NonFiniteLossError,
    Trainer,
    load_checkpoint,
    save_checkpoint,
)
from sharpness.train.checkpoint import CHECKPOINT_KEYS


def _data(task: str = "classification", **kwargs):
    return load_dataset("synthetic", seed=0, task=task, n_train=96, n_test=48, dim=6, **kwargs)


def _model(data, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", input_shape=data.input_shape, num_classes=data.num_classes, hidden=(16,))


def _trainer(data, optimizer: str = "sgd", epochs: int = 2, callbacks=(), lr: float = 0.1, **kwargs) -> Trainer:
    model = _model(data)
    if optimizer == "sam":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=lr, momentum=0.9, model=model)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * 6)
    return Trainer(model, opt, data, epochs=epochs, batch_size=16, scheduler=scheduler, callbacks=callbacks, **kwargs)


def test_sgd_steps_equal_a_hand_written_loop() -> None:
    """Same model, same batches (same generator seed), plain zero_grad/backward/step: bitwise equal weights."""
    data = _data()
    trainer = _trainer(data, epochs=2)
    trainer.fit()
    model = _model(data)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        for x, y in iterate_batches(data.x_train, data.y_train, 16, shuffle=True, generator=generator):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            scheduler.step()
    for a, b in zip(trainer.model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer, passes", [("sgd", 1), ("sam", 2)])
def test_passes_are_counted_and_metrics_recorded(optimizer: str, passes: int) -> None:
    data = _data(val_split=0.25)
    steps_seen = []

    class Steps(Callback):
        def on_step_end(self, trainer, step):
            steps_seen.append((step.step, step.passes, step.x.shape[0]))

    trainer = _trainer(data, optimizer, epochs=2, callbacks=[Steps()])
    state = trainer.fit()
    per_epoch = math.ceil(len(data.y_train) / 16)
    assert state.step == 2 * per_epoch == len(steps_seen)
    assert [s[1] for s in steps_seen] == [passes] * state.step
    assert state.passes == passes * state.step
    assert state.sam_fraction == (1.0 if passes == 2 else 0.0)
    record = state.history[-1]
    assert record["epoch"] == 2 and record["step"] == state.step
    assert record["passes_per_step"] == passes
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr", "train_seconds"):
        assert key in record
    test = trainer.evaluate(data.x_test, data.y_test)
    assert record["test_acc"] == test["acc"] and record["test_loss"] == pytest.approx(test["loss"])
    manual = nn.functional.cross_entropy(trainer.model.eval()(data.x_test), data.y_test).item()
    trainer.model.train()
    assert test["loss"] == pytest.approx(manual, rel=1e-6)


def test_regression_uses_mse_and_reports_no_accuracy() -> None:
    data = _data("regression")
    trainer = _trainer(data, epochs=1, lr=0.01)
    record = trainer.fit().history[-1]
    assert "test_acc" not in record and "train_acc" not in record
    with torch.no_grad():
        trainer.model.eval()
        expected = nn.functional.mse_loss(trainer.model(data.x_test), data.y_test).item()
    assert record["test_loss"] == pytest.approx(expected, rel=1e-6)
    final = trainer.final_metrics()
    assert final["gap"] == pytest.approx(final["test_loss"] - final["train_loss"])


def test_evaluate_restores_the_mode() -> None:
    data = _data()
    trainer = _trainer(data)
    trainer.model.train()
    trainer.evaluate(data.x_test, data.y_test)
    assert trainer.model.training
    trainer.model.eval()
    trainer.evaluate(data.x_test, data.y_test)
    assert not trainer.model.training


def test_final_metrics_gap_and_clean_accuracy_under_label_noise() -> None:
    data = _data(label_noise=0.5)
    trainer = _trainer(data, epochs=1)
    trainer.fit()
    final = trainer.final_metrics()
    assert final["gap"] == pytest.approx(final["train_acc"] - final["test_acc"])
    assert final["train_clean_acc"] == trainer.evaluate(data.x_train, data.clean_y_train)["acc"]
    assert final["train_clean_acc"] != final["train_acc"]


# ----------------------------------------------------------------------------- resume and checkpoints


class _StopAfter(Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(self, trainer, record):
        if record["epoch"] == self.epochs:
            raise KeyboardInterrupt


@pytest.mark.parametrize("optimizer", ["sgd", "sam"])
def test_resume_continues_bit_identically(tmp_path: Path, optimizer: str) -> None:
    data = load_dataset("digits", seed=0, augment=True)  # augmentation uses the loop's second generator
    data = type(data)(**{**data.__dict__, "x_train": data.x_train[:200], "y_train": data.y_train[:200]})

    def trainer(run_dir: Path, extra=()) -> Trainer:
        torch.manual_seed(0)
        model = build_model("cnn", input_shape=data.input_shape, num_classes=10, channels=(8, 8))
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9, model=model)
        if optimizer == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4 * 7)
        callbacks = [MetricsLogger(run_dir, tensorboard=False), *extra, Checkpointer(run_dir)]
        return Trainer(model, opt, data, epochs=4, batch_size=32, scheduler=sched, seed=3, callbacks=callbacks)

    whole = trainer(tmp_path / "whole")
    whole.fit()

    interrupted = trainer(tmp_path / "resumed", extra=[_StopAfter(2)])  # after the logger, before the checkpointer
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    torch.manual_seed(1234)  # the global RNG state is restored from the checkpoint, whatever it is now
    resumed = trainer(tmp_path / "resumed")
    resumed.load_state_dict(load_checkpoint(tmp_path / "resumed"))
    # The stop came in epoch 2's callbacks after its metrics row but before its checkpoint: the resumed run
    # restarts epoch 2 and must drop the stale row.
    assert resumed.state.epoch == 1
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 2
    resumed.fit()

    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    clocks = ("train_seconds", "train_cpu_seconds")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in clocks} for r in rows]  # noqa: E731
    assert strip(resumed.state.history) == strip(whole.state.history)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    csv_lines = (tmp_path / "resumed" / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("epoch,")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    data = _data()

    class Explode(Callback):
        def on_epoch_end(self, trainer, record):
            if record["epoch"] == 1:
                for group in trainer.optimizer.param_groups:
                    group["lr"] = 1e30

    trainer = _trainer(data, epochs=3, callbacks=[Explode(), Checkpointer(tmp_path)])
    trainer.scheduler = None
    with pytest.raises(NonFiniteLossError, match="epoch 2"):
        trainer.fit()
    state = load_checkpoint(tmp_path)
    assert state["train_state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def _checkpoint(epoch: int) -> dict:
    """A checkpoint with every entry load_checkpoint requires (most of them empty)."""
    return {key: None for key in CHECKPOINT_KEYS} | {"format": 1, "train_state": {"epoch": epoch}}


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(_checkpoint(1), path)

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_checkpoint(2), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["train_state"]["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def test_stale_temp_files_of_a_killed_write_are_removed_on_the_next_start(tmp_path: Path) -> None:
    stale = [".checkpoint.pt.0123456789ab.tmp", ".final.json.x_7kq2zp.tmp"]  # ours; the second as mkstemp named them
    kept = ["notes.tmp", ".hidden.tmp", "checkpoint.pt.0123456789ab.tmp"]  # not temp files of an atomic write
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"partial")
    _trainer(_data(), epochs=1, callbacks=[Checkpointer(tmp_path)]).fit()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["checkpoint.pt", *kept])


def test_bad_checkpoints_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "checkpoint.pt")):
        load_checkpoint(tmp_path)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="corrupt.pt is corrupt"):
        load_checkpoint(corrupt)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a sharpness training checkpoint"):
        load_checkpoint(other)


def test_trainer_arguments_are_checked() -> None:
    data = _data()
    model = _model(data)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        Trainer(model, opt, data, epochs=0)
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(model, opt, data, epochs=1, batch_size=0)
    with pytest.raises(ValueError, match="micro_batch .m-sharpness. needs a sharpness.SAM optimizer, got SGD"):
        Trainer(model, opt, data, epochs=1, micro_batch=4)
    with pytest.raises(ValueError, match="micro_batch must be an integer >= 1"):
        Trainer(model, opt, data, epochs=1, micro_batch=0)


def test_micro_batch_steps_are_m_sam_steps_over_the_same_batches() -> None:
    """micro_batch=m: each batch of 16 is cut into 6, 6, 4 and handed to step_micro_batches, weighted by size."""
    data = _data()
    trainer = _trainer(data, "sam", epochs=1, micro_batch=6)
    state = trainer.fit()
    assert state.passes == 2 * state.step and state.sam_fraction == 1.0
    model = _model(data)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, model=model)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    generator = torch.Generator().manual_seed(0)

    def closure_of(xs, ys):
        def closure():
            loss = nn.functional.cross_entropy(model(xs), ys)
            loss.backward()
            return loss

        return closure

    for x, y in iterate_batches(data.x_train, data.y_train, 16, shuffle=True, generator=generator):
        pieces = list(zip(x.split(6), y.split(6), strict=True))
        opt.step_micro_batches([closure_of(*piece) for piece in pieces], weights=[len(ys) for _, ys in pieces])
        scheduler.step()
    for a, b in zip(trainer.model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    whole = _trainer(data, "sam", epochs=1)
    whole.fit()
    assert not torch.equal(next(whole.model.parameters()), next(trainer.model.parameters()))


def test_callback_state_is_saved_by_name_and_required_on_resume(tmp_path: Path) -> None:
    class Counter(Callback):
        def __init__(self) -> None:
            self.steps = 0

        def on_step_end(self, trainer, step):
            self.steps += 1

        def state_dict(self):
            return {"steps": self.steps}

        def load_state_dict(self, state):
            self.steps = state["steps"]

    data = _data()
    counter = Counter()
    trainer = _trainer(data, epochs=1, callbacks=[counter, Checkpointer(tmp_path)])
    trainer.fit()
    saved = load_checkpoint(tmp_path)
    assert saved["callbacks"] == {"Counter": {"steps": trainer.state.step}}
    fresh = Counter()
    _trainer(data, epochs=2, callbacks=[Callback(), fresh]).load_state_dict(saved)
    assert fresh.steps == trainer.state.step
    with pytest.raises(ValueError, match="Counter"):
        _trainer(data, epochs=2).load_state_dict(saved)
