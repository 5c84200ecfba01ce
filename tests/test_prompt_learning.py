"""Prompt tuning, prefix tuning and P-tuning beyond the conformance battery: generation on the KV cache,
text initialisation, training, and the file/config rules they share with HF peft."""

from __future__ import annotations

import peft as hf_peft
import pytest
import torch

import peftkit

from . import models as M

CAUSAL = [M.tiny_llama, M.tiny_gpt2, M.tiny_bloom]
CONFIGS = {
    "prompt": lambda task: peftkit.PromptTuningConfig(task_type=task, num_virtual_tokens=3),
    "prefix": lambda task: peftkit.PrefixTuningConfig(task_type=task, num_virtual_tokens=3),
    "prefix-projection": lambda task: peftkit.PrefixTuningConfig(
        task_type=task, num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16
    ),
    "p-tuning-mlp": lambda task: peftkit.PromptEncoderConfig(
        task_type=task, num_virtual_tokens=3, encoder_hidden_size=16
    ),
    "p-tuning-lstm": lambda task: peftkit.PromptEncoderConfig(
        task_type=task, num_virtual_tokens=3, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"
    ),
}
GEN = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}


def wrapped(factory, method: str, task: str = "CAUSAL_LM", seed: int = 5):
    torch.manual_seed(seed)
    base = factory(0)
    base.generation_config.eos_token_id = None  # random weights: run every step, as the greedy reference does
    return peftkit.get_peft_model(base, CONFIGS[method](task)).eval()


def greedy_full_forward(model, ids: torch.Tensor, steps: int = 6) -> torch.Tensor:
    """Greedy decoding that reruns the whole sequence each step (no cache): the reference for generate."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("factory", CAUSAL, ids=lambda f: f.__name__)
def test_causal_generate_uses_prompt_once_and_matches_full_forward(factory, method):
    model = wrapped(factory, method)
    ids = M.token_inputs()["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **GEN)
    assert torch.equal(out, greedy_full_forward(model, ids))  # also: output = input ids + new tokens
    with model.disable_adapter():
        disabled = model.generate(input_ids=ids, **GEN)
    base = factory(0)
    base.generation_config.eos_token_id = None
    assert torch.equal(disabled, base.generate(input_ids=ids, **GEN))


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_causal_generate_step_logits_equal_forward(method):
    """Each generated step's logits (cache path) equal the full forward's at that position."""
    model = wrapped(M.tiny_llama, method)
    ids = M.token_inputs()["input_ids"]
    out = model.generate(input_ids=ids, output_logits=True, return_dict_in_generate=True, **GEN)
    with torch.no_grad():
        full = model(input_ids=out.sequences, attention_mask=torch.ones_like(out.sequences)).logits
    full = full[:, -out.sequences.shape[1] :]  # prompt tuning returns logits for the virtual tokens too
    steps = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(steps, full[:, ids.shape[1] - 1 : -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["prompt", "prefix", "p-tuning-mlp"])
def test_beam_search_expands_the_prompt(method):
    """Beams (and returned sequences) expand the batch inside generate; the prompt/cache follows. Each input's
    beams equal those of that input generated alone."""
    model = wrapped(M.tiny_llama, method)
    ids = M.token_inputs()["input_ids"]
    kw = {
        "max_new_tokens": 4,
        "num_beams": 3,
        "num_return_sequences": 2,
        "do_sample": False,
        "pad_token_id": 0,
    }
    both = model.generate(input_ids=ids, **kw)
    assert both.shape == (4, 12) and torch.equal(both[:, :8], ids.repeat_interleave(2, dim=0))
    for row in range(2):
        alone = model.generate(input_ids=ids[row : row + 1], **kw)
        assert torch.equal(alone, both[2 * row : 2 * row + 2])


@pytest.mark.parametrize("method", ["prompt", "prefix", "p-tuning-mlp"])
def test_seq2seq_generate_matches_greedy_decoder_loop(method):
    model = wrapped(M.tiny_t5, method, task="SEQ_2_SEQ_LM")
    inputs = M.seq2seq_inputs()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    dec = torch.zeros(ids.shape[0], 1, dtype=torch.long)
    for _ in range(5):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits[:, -1]
        dec = torch.cat([dec, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, dec)
    with model.disable_adapter():
        disabled = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(disabled, M.tiny_t5(0).generate(input_ids=ids, attention_mask=mask, max_new_tokens=5))


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_training_lowers_lm_loss(method):
    """The model's own LM loss (labels: -100 over the virtual tokens) falls; only the prompt encoder trains."""
    torch.manual_seed(1)
    model = peftkit.get_peft_model(M.sharp(M.tiny_llama)(0), CONFIGS[method]("CAUSAL_LM"))
    model.train()
    assert all(n.startswith("prompt_encoder.") for n, p in model.named_parameters() if p.requires_grad)
    inputs = M.token_inputs()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def _word_tokenizer(folder) -> None:
    """A tiny word-level tokenizer saved where AutoTokenizer can load it (no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        w: i for i, w in enumerate(["[UNK]", "classify", "the", "review", "as", "positive", "or", "negative"])
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


def test_text_init_copies_word_embeddings_like_hf(tmp_path):
    _word_tokenizer(tmp_path)
    text = "classify the review as positive or negative"  # ids 1..7, repeated/cut to 10 virtual tokens
    kw = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 10, "prompt_tuning_init": "TEXT",
          "prompt_tuning_init_text": text, "tokenizer_name_or_path": str(tmp_path)}  # fmt: skip
    ours = peftkit.get_peft_model(M.tiny_llama(0), peftkit.PromptTuningConfig(**kw))
    rows = ours.base_model.prompt_encoder["default"].embedding.weight
    word = M.tiny_llama(0).get_input_embeddings().weight
    assert torch.equal(rows, word[torch.tensor([1, 2, 3, 4, 5, 6, 7, 1, 2, 3])])
    theirs = hf_peft.get_peft_model(M.tiny_llama(0), hf_peft.PromptTuningConfig(**kw))
    assert torch.equal(rows, theirs.prompt_encoder["default"].embedding.weight)


def test_text_init_config_errors():
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        peftkit.PromptTuningConfig(
            num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi"
        )
    with pytest.raises(ValueError, match="prompt_tuning_init must be one of"):
        peftkit.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="WORDS")
    with pytest.raises(ValueError, match="num_virtual_tokens is required"):
        peftkit.get_peft_model(M.tiny_llama(0), peftkit.PromptTuningConfig(task_type="CAUSAL_LM"))


def test_config_filled_from_model_as_hf_does():
    """num_layers / token_dim / heads from the model config; prefix tuning on GQA caches kv heads x head_dim."""
    for method in ("prompt", "prefix", "p-tuning-mlp"):
        ours = peftkit.get_peft_model(M.tiny_llama(0), CONFIGS[method]("CAUSAL_LM")).peft_config["default"]
        theirs = hf_peft.get_peft_model(M.tiny_llama(0), _hf_config(method)).peft_config["default"]
        for field in ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"):
            assert getattr(ours, field) == getattr(theirs, field), (method, field)
    prefix = peftkit.get_peft_model(M.tiny_llama(0), CONFIGS["prefix"]("CAUSAL_LM")).peft_config["default"]
    assert (prefix.token_dim, prefix.num_attention_heads, prefix.encoder_hidden_size) == (16, 2, 16)
    t5 = peftkit.get_peft_model(M.tiny_t5(0), CONFIGS["prompt"]("SEQ_2_SEQ_LM")).peft_config["default"]
    assert t5.num_transformer_submodules == 2


def _hf_config(method: str):
    ours = CONFIGS[method]("CAUSAL_LM")
    fields = {k: v for k, v in ours.to_dict().items() if k not in ("peft_type",) and v is not None}
    return getattr(hf_peft, type(ours).__name__)(**fields)


def test_merge_raises_and_unload_returns_base():
    model = wrapped(M.tiny_llama, "prefix")
    for call in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match="prompt-learning methods have no weights to merge"):
            call()
    assert type(model.unload()).__name__ == "LlamaForCausalLM"


def test_reparameterised_adapter_reloads_as_its_computed_rows(tmp_path):
    """Files hold the MLP's output, not the MLP: a reload (also with is_trainable) gives the same outputs."""
    model = wrapped(M.tiny_llama, "p-tuning-mlp")
    model.save_pretrained(tmp_path)
    inputs = M.token_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
    for trainable in (False, True):
        loaded = peftkit.PeftModel.from_pretrained(M.tiny_llama(0), tmp_path, is_trainable=trainable)
        with torch.no_grad():
            assert torch.equal(loaded(**inputs).logits, expected)
        names = {n for n, p in loaded.named_parameters() if p.requires_grad}
        assert names == ({"prompt_encoder.default.embedding.weight"} if trainable else set())


def test_adapters_switch_and_delete():
    model = wrapped(M.tiny_llama, "prompt")
    model.add_adapter("other", peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    inputs = M.token_inputs()
    assert model(**inputs).logits.shape[1] == 11
    model.set_adapter("other")
    assert model.active_adapters == ["other"]
    assert model(**inputs).logits.shape[1] == 10
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_encoder.other.embedding.weight"}
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
