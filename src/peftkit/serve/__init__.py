"""`peftkit serve`: an OpenAI-compatible HTTP server for one base model and many adapters.

The package is an application above the library: `engine.py` schedules requests into mixed-adapter batches
(continuous batching over one KV cache), `app.py` is the HTTP API, `adapters.py` loads and drops adapters.
"""
