"""The OpenAI-compatible HTTP API of `peftkit serve` (FastAPI): models, completions, chat completions
(streamed as server-sent events or whole), and vLLM-style adapter loading.

Errors are OpenAI's JSON shape `{"error": {"message", "type", "param", "code"}}`: 400 for a malformed body or
an out-of-range value, 404 for an unknown model (adapter), 409 for unloading an adapter in use, 413 for a
prompt longer than the model's context.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..mixed_batch import BASE_NAME
from . import adapters as A
from .engine import Engine
from .engine import Request as Job
from .schemas import ChatBody, CompletionBody, LoadBody, UnloadBody


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {404: "not_found_error", 409: "conflict_error", 413: "request_too_large"}.get(
        status, "invalid_request_error"
    )
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def create_app(engine: Engine, base_id: str) -> FastAPI:
    """The FastAPI application serving `engine`'s model as `base_id` plus its adapters by name."""
    app = FastAPI(title="peftkit serve")
    app.state.engine, app.state.base_id = engine, base_id

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(
            400, f"invalid request: {where or 'body'}: {first.get('msg', 'malformed')}", where or None
        )

    @app.get("/v1/models")
    async def models() -> dict:
        created = int(time.time())
        data = [{"id": base_id, "object": "model", "created": created, "owned_by": "peftkit", "parent": None}]
        data += [
            {"id": n, "object": "model", "created": created, "owned_by": "peftkit", "parent": base_id}
            for n in A.adapter_names(engine)
        ]
        return {"object": "list", "data": data}

    @app.get("/stats")
    async def stats() -> dict:
        """Scheduler counters: decoding steps, rows running and pending now, the widest batch so far."""
        return {
            "steps": engine.steps,
            "running": len(engine.rows),
            "pending": len(engine.pending),
            "widest_batch": engine.widest,
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise ApiError(400, "prompt must not be empty", "prompt")
        ids = [engine.tokenizer(p)["input_ids"] for p in prompts]
        return await _respond(app, http, body, ids, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: Request):
        if engine.tokenizer.chat_template is None:
            raise ApiError(400, f"model {base_id!r} has no chat template; use /v1/completions", "messages")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # a template that rejects these messages (e.g. roles out of order)
            raise ApiError(400, f"messages: the chat template rejected them: {e}", "messages") from None
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return await _respond(app, http, body, [list(ids)], "chat.completion")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadBody):
        try:
            await run_in_threadpool(A.load, engine, body.lora_name, body.lora_path, base_id)
        except A.AdapterError as e:
            raise ApiError(e.status, str(e), "lora_path") from None
        return {"status": "ok", "lora_name": body.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadBody):
        try:
            await run_in_threadpool(A.unload, engine, body.lora_name)
        except A.AdapterError as e:
            raise ApiError(e.status, str(e), "lora_name") from None
        return {"status": "ok", "lora_name": body.lora_name}

    return app


def _adapter_for(app: FastAPI, model: str) -> str:
    if model == app.state.base_id or model == BASE_NAME:
        return BASE_NAME
    names = A.adapter_names(app.state.engine)
    if model not in names:
        raise ApiError(404, f"model {model!r} not found; available: {[app.state.base_id, *names]}", "model")
    return model


def _jobs(app: FastAPI, body: Any, prompts: list[list[int]], queue: asyncio.Queue) -> list[Job]:
    engine: Engine = app.state.engine
    adapter = _adapter_for(app, body.model)
    max_tokens = body.token_limit()
    loop = asyncio.get_running_loop()
    jobs = []
    for p, ids in enumerate(prompts):
        if len(ids) + 1 > engine.context:
            raise ApiError(
                413, f"prompt is {len(ids)} tokens; the model's context is {engine.context}", "prompt"
            )
        for c in range(body.n):
            index = p * body.n + c

            def emit(kind: str, payload: Any, index: int = index) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (index, kind, payload))

            jobs.append(
                Job(
                    prompt_ids=list(ids),
                    adapter=adapter,
                    max_tokens=min(max_tokens, engine.context - len(ids)),
                    emit=emit,
                    temperature=body.temperature,
                    top_p=body.top_p,
                    stop=body.stop_list(),
                    seed=None if body.seed is None else body.seed + index,
                    ignore_eos=body.ignore_eos,
                )
            )
    return jobs


async def _respond(app: FastAPI, http: Request, body: Any, prompts: list[list[int]], kind: str):
    queue: asyncio.Queue = asyncio.Queue()
    jobs = _jobs(app, body, prompts, queue)
    for job in jobs:
        app.state.engine.submit(job)
    meta = {
        "id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        "created": int(time.time()),
        "model": body.model,
    }
    prompt_tokens = sum(len(ids) for ids in prompts)
    if body.stream:
        return StreamingResponse(_stream(jobs, queue, meta, kind), media_type="text/event-stream")
    return await _collect(http, jobs, queue, meta, kind, prompt_tokens)


async def _events(jobs: list[Job], queue: asyncio.Queue) -> AsyncIterator[tuple[int, str, Any]]:
    """(choice index, "text"|"done"|"error", payload) until every job is done; cancels them if abandoned."""
    open_jobs = len(jobs)
    try:
        while open_jobs:
            index, what, payload = await queue.get()
            if what in ("done", "error"):
                open_jobs -= 1
            yield index, what, payload
    finally:
        for job in jobs:
            job.cancelled = job.finish_reason is None


def _usage(prompt_tokens: int, jobs: list[Job]) -> dict:
    completion = sum(len(j.generated) for j in jobs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


async def _collect(
    http: Request, jobs: list[Job], queue: asyncio.Queue, meta: dict, kind: str, prompt_tokens: int
) -> dict:
    texts, reasons = [""] * len(jobs), [None] * len(jobs)
    events = _events(jobs, queue)
    waiter = asyncio.ensure_future(_watch_disconnect(http, jobs))
    try:
        async for index, what, payload in events:
            if what == "text":
                texts[index] += payload
            elif what == "done":
                reasons[index] = payload
            else:
                raise ApiError(500, f"generation failed: {payload}")
    finally:
        waiter.cancel()
        await events.aclose()
    if kind == "chat.completion":
        choices = [
            {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r, "logprobs": None}
            for i, (t, r) in enumerate(zip(texts, reasons))
        ]
    else:
        choices = [
            {"index": i, "text": t, "finish_reason": r, "logprobs": None}
            for i, (t, r) in enumerate(zip(texts, reasons))
        ]
    return {**meta, "object": kind, "choices": choices, "usage": _usage(prompt_tokens, jobs)}


async def _watch_disconnect(http: Request, jobs: list[Job]) -> None:
    """A non-streaming client that hangs up frees its rows at the next step."""
    while not await http.is_disconnected():
        await asyncio.sleep(0.25)
    for job in jobs:
        job.cancelled = True


async def _stream(jobs: list[Job], queue: asyncio.Queue, meta: dict, kind: str) -> AsyncIterator[str]:
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
    started = set()
    async for index, what, payload in _events(jobs, queue):
        if what == "error":
            yield f"data: {json.dumps({'error': {'message': payload, 'type': 'server_error', 'code': 500}})}\n\n"
            continue
        text, reason = (payload, None) if what == "text" else ("", payload)
        if kind == "chat.completion":
            delta = {"content": text} if text or what == "text" else {}
            if index not in started:
                delta = {"role": "assistant", **delta}
                started.add(index)
            choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": index, "text": text, "finish_reason": reason, "logprobs": None}
        yield f"data: {json.dumps({**meta, 'object': chunk_kind, 'choices': [choice]})}\n\n"
    yield "data: [DONE]\n\n"
