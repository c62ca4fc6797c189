"""MSAM against an independent re-implementation of Algorithm 1 (Becker et al., 2024), its unperturbed contract,
resume, the Trainer and the CLI."""

from __future__ import annotations

import copy
import io
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from sharpness import MSAM
from sharpness.cli import main
from sharpness.data import load_dataset
from sharpness.experiments.config import CompareConfig, RunConfig
from sharpness.models import build_model
from sharpness.optim.registry import OPTIMIZERS, RHO_OPTIMIZERS, SAM_FAMILY, build_optimizer
from sharpness.train import Callback, Trainer

STEPS, LR, WD = 6, 0.05, 0.1
GEN = torch.Generator().manual_seed(0)
X = torch.randn(STEPS + 1, 8, 4, generator=GEN, dtype=torch.float64)
Y = torch.randn(STEPS + 1, 8, 2, generator=GEN, dtype=torch.float64)


# ------------------------------------------------------------------ Algorithm 1, written out


def _loss(w: list[Tensor], t: int) -> Tensor:
    """A tiny tanh network ``W2 tanh(W1 x + b1) + b2`` with squared error on batch ``t``, written by hand."""
    w1, b1, w2, b2 = w
    return ((torch.tanh(X[t] @ w1.T + b1) @ w2.T + b2 - Y[t]) ** 2).mean()


def _grad(w: list[Tensor], t: int) -> list[Tensor]:
    w = [x.detach().requires_grad_() for x in w]
    return list(torch.autograd.grad(_loss(w, t), w))


def _initial() -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    shapes = [(5, 4), (5,), (2, 5), (2,)]
    return [torch.randn(s, generator=g, dtype=torch.float64) * 0.5 for s in shapes]


def _algorithm_1(update: Callable, rho: float, warmup: int) -> tuple[list[Tensor], list[Tensor]]:
    """Algorithm 1 with ``update(w, g, state, t) -> (w, v)``; returns ``(w, w̃)`` after :data:`STEPS` steps.

    ``w̃_t = w_t − ρ_t v_t / (||v_t|| + 1e-12)``, ``ρ_t = ρ min(1, t / warmup)``; ``v_0 = 0``: no perturbation.
    """
    w, v, state = _initial(), None, {}
    perturbed = w
    for t in range(STEPS):
        w, v = update(w, _grad(perturbed, t), state, t + 1)
        norm = math.sqrt(sum(float((x * x).sum()) for x in v))
        rho_t = rho * min(1.0, (t + 1) / warmup) if warmup else rho
        perturbed = [wi - rho_t * vi / (norm + 1e-12) for wi, vi in zip(w, v, strict=True)]
    return w, perturbed


def _sgd_update(w, g, state, t, momentum=0.9):
    """``v ← μ v + (g + λ w)`` (``v_1 = g_1 + λ w_1``), ``w ← w − η v``: SGD with momentum, decay at ``w``."""
    g = [gi + WD * wi for gi, wi in zip(g, w, strict=True)]
    state["v"] = g if "v" not in state else [momentum * vi + gi for vi, gi in zip(state["v"], g, strict=True)]
    return [wi - LR * vi for wi, vi in zip(w, state["v"], strict=True)], state["v"]


def _adamw_update(w, g, state, t, betas=(0.9, 0.999), eps=1e-8):
    """AdamW (torch's order: decay ``w ← w(1 − ηλ)``, then the bias-corrected Adam step); ``v`` = first moment."""
    b1, b2 = betas
    m = state.get("m", [torch.zeros_like(x) for x in w])
    s = state.get("s", [torch.zeros_like(x) for x in w])
    state["m"] = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g, strict=True)]
    state["s"] = [b2 * si + (1 - b2) * gi * gi for si, gi in zip(s, g, strict=True)]
    c1, c2 = 1 - b1**t, 1 - b2**t
    w = [wi * (1 - LR * WD) for wi in w]
    w = [
        wi - (LR / c1) * mi / (si.sqrt() / math.sqrt(c2) + eps)
        for wi, mi, si in zip(w, state["m"], state["s"], strict=True)
    ]
    return w, state["m"]


def _run_msam(base: str, rho: float, warmup: int, steps: int = STEPS) -> tuple[list[Tensor], MSAM]:
    params = [nn.Parameter(x.clone()) for x in _initial()]
    opt = MSAM(params, base, rho, rho_warmup=warmup, lr=LR, weight_decay=WD)
    for t in range(steps):

        def closure(t=t):
            opt.zero_grad()
            loss = _loss(params, t)
            loss.backward()
            return loss

        opt.step(closure)
    return params, opt


@pytest.mark.parametrize(("base", "update"), [("sgd", _sgd_update), ("adamw", _adamw_update)])
@pytest.mark.parametrize(("rho", "warmup"), [(0.3, 0), (1.0, 4)])
def test_msam_follows_algorithm_1(base: str, update: Callable, rho: float, warmup: int) -> None:
    """float64, weight decay, with and without warm-up: w̃ (held between steps) and w (unperturbed()) to 1e-12."""
    want_w, want_perturbed = _algorithm_1(update, rho, warmup)
    params, opt = _run_msam(base, rho, warmup)
    torch.testing.assert_close([p.detach() for p in params], want_perturbed, rtol=1e-12, atol=1e-12)
    with opt.unperturbed():
        torch.testing.assert_close([p.detach() for p in params], want_w, rtol=1e-12, atol=1e-12)
    assert not torch.equal(params[0], want_w[0])  # the perturbation is there, and of the tested size


def test_closure_and_backward_apis_agree_bitwise() -> None:
    closure_params, _ = _run_msam("sgd", 0.5, 2)
    params = [nn.Parameter(x.clone()) for x in _initial()]
    opt = MSAM(params, "sgd", 0.5, rho_warmup=2, lr=LR, weight_decay=WD)
    for t in range(STEPS):
        opt.zero_grad()
        _loss(params, t).backward()
        opt.step()
    for a, b in zip(closure_params, params, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ the unperturbed weights


@given(
    shapes=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 3)), min_size=1, max_size=4),
    rho=st.floats(0.0, 10.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_unperturbed_weights_are_bitwise_those_of_the_base_optimizer(shapes, rho, dtype, seed) -> None:
    """Inside unperturbed() the parameters equal, bitwise, plain SGD fed the same gradients (no drift from
    undoing by addition); leaving the block restores w̃ bitwise."""
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]
    shadow = [nn.Parameter(p.detach().clone()) for p in params]
    opt = MSAM(params, "sgd", rho, lr=0.1, momentum=0.9)
    sgd = torch.optim.SGD(shadow, lr=0.1, momentum=0.9)
    for _ in range(4):
        for p, q in zip(params, shadow, strict=True):
            p.grad = torch.randn(p.shape, generator=g, dtype=dtype) + p.detach().sin()  # depends on w̃
            q.grad = p.grad.clone()
        opt.step()
        sgd.step()
        before = [p.detach().clone() for p in params]
        with opt.unperturbed():
            assert all(torch.equal(p, q) for p, q in zip(params, shadow, strict=True))
        assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_non_finite_gradient_skips_the_step() -> None:
    params, opt = _run_msam("sgd", 0.5, 0, steps=3)
    before = [p.detach().clone() for p in params]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    params[1].grad[0] = math.nan
    opt.step()
    assert opt.steps == 3 and opt.is_perturbed
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(params, momentum, strict=True))


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_a_grad_scaler_steps_msam_as_without_it_and_skips_overflows(base: str) -> None:
    """``scaler.step(opt)`` unscales the gradient (a power-of-two scale: exactly) and calls ``MSAM.step()``; a step
    whose scaled gradient overflows is skipped by the scaler, leaving MSAM's weights and state, and the scale backs off.
    """
    runs = []
    for scaled in (False, True):
        params = [nn.Parameter(x.float()) for x in _initial()]
        opt = MSAM(params, base, 0.5, rho_warmup=2, lr=LR, weight_decay=WD)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000) if scaled else None
        for t in range(STEPS):
            opt.zero_grad()
            loss = _loss([p.double() for p in params], t).float()
            if scaler is None:
                loss.backward()
                opt.step()
                continue
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        runs.append((params, opt, scaler))
    (plain, _, _), (params, opt, scaler) = runs
    assert all(torch.equal(a, b) for a, b in zip(plain, params, strict=True))
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    scaler.scale(_loss([p.double() for p in params], STEPS).float() * math.inf).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9 and opt.steps == STEPS
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    torch.testing.assert_close(opt.state_dict(), state, rtol=0, atol=0)


def test_move_to_unperturbed_leaves_w_and_the_next_step_perturbs_again() -> None:
    params, opt = _run_msam("sgd", 0.5, 0, steps=3)
    with opt.unperturbed():
        w = [p.detach().clone() for p in params]
    opt.move_to_unperturbed()
    assert not opt.is_perturbed and all(torch.equal(p, x) for p, x in zip(params, w, strict=True))
    with opt.unperturbed():  # at w already: stays at w
        pass
    assert not opt.is_perturbed
    opt.perturb()
    assert opt.is_perturbed and not torch.equal(params[0], w[0])


# ------------------------------------------------------------------ resume


def _serialised(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_resume_is_bit_identical(base: str) -> None:
    """6 steps straight = 3 steps, save (w inside unperturbed(), the optimizer), load into fresh objects, 3 more."""

    def build():
        model = nn.Linear(4, 2, dtype=torch.float64)
        opt = MSAM(model.parameters(), base, 1.0, rho_warmup=0.75, lr=LR, weight_decay=WD)
        opt.set_total_steps(STEPS)
        return model, opt

    def train(model, opt, steps):
        for t in steps:
            opt.zero_grad()
            ((model(X[t]) - Y[t]) ** 2).mean().backward()
            opt.step()

    torch.manual_seed(0)
    straight, opt = build()
    train(straight, opt, range(STEPS))
    torch.manual_seed(0)
    first, opt = build()
    train(first, opt, range(3))
    with opt.unperturbed() as moves:
        assert moves
        saved = _serialised({"model": first.state_dict(), "optimizer": opt.state_dict()})
    resumed, opt = build()
    resumed.load_state_dict(saved["model"])  # w first, then the optimizer: load_state_dict perturbs it
    opt.load_state_dict(saved["optimizer"])
    assert opt.steps == 3 and opt.is_perturbed
    train(resumed, opt, range(3, STEPS))
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters(), strict=True))


def test_loading_the_model_after_the_optimizer_is_caught() -> None:
    params, opt = _run_msam("sgd", 0.5, 0, steps=2)
    model_state = [p.detach().clone() for p in params]
    fresh = [nn.Parameter(torch.zeros_like(p)) for p in params]
    other = MSAM(fresh, "sgd", 0.5, lr=LR)
    with other.unperturbed():  # any order inside the block
        other.load_state_dict(opt.state_dict())
        with torch.no_grad():
            for p, w in zip(fresh, model_state, strict=True):
                p.copy_(w)
    assert other.is_perturbed
    with torch.no_grad():
        fresh[0].add_(1.0)  # in place while perturbed, outside the block
    with pytest.raises(RuntimeError, match="modified in place while perturbed"):
        other.step()


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rho": -0.1}, ValueError, "rho must be"),
        ({"rho": math.nan}, ValueError, "rho must be"),
        ({"rho_warmup": 1.5}, ValueError, "rho_warmup must be"),
        ({"rho_warmup": -2}, ValueError, "rho_warmup must be"),
        ({"rho_warmup": True}, ValueError, "rho_warmup must be"),
        ({"base": "lion"}, ValueError, "unknown base 'lion'"),
        ({"base": nn.Linear}, TypeError, "base must be"),
        ({"base": torch.optim.RMSprop}, ValueError, "pass momentum_key="),
        ({"momentum": 0.0}, ValueError, "needs momentum > 0"),
    ],
)
def test_bad_arguments_raise_one_line_errors(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match) as info:
        MSAM([nn.Parameter(torch.zeros(2))], **{"lr": 0.1, **kwargs})
    assert "\n" not in str(info.value)


def test_fractional_warmup_needs_the_total_and_step_inside_the_block_is_refused() -> None:
    p = nn.Parameter(torch.zeros(2))
    opt = MSAM([p], "sgd", 1.0, rho_warmup=0.1, lr=0.1)
    p.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="set_total_steps"):
        opt.step()
    assert opt.steps == 0 and torch.equal(p, torch.zeros(2))
    opt.set_total_steps(10)
    with opt.unperturbed(), pytest.raises(RuntimeError, match="inside opt.unperturbed"):
        opt.step()
    custom = MSAM([nn.Parameter(torch.zeros(2))], torch.optim.RMSprop, momentum_key="momentum_buffer", momentum=0.9)
    assert custom.momentum_key == "momentum_buffer"


# ------------------------------------------------------------------ registry, Trainer, CLI


def test_registry_builds_msam_as_a_one_pass_rho_optimizer() -> None:
    opt = build_optimizer("msam", nn.Linear(2, 2), lr=0.1, momentum=0.9, weight_decay=1e-3, rho=0.7)
    assert isinstance(opt, MSAM) and opt.rho_warmup == 0.1
    assert opt.param_groups[0]["msam_rho"] == 0.7 and opt.param_groups[0]["weight_decay"] == 1e-3
    assert "msam" in OPTIMIZERS and "msam" in RHO_OPTIMIZERS and "msam" not in SAM_FAMILY
    compare = CompareConfig(run=RunConfig(epochs=3), optimizers=["sgd", "msam", "sam"], equal_compute=True)
    assert compare.epochs_for("msam") == compare.epochs_for("sgd") == 6 and compare.epochs_for("sam") == 3


class _SaveAndStop(Callback):
    """Take the Trainer's state_dict (serialised) at the end of epoch 1 and stop, as an interrupted run."""

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        self.state = _serialised(trainer.state_dict())
        raise KeyboardInterrupt


def _trainer(epochs: int, callbacks=()) -> Trainer:
    data = load_dataset("synthetic", seed=0, n_train=96, n_test=48, dim=6)
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=data.input_shape, num_classes=data.num_classes, hidden=(16,))
    opt = build_optimizer("msam", model, lr=0.1, momentum=0.9, weight_decay=1e-3, rho=1.0)
    return Trainer(model, opt, data, epochs=epochs, batch_size=16, callbacks=callbacks)


def _unperturbed_by_hand(opt: MSAM) -> list[Tensor]:
    """``w = w̃ + ρ_t v/(||v|| + 1e-12)`` from the optimizer's state, not through its stored copy."""
    params = [p for group in opt.param_groups for p in group["params"]]
    v = [opt.state[p]["momentum_buffer"] for p in params]
    norm = math.sqrt(sum(float((x.double() ** 2).sum()) for x in v))
    rho_t = opt.param_groups[0]["msam_rho"] * opt.warmup_factor()
    return [p.detach() + rho_t * x / (norm + 1e-12) for p, x in zip(params, v, strict=True)]


def test_trainer_evaluates_and_saves_the_unperturbed_weights() -> None:
    trainer = _trainer(epochs=2)
    trainer.fit()
    opt, model = trainer.optimizer, trainer.model
    assert opt.is_perturbed and opt.warmup_factor() == 1.0
    perturbed = [p.detach().clone() for p in model.parameters()]
    w = _unperturbed_by_hand(opt)
    by_hand = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p, x in zip(by_hand.parameters(), w, strict=True):
            p.copy_(x)
        x, y = trainer.data.x_test, trainer.data.y_test
        want = float(nn.functional.cross_entropy(by_hand(x), y))
    assert trainer.evaluate(x, y)["loss"] == pytest.approx(want, rel=1e-5)
    assert trainer.final_metrics()["test_loss"] == pytest.approx(want, rel=1e-5)
    saved = trainer.state_dict()["model"]
    for (name, p), x, q in zip(model.named_parameters(), w, perturbed, strict=True):
        torch.testing.assert_close(saved[name], x, rtol=1e-5, atol=1e-6)
        assert torch.equal(p, q)  # still at w̃ afterwards, and the checkpoint holds copies


def test_trainer_resume_is_bit_identical() -> None:
    straight = _trainer(epochs=2)
    straight.fit()
    stop = _SaveAndStop()
    with pytest.raises(KeyboardInterrupt):
        _trainer(epochs=2, callbacks=[stop]).fit()
    resumed = _trainer(epochs=2)
    resumed.load_state_dict(stop.state)
    resumed.fit()
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert straight.state.history[-1]["test_loss"] == resumed.state.history[-1]["test_loss"]


def test_cli_trains_msam_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "32", "--threads", "1", "--quiet"]
    assert main([*args, "--optimizer", "msam", "--rho", "1.0", "--out", str(out)]) == 0
    final = json.loads((out / "final.json").read_text())
    assert final["passes_per_step"] == 1.0 and final["epochs"] == 1 and math.isfinite(final["test_loss"])
