"""TBPTT(k1, k2) in PyTorch Lightning 2.x: a LightningModule whose training runs tbptt.torch.TBPTT.

    import lightning as L
    import tbptt
    from tbptt.lightning import TBPTTModule

    class CharLSTM(TBPTTModule):
        def __init__(self):
            super().__init__(tbptt.Truncation(k1=32, k2=64), loss_fn=cross_entropy_loss, clip=1.0)
            self.lstm, self.head = nn.LSTM(65, 256), nn.Linear(256, 65)

        def forward(self, x, state):                  # x (L, batch, ...): a chunk of the streams
            out, state = self.lstm(x, state)
            return self.head(out), state              # output (L, batch, ...), the new state

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=2e-3)

    L.Trainer(max_steps=1000).fit(CharLSTM(), train_dataloaders=loader)  # (x, y[, mask[, reset]])

Each training batch is fed to one driver (tbptt.torch.TBPTT, the canonical rule of SEMANTICS.md
5) under manual optimization; the driver makes the updates where the schedule says, whatever the
batch's length:

    state="carry"      the batches are consecutive chunks of the same streams (a stream dataset,
                       tbptt.torch.streams): the state and the schedule go on from batch to batch
                       and epoch to epoch; resets come with the data.
    state="per_batch"  every batch is a fresh stream (Lightning 1.x's truncated_bptt_steps): the
                       state starts from state0, the schedule from step 0, and the stream is
                       finished at the batch's end (the flush update when truncation.flush).

What Lightning's features become:

    updates            one optimizer step each, through Lightning's optimizer (its step hook), so
                       trainer.global_step counts updates and max_steps is a number of updates
                       (checked between batches, as for any manual optimization).
    clipping           the driver's (clip=, on the module) of each update's whole gradient;
                       Trainer(gradient_clip_val) is refused (Lightning refuses it under manual
                       optimization; the error here says where to put it).
    LR schedulers      interval "step": stepped by the driver after every update; "epoch": at the
                       end of every `frequency` epochs (ReduceLROnPlateau with its monitor).
    precision          "bf16-mixed": the driver's amp=torch.bfloat16 (autocast around the module
                       and the loss only); "16-mixed" is refused (the driver's float16 GradScaler
                       would meet Lightning's: use amp=torch.float16 on the module instead).
    checkpoints        on_save_checkpoint adds the driver's state_dict (position, schedule phase,
                       carried state, kept steps, RNG) under "tbptt"; after a restore the driver
                       is rebuilt from it before the first batch, and a StreamLoader's position
                       is restored by Lightning, so a resumed fit continues the interrupted one.
    strategy="ddp"     each process trains its share of the streams (StreamDataset takes it from
                       torch.distributed) and the driver sums the update's gradient over the
                       processes (tbptt/torch/distributed.py); DDP's own reducer is never armed
                       (no manual_backward), so nothing is averaged or reduced twice.
    self.log           "train_loss": each batch's mean loss per unmasked step and stream (on the
                       progress bar); "val_loss" from the default validation_step.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Literal

import lightning as L
import torch

from .errors import InputError
from .schedule import Truncation
from .torch import TBPTT, l2_loss
from .torch import state as st
from .torch.call import outputs, takes_starts

Tensor = torch.Tensor
STATES = ("carry", "per_batch")


class TBPTTModule(L.LightningModule):
    """A LightningModule trained with TBPTT(k1, k2) (module docstring).

    Write forward(x, state) -> (output, new_state) and configure_optimizers (one optimizer, at
    most one LR scheduler); override loss(output, y) -> per-step, per-stream losses (L, batch)
    or pass loss_fn.

    Args:
        truncation: tbptt.Truncation(k1, k2, inject, flush).
        loss_fn: (output, y) -> (L, batch) losses (tbptt.torch.l2_loss, cross_entropy_loss).
        clip: max global gradient norm of each update (None: no clipping).
        state: "carry" (streams across batches) or "per_batch" (Lightning 1.x).
        batch_first: batches are (batch, L, ...) instead of time-major (L, batch, ...).
        state0: the state every stream starts and restarts from (None: the module's zeros).
        checkpoint: keep each segment's graph as a torch.utils.checkpoint (less memory).
        **driver_options: other keywords of tbptt.torch.TBPTT.
    """

    def __init__(
        self,
        truncation: Truncation,
        *,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = l2_loss,
        clip: float | None = None,
        state: str = "carry",
        batch_first: bool = False,
        state0: Any = None,
        checkpoint: bool = False,
        **driver_options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(truncation, Truncation):
            raise InputError(
                f"truncation must be a tbptt.Truncation, got {type(truncation).__name__}"
            )
        if state not in STATES:
            raise InputError(f"state must be one of {STATES}, got {state!r}")
        if state == "carry" and truncation.flush:
            raise InputError(
                "flush=True needs the end of a stream, and with state='carry' the streams go on "
                "across batches and epochs (each epoch restarts them with a reset): use "
                "flush=False, or state='per_batch' where every batch is a stream of its own"
            )
        refused = {"backward", "step", "amp", "process_group", "optimizer", "scheduler"}
        if refused & set(driver_options):
            raise InputError(
                f"{sorted(refused & set(driver_options))} are set by tbptt.lightning itself "
                "(Lightning's optimizer, scheduler, precision and strategy)"
            )
        self.truncation, self.loss_fn, self.clip = truncation, loss_fn, clip
        self.state_mode, self.batch_first, self.state0 = state, batch_first, state0
        self.checkpoint_segments, self.driver_options = checkpoint, driver_options
        self._driver: TBPTT | None = None
        self._saved: dict | None = None  # the driver state of a restored checkpoint
        self._eval_state: Any = None

    # -- what the user writes -------------------------------------------------------------------
    def loss(self, output: Tensor, y: Tensor) -> Tensor:
        """Per-step, per-stream losses (L, batch) (or (batch, L) when batch_first)."""
        return self.loss_fn(output, y)

    # -- manual optimization, always ------------------------------------------------------------
    @property
    def automatic_optimization(self) -> bool:
        """False: the driver makes the updates. Refuses Trainer(gradient_clip_val)."""
        trainer = self._trainer
        clip = None if trainer is None else trainer.gradient_clip_val
        if clip:
            raise InputError(
                f"Trainer(gradient_clip_val={clip}) cannot clip TBPTT updates: Lightning refuses "
                "gradient clipping under manual optimization, which tbptt.lightning uses. Pass "
                f"clip={clip} to the module instead (TBPTTModule(..., clip={clip})): the driver "
                "clips each update's whole gradient"
            )
        return False

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        if value:
            raise InputError("tbptt.lightning trains with manual optimization: the driver steps")

    # -- the driver -----------------------------------------------------------------------------
    @property
    def driver(self) -> TBPTT:
        """The carried stream's driver (made at the first batch, from Lightning's optimizer)."""
        if self._driver is None:
            self._driver = self._make_driver()
            if self._saved is not None:  # a restored checkpoint: the stream where it stopped
                self._driver.load_state_dict(self._saved)
                self._saved = None
        return self._driver

    def _make_driver(self) -> TBPTT:
        opt = self.optimizers()
        if isinstance(opt, list):
            raise InputError(
                f"configure_optimizers returned {len(opt)} optimizers; TBPTT updates with one"
            )
        return TBPTT(
            self,
            self.truncation,
            opt.optimizer,  # its state is saved and loaded; the step goes through Lightning
            loss_fn=self.loss,
            clip=self.clip,
            scheduler=self._step_scheduler(),
            batch_first=self.batch_first,
            amp=self._amp(),
            checkpoint=self.checkpoint_segments,
            state0=self.state0,
            step=opt.step,  # Lightning's: counts global_step, runs on_before_optimizer_step
            **self.driver_options,
        )

    def _amp(self) -> torch.dtype | Literal[False]:
        """The driver's autocast dtype for Lightning's precision: bf16-mixed, or none."""
        precision = str(self.trainer.precision)
        if precision == "bf16-mixed":
            return torch.bfloat16
        if precision in ("16-mixed", "16"):  # CUDA (on the CPU Lightning makes it bf16-mixed)
            raise InputError(
                f'Trainer(precision="{precision}") is not supported: float16 needs a GradScaler, '
                "which would step the optimizer past Lightning's (and scale the loss twice); "
                'use precision="bf16-mixed" (the driver autocasts to bfloat16)'
            )
        return False

    def _scheduler_config(self) -> Any:
        configs = self.trainer.lr_scheduler_configs
        if len(configs) > 1:
            raise InputError(f"{len(configs)} LR schedulers: TBPTT updates with one optimizer")
        return configs[0] if configs else None

    def _step_scheduler(self) -> Any:
        """The scheduler the driver steps after every update (interval "step"), else None."""
        cfg = self._scheduler_config()
        if cfg is None or cfg.interval != "step":
            return None
        if cfg.frequency != 1 or cfg.reduce_on_plateau:
            raise InputError(
                f"an LR scheduler with interval='step' is stepped after every update; got "
                f"frequency={cfg.frequency}"
                f"{' and ReduceLROnPlateau' if cfg.reduce_on_plateau else ''}"
                " (use frequency=1, or interval='epoch')"
            )
        return cfg.scheduler

    # -- training -------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """A fit starts a new stream (with this fit's optimizer), or the restored checkpoint's."""
        self._amp()  # refuse a precision before the first batch
        self._scheduler_config()
        self._driver = None

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y, mask, reset = unpack(batch)
        if self.state_mode == "per_batch":  # Lightning 1.x: a fresh stream, finished here
            driver = self._make_driver()
            with _outer_autocast_off(self):
                loss = driver.feed(x, y, mask, reset)
                driver.finish()
        else:
            with _outer_autocast_off(self):
                loss = self.driver.feed(x, y, mask, reset)
        count = x.shape[0 if self.batch_first else 1]
        self.log("train_loss", loss, prog_bar=True, batch_size=count)

    def on_train_epoch_end(self) -> None:
        cfg = self._scheduler_config()
        if cfg is None or cfg.interval != "epoch":
            return
        if (self.current_epoch + 1) % cfg.frequency:
            return
        if cfg.reduce_on_plateau:
            value = self.trainer.callback_metrics.get(cfg.monitor)
            if value is None:
                raise InputError(
                    f"ReduceLROnPlateau monitors {cfg.monitor!r}, which was not logged; logged: "
                    f"{sorted(self.trainer.callback_metrics)}"
                )
            cfg.scheduler.step(value)
        else:
            cfg.scheduler.step()

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the carried stream's driver (with several processes: on every rank, collectively)."""
        if self.state_mode == "carry" and self._driver is not None:
            checkpoint["tbptt"] = self._driver.state_dict()
        elif self._saved is not None:  # restored, and saved again before any batch
            checkpoint["tbptt"] = self._saved

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the driver's state; the driver is rebuilt from it before the next batch."""
        self._saved = checkpoint.get("tbptt")
        self._driver = None

    # -- validation -----------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._eval_state = None

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The mean loss per unmasked step; the state carried across batches with state='carry'."""
        x, y, mask, reset = unpack(batch)
        state = self._eval_state if self.state_mode == "carry" else None
        with _outer_autocast_off(self), _driver_autocast(self):
            losses, state = self.evaluate(x, y, mask, reset, state)
        self._eval_state = st.detach(state)
        count = float(losses.numel()) if mask is None else float(mask.sum())
        value = losses.sum(dtype=torch.float64) / max(count, 1.0)
        multi = self.trainer is not None and self.trainer.world_size > 1
        self.log("val_loss", value, prog_bar=True, batch_size=max(int(count), 1), sync_dist=multi)
        return value

    def evaluate(
        self, x: Tensor, y: Tensor, mask: Tensor | None, reset: Tensor | None, state: Any
    ) -> tuple[Tensor, Any]:
        """Run a chunk from `state` (with resets, as the driver does), no gradient: the masked
        losses (L, batch) and the final state."""
        td = 1 if self.batch_first else 0
        if state is None and self.state0 is not None:
            state = self.state0
        dim = getattr(self, "state_batch_dim", None)
        kw = {"restart": self.state0, "batch_dim": dim, "tdim": td, "starts": takes_starts(self)}
        with torch.no_grad():
            out, state = outputs(self, x, state, reset, **kw)  # as the driver calls the module
            losses = self.loss(out, y)
        if mask is not None:
            losses = losses * mask.to(losses.dtype)
        return losses, state


def unpack(batch: Any) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(x, y), (x, y, mask) or (x, y, mask, reset): a StreamLoader's batches, or a DataLoader's."""
    if not isinstance(batch, tuple | list) or not 2 <= len(batch) <= 4:
        got = f"a {type(batch).__name__}" + (
            f" of {len(batch)}" if isinstance(batch, tuple | list) else ""
        )
        raise InputError(f"a batch must be (x, y), (x, y, mask) or (x, y, mask, reset), got {got}")
    x, y, *rest = batch
    rest = [*rest, None, None][:2]
    return x, y, rest[0], rest[1]


def _outer_autocast_off(module: L.LightningModule) -> torch.autocast:
    """Lightning's mixed precision runs training_step under autocast; the driver autocasts the
    module and the loss itself (amp), so the outer one is switched off: the driver's numbers."""
    return torch.autocast(module.device.type, enabled=False)


def _driver_autocast(module: TBPTTModule) -> Any:
    """Validation under the autocast the driver trains with (bf16-mixed), or none."""
    amp = module._amp() if module._trainer is not None else False
    if amp is False:
        return nullcontext()
    return torch.autocast(module.device.type, dtype=amp)


__all__ = ["TBPTTModule", "unpack"]
