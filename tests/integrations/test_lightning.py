"""The Lightning integration (sharpness.integrations.lightning) against hand-written SAM loops.

- the guide's example (docs/integrations.md, executed from the docs) trains, every step a SAM step;
- automatic optimization with ``SAMCallback`` equals a hand-written loop bitwise (weights and BatchNorm statistics)
  for SAM, AE-SAM and LookSAM in 32-true, bf16-mixed and 16-mixed (the documented GradScaler two-step loop), and with
  ``gradient_clip_val`` (both gradients clipped in 32-true, the one at w + ε in 16-mixed); manual optimization with a
  closure equals it too;
- with ``accumulate_grad_batches`` = 2 and 3 it equals the hand-written accumulation loop of docs/sam.md over
  Lightning's windows (both passes accumulate the window's micro-batches, ε̂ from the accumulated gradient) bitwise,
  for SAM, AE-SAM and LookSAM in 32-true, bf16-mixed and 16-mixed (the mixed ones also close to 32-true), with
  ``gradient_clip_val``, and with a partial last window; ``training_step`` runs 2k times per SAM step and k times per
  ERM step (without the callback Lightning would drop the earlier micro-batches: shown);
- manual optimization without a closure, a trainer without a SAM optimizer and accumulation with a
  ``training_step(dataloader_iter)`` are refused;
- Lightning's DDP strategy (2 spawned gloo processes, float64) equals single-process m-SAM with one micro-batch per
  rank (also with accumulation: one accumulated window per rank), makes one gradient all-reduce per SAM step like
  SGD (also with accumulation), and AE-SAM decides alike on both ranks.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning_runs import (
    ACCUMULATE,
    PRESETS,
    QUIET,
    STEPS,
    PresetClassifier,
    closure_of,
    data,
    example,
    flat_state,
    loader,
    precision_options,
    seeded_module,
    spawn_ddp,
)
from torch import nn

from sharpness.integrations.lightning import SAMCallback

pytestmark = pytest.mark.filterwarnings(
    "ignore:The '.*dataloader' does not have many workers",
    "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated",  # inside Lightning, with torch 2.13
)
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def fit(module: L.LightningModule, tmp_path, callbacks=None, batches: int = STEPS, **options) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, default_root_dir=tmp_path,
        callbacks=[SAMCallback()] if callbacks is None else callbacks, **{"max_epochs": 1, **QUIET, **options},
    )  # fmt: skip
    trainer.fit(module, loader(data(batches=batches)))
    return trainer


def hand_loop(preset: str, precision: str = "32-true", clip: float | None = None) -> nn.Module:
    """The loops of docs/sam.md: ``opt.step(closure)``, clipping after each backward as Lightning does; for
    16-mixed the GradScaler two-step loop, clipping the unscaled gradient at w + ε."""
    net = seeded_module(preset).net
    opt = PRESETS[preset](net.parameters(), model=net)
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None

    def forward_backward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=AUTOCAST.get(precision), enabled=precision in AUTOCAST):
            loss = nn.functional.cross_entropy(net(x), y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss

    def clip_gradients() -> None:
        if clip is not None:
            nn.utils.clip_grad_norm_(net.parameters(), clip)

    for x, y in loader(data()):
        if scaler is None:

            def closure() -> torch.Tensor:
                loss = forward_backward(x, y)
                clip_gradients()
                return loss

            opt.step(closure)
            continue
        opt.zero_grad()
        forward_backward(x, y)
        sam_step = opt.wants_sam_step(scaler=scaler)
        if sam_step and opt.first_step(zero_grad=True, scaler=scaler):
            forward_backward(x, y)
        scaler.unscale_(opt)
        clip_gradients()
        opt.second_step(scaler=scaler) if sam_step else opt.erm_step(scaler=scaler)
        scaler.update()
    return net


def accumulating_hand_loop(
    preset: str, k: int, batches: int, precision: str = "32-true", clip: float | None = None
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """docs/sam.md's accumulation loop over Lightning's windows: ``k`` consecutive batches (the last window may be
    shorter), each loss divided by ``k`` as Lightning does; the first pass accumulates over the window, ε̂ comes from
    the accumulated gradient, the second pass accumulates over the same micro-batches at w + ε̂. Clipping after each
    accumulated pass; for 16-mixed the GradScaler two-step loop, clipping the unscaled gradient at w + ε only."""
    net = seeded_module(preset).net
    opt = PRESETS[preset](net.parameters(), model=net)
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
    micro_batches = list(loader(data(batches=batches)))

    def accumulate(window: list) -> None:
        for x, y in window:
            with torch.autocast("cpu", dtype=AUTOCAST.get(precision), enabled=precision in AUTOCAST):
                loss = nn.functional.cross_entropy(net(x), y)
            loss = loss / k
            (scaler.scale(loss) if scaler is not None else loss).backward()

    def clip_gradients() -> None:
        if clip is not None:
            nn.utils.clip_grad_norm_(net.parameters(), clip)

    for start in range(0, len(micro_batches), k):
        window = micro_batches[start : start + k]
        opt.zero_grad()
        accumulate(window)
        if scaler is None:
            clip_gradients()
        sam_step = opt.wants_sam_step(scaler=scaler)
        if sam_step and opt.first_step(zero_grad=True, scaler=scaler):
            accumulate(window)
            if scaler is None:
                clip_gradients()
        if scaler is not None:
            scaler.unscale_(opt)
            clip_gradients()
        opt.second_step(scaler=scaler) if sam_step else opt.erm_step(scaler=scaler)
        if scaler is not None:
            scaler.update()
    return net, opt


def test_the_guide_example_trains_with_sam(tmp_path) -> None:
    model = example.train(default_root_dir=tmp_path, accelerator="cpu", devices=1, **QUIET)
    opt = model.trainer.optimizers[0]
    assert opt.steps == opt.sam_steps == 5 * 8  # 5 epochs of 512 / 64 batches
    x, y = example.toy_data().dataset.tensors
    untrained = example.Classifier().eval()
    model.eval()
    assert nn.functional.cross_entropy(model.net(x), y) < 0.5 < nn.functional.cross_entropy(untrained.net(x), y)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("preset", ["sam", "aesam", "looksam"])
def test_automatic_optimization_equals_the_hand_loop(tmp_path, preset: str, precision: str) -> None:
    module = seeded_module(preset)
    fit(module, tmp_path, **precision_options(precision))
    opt = module.trainer.optimizers[0]
    assert opt.steps == STEPS and (opt.sam_steps < STEPS) == (preset != "sam")  # AE-SAM, LookSAM took ERM steps
    assert torch.equal(flat_state(module.net), flat_state(hand_loop(preset, precision)))


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_gradient_clipping(tmp_path, precision: str) -> None:
    module = seeded_module()
    fit(module, tmp_path, gradient_clip_val=0.05, **precision_options(precision))
    clipped = flat_state(hand_loop("sam", precision, clip=0.05))
    assert torch.equal(flat_state(module.net), clipped)
    assert not torch.equal(clipped, flat_state(hand_loop("sam", precision)))  # the clipping was active


def test_manual_optimization_with_a_closure_equals_the_hand_loop(tmp_path) -> None:
    class Manual(PresetClassifier):
        def __init__(self) -> None:
            super().__init__("sam")
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            def closure():
                loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
                self.manual_backward(loss)
                return loss

            return self.optimizers().step(closure=closure)

    torch.manual_seed(0)
    module = Manual()
    fit(module, tmp_path)
    assert torch.equal(flat_state(module.net), flat_state(hand_loop("sam")))


def test_manual_optimization_without_a_closure_is_an_error(tmp_path) -> None:
    class NoClosure(PresetClassifier):
        def __init__(self) -> None:
            super().__init__("sam")
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            self.manual_backward(nn.functional.cross_entropy(self.net(batch[0]), batch[1]))
            self.optimizers().step()

    with pytest.raises(RuntimeError, match=r"opt.step\(\) needs a closure .* pass opt.step\(closure=closure\)"):
        fit(NoClosure(), tmp_path)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("preset", ["sam", "aesam", "looksam"])
def test_accumulation_equals_the_hand_loop(tmp_path, preset: str, k: int) -> None:
    """``STEPS`` windows of ``k`` batches: the weights and BatchNorm statistics equal the hand loop bitwise."""
    module = seeded_module(preset)
    fit(module, tmp_path, batches=STEPS * k, accumulate_grad_batches=k)
    opt = module.trainer.optimizers[0]
    assert opt.steps == STEPS and (opt.sam_steps < STEPS) == (preset != "sam")  # AE-SAM, LookSAM took ERM steps
    assert module.training_steps == 2 * k * opt.sam_steps + k * (opt.steps - opt.sam_steps)  # an ERM step replays none
    net, hand_opt = accumulating_hand_loop(preset, k, STEPS * k)
    assert hand_opt.sam_steps == opt.sam_steps
    assert torch.equal(flat_state(module.net), flat_state(net))
    assert not torch.equal(flat_state(module.net), flat_state(hand_loop(preset)))  # not the first STEPS batches alone


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("preset", ["sam", "aesam", "looksam"])
def test_accumulation_in_mixed_precision(tmp_path, preset: str, precision: str) -> None:
    """Bitwise the hand loop in the same precision (autocast, and the GradScaler for 16-mixed), close to 32-true."""
    module = seeded_module(preset)
    fit(module, tmp_path, batches=STEPS * 2, accumulate_grad_batches=2, **precision_options(precision))
    opt = module.trainer.optimizers[0]
    assert opt.steps == STEPS and module.training_steps == 2 * (opt.steps + opt.sam_steps)
    assert torch.equal(flat_state(module.net), flat_state(accumulating_hand_loop(preset, 2, STEPS * 2, precision)[0]))
    fp32 = flat_state(accumulating_hand_loop(preset, 2, STEPS * 2)[0], buffers=False)
    torch.testing.assert_close(flat_state(module.net, buffers=False), fp32, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_accumulation_with_gradient_clipping(tmp_path, precision: str) -> None:
    module = seeded_module()
    fit(module, tmp_path, batches=STEPS * 2, accumulate_grad_batches=2, gradient_clip_val=0.05,
        **precision_options(precision))  # fmt: skip
    clipped = flat_state(accumulating_hand_loop("sam", 2, STEPS * 2, precision, clip=0.05)[0])
    assert torch.equal(flat_state(module.net), clipped)
    assert not torch.equal(clipped, flat_state(accumulating_hand_loop("sam", 2, STEPS * 2, precision)[0]))


@pytest.mark.parametrize("batches", [16, 17])  # k = 3: a last window of 1 or 2 batches
@pytest.mark.parametrize("preset", ["sam", "looksam"])
def test_accumulation_steps_on_a_partial_last_window(tmp_path, preset: str, batches: int) -> None:
    """Lightning steps on the epoch's last, shorter window (each loss still divided by k); so does the hand loop."""
    module = seeded_module(preset)
    fit(module, tmp_path, batches=batches, accumulate_grad_batches=3)
    opt = module.trainer.optimizers[0]
    assert opt.steps == math.ceil(batches / 3)
    assert torch.equal(flat_state(module.net), flat_state(accumulating_hand_loop(preset, 3, batches)[0]))


def test_accumulation_follows_a_gradient_accumulation_scheduler(tmp_path) -> None:
    """Epoch 0 without accumulation (Lightning's closure path), epoch 1 with k = 2 (the window replay)."""
    module = seeded_module()
    scheduler = GradientAccumulationScheduler(scheduling={1: 2})
    fit(module, tmp_path, callbacks=[SAMCallback(), scheduler], max_epochs=2)
    opt = module.trainer.optimizers[0]
    assert opt.steps == opt.sam_steps == STEPS + STEPS // 2
    assert module.training_steps == 2 * STEPS + 4 * (STEPS // 2)


@pytest.mark.filterwarnings("ignore:You are using the `dataloader_iter` step flavor")
def test_accumulation_with_a_dataloader_iter_training_step_is_refused(tmp_path) -> None:
    class Iterating(PresetClassifier):
        def training_step(self, dataloader_iter):
            x, y = next(dataloader_iter)
            return nn.functional.cross_entropy(self.net(x), y)

    torch.manual_seed(0)
    with pytest.raises(ValueError, match="accumulate_grad_batches=2 needs a training_step\\(batch, batch_idx\\)"):
        fit(Iterating("sam"), tmp_path, accumulate_grad_batches=2)


def test_without_the_callback_accumulation_would_drop_all_but_the_last_micro_batch(tmp_path) -> None:
    """Why the callback replays the window: Lightning's SAM step sees only the last micro-batch (its loss halved)."""
    module = seeded_module()
    fit(module, tmp_path, callbacks=[], accumulate_grad_batches=2)
    net = seeded_module().net
    opt = PRESETS["sam"](net.parameters())
    for step, (x, y) in enumerate(loader(data())):
        if step % 2 == 1:
            opt.step(closure_of(net, x, y, divisor=2.0))
    torch.testing.assert_close(flat_state(module.net, buffers=False), flat_state(net, buffers=False))


def test_a_trainer_without_sam_is_an_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="configure_optimizers returned no sharpness SAM optimizer"):
        fit(seeded_module("sgd"), tmp_path)


# ----------------------------------------------------------------------------- Lightning's DDP strategy


@pytest.fixture(scope="module")
def ddp_ranks() -> list[dict]:
    return [rank["ddp"] for rank in spawn_ddp(world_size=2)]


def test_ddp_sam_equals_single_process_m_sam(ddp_ranks) -> None:
    """Per-replica ε (Foret et al. 2021, App. C.3): 2-rank DDP = m-SAM with one micro-batch per rank."""
    torch.manual_seed(0)
    net = example.Classifier().net.double()
    opt = PRESETS["sam"](net.parameters(), model=net)
    for x, y in loader(data(2, torch.float64), batch_size=16):
        opt.step_micro_batches([closure_of(net, x[r::2], y[r::2]) for r in range(2)])
    torch.testing.assert_close(ddp_ranks[0]["sam"]["state"], flat_state(net, buffers=False), rtol=1e-10, atol=1e-10)


def test_ddp_accumulation_equals_single_process_m_sam_over_windows(ddp_ranks) -> None:
    """With accumulate_grad_batches = 2, rank r's ε comes from its own window ``g_r = Σ_i ∇L_ri(w) / 2`` and the
    step averages ``Σ_i ∇L_ri(w + ε_r) / 2`` over the ranks: m-SAM with one closure per rank accumulating its window."""
    torch.manual_seed(0)
    net = example.Classifier().net.double()
    opt = PRESETS["sam"](net.parameters(), model=net)
    batches = list(loader(data(2, torch.float64), batch_size=16))

    def window_closure(window: list, r: int):
        def closure() -> torch.Tensor:
            losses = [closure_of(net, x[r::2], y[r::2], divisor=ACCUMULATE)() for x, y in window]
            return sum(losses)

        return closure

    for start in range(0, len(batches), ACCUMULATE):
        window = batches[start : start + ACCUMULATE]
        opt.step_micro_batches([window_closure(window, r) for r in range(2)])
    state = ddp_ranks[0]["sam_accumulate"]["state"]
    torch.testing.assert_close(state, flat_state(net, buffers=False), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(state, ddp_ranks[0]["sam"]["state"])


def test_ddp_replicas_agree(ddp_ranks) -> None:
    for name in ("sam", "sam_global", "sam_fp16", "aesam", "sam_accumulate", "sam_global_accumulate",
                 "sam_fp16_accumulate"):  # fmt: skip
        first, second = ddp_ranks[0][name], ddp_ranks[1][name]
        assert torch.equal(first["state"], second["state"])
        # AE-SAM: the same s_t and decisions on both ranks
        torch.testing.assert_close(first["decisions"], second["decisions"], rtol=0, atol=0, equal_nan=True)
    sam_steps = ddp_ranks[0]["aesam"]["decisions"][-1][0]
    assert 0 < sam_steps < STEPS  # both kinds of step, although rank 1's local gradients are far larger


def test_ddp_gradient_allreduces_per_step(ddp_ranks) -> None:
    counts = {name: run["allreduces"] for name, run in ddp_ranks[0].items()}
    per_step = counts["sgd"] / STEPS
    assert per_step >= 1
    assert counts["sam"] == counts["sam_fp16"] == counts["sgd"]  # per-replica ε: the first pass under no_sync
    assert counts["sam_global"] == 2 * counts["sgd"]
    # accumulation: the earlier micro-batches under no_sync in both passes, STEPS / ACCUMULATE optimizer steps
    assert counts["sam_accumulate"] == counts["sam_fp16_accumulate"] == counts["sgd"] // ACCUMULATE
    assert counts["sam_global_accumulate"] == 2 * counts["sgd"] // ACCUMULATE
    # AE-SAM's ERM steps follow a per-replica first pass: SAM averages that gradient itself, outside DDP's hook
    assert counts["aesam"] == per_step * ddp_ranks[0]["aesam"]["decisions"][-1][0]


def test_attach_model_is_refused_in_the_middle_of_a_step() -> None:
    net = seeded_module().net
    opt = PRESETS["sam"](net.parameters())
    x, y = data().tensors
    closure_of(net, x[:8], y[:8])()
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match=r"attach_model\(\) called in the middle of a step"):
        opt.attach_model(net)
