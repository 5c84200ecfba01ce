"""`peftkit serve` as a real subprocess on a real port, driven by the official `openai` client: completions,
chat, streaming, concurrent requests for different adapters (batched, each equal to peftkit's own greedy
`generate`), adapter load/unload while serving, the error cases, and a client that hangs up mid-stream."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import peftkit  # noqa: E402

from .train.tiny import build_tiny_model  # noqa: E402

PROMPTS = ["cat dog sun", "moon tree rock fish", "bird", "Reverse the word. cat"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapter(model_dir: Path, folder: Path, seed: int, **config) -> Path:
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():  # large enough to change greedy choices of a random tiny model
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(3.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = build_tiny_model(root / "model", chat_template=True)
    adapters = {
        "alpha": _adapter(model_dir, root / "alpha", 1, r=4, target_modules=["q_proj", "v_proj"]),
        # dropout in the file, as in many adapters trained with HF peft: it must not run when served
        "beta": _adapter(model_dir, root / "beta", 2, r=2, target_modules="all-linear", lora_dropout=0.3),
        "gamma": _adapter(
            model_dir, root / "gamma", 3, r=8, target_modules=["o_proj", "down_proj"], lora_dropout=0.3
        ),
    }
    port = _free_port()
    cmd = [sys.executable, "-m", "peftkit.cli", "serve", "--model", str(model_dir), "--port", str(port)]
    cmd += ["--threads", "1", "--max-batch", "16"]
    for name in ("alpha", "beta"):
        cmd += ["--adapter", f"{name}={adapters[name]}"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy()
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"peftkit serve exited: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("peftkit serve did not come up in 120 s")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield {"url": url, "client": client, "model_dir": model_dir, "adapters": adapters}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def reference(served):
    """peftkit's own greedy generate, in this process: {(model, prompt): text}."""
    tokenizer = AutoTokenizer.from_pretrained(served["model_dir"])
    cache = {}

    def answer(model: str, prompt_ids: list[int], max_tokens: int) -> str:
        key = (model, tuple(prompt_ids), max_tokens)
        if key not in cache:
            base = AutoModelForCausalLM.from_pretrained(served["model_dir"]).eval()
            if model in served["adapters"]:
                base = peftkit.PeftModel.from_pretrained(base, served["adapters"][model])
            with torch.no_grad():
                out = base.generate(
                    input_ids=torch.tensor([prompt_ids]),
                    attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            cache[key] = tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)
        return cache[key]

    answer.tokenizer = tokenizer
    return answer


def _complete(client, model, prompt, max_tokens=8, **kw):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def test_models_lists_base_and_adapters(served):
    ids = [m.id for m in served["client"].models.list().data]
    assert ids == ["model", "alpha", "beta"]


@pytest.mark.parametrize("model", ["model", "alpha", "beta"])
def test_completion_equals_peftkit_generate(served, reference, model):
    out = _complete(served["client"], model, PROMPTS[0])
    ids = reference.tokenizer(PROMPTS[0])["input_ids"]
    assert out.choices[0].text == reference(model, ids, 8)
    assert out.usage.prompt_tokens == len(ids)
    assert out.choices[0].finish_reason in ("length", "stop")


def test_adapters_answer_differently(served):
    texts = {
        m: _complete(served["client"], m, PROMPTS[1], max_tokens=12).choices[0].text
        for m in ("model", "alpha", "beta")
    }
    assert len(set(texts.values())) == 3, texts


def test_chat_and_streaming(served, reference):
    client = served["client"]
    messages = [{"role": "user", "content": "cat"}]
    whole = client.chat.completions.create(model="alpha", messages=messages, max_tokens=10, temperature=0)
    ids = list(
        reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)[
            "input_ids"
        ]
    )
    assert whole.choices[0].message.content == reference("alpha", ids, 10)
    stream = client.chat.completions.create(
        model="alpha", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    text_stream = _complete(client, "beta", PROMPTS[2], stream=True)
    assert (
        "".join(c.choices[0].text for c in text_stream)
        == _complete(client, "beta", PROMPTS[2]).choices[0].text
    )


def test_concurrent_requests_for_different_adapters_are_batched_and_exact(served, reference):
    client, jobs = served["client"], []
    for i in range(12):
        jobs.append((["model", "alpha", "beta"][i % 3], PROMPTS[i % len(PROMPTS)], 6 + i % 5))
    results: dict[int, str] = {}

    def call(i, model, prompt, n):
        results[i] = _complete(client, model, prompt, max_tokens=n).choices[0].text

    before = httpx.get(served["url"] + "/stats").json()
    threads = [threading.Thread(target=call, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, (model, prompt, n) in enumerate(jobs):
        assert results[i] == reference(model, reference.tokenizer(prompt)["input_ids"], n), (i, model, prompt)
    after = httpx.get(served["url"] + "/stats").json()
    assert after["widest_batch"] >= 3  # requests shared decoding steps
    assert after["steps"] - before["steps"] < sum(n for _, _, n in jobs)


def test_load_use_and_unload_an_adapter_while_serving(served, reference):
    url, client = served["url"], served["client"]
    r = httpx.post(
        url + "/v1/load_lora_adapter",
        json={"lora_name": "gamma", "lora_path": str(served["adapters"]["gamma"])},
    )
    assert r.status_code == 200, r.text
    assert "gamma" in [m.id for m in client.models.list().data]
    ids = reference.tokenizer(PROMPTS[3])["input_ids"]
    assert _complete(client, "gamma", PROMPTS[3]).choices[0].text == reference("gamma", ids, 8)
    again = httpx.post(
        url + "/v1/load_lora_adapter",
        json={"lora_name": "gamma", "lora_path": str(served["adapters"]["gamma"])},
    )
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "gamma"}).status_code == 200
    with pytest.raises(openai.NotFoundError, match="gamma"):
        _complete(client, "gamma", PROMPTS[3])
    missing = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "gamma"})
    assert missing.status_code == 404
    bad_path = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nonexistent"})
    assert bad_path.status_code == 400 and "/nonexistent" in bad_path.json()["error"]["message"]


def test_errors_are_openai_shaped(served):
    client, url = served["client"], served["url"]
    with pytest.raises(openai.NotFoundError, match="nope"):
        _complete(client, "nope", "cat")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="alpha", prompt="cat", temperature=7)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="alpha", prompt="cat", max_tokens=0)
    with pytest.raises(openai.APIStatusError) as too_long:
        _complete(client, "alpha", "cat " * 400)
    assert too_long.value.status_code == 413 and "context" in too_long.value.message
    raw = httpx.post(
        url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.post(url + "/v1/chat/completions", json={"model": "alpha"})
    assert missing.status_code == 400 and "messages" in missing.json()["error"]["message"]


def test_client_hanging_up_mid_stream_frees_its_row(served):
    url, client = served["url"], served["client"]
    with httpx.stream(
        "POST",
        url + "/v1/completions",
        json={"model": "beta", "prompt": "cat", "max_tokens": 200, "stream": True, "temperature": 0},
    ) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 2:
                break
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and httpx.get(url + "/stats").json()["running"]:
        time.sleep(0.1)
    stats = httpx.get(url + "/stats").json()
    assert stats["running"] == 0 and stats["pending"] == 0
    assert _complete(client, "alpha", "cat").choices[0].text is not None


def test_sampling_with_a_seed_is_reproducible(served):
    client = served["client"]
    kw = {"model": "alpha", "prompt": "cat", "max_tokens": 10, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    assert first.choices[0].text == again.choices[0].text
    stops = client.completions.create(model="alpha", prompt="cat", max_tokens=10, temperature=0, stop=[" "])
    assert " " not in stops.choices[0].text


def test_engine_keeps_routing_across_steps_and_reroutes_on_changes(served, monkeypatch):
    """In-process engine: the rows' adapter routing is set up once per batch composition, not per token, and
    an adapter loaded while rows decode (the layers change under the routing) leaves every answer as it is
    without the load. (Equality with greedy `generate` is checked through the real server above.)"""
    from peftkit.serve import adapters as served_adapters
    from peftkit.serve import engine as engine_module
    from peftkit.train.modeling import load_model_and_tokenizer

    entered, real = [], engine_module.mixed_call
    monkeypatch.setattr(engine_module, "mixed_call", lambda *a, **k: entered.append(1) or real(*a, **k))
    model, tokenizer, _ = load_model_and_tokenizer(str(served["model_dir"]), progress=False)
    engine = engine_module.Engine(model, tokenizer, max_batch=8)
    dropped, drop = [], engine.drop_routing
    engine.drop_routing = lambda: (
        dropped.append((threading.current_thread().name, len(engine.rows))) or drop()
    )

    def run(jobs, while_decoding=None) -> list[str]:
        """Each job's text; rows run to max_tokens (ignore_eos), so they are still decoding when
        `while_decoding` is called (after the batch's third step, once every row has joined)."""
        results, done = [""] * len(jobs), [threading.Event() for _ in jobs]

        def receiver(i):
            def receive(kind, payload):
                if kind == "text":
                    results[i] += payload
                elif kind in ("done", "error"):
                    results[i] += "" if kind == "done" else f" <error: {payload}>"
                    done[i].set()

            return receive

        start = engine.steps
        with engine.lock:  # submitted together (they join at the next one or two steps)
            for i, (name, prompt, n) in enumerate(jobs):
                ids = tokenizer(prompt)["input_ids"]
                engine.submit(engine_module.Request(ids, name, n, receiver(i), ignore_eos=True))
        if while_decoding is not None:
            deadline = time.monotonic() + 60
            while (engine.steps < start + 3 or len(engine.rows) < len(jobs)) and time.monotonic() < deadline:
                time.sleep(0.001)
            while_decoding()
        assert all(d.wait(120) for d in done)
        assert engine_module.wait_idle(engine)
        return results

    try:
        for name in ("alpha", "beta"):
            served_adapters.load(engine, name, served["adapters"][name], "model")
        jobs = [("alpha", PROMPTS[0], 200), ("beta", PROMPTS[1], 200), ("__base__", PROMPTS[2], 200)]
        plain = run(jobs)
        # 200 decode steps; the routing set up once per change of the batch (joins, leaves), not per step
        assert 1 <= len(entered) <= 6 and engine.steps >= 200, (len(entered), engine.steps)

        def load_gamma():
            served_adapters.load(engine, "gamma", served["adapters"]["gamma"], "model")
            ids = tokenizer(PROMPTS[3])["input_ids"]
            receive = lambda kind, payload: gamma.append(payload if kind == "text" else "")  # noqa: E731
            engine.submit(engine_module.Request(ids, "gamma", 12, receive, ignore_eos=True))

        gamma: list[str] = []
        assert run(jobs, while_decoding=load_gamma) == plain
        assert any(thread == "MainThread" and rows > 0 for thread, rows in dropped), (
            dropped
        )  # during decoding
        assert "".join(gamma) == run([("gamma", PROMPTS[3], 12)])[0]  # joined mid-batch = alone
    finally:
        engine.close()
