"""``python tests/robustness/faulty_train.py ARGS``: ``train.py ARGS`` with one fault injected (tests only).

``DETR_FAULT`` says where; the process touches ``DETR_FAULT_MARKER`` when it gets there and waits
(until SIGTERM is received, or for the test to SIGKILL it):

- ``stall_step:E:B``: in the training step of epoch ``E``, batch ``B`` (before the forward pass);
- ``stall_save:N``: half-way through the ``N``-th write of ``last.ckpt`` (half the bytes written).
"""

from __future__ import annotations

import io
import os
import runpy
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
FAULT = os.environ.get("DETR_FAULT", "")
MARKER = Path(os.environ.get("DETR_FAULT_MARKER", "fault-reached"))


def stall(trainer=None) -> None:
    MARKER.touch()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (trainer is not None and trainer.received_sigterm):
        time.sleep(0.02)


if FAULT.startswith("stall_step:"):
    from detr_lightning.lit_module import DETRLitModule

    epoch, batch_index = (int(x) for x in FAULT.split(":")[1:])
    training_step = DETRLitModule.training_step

    def stalling_training_step(self, batch, batch_idx):
        if (self.current_epoch, batch_idx) == (epoch, batch_index):
            stall(self.trainer)
        return training_step(self, batch, batch_idx)

    DETRLitModule.training_step = stalling_training_step

elif FAULT.startswith("stall_save:"):
    from detr_lightning.fault_tolerance import AtomicCheckpointIO

    stall_at = int(FAULT.split(":")[1])
    writes = 0
    write = AtomicCheckpointIO.write

    def stalling_write(checkpoint, file) -> None:
        global writes
        if ".last.ckpt." in Path(file.name).name:
            writes += 1
            if writes == stall_at:
                buffer = io.BytesIO()
                torch.save(checkpoint, buffer)
                file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                file.flush()
                stall()
        write(checkpoint, file)

    AtomicCheckpointIO.write = staticmethod(stalling_write)

sys.argv = [str(REPO_ROOT / "train.py"), *sys.argv[1:]]
runpy.run_path(str(REPO_ROOT / "train.py"), run_name="__main__")
