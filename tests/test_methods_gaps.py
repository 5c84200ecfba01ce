"""Method gaps closed in issue 14, side by side with HF peft where it has the feature (the conformance battery
in tests/cases.py covers the rest: DoRA on nn.Embedding, LoHa/LoKr on nn.Conv1d, VeRA bias modes)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import peftkit as pk

from . import models as M

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("bias", ["all", "vera_only"])
def test_vera_bias_modes_train_and_save_what_hf_peft_does(bias, tmp_path) -> None:
    models = {}
    for lib in (pk, peft):
        config = lib.VeraConfig(r=8, target_modules=["c_attn"], bias=bias, init_weights=False)
        models[lib.__name__] = model = lib.get_peft_model(M.tiny_gpt2(), config)
        model.save_pretrained(tmp_path / lib.__name__)
    ours, hf = models["peftkit"], models["peft"]
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in hf.named_parameters() if p.requires_grad}
    assert any(n.endswith(".bias") for n in trainable)
    files = [load_file(tmp_path / name / "adapter_model.safetensors") for name in ("peftkit", "peft")]
    assert files[0].keys() == files[1].keys()
    assert any(".bias" in k for k in files[0])


def test_lokr_conv1d_tucker_core_at_rank_one() -> None:
    """A Conv1d kernel's Tucker core at r=1 gives a dense factor with an odd stride on its size-1 dim, which
    torch.kron cannot view (HF peft 0.21 raises there); peftkit builds the update, equal to the definition."""
    conv = torch.nn.Sequential(torch.nn.Conv1d(4, 8, 3, padding=1))
    config = pk.LoKrConfig(r=1, target_modules=["0"], use_effective_conv2d=True, init_weights=False)
    model = pk.get_peft_model(conv, config)
    layer = model.base_model.model[0]
    assert tuple(layer.lokr_t2["default"].shape) == (1, 1, 3, 1)
    w1 = layer.lokr_w1["default"]
    w2 = torch.einsum(
        "ijkl,ip,jr->prkl", layer.lokr_t2["default"], layer.lokr_w2_a["default"], layer.lokr_w2_b["default"]
    )
    expected = torch.einsum("ac,bdkl->abcdkl", w1, w2).reshape(8, 4, 3, 1) * layer.scaling["default"]
    torch.testing.assert_close(layer.delta_weight("default"), expected.reshape(8, 4, 3))
    x = torch.randn(2, 4, 5)
    with torch.no_grad():
        want = conv[0].base_layer(x) + torch.nn.functional.conv1d(x, expected.reshape(8, 4, 3), padding=1)
        torch.testing.assert_close(model(x), want)


def test_version_flag_prints_the_package_version() -> None:
    import subprocess
    import sys
    from importlib.metadata import version

    done = subprocess.run(
        [sys.executable, "-m", "peftkit.cli", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"peftkit {version('peftkit')}"
