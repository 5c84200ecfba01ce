"""OFT/BOFT checks the shared battery cannot make: the math against HF peft's own helpers, butterfly factors
beyond one (HF computes those only with its CUDA extension), the block-size rule, and the 3x3 Conv2d path."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft.tuners.boft.layer import BOFTLayer as HFBOFTLayer
from peft.tuners.oft.layer import OFTLayer as HFOFTLayer
from peft.tuners.oft.layer import OFTRotationModule as HFRotation

import peftkit
from peftkit.functional import oft as FO
from peftkit.tuners.oft import nearest_divisor

from .models import image_inputs, tiny_convnet, tiny_llama, token_inputs


def _randomize(model, std=0.2):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("terms", range(1, 8))
def test_cayley_matches_hf(terms):
    hf = HFRotation(3, 6, 4, 12, use_cayley_neumann=True, num_cayley_neumann_terms=terms)
    torch.nn.init.normal_(hf.weight, std=0.3)
    skew = FO.skew_from_triu(hf.weight, 4)
    torch.testing.assert_close(FO.cayley_neumann(skew, terms), hf._cayley_batch(hf.weight, 4, True, terms))
    torch.testing.assert_close(FO.cayley(skew), hf._cayley_batch(hf.weight, 4, False, terms))
    expected = hf._project_batch(hf.weight.detach(), eps=0.05)
    torch.testing.assert_close(FO.coft_project(hf.weight.detach(), 4, 0.05), expected)


@pytest.mark.parametrize(("n", "blocks", "size", "factors"), [(32, 8, 4, 2), (64, 8, 8, 3), (64, 16, 4, 3)])
def test_butterfly_permutations_match_hf_and_compose(n, blocks, size, factors):
    perms = FO.butterfly_perms(n, blocks, size, factors)
    for i in range(factors):
        ref = HFBOFTLayer.block_butterfly_perm(None, n, blocks // 2**i, size // 2, factors - 1)
        assert torch.equal(perms[i], ref)
    R = FO.cayley(FO.skew_from_square(torch.randn(factors, blocks, size, size)))
    dense = torch.eye(n)
    for i in range(factors):  # M = F_{m-1} ... F_0, F_i = P_i block_diag(R_i) P_i^T (HF's construction)
        P = HFBOFTLayer.perm2mat(None, perms[i])
        dense = P @ torch.block_diag(*R[i]) @ P.T @ dense
    x, w = torch.randn(3, n), torch.randn(5, n)
    torch.testing.assert_close(FO.butterfly_apply(x, R, perms, reverse=True), x @ dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(FO.rotate_rows(w, R, perms), w @ dense.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(FO.unrotate_rows(w @ dense.T, R, perms), w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense @ dense.T, torch.eye(n), atol=1e-5, rtol=0)


@pytest.mark.parametrize("factors", [2, 3])
def test_boft_butterfly_merge_unmerge(factors):
    config = peftkit.BOFTConfig(
        boft_block_size=2, boft_n_butterfly_factor=factors, target_modules=["q_proj", "down_proj"]
    )
    model = peftkit.get_peft_model(tiny_llama(), config)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.boft_R["default"].shape == (
        factors,
        16,
        2,
        2,
    )
    _randomize(model)
    inputs, base = token_inputs(), tiny_llama()(**token_inputs()).logits
    out = model(**inputs).logits
    assert not torch.allclose(out, base, atol=1e-3)
    model.merge_adapter()
    torch.testing.assert_close(model(**inputs).logits, out, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(model(**inputs).logits, base, atol=1e-5, rtol=1e-5)


def test_block_size_rule_matches_hf():
    for n in (27, 32, 48, 576, 1536):
        for want in (1, 3, 5, 7, 16, 32, 33, 100, 2000):
            assert nearest_divisor(n, want) == HFOFTLayer.adjust_oft_parameters(None, n, want), (n, want)
    with pytest.warns(UserWarning, match="oft_block_size 5"):
        model = peftkit.get_peft_model(tiny_llama(), peftkit.OFTConfig(oft_block_size=5))
    assert model.base_model.model.model.layers[0].self_attn.q_proj.oft_R["default"].block_size == 4


def test_config_validation():
    with pytest.raises(ValueError, match="exactly one of r"):
        peftkit.OFTConfig(r=8)  # oft_block_size defaults to 32: HF raises too
    with pytest.raises(ValueError, match="exactly one of boft_block_size"):
        peftkit.BOFTConfig(boft_block_num=4)
    with pytest.raises(ValueError, match="must divide"):
        peftkit.get_peft_model(tiny_llama(), peftkit.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=4))
    with pytest.raises(ValueError, match="Conv1D is not among them"):
        from .models import tiny_gpt2

        peftkit.get_peft_model(tiny_gpt2(), peftkit.OFTConfig(target_modules=["c_attn"]))


def test_oft_conv2d_3x3_is_consistent():
    """HF's unfold/fold forward is not the identity at init for kernels > 1; peftkit rotates the filter."""
    x = image_inputs()["x"]
    base = tiny_convnet()(x)
    model = peftkit.get_peft_model(
        tiny_convnet(), peftkit.OFTConfig(oft_block_size=9, target_modules=["conv1"])
    )
    assert torch.equal(model(x), base)
    _randomize(model)
    out = model(x)
    assert not torch.allclose(out, base, atol=1e-4)
    model.merge_adapter()
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)


def test_module_dropout_only_in_training():
    model = peftkit.get_peft_model(tiny_llama(), peftkit.OFTConfig(oft_block_size=4, module_dropout=0.5))
    _randomize(model)
    inputs = token_inputs()
    model.eval()
    ref = model(**inputs).logits
    torch.testing.assert_close(model(**inputs).logits, ref)
    model.train()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not torch.allclose(model(**inputs).logits, ref)
    merged = copy.deepcopy(model).eval()
    merged.merge_adapter()
    torch.testing.assert_close(merged(**inputs).logits, ref, atol=1e-5, rtol=1e-5)
