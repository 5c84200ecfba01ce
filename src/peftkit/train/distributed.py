"""Several processes training one adapter: ``torchrun`` / ``accelerate launch`` run ``peftkit train`` unchanged.

The launcher sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup`
joins the process group from them (gloo for CPU tensors, NCCL for CUDA ones). One process (no
``WORLD_SIZE``, or 1) runs exactly as before: every function here is then a no-op.

What N processes compute is what one process computes at ``--batch-size N·b``:

- **Data.** Every rank draws the same stream of *global* micro-batches of ``N·b`` row indices (the stream a
  single process at ``--batch-size N·b`` draws) and trains on its own contiguous slice of each
  (:meth:`Dist.shard`): the global batches hold the same rows. ``--batch-size`` is per process, as
  ``per_device_train_batch_size`` in ``transformers.Trainer``; global batch = batch-size × grad-accum × N.
- **Loss.** Each rank's loss is its rows' summed token loss divided by the target count of the *global*
  step, so the gradients summed over ranks are the single-process gradient. DDP averages gradients over
  ranks, so the loss is scaled by N before ``backward`` (:meth:`Dist.backward_scale`).
- **Model.** The adapter is replicated on every rank, so checkpoints and the final adapter are the same
  files one process writes and optimizer state needs no gathering. DDP (default) keeps the frozen base
  replicated too; only the trainable parameters are in its gradient buckets. ``--fsdp`` (or ``accelerate
  launch`` with an FSDP config) shards the frozen base with FSDP2 ``fully_shard``, per decoder layer then
  the whole model, leaving the adapter out of the shards (``ignored_params``) with its gradients all-reduced
  here (:meth:`Dist.sync_grads`): each rank holds ``1/N`` of the base weights between forwards.
- **Files.** Only rank 0 writes (run config, metrics, checkpoints, adapter, report), each atomically; the
  others wait at a barrier after every checkpoint. Held-out evaluation runs on every rank over the same
  rows (the same wall time as rank 0 alone; FSDP2 needs every rank in each forward to gather the shards).
"""

from __future__ import annotations

import atexit
import os
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from peftkit.train.errors import PeftkitError


@dataclass
class Dist:
    """This process's place in the run (``world == 1``: a plain single-process run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    fsdp: bool = False
    # FSDP2: only rank 0 read the checkpoint; the others hold a meta model (sharded_load.py)
    lean: bool = False
    ddp: object = field(default=None, repr=False)  # the DDP wrapper, when there is one

    @property
    def main(self) -> bool:
        """Whether this process writes files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def mode(self) -> str:
        return "single process" if not self.active else "FSDP2" if self.fsdp else "DDP"

    # ------------------------------------------------------------ data

    def shard(self, indices: list[int]) -> tuple[list[int], float]:
        """This rank's contiguous slice of a global micro-batch, and the weight of its loss.

        Slices differ in size by at most one row. A rank left without rows (a global batch smaller than
        N) runs the batch's first row with weight 0, since DDP and FSDP2 need every rank in each
        forward and backward.
        """
        if not self.active:
            return indices, 1.0
        n = len(indices)
        rows = indices[self.rank * n // self.world : (self.rank + 1) * n // self.world]
        return (rows, 1.0) if rows else (indices[:1], 0.0)

    def backward_scale(self, weight: float) -> float:
        """Factor on this rank's loss before ``backward``: DDP and :meth:`sync_grads` average over ranks."""
        return weight * self.world

    # ------------------------------------------------------------ the model

    def wrap(self, model):
        """The module the loop runs forward/backward through: ``model`` itself, its DDP wrapper, or
        ``model`` after sharding its frozen base in place with FSDP2. ``model`` stays the PeftModel the
        loop saves and inspects (its adapter parameters are the same tensors in every case)."""
        if not self.active:
            return model
        if self.fsdp:
            shard = lambda m: _shard_frozen_base(m, _trainable_set(m), self.world)  # noqa: E731
            if self.lean:  # rank 0 sends its loaded tensors; every other rank keeps its shards
                from peftkit.train.sharded_load import shard_and_fill

                shard_and_fill(model, self.rank, shard)
            else:
                shard(model)
            for p in [p for p in model.parameters() if p.requires_grad]:  # same seed everywhere; now certain
                torch.distributed.broadcast(p.data, src=0)
            return model
        trainable = [p for p in model.parameters() if p.requires_grad]
        from torch.nn.parallel import DistributedDataParallel

        for p in trainable:
            torch.distributed.broadcast(p.data, src=0)
        # init_sync=False: the frozen base was loaded from the same files on every rank, so only the
        # adapter needs the broadcast above (DDP's own would send the whole base model)
        self.ddp = DistributedDataParallel(model, init_sync=False, forward_sync_buffers=False)
        return self.ddp

    def loads_lean(self, quantize: str | None) -> bool:
        """Whether this run loads the base sharded (FSDP2 on several processes, not quantized): rank 0 reads the
        checkpoint, the others build the model on ``meta`` and receive their shards in :meth:`wrap`."""
        self.lean = self.active and self.fsdp and not quantize
        return self.lean

    def accumulating(self, last: bool):
        """Around a micro-batch's forward+backward: no gradient exchange until the step's last one."""
        if self.ddp is not None and not last:
            return self.ddp.no_sync()
        return nullcontext()

    def sync_grads(self, params: list[torch.nn.Parameter]) -> None:
        """FSDP2: average the replicated adapter's gradients over ranks (DDP does this in backward)."""
        if not (self.active and self.fsdp):
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def base_params_here(self, model) -> int:
        """Frozen parameters this process holds: all of them, or its FSDP2 shards (about 1/N). The root's
        parameters stay gathered after a forward without backward (the held-out generation): reshard first."""
        if self.active and self.fsdp:
            from torch.distributed.fsdp import FSDPModule

            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()
        return sum(
            (p.to_local() if hasattr(p, "to_local") else p).numel()
            for p in model.parameters()
            if not p.requires_grad
        )

    # ------------------------------------------------------------ logging and files

    def sum(self, *values: float) -> list[float]:
        """``values`` summed over ranks (one all-reduce)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def on_main(self, fn, *args) -> None:
        """Run ``fn`` (a check that may write, e.g. preparing the output folder) on rank 0 only; an error
        there stops every rank, printed once by rank 0 (the others exit quietly with its exit code)."""
        if not self.active:
            fn(*args)
            return
        error = None
        if self.main:
            try:
                fn(*args)
            except Exception as e:  # every rank must reach the broadcast, or the others would wait for it
                error = e
        box = [None if error is None else (str(error), getattr(error, "exit_code", 1))]
        torch.distributed.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if box[0] is not None:
            raise SystemExit(box[0][1])

    def check_same(self, what: str, value) -> None:
        """Every rank must see the same ``value`` (e.g. the checkpoint to resume from: on several machines
        ``--output`` must be a folder they all read); else a :class:`PeftkitError` naming the ranks."""
        if not self.active:
            return
        seen = [None] * self.world
        torch.distributed.all_gather_object(seen, value)
        if any(v != seen[0] for v in seen):
            differ = ", ".join(f"rank {r}: {v}" for r, v in enumerate(seen))
            raise PeftkitError(
                f"the processes disagree on {what} ({differ}); on several machines --output must be a "
                "shared folder, and the model and data at the same paths on each"
            )

    def run_config(self, o) -> dict:
        """What run_config.json records about the processes, checked again by ``--resume``."""
        return {"processes": self.world, "global_batch": o.batch_size * o.grad_accum * self.world}

    def check_resume(self, saved: dict) -> None:
        """``--resume`` with another process count would draw other global batches: refuse, naming both."""
        was = int(saved.get("processes", 1))
        if was != self.world:
            raise PeftkitError(
                f"--resume: the run was trained with {was} process(es) (global batch "
                f"{saved.get('global_batch', saved.get('batch_size'))} rows per step), now {self.world}; "
                f"resume with {was} process(es), or start a new run with --overwrite"
            )


def setup(fsdp: bool = False) -> Dist:
    """Join the process group the launcher describes in the environment (a no-op for one process).

    FSDP2 is asked for with ``--fsdp``, or by ``accelerate launch`` with an FSDP config
    (``ACCELERATE_USE_FSDP=true``, which accelerate sets).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as td

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not td.is_initialized():
        if torch.cuda.is_available():  # CUDA tensors over NCCL, CPU ones (the loop's) over gloo
            torch.cuda.set_device(local_rank)
            td.init_process_group("cpu:gloo,cuda:nccl")
        else:
            td.init_process_group("gloo")
        atexit.register(_close)
    fsdp = fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    return Dist(rank=rank, world=world, local_rank=local_rank, fsdp=fsdp)


def _close() -> None:
    import torch.distributed as td

    if td.is_initialized():
        td.destroy_process_group()


def _trainable_set(model) -> set:
    return {p for p in model.parameters() if p.requires_grad}


def _shard_frozen_base(model, adapter: set, world: int) -> None:
    """FSDP2: ``fully_shard`` each decoder layer (the model's ``_no_split_modules``), then the whole
    transformers model, leaving the adapter's parameters replicated (``ignored_params``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    inner = model.get_base_model()
    blocks = set(getattr(inner, "_no_split_modules", None) or [])
    if not blocks:
        raise PeftkitError(
            f"--fsdp: {type(inner).__name__} does not name its decoder layers (_no_split_modules), so "
            "peftkit cannot tell where to shard it; run without --fsdp (DDP)"
        )
    mesh = init_device_mesh("cpu", (world,))  # the training loop keeps the model on the CPU
    for module in inner.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, ignored_params=adapter)
    fully_shard(inner, mesh=mesh, ignored_params=adapter)
