"""Training on several processes under ``torchrun`` (docs/distributed.md).

``torchrun`` starts one process per GPU (or several on a CPU) and tells each its place in the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). ``Dist`` is
that place, read once per job; a job started with plain ``python -m`` is ``Dist()``: one rank, no
process group, nothing changes.

What the engine does with it, in one place each:

- the process group: ``nccl`` on CUDA, ``gloo`` on CPU; each rank's device is ``cuda:<LOCAL_RANK>``;
- the modules that train are wrapped in DistributedDataParallel (``Stage.distribute``);
- every rank reads its own share of each global batch (the data sources take ``rank`` and ``world``);
- only rank 0 talks to MLflow; the others get what they need from it (``broadcast``);
- training metrics are averaged over the ranks, stop requests reach every rank (``any``);
- a checkpoint holds every rank's random state (``all_gather``);
- an elastic restart finds the run it continues in torchrun's rendezvous store (``remember_run``).
"""

from __future__ import annotations

import datetime
import functools
import gc
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from pipeline.engine.private_apis import ddp_ignore

log = logging.getLogger(__name__)

# The rendezvous store key under which rank 0 leaves the run ID for a restarted group (per torchrun job).
RUN_KEY = "speech-pipeline/{job}/run_id"


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (also with one process: then DDP and the group run on one rank)

    @classmethod
    def from_env(cls) -> Dist:
        """The place torchrun gave this process; ``Dist()`` when it was not started by torchrun."""
        if not all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
            return cls()
        try:
            world = int(os.environ["WORLD_SIZE"])
            rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError as err:
            raise ValueError(
                f"RANK / WORLD_SIZE / LOCAL_RANK are not numbers ({err}); start the job with torchrun or unset them"
            ) from None
        return cls(rank, world, local, launched=True)

    @property
    def enabled(self) -> bool:
        return self.launched

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- set-up -----------------------------------------------------------------------------------
    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: ``cuda:<LOCAL_RANK>`` when the job trains on CUDA."""
        if self.enabled and device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def init(self, timeout_minutes: float = 30.0) -> None:
        """Join the process group (once), before the config is known: CUDA tensors (DDP's gradients) go
        through nccl, CPU tensors and the small objects rank 0 hands out through gloo; gloo alone on a
        machine without CUDA. A collective that waits longer than ``timeout_minutes`` fails the job."""
        if not self.enabled or tdist.is_initialized():
            return
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(minutes=timeout_minutes)
        store = _rendezvous_store()
        if store is None:  # rank 0 hosts the store (MASTER_ADDR/MASTER_PORT): the env:// default
            tdist.init_process_group(backend, timeout=timeout)
        else:
            # torchrun's agent keeps one store for the whole job: without a prefix per restart, a restarted
            # group would read the addresses the failed group's ranks left there and fail to connect.
            attempt = tdist.PrefixStore(f"speech-pipeline/{_job()}/group-{restart_count()}", store)
            tdist.init_process_group(
                backend, store=attempt, rank=self.rank, world_size=self.world_size, timeout=timeout
            )
        log.info("Rank %d of %d joined the process group (%s)", self.rank, self.world_size, backend)

    def shutdown(self) -> None:
        """Leave the process group, once the DDP wrappers of the job's stages are freed."""
        if self.enabled and tdist.is_initialized():
            gc.collect()  # a stage's DDP wrappers hold the group; free them while it still exists
            tdist.destroy_process_group()

    def wrap(self, module: nn.Module, ignore: list[str] | None = None) -> nn.Module:
        """``module`` in DistributedDataParallel (its trainable parameters' gradients averaged over the
        ranks); ``ignore`` names parameters and buffers DDP neither broadcasts nor reduces (a frozen
        encoder)."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        if ignore:
            ddp_ignore(module, ignore)
        device = next(module.parameters()).device
        return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)

    # --- collectives (no-ops on one rank) ----------------------------------------------------------
    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled between the job's own processes)."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over the ranks of each value (every rank passes the same keys)."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        flat = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        tdist.all_reduce(flat)
        means = dict(zip(keys, (flat / self.world_size).tolist()))
        return {key: means[key] for key in values}  # in the caller's order

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())


SINGLE = Dist()


# --- elastic restarts -------------------------------------------------------------------------------
def restart_count() -> int:
    """How many times torchrun's agent restarted this group (0: the job's first group, or no torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def max_restarts() -> int:
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)


def under_elastic_agent() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


@functools.lru_cache(maxsize=1)
def _rendezvous_store():
    """This process's one client of the store torchrun's agent keeps for the whole job (it outlives every
    restarted group), or None where the workers do not share the agent's store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    return tdist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=datetime.timedelta(seconds=60),
    )


def _job() -> str:
    return os.environ.get("TORCHELASTIC_RUN_ID", "none")


def _run_key() -> str:
    return RUN_KEY.format(job=_job())


def remember_run(run_id: str) -> None:
    """Rank 0, once the job's run is open: leave its ID where a restarted group of this torchrun job finds it."""
    if not under_elastic_agent():
        return
    store = _rendezvous_store()
    if store is None:
        log.warning(
            "torchrun's workers do not share its agent's store (TORCHELASTIC_USE_AGENT_STORE is not set): an "
            "elastic restart will start a new run instead of resuming %s",
            run_id,
        )
        return
    store.set(_run_key(), run_id)


def handed_over_run() -> str | None:
    """In a restarted group: the run the group before it trained (None in a job's first group)."""
    if restart_count() == 0 or not under_elastic_agent():
        return None
    store = _rendezvous_store()
    if store is None or not store.check([_run_key()]):
        return None
    return store.get(_run_key()).decode()
