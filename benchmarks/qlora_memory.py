"""QLoRA memory: fp32 LoRA vs the reference NF4 stack vs peftkit's lean NF4, peak RSS and step time.

    python benchmarks/qlora_memory.py                 # TinyLlama shape (1.1B), ~8 GB free RAM, several minutes
    python benchmarks/qlora_memory.py --shape small   # the same run on a 4-layer, 512-wide Llama (seconds)
    options: --seq 256 --steps 1 --threads N --checkpointing qlora|none|all --only fp32,reference,peftkit
             --model-dir DIR

The random checkpoint (TinyLlama-1.1B's shape: hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV
heads, vocab 32000; fp32 safetensors written by `save_pretrained`) is made once in a child process and reused
from --model-dir. Then three child processes, one after the other, each load it and run --steps training
steps (forward + backward + AdamW) of LoRA r=16 (alpha 32) on every linear layer, batch 1 x --seq tokens,
labels on every token:

  fp32       transformers `from_pretrained(dtype=float32)` + peftkit LoRA
  reference  transformers `from_pretrained(quantization_config=BitsAndBytesConfig(NF4, double quant,
             compute float32))` + HF peft LoRA (the stack most QLoRA users run)
  peftkit    `peftkit.stream_load.load_quantized(bits=4, NF4, double quant)` + peftkit LoRA

Gradient checkpointing (--checkpointing):
  qlora (default)  the two NF4 sides call their library's `prepare_model_for_kbit_training` with its defaults,
                   which turn gradient checkpointing on (what the QLoRA recipe does); the fp32 side is the
                   plain default LoRA run, no checkpointing
  none             no side checkpoints (the NF4 sides skip prepare_model_for_kbit_training)
  all              every side checkpoints (fp32: gradient_checkpointing_enable, non-reentrant)

Peak RSS is each child's own VmHWM (= `ru_maxrss`, loading included), with VmRSS sampled after loading, after
the forward and after the backward of the first step; step time is the median of the steps after the first
(the one step when --steps 1, the default: the brief's "one train step"). Step times are only comparable on an
idle machine; memory is.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "full": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "small": dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=32000,
    ),
}
SIDES = ("fp32", "reference", "peftkit")
GIB = 1024**3


def make_checkpoint(shape: str, folder: Path) -> None:
    """Write a random Llama of `shape` with save_pretrained (fp32 safetensors), unless already there."""
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=False, **SHAPES[shape])
    LlamaForCausalLM(config).save_pretrained(folder)


def load(side: str, folder: Path):
    import torch

    if side == "peftkit":
        from peftkit.stream_load import load_quantized

        return load_quantized(
            folder, bits=4, quant_type="nf4", double_quant=True, compute_dtype=torch.float32
        )
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if side == "fp32":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.float32)


def vm(field: str) -> int:
    """This process's /proc/self/status `field` (VmRSS, VmHWM, RssAnon, RssFile) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child(a: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    base = load(a.side, Path(a.model_dir))
    load_s = time.perf_counter() - t0
    rss = {"load peak": vm("VmHWM"), "after load": vm("VmRSS")}
    options = dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    if a.side == "reference":
        import peft as lib
    else:
        import peftkit as lib
    if a.side != "fp32" and a.checkpointing in ("qlora", "all"):
        base = lib.prepare_model_for_kbit_training(base)  # its defaults: gradient checkpointing on
    elif a.checkpointing == "all":
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = bool(getattr(base, "is_gradient_checkpointing", False))
    torch.manual_seed(0)
    model = lib.get_peft_model(base, lib.LoraConfig(**options))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, base.config.vocab_size, (1, a.seq), generator=torch.Generator().manual_seed(0))
    times, losses = [], []
    for _ in range(a.steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        rss.setdefault("after forward", vm("VmRSS"))
        loss.backward()
        rss.setdefault("after backward", vm("VmRSS"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    return {
        "side": a.side,
        "peak_rss": max(vm("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "rss": rss,
        "checkpointing": checkpointed,
        "load_s": load_s,
        "step_s": statistics.median(times[1:] or times),
        "first_step_s": times[0],
        "losses": losses,
        "trainable": sum(p.numel() for p in params),
    }


def run_child(a: argparse.Namespace, side: str) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--model-dir", a.model_dir, "--seq", str(a.seq)]
    cmd += ["--steps", str(a.steps), "--threads", str(a.threads), "--checkpointing", a.checkpointing]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{side} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="full")
    p.add_argument("--model-dir", default=None, help="where the random checkpoint is (made if missing)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpointing", choices=("qlora", "none", "all"), default="qlora")
    p.add_argument("--only", default=",".join(SIDES))
    p.add_argument("--child", choices=SIDES, dest="side", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        print(json.dumps(child(a)))
        return
    a.model_dir = a.model_dir or f"/tmp/peftkit-qlora-bench-{a.shape}"
    folder = Path(a.model_dir)
    t = time.perf_counter()
    made = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import qlora_memory as q; q.make_checkpoint({a.shape!r}, __import__('pathlib').Path({a.model_dir!r}))",
        ],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        raise SystemExit(f"making the checkpoint failed:\n{made.stderr[-3000:]}")
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / GIB
    print(f"checkpoint {folder} ({a.shape}, {size:.2f} GiB fp32, ready in {time.perf_counter() - t:.0f} s)")
    print(
        f"LoRA r=16 all-linear, batch 1x{a.seq}, {a.steps} steps, {a.threads} thread(s), "
        f"--checkpointing {a.checkpointing}; RSS in GiB"
    )
    print(
        f"{'side':10} {'ckpt':>4} {'peak':>6} {'load pk':>7} {'loaded':>6} {'fwd':>6} {'bwd':>6} {'load s':>7} "
        f"{'step s':>7}  losses",
        flush=True,
    )
    results = {}
    for side in a.only.split(","):
        r = results[side] = run_child(a, side)
        m = {k: v / GIB for k, v in r["rss"].items()}
        print(
            f"{side:10} {'on' if r['checkpointing'] else 'off':>4} {r['peak_rss'] / GIB:6.2f} {m['load peak']:7.2f} "
            f"{m['after load']:6.2f} {m['after forward']:6.2f} {m['after backward']:6.2f} {r['load_s']:7.1f} "
            f"{r['step_s']:7.2f}  {[round(x, 3) for x in r['losses']]}",
            flush=True,
        )
    if "peftkit" in results:
        ours = results["peftkit"]["peak_rss"]
        for other, goal in (("fp32", 0.35), ("reference", 0.5)):
            if other in results:
                ratio = ours / results[other]["peak_rss"]
                step = results["peftkit"]["step_s"] / results[other]["step_s"]
                print(f"peftkit NF4 / {other}: peak RSS {ratio:.3f}x (goal <= {goal}), step time {step:.2f}x")


if __name__ == "__main__":
    main()
