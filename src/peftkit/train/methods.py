"""Fine-tuning methods the CLI knows: one table entry per method.

Each entry names the method's ``peft_type`` in the library registry (which gives the config class) and maps the generic CLI knobs (r, alpha, dropout, targets) onto
that class's fields, plus fixed extras (DoRA is LoRA with ``use_dora=True``). Adding a method (IA3, LoHa,
...) is one more entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.train.errors import PeftkitError


@dataclass(frozen=True)
class Method:
    """How to build one method's config: its registered ``peft_type``, which CLI knobs it takes, and the peak
    learning rate used when ``--lr`` is not given (one that trains on the bundled data: the table below)."""

    peft_type: str
    knobs: dict[str, str]  # CLI knob -> config field
    extras: dict[str, object] = field(default_factory=dict)
    lr: float = 2e-3


LORA_KNOBS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules"}

TARGETS = {"targets": "target_modules"}
VIRTUAL_TOKENS = {"num_virtual_tokens": 20}

# The default peak lr of each method (AdamW, cosine after 5 warmup steps, the bundled data and model). Low-rank
# updates (LoRA family, LoHa, LoKr) and OFT's rotations take 2e-3 (OFT diverges at 5e-3 and 2e-2); methods that
# train only scale vectors, norms or virtual tokens take 1e-2 to 3e-2. What each value was measured with on
# the embedded SmolLM2-135M-Instruct: docs/methods.md, "Default learning rates".
METHODS: dict[str, Method] = {
    "lora": Method("LORA", LORA_KNOBS),
    "dora": Method("LORA", LORA_KNOBS, {"use_dora": True}),
    "rslora": Method("LORA", LORA_KNOBS, {"use_rslora": True}),
    # --r is AdaLoRA's target average rank; every layer starts at init_r=12 and the budget shrinks to it
    "adalora": Method(
        "ADALORA",
        {
            "r": "target_r",
            "alpha": "lora_alpha",
            "dropout": "lora_dropout",
            **TARGETS,
            "total_steps": "total_step",
        },
    ),
    "ia3": Method("IA3", TARGETS, lr=2e-2),
    "loha": Method("LOHA", {"r": "r", "alpha": "alpha", "dropout": "module_dropout", **TARGETS}),
    "lokr": Method("LOKR", {"r": "r", "alpha": "alpha", "dropout": "module_dropout", **TARGETS}),
    "vera": Method("VERA", {"r": "r", "dropout": "vera_dropout", **TARGETS}, lr=2e-2),
    "oft": Method("OFT", {"dropout": "module_dropout", **TARGETS}, lr=2e-3),
    "boft": Method("BOFT", {"dropout": "boft_dropout", **TARGETS}, lr=2e-2),
    "ln_tuning": Method("LN_TUNING", {}, lr=1e-2),
    "prompt_tuning": Method("PROMPT_TUNING", {}, VIRTUAL_TOKENS, lr=2e-2),
    "prefix_tuning": Method("PREFIX_TUNING", {}, VIRTUAL_TOKENS, lr=3e-2),
    "p_tuning": Method("P_TUNING", {}, {**VIRTUAL_TOKENS, "encoder_hidden_size": 128}, lr=1e-2),
}


def default_lr_text() -> str:
    """`method lr` pairs for `--lr`'s help, e.g. `lora 2e-3, ia3 2e-2, ...`."""
    return ", ".join(f"{name} {spec.lr:.0e}".replace("e-0", "e-") for name, spec in METHODS.items())


def build_peft_config(method: str, knobs: dict[str, object]):
    """The peftkit config for ``method``; ``knobs`` maps CLI knob names to values (None = method default)."""
    from peftkit.registry import get_method

    if method not in METHODS:
        raise PeftkitError(f"unknown --method {method!r}; choose one of: {', '.join(METHODS)}")
    spec = METHODS[method]
    kwargs = {spec.knobs[k]: v for k, v in knobs.items() if v is not None and k in spec.knobs}
    config_class = get_method(spec.peft_type).config_cls
    return config_class(task_type="CAUSAL_LM", **kwargs, **spec.extras)
