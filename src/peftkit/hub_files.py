"""Where an adapter's file is: in a local folder, or downloaded from the Hub for a repo id.

Below `config.py` and `io.py` (both find files through it); imports nothing from peftkit but `atomic_files`.
"""

from __future__ import annotations

import os
from typing import Any

from .atomic_files import finish_pending_writes


def resolve_adapter_file(
    model_id: str | os.PathLike, filename: str, subfolder: str | None = None, **hub_kwargs: Any
) -> str:
    """Path of `filename` in a local adapter folder, or downloaded from the Hub for a repo id."""
    model_id = os.fspath(model_id)
    local_dir = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(local_dir):
        finish_pending_writes(local_dir)  # a save interrupted after its commit point: see the new pair
        return os.path.join(local_dir, filename)
    if os.path.exists(model_id) or model_id.startswith((".", "/")) or model_id.count("/") > 1:
        raise FileNotFoundError(f"Adapter folder {local_dir} does not exist")
    try:
        from huggingface_hub import hf_hub_download

        keep = {
            k: v for k, v in hub_kwargs.items() if k in ("revision", "cache_dir", "token", "force_download")
        }
        return hf_hub_download(model_id, filename, subfolder=subfolder, **keep)
    except Exception as err:  # offline, missing repo, missing file: one clear message
        raise FileNotFoundError(
            f"{model_id!r} is not a local folder and could not be fetched from the Hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None
