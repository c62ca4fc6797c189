"""One training run from a :class:`RunConfig` into a run folder.

A run folder holds ``config.json`` (the configuration), ``metrics.jsonl`` / ``metrics.csv`` (one row per
epoch), ``checkpoint.pt`` (the last completed epoch; ``--resume`` continues from it bit-identically) and, when
the run has finished, ``final.json`` (eval-mode metrics on every split and the generalisation gap).

Under ``torchrun`` (a process group of N > 1 processes) every process trains its shard of each global batch and
rank 0 alone evaluates and writes the folder (every process takes part in sharpness tracking, and with ``fsdp`` in
evaluation and checkpoints); ``config.json`` also records ``world_size`` and ``replica_batch`` (the per-process
batch, SAM's ``m``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sharpness.data import Dataset, load_dataset, num_batches
from sharpness.experiments.config import ConfigError, RunConfig
from sharpness.models import build_model
from sharpness.optim.registry import build_optimizer
from sharpness.train import (
    CHECKPOINT_NAME,
    Callback,
    Checkpointer,
    MetricsLogger,
    NonFiniteLossError,
    Trainer,
    load_checkpoint,
    read_json,
    write_json,
)
from sharpness.train.distributed import (
    check_global_batch,
    distribute,
    fault_callbacks,
    is_rank_zero,
    replica_device,
    world,
)
from sharpness.train.tracking import SharpnessTracker

CONFIG_NAME, FINAL_NAME = "config.json", "final.json"
LAUNCH_RECORD = ("world_size", "replica_batch")
"""Keys of a train run's ``config.json`` that record how it was launched, not settings of :class:`RunConfig`."""


def load_data(config: RunConfig) -> Dataset:
    return load_dataset(
        config.dataset,
        seed=config.seed,
        val_split=config.val_split,
        label_noise=config.label_noise,
        data_dir=config.data_dir,
        augment=config.augment,
    )


def build_trainer(config: RunConfig, data: Dataset, callbacks: Sequence[Callback] = ()) -> Trainer:
    """Model (seeded with ``config.seed``), optimizer, schedule and trainer for ``config``.

    In a process group of several processes the model is wrapped in ``DistributedDataParallel`` (or sharded with
    FSDP2 when ``config.fsdp``) before the optimizer is built around it, on ``cuda:LOCAL_RANK`` for a CUDA device.
    """
    torch.manual_seed(config.seed)
    device = replica_device(config.device)
    model = build_model(config.model_name, input_shape=data.input_shape, num_classes=data.num_classes)
    model = distribute(model, device, fsdp=config.fsdp)
    optimizer = build_optimizer(
        config.optimizer,
        model,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        rho=config.rho,
        k=config.k,
        sam_prob=config.sam_prob,
        alpha=config.alpha,
        delta=config.delta,
        lambda1=config.lambda1,
        lambda2=config.lambda2,
        seed=config.seed,
        sam_start=config.sam_start,
        perturb=config.perturb,
    )
    scheduler = None
    if config.schedule == "cosine":
        total_steps = config.epochs * num_batches(len(data.y_train), config.batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return Trainer(
        model,
        optimizer,
        data,
        epochs=config.epochs,
        batch_size=config.batch_size,
        scheduler=scheduler,
        seed=config.seed,
        device=device,
        callbacks=callbacks,
        micro_batch=config.micro_batch,
    )


def check_settings(config: RunConfig, world_size: int = 1) -> None:
    """The settings, and the global batch over ``world_size`` processes; a one-line :class:`ConfigError`."""
    config.validate()
    try:
        check_global_batch(config.batch_size, world_size, micro_batch=config.micro_batch)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_run(config: RunConfig, run_dir: str | Path, *, resume: bool, world_size: int = 1) -> None:
    """Every check made before anything is written; a one-line :class:`ConfigError` naming the problem.

    :func:`check_settings`, and the folder: a new run's must not hold a run, a resumed run's ``config.json`` must
    match ``config`` and a finished one must still have its checkpoint.
    """
    check_settings(config, world_size)
    run_dir = Path(run_dir)
    if resume:
        _check_same_config(run_dir / CONFIG_NAME, config)
        if (run_dir / FINAL_NAME).exists() and not (run_dir / CHECKPOINT_NAME).exists():
            raise ConfigError(
                f"cannot resume {run_dir}: the run has finished ({FINAL_NAME}) but its {CHECKPOINT_NAME} is missing, "
                "so there is nothing to continue; start a new run with --out"
            )
    elif (run_dir / FINAL_NAME).exists() or (run_dir / CHECKPOINT_NAME).exists():
        raise ConfigError(f"{run_dir} already holds a run; use --resume to continue it, or choose another --out")


def run_training(
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    data: Dataset | None = None,
) -> dict[str, Any]:
    """Train as ``config`` says, writing the run folder; returns the final metrics (also in ``final.json``).

    With ``resume=True`` the folder's checkpoint is loaded and training continues from it; the folder's
    ``config.json`` must match ``config`` (a resumed run with other settings would not be the same run). A run
    that stopped before its first checkpoint has nothing to continue from and is trained from the start (it is
    deterministic, so this is the same run). ``callbacks`` run before the metrics logger and the checkpointer
    (so they can add metrics).

    In a process group of several processes (see :mod:`sharpness.train.distributed`) every process calls this
    with the same arguments; rank 0 alone writes the folder and returns the final metrics, the other ranks return
    ``{}``. A checkpoint of any number of processes resumes with any other number, sharded or not.
    """
    run_dir = Path(run_dir)
    rank_zero, world_size = is_rank_zero(), world()[1]
    check_run(config, run_dir, resume=resume, world_size=world_size)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    state = load_checkpoint(run_dir) if resume and (run_dir / CHECKPOINT_NAME).exists() else None
    data = data if data is not None else load_data(config)
    writers: list[Callback] = []
    if config.track_sharpness_every is not None:  # every process measures its part of the measurement set
        writers.append(SharpnessTracker(config.track_sharpness_every, run_dir=run_dir if rank_zero else None))
    if rank_zero:
        writers.append(MetricsLogger(run_dir))
    writers.append(Checkpointer(run_dir, every=config.checkpoint_every))  # writes on rank 0
    # With several processes, building the trainer (DDP's construction) waits for all of them: no process reads
    # the folder after rank 0 starts writing it.
    trainer = build_trainer(config, data, [*callbacks, *writers, *fault_callbacks()])
    if state is not None:
        _restore(trainer, state, run_dir / CHECKPOINT_NAME)
    if rank_zero:
        _record_config(config, run_dir, world_size, resume)
    try:
        trainer.fit()
    except NonFiniteLossError as exc:
        checkpoint = run_dir / CHECKPOINT_NAME
        kept = (
            f"the last good epoch ({load_checkpoint(checkpoint)['train_state']['epoch']}) is kept in {checkpoint}"
            if checkpoint.is_file()
            else "no epoch had completed, so there is no checkpoint"
        )
        raise NonFiniteLossError(f"{exc}; {kept}") from None
    final = trainer.final_metrics() if rank_zero or trainer.sharded else {}  # a sharded model: all evaluate
    if not rank_zero:
        return {}
    write_json(final, run_dir / FINAL_NAME)
    return final


def _record_config(config: RunConfig, run_dir: Path, world_size: int, resume: bool) -> None:
    """Write ``config.json``: the settings and the launch record (:data:`LAUNCH_RECORD`).

    A resumed run keeps the saved file, but a resume with another number of processes updates its launch record.
    """
    path = run_dir / CONFIG_NAME
    record = {"world_size": world_size, "replica_batch": config.batch_size // world_size}
    if not resume:
        write_json({"kind": "train", **dataclasses.asdict(config), **record}, path)
        return
    saved = read_json(path)
    if {key: saved.get(key) for key in LAUNCH_RECORD} != record:
        write_json({**saved, **record}, path)


def _check_same_config(path: Path, config: RunConfig) -> None:
    if not path.is_file():
        raise ConfigError(f"cannot resume: {path} does not exist (is this a sharpness run folder?)")
    saved = read_json(path)
    saved.pop("kind", None)
    # threads and device only decide where and how fast the run computes, not what it computes.
    current = {key: value for key, value in dataclasses.asdict(config).items() if key not in ("threads", "device")}
    defaults = dataclasses.asdict(RunConfig())  # a setting added after the run was saved has its default there
    differing = sorted(key for key, value in current.items() if saved.get(key, defaults[key]) != value)
    if differing:
        raise ConfigError(
            f"cannot resume {path.parent}: the settings differ from the saved run in {differing}; "
            "resume with the run's own settings"
        )


def _restore(trainer: Trainer, state: dict[str, Any], checkpoint: Path) -> None:
    """Load ``state`` into ``trainer``; a one-line ConfigError if it does not fit (another run's checkpoint)."""
    try:
        trainer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"cannot resume from {checkpoint}: {reason}; is it the checkpoint of another run? resume the folder it "
            "came from, or start a new run with --out"
        ) from None
