"""tbptt.lightning under strategy="ddp" on 2 CPU processes (gloo), for tests/test_lightning.py.

    python tests/lightning_worker.py OUT

Lightning starts the second process itself (it runs this script again with LOCAL_RANK=1). Each
rank reads its half of the 4 streams (StreamDataset takes rank and world from torch.distributed)
and the driver sums each update's gradient over the two. Rank 0 writes OUT (torch.save): the
final parameters, the driver's t and updates, the global step, and how often DDP's own reducer
communicated (a comm hook that counts: it must never be called, the driver's sum is the only one).
"""

from __future__ import annotations

import sys
import warnings

import torch

warnings.filterwarnings("ignore")
REDUCER_CALLS: list[int] = []


def count(state: object, bucket):  # DDP rejects a return annotation that is a string
    """Count DDP's bucket reductions; give the bucket back unreduced."""
    REDUCER_CALLS.append(1)
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


if __name__ == "__main__":
    import lightning as L
    from test_lightning import DDP_TRUNC, Net, loader

    class HookDDP(L.Callback):
        def on_fit_start(self, trainer, module):
            trainer.strategy.model.register_comm_hook(None, count)  # the DDP wrapper

    module = Net(DDP_TRUNC, "sgd", clip=0.5)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[HookDDP()],
    )  # fmt: skip
    trainer.fit(module, loader())
    if trainer.global_rank == 0:
        out = {
            "params": [p.detach().clone() for p in module.net.parameters()],
            "t": module.driver.t,
            "updates": module.driver.updates,
            "global_step": trainer.global_step,
            "streams": module.driver.batch,
            "reducer_calls": len(REDUCER_CALLS),
        }
        torch.save(out, sys.argv[1])
