"""SAMTrainer (sharpness.integrations.transformers) with the real ``transformers.Trainer`` on a tiny GPT-2.

Every run is compared with an independent reference on the same batches: a hand-written SAM loop (Foret et al.
2021, Alg. 1 with plain autograd: g, ε = ρ g/||g||, the gradient at w + ε, clipping, SGD) for plain SAM, and SAM's
closure API (one call per optimizer step on the step's whole batch, no Trainer code) for the switching presets.
Dropout is off and the sampler is sequential, so the runs are deterministic. The 2-process DDP run and the docs'
example are here too; hf_trainer_runs.py holds the model, data and arguments.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from hf_trainer_runs import (  # noqa: E402
    BATCH,
    STEPS,
    flat_weights,
    spawn_ddp,
    tiny_gpt2,
    token_data,
    train_aesam,
    trainer_arguments,
)
from transformers import TrainingArguments  # noqa: E402

import sharpness  # noqa: E402
from sharpness import SAM  # noqa: E402
from sharpness.integrations.transformers import SAMTrainer  # noqa: E402
from sharpness.optim.policy import EveryK  # noqa: E402

RHO, CLIP = 0.05, 0.5
# The base optimizer of the comparisons. Not Adam: its first steps are about lr·sign(g), so rounding noise in the tiny
# coordinates of g (bf16, the Trainer's sum/num_items loss) flips whole steps; and its step ignores a constant scale,
# which would hide which gradient was clipped.
SGD = dict(lr=0.05, momentum=0.9)
PRESETS: dict[str, Callable[[Iterable[torch.Tensor]], sharpness.SAM]] = {
    "sam": lambda ps: sharpness.SAM(ps, torch.optim.SGD, rho=RHO, **SGD),
    "aesam": lambda ps: sharpness.AESAM(ps, torch.optim.SGD, rho=RHO, **SGD),
    "looksam": lambda ps: sharpness.LookSAM(ps, torch.optim.SGD, rho=RHO, k=2, alpha=0.7, **SGD),
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
# bf16 rounds the Trainer's sum/num_items loss over micro-batches and the reference's one mean apart (~1e-4 here);
# clipping with the norm of the gradient at w instead of w + ε moves the weights by ~1e-3: outside both.
TOLERANCE = {"fp32": 1e-5, "bf16": 3e-4, "fp16": 2e-4}
GUIDE = "<!-- the block below is executed by tests/integrations/test_transformers.py -->"


def step_batches(data: list[dict[str, torch.Tensor]], accumulation: int, steps: int = STEPS) -> list[dict]:
    """Each optimizer step's examples, whole, in the order the Trainer's sequential sampler feeds them."""
    size = BATCH * accumulation
    return [{k: torch.stack([d[k] for d in data[t * size : (t + 1) * size]]) for k in data[0]} for t in range(steps)]


def linear_decay(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """The Trainer's default schedule (linear to zero over ``STEPS``, no warm-up), written out."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: (STEPS - t) / STEPS)


def train(preset: str, args: TrainingArguments, setup: Callable[[SAMTrainer], None] | None = None, resume=None):
    """Train a fresh tiny GPT-2 with SAMTrainer; returns (model, trainer, number of forward passes)."""
    model = tiny_gpt2()
    calls: list[int] = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    optimizer = PRESETS[preset](model.parameters())
    trainer = SAMTrainer(model=model, args=args, train_dataset=token_data(), optimizers=(optimizer, None))
    if setup is not None:
        setup(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer, len(calls)


def reference_sam(batches: list[dict], dtype: torch.dtype | None, max_grad_norm: float) -> torch.Tensor:
    """Foret et al. 2021, Alg. 1 by hand: ε = ρ g/||g||, g' = ∇L(w + ε), w restored, g' clipped, SGD's step."""
    model = tiny_gpt2()
    params = list(model.parameters())
    base = torch.optim.SGD(params, **SGD)
    schedule = linear_decay(base)

    def gradient(batch: dict) -> list[torch.Tensor]:
        with autocast(dtype):
            loss = model(**batch).loss
        return list(torch.autograd.grad(loss, params))

    for batch in batches:
        g = gradient(batch)
        norm = torch.sqrt(sum((x * x).sum() for x in g))
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, x in zip(params, g, strict=True):
                p.add_(x * (RHO / norm))
        g_adv = gradient(batch)
        with torch.no_grad():
            for p, w in zip(params, saved, strict=True):
                p.copy_(w)
        adv_norm = torch.sqrt(sum((x * x).sum() for x in g_adv))
        scale = min(1.0, max_grad_norm / (adv_norm.item() + 1e-6)) if max_grad_norm > 0 else 1.0
        for p, x in zip(params, g_adv, strict=True):
            p.grad = x * scale
        base.step()
        schedule.step()
    return flat_weights(model)


def reference_closure(
    preset: str, batches: list[dict], dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, sharpness.SAM]:
    """The preset driven by SAM's closure API on each step's whole batch (no Trainer), with the same schedule."""
    model = tiny_gpt2()
    optimizer = PRESETS[preset](model.parameters())
    optimizer.set_total_steps(STEPS)
    schedule = linear_decay(optimizer)
    for batch in batches:

        def closure(batch: dict = batch) -> torch.Tensor:
            with autocast(dtype):
                loss = model(**batch).loss
            loss.backward()
            return loss

        optimizer.step(closure)
        schedule.step()
    return flat_weights(model), optimizer


def autocast(dtype: torch.dtype | None) -> torch.autocast:
    """CPU autocast to ``dtype`` (off for ``None``), as the Trainer's mixed precision runs the forward pass."""
    return torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("accumulation", [1, 2])
def test_sam_trainer_is_the_hand_written_sam_loop(tmp_path, accumulation: int, dtype: str) -> None:
    """Two passes per micro-batch, and the weights of SAM's update with the gradient at w + ε clipped."""
    precision = {"bf16": True} if dtype == "bf16" else {}
    args = trainer_arguments(tmp_path, gradient_accumulation_steps=accumulation, max_grad_norm=CLIP, **precision)
    model, trainer, forwards = train("sam", args)
    assert forwards == 2 * accumulation * STEPS
    assert max(log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log) > CLIP  # it clipped
    expected = reference_sam(step_batches(token_data(), accumulation), DTYPES[dtype], CLIP)
    torch.testing.assert_close(flat_weights(model), expected, rtol=0, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("preset", ["aesam", "looksam"])
def test_switching_presets_take_fewer_passes_and_match_the_closure_api(
    tmp_path, preset: str, accumulation: int
) -> None:
    """ERM steps take one pass; the weights and the SAM/ERM decisions are those of SAM.step(closure); SAM is logged."""
    model, trainer, forwards = train(preset, trainer_arguments(tmp_path, gradient_accumulation_steps=accumulation))
    sam = trainer.optimizer.optimizer
    expected, reference = reference_closure(preset, step_batches(token_data(), accumulation))
    assert sam.steps == reference.steps == STEPS and sam.sam_steps == reference.sam_steps
    assert 0 < sam.sam_steps < STEPS
    assert forwards == accumulation * (STEPS + sam.sam_steps)
    torch.testing.assert_close(flat_weights(model), expected, rtol=0, atol=TOLERANCE["fp32"])
    last = [log for log in trainer.state.log_history if "loss" in log][-1]
    assert last["sam_fraction"] == sam.sam_steps / STEPS and last["sam_steps"] == sam.sam_steps
    assert last["sam_grad_norm"] == sam.last_grad_norm > 0
    if preset == "aesam":
        assert last["sam_policy_s"] == pytest.approx(reference.policy.last["s"], rel=1e-6)


def test_resume_from_a_checkpoint_continues_identically(tmp_path) -> None:
    """STEPS steps straight equal STEPS/2, a checkpoint, a new Trainer resumed from it and STEPS/2 more (AE-SAM)."""
    save = dict(gradient_accumulation_steps=2, save_strategy="steps", save_steps=STEPS // 2)
    straight, first, _ = train("aesam", trainer_arguments(tmp_path / "straight", **save))
    checkpoint = tmp_path / "straight" / f"checkpoint-{STEPS // 2}"
    resumed, second, forwards = train("aesam", trainer_arguments(tmp_path / "resumed", **save), resume=str(checkpoint))
    assert torch.equal(flat_weights(resumed), flat_weights(straight))
    assert second.optimizer.optimizer.statistics() == first.optimizer.optimizer.statistics()
    assert forwards == 2 * (STEPS // 2 + second.optimizer.optimizer.sam_steps - _sam_steps_at(checkpoint))


def _sam_steps_at(checkpoint) -> int:
    """The SAM step count saved in a Trainer checkpoint's optimizer state (SAM's own state, under "sam")."""
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    return state["param_groups"][0]["sam"]["sam_steps"]


def _overflowing_scaler(trainer: SAMTrainer) -> None:
    """fp16 as on a GPU, on the CPU: fp16 autocast and a GradScaler whose first scale overflows the loss (inf), so
    the first step is skipped and the scale drops to 2**10."""
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-117)
    trainer.accelerator.native_amp = True


@pytest.mark.parametrize("preset", ["sam", "aesam"])
def test_fp16_grad_scaler_skips_an_overflowing_step_as_if_it_was_never_tried(tmp_path, preset: str) -> None:
    """An inf first gradient skips the step (no base step, no schedule step, the policy untouched); the following
    steps are the reference's on the remaining batches, with the gradient at w + ε unscaled and clipped."""
    args = trainer_arguments(tmp_path, fp16=True, max_grad_norm=CLIP if preset == "sam" else 0.0)
    model, trainer, forwards = train(preset, args, setup=_overflowing_scaler)
    sam = trainer.optimizer.optimizer
    assert trainer.accelerator.scaler.get_scale() == 2.0**10 and sam.steps == STEPS - 1
    assert forwards == STEPS + sam.sam_steps
    batches = step_batches(token_data(), 1)[1:]
    if preset == "sam":
        expected = reference_sam(batches, torch.float16, CLIP)
    else:
        expected, reference = reference_closure(preset, batches, torch.float16)
        assert sam.sam_steps == reference.sam_steps
    torch.testing.assert_close(flat_weights(model), expected, rtol=0, atol=TOLERANCE["fp16"])


def test_sam_step_after_an_erm_answer_is_that_erm_step_and_discard_step_rolls_it_back() -> None:
    """``step()`` after ``wants_sam_step()`` said ERM equals ``erm_step()`` (what the Trainer's ``optimizer.step()``
    relies on); ``discard_step()`` rolls the decision back, so the step is asked again as if never tried."""
    models = [tiny_gpt2(), tiny_gpt2()]
    optimizers = [SAM(m.parameters(), torch.optim.SGD, **SGD, policy=EveryK(3, offset=2)) for m in models]
    batch = step_batches(token_data(), 1)[0]
    for action in ("finish", "discard", "finish"):  # EveryK(3, offset=2): steps 0 and 1 are ERM steps, step 2 SAM
        for model, optimizer, finish in zip(models, optimizers, (SAM.step, SAM.erm_step), strict=True):
            model(**batch).loss.backward()
            assert not optimizer.wants_sam_step()
            optimizer.discard_step() if action == "discard" else finish(optimizer)
            optimizer.zero_grad()
    assert optimizers[0].statistics() == optimizers[1].statistics() and optimizers[0].steps == 2
    assert torch.equal(flat_weights(models[0]), flat_weights(models[1]))
    models[0](**batch).loss.backward()
    assert optimizers[0].wants_sam_step()  # step 2: the discarded decision was not counted


def test_refusals_name_the_problem_and_the_fix(tmp_path) -> None:
    """A non-SAM optimizer (given or the Trainer's default) is refused when training starts."""
    model = tiny_gpt2()
    for optimizers in ((torch.optim.AdamW(model.parameters()), None), (None, None)):
        trainer = SAMTrainer(
            model=model, args=trainer_arguments(tmp_path), train_dataset=token_data(), optimizers=optimizers
        )
        with pytest.raises(TypeError, match=r"must be a sharpness.SAM .* got AdamW; pass optimizers="):
            trainer.train()


def test_ddp_two_processes_equal_one_process_on_the_global_batch(tmp_path) -> None:
    """2-process gloo DDP as torchrun sets it up (AE-SAM, accumulation 2): every replica ends with the weights,
    decisions and statistics of one process on the global batch (global ε: the first gradient is all-reduced)."""
    single = train_aesam(tmp_path, per_device_train_batch_size=2 * BATCH)
    assert single["wrapper"] == "GPT2LMHeadModel"
    for rank in spawn_ddp():
        assert rank["ddp"]["wrapper"] == "DistributedDataParallel"
        torch.testing.assert_close(rank["ddp"]["weights"], single["weights"], rtol=0, atol=TOLERANCE["fp32"])
        assert rank["ddp"]["statistics"] == pytest.approx(single["statistics"], rel=1e-4)
        assert rank["ddp"]["forwards"] == single["forwards"]


def guide_example() -> types.ModuleType:
    """The first ``python`` block after :data:`GUIDE` in the docs (whichever page holds it), run as a module."""
    pages = sorted((Path(__file__).resolve().parents[2] / "docs").glob("*.md"))
    text = next(text for text in (page.read_text() for page in pages) if GUIDE in text)
    code = text.split(GUIDE, 1)[1].split("```python\n", 1)[1].split("\n```", 1)[0]
    module = types.ModuleType("transformers_guide_example")
    exec(compile(code, "the docs' SAMTrainer example", "exec"), module.__dict__)
    return module


def test_the_guide_example_takes_sam_steps_and_logs_them(tmp_path) -> None:
    """The docs' example, as written (on the CPU): every step a SAM step, logged, the weights finite."""
    trainer = guide_example().train(str(tmp_path), use_cpu=True, disable_tqdm=True)
    sam = trainer.optimizer.optimizer
    assert sam.steps == sam.sam_steps == trainer.args.max_steps
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["sam_fraction"] for log in logs] == [1.0] * sam.steps
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
