"""llama.cpp itself, for tests: the prebuilt CPU library of `llama-cpp-cffi` (installed with --no-deps).

That wheel's library was built with a newer libstdc++ than Debian 12 ships and leaves one symbol,
`__cxa_call_terminate` (GCC 14's helper for an exception leaving a noexcept function), undefined; a two-line
C++ shim that defines it (compiled here once, loaded first with RTLD_GLOBAL) lets the library load. Nothing
else is changed: the model, the adapter and the decoding are llama.cpp's own.

Contexts use an F32 KV cache (llama.cpp's default is F16) so an F32 GGUF can be compared with PyTorch closely.
On a quantized model (the default's Q4_1) llama.cpp also quantizes activations (Q8_1) before each matmul, so
ANY change of the activations, however small, moves the logits by up to ~0.7 (rounding flips): an adapter's
effect is measurable there only when it is well above that noise.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SHIM = r"""
#include <exception>
#include <cxxabi.h>
extern "C" void __cxa_call_terminate(void* ue) noexcept {
  if (ue) __cxxabiv1::__cxa_begin_catch(ue);
  std::terminate();
}
"""


def load_library():
    """(lib, ffi) of llama.cpp, or raise ImportError saying why it cannot be had here."""
    import importlib.util

    if importlib.util.find_spec("llama") is None:
        raise ImportError("llama-cpp-cffi is not installed (pip install --no-deps llama-cpp-cffi)")
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise ImportError("no C++ compiler to build the libstdc++ shim for llama-cpp-cffi")
    folder = Path(tempfile.gettempdir()) / "peftkit-llama-shim"
    folder.mkdir(exist_ok=True)
    shim = folder / "libcxa_shim.so"
    if not shim.exists():
        (folder / "shim.cc").write_text(SHIM)
        subprocess.run(
            [compiler, "-shared", "-fPIC", "-O2", "-o", str(shim), str(folder / "shim.cc")], check=True
        )
    ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
    os.environ.setdefault("LLAMA_CPP_BACKEND", "cpu")
    from llama.llama_cpp import ffi, lib

    lib.llama_backend_init()
    return lib, ffi


class LlamaCpp:
    """One GGUF model in llama.cpp, with an optional LoRA adapter; logits of the last prompt position."""

    def __init__(self, model_path: str | Path, threads: int = 1, n_ctx: int = 512) -> None:
        self.lib, self.ffi = load_library()
        params = self.lib.llama_model_default_params()
        self.model = self.lib.llama_model_load_from_file(str(model_path).encode(), params)
        if self.model == self.ffi.NULL:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        self.threads, self.n_ctx = threads, n_ctx
        self.ctx = self._context()
        self.vocab = self.lib.llama_model_get_vocab(self.model)
        self.n_vocab = self.lib.llama_vocab_n_tokens(self.vocab)
        self.adapter = None

    def _context(self):
        cparams = self.lib.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch = self.n_ctx, self.n_ctx
        cparams.n_threads = cparams.n_threads_batch = self.threads
        cparams.type_k = cparams.type_v = 0  # GGML_TYPE_F32
        return self.lib.llama_init_from_model(self.model, cparams)

    def set_adapter(self, path: str | Path | None, scale: float = 1.0) -> None:
        """Use the adapter file `path` (None: none). The adapter is loaded before a fresh context is made: this
        llama.cpp build sizes its compute buffers when the context is created, and an adapter attached to a
        context made earlier computes from buffers that were never sized for it."""
        self.lib.llama_free(self.ctx)
        if self.adapter is not None:
            self.lib.llama_adapter_lora_free(self.adapter)
            self.adapter = None
        if path is not None:
            self.adapter = self.lib.llama_adapter_lora_init(self.model, str(path).encode())
            if self.adapter == self.ffi.NULL:
                raise RuntimeError(f"llama.cpp rejected the adapter {path}")
        self.ctx = self._context()
        if self.adapter is not None and self.lib.llama_set_adapter_lora(self.ctx, self.adapter, scale) != 0:
            raise RuntimeError(f"llama.cpp could not apply the adapter {path}")

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenization of `text` with the GGUF's tokenizer (special tokens parsed, BOS as the
        GGUF's add_bos_token says)."""
        raw = text.encode()
        out = self.ffi.new("llama_token[]", len(raw) + 8)
        n = self.lib.llama_tokenize(self.vocab, raw, len(raw), out, len(raw) + 8, True, True)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} tokens")
        return [out[i] for i in range(n)]

    def close(self) -> None:
        """Free the context, the adapter and the model."""
        self.lib.llama_free(self.ctx)
        if self.adapter is not None:
            self.lib.llama_adapter_lora_free(self.adapter)
        self.lib.llama_model_free(self.model)
        self.ctx = self.adapter = self.model = None

    def _reset(self) -> None:
        clear = getattr(self.lib, "llama_kv_self_clear", None) or self.lib.llama_kv_cache_clear
        clear(self.ctx)

    def logits(self, tokens: list[int]):
        """numpy (vocab,) logits after feeding `tokens` from an empty cache."""
        import numpy as np

        self._reset()
        arr = self.ffi.new("llama_token[]", tokens)
        batch = self.lib.llama_batch_get_one(arr, len(tokens))
        if self.lib.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        ptr = self.lib.llama_get_logits_ith(self.ctx, -1)
        return np.frombuffer(self.ffi.buffer(ptr, self.n_vocab * 4), dtype=np.float32).copy()

    def greedy(self, tokens: list[int], max_new: int, stop: set[int]) -> list[int]:
        """Greedy decoding: the new token ids (stopping before any id in `stop`)."""
        import numpy as np

        out: list[int] = []
        self._reset()
        feed = list(tokens)
        for _ in range(max_new):
            arr = self.ffi.new("llama_token[]", feed)
            if self.lib.llama_decode(self.ctx, self.lib.llama_batch_get_one(arr, len(feed))) != 0:
                raise RuntimeError("llama_decode failed")
            ptr = self.lib.llama_get_logits_ith(self.ctx, -1)
            logits = self.ffi.buffer(ptr, self.n_vocab * 4)
            token = int(np.frombuffer(logits, dtype=np.float32).argmax())
            if token in stop:
                break
            out.append(token)
            feed = [token]
        return out
