"""The end of a multi-process run: every rank closes the ``torch.distributed`` process group together.

Lightning closes the process group at interpreter exit for NCCL only. A gloo group (DDP on CPUs) is left
to the C++ destructors, and ranks that exit at different moments can then abort (SIGABRT) in gloo's
teardown after all their work is done. Closing it after a barrier avoids that.
"""

from __future__ import annotations

import logging

import torch.distributed as dist

log = logging.getLogger(__name__)


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
