"""`LoraConfig`: LoRA's options (field names and defaults as in HF peft), validated on construction."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from ..config import PeftConfig
from .config_checks import check_fields, pattern_value

_INITS = (True, False, "gaussian", "pissa", "olora", "loftq")
_BIAS_MODES = ("none", "all", "lora_only")


@dataclass
class LoftQConfig:
    """LoftQ's settings (HF peft's `LoftQConfig`), passed as `LoraConfig(init_lora_weights="loftq", loftq_config=...)`.

    Attributes:
        loftq_bits: bits of the NormalFloat quantization of the base weight (2, 3, 4 or 8).
        loftq_iter: alternations of quantization and SVD (>= 1); more lowers the reconstruction error.
    """

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        if self.loftq_bits not in (2, 3, 4, 8) or not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ValueError(
                f"LoftQConfig: loftq_bits must be 2, 3, 4 or 8 and loftq_iter an int >= 1; got {self.loftq_bits}, "
                f"{self.loftq_iter}"
            )


@dataclass
class LoraConfig(PeftConfig):
    """Configuration of a LoRA adapter (field names and defaults as in HF peft's `LoraConfig`).

    Attributes:
        r: rank of the update `B @ A` (> 0).
        target_modules: module names (exact or `.`-suffix), a regex matched against the full name,
            `"all-linear"` (every Linear/Conv1D but the output head), or None for the architecture's default.
        exclude_modules: names or a regex of modules never to adapt.
        lora_alpha: scaling numerator: the update is scaled by `lora_alpha / r` (`/ sqrt(r)` with use_rslora).
        lora_dropout: dropout probability on the LoRA branch input, in [0, 1).
        fan_in_fan_out: kept for file compatibility; the layout is read from the layer type (Conv1D is (in, out)).
        bias: `"none"`, `"all"` (train every bias) or `"lora_only"` (biases of adapted layers).
        use_rslora: rank-stabilised scaling `lora_alpha / sqrt(r)`.
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. a classifier head).
        init_lora_weights: True (B = 0, so the model starts unchanged), False (random A and B), "gaussian",
            "pissa" / "pissa_niter_N" (principal singular vectors; modifies the base weight), "olora" (QR).
        layers_to_transform: block indices to adapt (int or list); None for all.
        layers_pattern: name of the block list (`"layers"`, `"h"`) used with layers_to_transform.
        rank_pattern / alpha_pattern: per-module r / alpha, keyed by a name or regex suffix.
        use_dora: weight-decomposed LoRA (a learned per-row magnitude).
        lora_bias: give B a bias (trained with the adapter; merging adds `scaling * bias` to the base bias, so the
            base layer needs one). Linear/Conv1D/Conv2d only; not with DoRA or the PiSSA/OLoRA/gaussian inits.
        trainable_token_indices: also train the embedding rows of these token ids (e.g. new chat special
            tokens): a list for the input embedding, or {embedding module name: list of ids}. The rows are stored
            as `<embedding>.token_adapter.trainable_tokens_delta` (see tuners/trainable_tokens.py).
        layer_replication: rebuild the block stack from `[start, end)` ranges of the original blocks, e.g.
            `[[0, 4], [2, 5]]` -> blocks 0 1 2 3 2 3 4; repeats share the base weights, each gets its own LoRA.
            Such a model cannot be merged (the shared weights would take every copy's update).
        target_parameters: parameter names (full or `.`-suffix) to adapt directly, e.g. the 3-D expert stacks
            `["experts.gate_up_proj", "experts.down_proj"]` of MoE models; works with or without target_modules
            (alone, target_modules becomes empty rather than the architecture's default). See lora_param.py.
        loftq_config: with init_lora_weights="loftq": a LoftQConfig (or its dict). The base weight becomes its
            NormalFloat quantization Q and the adapter the best rank-r fit of W - Q (so Q + scaling*B@A ~ W).
    """

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    layer_replication: list[list[int]] | None = None
    target_parameters: list[str] | None = None
    loftq_config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "LORA"
        check_fields(
            self, positive_ints=("r",), probabilities=("lora_dropout",), name_lists=("target_modules",)
        )
        if self.lora_alpha <= 0:
            raise ValueError(f"LoraConfig: lora_alpha must be > 0, got {self.lora_alpha!r}")
        if self.bias not in _BIAS_MODES:
            raise ValueError(f"LoraConfig: bias must be one of {_BIAS_MODES}, got {self.bias!r}")
        init = self.init_lora_weights
        if init not in _INITS and not (isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init)):
            raise ValueError(
                f"LoraConfig: init_lora_weights must be one of {_INITS} or 'pissa_niter_N', got {init!r}"
            )
        if self.lora_bias and (self.use_dora or init not in (True, False)):
            raise ValueError(
                "LoraConfig: lora_bias=True works with init_lora_weights True or False and without DoRA; got "
                f"init_lora_weights={init!r}, use_dora={self.use_dora}"
            )
        self._validate_patterns()
        self._validate_token_indices()
        if isinstance(self.loftq_config, LoftQConfig):
            self.loftq_config = dataclasses.asdict(self.loftq_config)
        if (init == "loftq") != bool(self.loftq_config):
            raise ValueError(
                "LoraConfig: init_lora_weights='loftq' and loftq_config=LoftQConfig(...) go together; got "
                f"init_lora_weights={init!r}, loftq_config={self.loftq_config!r}"
            )
        if self.loftq_config:
            LoftQConfig(**self.loftq_config)  # validates the values
        tp = self.target_parameters
        if tp is not None and (
            not isinstance(tp, (list, tuple, set)) or not all(isinstance(t, str) for t in tp)
        ):
            raise ValueError(f"LoraConfig: target_parameters must be a list of parameter names, got {tp!r}")
        if tp is not None:
            self.target_parameters = list(tp)
        if self.layer_replication is not None:
            self.layer_replication = [list(pair) for pair in self._checked_replication()]

    def _checked_replication(self) -> list:
        spec = self.layer_replication
        ok = (
            isinstance(spec, (list, tuple))
            and spec
            and all(
                isinstance(p, (list, tuple))
                and len(p) == 2
                and all(isinstance(i, int) and not isinstance(i, bool) for i in p)
                and 0 <= p[0] < p[1]
                for p in spec
            )
        )
        if not ok:
            raise ValueError(
                "LoraConfig: layer_replication must be a non-empty list of [start, end) block ranges with "
                f"0 <= start < end, e.g. [[0, 4], [2, 5]]; got {spec!r}"
            )
        return spec

    def _validate_token_indices(self) -> None:
        from .trainable_tokens import check_token_indices

        spec = self.trainable_token_indices
        if spec is None:
            return
        if isinstance(spec, dict):
            if not spec:
                raise ValueError(
                    "LoraConfig: trainable_token_indices is an empty dict; give {module name: [ids]}"
                )
            for name, ids in spec.items():
                check_token_indices(ids, f"LoraConfig: trainable_token_indices[{name!r}]")
        else:
            check_token_indices(spec, "LoraConfig: trainable_token_indices")

    def _validate_patterns(self) -> None:
        for pattern, value in {**self.rank_pattern, **self.alpha_pattern}.items():
            if value <= 0:
                raise ValueError(f"LoraConfig: rank/alpha pattern {pattern!r} must be > 0, got {value!r}")

    def rank_for(self, module_name: str) -> int:
        """r for one module, honouring rank_pattern."""
        return int(pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        """lora_alpha for one module, honouring alpha_pattern."""
        return pattern_value(self.alpha_pattern, module_name, self.lora_alpha)
