"""The layout of :class:`~sharpness.optim.SAM`'s state dict, and loading it without a partial load.

Format 3 (this version) is torch's optimizer layout, with SAM's own state where torch's tools keep it::

    {"state": {index: {<base optimizer's per-parameter state>, "sam_g_v": LookSAM's g_v of that parameter}},
     "param_groups": [{<the group's hyper-parameters, SAM's sam_* keys>, "params": [...],
                       "sam": {"format": 3, "steps": ..., "sam_steps": ...,      # in the first group only
                               "policy": {"type": "Adaptive", <settings>, <state>},
                               "reuse": None | {"alpha": ..., "per_tensor": ...}}}, ...]}

``torch.distributed.checkpoint`` (``get_optimizer_state_dict`` / ``set_optimizer_state_dict``) keeps exactly
``state`` and ``param_groups``, converting parameter indices to names and resharding per-parameter state, so a
checkpoint written through it restores SAM's counters, policy and ``g_v`` too (``g_v`` of a sharded parameter is
saved as a ``DTensor`` sharded like it). Format 2 put SAM's state under a top-level ``"sam"`` key (``g_v`` by
parameter index), format 1 (version 0.1) was ``{"base_optimizer": <base state with bare rho/p/... keys>,
"sam": {...}}``; both still load.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sharpness.optim.groups import fill_group, upgrade_group
from sharpness.optim.sharding import is_sharded, local_shard

if TYPE_CHECKING:
    from sharpness.optim.sam import SAM

FORMAT = 3
G_V_KEY = "sam_g_v"


def state_dict_of(opt: SAM) -> dict[str, Any]:
    """The base optimizer's state dict with SAM's own state put in (see the module docstring)."""
    state = opt.base_optimizer.state_dict()
    sam = {
        "format": FORMAT,
        "steps": opt.steps,
        "sam_steps": opt.sam_steps,
        "policy": opt.policy.committed_state_dict(),  # a step in progress is not in a checkpoint
        "reuse": None,
    }
    if opt.reuse is not None:
        order = _param_order(opt)
        saved = opt.reuse.state_dict(order)
        sam["reuse"] = {"alpha": saved["alpha"], "per_tensor": saved["per_tensor"]}
        state["state"] = dict(state["state"])  # the per-parameter dicts are the live ones: copy what we extend
        for index, param in enumerate(order):  # every parameter, zeros where there is no g_v yet
            g_v = saved["g_v"].get(index)
            g_v = _global(_zeros_like_local(param) if g_v is None else g_v, param)
            state["state"][index] = {**state["state"].get(index, {}), G_V_KEY: g_v}
    state["param_groups"] = [{**state["param_groups"][0], "sam": sam}, *state["param_groups"][1:]]
    return state


def _zeros_like_local(param: Tensor) -> Tensor:
    """A zero ``g_v`` for ``param`` (what SAM computes on: its local shard, real view of a complex one).

    A zero ``g_v`` adds nothing to an ERM step, exactly as no ``g_v`` does; saving one for every parameter gives
    ``torch.distributed.checkpoint`` (which loads only the entries its template has) the same entries before the
    first SAM step as after it.
    """
    local = local_shard(param)
    local = torch.view_as_real(local) if local.is_complex() else local
    return torch.zeros_like(local.detach())


def _global(local: Tensor, param: Tensor) -> Tensor:
    """``g_v`` as it is saved: for a sharded parameter a ``DTensor`` laid out like it, else as is."""
    if not is_sharded(param):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())


def _param_order(opt: SAM) -> list[Any]:
    return [param for group in opt.param_groups for param in group["params"]]


def split_state_dict(state_dict: Any, base_defaults: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(base optimizer's state dict, SAM's state with "reuse"["g_v"] by index)`` of any format; else an error."""
    if isinstance(state_dict, Mapping) and "sam" in state_dict and "base_optimizer" in state_dict:  # format 1
        base = dict(state_dict["base_optimizer"])
        base["param_groups"] = [upgrade_group(g, base_defaults) for g in base["param_groups"]]
        return base, dict(state_dict["sam"])
    if not (isinstance(state_dict, Mapping) and {"state", "param_groups"} <= set(state_dict)):
        found = sorted(map(str, state_dict)) if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise ValueError(
            "SAM.load_state_dict(): not a sharpness.SAM state dict (expected keys 'state' and 'param_groups', "
            f"found {found}); to load a plain optimizer's state use opt.base_optimizer.load_state_dict(...)"
        )
    if "sam" in state_dict:  # format 2
        return {k: v for k, v in state_dict.items() if k != "sam"}, dict(state_dict["sam"])
    groups = [dict(group) for group in state_dict["param_groups"]]
    sam = groups[0].pop("sam", None) if groups else None
    per_param = {key: dict(entry) for key, entry in state_dict["state"].items()}
    # keys are whatever the saved groups list as "params" (indices; parameter names after DCP): g_v by position
    position = {key: i for i, key in enumerate(key for group in groups for key in group["params"])}
    g_v = {position[key]: local_shard(entry.pop(G_V_KEY)) for key, entry in per_param.items() if G_V_KEY in entry}
    base = {**state_dict, "state": per_param, "param_groups": groups}
    if sam is None:
        _warn_no_sam_state()
        return base, {}
    sam = dict(sam)
    if sam.get("reuse") is not None:
        sam["reuse"] = {**sam["reuse"], "g_v": g_v}
    return base, sam


def _warn_no_sam_state() -> None:
    warnings.warn(
        "SAM.load_state_dict(): the state dict has torch's layout but no SAM state (it is the state of a plain "
        "optimizer); the base optimizer's state and the groups are loaded, SAM's step counters, policy state and "
        "LookSAM's g_v are kept as they are",
        UserWarning,
        stacklevel=4,
    )


def load_sam_state(opt: SAM, base_state: dict[str, Any], sam_state: dict[str, Any]) -> None:
    """Check everything first (policy type, reuse), then load the base optimizer's state and SAM's."""
    if not sam_state:  # torch's layout without SAM's entry: the base optimizer's state only
        _load_base(opt, base_state)
        return
    if (sam_state.get("reuse") is None) != (opt.reuse is None):
        saved = "uses" if sam_state.get("reuse") is not None else "does not use"
        raise ValueError(
            f"SAM.load_state_dict(): the checkpoint {saved} LookSAM's reuse but this optimizer "
            f"{'does not' if opt.reuse is None else 'does'}; build it with the same preset as the checkpoint"
        )
    policy = copy.deepcopy(opt.policy)
    if "policy" in sam_state:
        policy.load_state_dict(sam_state["policy"])  # raises on another policy type, before anything changes
    reuse = copy.deepcopy(opt.reuse)
    _load_base(opt, base_state)
    if reuse is not None:
        reuse.load_state_dict(sam_state["reuse"], _param_order(opt))
    opt.policy, opt.reuse = policy, reuse
    opt.steps, opt.sam_steps = sam_state.get("steps", 0), sam_state.get("sam_steps", 0)


def _load_base(opt: SAM, base_state: dict[str, Any]) -> None:
    """The base optimizer's state and groups; groups saved without SAM's keys get SAM's defaults."""
    opt.base_optimizer.load_state_dict(base_state)
    opt._adopt_base_groups()
    for group in opt.param_groups:
        fill_group(group, opt.defaults)
