"""``peftkit train`` (the arguments after the script name), reporting what this process loaded to
``$PEFTKIT_PROBE_DIR/rank<R>.json``; run under ``torchrun`` by ``test_fsdp_sharded_load.py`` and
``benchmarks/README.md``'s FSDP memory line.

Recorded: every opening of a ``.safetensors`` file (Python ``open`` through an audit hook, and the
``safetensors`` readers transformers uses, which open the file in Rust), whether ``from_pretrained`` ran,
the resident memory just before the model load, the peak (``ru_maxrss``) once the model is sharded and
filled, and the bytes of base-model parameters this process then holds (its local shards).
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import sys
from pathlib import Path


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    out = Path(os.environ["PEFTKIT_PROBE_DIR"])
    rank = int(os.environ.get("RANK", "0"))
    seen: dict = {"rank": rank, "opened": [], "from_pretrained": 0}

    def audit(event: str, args: tuple) -> None:
        if event == "open" and str(args[0]).endswith(".safetensors"):
            seen["opened"].append(str(args[0]))

    sys.addaudithook(audit)
    import safetensors
    import safetensors.torch
    import torch
    import torch.distributed.checkpoint.state_dict  # noqa: F401  (imported now: not counted as loading)
    import torch.distributed.fsdp  # noqa: F401
    import transformers
    import transformers.modeling_utils  # noqa: F401  (binds its own `safe_open` name)
    import transformers.models.llama.modeling_llama  # noqa: F401

    import peftkit.train.distributed as distributed
    import peftkit.train.loop as loop
    from peftkit.cli import main as cli_main

    originals = {safetensors.safe_open, safetensors.torch.load_file, safetensors.torch.safe_open}

    def recording(fn):
        def wrapper(filename, *args, **kwargs):
            seen["opened"].append(str(filename))
            return fn(filename, *args, **kwargs)

        return wrapper

    for module in list(sys.modules.values()):  # every module-level name bound to a safetensors reader
        for attr in ("safe_open", "load_file"):
            fn = getattr(module, attr, None)
            if fn in originals:
                setattr(module, attr, recording(fn))

    auto = transformers.AutoModelForCausalLM
    real_from_pretrained = auto.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        seen["from_pretrained"] += 1
        return real_from_pretrained(cls, *args, **kwargs)

    auto.from_pretrained = classmethod(from_pretrained)

    real_load = loop.load_model_and_tokenizer

    def load(*args, **kwargs):
        seen["rss_before_load_mb"] = rss_mb()
        seen["peak_before_load_mb"] = peak_mb()
        return real_load(*args, **kwargs)

    loop.load_model_and_tokenizer = load
    real_wrap = distributed.Dist.wrap

    def wrap(self, model):
        runner = real_wrap(self, model)
        seen["peak_after_wrap_mb"] = peak_mb()
        seen["base_param_bytes_here"] = sum(
            (p.to_local() if hasattr(p, "to_local") else p).nbytes
            for p in model.parameters()
            if not p.requires_grad
        )
        inner = model.get_base_model()
        seen["tied"] = inner.get_output_embeddings().weight is inner.get_input_embeddings().weight
        rotary = getattr(inner.model, "rotary_emb", None)
        if rotary is not None:
            seen["inv_freq"] = rotary.inv_freq.tolist()
        return runner

    distributed.Dist.wrap = wrap
    real_held_out = loop.held_out_metrics

    def held_out(*args, **kwargs):  # the peak before and after each held-out evaluation ("before", "after")
        seen[f"peak_before_eval_{args[-1]}_mb"] = peak_mb()
        result = real_held_out(*args, **kwargs)
        seen[f"peak_after_eval_{args[-1]}_mb"] = peak_mb()
        return result

    loop.held_out_metrics = held_out

    def dump() -> None:
        seen["peak_mb"] = peak_mb()
        (out / f"rank{rank}.json").write_text(json.dumps(seen))

    atexit.register(dump)
    torch.set_num_threads(1)
    args = sys.argv[1:]
    sys.exit(cli_main(args[1:] if args[:1] == ["--"] else args))  # `--` ends torchrun's own flags


if __name__ == "__main__":
    main()
