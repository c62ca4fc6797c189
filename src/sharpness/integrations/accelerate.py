"""SAM in a Hugging Face ``accelerate`` loop: :func:`sam_step` takes one step with the passes in the right contexts.

``accelerator.prepare`` wraps SAM in an ``AcceleratedOptimizer``, which forwards ``step(closure)`` but none of SAM's
own methods, and under fp16 it runs ``scaler.step(sam, closure)``, which unscales the gradients *before* the closure
has computed them. :func:`sam_step` works for every configuration (one process or DDP, fp32, bf16, fp16's
``GradScaler``, switching policies such as AE-SAM) with SAM's two-pass API::

    model = accelerator.prepare(model)  # DDP with several processes
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.1)  # SAM sees the DDP module
    optimizer, loader = accelerator.prepare(optimizer, loader)
    for x, y in loader:
        loss = sam_step(accelerator, model, optimizer, lambda: loss_fn(model(x), y))

See ``docs/integrations.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from sharpness.optim.sam import SAM

try:
    from accelerate import Accelerator
except ImportError as error:  # an optional extra
    raise ImportError(
        "sharpness.integrations.accelerate needs accelerate; install it with pip install 'sharpness[accelerate]'"
    ) from error

__all__ = ["sam_step", "unwrap_sam"]


def unwrap_sam(optimizer: Any) -> SAM:
    """The :class:`~sharpness.SAM` inside ``optimizer`` (an ``AcceleratedOptimizer`` holds it as ``.optimizer``)."""
    inner = optimizer
    while not isinstance(inner, SAM):
        inner = getattr(inner, "optimizer", None)
        if inner is None:
            raise TypeError(
                "sam_step needs a sharpness.SAM optimizer (or one prepared by accelerate), "
                f"got {type(optimizer).__name__}"
            )
    return inner


def _check_setup(accelerator: Accelerator, model: nn.Module, sam: SAM) -> None:
    """One-line errors for the setups that would silently compute something else, or hang."""
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError(
            f"sam_step: gradient_accumulation_steps={accelerator.gradient_accumulation_steps} is not supported (both "
            "SAM passes need the whole batch); use gradient_accumulation_steps=1 and a larger batch per process"
        )
    distributed = isinstance(model, DistributedDataParallel) and dist.get_world_size(model.process_group) > 1
    if (distributed or sam._sync is not None) and (sam._sync is None or sam._sync.ddp is not model):
        raise ValueError(
            "sam_step: model must be the DDP module SAM was built with (else the processes could perturb and decide "
            "differently); build SAM after model = accelerator.prepare(model), as SAM(model.parameters(), ..., "
            "model=model), and pass that model"
        )


def sam_step(accelerator: Accelerator, model: nn.Module, optimizer: Any, compute_loss: Callable[[], Tensor]) -> Tensor:
    """One step of a SAM-family optimizer prepared by ``accelerator``; returns the loss at ``w``, detached.

    ``compute_loss()`` runs the forward pass on the current batch and returns the loss; it is called at ``w`` and, on
    a SAM step, again at ``w + ε``. The step:

    1. zeroes the gradients; at ``w``: ``compute_loss()`` and ``accelerator.backward`` (which scales the loss under
       fp16), inside ``accelerator.no_sync(model)`` when SAM perturbs each replica with its own gradient (the default
       under DDP: the forward must be inside too, see ``docs/distributed.md``);
    2. asks the policy (``wants_sam_step``; one scalar all-reduce under DDP, so every process decides alike);
    3. a SAM step: ``with sam.perturbed(): accelerator.backward(compute_loss())`` (DDP all-reduces this gradient),
       then ``second_step``; an ERM step: ``erm_step`` (under DDP it averages the local gradient itself);
    4. with fp16's ``GradScaler`` (``accelerator.scaler``) the base step goes through ``scaler.step`` and
       ``scaler.update()`` follows, as in ``AcceleratedOptimizer.step``.

    A non-finite gradient in either pass skips the step (weights restored bitwise); an ``AcceleratedOptimizer``'s
    ``step_was_skipped`` then says so, so that a scheduler prepared by accelerate skips too. SAM must have been built
    with ``model=model`` (the prepared model) under DDP; gradient accumulation is not supported.
    """
    sam = unwrap_sam(optimizer)
    _check_setup(accelerator, model, sam)
    scaler = accelerator.scaler
    steps_before = sam.steps
    sam.zero_grad(set_to_none=True)
    local_first_pass = sam._sync is not None and sam._sync.local_first_pass
    with accelerator.no_sync(model) if local_first_pass else contextlib.nullcontext():
        loss = compute_loss()
        accelerator.backward(loss)
    if sam.wants_sam_step(scaler=scaler):
        with sam.perturbed(scaler=scaler) as perturbed:
            if perturbed:  # False: the first gradient is not finite and the step is skipped
                accelerator.backward(compute_loss())
        sam.second_step(zero_grad=True, scaler=scaler)
    else:
        sam.erm_step(zero_grad=True, scaler=scaler)
    if scaler is not None:
        scaler.update()
    if optimizer is not sam and hasattr(optimizer, "_is_overflow"):  # AcceleratedOptimizer.step_was_skipped
        optimizer._is_overflow = sam.steps == steps_before
    return loss.detach()
