"""The tiny model, data and arguments of the SAMTrainer tests, and their 2-process DDP run (gloo, spawned).

No download: the model is a 1-layer GPT-2 built from a config, the data random token ids.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from spawned import run_spawned
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

import sharpness
from sharpness.integrations.transformers import SAMTrainer

STEPS = 4  # optimizer steps of every run
BATCH = 2  # examples per device and micro-batch
VOCAB, LENGTH, EXAMPLES = 32, 8, 32


def tiny_gpt2() -> GPT2LMHeadModel:
    """A 1-layer GPT-2 (width 16, dropout off), the same weights on every call."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=LENGTH,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    # The name GPT2LMHeadModel maps to no loss type, so the Trainer would count num_items_in_batch over unshifted
    # labels (L per sequence instead of L - 1) and scale the loss by (L - 1) / L; name the loss it computes.
    model.loss_type = "ForCausalLM"
    return model


def token_data() -> list[dict[str, torch.Tensor]]:
    """``EXAMPLES`` causal-LM examples of random token ids (labels = inputs), the same on every call."""
    ids = torch.randint(0, VOCAB, (EXAMPLES, LENGTH), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def trainer_arguments(path: Path | str, **overrides: Any) -> TrainingArguments:
    """CPU, ``STEPS`` steps, sequential batches of ``BATCH``, no clipping, no saving, logs every step."""
    base = dict(
        output_dir=str(path),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        train_sampling_strategy="sequential",
        disable_tqdm=True,
        max_grad_norm=0.0,
        seed=0,
    )
    return TrainingArguments(**{**base, **overrides})


def flat_weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train_aesam(path: Path | str, **overrides: Any) -> dict[str, Any]:
    """AE-SAM with accumulation 2: the final weights, SAM's statistics, the number of forward passes (on this
    process) and the class of the Trainer's wrapped model."""
    model = tiny_gpt2()
    calls: list[int] = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    optimizer = sharpness.AESAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
    args = trainer_arguments(path, gradient_accumulation_steps=2, **overrides)
    trainer = SAMTrainer(model=model, args=args, train_dataset=token_data(), optimizers=(optimizer, None))
    trainer.train()
    return {
        "weights": flat_weights(model),
        "statistics": optimizer.statistics(),
        "forwards": len(calls),
        "wrapper": type(trainer.model_wrapped).__name__,
    }


def scenario_ddp(rank: int, world_size: int) -> dict[str, Any]:
    """One replica of a torchrun-style run: the distributed environment the Trainer reads, then AE-SAM training."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    with tempfile.TemporaryDirectory() as path:
        return train_aesam(path)


def spawn_ddp() -> list[dict[str, Any]]:
    """:func:`scenario_ddp` on 2 spawned gloo processes; each rank's result."""
    return run_spawned({"ddp": scenario_ddp}, world_size=2, timeout=180.0)
