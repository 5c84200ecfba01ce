"""FSDP2 without a full copy of the base model per process: only rank 0 reads the checkpoint.

With ``--fsdp`` under ``torchrun`` / ``accelerate launch``:

1. Rank 0 loads the base model as a single process does (``from_pretrained``, fp32 on the CPU). Every other
   rank builds the same model from ``config.json`` with its parameters on the ``meta`` device
   (:func:`empty_model`: no memory, no random init, the checkpoint never opened). Buffers are built for real
   on every rank by the model's own init code (rotary ``inv_freq`` and other tables not in the checkpoint).
2. Every rank adds the adapter the same way (on ranks > 0 its parameters follow the base onto ``meta``).
3. :func:`shard_and_fill`: ranks > 0 shard their empty model with FSDP2 ``fully_shard``; then
   ``torch.distributed.checkpoint.state_dict.set_model_state_dict(..., full_state_dict=True,
   broadcast_from_rank0=True)`` sends rank 0's tensors one at a time, and every rank > 0 keeps only its own
   shard of each (plus the replicated adapter, whose values are rank 0's: identical init on every rank, for
   every method, including those whose init reads the base weights). Rank 0 shards its model afterwards.

Peak memory of a rank > 0: its ``1/N`` of the base, the adapter and one full tensor in flight (the largest
single weight, e.g. the embedding). Rank 0 still holds the full model while loading (and its shards as they
are taken), as every rank did before: ``N`` full copies become one. SmolLM2-135M, 2 processes: rank 1's
memory grows by 0.31 GB while loading instead of 0.83 GB (benchmarks/README.md, "FSDP2 memory").
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from peftkit.heap import release_freed_memory, serve_large_allocations_by_mmap
from peftkit.train.errors import PeftkitError


def empty_model(name: str):
    """The causal LM of the model folder ``name`` with every parameter on ``meta``; the weights file is not read.

    Buffers (rotary tables) are computed by the model's own ``__init__``, as ``from_pretrained`` does; the
    model's generation config and ``name_or_path`` are read as ``from_pretrained`` sets them.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from peftkit.stream_load import _empty_parameters

    config = AutoConfig.from_pretrained(name)
    with _empty_parameters():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # not done under no_init_weights; FSDP2 must see one shared parameter, as on rank 0
    if (Path(name) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(name)
    model.name_or_path = name
    model.config._name_or_path = name
    return model.eval()


def shard_and_fill(model, rank: int, shard) -> None:
    """Shard ``model`` (a PeftModel) with ``shard(model)`` on every rank and fill each rank's shards, and every
    replicated tensor, with rank 0's values (a collective: every rank calls it).

    ``model`` is fully loaded on rank 0 and on ``meta`` elsewhere. A parameter shared by several modules (tied
    embeddings) is sent once. Parameter objects on ranks > 0 are new: collect trainable ones after this call.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    aliases = _aliases(model)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    with _freed_memory_returned():
        _fill(model, rank, shard, aliases, options, set_model_state_dict)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise PeftkitError(
            f"--fsdp: rank {rank} got no values from rank 0 for {left[:5]}{'...' if len(left) > 5 else ''} "
            "(the processes built different models: same --model path and version on every machine?)"
        )


def _fill(model, rank: int, shard, aliases: list[list[str]], options, set_model_state_dict) -> None:
    if rank == 0:
        full = model.state_dict()  # references to the loaded tensors, no copy
        for names in aliases:
            for name in names[1:]:
                full.pop(name, None)
        set_model_state_dict(model, full, options=options)  # rank 0 sends; its copy into itself is a no-op
        del full
        shard(model)
    else:
        shard(model)
        _materialize(model, aliases)  # this rank's shards, allocated once, up front: filled in place
        set_model_state_dict(model, {}, options=options)
    _broadcast_unsaved_buffers(model)


@contextmanager
def _freed_memory_returned():
    """While loading, glibc hands every freed block of 128 KiB or more back to the OS (a fixed
    ``M_MMAP_THRESHOLD``); afterwards, for the rest of the run, every block of 1 MiB or more.

    By default glibc raises that threshold up to 32 MiB, to the size of each large block freed, and the heap
    then keeps what is freed. Under FSDP2 on the CPU that is most of the memory: the full tensors received
    while loading (several MB each), and in each forward the all-gathered layers. Measured on SmolLM2-135M,
    2 processes (benchmarks/README.md): rank 1's loading peak was its shards plus 180 MB of freed buffers,
    and each forward kept ~150 MB more (malloc_trim gave it back); the run peaked at 2.0 GB per process, more
    than one process training alone (1.46 GB), and at 1.37 GB with this. Not glibc: nothing changes.
    """
    serve_large_allocations_by_mmap(128 * 1024)  # ignored where the user set MALLOC_MMAP_THRESHOLD_
    try:
        yield
    finally:
        serve_large_allocations_by_mmap()
        release_freed_memory()


def _aliases(model) -> list[list[str]]:
    """Names of each parameter registered under several names (tied embeddings), first name first."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _materialize(model, aliases: list[list[str]]) -> None:
    """Allocate (uninitialised) the local shards of every ``meta`` parameter, once per shared parameter, keeping
    the buffers the model's init computed (``to_empty`` would empty them too)."""
    kept = {name: buf.clone() for name, buf in model.named_buffers() if not buf.is_meta}
    model.to_empty(device="cpu")
    for name, value in kept.items():
        model.get_buffer(name).copy_(value)
    for first, *others in aliases:  # to_empty gave each name its own tensor: share the first one again
        shared = model.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, shared)


def _broadcast_unsaved_buffers(model) -> None:
    """Buffers kept out of the state dict (non-persistent: rotary tables, an adapter's fixed tables) take rank
    0's values: on ranks > 0 the base's were computed by its own init, but an adapter's were built on ``meta``.
    They are small (no weight), so each is sent whole."""
    for module in model.modules():
        for key in sorted(module._non_persistent_buffers_set):
            buf = module._buffers.get(key)
            if buf is None:
                continue
            if buf.is_meta:
                buf = module._buffers[key] = torch.empty_like(buf, device="cpu")
            torch.distributed.broadcast(buf, src=0)
