"""The Lightning integration (sharpness.integrations.lightning) against hand-written SAM loops.

- the guide's example (docs/integrations.md, executed from the docs) trains, every step a SAM step;
- automatic optimization with ``SAMCallback`` equals a hand-written loop bitwise (weights and BatchNorm statistics)
  for SAM, AE-SAM and LookSAM in 32-true, bf16-mixed and 16-mixed (the documented GradScaler two-step loop), and with
  ``gradient_clip_val`` (both gradients clipped in 32-true, the one at w + ε in 16-mixed); manual optimization with a
  closure equals it too;
- ``accumulate_grad_batches > 1`` is refused (without the callback Lightning would drop the earlier micro-batches:
  shown), as are manual optimization without a closure and a trainer without a SAM optimizer;
- Lightning's DDP strategy (2 spawned gloo processes, float64) equals single-process m-SAM with one micro-batch per
  rank, makes one gradient all-reduce per SAM step like SGD, and AE-SAM decides alike on both ranks.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning_runs import (
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


def fit(module: L.LightningModule, tmp_path, callbacks=None, **options) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, default_root_dir=tmp_path,
        callbacks=[SAMCallback()] if callbacks is None else callbacks, **QUIET, **options,
    )  # fmt: skip
    trainer.fit(module, loader(data()))
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


def test_gradient_accumulation_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="accumulate_grad_batches=2 cannot be used with SAM in automatic optimization"):
        fit(seeded_module(), tmp_path, accumulate_grad_batches=2)


def test_without_the_callback_accumulation_would_drop_all_but_the_last_micro_batch(tmp_path) -> None:
    """Why accumulation is refused: Lightning's SAM step sees only the last micro-batch (its loss halved)."""
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


def test_ddp_replicas_agree(ddp_ranks) -> None:
    for name in ("sam", "sam_global", "sam_fp16", "aesam"):
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
