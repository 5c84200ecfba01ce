"""Mixed-adapter batches: row i through adapter adapter_names[i] equals that row run alone with that adapter,
in forward (with padding), generate (KV cache, left padding, beams) and backward; for LoRA of different ranks
and targets, DoRA, IA3, LoHa, Embedding targets and modules_to_save heads; and equal to HF peft's mixed batch."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.functional.segmented import row_groups, segmented_lora

from .models import output_tensor, tiny_bert_cls, tiny_llama

NAMES = ["a", "__base__", "b", "a", "c"]


def _llama_with(configs: dict) -> peftkit.PeftModel:
    items = iter(configs.items())
    name, config = next(items)
    model = peftkit.get_peft_model(tiny_llama(), config, adapter_name=name)
    for name, config in items:
        model.add_adapter(name, config)
    return model.eval()


def _inputs(rows=5, seq=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on two rows
    mask[3, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _alone(model, name, inputs):
    """Each row's output when the model runs only that row, with only that adapter."""
    if name == "__base__":
        with model.disable_adapter():
            return output_tensor(model(**inputs))
    model.set_adapter(name)
    return output_tensor(model(**inputs))


def _check_rows_equal_alone(model, inputs, names=NAMES, atol=1e-5):
    with torch.no_grad():
        mixed = output_tensor(model(**inputs, adapter_names=names))
        active = model.active_adapter
        for i, name in enumerate(names):
            row = {k: v[i : i + 1] for k, v in inputs.items()}
            torch.testing.assert_close(mixed[i : i + 1], _alone(model, name, row), atol=atol, rtol=1e-5)
        model.set_adapter(active)
    return mixed


def lora(**kw):
    return peftkit.LoraConfig(init_lora_weights=False, **kw)


CONFIG_SETS = {
    "lora-ranks-targets": {
        "a": lora(r=4, target_modules=["q_proj", "v_proj"]),
        "b": lora(r=2, target_modules="all-linear", lora_alpha=16),
        "c": lora(r=8, target_modules=["embed_tokens", "o_proj", "down_proj"]),
    },
    "lora-dora-dropout": {
        "a": lora(r=4, use_dora=True, target_modules=["q_proj", "v_proj", "up_proj"]),
        "b": lora(r=4, lora_dropout=0.1),
        "c": lora(r=2, use_dora=True),
    },
}


@pytest.mark.parametrize("configs", CONFIG_SETS.values(), ids=CONFIG_SETS.keys())
def test_forward_rows_equal_each_row_alone(configs):
    model = _llama_with(configs)
    mixed = _check_rows_equal_alone(model, _inputs())
    # the adapters do differ row to row (else the test could not fail)
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-3)


def _perturbed(model, std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad or any(f".{a}" in n for a in model.peft_config):
                if any(k in n for k in ("ia3_l", "hada_", "lokr_")):
                    p.add_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.mark.parametrize("method", ["IA3", "LOHA"], ids=["ia3", "loha"])
def test_other_additive_methods(method):
    if method == "IA3":
        make = lambda t: peftkit.IA3Config(target_modules=t, feedforward_modules=[t[-1]])  # noqa: E731
    else:
        make = lambda t: peftkit.LoHaConfig(r=2, target_modules=t, init_weights=False)  # noqa: E731
    model = _llama_with(
        {
            "a": make(["k_proj", "down_proj"]),
            "b": make(["q_proj", "down_proj"]),
            "c": make(["v_proj", "up_proj"]),
        }
    )
    _perturbed(model)
    _check_rows_equal_alone(model, _inputs())


def test_modules_to_save_heads_route_per_row():
    model = peftkit.get_peft_model(tiny_bert_cls(), peftkit.LoraConfig(task_type="SEQ_CLS", r=4), "a")
    model.add_adapter("b", peftkit.LoraConfig(task_type="SEQ_CLS", r=2, init_lora_weights=False))
    model.add_adapter("c", peftkit.LoraConfig(task_type="SEQ_CLS", r=2, init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".modules_to_save." in n:
                p.add_(torch.randn_like(p))
    inputs = _inputs()
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    mixed = _check_rows_equal_alone(model.eval(), inputs)
    assert not torch.allclose(mixed[0], mixed[4], atol=1e-3)


def test_generate_greedy_with_kv_cache_left_padding_and_beams():
    model = _llama_with(CONFIG_SETS["lora-ranks-targets"])
    inputs = _inputs(seq=6)
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        for extra in ({}, {"num_beams": 2, "num_return_sequences": 2}):
            mixed = model.generate(**inputs, adapter_names=NAMES, **kw, **extra)
            per = 2 if extra else 1
            for i, name in enumerate(NAMES):
                row = {k: v[i : i + 1] for k, v in inputs.items()}
                if name == "__base__":
                    with model.disable_adapter():
                        alone = model.generate(**row, **kw, **extra)
                else:
                    model.set_adapter(name)
                    alone = model.generate(**row, **kw, **extra)
                assert torch.equal(mixed[i * per : (i + 1) * per], alone), (name, extra)
    model.set_adapter("a")


def test_training_gradients_equal_per_row_sum():
    configs = CONFIG_SETS["lora-ranks-targets"]
    inputs = _inputs()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)

    def grads(mixed: bool):
        model = _llama_with(configs).train()
        for n, p in model.named_parameters():
            p.requires_grad_(".lora_" in n)
        if mixed:
            out = model(**inputs, labels=labels, adapter_names=NAMES)
            (out.logits.float().sum() * 1e-3).backward()
        else:
            for i, name in enumerate(NAMES):
                row = {k: v[i : i + 1] for k, v in inputs.items()}
                if name == "__base__":
                    continue
                model.set_adapter(name)
                for n, p in model.named_parameters():
                    p.requires_grad_(".lora_" in n)
                (model(**row).logits.float().sum() * 1e-3).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    mixed, alone = grads(True), grads(False)
    assert set(mixed) == set(alone) and len(mixed) > 10
    for n in mixed:
        torch.testing.assert_close(mixed[n], alone[n], atol=1e-5, rtol=1e-4, msg=n)


def test_matches_hf_peft_mixed_batch(tmp_path):
    hf_peft = pytest.importorskip("peft")
    configs = CONFIG_SETS["lora-ranks-targets"]
    ours = _llama_with(configs)
    ours.save_pretrained(tmp_path)
    theirs = hf_peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    for name in ("b", "c"):
        theirs.load_adapter(tmp_path / name, adapter_name=name)
    inputs = _inputs()
    with torch.no_grad():
        got = output_tensor(ours(**inputs, adapter_names=NAMES))
        want = output_tensor(theirs.eval()(**inputs, adapter_names=NAMES))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(
            ours.generate(**inputs, adapter_names=NAMES, **kw),
            theirs.generate(**inputs, adapter_names=NAMES, **kw),
        )


def test_switches_are_restored_and_model_state_untouched():
    model = _llama_with(CONFIG_SETS["lora-ranks-targets"])
    model(**_inputs(), adapter_names=NAMES)
    assert "forward" not in vars(model.base_model.model.model.layers[0].self_attn.q_proj)
    assert "fused_causal_lm_loss" not in vars(model) and "shared_prefix" not in vars(model)
    assert model.active_adapter == "a"


@pytest.mark.parametrize(
    "names,message",
    [
        (["a", "b"], "2 entries for a batch of 5 rows"),
        (["a", "zz", "b", "a", "c"], "unknown adapter"),
        ("a", "list of adapter names"),
    ],
)
def test_bad_adapter_names_are_clear_errors(names, message):
    model = _llama_with(CONFIG_SETS["lora-ranks-targets"])
    with pytest.raises(ValueError, match=message):
        model(**_inputs(), adapter_names=names)


def test_merged_model_refuses_mixed_batches():
    model = _llama_with(CONFIG_SETS["lora-ranks-targets"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge first"):
        model(**_inputs(), adapter_names=NAMES)


def test_segmented_lora_equals_per_row_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 8, generator=g)
    result = torch.randn(6, 3, 5, generator=g)
    adapters = {
        n: (torch.randn(r, 8, generator=g), torch.randn(5, r, generator=g), s)
        for n, r, s in [("p", 2, 0.5), ("q", 4, 2.0)]
    }
    names = ["p", "q", "x", "q", "p", "p"]
    segments = [(idx, *adapters[n], torch.nn.Identity()) for n, idx in row_groups(names, 6) if n in adapters]
    got = segmented_lora(result.clone(), x, segments)
    for i, n in enumerate(names):
        want = (
            result[i]
            if n not in adapters
            else result[i] + adapters[n][2] * x[i] @ adapters[n][0].T @ adapters[n][1].T
        )
        torch.testing.assert_close(got[i], want)
    assert [n for n, _ in row_groups(["a", "b"], 4)] == ["a", "b"]
    assert row_groups(["a", "b"], 4)[1][1].tolist() == [2, 3]


def test_causal_lm_training_loss_with_labels_uses_every_rows_adapter():
    """In train mode with labels the causal-LM wrapper normally takes its fused-loss path; a mixed batch must
    give the loss of the per-row logits."""
    configs = {
        n: peftkit.LoraConfig(task_type="CAUSAL_LM", **vars_of(c))
        for n, c in CONFIG_SETS["lora-ranks-targets"].items()
    }
    model = _llama_with(configs).train()
    inputs = _inputs()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    loss = model(**inputs, labels=labels, adapter_names=NAMES).loss
    with torch.no_grad():
        logits = torch.cat(
            [_alone(model, n, {k: v[i : i + 1] for k, v in inputs.items()}) for i, n in enumerate(NAMES)]
        )
    want = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(loss.detach(), want, atol=1e-5, rtol=1e-5)


def vars_of(config):
    keys = ("r", "target_modules", "lora_alpha", "init_lora_weights")
    return {k: getattr(config, k) for k in keys}


def test_batched_lora_equals_per_row_computation_with_padding_and_ranks():
    from peftkit.functional.segmented import batched_lora_, padded_groups

    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 2, 8, generator=g)
    result = torch.randn(7, 2, 5, generator=g)
    ranks = {"p": 2, "q": 4, "s": 1}
    weights = {n: (torch.randn(r, 8, generator=g), torch.randn(5, r, generator=g)) for n, r in ranks.items()}
    scale = {"p": 0.5, "q": 2.0, "s": -1.0}
    names = ["p", "q", "__base__", "q", "s", "q", "p"]
    groups = [(n, idx) for n, idx in row_groups(names, 7) if n in ranks]
    order = [n for n, _ in groups]
    A = torch.stack([torch.nn.functional.pad(weights[n][0], (0, 0, 0, 4 - ranks[n])) for n in order])
    B = torch.stack([torch.nn.functional.pad(weights[n][1], (0, 4 - ranks[n])) for n in order])
    table, valid = padded_groups(groups)
    assert valid is not None  # groups of 2, 3 and 1 rows: padded
    got = batched_lora_(result.clone(), x, table, valid, A, B, torch.tensor([scale[n] for n in order]))
    for i, n in enumerate(names):
        want = (
            result[i] if n not in ranks else result[i] + scale[n] * x[i] @ weights[n][0].T @ weights[n][1].T
        )
        torch.testing.assert_close(got[i], want)


def test_generate_groups_rows_into_blocks_and_restores_order(monkeypatch):
    """Interleaved adapters of equal counts: generate reorders prompts into one block per adapter (so layers
    add updates with `blocked_lora_`, no gather) and returns rows in the caller's order, equal to each alone."""
    from peftkit.functional import segmented

    calls = []
    real = segmented.blocked_lora_
    monkeypatch.setattr("peftkit.mixed_batch.blocked_lora_", lambda *a: calls.append(a[2].shape) or real(*a))
    model = _llama_with(CONFIG_SETS["lora-ranks-targets"])
    names = ["a", "b", "__base__", "c", "b", "a", "c", "__base__"]
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 128, (8, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[2, :2] = mask[5, :3] = 0
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        for extra in ({}, {"num_beams": 2, "num_return_sequences": 2}):
            calls.clear()
            mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kw, **extra)
            per = 2 if extra else 1
            assert calls and all(shape[0] == 4 for shape in calls)  # 4 blocks: a, b, __base__, c
            for i, name in enumerate(names):
                row = {"input_ids": ids[i : i + 1], "attention_mask": mask[i : i + 1]}
                if name == "__base__":
                    with model.disable_adapter():
                        alone = model.generate(**row, **kw, **extra)
                else:
                    model.set_adapter(name)
                    alone = model.generate(**row, **kw, **extra)
                assert torch.equal(mixed[i * per : (i + 1) * per], alone), (i, name, extra)


def test_blocked_lora_equals_per_row_computation():
    from peftkit.functional.segmented import blocked_lora_

    g = torch.Generator().manual_seed(2)
    x, result = torch.randn(6, 3, 8, generator=g), torch.randn(6, 3, 5, generator=g)
    A, B = torch.randn(3, 4, 8, generator=g), torch.randn(3, 5, 4, generator=g)
    got = blocked_lora_(result.clone(), x, A.transpose(1, 2).contiguous(), B.transpose(1, 2).contiguous())
    for i in range(6):
        torch.testing.assert_close(got[i], result[i] + x[i] @ A[i // 2].T @ B[i // 2].T)


BLOCK_NAMES = ["a", "a", "__base__", "__base__", "c", "c", "b", "b"]  # equal contiguous blocks


def _count_fast(monkeypatch) -> list:
    """Record every `blocked_linear_lora` call (the per-call fast path of mixed LoRA layers)."""
    from peftkit.functional import segmented

    calls, real = [], segmented.blocked_linear_lora
    monkeypatch.setattr(
        "peftkit.mixed_batch.blocked_linear_lora", lambda *a: calls.append(a[3].shape) or real(*a)
    )
    return calls


def _block_inputs(seed=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (8, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[4, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_fast_path_repeats_equal_rows_alone_and_follows_grad_mode(monkeypatch):
    """Inside one mixed context the first no-grad call of a batch size runs the full path, the second and later
    ones the kept fast path (ranks 2/4/8, adapter `c` missing from most layers, `__base__` rows), equal to each
    row alone; with grad on the layers take the full path and give gradients; another batch size decides anew."""
    from peftkit.mixed_batch import mixed_adapters

    calls = _count_fast(monkeypatch)
    model = _llama_with(CONFIG_SETS["lora-ranks-targets"])
    inputs = _block_inputs()
    twice = {k: v.repeat_interleave(2, 0) for k, v in inputs.items()}  # as for 2 beams: blocks of 4 rows
    with mixed_adapters(model, BLOCK_NAMES):
        with torch.no_grad():
            first = output_tensor(model(**inputs))
            assert not calls  # a single forward pays nothing for the fast path
            again = output_tensor(model(**inputs))
            n = len(calls)
            assert n > 0 and all(shape[0] == 4 for shape in calls)  # 4 blocks: a, __base__, c, b
            assert torch.equal(output_tensor(model(**inputs)), again) and len(calls) == 2 * n
            torch.testing.assert_close(again, first, atol=1e-5, rtol=1e-5)
            for _ in range(2):
                got = output_tensor(model(**twice))
                torch.testing.assert_close(got, first.repeat_interleave(2, 0), atol=1e-5, rtol=1e-5)
            assert len(calls) == 3 * n
        grad_out = output_tensor(model(**inputs))
        assert len(calls) == 3 * n  # grad on: the full path
        grad_out.float().sum().backward()
    torch.testing.assert_close(grad_out.detach(), first, atol=1e-5, rtol=1e-5)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["a"].weight.grad.abs().sum() > 0
    with torch.no_grad():
        for i, name in enumerate(BLOCK_NAMES):
            row = {k: v[i : i + 1] for k, v in inputs.items()}
            torch.testing.assert_close(again[i : i + 1], _alone(model, name, row), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "names, path",
    [
        (
            ["a", "b", "a", "__base__", "c", "a", "b", "a"],
            "gathered_linear_lora",
        ),  # any order, unequal groups
        (["b"] * 8, "blocked_linear_lora"),  # one adapter for the whole batch: one block
    ],
    ids=["interleaved", "one-adapter"],
)
def test_fast_path_for_any_row_order_equals_each_row_alone(monkeypatch, names, path):
    """Rows not in equal blocks (a server's batch, in arrival order) or all on one adapter also get the kept
    fast path from the second no-grad call of a context on, equal to each row alone."""
    from peftkit.functional import segmented
    from peftkit.mixed_batch import mixed_adapters

    calls, real = [], getattr(segmented, path)
    monkeypatch.setattr(f"peftkit.mixed_batch.{path}", lambda *a: calls.append(1) or real(*a))
    model = _llama_with(CONFIG_SETS["lora-ranks-targets"])
    inputs = _block_inputs()
    with mixed_adapters(model, names), torch.no_grad():
        first = output_tensor(model(**inputs))
        assert not calls
        again = output_tensor(model(**inputs))
        assert calls
    torch.testing.assert_close(again, first, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for i, name in enumerate(names):
            row = {k: v[i : i + 1] for k, v in inputs.items()}
            torch.testing.assert_close(again[i : i + 1], _alone(model, name, row), atol=1e-5, rtol=1e-5)


def test_kept_weight_layout_outlives_the_context_and_follows_the_weight():
    """`keep_layout=True` (the server's decode steps): the (in, out) copy of a frozen weight is made once and
    reused by later contexts, made again after the weight changes, and gone after `drop_stacks`; by default
    nothing stays on the layers."""
    from peftkit.mixed_batch import drop_stacks, mixed_adapters

    model = _llama_with(CONFIG_SETS["lora-ranks-targets"])
    inputs = _block_inputs()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj

    def two_calls(keep):
        with mixed_adapters(model, BLOCK_NAMES, keep_layout=keep), torch.no_grad():
            model(**inputs)
            return output_tensor(model(**inputs))

    plain = two_calls(False)
    assert "_mixed_wt" not in layer.__dict__
    kept = two_calls(True)
    copy = layer.__dict__["_mixed_wt"][1]
    assert copy.is_contiguous() and torch.equal(copy, layer.base_layer.weight.T)
    torch.testing.assert_close(kept, plain, atol=1e-6, rtol=1e-6)
    two_calls(True)
    assert layer.__dict__["_mixed_wt"][1] is copy  # reused, not copied again
    with torch.no_grad():
        layer.base_layer.weight.mul_(2.0)
    changed = two_calls(True)
    assert layer.__dict__["_mixed_wt"][1] is not copy
    assert torch.equal(layer.__dict__["_mixed_wt"][1], layer.base_layer.weight.T)
    torch.testing.assert_close(changed, two_calls(False), atol=1e-6, rtol=1e-6)
    drop_stacks(model)
    assert "_mixed_wt" not in layer.__dict__


def test_fast_path_weight_layout_follows_the_decode_rule(monkeypatch):
    """The base weight the fast path multiplies by is an (in, out)-contiguous copy from IN_MAJOR_ROWS rows on,
    the transposed view below (`inference_fold.decodes_in_major`, the rule the LoRA fold follows too)."""
    from peftkit import inference_fold
    from peftkit.functional import segmented
    from peftkit.mixed_batch import mixed_adapters

    copies = []
    real = segmented.blocked_linear_lora
    monkeypatch.setattr(
        "peftkit.mixed_batch.blocked_linear_lora",
        lambda x, wt, *a: copies.append((x.shape[0], wt.is_contiguous())) or real(x, wt, *a),
    )
    model = _llama_with(CONFIG_SETS["lora-ranks-targets"])
    inputs = _block_inputs()
    for rows, names in ((8, BLOCK_NAMES), (2, ["a", "b"])):
        part = {k: v[:rows] for k, v in inputs.items()}
        with mixed_adapters(model, names), torch.no_grad():
            model(**part)
            model(**part)  # the second call of a batch size takes the fast path
    assert {rows for rows, _ in copies} == {8, 2}
    assert 2 < inference_fold.IN_MAJOR_ROWS <= 8  # the two batch sizes fall on either side
    assert all(contiguous == (rows >= inference_fold.IN_MAJOR_ROWS) for rows, contiguous in copies)


def test_fast_path_sees_adapter_changes_between_calls(monkeypatch):
    """The fast path is per call: after an in-place update of an adapter (an optimizer step) or with another
    assignment of adapters to rows, the next mixed generate equals each row alone with the new weights."""
    calls = _count_fast(monkeypatch)
    model = _llama_with(CONFIG_SETS["lora-ranks-targets"])
    inputs = _block_inputs()
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}

    def check(names):
        with torch.no_grad():
            mixed = model.generate(**inputs, adapter_names=names, **kw)
            for i, name in enumerate(names):
                row = {k: v[i : i + 1] for k, v in inputs.items()}
                if name == "__base__":
                    with model.disable_adapter():
                        alone = model.generate(**row, **kw)
                else:
                    model.set_adapter(name)
                    alone = model.generate(**row, **kw)
                assert torch.equal(mixed[i : i + 1], alone), (i, name)
        return mixed

    before = check(BLOCK_NAMES)
    assert calls
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B.a." in n or ".lora_A.b." in n:
                p.mul_(-3.0)
    after = check(BLOCK_NAMES)
    assert not torch.equal(before, after)
    check(["b", "b", "a", "a", "c", "c", "a", "a"])


def test_blocked_linear_lora_equals_linear_plus_per_row_update():
    from peftkit.functional.segmented import blocked_linear_lora

    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, 8, generator=g)
    W, bias = torch.randn(5, 8, generator=g), torch.randn(5, generator=g)
    A, B = torch.randn(3, 4, 8, generator=g), torch.randn(3, 5, 4, generator=g)
    At, Bt = A.transpose(1, 2).contiguous(), B.transpose(1, 2).contiguous()
    got = blocked_linear_lora(x, W.T.contiguous(), bias, At, Bt)
    torch.testing.assert_close(blocked_linear_lora(x, W.T, None, At, Bt), got - bias)
    for i in range(6):
        torch.testing.assert_close(got[i], x[i] @ W.T + bias + x[i] @ A[i // 2].T @ B[i // 2].T)


def test_stacks_follow_fused_optimizer_steps_and_loaded_tensors():
    """The stacked factors kept on each layer between mixed calls are rebuilt after a fused optimizer step (it
    updates the adapters in place without bumping their `_version`) and after adapter tensors are loaded
    through `.data`: the next no-grad mixed forward still equals each row alone."""
    model = _llama_with(CONFIG_SETS["lora-ranks-targets"])
    inputs = _block_inputs()
    names = BLOCK_NAMES
    first = _check_rows_equal_alone(model, inputs, names)

    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    versions = [p._version for p in params]
    optimizer = torch.optim.AdamW(params, lr=0.5, fused=True)
    model.train()
    output_tensor(model(**inputs)).square().mean().backward()
    optimizer.step()
    model.eval()
    assert [p._version for p in params] == versions  # what the version key alone would miss
    stepped = _check_rows_equal_alone(model, inputs, names)
    assert not torch.allclose(first, stepped)

    state = peftkit.get_peft_model_state_dict(model, adapter_name="a")
    peftkit.set_peft_model_state_dict(model, {k: v * 2 for k, v in state.items()}, adapter_name="a")
    loaded = _check_rows_equal_alone(model, inputs, names)
    rows_a = [i for i, n in enumerate(names) if n == "a"]
    assert not torch.allclose(loaded[rows_a], stepped[rows_a])
