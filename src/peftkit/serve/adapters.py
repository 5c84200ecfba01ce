"""Loading and dropping adapters on the served model, between decoding steps (under the engine's lock)."""

from __future__ import annotations

import os
from pathlib import Path

from ..mixed_batch import BASE_NAME
from ..peft_model import PeftModel
from .engine import Engine


class AdapterError(ValueError):
    """A load/unload request that cannot be done; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def adapter_names(engine: Engine) -> list[str]:
    return list(engine.model.peft_config) if isinstance(engine.model, PeftModel) else []


def load(engine: Engine, name: str, path: str | os.PathLike, base_id: str) -> None:
    """Load the adapter folder `path` as `name` (it serves from the next step on)."""
    if not name or name in (BASE_NAME, base_id):
        raise AdapterError(f"adapter name {name!r} is reserved; pick another")
    folder = Path(path).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise AdapterError(f"{folder}: not an adapter folder (no adapter_config.json)")
    with engine.lock:
        if name in adapter_names(engine):
            raise AdapterError(f"adapter {name!r} is already loaded; unload it first")
        engine.drop_routing()  # the layers change: the next step routes again
        try:
            if isinstance(engine.model, PeftModel):
                engine.model.load_adapter(str(folder), adapter_name=name)
            else:
                engine.model = PeftModel.from_pretrained(engine.model, str(folder), adapter_name=name).eval()
        except (ValueError, OSError, RuntimeError, KeyError) as e:
            raise AdapterError(f"cannot load adapter {name!r} from {folder}: {e}") from None


def unload(engine: Engine, name: str) -> None:
    """Drop adapter `name`; refused while a request is using it."""
    with engine.lock:
        if name not in adapter_names(engine):
            raise AdapterError(f"adapter {name!r} is not loaded; loaded: {adapter_names(engine)}", status=404)
        if name in engine.running_adapters():
            raise AdapterError(
                f"adapter {name!r} is serving requests; unload it when they finish", status=409
            )
        engine.drop_routing()
        if len(engine.model.peft_config) == 1:
            engine.model = engine.model.unload().eval()
        else:
            engine.model.delete_adapter(name)


def discover(patterns: list[str]) -> dict[str, str]:
    """{name: folder} for `NAME=PATH` specs and for every `runs/<name>/adapter`-style folder under a directory."""
    found: dict[str, str] = {}
    for spec in patterns:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = (
                Path(spec).resolve().parent.name if Path(spec).name == "adapter" else Path(spec).name,
                spec,
            )
        if name in found:
            raise AdapterError(f"--adapter: name {name!r} given twice")
        found[name] = path
    return found


def scan(directory: str | os.PathLike) -> dict[str, str]:
    """Every adapter folder directly in `directory` or at `directory/*/adapter`, named after its run folder."""
    root = Path(directory)
    found = {}
    for config in sorted(root.glob("*/adapter_config.json")) + sorted(
        root.glob("*/adapter/adapter_config.json")
    ):
        folder = config.parent
        name = folder.parent.name if folder.name == "adapter" else folder.name
        found.setdefault(name, str(folder))
    return found
