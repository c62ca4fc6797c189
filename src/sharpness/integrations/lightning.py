"""PyTorch Lightning integration: the SAM family (Foret et al., ICLR 2021, Algorithm 1) in a ``LightningModule``.

Return a :class:`~sharpness.optim.sam.SAM` (or a preset) from ``configure_optimizers`` and add
:class:`SAMCallback` to the ``Trainer``. In automatic optimization Lightning passes its closure (``training_step``
and ``backward``) to ``optimizer.step``, and SAM calls it twice: at ``w`` and at ``w + ε̂``. The callback

- hands SAM the module the strategy trains (``trainer.strategy.model``: under DDP the DistributedDataParallel
  wrapper the strategy builds after ``configure_optimizers``), so that the first pass runs under ``no_sync()`` with
  per-replica ε and one gradient all-reduce per step (see ``docs/distributed.md``), and normalisation layers'
  running statistics are kept out of the perturbed pass;
- routes the precision plugin's ``optimizer_step`` for a SAM optimizer through SAM's two-step API when Lightning's
  own would not work: under ``"16-mixed"``'s ``GradScaler`` (Lightning calls the closure once, then
  ``scaler.step(optimizer)`` without it) and with ``accumulate_grad_batches = k > 1`` (Lightning back-propagates
  the window's earlier micro-batches outside ``optimizer.step`` and hands it a closure of the last one only). With
  accumulation one step is Algorithm 1 over the whole window, as in the Hugging Face ``SAMTrainer``:

      g  = Σ_i ∇ L_i(w) / k           Lightning's own forward/backward on every micro-batch i of the window
      ε̂  = ρ g / ||g||₂               from the accumulated g (SAM step only)
      g' = Σ_i ∇ L_i(w + ε̂) / k       the window replayed through training_step and the strategy's backward
      w ← base step with g'            w restored bitwise first (with g on an ERM step: nothing is replayed)

- refuses what cannot work, with an error naming the fix: accumulation with a precision plugin that runs the
  optimizer step itself (DeepSpeed, FSDP, XLA) or a ``training_step`` taking ``dataloader_iter``, manual
  optimization calling ``opt.step()`` without a closure, a trainer without a SAM optimizer.

See ``docs/integrations.md`` (Lightning) for the guide.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loops.optimization.automatic import Closure
from lightning.pytorch.loops.utilities import _block_parallel_sync_behavior
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
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
MicroBatch = tuple[Any, int]  # (batch on the device, batch_idx) of one micro-batch of the accumulation window


class SAMCallback(Callback):
    """Connect the SAM optimizers of a ``LightningModule`` to the Lightning ``Trainer`` (see the module docstring).

    Args:
        epsilon_from: under DDP, ``"replica"`` (default): each replica perturbs with the gradient of its own batch
            shard (m-sharpness with m = the per-device batch, as Foret et al. ran SAM), one all-reduce per step;
            ``"global"``: every replica perturbs with the all-reduced gradient (two all-reduces per step).
    """

    def __init__(self, epsilon_from: EpsilonFrom = "replica") -> None:
        self.epsilon_from = check_choice(epsilon_from, "epsilon_from", EPSILON_FROM, owner="SAMCallback")
        self._window: list[MicroBatch] = []  # the current accumulation window's micro-batches so far

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before the strategy is set up: route the precision plugin's ``optimizer_step`` (see :class:`_SAMStep`)."""
        plugin = trainer.strategy.precision_plugin
        if stage == "fit" and type(plugin).optimizer_step in (Precision.optimizer_step, MixedPrecision.optimizer_step):
            plugin.optimizer_step = _SAMStep(self, plugin)  # an instance attribute: this plugin object only

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the strategy wrapped the model: give it to every SAM optimizer (``SAM.attach_model``)."""
        sams = [optimizer for optimizer in trainer.optimizers if isinstance(optimizer, SAM)]
        if not sams:
            raise ValueError(
                "SAMCallback: configure_optimizers returned no sharpness SAM optimizer; return a sharpness.SAM "
                "(or a preset such as sharpness.LookSAM), or remove the callback"
            )
        self._window = []
        _check_accumulation(trainer, pl_module)
        for optimizer in sams:
            optimizer.attach_model(trainer.strategy.model, epsilon_from=self.epsilon_from)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        """Keep the accumulation window's micro-batches (for the replay at ``w + ε̂``); check the setting again
        (``GradientAccumulationScheduler`` changes it between epochs).

        A window starts where Lightning zeroes the gradients, at ``batch_idx % accumulate_grad_batches == 0``.
        """
        if not _check_accumulation(trainer, pl_module):
            return
        if idx % trainer.accumulate_grad_batches == 0:
            self._window = []
        self._window.append((batch, idx))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Manual optimization: ``opt.step()`` without a closure reaches SAM as a closure that does nothing."""
        if isinstance(optimizer, SAM) and not pl_module.automatic_optimization and not _has_gradients(optimizer):
            raise RuntimeError(_MANUAL_STEP_WITHOUT_CLOSURE)

    def _take_earlier_micro_batches(self) -> list[MicroBatch]:
        """The window's micro-batches before the last one (the last is the closure Lightning passes); clears it."""
        if not self._window:
            raise RuntimeError(
                "SAMCallback: an optimizer step with accumulate_grad_batches > 1 but no micro-batch was recorded "
                "(on_train_batch_start did not run); SAM cannot replay the accumulation window"
            )
        window, self._window = self._window, []
        return window[:-1]


def _check_accumulation(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether automatic optimization accumulates (``accumulate_grad_batches > 1``); refuses what cannot replay.

    SAM's second pass must see the *same* micro-batches as ε̂, so the window is replayed at ``w + ε̂``: the
    precision plugin's ``optimizer_step`` must be the routed one, and ``training_step`` must take a batch.
    """
    if not (pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1):
        return False
    plugin, k = trainer.strategy.precision_plugin, trainer.accumulate_grad_batches
    if not isinstance(plugin.__dict__.get("optimizer_step"), _SAMStep):
        raise ValueError(
            f"SAMCallback: accumulate_grad_batches={k} is not supported with the {type(plugin).__name__} precision "
            "plugin (it runs the optimizer step itself, so SAM cannot replay the window at w + ε); use a larger "
            "batch_size or more devices with accumulate_grad_batches=1"
        )
    if is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True):
        raise ValueError(
            f"SAMCallback: accumulate_grad_batches={k} needs a training_step(batch, batch_idx) (SAM replays the "
            "window's batches at w + ε); a training_step taking dataloader_iter cannot be replayed: use a batch "
            "argument, or accumulate_grad_batches=1"
        )
    return True


def _has_gradients(optimizer: SAM) -> bool:
    return any(p.grad is not None for group in optimizer.param_groups for p in group["params"])


class _SAMStep:
    """A precision plugin's ``optimizer_step`` (Lightning's ``Precision`` or ``MixedPrecision``) for SAM.

    For a SAM optimizer under the plugin's ``GradScaler`` (``"16-mixed"``, automatic or manual optimization), or
    in automatic optimization with ``accumulate_grad_batches > 1`` (any supported precision), it takes the step
    with :func:`_sam_step`; otherwise it is the plugin's own ``optimizer_step`` (with ``32-true``/``bf16-mixed``
    and no accumulation that passes Lightning's closure to ``SAM.step``, which calls it at ``w`` and ``w + ε̂``).
    A class rather than a function so that the plugin stays picklable.
    """

    def __init__(self, callback: SAMCallback, plugin: Precision) -> None:
        self.callback, self.plugin = callback, plugin

    def __call__(self, optimizer: Any, model: pl.LightningModule, closure: Callable[[], Any], **kwargs: Any) -> Any:
        plugin = self.plugin
        scaler = getattr(plugin, "scaler", None)
        accumulating = model.automatic_optimization and model.trainer.accumulate_grad_batches > 1
        if not isinstance(optimizer, SAM) or (scaler is None and not accumulating):
            return type(plugin).optimizer_step(plugin, optimizer, model=model, closure=closure, **kwargs)
        earlier = self.callback._take_earlier_micro_batches() if accumulating else None
        return _sam_step(plugin, optimizer, model, closure, earlier, self.callback.epsilon_from)


def _sam_step(
    plugin: Precision,
    optimizer: SAM,
    model: pl.LightningModule,
    closure: Callable[[], Any],
    earlier: list[MicroBatch] | None,
    epsilon_from: EpsilonFrom,
) -> Any:
    """One optimizer step (Foret et al. 2021, Algorithm 1) over Lightning's accumulation window, via SAM's two-step
    API; returns the loss at ``w`` of the last micro-batch (``None``: ``training_step`` skipped it, no step).

    With the window's micro-batches ``i`` (``earlier`` and the last one, ``closure``; ``earlier`` is ``None``
    without accumulation, where SAM zeroes the gradients first) and Lightning's ``k = accumulate_grad_batches``:

        g  = Σ_i ∇ L_i(w) / k          the earlier terms are already in ``.grad``; ``closure`` adds the last
        ε̂  = ρ g / ||g||₂              (or the optimizer's ASAM / p-norm ascent), only if ``wants_sam_step``
        g' = Σ_i ∇ L_i(w + ε̂) / k      ``earlier`` replayed by :func:`_replay`, then ``closure`` again
        w  ← base step with g'          ``w`` restored bitwise before; with ``g`` on an ERM step

    Under a ``GradScaler`` every backward is scaled by the same factor; SAM removes it for ``||g||`` and the
    policy, and only the gradient the base optimizer applies is unscaled and clipped. Without one, clipping and
    ``on_before_optimizer_step`` act after each pass (both g and g' clipped), as when SAM calls Lightning's
    closure itself. Under DDP with ``epsilon_from="replica"`` the first pass of the last micro-batch runs under
    ``no_sync()`` (Lightning ran the earlier ones so), so g is this replica's and g' is all-reduced once.
    """
    scaler = getattr(plugin, "scaler", None)
    if earlier is None:
        optimizer.zero_grad(set_to_none=True)
    with _first_pass(model.trainer, epsilon_from):
        loss = closure()
    if loss is None:  # training_step returned None: Lightning skips the step (or no closure, in manual mode)
        if not model.automatic_optimization:
            raise RuntimeError(_MANUAL_STEP_WITHOUT_CLOSURE)
        return None
    if scaler is None:
        plugin._after_closure(model, optimizer)  # on_before_optimizer_step hooks, clipping of g
    sam_step = optimizer.wants_sam_step(scaler=scaler)
    applied = False
    if sam_step:
        with optimizer.perturbed(scaler=scaler) as applied:
            if applied:  # False: the gradient at w is not finite, second_step skips the step
                _replay(model.trainer, optimizer, earlier or [])
                closure()
    if scaler is not None:
        scaler.unscale_(optimizer)
        plugin._after_closure(model, optimizer)
    elif applied:
        plugin._after_closure(model, optimizer)  # the same for g'
    if sam_step:
        optimizer.second_step(scaler=scaler)
    else:
        optimizer.erm_step(scaler=scaler)
    if scaler is not None:
        scaler.update()
    return loss


def _first_pass(trainer: pl.Trainer, epsilon_from: EpsilonFrom) -> contextlib.AbstractContextManager[Any]:
    """``no_sync()`` of the strategy's DDP module for per-replica ε (what ``SAM.step`` does with a closure)."""
    wrapped = trainer.strategy.model
    if epsilon_from == "replica" and isinstance(wrapped, DistributedDataParallel):
        return wrapped.no_sync()
    return contextlib.nullcontext()


def _replay(trainer: pl.Trainer, optimizer: SAM, earlier: list[MicroBatch]) -> None:
    """Add ``Σ_i ∇ L_i(w + ε̂) / k`` over the window's earlier micro-batches to ``.grad``, as Lightning's own first
    pass did: its automatic loop's ``training_step`` (hooks, autocast, ``loss / k``) and ``backward`` (the
    strategy's: ``on_before_backward``/``on_after_backward``, the GradScaler's scaling) under DDP's ``no_sync``."""
    epoch_loop = trainer.fit_loop.epoch_loop
    loop = epoch_loop.automatic_optimization
    backward_fn = loop._make_backward_fn(optimizer)
    for batch, batch_idx in earlier:
        kwargs = epoch_loop._build_kwargs(OrderedDict(), batch, batch_idx)
        with _block_parallel_sync_behavior(trainer.strategy, block=True):
            Closure(step_fn=loop._make_step_fn(kwargs), backward_fn=backward_fn)()
