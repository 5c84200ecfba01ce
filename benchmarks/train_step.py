"""Train-step benchmark: HF peft vs peftkit on SmolLM2-135M (fp32, random seeded weights), side by side.

    python benchmarks/train_step.py [--quick] [--steps N] [--no-rss] [--shapes 4x128,8x512]

Times: one process holds an HF-peft model and a peftkit model built from the same weights and runs their
steps interleaved (HF, peftkit, HF, peftkit, ...) on the same batch, so load from other processes hits both
alike; medians are printed with the ratio peftkit/HF. A step is forward + backward + AdamW step.
Peak RSS: one fresh child process per (library, configuration), run one after another; each builds the
model, takes two steps and reports its own peak RSS (VmHWM).
Each row also prints the fraction of the fp32 GEMM floor it reaches (benchmarks/flops.py: its matmul FLOPs
over this machine's `torch.mm` peak, divided by the measured time).
Rows: LoRA r=16 on q,v and on all linear layers, labels on every position ("all") or instruction-style
("instr": the first half of each row is -100); a no-grad forward (the yardstick: a LoRA step can approach
about two of them) and a full fine-tuning step (plain transformers) for scale.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from flops import forward_flops, gemm_peak, train_step_flops  # noqa: E402

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
)
TARGETS = {"qv": ["q_proj", "v_proj"], "all": "all-linear"}


def base_model(seed: int = 0) -> torch.nn.Module:
    """SmolLM2-135M architecture with seeded random weights, fp32, train mode."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).float().train()


def make_batch(shape: tuple[int, int], labels: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels (batch, seq); labels 'instr' masks the first half with -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], shape, generator=g)
    lab = ids.clone()
    if labels == "instr":
        lab[:, : shape[1] // 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": lab}


def build(lib: str, target: str, seed: int = 0) -> torch.nn.Module:
    """lib: 'hf' (HF peft), 'peftkit', or 'full' (plain transformers, every weight trains)."""
    model = base_model(seed)
    if lib == "full":
        return model
    mod = __import__("peft" if lib == "hf" else "peftkit")
    config = mod.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS[target], task_type="CAUSAL_LM")
    return mod.get_peft_model(model, config).train()


def stepper(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One training step (forward, backward, AdamW) as a closure."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def forward_only(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def fwd() -> None:
        with torch.no_grad():
            model(**inputs)

    return fwd


def timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleave(fns: dict[str, Callable[[], None]], steps: int) -> dict[str, float]:
    """One warm-up call each, then `steps` rounds A, B, A, B...; median seconds per name."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def rss_mib() -> float:
    """This process's peak RSS in MiB: VmHWM of its own address space. (ru_maxrss is not used: Linux carries
    the parent's RSS at fork into a child's ru_maxrss across exec, so a child started by a large benchmark
    process would report the parent's size.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(spec: dict) -> None:
    """Run in a fresh process: build, take two steps (or forwards), print this process's peak RSS."""
    torch.set_num_threads(2)
    shape = tuple(spec["shape"])
    model = build(spec["lib"], spec.get("target", "qv")) if spec["kind"] == "step" else base_model()
    batch = make_batch(shape, spec.get("labels", "all"))
    fn = stepper(model, batch) if spec["kind"] == "step" else forward_only(model, batch)
    for _ in range(spec.get("steps", 2)):
        fn()
    print(json.dumps({"peak_rss_mib": rss_mib()}))


def peak_rss(spec: dict) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def rows_for(shape: tuple[int, int], steps: int, args: argparse.Namespace) -> list[dict]:
    """Time the selected configurations of one batch shape; returns table rows."""
    rows = []
    if not args.no_scale:
        rows += scale_rows(shape, steps)
    for target in args.targets.split(","):
        rows += lora_rows(shape, steps, target, args.labels.split(","))
    return rows


def scale_rows(shape: tuple[int, int], steps: int) -> list[dict]:
    """The no-grad forward and the full fine-tuning step (plain transformers)."""
    rows = []
    batch = make_batch(shape, "all")
    plain = base_model()
    t = interleave({"fwd": forward_only(plain, batch), "full": stepper(plain, batch)}, steps)
    rows.append(
        {"shape": shape, "config": "no-grad forward (plain)", "labels": "-", "kind": "fwd", "hf": t["fwd"]}
    )
    rows.append(
        {"shape": shape, "config": "full fine-tune (plain)", "labels": "all", "kind": "full", "hf": t["full"]}
    )
    return rows


def lora_rows(shape: tuple[int, int], steps: int, target: str, label_modes: list[str]) -> list[dict]:
    """HF peft vs peftkit LoRA steps, interleaved, for each label mode."""
    rows = []
    hf, pk = build("hf", target), build("peftkit", target)
    for labels in label_modes:
        batch = make_batch(shape, labels)
        with torch.no_grad():
            diff = abs(hf(**batch).loss.item() - pk(**batch).loss.item())
        t = interleave({"hf": stepper(hf, batch), "peftkit": stepper(pk, batch)}, steps)
        rows.append(
            {
                "shape": shape,
                "config": f"LoRA r16 {target}",
                "labels": labels,
                "kind": "step",
                "target": target,
                "hf": t["hf"],
                "peftkit": t["peftkit"],
                "loss_diff": diff,
            }
        )
        print(
            f"  {shape} {target} {labels}: hf {t['hf']:.3f}s peftkit {t['peftkit']:.3f}s "
            f"(|dloss| at init {diff:.1e})",
            flush=True,
        )
    return rows


def add_rss(row: dict) -> None:
    spec = {
        "kind": row["kind"] if row["kind"] != "full" else "step",
        "shape": list(row["shape"]),
        "labels": row["labels"] if row["labels"] != "-" else "all",
        "target": row.get("target", "qv"),
    }
    if row["kind"] == "step":
        row["hf_rss"] = peak_rss({**spec, "lib": "hf"})
        row["peftkit_rss"] = peak_rss({**spec, "lib": "peftkit"})
    else:  # plain transformers: shown in the HF column
        row["hf_rss"] = peak_rss({**spec, "lib": "full"})


def fmt(v: float | None, unit: str = "") -> str:
    return "-" if v is None else f"{v:.3f}{unit}" if unit == "s" else f"{v:,.0f}"


def floor_flops(row: dict) -> float | None:
    """Matmul FLOPs of the row's work (benchmarks/flops.py): a no-grad forward, or a LoRA step with the head at
    the labelled rows only (q,v rows leave out the two adapted layers' rank-16 products, <0.5% of the step).
    None for the full fine-tune (its weight gradients are not a LoRA step's)."""
    config = LlamaConfig(**SMOLLM2_135M)
    b, t = row["shape"]
    if row["kind"] == "fwd":
        return forward_flops(config, b * t, t / 2, b * t)
    if row["kind"] != "step":
        return None
    labelled = b * t if row["labels"] == "all" else b * (t - t // 2)
    return train_step_flops(config, b * t, t / 2, labelled, 16 if row.get("target") == "all" else 0)


def print_table(rows: list[dict]) -> None:
    peak, _ = gemm_peak(torch.get_num_threads())
    print(f"fp32 GEMM peak (torch.mm 2048^3, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s")
    head = (
        "| batch | configuration | labels | HF peft s | peftkit s | time ratio | HF floor | peftkit floor "
        "| HF RSS MiB | peftkit RSS MiB | RSS ratio |"
    )
    print(head)
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        flops = floor_flops(r)
        floor = {k: f"{flops / peak / r[k]:.2f}" if flops and r.get(k) else "-" for k in ("hf", "peftkit")}
        hf, pk = r.get("hf"), r.get("peftkit")
        hr, pr = r.get("hf_rss"), r.get("peftkit_rss")
        ratio = f"{pk / hf:.2f}" if hf and pk else "-"
        rratio = f"{pr / hr:.2f}" if hr and pr else "-"
        batch = f"{r['shape'][0]}x{r['shape'][1]}"
        print(
            f"| {batch} | {r['config']} | {r['labels']} | {fmt(hf, 's')} | {fmt(pk, 's')} | {ratio} "
            f"| {floor['hf']} | {floor['peftkit']} | {fmt(hr)} | {fmt(pr)} | {rratio} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only 4x128, 3 timed steps")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration (after 1 warm-up)")
    ap.add_argument("--shapes", default=None, help="comma-separated BxT, default 4x128,8x512")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    ap.add_argument("--targets", default="qv,all", help="LoRA targets to run: qv, all (comma-separated)")
    ap.add_argument("--labels", default="all,instr", help="label modes to run: all, instr (comma-separated)")
    ap.add_argument(
        "--no-scale", action="store_true", help="skip the no-grad forward and full fine-tune rows"
    )
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    torch.set_num_threads(2)
    shapes = args.shapes or ("4x128" if args.quick else "4x128,8x512")
    parsed = [tuple(int(x) for x in s.split("x")) for s in shapes.split(",")]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, shapes {shapes}", flush=True)
    rows = []
    for shape in parsed:
        steps = args.steps or (3 if args.quick or shape[0] * shape[1] > 1024 else 5)
        rows += rows_for(shape, steps, args)
    if not args.no_rss:
        for row in rows:
            add_rss(row)
    if args.json:  # first, so a printing problem cannot lose a long run
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print_table(rows)


if __name__ == "__main__":
    main()
