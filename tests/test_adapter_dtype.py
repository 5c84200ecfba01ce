"""`autocast_adapter_dtype` and `low_cpu_mem_usage` give the same dtype and device as HF peft, tensor for
tensor, on a bfloat16 base: for `get_peft_model`, `PeftModel.from_pretrained` and `load_adapter`."""

from __future__ import annotations

import peft as hf_peft
import pytest
import torch

import peftkit

from .cases import CASES, Case
from .models import output_tensor
from .test_conformance import make_config

# one case per method, plus the layer kinds with their own tensors (DoRA, embeddings, Conv1D, Conv2d)
_EXTRA = {"dora-llama", "lora-llama-embedding", "lora-gpt2-conv1d", "lora-conv2d", "vera-llama"}
_FIRST = {c.peft_type: c.id for c in reversed(CASES)}
DTYPE_CASES = [c for c in CASES if c.id in _EXTRA or _FIRST[c.peft_type] == c.id]
FLAGS = [
    (True, False),
    (False, False),
    (True, True),
    (False, True),
]  # (autocast_adapter_dtype, low_cpu_mem_usage)


def _bf16(case: Case) -> torch.nn.Module:
    return case.model(0).to(torch.bfloat16)


def _runs(model, case: Case) -> bool:
    """Whether a forward on the bf16 model works (bf16 BOFT cannot on CPU in either library: no bf16 `lu`)."""
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in case.inputs().items()}
    try:
        with torch.no_grad():
            return bool(torch.isfinite(output_tensor(model(**inputs)).float()).all())
    except (RuntimeError, NotImplementedError):
        return False


def placement(lib, model, adapter_name: str = "default") -> dict[str, tuple[torch.dtype, str]]:
    """{file key: (dtype, device type)} of one adapter, as it sits in memory."""
    if lib is hf_peft:
        tensors = hf_peft.get_peft_model_state_dict(model, adapter_name=adapter_name)
    else:
        tensors = model.get_adapter_state_dict(adapter_name)
    return {k: (v.dtype, v.device.type) for k, v in tensors.items()}


@pytest.mark.parametrize("case", DTYPE_CASES, ids=[c.id for c in DTYPE_CASES])
def test_get_peft_model_places_adapters_like_hf(case: Case):
    seen = {}
    for autocast, low in FLAGS:
        got = {}
        for lib in (hf_peft, peftkit):
            model = lib.get_peft_model(
                _bf16(case), make_config(lib, case), autocast_adapter_dtype=autocast, low_cpu_mem_usage=low
            )
            got[lib.__name__] = placement(lib, model)
            if not low:
                got[lib.__name__ + " runs"] = _runs(model, case)
        assert got["peftkit"] == got["peft"], (autocast, low)
        assert got.get("peftkit runs") == got.get("peft runs"), (autocast, low)
        seen[autocast, low] = got["peftkit"]
    if case.peft_type not in ("LN_TUNING", "PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"):  # flags matter
        assert torch.bfloat16 in {dt for dt, _ in seen[False, False].values()}
        assert seen[True, False] != seen[False, False]
        assert "meta" in {dev for _, dev in seen[True, True].values()}


@pytest.mark.parametrize("case", DTYPE_CASES, ids=[c.id for c in DTYPE_CASES])
def test_loading_places_adapters_like_hf(case: Case, tmp_path):
    torch.manual_seed(0)
    peftkit.get_peft_model(_bf16(case), make_config(peftkit, case)).save_pretrained(tmp_path)
    for autocast, low in FLAGS:
        flags = {"autocast_adapter_dtype": autocast, "low_cpu_mem_usage": low}
        got = {}
        for lib in (hf_peft, peftkit):
            model = lib.PeftModel.from_pretrained(_bf16(case), tmp_path, **flags)
            model.load_adapter(tmp_path, "other", **flags)
            got[lib.__name__] = (placement(lib, model), placement(lib, model, "other"))
        assert got["peftkit"] == got["peft"], (autocast, low)
        assert all(device == "cpu" for d in got["peftkit"] for _, device in d.values()), (
            "loading materialises"
        )


def test_low_cpu_mem_usage_then_loading_gives_the_saved_values(tmp_path):
    case = next(c for c in CASES if c.id == "lora-llama-linear")
    model = peftkit.get_peft_model(_bf16(case), make_config(peftkit, case))
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(_bf16(case), tmp_path, low_cpu_mem_usage=True)
    a, b = model.get_adapter_state_dict(), loaded.get_adapter_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
