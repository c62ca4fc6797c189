"""SAM-family optimizers in Hugging Face ``transformers.Trainer`` (docs/integrations.md).

Pass any :class:`~sharpness.optim.sam.SAM` the standard way, ``optimizers=(sharpness.SAM(...), None)``, to
:class:`SAMTrainer`, or mix :class:`SAMTrainerMixin` into your own ``Trainer`` subclass. Each optimizer step is then
Foret et al. 2021's Algorithm 1 over the whole gradient-accumulation window:

1. the Trainer's own forward/backward passes at ``w`` accumulate ``g`` over the window's micro-batches;
2. at the window's last micro-batch SAM asks its policy (``wants_sam_step``); for a SAM step it moves to
   ``w + ε̂``, ``ε̂ = ρ g / ||g||``, replays the window's micro-batches there (same loss scaling,
   ``num_items_in_batch``, autocast and GradScaler) and restores ``w``;
3. the Trainer clips the gradient it holds, the one at ``w + ε̂`` (at ``w`` on an ERM step), and calls
   ``optimizer.step()`` (``scaler.step`` under fp16), which is the base optimizer's step.

Under DDP every pass's last micro-batch is all-reduced, so every replica perturbs with the *global* gradient.
"""

from __future__ import annotations

import contextlib
from typing import Any

import transformers
from torch import Tensor, nn
from torch.optim import Optimizer

from sharpness.integrations.accelerate import unwrap_sam
from sharpness.optim.sam import SAM

Window = list[tuple[dict[str, Any], Any]]  # (inputs, num_items_in_batch) of each micro-batch in the window


class SAMTrainerMixin:
    """Makes a ``transformers.Trainer`` subclass take SAM steps; list it first: ``class T(SAMTrainerMixin, MyTrainer)``.

    The logic lives in :meth:`training_step`, which calls the next class's ``training_step`` for every pass, so a
    custom ``training_step`` or ``compute_loss`` of yours is used for both passes. The optimizer must be a
    :class:`~sharpness.optim.sam.SAM` (any preset: ``sharpness.AESAM``, ``sharpness.LookSAM``, ...), passed as
    ``optimizers=(sam, scheduler_or_None)``; anything else (also the Trainer's default AdamW) is refused when
    training starts. DeepSpeed and FSDP are refused at construction (they own the backward pass or shard the
    parameters; SAM's perturbation is not wired to them here). Logs ``sam_fraction``, ``sam_steps``,
    ``sam_grad_norm`` (``||g||`` at ``w`` of the last SAM step) and the policy's figures as ``sam_policy_*``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        if self.is_deepspeed_enabled:
            raise ValueError(
                f"{name}: DeepSpeed is not supported (its engine runs backward and the optimizer step, so SAM's second "
                "pass cannot be inserted); drop the deepspeed argument and use DDP (torchrun) instead"
            )
        if self.is_fsdp_enabled:
            raise ValueError(
                f"{name}: FSDP is not supported (SAM would see sharded gradients it was not built for); drop the fsdp "
                "argument and use DDP (torchrun) instead"
            )
        self._sam_window: Window = []

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Optimizer:
        """The Trainer's optimizer (the one passed in, or built from the arguments), refused unless it is a SAM."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if not isinstance(optimizer, SAM):
            raise TypeError(
                f"{type(self).__name__}: the optimizer must be a sharpness.SAM (or a preset such as sharpness.AESAM), "
                f"got {type(optimizer).__name__}; pass optimizers=(sharpness.SAM(model.parameters(), "
                "torch.optim.AdamW, rho=0.05, lr=5e-5), None), or use transformers.Trainer for plain training"
            )
        return optimizer

    def create_scheduler(self, num_training_steps: int, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's LR scheduler; also tells SAM's policy the planned number of steps (AE-SAM's schedule)."""
        self._sam().set_total_steps(num_training_steps)
        return super().create_scheduler(num_training_steps, *args, **kwargs)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; micro-batches held from an interrupted earlier call are dropped first."""
        self._sam_window = []
        return super().train(*args, **kwargs)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """The Trainer's pass at ``w`` on one micro-batch; after the window's last one, SAM's pass at ``w + ε̂``.

        Returns the loss at ``w`` (what the Trainer logs as ``loss``).
        """
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._sam_window.append((inputs, num_items_in_batch))
        if self.accelerator.sync_gradients:  # the Trainer steps the optimizer after this micro-batch
            window, self._sam_window = self._sam_window, []
            self._sam_second_pass(model, window)
        return loss

    def _sam_second_pass(self, model: nn.Module, window: Window) -> None:
        """Ascend from the accumulated gradient and replay ``window`` at ``w + ε̂`` (Foret et al. 2021, Alg. 1).

        Leaves ``w`` restored and the gradient at ``w + ε̂`` in ``.grad``: the Trainer then clips it and calls
        ``optimizer.step()`` (or ``scaler.step``), which finishes SAM's step with the base optimizer. On an ERM step
        of a switching policy nothing happens here: that ``step()`` is the base step on the gradient at ``w``.
        """
        sam, scaler = self._sam(), self.accelerator.scaler
        sam.discard_step()  # a step the GradScaler skipped (inf/NaN) is still open: SAM must not reuse its decision
        if not sam.wants_sam_step(scaler=scaler):
            return
        with sam.perturbed(scaler=scaler) as applied:
            if not applied:  # the gradient at w is not finite: step() / scaler.step skips this step
                return
            for i, (inputs, num_items_in_batch) in enumerate(window):
                last = i == len(window) - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's ``log``; training logs (those with ``loss``) get SAM's figures added."""
        if "loss" in logs:
            sam = self._sam()
            statistics = sam.statistics()
            logs["sam_fraction"] = statistics["sam_fraction"]
            logs["sam_steps"] = statistics["sam_steps"]
            logs["sam_grad_norm"] = sam.last_grad_norm
            logs.update({f"sam_policy_{key}": value for key, value in sam.policy.statistics().items()})
        super().log(logs, *args, **kwargs)

    def _sam(self) -> SAM:
        """The SAM inside the Trainer's optimizer (accelerate wraps it in an ``AcceleratedOptimizer``)."""
        return unwrap_sam(self.optimizer)


class SAMTrainer(SAMTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` taking SAM-family steps: see :class:`SAMTrainerMixin` and the module docstring."""
