"""SAM as a torch optimizer (issue 10, A9): torch's state-dict layout, optimizer hooks in every API, one source of
settings on load, clear errors for another preset's checkpoint, version 0.1's layout, torch.distributed.checkpoint.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sharpness import AESAM, SAM, LookSAM, PeriodicSAM


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, generator=gen, dtype=torch.float64), torch.randn(8, 2, generator=gen, dtype=torch.float64)


def _backward(model: nn.Module, x, y) -> torch.Tensor:
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss


def _closure_step(opt, model, x, y, scaler):
    opt.step(lambda: _backward(model, x, y))


def _two_step(opt, model, x, y, scaler):
    _backward(model, x, y)
    opt.first_step(zero_grad=True, scaler=scaler)
    _backward(model, x, y)
    opt.second_step(zero_grad=True, scaler=scaler)


def _context(opt, model, x, y, scaler):
    _backward(model, x, y)
    with opt.perturbed(scaler=scaler):
        _backward(model, x, y)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)


def _erm(opt, model, x, y, scaler):
    _backward(model, x, y)
    opt.erm_step(zero_grad=True, scaler=scaler)


API_CASES = [
    pytest.param(api, use_scaler, id=f"{name}-{'scaler' if use_scaler else 'plain'}")
    for name, api in [("closure", _closure_step), ("two", _two_step), ("context", _context), ("erm", _erm)]
    for use_scaler in (False, True)
    if not (api is _closure_step and use_scaler)  # the closure form takes no scaler (as GradScaler.step)
]


@pytest.mark.parametrize("api, use_scaler", API_CASES)
def test_step_hooks_run_once_around_the_update(api, use_scaler: bool) -> None:
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0) if use_scaler else None
    if scaler is not None:
        scaler.scale(torch.ones(()))  # the scaler is used as in a loop: it has a scale
    events = []
    first = next(model.parameters())
    opt.register_step_pre_hook(lambda o, args, kwargs: events.append(("pre", first.detach().clone())))
    opt.register_step_post_hook(lambda o, args, kwargs: events.append(("post", first.detach().clone())))
    before = first.detach().clone()
    api(opt, model, *_batch(), scaler)
    assert [name for name, _ in events] == ["pre", "post"]
    if api is not _closure_step:  # around the base step: the weights are restored before and updated after
        assert torch.equal(events[0][1], before)
    assert not torch.equal(events[1][1], before) and opt.steps == 1


def test_state_dict_hooks_run() -> None:
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    opt.step(lambda: _backward(model, *_batch()))
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": "post"})
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load_post"))
    state = opt.state_dict()
    assert {"state", "param_groups", "extra"} <= set(state) and state["extra"] == "post"
    assert state["param_groups"][0]["sam"]["steps"] == 1
    opt.load_state_dict(state)
    assert seen == ["pre", "load_pre", "load_post"]


def test_loading_another_presets_checkpoint_is_an_error_before_anything_changes() -> None:
    model = _mlp()
    plain = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    plain.step(lambda: _backward(model, *_batch()))
    other_model = _mlp(1)
    adaptive = AESAM(other_model.parameters(), torch.optim.SGD, lr=0.5, momentum=0.9, total_steps=10)
    adaptive.step(lambda: _backward(other_model, *_batch()))
    before = copy.deepcopy(adaptive.state_dict())
    with pytest.raises(ValueError, match="saved by a Always policy"):
        adaptive.load_state_dict(plain.state_dict())
    after = adaptive.state_dict()
    assert after["param_groups"][0]["lr"] == 0.5 and after["param_groups"][0]["sam"] == before["param_groups"][0]["sam"]
    for key in before["state"]:
        assert torch.equal(after["state"][key]["momentum_buffer"], before["state"][key]["momentum_buffer"])
    looksam = LookSAM(_mlp().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="reuse"):
        SAM(_mlp().parameters(), torch.optim.SGD, lr=0.1).load_state_dict(looksam.state_dict())


def test_every_setting_comes_from_the_checkpoint() -> None:
    saved = LookSAM(_mlp().parameters(), torch.optim.SGD, rho=0.2, lr=0.3, k=5, alpha=0.4).state_dict()
    opt = LookSAM(_mlp().parameters(), torch.optim.SGD, rho=0.1, lr=0.1, k=3, alpha=0.9)
    opt.load_state_dict(saved)
    group = opt.param_groups[0]
    assert (group["sam_rho"], group["lr"], opt.policy.k, opt.reuse.alpha) == (0.2, 0.3, 5, 0.4)


def test_version_0_1_checkpoints_still_load_and_continue_identically() -> None:
    model = _mlp()
    opt = PeriodicSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, k=2)
    for seed in range(3):
        opt.step(lambda seed=seed: _backward(model, *_batch(seed)))
    current = copy.deepcopy(opt.state_dict())
    legacy_groups = [{k: v for k, v in _without_prefix(g).items() if k != "sam"} for g in current["param_groups"]]
    legacy_policy = {
        k: v for k, v in current["param_groups"][0]["sam"]["policy"].items() if k in ("step", "total_steps")
    }
    legacy = {
        "base_optimizer": {"state": current["state"], "param_groups": legacy_groups},
        "sam": {"format": 1, "steps": 3, "sam_steps": 2, "policy": legacy_policy, "reuse": None},
    }
    twin_model = copy.deepcopy(model)
    twin = PeriodicSAM(twin_model.parameters(), torch.optim.SGD, lr=0.5, momentum=0.9, k=2)
    twin.load_state_dict(legacy)
    for seed in range(3, 6):
        opt.step(lambda seed=seed: _backward(model, *_batch(seed)))
        twin.step(lambda seed=seed: _backward(twin_model, *_batch(seed)))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters(), strict=True))
    assert twin.param_groups[0]["sam_rho"] == 0.05 and "rho" not in twin.param_groups[0]


def _without_prefix(group: dict) -> dict:
    return {(k[4:] if k.startswith("sam_") else k): v for k, v in group.items()}


@pytest.mark.parametrize("preset", ["looksam", "aesam"])
def test_torch_distributed_checkpoint_keeps_sams_own_state(preset: str) -> None:
    """DCP's get/set_optimizer_state_dict (which keep only 'state' and 'param_groups') restore SAM's counters, policy
    and g_v; its state initialisation calls step() with zero gradients, which changes nothing."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def build(net: nn.Module) -> SAM:
        if preset == "looksam":
            return LookSAM(net.parameters(), torch.optim.Adam, lr=0.1, k=2, alpha=0.5)
        return AESAM(net.parameters(), torch.optim.Adam, lr=0.1, total_steps=10)

    model = _mlp()
    fresh = build(model)
    before = [p.detach().clone() for p in model.parameters()]
    initial = get_optimizer_state_dict(model, fresh)  # initialises Adam's state on a fresh optimizer
    assert set(initial) == {"state", "param_groups"} and fresh.steps == 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    for seed in range(3):
        fresh.step(lambda seed=seed: _backward(model, *_batch(seed)))
    saved = copy.deepcopy(get_optimizer_state_dict(model, fresh))
    twin_model = copy.deepcopy(model)
    twin = build(twin_model)
    set_optimizer_state_dict(twin_model, twin, saved)
    assert (twin.steps, twin.sam_steps) == (fresh.steps, fresh.sam_steps) == (3, twin.sam_steps)
    assert twin.policy.state_dict() == fresh.policy.state_dict()
    if preset == "looksam":
        assert len(twin.reuse.g_v) == 4
        assert all(
            torch.equal(twin.reuse.g_v[q], fresh.reuse.g_v[p])
            for p, q in zip(model.parameters(), twin_model.parameters(), strict=True)
        )
    for seed in range(3, 6):  # and both continue identically
        fresh.step(lambda seed=seed: _backward(model, *_batch(seed)))
        twin.step(lambda seed=seed: _backward(twin_model, *_batch(seed)))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters(), strict=True))


def test_step_without_closure_before_the_passes_is_still_an_error() -> None:
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    _backward(model, *_batch())
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()
