"""Trainable parameters and adapter-file size per weight-changing method, peftkit vs HF peft.

    python benchmarks/method_sizes.py

The base is the SmolLM2-135M architecture with random seeded weights (no download). Each method runs at its
default config (targets: the architecture default, e.g. q_proj/v_proj for LoRA, VeRA, LoHa, LoKr, OFT and
BOFT; k_proj, v_proj, down_proj for IA3; the norms for LN tuning). Prints a Markdown table; the two libraries
must agree.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings

import peft
import torch
from train_step import SMOLLM2_135M  # benchmarks/ is on sys.path when run as a script
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit

METHODS = [
    "LoraConfig",
    "IA3Config",
    "LNTuningConfig",
    "VeraConfig",
    "LoHaConfig",
    "LoKrConfig",
    "OFTConfig",
    "BOFTConfig",
]


def smollm2_135m() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_135M)  # the same architecture as the train-step benchmark
    return LlamaForCausalLM(config).eval()


def measure(lib, config_name: str, base: torch.nn.Module) -> tuple[int, int]:
    """(trainable parameters, bytes of adapter_model.safetensors) for one library and method."""
    model = lib.get_peft_model(copy.deepcopy(base), getattr(lib, config_name)(task_type="CAUSAL_LM"))
    trainable, _ = model.get_nb_trainable_parameters()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        size = os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))
    return trainable, size


def main() -> None:
    warnings.filterwarnings("ignore")
    base = smollm2_135m()
    print(
        "| method (default config) | peftkit trainable | HF peft trainable | peftkit file bytes | HF peft file bytes |"
    )
    print("|---|---:|---:|---:|---:|")
    for name in METHODS:
        (ours, our_size), (theirs, their_size) = measure(peftkit, name, base), measure(peft, name, base)
        print(f"| {name} | {ours:,} | {theirs:,} | {our_size:,} | {their_size:,} |", flush=True)


if __name__ == "__main__":
    main()
