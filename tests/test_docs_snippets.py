"""HF peft's documented snippets, run on both libraries and compared number for number.

Each snippet is our own code following what a page of HF peft's documentation teaches (quicktour, custom
models, low-level API, checkpoint format, LoRA guide, helpers, troubleshooting), adapted to tiny local
models. A snippet takes the library module (`peft` or `peftkit`, used as `peft` would be) and returns the
numbers a user would look at; the test runs it on HF peft once (cached) and compares every library's result
with that. Adapter tensors are set from a fixed per-name pattern after creation, so the comparison does not
depend on how each library draws its random initialisation.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from .models import VOCAB, tiny_bert_cls, tiny_llama, token_inputs

ATOL = 1e-5
SNIPPETS: dict[str, Callable[[Any, Path], dict[str, Any]]] = {}


def snippet(fn: Callable[[Any, Path], dict[str, Any]]) -> Callable[[Any, Path], dict[str, Any]]:
    SNIPPETS[fn.__name__] = fn
    return fn


def fill_adapter(lib, model: nn.Module, adapter_name: str = "default", scale: float = 0.2) -> None:
    """Give every adapter tensor a fixed pattern drawn from its file key (the same in both libraries)."""
    state = lib.get_peft_model_state_dict(model, adapter_name=adapter_name)
    filled = {}
    for key, value in state.items():
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        filled[key] = torch.randn(value.shape, generator=g, dtype=torch.float32).to(value.dtype) * scale
    result = lib.set_peft_model_state_dict(model, filled, adapter_name=adapter_name)
    assert not result.unexpected_keys


def quiet() -> contextlib.AbstractContextManager:
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


# ----- quicktour -------------------------------------------------------------------------------------------------
@snippet
def quicktour(peft, tmp: Path) -> dict[str, Any]:
    """Quicktour: LoraConfig + get_peft_model + print_trainable_parameters, save, AutoPeftModel to load."""
    base_dir = tmp / "base"
    tiny_llama().save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM, inference_mode=False, r=8, lora_alpha=32, lora_dropout=0.1
    )
    model = peft.get_peft_model(model, config)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        model.print_trainable_parameters()
    fill_adapter(peft, model)
    model.save_pretrained(tmp / "adapter")
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp / "adapter")
    x = token_inputs()
    with torch.no_grad():
        logits = loaded(**x).logits
        again = peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_dir), tmp / "adapter"
        )
        return {"printed": printed.getvalue(), "logits": logits, "from_pretrained": again(**x).logits}


# ----- custom models ---------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """The custom-models guide's multilayer perceptron (smaller)."""

    def __init__(self, num_units_hidden: int = 16) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            nn.Linear(20, num_units_hidden),
            nn.ReLU(),
            nn.Linear(num_units_hidden, num_units_hidden),
            nn.ReLU(),
            nn.Linear(num_units_hidden, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """X: (batch, 20) -> (batch, 2) log-probabilities."""
        return self.seq(X)


@snippet
def custom_models(peft, tmp: Path) -> dict[str, Any]:
    """Custom models: LoRA on named Linear layers of an MLP, the head in modules_to_save, a few SGD steps."""
    torch.manual_seed(0)
    module = MLP()
    config = peft.LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"])
    model = peft.get_peft_model(module, config)
    fill_adapter(peft, model, scale=0.1)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(16, 20, generator=g), torch.randint(0, 2, (16,), generator=g)
    losses = []
    for _ in range(3):
        loss = nn.functional.nll_loss(model(X), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.save_pretrained(tmp / "mlp")
    return {
        "trainable": trainable,
        "losses": losses,
        "saved": load_file(tmp / "mlp" / "adapter_model.safetensors"),
    }


# ----- low-level API ---------------------------------------------------------------------------------------------
class DummyModel(nn.Module):
    """The low-level API page's toy model: embedding, one linear layer, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 10)
        self.linear = nn.Linear(10, 10)
        self.lm_head = nn.Linear(10, 10)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (batch, seq) -> (batch, seq, 10)."""
        return self.lm_head(self.linear(self.embedding(input_ids)))


@snippet
def low_level_api(peft, tmp: Path) -> dict[str, Any]:
    """Low-level API: inject_adapter_in_model into a plain module, its state dict, loading it elsewhere."""
    torch.manual_seed(0)
    model = DummyModel()
    config = peft.LoraConfig(lora_alpha=16, lora_dropout=0.1, r=4, bias="none", target_modules=["linear"])
    model = peft.inject_adapter_in_model(config, model)
    fill_adapter(peft, model)
    state = peft.get_peft_model_state_dict(model)
    torch.manual_seed(0)
    other = peft.inject_adapter_in_model(config, DummyModel())
    result = peft.set_peft_model_state_dict(other, state)
    ids = torch.arange(10).reshape(1, -1)
    with torch.no_grad():
        return {
            "type": type(model).__name__,
            "keys": sorted(state),
            "unexpected": result.unexpected_keys,
            "output": model(ids),
            "copy_output": other.eval()(ids),
        }


# ----- checkpoint format -----------------------------------------------------------------------------------------
@snippet
def checkpoint_format(peft, tmp: Path) -> dict[str, Any]:
    """Checkpoint format: the files, the keys (adapter name removed), the config fields, loading by hand."""
    model = peft.get_peft_model(tiny_bert_cls(), peft.LoraConfig(r=4, task_type="SEQ_CLS"))
    fill_adapter(peft, model)
    model.save_pretrained(tmp / "ckpt")
    files = sorted(p.name for p in (tmp / "ckpt").iterdir() if p.name != "README.md")
    tensors = load_file(tmp / "ckpt" / "adapter_model.safetensors")
    config = json.loads((tmp / "ckpt" / "adapter_config.json").read_text())
    fields = {
        k: config[k]
        for k in ("peft_type", "task_type", "r", "lora_alpha", "modules_to_save", "inference_mode")
    }
    # loading by hand, as the page shows: a fresh PEFT model, then the weights
    fresh = peft.get_peft_model(tiny_bert_cls(), peft.LoraConfig(r=4, task_type="SEQ_CLS"))
    peft.set_peft_model_state_dict(fresh, peft.load_peft_weights(str(tmp / "ckpt"), device="cpu"))
    fresh.eval()
    with torch.no_grad():
        logits = fresh(**token_inputs()).logits
    return {
        "files": files,
        "keys": sorted(tensors),
        "shapes": {k: tuple(v.shape) for k, v in tensors.items()},
        "fields": fields,
        "target_modules": sorted(config["target_modules"]),
        "logits": logits,
    }


# ----- LoRA guide ------------------------------------------------------------------------------------------------
@snippet
def lora_guide(peft, tmp: Path) -> dict[str, Any]:
    """LoRA guide: rsLoRA/DoRA/PiSSA/OLoRA options, layers_to_transform, merge_and_unload, several adapters, disable_adapter, unload."""
    x = token_inputs()
    out: dict[str, Any] = {}
    variants = {
        "plain": {},
        "rslora": {"use_rslora": True},
        "dora": {"use_dora": True},
        "pissa": {"init_lora_weights": "pissa"},  # rewrites the base weights: the residual must agree too
        "olora": {"init_lora_weights": "olora"},
        "layers_to_transform": {"layers_to_transform": [1], "target_modules": ["q_proj", "o_proj"]},
    }
    for name, options in variants.items():
        model = peft.get_peft_model(
            tiny_llama(), peft.LoraConfig(**{"r": 4, "target_modules": "all-linear", **options})
        )
        fill_adapter(peft, model)
        with torch.no_grad():
            out[f"{name}/logits"] = model(**x).logits
            out[f"{name}/merged"] = model.merge_and_unload()(**x).logits
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    fill_adapter(peft, model)
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["k_proj"]))
    fill_adapter(peft, model, "other")
    with torch.no_grad():
        model.set_adapter("other")
        out["other"] = model(**x).logits
        with model.disable_adapter():
            out["disabled"] = model(**x).logits
        model.set_adapter("default")
        model.delete_adapter("other")
        out["adapters_left"] = list(model.peft_config)
        out["default"] = model(**x).logits
        out["unloaded"] = model.unload()(**x).logits
    return out


# ----- helpers ---------------------------------------------------------------------------------------------------
@snippet
def helpers(peft, tmp: Path) -> dict[str, Any]:
    """Helpers page: check whether a folder holds an adapter; rescale the adapter scale temporarily."""
    helpers_module = pytest.importorskip(
        f"{peft.__name__}.helpers", reason="peftkit.helpers is not built yet"
    )
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4))
    fill_adapter(peft, model)
    model.save_pretrained(tmp / "a")
    out: dict[str, Any] = {}
    if hasattr(helpers_module, "check_if_peft_model"):
        out["is_adapter"] = [
            helpers_module.check_if_peft_model(str(tmp / "a")),
            helpers_module.check_if_peft_model(str(tmp)),
        ]
    if hasattr(helpers_module, "rescale_adapter_scale"):
        with torch.no_grad(), helpers_module.rescale_adapter_scale(model, multiplier=0.5):
            out["rescaled"] = model(**token_inputs()).logits
    if not out:
        pytest.skip(f"{peft.__name__}.helpers has neither check_if_peft_model nor rescale_adapter_scale")
    return out


# ----- troubleshooting -------------------------------------------------------------------------------------------
@snippet
def troubleshooting(peft, tmp: Path) -> dict[str, Any]:
    """Troubleshooting: status of layers and model, a target that matches nothing, the classifier head saved,
    adapter dtype next to a bf16 base, and a reloaded model giving the trained model's output."""
    import dataclasses

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("b", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.merge_adapter()
    out: dict[str, Any] = {
        "model_status": dataclasses.asdict(model.get_model_status()),
        "layer_status": [dataclasses.asdict(s) for s in peft.get_layer_status(model)],
    }
    try:
        peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["not_a_module"]))
    except peft.NoMatchingPeftModuleError as err:
        out["error"] = type(err).__name__
    cls = peft.get_peft_model(tiny_bert_cls(), peft.LoraConfig(task_type="SEQ_CLS"))
    out["saved_head"] = sorted(k for k in peft.get_peft_model_state_dict(cls) if "classifier" in k)
    bf16 = peft.get_peft_model(tiny_llama().to(torch.bfloat16), peft.LoraConfig(r=4))
    out["adapter_dtypes"] = sorted({str(p.dtype) for n, p in bf16.named_parameters() if "lora_" in n})
    fill_adapter(peft, cls)
    cls.eval()
    cls.save_pretrained(tmp / "cls")
    with quiet():
        reloaded = peft.PeftModel.from_pretrained(tiny_bert_cls(), tmp / "cls")
    x = token_inputs()
    with torch.no_grad():
        out["trained_vs_reloaded"] = (cls(**x).logits - reloaded(**x).logits).abs().max().item()
    return out


# ----- running and comparing ---------------------------------------------------------------------------------------
_REFERENCE: dict[str, dict[str, Any]] = {}


def run(lib_name: str, name: str, tmp: Path) -> dict[str, Any]:
    lib = importlib.import_module(lib_name)
    with quiet():
        return SNIPPETS[name](lib, tmp)


def assert_same(got: Any, want: Any, where: str) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.shape == want.shape, where
        assert torch.allclose(got.float(), want.float(), atol=ATOL), (
            f"{where}: max diff {(got - want).abs().max()}"
        )
    elif isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), (
            f"{where}: keys {sorted(got)} != {sorted(want)}"
        )
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)) and not isinstance(want, str):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=ATOL), where
    else:
        assert got == want, where


@pytest.mark.parametrize("lib_name", ["peft", "peftkit"])
@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_documented_snippet(name: str, lib_name: str, tmp_path_factory) -> None:
    if name not in _REFERENCE:
        _REFERENCE[name] = run("peft", name, tmp_path_factory.mktemp(f"{name}-peft"))
    got = _REFERENCE[name] if lib_name == "peft" else run(lib_name, name, tmp_path_factory.mktemp(name))
    assert_same(got, _REFERENCE[name], name)


def test_every_snippet_changes_the_numbers() -> None:
    """Guard against vacuous comparisons: the LoRA-guide adapters do move the logits."""
    out = run("peftkit", "lora_guide", Path("."))
    assert not torch.allclose(out["default"], out["disabled"], atol=1e-3)
    assert torch.allclose(out["disabled"], out["unloaded"], atol=ATOL)
    assert VOCAB == out["default"].shape[-1]
