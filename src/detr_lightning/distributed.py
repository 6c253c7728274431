"""Processes of one multi-process run: the process group before the Trainer exists, and its end.

Under ``torchrun`` or ``srun`` every process runs ``train.py`` from the top, so whatever ``train`` does
before the Trainer exists runs once per rank. Work that must run once (the data check, whose verdict all
ranks need) goes through :func:`on_rank_zero_first` on a process group opened early by
:func:`init_launched_process_group`; Lightning's ``DDPStrategy`` then reuses that group as it is.

Lightning closes the process group at interpreter exit for NCCL only. A gloo group (DDP on CPUs) is left
to the C++ destructors, and ranks that exit at different moments can then abort (SIGABRT) in gloo's
teardown after all their work is done. :func:`close_process_group` closes it after a barrier instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import (
    ClusterEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class StoppedByRankZero(Exception):
    """Raised, as one short line, on every rank but 0 when rank 0's part of :func:`on_rank_zero_first`
    failed: rank 0 reports the error itself, so a bad dataset gives one message instead of one per rank."""


def external_cluster_environment() -> ClusterEnvironment | None:
    """The environment of a process that ``torchrun`` or ``srun`` started as one of several, else None.

    Checked in Lightning's own order (TorchElastic before SLURM, since torchrun can run inside a SLURM
    job), so the ranks found here are the ones the Trainer will use. None for a single process, and for
    Lightning's own DDP launcher, which starts its other processes only inside ``Trainer.fit``.
    """
    for environment_type in (TorchElasticEnvironment, SLURMEnvironment):
        if environment_type.detect():
            environment = environment_type()
            return environment if environment.world_size() > 1 else None
    return None


def started_by_lightning_launcher() -> bool:
    """Whether Lightning's DDP launcher started this process (``LOCAL_RANK`` > 0, neither torchrun nor
    SLURM).

    That launcher re-runs the script for local ranks 1, 2, ... from inside ``Trainer.fit`` of local rank
    0, which had passed everything ``train`` checks before the Trainer exists: such a process need not
    check again.
    """
    external = TorchElasticEnvironment.detect() or SLURMEnvironment.detect()
    return not external and int(os.environ.get("LOCAL_RANK", "0")) > 0


def launched_rank() -> int:
    """The global rank ``torchrun`` or ``srun`` gave this process (one of several), else 0.

    0 also for the processes Lightning's own DDP launcher starts: it names their Hydra job
    ``train_ddp_process_<N>`` (so their log file) and turns their ``.hydra/`` off itself."""
    environment = external_cluster_environment()
    return environment.global_rank() if environment is not None else 0


def process_group_backend(accelerator: Any, strategy: Any = None) -> str:
    """The backend Lightning's ``DDPStrategy`` picks for a Trainer of ``accelerator`` and ``strategy``:
    the strategy's ``process_group_backend`` if it sets one, else nccl on CUDA and gloo otherwise."""
    chosen = strategy.get("process_group_backend") if hasattr(strategy, "get") else None
    if chosen:
        return str(chosen)
    may_use_cuda = accelerator is None or str(accelerator) in ("gpu", "cuda", "auto")
    return "nccl" if may_use_cuda and torch.cuda.is_available() else "gloo"


def init_launched_process_group(backend: str) -> torch.device | None:
    """Open the default process group now if ``torchrun``/``srun`` started this process as one of several.

    With the ranks, world size, address and port of the cluster environment Lightning will detect, so
    that ``DDPStrategy`` finds the group initialised and keeps it. Returns the device the group's
    object collectives use (``cuda:LOCAL_RANK`` for nccl, as Lightning places the ranks; None for gloo),
    or None when no group was opened (a single process, or one already open).
    """
    environment = external_cluster_environment()
    if environment is None or dist.is_initialized():
        return None
    # Read through the environment, as Lightning does: it also exports MASTER_ADDR/MASTER_PORT when
    # only SLURM's variables say them, which the env:// rendezvous reads (and torchrun's agent store).
    address, port = environment.main_address, environment.main_port
    device = torch.device("cuda", environment.local_rank()) if backend == "nccl" else None
    rank, world_size = environment.global_rank(), environment.world_size()
    log.info("process group: rank %d of %d, %s via %s:%d", rank, world_size, backend, address, port)
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=dist.default_pg_timeout,  # DDPStrategy's default: Lightning keeps using this group
        device_id=device,
    )
    return device


def on_rank_zero_first(task: Callable[[], T], device: torch.device | None = None) -> T | None:
    """Run ``task`` on global rank 0 while the other ranks wait for its verdict; a collective.

    Without a process group of several ranks this is ``task()``. With one, rank 0 runs ``task`` and
    broadcasts whether it passed: it returns ``task``'s result on rank 0 and None on the others. If
    ``task`` raised, every rank closes the process group (so all exit together and cleanly), then rank 0
    re-raises the error, whose message is the one the user sees, and the others raise
    :class:`StoppedByRankZero`.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return task()
    rank = dist.get_rank()
    result: T | None = None
    failure: Exception | None = None
    if rank == 0:
        try:
            result = task()
        except Exception as error:  # every failure: the other ranks must not wait for a verdict forever
            failure = error
    verdict: list[str | None] = [type(failure).__name__ if failure is not None else None]
    dist.broadcast_object_list(verdict, src=0, device=device)
    if verdict[0] is None:
        return result
    close_process_group()
    if failure is not None:
        raise failure
    raise StoppedByRankZero(f"rank {rank}: stopped, rank 0 reported a {verdict[0]}")


def close_process_group() -> bool:
    """Barrier, then destroy the default process group, on every rank; True if there was one.

    Call it on every rank once a run's last collective is done (after ``fit``/``test``/``validate``),
    never on one rank alone: the barrier waits for all of them.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
    log.debug("closed the torch.distributed process group")
    return True
