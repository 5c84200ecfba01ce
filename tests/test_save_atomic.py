"""A save replaces an adapter's config + weights as one unit, keeps other files, and writes a model card."""

from __future__ import annotations

import os

import pytest
import torch

from peftkit import LoraConfig, PeftModel, atomic_files, get_peft_model

from .models import tiny_llama


def _lora(r: int, seed: int) -> PeftModel:
    model = get_peft_model(tiny_llama(), LoraConfig(r=r, target_modules=["q_proj"], init_lora_weights=False))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_()
    return model


def _adapter(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.get_adapter_state_dict().items()}


def _user_files(folder) -> dict[str, str]:
    files = {
        "README.md": "# mine\n\nMy notes.\n",
        "trainer_state.json": '{"global_step": 3}',
        "other/adapter_config.json": "{}",
    }
    for name, text in files.items():
        os.makedirs(os.path.dirname(folder / name), exist_ok=True)
        (folder / name).write_text(text)
    return files


def _fail_on_nth_fsync(monkeypatch, n: int) -> None:
    calls = {"n": 0}
    real = os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError(28, "No space left on device (injected)")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_failure_on_the_second_write_keeps_the_previous_pair(tmp_path, monkeypatch):
    old = _lora(4, seed=1)
    old.save_pretrained(tmp_path)
    expected = _adapter(old)
    user = _user_files(tmp_path)
    _fail_on_nth_fsync(monkeypatch, 2)  # the weights are written, the config write fails
    with pytest.raises(OSError, match="injected"):
        _lora(8, seed=2).save_pretrained(tmp_path)
    monkeypatch.undo()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].r == 4
    got = _adapter(loaded)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")], "temporary files were left behind"
    assert all((tmp_path / name).read_text().startswith(text.split("\n")[0]) for name, text in user.items())


def test_crash_between_the_renames_is_finished_by_the_next_load(tmp_path, monkeypatch):
    _lora(4, seed=1).save_pretrained(tmp_path)
    new = _lora(8, seed=2)
    real_replace, calls = os.replace, {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 3:  # 1: the pending log; 2: the first file of the pair; then the process dies
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(atomic_files.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / atomic_files.PENDING_NAME).exists()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].r == 8
    expected, got = _adapter(new), _adapter(loaded)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_model_card_is_written_and_a_users_card_is_updated_not_replaced(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "fresh")
    card = (tmp_path / "fresh" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "- lora" in card
    assert "pipeline_tag: text-generation" in card and "- peftkit 0.1.0" in card
    mine = "---\nlicense: mit\ntags:\n- mine\n---\n\n# My adapter\n\nMy words.\n"
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "README.md").write_text(mine)
    model.save_pretrained(tmp_path / "user")
    model.save_pretrained(tmp_path / "user")  # twice: the version line is not repeated
    card = (tmp_path / "user" / "README.md").read_text()
    assert "license: mit" in card and "- mine" in card and "- lora" in card
    assert "# My adapter\n\nMy words.\n" in card and card.count("- peftkit 0.1.0") == 1
