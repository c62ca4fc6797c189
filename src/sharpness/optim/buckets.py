"""SAM's view of the gradients: parameters grouped into buckets that one ``torch._foreach_*`` call can process."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sharpness.optim.groups import fill_group


@dataclass
class Bucket:
    """Parameters of one group that have a gradient and share a device, a dtype and whether ASAM rescales them.

    ``params`` and ``grads`` are the tensors the arithmetic runs on: the parameters themselves, or for complex
    parameters their real views (``torch.view_as_real``: a complex number is two real coordinates, as torch's
    optimizers treat it). ``owners`` are the parameters themselves (keys of per-parameter state).
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

    Zero-size parameters are left out: they have no direction to perturb and nothing to measure (the base
    optimizer still steps them).
    """
    buckets: dict[tuple[Any, ...], Bucket] = {}
    for index, group in enumerate(param_groups):
        fill_group(group, defaults)
        scale_all = group["sam_adaptive"] and group["sam_adaptive_scope"] == "all"
        for param in group["params"]:
            grad = param.grad
            if grad is None or param.numel() == 0:
                continue
            _check_dense(param, grad)
            scaled = scale_all or (group["sam_adaptive"] and param.ndim >= 2)
            tensor, grad = (
                (torch.view_as_real(param), torch.view_as_real(grad)) if param.is_complex() else (param, grad)
            )
            key = (index, tensor.device, tensor.dtype, scaled)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = Bucket(key, group, scaled)
            bucket.owners.append(param)
            bucket.params.append(tensor)
            bucket.grads.append(grad)
    _check_one_device(buckets)
    return list(buckets.values())


def _check_dense(param: Tensor, grad: Tensor) -> None:
    if grad.is_sparse:
        raise ValueError(
            f"SAM does not support sparse gradients (parameter of shape {tuple(param.shape)}); "
            "use dense gradients, e.g. nn.Embedding(..., sparse=False)"
        )


def _check_one_device(buckets: dict[tuple[Any, ...], Bucket]) -> None:
    devices = {key[1] for key in buckets}
    if len(devices) > 1:
        raise ValueError(
            f"SAM: parameters are on several devices ({', '.join(sorted(map(str, devices)))}); the "
            "perturbation needs one global gradient norm. Put all parameters on one device, or use one "
            "SAM optimizer per device"
        )


def all_gradients(buckets: list[Bucket]) -> list[list[Tensor]]:
    """The gradient lists of ``buckets`` (the shape the norm functions take)."""
    return [bucket.grads for bucket in buckets]


def held_gradients(param_groups: list[dict[str, Any]]) -> list[Tensor]:
    """Every gradient the parameters hold now (a cheap list, without the bucket layout)."""
    return [param.grad for group in param_groups for param in group["params"] if param.grad is not None]


def first_nonempty_gradient(param_groups: list[dict[str, Any]]) -> Tensor | None:
    """The first gradient with at least one element, or ``None``."""
    for group in param_groups:
        for param in group["params"]:
            if param.grad is not None and param.grad.numel() > 0:
                return param.grad
    return None
