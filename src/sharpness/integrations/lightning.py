"""PyTorch Lightning integration: the SAM family (Foret et al., ICLR 2021, Algorithm 1) in a ``LightningModule``.

Return a :class:`~sharpness.optim.sam.SAM` (or a preset) from ``configure_optimizers`` and add
:class:`SAMCallback` to the ``Trainer``. In automatic optimization Lightning passes its closure (``training_step``
and ``backward``) to ``optimizer.step``, and SAM calls it twice: at ``w`` and at ``w + ε̂``. The callback

- hands SAM the module the strategy trains (``trainer.strategy.model``: under DDP the DistributedDataParallel
  wrapper the strategy builds after ``configure_optimizers``), so that the first pass runs under ``no_sync()`` with
  per-replica ε and one gradient all-reduce per step (see ``docs/distributed.md``), and normalisation layers'
  running statistics are kept out of the perturbed pass;
- replaces the ``"16-mixed"`` precision plugin by one that runs SAM's two passes with the ``GradScaler`` (Lightning's
  own calls the closure once and then ``scaler.step(optimizer)`` without it, which SAM cannot take a step from);
- refuses what cannot work, with an error naming the fix: ``accumulate_grad_batches > 1`` in automatic
  optimization, manual optimization calling ``opt.step()`` without a closure, a trainer without a SAM optimizer.

See ``docs/integrations.md`` (Lightning) for the guide.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.nn.parallel import DistributedDataParallel

from sharpness.checks import check_choice
from sharpness.optim.distributed import EPSILON_FROM, EpsilonFrom
from sharpness.optim.sam import SAM

__all__ = ["SAMCallback"]

_MANUAL_STEP_WITHOUT_CLOSURE = (
    "SAMCallback: in manual optimization SAM's opt.step() needs a closure that computes the loss and calls "
    "self.manual_backward(loss) (SAM calls it at w and at w + ε); pass opt.step(closure=closure), or use "
    "opt.optimizer.first_step()/second_step()"
)


class SAMCallback(Callback):
    """Connect the SAM optimizers of a ``LightningModule`` to the Lightning ``Trainer`` (see the module docstring).

    Args:
        epsilon_from: under DDP, ``"replica"`` (default): each replica perturbs with the gradient of its own batch
            shard (m-sharpness with m = the per-device batch, as Foret et al. ran SAM), one all-reduce per step;
            ``"global"``: every replica perturbs with the all-reduced gradient (two all-reduces per step).
    """

    def __init__(self, epsilon_from: EpsilonFrom = "replica") -> None:
        self.epsilon_from = check_choice(epsilon_from, "epsilon_from", EPSILON_FROM, owner="SAMCallback")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before the strategy is set up: install the SAM-aware plugin in place of ``"16-mixed"``'s."""
        plugin = trainer.strategy.precision_plugin
        if stage == "fit" and type(plugin) is MixedPrecision and plugin.scaler is not None:
            trainer.strategy.precision_plugin = _SAMMixedPrecision(
                plugin.precision, plugin.device, plugin.scaler, epsilon_from=self.epsilon_from
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the strategy wrapped the model: give it to every SAM optimizer (``SAM.attach_model``)."""
        sams = [optimizer for optimizer in trainer.optimizers if isinstance(optimizer, SAM)]
        if not sams:
            raise ValueError(
                "SAMCallback: configure_optimizers returned no sharpness SAM optimizer; return a sharpness.SAM "
                "(or a preset such as sharpness.LookSAM), or remove the callback"
            )
        _check_accumulation(trainer, pl_module)
        for optimizer in sams:
            optimizer.attach_model(trainer.strategy.model, epsilon_from=self.epsilon_from)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        """Check again on every batch: ``GradientAccumulationScheduler`` changes the setting between epochs."""
        _check_accumulation(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Manual optimization: ``opt.step()`` without a closure reaches SAM as a closure that does nothing."""
        if isinstance(optimizer, SAM) and not pl_module.automatic_optimization and not _has_gradients(optimizer):
            raise RuntimeError(_MANUAL_STEP_WITHOUT_CLOSURE)


def _check_accumulation(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Refuse ``accumulate_grad_batches > 1`` in automatic optimization.

    Lightning runs the micro-batches before the last one outside ``optimizer.step`` and passes only the last one's
    closure to it; SAM zeroes the gradients before each closure call (the gradient at ``w + ε̂`` must be of the
    same batch as ε̂), so the earlier micro-batches would silently be dropped.
    """
    if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
        raise ValueError(
            f"SAMCallback: accumulate_grad_batches={trainer.accumulate_grad_batches} cannot be used with SAM in "
            "automatic optimization (SAM evaluates its closure twice on one batch and Lightning hands it only the "
            "last micro-batch); use a larger batch_size, or manual optimization with SAM's first_step/second_step "
            "around your own accumulation loop"
        )


def _has_gradients(optimizer: SAM) -> bool:
    return any(p.grad is not None for group in optimizer.param_groups for p in group["params"])


class _SAMMixedPrecision(MixedPrecision):
    """``"16-mixed"`` for SAM: both passes under the ``GradScaler``, through SAM's two-step API.

    Lightning's :class:`MixedPrecision` calls the closure itself and then ``scaler.step(optimizer)`` without it
    (``GradScaler.step`` takes no closure), which leaves SAM a single gradient. For a SAM optimizer this plugin runs
    the first pass (under ``no_sync()`` for per-replica ε under DDP), asks the policy, perturbs, runs the closure
    again at ``w + ε̂``, unscales, runs Lightning's ``on_before_optimizer_step`` hooks and gradient clipping on the
    gradient the base optimizer will apply, and steps through the scaler. Other optimizers take the usual path.
    """

    def __init__(self, precision: Any, device: str, scaler: Any, *, epsilon_from: EpsilonFrom) -> None:
        super().__init__(precision, device, scaler)
        self.epsilon_from = epsilon_from

    def optimizer_step(  # type: ignore[override]
        self, optimizer: Any, model: pl.LightningModule, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        if not isinstance(optimizer, SAM):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        scaler = self.scaler
        optimizer.zero_grad(set_to_none=True)
        with self._first_pass(model):
            loss = closure()
        if loss is None:  # training_step returned None: Lightning skips the step (or no closure, in manual mode)
            if not model.automatic_optimization:
                raise RuntimeError(_MANUAL_STEP_WITHOUT_CLOSURE)
            return None
        if optimizer.wants_sam_step(scaler=scaler):
            if optimizer.first_step(zero_grad=True, scaler=scaler):
                closure()
            self._unscale_and_clip(model, optimizer)
            optimizer.second_step(scaler=scaler)
        else:
            self._unscale_and_clip(model, optimizer)
            optimizer.erm_step(scaler=scaler)
        scaler.update()
        return loss

    def _first_pass(self, model: pl.LightningModule) -> contextlib.AbstractContextManager[Any]:
        """``no_sync()`` of the strategy's DDP module for per-replica ε (what ``SAM.step`` does with a closure)."""
        wrapped = model.trainer.strategy.model
        if self.epsilon_from == "replica" and isinstance(wrapped, DistributedDataParallel):
            return wrapped.no_sync()
        return contextlib.nullcontext()

    def _unscale_and_clip(self, model: pl.LightningModule, optimizer: SAM) -> None:
        self.scaler.unscale_(optimizer)
        self._after_closure(model, optimizer)
