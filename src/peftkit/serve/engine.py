"""The generation engine behind `peftkit serve`: one base model, many adapters, continuous batching.

A background thread runs decoding steps. Every step feeds the last token of every running request as one
batch (row i through its own adapter: see `peftkit.mixed_batch`) against one left-padded KV cache. Requests
that arrive meanwhile are prefilled together at the start of the next step and their cache rows joined to the
batch (`kv.py`); finished or cancelled requests leave the batch after the step.

The routing of rows to adapters (`mixed_batch.mixed_call`) stays in place across decode steps for as long as
the rows stay the same, so from a batch's second step on each adapted layer runs its kept fast path (the
frozen weight in the layout decode steps multiply fastest by, kept between batches: `keep_layout`, and the
adapters' stacked factors) instead of building it anew every token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from ..hf_compat import CACHE_KEY
from ..mixed_batch import mixed_call
from . import kv


@dataclass
class Request:
    """One completion: prompt token ids in, tokens out through `emit(kind, payload)` (called from the engine
    thread: ("text", str) pieces, then ("done", finish_reason) or ("error", message))."""

    prompt_ids: list[int]
    adapter: str
    max_tokens: int
    emit: Callable[[str, Any], None]
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    generated: list[int] = field(default_factory=list)
    sent_chars: int = 0
    cancelled: bool = False
    finish_reason: str | None = None
    generator: torch.Generator | None = None


class Engine:
    """Owns the model (a PeftModel, or a plain model when no adapter is loaded) and the decoding thread."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_batch: int = 32) -> None:
        self.model, self.tokenizer, self.max_batch = model.eval(), tokenizer, max_batch
        self.lock = threading.Lock()  # held during a step and while adapters change
        self.wake = threading.Condition(threading.Lock())
        self.pending: list[Request] = []
        self.rows: list[Request] = []
        self.cache = self.mask = self.last = None
        self.eos = _eos_ids(model, tokenizer)
        self.context = _context_length(model)
        self.steps = 0
        self.widest = 0  # the most rows decoded in one step so far
        self._routing: ExitStack | None = None  # the rows' adapter routing kept across decode steps
        self._routed: tuple[str, ...] | None = None  # the adapter of each row it was set up for
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="peftkit-engine", daemon=True)
        self.thread.start()

    # ----- requests ------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        if request.seed is not None:
            request.generator = torch.Generator().manual_seed(request.seed)
        with self.wake:
            self.pending.append(request)
            self.wake.notify()

    def running_adapters(self) -> set[str]:
        return {r.adapter for r in self.rows + self.pending if not r.cancelled}

    def close(self) -> None:
        with self.wake:
            self._stop = True
            self.wake.notify()
        self.thread.join(timeout=30)
        self.drop_routing()

    def drop_routing(self) -> None:
        """Take the kept adapter routing off the model's layers (before the batch or the model changes; the
        next decode step sets it up again). Call with `lock` held, or from the engine thread."""
        if self._routing is not None:
            self._routing.close()
            self._routing = self._routed = None

    # ----- the loop ----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.wake:
                while not (self.pending or self.rows or self._stop):
                    self.wake.wait()
                if self._stop:
                    return
                room = self.max_batch - len(self.rows)
                joining, self.pending = self.pending[:room], self.pending[room:]
            try:
                with self.lock, torch.inference_mode():
                    self._step([r for r in joining if not r.cancelled])
            except Exception as e:  # a failed step ends its requests with the error; the server stays up
                self.drop_routing()
                for r in self.rows + joining:
                    r.emit("error", f"{type(e).__name__}: {e}")
                self.rows, self.cache = [], None

    def _step(self, joining: list[Request]) -> None:
        """Decode one token for every running row, after prefilling the rows that join now."""
        if self.rows:
            self._decode()
        if joining:
            self.drop_routing()  # the prefill routes its own rows, and the batch changes
            self._prefill(joining)
        self.steps += 1
        self.widest = max(self.widest, len(self.rows))
        keep = [i for i, r in enumerate(self.rows) if r.finish_reason is None and not r.cancelled]
        if len(keep) < len(self.rows):
            self.drop_routing()
            self.rows = [self.rows[i] for i in keep]
            if not self.rows:
                self.cache = self.mask = self.last = None
                return
            index = torch.tensor(keep, dtype=torch.long)
            self.mask = kv.keep_rows(self.cache, self.mask, index)
            self.last = self.last.index_select(0, index)

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache, names: list[str] | None
    ):
        """Logits of each row's last position (B, vocab) and the cache. names: each row's adapter, or None when
        the routing is already in place (`_route`)."""
        routed = names is not None and hasattr(self.model, "peft_config")
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{CACHE_KEY: cache},
            **({"adapter_names": names} if routed else {}),
        )
        return out.logits[:, -1].float(), getattr(out, CACHE_KEY)

    def _route(self) -> None:
        """Route the running rows to their adapters for this and the following decode steps (kept until the
        rows change: `drop_routing`)."""
        if not hasattr(self.model, "peft_config"):
            return
        names = tuple(self._names(self.rows))
        if self._routing is not None and self._routed == names:
            return
        self.drop_routing()
        stack = ExitStack()
        stack.enter_context(
            mixed_call(self.model, list(names), (), {"input_ids": self.last}, keep_layout=True)
        )
        self._routing, self._routed = stack, names

    def _decode(self) -> None:
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        positions = self.mask.sum(dim=1, keepdim=True)
        self._route()
        logits, self.cache = self._forward(self.last, mask, positions, self.cache, None)
        self.mask = mask
        self.last = self._sample(logits, self.rows)

    def _prefill(self, joining: list[Request]) -> None:
        width = max(len(r.prompt_ids) for r in joining)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in joining])
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in joining])
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, positions, DynamicCache(), self._names(joining))
        first = self._sample(logits, joining)
        if self.cache is None:
            self.cache, self.mask, self.last = cache, mask, first
        else:
            length = max(self.mask.shape[1], mask.shape[1])
            self.mask = kv.pad_left(self.cache, self.mask, length)
            mask = kv.pad_left(cache, mask, length)
            kv.concat(self.cache, cache)
            self.mask = torch.cat([self.mask, mask], dim=0)
            self.last = torch.cat([self.last, first], dim=0)
        self.rows = self.rows + joining

    @staticmethod
    def _names(rows: list[Request]) -> list[str]:
        return [r.adapter for r in rows]

    # ----- tokens out ----------------------------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, rows: list[Request]) -> torch.Tensor:
        """logits (B, vocab) -> next tokens (B, 1); each row's token is delivered and its stop rules applied."""
        tokens = []
        for row, row_logits in zip(rows, logits):
            token = _pick(row_logits, row)
            tokens.append(token)
            self._deliver(row, token)
        return torch.tensor(tokens, dtype=torch.long).unsqueeze(1)

    def _deliver(self, row: Request, token: int) -> None:
        if row.finish_reason is not None or row.cancelled:
            return
        if token in self.eos and not row.ignore_eos:
            return self._finish(row, "stop")
        row.generated.append(token)
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        cut = _first_stop(text, row.stop)
        if cut >= 0:
            self._send(row, text[:cut])
            return self._finish(row, "stop")
        if not text.endswith("\ufffd"):  # hold back a partial UTF-8 character and a possible stop's start
            self._send(row, text[: len(text) - _unsendable(text, row.stop)])
        if len(row.generated) >= row.max_tokens or len(row.prompt_ids) + len(row.generated) >= self.context:
            self._send(row, text)
            self._finish(row, "length")

    def _send(self, row: Request, text: str) -> None:
        if len(text) > row.sent_chars:
            row.emit("text", text[row.sent_chars :])
            row.sent_chars = len(text)

    def _finish(self, row: Request, reason: str) -> None:
        row.finish_reason = reason
        row.emit("done", reason)


def _first_stop(text: str, stops: list[str]) -> int:
    """Where the earliest stop string starts in `text`, or -1."""
    return min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)


def _unsendable(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could begin a stop string (held back until it is decided)."""
    return max(
        (k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
        default=0,
    )


def _pick(logits: torch.Tensor, row: Request) -> int:
    """Greedy at temperature 0, else nucleus sampling from softmax(logits / temperature) (vocab,)."""
    if row.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / row.temperature, dim=-1)
    if row.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > row.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=row.generator))


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
    return ids


def _context_length(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", 0) or 2048)


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """True once nothing is running or pending (tests and shutdown)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not engine.rows and not engine.pending:
            return True
        time.sleep(0.01)
    return False
