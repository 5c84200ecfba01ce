"""``transformers.Trainer`` on a peftkit LoRA model, as users run it: plain, or under ``torchrun`` (DDP, or
FSDP2 with ``--fsdp``). Writes the final adapter with ``trainer.save_model`` into ``--output``.

    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/ddp_trainer_script.py \
        --model TINY --output OUT --batch-size 2 [--fsdp]

With ``--fsdp`` the Trainer is given ``fsdp_config={"fsdp_version": 2, ...}``. On CPU this still runs DDP:
accelerate (1.15, ``AcceleratorState``) turns the FSDP plugin on only for accelerator devices (MULTI_GPU,
MULTI_XPU, ...), never for MULTI_CPU, so the printed wrapper says which one ran.

The data is a tokenized ``datasets.Dataset`` of fixed-length rows (labels -100 on padding), read in order
(``train_sampling_strategy="sequential"``) so N processes at batch b see the global batches one process sees
at N·b.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--fsdp", action="store_true")
    args = p.parse_args(argv)

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    import peftkit

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.train.tiny import rows

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = [f"{r['instruction']} {r['input']} -> {r['output']}" for r in rows(16)]
    enc = tokenizer(texts, padding="max_length", max_length=24, truncation=True)
    labels = [
        [t if m else -100 for t, m in zip(ids, mask)]
        for ids, mask in zip(enc["input_ids"], enc["attention_mask"])
    ]
    data = datasets.Dataset.from_dict({**enc, "labels": labels})

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = peftkit.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = peftkit.get_peft_model(base, config)

    fsdp = {}
    if args.fsdp:
        fsdp = {
            "fsdp": "full_shard",
            "fsdp_config": {
                "fsdp_version": 2,
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                "reshard_after_forward": True,
                "state_dict_type": "FULL_STATE_DICT",
            },
        }
    training = TrainingArguments(
        output_dir=args.output,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **fsdp,
    )
    trainer = Trainer(model=model, args=training, train_dataset=data)
    trainer.train()
    trainer.save_model(args.output)
    if trainer.is_world_process_zero():
        wrapper = type(trainer.model_wrapped).__name__  # DistributedDataParallel, or the FSDP2 class
        print(f"world {trainer.args.world_size}; model run through {wrapper}; saved to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
