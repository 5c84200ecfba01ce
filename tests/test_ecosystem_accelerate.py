"""A plain accelerate loop around a peftkit model, side by side with HF peft.

accelerate special-cases HF peft only in FSDP's adapter-only state dicts (`fsdp_utils`, used by Trainer under
FSDP), which needs several processes; the single-process path below is the one every user takes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft as hf_peft
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

import peftkit

from .test_trainer import DATASET, FIXED_BATCH, adapter_tensors, tiny_gpt2

LIBS = {"peftkit": peftkit, "hf": hf_peft}


@pytest.fixture(autouse=True)
def fresh_accelerator_state() -> Any:
    """accelerate keeps one process-wide state: a TRL config run earlier (bf16 by default) would leave it in
    bf16 autocast. Each test here starts from a fresh fp32 state."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def prepared(lib: Any) -> tuple[Accelerator, Any, Any, Any]:
    set_seed(0)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    model = lib.get_peft_model(tiny_gpt2(), lib.LoraConfig(r=4, task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = DataLoader(DATASET, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return accelerator, model, optimizer, loader


def train(accelerator: Accelerator, model: Any, optimizer: Any, loader: Any, steps: int) -> list[float]:
    model.train()
    losses = []
    for step, batch in enumerate(loader):
        if step == steps:
            break
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_accelerate_loop_matches_hf_peft_and_saves_only_the_adapter(tmp_path: Path) -> None:
    results = {}
    for name, lib in LIBS.items():
        accelerator, model, optimizer, loader = prepared(lib)
        losses = train(accelerator, model, optimizer, loader, steps=3)
        results[name] = (losses, adapter_tensors(accelerator.unwrap_model(model)))
        accelerator.unwrap_model(model).save_pretrained(tmp_path / name)
        accelerator.end_training()
    assert results["peftkit"][0] == pytest.approx(results["hf"][0], rel=1e-5)
    for key, value in results["hf"][1].items():
        torch.testing.assert_close(results["peftkit"][1][key], value, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "peftkit").iterdir()) == sorted(
        p.name for p in (tmp_path / "hf").iterdir()
    )  # the adapter, its config and the model card, as HF peft writes
    assert (tmp_path / "peftkit" / "adapter_model.safetensors").stat().st_size < 100_000


def step_on(accelerator: Accelerator, model: Any, optimizer: Any, batch: dict[str, torch.Tensor]) -> None:
    model.train()
    accelerator.backward(model(**batch).loss)
    optimizer.step()
    optimizer.zero_grad()


def test_accelerate_save_state_and_load_state_resume_the_adapter_and_optimizer(tmp_path: Path) -> None:
    accelerator, model, optimizer, loader = prepared(peftkit)
    train(accelerator, model, optimizer, loader, steps=2)
    accelerator.save_state(str(tmp_path / "state"))
    after_two = adapter_tensors(accelerator.unwrap_model(model))
    step_on(accelerator, model, optimizer, FIXED_BATCH)
    reference = adapter_tensors(accelerator.unwrap_model(model))

    accelerator2, model2, optimizer2, _ = prepared(peftkit)
    accelerator2.load_state(str(tmp_path / "state"))
    restored = adapter_tensors(accelerator2.unwrap_model(model2))
    for key, value in after_two.items():
        assert torch.equal(restored[key], value), key
    # the same next step as the original run: AdamW's moments were restored too
    step_on(accelerator2, model2, optimizer2, FIXED_BATCH)
    resumed = adapter_tensors(accelerator2.unwrap_model(model2))
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-6, atol=1e-7, msg=key)
