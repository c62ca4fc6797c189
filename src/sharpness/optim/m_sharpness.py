r"""m-SAM: a perturbation per micro-batch (Foret et al., 2021, §4.1 and App. C.3).

The batch is split into disjoint micro-batches of ``m`` examples, one closure each (it computes the mean loss of
its micro-batch and calls ``backward``, as for :meth:`SAM.step`). For every micro-batch ``j``, ``ε̂_j`` is built
from its own gradient ``g_j`` at ``w`` and the gradient is taken again at ``w + ε̂_j``; the base optimizer then
steps with the weighted mean

    g^{SAM} = Σ_j a_j ∇L_j(w + ε̂_j),      a_j = weights_j / Σ_k weights_k   (default: equal),

which is what data-parallel SAM computes when every accelerator perturbs with its own sub-batch of size ``m``.
Pass the micro-batch sizes as ``weights`` when they differ, so that the step is the gradient of the mean loss over
the whole batch. ``m`` = the batch size (one closure) is plain SAM; smaller ``m`` is what the paper found to
generalise better. Each micro-batch costs two forward/backward passes, so a step costs two passes over the batch,
as plain SAM does, but in smaller pieces. Normalisation statistics are updated by every micro-batch's first pass
(never by a perturbed pass, when SAM has the ``model``).

A micro-batch gradient that is not finite, at ``w`` or at ``w + ε̂_j``, skips the whole step (no base step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sharpness.checks import is_real

if TYPE_CHECKING:
    from sharpness.optim.sam import SAM

Closure = Callable[[], Any]


def micro_batch_step(opt: SAM, closures: Sequence[Closure], weights: Sequence[float] | None) -> Any:
    """One m-SAM step of ``opt`` (a :class:`~sharpness.optim.SAM` with the plain policy); returns the batch loss."""
    closures = list(closures)
    if not closures:
        raise ValueError("SAM.step_micro_batches(): closures is empty; give one closure per micro-batch")
    shares = micro_batch_shares(weights, len(closures))
    sums: dict[int, tuple[Tensor, Tensor]] = {}  # id(param) -> (param, Σ_j a_j ∇L_j(w + ε̂_j))
    loss = None
    for index, (closure, share) in enumerate(zip(closures, shares, strict=True)):
        closure = torch.enable_grad()(closure)
        micro_loss = opt._evaluate(closure, f"first (micro-batch {index}, at w)")
        buckets = opt._require_buckets("step_micro_batches")
        if opt._decision is None:
            opt._decide(buckets, 1.0)
        if not opt._perturb(buckets, 1.0):
            opt._skip(None)
            return micro_loss
        opt._phase = "perturbed"
        try:
            opt._evaluate(closure, f"second (micro-batch {index}, at w + ε)")
        except BaseException:
            opt._abandon_step()
            raise
        opt.restore()
        weighted = torch.as_tensor(micro_loss).detach() * share
        loss = weighted if loss is None else loss + weighted
        _accumulate(opt.param_groups, sums, share)
    opt.zero_grad(set_to_none=True)
    for param, total in sums.values():
        param.grad = total
    opt.step()  # phase "restored": finishes the SAM step (finiteness checked, hooks run)
    return loss


def _accumulate(param_groups: list[dict[str, Any]], sums: dict[int, tuple[Tensor, Tensor]], share: float) -> None:
    for group in param_groups:
        for param in group["params"]:
            if param.grad is None:
                continue
            entry = sums.get(id(param))
            if entry is None:
                sums[id(param)] = (param, param.grad.mul(share))
            else:
                entry[1].add_(param.grad, alpha=share)


def micro_batch_shares(weights: Sequence[float] | None, count: int) -> list[float]:
    """``weights`` normalised to sum 1 (equal shares when ``None``), checked against the number of closures."""
    if weights is None:
        return [1.0 / count] * count
    weights = list(weights)
    if len(weights) != count:
        raise ValueError(f"SAM.step_micro_batches(): {len(weights)} weights for {count} closures; give one each")
    if not all(is_real(w) and math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"SAM.step_micro_batches(): weights must be finite numbers >= 0 with a positive sum (e.g. the "
            f"micro-batch sizes), got {weights}"
        )
    total = float(sum(weights))
    return [float(w) / total for w in weights]
