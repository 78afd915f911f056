"""Lightning callbacks of the engine: EMA, throughput, collapse monitor, non-finite loss stop.

``EMA`` builds on Lightning's own ``EMAWeightAveraging`` (torch ``AveragedModel`` with the foreach EMA
average function): the first update after the first optimizer step copies the weights, every
later optimizer step averages them, exactly as the release's trainer does. Unlike the stock
callback it averages only the task model, keeps the *raw* weights in the module (validation
runs on both; see engine.py), and stores the EMA weights under ``ema_state_dict``.
"""

from __future__ import annotations

import json
import time
import warnings

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.weight_averaging import EMAWeightAveraging
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN/inf loss; the message names the step."""


class EMA(EMAWeightAveraging):
    """EMA of ``pl_module.model`` (decay 0.9999 in both NEPA recipes), fp32, same device."""

    def __init__(self, decay: float = 0.9999, every_n_steps: int = 1):
        super().__init__(decay=decay, update_every_n_steps=every_n_steps)
        self.decay = decay

    def setup(self, trainer, pl_module, stage):
        if stage == "fit" and self._average_model is None:
            self._average_model = AveragedModel(
                pl_module.model, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(self.decay)
            )

    def on_fit_start(self, trainer, pl_module):
        # setup() runs before Lightning moves the model to its device; an EMA left on the CPU
        # made every step copy all weights to the host (measured: +80 ms/step, ViT-B on H100)
        if self._average_model is not None:
            self._average_model.to(pl_module.device)

    @property
    def module(self):
        """The EMA copy of the task model, or None before the first update."""
        m = self._average_model
        return m.module if m is not None and int(m.n_averaged) > 0 else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step_idx = trainer.global_step - 1
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            self._average_model.update_parameters(pl_module.model)
            self._latest_update_step = trainer.global_step

    def on_train_epoch_end(self, trainer, pl_module):
        pass  # updates are per optimizer step only

    def on_train_end(self, trainer, pl_module):
        pass  # keep the raw weights in the module; the EMA weights live in the checkpoint

    def on_validation_epoch_start(self, trainer, pl_module):
        pass  # no swapping: the engine validates raw and EMA weights side by side

    def on_validation_epoch_end(self, trainer, pl_module):
        pass

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self._average_model is not None:
            checkpoint["ema_state_dict"] = self._average_model.module.state_dict()
            checkpoint["ema_n_averaged"] = self._average_model.n_averaged.clone()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        if self._average_model is None or "ema_state_dict" not in checkpoint:
            return
        self._average_model.module.load_state_dict(checkpoint["ema_state_dict"])
        self._average_model.n_averaged.copy_(checkpoint["ema_n_averaged"])


class NonFiniteLossStop(Callback):
    """Stop before the backward pass of a NaN/inf loss, so no bad update is ever applied and the
    last checkpoint stays the last good one."""

    def on_before_backward(self, trainer, pl_module, loss):
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:  # every rank must stop together
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss ({loss.detach().float().item()}) at optimizer step "
                f"{trainer.global_step} (epoch {trainer.current_epoch}); training stopped, "
                f"the last checkpoint in the run dir is the last good one"
            )


class Throughput(Callback):
    """samples/s (global, over all ranks) and the time per optimizer step, on the progress bar."""

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self._t, self._step = None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now, step = time.perf_counter(), trainer.global_step
        if self._t is not None and step > self._step:
            dt = (now - self._t) / (step - self._step)
            pl_module.log(
                "perf/samples_per_s", self.samples_per_step / dt, prog_bar=True, rank_zero_only=True
            )
            pl_module.log("perf/step_s", dt, rank_zero_only=True)
        if self._step is None or step > self._step:
            self._t, self._step = now, step


class CollapseMonitor(Callback):
    """Every N optimizer steps, ask the task for collapse statistics of its predictions
    (per-dimension std, effective rank), log them and warn when they collapse."""

    def __init__(
        self, every_n_steps: int, dim: int, min_erank_frac: float = 0.01, min_std: float = 1e-3
    ):
        self.every, self.dim = every_n_steps, dim
        self.min_erank = max(1.5, min_erank_frac * dim)
        self.min_std = min_std
        self.warned = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if hasattr(pl_module.task, "want_stats"):
            pl_module.task.want_stats = trainer.global_step % self.every == 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        logs = (outputs or {}).get("logs", {}) if isinstance(outputs, dict) else {}
        if "collapse/erank" not in logs:
            return
        erank, std = float(logs["collapse/erank"]), float(logs["collapse/std_mean"])
        if erank < self.min_erank or std < self.min_std:
            self.warned += 1
            warnings.warn(
                f"step {trainer.global_step}: predictions may be collapsing (effective rank "
                f"{erank:.2f} of {self.dim} dims, mean per-dim std {std:.2e})",
                stacklevel=2,
            )


def format_recipe(recipe: dict) -> str:
    """The effective recipe as aligned lines (printed at start, saved as recipe.json)."""
    width = max(len(k) for k in recipe)
    return "effective recipe:\n" + "\n".join(f"  {k:<{width}} {v}" for k, v in recipe.items())


def save_recipe(recipe: dict, path) -> None:
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(recipe, indent=2) + "\n")
