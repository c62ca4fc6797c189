"""SAM's view of the gradients: parameters grouped into buckets that one ``torch._foreach_*`` call can process."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sharpness.optim.ascent import Perturbation
from sharpness.optim.groups import fill_group
from sharpness.optim.sharding import ShardReduce, is_sharded, local_shard


@dataclass
class Bucket:
    """Parameters of one group that have a gradient and share a device, a dtype and whether ASAM rescales them.

    ``params`` and ``grads`` are the tensors the arithmetic runs on: the parameters themselves, for complex
    parameters their real views (``torch.view_as_real``: a complex number is two real coordinates, as torch's
    optimizers treat it), for sharded (FSDP2 ``DTensor``) parameters this rank's local shards. ``owners`` are the
    parameters themselves (keys of per-parameter state).
    """

    key: tuple[Any, ...]  # (group index, device, dtype, scaled)
    group: dict[str, Any]
    scaled: bool
    owners: list[Tensor] = field(default_factory=list)
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    scale: list[Tensor] | None = None  # ASAM's T_w = |w| + eta for the scaled bucket


def collect_buckets(param_groups: list[dict[str, Any]], defaults: Mapping[str, Any]) -> list[Bucket]:
    """Bucket every parameter that has a (non-empty) gradient; groups lacking SAM keys get ``defaults``.

    Zero-size parameters (and empty local shards) are left out: they have no direction to perturb and nothing
    to measure (the base optimizer still steps them).
    """
    buckets: dict[tuple[Any, ...], Bucket] = {}
    for index, group in enumerate(param_groups):
        fill_group(group, defaults)
        scaling = Perturbation.from_group(group).scaling  # ASAM's T_w, on the tensors in its scope
        for param in group["params"]:
            if param.grad is None:
                continue
            tensor, grad = _arithmetic_views(param)
            if tensor.numel() == 0:
                continue
            scaled = scaling is not None and scaling.rescales(param)
            key = (index, tensor.device, tensor.dtype, scaled)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = Bucket(key, group, scaled)
            bucket.owners.append(param)
            bucket.params.append(tensor)
            bucket.grads.append(grad)
    _check_one_device(buckets)
    return list(buckets.values())


class BucketCache:
    """:func:`collect_buckets` remembered between steps.

    The layout (which parameter goes to which bucket, and its arithmetic view) is rebuilt only when it could have
    changed: the groups, their parameters, which of them hold a gradient, a parameter's dtype or device, or ASAM's
    settings. Otherwise a call only collects the current gradient tensors (each backward may create new ones), which
    saves most of the per-parameter work on every step. Layouts with sharded (``DTensor``) or complex parameters are
    not remembered: their views are taken afresh each step.
    """

    def __init__(self) -> None:
        self._signature: tuple[Any, ...] | None = None
        self._layout: list[Bucket] = []

    def collect(self, param_groups: list[dict[str, Any]], defaults: Mapping[str, Any]) -> list[Bucket]:
        """The buckets of :func:`collect_buckets` (fresh :class:`Bucket` objects, current gradients)."""
        signature = _layout_signature(param_groups, defaults)
        if signature != self._signature:
            buckets = collect_buckets(param_groups, defaults)
            cacheable = all(owner is tensor for b in buckets for owner, tensor in zip(b.owners, b.params, strict=True))
            self._signature, self._layout = (signature if cacheable else None), buckets
            return buckets
        return [Bucket(b.key, b.group, b.scaled, b.owners, b.params, [p.grad for p in b.owners]) for b in self._layout]


def _layout_signature(param_groups: list[dict[str, Any]], defaults: Mapping[str, Any]) -> tuple[Any, ...]:
    """What the bucket layout depends on (the groups are filled and validated on the way, as for a rebuild)."""
    signature: list[Any] = []
    for group in param_groups:
        fill_group(group, defaults)
        params = group["params"]
        signature += [
            id(group),
            group["sam_adaptive"],
            group["sam_adaptive_scope"],
            tuple(map(id, params)),
            tuple(p.grad is None for p in params),
            tuple(p.dtype for p in params),
            tuple(p.device for p in params),
        ]
    return tuple(signature)


def _arithmetic_views(param: Tensor) -> tuple[Tensor, Tensor]:
    """The tensors SAM computes on for ``param`` and its gradient: local shards, real views of complex ones."""
    tensor, grad = param, param.grad
    if grad.is_sparse:
        raise ValueError(
            f"SAM does not support sparse gradients (parameter of shape {tuple(param.shape)}); "
            "use dense gradients, e.g. nn.Embedding(..., sparse=False)"
        )
    tensor, grad = local_shard(tensor), local_shard(grad)
    if tensor.is_complex():
        tensor, grad = torch.view_as_real(tensor), torch.view_as_real(grad)
    return tensor, grad


def _check_one_device(buckets: dict[tuple[Any, ...], Bucket]) -> None:
    devices = {key[1] for key in buckets}
    if len(devices) > 1:
        raise ValueError(
            f"SAM: parameters are on several devices ({', '.join(sorted(map(str, devices)))}); the "
            "perturbation needs one global gradient norm. Put all parameters on one device, or use one "
            "SAM optimizer per device"
        )


def shard_reduce(param_groups: list[dict[str, Any]]) -> ShardReduce | None:
    """The reduction over ranks when the parameters are sharded (FSDP2), ``None`` when none is; mixing is an error."""
    params = [param for group in param_groups for param in group["params"]]
    sharded = [param for param in params if is_sharded(param)]
    if not sharded:
        return None
    if len(sharded) != len(params):
        raise ValueError(
            "SAM: some parameters are sharded (DTensor, fully_shard) and some are not; shard the whole model "
            "(fully_shard on the root module too) so that one global gradient norm can be formed"
        )
    return ShardReduce.of(sharded[0])


def all_gradients(buckets: list[Bucket]) -> list[list[Tensor]]:
    """The gradient lists of ``buckets`` (the shape the norm functions take)."""
    return [bucket.grads for bucket in buckets]


def held_gradients(param_groups: list[dict[str, Any]]) -> list[Tensor]:
    """Every gradient the parameters hold now (a cheap list, without the bucket layout)."""
    return [param.grad for group in param_groups for param in group["params"] if param.grad is not None]


def flat_gradients(buckets: list[Bucket]) -> list[Tensor]:
    """Every gradient of ``buckets`` in one list (the shape the finiteness check and the averaging take)."""
    return [grad for bucket in buckets for grad in bucket.grads]


def first_nonempty_gradient(param_groups: list[dict[str, Any]]) -> Tensor | None:
    """The first gradient with at least one element, or ``None``."""
    for group in param_groups:
        for param in group["params"]:
            if param.grad is not None and param.grad.numel() > 0:
                return param.grad
    return None
