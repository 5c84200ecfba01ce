"""The options of ``peftkit train``: one dataclass, documented once; the CLI flags are built from it.

A YAML/JSON config file may set any field; command-line flags override the file. The defaults are the
bundled run (embedded SmolLM2-135M-Instruct, bundled date-extraction data), sized to finish in under ten
minutes on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from peftkit.train.errors import PeftkitError
from peftkit.train.methods import METHODS, default_lr_text

# The bundled run's length when the user sets neither --epochs nor --max-steps (see `resolve_length`).
DEFAULT_MAX_STEPS = 45


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainOptions:
    """Every knob of a training run. ``None`` means "decided at run time" (see each help text)."""

    model: str | None = _opt(
        None, "base model: a local HF folder or Hub id (default: the embedded SmolLM2-135M-Instruct)"
    )
    data: list[str] | None = _opt(
        None,
        "training data: .json/.jsonl/.csv/.parquet files or a datasets Hub name (default: the bundled date-extraction set)",
        nargs="+",
    )
    eval_data: list[str] | None = _opt(
        None,
        "held-out data in the same forms (default: the bundled held-out set, or --eval-split of --data)",
        nargs="+",
    )
    eval_split: float | None = _opt(
        None, "hold out this fraction of --data for evaluation when --eval-data is not given"
    )
    eval_limit: int | None = _opt(
        200, "evaluate loss and exact match on at most this many held-out rows (0 = all)"
    )
    skip_eval_before: bool = _opt(
        False, "do not evaluate the base model before training (the report then shows the trained model only)"
    )
    no_eval_cache: bool = _opt(
        False,
        "evaluate the base model before training even if an earlier run stored that evaluation (same model "
        "files, held-out rows, settings and peftkit; kept in the cache dir's eval/ folder)",
    )
    method: str = _opt(
        "lora",
        "fine-tuning method: lora, dora, rslora, adalora, ia3, loha, lokr, vera, oft, boft, ln_tuning, prompt_tuning,"
        " prefix_tuning or p_tuning (--r/--alpha/--dropout/--targets apply where the method has them)",
    )
    r: int = _opt(8, "adapter rank")
    alpha: float = _opt(16, "adapter scaling alpha (scale = alpha / r)")
    dropout: float = _opt(0.0, "dropout on the adapter input")
    targets: list[str] | None = _opt(
        None,
        "module names to adapt, e.g. q_proj v_proj (default: all linear layers of the attention and MLP blocks)",
        nargs="+",
    )
    epochs: float = _opt(
        1.0,
        "passes over the training data, e.g. 2 or 0.5; decides the run length when --max-steps is not given "
        f"(with neither flag the run is {DEFAULT_MAX_STEPS} steps)",
        show_default=False,
    )
    max_steps: int | None = _opt(
        DEFAULT_MAX_STEPS,
        "optimizer steps to run; when given, it sets the run length and --epochs is not used, as in "
        "transformers.Trainer (0 = let --epochs decide, 1 epoch if not given). Default: "
        f"{DEFAULT_MAX_STEPS} when --epochs is not given either",
        show_default=False,
    )
    batch_size: int = _opt(
        8,
        "rows per micro-batch, per process: under torchrun/accelerate launch with N processes a step trains on "
        "batch-size x grad-accum x N rows",
    )
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float | None = _opt(
        None,
        "peak learning rate (AdamW); default: the method's own, one that trains on the bundled data: "
        + default_lr_text(),
    )
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    scheduler: str = _opt("cosine", "learning-rate schedule after warmup: linear, cosine or constant")
    warmup: int = _opt(5, "linear warmup steps")
    max_grad_norm: float = _opt(1.0, "clip gradients to this global norm (0 = no clipping)")
    seed: int = _opt(0, "random seed (data order, adapter init, dropout)")
    max_length: int = _opt(256, "truncate prompt + response to this many tokens")
    max_new_tokens: int | None = _opt(
        None, "tokens to generate for exact match (default: longest reference answer + 4)"
    )
    output: str = _opt("runs/peftkit-train", "output folder: adapter, checkpoints, metrics, report")
    save_every: int = _opt(
        25, "save a checkpoint (adapter, optimizer, RNG) every N optimizer steps and at the last (0 = never)"
    )
    log_every: int = _opt(5, "write a metrics.jsonl row every N optimizer steps")
    resume: bool = _opt(
        False,
        "continue from the last checkpoint in --output (with a larger --max-steps, a finished run goes on)",
    )
    overwrite: bool = _opt(False, "replace a different run already in --output")
    fsdp: bool = _opt(
        False,
        "under torchrun/accelerate launch: shard the frozen base model across the processes with FSDP2 "
        "(fully_shard per decoder layer) instead of a full copy per process (DDP); same results",
    )
    threads: int | None = _opt(
        None,
        "torch CPU threads (default: the number of cores not already busy, by the 1-minute load average)",
    )
    quantize: str | None = _opt(
        None,
        "load the base model's linear layers quantized with bitsandbytes (QLoRA): 4bit (NF4, double "
        "quantization) or 8bit; methods lora, dora, rslora, ia3. The adapter file is the same as on a full base",
    )

    gradient_checkpointing: bool | None = _opt(
        None,
        "recompute each decoder layer's activations during the backward instead of keeping them: less memory, "
        "about a third more time per step, the same adapter; default: on with --quantize (as "
        "prepare_model_for_kbit_training does), else off",
        negatable=True,
    )

    def __post_init__(self) -> None:
        if self.lr is None and self.method in METHODS:  # not given: the method's default (train/methods.py)
            self.lr = METHODS[self.method].lr

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainOptions)}

# Options that change what a run computes: --resume refuses if any of them differ from the saved run.
RUN_DEFINING = (
    "model",
    "data",
    "method",
    "r",
    "alpha",
    "dropout",
    "targets",
    "batch_size",
    "grad_accum",
    "lr",
    "scheduler",
    "warmup",
    "seed",
    "max_length",
    "epochs",
    "max_steps",
    "weight_decay",
    "max_grad_norm",
    "eval_split",  # with --data and no --eval-data it decides which rows train (see loop.run_settings)
    "quantize",
)


def load_config_file(path: str) -> dict:
    """Read a YAML or JSON config file into option values; an unknown key is an error naming it."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise PeftkitError(f"config file not found: {path}")
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PeftkitError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        if file.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except (json.JSONDecodeError, Exception) as e:  # yaml.YAMLError has no common base we import eagerly
        raise PeftkitError(f"{path}: cannot parse config file ({e})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise PeftkitError(f"{path}: a config file must hold a mapping of option: value")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise PeftkitError(f"{path}: unknown config key {unknown[0]!r}; valid keys: {', '.join(FIELDS)}")
    for key in ("data", "eval_data", "targets"):
        if isinstance(values.get(key), str):
            values[key] = [values[key]]
    _check_types(values, path)
    return values


def _check_types(values: dict, path: str) -> None:
    """Each value has its option's type (an int where an int is expected, ...); the error names file and key."""
    from typing import get_type_hints

    from peftkit.config import describe_type, value_fits

    hints = get_type_hints(TrainOptions)
    for key, value in values.items():
        if not value_fits(value, hints[key]):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise PeftkitError(f"{path}: key {key!r} must be {describe_type(hints[key])}, found {shown}")


def given_values(file_values: dict, flag_values: dict) -> dict:
    """The values the user gave: the config file's, overridden by the flags actually passed."""
    return {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}


def make_options(file_values: dict, flag_values: dict) -> TrainOptions:
    """Defaults, then the config file, then the flags the user actually passed."""
    merged = given_values(file_values, flag_values)
    options = TrainOptions(**resolve_length(merged))
    validate(options)
    return options


def resolve_length(given: dict) -> dict:
    """Decide the run length from the values the user gave (flags or config file), never from a default.

    --max-steps given: it sets the number of optimizer steps and --epochs is not used (transformers.Trainer's
    rule); only --epochs given: the epochs decide (max_steps becomes None); neither: DEFAULT_MAX_STEPS.
    """
    if given.get("max_steps") is None and given.get("epochs") is not None:
        return {**given, "max_steps": None}
    return given


def length_note(given: dict) -> str | None:
    """A one-line note when both --epochs and --max-steps were given, saying which one decides."""
    steps, epochs = given.get("max_steps"), given.get("epochs")
    if steps and epochs is not None:
        return f"note: --max-steps {steps} sets the run length; --epochs {epochs} is not used"
    return None


def validate(o: TrainOptions) -> None:
    """Reject values that cannot work, naming the flag and what would be right."""
    positive = {"r": o.r, "batch_size": o.batch_size, "grad_accum": o.grad_accum, "max_length": o.max_length}
    for name, value in positive.items():
        if not isinstance(value, int) or value <= 0:
            raise PeftkitError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")

    if o.method not in METHODS:
        raise PeftkitError(f"unknown --method {o.method!r}; choose one of: {', '.join(METHODS)}")
    if o.scheduler not in ("linear", "cosine", "constant"):
        raise PeftkitError(f"--scheduler must be linear, cosine or constant, got {o.scheduler!r}")
    if o.lr is None or o.lr <= 0:
        raise PeftkitError(f"--lr must be positive, got {o.lr}")
    if not o.max_steps and o.epochs <= 0:
        raise PeftkitError("set --max-steps or a positive --epochs")
    if o.quantize is not None:
        if o.quantize not in ("4bit", "8bit"):
            raise PeftkitError(f"--quantize must be 4bit or 8bit, got {o.quantize!r}")
        if o.method not in ("lora", "dora", "rslora", "ia3"):
            raise PeftkitError(
                f"--quantize {o.quantize} works with --method lora, dora, rslora or ia3, not {o.method!r}"
            )
    _check_ranges(o)


def _check_ranges(o: TrainOptions) -> None:
    """Numbers that have no meaning below zero (or outside a range), named by their flag."""
    import math

    for name in (
        "max_steps",
        "warmup",
        "save_every",
        "log_every",
        "eval_limit",
        "threads",
        "max_new_tokens",
        "weight_decay",
        "max_grad_norm",
        "epochs",
    ):
        value = getattr(o, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise PeftkitError(f"--{name.replace('_', '-')} must be a non-negative number, got {value!r}")
    if not (math.isfinite(o.alpha) and math.isfinite(o.lr)):
        raise PeftkitError(f"--alpha and --lr must be finite numbers, got {o.alpha!r} and {o.lr!r}")
    if not 0.0 <= o.dropout < 1.0:
        raise PeftkitError(f"--dropout must be in [0, 1), got {o.dropout!r}")
    if o.eval_split is not None and not 0.0 < o.eval_split < 1.0:
        raise PeftkitError(f"--eval-split must be between 0 and 1 (exclusive), got {o.eval_split!r}")
