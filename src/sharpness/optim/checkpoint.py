"""The layout of :class:`~sharpness.optim.SAM`'s state dict, and loading it without a partial load.

Format 2 (this version) is torch's optimizer layout with one extra key::

    {"state": {...}, "param_groups": [...],      # the base optimizer's state_dict (SAM's sam_* keys in the groups)
     "sam": {"format": 2, "steps": ..., "sam_steps": ..,
             "policy": {"type": "Adaptive", <settings>, <state>},
             "reuse": None | {"alpha": ..., "per_tensor": ..., "g_v": {param index: tensor}}}}

so tools that expect torch's layout (``torch.distributed.checkpoint``'s ``get_optimizer_state_dict``) read it.
Format 1 (version 0.1) was ``{"base_optimizer": <base state_dict with bare rho/p/... keys>, "sam": {...}}``; it
is still loaded.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sharpness.optim.groups import fill_group, upgrade_group

if TYPE_CHECKING:
    from sharpness.optim.sam import SAM

FORMAT = 2


def sam_state_dict(opt: SAM) -> dict[str, Any]:
    """SAM's own state: the counters, the policy's and the reuse's settings and state."""
    return {
        "format": FORMAT,
        "steps": opt.steps,
        "sam_steps": opt.sam_steps,
        "policy": opt.policy.committed_state_dict(),  # a step in progress is not in a checkpoint
        "reuse": opt.reuse.state_dict(_param_order(opt)) if opt.reuse is not None else None,
    }


def _param_order(opt: SAM) -> list[Any]:
    return [param for group in opt.param_groups for param in group["params"]]


def split_state_dict(state_dict: Any, base_defaults: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(base optimizer's state dict, SAM's state)`` of a format-1 or format-2 SAM state dict; else an error."""
    if isinstance(state_dict, Mapping) and "sam" in state_dict and "base_optimizer" in state_dict:  # format 1
        base = dict(state_dict["base_optimizer"])
        base["param_groups"] = [upgrade_group(g, base_defaults) for g in base["param_groups"]]
        return base, dict(state_dict["sam"])
    if isinstance(state_dict, Mapping) and {"state", "param_groups"} <= set(state_dict):
        base = {key: value for key, value in state_dict.items() if key != "sam"}
        if "sam" not in state_dict:
            warnings.warn(
                "SAM.load_state_dict(): the state dict has torch's layout but no 'sam' entry (torch.distributed."
                "checkpoint keeps only 'state' and 'param_groups'); the base optimizer's state and the groups are "
                "loaded, SAM's step counters, policy state and LookSAM's g_v are kept as they are. Save and load "
                "opt.state_dict()['sam'] alongside to restore them",
                UserWarning,
                stacklevel=3,
            )
            return base, {}
        return base, dict(state_dict["sam"])
    found = sorted(map(str, state_dict)) if isinstance(state_dict, Mapping) else type(state_dict).__name__
    raise ValueError(
        "SAM.load_state_dict(): not a sharpness.SAM state dict (expected keys 'state', 'param_groups' and "
        f"'sam', found {found}); to load a plain optimizer's state use opt.base_optimizer.load_state_dict(...)"
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
