"""One training loop for every optimizer: plain ``torch.optim`` optimizers and the whole SAM family.

Each step calls ``optimizer.step(closure)``. The closure zeroes the gradients, runs forward and backward on the
batch and returns the loss; a plain optimizer calls it once, SAM twice (at ``w`` and ``w + ε``), and an optimizer
that decides per step whether to take its second pass calls it once or twice. The loop counts the calls, so the
number of forward/backward passes and the fraction of steps that took more than one are measured, not assumed.
On a SAM step the two losses give, for free, ``L(w + ε) − L(w)``, a first-order sharpness estimate (≈ ρ||g||):
each epoch record has its mean over the epoch's SAM steps (weighted by examples, over every process; per
micro-batch under m-sharpness) as ``sam_loss_rise`` when the optimizer is a :class:`~sharpness.SAM` (NaN for an
epoch without a SAM step). ``train_seconds`` and ``train_cpu_seconds`` time the training steps (wall-clock, and
this process's CPU time, which time spent waiting while other work holds the CPU does not inflate).

Determinism: batches are shuffled and augmented with the loop's own ``torch.Generator`` s, seeded from ``seed``;
:meth:`Trainer.state_dict` holds them, the model, the optimizer, the scheduler, the global torch RNG (dropout)
and the history, so a run resumed from a checkpoint continues bit-identically.

Data parallelism: inside an initialised process group of N > 1 processes (``torchrun``), the model is wrapped in
``DistributedDataParallel`` (or passed in sharded by FSDP2) and each process trains on its shard of every global
batch (see :mod:`sharpness.train.distributed`); ``batch_size`` stays the global batch.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from sharpness.checks import check_integer
from sharpness.data import Dataset, iterate_batches, num_batches
from sharpness.optim.msam import unperturbed_weights
from sharpness.optim.sam import SAM
from sharpness.train.callbacks import Callback
from sharpness.train.checkpoint import load_weights
from sharpness.train.distributed import (
    all_reduce_sums,
    check_global_batch,
    distribute,
    full_state,
    is_sharded_module,
    load_full_state,
    shard,
    sync_buffers,
    unwrap,
    world,
)

_SEED_OFFSET_AUGMENT = 1_000_003  # a second, unrelated stream for augmentation


def loss_function(task: str) -> Callable[..., Tensor]:
    """The training loss of a task: cross-entropy for ``"classification"``, mean squared error for regression."""
    return nn.functional.cross_entropy if task == "classification" else nn.functional.mse_loss


def _at_unperturbed_weights(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a :class:`Trainer` method inside ``unperturbed_weights(self.optimizer)``: an optimizer that keeps the
    parameters perturbed between steps (:class:`sharpness.MSAM`) shows the unperturbed weights ``w`` there."""

    @functools.wraps(method)
    def wrapper(self: Trainer, *args: Any, **kwargs: Any) -> Any:
        with unperturbed_weights(self.optimizer):
            return method(self, *args, **kwargs)

    return wrapper


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run was stopped at that step."""


@dataclass
class StepOutput:
    """What :meth:`Callback.on_step_end` sees after each optimizer step."""

    epoch: int  # 0-based epoch of this step
    step: int  # optimizer steps taken so far, this one included
    loss: float  # the loss at the unperturbed weights (the closure's first call), over the global batch
    passes: int  # forward/backward passes this step took
    x: Tensor  # this process's examples of the batch (all of them in a single process)
    y: Tensor


@dataclass
class TrainState:
    """Counters and history of a run (saved in checkpoints)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    passes: int = 0  # forward/backward passes taken
    multi_pass_steps: int = 0  # steps that took more than one pass (SAM steps)
    train_seconds: float = 0.0  # wall-clock of the training steps, evaluation excluded
    train_cpu_seconds: float = 0.0  # this process's CPU time (all its threads) over the same region
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sam_fraction(self) -> float:
        return self.multi_pass_steps / self.step if self.step else 0.0

    @property
    def passes_per_step(self) -> float:
        return self.passes / self.step if self.step else 0.0


class Trainer:
    """Train ``model`` on ``data`` with ``optimizer`` for ``epochs`` epochs, evaluating after each epoch.

    Args:
        model, optimizer: any ``nn.Module`` and any optimizer whose ``step`` accepts a closure. Inside a process
            group of several processes ``model`` is wrapped in ``DistributedDataParallel`` (pass it wrapped, e.g.
            by :func:`~sharpness.train.distributed.distribute`, when the optimizer needs the wrapper: SAM's
            ``model=``); :attr:`model` is always the unwrapped module, :attr:`train_module` the one the training
            passes run through.
        data: a :class:`sharpness.data.Dataset`; the loss is cross-entropy for classification, mean squared
            error for regression.
        epochs: number of epochs (the run stops after this many, counting resumed ones).
        batch_size: training batch size; the last, smaller batch of an epoch is kept. With N processes it is the
            global batch: each process takes its contiguous ``batch_size / N`` examples of every batch (all
            processes draw the same order), so the run sees the data of a single-process run.
        scheduler: stepped after every optimizer step (so a cosine schedule should span all steps).
        seed: seeds the shuffling and augmentation generators (the model's initialisation is the caller's).
        device: where the model and the batches live; data stay on the CPU and batches are moved.
        callbacks: see :class:`Callback`; called in order.
        eval_batch_size: batch size of the evaluation passes.
        micro_batch: ``m`` of m-sharpness: each training batch is split into micro-batches of this many examples
            (the last one may be smaller) and SAM perturbs each with its own gradient
            (:meth:`sharpness.SAM.step_micro_batches`); needs a :class:`sharpness.SAM` without a switching
            policy. ``None`` (default): the whole batch, plain SAM. Not with several processes, where each
            process's batch is already SAM's ``m``.

    With several processes the training metrics are global (summed over the processes, one small all-reduce per
    step), evaluation runs on rank 0 only (other ranks' epoch records have no evaluation keys) and callbacks run on
    every process: attach the ones that write files on rank 0 only. A model sharded by FSDP2
    (:func:`~sharpness.train.distributed.shard_model`; :attr:`sharded`) needs every process for a forward pass:
    then every process evaluates its share of each split (the sums are all-reduced), :meth:`state_dict` gathers
    the full weights and optimizer state on rank 0 (every process must call it), and the buffers (BatchNorm
    statistics) are broadcast from rank 0 before each step, as DDP does.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        data: Dataset,
        *,
        epochs: int,
        batch_size: int = 64,
        scheduler: LRScheduler | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        callbacks: Sequence[Callback] = (),
        eval_batch_size: int = 1024,
        micro_batch: int | None = None,
    ) -> None:
        epochs = check_integer(epochs, "epochs", low=1)
        batch_size = check_integer(batch_size, "batch_size", low=1)
        self.rank, self.world_size = world()
        check_global_batch(batch_size, self.world_size, micro_batch=micro_batch, n_examples=len(data.y_train))
        if micro_batch is not None:
            micro_batch = check_integer(micro_batch, "micro_batch", low=1, what="m of m-sharpness")
            if not hasattr(optimizer, "step_micro_batches"):
                raise ValueError(
                    f"micro_batch (m-sharpness) needs a sharpness.SAM optimizer, got {type(optimizer).__name__}"
                )
        self.micro_batch = micro_batch
        self.device = torch.device(device)
        self.train_module = distribute(model, self.device)
        self.model = unwrap(self.train_module)
        self.sharded = is_sharded_module(self.train_module)
        self.optimizer = optimizer
        self._perturbs = isinstance(optimizer, SAM)  # a second closure call is at w + ε (see _loss_rise)
        self.data = data
        self.epochs = epochs
        self.batch_size = batch_size
        self.scheduler = scheduler
        self.callbacks = list(callbacks)
        self.eval_batch_size = eval_batch_size
        self.loss_fn = loss_function(data.task)
        self.shuffle_generator = torch.Generator().manual_seed(seed)
        self.augment_generator = torch.Generator().manual_seed(seed + _SEED_OFFSET_AUGMENT)
        self.state = TrainState()

    # ------------------------------------------------------------------ training

    def fit(self) -> TrainState:
        """Train until ``epochs`` epochs are completed (continuing a resumed run); returns the state."""
        set_total_steps = getattr(self.optimizer, "set_total_steps", None)
        if set_total_steps is not None:  # policies with schedules of progress t/T (AE-SAM, scheduled RandomSAM)
            set_total_steps(self.epochs * num_batches(len(self.data.y_train), self.batch_size))
        for callback in self.callbacks:
            callback.on_train_start(self)
        while self.state.epoch < self.epochs:
            started, started_cpu = time.perf_counter(), time.process_time()
            totals = self._train_epoch()
            self.state.train_seconds += time.perf_counter() - started
            self.state.train_cpu_seconds += time.process_time() - started_cpu
            self.state.epoch += 1
            record = self._epoch_record(totals)
            self.state.history.append(record)
            for callback in self.callbacks:
                callback.on_epoch_end(self, record)
        for callback in self.callbacks:
            callback.on_train_end(self)
        return self.state

    def _train_epoch(self) -> dict[str, float]:
        self.train_module.train()
        loss_sum, correct, seen, rise_sum, rise_seen = 0.0, 0, 0, 0.0, 0
        for x, y, weight in self._epoch_batches():
            if self.sharded:
                sync_buffers(self.model)
            loss, outputs, targets, passes, rise = self._step(x, y, weight)
            hits = int((outputs.argmax(1) == targets).sum()) if self.data.task == "classification" else 0
            step_sum, step_correct, step_seen, step_rise, step_rise_seen = all_reduce_sums(
                [loss.item() * len(y), hits, len(y), *rise], self.device
            )
            value = step_sum / step_seen
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"the training loss became {value} at epoch {self.state.epoch + 1}, step {self.state.step + 1}; "
                    "the run was stopped (try a smaller learning rate or rho)"
                )
            self.state.step += 1
            self.state.passes += passes
            self.state.multi_pass_steps += passes > 1
            if self.scheduler is not None:
                self.scheduler.step()
            loss_sum += step_sum
            correct += int(step_correct)
            seen += int(step_seen)
            rise_sum += step_rise
            rise_seen += int(step_rise_seen)
            step = StepOutput(self.state.epoch, self.state.step, value, passes, x, y)
            for callback in self.callbacks:
                callback.on_step_end(self, step)
        rise = rise_sum / rise_seen if rise_seen else math.nan
        return {"loss": loss_sum / seen, "correct": correct, "seen": seen, "sam_loss_rise": rise}

    def _epoch_batches(self) -> Iterator[tuple[Tensor, Tensor, float]]:
        """This process's shard of every (augmented) global batch of an epoch, on the device, with its loss weight.

        The weight ``shard size × processes / batch size`` (1 when the shards are equal) makes DDP's average of the
        replicas' gradients the gradient of the global batch's mean loss also for an uneven last batch.
        """
        augment = self.data.augment
        for x, y in iterate_batches(
            self.data.x_train, self.data.y_train, self.batch_size, shuffle=True, generator=self.shuffle_generator
        ):
            if augment is not None:
                x = augment(x, self.augment_generator)
            size = len(y)
            x, y = shard(x, y, self.rank, self.world_size)
            weight = len(y) * self.world_size / size
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), weight

    def _step(self, x: Tensor, y: Tensor, weight: float = 1.0) -> tuple[Tensor, Tensor, Tensor, int, list[float]]:
        """One optimizer step; returns the loss at w, the first pass's outputs and their targets, the number of
        passes over the batch (the backward passes use the loss times ``weight``) and :meth:`_loss_rise`'s sums."""
        if self.micro_batch is not None:
            return self._micro_batch_step(x, y)
        losses: list[Tensor] = []
        first_outputs: list[Tensor] = []

        def closure() -> Tensor:
            loss, outputs = self._forward_backward(x, y, weight)
            losses.append(loss.detach())
            if not first_outputs:
                first_outputs.append(outputs)
            return loss

        loss = self.optimizer.step(closure)
        return loss, first_outputs[0], y, len(losses), self._loss_rise([(losses, len(y))])

    def _micro_batch_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, int, list[float]]:
        """An m-SAM step: a closure per micro-batch of ``micro_batch`` examples, weighted by their sizes."""
        pieces = list(zip(x.split(self.micro_batch), y.split(self.micro_batch), strict=True))
        losses: list[list[Tensor]] = [[] for _ in pieces]
        first_outputs: list[Tensor | None] = [None] * len(pieces)

        def closure_for(index: int) -> Callable[[], Tensor]:
            def closure() -> Tensor:
                loss, outputs = self._forward_backward(*pieces[index])
                losses[index].append(loss.detach())
                if first_outputs[index] is None:
                    first_outputs[index] = outputs
                return loss

            return closure

        closures = [closure_for(index) for index in range(len(pieces))]
        loss = self.optimizer.step_micro_batches(closures, weights=[len(ys) for _, ys in pieces])
        # A skipped step (non-finite gradient) stops before the later micro-batches' first passes.
        evaluated = [index for index, outputs in enumerate(first_outputs) if outputs is not None]
        outputs = torch.cat([first_outputs[i] for i in evaluated])
        passes = round(sum(map(len, losses)) / len(pieces))
        rise = self._loss_rise([(piece_losses, len(ys)) for piece_losses, (_, ys) in zip(losses, pieces, strict=True)])
        return loss, outputs, torch.cat([pieces[i][1] for i in evaluated]), passes, rise

    def _loss_rise(self, closures: list[tuple[list[Tensor], int]]) -> list[float]:
        """``[Σ n (L(w + ε) − L(w)), Σ n]`` over a step's closures (their losses, in call order, and their number of
        examples ``n``) that SAM called twice: the first call is at ``w``, the second at ``w + ε``. Other closures
        add nothing: one call (an ERM step, a step skipped on a non-finite gradient), a difference that is not
        finite, or an optimizer that is not a :class:`~sharpness.SAM` (whose repeated calls are not at ``w + ε``)."""
        total, seen = 0.0, 0
        for losses, size in closures if self._perturbs else ():
            if len(losses) == 2:
                rise = float(losses[1] - losses[0])
                if math.isfinite(rise):
                    total, seen = total + size * rise, seen + size
        return [total, seen]

    def _forward_backward(self, x: Tensor, y: Tensor, weight: float = 1.0) -> tuple[Tensor, Tensor]:
        """Zero the gradients, then forward and backward (of the loss times ``weight``) through :attr:`train_module`
        on ``(x, y)``; returns the loss and the (detached) outputs."""
        self.optimizer.zero_grad(set_to_none=True)
        outputs = self.train_module(x)
        loss = self.loss_fn(outputs, y)
        (loss * weight if weight != 1.0 else loss).backward()
        return loss, outputs.detach()

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    @_at_unperturbed_weights
    def evaluate(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """Mean loss (and accuracy for classification) of the model in eval mode; the mode is restored.

        It runs the unwrapped :attr:`model` in this process alone (no collective), so a single process can call it;
        except for a :attr:`sharded` model, which every process must evaluate together: each takes its part of every
        batch of ``eval_batch_size`` × processes examples (so all run the same number of forward passes) and the sums
        are all-reduced.
        """
        processes = self.world_size if self.sharded else 1
        was_training = self.model.training
        self.model.eval()
        try:
            loss_sum, correct = 0.0, 0
            for xb, yb in iterate_batches(x, y, self.eval_batch_size * processes, shuffle=False):
                xb, yb = shard(xb, yb, self.rank, processes)
                xb, yb = xb.to(self.device), yb.to(self.device)
                outputs = self.model(xb)
                loss_sum += float(self.loss_fn(outputs, yb, reduction="sum"))
                if self.data.task == "classification":
                    correct += int((outputs.argmax(1) == yb).sum())
        finally:
            self.model.train(was_training)
        if self.sharded:
            loss_sum, correct = all_reduce_sums([loss_sum, correct], self.device)
        metrics = {"loss": loss_sum / (len(y) * (1 if self.data.task == "classification" else y[0].numel()))}
        if self.data.task == "classification":
            metrics["acc"] = correct / len(y)
        return metrics

    def _epoch_record(self, totals: dict[str, float]) -> dict[str, Any]:
        state = self.state
        record: dict[str, Any] = {
            "epoch": state.epoch,
            "step": state.step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": totals["loss"],
        }
        if self.data.task == "classification":
            record["train_acc"] = totals["correct"] / totals["seen"]
        splits = [("test", self.data.x_test, self.data.y_test)]
        if self.data.x_val is not None:
            splits.insert(0, ("val", self.data.x_val, self.data.y_val))
        for split, x, y in splits if self.rank == 0 or self.sharded else ():  # evaluation: on rank 0 only
            for key, value in self.evaluate(x, y).items():
                record[f"{split}_{key}"] = value
        statistics = getattr(self.optimizer, "statistics", None)
        if statistics is not None:  # the policy's last figures: s, mu, sigma, c (AE-SAM) or p (RandomSAM)
            counted = ("steps", "sam_steps", "sam_fraction")
            record.update({f"policy_{k}": v for k, v in statistics().items() if k not in counted})
        record.update(
            passes=state.passes,
            sam_steps=state.multi_pass_steps,
            sam_fraction=state.sam_fraction,
            passes_per_step=state.passes_per_step,
            train_seconds=state.train_seconds,
            train_cpu_seconds=state.train_cpu_seconds,
        )
        if self._perturbs:  # NaN (null in metrics.jsonl) for an epoch without a SAM step
            record["sam_loss_rise"] = totals["sam_loss_rise"]
        return record

    @_at_unperturbed_weights
    def final_metrics(self) -> dict[str, Any]:
        """Eval-mode metrics on every split at the current weights, and the generalisation gap.

        ``gap`` is train accuracy − test accuracy for classification (train on the labels trained on, noisy
        or not), test loss − train loss for regression. With label noise, ``train_clean_acc`` is the accuracy
        on the true training labels. With a :class:`~sharpness.SAM`, ``sam_loss_rise`` is the last epoch's
        (the first-order sharpness estimate nearest the final weights; the per-epoch values are in the history).
        """
        metrics: dict[str, Any] = {}
        for key, value in self.evaluate(self.data.x_train, self.data.y_train).items():
            metrics[f"train_{key}"] = value
        if self.data.clean_y_train is not None:
            metrics["train_clean_acc"] = self.evaluate(self.data.x_train, self.data.clean_y_train)["acc"]
        if self.data.x_val is not None:
            metrics.update({f"val_{k}": v for k, v in self.evaluate(self.data.x_val, self.data.y_val).items()})
        metrics.update({f"test_{k}": v for k, v in self.evaluate(self.data.x_test, self.data.y_test).items()})
        if self.data.task == "classification":
            metrics["gap"] = metrics["train_acc"] - metrics["test_acc"]
        else:
            metrics["gap"] = metrics["test_loss"] - metrics["train_loss"]
        metrics.update(
            epochs=self.state.epoch,
            steps=self.state.step,
            passes=self.state.passes,
            sam_fraction=self.state.sam_fraction,
            passes_per_step=self.state.passes_per_step,
            train_seconds=self.state.train_seconds,
            train_cpu_seconds=self.state.train_cpu_seconds,
        )
        last = self.state.history[-1] if self.state.history else {}
        if "sam_loss_rise" in last:
            metrics["sam_loss_rise"] = last["sam_loss_rise"]
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit-identically.

        For a :attr:`sharded` model every process must call it (it gathers the full weights and optimizer state,
        :func:`~sharpness.train.distributed.full_state`); rank 0's holds them, in the layout of an unsharded run.
        """
        with unperturbed_weights(self.optimizer) as moves:
            if self.sharded:
                model_state, optimizer_state = full_state(self.model, self.optimizer)
            else:
                model_state, optimizer_state = self.model.state_dict(), self.optimizer.state_dict()
            if moves:  # the parameters are perturbed again on leaving: keep copies of w
                model_state = {key: value.clone() for key, value in model_state.items()}
        state = {
            "format": 1,
            "train_state": asdict(self.state),
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "shuffle_generator": self.shuffle_generator.get_state(),
            "augment_generator": self.augment_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "callbacks": self._callback_states(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    @_at_unperturbed_weights
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (usually read by :func:`sharpness.train.load_checkpoint`).

        Raises a one-line ``ValueError`` when the weights do not fit the model (a checkpoint of another run).
        """
        load_weights(self.model, state["model"], load=not self.sharded)
        if self.sharded:
            load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if (state["scheduler"] is None) != (self.scheduler is None):
            raise ValueError("the checkpoint and this run disagree on whether an LR scheduler is used")
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.shuffle_generator.set_state(state["shuffle_generator"])
        self.augment_generator.set_state(state["augment_generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        by_name = {type(callback).__name__: callback for callback in self.callbacks}
        missing = sorted(set(state["callbacks"]) - set(by_name))
        if missing and self.rank == 0:  # other ranks lack the callbacks that only rank 0 runs
            raise ValueError(f"the checkpoint has state for callbacks {missing} that this run lacks; add them")
        for name, callback_state in state["callbacks"].items():
            if name in by_name:
                by_name[name].load_state_dict(callback_state)
        self.state = TrainState(**state["train_state"])

    def _callback_states(self) -> dict[str, dict[str, Any]]:
        """The non-empty states of the callbacks, by class name (stateless ones may differ between sessions)."""
        states: dict[str, dict[str, Any]] = {}
        for callback in self.callbacks:
            callback_state = callback.state_dict()
            if not callback_state:
                continue
            name = type(callback).__name__
            if name in states:
                raise ValueError(f"two {name} callbacks have state; a checkpoint cannot tell them apart")
            states[name] = callback_state
        return states
